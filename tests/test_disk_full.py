"""A full disk: an 8 MiB tmpfs, or ext4 on a loop device, mounted for the test (skipped where mounting is
not allowed).

Scheduled saves and ``evaluate()`` on a full disk must log an error naming the checkpoint and let
training go on (nothing escapes ``step``/``evaluate``), nothing half-written may be listed, and
``end()`` raises. With ``async_save``, a failed background save is reported once and the next
scheduled save is still attempted.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from ckpt_callback import CheckpointError, CheckpointHook, CheckpointManager
from conftest import sidecarless_folders

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def mounted(tmp_path: Path, kind: str, megabytes: int) -> Iterator[Path]:
    """An empty file system of ``megabytes`` MiB, unmounted afterwards: ``tmpfs``, or ``ext4`` on a loop
    device (a journal, and O_DIRECT writes, which tmpfs does not have). Skips where mounting is not allowed."""
    mountpoint = tmp_path / f"disk-{kind}"
    mountpoint.mkdir()
    if kind == "tmpfs":
        steps = [["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(mountpoint)]]
    else:
        image = tmp_path / "disk.img"
        with open(image, "wb") as f:
            f.truncate(megabytes << 20)
        steps = [["mkfs.ext4", "-q", "-F", str(image)], ["mount", "-o", "loop", str(image), str(mountpoint)]]
    for command in steps:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"cannot make a small {kind} disk for a full disk: {exc}")
        if done.returncode != 0:
            pytest.skip(f"cannot make a small {kind} disk for a full disk (mounting needs root or CAP_SYS_ADMIN, "
                        f"ext4 a free loop device): {done.stderr.strip() or done.returncode}")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


@pytest.fixture(params=["tmpfs", "ext4"])
def small_disk(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """An empty 8 MiB file system: tmpfs (buffered writes) and ext4 on a loop device (O_DIRECT writes)."""
    with mounted(tmp_path, request.param, 8) as disk:
        yield disk


def fill(disk: Path) -> Path:
    """Take every free byte of ``disk`` with one file; return it (delete it to free the space)."""
    filler = disk / f"filler-{uuid.uuid4().hex[:6]}"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for chunk in (b"\0" * (1 << 20), b"\0" * 4096, b"\0"):
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return filler


def errors(caplog: pytest.LogCaptureFixture, mentioning: str = "") -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and mentioning in r.getMessage()]


def two_mb_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)])  # ~2.1 MB of weights


def test_a_checkpoint_that_never_fits(small_disk: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(3)])  # 12.6 MB on an 8 MiB disk
    root = str(small_disk / "run")
    hook = CheckpointHook(root, model, every_n_steps=1, keep_last=2)
    escaped, unlogged = [], []
    for step in (1, 2, 3):
        try:
            saved = hook.step(step, loss=1.0 / step)
            assert saved is None, f"step {step}: a save on a full disk returned {saved}"
        except Exception as exc:
            escaped.append(f"step({step}): {type(exc).__name__}: {exc}")
        if not errors(caplog, f"checkpoint-{step}"):
            unlogged.append(f"checkpoint-{step}")
        try:
            hook.evaluate(step, eval_loss=1.0 / step)
        except Exception as exc:
            escaped.append(f"evaluate({step}): {type(exc).__name__}: {exc}")
    listed = [i.name for i in CheckpointManager(root).list()]
    with pytest.raises(CheckpointError):
        hook.end()
    leftovers = sidecarless_folders(root)
    print(f"\nfull disk, checkpoint never fits: escaped exceptions {len(escaped)}, failed saves not logged "
          f"{len(unlogged)}, listed {listed}, half-written folders left {leftovers}")
    assert escaped == []
    assert unlogged == [], "a failed scheduled save must be logged with the checkpoint's name"
    assert listed == []
    assert leftovers == [], "a failed save must not leave its partial files taking the disk"


def test_the_disk_fills_up_during_training(small_disk: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    root = str(small_disk / "run")
    hook = CheckpointHook(root, two_mb_model(), every_n_steps=1, keep_last=2)
    assert hook.step(1, loss=1.0) is not None
    filler = fill(small_disk)
    escaped = []
    calls = [("evaluate(1)", lambda: hook.evaluate(1, eval_loss=0.5, metrics={"accuracy": 0.5})),
             ("step(2)", lambda: hook.step(2, loss=0.9)),
             ("evaluate(2)", lambda: hook.evaluate(2, eval_loss=0.4)),
             ("evaluate(1) again", lambda: hook.evaluate(1, eval_loss=0.3))]
    logged = {}
    for what, call in calls:
        before = len(errors(caplog))
        try:
            call()
        except Exception as exc:
            escaped.append(f"{what}: {type(exc).__name__}: {exc}")
        logged[what] = len(errors(caplog)) - before
    manager = CheckpointManager(root)
    listed = [i.name for i in manager.list()]
    problems = [r.problems for r in manager.verify()]
    with pytest.raises(CheckpointError):
        hook.end()
    filler.unlink()
    print(f"\ndisk full during training: escaped exceptions {len(escaped)}, errors logged per call {logged}, "
          f"listed {listed}")
    for line in escaped:
        print("  ", line[:300])
    assert escaped == []
    assert logged["step(2)"] >= 1 and any("checkpoint-2" in m for m in errors(caplog))
    assert logged["evaluate(1)"] >= 1, "a metric update that could not be written must be logged"
    assert listed == ["checkpoint-1"] and problems == [[]]
    assert torch.equal(manager.load("checkpoint-1")["0.weight"], two_mb_model()[0].weight)


def test_a_failed_background_save_is_reported_once_and_costs_no_later_save(small_disk: Path,
                                                                          caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    root = str(small_disk / "run")
    hook = CheckpointHook(root, two_mb_model(), every_n_steps=1, keep_last=3, async_save=True)
    escaped = []

    def call(what, fn):
        try:
            return fn()
        except Exception as exc:
            escaped.append(f"{what}: {type(exc).__name__}: {exc}")
            return None

    try:
        call("step(1)", lambda: hook.step(1, loss=1.0))
        assert hook.wait() is not None  # committed
        filler = fill(small_disk)
        call("step(2)", lambda: hook.step(2, loss=0.9))  # fails in the background
        deadline = time.monotonic() + 30
        while not errors(caplog, "checkpoint-2") and time.monotonic() < deadline:
            time.sleep(0.05)
        reported_at_once = bool(errors(caplog, "checkpoint-2"))
        filler.unlink()  # space again: the next save must go through
        call("step(3)", lambda: hook.step(3, loss=0.8))
        call("evaluate(3)", lambda: hook.evaluate(3, eval_loss=0.8))
        deadline = time.monotonic() + 15
        listed: list[str] = []
        while "checkpoint-3" not in listed and time.monotonic() < deadline:
            listed = [i.name for i in CheckpointManager(root).list()]
            time.sleep(0.1)
        reports = errors(caplog, "checkpoint-2")
    finally:
        with contextlib.suppress(CheckpointError):  # whether end() re-raises the reported failure: not asserted
            hook.end()
    print(f"\nasync save on a full disk: reported at once {reported_at_once}, reports of the failed save "
          f"{len(reports)}, next save committed {'checkpoint-3' in listed}, escaped exceptions {len(escaped)}")
    for line in reports + escaped:
        print("  ", line[:300])
    assert escaped == []
    assert reported_at_once, "a failed background save must be logged when it fails"
    assert "checkpoint-3" in listed, "the save after a failed background save was dropped"
    assert len(reports) == 1, "a failed background save must be reported once"


def test_a_large_save_that_does_not_fit_on_ext4_fails_whole(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """Weights and optimizer state above 64 MiB are written side by side, each with O_DIRECT from threads
    of their own: the disk filling up in one of them must fail the save cleanly and free what it wrote."""
    caplog.set_level(logging.INFO)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(6)])  # 25 MB, + 50 MB of AdamW state
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 1024)).sum().backward()
    opt.step()
    with mounted(tmp_path, "ext4", 56) as disk:
        root = str(disk / "run")
        hook = CheckpointHook(root, model, optimizer=opt, every_n_steps=1, keep_last=2, save_on_signals=())
        assert hook.step(1, loss=1.0) is None  # logged, training goes on
        assert errors(caplog, "checkpoint-1"), "the failed save must be logged with the checkpoint's name"
        assert any("No space left on device" in m for m in errors(caplog)), errors(caplog)
        assert [i.name for i in CheckpointManager(root).list()] == []
        assert sidecarless_folders(root) == []
        hook.manager.close()
        used = sum(f.stat().st_size for f in Path(root).rglob("*") if f.is_file())
        assert used < 1 << 20, f"{used} bytes of the failed save are still on the disk"
