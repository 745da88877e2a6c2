"""on_commit links to experiment trackers, against the real libraries offline: a reference, never the bytes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from ckpt_callback import CheckpointHook, CheckpointManager, MlflowLink, WandbLink
from ckpt_callback._trackers import checkpoint_url


def test_checkpoint_urls():
    assert checkpoint_url("s3://bucket/run/", "checkpoint-5") == "s3://bucket/run/checkpoint-5"
    assert checkpoint_url("/data/run", "checkpoint-5") == "file:///data/run/checkpoint-5"
    assert checkpoint_url("file:///data/run", "best-one") == "file:///data/run/best-one"


@pytest.mark.slow
def test_wandb_offline_logs_a_reference_artifact_per_commit(tmp_path: Path, monkeypatch, tiny_net):
    wandb = pytest.importorskip("wandb")
    for key, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"),
                     ("WANDB_CONFIG_DIR", "config")):
        monkeypatch.setenv(key, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = []

    class Recording(WandbLink):
        def __call__(self, info):
            logged.append(super().__call__(info))

    root = str(tmp_path / "ckpts")
    run = wandb.init(project="ckpt-test", dir=str(tmp_path))
    try:
        with CheckpointHook(root, tiny_net, every_n_steps=1, on_commit=[Recording()], save_on_signals=()) as hook:
            hook.evaluate(1, eval_loss=0.4)
            hook.step(1, loss=1.0)
            hook.evaluate(2, eval_loss=0.9)
            hook.step(2, loss=0.8)
    finally:
        run.finish()
    # checkpoint-2 twice: committed automatic, then promoted to final by end() at the same step
    assert [(a.metadata["name"], a.metadata["type"]) for a in logged] == [
        ("checkpoint-1", "best"), ("checkpoint-2", "automatic"), ("checkpoint-2", "final")]
    first, last = logged[0], logged[-1]
    assert first.name.startswith(f"checkpoints-{run.id}") and first.type == "model"
    assert first.metadata["url"] == f"file://{root}/checkpoint-1" and first.metadata["type"] == "best"
    assert first.metadata["evalLoss"] == 0.4 and last.metadata["type"] == "final"
    refs = {e.ref for e in first.manifest.entries.values()}
    assert f"file://{root}/checkpoint-1/model.safetensors" in refs
    assert all(e.ref.startswith(f"file://{root}/checkpoint-1/") for e in first.manifest.entries.values())
    # the offline run's transaction log holds the references and aliases; no checkpoint file was copied anywhere
    (log,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    wanted = f"file://{root}/checkpoint-2/model.safetensors".encode()
    deadline = time.monotonic() + 30
    while wanted not in log.read_bytes() and time.monotonic() < deadline:  # wandb-core flushes it on its own time
        time.sleep(0.2)
    assert wanted in log.read_bytes() and b"final" in log.read_bytes()
    copies = [p for p in tmp_path.rglob("*.safetensors") if Path(root) not in p.parents]
    assert copies == []


@pytest.mark.slow
def test_mlflow_local_store_gets_tags_and_a_document_per_commit(tmp_path: Path, monkeypatch, tiny_net):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the local file store the issue asks for
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    root = str(tmp_path / "ckpts")
    with mlflow.start_run() as run:
        # async_save: the commits happen on a background thread, where MLflow has no active run
        manager = CheckpointManager(root, on_commit=MlflowLink(), async_save=True)
        manager.save(tiny_net, step=1, eval_loss=0.5, metrics={"acc": 0.7})
        manager.save(tiny_net, step=2, eval_loss=0.3)
        manager.save(tiny_net, step=3, eval_loss=0.6, type="final")
        manager.close()
    tags = mlflow.get_run(run.info.run_id).data.tags
    url = (tmp_path / "ckpts").as_uri()
    assert tags["ckpt.best"] == f"{url}/checkpoint-2"
    assert tags["ckpt.final"] == tags["ckpt.latest"] == f"{url}/checkpoint-3"
    client = mlflow.MlflowClient()
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == [
        f"checkpoints/checkpoint-{s}.json" for s in (1, 2, 3)]
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="checkpoints/checkpoint-1.json",
                                                dst_path=str(tmp_path / "dl"))
    doc = json.loads(Path(local).read_text())
    assert doc["url"] == f"{url}/checkpoint-1" and doc["metrics"] == {"acc": 0.7} and doc["evalLoss"] == 0.5
    assert not list((tmp_path / "mlruns").rglob("*.safetensors"))


def test_a_link_without_an_active_run_warns_once_and_training_goes_on(tmp_path: Path, caplog, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")

    assert mlflow.active_run() is None
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    manager = CheckpointManager(str(tmp_path / "ckpts"), on_commit=[MlflowLink()])
    manager.save({"w": torch.ones(1)}, step=1)
    manager.save({"w": torch.ones(1)}, step=2)
    assert manager.latest().step == 2
    assert caplog.text.count("no active MLflow run") == 1
