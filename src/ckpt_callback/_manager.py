"""The core: `CheckpointManager` saves, lists, loads, verifies and prunes checkpoints under one root.

Integrations (the plain PyTorch hook, the HF Trainer callback) are thin adapters over it.
Its view of what exists always comes from the sidecars on storage, so "best" and retention
survive restarts, other processes and a changed directory.
"""

from __future__ import annotations

import atexit
import builtins
import concurrent.futures
import concurrent.futures.thread  # its exit hook must be registered before ours
import hashlib
import json
import logging
import os
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._distributed import from_rank0, is_writer
from ._errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidArgumentError,
    SaveError,
    SidecarError,
    StorageError,
)
from ._policy import RetentionPolicy, newest
from ._serialization import (
    MODEL_INDEX,
    aliases_from_metadata,
    flatten_state,
    plan_model_files,
    read_safetensors,
    unflatten_state,
    write_chunks,
    write_safetensors,
)
from ._sidecar import (
    CHECKPOINT_TYPES,
    RESERVED_NAMES,
    SIDECAR_NAME,
    CheckpointInfo,
    FileEntry,
    clean_metrics,
    clean_number,
    validate_name,
)
from ._snapshot import StagingArea
from ._storage import INCOMPLETE_MARKER, STAGING_PREFIX, Storage, staging_owner_alive
from ._training import capture_rng, describe_model, model_state, restore_rng, unwrap_model

__all__ = ["CheckpointManager", "CheckpointPage", "CheckpointSummary", "CheckpointWarning", "VerifyResult"]

logger = logging.getLogger("ckpt_callback")

OPTIMIZER_FILE = "optimizer.safetensors"
TRAINING_STATE_FILE = "training_state.json"
_SORT_ALIASES = {
    "createdAt": "created_at", "created_at": "created_at", "created": "created_at",
    "updatedAt": "updated_at", "updated_at": "updated_at",
    "step": "step", "epoch": "epoch", "name": "name", "size": "size",
    "trainLoss": "train_loss", "train_loss": "train_loss",
    "evalLoss": "eval_loss", "eval_loss": "eval_loss",
}


class CheckpointWarning(UserWarning):
    """Something about stored checkpoints a user should know, that does not stop the run."""


@dataclass(frozen=True)
class CheckpointSummary:
    """The best and latest checkpoints and the total size of all of them."""

    best: CheckpointInfo | None
    latest: CheckpointInfo | None
    total_size: int

    def to_json(self) -> dict[str, Any]:
        return {
            "bestCheckpoint": self.best.to_json() if self.best else None,
            "latestCheckpoint": self.latest.to_json() if self.latest else None,
            "totalSize": self.total_size,
        }


@dataclass(frozen=True)
class CheckpointPage:
    """One page of `CheckpointManager.list`, shaped like the hosted checkpoint list APIs."""

    data: list[CheckpointInfo]
    first_id: str | None
    last_id: str | None
    has_more: bool
    total_count: int
    summary: CheckpointSummary

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


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of re-hashing one checkpoint: ``ok`` or the ``problems`` found, one per bad file."""

    name: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class _Job:
    """Everything a save needs, snapshotted, so it can run on a background thread."""

    info: CheckpointInfo
    model: dict[str, torch.Tensor]
    training: tuple[Any, dict[str, torch.Tensor]] | None
    files: dict[str, bytes]
    replace: bool


class CheckpointManager:
    """Crash-safe safetensors checkpoints with a sidecar, type tags and retention, on any fsspec root.

    Args:
        root: a local folder or an fsspec URL (``s3://bucket/run``, ``memory://x``, ``gs://...``).
        keep_last: how many of the newest automatic checkpoints retention keeps (None: all).
        keep_best: how many of the best checkpoints by ``monitor`` are kept besides.
        monitor: what "best" means: ``evalLoss``, ``trainLoss`` or any metric name.
        mode: ``"min"`` or ``"max"`` for ``monitor``.
        storage_options: passed to ``fsspec.url_to_fs`` (endpoint, credentials, ...).
        async_save: snapshot the state and write it on a background thread.
        max_shard_size: largest weights file before splitting into HF-style shards.
        writer: whether this process writes (default: rank 0 of torch.distributed, else True).
        save_threads: CPU threads a save may keep busy: 2 hashes beside the writes (default),
            1 hashes inline and leaves more of the CPU to training.

    Example:
        >>> import torch
        >>> m = CheckpointManager("memory://doc-manager", keep_last=2)
        >>> info = m.save({"w": torch.ones(2)}, step=10, train_loss=0.5)
        >>> info.name, info.type, m.latest().step
        ('checkpoint-10', 'automatic', 10)
        >>> m.load("latest")["w"].tolist()
        [1.0, 1.0]
    """

    def __init__(
        self,
        root: str,
        *,
        keep_last: int | None = 3,
        keep_best: int = 1,
        monitor: str = "evalLoss",
        mode: str = "min",
        storage_options: dict[str, Any] | None = None,
        async_save: bool = False,
        max_shard_size: int | str = "5GB",
        writer: bool | None = None,
        save_threads: int = 2,
    ) -> None:
        if not isinstance(save_threads, int) or save_threads < 1:
            raise InvalidArgumentError(f"save_threads must be a positive integer, got {save_threads!r}")
        self.storage = Storage(root, storage_options)
        self.retention = RetentionPolicy(keep_last=keep_last, keep_best=keep_best, monitor=monitor, mode=mode)
        self.async_save = bool(async_save)
        self.max_shard_size = max_shard_size
        self.writer = is_writer() if writer is None else bool(writer)
        self.resumed_from: str | None = None
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: concurrent.futures.Future[CheckpointInfo] | None = None
        self._inflight: _Job | None = None  # the background job whose sidecar is not yet written
        self._written: set[str] = set()  # names this manager committed (safe to promote)
        self._cleaned = False
        self._warned_monitor = False
        self._staging = StagingArea()
        self._hasher = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-hash") if save_threads > 1 else None
        )

    @property
    def root(self) -> str:
        return self.storage.url

    def __repr__(self) -> str:
        policy = self.retention
        return f"CheckpointManager({self.root!r}, keep_last={policy.keep_last}, monitor={policy.monitor!r})"

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_writable(self) -> None:
        """Create the root if needed and prove the writer can write it, before any training step.

        Under torch.distributed every rank raises `StorageError` if the writer (rank 0) cannot.
        """
        problem = None
        if self.writer:
            try:
                self.storage.check_writable()
            except StorageError as exc:
                problem = str(exc)
        problem = from_rank0(problem)
        if problem is not None:
            raise StorageError(problem)

    # --- saving -----------------------------------------------------------------------------------

    def save(
        self,
        state: Any,
        *,
        step: int,
        epoch: float | None = None,
        train_loss: float | None = None,
        eval_loss: float | None = None,
        metrics: Mapping[str, Any] | None = None,
        type: str = "automatic",
        name: str | None = None,
        description: str | None = None,
        optimizer: Any = None,
        scheduler: Any = None,
        extra_state: Mapping[str, Any] | None = None,
        rng: bool | None = None,
        files: Mapping[str, bytes] | None = None,
        model_name: str | None = None,
        version: str | None = None,
        inference_ready: bool | None = None,
    ) -> CheckpointInfo | None:
        """Save a checkpoint and apply retention once it is committed.

        Args:
            state: a ``torch.nn.Module`` or a state dict (name → tensor).
            step: optimizer steps done so far; the default name is ``checkpoint-{step}``.
            epoch, train_loss, eval_loss, metrics: recorded in the sidecar (None stays null).
            type: ``automatic``, ``manual`` or ``final`` (``best`` is assigned, not asked for).
            name: folder name (default ``checkpoint-{step}``); a taken name raises for manual saves.
            description: free text for the sidecar.
            optimizer, scheduler: saved as training state for exact resume (with RNG states).
            extra_state: more JSON-able (tensors allowed) state to restore with `restore`.
            rng: save RNG states (default: when an optimizer is given).
            files: extra small files (relative path → bytes), e.g. ``config.json``.
            model_name, version, inference_ready: override what is derived from ``state``.

        Returns:
            The committed checkpoint's `CheckpointInfo`; with ``async_save`` the one that will be
            committed (use `wait` to be sure); None in processes that do not write.

        Raises:
            SaveError: this save or a previous background one failed.
            CheckpointExistsError: ``name`` is already a committed checkpoint.
            InvalidNameError, InvalidArgumentError: bad name, type or state.
        """
        self._raise_pending()
        if type not in ("automatic", "manual", "final"):
            raise InvalidArgumentError(f"type must be 'automatic', 'manual' or 'final', got {type!r}")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise InvalidArgumentError(f"step must be a non-negative integer, got {step!r}")
        explicit = name is not None
        name = validate_name(name if explicit else f"checkpoint-{step}")
        if not self.writer:
            return None
        module = unwrap_model(state)
        derived_name, derived_version = describe_model(module)
        info = CheckpointInfo(
            name=name,
            step=step,
            type=type,
            description=description,
            epoch=clean_number(epoch),
            train_loss=clean_number(train_loss),
            eval_loss=clean_number(eval_loss),
            metrics=clean_metrics(metrics),
            model=model_name if model_name is not None else derived_name,
            version=version if version is not None else derived_version,
            inference_ready=bool(inference_ready),
        )
        if not self._cleaned:
            self.cleanup_incomplete()
            self._cleaned = True

        existing = self._committed(name)
        if existing is not None:
            if not explicit and type != "automatic" and (name in self._written or name == self.resumed_from):
                return self._promote(existing, info)
            if explicit:
                raise CheckpointExistsError(
                    f"checkpoint {name!r} already exists in {self.root}; choose another name or delete it first"
                )
            warnings.warn(
                f"replacing checkpoint {name!r} in {self.root}, left by an earlier run", CheckpointWarning, stacklevel=2
            )

        tensors = model_state(module)
        training = None
        if optimizer is not None or scheduler is not None or extra_state or rng:
            payload: dict[str, Any] = {}
            if optimizer is not None:
                payload["optimizer"] = optimizer.state_dict()
            if scheduler is not None:
                payload["scheduler"] = scheduler.state_dict()
            if extra_state:
                payload["extra"] = dict(extra_state)
            if rng if rng is not None else optimizer is not None:
                payload["rng"] = capture_rng()
            training = flatten_state(payload)
        job = _Job(info=info, model=tensors, training=training, files=dict(files or {}), replace=existing is not None)

        if not self.async_save:
            try:
                return self._run(job)
            except CheckpointError:
                raise
            except Exception as exc:
                raise SaveError(f"saving checkpoint {name!r} to {self.root} failed: {exc}") from exc
        self._snapshot(job)
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-save")
        with self._lock:
            self._inflight = job
        self._pending = self._executor.submit(self._run_background, job)
        _WITH_PENDING_SAVES.add(self)
        return info

    def _snapshot(self, job: _Job) -> None:
        """Copy every tensor into the reused staging buffers so training may change the originals now."""
        flat = {f"model/{k}": v for k, v in job.model.items()}
        if job.training is not None:
            flat.update({f"training/{k}": v for k, v in job.training[1].items()})
        snap = self._staging.snapshot(flat)
        job.model = {k: snap[f"model/{k}"] for k in job.model}
        if job.training is not None:
            skeleton, tensors = job.training
            job.training = (skeleton, {k: snap[f"training/{k}"] for k in tensors})

    def _run_background(self, job: _Job) -> CheckpointInfo:
        try:
            return self._run(job)
        except Exception as exc:
            logger.error("background save of checkpoint %r to %s failed: %s", job.info.name, self.root, exc)
            raise
        finally:
            with self._lock:
                self._inflight = None

    def _run(self, job: _Job) -> CheckpointInfo:
        started = time.perf_counter()
        txn = self.storage.begin(job.info.name)
        try:
            entries = self._write_files(txn, job)
            with self._lock:  # metrics that arrived while the files were written
                info = job.info
                self._inflight = None
            info = info.replace(files=tuple(entries), size=sum(e.size for e in entries))
            if job.replace:
                self._delete_committed(info.name)
            txn.commit(info.dumps().encode())
        except BaseException:
            txn.abort()
            raise
        self._written.add(info.name)
        logger.info("saved %s (%s, %s bytes) to %s in %.2fs", info.name, info.type, info.size, self.root,
                    time.perf_counter() - started)
        return self._after_commit(info.name) or info

    def _write_files(self, txn: Any, job: _Job) -> builtins.list[FileEntry]:
        entries: builtins.list[FileEntry] = []
        plan = plan_model_files(job.model, max_shard_size=self.max_shard_size)
        metadata = {"format": "pt"}
        if plan.aliases:
            metadata["ckpt_callback.aliases"] = json.dumps(plan.aliases, sort_keys=True)
        for filename, tensors in plan.files.items():
            size, sha = txn.write(filename, lambda f, t=tensors: write_safetensors(f, t, metadata, hasher=self._hasher))
            entries.append(FileEntry(filename, size, sha))
        blobs = dict(job.files)
        if plan.index is not None:
            blobs[MODEL_INDEX] = (json.dumps(plan.index, indent=2, sort_keys=True) + "\n").encode()
        if job.training is not None:
            skeleton, tensors = job.training
            size, sha = txn.write(
                OPTIMIZER_FILE, lambda f: write_safetensors(f, tensors, {"format": "pt"}, hasher=self._hasher)
            )
            entries.append(FileEntry(OPTIMIZER_FILE, size, sha))
            state = {"format": "ckpt_callback.training_state/1", "step": job.info.step, "epoch": job.info.epoch,
                     "state": skeleton}
            blobs[TRAINING_STATE_FILE] = (json.dumps(state, allow_nan=True) + "\n").encode()
        for rel, data in blobs.items():
            size, sha = txn.write(rel, lambda f, d=data: write_chunks(f, [d]))
            entries.append(FileEntry(rel, size, sha))
        return entries

    def _promote(self, existing: CheckpointInfo, new: CheckpointInfo) -> CheckpointInfo:
        """Re-tag the checkpoint already saved at this step (e.g. the last automatic one becomes final)."""
        merged = existing.replace(
            type=new.type,
            description=new.description or existing.description,
            epoch=new.epoch if new.epoch is not None else existing.epoch,
            train_loss=new.train_loss if new.train_loss is not None else existing.train_loss,
            eval_loss=new.eval_loss if new.eval_loss is not None else existing.eval_loss,
            metrics={**existing.metrics, **new.metrics},
        )
        self._write_sidecar(merged)
        return self._after_commit(merged.name) or merged

    def _after_commit(self, name: str) -> CheckpointInfo | None:
        """Re-tag best and apply retention, now that ``name`` or new metrics are committed.

        One read of the sidecars serves both; returns ``name``'s sidecar as it now stands.
        """
        infos = self._scan()
        changes = self.retention.retag(infos)
        for k, info in enumerate(infos):
            if info.name in changes:
                infos[k] = info.replace(type=changes[info.name])
                self._write_sidecar(infos[k])
        self._apply_retention(infos)
        return next((i for i in infos if i.name == name), None)

    def _warn_monitor_at_end(self, infos: Sequence[CheckpointInfo]) -> None:
        """When saving ends with no checkpoint carrying the monitored value, say so once.

        Integrations warn earlier, when an evaluation arrives without it (they know what an
        evaluation is; the manager cannot tell one from a training log).
        """
        if infos and self.retention.best(infos) is None:
            known = sorted({k for i in infos for k in i.metrics} | {
                k for i in infos for k, v in (("evalLoss", i.eval_loss), ("trainLoss", i.train_loss)) if v is not None})
            self.warn_missing_monitor(f"checkpoints under {self.root} record {', '.join(known) or 'no metrics'}")

    def warn_missing_monitor(self, why: str) -> None:
        """Warn (once per manager) that ``monitor`` never appears, so no checkpoint is tagged best.

        Integrations that know which metrics exist call this with ``why`` naming them.
        """
        if self._warned_monitor:
            return
        self._warned_monitor = True
        message = (f"monitor {self.retention.monitor!r} never appears ({why}); no checkpoint is tagged best "
                   "until it does: pass monitor= one of those names")
        warnings.warn(message, CheckpointWarning, stacklevel=3)
        logger.warning("%s", message)

    def update_metrics(
        self,
        step: int,
        *,
        eval_loss: float | None = None,
        train_loss: float | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> CheckpointInfo | None:
        """Add metrics that arrive after the checkpoint of ``step`` was saved (e.g. an evaluation).

        The checkpoint's sidecar gets them (``updatedAt`` moves) and they count for ``best``.
        Returns the updated checkpoint, or None when no checkpoint exists at that step.
        """
        eval_loss, train_loss, clean = clean_number(eval_loss), clean_number(train_loss), clean_metrics(metrics)
        if not self.writer:
            return None

        def merge(info: CheckpointInfo) -> CheckpointInfo:
            return info.replace(
                eval_loss=eval_loss if eval_loss is not None else info.eval_loss,
                train_loss=train_loss if train_loss is not None else info.train_loss,
                metrics={**info.metrics, **clean},
            )

        with self._lock:
            job = self._inflight
            if job is not None and job.info.step == step:
                job.info = merge(job.info)  # the background writer has not written its sidecar yet
                return job.info
        if not any(i.step == step for i in self._scan()):
            return None  # nothing to update: do not wait for a background save
        self.wait()  # it may be re-tagging sidecars; rewrite after it, from a fresh read
        match = [i for i in self._scan() if i.step == step]
        if not match:
            return None
        target = max(match, key=lambda i: i.created_at)
        updated = merge(target)
        self._write_sidecar(updated)
        return self._after_commit(updated.name) or updated

    def _write_sidecar(self, info: CheckpointInfo) -> None:
        self.storage.write_bytes_atomic(f"{info.name}/{SIDECAR_NAME}", info.dumps().encode())

    def wait(self) -> CheckpointInfo | None:
        """Block until the background save (if any) is committed; raise `SaveError` if it failed."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        try:
            return pending.result()
        except CheckpointError as exc:
            raise SaveError(f"background save failed: {exc}") from exc
        except Exception as exc:
            raise SaveError(f"background save to {self.root} failed: {exc}") from exc

    def _raise_pending(self) -> None:
        if self._pending is not None:
            self.wait()

    def close(self) -> None:
        """Wait for the last save and release the background threads and staging buffers."""
        try:
            self.wait()
            if self._written and self.writer and not self._warned_monitor:
                self._warn_monitor_at_end(self._scan())
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self._staging = StagingArea()

    # --- reading ----------------------------------------------------------------------------------

    def _scan(self) -> builtins.list[CheckpointInfo]:
        """Every committed checkpoint, read from the sidecars; malformed ones skipped with a warning."""
        folders = [n for n, kind in self.storage.list_dir() if kind == "directory" and not n.startswith(".")]
        infos: builtins.list[CheckpointInfo] = []
        for folder in folders:
            try:
                raw = self.storage.read_bytes(f"{folder}/{SIDECAR_NAME}")
            except CheckpointNotFoundError:
                continue  # incomplete: never listed
            try:
                info = CheckpointInfo.loads(raw, where=self.storage.display(folder, SIDECAR_NAME))
            except SidecarError as exc:
                warnings.warn(f"skipping checkpoint folder {folder!r}: {exc}", CheckpointWarning, stacklevel=3)
                logger.warning("skipping checkpoint folder %r: %s", folder, exc)
                continue
            if info.name != folder:
                info = info.replace(name=folder, updated_at=info.updated_at)
            infos.append(info)
        return infos

    def _require_root(self) -> None:
        if not self.storage.exists():
            raise CheckpointNotFoundError(f"checkpoint root {self.root} does not exist")

    def _committed(self, name: str) -> CheckpointInfo | None:
        try:
            raw = self.storage.read_bytes(f"{name}/{SIDECAR_NAME}")
        except CheckpointNotFoundError:
            return None
        return CheckpointInfo.loads(raw, where=self.storage.display(name, SIDECAR_NAME))

    def list(
        self,
        *,
        sort_by: str = "createdAt",
        order: str = "desc",
        limit: int | None = None,
        after: str | None = None,
        type: str | None = None,
    ) -> CheckpointPage:
        """A page of committed checkpoints.

        Args:
            sort_by: ``createdAt``, ``updatedAt``, ``step``, ``epoch``, ``trainLoss``, ``evalLoss``,
                ``name``, ``size`` or any metric name; checkpoints without the value come last.
            order: ``"asc"`` or ``"desc"``.
            limit: page size, 1 to 100 (None: all).
            after: the id (or name) of the last checkpoint of the previous page.
            type: only checkpoints of this type.

        Example:
            >>> m = CheckpointManager("memory://doc-list")
            >>> _ = [m.save({"w": torch.zeros(1)}, step=s) for s in (1, 2, 3)]
            >>> page = m.list(sort_by="step", order="asc", limit=2)
            >>> [i.step for i in page], page.has_more
            ([1, 2], True)
            >>> [i.step for i in m.list(sort_by="step", order="asc", after=page.last_id)]
            [3]
        """
        if order not in ("asc", "desc"):
            raise InvalidArgumentError(f"order must be 'asc' or 'desc', got {order!r}")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 100):
            raise InvalidArgumentError(f"limit must be an integer from 1 to 100, got {limit!r}")
        if type is not None and type not in CHECKPOINT_TYPES:
            raise InvalidArgumentError(f"type must be one of {', '.join(CHECKPOINT_TYPES)}, got {type!r}")
        self._require_root()
        infos = self._scan()
        ordered = _sort(infos, sort_by, descending=order == "desc")
        if type is not None:
            ordered = [i for i in ordered if i.type == type]
        start = 0
        if after is not None:
            position = next((k for k, i in enumerate(ordered) if after in (i.id, i.name)), None)
            if position is None:
                raise CheckpointNotFoundError(f"no checkpoint with id {after!r} in {self.root} (used as 'after')")
            start = position + 1
        data = ordered[start : start + limit] if limit is not None else ordered[start:]
        return CheckpointPage(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=start + len(data) < len(ordered),
            total_count=len(ordered),
            summary=CheckpointSummary(
                best=self.retention.best(infos), latest=newest(infos), total_size=sum(i.size for i in infos)
            ),
        )

    def get(self, name: str) -> CheckpointInfo:
        """The sidecar of checkpoint ``name`` (``latest``, ``best``, ``final`` and ids work too).

        Raises:
            CheckpointNotFoundError: no committed checkpoint of that name.
            SidecarError: its sidecar is malformed or of an unknown schema.
        """
        if name in RESERVED_NAMES:
            infos = self._scan()
            if name == "latest":
                found = newest(infos)
            elif name == "best":
                found = self.retention.best(infos)
            else:
                found = newest(i for i in infos if i.type == "final")
            if found is None:
                self._require_root()
                raise CheckpointNotFoundError(f"there is no {name} checkpoint in {self.root}")
            return found
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or ".." in name:
            validate_name(name)
        info = self._committed(name)
        if info is not None:
            return info if info.name == name else info.replace(name=name, updated_at=info.updated_at)
        self._require_root()
        by_id = [i for i in self._scan() if i.id == name]
        if by_id:
            return by_id[0]
        hint = " (the folder exists but has no checkpoint.json: it is incomplete)" if self.storage.exists(name) else ""
        raise CheckpointNotFoundError(f"checkpoint {name!r} not found in {self.root}{hint}")

    def latest(self) -> CheckpointInfo | None:
        """The checkpoint with the highest step, or None."""
        return newest(self._scan()) if self.storage.exists() else None

    def best(self) -> CheckpointInfo | None:
        """The checkpoint with the best ``monitor`` value, or None."""
        return self.retention.best(self._scan()) if self.storage.exists() else None

    # --- deleting ---------------------------------------------------------------------------------

    def delete(self, name: str) -> CheckpointInfo:
        """Remove one checkpoint, sidecar first so it is never seen half-deleted."""
        info = self.get(name)
        self._delete_committed(info.name)
        logger.info("deleted %s from %s", info.name, self.root)
        return info

    def _delete_committed(self, name: str) -> None:
        # Marker first (a crash from here on leaves a folder cleanup knows is ours), then the
        # sidecar (the checkpoint disappears at once), then the rest.
        self.storage.write_bytes_atomic(f"{name}/{INCOMPLETE_MARKER}", b"")
        self.storage.remove(f"{name}/{SIDECAR_NAME}")
        self.storage.remove_marked_folder(name)

    def prune(self, *, keep_last: int | None = None, dry_run: bool = False) -> builtins.list[CheckpointInfo]:
        """Apply retention now; return the checkpoints removed (or that would be, with ``dry_run``).

        Never removes the best ``keep_best``, a final or manual one, the newest, or the one
        training resumed from. Incomplete folders of crashed saves are cleaned up too.
        """
        if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 0):
            raise InvalidArgumentError(f"keep_last must be a non-negative integer, got {keep_last!r}")
        self._require_root()
        if dry_run:
            return self._doomed(self._scan(), keep_last)
        doomed = self._apply_retention(self._scan(), keep_last)
        if keep_last is not None:
            self.cleanup_incomplete()
        return doomed

    def _doomed(self, infos: Sequence[CheckpointInfo], keep_last: int | None = None) -> builtins.list[CheckpointInfo]:
        return self.retention.to_delete(
            infos, protect=[self.resumed_from] if self.resumed_from else [], keep_last=keep_last
        )

    def _apply_retention(
        self, infos: Sequence[CheckpointInfo], keep_last: int | None = None
    ) -> builtins.list[CheckpointInfo]:
        doomed = self._doomed(infos, keep_last)
        for info in doomed:
            self._delete_committed(info.name)
            logger.info("retention removed %s from %s", info.name, self.root)
        return doomed

    def cleanup_incomplete(self) -> builtins.list[str]:
        """Remove folders left by saves (or deletes) that never finished; return their names.

        Only what this library provably wrote is touched: local staging folders of writers that
        are gone, and folders holding the in-progress marker without a sidecar. Any other folder
        under the root (another run, the user's own files) is left alone.
        """
        if not self.storage.exists():
            return []
        removed = []
        busy = {self._inflight.info.name} if self._inflight is not None else set()
        for folder, kind in self.storage.list_dir():
            if kind != "directory" or folder in busy:
                continue
            if folder.startswith(STAGING_PREFIX):
                if staging_owner_alive(folder):
                    continue
            elif folder.startswith("."):
                continue
            elif self.storage.exists(f"{folder}/{INCOMPLETE_MARKER}"):
                if self.storage.exists(f"{folder}/{SIDECAR_NAME}"):  # committed; the marker outlived a crash
                    self.storage.remove(f"{folder}/{INCOMPLETE_MARKER}")
                    continue
            else:
                continue  # no marker: not ours (another run, the user's files): never touched
            if folder.startswith(STAGING_PREFIX):
                self.storage.remove_tree(folder)  # a staging name marks it wherever it stops
            else:
                self.storage.remove_marked_folder(folder)
            removed.append(folder)
            logger.info("removed incomplete checkpoint folder %s", self.storage.display(folder))
        return removed

    # --- loading ----------------------------------------------------------------------------------

    def load(
        self, name: str = "latest", *, verify: bool = True, into: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """The model state dict (name → CPU tensor) of checkpoint ``name``.

        Tied tensors come back as one tensor under each of their names. With ``verify``
        (the default) every byte read is checked against the sidecar's sha256. Tensors of
        ``into`` that match a stored one (name, shape, dtype, contiguous CPU) are filled in
        place and returned instead of new ones.

        Raises:
            CheckpointNotFoundError: no such checkpoint.
            CorruptCheckpointError: a file is missing, truncated or does not match its hash.
        """
        info = self.get(name)
        index_entry = _entry(info, MODEL_INDEX)
        if index_entry is not None:
            index = json.loads(self._read_checked(info, MODEL_INDEX, verify))
            filenames = sorted(set(index["weight_map"].values()))
            aliases = aliases_from_metadata(index.get("metadata", {}))
        else:
            filenames = [f.path for f in info.files if f.path.startswith("model") and f.path.endswith(".safetensors")]
            aliases = {}
        if not filenames:
            raise CorruptCheckpointError(f"checkpoint {info.name!r} in {self.root} lists no model weights file")
        state: dict[str, torch.Tensor] = {}
        for filename in filenames:
            tensors, metadata = self._read_tensors(info, filename, verify, into=into)
            state.update(tensors)
            aliases.update(aliases_from_metadata(metadata))
        for alias, target in aliases.items():
            state[alias] = state[target]
        return state

    def _read_tensors(
        self, info: CheckpointInfo, rel: str, verify: bool, *, into: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        entry = _entry(info, rel)
        where = self.storage.display(info.name, rel)
        if entry is None:
            raise CorruptCheckpointError(f"{where} is not listed in the checkpoint's sidecar")
        try:
            with self.storage.open_read(f"{info.name}/{rel}") as raw:
                # Hashed inline: reading is a CPU copy out of the page cache, and on small machines
                # (2 vCPUs sharing a core) a hashing thread beside it slows both (BENCHMARKS.md).
                stream = _HashingReader(raw) if verify else raw
                tensors, metadata = read_safetensors(stream, where=where, into=into)
                if verify:
                    assert isinstance(stream, _HashingReader)
                    stream.drain()
                    _check_entry(entry, stream.size, stream.hexdigest(), where)
        except CheckpointNotFoundError as exc:
            raise CorruptCheckpointError(f"{where} is missing; the checkpoint is damaged") from exc
        return tensors, metadata

    def _read_checked(self, info: CheckpointInfo, rel: str, verify: bool) -> bytes:
        where = self.storage.display(info.name, rel)
        try:
            data = self.storage.read_bytes(f"{info.name}/{rel}")
        except CheckpointNotFoundError as exc:
            raise CorruptCheckpointError(f"{where} is missing; the checkpoint is damaged") from exc
        entry = _entry(info, rel)
        if verify and entry is not None:
            _check_entry(entry, len(data), hashlib.sha256(data).hexdigest(), where)
        return data

    def load_training_state(self, name: str = "latest", *, verify: bool = True) -> dict[str, Any]:
        """The training state saved with checkpoint ``name``: optimizer, scheduler, rng, extra (those present)."""
        info = self.get(name)
        if _entry(info, TRAINING_STATE_FILE) is None:
            raise CheckpointNotFoundError(f"checkpoint {info.name!r} in {self.root} has no training state")
        doc = json.loads(self._read_checked(info, TRAINING_STATE_FILE, verify))
        tensors: dict[str, torch.Tensor] = {}
        if _entry(info, OPTIMIZER_FILE) is not None:
            tensors, _ = self._read_tensors(info, OPTIMIZER_FILE, verify)
        return dict(unflatten_state(doc["state"], tensors))

    def restore(
        self,
        name: str = "latest",
        *,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        scheduler: Any = None,
        rng: bool = True,
        strict: bool = True,
        verify: bool = True,
    ) -> CheckpointInfo:
        """Load checkpoint ``name`` into ``model`` (and ``optimizer``, ``scheduler``, RNG states).

        Returns the checkpoint's `CheckpointInfo`; marks it as the one training resumed from,
        so retention keeps it.
        """
        info = self.get(name)
        if model is not None:
            module = unwrap_model(model)
            live = module.state_dict()
            # Read straight into the model's own tensors. If a file then fails its hash, the
            # model holds part of the checkpoint: the error says so.
            try:
                state = self.load(info.name, verify=verify, into=live)
            except CorruptCheckpointError as exc:
                raise CorruptCheckpointError(
                    f"{exc}; the model now holds partly loaded weights: restore another checkpoint"
                ) from exc
            loaded = {_storage_id(live[k]): k for k in state if k in live}
            for key, tensor in live.items():  # tied copies a writer dropped (HF layout) come from their twin
                if key not in state and _storage_id(tensor) in loaded:
                    state[key] = state[loaded[_storage_id(tensor)]]
            device = next((p.device for p in module.parameters()), torch.device("cpu"))
            if device.type != "cpu":
                state = {k: v.to(device) for k, v in state.items()}
            try:
                module.load_state_dict(state, strict=strict)
            except RuntimeError as exc:
                raise CorruptCheckpointError(
                    f"checkpoint {info.name!r} does not fit the model: {str(exc).splitlines()[0]} "
                    "(pass strict=False to load what matches)"
                ) from exc
        if optimizer is not None or scheduler is not None or rng:
            has_state = _entry(info, TRAINING_STATE_FILE) is not None
            if not has_state and (optimizer is not None or scheduler is not None):
                raise CheckpointNotFoundError(
                    f"checkpoint {info.name!r} in {self.root} has no optimizer/scheduler state to restore"
                )
            if has_state:
                training = self.load_training_state(info.name, verify=verify)
                if optimizer is not None and "optimizer" in training:
                    optimizer.load_state_dict(training["optimizer"])
                if scheduler is not None and "scheduler" in training:
                    scheduler.load_state_dict(training["scheduler"])
                if rng and "rng" in training:
                    restore_rng(training["rng"])
        self.resumed_from = info.name
        return info

    def download(self, name: str, dest: str | os.PathLike[str], *, progress: bool | None = None) -> Path:
        """Copy checkpoint ``name`` into the local folder ``dest`` (created), checking every sha256.

        ``dest`` becomes the checkpoint folder itself (so ``from_pretrained(dest)`` works for HF
        models). Files are streamed, never held whole in memory; the sidecar is copied last.
        ``progress``: show a progress bar (default: on a terminal, for more than a few MB).

        Raises:
            CorruptCheckpointError: a stored file does not match its sha256 (nothing is left half-copied).
        """
        info = self.get(name)
        target = Path(dest)
        target.mkdir(parents=True, exist_ok=True)
        show = progress if progress is not None else (sys.stderr.isatty() and info.size > 4 << 20)
        from tqdm.auto import tqdm

        with tqdm(total=info.size, unit="B", unit_scale=True, disable=not show,
                  desc=f"{info.name}") as bar:
            for entry in info.files:
                out = target / entry.path
                out.parent.mkdir(parents=True, exist_ok=True)
                partial = out.with_name(out.name + ".partial")
                try:
                    with self.storage.open_read(f"{info.name}/{entry.path}") as src, open(partial, "wb") as f:
                        reader = _HashingReader(src)
                        buffer = memoryview(bytearray(8 << 20))
                        while n := reader.readinto(buffer):
                            f.write(buffer[:n])
                            bar.update(n)
                    _check_entry(entry, reader.size, reader.hexdigest(), self.storage.display(info.name, entry.path))
                    os.replace(partial, out)
                except CheckpointNotFoundError as exc:
                    raise CorruptCheckpointError(f"{self.storage.display(info.name, entry.path)} is missing") from exc
                finally:
                    partial.unlink(missing_ok=True)
        (target / SIDECAR_NAME).write_text(info.dumps())
        return target

    def signed_urls(self, name: str, *, expires: int = 3600) -> dict[str, str]:
        """Pre-signed download URLs (relative path → URL) for every file of checkpoint ``name``.

        Raises:
            StorageError: the storage cannot sign URLs (a local folder, memory://).
        """
        if not isinstance(expires, int) or expires < 1:
            raise InvalidArgumentError(f"expires must be a positive number of seconds, got {expires!r}")
        info = self.get(name)
        paths = [f.path for f in info.files] + [SIDECAR_NAME]
        urls = {}
        for rel in paths:
            try:
                urls[rel] = self.storage.fs.sign(self.storage.path(info.name, rel), expiration=expires)
            except NotImplementedError as exc:
                raise StorageError(
                    f"{self.root} cannot make signed URLs ({type(self.storage.fs).__name__} does not sign); "
                    "use 'ckpt download' instead, or object storage such as s3://"
                ) from exc
        return urls

    def verify(self, name: str | None = None) -> builtins.list[VerifyResult]:
        """Re-hash the files of checkpoint ``name`` (default: every checkpoint) against the sidecar.

        Returns one `VerifyResult` per checkpoint; ``problems`` names each missing, truncated
        or altered file.
        """
        infos = [self.get(name)] if name is not None else sorted(self._scan(), key=lambda i: i.step)
        if name is None:
            self._require_root()
        return [VerifyResult(info.name, self._problems(info)) for info in infos]

    def _problems(self, info: CheckpointInfo) -> builtins.list[str]:
        problems = []
        for entry in info.files:
            rel = f"{info.name}/{entry.path}"
            try:
                with self.storage.open_read(rel) as f:
                    reader = _HashingReader(f)
                    reader.drain()
            except CheckpointNotFoundError:
                problems.append(f"{entry.path}: missing")
                continue
            if reader.size != entry.size:
                problems.append(f"{entry.path}: size {reader.size} != {entry.size} in the sidecar")
            elif reader.hexdigest() != entry.sha256:
                problems.append(f"{entry.path}: sha256 does not match the sidecar")
        return problems


_WITH_PENDING_SAVES: weakref.WeakSet[CheckpointManager] = weakref.WeakSet()


def _wait_at_exit() -> None:
    """At interpreter exit, let every last background save commit (and say so if one failed)."""
    for manager in list(_WITH_PENDING_SAVES):
        if manager._pending is not None:
            try:
                manager.wait()
            except SaveError as exc:
                logger.error("the last checkpoint was not saved: %s", exc)


# Threading's exit hooks run in reverse order of registration, before atexit's. Registered after
# concurrent.futures' own hook, ours runs first, while the executors still take work.
_register_exit = getattr(threading, "_register_atexit", atexit.register)
_register_exit(_wait_at_exit)


def _storage_id(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))


def _entry(info: CheckpointInfo, rel: str) -> FileEntry | None:
    return next((f for f in info.files if f.path == rel), None)


def _check_entry(entry: FileEntry, size: int, sha256: str, where: str) -> None:
    if size != entry.size:
        raise CorruptCheckpointError(
            f"{where} has {size} bytes but the sidecar says {entry.size}: the file is truncated or altered"
        )
    if sha256 != entry.sha256:
        raise CorruptCheckpointError(f"{where} does not match its sha256 in the sidecar: the file is corrupt")


class _HashingReader:
    """A read-only stream that hashes every byte passing through it."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.digest.update(data)
        self.size += len(data)
        return bytes(data)

    def readinto(self, view: memoryview) -> int:
        readinto = getattr(self.raw, "readinto", None)
        if readinto is not None:
            n = readinto(view) or 0
        else:
            data = self.raw.read(len(view))
            n = len(data)
            view[:n] = data
        self.digest.update(view[:n])
        self.size += n
        return n

    def drain(self) -> None:
        """Read (and hash) to the end."""
        while self.read(8 << 20):
            pass

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


def _sort(infos: Sequence[CheckpointInfo], sort_by: str, *, descending: bool) -> builtins.list[CheckpointInfo]:
    """Sort by ``sort_by``; entries without the value go last either way; ties by step, time, name."""
    attr = _SORT_ALIASES.get(sort_by)
    known_metrics = {k for i in infos for k in i.metrics}
    if attr is None and sort_by not in known_metrics:
        valid = sorted({k for k in _SORT_ALIASES if not k.endswith(("_at", "_loss")) and k != "created"})
        raise InvalidArgumentError(
            f"cannot sort by {sort_by!r}: use one of {', '.join(valid)} or a metric name "
            f"({', '.join(sorted(known_metrics)) or 'none recorded yet'})"
        )

    def value(info: CheckpointInfo) -> Any:
        return getattr(info, attr) if attr is not None else info.metrics.get(sort_by)

    def tie(info: CheckpointInfo) -> tuple[int, str, str]:
        return (info.step, info.created_at, info.name)

    present = sorted((i for i in infos if value(i) is not None), key=lambda i: (value(i), tie(i)), reverse=descending)
    missing = sorted((i for i in infos if value(i) is None), key=tie, reverse=descending)
    return present + missing
