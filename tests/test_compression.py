"""compression="zstd" end to end: save, load, restore, verify, download, export, hostile files; every backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("zstandard")

from ckpt_callback import CheckpointHook, CheckpointManager, CorruptCheckpointError, SidecarError
from ckpt_callback._cli import main
from ckpt_callback._sidecar import CheckpointInfo
from ckpt_callback._storage import Storage
from conftest import TinyNet


def trained(seed: int = 0) -> tuple[TinyNet, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(2):
        model(torch.arange(8).view(1, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_save_load_restore_verify_on_every_backend(root: str, tmp_path: Path) -> None:
    model, opt = trained()
    m = CheckpointManager(root, compression="zstd")
    info = m.save(model, step=3, optimizer=opt, inference_ready=True)
    by_path = {f.path: f for f in info.files}
    assert set(by_path) == {"model.safetensors.ckptz", "optimizer.safetensors.ckptz", "training_state.json"}
    weights = by_path["model.safetensors.ckptz"]
    assert weights.codec == "zstd-bytegroup" and weights.raw_size > 0 and weights.logical_path == "model.safetensors"
    assert by_path["training_state.json"].codec is None
    assert not info.inference_ready  # from_pretrained cannot read it as it is
    assert info.logical_size == sum(f.raw_size or f.size for f in info.files) and info.size < info.logical_size

    # what the sidecar on storage says, read back strictly
    stored = CheckpointInfo.loads(Storage(root).read_bytes("checkpoint-3/checkpoint.json"))
    raw = json.loads(Storage(root).read_bytes("checkpoint-3/checkpoint.json"))
    assert raw["logicalSize"] == info.logical_size and raw["size"] == info.size
    assert stored.files == info.files

    state = CheckpointManager(root).load("latest")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    fresh, fresh_opt = trained(seed=1)
    CheckpointManager(root).restore("latest", model=fresh, optimizer=fresh_opt)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters(), strict=True))
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert CheckpointManager(root).verify()[0].ok


def test_download_as_stored_or_decompressed(root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file

    model, opt = trained()
    CheckpointManager(root, compression="zstd").save(model, step=1, optimizer=opt)
    assert main(["download", root, "latest", str(tmp_path / "plain"), "--decompress"]) == 0
    plain = tmp_path / "plain"
    assert sorted(p.name for p in plain.iterdir()) == ["checkpoint.json", "model.safetensors",
                                                       "optimizer.safetensors", "training_state.json"]
    weights = load_file(str(plain / "model.safetensors"))  # the safetensors library reads it: plain
    assert torch.equal(weights["hidden.weight"], model.hidden.weight.detach())
    copied = CheckpointInfo.loads((plain / "checkpoint.json").read_bytes())
    assert not copied.compressed and copied.size == copied.logical_size
    assert main(["verify", str(tmp_path), "plain"]) == 0  # its sidecar lists the plain files with their sha256

    CheckpointManager(root).download("latest", tmp_path / "as-stored")
    assert (tmp_path / "as-stored" / "model.safetensors.ckptz").is_file()
    back = CheckpointManager(str(tmp_path)).load("as-stored")
    assert torch.equal(back["hidden.weight"], model.hidden.weight.detach())


def test_inspect_and_list_show_stored_and_logical_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "r")
    model, _ = trained()
    CheckpointManager(root, compression="zstd").save(model, step=1)
    info = CheckpointManager(root).save(model, step=2)  # plain: both sizes equal
    capsys.readouterr()
    assert main(["inspect", root, "checkpoint-1", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)["status"]
    assert status["sizeBytes"] < status["logicalSizeBytes"]
    assert status["files"][0]["codec"] == "zstd-bytegroup" and status["files"][0]["logicalPath"] == "model.safetensors"
    assert main(["list", root, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    first = CheckpointManager(root).get("checkpoint-1")
    assert summary["totalSize"] == first.size + info.size
    assert summary["totalLogicalSize"] == first.logical_size + info.size
    assert main(["list", root]) == 0
    out = capsys.readouterr().out
    assert "logical" in out.splitlines()[0] and " stored (" in out


@pytest.mark.filterwarnings("ignore::ckpt_callback.CheckpointWarning")
def test_hook_passes_compression_and_resumes_from_it(tmp_path: Path) -> None:
    model, opt = trained()
    root = str(tmp_path / "hook")
    with CheckpointHook(root, model, optimizer=opt, every_n_steps=1, compression="zstd", save_on_signals=()) as hook:
        hook.step(1)
    assert CheckpointManager(root).get("latest").compressed
    fresh, fresh_opt = trained(seed=3)
    with CheckpointHook(root, fresh, optimizer=fresh_opt, save_on_signals=()) as hook:
        assert hook.resume() == 1
    assert torch.equal(fresh.hidden.weight, model.hidden.weight)


def rewrite_sidecar(root: str, name: str, change) -> None:
    s = Storage(root)
    data = json.loads(s.read_bytes(f"{name}/checkpoint.json"))
    change(data)
    s.write_bytes_atomic(f"{name}/checkpoint.json", json.dumps(data).encode())


@pytest.mark.parametrize("backend", ["local", "memory"])
def test_hostile_compressed_checkpoints_fail_cleanly(backend: str, tmp_path: Path) -> None:
    import hashlib
    import struct

    import zstandard

    from conftest import make_root

    root = make_root(backend, tmp_path)
    model, _ = trained()
    info = CheckpointManager(root, compression="zstd").save(model, step=1)
    weights = next(f for f in info.files if f.codec)

    def raw_size(value):
        def change(data):
            entry = next(f for f in data["files"] if f["path"] == weights.path)
            data["logicalSize"] += value - entry["rawSize"]
            entry["rawSize"] = value
        return change

    # a raw size larger than the data: the header check refuses before anything big is allocated
    rewrite_sidecar(root, "checkpoint-1", raw_size(2**52))
    with pytest.raises(CorruptCheckpointError, match=r"decodes to|header|past"):
        CheckpointManager(root).load("latest")
    rewrite_sidecar(root, "checkpoint-1", raw_size(weights.raw_size - 8))
    with pytest.raises(CorruptCheckpointError):
        CheckpointManager(root).load("latest")

    # a decompression bomb whose sha256 the sidecar agrees with
    zeros = zstandard.ZstdCompressor().compress(bytes(64 << 20))
    bomb = b"CKPTZST1" + struct.pack("<IBB", 1 << 20, 1, 0) + struct.pack("<I", len(zeros)) + zeros + \
        struct.pack("<IBB", 0, 0, 0)
    s = Storage(root)
    s.write_bytes_atomic(f"checkpoint-1/{weights.path}", bomb)

    def swap(data):
        raw_size(1 << 20)(data)
        entry = next(f for f in data["files"] if f["path"] == weights.path)
        data["size"] += len(bomb) - entry["size"]
        entry.update(size=len(bomb), sha256=hashlib.sha256(bomb).hexdigest())
    rewrite_sidecar(root, "checkpoint-1", swap)
    with pytest.raises(CorruptCheckpointError, match="where 1048576 belong"):
        CheckpointManager(root).load("latest")
    assert CheckpointManager(root).verify()[0].ok  # the stored bytes are what the sidecar says: load decides

    for change, message in [
        (lambda d: d["files"][0].update(codec="lz4"), "not one this version"),
        (lambda d: d["files"][0].pop("rawSize"), "'rawSize' must be an integer"),
        (lambda d: d["files"][0].update(path="model.safetensors"), "must end in '.ckptz'"),
    ]:
        good = json.loads(s.read_bytes("checkpoint-1/checkpoint.json"))
        change(good)
        with pytest.raises(SidecarError, match=message):
            CheckpointInfo.from_json(good)
    plain = {"path": "a.bin", "size": 1, "sha256": "0" * 64, "rawSize": 1}
    with pytest.raises(SidecarError, match="without a 'codec'"):
        CheckpointInfo.from_json({**json.loads(s.read_bytes("checkpoint-1/checkpoint.json")), "files": [plain],
                                  "size": 1, "logicalSize": 1})


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::ckpt_callback.CheckpointWarning")
def test_trainer_resumes_from_compressed_checkpoints_and_export_loads(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from ckpt_callback import CheckpointCallback, export_checkpoint
    from test_hf import Preempt, live_logits, tiny_trainer

    root = str(tmp_path / "ckpts")
    first = tiny_trainer(str(tmp_path / "out"), [CheckpointCallback(root, compression="zstd"), Preempt(after=4)])
    with pytest.raises(KeyboardInterrupt):
        first.train()
    info = CheckpointManager(root).get("latest")
    assert info.compressed and not info.inference_ready
    assert "model.safetensors.ckptz" in {f.path for f in info.files}

    callback = CheckpointCallback(root, compression="zstd")
    folder = callback.resume_from()  # a local root, but the Trainer cannot read compressed weights: a decoded copy
    assert folder is not None and Path(folder, "model.safetensors").is_file() and Path(folder).parent != Path(root)
    trainer = tiny_trainer(str(tmp_path / "out"), [callback], max_steps=6)
    trainer.train(resume_from_checkpoint=folder)
    assert callback.manager.resumed_from == "checkpoint-4"

    out = export_checkpoint(root, "latest", tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(live_logits(loaded), live_logits(trainer.model))
