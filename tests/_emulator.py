"""A throw-away storage emulator process on a free loopback port (base of _gcsserver and _azurite).

The server runs in its own process group with a private temporary data folder; its output goes
to ``<tmp>/server.log``. ``kill()`` is a SIGKILL (a crash), ``restart()`` starts again on the same
port with the same data, ``close()`` stops it and deletes the folder. Only the standard library.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

HOST = "127.0.0.1"


def _die_with_parent() -> None:  # in the child between fork and exec: go away with the test process
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class EmulatorError(RuntimeError):
    """The emulator could not be started."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def http_status(port: int, method: str, path: str, headers: dict[str, str] | None = None,
                body: bytes = b"", timeout: float = 5.0) -> int:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


class LoopbackServer:
    """Subclasses give `name`, `command()` and `ready()`."""

    name = "emulator"
    startup_timeout = 60.0

    def __init__(self) -> None:
        self.tmp: Path | None = None
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    @property
    def data_dir(self) -> Path:
        assert self.tmp is not None
        return self.tmp / "data"

    @property
    def log_path(self) -> Path:
        assert self.tmp is not None
        return self.tmp / "server.log"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except (OSError, AssertionError):
            return "<no log>"

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> LoopbackServer:
        if self.is_running():
            return self
        if self.tmp is None:
            self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
            self.data_dir.mkdir()
            self.port = free_port()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), cwd=self.tmp, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True, env=self.env(),
                                         preexec_fn=_die_with_parent)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise EmulatorError(f"{self.name} exited with {self.proc.returncode} at start:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                if self.ready():
                    return self
            if time.monotonic() > deadline:
                self.kill()
                raise EmulatorError(f"{self.name} not ready after {self.startup_timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def _signal(self, sig: int, timeout: float) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the server (a crash); the data folder stays."""
        self._signal(signal.SIGKILL, 10)

    def stop(self) -> None:
        self._signal(signal.SIGTERM, 10)

    def restart(self) -> LoopbackServer:
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
