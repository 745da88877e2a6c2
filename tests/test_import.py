"""`ckpt import` / `import_checkpoints`: each source kind, provenance, refusals, remote sources."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")

from _sources import make_sources
from ckpt_callback import CheckpointManager, UnsupportedSourceError, import_checkpoints
from ckpt_callback._cli import main


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_sources(tmp_path_factory.mktemp("sources"))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torch_state_dict(sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "run")
    code, out, err = run(capsys, "import", root, str(sources["pt"]))
    assert code == 0, err
    assert out.startswith("imported state (manual, step 0, ") and str(sources["pt"]) in out
    manager = CheckpointManager(root)
    loaded = manager.load("state")
    original = torch.load(sources["pt"], weights_only=True)  # read back by torch, not by us
    assert _same(loaded, original)
    info = manager.get("state")
    assert info.source is not None and info.source.from_local_files == (str(sources["pt"]),)
    assert info.type == "manual" and info.inference_ready is False


def test_nanogpt_checkpoint(sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "run")
    code, out, err = run(capsys, "import", root, str(sources["nanogpt"]), "--name", "nanogpt-5000",
                         "--description", "from the nanoGPT run", "--json")
    assert code == 0, err
    [doc] = json.loads(out)
    assert doc["name"] == "nanogpt-5000" and doc["step"] == 5000 and doc["evalLoss"] == 1.25
    assert doc["description"] == "from the nanoGPT run"
    raw = torch.load(sources["nanogpt"], weights_only=True)
    manager = CheckpointManager(root)
    weights = manager.load("nanogpt-5000")
    assert _same(weights, {k.removeprefix("_orig_mod."): v for k, v in raw["model"].items()})
    optimizer = manager.load_training_state("nanogpt-5000")["optimizer"]
    assert torch.equal(optimizer["state"][0]["exp_avg"], raw["optimizer"]["state"][0]["exp_avg"])
    paths = {f["path"] for f in doc["files"]}
    assert {"model_args.json", "train_config.json"} <= paths and "config.json" not in paths
    assert not any(p.endswith(".pt") for p in paths)


def test_safetensors_file_with_a_step(sources: dict[str, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "run")
    assert run(capsys, "import", root, str(sources["safetensors"]), "--step", "1200", "--type", "automatic")[0] == 0
    manager = CheckpointManager(root)
    info = manager.get("checkpoint-1200")  # an automatic one gets the default name
    assert info.type == "automatic" and info.step == 1200
    assert _same(manager.load(info.name), load_file(str(sources["safetensors"])))


def test_hf_folder_is_inference_ready(sources: dict[str, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM

    root = tmp_path / "run"
    assert run(capsys, "import", str(root), str(sources["hf"]))[0] == 0
    info = CheckpointManager(str(root)).get("hf-model")
    assert info.inference_ready and info.model == "gpt2" and info.version  # not a local path as the model name
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= {f.path for f in info.files}
    ours = AutoModelForCausalLM.from_pretrained(root / "hf-model")  # the checkpoint folder itself loads
    theirs = AutoModelForCausalLM.from_pretrained(sources["hf"])
    tokens = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(ours(tokens).logits, theirs(tokens).logits)
    tensorone = CheckpointManager(str(root)).list().to_tensorone()["checkpoints"][0]
    assert tensorone["deployable"] is True


def test_trainer_output_dir(sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "run")
    code, out, err = run(capsys, "list", str(sources["trainer"]))
    assert "ckpt import" in err  # the hint that leads here
    code, out, err = run(capsys, "import", root, str(sources["trainer"]))
    assert code == 0, err
    assert [line.split()[1] for line in out.splitlines()] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert "rng_state.pth not imported" in err
    manager = CheckpointManager(root)
    state = json.loads((sources["trainer"] / "checkpoint-4" / "trainer_state.json").read_text())
    evals = {e["step"]: e["eval_loss"] for e in state["log_history"] if "eval_loss" in e}
    info = manager.get("checkpoint-4")
    assert info.type in ("automatic", "best") and info.step == 4 and info.epoch == state["epoch"]
    assert info.eval_loss == evals[4] and info.metrics["eval_loss"] == evals[4]
    assert info.train_loss == next(e["loss"] for e in state["log_history"] if e.get("step") == 4 and "loss" in e)
    paths = {f.path for f in info.files}
    assert "trainer_state.json" in paths and info.inference_ready
    assert not any(p.endswith((".pt", ".pth", ".bin")) for p in paths)  # nothing pickled is stored
    training = manager.load_training_state("checkpoint-4")
    optimizer = torch.load(sources["trainer"] / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert torch.equal(training["optimizer"]["state"][0]["exp_avg"], optimizer["state"][0]["exp_avg"])
    assert training["scheduler"] == torch.load(sources["trainer"] / "checkpoint-4" / "scheduler.pt",
                                               weights_only=True)
    assert _same(manager.load("checkpoint-4"), load_file(str(sources["trainer"] / "checkpoint-4" /
                                                             "model.safetensors")))
    assert len({manager.get(n).run_id for n in ("checkpoint-2", "checkpoint-4", "checkpoint-6")}) == 1


def test_pickled_objects_are_refused(sources: dict[str, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "run"
    code, _, err = run(capsys, "import", str(root), str(sources["evil"]))
    assert code == 1 and "_sources.Custom" in err and "weights_only" in err
    assert err.count("\n") == 1
    with pytest.raises(UnsupportedSourceError):
        import_checkpoints(str(root), [sources["evil"]])
    assert not root.exists() or not any(root.iterdir())  # nothing was written


@pytest.mark.parametrize(("argv", "message"), [
    (["{root}", "{trainer}", "--name", "x"], "apply to one checkpoint"),
    (["{root}", "{missing}"], "does not exist"),
    (["{root}", "{hf}/config.json"], "not a .safetensors"),
])
def test_bad_imports(sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                     argv: list[str], message: str) -> None:
    values = {"root": str(tmp_path / "run"), "trainer": str(sources["trainer"]), "hf": str(sources["hf"]),
              "missing": str(tmp_path / "nope.pt")}
    code, _, err = run(capsys, "import", *(a.format(**values) for a in argv))
    assert code in (1, 2) and message in err


def _upload(folder: Path, url: str, options: dict[str, Any]) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **options)
    for file in folder.rglob("*"):
        if file.is_file():
            fs.pipe_file(f"{path}/{file.relative_to(folder).as_posix()}", file.read_bytes())


@pytest.mark.parametrize("backend", ["memory", pytest.param("s3", marks=pytest.mark.s3)])
def test_remote_sources(sources: dict[str, Path], tmp_path: Path, request: pytest.FixtureRequest,
                        capsys: pytest.CaptureFixture[str], backend: str) -> None:
    if backend == "s3":
        request.getfixturevalue("s3_server")
        base = f"s3://ckpt-test/import-{uuid.uuid4().hex}"
    else:
        base = f"memory://import-{uuid.uuid4().hex}"
    _upload(sources["trainer"] / "checkpoint-6", f"{base}/out/checkpoint-6", {})
    root = f"{base}/ckpts"
    code, out, err = run(capsys, "import", root, f"{base}/out/checkpoint-6")
    assert code == 0, err
    info = CheckpointManager(root).get("checkpoint-6")
    assert info.source is not None and info.source.from_local_files == ()
    assert info.source.storage_provider == backend and info.source.source_path == f"{base}/out/checkpoint-6"
    code, out, _ = run(capsys, "inspect", root, "checkpoint-6", "--json")
    spec = json.loads(out)["spec"]
    assert spec["sourcePath"] == f"{base}/out/checkpoint-6" and spec["storageProvider"] == backend
    assert _same(CheckpointManager(root).load("checkpoint-6"),
                 load_file(str(sources["trainer"] / "checkpoint-6" / "model.safetensors")))


def test_plot_draws_the_whole_logged_history(sources: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Checkpoints 2 and 4 are gone; the loss history they were part of is still drawn."""
    pytest.importorskip("matplotlib")
    from ckpt_callback._plot import draw_losses, loss_history

    root = str(tmp_path / "run")
    assert run(capsys, "import", root, str(sources["trainer"]))[0] == 0
    for name in ("checkpoint-2", "checkpoint-4"):
        assert run(capsys, "delete", root, name, "--yes")[0] == 0
    code, out, err = run(capsys, "plot", root, "-o", str(tmp_path / "loss.png"))
    assert code == 0, err
    assert out == f"wrote {tmp_path / 'loss.png'} (1 checkpoint, 6 logged steps)\n"

    state = json.loads((sources["trainer"] / "checkpoint-6" / "trainer_state.json").read_text())
    history = loss_history(state)
    assert [s for s, _ in history["train_loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in history["eval_loss"]] == [2, 4, 6]
    figure = draw_losses(CheckpointManager(root).list().data, history=history)
    drawn = {tuple(line.get_xdata()) for line in figure.axes[0].lines}
    assert (1, 2, 3, 4, 5, 6) in drawn and (2, 4, 6) in drawn


def test_a_trainer_resumes_from_an_imported_output_dir(sources: dict[str, Path], tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Migration: the Trainer's own checkpoints, imported, resume with weights, optimizer and scheduler."""
    import logging

    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    from _sources import tiny_gpt2
    from ckpt_callback import CheckpointCallback

    with caplog.at_level(logging.WARNING, logger="ckpt_callback"):
        assert CheckpointCallback(str(sources["trainer"])).resume_from() is None
    assert "training starts from scratch" in caplog.text and "ckpt import" in caplog.text

    root = str(tmp_path / "run")
    import_checkpoints(root, [sources["trainer"]])
    model, tok = tiny_gpt2()

    class Texts(Dataset):
        def __len__(self) -> int:
            return 16

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = tok("hello world the quick brown fox")["input_ids"][:8]
            return {"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)}

    callback = CheckpointCallback(root, keep_last=None, monitor="trainLoss")
    args = TrainingArguments(str(tmp_path / "out"), max_steps=8, save_steps=2, logging_steps=1, report_to=[],
                             per_device_train_batch_size=4, use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=Texts(), callbacks=[callback])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ckpt_callback"):
        folder = callback.resume_from()
        assert folder is not None and folder.endswith("checkpoint-6")
        trainer.train(resume_from_checkpoint=folder)
    assert "start afresh" not in caplog.text  # optimizer and scheduler came back
    assert trainer.state.global_step == 8
    final = CheckpointManager(root).get("final")
    assert final.step == 8 and final.run_id == CheckpointManager(root).get("checkpoint-6").run_id
