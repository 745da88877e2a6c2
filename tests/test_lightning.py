"""LightningCheckpoint: our checkpoints from a real Trainer, and exact resume through trainer.fit(ckpt_path=...)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("torchdata")

from _lightning_run import run
from ckpt_callback import CheckpointManager, InvalidArgumentError
from ckpt_callback.lightning import LightningCheckpoint

pytestmark = pytest.mark.slow


def _ddp(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``python _lightning_run.py ARGS`` (a 2-process DDP run, Lightning's launcher); a hang kills both ranks."""
    import signal

    script = str(Path(__file__).parent / "_lightning_run.py")
    proc = subprocess.Popen([sys.executable, script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path, start_new_session=True)  # rank 1 joins rank 0's group
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"the DDP run hung:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    """The parameters/buffers that differ."""
    return [k for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True)
            if not torch.equal(x, y)]


@pytest.mark.parametrize(("stop", "stateful"), [(10, False), (13, True), (15, True)],
                         ids=["epoch-boundary-plain-loader", "mid-epoch", "mid-epoch-after-validation"])
def test_stopped_and_resumed_equals_never_stopped(tmp_path: Path, stop: int, stateful: bool):
    straight = run(str(tmp_path / "a"), seed=0, total=27, stop=None, stateful=stateful)
    run(str(tmp_path / "b"), seed=0, total=27, stop=stop, stateful=stateful)  # crashes after the save at `stop`
    manager = CheckpointManager(str(tmp_path / "b"))
    assert [i.name for i in manager.list().data] == [f"checkpoint-{stop}"]
    resumed = run(str(tmp_path / "b"), seed=7, total=27, stop=None, stateful=stateful)  # other seed: all restored
    assert resumed.trainer.global_step == 27
    assert _equal(straight, resumed) == []
    assert resumed.seen == straight.seen == 27 * 4  # the module's on_save_checkpoint state came back
    final, saved = manager.get("final"), manager.get(f"checkpoint-{stop}")
    assert final.step == 27 and final.run_id == saved.run_id
    assert saved.epoch == pytest.approx(stop / 10) and final.epoch == pytest.approx(2.7)  # epochs done
    assert "val_loss" in final.metrics and final.train_loss is not None


@pytest.mark.parametrize("backend", ["memory"])
def test_background_saves_on_object_stores_resume_exactly(backend: str, tmp_path: Path,
                                                          request: pytest.FixtureRequest):
    """async_save=True on memory://: the run crashes right after a background save is handed over.
    (On S3 the SIGTERM test below saves in the background.)"""
    from conftest import make_root

    options = {"async_save": True}
    if backend == "s3":
        options["storage_options"] = dict(request.getfixturevalue("s3_server").storage_options)
    straight = run(make_root(backend, tmp_path / "a", request), seed=0, total=17, stop=None, stateful=True, **options)
    root = make_root(backend, tmp_path / "b", request)
    run(root, seed=0, total=17, stop=13, stateful=True, **options)  # the crash waits for the save in flight
    manager = CheckpointManager(root, storage_options=options.get("storage_options"))
    assert [i.name for i in manager.list().data] == ["checkpoint-13"]
    resumed = run(root, seed=7, total=17, stop=None, stateful=True, **options)
    assert resumed.trainer.global_step == 17 and _equal(straight, resumed) == []
    assert manager.get("final").step == 17 and manager.get("best").metric("val_loss") is not None


@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_sigterm_saves_a_final_checkpoint_and_the_run_resumes_exactly(backend: str, tmp_path: Path,
                                                                       request: pytest.FixtureRequest):
    """A real SIGTERM in a separate process: Lightning stops at the next step boundary, a final is saved there."""
    from conftest import make_root

    options = {}
    if backend == "s3":  # and in the background: the final save waits for the one in flight
        options = {"storage_options": dict(request.getfixturevalue("s3_server").storage_options), "async_save": True}
    root = make_root(backend, tmp_path / "b", request)
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from _lightning_run import run; "
            f"run({root!r}, seed=0, total=20, stop=None, stateful=True, sigterm_at=6, **{options!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert "SIGTERM: saving a final checkpoint at step 7" in out.stderr, out.stderr[-3000:]
    manager = CheckpointManager(root, storage_options=options.get("storage_options"))
    final = manager.get("final")
    assert (final.step, final.description) == (7, "stopped by SIGTERM at step 7")
    straight = run(str(tmp_path / "a"), seed=0, total=20, stop=None, stateful=True)
    resumed = run(root, seed=7, total=20, stop=None, stateful=True, **options)
    assert resumed.trainer.global_step == 20 and _equal(straight, resumed) == []
    with pytest.raises(InvalidArgumentError, match="SIGTERM only"):
        LightningCheckpoint(root, save_on_signals=(2,))


def test_checkpoint_is_ours_and_listed(tmp_path: Path):
    run(str(tmp_path / "r"), seed=0, total=15, stop=None, stateful=False)
    folder = tmp_path / "r" / "checkpoint-15"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.json", "model.safetensors",
                                                        "optimizer.safetensors", "training_state.json"]
    doc = json.loads((folder / "training_state.json").read_text())
    lightning = doc["state"]["extra"]["lightning"]
    assert {"loops", "optimizer_states", "lr_schedulers", "callbacks", "seen"} <= set(lightning)
    out = subprocess.run([sys.executable, "-m", "ckpt_callback._cli", "list", str(tmp_path / "r"), "--json"],
                         capture_output=True, text=True, check=True)
    listed = json.loads(out.stdout)["data"]
    assert [c["name"] for c in listed] == ["checkpoint-15"] and listed[0]["type"] == "final"
    from safetensors.torch import load_file

    assert set(load_file(folder / "model.safetensors")) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}


def test_every_n_epochs_saves_at_epoch_ends_with_the_epochs_done(tmp_path: Path):
    run(str(tmp_path / "r"), seed=0, total=30, stop=None, stateful=False,
        schedule={"every_n_steps": None})  # no schedule given: every epoch
    infos = CheckpointManager(str(tmp_path / "r"), keep_last=None).list(sort_by="step", order="asc").data
    assert [(i.name, i.epoch) for i in infos] == [("checkpoint-10", 1.0), ("checkpoint-20", 2.0),
                                                   ("checkpoint-30", 3.0)]
    assert infos[-1].type == "final" and all(i.metric("val_loss") is not None for i in infos)


def test_resume_from_is_none_on_an_empty_root(tmp_path: Path):
    assert LightningCheckpoint(str(tmp_path / "empty")).resume_from() is None
    with pytest.raises(InvalidArgumentError, match="check_requests_every"):
        LightningCheckpoint(str(tmp_path / "empty"), check_requests_every=5)
    with pytest.raises(InvalidArgumentError, match="every_n_epochs"):
        LightningCheckpoint(str(tmp_path / "empty"), every_n_epochs=0)


def test_module_state_that_needs_pickle_is_refused_by_name(tmp_path: Path, monkeypatch):
    import _lightning_run

    monkeypatch.setattr(_lightning_run.Net, "on_save_checkpoint",
                        lambda self, ckpt: ckpt.update(opaque=object()))
    with pytest.raises(InvalidArgumentError, match=r"cannot store object.*checkpoint entry .opaque. \(put there by"):
        run(str(tmp_path / "r"), seed=0, total=5, stop=None, stateful=False)


@pytest.mark.skipif(not os.environ.get("CKPT_LIGHTNING_DDP"), reason="9 two-process DDP runs take ~2 min on 2 cores: "
                    "set CKPT_LIGHTNING_DDP=1")
@pytest.mark.parametrize(("stop", "loader"), [(5, "0"), (3, "torch-sampler"), (7, "torch-sampler")],
                         ids=["epoch-boundary", "mid-first-epoch-stateful-loader", "mid-second-epoch-stateful-loader"])
def test_ddp_two_processes_resume_exactly(tmp_path: Path, stop: int, loader: str):
    """40 samples / 2 ranks / batch 4: 5 steps an epoch. Mid-way through the second epoch Lightning makes the
    resumed iterator before it calls the DistributedSampler's set_epoch; the callback makes it again."""
    def ddp(root: str, stop: int, out: str) -> None:
        done = _ddp(tmp_path, root, "0", "20", str(stop), out, loader)
        assert done.returncode == 0, done.stderr[-3000:]

    ddp(str(tmp_path / "a"), 0, str(tmp_path / "a.pt"))
    ddp(str(tmp_path / "b"), stop, str(tmp_path / "crashed.pt"))
    ddp(str(tmp_path / "b"), 0, str(tmp_path / "b.pt"))
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert [k for k in a["state"] if not torch.equal(a["state"][k], b["state"][k])] == []
    assert a["seen"] == b["seen"]
    names = {i.name: i.type for i in CheckpointManager(str(tmp_path / "b")).list().data}
    assert names == {f"checkpoint-{stop}": "automatic", "checkpoint-20": "final"}


@pytest.mark.skipif(not os.environ.get("CKPT_LIGHTNING_DDP"), reason="two-process DDP runs: set CKPT_LIGHTNING_DDP=1")
def test_ddp_sigterm_saves_a_final_on_every_rank_and_resumes_exactly(tmp_path: Path):
    """SIGTERM to the main process of a 2-process DDP run (Lightning's launcher passes it on): every rank stops at
    the same step boundary, a final is saved there, and the resumed run equals one that never stopped."""
    def ddp(root: str, out: str, *sigterm_at: str) -> subprocess.CompletedProcess:
        return _ddp(tmp_path, root, "0", "20", "0", out, "torch-sampler", *sigterm_at)

    stopped = ddp(str(tmp_path / "b"), str(tmp_path / "stopped.pt"), "6")
    assert stopped.stderr.count("SIGTERM: saving a final checkpoint at step 7") == 2, stopped.stderr[-3000:]
    final = CheckpointManager(str(tmp_path / "b")).get("final")
    assert (final.step, final.description) == (7, "stopped by SIGTERM at step 7")
    assert ddp(str(tmp_path / "b"), str(tmp_path / "b.pt")).returncode == 0
    assert ddp(str(tmp_path / "a"), str(tmp_path / "a.pt")).returncode == 0
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert [k for k in a["state"] if not torch.equal(a["state"][k], b["state"][k])] == []
