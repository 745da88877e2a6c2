"""What is committed under a root: a view kept fresh from one listing, get, sort, paginate, summary.

The view maps each checkpoint folder to its parsed sidecar and the sidecar's stamp (local:
mtime, size and inode; object stores: the listing's ETag / time and size). A refresh lists the
root once and reads only the sidecars it has not seen or whose stamp changed, so its cost does
not grow with the number of checkpoints beyond that one listing. The manager's own writes
update the view directly (`note`, `forget`).

On object stores the same listing also proves that every file a sidecar lists is there with
its size: a checkpoint whose files are gone is never listed. It also gives each sidecar's size, so
the sidecars to read are fetched concurrently on the driver's event loop, one GET each bounded by
that size and no HEAD (`Storage.read_listed`): a thread per HEAD + GET made 1,000 sidecars on S3
take ~4 s instead of ~1 s. The ``ckpt`` command also keeps the sidecars it read in a local file
(`SidecarCache`), so its next run reads again only those whose listed stamp changed.
"""

from __future__ import annotations

import builtins
import concurrent.futures
import hashlib
import json
import logging
import math
import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._errors import CheckpointNotFoundError, InvalidArgumentError, InvalidNameError, SidecarError, StorageError
from ._layout import BLOBS_DIR, SIDECAR, STAGING_PREFIX
from ._sidecar import CHECKPOINT_TYPES, MAX_SIDECAR_BYTES, CheckpointInfo
from ._storage import Storage
from ._views import TENSORONE_METRICS, openai_list, tensorone_list, tensorone_metric, weights_file

__all__ = ["REFRESH_SECONDS", "Catalog", "CheckpointPage", "CheckpointSummary", "CheckpointWarning",
           "SidecarCache", "check_lookup_name", "stored_total"]

logger = logging.getLogger("ckpt_callback")

# How stale the view may be when a save re-tags and prunes (other processes' checkpoints show up
# within this time); `list`, `get` and friends always refresh.
REFRESH_SECONDS = 30.0
_READERS = 16  # threads reading sidecars one by one on object stores (what a concurrent batch did not read)
_BATCH_BYTES = 64 << 20  # listed sidecar bytes one concurrent batch fetches and holds before parsing

_SORT_ALIASES = {
    "createdAt": "created_at", "created_at": "created_at", "created": "created_at",
    "updatedAt": "updated_at", "updated_at": "updated_at",
    "step": "step", "epoch": "epoch", "name": "name", "size": "size",
    "trainLoss": "train_loss", "train_loss": "train_loss",
    "evalLoss": "eval_loss", "eval_loss": "eval_loss",
}
# TensorOne's sort keys (loss, accuracy, validationLoss, validationAccuracy) are aliases too,
# mapped from what was logged (see _views.TENSORONE_METRICS); a metric of exactly that name wins.


class CheckpointWarning(UserWarning):
    """Something about stored checkpoints a user should know, that does not stop the run."""


@dataclass(frozen=True)
class CheckpointSummary:
    """The best and latest checkpoints and the total size of all of them."""

    best: CheckpointInfo | None
    latest: CheckpointInfo | None
    total_size: int  # bytes on storage: data shared between checkpoints counted once
    total_logical_size: int | None = None  # bytes once decoded, every checkpoint counted in full

    def to_json(self) -> dict[str, Any]:
        return {
            "bestCheckpoint": self.best.to_json() if self.best else None,
            "latestCheckpoint": self.latest.to_json() if self.latest else None,
            "totalSize": self.total_size,
            "totalLogicalSize": self.total_size if self.total_logical_size is None else self.total_logical_size,
        }


def stored_total(infos: Sequence[CheckpointInfo]) -> int:
    """Bytes the checkpoints take on storage: a file shared by several (same sha256 and size) counts once.

    Example:
        >>> from ._sidecar import FileEntry
        >>> a = FileEntry("m.safetensors", 10, "0" * 64)
        >>> b = FileEntry("m.safetensors", 10, "0" * 64, shared=True)
        >>> stored_total([CheckpointInfo(name="x", step=1, files=(a,)), CheckpointInfo(name="y", step=2, files=(b,))])
        10
    """
    shared = {(f.sha256, f.size) for i in infos for f in i.files if f.shared}
    total, seen = 0, set()
    for info in infos:
        for f in info.files:
            key = (f.sha256, f.size)
            if key in shared:
                if key in seen:
                    continue
                seen.add(key)
            total += f.size
    return total


@dataclass(frozen=True)
class CheckpointPage:
    """One page of `CheckpointManager.list`, shaped like the hosted checkpoint list APIs.

    `to_json` is the native list object; `to_openai` and `to_tensorone` the same page in those
    services' shapes (see ``ckpt list --format``).
    """

    data: list[CheckpointInfo]
    first_id: str | None
    last_id: str | None
    has_more: bool
    total_count: int
    summary: CheckpointSummary
    root: str = ""  # the root URL as given: OpenAI's fine_tuned_model_checkpoint is ROOT/NAME
    signer: Callable[[CheckpointInfo], str | None] | None = field(default=None, repr=False, compare=False)

    def __iter__(self) -> Iterator[CheckpointInfo]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> CheckpointInfo:
        return self.data[index]

    def to_json(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [info.to_json() for info in self.data],
            "first_id": self.first_id,
            "last_id": self.last_id,
            "has_more": self.has_more,
            "totalCount": self.total_count,
            "summary": self.summary.to_json(),
        }

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's fine-tuning checkpoint list: ``fine_tuning.job.checkpoint`` items in a cursor page.

        The items validate as the ``openai`` SDK's ``FineTuningJobCheckpoint``; ``fine_tuning_job_id``
        is the run id, ``fine_tuned_model_checkpoint`` the checkpoint's location (``ROOT/NAME``).
        """
        return openai_list(self.data, has_more=self.has_more, root=self.root)

    def to_tensorone(self, *, include_metrics: bool = True, signed_urls: bool = True) -> dict[str, Any]:
        """TensorOne's checkpoint list: ``checkpoints``, ``totalCount``, ``summary``.

        ``downloadUrl`` is a URL of the weights signed for 1 h where the storage signs (object
        stores) and ``signed_urls`` is on, else null.
        """
        return tensorone_list(self.data, total_count=self.total_count, best=self.summary.best,
                              latest=self.summary.latest, total_size=self.summary.total_size,
                              include_metrics=include_metrics, sign=self.signer if signed_urls else None)


def check_lookup_name(name: object) -> str:
    """A name that may be looked up: one literal path component (a new name is checked more strictly)."""
    if not isinstance(name, str) or not name:
        raise InvalidNameError(f"checkpoint name must be a non-empty string, got {name!r}")
    if any(c in name for c in "/\\"):
        raise InvalidNameError(f"checkpoint name {name!r} contains a path separator; give one folder name")
    if name.startswith(".") or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidNameError(f"{name!r} is not a checkpoint name (names do not start with '.' or hold "
                               "control characters)")
    return name


class Catalog:
    """The committed checkpoints under one root, from their sidecars."""

    def __init__(self, storage: Storage, *, cache_dir: str | os.PathLike[str] | None = None) -> None:
        self.storage = storage
        # Object stores: sidecars kept on local disk between processes (see SidecarCache).
        self.cache = SidecarCache(cache_dir, storage) if cache_dir is not None and storage.has_buckets else None
        self._raw: dict[str, tuple[Any, bytes]] = {}  # with a cache: the bytes behind each entry of the view
        self._saved: dict[str, Any] | None = None  # with a cache: the stamps it holds, as last loaded or saved
        self._view: dict[str, tuple[Any, CheckpointInfo]] = {}
        self._warned: set[tuple[str, Any]] = set()
        self._lock = threading.Lock()
        self.damaged: dict[str, CheckpointInfo] = {}  # object stores: sidecars whose files are missing
        self._refreshed = -math.inf
        self.staged = False  # the last listing saw a committed staging folder (a replacement to roll forward)
        self.hidden: dict[str, str] = {}  # name -> id of checkpoints this process is deleting in the background

    # --- the view -----------------------------------------------------------------------------

    def refresh(self) -> builtins.list[CheckpointInfo]:
        """Every committed checkpoint, from one listing plus the sidecars that are new or changed."""
        with self._lock:
            hiding = dict(self.hidden)  # and those whose delete ends while this listing is under way
        stamps, present, self.staged = self._stamps()
        with self._lock:
            old = dict(self._view)
        view: dict[str, tuple[Any, CheckpointInfo]] = {}
        unseen = []
        for folder, stamp in stamps.items():
            cached = old.get(folder)
            if cached is not None and cached[0] == stamp:
                view[folder] = cached
            else:
                unseen.append(folder)
        if self.cache is not None and unseen:
            unseen = self._from_cache(unseen, stamps, view)
        sizes = {} if present is None else {f: present.get(f, {}).get(SIDECAR, 0) for f in unseen}
        for folder, info in zip(unseen, self._read_many(unseen, stamps, sizes), strict=True):
            if info is not None:
                view[folder] = (stamps[folder], info)
        damaged = {}
        if present is not None:  # object stores: never list a checkpoint whose files are gone
            for folder, (_, info) in builtins.list(view.items()):
                files = present.get(folder, {})
                blobs = present.get(BLOBS_DIR, {})
                if any((e.blob not in blobs) if e.blob else (e.path not in files) for e in info.files):
                    logger.warning("not listing %s: files of its sidecar are missing", self.storage.display(folder))
                    damaged[folder] = info
                    del view[folder]
        if self.cache is not None:
            # Every committed sidecar listed now, those whose files are missing too (they stay unlisted).
            self._raw = {f: entry for f, entry in self._raw.items() if stamps.get(f) == entry[0]}
            held = {f: e[0] for f, e in self._raw.items()}
            if held != self._saved:
                self.cache.save(self._raw)
                self._saved = held
        with self._lock:
            view = {f: v for f, v in view.items() if v[1].id not in (self.hidden.get(f), hiding.get(f))}
            self._view, self.damaged = view, damaged
            self._refreshed = time.monotonic()
        return [info for _, info in view.values()]

    def recent(self, max_age: float = REFRESH_SECONDS) -> builtins.list[CheckpointInfo]:
        """The view, refreshed first only if the last refresh is older than ``max_age`` seconds.

        What this process commits, rewrites or deletes is in the view at once (`note`, `forget`),
        so a save's re-tagging and pruning need no listing of their own: the cost per save stays
        flat however many checkpoints the root holds.
        """
        if time.monotonic() - self._refreshed > max_age:
            return self.refresh()
        return self.cached()

    def _stamps(self) -> tuple[dict[str, Any], dict[str, dict[str, int]] | None, bool]:
        s = self.storage
        staged = False
        if s.is_local:
            # Deliberate local fast path: one scandir and one stat per folder, no file listing.
            stamps: dict[str, Any] = {}
            try:
                entries = builtins.list(os.scandir(s.path()))
            except (FileNotFoundError, NotADirectoryError):
                return {}, None, False
            except OSError as exc:
                raise StorageError(f"cannot list {s.display()}: {exc}") from exc
            for entry in entries:
                if entry.name.startswith(STAGING_PREFIX):
                    staged = staged or os.path.exists(os.path.join(entry.path, SIDECAR))
                if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                    continue
                try:
                    st = os.stat(os.path.join(entry.path, SIDECAR))
                except (FileNotFoundError, NotADirectoryError):
                    continue
                stamps[entry.name] = (st.st_mtime_ns, st.st_size, st.st_ino)
            return stamps, None, staged
        stamps = {}
        present: dict[str, dict[str, int]] = {}
        for rel, detail in s.list_files("").items():
            if rel.startswith(STAGING_PREFIX) and rel.endswith("/" + SIDECAR):
                staged = True
            if rel.startswith(BLOBS_DIR + "/") and rel.count("/") == 1:  # shared blobs: their presence is checked
                present.setdefault(BLOBS_DIR, {})[rel.split("/", 1)[1]] = int(detail.get("size") or 0)
            if "/" not in rel or rel.startswith("."):
                continue
            folder, inner = rel.split("/", 1)
            present.setdefault(folder, {})[inner] = int(detail.get("size") or 0)
            if inner == SIDECAR:
                stamps[folder] = tuple(str(detail.get(k)) for k in ("ETag", "LastModified", "mtime", "created", "size"))
        return stamps, present, staged

    def _read_many(self, folders: Sequence[str], stamps: dict[str, Any],
                   sizes: dict[str, int]) -> builtins.list[CheckpointInfo | None]:
        """The sidecars of ``folders`` (None: gone or invalid).

        Object stores: the listing gave each sidecar's size, so they are fetched concurrently without
        a HEAD each (`Storage.read_listed`), in batches of at most `_BATCH_BYTES` listed bytes (what
        is held before parsing). What that did not read (local roots, synchronous drivers, sidecars
        empty, oversized or changed since the listing, failed requests) is read one by one.
        """
        batches: builtins.list[builtins.list[str]] = [[]]
        held = 0
        rest = []
        for folder in folders:
            size = sizes.get(folder, 0)
            if not 0 < size <= MAX_SIDECAR_BYTES:
                rest.append(folder)
                continue
            if held + size > _BATCH_BYTES and batches[-1]:
                batches.append([])
                held = 0
            batches[-1].append(folder)
            held += size
        found: dict[str, CheckpointInfo | None] = {}
        for batch in batches:
            raws = self.storage.read_listed([(f"{f}/{SIDECAR}", sizes[f]) for f in batch]) if batch else []
            for folder, raw in zip(batch, raws, strict=True):
                if raw is None:
                    rest.append(folder)
                else:
                    found[folder] = self._read(folder, stamps[folder], raw)
        workers = 1 if self.storage.is_local or len(rest) < 2 else _READERS
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="ckpt-catalog") as pool:
            found.update(zip(rest, pool.map(lambda f: self._read(f, stamps[f]), rest), strict=True))
        return [found[f] for f in folders]

    def _read(self, folder: str, stamp: Any, raw: bytes | None = None) -> CheckpointInfo | None:
        """Folder ``folder``'s sidecar from ``raw`` (read now when None); None if it is gone or invalid."""
        where = self.storage.display(folder, SIDECAR)
        try:
            if raw is None:
                raw = self.storage.read_bytes(f"{folder}/{SIDECAR}", limit=MAX_SIDECAR_BYTES)
            info = CheckpointInfo.loads(raw, where=where)
            if self.cache is not None:
                self._raw[folder] = (stamp, raw)
        except CheckpointNotFoundError:
            return None  # deleted between the listing and the read
        except SidecarError as exc:
            if (folder, stamp) not in self._warned:
                self._warned.add((folder, stamp))
                warnings.warn(f"skipping checkpoint folder {folder!r}: {exc}", CheckpointWarning, stacklevel=4)
                logger.warning("skipping checkpoint folder %r: %s", folder, exc)
            return None
        return info if info.name == folder else info.replace(name=folder, updated_at=info.updated_at)

    def _from_cache(self, folders: builtins.list[str], stamps: dict[str, Any],
                    view: dict[str, tuple[Any, CheckpointInfo]]) -> builtins.list[str]:
        """Put into ``view`` the sidecars of ``folders`` the cache holds with the listed stamp; return the others."""
        assert self.cache is not None
        kept = self.cache.load()
        self._saved = {f: e[0] for f, e in kept.items()}
        rest = []
        for folder in folders:
            entry = kept.get(folder)
            info = self._parse(folder, entry[1]) if entry is not None and entry[0] == stamps[folder] else None
            if entry is None or info is None:
                rest.append(folder)
                continue
            view[folder] = (stamps[folder], info)
            self._raw[folder] = entry
        return rest

    def _parse(self, folder: str, raw: bytes) -> CheckpointInfo | None:
        """Folder ``folder``'s sidecar from bytes kept on disk, parsed as strictly as a fresh read; None if they
        do not parse (the sidecar is then read from the root)."""
        try:
            info = CheckpointInfo.loads(raw, where=self.storage.display(folder, SIDECAR))
        except SidecarError:
            return None
        return info if info.name == folder else info.replace(name=folder, updated_at=info.updated_at)

    def cached(self) -> builtins.list[CheckpointInfo]:
        """The view as last refreshed or noted, without touching storage."""
        with self._lock:
            return [info for _, info in self._view.values()]

    def note(self, info: CheckpointInfo) -> None:
        """This process committed or rewrote ``info``: the view has it without a listing."""
        with self._lock:
            self._view[info.name] = (None, info)

    def forget(self, name: str) -> None:
        with self._lock:
            self._view.pop(name, None)

    def hide(self, info: CheckpointInfo) -> None:
        """``info`` is being deleted: out of the view at once, and of every listing until `unhide`."""
        with self._lock:
            self.hidden[info.name] = info.id
            self._view.pop(info.name, None)

    def unhide(self, info: CheckpointInfo) -> None:
        with self._lock:
            if self.hidden.get(info.name) == info.id:
                del self.hidden[info.name]

    # --- lookups ------------------------------------------------------------------------------

    def read(self, name: str) -> CheckpointInfo | None:
        """The committed sidecar of folder ``name`` read now, or None."""
        where = self.storage.display(name, SIDECAR)
        try:
            raw = self.storage.read_bytes(f"{name}/{SIDECAR}", limit=MAX_SIDECAR_BYTES)
            info = CheckpointInfo.loads(raw, where=where)
        except CheckpointNotFoundError:
            return None
        return info if info.name == name else info.replace(name=name, updated_at=info.updated_at)

    def require_root(self) -> None:
        """A local root must exist; on object stores its bucket must (an empty prefix is an empty root)."""
        s = self.storage
        if s.is_local:
            if not s.exists():
                raise CheckpointNotFoundError(f"checkpoint root {s.display()} does not exist")
            return
        bucket = s.root.split("/", 1)[0]
        if s.has_buckets and bucket and not s.bucket_exists(bucket):
            raise CheckpointNotFoundError(f"bucket {bucket!r} of {s.display()} does not exist")

    def get(self, name: str) -> CheckpointInfo:
        """Checkpoint ``name`` (or id), read now; see `CheckpointManager.get`."""
        check_lookup_name(name)
        info = self.read(name)
        if info is not None:
            return info
        self.require_root()
        found = next((i for i in self.refresh() if i.id == name), None)
        if found is not None:
            return found
        hint = ""
        if self.storage.list_files(name):
            hint = " (the folder exists but has no checkpoint.json: it is incomplete or not a checkpoint)"
        raise CheckpointNotFoundError(f"checkpoint {name!r} not found in {self.storage.display()}{hint}")

    def page(
        self,
        infos: Sequence[CheckpointInfo],
        *,
        sort_by: str,
        order: str,
        limit: int | None,
        after: str | None,
        type: str | None,
        summary: CheckpointSummary,
    ) -> CheckpointPage:
        """One sorted, filtered page of ``infos``."""
        if order not in ("asc", "desc"):
            raise InvalidArgumentError(f"order must be 'asc' or 'desc', got {order!r}")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 100):
            raise InvalidArgumentError(f"limit must be an integer from 1 to 100, got {limit!r}")
        if type is not None and type not in CHECKPOINT_TYPES:
            raise InvalidArgumentError(f"type must be one of {', '.join(CHECKPOINT_TYPES)}, got {type!r}")
        ordered = sort(infos, sort_by, descending=order == "desc")
        if type is not None:
            ordered = [i for i in ordered if i.type == type]
        start = 0
        if after is not None:
            position = next((k for k, i in enumerate(ordered) if after in (i.id, i.name)), None)
            if position is None:
                raise CheckpointNotFoundError(
                    f"no checkpoint with id {after!r} in {self.storage.display()} (used as 'after')")
            start = position + 1
        data = ordered[start : start + limit] if limit is not None else ordered[start:]
        return CheckpointPage(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=start + len(data) < len(ordered),
            total_count=len(ordered),
            summary=summary,
            root=self.storage.root if self.storage.is_local else self.storage.url,  # local: absolute
            signer=self.sign,
        )

    def sign(self, info: CheckpointInfo, expires: int = 3600) -> str | None:
        """A pre-signed URL of ``info``'s weights file, or None where the storage cannot sign."""
        rel = weights_file(info)
        entry = next((f for f in info.files if f.path == rel), None)  # a blob entry's bytes are in the blob area
        try:
            return self.storage.sign(entry.location(info.name) if entry else f"{info.name}/{rel}", expires)
        except StorageError:  # this storage or these credentials cannot sign
            return None


class SidecarCache:
    """The sidecars of one object-store root, kept in a local file between processes (the ``ckpt`` command's).

    Each entry is a sidecar's bytes and the stamp (ETag, time, size) the listing gave when they were
    read: a later listing showing the same stamp takes them from here instead of a GET. The root's
    listing still decides what exists (a deleted or uncommitted checkpoint is never listed from here),
    the bytes are parsed as strictly as a fresh read, and an entry that does not parse is read again.
    The file is named by a hash of the root URL and endpoint (never credentials) and replaced whole
    (atomic rename); one that cannot be read or written is ignored.
    """

    VERSION = 1
    LIMIT = 256 << 20  # a larger file is not ours: ignored

    def __init__(self, folder: str | os.PathLike[str], storage: Storage) -> None:
        self.identity = storage.identity()
        digest = hashlib.sha256(self.identity.encode()).hexdigest()[:32]
        self.path = os.path.join(os.fspath(folder), f"catalog-{digest}.json")

    def load(self) -> dict[str, tuple[Any, bytes]]:
        """``{folder: (stamp, sidecar bytes)}`` as last saved for this root; ``{}`` when there is none."""
        try:
            with open(self.path, "rb") as f:
                data = f.read(self.LIMIT + 1)
            doc = json.loads(data) if len(data) <= self.LIMIT else None
            if not isinstance(doc, dict) or doc.get("version") != self.VERSION or doc.get("root") != self.identity:
                return {}
            return {folder: (tuple(stamp), text.encode())
                    for folder, (stamp, text) in doc["entries"].items()
                    if isinstance(folder, str) and isinstance(stamp, list) and isinstance(text, str)}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            if not isinstance(exc, FileNotFoundError):
                logger.debug("ignoring the catalog cache %s: %s", self.path, exc)
            return {}

    def save(self, entries: dict[str, tuple[Any, bytes]]) -> None:
        """Replace the kept sidecars of this root with ``entries``."""
        try:
            doc = {"version": self.VERSION, "root": self.identity,
                   "entries": {f: [builtins.list(stamp), raw.decode()] for f, (stamp, raw) in entries.items()}}
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            tmp = f"{self.path}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(doc, f)
                os.replace(tmp, self.path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except (OSError, UnicodeDecodeError) as exc:  # a read-only home, a full disk: only slower next time
            logger.debug("cannot write the catalog cache %s: %s", self.path, exc)


def sort(infos: Sequence[CheckpointInfo], sort_by: str, *, descending: bool) -> builtins.list[CheckpointInfo]:
    """Sort by ``sort_by``; entries without the value go last either way; ties by step, time, name."""
    attr = _SORT_ALIASES.get(sort_by)
    known_metrics = {k for i in infos for k in i.metrics}
    alias = sort_by in TENSORONE_METRICS and sort_by not in known_metrics
    if attr is None and sort_by not in known_metrics and not alias:
        valid = sorted({k for k in _SORT_ALIASES if not k.endswith(("_at", "_loss")) and k != "created"}
                       | set(TENSORONE_METRICS))
        raise InvalidArgumentError(
            f"cannot sort by {sort_by!r}: use one of {', '.join(valid)} or a metric name "
            f"({', '.join(sorted(known_metrics)) or 'none recorded yet'})"
        )

    def value(info: CheckpointInfo) -> Any:
        if attr is not None:
            return getattr(info, attr)
        return tensorone_metric(info, sort_by) if alias else info.metrics.get(sort_by)

    def tie(info: CheckpointInfo) -> tuple[int, str, str]:
        return (info.step, info.created_at, info.name)

    present = sorted((i for i in infos if value(i) is not None), key=lambda i: (value(i), tie(i)), reverse=descending)
    missing = sorted((i for i in infos if value(i) is None), key=tie, reverse=descending)
    return present + missing
