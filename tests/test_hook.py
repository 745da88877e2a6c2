from __future__ import annotations

import json
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from ckpt_callback import CheckpointHook, CheckpointManager, CheckpointWarning, StorageError
from conftest import TrialSpawner

TRAIN = textwrap.dedent(
    """
    import sys, json, random, torch
    import numpy as np
    from torch import nn
    from ckpt_callback import CheckpointHook

    root, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.manual_seed(0); random.seed(0); np.random.seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=20)
    hook = CheckpointHook(root, model, optimizer=opt, scheduler=sched, every_n_steps=5, keep_last=2)
    start = hook.resume()
    for step in range(start + 1, steps + 1):
        x = torch.randn(16, 8) + random.random() + float(np.random.rand())  # draws from every RNG
        loss = model(x).pow(2).mean()
        loss.backward(); opt.step(); sched.step(); opt.zero_grad()
        hook.step(step, loss=loss.item())
    hook.wait()
    state = {"model": model.state_dict(), "opt": opt.state_dict()["state"], "start": start}
    torch.save(state, out)
    """
)


def test_resume_in_a_fresh_process_is_exact(tmp_path: Path, spawner: TrialSpawner):
    straight, resumed = tmp_path / "straight.pt", tmp_path / "resumed.pt"
    for root, steps, out in (("a", 20, straight), ("b", 10, tmp_path / "half.pt"), ("b", 20, resumed)):
        proc = spawner.spawn(TRAIN, str(tmp_path / root), str(steps), str(out))  # a new process each
        assert proc.wait(120) == 0, proc.describe()
    a, b = torch.load(straight), torch.load(resumed)
    assert b["start"] == 10
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for pid, slots in a["opt"].items():
        for slot, value in slots.items():
            assert torch.equal(value, b["opt"][pid][slot]), (pid, slot)


def test_hook_flow_tags_and_retention(root, tiny_net):
    opt = torch.optim.SGD(tiny_net.parameters(), lr=0.1)
    hook = CheckpointHook(root, tiny_net, optimizer=opt, every_n_steps=10, keep_last=2)
    assert hook.resume() == 0
    evals = {10: 0.9, 20: 0.4, 30: 0.6, 40: 0.7, 50: 0.8}
    for step in range(1, 51):
        saved = hook.step(step, loss=1.0 / step)
        assert (saved is not None) == (step % 10 == 0)
        if step in evals:
            hook.evaluate(step, eval_loss=evals[step], metrics={"accuracy": step / 100})
        if step == 25:
            hook.save(name="before-lr-drop", description="manual one")
    hook.end()
    infos = {i.name: i for i in hook.manager.list()}
    assert {n: i.type for n, i in infos.items()} == {
        "checkpoint-20": "best", "before-lr-drop": "manual", "checkpoint-40": "automatic", "checkpoint-50": "final"}
    assert infos["checkpoint-50"].eval_loss == 0.8 and infos["checkpoint-50"].metrics == {"accuracy": 0.5}
    assert infos["checkpoint-20"].train_loss == pytest.approx(1 / 20)
    assert infos["before-lr-drop"].description == "manual one" and infos["before-lr-drop"].eval_loss is None
    assert {f.path for f in infos["checkpoint-40"].files} == {
        "model.safetensors", "optimizer.safetensors", "training_state.json"}
    assert infos["checkpoint-40"].model == "TinyNet" and infos["checkpoint-40"].inference_ready is False


def test_evaluate_before_step_goes_into_the_same_checkpoint(root, tiny_net):
    hook = CheckpointHook(root, tiny_net, every_n_steps=5)
    hook.evaluate(5, eval_loss=0.3, metrics={"f1": 0.7})
    hook.step(5, loss=1.0)
    info = hook.manager.get("checkpoint-5")
    assert info.eval_loss == 0.3 and info.metrics == {"f1": 0.7} and info.type == "best"


def test_unwritable_root_fails_at_construction(tmp_path, tiny_net):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(StorageError, match="cannot be written"):
        CheckpointHook(str(blocker / "run"), tiny_net)


def test_failed_scheduled_save_is_logged_and_training_goes_on(tmp_path, tiny_net, caplog):
    hook = CheckpointHook(str(tmp_path / "run"), tiny_net, every_n_steps=1)
    (tmp_path / "run").rename(tmp_path / "gone")
    (tmp_path / "run").write_text("now a file")  # the root can no longer hold folders
    assert hook.step(1, loss=0.5) is None
    assert "checkpoint checkpoint-1 (step 1) was not saved" in caplog.text
    with pytest.raises(StorageError):
        hook.end()  # the final one must not fail silently


def test_context_manager_saves_final_and_async_waits(root, tiny_net):
    with CheckpointHook(root, tiny_net, every_n_steps=2, async_save=True) as hook:
        for step in range(1, 6):
            hook.step(step, loss=0.1)
    infos = {i.name: i.type for i in CheckpointManager(root).list()}
    assert infos["checkpoint-5"] == "final" and "checkpoint-4" in infos


def test_sidecar_on_disk_is_plain_json(tmp_path, tiny_net):
    with CheckpointHook(str(tmp_path), tiny_net, every_n_steps=1) as hook:
        hook.step(1, loss=0.25, epoch=0.5)
    data = json.loads((tmp_path / "checkpoint-1" / "checkpoint.json").read_text())
    assert data["step"] == 1 and data["epoch"] == 0.5 and data["trainLoss"] == 0.25 and data["type"] == "final"
    training = json.loads((tmp_path / "checkpoint-1" / "training_state.json").read_text())
    assert training["step"] == 1 and "rng" in training["state"]


def test_evaluation_without_the_monitor_is_warned_about_once(root, tiny_net):
    hook = CheckpointHook(root, tiny_net, every_n_steps=1, monitor="accuracy", mode="max")
    with pytest.warns(CheckpointWarning, match=r"'accuracy' never appears \(evaluate\(\) at step 1 gave evalLoss, f1"):
        hook.step(1, loss=1.0)
        hook.evaluate(1, eval_loss=0.5, metrics={"f1": 0.3})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        hook.step(2, loss=0.9)
        hook.evaluate(2, eval_loss=0.4, metrics={"f1": 0.4})
        hook.end()
    assert all(i.type != "best" for i in hook.manager.list())
