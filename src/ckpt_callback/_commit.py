"""How a checkpoint becomes visible or disappears: the only code that knows, local and object store.

The rules, on any storage:

- A checkpoint is visible exactly when ``NAME/checkpoint.json`` exists; the sidecar is written
  last, after every file it lists is durable (local) or listed with its size (object stores).
- A save never writes into a folder that another committed or in-flight checkpoint owns. A
  new name is written in place (object stores) or in a hidden staging folder renamed into
  place (local). Replacing a committed checkpoint of the same name (a rerun of the same
  step) first commits the replacement in a staging folder; only then is the old one removed
  and the new one moved in (a rename locally, server-side copies on object stores). A crash
  in between leaves a committed staging folder that `recover` rolls forward: the step is
  never lost.
- Every folder being written or deleted carries a lease (`_layout.MARKER`): the writer's
  host, pid, process start time and an expiry that a background thread keeps fresh. Cleanup
  removes a sidecar-less folder only when its lease says the writer is provably gone (same
  host and the process is gone, or the lease expired), never another process's live upload.
- Paths are literal (no glob expansion anywhere), and a folder emptied by a delete is free.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar

from . import _blobs
from ._errors import CheckpointError, CheckpointExistsError, CheckpointNotFoundError, SidecarError, StorageError
from ._layout import MARKER, SIDECAR, STAGING_PREFIX, TMP_INFIX, TRASH_PREFIX
from ._sidecar import CheckpointInfo
from ._storage import Storage

__all__ = ["LEASE_SECONDS", "CommitProtocol", "Lease", "Transaction"]

logger = logging.getLogger("ckpt_callback")

_SETTLE = 1.0  # seconds between the two quiet looks before a dead writer's folder loses its lease (object stores)
LEASE_SECONDS = 60.0  # a lease is refreshed every quarter of this; expired one more period later, it is dead
_HOST = socket.gethostname()


def _pid_space() -> str:
    """This boot and pid namespace: where a pid names one process (containers share host names)."""
    parts = []
    with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id") as f:
        parts.append(f.read().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return ":".join(parts)


_PID_SPACE = _pid_space()
T = TypeVar("T")


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (guards against a reused pid), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Lease:
    """Who holds a folder being written or deleted, and until when (the marker's JSON)."""

    writer: str
    purpose: str  # "write", "replace" or "delete"
    target: str
    host: str = _HOST
    space: str = _PID_SPACE
    pid: int = field(default_factory=os.getpid)
    started: str | None = None
    expires: float = 0.0

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> Lease | None:
        try:
            raw = json.loads(data)
            return cls(writer=str(raw["writer"]), purpose=str(raw["purpose"]), target=str(raw["target"]),
                       host=str(raw["host"]), space=str(raw.get("space", "")), pid=int(raw["pid"]),
                       started=raw.get("started"),
                       expires=float(raw["expires"]))
        except (ValueError, KeyError, TypeError, RecursionError):
            return None  # an unreadable lease proves nothing about a live writer: treated as expired

    def alive(self, now: float | None = None) -> bool:
        """Whether the holder may still be at work (False only when it provably is not)."""
        if self.writer in _LEASES.live:
            return True
        if self.host == _HOST and self.space == _PID_SPACE:  # its pid can be checked here
            if self.pid == os.getpid():
                return False  # this process holds no such lease any more: a transaction it abandoned
            if not _pid_alive(self.pid):
                return False
            started = _process_start(self.pid)
            # A different start time: the pid was reused by another process.
            return started is None or self.started is None or started == self.started
        return (time.time() if now is None else now) <= self.expires + LEASE_SECONDS


def _seconds(detail: dict[str, Any]) -> float | None:
    """A listing entry's modification time as a unix time; None when the driver gives none.

    Each driver spells it its own way: local ``mtime`` (float), memory ``created``, s3fs
    ``LastModified``, gcsfs ``mtime``/``updated`` (datetime or ISO text), adlfs ``last_modified``.
    """
    for key in ("mtime", "LastModified", "last_modified", "updated", "created", "creation_time"):
        value = detail.get(key)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
        if isinstance(value, datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=timezone.utc)  # drivers give UTC; a naive one is UTC too
            return value.timestamp()
        timestamp = getattr(value, "timestamp", None)  # a datetime-like of another library
        if callable(timestamp):
            return float(timestamp())
    return None


class _LeaseKeeper:
    """This process's live leases, rewritten with a fresh expiry by one daemon thread."""

    def __init__(self) -> None:
        self.live: dict[str, tuple[Storage, str, Lease]] = {}
        self.markers: dict[str, Storage] = {}  # blob markers (`Transaction.hold_blob`) kept fresh the same way
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def hold(self, storage: Storage, folder: str, purpose: str, target: str) -> Lease:
        lease = Lease(writer=uuid.uuid4().hex, purpose=purpose, target=target,
                      started=_process_start(os.getpid()), expires=time.time() + LEASE_SECONDS)
        with self.lock:  # live before it is visible: a cleanup in this process reading it sees it alive
            self.live[lease.writer] = (storage, folder, lease)
            if self.thread is None:
                self.thread = threading.Thread(target=self._refresh, name="ckpt-lease", daemon=True)
                self.thread.start()
        try:
            storage.write_bytes_atomic(f"{folder}/{MARKER}", lease.encode(), durable=False)  # only the living read it
        except BaseException:
            self.release(lease)
            raise
        return lease

    def release(self, lease: Lease) -> None:
        with self.lock:
            self.live.pop(lease.writer, None)

    def _refresh(self) -> None:
        while True:
            time.sleep(LEASE_SECONDS / 4)
            with self.lock:
                held = list(self.live.values())
                markers = list(self.markers.items())
            for rel, storage in markers:  # so a long save's blobs stay younger than the freeing grace
                with contextlib.suppress(Exception):
                    if rel in self.markers:  # one re-created after its save dropped it ages out and is freed
                        storage.write_bytes_atomic(rel, b"{}")
            for storage, folder, lease in held:
                fresh = Lease(**{**asdict(lease), "expires": time.time() + LEASE_SECONDS})
                with contextlib.suppress(Exception):  # a failed refresh is retried; the lease has slack
                    if lease.writer in self.live:  # never re-creates a folder that was committed meanwhile
                        storage.write_bytes_atomic(f"{folder}/{MARKER}", fresh.encode(), make_parents=False,
                                                   durable=False)


_LEASES = _LeaseKeeper()


@dataclass(frozen=True)
class FolderState:
    """What a top-level folder of the root is: ``free``, ``committed``, ``busy`` (a live lease),
    ``dead`` (a lease whose holder is gone, no sidecar) or ``foreign`` (files that are not ours)."""

    kind: str
    lease: Lease | None = None
    files: tuple[str, ...] = ()


class Transaction:
    """The files of one checkpoint being written; `commit` makes them visible at once."""

    def __init__(self, protocol: CommitProtocol, name: str, folder: str, lease: Lease, *, staged: bool) -> None:
        self.protocol, self.name, self.folder, self.lease, self.staged = protocol, name, folder, lease, staged
        self.storage = protocol.storage
        self.sealed = False  # the sidecar is written: from here on the folder is recovered, never aborted
        self.blobs: dict[str, int] = {}  # object stores: blobs the sidecar will name (sha -> size), each with a marker
        self.unsynced: list[str] = []  # local: files written but not fsynced yet (`commit` syncs them all at once)

    def write(self, rel: str, produce: Callable[[Any], T]) -> T:
        """Write one file of the checkpoint; see `Storage.write_stream`. Local files are made
        durable by `commit`, all at once."""
        if not self.storage.is_local:
            return self.storage.write_stream(f"{self.folder}/{rel}", produce)
        result = self.storage.write_stream(f"{self.folder}/{rel}", produce, sync=False)
        self.unsynced.append(f"{self.folder}/{rel}")
        return result

    def reuse(self, rel: str, source: str, size: int, owner: CheckpointInfo | None = None) -> bool:
        """Make file ``rel`` the same data as committed file ``source`` (a path under the root), of ``size`` bytes.

        ``owner``: the checkpoint ``source`` belongs to; after the link or copy its sidecar must still
        be that checkpoint's (same id), else a replacement of it may have been linked: refused.

        Local: a hard link, so both folders stay self-contained and deleting either frees nothing
        the other holds (the file system counts the links). Object stores: a server-side copy
        (no upload; the writer keeps frozen files in the blob area instead, see `hold_blob`).
        False when that cannot be done (the source is gone, another file system, a size that is
        not what its sidecar says): the caller writes the file instead.
        """
        s = self.storage
        try:
            if s.is_local:
                # Deliberate local fast path: fsspec has no hard links.
                target = s.path(self.folder, rel)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.link(s.path(source), target)
                if os.stat(target).st_size == size and self._still(owner):
                    self.unsynced.append(f"{self.folder}/{rel}")  # its folders are synced at the commit
                    return True
                os.unlink(target)
                return False
            s.copy(source, f"{self.folder}/{rel}")
            if s.list_files(self.folder).get(rel, {}).get("size") == size and self._still(owner):
                return True
            s.remove(f"{self.folder}/{rel}")
        except (OSError, CheckpointNotFoundError, StorageError) as exc:
            logger.info("cannot reuse %s for %s (%s); writing it", s.display(source), s.display(self.folder, rel), exc)
        return False

    def hold_blob(self, sha: str, size: int, staged: str | None = None) -> bool:
        """Object stores: make blob ``sha`` (``size`` bytes) one this checkpoint's sidecar may name.

        Writes the marker ``.ckpt-blobs/<sha>.ref-<writer>`` first (so `_blobs.collect` leaves the
        blob alone), then checks the blob is there in full; if not, ``staged`` (a file of this
        transaction's folder with those bytes) is copied there server-side. ``staged`` is removed
        from the folder once the blob holds its bytes. False (``staged`` left in place) when the
        blob cannot be made whole: the caller keeps or writes the file in the folder.
        """
        s = self.storage
        try:
            s.write_bytes_atomic(_blobs.ref_path(sha, self.lease.writer), b"{}")
            self.blobs[sha] = size
            with _LEASES.lock:
                _LEASES.markers[_blobs.ref_path(sha, self.lease.writer)] = s
            if _blobs.present(s).get(sha) != size:
                if staged is None:
                    return self._drop_blob(sha)
                s.copy(f"{self.folder}/{staged}", _blobs.blob_path(sha))
                if _blobs.present(s).get(sha) != size:
                    return self._drop_blob(sha)
            if staged is not None:
                s.remove(f"{self.folder}/{staged}")
            return True
        except (OSError, CheckpointNotFoundError, StorageError) as exc:
            logger.info("cannot store %s once (%s); keeping it in the checkpoint",
                        s.display(_blobs.blob_path(sha)), exc)
            return self._drop_blob(sha)

    def _drop_blob(self, sha: str) -> bool:
        if self.blobs.pop(sha, None) is not None:
            with _LEASES.lock:
                _LEASES.markers.pop(_blobs.ref_path(sha, self.lease.writer), None)
            with contextlib.suppress(Exception):
                self.storage.remove(_blobs.ref_path(sha, self.lease.writer))
        return False

    def _release_blobs(self) -> None:
        for sha in list(self.blobs):
            self._drop_blob(sha)

    def _still(self, owner: CheckpointInfo | None) -> bool:
        """Whether ``owner`` is still the committed checkpoint of its name (not replaced or deleted)."""
        if owner is None:
            return True
        try:
            return CheckpointInfo.loads(self.storage.read_bytes(f"{owner.name}/{SIDECAR}")).id == owner.id
        except (CheckpointNotFoundError, SidecarError):
            return False

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.storage.write_bytes_atomic(f"{self.folder}/{rel}", data)

    def commit(self, info: CheckpointInfo) -> CheckpointInfo:
        """Check the files, write the sidecar last and move the checkpoint into place."""
        s, p = self.storage, self.protocol
        try:
            if not s.is_local:
                self._check_still_ours(info)
            if s.is_local:  # a staging folder nobody reads until its rename: no temporary file for the sidecar
                self.write(SIDECAR, lambda f: f.write(info.dumps().encode()))
                # every file, the sidecar and every folder they are in are durable before the rename
                folders = {self.folder}
                for rel in self.unsynced:
                    while rel.count("/") > self.folder.count("/"):
                        rel = rel.rsplit("/", 1)[0]
                        folders.add(rel)
                s.sync_local([*self.unsynced, *sorted(folders)])
                self.unsynced = []
            else:
                s.write_bytes_atomic(f"{self.folder}/{SIDECAR}", info.dumps().encode())
            self._release_blobs()  # the sidecar names them now
            self.sealed = True
            if s.is_local:
                p.move_local(self.folder, self.name)
            elif self.staged:
                p.move_remote(self.folder, self.name, info)
            else:
                try:
                    s.remove(f"{self.name}/{MARKER}")
                except StorageError as exc:  # committed all the same; recover() removes a stale lease
                    logger.warning("could not remove the lease of %s: %s", s.display(self.name), exc)
        finally:
            _LEASES.release(self.lease)
            with p.lock:
                p.inflight.pop(self.name, None)
        return info

    def _check_still_ours(self, info: CheckpointInfo) -> None:
        """Before the sidecar goes up: our lease still stands and every file is there, in full."""
        s = self.storage
        listed = s.list_files(self.folder)
        lease = Lease.decode(s.read_bytes(f"{self.folder}/{MARKER}")) if MARKER in listed else None
        if lease is None or lease.writer != self.lease.writer:
            raise StorageError(f"{s.display(self.name)} was taken over or removed by another process during the save")
        for sha in self.blobs:  # fresh markers, so the blobs outlive the grace period past the sidecar write
            s.write_bytes_atomic(_blobs.ref_path(sha, self.lease.writer), b"{}")
        blobs = _blobs.present(s) if any(e.blob for e in info.files) else {}
        for entry in info.files:
            got = blobs.get(entry.blob) if entry.blob else listed.get(entry.path, {}).get("size")
            if got != entry.size:
                raise StorageError(f"{s.display(entry.location(self.folder))} is missing or incomplete "
                                   f"({got} of {entry.size} bytes) just before the commit")

    def abort(self) -> None:
        """Remove what was written (the marker last); never raises.

        A sealed staging folder holds a committed replacement: it is left for `recover` to move
        into place, since the checkpoint it replaces may already be gone.
        """
        _LEASES.release(self.lease)
        with self.protocol.lock:
            self.protocol.inflight.pop(self.name, None)
        if self.sealed:
            logger.warning("left %s for recovery", self.storage.display(self.folder))
            return
        self._release_blobs()
        with contextlib.suppress(Exception):
            self.storage.remove_tree(self.folder, last=MARKER)


class CommitProtocol:
    """Begin, commit, delete, rewrite and recover checkpoints under one root.

    Example:
        >>> from ._storage import Storage
        >>> from ._sidecar import CheckpointInfo
        >>> p = CommitProtocol(Storage("memory://doc-commit"))
        >>> txn = p.begin("a", replace=False)
        >>> txn.write_bytes("x.bin", b"1")
        >>> _ = txn.commit(CheckpointInfo(name="a", step=1))
        >>> p.state("a").kind
        'committed'
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.lock = threading.Lock()
        self.inflight: dict[str, Transaction] = {}

    # --- what a folder is ---------------------------------------------------------------------

    def state(self, name: str, files: dict[str, Any] | None = None) -> FolderState:
        listed = self.storage.list_files(name) if files is None else files
        names = tuple(sorted(listed))
        if not listed:
            return FolderState("free")
        lease = None
        if MARKER in listed:
            try:
                lease = Lease.decode(self.storage.read_bytes(f"{name}/{MARKER}"))
            except CheckpointNotFoundError:  # removed while we looked: its holder just finished
                return self.state(name)
        live = lease is not None and lease.alive()
        if SIDECAR in listed:
            busy = live and lease is not None and lease.purpose in ("delete", "replace")
            return FolderState("busy" if busy else "committed", lease, names)
        if MARKER in listed:
            return FolderState("busy" if live else "dead", lease, names)
        return FolderState("foreign", None, names)

    def _refuse(self, name: str, state: FolderState) -> CheckpointExistsError:
        where = self.storage.display(name)
        if state.kind == "busy" and state.lease is not None:
            lease = state.lease
            return CheckpointExistsError(f"{where} is being {'deleted' if lease.purpose == 'delete' else 'written'} "
                                         f"by another process (pid {lease.pid} on {lease.host}); try another name")
        if state.kind == "committed":
            return CheckpointExistsError(f"checkpoint {name!r} already exists in {self.storage.display()}; "
                                         "choose another name or delete it first")
        return CheckpointExistsError(f"{where} exists and is not a checkpoint; choose another name or move that folder")

    # --- writing ------------------------------------------------------------------------------

    def begin(self, name: str, *, replace: bool) -> Transaction:
        """Start writing checkpoint ``name``; ``replace``: a committed one of that name may be replaced."""
        with self.lock:
            if name in self.inflight:
                raise CheckpointExistsError(f"checkpoint {name!r} is already being saved by this process")
        state = self.state(name)
        if state.kind in ("busy", "foreign") or (state.kind == "committed" and not replace):
            raise self._refuse(name, state)
        staged = self.storage.is_local or state.kind == "committed"
        folder = f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}" if staged else name
        if state.kind == "dead" and not staged:
            self.storage.remove_tree(name, last=MARKER, settle=_SETTLE)  # a crashed attempt: its writer is gone
        lease = _LEASES.hold(self.storage, folder, "write", name)
        if not staged:
            # No compare-and-swap on object stores: read the marker back, the last writer wins it.
            back = Lease.decode(self.storage.read_bytes(f"{folder}/{MARKER}"))
            if back is None or back.writer != lease.writer:
                _LEASES.release(lease)
                raise self._refuse(name, FolderState("busy", back))
        txn = Transaction(self, name, folder, lease, staged=staged)
        with self.lock:
            self.inflight[name] = txn
        return txn

    def move_local(self, staging: str, name: str) -> None:
        """Rename a committed local staging folder to ``name``; a committed one there goes to the trash first."""
        s = self.storage
        trash = None
        state = self.state(name)
        if state.kind in ("busy", "foreign"):
            raise self._refuse(name, state)
        if s.exists(name):
            trash = f"{TRASH_PREFIX}{uuid.uuid4().hex[:12]}-{name}"
            s.rename_local(name, trash)  # from here until the next rename, recover() rolls forward
        s.rename_local(staging, name)
        s.remove(f"{name}/{MARKER}")
        if trash is not None:
            s.remove_tree(trash)

    def move_remote(self, staging: str, name: str, info: CheckpointInfo) -> None:
        """Replace committed ``name`` by the committed staging folder (server-side copies), sidecar last."""
        s = self.storage
        lease = _LEASES.hold(s, name, "replace", name)
        try:
            s.remove(f"{name}/{SIDECAR}")  # the old checkpoint disappears here ...
            for rel in s.list_files(name):
                if rel != MARKER:
                    s.remove(f"{name}/{rel}")
            for entry in info.files:
                if entry.blob is None:  # a blob entry's bytes are in the blob area, named by the sidecar
                    s.copy(f"{staging}/{entry.path}", f"{name}/{entry.path}")
            s.copy(f"{staging}/{SIDECAR}", f"{name}/{SIDECAR}")  # ... and the new one appears here
            s.remove(f"{name}/{MARKER}")
        finally:
            _LEASES.release(lease)
        s.remove_tree(staging, last=MARKER)

    # --- rewriting and deleting ---------------------------------------------------------------

    def rewrite(self, info: CheckpointInfo) -> bool:
        """Replace the sidecar of committed ``info.name`` (same id) with ``info``; False if it is gone.

        Never re-creates a deleted checkpoint: locally the folder is not re-made; on object stores
        the folder is listed again after the write and the sidecar taken back if a delete or a
        replacement began meanwhile.
        """
        s = self.storage
        rel = f"{info.name}/{SIDECAR}"
        try:
            current = CheckpointInfo.loads(s.read_bytes(rel), where=s.display(rel))
        except (CheckpointNotFoundError, SidecarError):
            return False
        if current.id != info.id:
            return False  # replaced by another save of that name
        try:
            s.write_bytes_atomic(rel, info.dumps().encode(), make_parents=False)
        except StorageError:
            if s.is_local and not s.exists(info.name):
                return False
            raise
        if s.is_local:
            return True
        listed = s.list_files(info.name)
        if MARKER in listed or any(e.path not in listed for e in info.files if e.blob is None):
            with contextlib.suppress(Exception):
                back = CheckpointInfo.loads(s.read_bytes(rel))
                if back.id == info.id:
                    s.remove(rel)
            return False
        return True

    def delete(self, name: str, *, expected_id: str | None = None,
               later: Callable[[Callable[[], None]], None] | None = None) -> bool:
        """Remove checkpoint ``name``: it disappears at once (rename / sidecar first), the rest follows.

        ``expected_id``: remove it only if it is still that checkpoint (not a newer one of the same
        name). ``later`` (local roots): runs what follows the rename (removing the renamed tree),
        e.g. on another thread. Returns whether anything was removed.
        """
        s = self.storage
        state = self.state(name)
        if state.kind == "free":
            return False
        if state.kind in ("busy", "foreign"):
            raise self._refuse(name, state)
        if expected_id is not None and state.kind == "committed":
            with contextlib.suppress(CheckpointNotFoundError, SidecarError):
                if CheckpointInfo.loads(s.read_bytes(f"{name}/{SIDECAR}")).id != expected_id:
                    return False
        if s.is_local:
            trash = f"{TRASH_PREFIX}{uuid.uuid4().hex[:12]}-{name}"
            # Retention's (``later``) is not fsynced: after a crash before the disk has it the checkpoint is
            # whole and is pruned again. A delete asked for by hand is durable when it returns.
            s.rename_local(name, trash, durable=later is None)
            if later is None:
                s.remove_tree(trash)
            else:
                later(lambda: s.remove_tree(trash))  # a trash folder left by a crash is removed by recover()
            return True
        lease = _LEASES.hold(s, name, "delete", name)
        try:
            s.remove(f"{name}/{SIDECAR}")
            s.remove_tree(name, last=MARKER)
        finally:
            _LEASES.release(lease)
        self.collect_blobs()
        return True

    def collect_blobs(self) -> list[str]:
        """Free the shared blobs no checkpoint names any more (object stores; see `_blobs.collect`); never raises."""
        try:
            return _blobs.collect(self.storage)
        except CheckpointError as exc:
            logger.warning("freeing unused blobs of %s failed (retried later): %s", self.storage.display(), exc)
            return []

    # --- recovery -----------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Finish or undo what dead writers left: roll committed replacements forward, remove the rest.

        Returns the folders removed or moved. Only the library's own folders are touched: staging
        and trash folders, and folders holding a lease whose holder is provably gone.
        """
        s = self.storage
        by_folder: dict[str, dict[str, Any]] = {}
        for rel, detail in s.list_files("").items():
            if "/" in rel:
                top, inner = rel.split("/", 1)
                by_folder.setdefault(top, {})[inner] = detail
        if s.is_local:  # empty local staging or trash folders have no files to list
            for top, kind in s.list_dir():
                if kind == "directory" and top.startswith((STAGING_PREFIX, TRASH_PREFIX)):
                    by_folder.setdefault(top, {})
        done: list[str] = []
        with self.lock:
            busy = {t.folder for t in self.inflight.values()} | set(self.inflight)
        stagings = sorted(f for f in by_folder if f.startswith(STAGING_PREFIX) and f not in busy)
        for folder in stagings:
            if self._recover_staging(folder, by_folder[folder]):
                done.append(folder)
        for folder, files in by_folder.items():
            if folder in busy or folder.startswith(STAGING_PREFIX):
                continue
            if folder.startswith(TRASH_PREFIX):
                s.remove_tree(folder)
                done.append(folder)
            elif not folder.startswith(".") and SIDECAR in files:
                for rel in files:  # sidecar rewrites killed before their rename (local roots)
                    # At worst a live rewrite in another process then fails and is logged there;
                    # the sidecar it meant to replace is intact either way.
                    if rel.startswith(SIDECAR + TMP_INFIX):
                        s.remove(f"{folder}/{rel}")
                        done.append(f"{folder}/{rel}")
            if not folder.startswith(".") and MARKER in files:
                state = self.state(folder)
                if state.kind == "dead":
                    s.remove_tree(folder, last=MARKER, settle=_SETTLE)
                    done.append(folder)
                elif state.kind == "committed" and state.lease is not None and not state.lease.alive():
                    s.remove(f"{folder}/{MARKER}")  # a stale lease on a committed checkpoint
        for folder in done:
            logger.info("cleaned up %s", s.display(folder))
        return done + self.collect_blobs()

    def _quiet(self, folder: str, files: dict[str, Any]) -> bool:
        """Whether nothing in ``folder`` changed for two lease periods (a writer would have refreshed)."""
        times = [_seconds(d) for d in files.values()]
        if not files and self.storage.is_local:
            with contextlib.suppress(OSError):
                times = [os.stat(self.storage.path(folder)).st_mtime]
        known = [t for t in times if t is not None]
        return bool(known) and time.time() - max(known) > 2 * LEASE_SECONDS

    def _recover_staging(self, folder: str, files: dict[str, Any]) -> bool:
        s = self.storage
        lease = None
        if MARKER in files:
            with contextlib.suppress(CheckpointNotFoundError):
                lease = Lease.decode(s.read_bytes(f"{folder}/{MARKER}"))
            if lease is not None and lease.alive():
                return False
        if lease is None and not self._quiet(folder, files):
            return False  # no readable lease yet: a writer may be creating it; judged once it is quiet
        staged = None
        if SIDECAR in files:
            with contextlib.suppress(CheckpointNotFoundError, SidecarError):
                staged = CheckpointInfo.loads(s.read_bytes(f"{folder}/{SIDECAR}"))
        if staged is None:
            s.remove_tree(folder, last=MARKER)
            return True
        name = staged.name
        target = self.state(name)
        current = None
        if target.kind == "committed":
            with contextlib.suppress(CheckpointNotFoundError, SidecarError):
                current = CheckpointInfo.loads(s.read_bytes(f"{name}/{SIDECAR}"))
        if target.kind in ("busy", "foreign") or (current is not None and current.created_at >= staged.created_at):
            s.remove_tree(folder, last=MARKER)  # superseded (or the name is not ours to fill)
            return True
        logger.warning("completing the interrupted replacement of %s", s.display(name))
        if s.is_local:
            self.move_local(folder, name)
        else:
            self.move_remote(folder, name, staged)
        return True
