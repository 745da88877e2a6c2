"""All storage access: one fsspec filesystem object per root, literal paths, errors translated.

Everything goes through ``fsspec.url_to_fs(root, **storage_options)``; every call takes one
literal path (fsspec expands glob patterns in ``rm``/``copy``/``expand_path`` on some
backends, so those are never used). Local roots get deliberate fast paths: fsynced
(O_DIRECT) writes, atomic renames, one tree removal. How files become a checkpoint is
`_commit`'s business, not this module's.

Backend errors are translated here, in one place, into `StorageError` /
`CheckpointNotFoundError`, with any credential from ``storage_options`` scrubbed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import ctypes
import json
import logging
import mmap
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ._errors import CheckpointError, CheckpointNotFoundError, StorageError
from ._layout import STAGING_PREFIX, TMP_INFIX

__all__ = ["AZURE_DEFAULTS", "AZURE_RETRY", "GCS_REQUEST_ATTEMPTS", "S3_CONFIG_DEFAULTS", "UPLOAD_PART_SIZE", "Storage",
           "fsync_dir"]

logger = logging.getLogger("ckpt_callback")

UPLOAD_PART_SIZE = 6 << 20  # one multipart part (S3 minimum: 5 MiB); bounds upload memory
# Local checkpoint files are written with O_DIRECT (see _DirectFile); benchmarks/bench_save.py
# measures it against buffered writes + fsync (the ours_sync_buffered row).
DIRECT_IO = True
UPLOAD_PARTS_IN_FLIGHT = 6  # small parts, several in flight: fast on object stores, ~40 MB held
_SECRET_OPTIONS = ("key", "secret", "token", "password", "account_key", "sas_token", "connection_string",
                   "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "client_secret")
_NOT_SECRET = ("anon", "google_default", "cache", "cloud", "browser")  # gcsfs token= methods, not credentials
_TRANSIENT = (ConnectionError, TimeoutError)
T = TypeVar("T")


def _secrets(options: dict[str, Any]) -> list[str]:
    found: list[str] = []
    for key, value in options.items():
        if isinstance(value, dict):
            found += _secrets(value)
        elif isinstance(value, str) and len(value) >= 4 and key.lower() in _SECRET_OPTIONS \
                and value not in _NOT_SECRET:
            found.append(value)
    return found


# S3 client defaults where the caller set none: a wrong endpoint fails in seconds, not after
# botocore's 5 legacy attempts with 60 s connect timeouts; transient errors are retried by
# `Storage._call` (and botocore's standard mode, which backs off on throttling). 64 connections, not
# botocore's 10: the catalog reads every sidecar at once, and with a 20 ms round trip 1,000 of them
# took 3.3-4.2 s through 10 connections, 2.1-2.5 s through 64 (then bound by the client's CPU).
S3_CONFIG_DEFAULTS: dict[str, Any] = {"connect_timeout": 5, "retries": {"total_max_attempts": 3, "mode": "standard"},
                                      "max_pool_connections": 64}


# Google Cloud Storage (gcsfs). Every HTTP request gcsfs makes is retried by its own decorator, 6
# attempts with 1+2+4+8+16 s of sleep: a dead server took ~35 s per request, times `Storage._call`'s
# retries. We keep GCS_REQUEST_ATTEMPTS of them (a connection refused fails in ~2 s per request) and
# bound how long a silent server may hold a socket. gcsfs >= 2025.x also probes each bucket's type
# (zonal / hierarchical namespace) over gRPC before its first operation; against an emulator the
# probe cannot succeed and waited 60 s per operation (an UNKNOWN answer is not cached). The switch is
# `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT`, read once when gcsfs is imported (default "true"): for an
# emulator root it is set to "false" before that import, and the plain `gcsfs.core.GCSFileSystem`
# (no probe) is used even if gcsfs was imported earlier. Real GCS keeps gcsfs's own choice.
GCS_REQUEST_ATTEMPTS = 3
# One resumable-upload request (a multiple of 256 KiB); a file's chunks go one after another, so this
# is also the memory an upload holds. 50 MiB, as gcsfs's own put_file: at 16 MiB a 500 MB save took
# 2.3x as long as put_file on the emulator (it rewrites the partial object per chunk; real GCS pays a
# round trip per chunk).
GCS_UPLOAD_CHUNK = 50 << 20
CONNECT_TIMEOUT = 5  # seconds to open a connection (every backend where the driver lets us set it)
READ_TIMEOUT = 120  # seconds a server may stay silent on an open request before it counts as dead
_HNS_SWITCH = "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"

# Azure Blob (adlfs): bounded connection and read timeouts. The storage SDK's retry policy
# (ExponentialRetry: 15 s, then 15+3^n s between 3 retries) kept a dead server ~60 s per request and
# adlfs offers no option for it; AZURE_RETRY is set on the client's policy once adlfs made it.
AZURE_DEFAULTS: dict[str, Any] = {"connection_timeout": CONNECT_TIMEOUT, "read_timeout": READ_TIMEOUT}
AZURE_RETRY: dict[str, int] = {"total_retries": 2, "connect_retries": 1, "read_retries": 2, "initial_backoff": 1,
                               "increment_base": 2, "random_jitter_range": 1}


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def _with_defaults(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` plus this library's defaults for the root's driver (a value the caller gave wins)."""
    scheme = _scheme(url)
    if scheme in ("s3", "s3a"):
        config = dict(options.get("config_kwargs") or {})
        for key, value in copy.deepcopy(S3_CONFIG_DEFAULTS).items():  # botocore rewrites `retries` in place
            config.setdefault(key, value)
        options["config_kwargs"] = config
    elif scheme in ("gs", "gcs"):
        if "session_kwargs" not in options or "timeout" not in (options["session_kwargs"] or {}):
            import aiohttp  # gcsfs's HTTP client

            timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT)
            options["session_kwargs"] = {**(options.get("session_kwargs") or {}), "timeout": timeout}
        if _gcs_emulator(options):
            options.setdefault("token", "anon")  # never ask a metadata server for credentials
    elif scheme in ("az", "abfs", "abfss"):
        for key, value in AZURE_DEFAULTS.items():
            options.setdefault(key, value)
    return options


def _gcs_emulator(options: dict[str, Any]) -> bool:
    """Whether a gs:// root points at an emulator (``endpoint_url`` or ``STORAGE_EMULATOR_HOST``)."""
    return bool(options.get("endpoint_url")) or os.environ.get("STORAGE_EMULATOR_HOST", "") not in ("", "default")


_GCS_CLASSES: dict[type, Any] = {}


def _gcs_filesystem(url: str, options: dict[str, Any]) -> tuple[Any, str]:
    """A gcsfs filesystem for ``url`` with `GCS_REQUEST_ATTEMPTS` and, for an emulator, no bucket-type probe."""
    emulator = _gcs_emulator(options)
    if emulator and "gcsfs" not in sys.modules:
        os.environ.setdefault(_HNS_SWITCH, "false")  # nothing to probe on an emulator; skips importing gRPC too
    import gcsfs
    import gcsfs.core
    from gcsfs.retry import retry_request

    base: Any = gcsfs.core.GCSFileSystem if emulator else gcsfs.GCSFileSystem
    cls: Any = _GCS_CLASSES.get(base)
    if cls is None:
        request = retry_request(retries=GCS_REQUEST_ATTEMPTS)(gcsfs.core.GCSFileSystem._request.__wrapped__)
        cls = _GCS_CLASSES[base] = type(base.__name__, (base,), {"_request": request, "__module__": __name__})
    path = cls._strip_protocol(url)
    return cls(**options), path


def _open_filesystem(url: str, options: dict[str, Any]) -> tuple[Any, str]:
    if _scheme(url) in ("gs", "gcs"):
        return _gcs_filesystem(url, options)
    fs, path = fsspec.core.url_to_fs(url, **options)
    if _scheme(url) in ("az", "abfs", "abfss"):
        _tune_azure(fs)
    return fs, path


def _tune_azure(fs: Any) -> None:
    """Bound the retries of adlfs's blob service client (its pipeline shares this one policy object)."""
    policy = getattr(getattr(getattr(fs, "service_client", None), "_config", None), "retry_policy", None)
    for key, value in AZURE_RETRY.items():
        if hasattr(policy, key):
            setattr(policy, key, value)


class Storage:
    """A checkpoint root on any fsspec filesystem.

    Paths given to methods are relative to the root (``"checkpoint-10/model.safetensors"``).

    Example:
        >>> s = Storage("memory://doc-example")
        >>> s.write_bytes_atomic("a/x.json", b"{}")
        >>> s.read_bytes("a/x.json")
        b'{}'
    """

    def __init__(self, root: str | os.PathLike[str], storage_options: dict[str, Any] | None = None,
                 *, retries: int = 3, backoff: float = 0.5) -> None:
        self.url = os.fspath(root)
        if not self.url:
            raise StorageError("checkpoint root is empty; give a folder or an fsspec URL such as s3://bucket/run")
        options = _with_defaults(self.url, dict(storage_options or {}))
        self._secrets = _secrets(options)
        try:
            self.fs, path = _open_filesystem(self.url, options)
        except (ImportError, ValueError) as exc:
            raise StorageError(self._scrub(f"cannot open checkpoint root {self.url!r}: {exc}")) from exc
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.has_buckets = not self.is_local and "memory" not in _protocols(self.fs)
        self.root = path.rstrip("/") if path not in ("/", "") else path
        self.retries = retries
        self.backoff = backoff

    # --- paths and errors ----------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        """The full backend path of ``parts`` under the root."""
        return "/".join([self.root.rstrip("/"), *(p.strip("/") for p in parts if p)])

    def display(self, *parts: str) -> str:
        """A user-facing location (the root URL as given, plus ``parts``)."""
        return "/".join([self.url.rstrip("/"), *(p for p in parts if p)])

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _call(self, what: str, rel: str, fn: Callable[[], T], *, write: bool = False,
              retries: int | None = None) -> T:
        """Run ``fn``, retrying transient failures with backoff, translating errors at one place.

        A missing path is `CheckpointNotFoundError` when reading and `StorageError` when writing.
        """
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                return fn()
            except CheckpointError:
                raise
            except FileNotFoundError as exc:
                if write:
                    raise StorageError(self._scrub(f"{what} failed at {self.display(rel)}: {_describe(exc)}")) from exc
                raise CheckpointNotFoundError(self._scrub(f"{what}: {self.display(rel)} does not exist")) from exc
            except Exception as exc:
                if attempt < retries and _is_transient(exc):
                    delay = self.backoff * 2**attempt
                    logger.warning("%s failed (%s), retrying in %.1fs", what, self._scrub(repr(exc)), delay)
                    time.sleep(delay)
                    self._reconnect()
                    continue
                raise StorageError(self._scrub(f"{what} failed at {self.display(rel)}: {_describe(exc)}")) from exc
        raise AssertionError("unreachable")

    def _reconnect(self) -> None:
        """Drop pooled connections after a transient failure: after an outage they are all dead."""
        connect = getattr(self.fs, "connect", None)  # s3fs: a fresh client and connection pool
        if connect is not None:
            with contextlib.suppress(Exception):
                connect(refresh=True)

    def identity(self) -> str:
        """This root's URL and how it is reached (options and endpoint variables), credentials left out:
        what names a local cache of it."""
        options = getattr(self.fs, "storage_options", {})
        endpoints = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "STORAGE_EMULATOR_HOST")
                     if os.environ.get(k)}
        return self._scrub(json.dumps([self.url, options, endpoints], sort_keys=True, default=repr))

    # --- reading -------------------------------------------------------------------------------

    def exists(self, rel: str = "") -> bool:
        return self._call("checking", rel, lambda: self.fs.exists(self.path(rel)))

    def bucket_exists(self, bucket: str) -> bool:
        def probe() -> bool:
            call_s3 = getattr(self.fs, "call_s3", None)
            if call_s3 is None:
                return bool(self.fs.exists(bucket))
            # s3fs's exists() answers False for an endpoint it cannot reach; HEAD tells the two apart.
            try:
                call_s3("head_bucket", Bucket=bucket)
            except FileNotFoundError:
                return False
            except PermissionError:  # may still be usable (a bucket one can read but not HEAD)
                return bool(self.fs.exists(bucket))
            return True
        # The first request to a root: an endpoint that does not answer now is a wrong one (a typo,
        # no VPN), and waiting longer does not help; the client's own attempts are enough.
        return self._call("checking", "", probe, retries=0)

    def read_bytes(self, rel: str, *, limit: int | None = None) -> bytes:
        """The bytes of ``rel``; with ``limit``, at most ``limit + 1`` of them are read (a caller
        seeing more than ``limit`` knows the file is too large without holding all of it)."""
        if limit is None:
            return self._call("reading", rel, lambda: self.fs.cat_file(self.path(rel)))

        def head() -> bytes:
            # Small files (every real sidecar) in one plain GET: no ETag pinned by an earlier look
            # (s3fs refuses a file object whose object was rewritten since: "FileExpired"), and no
            # range (S3 refuses one on an empty object). Only a larger file is read by range.
            path = self.path(rel)
            self.fs.invalidate_cache(path)
            size = self.fs.size(path)
            if size is not None and size <= limit:
                return bytes(self.fs.cat_file(path))
            return bytes(self.fs.cat_file(path, start=0, end=limit + 1))
        return self._call("reading", rel, head)

    def read_listed(self, files: Sequence[tuple[str, int]]) -> list[bytes | None]:
        """The bytes of each ``(rel, size)`` a listing gave, fetched concurrently where the driver is
        asynchronous (s3fs, gcsfs, adlfs): one GET of at most ``size + 1`` bytes each, no HEAD, all on
        the driver's event loop.

        None where a file was not read this way: a local or synchronous filesystem, an empty file,
        a failed request, or a length other than ``size`` (the file changed since it was listed). The
        caller reads those with `read_bytes`, which retries, translates errors and bounds the read.
        """
        wanted = [k for k, (_, size) in enumerate(files) if size > 0]
        out: list[bytes | None] = [None] * len(files)
        if self.is_local or not getattr(self.fs, "async_impl", False) or not wanted:
            return out
        paths = [self.path(files[k][0]) for k in wanted]
        try:
            found = self.fs.cat_ranges(paths, [0] * len(paths), [files[k][1] + 1 for k in wanted], on_error="return")
        except Exception as exc:  # the batch as a whole failed: every file is read again one by one
            logger.debug("concurrent read of %d files failed (%s)", len(paths), self._scrub(repr(exc)))
            return out
        for k, data in zip(wanted, found, strict=True):
            if isinstance(data, (bytes, bytearray)) and len(data) == files[k][1]:
                out[k] = bytes(data)
        return out

    @contextlib.contextmanager
    def open_read(self, rel: str) -> Iterator[IO[bytes]]:
        """A readable binary stream of ``rel`` (local: a plain file; remote: fsspec's buffered reader)."""
        f = self._call("opening", rel, lambda: self.fs.open(self.path(rel), "rb", block_size=8 << 20))
        try:
            yield f
        finally:
            f.close()

    def list_dir(self, rel: str = "") -> list[tuple[str, str]]:
        """``(name, "directory"|"file")`` of the children of ``rel``; empty when it does not exist."""
        def ls() -> list[tuple[str, str]]:
            try:
                self.fs.invalidate_cache(self.path(rel))
                entries = self.fs.ls(self.path(rel), detail=True)
            except FileNotFoundError:
                return []
            base = self.path(rel).rstrip("/")
            out = []
            for e in entries:
                name = e["name"].rstrip("/").rsplit("/", 1)[-1]
                if e["name"].rstrip("/") == base:
                    continue
                out.append((name, "directory" if e.get("type") == "directory" else "file"))
            return out
        return self._call("listing", rel, ls)

    def sign(self, rel: str, expires: int) -> str:
        """A pre-signed GET URL of ``rel``, valid ``expires`` seconds (s3://, gs:// with a service-account
        key, az:// with an account key).

        Raises:
            StorageError: the storage or its credentials cannot sign (named, with what would).
        """
        gcs_hint = ("GCS signs with a service-account key: pass storage_options token=<key file> "
                    "(anonymous and user credentials, and the emulator's, cannot sign)")
        if "gs" in _protocols(self.fs) and not _gcs_can_sign(self.fs):
            # checked first: google-cloud-storage would look for default credentials (a metadata server)
            raise StorageError(f"cannot sign a URL for {self.display(rel)}: {gcs_hint}")
        try:
            return str(self.fs.sign(self.path(rel), expiration=expires))
        except NotImplementedError as exc:
            raise StorageError(
                f"{self.display()} cannot make signed URLs ({type(self.fs).__name__} does not sign); use "
                "'ckpt download' instead, or object storage such as s3://") from exc
        except Exception as exc:  # the driver signs locally: a failure is about credentials, not the network
            hint = ""
            if "gs" in _protocols(self.fs):
                hint = f"; {gcs_hint}"
            elif "abfs" in _protocols(self.fs) or "az" in _protocols(self.fs):
                hint = "; Azure signs a SAS with the account key: give account_name and account_key " \
                       "(or a connection string with AccountKey)"
            raise StorageError(self._scrub(f"cannot sign a URL for {self.display(rel)}: {_describe(exc)}{hint}")) \
                from exc

    # --- writing -------------------------------------------------------------------------------

    def makedirs(self, rel: str = "") -> None:
        self._call("creating folder", rel, lambda: self.fs.makedirs(self.path(rel), exist_ok=True), write=True)

    def check_writable(self) -> None:
        """Prove the root can be written, with a clear error if not.

        A local root is created. On an object store the bucket must exist: it is never created
        (a typo in a bucket name must not make a new bucket).
        """
        probe = f"{STAGING_PREFIX}probe-{uuid.uuid4().hex[:8]}"
        try:
            if self.is_local:
                self.makedirs()
            else:
                bucket = self.root.split("/", 1)[0]
                if self.has_buckets and bucket and not self.bucket_exists(bucket):
                    raise StorageError(
                        f"bucket {bucket!r} of {self.display()} does not exist; create it first "
                        "(ckpt-callback never creates buckets)"
                    )
            self.write_bytes_atomic(probe, b"ok")
            self.remove(probe)
        except StorageError as exc:
            raise StorageError(f"checkpoint root {self.display()} cannot be written: {exc}") from exc

    def write_bytes_atomic(self, rel: str, data: bytes, *, make_parents: bool = True, durable: bool = True) -> None:
        """Replace ``rel`` with ``data`` so a reader sees the old or the new bytes, never a part.

        Local: write a temporary file, fsync, rename over. Object stores: one PUT is atomic.
        ``make_parents=False``: fail (StorageError) rather than re-create a folder that is gone.
        ``durable=False`` (local): no fsync, for files only live processes read (leases): a
        crash of the machine may lose them, never leave a part of one.
        """
        target = self.path(rel)
        if self.is_local:
            def local() -> None:
                # Deliberate local fast path: os.replace is atomic, fsync makes it durable.
                tmp = f"{target}{TMP_INFIX}{uuid.uuid4().hex[:8]}"
                if make_parents:
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                try:
                    with open(tmp, "wb") as f:
                        f.write(data)
                        if durable:
                            f.flush()
                            os.fsync(f.fileno())
                    os.replace(tmp, target)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
                if durable:
                    fsync_dir(os.path.dirname(target))
            self._call("writing", rel, local, write=True)
        else:
            self._call("writing", rel, lambda: self.fs.pipe_file(target, data), write=True)

    def write_stream(self, rel: str, produce: Callable[[Any], T], *, sync: bool = True) -> T:
        """Create ``rel`` with the bytes ``produce(f)`` writes to ``f``; return what it returns.

        Local files are fsynced before this returns (``sync=False``: the caller makes them
        durable later with `sync_local`). On object stores the upload goes out in parts of
        `UPLOAD_PART_SIZE` (bounded memory) and a transient failure (connection reset, 5xx,
        throttling) re-runs ``produce`` on a fresh upload, a bounded number of times.
        """
        return self._call("writing", rel, lambda: self._write_once(rel, produce, sync), write=True)

    def _write_once(self, rel: str, produce: Callable[[Any], T], sync: bool = True) -> T:
        target = self.path(rel)
        if self.is_local:
            with _open_local(target) as local:
                result = produce(local)
                local.finish(sync=sync)
            return result
        if hasattr(self.fs, "call_s3"):
            f: Any = _S3MultipartWriter(self.fs, target, UPLOAD_PART_SIZE, UPLOAD_PARTS_IN_FLIGHT)
        else:
            part = GCS_UPLOAD_CHUNK if "gs" in _protocols(self.fs) else UPLOAD_PART_SIZE
            f = _Chunked(self.fs.open(target, "wb", block_size=part), part)
        try:
            result = produce(f)
        except BaseException:
            with contextlib.suppress(Exception):
                f.discard() if hasattr(f, "discard") else None  # aborts a multipart upload
            raise
        f.close()
        return result

    def remove(self, rel: str) -> None:
        """Remove one file (a literal path, never a pattern); a missing one is fine."""
        def rm() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path(rel))
        self._call("deleting", rel, rm)

    def list_files(self, rel: str = "") -> dict[str, dict[str, Any]]:
        """Every file below folder ``rel`` (relative to it) with fsspec's details; ``{}`` when none.

        One recursive listing: on object stores a paginated LIST, whatever the depth.
        """
        base = self.path(rel).rstrip("/") + "/"
        if self.is_local:
            return self._call("listing", rel, lambda: _walk_local(base))

        def find() -> dict[str, dict[str, Any]]:
            self.fs.invalidate_cache(self.path(rel))
            try:
                found = self.fs.find(self.path(rel), detail=True)
            except FileNotFoundError:
                return {}
            # Listings of folders below, cached by earlier calls (a folder listed while it was saved), are
            # older than this one: a file opened on their word would pin a stale ETag (s3fs: FileExpired).
            for folder in {p.rsplit("/", 1)[0] for p in found}:
                self.fs.invalidate_cache(folder)
            return {p[len(base):]: d for p, d in found.items() if p.startswith(base) and d.get("type") != "directory"}
        return self._call("listing", rel, find)

    def remove_tree(self, rel: str, *, last: str | None = None, settle: float = 0.0) -> None:
        """Remove folder ``rel`` and everything below it, file by literal file (no glob expansion).

        ``last``: a file removed after all others (the lease marker), so a delete killed half-way
        still leaves a folder that cleanup knows is ours.
        ``settle`` (object stores): the folder of a writer that was killed may still receive its last
        upload, which the server completes after the client is gone; the lease stays until two looks
        ``settle`` seconds apart find nothing else, so such a late file lands in a folder cleanup still
        knows is ours, and is removed with it.
        """
        if self.is_local:
            # Deliberate local fast path: one tree removal instead of a call per file.
            import shutil

            self._call("deleting", rel, lambda: shutil.rmtree(self.path(rel), ignore_errors=True))
            return
        quiet, looks = 0, 0
        while looks < (6 if settle else 2):  # a second look: a dead writer's last request may land after the first
            looks += 1
            others = [f for f in self.list_files(rel) if f != last]
            for f in others:
                self.remove(f"{rel}/{f}")
            quiet = 0 if others else quiet + 1
            if quiet >= (2 if settle else 1):
                break
            if settle:
                time.sleep(settle)
        if last is not None:
            self.remove(f"{rel}/{last}")
        with contextlib.suppress(CheckpointError):  # pseudo-folders (memory://, some S3 servers)
            self._call("deleting", rel, lambda: self.fs.rmdir(self.path(rel)))
        self.fs.invalidate_cache(self.path(rel))

    def copy(self, src: str, dst: str) -> None:
        """Copy one object inside the root (server-side on object stores), a literal path."""
        self._call("copying", dst, lambda: self.fs.cp_file(self.path(src), self.path(dst)), write=True)

    def sync_local(self, rels: Sequence[str]) -> None:
        """Make local files and folders ``rels`` durable: one fsync each, all at once.

        The file system commits fsyncs that wait together in one journal commit, so a save of
        many small files costs about one round trip to the disk instead of one per file.
        """
        assert self.is_local
        paths = [self.path(rel) for rel in rels]
        if len(paths) > 1:
            self._call("writing", rels[0], lambda: list(_fsync_pool().map(fsync_path, paths)), write=True)
        elif paths:
            self._call("writing", rels[0], lambda: fsync_path(paths[0]), write=True)

    def rename_local(self, src: str, dst: str, *, durable: bool = True) -> None:
        """Atomically rename a local folder (the commit point of a local checkpoint) and make it durable.

        ``durable=False``: no fsync of the root (a delete: if the machine crashes before the
        directory reaches the disk, the checkpoint is still whole and is deleted again later)."""
        assert self.is_local

        def rename() -> None:
            os.rename(self.path(src), self.path(dst))
            if durable:
                fsync_dir(self.root)
        self._call("renaming", src, rename, write=True)

class _LocalFile:
    """A local file being written; `finish` makes it durable (fsync)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def write(self, data: Any) -> int:
        return _write_all(self.fd, memoryview(data).cast("B"))

    def finish(self, *, sync: bool = True) -> None:
        if sync:
            os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class _DirectFile(_LocalFile):
    """A local file written with O_DIRECT through reused, page-aligned buffers, written in parallel.

    The bytes skip the page cache: no new cache pages to fault in (costly on VMs that hand
    freed memory back to the host), no second copy, and nothing left for the final fsync to
    flush. The caller's thread fills one buffer (a memcpy that releases the GIL) while
    `_WRITERS` threads write the full ones at their offsets, so the copy, the hash (see
    `_serialization.ParallelDigest`) and several requests to the disk overlap. The unaligned
    tail is written after clearing O_DIRECT; a file that fits in one buffer is written by one
    plain call.
    """

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        self.buffers = _bounce_buffers()
        self.pending: list[concurrent.futures.Future[int] | None] = [None] * len(self.buffers)
        self.current, self.fill, self.offset = 0, 0, 0

    def write(self, data: Any) -> int:
        source = memoryview(data).cast("B")
        try:
            address = ctypes.addressof(ctypes.c_char.from_buffer(source)) if len(source) >= 65536 else None
        except TypeError:  # read-only (bytes): small parts like the header
            address = None
        position = 0
        while position < len(source):
            if self.fill == 0:
                self._wait(self.current)
            buffer, buffer_address = self.buffers[self.current]
            take = min(len(buffer) - self.fill, len(source) - position)
            if address is None:
                buffer[self.fill : self.fill + take] = source[position : position + take]
            else:
                ctypes.memmove(buffer_address + self.fill, address + position, take)
            self.fill += take
            position += take
            if self.fill == len(buffer):
                self._send(self.fill)
        return len(source)

    def _send(self, size: int) -> None:
        view = self.buffers[self.current][0][:size]
        self.pending[self.current] = _writer_pool().submit(_pwrite_all, self.fd, view, self.offset)
        self.offset += size
        self.current, self.fill = (self.current + 1) % len(self.buffers), 0

    def _wait(self, index: int) -> None:
        future, self.pending[index] = self.pending[index], None
        if future is not None:
            future.result()

    def finish(self, *, sync: bool = True) -> None:
        fill, buffer = self.fill, self.buffers[self.current][0]
        if self.offset == 0:  # it all fits in one buffer: one plain write
            _direct_off(self.fd)
            _pwrite_all(self.fd, buffer[:fill], 0)
        else:
            aligned = fill - fill % _DIRECT_ALIGN
            tail = self.offset + aligned
            if aligned:
                _pwrite_all(self.fd, buffer[:aligned], self.offset)
            for index in range(len(self.pending)):
                self._wait(index)
            if aligned < fill:
                _direct_off(self.fd)
                _pwrite_all(self.fd, buffer[aligned:fill], tail)
        self.fill = self.offset = 0
        if sync:
            os.fsync(self.fd)

    def close(self) -> None:
        for future in self.pending:  # a failed save: let every write in flight end before the fd does
            if future is not None:
                with contextlib.suppress(Exception):
                    future.result()
        os.close(self.fd)


_DIRECT_ALIGN = 4096
_BOUNCE_SIZE, _BOUNCE_COUNT, _WRITERS = 16 << 20, 4, 2  # chosen by benchmarks/bench_save.py's writer sweep
_BOUNCE = threading.local()
_WRITER_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def _bounce_buffers() -> list[tuple[memoryview, int]]:
    """This thread's page-aligned buffers (anonymous mmaps) and their addresses, kept for every later save."""
    if not hasattr(_BOUNCE, "buffers"):
        maps = [mmap.mmap(-1, _BOUNCE_SIZE) for _ in range(_BOUNCE_COUNT)]
        _BOUNCE.buffers = [(memoryview(m), ctypes.addressof(ctypes.c_char.from_buffer(m))) for m in maps]
    buffers: list[tuple[memoryview, int]] = _BOUNCE.buffers
    return buffers


def _writer_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _WRITER_POOL
    if _WRITER_POOL is None:
        _WRITER_POOL = concurrent.futures.ThreadPoolExecutor(_WRITERS, thread_name_prefix="ckpt-write")
    return _WRITER_POOL


def _direct_off(fd: int) -> None:
    import fcntl  # Unix only, like O_DIRECT itself

    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> int:
    written = 0
    while written < len(view):
        written += os.pwrite(fd, view[written:], offset + written)
    return written


@contextlib.contextmanager
def _open_local(path: str) -> Iterator[_LocalFile]:
    """Create ``path`` (and its folders) for writing, with O_DIRECT where `DIRECT_IO` is on and the
    filesystem allows it."""
    try:
        f = _create_local(path)
    except FileNotFoundError:  # its folder is new (a mkdir per file costs more than this retry)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        f = _create_local(path)
    try:
        yield f
    finally:
        f.close()


def _create_local(path: str) -> _LocalFile:
    if DIRECT_IO and hasattr(os, "O_DIRECT"):
        try:
            return _DirectFile(path)
        except FileNotFoundError:
            raise
        except OSError:  # e.g. EINVAL on tmpfs: no direct I/O there
            pass
    return _LocalFile(path)


def _write_all(fd: int, view: memoryview) -> int:
    written = 0
    while written < len(view):
        written += os.write(fd, view[written:])
    return written


class _Chunked:
    """Feed a remote file at most ``size`` bytes per write, so its buffer never holds more than a part."""

    def __init__(self, f: Any, size: int) -> None:
        self.f = f
        self.size = size

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), self.size):
            self.f.write(view[start : start + self.size])
        return len(view)

    def close(self) -> None:
        self.f.close()

    def discard(self) -> None:
        """Abandon the upload: an fsspec file that is collected unclosed closes itself, which commits
        what it has (gcsfs: completes the resumable session; adlfs: commits the staged blocks), so a
        failed or retried write could land a truncated object later; a file marked closed never does."""
        try:
            if hasattr(self.f, "discard"):
                self.f.discard()
        finally:
            with contextlib.suppress(Exception):
                self.f.closed = True


class _S3MultipartWriter:
    """A write-only S3 object that uploads ``part_size`` parts with ``in_flight`` of them at once.

    s3fs's own streamed writes send one part at a time, and its ``put`` holds ten 50 MiB parts;
    this keeps the pipe full while holding ``in_flight`` part buffers, allocated once per file and
    reused (fresh buffers per part would leave freed memory with the allocator, not the OS).
    """

    def __init__(self, fs: Any, path: str, part_size: int, in_flight: int) -> None:
        self.fs, self.path = fs, path
        self.bucket, self.key, _ = fs.split_path(path)
        self.part_size, self.in_flight = part_size, in_flight
        self.free: list[bytearray] = []
        self.allocated = 0
        self.buffer: bytearray | None = None
        self.fill = 0
        self.parts: list[tuple[int, concurrent.futures.Future[Any]]] = []
        self.upload_id: str | None = None
        self.pool = concurrent.futures.ThreadPoolExecutor(in_flight, thread_name_prefix="ckpt-upload")
        self.lock = threading.Lock()
        self.returned = threading.Condition(self.lock)

    def _take(self) -> bytearray:
        """A free part buffer: a new one while fewer than ``in_flight`` exist, else one that comes back."""
        with self.lock:
            while not self.free and self.allocated >= self.in_flight:
                self.returned.wait(timeout=1.0)
                self._raise_failed()
            if self.free:
                return self.free.pop()
            self.allocated += 1
        return bytearray(self.part_size)

    def _give_back(self, buffer: bytearray) -> None:
        with self.lock:
            self.free.append(buffer)
            self.returned.notify()

    def _raise_failed(self) -> None:
        for _, f in self.parts:
            if f.done() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        position = 0
        while position < len(view):
            if self.buffer is None:
                self.buffer, self.fill = self._take(), 0
            take = min(self.part_size - self.fill, len(view) - position)
            self.buffer[self.fill : self.fill + take] = view[position : position + take]
            self.fill += take
            position += take
            if self.fill == self.part_size:
                self._send()
        return len(view)

    def _send(self) -> None:
        assert self.buffer is not None
        if self.upload_id is None:
            self.upload_id = self.fs.call_s3("create_multipart_upload", Bucket=self.bucket, Key=self.key)["UploadId"]
        self._raise_failed()
        buffer, size = self.buffer, self.fill
        self.buffer, self.fill = None, 0
        body = buffer if size == len(buffer) else bytes(buffer[:size])
        number = len(self.parts) + 1

        def upload() -> Any:
            try:
                return self.fs.call_s3("upload_part", Bucket=self.bucket, Key=self.key,
                                       UploadId=self.upload_id, PartNumber=number, Body=body)
            finally:
                self._give_back(buffer)

        self.parts.append((number, self.pool.submit(upload)))

    def close(self) -> None:
        try:
            if self.upload_id is None:  # small: one PUT
                data = bytes(self.buffer[: self.fill]) if self.buffer is not None else b""
                self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data)
            else:
                if self.fill:
                    self._send()
                parts = [{"PartNumber": n, "ETag": f.result()["ETag"]} for n, f in self.parts]
                self.fs.call_s3("complete_multipart_upload", Bucket=self.bucket, Key=self.key,
                                UploadId=self.upload_id, MultipartUpload={"Parts": parts})
        finally:
            self.pool.shutdown(wait=True)
            self.fs.invalidate_cache(self.path)

    def discard(self) -> None:
        for _, f in self.parts:
            f.cancel()
        self.pool.shutdown(wait=True)
        if self.upload_id is not None:
            with contextlib.suppress(Exception):
                self.fs.call_s3("abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)


def _walk_local(base: str) -> dict[str, dict[str, Any]]:
    """Deliberate local fast path of `Storage.list_files`: every file below ``base`` (relative to it,
    symlinks not followed) with its size, type and mtime, as fsspec's local listing gives them."""
    found: dict[str, dict[str, Any]] = {}
    pending = [""]
    while pending:
        prefix = pending.pop()
        try:
            entries = list(os.scandir(base + prefix))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                pending.append(f"{prefix}{entry.name}/")
                continue
            with contextlib.suppress(FileNotFoundError):  # removed while we looked
                st = entry.stat(follow_symlinks=False)
                found[prefix + entry.name] = {"name": base + prefix + entry.name, "size": st.st_size,
                                              "type": "file", "mtime": st.st_mtime}
    return found


def fsync_path(path: str) -> None:
    """fsync a local file, or a directory so a rename or new entry in it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_path
_FSYNC_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def _fsync_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _FSYNC_POOL
    if _FSYNC_POOL is None:
        _FSYNC_POOL = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="ckpt-fsync")
    return _FSYNC_POOL


def _gcs_can_sign(fs: Any) -> bool:
    """Whether gcsfs holds credentials with a private key (google-auth's `Signing`)."""
    try:
        from google.auth.credentials import Signing
    except ImportError:
        return False
    return isinstance(getattr(getattr(fs, "credentials", None), "credentials", None), Signing)


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, _TRANSIENT):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    markers = ("slowdown", "throttl", "too many requests", "503", "502", "500 internal", "504",
               "connection reset", "connection refused", "timed out", "temporarily", "serviceunavailable",
               "internalerror", "connectionclosed", "endpointconnectionerror", "connecttimeout",
               "cannot connect to host", "connect call failed", "serverdisconnected", "servicerequesterror",
               "serviceresponseerror")
    return any(m in text for m in markers)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, PermissionError):
        return f"permission denied ({text})"
    return f"{type(exc).__name__}: {text}"
