"""Sharded models (FSDP2 `fully_shard`, DTensor tensor parallel) under real `torchrun` on CPU/gloo.

Every rank writes its own shards through torch.distributed.checkpoint; rank 0 commits. The checks:
a resumed run equals one that never stopped (`torch.equal` on every full parameter and optimizer
tensor, through their sha256), the same values load at another world size (2 -> 1 plain, 2 -> 3)
and in one plain process, on a local folder and on S3; a rank SIGKILLed mid-save or whose write
fails leaves no listed checkpoint and no hang.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt_callback import CheckpointManager
from conftest import make_root, run_python
from test_distributed import launch

pytestmark = pytest.mark.slow

WORKER = Path(__file__).parent / "_sharded_worker.py"
# S3 repeats of the local runs are `extended` (.ci/run's second step): each torchrun launch costs seconds.
S3_EXTENDED = pytest.param("s3", marks=pytest.mark.extended)
BACKENDS = ["local", S3_EXTENDED]


def run(tmp_path: Path, *args: str, nproc: int = 2, env: dict[str, str] | None = None,
        ok: bool = True, options: dict[str, Any] | None = None) -> tuple[int, str, dict[int, dict[str, Any]]]:
    extra = ["--s3-options", json.dumps(options)] if options else []
    script = tmp_path / WORKER.name  # launch() puts the ranks' reports beside the script
    if not script.exists():
        script.write_text(WORKER.read_text())
    returncode, output, reports = launch(script, *args, *extra, nproc=nproc, timeout=150, env=env)
    if ok:
        assert returncode == 0, f"torchrun failed ({returncode}):\n{output[-6000:]}"
        assert sorted(reports) == list(range(nproc)), output[-4000:]
    return returncode, output, reports


def plain(tmp_path: Path, root: str, name: str, options: dict[str, Any] | None = None, *flags: str) -> dict[str, Any]:
    """Restore ``name`` into an unsharded model in one plain process (no torch.distributed); its report."""
    extra = [*flags, *(["--s3-options", json.dumps(options)] if options else [])]
    out = tmp_path / "plain-report"
    out.mkdir(exist_ok=True)
    run_python(f"import os, runpy, sys; os.environ['REPORT_DIR'] = {str(out)!r}; "
               f"sys.argv = {[str(WORKER), 'restore', root, name, '--plain', *extra]!r}; "
               "runpy.run_path(sys.argv[0], run_name='__main__')")
    return json.loads((out / "rank-0.json").read_text())


def s3_options(request: pytest.FixtureRequest, backend: str) -> dict[str, Any] | None:
    return dict(request.getfixturevalue("s3_server").storage_options) if backend == "s3" else None


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_resume_is_exact_and_reshards(backend: str, tmp_path: Path, request: pytest.FixtureRequest):
    # On S3 a shorter run (the launches cost seconds each): the same checks but 2 -> 3 ranks.
    options, total = s3_options(request, backend), 8 if backend == "local" else 4
    middle = total - 2
    straight, stopped = make_root(backend, tmp_path / "a", request), make_root(backend, tmp_path / "b", request)

    _, _, whole = run(tmp_path, "train", straight, str(total), options=options)
    # the final checkpoint replaces the sharded one of the last step by a consolidated one
    saved = [f"checkpoint-{s}" for s in range(2, total + 1, 2)]
    assert whole[0]["saved"] == [*saved, saved[-1]]
    assert [r["saved"] for r in whole.values() if r["rank"]] == [[]]  # only rank 0 commits

    _, _, first = run(tmp_path, "train", stopped, str(middle), options=options)  # stops: a consolidated final
    _, _, second = run(tmp_path, "train", stopped, str(total), options=options)
    assert [r["start"] for r in second.values()] == [middle, middle]
    assert second[0]["digest"] == second[1]["digest"] == whole[0]["digest"] == whole[1]["digest"]

    # checkpoint-{middle} of the straight run is sharded: DCP reshards it to 3 ranks, and to 1 plain process
    at_middle, name = first[0]["digest"], f"checkpoint-{middle}"
    if backend == "local":
        _, _, three = run(tmp_path, "restore", straight, name, nproc=3, options=options)
        assert all(r["digest"] == at_middle for r in three.values())
        assert all(r["warnings"] and "saved by 2 ranks" in r["warnings"][0] for r in three.values())
    one = plain(tmp_path, straight, name, options)
    assert one["digest"] == at_middle and one["warnings"]

    manager = CheckpointManager(straight, storage_options=options)
    sharded, final = manager.get(name), manager.get("final")
    assert sharded.sharding is not None and sharded.sharding.world_size == 2 and sharded.sharding.meshes == ((2,),)
    assert {f.path.split("/")[0] for f in sharded.files} == {"sharded", "optimizer", "ranks", "training_state.json"}
    assert final.sharding is not None and final.sharding.consolidated  # model merged, its shards gone
    assert {f.path.split("/")[0] for f in final.files} == {"model.safetensors", "optimizer", "ranks",
                                                           "training_state.json"}
    assert all(result.ok for result in manager.verify())
    for checkpoint in (name, "final"):  # the full, unsharded state dict, in this plain process
        loaded = manager.load(checkpoint)
        assert sorted(loaded) == ["0.bias", "0.weight", "3.bias", "3.weight", "4.bias", "4.weight"]
        assert loaded["0.weight"].shape == (32, 8)


def test_async_sharded_saves_resume_exactly(tmp_path: Path):
    whole, stopped = str(tmp_path / "whole"), str(tmp_path / "stopped")
    _, _, reference = run(tmp_path, "train", whole, "6")
    run(tmp_path, "train", stopped, "3", "--async", "--consolidate", "never")  # resumes from a sharded final
    _, _, resumed = run(tmp_path, "train", stopped, "6", "--async")
    assert resumed[0]["saved"] == ["checkpoint-4", "checkpoint-6", "checkpoint-6"]  # then consolidated
    assert resumed[0]["digest"] == resumed[1]["digest"] == reference[0]["digest"]
    assert all(result.ok for result in CheckpointManager(stopped).verify())


def test_tensor_parallel_model_saves_and_loads_everywhere(tmp_path: Path):
    root = str(tmp_path / "tp")
    _, _, trained = run(tmp_path, "train", root, "4", "--tp")
    _, _, restored = run(tmp_path, "restore", root, "final", "--tp")
    assert restored[0]["digest"] == restored[1]["digest"] == trained[0]["digest"]
    assert plain(tmp_path, root, "final", None, "--tp")["digest"] == trained[0]["digest"]
    info = CheckpointManager(root).get("final")
    assert info.sharding is not None and set(info.sharding.placements) == {"Replicate()", "Shard(dim=0)",
                                                                           "Shard(dim=1)"}


# Which rank dies, and when: after its shards are written (rank 1, or rank 0 which began the save),
# or before. By default one per backend; CKPT_SHARDED_KILL_TRIALS=all runs every one.
KILLS = ["1:4:after", "0:4:after", "1:4:before", "0:4:before"]
KILL_TRIALS = [pytest.param(b, k, marks=[pytest.mark.extended] if b == "s3" else [])
               for b in ("local", "s3") for k in (KILLS if os.environ.get("CKPT_SHARDED_KILL_TRIALS") == "all"
                                                  else KILLS[:1] if b == "s3" else KILLS[1:2])]


@pytest.mark.parametrize(("backend", "kill"), KILL_TRIALS)
def test_one_rank_killed_mid_save_leaves_nothing_listed(backend: str, kill: str, tmp_path: Path,
                                                        request: pytest.FixtureRequest):
    options = s3_options(request, backend)
    root = make_root(backend, tmp_path / "r", request)
    returncode, output, reports = run(tmp_path, "train", root, "8", options=options, ok=False,
                                      env={"CKPT_TEST_KILL": kill})
    assert returncode != 0 and not reports, output[-3000:]  # torchrun stopped the job when rank 1 died
    manager = CheckpointManager(root, storage_options=options)
    assert [i.name for i in manager.list(sort_by="step", order="asc")] == ["checkpoint-2"]
    # the relaunched job resumes from the last committed checkpoint and cleans up after the dead one
    _, _, resumed = run(tmp_path, "train", root, "6", options=options)
    assert [r["start"] for r in resumed.values()] == [2, 2]
    assert resumed[0]["saved"] == ["checkpoint-4", "checkpoint-6", "checkpoint-6"]  # then consolidated
    assert all(result.ok for result in manager.verify())
    assert [i.name for i in manager.list(sort_by="step", order="asc")] == ["checkpoint-2", "checkpoint-4",
                                                                            "checkpoint-6"]
    if backend == "local":
        assert sorted(p.name for p in Path(root).iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failed_write_on_one_rank_fails_the_save_on_every_rank(backend: str, tmp_path: Path,
                                                                 request: pytest.FixtureRequest):
    from conftest import sidecarless_folders

    options = s3_options(request, backend)
    root = make_root(backend, tmp_path / "r", request)
    _, output, reports = run(tmp_path, "train", root, "6", env={"CKPT_TEST_FAIL": "1:4"}, options=options)
    assert reports[0]["saved"] == ["checkpoint-2", "checkpoint-6", "checkpoint-6"]  # step 4 failed; training went on
    assert output.count("checkpoint-4 (step 4) was not saved") == 2, output[-4000:]  # both ranks say so
    assert "No space left on device (injected)" in output
    listed = CheckpointManager(root, storage_options=options).list(sort_by="step", order="asc")
    assert [i.name for i in listed] == ["checkpoint-2", "checkpoint-6"]
    assert sidecarless_folders(root, request) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_damaged_file_only_one_rank_reads_fails_the_restore_on_every_rank(backend: str, tmp_path: Path,
                                                                            request: pytest.FixtureRequest):
    from conftest import root_fs

    options = s3_options(request, backend)
    root = make_root(backend, tmp_path / "r", request)
    run(tmp_path, "train", root, "2", "--consolidate", "never", options=options)
    fs, path = root_fs(root, request)
    own = f"{path}/checkpoint-2/ranks/rank-00001.safetensors"  # read by rank 1 alone
    data = bytearray(fs.cat_file(own))
    data[-1] ^= 0xFF
    fs.pipe_file(own, bytes(data))
    _, _, reports = run(tmp_path, "restore", root, "checkpoint-2", env={"CKPT_COLLECTIVE_TIMEOUT": "30"},
                        options=options)
    assert reports[1]["error"].startswith("CorruptCheckpointError") and "sha256" in reports[1]["error"]
    assert reports[0]["error"].startswith("CorruptCheckpointError") and "on rank 1" in reports[0]["error"]


SINGLE_RANK = """
import os, sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from ckpt_callback import CheckpointManager
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo", rank=0, world_size=1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
model = fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
opt = torch.optim.AdamW(model.parameters())
model(torch.ones(1, 4)).sum().backward(); opt.step()
CheckpointManager(sys.argv[1]).save(model, step=1, optimizer=opt)
dist.destroy_process_group()
"""


def single_rank_checkpoint(root: Path) -> Path:
    """A sharded (FSDP2, one rank) checkpoint made in a fresh process; its folder."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run_python(SINGLE_RANK, str(root), str(port))
    return root / "checkpoint-1"


def reseal(folder: Path, rel: str, data: bytes) -> None:
    """Replace file ``rel`` and its size and sha256 in the sidecar: what a hostile writer can do."""
    import hashlib

    (folder / rel).write_bytes(data)
    sidecar = json.loads((folder / "checkpoint.json").read_text())
    for entry in sidecar["files"]:
        if entry["path"] == rel:
            entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    sidecar["size"] = sum(entry["size"] for entry in sidecar["files"])
    (folder / "checkpoint.json").write_text(json.dumps(sidecar))


@pytest.mark.parametrize("backend", ["local", "memory", S3_EXTENDED])
def test_hostile_or_corrupt_sharded_checkpoints_are_clear_errors(backend: str, tmp_path: Path,
                                                                 request: pytest.FixtureRequest):
    from safetensors.torch import load_file, save_file

    from ckpt_callback import CorruptCheckpointError
    from conftest import root_fs

    folder = single_rank_checkpoint(tmp_path)  # altered here, then copied as it is to the root under test
    root = str(tmp_path) if backend == "local" else make_root(backend, tmp_path / "remote", request)
    options = s3_options(request, backend)

    def load() -> dict[str, torch.Tensor]:
        if backend != "local":
            fs, path = root_fs(root, request)
            if fs.exists(path):
                fs.rm(path, recursive=True)
            for local in folder.rglob("*"):
                if local.is_file():
                    fs.pipe_file(f"{path}/{folder.name}/{local.relative_to(folder).as_posix()}", local.read_bytes())
            fs.invalidate_cache()
        return CheckpointManager(root, storage_options=options).load("checkpoint-1")

    good = load()
    assert sorted(good) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    shard = next(p for p in (folder / "sharded").iterdir() if p.suffix == ".safetensors")
    original = shard.read_bytes()

    # a flipped byte: the sha256 check refuses it before DCP reads anything
    shard.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    with pytest.raises(CorruptCheckpointError, match="sha256"):
        load()
    shard.write_bytes(original)

    # an unlisted shard beside the others would be read by DCP in place: refused (object stores
    # download only the listed files, so there it is never read)
    (folder / "sharded" / "shard-00009-model-00001-of-00001.safetensors").write_bytes(original)
    if backend == "local":
        with pytest.raises(CorruptCheckpointError, match="not listed"):
            load()
    else:
        assert torch.equal(load()["0.weight"], good["0.weight"])
    (folder / "sharded" / "shard-00009-model-00001-of-00001.safetensors").unlink()

    # offsets that point outside the tensor, sealed with a matching hash: a clear error, no traceback
    from safetensors import safe_open

    with safe_open(str(shard), "pt") as f:
        metadata = f.metadata()
    info = json.loads(metadata["DCP_SHARDING_INFO"])
    info["0.weight"]["saved_offsets"] = [1000, 0]
    evil = {**metadata, "DCP_SHARDING_INFO": json.dumps(info)}
    save_file(load_file(str(shard)), str(tmp_path / "evil"), metadata=evil)
    reseal(folder, f"sharded/{shard.name}", (tmp_path / "evil").read_bytes())
    with pytest.raises(CorruptCheckpointError, match="do not cover its shape"):
        load()
    reseal(folder, f"sharded/{shard.name}", original)
    assert torch.equal(load()["0.weight"], good["0.weight"])

    # tied-weight names that point nowhere
    (folder / "sharded" / "aliases.json").write_text("{}")
    sidecar = json.loads((folder / "checkpoint.json").read_text())
    sidecar["files"].append({"path": "sharded/aliases.json", "size": 2, "sha256": "0" * 64})
    sidecar["size"] += 2
    (folder / "checkpoint.json").write_text(json.dumps(sidecar))
    reseal(folder, "sharded/aliases.json", b'{"lm_head.weight": "missing.weight"}')
    with pytest.raises(CorruptCheckpointError):
        load()
    reseal(folder, "sharded/aliases.json", b'["not", "a", "map"]')
    with pytest.raises(CorruptCheckpointError):
        load()


def test_a_consolidated_final_loads_with_from_pretrained_and_a_sharded_one_says_it_does_not(tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from test_hf import PROBE

    root = str(tmp_path / "hf")
    _, _, reports = run(tmp_path, "hf", root, "-")
    logits = reports[0]["logits"]
    live = torch.tensor(logits["2"])
    assert logits["restored-1"] == logits["1"]  # a sharded checkpoint with tied weights restores exactly
    manager = CheckpointManager(root)
    sharded, final = manager.get("checkpoint-1"), manager.get("final")
    assert not sharded.inference_ready  # asked for, but its weights are shards: refused
    assert final.inference_ready and final.sharding is not None and final.sharding.consolidated
    folder = Path(root, final.name)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder) is not None
    with torch.no_grad():
        assert torch.equal(model.eval()(PROBE).logits, live)
    assert not any(p.name.startswith("shard-") for p in folder.rglob("*") if "optimizer" not in p.parts)
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(Path(root, sharded.name))
    loaded = manager.load("checkpoint-1")  # tied names come back as one tensor under each name
    assert loaded["lm_head.weight"] is loaded["transformer.wte.weight"]


def test_the_cli_inspects_verifies_downloads_and_deletes_sharded_checkpoints(tmp_path: Path, capsys):
    from ckpt_callback._cli import main

    folder = single_rank_checkpoint(tmp_path / "root")
    root = str(folder.parent)
    assert main(["verify", root]) == 0
    capsys.readouterr()
    assert main(["inspect", root, "checkpoint-1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["spec"]["sharding"]["worldSize"] == 1 and doc["status"]["metadata"]["inferenceReady"] is False
    assert main(["download", root, "checkpoint-1", str(tmp_path / "copy")]) == 0
    copy = CheckpointManager(str(tmp_path)).get("copy")  # the download is itself a sharded checkpoint
    assert torch.equal(CheckpointManager(str(tmp_path)).load("copy")["0.weight"],
                       CheckpointManager(root).load("checkpoint-1")["0.weight"]) and copy.sharding is not None
    assert main(["delete", root, "checkpoint-1", "--yes"]) == 0
    assert not folder.exists() and CheckpointManager(root).list().data == []
