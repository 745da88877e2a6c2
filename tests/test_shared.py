"""Frozen tensors: their own shard files, stored once (hard links locally, server-side copies on object stores)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from ckpt_callback import CheckpointManager
from ckpt_callback._catalog import stored_total
from ckpt_callback._serialization import frozen_names, parse_index, plan_model_files
from ckpt_callback._storage import Storage


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


def test_frozen_base_of_an_hf_model_loads_with_from_pretrained(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from test_hf import PROBE, live_logits, tiny_model, tiny_tokenizer

    model = tiny_model(tiny_tokenizer())
    model.transformer.h[0].requires_grad_(False)
    model.transformer.wpe.requires_grad_(False)
    m = CheckpointManager(str(tmp_path / "r"))
    for step in (1, 2):
        info = m.save(model, step=step)  # the frozen names come from requires_grad, config.json from the model
    assert info.shared_size > 0 and info.inference_ready
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "r" / "checkpoint-2"))
    assert torch.equal(live_logits(loaded), live_logits(model)) and PROBE.shape[0] == 2


@pytest.mark.parametrize("backend", ["memory", pytest.param("s3", marks=pytest.mark.s3)])
def test_object_stores_copy_the_frozen_shard_server_side(backend: str, tmp_path: Path,
                                                          request: pytest.FixtureRequest,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import make_root

    root = make_root(backend, tmp_path, request)
    copies: list[tuple[str, str]] = []
    original = Storage.copy
    monkeypatch.setattr(Storage, "copy", lambda self, src, dst: (copies.append((src, dst)), original(self, src, dst)))
    net = FrozenBase()
    m = CheckpointManager(root, keep_last=1)
    for step in (1, 2, 3):
        train(net)
        m.save(net, step=step)
    assert [src.split("/")[0] for src, _ in copies] == ["checkpoint-1", "checkpoint-2"]
    assert all(src.endswith("model-00001-of-00002.safetensors") for src, _ in copies)
    assert [i.name for i in m.list()] == ["checkpoint-3"]  # retention removed the copies' sources: nothing shared
    assert m.verify("checkpoint-3")[0].ok
    assert torch.equal(m.load("latest")["base.1.weight"], net.base[1].weight)


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
