"""Several writers, deleters and pruners on one root, on a local folder and on a real S3 server.

Training-loop calls (`CheckpointHook.step`, `evaluate`) must never raise, whatever another process
does to the root; only `end()`, a manual `save()` and `resume()` may. Each trial counts the
exceptions that escape them (must be 0) and the listed checkpoints that do not verify (must be 0).

``CKPT_CONCURRENCY_SECONDS`` sets how long the two-process runs last (default 5; .ci/run: 10) and
``CKPT_RACE_TRIALS`` how many uploads are raced by a pruner (default 3; .ci/run: 8).
"""

from __future__ import annotations

import json
import os
import random
import textwrap
import time
import uuid
import warnings
from pathlib import Path

import pytest
import torch

from ckpt_callback import CheckpointError, CheckpointHook, CheckpointManager, CheckpointWarning
from conftest import CLOUD_BACKENDS, EMULATOR_FULL, EMULATORS, TrialSpawner, make_root, root_fs, trials_on

SECONDS = float(os.environ.get("CKPT_CONCURRENCY_SECONDS", "5"))
RACE_TRIALS = int(os.environ.get("CKPT_RACE_TRIALS", "3"))
BACKENDS = ["local", *CLOUD_BACKENDS]  # on the GCS and Azure emulators: bounded (conftest.trials_on)
ALL_BACKENDS = ["local", "memory", *CLOUD_BACKENDS]


def seconds_on(backend: str) -> float:
    """How long a two-process run lasts: `SECONDS`; on an emulator at most 4 s (unless CKPT_EMULATOR_FULL=1)."""
    return min(SECONDS, 4.0) if backend in EMULATORS and not EMULATOR_FULL else SECONDS

COMMON = textwrap.dedent(
    """
    import json, os, random, sys, time, warnings
    import torch
    from torch import nn
    from ckpt_callback import CheckpointHook, CheckpointManager, CheckpointWarning

    warnings.simplefilter("ignore", CheckpointWarning)

    def say(*words):  # one write per line: a background save's thread prints too
        sys.stdout.write(" ".join(map(str, words)) + "\\n"); sys.stdout.flush()

    def wait_for_file(path):
        while not os.path.exists(path):
            time.sleep(0.01)

    escaped = []

    def guarded(call, *args, **kwargs):
        # A training-loop call: it must not raise. Count what escapes and go on.
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            first_line = str(exc).splitlines()[0][:300] if str(exc) else ""
            escaped.append(f"{call.__name__}: {type(exc).__name__}: {first_line}")
            return None
    """
)

# A training loop with a hook saving every step, evaluating every step, a manual save every 5.
TRAINER = COMMON + textwrap.dedent(
    """
    root, seconds, tag, go = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    hook = CheckpointHook(root, net, optimizer=opt, every_n_steps=1, keep_last=2)
    say("ready")
    wait_for_file(go)
    raised = []  # by the calls that may raise: manual save, end
    calls = step = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        step += 1
        net(torch.randn(8, 64)).pow(2).mean().backward()
        opt.step(); opt.zero_grad()
        guarded(hook.step, step, loss=random.random())
        guarded(hook.evaluate, step, eval_loss=random.random(), metrics={"accuracy": random.random()})
        calls += 2
        if step % 5 == 0:
            try:
                hook.save(name=f"manual-{tag}-{step}")
            except Exception as exc:
                raised.append(f"save: {type(exc).__name__}: {exc}")
    try:
        hook.end()
    except Exception as exc:
        raised.append(f"end: {type(exc).__name__}: {exc}")
    say("result", json.dumps({"steps": step, "calls": calls, "escaped": escaped, "raised": raised}))
    """
)

# Deletes and prunes checkpoints of the root in a loop: in this process and with the ckpt command.
DELETER = COMMON + textwrap.dedent(
    """
    import subprocess
    root, stop = sys.argv[1], sys.argv[2]
    ckpt = os.path.join(os.path.dirname(sys.executable), "ckpt")
    say("ready")
    counts = {"rounds": 0, "deleted": 0, "pruned": 0, "cli": 0, "errors": 0}
    cli = None
    while not os.path.exists(stop):
        counts["rounds"] += 1
        manager = CheckpointManager(root, keep_last=2)
        try:
            names = [i.name for i in manager.list()]
            if not names:
                time.sleep(0.01)
                continue
            what = random.random()
            if what < 0.3:
                counts["pruned"] += len(manager.prune(keep_last=random.choice([0, 1])))
            elif what < 0.8 or (cli is not None and cli.poll() is None):
                manager.delete(random.choice(names))
                counts["deleted"] += 1
            else:
                cli = subprocess.Popen([ckpt, "delete", root, random.choice(names), "--yes"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                counts["cli"] += 1
        except Exception as exc:
            counts["errors"] += 1  # the deleter may lose races (already deleted): not a training loop
            counts["last error"] = f"{type(exc).__name__}: {exc}"[:200]
        time.sleep(random.uniform(0, 0.05))
    if cli is not None:
        cli.wait()
    say("result", json.dumps(counts))
    """
)


def bad_listed(root: str) -> list[str]:
    """Listed checkpoints that do not verify or load, with warnings (malformed sidecars) as errors."""
    bad = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        manager = CheckpointManager(root)
        try:
            infos = list(manager.list())
        except Exception as exc:
            return [f"list() raised {type(exc).__name__}: {exc}"]
        for info in infos:
            try:
                problems = manager.verify(info.name)[0].problems
                if not problems:
                    manager.load(info.name)
            except Exception as exc:
                problems = [f"{type(exc).__name__}: {exc}"]
            if problems:
                bad.append(f"{info.name} ({info.type}): {problems}")
    return bad


def result(proc) -> dict:
    line = proc.wait_for("result ", timeout=120)
    assert proc.wait() == 0, proc.describe()
    return json.loads(line.split(" ", 1)[1])


# Lists the root in a loop, as `ckpt list` or a dashboard would while runs write to it: must never fail.
READER = COMMON + textwrap.dedent(
    """
    root, stop = sys.argv[1], sys.argv[2]
    say("ready")
    kept = CheckpointManager(root)
    rounds, failed = 0, []
    while not os.path.exists(stop):
        rounds += 1
        for manager in (CheckpointManager(root), kept):
            try:
                manager.list()
            except Exception as exc:
                failed.append(f"list: {type(exc).__name__}: {str(exc)[:300]}")
        time.sleep(0.01)
    say("result", json.dumps({"rounds": rounds, "failed": failed}))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_training_runs_sharing_a_root(backend: str, spawner: TrialSpawner, tmp_path: Path,
                                          request: pytest.FixtureRequest):
    root = make_root(backend, tmp_path, request)
    go, stop = tmp_path / "go", tmp_path / "stop"
    seconds = seconds_on(backend)
    runs = [spawner.spawn(TRAINER, root, str(seconds), tag, str(go)) for tag in ("a", "b")]
    for run in runs:
        run.wait_for("ready")
    reader = spawner.spawn(READER, root, str(stop))
    reader.wait_for("ready")
    go.touch()  # both step through the same step numbers at the same time
    results = [result(run) for run in runs]
    stop.touch()
    read = result(reader)
    escaped = [e for r in results for e in r["escaped"]]
    bad = bad_listed(root)
    print(f"\ntwo writers on one {backend} root for {seconds:.0f} s: "
          f"{sum(r['calls'] for r in results)} training-loop calls, escaped exceptions {len(escaped)}, "
          f"bad listed {len(bad)}, raised by manual save/end {sum(len(r['raised']) for r in results)}; "
          f"a reader's list() failed {len(read['failed'])} times in {2 * read['rounds']}")
    for line in (escaped[:10] + bad[:10] + [x for r in results for x in r["raised"]][:5] + read["failed"][:5]):
        print("  ", line)
    assert escaped == []
    assert bad == []
    assert read["failed"] == [], "list() must not fail while other processes write the root"


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_deleting_and_pruning_during_a_run(backend: str, spawner: TrialSpawner, tmp_path: Path,
                                           request: pytest.FixtureRequest):
    root = make_root(backend, tmp_path, request)
    go, stop = tmp_path / "go", tmp_path / "stop"
    seconds = seconds_on(backend)
    trainer = spawner.spawn(TRAINER, root, str(seconds), "a", str(go))
    trainer.wait_for("ready")
    deleter = spawner.spawn(DELETER, root, str(stop))
    deleter.wait_for("ready")
    go.touch()
    trained = result(trainer)
    stop.touch()
    deletes = result(deleter)
    bad = bad_listed(root)
    print(f"\ndeletes during a run on {backend} for {seconds:.0f} s: {trained['calls']} training-loop calls, "
          f"escaped exceptions {len(trained['escaped'])}, bad listed {len(bad)}; deleter: {deletes}")
    for line in trained["escaped"][:10] + bad[:10]:
        print("  ", line)
    assert trained["escaped"] == []
    assert bad == []


# Process A saves a ~100 MB manual checkpoint; process B prunes, cleans up and saves during the upload.
UPLOADER = COMMON + textwrap.dedent(
    """
    root, go = sys.argv[1], sys.argv[2]
    state = {f"w{i}": torch.full((1 << 20,), float(i)) for i in range(25)}  # 25 x 4 MiB
    manager = CheckpointManager(root, max_shard_size="10MB")  # shards: files complete one after another
    say("ready")
    wait_for_file(go)
    say("saving")
    try:
        info = manager.save(state, step=1, type="manual", name="big")
        say("committed", info.name, info.id)
    except Exception as exc:
        say("failed", type(exc).__name__, str(exc).replace("\\n", " ")[:500])
    """
)

INTRUDER = COMMON + textwrap.dedent(
    """
    root, go, stop = sys.argv[1], sys.argv[2], sys.argv[3]
    say("ready")
    wait_for_file(go)
    rounds = 0
    while not os.path.exists(stop) and rounds < 500:
        rounds += 1
        manager = CheckpointManager(root, keep_last=1)  # a new process's first save cleans up first
        for what, call in (("save", lambda: manager.save({"x": torch.ones(4)}, step=100 + rounds)),
                           ("prune", lambda: manager.prune(keep_last=0)),
                           ("cleanup_incomplete", manager.cleanup_incomplete)):
            try:
                call()
            except Exception as exc:
                say("error", what, type(exc).__name__, str(exc).replace("\\n", " ")[:300])
    say("rounds", rounds)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_prune_and_cleanup_never_remove_another_process_upload(backend: str, spawner: TrialSpawner, tmp_path: Path,
                                                               request: pytest.FixtureRequest):
    failures = []
    trials = trials_on(backend, RACE_TRIALS)
    for trial in range(trials):
        root = make_root(backend, tmp_path / f"t{trial}", request)
        go_a, go_b, stop = (tmp_path / f"{x}-{trial}" for x in ("go-a", "go-b", "stop"))
        a = spawner.spawn(UPLOADER, root, str(go_a))
        b = spawner.spawn(INTRUDER, root, str(go_b), str(stop))
        a.wait_for("ready")
        b.wait_for("ready")
        go_a.touch()
        a.wait_for("saving")
        fs, path = root_fs(root, request)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until A has something on storage: its upload is under way
            fs.invalidate_cache()
            if fs.exists(path) and fs.find(path):
                break
            time.sleep(0.005)
        time.sleep(random.uniform(0, 0.2))
        go_b.touch()
        a.wait(timeout=120)
        stop.touch()
        b.wait(timeout=120)
        outcome = [line for line in a.lines() if line.startswith(("committed", "failed"))]
        if not outcome or not outcome[0].startswith("committed"):
            failures.append(f"trial {trial}: A's save did not commit: {outcome or a.describe()}")
            continue
        problems = CheckpointManager(root).verify("big")[0].problems
        if problems:
            failures.append(f"trial {trial}: A's committed checkpoint is damaged: {problems}")
    print(f"\nprune/cleanup/first save during another process's upload to {backend}: {trials} trials, "
          f"uploads lost or damaged {len(failures)}")
    for line in failures:
        print("  ", line[:600])
    assert failures == []


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_prune_during_this_process_background_commit(backend: str, tmp_path: Path, request: pytest.FixtureRequest):
    root = make_root(backend, tmp_path, request)
    CheckpointManager(root).save({"x": torch.ones(2)}, step=0)  # the root exists before the first prune
    manager = CheckpointManager(root, keep_last=1, async_save=True)
    damaged = []
    trials = 3
    for trial in range(trials):
        state = {f"w{i}": torch.full((1 << 20,), float(trial * 100 + i)) for i in range(12)}  # 48 MiB
        name = f"checkpoint-{trial + 1}"
        manager.save(state, step=trial + 1)
        deadline = time.monotonic() + 20
        prunes = 0
        while time.monotonic() < deadline:  # prune until the background save has committed
            manager.prune(keep_last=0)
            prunes += 1
            if name in {i.name for i in manager.list()}:
                break
        try:
            manager.wait()
            problems = CheckpointManager(root).verify(name)[0].problems
        except CheckpointError as exc:
            problems = [f"{type(exc).__name__}: {exc}"]
        if problems:
            fs, path = root_fs(root, request)
            fs.invalidate_cache()
            files = sorted(f.rsplit("/", 1)[-1] for f in fs.find(f"{path}/{name}"))
            damaged.append(f"{name} (after {prunes} prunes; files in its folder {files}): {problems}")
    try:
        manager.close()
    except CheckpointError as exc:
        damaged.append(f"close(): {type(exc).__name__}: {exc}")
    print(f"\nprune() during a background commit on {backend}: {trials} saves, lost or damaged {len(damaged)}")
    for line in damaged:
        print("  ", line[:500])
    assert damaged == []


def _copy_folder(root: str, source: str, target: str, request: pytest.FixtureRequest) -> None:
    """Copy a checkpoint folder file by file with literal paths (a user's copy, behind the library's back)."""
    fs, path = root_fs(root, request)
    fs.makedirs(f"{path}/{target}", exist_ok=True)
    for found in fs.find(f"{path}/{source}"):
        rel = found[len(f"{path}/{source}/"):]
        data = fs.cat_file(found)
        if rel == "checkpoint.json":
            doc = json.loads(data)
            doc["name"], doc["id"] = target, str(uuid.uuid4())
            data = json.dumps(doc).encode()
        fs.pipe_file(f"{path}/{target}/{rel}", data)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_delete_takes_a_name_literally_never_as_a_glob(backend: str, tmp_path: Path, request: pytest.FixtureRequest):
    root = make_root(backend, tmp_path, request)
    manager = CheckpointManager(root, keep_last=None)
    for name in ("exp1", "exp2"):
        manager.save({"w": torch.ones(1000)}, step=1, type="manual", name=name)
    _copy_folder(root, "exp1", "exp[12]", request)  # copied in by hand: save() refuses such names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)  # list() may skip 'exp[12]' as a bad name
        assert {"exp1", "exp2"} <= {i.name for i in manager.list()}
        try:
            manager.delete("exp[12]")
            deleted = True
        except CheckpointError:  # refusing the name is fine; deleting anything else is not
            deleted = False
        left = {i.name for i in manager.list()}
        problems = {r.name: r.problems for r in manager.verify() if r.name in ("exp1", "exp2")}
    assert {"exp1", "exp2"} <= left and problems == {"exp1": [], "exp2": []}
    if deleted:
        assert "exp[12]" not in left
        fs, path = root_fs(root, request)
        fs.invalidate_cache()
        assert not [f for f in fs.find(path) if "/exp[12]/" in f], "delete('exp[12]') left files behind"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_root_with_glob_characters_is_literal(backend: str, tmp_path: Path, request: pytest.FixtureRequest):
    base = make_root(backend, tmp_path, request)
    plain, magic = f"{base}/run-a", f"{base}/run-[ab]"
    CheckpointManager(plain).save({"w": torch.ones(10)}, step=1)
    manager = CheckpointManager(magic, keep_last=3)
    for step in (1, 2, 3):
        manager.save({"w": torch.full((10,), float(step))}, step=step)
    manager.delete("checkpoint-2")
    manager.prune(keep_last=0)
    assert [i.name for i in manager.list()] == ["checkpoint-3"]
    other = CheckpointManager(plain)
    assert [i.name for i in other.list()] == ["checkpoint-1"] and other.verify()[0].ok


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_name_freed_by_retention_or_delete_can_be_saved_again(backend: str, tmp_path: Path,
                                                               request: pytest.FixtureRequest):
    root = make_root(backend, tmp_path, request)
    torch.manual_seed(0)
    net = torch.nn.Linear(16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        hook = CheckpointHook(root, net, every_n_steps=1, keep_last=1)
        assert hook.step(1, loss=1.0) is not None
        assert hook.step(2, loss=0.9) is not None  # retention deletes checkpoint-1: its prefix empties
        assert [i.name for i in hook.manager.list()] == ["checkpoint-2"]
        hook.manager.close()

        rerun = CheckpointHook(root, net, every_n_steps=1, keep_last=2)  # a rerun, no resume
        assert rerun.step(1, loss=1.0) is not None, "the scheduled save at step 1 was not saved"
        rerun.manager.close()
        manager = CheckpointManager(root, keep_last=None)
        assert "checkpoint-1" in {i.name for i in manager.list()}
        assert manager.verify("checkpoint-1")[0].problems == []
        assert manager.save(net, step=1).name == "checkpoint-1"  # and once more (a replace), by the manager

        manager.save(net, step=5, type="manual", name="keeper")
        manager.delete("keeper")
        assert manager.save(net, step=6, type="manual", name="keeper").step == 6
    assert [(r.name, r.problems) for r in manager.verify() if not r.ok] == []


@pytest.mark.s3
def test_a_missing_bucket_is_an_error_and_is_not_created(s3_server, tiny_net):
    def attempt(what: str, call) -> str:
        bucket = f"no-such-bucket-xyz-{uuid.uuid4().hex[:8]}"
        try:
            call(f"s3://{bucket}/run")
            raised = "did not raise"
        except CheckpointError:
            raised = "raised a CheckpointError"
        status, _ = s3_server._s3_request("HEAD", f"/{bucket}")
        return f"{what} {raised}, " + ("bucket not created" if status == 404 else f"bucket created (HEAD {status})")

    outcomes = [
        attempt("CheckpointHook()", lambda url: CheckpointHook(url, tiny_net, every_n_steps=1)),
        attempt("CheckpointManager.save()", lambda url: CheckpointManager(url).save({"w": torch.ones(2)}, step=1)),
    ]
    assert outcomes == [f"{what} raised a CheckpointError, bucket not created"
                        for what in ("CheckpointHook()", "CheckpointManager.save()")]
