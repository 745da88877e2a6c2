"""Real SIGKILLs at random moments, on a local folder and on a real S3 server.

Each trial runs a writer in its own process and SIGKILLs it at a random moment. The writer prints
``committed <name> <id> <type> <step>`` (flushed) right after a save returned its `CheckpointInfo` (for
background saves: after ``wait()`` returned it). Then, with warnings as errors:

- bad listed: listed checkpoints that fail ``verify()`` or ``load()``; must be 0.
- lost committed: the last committed checkpoint before the kill, if no checkpoint of that name is
  listed (a replaced name counts as present if some version of it is) and no newer one either
  (committed after it, by a process killed before it could say so, retention may keep that one
  instead), plus every committed manual checkpoint that is not listed; must be 0. This is what a
  reader sees before any writer ran its recovery (``ckpt list``, a resume, a dashboard); the
  summary also says how many of them a new writer brings back.
- a new writer (``cleanup_incomplete()`` or a new hook's first save) leaves no folder without a
  sidecar behind.

Modes: ``sync`` and ``async`` saves (with manual ones), ``replace`` (every save rewrites the same
step, with a fresh manager or hook each time, as a rerun or a rollback does), ``prune`` (a writer
keeps saving while the killed process prunes and deletes in a loop), ``metrics`` (``evaluate()``
rewrites sidecars and moves the best tag), ``frozen`` (as ``sync``, with a frozen base whose shard
file each save shares with the committed ones; the ``prune`` writer's model has it too, so the
pruner deletes checkpoints whose data others share).

Every other replace and prune trial aims its kill into an operation (a save, a prune, a delete)
instead of a uniformly random moment. ``CKPT_KILL_TRIALS`` sets the trials per mode and backend
(default 2; .ci/run also runs 10 per mode on local and S3 as a later step); e.g. CKPT_KILL_TRIALS=100.
"""

from __future__ import annotations

import os
import random
import textwrap
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from ckpt_callback import CheckpointHook, CheckpointManager, CheckpointNotFoundError
from conftest import CLOUD_BACKENDS, TrialProcess, TrialSpawner, make_root, root_fs, sidecarless_folders, trials_on

TRIALS = int(os.environ.get("CKPT_KILL_TRIALS", "2"))
MODES = ["sync", "async", "replace", "prune", "metrics", "frozen"]
BACKENDS = ["local", *CLOUD_BACKENDS]  # on the GCS and Azure emulators: CKPT_EMULATOR_TRIALS per mode
# How long a writer runs on after its first commit before the kill, at most (object stores are slower).
RUN_SECONDS = {"local": 0.6, "s3": 1.2, "gcs": 1.2, "azure": 1.2}
# Every other replace/prune trial aims the kill into an operation: at most this long after it starts.
OP_SECONDS = {"replace": {"local": 0.04, "s3": 0.4, "gcs": 0.4, "azure": 0.4},
              "prune": {"local": 0.01, "s3": 0.15, "gcs": 0.15, "azure": 0.15}}

COMMON = textwrap.dedent(
    """
    import random, sys, time, warnings
    import torch
    from torch import nn
    from ckpt_callback import CheckpointHook, CheckpointManager, CheckpointWarning

    warnings.simplefilter("ignore", CheckpointWarning)  # "replacing checkpoint ...": expected here

    def say(*words):  # one write per line: a background save's thread prints too
        sys.stdout.write(" ".join(map(str, words)) + "\\n"); sys.stdout.flush()

    def model():
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)])  # 16 tensors, ~2 MB

    def guarded(call, *args, **kwargs):
        # Training-loop calls must not raise; if one does, say so and go on.
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            say("escaped", getattr(call, "__name__", "?"), type(exc).__name__, str(exc).replace("\\n", " ")[:300])
            return None

    def committed(info):
        if info is not None:
            say("committed", info.name, info.id, info.type, info.step)

    def train(net):
        with torch.no_grad():
            for p in net.parameters():
                if p.requires_grad:
                    p.add_(0.01)
    """
)

# sync / async / metrics: a training loop with a hook saving every step, and a manual save every 5.
LOOP = COMMON + textwrap.dedent(
    """
    mode, root = sys.argv[1], sys.argv[2]
    net = model()
    if mode in ("frozen", "prune"):  # a frozen base: its shard is hard-linked (local) from save to save
        net[:4].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad])
    hook = CheckpointHook(root, net, optimizer=opt, every_n_steps=1, keep_last=2, async_save=mode == "async")
    say("ready")
    step = 0
    while True:
        step += 1
        train(net)
        if mode == "async":
            committed(guarded(hook.wait))  # the previous step's background save
        info = guarded(hook.step, step, loss=random.random())
        if mode != "async":
            committed(info)
        if mode == "metrics":
            guarded(hook.evaluate, step, eval_loss=random.random())  # rewrites the sidecar, may move best
            if step > 1:
                guarded(hook.evaluate, step - 1, eval_loss=random.random())
        if step % 5 == 0:
            try:
                info = hook.save(name=f"manual-{step}")
                if mode == "async":
                    info = hook.wait()
                committed(info)
            except Exception as exc:
                say("manual-failed", type(exc).__name__, str(exc).replace("\\n", " ")[:300])
    """
)

# replace: the same step saved again and again, each time by a new manager or a new hook.
REPLACE = COMMON + textwrap.dedent(
    """
    root = sys.argv[2]
    net = model()
    say("ready")
    for i in range(1, 10**9):
        with torch.no_grad():
            for p in net.parameters():
                p.fill_(float(i))
        if i % 2:
            with CheckpointManager(root, keep_last=2) as manager:
                say("op save")
                committed(guarded(manager.save, net, step=7, train_loss=float(i)))
        else:
            hook = CheckpointHook(root, net, every_n_steps=1, keep_last=2)
            say("op save")
            committed(guarded(hook.step, 7, loss=float(i)))
            hook.manager.close()
    """
)

# prune: the process that is killed prunes and deletes in a loop, beside a writer (LOOP, sync).
PRUNER = COMMON + textwrap.dedent(
    """
    root = sys.argv[2]
    say("ready")
    while True:
        manager = CheckpointManager(root, keep_last=2)
        say("op prune")
        guarded(manager.prune, keep_last=1)
        page = guarded(manager.list, sort_by="step", order="desc")
        # Never the newest automatic one (what the writer committed last) nor a manual one.
        names = [i.name for i in page or [] if i.name.startswith("checkpoint-")][1:]
        if names:
            say("op delete")
            guarded(manager.delete, random.choice(names))
    """
)


@dataclass
class Tally:
    trials: int = 0
    killed: int = 0  # killed while running (not before it started or after it ended)
    commits: int = 0  # "committed" lines printed before the kills
    bad: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    still_lost: list[str] = field(default_factory=list)  # lost, and not brought back by a new writer either
    escaped: list[str] = field(default_factory=list)


def committed_lines(proc: TrialProcess) -> list[tuple[str, int]]:
    """(name, step) of each ``committed <name> <id> <type> <step>`` line."""
    return [(line.split()[1], int(line.split()[4])) for line in proc.lines() if line.startswith("committed ")]


def check_listed(root: str, trial: int, tally: Tally, expect: list[tuple[str, int]]) -> dict[str, int]:
    """What a reader sees after the crash: every listed checkpoint verifies and loads; nothing lost.

    Returns the lost ones: name -> step.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a malformed sidecar is a warning when listing: count it
        manager = CheckpointManager(root)
        try:
            infos = list(manager.list())
        except CheckpointNotFoundError:
            infos = []  # killed before anything reached storage
        except Exception as exc:
            tally.bad.append(f"trial {trial}: list() raised {type(exc).__name__}: {exc}")
            infos = []
        for info in infos:
            try:
                problems = manager.verify(info.name)[0].problems
            except Exception as exc:
                problems = [f"verify raised {type(exc).__name__}: {exc}"]
            if problems:
                tally.bad.append(f"trial {trial}: {info.name} ({info.type}) does not verify: {problems}")
                continue
            try:
                state = manager.load(info.name)
                if len(state) != 16 or not all(torch.isfinite(t).all() for t in state.values()):
                    tally.bad.append(f"trial {trial}: {info.name} loads wrong: {sorted(state)}")
            except Exception as exc:
                tally.bad.append(f"trial {trial}: {info.name} does not load: {type(exc).__name__}: {exc}")
    listed = {i.name for i in infos}
    # The last committed checkpoint may be gone only if retention or the pruner had a newer one to
    # keep instead (committed after it, killed before it was printed); manual ones never go.
    newest = max((i.step for i in infos if not i.name.startswith("manual-")), default=-1)
    must = {name for name, step in expect[-1:] if step >= newest}
    must |= {name for name, _ in expect if name.startswith("manual-")}
    for name in sorted(must - listed):
        tally.lost.append(f"trial {trial}: committed {name} is not listed (listed: {sorted(listed)})")
    return {name: step for name, step in expect if name in must - listed}


def new_writer_cleans_up(root: str, trial: int, tally: Tally, request: pytest.FixtureRequest,
                         lost: dict[str, int]) -> None:
    """A new writer's cleanup leaves no sidecar-less folder (and, for the record, brings back what it can)."""
    if trial % 2:
        CheckpointManager(root).cleanup_incomplete()
    else:
        torch.manual_seed(0)
        net = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
        hook = CheckpointHook(root, net, every_n_steps=1, keep_last=2)
        resumed = hook.resume()  # what a rerun would continue from
        if lost and resumed < max(lost.values()):
            tally.still_lost.append(f"trial {trial}: a new hook's resume() returned step {resumed}, "
                                    f"not the lost {sorted(lost)}")
        hook.step(1_000_000 + trial, loss=1.0)
        hook.manager.close()
    tally.leftovers += [f"trial {trial}: {folder}" for folder in sidecarless_folders(root, request)]
    if "://" in root:  # object stores: past the blob grace period, a cleanup frees every blob nothing names
        fs, path = root_fs(root, request)
        area = f"{path.rstrip('/')}/.ckpt-blobs"
        fs.invalidate_cache()
        if fs.exists(area):  # only savers of frozen tensors make blobs: the other modes skip the wait
            time.sleep(2.1)
            manager = CheckpointManager(root)
            manager.cleanup_incomplete()
            named = {f.blob for i in manager.list() for f in i.files if f.blob}
            fs.invalidate_cache()
            blobs = fs.find(area) if fs.exists(area) else []
        else:
            named, blobs = set(), []
        tally.leftovers += [f"trial {trial}: unreferenced {b.rsplit('/', 1)[-1]}" for b in blobs
                            if b.rsplit("/", 1)[-1] not in named]
    if lost:
        listed = {i.name for i in CheckpointManager(root).list()}
        tally.still_lost += [f"trial {trial}: {name} still not listed after a new writer"
                             for name in sorted(set(lost) - listed)]


def start_of_next_op(proc: TrialProcess) -> None:
    """Return as soon as ``proc`` says it starts another operation (an ``op ...`` line)."""
    seen = proc.stdout().count("\nop ")
    deadline = time.monotonic() + 30
    while proc.stdout().count("\nop ") <= seen and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.0005)


def run_trial(mode: str, backend: str, trial: int, rng: random.Random, spawner: TrialSpawner,
              tmp_path: Path, request: pytest.FixtureRequest, tally: Tally) -> None:
    root = make_root(backend, tmp_path / f"{mode}-{trial}", request)
    pause = rng.uniform(0.0, RUN_SECONDS[backend])
    if mode == "prune":
        writer = spawner.spawn(LOOP, "sync", root)
        writer.wait_for("ready")
        writer.wait_for("committed", timeout=60)  # something to prune
        killed = spawner.spawn(PRUNER, "prune", root)
        killed.wait_for("ready")
        time.sleep(pause)
        if trial % 2:
            start_of_next_op(killed)
            time.sleep(rng.uniform(0.0, OP_SECONDS[mode][backend]))
        tally.killed += killed.kill()
        time.sleep(rng.uniform(0.0, 0.2))
        writer.kill()
        procs = [killed, writer]
    else:
        writer = spawner.spawn(REPLACE if mode == "replace" else LOOP, mode, root)
        writer.wait_for("ready")
        if trial % 3:  # else the kill may also land in the first save, on an empty root
            writer.wait_for("committed", timeout=60)
        time.sleep(pause)
        if mode in OP_SECONDS and trial % 2:
            start_of_next_op(writer)
            time.sleep(rng.uniform(0.0, OP_SECONDS[mode][backend]))
        tally.killed += writer.kill()
        procs = [writer]
    for proc in procs:
        code = proc.wait()
        assert code == -9, f"the {mode} process died by itself (a test bug or a crash): {proc.describe()}"
    tally.escaped += [f"trial {trial}: {line}" for line in writer.lines() if line.startswith("escaped ")]
    tally.commits += len(committed_lines(writer))
    lost = check_listed(root, trial, tally, committed_lines(writer))
    new_writer_cleans_up(root, trial, tally, request, lost)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_sigkill_loses_nothing_committed_and_lists_nothing_bad(mode: str, backend: str, spawner: TrialSpawner,
                                                               tmp_path: Path, request: pytest.FixtureRequest,
                                                               monkeypatch: pytest.MonkeyPatch):
    # Shared blobs (object stores) unreferenced for 2 s are freed by every cleanup, so the trials
    # also kill savers and pruners while blobs are being freed (the default grace is 120 s).
    monkeypatch.setenv("CKPT_BLOB_GRACE_SECONDS", "2")
    rng = random.Random(f"{mode}-{backend}")
    tally = Tally()
    for trial in range(trials_on(backend, TRIALS)):
        tally.trials += 1
        run_trial(mode, backend, trial, rng, spawner, tmp_path, request, tally)
    print(f"\nSIGKILL {mode}/{backend}: {tally.trials} trials ({tally.killed} killed mid-run, "
          f"{tally.commits} commits before the kills), "
          f"bad listed {len(tally.bad)}, lost committed {len(tally.lost)} "
          f"(still lost after a new writer, or not resumed from: {len(tally.still_lost)}), "
          f"sidecar-less folders after a new writer {len(tally.leftovers)}, "
          f"exceptions escaped from training-loop calls {len(tally.escaped)}")
    for line in (tally.bad + tally.lost + tally.still_lost + tally.leftovers + tally.escaped)[:40]:
        print("  ", line)
    assert tally.bad == [], "listed checkpoints that do not verify or load"
    assert tally.lost == [], "committed checkpoints lost"
    assert tally.leftovers == [], "a new writer left folders without a sidecar"
