"""The commit protocol on every backend: order of writes, replace, leases, rewrites, recovery after faults."""

from __future__ import annotations

import json
import math
import os
import socket
import time

import fsspec
import pytest
import torch

from ckpt_callback import CheckpointHook, CheckpointManager, CheckpointWarning
from ckpt_callback._commit import Lease
from ckpt_callback._layout import MARKER, STAGING_PREFIX
from ckpt_callback._storage import Storage


def state(value: float = 1.0) -> dict[str, torch.Tensor]:
    return {"w": torch.full((64, 64), value), "b": torch.arange(4)}


def files_under(root: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(root)
    fs.invalidate_cache()
    base = path.rstrip("/") + "/"
    return sorted(p[len(base):] for p in fs.find(path))


def test_object_store_writes_lease_first_sidecar_last_and_removes_the_lease(monkeypatch):
    root = "memory://commit-order"
    m = CheckpointManager(root)
    events: list[tuple[str, str]] = []
    fs = m._storage.fs
    real_pipe, real_open, real_rm = fs.pipe_file, fs.open, fs.rm_file

    def pipe(path, data, **kw):
        events.append(("put", path.rsplit("/", 1)[-1]))
        return real_pipe(path, data, **kw)

    def open_(path, mode="rb", **kw):
        if "w" in mode:
            events.append(("put", path.rsplit("/", 1)[-1]))
        return real_open(path, mode, **kw)

    def rm(path, **kw):
        events.append(("rm", path.rsplit("/", 1)[-1]))
        return real_rm(path, **kw)

    monkeypatch.setattr(fs, "pipe_file", pipe)
    monkeypatch.setattr(fs, "open", open_)
    monkeypatch.setattr(fs, "rm_file", rm)
    m.save(state(), step=1, optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
    puts = [name for kind, name in events if kind == "put" and not name.startswith(".ckpt-staging-probe")]
    assert puts[0] == MARKER and puts[-1] == "checkpoint.json", puts
    assert {"model.safetensors", "optimizer.safetensors", "training_state.json"} <= set(puts[1:-1])
    assert ("rm", MARKER) in events and events.index(("rm", MARKER)) > events.index(("put", "checkpoint.json"))
    assert MARKER not in " ".join(files_under(root))


def test_a_rerun_replaces_a_step_and_never_lists_missing_files(root):
    first = CheckpointManager(root)
    old = first.save(state(1.0), step=5)
    second = CheckpointManager(root)  # a second trainer.train() into the same root, no resume
    with pytest.warns(CheckpointWarning, match="replacing"):
        new = second.save(state(2.0), step=5)
    assert new.id != old.id
    listed = CheckpointManager(root).list().data
    assert [i.id for i in listed] == [new.id]
    assert all(r.ok for r in CheckpointManager(root).verify())
    assert CheckpointManager(root).load("checkpoint-5")["w"][0, 0].item() == 2.0
    assert not [f for f in files_under(root) if f.startswith(".")]  # no staging or trash left behind


@pytest.mark.parametrize("fail_at", [1, 2])
def test_replace_killed_half_way_is_rolled_forward(root, monkeypatch, fail_at):
    """A replacement dying between 'old one removed' and 'new one in place' loses nothing."""
    CheckpointManager(root).save(state(1.0), step=7)
    m = CheckpointManager(root)
    storage = m._storage
    calls = {"n": 0}
    if storage.is_local:
        name, real = "rename_local", storage.rename_local  # 1: old -> trash, 2: staging -> name
    else:
        name, real = "copy", storage.copy  # 1: model file, 2: the sidecar, copied into place

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError("injected fault")
        return real(*args, **kwargs)

    monkeypatch.setattr(storage, name, failing)
    with pytest.warns(CheckpointWarning, match="replacing"), pytest.raises(Exception, match="injected fault"):
        m.save(state(2.0), step=7)
    monkeypatch.undo()
    fresh = CheckpointManager(root)
    fresh.cleanup_incomplete()  # a new writer (or its first save) rolls the committed replacement forward
    listed = fresh.list().data
    assert [i.name for i in listed] == ["checkpoint-7"]
    assert fresh.verify()[0].ok
    assert fresh.load("checkpoint-7")["w"][0, 0].item() == 2.0
    assert not [f for f in files_under(root) if f.startswith(".")]


def _plant(root: str, name: str, lease: Lease | None) -> None:
    s = Storage(root)
    s.write_bytes_atomic(f"{name}/model.safetensors", b"partial upload")
    if lease is not None:
        s.write_bytes_atomic(f"{name}/{MARKER}", lease.encode())


def test_cleanup_removes_only_folders_whose_writer_is_provably_gone(root):
    CheckpointManager(root).save(state(), step=1)
    live_elsewhere = Lease(writer="w1", purpose="write", target="up-live", host="another-host", pid=1,
                           expires=time.time() + 60)
    expired = Lease(writer="w2", purpose="write", target="up-expired", host="another-host", pid=1,
                    expires=time.time() - 600)
    dead_here = Lease(writer="w3", purpose="write", target="up-dead", host=socket.gethostname(), pid=2**22 + 7,
                      expires=time.time() + 60)
    _plant(root, "up-live", live_elsewhere)
    _plant(root, "up-expired", expired)
    _plant(root, "up-dead", dead_here)
    _plant(root, "users-own-folder", None)  # not ours: never touched
    m = CheckpointManager(root)
    m.prune(keep_last=0)
    removed = set(m.cleanup_incomplete())
    tops = {f.split("/", 1)[0] for f in files_under(root)}
    assert {"up-live", "users-own-folder", "checkpoint-1"} <= tops
    assert not tops & {"up-expired", "up-dead"} and not removed & {"up-live", "users-own-folder"}
    # A save into a name another live process is writing is refused; training would log it.
    with pytest.raises(Exception, match="another process"):
        m.save(state(), step=2, name="up-live")


def test_an_emptied_prefix_never_blocks_a_name(root):
    m = CheckpointManager(root, keep_last=1)
    for step in (1, 2, 3, 4):
        m.save(state(step), step=step)
    assert "checkpoint-1" not in {i.name for i in m.list()}  # pruned; S3 servers may still list its folder
    CheckpointManager(root, keep_last=None).save(state(9.0), step=1)
    assert "checkpoint-1" in {i.name for i in CheckpointManager(root).list()}
    assert CheckpointManager(root).load("checkpoint-1")["w"][0, 0].item() == 9.0


def test_a_sidecar_rewrite_never_resurrects_a_deleted_checkpoint(root):
    m = CheckpointManager(root)
    info = m.save(state(), step=3)
    CheckpointManager(root).delete("checkpoint-3")
    assert m._commit.rewrite(info.replace(eval_loss=0.1)) is False
    assert CheckpointManager(root).list().data == []
    assert m.update_metrics(3, eval_loss=0.1) is None  # nothing to update: no error either


def test_retention_does_not_delete_a_newer_checkpoint_of_the_same_name(root):
    a = CheckpointManager(root, keep_last=1)
    a.save(state(), step=1)
    a.save(state(), step=2)  # a's view has checkpoint-1 pruned; now another run re-creates it
    a.wait()  # (object stores: a's retention deletes it in the background)
    b = CheckpointManager(root, keep_last=None)
    b.save(state(5.0), step=1)
    a._catalog.note(b.get("checkpoint-1").replace(id="stale-id"))  # a still believes in an older one
    assert a._retention.prune(a._catalog.cached(), keep_last=0) == []  # ids differ: nothing removed
    assert CheckpointManager(root).load("checkpoint-1")["w"][0, 0].item() == 5.0


def test_best_follows_the_monitor_the_run_recorded(root):
    m = CheckpointManager(root, monitor="accuracy", mode="max", keep_last=None)
    for step, acc, loss in [(1, 0.2, 0.1), (2, 0.9, 0.5), (3, 0.5, 0.3)]:
        m.save(state(), step=step, eval_loss=loss, metrics={"accuracy": acc})
    tagged = [i.name for i in m.list() if i.type == "best"]
    assert tagged == ["checkpoint-2"]
    later = CheckpointManager(root)  # no monitor given: the run's recorded one
    assert later.get("best").name == "checkpoint-2" and later.list().summary.best.name == "checkpoint-2"
    assert later.get("best").monitor.to_json() == {"name": "accuracy", "mode": "max"}
    assert CheckpointManager(root, monitor="evalLoss").get("best").name == "checkpoint-1"  # asked for explicitly


def test_training_state_is_strict_json_and_resume_is_exact_with_infinities(tmp_path):
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)  # its best starts at inf
    m = CheckpointManager(str(tmp_path / "run"))
    m.save(model, step=1, optimizer=opt, scheduler=plateau, metrics={"nan": float("nan")}, train_loss=float("inf"))
    text = (tmp_path / "run" / "checkpoint-1" / "training_state.json").read_text()

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in a file the library wrote")

    json.loads(text, parse_constant=refuse)
    json.loads((tmp_path / "run" / "checkpoint-1" / "checkpoint.json").read_text(), parse_constant=refuse)
    again = torch.optim.lr_scheduler.ReduceLROnPlateau(torch.optim.SGD(model.parameters(), lr=0.1))
    CheckpointManager(str(tmp_path / "run")).restore("latest", scheduler=again)
    assert math.isinf(again.best) and again.state_dict() == plateau.state_dict()


def test_huge_numbers_are_a_clear_error(root):
    m = CheckpointManager(root)
    with pytest.raises(ValueError, match="n"):
        m.save(state(), step=1, metrics={"n": 10**400})


def test_training_loop_calls_survive_storage_trouble(tmp_path, tiny_net, caplog):
    root = tmp_path / "run"
    hook = CheckpointHook(str(root), tiny_net, every_n_steps=1, keep_last=2)
    assert hook.step(1, loss=1.0) is not None
    for entry in os.scandir(root):  # a user deletes everything under the running job
        if entry.is_dir():
            import shutil

            shutil.rmtree(entry.path)
    hook.evaluate(1, eval_loss=0.5)  # its checkpoint is gone: nothing to update, no exception
    os.chmod(root, 0o500)
    try:
        if os.access(root, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root): the permission fault cannot be made")
        assert hook.step(2, loss=0.9) is None  # logged, training goes on
        hook.evaluate(2, eval_loss=0.4)
    finally:
        os.chmod(root, 0o700)
    assert hook.step(3, loss=0.8) is not None


def test_a_missing_bucket_is_an_error_and_is_never_created(s3_server):
    import s3fs

    with pytest.raises(Exception, match="does not exist"):
        CheckpointHook("s3://no-such-bucket-ckpt/run", torch.nn.Linear(1, 1))
    fs = s3fs.S3FileSystem()
    assert not fs.exists("no-such-bucket-ckpt")


def test_staging_prefix_is_hidden_from_listing(root):
    s = Storage(root)
    s.write_bytes_atomic(f"{STAGING_PREFIX}abc/checkpoint.json", b"{}")
    assert CheckpointManager(root).list(limit=5).data == []


def test_a_killed_sidecar_rewrite_is_reported_by_verify_and_removed_by_cleanup(tmp_path):
    root = str(tmp_path / "run")
    CheckpointManager(root).save(state(), step=1)
    leftover = tmp_path / "run" / "checkpoint-1" / "checkpoint.json.tmp-dead1234"
    leftover.write_text("{")
    (tmp_path / "run" / "checkpoint-1" / "planted.bin").write_bytes(b"x")
    result = CheckpointManager(root).verify("checkpoint-1")[0]
    assert result.problems == ["planted.bin: not listed in the sidecar"]
    assert result.leftovers and "checkpoint.json.tmp-dead1234" in result.leftovers[0]
    CheckpointManager(root).cleanup_incomplete()
    assert not leftover.exists() and (tmp_path / "run" / "checkpoint-1" / "planted.bin").exists()


def test_listing_a_missing_bucket_says_so(s3_server):
    from ckpt_callback import CheckpointNotFoundError

    with pytest.raises(CheckpointNotFoundError, match="bucket 'no-such-bucket-ckpt'"):
        CheckpointManager("s3://no-such-bucket-ckpt/run").list()
    assert CheckpointManager("s3://ckpt-test/never-written-prefix").list().data == []  # an empty root


@pytest.mark.parametrize("nested", [False, True])
def test_a_local_save_makes_every_file_and_folder_durable_before_the_rename_that_shows_it(tmp_path, monkeypatch,
                                                                                          nested):
    """What a power cut can undo that a SIGKILL cannot: each file of the checkpoint (the sidecar too) and
    each folder holding them is fsynced before the rename that makes the checkpoint visible, and the
    root after it. Nothing else is (leases only matter to live processes): two rounds to the disk."""
    events: list[tuple[str, str]] = []
    fsync, rename = os.fsync, os.rename

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def recording_rename(src, dst, *args, **kwargs):
        events.append(("rename", os.fspath(dst)))
        return rename(src, dst, *args, **kwargs)

    root = tmp_path / "ckpts"
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    m = CheckpointManager(str(root))
    m.save(model, step=1)  # the first save also creates the root
    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "rename", recording_rename)
    opt = torch.optim.AdamW(model.parameters())
    files = {"merged/config.json": b"{}"} if nested else None
    info = m.save(model, step=2, optimizer=opt, files=files)
    shown = events.index(("rename", str(root / "checkpoint-2")))
    before = {os.path.relpath(path, str(root)).split("/", 1)[1] if "/" in os.path.relpath(path, str(root)) else ""
              for kind, path in events[:shown] if kind == "fsync"}
    expected = {e.path for e in info.files} | {"checkpoint.json", ""} | ({"merged"} if nested else set())
    assert before == expected
    assert events[shown + 1:] == [("fsync", str(root))]
