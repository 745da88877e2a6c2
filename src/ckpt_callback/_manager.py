"""`CheckpointManager`: the public facade over the commit protocol, writer, catalog, reader and retention.

It checks arguments and wires the pieces; each concept lives in the module named for it.
Its view of what exists always comes from the sidecars on storage, so "best" and retention
survive restarts, other processes and a changed directory.
"""

from __future__ import annotations

import builtins
import fnmatch
import logging
import os
import sys
import uuid
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._catalog import Catalog, CheckpointPage, CheckpointSummary, CheckpointWarning, stored_total
from ._codec import check_compression
from ._commit import CommitProtocol
from ._errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidArgumentError,
    StorageError,
)
from ._layout import default_name
from ._policy import newest
from ._requests import CheckpointRequest, RequestChannel
from ._retention import Retention
from ._sidecar import (
    RESERVED_NAMES,
    Adapter,
    CheckpointInfo,
    Monitor,
    Source,
    check_relative_path,
    clean_metrics,
    clean_number,
    validate_name,
)
from ._storage import Storage
from ._trackers import check_callables, notify

# What saves and loads tensors imports torch; listing, inspecting, deleting and pruning do not, so
# `ckpt list` and `ckpt inspect` start without it. Those parts are imported where they are used.
if TYPE_CHECKING:
    import torch

    from ._reader import Reader
    from ._writer import Writer

__all__ = ["CheckpointManager", "CheckpointPage", "CheckpointRequest", "CheckpointSummary", "CheckpointWarning",
           "VerifyResult"]

logger = logging.getLogger("ckpt_callback")


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of re-hashing one checkpoint: ``ok`` or the ``problems`` found, one per bad file.

    ``leftovers`` names temporary files of interrupted writes: reported, harmless, removed by cleanup.
    """

    name: str
    problems: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class CheckpointManager:
    """Crash-safe safetensors checkpoints with a sidecar, type tags and retention, on any fsspec root.

    Args:
        root: a local folder or an fsspec URL (``s3://bucket/run``, ``memory://x``, ``gs://...``).
        keep_last: how many of the newest automatic checkpoints retention keeps (None: all).
        keep_best: how many of the best checkpoints by ``monitor`` are kept besides.
        monitor: what "best" means: ``evalLoss``, ``trainLoss`` or any metric name (default: what the
            run recorded in its sidecars, else ``evalLoss``).
        mode: ``"min"`` or ``"max"`` for ``monitor`` (default: as recorded, else ``"min"``).
        storage_options: passed to ``fsspec.url_to_fs`` (endpoint, credentials, ...).
        async_save: snapshot the state and write it on a background thread.
        max_shard_size: largest weights file before splitting into HF-style shards.
        writer: whether this process writes (default: rank 0 of torch.distributed, else True).
        save_threads: CPU threads a save may keep busy: 2 hashes beside the writes (default),
            1 hashes inline and leaves more of the CPU to training.
        consolidate: for sharded models (FSDP2, tensor parallel), which saves also merge the
            model into HF-layout weights that load as they are: ``"final"`` (default), ``"always"``
            or ``"never"``. The shards are then dropped; optimizer state stays sharded.
        on_commit: callables (or one) given the `CheckpointInfo` of each committed checkpoint, on the
            thread that committed it (the background one with ``async_save``), e.g. `WandbLink`. One
            that raises is logged and never stops training or the other callables.
        save_merged: for peft models (whose checkpoints hold the adapter alone), which saves also
            hold the merged full model under ``merged/`` (an HF folder ``AutoModel*.from_pretrained``
            loads): ``"never"`` (default), ``"final"`` or ``"always"``. The merge runs on a copy
            (peft's ``merge_and_unload``), so it costs one more model's memory for a moment.
        compression: ``None`` (default) or ``"zstd"``: safetensors files are stored losslessly
            compressed (bytes grouped by position, then zstd, on ``save_threads`` threads) as
            ``<file>.ckptz``; `load`, `restore` and `download` decode them. Such a folder is not
            ``inferenceReady`` as it is: ``ckpt export`` or ``download(..., decompress=True)`` makes
            a plain one. Needs the ``zstandard`` package (``pip install 'ckpt-callback[zstd]'``).
        compression_level: zstd's level, -7 to 22 (default 1: measured best for grouped streams).
        catalog_cache: a local folder where the sidecars of an object-store root are kept between
            processes, so a new manager reads again only those whose listed ETag, time or size
            changed (the ``ckpt`` command uses ``~/.cache/ckpt-callback``). None (default): none kept.

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
        monitor: str | None = None,
        mode: str | None = None,
        storage_options: dict[str, Any] | None = None,
        async_save: bool = False,
        max_shard_size: int | str = "5GB",
        writer: bool | None = None,
        save_threads: int = 2,
        consolidate: str = "final",
        on_commit: Callable[[CheckpointInfo], Any] | Sequence[Callable[[CheckpointInfo], Any]] = (),
        save_merged: str = "never",
        compression: str | None = None,
        compression_level: int | None = None,
        catalog_cache: str | os.PathLike[str] | None = None,
    ) -> None:
        if not isinstance(save_threads, int) or isinstance(save_threads, bool) or save_threads < 1:
            raise InvalidArgumentError(f"save_threads must be a positive integer, got {save_threads!r}")
        if consolidate not in ("final", "always", "never"):
            raise InvalidArgumentError(f"consolidate must be 'final', 'always' or 'never', got {consolidate!r}")
        self.consolidate = consolidate
        self.compression, level = check_compression(compression, compression_level)
        if save_merged not in ("never", "final", "always"):
            raise InvalidArgumentError(f"save_merged must be 'never', 'final' or 'always', got {save_merged!r}")
        self.save_merged = save_merged
        storage = Storage(root, storage_options)
        self._storage = storage  # for tests that tune retries; everything else goes through the parts below
        self._root = storage.url
        self._is_local = storage.is_local
        self._local_root = storage.root
        self._commit = CommitProtocol(storage)
        self._catalog = Catalog(storage, cache_dir=catalog_cache)
        self._retention = Retention(self._commit, self._catalog, keep_last=keep_last, keep_best=keep_best,
                                    monitor=monitor, mode=mode)
        self.on_commit = check_callables(on_commit, "on_commit")
        for callback in self.on_commit:  # WandbLink, MlflowLink: they need the root for each checkpoint's URL
            bind = getattr(callback, "bind", None)
            if callable(bind):
                bind(self._root)
        self._writer_options: dict[str, Any] = {"max_shard_size": max_shard_size, "save_threads": save_threads,
                                "compression": self.compression, "compression_level": level}
        self._check_writable = storage.check_writable
        self.requests = RequestChannel(storage)  # checkpoints asked for from outside (see request())
        self.async_save = bool(async_save)
        self.writer = _rank0() if writer is None else bool(writer)
        self.run_id = uuid.uuid4().hex
        self._recovered = False
        self._warned_monitor = False

    @cached_property
    def _reader(self) -> Reader:
        from ._reader import Reader

        return Reader(self._storage)

    @cached_property
    def _writer(self) -> Writer:
        """The write pipeline, made at the first save (with its background thread and staging buffers)."""
        from ._writer import Writer

        return Writer(self._commit, on_commit=self._committed, committed=self._catalog.recent,
                      **self._writer_options)

    @property
    def _made_writer(self) -> Writer | None:
        """The write pipeline if a save made it, else None (waiting or closing then has nothing to do)."""
        return self.__dict__.get("_writer")

    def _settle_writes(self) -> None:
        """Let a background save in flight finish first (nothing to do before the first save)."""
        if self._made_writer is not None:
            self._made_writer.settle_previous()

    def _committed(self, info: CheckpointInfo) -> CheckpointInfo:
        """A save committed ``info``: retention first, then the ``on_commit`` callables."""
        info = self._retention.after_commit(info)
        notify(self.on_commit, info)
        return info

    @property
    def root(self) -> str:
        return self._root

    @property
    def monitor(self) -> tuple[str, str]:
        """(name, mode) that "best" follows: as given, else as the run recorded it, else evalLoss/min."""
        return self._retention.monitor(self._catalog.cached())

    def local_path(self, name: str) -> str | None:
        """The local folder of checkpoint ``name`` on a local root, else None."""
        return os.path.join(self._local_root, name) if self._is_local else None

    def __repr__(self) -> str:
        return f"CheckpointManager({self.root!r}, keep_last={self._retention.defaults.keep_last})"

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_writable(self) -> None:
        """Prove the writer can write the root before any training step (a missing bucket is an error).

        Under torch.distributed every rank raises `StorageError` if the writer (rank 0) cannot.
        """
        problem = None
        if self.writer:
            try:
                self._check_writable()
            except Exception as exc:  # whatever it is, every rank must hear of it (none waits alone)
                problem = str(exc) if isinstance(exc, StorageError) else f"{type(exc).__name__}: {exc}"
        if "torch" in sys.modules:  # else there is no process group to tell
            from ._distributed import from_rank0

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
        stateful: Mapping[str, Any] | None = None,
        rng: bool | None = None,
        files: Mapping[str, bytes] | None = None,
        model_name: str | None = None,
        version: str | None = None,
        inference_ready: bool | None = None,
        source: Source | None = None,
        frozen: Collection[str] | None = None,
    ) -> CheckpointInfo | None:
        """Save a checkpoint and apply retention once it is committed.

        Args:
            state: a ``torch.nn.Module`` or a state dict (name → tensor).
            step: optimizer steps done so far; the default name is ``checkpoint-{step}``.
            epoch, train_loss, eval_loss, metrics: recorded in the sidecar (None stays null).
            type: ``automatic``, ``manual`` or ``final`` (``best`` is assigned, not asked for).
            name: folder name (default ``checkpoint-{step}``); a taken name raises.
            description: free text for the sidecar.
            optimizer, scheduler: saved as training state for exact resume (with RNG states).
            extra_state: more JSON-able (tensors allowed) state, read back by `load_training_state`.
            stateful: name → object with ``state_dict()``/``load_state_dict()`` (a ``StatefulDataLoader``,
                a sampler, an EMA); its state dict (tensors and JSON values) is saved with the training
                state and loaded back by ``restore(stateful=...)``.
            rng: save RNG states (default: when an optimizer is given).
            files: extra small files (relative path → bytes), e.g. ``config.json``.
            model_name, version: override what is derived from ``state``.
            inference_ready: False marks the checkpoint not inference-ready even when it is proven
                to be; ``inferenceReady`` is never true unless proven (see `_pretrained.prove`).
            source: provenance of an imported checkpoint (the sidecar's ``source``; see `import_checkpoints`).
            frozen: names of ``state`` that do not train (default: for a module, its parameters with
                ``requires_grad=False``). They go to shard files of their own, and a file that is byte
                for byte one of a committed checkpoint is not written again: a hard link on a local
                root (both folders stay self-contained), a server-side copy on object stores.

        Returns:
            The committed checkpoint's `CheckpointInfo`; with ``async_save`` the one that will be
            committed (use `wait` to be sure); None in processes that do not write.

        Raises:
            SaveError: this save failed (a failed earlier background save was logged, not raised here).
            CheckpointExistsError: ``name`` is already a committed checkpoint, or being written.
            InvalidNameError, InvalidArgumentError: bad name, type or state (a value of the training
                state that cannot be stored without pickle is named).
        """
        if type not in ("automatic", "manual", "final"):
            raise InvalidArgumentError(f"type must be 'automatic', 'manual' or 'final', got {type!r}")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise InvalidArgumentError(f"step must be a non-negative integer, got {step!r}")
        if description is not None and not isinstance(description, str):
            raise InvalidArgumentError(f"description must be a string, got {description!r}")
        explicit = name is not None
        name = validate_name(name if explicit else default_name(step))
        try:
            extra_files = {check_relative_path(rel, "save(files=...)"): bytes(data)
                           for rel, data in (files or {}).items()}
        except CorruptCheckpointError as exc:
            raise InvalidArgumentError(str(exc).split(";")[0]) from exc
        from ._pretrained import plan_save
        from ._serialization import frozen_names
        from ._sharded import is_sharded
        from ._training import TrainingState, describe_model, model_state, unwrap_model
        from ._writer import SaveJob

        module = unwrap_model(state)
        model = model_state(module)
        sharded = is_sharded(model)
        if not sharded and not self.writer:
            return None
        merge = self.save_merged == "always" or (self.save_merged == "final" and type == "final")
        plan = plan_save(module, model, extra_files, sharded=sharded, merge=merge)
        if not plan.proof and plan.claims:
            logger.info("checkpoint %s is not inference-ready: %s", name, plan.proof.why)
        adapter = Adapter(**plan.adapter) if plan.adapter is not None else None
        derived_name, derived_version = describe_model(module)
        if adapter is not None and adapter.base_model:  # the model an adapter checkpoint is of
            derived_name = adapter.base_model
        monitor, mode = self.monitor
        info = CheckpointInfo(
            name=name, step=step, type=type, description=description, epoch=clean_number(epoch, key="epoch"),
            train_loss=clean_number(train_loss, key="train_loss"), eval_loss=clean_number(eval_loss, key="eval_loss"),
            metrics=clean_metrics(metrics), model=model_name if model_name is not None else derived_name,
            version=version if version is not None else derived_version,
            inference_ready=bool(plan.proof) and inference_ready is not False,
            monitor=Monitor(monitor, mode), run_id=self.run_id, source=source, adapter=adapter,
        )
        rng = rng if rng is not None else optimizer is not None
        if sharded:
            if stateful:
                raise InvalidArgumentError("stateful= is not supported for sharded models (FSDP2, tensor "
                                           "parallel) yet; save its state in extra_state instead")
            return self._save_sharded(module, info, explicit=explicit, files=plan.files, optimizer=optimizer,
                                      scheduler=scheduler, extra_state=extra_state, rng=rng)
        existing = self._existing(info, explicit)
        if existing is not None and plan.more_weights and (existing.adapter is None or not existing.adapter.merged):
            existing = None  # saved again, with the merged model, in place of the one of the same step
        if existing is not None:
            self._settle_writes()
            promoted = self._retention.promote(existing, info)  # re-tagged (final, manual): trackers hear of it
            if promoted is not None:
                notify(self.on_commit, promoted)
            return promoted
        training = TrainingState.capture(optimizer=optimizer, scheduler=scheduler, extra=extra_state, rng=rng,
                                         stateful=stateful)
        frozen_set = frozenset(frozen_names(module, plan.model) if frozen is None else frozen)
        job = SaveJob(info=info, model=plan.model, training=training, files=plan.files, replace=not explicit,
                      prefix=plan.prefix, more_weights=plan.more_weights, frozen=frozen_set)
        if not self.async_save:
            return self._writer.run(job)
        self._writer.submit(job)
        return info

    def _existing(self, info: CheckpointInfo, explicit: bool) -> CheckpointInfo | None:
        """The writer's checks before a save of ``info``: the committed checkpoint of that name that
        this save promotes (a final or manual save at a step this run already saved), else None."""
        if not self._recovered:
            self._recovered = True
            self.cleanup_incomplete()
        existing = self._catalog.read(info.name)
        if existing is None:
            return None
        if explicit:
            raise CheckpointExistsError(
                f"checkpoint {info.name!r} already exists in {self.root}; choose another name or delete it first")
        if info.type != "automatic" and self._retention.is_ours(existing):
            return existing
        warnings.warn(f"replacing checkpoint {info.name!r} in {self.root}, left by an earlier run",
                      CheckpointWarning, stacklevel=3)
        return None

    def _save_sharded(self, module: Any, info: CheckpointInfo, *, explicit: bool, files: dict[str, bytes],
                      optimizer: Any, scheduler: Any, extra_state: Mapping[str, Any] | None,
                      rng: bool) -> CheckpointInfo | None:
        """A save of DTensor state: every rank calls it and writes its own shards (see `_sharded`)."""
        from ._distributed import agree, checkpoint_group, from_rank0
        from ._sharded import ShardedState
        from ._writer import SaveJob

        self._settle_writes()  # its collectives run on the same group: never two at once
        group = checkpoint_group()
        consolidate = self.consolidate == "always" or (self.consolidate == "final" and info.type == "final")
        existing, error = None, None
        if self.writer:
            try:
                existing = self._existing(info, explicit)
            except BaseException as exc:
                error = exc
            merged = existing is not None and existing.sharding is not None and existing.sharding.consolidated
            if existing is not None and consolidate and not merged:
                existing = None  # saved again, consolidated, in place of the sharded one of the same step
        agree(error, group=group)
        if from_rank0(existing is not None, group=group):
            promoted = None
            if existing is not None:
                try:
                    promoted = self._retention.promote(existing, info)
                except BaseException as exc:
                    error = exc
            agree(error, group=group)
            return from_rank0(promoted, group=group)
        state = ShardedState.capture(module, optimizer=optimizer, scheduler=scheduler, extra=extra_state, rng=rng)
        job = SaveJob(info=info, model={}, files=files, replace=not explicit, sharded=state, group=group,
                      consolidate=consolidate)
        if not self.async_save:
            return self._writer.run(job)
        self._writer.submit(job)
        return info

    def update_metrics(
        self,
        step: int,
        *,
        eval_loss: float | None = None,
        train_loss: float | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> CheckpointInfo | None:
        """Add metrics that arrive after the checkpoint of ``step`` was saved (e.g. an evaluation).

        Only a checkpoint this run saved (or resumed from) is changed; its sidecar gets the values
        (``updatedAt`` moves) and they count for ``best``. Returns the updated checkpoint, or None
        when there is none at that step (or it was deleted meanwhile).
        """
        eval_loss, train_loss = clean_number(eval_loss, key="eval_loss"), clean_number(train_loss, key="train_loss")
        clean = clean_metrics(metrics)
        if not self.writer:
            return None

        def merge(info: CheckpointInfo) -> CheckpointInfo:
            return info.replace(eval_loss=eval_loss if eval_loss is not None else info.eval_loss,
                                train_loss=train_loss if train_loss is not None else info.train_loss,
                                metrics={**info.metrics, **clean})

        writer = self._made_writer
        pending = writer.merge_inflight(step, merge) if writer is not None else None
        if pending is not None:
            return pending  # the background writer has not written its sidecar yet
        revised = self._retention.update(step, merge)
        if revised is not None and revised.type == "best":  # an evaluation made it the best: trackers hear of it
            notify(self.on_commit, revised)
        return revised

    def warn_missing_monitor(self, why: str) -> None:
        """Warn (once per manager) that ``monitor`` never appears, so no checkpoint is tagged best.

        Integrations that know which metrics exist call this with ``why`` naming them.
        """
        if self._warned_monitor:
            return
        self._warned_monitor = True
        message = (f"monitor {self.monitor[0]!r} never appears ({why}); no checkpoint is tagged best "
                   "until it does: pass monitor= one of those names")
        warnings.warn(message, CheckpointWarning, stacklevel=3)
        logger.warning("%s", message)

    def wait(self) -> CheckpointInfo | None:
        """Block until the background save (if any) is committed; raise `SaveError` if it failed."""
        writer = self._made_writer
        try:
            return writer.wait() if writer is not None else None
        finally:
            self._retention.drain()

    def close(self) -> None:
        """Wait for the last save and release the background threads and staging buffers."""
        try:
            if self._made_writer is not None:
                self._made_writer.close()
        finally:
            self._retention.close()
            why = self._retention.missing_monitor() if self.writer and not self._warned_monitor else None
            if why is not None:
                self.warn_missing_monitor(f"checkpoints under {self.root} record {why}")

    def request(self, *, name: str | None = None, description: str | None = None,
                stop: bool = False) -> CheckpointRequest:
        """Ask the job writing this root (its CheckpointHook or CheckpointCallback) for a checkpoint.

        The job takes the request within its ``check_requests_every`` seconds (10 by default) and
        saves a ``manual`` checkpoint at its next step boundary; with ``stop``, a ``final`` one,
        and then it stops. The request travels through the root itself, so this works from any
        machine that can write the root. Use the returned request's ``wait()`` for the outcome.

        Example:
            >>> m = CheckpointManager("memory://doc-request-manager")
            >>> request = m.request(name="before-lr-drop", description="asked from a notebook")
            >>> # info = request.wait(timeout=60)   # the checkpoint, once the running job saved it

        Raises:
            InvalidNameError: ``name`` cannot be a checkpoint name.
            CheckpointExistsError: ``name`` is already a committed checkpoint.
        """
        self._catalog.require_root()  # a typo in the root must not create a folder no job reads
        if name is not None and self._catalog.read(validate_name(name)) is not None:
            raise CheckpointExistsError(f"checkpoint {name!r} already exists in {self.root}; choose another name")
        return self.requests.submit(name=name, description=description, stop=stop)

    # --- finding ----------------------------------------------------------------------------------

    def _view(self) -> builtins.list[CheckpointInfo]:
        """Every committed checkpoint, now. A replacement whose writer died half-way (its committed
        staging folder is in the listing) is rolled forward first, so its step is listed again."""
        infos = self._catalog.refresh()
        if self._catalog.staged and self.writer and self.cleanup_incomplete():
            infos = self._catalog.refresh()
        return infos

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
            >>> import torch
            >>> m = CheckpointManager("memory://doc-list")
            >>> _ = [m.save({"w": torch.zeros(1)}, step=s) for s in (1, 2, 3)]
            >>> page = m.list(sort_by="step", order="asc", limit=2)
            >>> [i.step for i in page], page.has_more
            ([1, 2], True)
            >>> [i.step for i in m.list(sort_by="step", order="asc", after=page.last_id)]
            [3]
        """
        self._catalog.require_root()
        infos = self._view()
        summary = CheckpointSummary(best=self._retention.best(infos), latest=newest(infos),
                                    total_size=stored_total(infos),
                                    total_logical_size=sum(i.logical_size for i in infos))
        return self._catalog.page(infos, sort_by=sort_by, order=order, limit=limit, after=after, type=type,
                                  summary=summary)

    def get(self, name: str) -> CheckpointInfo:
        """The sidecar of checkpoint ``name`` (``latest``, ``best``, ``final`` and ids work too).

        Raises:
            CheckpointNotFoundError: no committed checkpoint of that name.
            InvalidNameError: ``name`` is not a folder name (a path, ``.``, ...).
            SidecarError: its sidecar is malformed or of an unknown schema.
        """
        if name not in RESERVED_NAMES:
            try:
                return self._catalog.get(name)
            except CheckpointNotFoundError:
                self._view()  # an interrupted replacement of it may be rolled forward now
                return self._catalog.get(name)
        infos = self._view()
        if name == "latest":
            found = newest(infos)
        elif name == "best":
            found = self._retention.best(infos)
        else:
            found = newest(i for i in infos if i.type == "final")
        if found is None:
            self._catalog.require_root()
            raise CheckpointNotFoundError(f"there is no {name} checkpoint in {self.root}")
        return found

    def latest(self) -> CheckpointInfo | None:
        """The checkpoint with the highest step, or None."""
        return newest(self._view())

    def best(self) -> CheckpointInfo | None:
        """The checkpoint with the best ``monitor`` value, or None."""
        return self._retention.best(self._view())

    # --- deleting ---------------------------------------------------------------------------------

    def delete(self, name: str) -> CheckpointInfo:
        """Remove one checkpoint; it disappears at once (never seen half-deleted)."""
        info = self.get(name)
        with self._retention.lock:
            self._commit.delete(info.name, expected_id=info.id)
            self._catalog.forget(info.name)
        logger.info("deleted %s from %s", info.name, self.root)
        return info

    def prune(self, *, keep_last: int | None = None, dry_run: bool = False) -> builtins.list[CheckpointInfo]:
        """Apply retention now; return the checkpoints removed (or that would be, with ``dry_run``).

        Never removes the best ``keep_best``, a final or manual one, the newest, or the one
        training resumed from. Incomplete folders of dead writers are cleaned up too.
        """
        if keep_last is not None and (not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 0):
            raise InvalidArgumentError(f"keep_last must be a non-negative integer, got {keep_last!r}")
        self._catalog.require_root()
        infos = self._view()
        if dry_run:
            return self._retention.doomed(infos, keep_last)
        with self._retention.lock:
            doomed = self._retention.prune(infos, keep_last)
        self.cleanup_incomplete()
        return doomed

    def cleanup_incomplete(self) -> builtins.list[str]:
        """Finish or remove what dead writers left (only the library's own folders); return their names."""
        try:
            return self._commit.recover()
        except CheckpointError as exc:
            logger.error("cleanup of %s failed (it is retried later): %s", self.root, exc)
            return []

    # --- reading ----------------------------------------------------------------------------------

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
            CorruptCheckpointError: a file is missing, truncated, malformed or does not match its hash.
        """
        return self._reader.load(self.get(name), verify=verify, into=into)

    def load_training_state(self, name: str = "latest", *, verify: bool = True) -> dict[str, Any]:
        """The training state saved with checkpoint ``name``: optimizer, scheduler, rng, extra (those present)."""
        return self._reader.training_state(self.get(name), verify=verify).values

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
        stateful: Mapping[str, Any] | None = None,
    ) -> CheckpointInfo:
        """Load checkpoint ``name`` into ``model`` (and ``optimizer``, ``scheduler``, RNG states, ``stateful``).

        Returns the checkpoint's `CheckpointInfo`; marks it as the one training resumed from, so
        retention keeps it, and continues its run id.
        """
        from ._distributed import checkpoint_group
        from ._sharded import is_sharded
        from ._training import model_state, unwrap_model

        info = self.get(name)
        if model is not None and (info.sharding is not None or is_sharded(model_state(unwrap_model(model)))):
            self._settle_writes()  # a background sharded save talks on the same group
            self._reader.restore_sharded(info, model, optimizer=optimizer, scheduler=scheduler, rng=rng,
                                         strict=strict, verify=verify, group=checkpoint_group())
            self.resumed(info)
            return info
        self._reader.restore(info, model=model, optimizer=optimizer, scheduler=scheduler, rng=rng,
                             stateful=stateful, strict=strict, verify=verify)
        self.resumed(info)
        return info

    @property
    def resumed_from(self) -> str | None:
        """The checkpoint training resumed from (retention keeps it), or None."""
        return self._retention.resumed_from

    def resumed(self, info: CheckpointInfo) -> None:
        """Training continues from ``info``: retention keeps it and new checkpoints carry its run id."""
        self._retention.resumed_from = info.name
        if info.run_id:
            self.run_id = info.run_id

    def download(self, name: str, dest: str | os.PathLike[str], *, progress: bool | None = None,
                 include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
                 decompress: bool = False) -> Path:
        """Copy checkpoint ``name`` into the local folder ``dest`` (created), checking every sha256.

        ``dest`` becomes the checkpoint folder itself (so ``from_pretrained(dest)`` works for HF
        models). Files are streamed, never held whole in memory; the sidecar is copied last.
        ``progress``: show a progress bar (default: on a terminal, for more than a few MB).
        ``include``/``exclude``: glob patterns (``*.safetensors``, ``optimizer*``) matched against each
        file's path: only files matching an include (default: all) and no exclude are copied.
        ``decompress``: compressed files (``compression="zstd"``) land decoded under their plain
        names (``model.safetensors``), so the folder loads with ``from_pretrained``; without it they
        are copied as stored. Either way the folder is self-contained (nothing shared) and verifies.

        Raises:
            CorruptCheckpointError: a stored file does not match its sha256 (nothing is left half-copied).
        """
        info = self.get(name)
        only = None
        if include or exclude:
            def matches(f: Any, patterns: Sequence[str]) -> bool:
                return any(fnmatch.fnmatchcase(f.path, p) or fnmatch.fnmatchcase(f.logical_path, p) for p in patterns)

            only = {f.path for f in info.files
                    if (not include or matches(f, include)) and not matches(f, exclude or ())}
            if not only:
                raise InvalidArgumentError(
                    f"no file of checkpoint {info.name!r} matches include={list(include or [])} "
                    f"exclude={list(exclude or [])}; its files are {', '.join(f.path for f in info.files)}")
        return self._reader.download(info, dest, progress=progress, only=only, decompress=decompress)

    def signed_urls(self, name: str, *, expires: int = 3600) -> dict[str, str]:
        """Pre-signed download URLs (relative path → URL) for every file of checkpoint ``name``.

        Raises:
            StorageError: the storage cannot sign URLs (a local folder, memory://).
        """
        return self._reader.signed_urls(self.get(name), expires=expires)

    def verify(self, name: str | None = None) -> builtins.list[VerifyResult]:
        """Re-hash the files of checkpoint ``name`` (default: every checkpoint) against the sidecar.

        Returns one `VerifyResult` per checkpoint; ``problems`` names each missing, truncated,
        altered or unlisted file.
        """
        if name is None:
            self._catalog.require_root()
            listed = self._view()  # and those not listed because files are missing
            infos = sorted([*listed, *self._catalog.damaged.values()], key=lambda i: (i.step, i.name))
        else:
            infos = [self.get(name)]
        return [VerifyResult(info.name, self._reader.problems(info), self._reader.leftovers(info)) for info in infos]


def _rank0() -> bool:
    """Whether this process writes by default: rank 0 of torch.distributed, else True. A process that
    has not imported torch has no process group (and `ckpt list` does not import it for this)."""
    if "torch" not in sys.modules:
        return True
    from ._distributed import is_writer

    return is_writer()
