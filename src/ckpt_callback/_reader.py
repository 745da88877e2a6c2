"""Reading committed checkpoints: load, restore weights, training state, verify, download.

Every byte goes through one verified stream (`Reader.open_verified`): the path comes from a
validated sidecar entry, reads are bounded by the size the sidecar promises, and the sha256
is checked as the bytes pass. Nothing outside the checkpoint folder (or a download's DEST)
is ever read or written.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Collection, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from . import _distributed as distributed
from . import _sharded as sharded
from ._codec import DecodingReader
from ._errors import CheckpointNotFoundError, CorruptCheckpointError, InvalidArgumentError, StorageError
from ._layout import (
    MODEL_INDEX,
    OPTIMIZER_FILE,
    SIDECAR,
    TMP_INFIX,
    TRAINING_STATE_FILE,
    is_library_temp,
    is_model_weights,
)
from ._pretrained import ADAPTER_WEIGHTS, is_peft_model, load_adapter_state
from ._serialization import (
    ALIASES_KEY,
    ParallelDigest,
    add_aliases,
    aliases_from_metadata,
    flatten_state,
    parse_index,
    read_safetensors,
)
from ._sidecar import CheckpointInfo, FileEntry, loads_strict
from ._storage import Storage
from ._training import TrainingState, TrainingStateValues, unwrap_model

__all__ = ["Reader"]

_BLOCK = 8 << 20
_INLINE_HASH = 1 << 20  # updates smaller than this, before any larger one, are hashed in the caller


class _BackgroundSha256(ParallelDigest):
    """sha256 whose updates run in order on a thread of its own, beside the reads that feed it.

    hashlib releases the GIL while it hashes a large buffer, so on two cores a verified read
    costs max(read, hash) instead of their sum. `update` hands the buffer over and returns (it
    only waits when more than 64 MiB are still unhashed): the caller must leave the buffer
    unchanged until `hexdigest`. `update_now` hashes before it returns (a buffer the caller
    reuses). The thread starts with the first large update and ends with `close`.
    """

    def __init__(self) -> None:
        super().__init__(None)
        self._dropped = False

    def update(self, data: memoryview | bytes) -> None:
        if self._executor is None and len(data) >= _INLINE_HASH:  # a header or a JSON file: no thread for that
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="ckpt-verify")
        super().update(data)

    def update_now(self, data: memoryview | bytes) -> None:
        self._drain()
        self._digest.update(data)

    def hexdigest(self) -> str:
        if self._dropped:
            raise RuntimeError("this digest was closed with updates not hashed")
        return super().hexdigest()

    def close(self) -> None:
        """Stop the thread; updates not yet hashed are dropped (the stream was abandoned)."""
        if isinstance(self._executor, ThreadPoolExecutor):
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._dropped = self._dropped or bool(self._pending)
        self._pending.clear()
        self._queued = 0


class _HashingReader:
    """A read-only stream that never reads past ``limit`` bytes and (``hashing``) hashes every byte.

    The hash runs beside the reads (`_BackgroundSha256`) wherever the bytes stay as they are:
    what `read` returns, and what `readinto_kept` reads into the caller's memory (the tensors
    being filled). `readinto` is for a buffer the caller reuses: its bytes are hashed before it
    returns.
    """

    def __init__(self, raw: Any, limit: int, *, hashing: bool = True) -> None:
        self.raw = raw
        self.digest = _BackgroundSha256()
        self.hashing = hashing
        self.size = 0
        self.limit = limit

    def read(self, n: int = -1) -> bytes:
        room = self.limit - self.size
        n = room if n is None or n < 0 else min(n, room)
        data = bytes(self.raw.read(n)) if n > 0 else b""
        if self.hashing and data:
            self.digest.update(data)
        self.size += len(data)
        return data

    def _fill(self, view: memoryview) -> int:
        readinto = getattr(self.raw, "readinto", None)
        if readinto is not None:
            return int(readinto(view) or 0)
        data = self.raw.read(len(view))
        view[: len(data)] = data
        return len(data)

    def readinto(self, view: memoryview, *, kept: bool = False) -> int:
        """Read into ``view``, hashed now; ``kept``: the caller leaves that memory unchanged until the
        stream is checked, so it is hashed later, beside the next reads."""
        view = view[: max(0, self.limit - self.size)]
        n = self._fill(view) if len(view) else 0
        if self.hashing and n:
            (self.digest.update if kept else self.digest.update_now)(view[:n])
        self.size += n
        return n

    def readinto_kept(self, view: memoryview) -> int:
        return self.readinto(view, kept=True)

    def drain(self) -> None:
        while self.read(_BLOCK):
            pass

    def at_end(self) -> bool:
        """Whether the underlying file has nothing beyond what was read (a longer file is altered)."""
        return not self.raw.read(1)

    def close(self) -> None:
        self.digest.close()


class _Lent(dict[str, torch.Tensor]):
    """Live tensors (a model's, an optimizer's) lent to `read_safetensors` to fill in place: those
    on the CPU, the only ones it fills. ``lent``: whether any was asked for (bytes may have landed)."""

    lent = False

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        super().__init__({k: v for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.device.type == "cpu"})

    def get(self, key: str, default: Any = None) -> Any:
        value = super().get(key, default)
        self.lent = self.lent or value is not None
        return value


def _optimizer_tensors(optimizer: Any) -> dict[str, torch.Tensor]:
    """The optimizer's own state tensors, under the names `TrainingState.capture` stores them with
    (``optimizer.state.0.exp_avg``); empty for an optimizer without state or a state dict that is
    not plain (then the stored state gets new memory, as it would anyway)."""
    if not isinstance(optimizer, torch.optim.Optimizer) or not optimizer.state:
        return {}
    try:
        _, tensors = flatten_state({"optimizer": optimizer.state_dict()})
    except Exception:  # any failure here only means no memory is reused
        return {}
    return tensors


def _stored_size(raw: Any) -> int | None:
    """The size of the open file ``raw`` without reading it (None when the stream cannot tell)."""
    try:
        if not raw.seekable():
            return None
        end = int(raw.seek(0, os.SEEK_END))
        raw.seek(0)
        return end
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return None


class Reader:
    """Reads the files of committed checkpoints under one root."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def _where(self, info: CheckpointInfo, rel: str) -> str:
        return self.storage.display(info.name, rel)

    @staticmethod
    def entry(info: CheckpointInfo, rel: str) -> FileEntry | None:
        """The sidecar entry of file ``rel``: its stored path, or its logical one (a compressed file)."""
        return next((f for f in info.files if f.path == rel or f.logical_path == rel), None)

    def _listed(self, info: CheckpointInfo, rel: str) -> tuple[FileEntry, str]:
        """The sidecar entry of ``rel`` and how to name the stored file in errors."""
        entry = self.entry(info, rel)
        where = self._where(info, rel)
        if entry is None:
            raise CorruptCheckpointError(f"{where} is not listed in the checkpoint's sidecar")
        if entry.blob is not None:  # stored once for every checkpoint naming it; untrusted all the same
            where = f"{where} (stored once at {self.storage.display(entry.location(info.name))})"
        return entry, where

    @staticmethod
    def _wrong_size(entry: FileEntry, where: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{where} does not have the {entry.size} bytes the sidecar says: it is truncated or altered")

    @contextlib.contextmanager
    def open_verified(self, info: CheckpointInfo, rel: str, *, verify: bool = True,
                      hashing: bool | None = None) -> Iterator[_HashingReader]:
        """A stream of file ``rel`` of ``info``, bounded by its listed size.

        With ``verify``, a file whose stored size is not the listed one is refused before a byte
        is read, and on a clean exit the size and sha256 are checked (`CorruptCheckpointError` if
        they differ). ``hashing`` (default ``verify``): compute the sha256 even when not checking
        it here (`problems` compares it itself).
        """
        entry, where = self._listed(info, rel)
        try:
            with self.storage.open_read(entry.location(info.name)) as raw:
                if verify and _stored_size(raw) not in (None, entry.size):
                    raise self._wrong_size(entry, where)
                stream = _HashingReader(raw, entry.size, hashing=verify if hashing is None else hashing)
                try:
                    yield stream
                    if verify:
                        stream.drain()
                        if stream.size != entry.size or not stream.at_end():
                            raise self._wrong_size(entry, where)
                        if stream.digest.hexdigest() != entry.sha256:
                            raise CorruptCheckpointError(
                                f"{where} does not match its sha256 in the sidecar: it is corrupt")
                finally:
                    stream.close()
        except CheckpointNotFoundError as exc:
            raise CorruptCheckpointError(f"{where} is missing; the checkpoint is damaged") from exc

    def check_sizes(self, info: CheckpointInfo, rels: Collection[str]) -> None:
        """Refuse a missing, truncated or grown file among ``rels`` before any of them is read
        into anything (`CorruptCheckpointError`); one open each, nothing read."""
        for rel in rels:
            entry, where = self._listed(info, rel)
            try:
                with self.storage.open_read(entry.location(info.name)) as raw:
                    size = _stored_size(raw)
            except CheckpointNotFoundError as exc:
                raise CorruptCheckpointError(f"{where} is missing; the checkpoint is damaged") from exc
            if size not in (None, entry.size):
                raise self._wrong_size(entry, where)

    @contextlib.contextmanager
    def open_decoded(self, info: CheckpointInfo, rel: str, *, verify: bool = True) -> Iterator[Any]:
        """`open_verified`, decoding a compressed file: a stream of its logical bytes, whose
        frames and declared sizes are checked as they are read (`CorruptCheckpointError`)."""
        entry = self.entry(info, rel)
        with self.open_verified(info, rel, verify=verify) as stream:
            if entry is None or entry.codec is None:
                yield stream
                return
            decoded = DecodingReader(stream, entry.logical_size, self._where(info, entry.path))
            yield decoded
            if verify:
                decoded.finish()

    def read_bytes(self, info: CheckpointInfo, rel: str, *, verify: bool = True) -> bytes:
        with self.open_decoded(info, rel, verify=verify) as stream:
            return bytes(stream.read())

    def read_tensors(self, info: CheckpointInfo, rel: str, *, verify: bool = True,
                     into: Mapping[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        where = self._where(info, rel)
        entry = self.entry(info, rel)
        with self.open_decoded(info, rel, verify=verify) as stream:
            size = entry.logical_size if entry is not None else None
            return read_safetensors(stream, where=where, into=into, size=size)

    # --- model weights --------------------------------------------------------------------------

    def load(self, info: CheckpointInfo, *, verify: bool = True,
             into: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The model state dict of ``info``; tied names come back as one tensor under each name."""
        if info.sharding is not None and not info.sharding.consolidated:
            aliases = self.sharded_aliases(info, verify=verify)
            with self.dcp_folder(info, (sharded.MODEL_DIR,), verify=verify) as folder:
                full = sharded.load_plain(os.path.join(folder, sharded.MODEL_DIR))
            add_aliases(full, aliases, where=self.storage.display(info.name))
            return full
        if self.entry(info, MODEL_INDEX) is not None:
            filenames, aliases = parse_index(self.read_bytes(info, MODEL_INDEX, verify=verify),
                                             self._where(info, MODEL_INDEX))
            missing = [f for f in filenames if self.entry(info, f) is None]
            if missing:
                raise CorruptCheckpointError(
                    f"{self._where(info, MODEL_INDEX)} names {missing[0]!r}, which the sidecar does not list")
        else:
            filenames, aliases = [f.logical_path for f in info.files if is_model_weights(f.logical_path)], {}
            if not filenames and self.entry(info, ADAPTER_WEIGHTS) is not None:  # a peft adapter checkpoint
                filenames = [ADAPTER_WEIGHTS]
        if not filenames:
            raise CorruptCheckpointError(f"checkpoint {info.name!r} in {self.storage.display()} lists no model weights")
        state: dict[str, torch.Tensor] = {}
        for filename in filenames:
            tensors, metadata = self.read_tensors(info, filename, verify=verify, into=into)
            state.update(tensors)
            aliases.update(aliases_from_metadata(metadata))
        add_aliases(state, aliases, where=self.storage.display(info.name))
        return state

    def restore(self, info: CheckpointInfo, *, model: Any = None, optimizer: Any = None, scheduler: Any = None,
                rng: bool = True, stateful: Mapping[str, Any] | None = None, strict: bool = True,
                verify: bool = True) -> None:
        """Load unsharded checkpoint ``info`` into ``model`` and the training objects.

        The weights are read into the model's own tensors, the optimizer state into the
        optimizer's own state tensors where they match (a new optimizer's state takes new memory),
        and with both wanted the two files are read at once, each hashed on a thread of its own:
        on two cores the sha256 of one file runs beside the other's. With ``verify`` every file's
        size is checked before anything is read (a missing, truncated or grown file changes
        nothing); the optimizer, scheduler, RNG and ``stateful`` objects are set only once every
        byte checked out. Damage found after bytes reached the model or the optimizer's tensors
        raises `CorruptCheckpointError` saying so.
        """
        wanted = optimizer is not None or scheduler is not None or bool(stateful)
        training = (wanted or rng) and self.has_training_state(info)
        if wanted and not training:
            raise CheckpointNotFoundError(f"checkpoint {info.name!r} in {self.storage.display()} has no "
                                          "optimizer/scheduler/stateful state to restore")
        if verify:
            reads = [*(self._weight_files(info) if model is not None else []),
                     *([TRAINING_STATE_FILE, OPTIMIZER_FILE] if training else [])]
            self.check_sizes(info, [rel for rel in reads if self.entry(info, rel) is not None])
        lent = _Lent(_optimizer_tensors(optimizer) if training else {})
        values: TrainingStateValues | None = None
        if not training or model is None:
            if model is not None:
                self.restore_model(info, model, strict=strict, verify=verify)
            if training:
                values = self._training_state_into(info, lent, verify=verify, model_loaded=False)
        else:
            with ThreadPoolExecutor(1, thread_name_prefix="ckpt-restore") as pool:
                pending = pool.submit(self._training_state_into, info, lent, verify=verify, model_loaded=True)
                try:
                    self.restore_model(info, model, strict=strict, verify=verify)
                except CorruptCheckpointError as exc:
                    with contextlib.suppress(Exception):
                        pending.result()  # it fills the optimizer's tensors: wait, then say whether it did
                    if lent.lent:
                        raise CorruptCheckpointError(
                            f"{exc}; the optimizer's state tensors were overwritten too") from exc
                    raise
                values = pending.result()
        if values is not None:
            values.apply(optimizer=optimizer, scheduler=scheduler, rng=rng, stateful=stateful)

    def _training_state_into(self, info: CheckpointInfo, lent: _Lent, *, verify: bool,
                             model_loaded: bool) -> TrainingStateValues:
        """`training_state`, read into ``lent`` tensors; damage found after bytes reached them (or a
        model loaded beside) says so."""
        try:
            return self.training_state(info, verify=verify, into=lent)
        except CorruptCheckpointError as exc:
            changed = [what for what, hit in (("the model already holds this checkpoint's weights", model_loaded),
                                              ("the optimizer's state tensors are partly overwritten", lent.lent))
                       if hit]
            if not changed:
                raise
            raise CorruptCheckpointError(
                f"{exc}; the restore is partly done: {' and '.join(changed)}; restore another checkpoint") from exc

    @staticmethod
    def _weight_files(info: CheckpointInfo) -> builtins.list[str]:
        """The files `load` reads for the model's weights: the index and the shards, or an adapter's."""
        files = [f.logical_path for f in info.files
                 if is_model_weights(f.logical_path) or f.logical_path == MODEL_INDEX]
        return files or [f.logical_path for f in info.files if f.logical_path == ADAPTER_WEIGHTS]

    def restore_model(self, info: CheckpointInfo, model: Any, *, strict: bool = True, verify: bool = True) -> None:
        """Read checkpoint ``info``'s weights straight into ``model``'s own tensors."""
        module = unwrap_model(model)
        if is_peft_model(module) and self.entry(info, ADAPTER_WEIGHTS) is not None:
            load_adapter_state(module, self.load(info, verify=verify), strict=strict,
                               where=self.storage.display(info.name))
            return
        live = module.state_dict()
        lent = _Lent(live)
        try:
            state = self.load(info, verify=verify, into=lent)
        except CorruptCheckpointError as exc:
            if not lent.lent:  # refused before any byte reached the model (a size, a header)
                raise
            raise CorruptCheckpointError(
                f"{exc}; the model now holds partly loaded weights: restore another checkpoint") from exc
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
                "(pass strict=False to load what matches)") from exc

    # --- training state -----------------------------------------------------------------------

    def has_training_state(self, info: CheckpointInfo) -> bool:
        return self.entry(info, TRAINING_STATE_FILE) is not None

    def training_state(self, info: CheckpointInfo, *, verify: bool = True,
                       into: Mapping[str, torch.Tensor] | None = None) -> TrainingStateValues:
        """The training state of ``info``; tensors of ``into`` that match a stored one are filled in place."""
        if not self.has_training_state(info):
            raise CheckpointNotFoundError(
                f"checkpoint {info.name!r} in {self.storage.display()} has no training state")
        doc = self.read_bytes(info, TRAINING_STATE_FILE, verify=verify)
        tensors: dict[str, torch.Tensor] = {}
        if info.sharding is not None:
            with self.dcp_folder(info, (sharded.OPTIMIZER_DIR,), verify=verify) as folder:
                path = os.path.join(folder, sharded.OPTIMIZER_DIR)
                tensors = sharded.load_plain(path) if os.path.isdir(path) else {}
        elif self.entry(info, OPTIMIZER_FILE) is not None:
            tensors, _ = self.read_tensors(info, OPTIMIZER_FILE, verify=verify, into=into)
        return TrainingState.from_files(doc, tensors, where=self._where(info, TRAINING_STATE_FILE))

    # --- sharded checkpoints (torch.distributed.checkpoint) ---------------------------------------

    @contextlib.contextmanager
    def dcp_folder(self, info: CheckpointInfo, parts: tuple[str, ...], *, verify: bool, group: Any = None,
                   split: bool = False) -> Iterator[str]:
        """A local folder with the files DCP reads of ``info``'s folders ``parts``, each checked
        against the sidecar first.

        A local root is used in place (DCP reads every ``*.safetensors`` of a folder, so an unlisted
        one there is an error); from object stores the files are downloaded to a temporary folder.
        ``split``: every rank of ``group`` checks a part and all agree (a collective call).
        """
        rank, world = (distributed.rank(), distributed.world_size()) if split else (0, 1)
        wanted = [e for e in info.files if sharded.read_by_dcp(e.path, parts)]
        scratch: str | None = None
        error: BaseException | None = None
        folder = ""
        try:
            if self.storage.is_local:
                folder = self.storage.path(info.name)
                listed = {e.path for e in info.files}
                for rel in self.storage.list_files(info.name):
                    if sharded.read_by_dcp(rel, parts) and rel not in listed:
                        raise CorruptCheckpointError(
                            f"{self._where(info, rel)} is not listed in the checkpoint's sidecar; remove it")
                for entry in wanted[rank::world] if verify else []:
                    with self.open_verified(info, entry.path):
                        pass  # drained and checked on exit
            else:
                scratch = folder = tempfile.mkdtemp(prefix="ckpt-dcp-")
                for entry in wanted:
                    self._copy_file(info, entry, Path(scratch), verify=verify)
        except BaseException as exc:
            error = exc
        try:
            if split:
                distributed.agree(error, group=group)
            elif error is not None:
                raise error
            yield folder
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)

    def sharded_aliases(self, info: CheckpointInfo, *, verify: bool) -> dict[str, str]:
        """The tied weights of a sharded checkpoint: {dropped name: kept name}."""
        if self.entry(info, sharded.ALIASES_FILE) is None:
            return {}
        where = self._where(info, sharded.ALIASES_FILE)
        return aliases_from_metadata({ALIASES_KEY: self.read_bytes(info, sharded.ALIASES_FILE, verify=verify)
                                      .decode("utf-8", "replace")}, where=where)

    def restore_sharded(self, info: CheckpointInfo, model: Any, *, optimizer: Any, scheduler: Any, rng: bool,
                        strict: bool, verify: bool, group: Any) -> None:
        """Load ``info`` into a model whose state is sharded (or a sharded checkpoint into any model),
        resharding to the model's current placements; every rank calls this together."""
        module = unwrap_model(model)
        if info.sharding is None:
            if optimizer is not None:
                raise InvalidArgumentError(
                    f"checkpoint {info.name!r} was saved unsharded: its optimizer state cannot be loaded into a "
                    "sharded optimizer (restore the model only, or resume from a sharded checkpoint)")
            sharded.set_full_model(module, self.load(info, verify=verify), strict=strict)
            if rng and self.has_training_state(info):
                self.training_state(info, verify=verify).apply(rng=True)
            return
        consolidated = info.sharding.consolidated
        skeleton = rank_state = full_model = None
        aliases: dict[str, str] = {}
        error: BaseException | None = None
        try:  # what each rank reads on its own: every rank must hear of a failure before the collectives
            if self.has_training_state(info):
                where = self._where(info, TRAINING_STATE_FILE)
                skeleton = sharded.parse_skeleton(
                    loads_strict(self.read_bytes(info, TRAINING_STATE_FILE, verify=verify), where), where)
            own = (sharded.rank_file(distributed.rank(), "json"),
                   sharded.rank_file(distributed.rank(), "safetensors"))
            if rng and info.sharding.world_size == distributed.world_size() and all(self.entry(info, r) for r in own):
                tensors, _ = self.read_tensors(info, own[1], verify=verify)
                rank_state = (self.read_bytes(info, own[0], verify=verify), tensors)
            full_model = self.load(info, verify=verify) if consolidated else None
            aliases = self.sharded_aliases(info, verify=verify)
        except BaseException as exc:
            error = exc
        distributed.agree(error, group=group)
        parts = (sharded.OPTIMIZER_DIR,) if consolidated else (sharded.MODEL_DIR, sharded.OPTIMIZER_DIR)
        with self.dcp_folder(info, parts, verify=verify, group=group, split=True) as folder:
            values = sharded.load_into(folder, module, full_model=full_model, optimizer=optimizer, skeleton=skeleton,
                                       aliases=aliases, saved_world=info.sharding.world_size, rank_state=rank_state,
                                       rng=rng, strict=strict, group=group)
        if scheduler is not None and isinstance(values, dict) and "scheduler" in values:
            try:
                scheduler.load_state_dict(values["scheduler"])
            except (KeyError, ValueError, TypeError) as exc:
                raise CorruptCheckpointError(f"the saved scheduler state does not fit: {exc}") from exc

    # --- verify and copy ----------------------------------------------------------------------

    def leftovers(self, info: CheckpointInfo) -> builtins.list[str]:
        """Temporary files of interrupted writes in the folder: harmless, and removed by cleanup."""
        try:
            present = self.storage.list_files(info.name)
        except StorageError:
            return []
        return [f"{rel}: left by an interrupted sidecar rewrite (cleanup removes it)" for rel in sorted(present)
                if rel.startswith(SIDECAR + TMP_INFIX)]

    def problems(self, info: CheckpointInfo) -> builtins.list[str]:
        """Every missing, truncated, altered or unlisted file of checkpoint ``info``."""
        problems = []
        for entry in info.files:
            try:
                with self.open_verified(info, entry.path, verify=False, hashing=True) as stream:
                    stream.drain()
                    size = stream.size + _count_rest(stream.raw)
                    digest = stream.digest.hexdigest()
            except CorruptCheckpointError:
                shared = f" (its shared copy {entry.location(info.name)})" if entry.blob else ""
                problems.append(f"{entry.path}: missing{shared}")
                continue
            if size != entry.size:
                problems.append(f"{entry.path}: size {size} != {entry.size} in the sidecar")
            elif digest != entry.sha256:
                problems.append(f"{entry.path}: sha256 does not match the sidecar")
        listed = {e.path for e in info.files} | {SIDECAR}
        try:
            present = self.storage.list_files(info.name)
        except StorageError as exc:
            return [*problems, f"cannot list the folder: {exc}"]
        problems += [f"{rel}: not listed in the sidecar" for rel in sorted(set(present) - listed)
                     if not is_library_temp(rel)]
        return problems

    def download(self, info: CheckpointInfo, dest: str | os.PathLike[str], *, progress: bool | None = None,
                 only: Collection[str] | None = None, decompress: bool = False) -> Path:
        """Copy checkpoint ``info`` into local folder ``dest``, each file sha256-checked before it lands.

        ``only``: copy just these files (stored or logical paths); the sidecar in ``dest`` then lists
        just them (so it verifies). ``decompress``: compressed files land decoded under their plain
        names, and the sidecar lists them so. The copy is self-contained: nothing in it is shared.
        """
        if only is not None:
            kept = tuple(f for f in info.files if f.path in only or f.logical_path in only)
            info = info.replace(files=kept, size=sum(f.size for f in kept), updated_at=info.updated_at)
        target = Path(dest)
        target.mkdir(parents=True, exist_ok=True)
        base = target.resolve()
        show = progress if progress is not None else (sys.stderr.isatty() and info.size > 4 << 20)
        from tqdm.auto import tqdm

        entries = []
        with tqdm(total=info.size, unit="B", unit_scale=True, disable=not show, desc=info.name) as bar:
            for entry in info.files:
                entries.append(self._copy_file(info, entry, target, base=base, progress=bar.update,
                                               decode=decompress))
        copied = info.replace(files=tuple(entries), size=sum(e.size for e in entries), updated_at=info.updated_at)
        (target / SIDECAR).write_text(copied.dumps())
        return target

    def _copy_file(self, info: CheckpointInfo, entry: FileEntry, target: Path, *, base: Path | None = None,
                   verify: bool = True, progress: Any = None, decode: bool = False) -> FileEntry:
        """Copy one file of ``info`` under local folder ``target``; it lands only once its sha256 matched.

        ``decode``: a compressed file lands decoded, under its logical name. Returns its entry there.
        """
        decode = decode and entry.codec is not None
        rel = entry.logical_path if decode else entry.path
        out = target / rel
        if not out.resolve().is_relative_to(base or target.resolve()):  # sidecar paths are checked; links too
            raise CorruptCheckpointError(f"{rel!r} would be written outside {target}")
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        digest, size = hashlib.sha256(), 0
        try:
            opener = self.open_decoded if decode else self.open_verified
            with opener(info, entry.path, verify=verify) as stream, open(partial, "wb") as f:
                buffer = memoryview(bytearray(_BLOCK))
                while n := stream.readinto(buffer):
                    f.write(buffer[:n])
                    if decode:
                        digest.update(buffer[:n])
                        size += n
                    if progress is not None:
                        progress(n)
            os.replace(partial, out)
        finally:
            partial.unlink(missing_ok=True)
        if decode:
            return FileEntry(rel, size, digest.hexdigest())
        return FileEntry(entry.path, entry.size, entry.sha256, codec=entry.codec, raw_size=entry.raw_size)

    def signed_urls(self, info: CheckpointInfo, *, expires: int) -> dict[str, str]:
        if not isinstance(expires, int) or isinstance(expires, bool) or expires < 1:
            raise InvalidArgumentError(f"expires must be a positive number of seconds, got {expires!r}")
        urls = {}
        for rel, at in [(f.path, f.location(info.name)) for f in info.files] + [(SIDECAR, f"{info.name}/{SIDECAR}")]:
            urls[rel] = self.storage.sign(at, expires)
        return urls


def _count_rest(raw: Any) -> int:
    """Bytes left in ``raw`` (a file longer than its sidecar says), counted without keeping them."""
    total = 0
    while chunk := raw.read(_BLOCK):
        total += len(chunk)
    return total


def _storage_id(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
