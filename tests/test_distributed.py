"""Two processes under real `torchrun` on CPU (gloo): the HF Trainer with DDP, and the plain CheckpointHook.

Each run checks that exactly one process writes (only rank 0 logs a "saved ..." record), that all ranks
agree on the step and on the best checkpoint, that every checkpoint on storage is committed and
verifies, and that nothing hangs (every launch has a timeout, and when it runs out torchrun and
every worker are killed).

Every worker script ends, on each way out, with `_rank_report.finish()`: it destroys the process
group and exits without finalizing the interpreter, where a Gloo thread still releasing the last
collective's tensors aborts the process now and then ("terminate called without an active
exception"; a test of ours, not the library, failing on busy machines).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from _rank_report import digest
from ckpt_callback import CheckpointManager

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent


def torchrun(script: Path, *args: str, timeout: float = 90, writes: bool = True) -> dict[int, dict[str, Any]]:
    """Run ``script`` on 2 processes; return the report each rank wrote to ``$REPORT_DIR/rank-N.json``."""
    returncode, output, reports = launch(script, *args, timeout=timeout)
    assert returncode == 0, f"torchrun failed ({returncode}):\n{output[-6000:]}"
    assert sorted(reports) == [0, 1], output[-4000:]
    assert bool(reports[0]["saved"]) is writes and not reports[1]["saved"], reports  # one process writes
    return reports


def launch(script: Path, *args: str, nproc: int = 2, timeout: float = 90,
           env: dict[str, str] | None = None) -> tuple[int, str, dict[int, dict[str, Any]]]:
    """Run ``script`` on ``nproc`` processes; return torchrun's exit status, its output and the ranks' reports."""
    launch_id = uuid.uuid4().hex[:8]
    reports_dir = script.parent / f"reports-{launch_id}"
    reports_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "REPORT_DIR": str(reports_dir),
           LAUNCH: launch_id, **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(script), *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        output = kill_launch(proc, launch_id)
        raise AssertionError(f"torchrun did not finish in {timeout}s (a hang?):\n{output[-4000:]}") from None
    except BaseException:  # pytest-timeout, Ctrl-C: leave nothing running either
        kill_launch(proc, launch_id)
        raise
    reports = {int(p.stem[5:]): json.loads(p.read_text()) for p in sorted(reports_dir.glob("rank-*.json"))}
    return proc.returncode, output, reports


LAUNCH = "CKPT_TEST_LAUNCH"  # in the environment of torchrun and of every process it starts


def kill_launch(proc: subprocess.Popen[str], launch: str) -> str:
    """SIGKILL torchrun and every process of its launch; return what they printed.

    Killing torchrun's process group is not enough: torchrun starts each worker in a session of its
    own, so a hung worker would live on and keep the output pipe open, and reading it would hang.
    The workers are found by the variable they inherit (Linux; elsewhere only the group is killed).
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # first, so that torchrun starts nothing more
    workers = processes_with(f"{LAUNCH}={launch}")
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    try:
        output, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        output = "(no output: a process of the launch still holds the pipe)"
    deadline = time.monotonic() + 10  # a killed process closes its files a moment before it is gone
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    return output


def processes_with(variable: str) -> set[int]:
    """Live processes whose environment holds ``variable`` (``NAME=value``), read from /proc."""
    pids = set()
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours
            if variable.encode() in (entry / "environ").read_bytes().split(b"\0") and alive(int(entry.name)):
                pids.add(int(entry.name))
    return pids


def alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (dead, not yet reaped by its new parent) does not."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def assert_committed(root: str) -> CheckpointManager:
    manager = CheckpointManager(root)
    assert all(result.ok for result in manager.verify())
    leftovers = [p.name for p in Path(root).iterdir() if not (p / "checkpoint.json").is_file()]
    assert leftovers == [], leftovers  # no staging or half-written folders
    return manager


def params_digest(root: str, name: str) -> str:
    """The digest HF_SCRIPT reports, of checkpoint ``name`` loaded into the tiny GPT-2."""
    from test_hf import tiny_model, tiny_tokenizer

    model = tiny_model(tiny_tokenizer())
    model.load_state_dict(CheckpointManager(root).load(name), strict=False)  # lm_head is tied to wte
    return digest(model)


HF_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    from ckpt_callback import CheckpointCallback, StorageError
    from test_hf import fixed_scores, tiny_trainer
    from _rank_report import finish, report, watch_saves

    rank = int(os.environ["RANK"])

    saves = watch_saves()
    root, out, max_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    scores = [0.5, 0.9, 0.7] if max_steps == 12 else [0.1]
    callback = CheckpointCallback(root, keep_last=2, monitor="score", mode="max", load_best_at_end=True)
    trainer = tiny_trainer(out, [callback], max_steps=max_steps, ddp_backend="gloo",
                           compute_metrics=fixed_scores(scores))
    start = callback.resume_from()
    try:
        trainer.train(resume_from_checkpoint=start)
    except StorageError as exc:  # an unwritable root: every rank must get here, none may hang
        report(rank, trainer.model, saves, error=str(exc), step=trainer.state.global_step)
    else:
        report(rank, trainer.model, saves, world=torch.distributed.get_world_size(), step=trainer.state.global_step,
               start=start and os.path.basename(start), best=callback.manager.best().name)
    finish()
    """
)


def test_hf_trainer_ddp_under_torchrun(tmp_path: Path):
    script = tmp_path / "train_hf.py"
    script.write_text(HF_SCRIPT)
    root, out = str(tmp_path / "ckpts"), str(tmp_path / "out")

    reports = torchrun(script, root, out, "12")
    assert [(r["world"], r["start"], r["step"]) for r in reports.values()] == [(2, None, 12)] * 2
    assert reports[0]["saved"] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    assert {r["best"] for r in reports.values()} == {"checkpoint-8"}  # all ranks agree on the best
    assert reports[0]["params"] == reports[1]["params"] == params_digest(root, "checkpoint-8")  # best loaded at end
    manager = assert_committed(root)
    assert {(i.name, i.type) for i in manager.list()} == {("checkpoint-4", "automatic"), ("checkpoint-8", "best"),
                                                          ("checkpoint-12", "final")}
    assert not Path(out).exists() or not any(Path(out).iterdir())  # the Trainer wrote no checkpoint of its own

    # a second launch resumes from the latest checkpoint on every rank and trains 4 more steps
    reports = torchrun(script, root, out, "16")
    assert [(r["start"], r["step"], r["best"]) for r in reports.values()] == [("checkpoint-12", 16, "checkpoint-8")] * 2
    assert reports[0]["saved"] == ["checkpoint-16"] and reports[0]["params"] == reports[1]["params"]
    assert assert_committed(root).get("final").step == 16


HOOK_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    import torch.distributed as dist
    from torch import nn
    from ckpt_callback import CheckpointHook
    from _rank_report import finish, report, watch_saves

    dist.init_process_group("gloo")
    rank = dist.get_rank()

    saves = watch_saves()
    root, total = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    evals = {2: 0.9, 4: 0.3, 6: 0.5, 8: 0.6, 10: 0.7}
    with CheckpointHook(root, model, optimizer=opt, every_n_steps=2, keep_last=2) as hook:
        start = hook.resume()
        for step in range(start + 1, total + 1):
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(100 * step + rank))
            loss = model(x).pow(2).mean()
            loss.backward(); opt.step(); opt.zero_grad()
            hook.step(step, loss=loss.item())
            if step % 2 == 0:
                hook.evaluate(step, eval_loss=evals[step])
    report(rank, model, saves, world=dist.get_world_size(), start=start, best=hook.manager.best().name)
    finish()
    """
)


def test_plain_hook_ddp_under_torchrun(tmp_path: Path):
    script = tmp_path / "train_plain.py"
    script.write_text(HOOK_SCRIPT)
    root = str(tmp_path / "ckpts")

    reports = torchrun(script, root, "6")
    assert [(r["world"], r["start"], r["best"]) for r in reports.values()] == [(2, 0, "checkpoint-4")] * 2
    assert reports[0]["saved"] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]  # the final one is a re-tag
    assert reports[0]["params"] == reports[1]["params"]

    reports = torchrun(script, root, "10")  # resumes at step 6 on both ranks
    assert [(r["start"], r["best"]) for r in reports.values()] == [(6, "checkpoint-4")] * 2
    assert reports[0]["saved"] == ["checkpoint-8", "checkpoint-10"] and reports[0]["params"] == reports[1]["params"]
    manager = assert_committed(root)
    assert manager.get("best").name == "checkpoint-4" and manager.get("final").step == 10


def test_unwritable_root_fails_on_every_rank_without_a_hang(tmp_path: Path):
    script = tmp_path / "train_hf.py"
    script.write_text(HF_SCRIPT)
    (tmp_path / "a-file").write_text("not a folder")
    reports = torchrun(script, str(tmp_path / "a-file" / "ckpts"), str(tmp_path / "out"), "12", writes=False)
    assert all("cannot be written" in r["error"] and r["step"] == 0 for r in reports.values()), reports


HANG_SCRIPT = textwrap.dedent(
    """
    import os, time
    import torch.distributed as dist

    with open(os.path.join(os.environ["REPORT_DIR"], f"pid-{os.environ['RANK']}"), "w") as f:
        f.write(str(os.getpid()))
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        time.sleep(120)  # rank 0 waits in the barrier meanwhile; both end by themselves if the kill misses them
    dist.barrier()
    """
)


@pytest.mark.extended  # the harness's own check: a hung torchrun fails in time and leaves nothing running
@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="finds the workers through /proc")
def test_a_hung_launch_fails_in_time_and_leaves_no_process(tmp_path: Path):
    script = tmp_path / "hang.py"
    script.write_text(HANG_SCRIPT)
    started = time.monotonic()
    with pytest.raises(AssertionError, match="did not finish in 10s"):
        torchrun(script, timeout=10)
    assert time.monotonic() - started < 60
    workers = [int(p.read_text()) for p in tmp_path.glob("reports-*/pid-*")]
    assert len(workers) == 2 and not [pid for pid in workers if alive(pid)]
