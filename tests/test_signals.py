"""Real signals to real training processes: what checkpoint each way of ending leaves, at which step.

A plain loop runs in its own process (forked from the preloaded trial server, see conftest) and prints
``step N`` (flushed) before it calls ``hook.step(N)``; the test sends real signals with ``os.kill``. After
the process ended, the final checkpoint must be at the last step the loop reached (the signal is acted on
at the step boundary after it came), every listed checkpoint must verify, and the exit must be the
signal's own: -15 for SIGTERM, -10 for SIGUSR1, ``KeyboardInterrupt`` for Ctrl-C.

The HF Trainer runs in a fresh interpreter (transformers is not preloaded); the torchrun tests launch two
real workers as tests/test_distributed.py does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from ckpt_callback import CheckpointManager
from conftest import TrialProcess, TrialSpawner, make_root

pytestmark = pytest.mark.slow

BACKENDS = ["local", pytest.param("s3", marks=pytest.mark.s3)]
TESTS = Path(__file__).parent

LOOP = textwrap.dedent(
    """
    import signal, sys, time, warnings
    import torch
    from torch import nn
    from ckpt_callback import CheckpointHook, CheckpointWarning
    from ckpt_callback import _storage

    warnings.simplefilter("ignore", CheckpointWarning)
    root, ending = sys.argv[1], sys.argv[2]
    def say(*words):  # one write per line: the background save prints too
        sys.stdout.write(" ".join(map(str, words)) + "\\n"); sys.stdout.flush()
    slow_writes = ending in ("async", "break-slow")
    if slow_writes:  # make the background save last long enough to be signalled half-way
        write = _storage.Storage.write_stream
        def slow(self, rel, produce, **options):
            say("writing", rel)
            time.sleep(0.25)
            return write(self, rel, produce, **options)
        _storage.Storage.write_stream = slow
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) if ending == "usr1" else (signal.SIGTERM, signal.SIGINT)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with CheckpointHook(root, model, optimizer=opt, every_n_steps=5, keep_last=2, save_on_signals=signals,
                        async_save=ending == "async", check_requests_every=0.1) as hook:
        for step in range(1, 100_000):
            loss = model(torch.randn(4, 8)).pow(2).mean()
            loss.backward(); opt.step(); opt.zero_grad()
            say("step", step)
            saved = hook.step(step, loss=loss.item())
            if saved is not None:
                say("returned", saved.name)
            if step == 7 and ending == "exit":
                sys.exit(3)
            if step == 7 and ending in ("break", "break-slow"):
                break
            if step == 7 and ending == "crash":
                raise ValueError("a bug in the training loop")
            if ending == "sigint-twice" and step >= 6:
                say("sleeping after step", step)  # hook.step() is done: no boundary for 0.5 s
                time.sleep(0.5)
            time.sleep(0.005)
    say("after the with block")
    """
)


def last_step(proc: TrialProcess) -> int:
    return max(int(line.split()[1]) for line in proc.lines() if line.startswith("step "))


def checkpoints(root: str) -> dict[str, tuple[str, int, str | None]]:
    manager = CheckpointManager(root)
    assert all(result.ok for result in manager.verify()), manager.verify()
    return {i.name: (i.type, i.step, i.description) for i in manager.list()}


def run_until(spawner: TrialSpawner, root: str, ending: str, line: str = "step 3") -> TrialProcess:
    proc = spawner.spawn(LOOP, root, ending)
    proc.wait_for(line, timeout=60)
    return proc


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("ending", "signum"), [("sigterm", signal.SIGTERM), ("usr1", signal.SIGUSR1)])
def test_a_signal_saves_a_final_checkpoint_at_the_step_reached_then_ends_the_process_as_it_would(
        spawner: TrialSpawner, tmp_path: Path, request: pytest.FixtureRequest, backend: str, ending: str,
        signum: int):
    root = make_root(backend, tmp_path, request)
    proc = run_until(spawner, root, ending, "step 6")
    os.kill(proc.pid, signum)
    assert proc.wait(60) == -signum, proc.describe()  # died of the signal, as without the hook
    reached, name = last_step(proc), signal.Signals(signum).name
    saved = checkpoints(root)
    assert saved[f"checkpoint-{reached}"] == ("final", reached, f"stopped by {name} at step {reached}")
    assert "after the with block" not in proc.stdout()
    assert f"received {name}: saving a final checkpoint at step {reached}" in proc.stderr()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigterm_during_a_background_save_keeps_it_and_saves_the_final_one(
        spawner: TrialSpawner, tmp_path: Path, request: pytest.FixtureRequest, backend: str):
    root = make_root(backend, tmp_path, request)
    proc = run_until(spawner, root, "async", "returned checkpoint-5")  # step() returned; files still being written
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(60) == -signal.SIGTERM, proc.describe()
    reached = last_step(proc)
    saved = checkpoints(root)
    assert saved["checkpoint-5"][:2] == ("automatic", 5)  # the save in flight was committed first
    final = ("final", reached, f"stopped by SIGTERM at step {reached}")
    assert saved[f"checkpoint-{reached}"] == final, proc.describe()
    lines = proc.lines()
    written_before = sum(1 for line in lines[: lines.index(f"step {reached}")] if line.startswith("writing"))
    files = len(CheckpointManager(root).get("checkpoint-5").files)
    assert written_before < files, "the background save had ended before the signal; the test proves nothing"


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_ctrl_c_saves_a_final_checkpoint_then_raises_keyboard_interrupt(
        spawner: TrialSpawner, tmp_path: Path, request: pytest.FixtureRequest, backend: str):
    root = make_root(backend, tmp_path, request)
    proc = run_until(spawner, root, "sigint-once", "step 6")
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(60) != 0
    reached = last_step(proc)
    assert checkpoints(root)[f"checkpoint-{reached}"] == ("final", reached, f"stopped by SIGINT at step {reached}")
    assert "KeyboardInterrupt" in proc.stderr() and "after the with block" not in proc.stdout()


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_ctrl_c_interrupts_at_once_without_a_final_checkpoint(
        spawner: TrialSpawner, tmp_path: Path, request: pytest.FixtureRequest, backend: str):
    root = make_root(backend, tmp_path, request)
    proc = run_until(spawner, root, "sigint-twice", "sleeping after step 6")
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(0.1)  # the first is noted (the loop sleeps meanwhile) before the second comes
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(60) != 0
    reached = last_step(proc)
    saved = checkpoints(root)
    assert [s[0] for s in saved.values()] == ["automatic"] and max(s[1] for s in saved.values()) == 5, saved
    assert reached == 6 and "KeyboardInterrupt" in proc.stderr()
    assert "training ended with KeyboardInterrupt at step 6: no final checkpoint saved" in proc.stderr()


@pytest.mark.parametrize(("ending", "code", "final"), [
    ("exit", 3, ("final", 7, "training ended by sys.exit(3) at step 7")),
    ("break", 0, ("final", 7, "training ended at step 7")),
    ("crash", 1, None),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_leaving_the_with_block(spawner: TrialSpawner, tmp_path: Path, request: pytest.FixtureRequest, backend: str,
                                ending: str, code: int, final: tuple[str, int, str] | None):
    root = make_root(backend, tmp_path, request)
    proc = spawner.spawn(LOOP, root, ending)
    assert proc.wait(60) == code, proc.describe()
    saved = checkpoints(root)
    assert last_step(proc) == 7
    assert saved.get("checkpoint-7") == final
    if final is None:  # a crash: no checkpoint of the state that crashed, and the log says so
        assert "ValueError" in proc.stderr() and saved["checkpoint-5"][:2] == ("automatic", 5)
        assert "training ended with ValueError at step 7: no final checkpoint saved (the last one saved by " \
               "this run is checkpoint-5)" in proc.stderr()


def test_sigterm_during_the_final_save_of_a_finished_run_ends_the_process_after_it(spawner: TrialSpawner,
                                                                                    tmp_path: Path):
    root = str(tmp_path / "ckpts")
    proc = spawner.spawn(LOOP, root, "break-slow")
    proc.wait_for("step 7", timeout=60)
    deadline = time.monotonic() + 60
    while not any(line.startswith("writing") for line in proc.lines()[proc.lines().index("step 7"):]):
        assert proc.poll() is None and time.monotonic() < deadline, proc.describe()
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGTERM)  # the loop is over; end() is writing the final checkpoint
    assert proc.wait(60) == -signal.SIGTERM, proc.describe()
    assert checkpoints(root)["checkpoint-7"] == ("final", 7, "training ended at step 7")
    assert "after the with block" not in proc.stdout()


# --- HF Trainer -----------------------------------------------------------------------------------

HF_SCRIPT = textwrap.dedent(
    """
    import signal, sys, time
    from transformers import TrainerCallback
    from ckpt_callback import CheckpointCallback
    from test_hf import Blocks, tiny_tokenizer, tiny_trainer

    root, out, when = sys.argv[1], sys.argv[2], sys.argv[3]

    class Say(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            print("step", state.global_step, flush=True)
            time.sleep(0.02)

        def on_prediction_step(self, args, state, control, **kwargs):
            print("predicting at step", state.global_step, flush=True)
            time.sleep(0.05)

    callback = CheckpointCallback(root, keep_last=2, check_requests_every=0.2,
                                  save_on_signals=(signal.SIGTERM, signal.SIGUSR1))
    trainer = tiny_trainer(out, [Say(), callback], max_steps=100_000, eval_steps=10 if when == "eval" else 100_000,
                           save_steps=4)
    trainer.eval_dataset = Blocks(tiny_tokenizer(), 400)
    trainer.train()
    print("train() returned", flush=True)
    """
)


def start_hf(tmp_path: Path, name: str, when: str) -> tuple[subprocess.Popen[str], str, Path]:
    root, out = str(tmp_path / f"{name}-ckpts"), tmp_path / f"{name}.out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", HF_SCRIPT, root, str(tmp_path / f"{name}-out"), when],
                                stdout=f, stderr=subprocess.STDOUT, text=True, env=env)
    return proc, root, out


def wait_line(proc: subprocess.Popen[str], out: Path, prefix: str, timeout: float = 120) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = out.read_text().splitlines()
        if any(line.startswith(prefix) for line in lines):
            return lines
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {prefix!r} line:\n{out.read_text()[-4000:]}")
        time.sleep(0.02)


def test_hf_trainer_sigterm_after_a_request_sigusr1_during_evaluation_and_a_stop_request(tmp_path: Path):
    # The three runs at once: a fresh interpreter importing transformers is the slow part.
    term, term_root, term_out = start_hf(tmp_path, "term", "train")
    usr1, usr1_root, usr1_out = start_hf(tmp_path, "usr1", "eval")
    stop, stop_root, stop_out = start_hf(tmp_path, "stop", "train")
    try:
        wait_line(stop, stop_out, "step 5")
        final = CheckpointManager(stop_root).request(stop=True).wait(60)
        assert stop.wait(60) == 0, stop_out.read_text()[-3000:]
        wait_line(term, term_out, "step 3")
        asked = CheckpointManager(term_root).request(name="asked-mid-run", description="from the test").wait(60)
        wait_line(term, term_out, f"step {asked.step + 2}")
        term.send_signal(signal.SIGTERM)
        lines = wait_line(usr1, usr1_out, "predicting at step 10")
        usr1.send_signal(signal.SIGUSR1)
        assert term.wait(60) == -signal.SIGTERM, term_out.read_text()[-3000:]
        assert usr1.wait(60) == -signal.SIGUSR1, usr1_out.read_text()[-3000:]
    finally:
        for proc in (term, usr1, stop):
            if proc.poll() is None:
                proc.kill()
    # SIGTERM between steps: the final checkpoint is the step reached, and the request got its own
    lines = term_out.read_text().splitlines()
    reached = max(int(line.split()[1]) for line in lines if line.startswith("step "))
    saved = checkpoints(term_root)
    assert saved[f"checkpoint-{reached}"] == ("final", reached, f"stopped by SIGTERM at step {reached}")
    assert saved["asked-mid-run"][0] == "manual" and asked.type == "manual" and asked.step < reached
    assert "train() returned" not in lines
    # SIGUSR1 during the evaluation at step 10: saved there, mid-evaluation, no step 11
    lines = usr1_out.read_text().splitlines()
    assert "step 11" not in lines and lines.count("step 10") == 1
    saved = checkpoints(usr1_root)
    assert saved["checkpoint-10"] == ("final", 10, "stopped by SIGUSR1 at step 10")
    assert CheckpointManager(usr1_root).get("final").inference_ready
    # a stop request: the final checkpoint at the step reached, then train() returns
    lines = stop_out.read_text().splitlines()
    reached = max(int(line.split()[1]) for line in lines if line.startswith("step "))
    assert lines[-1] == "train() returned" and (final.type, final.step) == ("final", reached)
    assert checkpoints(stop_root)[final.name][2].startswith("stopped by ckpt request req-")


# --- torchrun ---------------------------------------------------------------------------------------

TORCHRUN_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import torch
    import torch.distributed as dist
    from torch import nn
    from ckpt_callback import CheckpointHook

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    with open(os.path.join(os.environ["REPORT_DIR"], f"pid-{rank}"), "w") as f:
        f.write(str(os.getpid()))
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    out = open(os.path.join(os.environ["REPORT_DIR"], f"steps-{rank}"), "w")
    with CheckpointHook(sys.argv[1], model, optimizer=opt, every_n_steps=5, keep_last=2,
                        check_requests_every=0.1, async_save=sys.argv[2] == "async") as hook:
        for step in range(1, 100_000):
            loss = model(torch.randn(4, 8)).pow(2).mean()
            loss.backward(); opt.step(); opt.zero_grad()
            out.write(f"{step}\\n"); out.flush()
            hook.step(step, loss=loss.item())
            time.sleep(0.01 * rank)  # rank 1 is slower: the ranks do not reach a step together
    """
)


@pytest.mark.parametrize("who", ["one", "all"])
def test_sigterm_under_torchrun_stops_every_rank_at_the_same_step(tmp_path: Path, who: str):
    # SIGTERM to rank 1 only, with background saves; or to both ranks, after a request all ranks served
    from test_distributed import LAUNCH, kill_launch

    script, root = tmp_path / "train.py", str(tmp_path / "ckpts")
    script.write_text(TORCHRUN_SCRIPT)
    launch = uuid.uuid4().hex[:8]
    reports = tmp_path / "reports"
    reports.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "REPORT_DIR": str(reports), LAUNCH: launch}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), root, "async" if who == "one" else "sync"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not all((reports / f"steps-{r}").is_file() and len((reports / f"steps-{r}").read_text().split()) >= 8
                      for r in (0, 1)):
            assert proc.poll() is None and time.monotonic() < deadline, kill_launch(proc, launch)[-4000:]
            time.sleep(0.05)
        asked, asked_id = None, ""
        if who == "all":  # a request first: rank 0 takes it, both ranks save it at the same step
            ask = CheckpointManager(root).request(name="asked")
            asked, asked_id = ask.wait(60), ask.id
        pids = [int((reports / f"pid-{r}").read_text()) for r in ((1,) if who == "one" else (0, 1))]
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    except BaseException:
        kill_launch(proc, launch)
        raise
    reached = [int((reports / f"steps-{r}").read_text().split()[-1]) for r in (0, 1)]
    assert reached[0] == reached[1], (reached, output[-3000:])  # no rank went on
    saved = checkpoints(root)
    assert saved[f"checkpoint-{reached[0]}"] == ("final", reached[0], f"stopped by SIGTERM at step {reached[0]}")
    assert "exitcode  : -15" in output and proc.returncode != 0  # ended as SIGTERM ends a worker
    if asked is not None:
        assert saved["asked"][:2] == ("manual", asked.step) and asked.step < reached[0]
        assert saved["asked"][2] == f"requested by ckpt request {asked_id} at step {asked.step}"
    leftovers = [p.name for p in Path(root).iterdir() if not (p / "checkpoint.json").is_file()]
    assert leftovers in ([], [".ckpt-requests"]), leftovers


# --- the handler itself (in this process, with SIGUSR1) ----------------------------------------------


def test_the_handler_notes_chains_the_previous_one_and_restores_it():
    from ckpt_callback._signals import SignalWatch

    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        user = signal.getsignal(signal.SIGUSR1)
        watch = SignalWatch([signal.SIGUSR1])
        watch.install()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watch.received == signal.SIGUSR1 and seen == [signal.SIGUSR1]  # noted, and theirs still ran
        watch.restore()
        assert signal.getsignal(signal.SIGUSR1) is user
        with pytest.raises(SystemExit) as stopped:  # theirs ran already; the run ends as a signalled one
            watch.stop(signal.SIGUSR1)
        assert stopped.value.code == 128 + signal.SIGUSR1

        again = SignalWatch([signal.SIGUSR1])
        again.install()
        mine = signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # the user takes the signal over after us
        again.restore()
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL and mine == again._handle  # theirs is kept
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_an_ignored_signal_is_left_alone_and_a_thread_installs_nothing(caplog: pytest.LogCaptureFixture):
    import threading

    from ckpt_callback._signals import SignalWatch

    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        SignalWatch([signal.SIGUSR1]).install()
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, previous)
    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=lambda: SignalWatch([signal.SIGTERM]).install())
    with caplog.at_level("WARNING", logger="ckpt_callback"):
        thread.start()
        thread.join()
    assert signal.getsignal(signal.SIGTERM) == before
    assert "only be installed from the main thread" in caplog.text
