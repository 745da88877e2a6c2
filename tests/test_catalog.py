"""The catalog on roots of many checkpoints: object stores read every sidecar concurrently after one
listing (no HEAD each), and still list exactly what a local root lists, refusing what it refuses."""

from __future__ import annotations

import json
import uuid
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt_callback._catalog as catalog_module
from ckpt_callback import CheckpointManager, CheckpointWarning
from ckpt_callback._sidecar import MAX_SIDECAR_BYTES
from ckpt_callback._storage import Storage
from conftest import AZURE, GCS, S3, make_root, root_fs

SIDECAR = "checkpoint.json"
N = 60  # more than the one-by-one readers' 16 threads, few enough to write quickly


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The files (sidecar apart) and the sidecar of one checkpoint saved by the manager."""
    root = tmp_path_factory.mktemp("template")
    info = CheckpointManager(str(root), keep_last=None).save({"w": torch.arange(4.0)}, step=0)
    folder = root / info.name
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != SIDECAR}
    return files, json.loads((folder / SIDECAR).read_bytes())


def fill(root: str, request: pytest.FixtureRequest, template: tuple[dict[str, bytes], dict[str, Any]],
         n: int = N) -> None:
    """``n`` committed checkpoints, the same on every backend: the template's files under each name,
    sidecars with their own name, id, step, time, losses, metrics and type (written last)."""
    fs, base = root_fs(root, request)
    files, sidecar = template
    blobs: dict[str, bytes] = {}
    sidecars: dict[str, bytes] = {}
    for k in range(1, n + 1):
        name = f"checkpoint-{k}"
        when = f"2025-02-03T13:{k // 60:02d}:{k % 60:02d}.000000Z"
        meta = {**sidecar, "id": str(uuid.UUID(int=k)), "name": name, "step": k, "createdAt": when, "updatedAt": when,
                "trainLoss": 1.0 / k, "evalLoss": 2.0 / k if k % 3 else None, "metrics": {"acc": k / n},
                "type": "best" if k == n - 5 else "manual" if k % 17 == 0 else "automatic"}
        for rel, data in files.items():
            blobs[f"{base}/{name}/{rel}"] = data
        sidecars[f"{base}/{name}/{SIDECAR}"] = json.dumps(meta, indent=2).encode()
    if "://" not in root:
        for key in sidecars:
            Path(key).parent.mkdir(parents=True, exist_ok=True)
    fs.pipe(blobs)
    fs.pipe(sidecars)


def listed(root: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    page = CheckpointManager(root, keep_last=None).list(sort_by="step", order="asc")
    return [i.to_json() for i in page.data], page.summary.to_json()


class Reads:
    """Counts the catalog's reads: one-by-one sidecar reads (HEAD + GET) and concurrent batches."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.one_by_one: list[str] = []
        self.batches: list[list[tuple[str, int]]] = []
        read_bytes, read_listed = Storage.read_bytes, Storage.read_listed

        def counted_read_bytes(storage: Storage, rel: str, **kwargs: Any) -> bytes:
            self.one_by_one.append(rel)
            return read_bytes(storage, rel, **kwargs)

        def counted_read_listed(storage: Storage, files: Any) -> list[bytes | None]:
            self.batches.append(list(files))
            return read_listed(storage, files)

        monkeypatch.setattr(Storage, "read_bytes", counted_read_bytes)
        monkeypatch.setattr(Storage, "read_listed", counted_read_listed)


@pytest.mark.s3
def test_many_checkpoints_on_s3_list_as_on_a_local_root_without_a_read_each(
        tmp_path: Path, request: pytest.FixtureRequest, template: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    local, s3 = make_root("local", tmp_path, request), make_root("s3", tmp_path, request)
    fill(local, request, template)
    fill(s3, request, template)
    expected = listed(local)
    assert len(expected[0]) == N and expected[0][0]["name"] == "checkpoint-1"
    reads = Reads(monkeypatch)
    assert listed(s3) == expected
    assert reads.one_by_one == []  # every sidecar came from the concurrent batch, sized by the listing
    assert sorted(rel for batch in reads.batches for rel, _ in batch) == sorted(
        f"checkpoint-{k}/{SIDECAR}" for k in range(1, N + 1))

    # Batches are bounded by the bytes they hold: a small budget splits the reads, same answer.
    monkeypatch.setattr(catalog_module, "_BATCH_BYTES", 4 * max(size for _, size in reads.batches[0]))
    reads.batches.clear()
    assert listed(s3) == expected
    assert N // 5 <= len(reads.batches) <= -(-N // 4)  # split, and each batch as full as the budget allows
    assert all(sum(size for _, size in batch) <= catalog_module._BATCH_BYTES for batch in reads.batches)
    assert reads.one_by_one == []


@pytest.mark.parametrize("backend", ["local", "memory", S3, GCS, AZURE])
def test_hostile_and_incomplete_folders_among_many_are_refused(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest, template: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_root(backend, tmp_path, request)
    fill(root, request, template)
    fs, base = root_fs(root, request)
    good = json.loads(fs.cat_file(f"{base}/checkpoint-1/{SIDECAR}"))
    bad = {
        "checkpoint-3": json.dumps(good).encode()[:-1] + b" " * (MAX_SIDECAR_BYTES + 1) + b"}",  # too large
        "checkpoint-4": b"",  # empty
        "checkpoint-5": b'{"schemaVersion": 1, "name": ',  # cut short
        "checkpoint-6": json.dumps({**good, "files": [{"path": "../../etc/passwd", "size": 1,
                                                        "sha256": "0" * 64}]}).encode(),  # outside its folder
    }
    for name, data in bad.items():
        fs.pipe_file(f"{base}/{name}/{SIDECAR}", data)
    fs.rm_file(f"{base}/checkpoint-7/{SIDECAR}")  # files without a sidecar: uncommitted
    fs.pipe_file(f"{base}/checkpoint-8/.ckpt-incomplete", b"")
    fs.rm_file(f"{base}/checkpoint-8/{SIDECAR}")  # what a save killed before its commit leaves
    fs.rm_file(f"{base}/checkpoint-9/model.safetensors")  # committed, but its data is gone
    reads = Reads(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = [i["name"] for i in listed(root)[0]]
    expected = [f"checkpoint-{k}" for k in range(1, N + 1) if k not in (3, 4, 5, 6, 7, 8)]
    if backend != "local":  # object stores: the listing proves every file of a sidecar is there
        expected.remove("checkpoint-9")
    assert names == expected
    warned = {m for m in (str(w.message) for w in caught if issubclass(w.category, CheckpointWarning))}
    for name in bad:
        assert any(f"'{name}'" in m for m in warned), (name, warned)
    assert any("larger than" in m for m in warned if "'checkpoint-3'" in m)
    # Never more than a sidecar's worth (plus one byte) is asked for at once per file.
    assert all(size <= MAX_SIDECAR_BYTES for batch in reads.batches for _, size in batch)
    if backend in ("s3", "gcs", "azure"):  # only the oversized and empty sidecars are read one by one, bounded
        assert sorted(reads.one_by_one) == [f"checkpoint-3/{SIDECAR}", f"checkpoint-4/{SIDECAR}"]


@pytest.mark.s3
@pytest.mark.parametrize("change", [-40, +40])
def test_a_sidecar_changed_since_the_listing_is_read_again(
        change: int, tmp_path: Path, request: pytest.FixtureRequest, template: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The listing's size bounds the concurrent read; a sidecar that is not that size any more (rewritten
    between listing and read) is read again on its own, never parsed from a cut-off prefix."""
    root = make_root("s3", tmp_path, request)
    fill(root, request, template, n=20)
    expected = listed(root)
    list_files = Storage.list_files

    def stale(storage: Storage, rel: str = "") -> dict[str, dict[str, Any]]:
        found = list_files(storage, rel)
        for key in (f"checkpoint-2/{SIDECAR}", f"checkpoint-11/{SIDECAR}"):
            if key in found:
                found[key] = {**found[key], "size": int(found[key]["size"]) + change}
        return found

    monkeypatch.setattr(Storage, "list_files", stale)
    reads = Reads(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is skipped
        assert listed(root) == expected
    assert sorted(reads.one_by_one) == [f"checkpoint-11/{SIDECAR}", f"checkpoint-2/{SIDECAR}"]


# --- the sidecars kept on local disk between processes (what `ckpt` does) --------------------------


@pytest.mark.s3
def test_kept_sidecars_answer_a_new_process_and_only_changes_are_read_again(
        tmp_path: Path, request: pytest.FixtureRequest, template: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    root, cache = make_root("s3", tmp_path, request), tmp_path / "cache"
    fill(root, request, template, n=30)
    fs, base = root_fs(root, request)

    def listed_with_cache() -> list[dict[str, Any]]:
        page = CheckpointManager(root, keep_last=None, catalog_cache=cache).list(sort_by="step", order="asc")
        return [i.to_json() for i in page.data]

    expected = listed_with_cache()
    assert len(expected) == 30 and len(list(cache.iterdir())) == 1
    assert oct(cache.stat().st_mode & 0o777) == oct(0o700)
    reads = Reads(monkeypatch)
    assert listed_with_cache() == expected  # a new manager, as a new `ckpt list` process
    assert reads.batches == [] and reads.one_by_one == []

    rewritten = json.loads(fs.cat_file(f"{base}/checkpoint-4/{SIDECAR}"))
    fs.pipe_file(f"{base}/checkpoint-4/{SIDECAR}", json.dumps({**rewritten, "evalLoss": 0.125}).encode())
    fs.rm_file(f"{base}/checkpoint-5/{SIDECAR}")  # deleted (the sidecar goes first)
    fs.rm_file(f"{base}/checkpoint-6/model.safetensors")  # its data is gone
    now = listed_with_cache()
    gone = ("checkpoint-5", "checkpoint-6")
    assert [i["name"] for i in now] == [i["name"] for i in expected if i["name"] not in gone]
    assert next(i for i in now if i["name"] == "checkpoint-4")["evalLoss"] == 0.125
    assert [rel for batch in reads.batches for rel, _ in batch] == [f"checkpoint-4/{SIDECAR}"]
    assert reads.one_by_one == []

    # The kept file is parsed as strictly as a sidecar: an entry that does not parse is read again.
    kept = next(cache.iterdir())
    doc = json.loads(kept.read_text())
    doc["entries"]["checkpoint-7"][1] = '{"schemaVersion": 1, "name": "../x", "files": 7}'
    doc["entries"]["checkpoint-8"][1] = json.dumps({**json.loads(doc["entries"]["checkpoint-8"][1]), "step": -1})
    kept.write_text(json.dumps(doc))
    reads.batches.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert listed_with_cache() == now
    assert sorted(rel for batch in reads.batches for rel, _ in batch) == [f"checkpoint-7/{SIDECAR}",
                                                                           f"checkpoint-8/{SIDECAR}"]
    kept.write_text("not json")  # a damaged file: everything is read again
    reads.batches.clear()
    assert listed_with_cache() == now
    assert len([rel for batch in reads.batches for rel, _ in batch]) == 29  # every committed sidecar


def test_ckpt_keeps_sidecars_where_told_and_not_at_all_when_off(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckpt_callback._cli import _cache_dir

    monkeypatch.delenv("CKPT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _cache_dir() == str(tmp_path / "xdg" / "ckpt-callback")
    monkeypatch.setenv("CKPT_CACHE_DIR", str(tmp_path / "mine"))
    assert _cache_dir() == str(tmp_path / "mine")
    monkeypatch.setenv("CKPT_CACHE_DIR", "off")
    assert _cache_dir() is None
    # Local and memory:// roots keep nothing (a local listing and read are as cheap as the cache).
    for root in (str(tmp_path / "local"), f"memory://cache-{uuid.uuid4().hex}"):
        manager = CheckpointManager(root, catalog_cache=tmp_path / "unused")
        manager.save({"w": torch.zeros(1)}, step=1)
        assert [i.name for i in CheckpointManager(root, catalog_cache=tmp_path / "unused").list()] == ["checkpoint-1"]
    assert not (tmp_path / "unused").exists()


@pytest.mark.s3
def test_ckpt_list_of_an_s3_root_twice_answers_the_same_from_its_cache(
        tmp_path: Path, request: pytest.FixtureRequest, template: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two `ckpt list` processes: the first keeps the sidecars in CKPT_CACHE_DIR, the second answers the same."""
    import subprocess
    import sys

    root = make_root("s3", tmp_path, request)
    fill(root, request, template, n=12)
    monkeypatch.setenv("CKPT_CACHE_DIR", str(tmp_path / "cache"))
    runs = [subprocess.run([sys.executable, "-c", "import sys; from ckpt_callback._cli import main; sys.exit(main())",
                            "list", root, "--json"], capture_output=True, text=True, timeout=120) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout and json.loads(runs[0].stdout)["totalCount"] == 12
    assert len(list((tmp_path / "cache").iterdir())) == 1
