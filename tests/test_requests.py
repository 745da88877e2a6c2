"""Checkpoints requested from outside the running job (`ckpt request`, `CheckpointManager.request`).

The channel is the root itself (``ROOT/.ckpt-requests/``), so the contract tests run on every backend;
the end-to-end ones run a real training process (forked from the preloaded trial server) and ask it for
checkpoints from the test process, through the CLI, on a local folder and on the S3 server.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from ckpt_callback import (
    CheckpointExistsError,
    CheckpointManager,
    CheckpointNotFoundError,
    InvalidNameError,
    RequestTimeoutError,
)
from ckpt_callback._cli import main
from ckpt_callback._trigger import Interrupts
from conftest import TrialSpawner, make_root, root_fs
from test_signals import BACKENDS, LOOP, checkpoints, last_step


def test_a_request_is_taken_once_answered_and_never_listed(root: str):
    job = CheckpointManager(root)
    job.save({"w": torch.ones(2)}, step=1)
    asked = CheckpointManager(root).request(name="asked", description="why")
    assert [i.name for i in job.list()] == ["checkpoint-1"]  # requests are not checkpoints
    taken = job.requests.take()
    assert (taken.id, taken.name, taken.description, taken.stop) == (asked.id, "asked", "why", False)
    assert job.requests.take() is None  # consumed once
    info = job.save({"w": torch.ones(2)}, step=2, type="manual", name="asked")
    job.requests.answer(taken, info=info)
    got = asked.wait(timeout=10, poll=0.01)
    assert (got.name, got.type, got.step, got.id) == ("asked", "manual", 2, info.id)
    assert sorted(i.name for i in job.list()) == ["asked", "checkpoint-1"]
    assert job.verify() and all(r.ok for r in job.verify())


def test_a_failed_request_raises_the_jobs_error_and_a_late_one_is_withdrawn(root: str):
    job = CheckpointManager(root)
    job.save({"w": torch.ones(2)}, step=1, type="manual", name="taken")
    with pytest.raises(CheckpointExistsError):
        job.request(name="taken")  # known taken when asked
    with pytest.raises(InvalidNameError):
        job.request(name="best")
    raced = job.requests.submit(name="taken", description=None, stop=False)  # taken between ask and save
    try:
        job.save({"w": torch.ones(2)}, step=2, type="manual", name="taken")
    except CheckpointExistsError as exc:
        job.requests.answer(job.requests.take(), error=exc, step=2)
    with pytest.raises(CheckpointExistsError, match="already exists"):
        raced.wait(timeout=10, poll=0.01)
    late = job.request(stop=True)
    with pytest.raises(RequestTimeoutError, match="withdrawn"):
        late.wait(timeout=0.2, poll=0.05)
    assert job.requests.take() is None  # withdrawn: a job started later does not see it


def test_a_malformed_request_file_is_answered_not_fatal(root: str, request: pytest.FixtureRequest):
    job = CheckpointManager(root)
    job.save({"w": torch.ones(2)}, step=1)
    fs, path = root_fs(root, request)
    fs.makedirs(f"{path}/.ckpt-requests", exist_ok=True)
    fs.pipe_file(f"{path}/.ckpt-requests/req-bad.request.json", b"{not json")
    fs.pipe_file(f"{path}/.ckpt-requests/req-good.request.json", json.dumps(
        {"object": "checkpoint.request", "id": "req-good", "name": None, "description": None, "stop": True}).encode())
    taken = job.requests.take()
    assert taken.id == "req-good" and taken.stop
    assert job.requests.outcome("req-bad")["status"] == "failed"
    assert [i.name for i in job.list()] == ["checkpoint-1"]


def test_asking_a_root_that_does_not_exist_fails_and_creates_nothing(tmp_path: Path):
    with pytest.raises(CheckpointNotFoundError):
        CheckpointManager(str(tmp_path / "typo")).request()
    assert not (tmp_path / "typo").exists()


def test_rank_0_looks_for_requests_at_most_every_n_seconds_and_not_in_between(tmp_path: Path):
    manager = CheckpointManager(str(tmp_path / "ckpts"))
    manager.save({"w": torch.ones(1)}, step=1)
    calls = []
    list_dir = manager.requests.storage.list_dir
    manager.requests.storage.list_dir = lambda rel="": calls.append(rel) or list_dir(rel)  # type: ignore[method-assign]
    slow = Interrupts((), manager.requests, every=3600)
    assert [slow.check(look=True) for _ in range(50)] == [None] * 50
    assert len(calls) == 1  # the first boundary looks; the next 49 touch no storage
    manager.request(name="asked")
    assert slow.check(look=True) is None and len(calls) == 1
    eager = Interrupts((), manager.requests, every=0)
    assert eager.check(look=False) is None and len(calls) == 1  # only the writer looks
    event = eager.check(look=True)
    assert event is not None and event.type == "manual" and event.name == "asked" and not event.stop
    assert Interrupts((signal.SIGTERM,), manager.requests, every=None).channel is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_ckpt_request_from_another_process_while_training_runs(
        spawner: TrialSpawner, tmp_path: Path, request: pytest.FixtureRequest, backend: str,
        capsys: pytest.CaptureFixture[str]):
    root = make_root(backend, tmp_path, request)
    proc = spawner.spawn(LOOP, root, "request")
    proc.wait_for("step 3", timeout=60)
    assert main(["request", root, "--name", "asked", "--description", "from the shell", "--wait",
                 "--timeout", "60"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("saved asked (manual, step ") and "from the shell (requested by ckpt request req-" in out
    # a name taken by the time the job saves it: the requester hears of it, training goes on
    raced = CheckpointManager(root).requests.submit(name="asked", description=None, stop=False)
    with pytest.raises(CheckpointExistsError):
        raced.wait(timeout=60, poll=0.05)
    assert proc.poll() is None
    assert main(["request", root, "--stop", "--wait", "--timeout", "60", "--json"]) == 0
    final = json.loads(capsys.readouterr().out)
    assert proc.wait(60) == 0, proc.describe()  # a clean stop
    reached = last_step(proc)
    saved = checkpoints(root)
    asked_step = saved["asked"][1]
    assert saved["asked"][:2] == ("manual", asked_step) and asked_step < reached
    assert (final["name"], final["type"], final["step"]) == (f"checkpoint-{reached}", "final", reached)
    assert saved[final["name"]][2].startswith("stopped by ckpt request req-")
    assert "after the with block" not in proc.stdout()
    fs, path = root_fs(root, request)
    fs.invalidate_cache()
    left = [p for p in fs.find(f"{path}/.ckpt-requests") if not p.rstrip("/").endswith("/.ckpt-requests")]
    assert left == [], left  # every request consumed, every outcome read


def test_ckpt_request_wait_with_no_job_fails_and_withdraws(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    root = str(tmp_path / "ckpts")
    CheckpointManager(root).save({"w": torch.ones(1)}, step=1)
    assert main(["request", root, "--wait", "--timeout", "0.3"]) == 1
    assert "no job writing" in capsys.readouterr().err
    assert list((tmp_path / "ckpts" / ".ckpt-requests").iterdir()) == []
    assert main(["request", root, "--name", "final"]) == 2  # a reserved name is bad usage
