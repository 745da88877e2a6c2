"""The write pipeline: plan the files, write and hash them in one pass, commit; sync or in the background.

A background save first copies every tensor into staging buffers that are reused from save to
save (the only part that stops training), then one thread writes them while training goes on.
One save is in flight at a time; a failed background save is logged when it fails and is not
held against the next save.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import concurrent.futures.thread  # its exit hook must be registered before ours
import contextlib
import dataclasses
import hashlib
import json
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _codec as codec
from . import _distributed as distributed
from ._commit import CommitProtocol, Transaction
from ._errors import CheckpointError, SaveError
from ._layout import MODEL_INDEX, MODEL_PREFIX, OPTIMIZER_FILE, TRAINING_STATE_FILE, is_model_weights
from ._serialization import (
    ALIASES_KEY,
    plan_model_files,
    safetensors_pieces,
    safetensors_sha256,
    safetensors_size,
    write_chunks,
    write_safetensors,
)
from ._sharded import ALIASES_FILE, MODEL_DIR, ShardedState, describe, read_model_shards, remove_files, write_shards
from ._sidecar import CheckpointInfo, FileEntry
from ._snapshot import StagingArea
from ._training import TrainingState

__all__ = ["SaveJob", "Writer"]

logger = logging.getLogger("ckpt_callback")


@dataclass
class SaveJob:
    """Everything one save writes, captured on the training thread."""

    info: CheckpointInfo
    model: dict[str, torch.Tensor]
    training: TrainingState | None = None
    files: dict[str, bytes] = field(default_factory=dict)
    frozen: frozenset[str] = frozenset()  # model tensors that do not train: their own shard, stored once
    replace: bool = True
    sharded: ShardedState | None = None  # every rank runs the job; rank 0 commits
    group: Any = None  # the process group of a sharded job
    consolidate: bool = False  # a sharded job also merges the model into HF-layout weights (then drops the shards)
    prefix: str = MODEL_PREFIX  # the weights' file names: model.safetensors, or adapter_model.safetensors (peft)
    more_weights: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # prefix -> state, e.g. merged/


class Writer:
    """Runs `SaveJob`s through `CommitProtocol`, then hands the committed info to ``on_commit``."""

    def __init__(self, commit: CommitProtocol, *, max_shard_size: int | str, save_threads: int,
                 on_commit: Callable[[CheckpointInfo], CheckpointInfo], compression: str | None = None,
                 compression_level: int = 1,
                 committed: Callable[[], list[CheckpointInfo]] = list) -> None:
        self.commit = commit
        self.max_shard_size = max_shard_size
        self.compression, self.compression_level, self.save_threads = compression, compression_level, save_threads
        self._compressors: concurrent.futures.ThreadPoolExecutor | None = None
        self._files: concurrent.futures.ThreadPoolExecutor | None = None  # local: two large files at a time
        self.committed = committed  # the committed checkpoints, whose frozen files a save may reuse
        self.on_commit = on_commit
        self._lock = threading.Lock()
        self._inflight: SaveJob | None = None  # a background job whose sidecar is not written yet
        self._pending: concurrent.futures.Future[CheckpointInfo] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._staging = StagingArea()
        self._hasher = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-hash") if save_threads > 1 else None
        )

    def run(self, job: SaveJob) -> CheckpointInfo:
        """Write and commit ``job`` now; raises `SaveError` (or a `CheckpointError`) if it fails."""
        self.settle_previous()
        try:
            return self._run(job)
        except CheckpointError:
            raise
        except Exception as exc:
            raise SaveError(f"saving checkpoint {job.info.name!r} to {self.commit.storage.display()} "
                            f"failed: {exc}") from exc

    def submit(self, job: SaveJob) -> None:
        """Snapshot ``job``'s tensors, then write and commit it on the background thread."""
        self.settle_previous()
        if job.sharded is not None:
            job.sharded = job.sharded.snapshot(self._staging)
            self._start(job)
            return
        flat = {f"model/{k}": v for k, v in job.model.items()}
        if job.training is not None:
            flat.update({f"training/{k}": v for k, v in job.training.tensors.items()})
        snap = self._staging.snapshot(flat)
        job.model = {k: snap[f"model/{k}"] for k in job.model}
        if job.training is not None:
            tensors = {k: snap[f"training/{k}"] for k in job.training.tensors}
            job.training = TrainingState(job.training.skeleton, tensors)
        self._start(job)

    def _start(self, job: SaveJob) -> None:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-save")
        with self._lock:
            self._inflight = job
        self._pending = self._executor.submit(self._background, job)
        _WITH_PENDING_SAVES.add(self)

    def _background(self, job: SaveJob) -> CheckpointInfo:
        try:
            return self._run(job)
        except Exception as exc:
            logger.error("background save of checkpoint %r to %s failed: %s", job.info.name,
                         self.commit.storage.display(), exc)
            raise
        finally:
            with self._lock:
                self._inflight = None

    def merge_inflight(self, step: int, merge: Callable[[CheckpointInfo], CheckpointInfo]) -> CheckpointInfo | None:
        """Apply ``merge`` to the info of the background save of ``step`` if its sidecar is not written yet."""
        with self._lock:
            job = self._inflight
            if job is None or job.info.step != step:
                return None
            job.info = merge(job.info)
            return job.info

    def _run(self, job: SaveJob) -> CheckpointInfo:
        started = time.perf_counter()
        if job.sharded is not None:
            info = self._run_sharded(job, job.sharded)
            if distributed.rank() != 0:
                return info
        else:
            txn = self.commit.begin(job.info.name, replace=job.replace)
            try:
                entries = self._write_files(txn, job)
                info = self._take_info(job)
                # from_pretrained cannot read compressed weights: the folder is not inference-ready as it is
                ready = info.inference_ready and not any(e.codec and is_model_weights(e.logical_path) for e in entries)
                info = info.replace(files=tuple(entries), size=sum(e.size for e in entries), inference_ready=ready)
                txn.commit(info)
            except BaseException:
                txn.abort()
                raise
        logger.info("saved %s (%s, %s bytes) to %s in %.2fs", info.name, info.type, info.size,
                    self.commit.storage.display(), time.perf_counter() - started)
        try:
            return self.on_commit(info)
        except Exception as exc:  # committed: what follows (retention, callbacks) must not undo that
            logger.error("after committing %s: %s", info.name, exc)
            return info

    def _take_info(self, job: SaveJob) -> CheckpointInfo:
        """The job's info with the metrics that arrived while its files were written; none arrive later."""
        with self._lock:
            self._inflight = None
            return job.info

    def _run_sharded(self, job: SaveJob, state: ShardedState) -> CheckpointInfo:
        """Every rank writes its shards into one transaction that rank 0 began; rank 0 commits once
        every rank's files are written and it has their sizes and hashes. Every rank returns the
        committed info or raises the same error."""
        group, root = job.group, distributed.rank() == 0
        txn: Transaction | None = None
        error: BaseException | None = None
        if root:
            try:
                txn = self.commit.begin(job.info.name, replace=job.replace)
            except BaseException as exc:
                error = exc
        distributed.agree(error, group=group)
        folder = distributed.from_rank0(txn.folder if txn is not None else "", group=group)
        try:
            entries, error = write_shards(self.commit.storage, folder, state, group=group), None
        except BaseException as exc:
            entries, error = [], exc
        reports = distributed.all_ranks((entries, None if error is None else distributed.describe(error)),
                                        group=group)
        failed = next(((r, e) for r, (_, e) in enumerate(reports) if e is not None), None)
        info: CheckpointInfo | None = None
        if root:
            assert txn is not None
            try:
                if failed is not None:
                    raise distributed.rebuild(failed[1], rank=failed[0])
                files = [entry for rank_entries, _ in reports for entry in rank_entries]
                if job.consolidate:
                    files = self._consolidate(txn, job, files)
                files += self._write_shared(txn, job, state)
                info = self._take_info(job)
                info = info.replace(
                    files=tuple(files), size=sum(e.size for e in files), inference_ready=info.inference_ready
                    and job.consolidate, sharding=describe(state.model, distributed.world_size(),
                                                           consolidated=job.consolidate))
                txn.commit(info)
                error = None
            except BaseException as exc:
                txn.abort()
                error = exc
        if failed is not None:  # every rank knows: each raises its own error, or the failed rank's
            raise error if error is not None else distributed.rebuild(failed[1], rank=failed[0])
        distributed.agree(error if root else None, group=group)
        committed = distributed.from_rank0(info, group=group)
        assert committed is not None
        return committed

    def _consolidate(self, txn: Transaction, job: SaveJob, files: list[FileEntry]) -> list[FileEntry]:
        """Rank 0 merges the model shards every rank wrote into HF-layout weights (``model.safetensors``,
        or shards with an index, as unsharded saves write them) and removes the shards: what
        ``from_pretrained`` loads, without keeping the model's bytes twice."""
        shards = [e for e in files if e.path.startswith(MODEL_DIR + "/")]
        full = read_model_shards(self.commit.storage, txn.folder, shards)
        full.update({alias: full[name] for alias, name in (job.sharded.aliases if job.sharded else {}).items()
                     if name in full})  # tied again: the writer stores them once, as unsharded saves do
        merged = self._write_files(txn, SaveJob(info=job.info, model=full))
        remove_files(self.commit.storage, txn.folder, shards)
        return [e for e in files if e not in shards] + merged

    def _write_shared(self, txn: Transaction, job: SaveJob, state: ShardedState) -> list[FileEntry]:
        """What rank 0 writes once for all: the training state's JSON part and the extra files."""
        blobs = dict(job.files)
        if state.aliases and not job.consolidate:
            blobs[ALIASES_FILE] = (json.dumps(state.aliases, indent=2, sort_keys=True) + "\n").encode()
        if state.skeleton is not None:
            doc, _ = TrainingState(state.skeleton, {}).to_files(step=job.info.step, epoch=job.info.epoch)
            blobs[TRAINING_STATE_FILE] = doc
        entries = []
        for rel, data in blobs.items():
            size, sha = txn.write(rel, lambda f, d=data: write_chunks(f, [d]))  # type: ignore[misc]
            entries.append(FileEntry(rel, size, sha))
        return entries

    def _write_files(self, txn: Any, job: SaveJob) -> list[FileEntry]:
        entries: list[FileEntry] = []
        plain: list[tuple[str, dict[str, torch.Tensor], dict[str, str]]] = []  # (file, tensors, metadata)
        blobs = dict(job.files)
        committed: list[CheckpointInfo] | None = None
        for prefix, state in [(job.prefix, job.model), *job.more_weights.items()]:
            # peft reads one adapter file, never shards of it
            limit = self.max_shard_size if prefix.rsplit("/", 1)[-1] == MODEL_PREFIX else 1 << 62
            frozen = job.frozen if state is job.model else ()
            plan = plan_model_files(state, max_shard_size=limit, prefix=prefix, frozen=frozen)
            metadata = {"format": "pt"}
            if plan.aliases:
                metadata[ALIASES_KEY] = json.dumps(plan.aliases, sort_keys=True)
            for filename, tensors in plan.files.items():
                if filename in plan.frozen_files:
                    committed = self.committed() if committed is None else committed
                    entries.append(self._write_frozen(txn, filename, tensors, metadata, committed))
                else:
                    plain.append((filename, tensors, metadata))
            if plan.index is not None:
                index_name = MODEL_INDEX if prefix == MODEL_PREFIX else f"{prefix}.safetensors.index.json"
                blobs[index_name] = (json.dumps(plan.index, indent=2, sort_keys=True) + "\n").encode()
        if job.training is not None:
            doc, tensors = job.training.to_files(step=job.info.step, epoch=job.info.epoch)
            plain.append((OPTIMIZER_FILE, tensors, {"format": "pt"}))
            blobs[TRAINING_STATE_FILE] = doc
        entries += self._write_all_tensors(txn, plain)
        for rel, data in blobs.items():
            size, sha = txn.write(rel, lambda f, d=data: write_chunks(f, [d]))
            entries.append(FileEntry(rel, size, sha))
        return entries

    def _write_frozen(self, txn: Any, filename: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                      committed: list[CheckpointInfo]) -> FileEntry:
        """A file of frozen tensors: the same data as a committed checkpoint's file is not written again.

        Its size is known without writing it; only when a committed file of that size (and codec)
        exists is it hashed (one pass over the frozen bytes, nothing written) and, on a match, made
        a hard link of that file (local roots; object stores keep such files once in the blob area:
        `_write_blob`).
        """
        if not self.commit.storage.is_local:
            return self._write_blob(txn, filename, tensors, metadata, committed)
        wanted = codec.CODEC if self.compression else None
        size = safetensors_size(tensors, metadata)
        candidates = [(i, e) for i in committed for e in i.files
                      if e.codec == wanted and e.logical_size == size and (wanted is None or e.raw_sha256)]
        sha = safetensors_sha256(tensors, metadata) if candidates else None
        rel = codec.stored_path(filename, wanted)
        for info, entry in candidates:
            if (entry.raw_sha256 if wanted else entry.sha256) == sha and txn.reuse(
                    rel, f"{info.name}/{entry.path}", entry.size, owner=info):
                return FileEntry(rel, entry.size, entry.sha256, codec=entry.codec, raw_size=entry.raw_size,
                                 raw_sha256=entry.raw_sha256, shared=self.commit.storage.is_local)
        return self._write_tensors(txn, filename, tensors, metadata, raw_hash=True)

    def _write_blob(self, txn: Any, filename: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                    committed: list[CheckpointInfo]) -> FileEntry:
        """Object stores: a file of frozen tensors kept once in the blob area (`_blobs`), named by the sidecar.

        The same data as a committed checkpoint's blob (found as in `_write_frozen`) is not
        uploaded again; otherwise the file is written into the checkpoint's folder as usual and
        copied server-side into the blob area (or found there already). If the blob cannot be
        made whole the file simply stays in the folder.
        """
        wanted = codec.CODEC if self.compression else None
        size = safetensors_size(tensors, metadata)
        candidates = [e for i in committed for e in i.files if e.blob is not None
                      and e.codec == wanted and e.logical_size == size and (wanted is None or e.raw_sha256)]
        sha = safetensors_sha256(tensors, metadata) if candidates else None
        rel = codec.stored_path(filename, wanted)
        for entry in candidates:
            if (entry.raw_sha256 if wanted else entry.sha256) == sha and txn.hold_blob(entry.sha256, entry.size):
                return FileEntry(rel, entry.size, entry.sha256, codec=entry.codec, raw_size=entry.raw_size,
                                 raw_sha256=entry.raw_sha256, shared=True, blob=entry.sha256)
        written = self._write_tensors(txn, filename, tensors, metadata, raw_hash=True)
        if txn.hold_blob(written.sha256, written.size, staged=written.path):
            return dataclasses.replace(written, shared=True, blob=written.sha256)
        return written

    def _write_all_tensors(self, txn: Any, files: list[tuple[str, dict[str, torch.Tensor], dict[str, str]]]
                           ) -> list[FileEntry]:
        """Write safetensors files; on a local root, large ones two at a time, each hashed on its own thread.

        One sha256 stream runs at about the speed of the disk on one core, so the hash of one
        big file bounds a save of it; two files (the weights and the optimizer state) hashed on
        two cores while other threads write them finish sooner. ``save_threads=1``, object
        stores (whose uploads keep their own threads busy) and compression keep one at a time.
        """
        big = sum(safetensors_size(t, m) for _, t, m in files) >= _CONCURRENT_FILES_BYTES
        if len(files) < 2 or not big or self.save_threads < 2 or self.compression or not self.commit.storage.is_local:
            return [self._write_tensors(txn, name, tensors, metadata) for name, tensors, metadata in files]
        if self._files is None:
            self._files = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="ckpt-file")
        ordered = sorted(files, key=lambda f: -safetensors_size(f[1], f[2]))  # the longest first
        futures = {name: self._files.submit(self._write_tensors, txn, name, tensors, metadata, hasher=None)
                   for name, tensors, metadata in ordered}
        concurrent.futures.wait(futures.values())
        return [futures[name].result() for name, _, _ in files]

    def _write_tensors(self, txn: Any, filename: str, tensors: dict[str, torch.Tensor],
                       metadata: dict[str, str], *, raw_hash: bool = False,
                       hasher: Any = "default") -> FileEntry:
        """One safetensors file, plain or (with ``compression``) byte-grouped and zstd-compressed.

        ``raw_hash``: a compressed file also records the sha256 of its decoded bytes (so a later
        save of the same frozen tensors can find it).
        """
        hasher = self._hasher if hasher == "default" else hasher
        if self.compression is None:
            size, sha = txn.write(filename, lambda f: write_safetensors(f, tensors, metadata, hasher=hasher))
            return FileEntry(filename, size, sha)
        if self._compressors is None and self.save_threads > 1:
            self._compressors = concurrent.futures.ThreadPoolExecutor(self.save_threads, thread_name_prefix="ckpt-zstd")

        def produce(f: Any) -> tuple[int, str, int, str | None]:
            raw = [0]  # counted afresh if a failed upload runs this again
            digest = hashlib.sha256() if raw_hash else None
            pieces = safetensors_pieces(tensors, metadata)
            if digest is not None:
                pieces = _hashed(pieces, digest)
            frames = codec.encode(pieces, level=self.compression_level,
                                  pool=self._compressors, in_flight=self.save_threads, counter=raw)
            size, sha = write_chunks(f, frames, hasher=self._hasher)
            return size, sha, raw[0], None if digest is None else digest.hexdigest()

        stored = codec.stored_path(filename, codec.CODEC)
        size, sha, raw_size, raw_sha = txn.write(stored, produce)
        return FileEntry(stored, size, sha, codec=codec.CODEC, raw_size=raw_size, raw_sha256=raw_sha)

    def settle_previous(self) -> None:
        """Let the background save in flight finish; its failure was logged and is not raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            with contextlib.suppress(Exception):
                pending.result()

    def wait(self) -> CheckpointInfo | None:
        """Block until the background save is committed; `SaveError` if it failed."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        try:
            return pending.result()
        except CheckpointError as exc:
            raise SaveError(f"background save failed: {exc}") from exc
        except Exception as exc:
            raise SaveError(f"background save to {self.commit.storage.display()} failed: {exc}") from exc

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            for pool in (self._compressors, self._files):
                if pool is not None:
                    pool.shutdown(wait=True)
            self._compressors = self._files = None
            self._staging = StagingArea()


def _hashed(pieces: Iterator[tuple[Any, int]], digest: Any) -> Iterator[tuple[Any, int]]:
    """``pieces`` as they are, each also fed to ``digest``."""
    for chunk, width in pieces:
        digest.update(chunk)
        yield chunk, width


_CONCURRENT_FILES_BYTES = 64 << 20  # below this, a thread hand-off costs more than it saves

_WITH_PENDING_SAVES: weakref.WeakSet[Writer] = weakref.WeakSet()


def _wait_at_exit() -> None:
    """At interpreter exit, let every last background save commit (and say so if one failed)."""
    for writer in list(_WITH_PENDING_SAVES):
        if writer._pending is not None:
            try:
                writer.wait()
            except SaveError as exc:
                logger.error("the last checkpoint was not saved: %s", exc)


# Threading's exit hooks run in reverse order of registration, before atexit's. Registered after
# concurrent.futures' own hook, ours runs first, while the executors still take work.
_register_exit = getattr(threading, "_register_atexit", atexit.register)
_register_exit(_wait_at_exit)
