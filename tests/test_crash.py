"""Real SIGKILLs in the middle of saves: whatever is listed afterwards must verify and load."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from ckpt_callback import CheckpointManager

TRIALS = int(os.environ.get("CKPT_KILL_TRIALS", "15"))  # more locally: CKPT_KILL_TRIALS=200

SAVER = textwrap.dedent(
    """
    import sys, random, torch
    from torch import nn
    from ckpt_callback import CheckpointHook

    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)])  # ~2 MB of weights
    opt = torch.optim.AdamW(model.parameters())
    hook = CheckpointHook(sys.argv[1], model, optimizer=opt, every_n_steps=1, keep_last=2)
    step = hook.resume()
    print("ready", flush=True)
    while True:
        step += 1
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        hook.step(step, loss=random.random())
        hook.evaluate(step, eval_loss=random.random())  # rewrites sidecars, moves the best tag
        if step % 5 == 0:
            hook.save(name=f"manual-{step}")
    """
)


@pytest.mark.slow
def test_sigkill_at_random_moments_never_leaves_a_bad_listed_checkpoint(tmp_path: Path):
    root = str(tmp_path / "run")
    rng = random.Random(1234)
    bad: list[str] = []
    kills = 0
    for trial in range(TRIALS):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, root], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read() if proc.stderr else ""
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""

        manager = CheckpointManager(root, keep_last=2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a malformed sidecar would be a warning: count it as a failure
            infos = list(manager.list())
        for result in manager.verify():
            if not result.ok:
                bad.append(f"trial {trial}: {result.name}: {result.problems}")
        for info in infos:
            state = manager.load(info.name)
            if len(state) != 16 or not all(torch.isfinite(t).all() for t in state.values()):
                bad.append(f"trial {trial}: {info.name} loaded wrong")
    print(f"\n{TRIALS} SIGKILL trials ({kills} killed mid-run), bad listed checkpoints: {len(bad)}")
    assert bad == []
    # Leftovers of killed saves are invisible, and a new writer cleans them up.
    manager = CheckpointManager(root, keep_last=2)
    manager.cleanup_incomplete()
    leftovers = [p.name for p in Path(root).iterdir() if not (p / "checkpoint.json").exists()]
    assert leftovers == []
