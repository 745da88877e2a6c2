"""The storage contract: every test here runs unchanged on each backend of the ``root`` fixture."""

from __future__ import annotations

import hashlib
import json
import struct
import threading
import urllib.request
import warnings

import fsspec
import pytest
import torch

from ckpt_callback import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointWarning,
    CorruptCheckpointError,
    InvalidArgumentError,
    InvalidNameError,
    SaveError,
    StorageError,
    _storage,
)
from conftest import run_python


def state(value: float = 1.0) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4, 4), value), "b": torch.arange(4)}


def fs_of(root: str):
    return fsspec.core.url_to_fs(root)


def folders(root: str) -> set[str]:
    """Top-level folders that hold files (object stores may list emptied prefixes for a while)."""
    fs, path = fs_of(root)
    fs.invalidate_cache()
    return {p[len(path.rstrip("/")) + 1 :].split("/", 1)[0] for p in fs.find(path)}


def test_save_writes_weights_and_sidecar_last(root):
    m = CheckpointManager(root)
    info = m.save(state(), step=500, epoch=1.5, train_loss=0.7, metrics={"acc": 0.5})
    fs, path = fs_of(root)
    files = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{path}/checkpoint-500", detail=False))
    assert files == ["checkpoint.json", "model.safetensors"]
    sidecar = json.loads(fs.cat_file(f"{path}/checkpoint-500/checkpoint.json"))
    assert sidecar["name"] == "checkpoint-500" and sidecar["step"] == 500 and sidecar["type"] == "automatic"
    assert sidecar["trainLoss"] == 0.7 and sidecar["evalLoss"] is None and sidecar["metrics"] == {"acc": 0.5}
    weights = fs.size(f"{path}/checkpoint-500/model.safetensors")
    assert sidecar["size"] == sum(f["size"] for f in sidecar["files"]) == weights
    assert info.id == sidecar["id"] and m.get("checkpoint-500") == info
    assert folders(root) == {"checkpoint-500"}  # no staging leftovers


def test_load_round_trips_tied_weights(root, tiny_net):
    m = CheckpointManager(root)
    m.save(tiny_net, step=1)
    loaded = m.load("checkpoint-1")
    expected = tiny_net.state_dict()
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert loaded["head.weight"] is loaded["embed.weight"]


def test_retention_keeps_newest_best_manual_final(root):
    m = CheckpointManager(root, keep_last=2)
    losses = {100: 0.9, 200: 0.2, 300: 0.8, 400: 0.7, 500: 0.6}
    for step, loss in losses.items():
        m.save(state(step), step=step, eval_loss=loss)
        if step == 300:
            m.save(state(), step=step, type="manual", name="before-lr-drop", description="hand-made")
    m.save(state(), step=600, type="final")
    m.wait()  # (object stores: retention's deletes finish in the background)
    types = {i.name: i.type for i in m.list()}
    assert types == {"checkpoint-200": "best", "before-lr-drop": "manual", "checkpoint-400": "automatic",
                     "checkpoint-500": "automatic", "checkpoint-600": "final"}
    assert folders(root) == set(types)
    assert m.best().name == "checkpoint-200" and m.get("final").name == "checkpoint-600"
    assert m.get("latest").name == "checkpoint-600"


def test_retention_deletes_never_hold_the_saving_thread(root, monkeypatch):
    """A save returns while retention's removal of the pruned checkpoint is still running on another
    thread; the pruned one is already gone from every listing (local: renamed away; object stores:
    its sidecar goes first) and its files are gone once `wait` returns."""
    entered, release, threads = threading.Event(), threading.Event(), []
    real_remove_tree = _storage.Storage.remove_tree

    def slow_remove_tree(self, rel, **kwargs):
        threads.append(threading.current_thread().name)
        entered.set()
        release.wait(30)
        return real_remove_tree(self, rel, **kwargs)

    monkeypatch.setattr(_storage.Storage, "remove_tree", slow_remove_tree)
    m = CheckpointManager(root, keep_last=1)
    m.save(state(1.0), step=1)
    m.save(state(2.0), step=2)  # prunes checkpoint-1; its removal waits for `release`
    assert entered.wait(30) and not release.is_set()
    assert threads == ["ckpt-retention_0"]
    assert [i.name for i in m.list()] == ["checkpoint-2"]
    assert [i.name for i in CheckpointManager(root).list()] == ["checkpoint-2"]
    release.set()
    m.wait()
    assert folders(root) == {"checkpoint-2"}


def test_best_tag_moves_when_a_better_one_arrives_and_survives_restart(root):
    m = CheckpointManager(root, keep_last=1)
    m.save(state(), step=1, eval_loss=0.5)
    m.save(state(), step=2, eval_loss=0.4)
    assert [(i.name, i.type) for i in m.list(sort_by="step", order="asc")] == [("checkpoint-2", "best")]
    again = CheckpointManager(root, keep_last=1)  # a restarted run rebuilds its view from storage
    again.save(state(), step=3, eval_loss=0.6)
    again.save(state(), step=4, eval_loss=0.7)
    assert {i.name: i.type for i in again.list()} == {"checkpoint-2": "best", "checkpoint-4": "automatic"}


def test_metrics_after_save_update_the_sidecar_and_count_for_best(root):
    m = CheckpointManager(root, keep_last=5)
    first = m.save(state(), step=10, train_loss=1.0)
    m.save(state(), step=20, train_loss=0.9, eval_loss=0.5)
    updated = m.update_metrics(10, eval_loss=0.1, metrics={"accuracy": 0.9})
    assert updated.eval_loss == 0.1 and updated.metrics == {"accuracy": 0.9} and updated.train_loss == 1.0
    assert updated.updated_at > first.updated_at and updated.created_at == first.created_at
    assert m.get("checkpoint-10").type == "best" and m.get("checkpoint-20").type == "automatic"
    assert m.update_metrics(15, eval_loss=0.01) is None


def test_final_at_a_saved_step_retags_instead_of_writing_twice(root):
    m = CheckpointManager(root)
    first = m.save(state(), step=50)
    final = m.save(state(), step=50, type="final")
    assert final.type == "final" and final.id == first.id and len(m.list()) == 1


def test_explicit_name_taken_raises(root):
    m = CheckpointManager(root)
    m.save(state(), step=1, type="manual", name="keep-me")
    with pytest.raises(CheckpointExistsError, match="keep-me"):
        m.save(state(), step=2, type="manual", name="keep-me")


def test_list_sorting_and_pagination_walk_every_checkpoint_once(root):
    m = CheckpointManager(root, keep_last=None)
    losses = [0.5, 0.3, None, 0.9, 0.3, 0.1, None, 0.7]
    for step, loss in enumerate(losses, start=1):
        m.save(state(), step=step * 10, eval_loss=loss, train_loss=1.0 / step, metrics={"acc": step % 3})
    for key in ["createdAt", "step", "evalLoss", "trainLoss", "acc", "epoch", "name"]:
        for order in ["asc", "desc"]:
            full = [i.name for i in m.list(sort_by=key, order=order)]
            for limit in (1, 3, 4, 8, 9):  # 4 and 8 end on a full page: has_more must be False there
                walked, after = [], None
                while True:
                    page = m.list(sort_by=key, order=order, limit=limit, after=after)
                    walked += [i.name for i in page]
                    assert page.total_count == 8
                    assert page.has_more == (len(walked) < 8), (key, order, limit, len(walked))
                    if not page.has_more:
                        break
                    after = page.last_id
                assert walked == full and len(set(walked)) == 8, (key, order)
    by_loss = [i.eval_loss for i in m.list(sort_by="evalLoss", order="asc")]
    assert by_loss[:6] == [0.1, 0.3, 0.3, 0.5, 0.7, 0.9] and by_loss[6:] == [None, None]
    page = m.list(sort_by="step", order="asc", limit=2)
    assert (page.first_id, page.last_id) == (page.data[0].id, page.data[1].id)
    assert page.summary.best.eval_loss == 0.1 and page.summary.latest.step == 80
    assert page.summary.total_size == sum(i.size for i in m.list())
    body = page.to_json()
    assert body["object"] == "list" and body["totalCount"] == 8 and body["has_more"] is True
    assert set(body["summary"]) == {"bestCheckpoint", "latestCheckpoint", "totalSize", "totalLogicalSize"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"sort_by": "bogus"}, "cannot sort by 'bogus'"), ({"order": "up"}, "order"), ({"limit": 0}, "limit"),
     ({"limit": 101}, "limit"), ({"type": "weird"}, "type"), ({"after": "no-such-id"}, "no-such-id")],
)
def test_list_rejects_bad_arguments(root, kwargs, message):
    m = CheckpointManager(root)
    m.save(state(), step=1)
    with pytest.raises(CheckpointError, match=message):
        m.list(**kwargs)


def test_list_filters_by_type(root):
    m = CheckpointManager(root)
    m.save(state(), step=1)
    m.save(state(), step=2, type="manual", name="m")
    assert [i.name for i in m.list(type="manual")] == ["m"]


@pytest.mark.parametrize("name", ["a/b", "..", "", "latest", "best", "final", "../../etc"])
def test_bad_names_are_refused(root, name):
    with pytest.raises(InvalidNameError):
        CheckpointManager(root).save(state(), step=1, type="manual", name=name)


def test_unknown_names(root):
    m = CheckpointManager(root)
    m.save(state(), step=1)
    for name in ["nope", "best", "final"]:
        with pytest.raises(CheckpointNotFoundError, match=name):
            m.get(name)
    with pytest.raises(CheckpointNotFoundError):
        m.load("nope")
    assert m.get(m.get("latest").id).name == "checkpoint-1"  # ids work as names


def test_missing_root_is_a_clear_error(tmp_path):
    m = CheckpointManager(str(tmp_path / "never-created"))
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        m.list()
    assert m.latest() is None


def test_unwritable_root_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    m = CheckpointManager(str(blocker / "sub"))
    with pytest.raises(StorageError, match="a-file/sub"):
        m.save(state(), step=1)
    with pytest.raises(StorageError, match="cannot be written"):
        m.check_writable()


def corrupt(root: str, rel: str, how: str) -> None:
    fs, path = fs_of(root)
    target = f"{path}/{rel}"
    data = bytearray(fs.cat_file(target))
    if how == "flip":
        data[len(data) // 2] ^= 0xFF
    elif how == "truncate":
        data = data[: len(data) - 7]
    fs.pipe_file(target, bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_corrupted_weights_are_detected_by_verify_and_load(root, how):
    m = CheckpointManager(root)
    m.save(state(), step=1)
    m.save(state(), step=2)
    corrupt(root, "checkpoint-1/model.safetensors", how)
    results = {r.name: r for r in m.verify()}
    assert results["checkpoint-2"].ok
    assert not results["checkpoint-1"].ok and "model.safetensors" in results["checkpoint-1"].problems[0]
    with pytest.raises(CorruptCheckpointError, match=r"checkpoint-1/model\.safetensors"):
        m.load("checkpoint-1")


def test_missing_file_is_named(root):
    m = CheckpointManager(root)
    m.save(state(), step=1)
    fs, path = fs_of(root)
    fs.rm(f"{path}/checkpoint-1/model.safetensors")
    assert m.verify("checkpoint-1")[0].problems == ["model.safetensors: missing"]
    with pytest.raises(CorruptCheckpointError, match="missing"):
        m.load("checkpoint-1")


def test_malformed_sidecar_is_skipped_by_list_with_a_warning_and_an_error_from_get(root):
    m = CheckpointManager(root)
    m.save(state(), step=1)
    m.save(state(), step=2)
    fs, path = fs_of(root)
    fs.pipe_file(f"{path}/checkpoint-1/checkpoint.json", b'{"schemaVersion": 99}')
    with pytest.warns(CheckpointWarning, match="checkpoint-1.*schemaVersion 99"):
        assert [i.name for i in m.list()] == ["checkpoint-2"]
    with pytest.raises(CorruptCheckpointError, match="schemaVersion"):
        m.get("checkpoint-1")


def test_incomplete_folder_is_invisible_and_cleaned_up(root):
    m = CheckpointManager(root)
    m.save(state(), step=1)
    fs, path = fs_of(root)
    fs.makedirs(f"{path}/checkpoint-2", exist_ok=True)
    fs.pipe_file(f"{path}/checkpoint-2/.ckpt-incomplete", b"")  # what a crashed save leaves
    fs.pipe_file(f"{path}/checkpoint-2/model.safetensors", b"partial")
    fs.makedirs(f"{path}/notes", exist_ok=True)
    fs.pipe_file(f"{path}/notes/todo.txt", b"the user's own folder")
    assert [i.name for i in m.list()] == ["checkpoint-1"] and m.latest().name == "checkpoint-1"
    with pytest.raises(CheckpointNotFoundError, match="incomplete"):
        m.load("checkpoint-2")
    assert CheckpointManager(root).cleanup_incomplete() == ["checkpoint-2"]
    assert folders(root) == {"checkpoint-1", "notes"}  # never touches what is not ours
    with pytest.raises(CheckpointExistsError):
        m.save(state(), step=3, type="manual", name="notes")
    assert fs.cat_file(f"{path}/notes/todo.txt") == b"the user's own folder"


def test_delete_removes_sidecar_first_and_everything(root):
    m = CheckpointManager(root)
    m.save(state(), step=1)
    m.save(state(), step=2)
    assert m.delete("checkpoint-1").name == "checkpoint-1"
    assert folders(root) == {"checkpoint-2"}
    with pytest.raises(CheckpointNotFoundError):
        m.delete("checkpoint-1")


def test_prune_by_hand_and_dry_run(root):
    m = CheckpointManager(root, keep_last=None)
    for step in range(1, 6):
        m.save(state(), step=step)
    assert [i.name for i in m.prune(keep_last=2, dry_run=True)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert len(m.list()) == 5
    m.prune(keep_last=2)
    assert sorted(i.name for i in m.list()) == ["checkpoint-4", "checkpoint-5"]


def test_resumed_from_checkpoint_is_protected(root, tiny_net):
    m = CheckpointManager(root, keep_last=1, keep_best=0)
    m.save(tiny_net, step=1)
    m.save(tiny_net, step=2)
    resumer = CheckpointManager(root, keep_last=1, keep_best=0)
    resumer.restore("checkpoint-2", model=tiny_net)
    resumer.save(tiny_net, step=3)
    resumer.save(tiny_net, step=4)
    assert sorted(i.name for i in resumer.list()) == ["checkpoint-2", "checkpoint-4"]


def test_monitor_that_never_appears_warns_once_and_tags_nothing(root):
    m = CheckpointManager(root, monitor="accuracy", keep_last=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 5):
            m.save(state(), step=step, eval_loss=0.5)
        m.close()  # the manager cannot tell an evaluation from a log: it says so when saving ends
    messages = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    assert len(messages) == 1 and "'accuracy'" in messages[0] and "evalLoss" in messages[0]
    assert all(i.type == "automatic" for i in m.list()) and m.best() is None


def test_restore_into_a_wrong_model_is_a_clear_error(root, tiny_net):
    m = CheckpointManager(root)
    m.save(tiny_net, step=1)
    with pytest.raises(CorruptCheckpointError, match="does not fit the model"):
        m.restore("latest", model=torch.nn.Linear(3, 3))


def test_sharded_checkpoint_loads_and_verifies(root):
    m = CheckpointManager(root, max_shard_size=3000)
    big = {f"layer{i}": torch.randn(16, 16) for i in range(5)}  # 1 KiB each
    info = m.save(big, step=1)
    names = sorted(f.path for f in info.files)
    assert "model.safetensors.index.json" in names and "model-00001-of-00003.safetensors" in names
    loaded = m.load("checkpoint-1")
    assert all(torch.equal(loaded[k], v) for k, v in big.items())
    assert m.verify()[0].ok


def test_async_save_snapshots_the_state_at_the_call(root):
    m = CheckpointManager(root, async_save=True)
    weights = {"w": torch.zeros(256, 256)}
    m.save(weights, step=1)
    weights["w"].add_(1.0)  # training changes the weights right after save returns
    m.save(weights, step=2)
    weights["w"].add_(1.0)
    m.wait()
    assert torch.equal(m.load("checkpoint-1")["w"], torch.zeros(256, 256))
    assert torch.equal(m.load("checkpoint-2")["w"], torch.ones(256, 256))
    m.close()


def test_async_save_error_is_reported_once_and_does_not_cost_the_next_save(caplog):
    # /proc cannot hold folders: the checks before the snapshot pass, the background write fails.
    m = CheckpointManager("/proc/ckpt-callback-test", async_save=True)
    m.save(state(), step=1)
    with pytest.raises(SaveError, match="background save"):
        m.wait()
    assert "checkpoint-1" in caplog.text  # logged at once, with the checkpoint's name
    m.save(state(), step=2)
    assert m.save(state(), step=3) is not None  # the failure of step 2 was logged, not held against step 3
    with pytest.raises(SaveError, match="background save"):
        m.wait()  # step 3 was attempted: its own failure
    assert caplog.text.count("'checkpoint-2'") == 1 and "'checkpoint-3'" in caplog.text
    m.close()


def test_save_rejects_bad_arguments(root):
    m = CheckpointManager(root)
    with pytest.raises(InvalidArgumentError, match="type"):
        m.save(state(), step=1, type="best")
    with pytest.raises(InvalidArgumentError, match="step"):
        m.save(state(), step=-1)
    with pytest.raises(InvalidArgumentError, match="state dict"):
        m.save([1, 2], step=1)


def test_download_copies_a_checkpoint_and_checks_hashes(root, tmp_path, tiny_net):
    m = CheckpointManager(root)
    m.save(tiny_net, step=1)
    m.save(tiny_net, step=2)
    dest = m.download("latest", tmp_path / "local")
    assert sorted(p.name for p in dest.iterdir()) == ["checkpoint.json", "model.safetensors"]
    assert CheckpointManager(str(tmp_path)).get("local").step == 2  # a valid checkpoint folder
    corrupt(root, "checkpoint-1/model.safetensors", "flip")
    with pytest.raises(CorruptCheckpointError, match="sha256"):
        m.download("checkpoint-1", tmp_path / "bad")
    assert not (tmp_path / "bad" / "model.safetensors").exists()


def test_signed_urls_where_the_storage_can_sign(root):
    m = CheckpointManager(root)
    info = m.save(state(), step=1)
    if root.startswith("gs://"):  # the emulator's anonymous credentials hold no key to sign with
        with pytest.raises(StorageError, match="GCS signs with a service-account key"):
            m.signed_urls("latest")
        assert m.list().to_tensorone()["checkpoints"][0]["downloadUrl"] is None
        return
    if not root.startswith(("s3://", "az://")):
        with pytest.raises(StorageError, match="cannot make signed URLs"):
            m.signed_urls("latest")
        return
    urls = m.signed_urls("latest", expires=600)
    assert set(urls) == {"model.safetensors", "checkpoint.json"}
    with urllib.request.urlopen(urls["model.safetensors"]) as response:  # no credentials needed
        assert hashlib.sha256(response.read()).hexdigest() == info.files[0].sha256
    download = m.list().to_tensorone()["checkpoints"][0]["downloadUrl"]  # TensorOne's view signs the weights
    with urllib.request.urlopen(download) as response:
        assert hashlib.sha256(response.read()).hexdigest() == info.files[0].sha256


def test_async_snapshot_keeps_tied_weights_tied_and_reuses_buffers(root, tiny_net):
    m = CheckpointManager(root, async_save=True)
    m.save(tiny_net, step=1)
    first = dict(m._writer._staging._buffers)
    m.save(tiny_net, step=2)
    m.wait()
    buffers = m._writer._staging._buffers
    assert {k: v.data_ptr() for k, v in buffers.items()} == {k: v.data_ptr() for k, v in first.items()}
    assert m._writer._staging.nbytes == sum(t.numel() * t.element_size() for t in
                                    {t.data_ptr(): t for t in tiny_net.state_dict().values()}.values())
    sync = CheckpointManager(make_root_like(root))
    sync.save(tiny_net, step=1)
    assert m.get("checkpoint-2").size == sync.get("checkpoint-1").size  # the tie is stored once in both
    loaded = m.load("checkpoint-2")
    assert loaded["head.weight"] is loaded["embed.weight"]
    m.close()


def make_root_like(root: str) -> str:
    return root.rstrip("/") + "-sync"


def test_restore_fills_the_models_own_tensors(root, tiny_net):
    m = CheckpointManager(root)
    m.save(tiny_net, step=1)
    expected = {k: v.clone() for k, v in tiny_net.state_dict().items()}
    pointers = {k: v.data_ptr() for k, v in tiny_net.state_dict().items()}
    with torch.no_grad():
        for p in tiny_net.parameters():
            p.zero_()
    m.restore("latest", model=tiny_net)
    live = tiny_net.state_dict()
    assert all(torch.equal(live[k], expected[k]) for k in expected)
    assert {k: v.data_ptr() for k, v in live.items()} == pointers
    assert tiny_net.head.weight is tiny_net.embed.weight


def test_restore_from_a_corrupt_file_says_the_model_is_partly_loaded(root, tiny_net):
    m = CheckpointManager(root)
    m.save(tiny_net, step=1)
    corrupt(root, "checkpoint-1/model.safetensors", "flip")
    with pytest.raises(CorruptCheckpointError, match="partly loaded"):
        m.restore("latest", model=tiny_net)


class WideNet(torch.nn.Module):
    """Tensors of 4 MiB: every read is hashed on the verifying thread, not in the caller."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(1024, 1024)
        self.b = torch.nn.Linear(1024, 1024)


def trained_wide_net() -> tuple[WideNet, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = WideNet()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net.b(net.a(torch.randn(2, 1024))).sum().backward()
    opt.step()
    return net, opt


def damage(root: str, rel: str, how: str) -> None:
    fs, path = fs_of(root)
    target = f"{path}/{rel}"
    data = bytearray(fs.cat_file(target))
    if how == "flip early":  # the first tensor's bytes, read long before the end
        (length,) = struct.unpack("<Q", data[:8])
        data[8 + length + 5] ^= 0x01
    elif how == "flip late":  # hashed only after the last read
        data[-5] ^= 0x01
    elif how == "truncate":
        data = data[:-4]
    elif how == "append":
        data += b"\0" * 4
    fs.pipe_file(target, bytes(data))


def scramble(net: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Change every weight and optimizer state tensor in place; return copies of both as they now are."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        for v in (v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)):
            v.add_(1.0)
    return copies(net, opt)


def copies(net: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return ([t.clone() for t in net.state_dict().values()],
            [v.clone() for st in opt.state.values() for v in st.values() if torch.is_tensor(v)])


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("how", ["flip early", "flip late", "truncate", "append"])
@pytest.mark.parametrize("rel", ["model.safetensors", "optimizer.safetensors"])
@pytest.mark.parametrize("optimizer", ["with state", "new"])
def test_restore_refuses_any_damaged_byte_and_says_what_it_changed(root, rel, how, optimizer):
    net, opt = trained_wide_net()
    m = CheckpointManager(root)
    m.save(net, step=1, optimizer=opt)
    damage(root, f"checkpoint-1/{rel}", how)
    if optimizer == "new":  # a resume in a new process: the optimizer has no state to fill
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    model_before, opt_before = scramble(net, opt)
    opt.param_groups[0]["lr"] = 0.5
    with pytest.raises(CorruptCheckpointError, match=f"checkpoint-1/{rel}") as caught:
        m.restore("latest", model=net, optimizer=opt)
    message = str(caught.value)
    model_after, opt_after = copies(net, opt)
    if how in ("truncate", "append"):  # every size is checked before a byte is read
        assert same(model_before, model_after) and same(opt_before, opt_after)
    else:  # weights and optimizer state are read side by side into their own memory: the end of a file tells
        assert not same(model_before, model_after)
        assert same(opt_before, opt_after) == (optimizer == "new")
    assert ("the model" in message) == (not same(model_before, model_after)), message
    assert ("the optimizer's state tensors" in message) == (not same(opt_before, opt_after)), message
    assert opt.param_groups[0]["lr"] == 0.5  # nothing applied: its own settings,
    assert (not opt.state) == (optimizer == "new")  # and a new optimizer still without state
    if how.startswith("flip"):
        m.restore("latest", model=net, optimizer=opt, verify=False)  # only the sha256 stood between


def test_background_hash_matches_hashlib_and_drops_work_when_closed():
    from ckpt_callback._reader import _BackgroundSha256
    from ckpt_callback._serialization import _HASH_LAG_BYTES as _HASH_LAG

    data = bytes(range(256)) * (1 << 16)  # 16 MiB
    pieces = [data[:7], data[7 : 1 << 20], data[1 << 20 :], memoryview(data)[: _HASH_LAG // 4]] * 6
    digest = _BackgroundSha256()
    for i, piece in enumerate(pieces):
        (digest.update_now if i % 5 == 0 else digest.update)(piece)
    expected = hashlib.sha256(b"".join(bytes(p) for p in pieces)).hexdigest()
    assert digest.hexdigest() == expected
    digest.close()
    abandoned = _BackgroundSha256()
    for piece in pieces:
        abandoned.update(piece)
    abandoned.close()  # an abandoned stream: its thread ends, and a partial digest is never returned
    assert not [t for t in threading.enumerate() if t.name.startswith("ckpt-verify")]
    if abandoned._dropped:
        with pytest.raises(RuntimeError, match="not hashed"):
            abandoned.hexdigest()
    else:
        assert abandoned.hexdigest() == expected


def test_interpreter_exit_waits_for_the_last_background_save(tmp_path):
    code = (
        "import sys, torch\n"
        "from ckpt_callback import CheckpointManager\n"
        "m = CheckpointManager(sys.argv[1], async_save=True)\n"
        "m.save({'w': torch.randn(2_000_000)}, step=7)\n"  # no wait(), no close(): just exit
    )
    run_python(code, str(tmp_path / "run"))
    m = CheckpointManager(str(tmp_path / "run"))
    assert [i.name for i in m.list()] == ["checkpoint-7"] and m.verify()[0].ok


def test_a_large_local_save_writes_its_files_side_by_side_and_every_byte_checks_out(tmp_path):
    """Above 64 MiB a local save writes the weights and the optimizer state on two threads, each
    hashing its own file: the sidecar's sizes and sha256 match the bytes, and a restore is exact."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2048, 4096)  # 32 MiB of weights, 64 MiB of AdamW moments
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 2048)).sum().backward()
    opt.step()
    m = CheckpointManager(str(tmp_path / "run"))
    info = m.save(model, step=1, optimizer=opt)
    assert any(t.name.startswith("ckpt-file") for t in threading.enumerate())
    for entry in info.files:
        data = (tmp_path / "run" / "checkpoint-1" / entry.path).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry.size, entry.sha256)
    fresh = torch.nn.Linear(2048, 4096)
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    m.restore("checkpoint-1", model=fresh, optimizer=fresh_opt)
    assert torch.equal(fresh.weight, model.weight)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
