"""Frozen tensors: their own shard files, stored once (hard links locally, a shared blob on object stores)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from ckpt_callback import CheckpointManager, CorruptCheckpointError, SidecarError, _blobs
from ckpt_callback._catalog import stored_total
from ckpt_callback._layout import MARKER
from ckpt_callback._serialization import frozen_names, parse_index, plan_model_files
from ckpt_callback._sidecar import CheckpointInfo, FileEntry
from conftest import CLOUD_BACKENDS


class FrozenBase(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.base = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
        self.head = torch.nn.Linear(256, 8)
        self.base.requires_grad_(False)


def train(net: FrozenBase) -> None:
    with torch.no_grad():
        net.head.weight.add_(0.1)


def test_plan_puts_frozen_tensors_in_files_of_their_own() -> None:
    net = FrozenBase()
    state = net.state_dict()
    frozen = frozen_names(net, state)
    assert frozen == {"base.0.weight", "base.0.bias", "base.1.weight", "base.1.bias"}
    plan = plan_model_files(state, frozen=frozen, max_shard_size=200_000)
    assert plan.index is not None
    names, _ = parse_index(json.dumps(plan.index).encode(), "index")
    assert names == sorted(plan.files)
    assert set(plan.index["weight_map"]) == set(state)
    for filename in plan.frozen_files:
        assert set(plan.files[filename]) <= frozen
    assert {n for f in plan.frozen_files for n in plan.files[f]} == frozen
    assert len(plan.frozen_files) >= 2 and len(plan.files) == len(plan.frozen_files) + 1  # split by size too
    assert sorted(plan.files)[:-1] == sorted(plan.frozen_files)  # frozen files numbered first
    # nothing frozen, or everything: the usual single file
    assert list(plan_model_files(state).files) == ["model.safetensors"]
    assert list(plan_model_files(state, frozen=set(state)).files) == ["model.safetensors"]


@pytest.mark.parametrize("compression", [None, pytest.param("zstd", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("zstandard") is None, reason="zstandard not installed"))])
def test_local_checkpoints_share_the_frozen_shard_and_retention_frees_only_unshared(tmp_path: Path,
                                                                                     compression: str | None) -> None:
    root = tmp_path / "r"
    net = FrozenBase()
    m = CheckpointManager(str(root), keep_last=3, compression=compression)
    infos = []
    for step in range(1, 11):
        train(net)
        infos.append(m.save(net, step=step))
    m.wait()  # retention removes the files of pruned checkpoints in the background
    kept = [i.name for i in m.list(sort_by="step", order="asc")]
    assert kept == ["checkpoint-8", "checkpoint-9", "checkpoint-10"]
    frozen_file = next(f for f in infos[-1].files if f.shared)
    assert frozen_file.logical_path == "model-00001-of-00002.safetensors"
    inodes = {os.stat(root / name / frozen_file.path).st_ino for name in kept}
    assert len(inodes) == 1 and os.stat(root / "checkpoint-10" / frozen_file.path).st_nlink == 3
    assert not any(f.shared for f in infos[0].files)  # the first save wrote it
    for info in m.list():
        assert m.verify(info.name)[0].ok
        state = m.load(info.name)
        assert torch.equal(state["base.0.weight"], net.base[0].weight)
    assert torch.equal(m.load("latest")["head.weight"], net.head.weight)
    # what the files take on disk: the frozen shard once, the trainable shard three times
    page = m.list()
    assert page.summary.total_size == stored_total(list(page)) < sum(i.size for i in page) - frozen_file.size
    on_disk = {os.stat(q).st_ino: os.stat(q).st_blocks * 512 for q in root.rglob("*") if q.is_file()}  # as du
    assert sum(on_disk.values()) < sum(i.size for i in page) - 1.5 * frozen_file.size

    # a download is plain and self-contained
    m.download("latest", tmp_path / "copy")
    assert os.stat(tmp_path / "copy" / frozen_file.path).st_nlink == 1
    copied = json.loads((tmp_path / "copy" / "checkpoint.json").read_text())
    assert not any(f.get("shared") for f in copied["files"]) and copied["sharedSize"] == 0
    assert CheckpointManager(str(tmp_path)).verify("copy")[0].ok


def test_a_changed_frozen_tensor_is_written_again(tmp_path: Path) -> None:
    net = FrozenBase()
    m = CheckpointManager(str(tmp_path / "r"))
    m.save(net, step=1)
    with torch.no_grad():
        net.base[0].weight[0, 0] += 1  # frozen for the optimizer, but changed by hand: same size, new bytes
    info = m.save(net, step=2)
    assert not any(f.shared for f in info.files)
    assert torch.equal(m.load("latest")["base.0.weight"], net.base[0].weight)


@pytest.mark.parametrize("backend", ["local", "memory"])
def test_frozen_base_of_an_hf_model_loads_with_from_pretrained(backend: str, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from ckpt_callback import export_checkpoint
    from conftest import make_root
    from test_hf import PROBE, live_logits, tiny_model, tiny_tokenizer

    model = tiny_model(tiny_tokenizer())
    model.transformer.h[0].requires_grad_(False)
    model.transformer.wpe.requires_grad_(False)
    root = make_root(backend, tmp_path)
    m = CheckpointManager(root)
    for step in (1, 2):
        info = m.save(model, step=step)  # the frozen names come from requires_grad, config.json from the model
    assert info.shared_size > 0 and info.inference_ready
    assert any(f.blob for f in info.files) == (backend != "local")
    folder = root + "/checkpoint-2" if backend == "local" else export_checkpoint(root, "latest", tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(str(folder))
    assert torch.equal(live_logits(loaded), live_logits(model)) and PROBE.shape[0] == 2


OBJECT_STORES = ["memory", pytest.param("s3", marks=pytest.mark.s3)]


def _objects(root: str, request: pytest.FixtureRequest) -> dict[str, int]:
    """Every object under ``root`` (relative path → size), looked at behind the library's back."""
    from conftest import root_fs

    fs, base = root_fs(root, request)
    fs.invalidate_cache()
    base = base.rstrip("/")
    return {p[len(base) + 1:]: int(d["size"]) for p, d in fs.find(base, detail=True).items()
            if d.get("type") != "directory"}


@pytest.mark.parametrize("compression", [None, "zstd"])
@pytest.mark.parametrize("backend", OBJECT_STORES)
def test_object_stores_store_the_frozen_shard_once(backend: str, compression: str | None, tmp_path: Path,
                                                   request: pytest.FixtureRequest,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import make_root

    monkeypatch.setenv(_blobs.GRACE_ENV, "0")
    root = make_root(backend, tmp_path, request)
    net = FrozenBase()
    m = CheckpointManager(root, compression=compression, keep_last=None)
    infos = [m.save((train(net), net)[1], step=step) for step in range(1, 11)]
    blob = next(f for f in infos[0].files if f.blob)
    assert blob.logical_path == "model-00001-of-00002.safetensors" and blob.blob == blob.sha256
    assert all(next(f for f in i.files if f.blob) == blob for i in infos)
    objects = _objects(root, request)
    blobs = {k: v for k, v in objects.items() if k.startswith(".ckpt-blobs/")}
    assert blobs == {f".ckpt-blobs/{blob.sha256}": blob.size}  # once, and no save's marker is left
    # everything stored: one frozen shard + each checkpoint's own (trainable) files and sidecar
    own = sum(f.size for i in infos for f in i.files if not f.blob)
    sidecars = sum(v for k, v in objects.items() if k.endswith("checkpoint.json"))
    assert sum(objects.values()) == blob.size + own + sidecars
    assert sum(objects.values()) < 2 * blob.size + own  # 10 copies would be 10 * blob.size + own
    assert not any(k.endswith(blob.path) for k in objects if not k.startswith(".ckpt-blobs/"))
    page = m.list()
    assert page.summary.total_size == stored_total(list(page)) == blob.size + own

    for info in infos[-2:]:
        result = m.verify(info.name)[0]
        assert result.ok, result.problems
        assert torch.equal(m.load(info.name)["base.0.weight"], net.base[0].weight)
    assert torch.equal(m.load("latest")["head.weight"], net.head.weight)
    fresh = FrozenBase()
    CheckpointManager(root).restore("checkpoint-3", model=fresh)
    assert torch.equal(fresh.base[1].weight, net.base[1].weight)

    # a download is a plain self-contained folder: the blob's bytes at the file's path, no blob key
    m.download("latest", tmp_path / "copy", decompress=True)
    copied = json.loads((tmp_path / "copy" / "checkpoint.json").read_text())
    assert not any("blob" in f or f.get("shared") for f in copied["files"])
    assert (tmp_path / "copy" / "model-00001-of-00002.safetensors").stat().st_size == blob.logical_size
    assert CheckpointManager(str(tmp_path)).verify("copy")[0].ok

    # deleting frees the blob only with its last referrer
    for info in infos[:-1]:
        m.delete(info.name)
        assert f".ckpt-blobs/{blob.sha256}" in _objects(root, request)
    m.delete("checkpoint-10")
    assert not [k for k in _objects(root, request) if k.startswith(".ckpt-blobs/") or not k.endswith(MARKER)]


@pytest.mark.parametrize("backend", OBJECT_STORES)
def test_retention_frees_a_blob_after_its_last_referrer_and_the_grace_period(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import make_root

    root = make_root(backend, tmp_path, request)
    net = FrozenBase()
    m = CheckpointManager(root, keep_last=2)
    for step in (1, 2, 3):
        m.save((train(net), net)[1], step=step)
    first = next(f for f in m.get("checkpoint-3").files if f.blob)
    with torch.no_grad():
        net.base[0].weight.mul_(2)  # a new frozen base: a second blob
    for step in (4, 5):
        m.save((train(net), net)[1], step=step)
    second = next(f for f in m.get("checkpoint-5").files if f.blob)
    assert second.blob != first.blob and [i.name for i in m.list()] == ["checkpoint-5", "checkpoint-4"]
    # the first blob has no referrer left, but it is younger than the grace period: kept
    assert {f".ckpt-blobs/{first.blob}", f".ckpt-blobs/{second.blob}"} <= set(_objects(root, request))
    monkeypatch.setenv(_blobs.GRACE_ENV, "0")
    m.prune()
    blobs = {k for k in _objects(root, request) if k.startswith(".ckpt-blobs/")}
    assert blobs == {f".ckpt-blobs/{second.blob}"}
    assert m.verify("checkpoint-4")[0].ok and m.verify("checkpoint-5")[0].ok


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
@pytest.mark.parametrize("backend", OBJECT_STORES)
def test_a_missing_or_corrupt_blob_fails_verify_and_load(backend: str, damage: str, tmp_path: Path,
                                                         request: pytest.FixtureRequest) -> None:
    from conftest import make_root, root_fs

    root = make_root(backend, tmp_path, request)
    net = FrozenBase()
    m = CheckpointManager(root)
    m.save(net, step=1)
    info = m.save((train(net), net)[1], step=2)
    blob = next(f for f in info.files if f.blob)
    fs, base = root_fs(root, request)
    where = f"{base.rstrip('/')}/.ckpt-blobs/{blob.blob}"
    if damage == "missing":
        fs.rm(where)
    else:
        data = bytearray(fs.cat_file(where))
        data[len(data) // 2] ^= 0xFF
        fs.pipe_file(where, bytes(data))
    fs.invalidate_cache()
    result = m.verify("checkpoint-2")[0]
    assert not result.ok and all(blob.path in p for p in result.problems) and len(result.problems) == 1
    with pytest.raises(CorruptCheckpointError, match=blob.path):
        CheckpointManager(root).load("checkpoint-2")


@pytest.mark.parametrize("value", ["../x", "g" * 64, "A" * 64, "0" * 64, 7, None])
def test_a_hostile_blob_value_is_refused(value: object) -> None:
    sha = "ab" * 32
    doc = CheckpointInfo(name="c", step=1, size=3, files=(FileEntry("model.safetensors", 3, sha, blob=sha),)).to_json()
    assert CheckpointInfo.from_json(doc).files[0].blob == sha
    doc["files"][0]["blob"] = value
    with pytest.raises(SidecarError, match="blob"):
        CheckpointInfo.from_json(doc)


def test_a_source_replaced_since_the_catalog_read_it_is_not_linked(tmp_path: Path) -> None:
    """Another run replaced checkpoint-1 with different frozen weights of the same shapes: never link those."""
    root = str(tmp_path / "r")
    net = FrozenBase()
    m = CheckpointManager(root)
    m.save(net, step=1)
    stale = m.list().data  # what a writer's cached view holds
    other = FrozenBase()
    with torch.no_grad():
        other.base[0].weight.mul_(2)
    CheckpointManager(root).save(other, step=1)  # replaces checkpoint-1 (same name, same sizes)
    # the same bytes as the stale view's checkpoint-1 frozen file, which is now gone from storage
    m._writer.committed = lambda: stale
    info = m.save(net, step=2)
    assert not any(f.shared for f in info.files)
    assert m.verify("checkpoint-2")[0].ok
    assert torch.equal(m.load("checkpoint-2")["base.0.weight"], net.base[0].weight)


@pytest.mark.parametrize("backend", OBJECT_STORES)
def test_a_save_reusing_a_blob_keeps_it_while_its_last_other_referrer_is_deleted(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race: checkpoint-2 reuses blob X; before its sidecar goes up, another process deletes checkpoint-1,
    X's only committed referrer, and frees what is unreferenced. X is older than the grace, but the save's marker
    is not: X stays, and checkpoint-2 commits whole."""
    from ckpt_callback._commit import Transaction
    from conftest import make_root

    monkeypatch.setenv(_blobs.GRACE_ENV, "4")  # longer than the save takes on a loaded machine
    root = make_root(backend, tmp_path, request)
    net = FrozenBase()
    CheckpointManager(root, keep_last=None).save(net, step=1)
    blob = next(f for f in CheckpointManager(root).get("checkpoint-1").files if f.blob)
    time.sleep(4.2)  # X is now older than the grace period
    original = Transaction._check_still_ours
    freed: list[list[str]] = []

    def concurrent_delete(self: Transaction, info: CheckpointInfo) -> None:
        if info.name == "checkpoint-2" and not freed:
            CheckpointManager(root).delete("checkpoint-1")
            freed.append(CheckpointManager(root)._commit.collect_blobs())
        original(self, info)

    monkeypatch.setattr(Transaction, "_check_still_ours", concurrent_delete)
    info = CheckpointManager(root, keep_last=None).save((train(net), net)[1], step=2)
    assert freed == [[]] and next(f for f in info.files if f.blob) == blob
    assert f".ckpt-blobs/{blob.blob}" in _objects(root, request)
    assert CheckpointManager(root).verify("checkpoint-2")[0].ok


@pytest.mark.parametrize("backend", ["memory", *CLOUD_BACKENDS])
def test_what_a_killed_save_left_in_the_blob_area_ages_out_on_every_store(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A killed save's marker and unreferenced blob are freed once older than the grace, and kept before.

    Ages come from each driver's listing (adlfs spells the time ``last_modified``, which an earlier
    version did not read: on Azure nothing ever aged, so nothing a killed save left was freed).
    """
    from conftest import make_root

    root = make_root(backend, tmp_path, request)
    m = CheckpointManager(root)
    net = FrozenBase()
    kept = next(f for f in m.save(net, step=1).files if f.blob)
    storage = m._storage
    orphan = "ab" * 32
    storage.write_bytes_atomic(_blobs.blob_path(orphan), b"x" * 10)
    storage.write_bytes_atomic(_blobs.ref_path(orphan, "killed"), b"{}")
    storage.write_bytes_atomic(_blobs.ref_path(kept.blob, "killed"), b"{}")  # a killed save reusing a live blob
    assert _blobs.collect(storage, grace=30) == []  # all younger than the grace: a live save may own them
    time.sleep(2.5)  # Azure's listing times are whole seconds
    freed = _blobs.collect(storage, grace=2)
    assert sorted(freed) == sorted([_blobs.blob_path(orphan), _blobs.ref_path(orphan, "killed"),
                                    _blobs.ref_path(kept.blob, "killed")])
    assert set(_blobs.present(storage)) == {kept.blob} and m.verify("checkpoint-1")[0].ok


@pytest.mark.parametrize("detail", [
    {"mtime": 1_700_000_000.5},  # local
    {"created": 1_700_000_000.5},  # memory
    {"LastModified": "datetime"},  # s3fs
    {"last_modified": "datetime", "creation_time": "datetime"},  # adlfs
    {"updated": "2023-11-14T22:13:20.5Z"},  # gcsfs JSON, when it gives no mtime
])
def test_every_drivers_listing_time_is_read(detail: dict) -> None:
    from datetime import datetime, timezone

    from ckpt_callback._commit import _seconds

    when = datetime.fromtimestamp(1_700_000_000.5, tz=timezone.utc)
    detail = {k: when if v == "datetime" else v for k, v in detail.items()}
    assert _seconds(detail) == pytest.approx(1_700_000_000.5)
    assert _seconds({"size": 3}) is None
