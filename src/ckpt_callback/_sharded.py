"""Sharded state (FSDP2 ``fully_shard``, DTensor tensor parallelism) through torch.distributed.checkpoint.

DCP is the engine: `get_state_dict` names every tensor by its FQN, DCP's planner decides which
rank writes which shard (a replicated tensor once), its HF writer writes each rank's shards as
safetensors with their offsets, and on load it reshards to whatever world size and placements
the loading model has, or to plain tensors in one process. This module adds what a checkpoint
needs around it:

- each rank's files are hashed as DCP writes them (and uploaded by that rank on object
  stores), so rank 0 can list every file's size and sha256 in the sidecar it writes last;
- per-rank state that cannot be resharded (RNG) goes to ``ranks/``, restored only at the same
  world size;
- before DCP reads a folder, every file in it is checked against the sidecar (each rank a part).

A sharded checkpoint folder::

    sharded/shard-0000R-model-00001-of-00001.safetensors   model shards of rank R-1 (DCP's HF writer)
    sharded/aliases.json                                    tied weights, stored under their first name
    optimizer/shard-0000R-model-00001-of-00001.safetensors optimizer (and other training) tensors
    ranks/rank-0000R.json, ranks/rank-0000R.safetensors    per-rank RNG state
    training_state.json                                     optimizer param groups, scheduler, step
    model-00001-of-00001.safetensors, model.safetensors.index.json   when consolidated (then no sharded/)
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from . import _distributed as distributed
from ._errors import CorruptCheckpointError, InvalidArgumentError, SaveError
from ._serialization import ParallelDigest, flatten_state, tensor_keys, unflatten_state, view_key
from ._sidecar import FileEntry, Sharding
from ._storage import Storage, fsync_dir
from ._training import TrainingState

__all__ = ["MODEL_DIR", "OPTIMIZER_DIR", "RANKS_DIR", "ShardedState", "is_sharded"]

MODEL_DIR = "sharded"  # DCP's own name for shards not (yet) consolidated
OPTIMIZER_DIR = "optimizer"
RANKS_DIR = "ranks"
ALIASES_FILE = f"{MODEL_DIR}/aliases.json"  # tied weights: {dropped name: kept name}, stored once
_BLOCK = 8 << 20
_CHUNK = 16 << 20


def _dtensor_type() -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_sharded(tensors: Mapping[str, Any]) -> bool:
    """Whether a state dict holds DTensors (FSDP2 or tensor-parallel parameters)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(t, dtensor) for t in tensors.values())


def rank_file(rank: int, suffix: str) -> str:
    return f"{RANKS_DIR}/rank-{rank:05d}.{suffix}"


def describe(tensors: Mapping[str, Any], world_size: int, *, consolidated: bool = False) -> Sharding:
    """The sidecar's record of how ``tensors`` are sharded."""
    dtensor = _dtensor_type()
    meshes: set[tuple[int, ...]] = set()
    placements: set[str] = set()
    for t in tensors.values():
        if dtensor is not None and isinstance(t, dtensor):
            meshes.add(tuple(t.device_mesh.shape))
            placements.update(repr(p) for p in t.placements)
    return Sharding(world_size=world_size, meshes=tuple(sorted(meshes)), placements=tuple(sorted(placements)),
                    consolidated=consolidated)


def untie(model: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tied weights (an LM head sharing the embeddings) once, under their first name, and the others'
    names as ``{dropped: kept}``: safetensors refuses tensors that share memory."""
    dtensor = _dtensor_type()
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name, tensor in model.items():
        local = tensor.to_local() if dtensor is not None and isinstance(tensor, dtensor) else tensor
        key = view_key(local) if local.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        kept[name] = tensor
    return kept, aliases


@dataclass
class ShardedState:
    """One rank's part of a sharded checkpoint, captured on the training thread.

    ``model``/``tensors`` map names to DTensors (or replicated tensors) for DCP; ``skeleton`` is
    the JSON part of the training state (optimizer param groups, scheduler, extra: the same on
    every rank, written by rank 0); ``rank_state`` this rank's RNG.
    """

    model: dict[str, torch.Tensor]
    tensors: dict[str, torch.Tensor]
    skeleton: Any
    rank_state: TrainingState | None
    aliases: dict[str, str] = field(default_factory=dict)

    @classmethod
    def capture(cls, module: torch.nn.Module, *, optimizer: Any = None, scheduler: Any = None,
                extra: Mapping[str, Any] | None = None, rng: bool = False) -> ShardedState:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if optimizer is not None:
            model_sd, optim_sd = get_state_dict(module, optimizer)
        else:
            model_sd, optim_sd = get_model_state_dict(module), None
        payload: dict[str, Any] = {}
        if optim_sd is not None:
            payload["optimizer"] = optim_sd
        if scheduler is not None:
            payload["scheduler"] = scheduler.state_dict()
        if extra:
            payload["extra"] = dict(extra)
        skeleton, tensors = flatten_state(payload) if payload else (None, {})
        rank_state = TrainingState.capture(rng=True) if rng else None
        model, aliases = untie(cast(dict[str, torch.Tensor], dict(model_sd)))
        return cls(model, tensors, skeleton, rank_state, aliases)

    def snapshot(self, area: Any) -> ShardedState:
        """A copy of this rank's shards in the staging buffers of ``area`` (the only stall of an async save)."""
        dtensor = _dtensor_type()
        flat = {f"m/{k}": v for k, v in self.model.items()} | {f"t/{k}": v for k, v in self.tensors.items()}
        local = {k: v.to_local() if dtensor is not None and isinstance(v, dtensor) else v for k, v in flat.items()}
        if self.rank_state is not None:
            local |= {f"r/{k}": v for k, v in self.rank_state.tensors.items()}
        staged = area.snapshot(local)

        def rewrap(key: str, original: torch.Tensor) -> torch.Tensor:
            copy = staged[key]
            if dtensor is not None and isinstance(original, dtensor):
                return dtensor.from_local(copy, original.device_mesh, original.placements, run_check=False,
                                          shape=original.shape, stride=original.stride())
            return copy

        rank_state = None
        if self.rank_state is not None:
            rank_state = TrainingState(self.rank_state.skeleton,
                                       {k: staged[f"r/{k}"] for k in self.rank_state.tensors})
        return ShardedState({k: rewrap(f"m/{k}", v) for k, v in self.model.items()},
                            {k: rewrap(f"t/{k}", v) for k, v in self.tensors.items()}, self.skeleton, rank_state,
                            self.aliases)


# --- writing ------------------------------------------------------------------------------------


_HASHER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-shard-hash")


class _HashingStream:
    """A file DCP writes through: every byte is hashed on its way out, beside the write.

    DCP hands over each file as one buffer; it goes out in chunks while a second thread hashes
    the chunks already written (both release the GIL)."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.digest = ParallelDigest(_HASHER)
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), _CHUNK):
            chunk = view[start:start + _CHUNK]
            self.raw.write(chunk)
            self.digest.update(chunk)
        self.size += len(view)
        return len(view)

    def __getattr__(self, name: str) -> Any:  # tell, fileno, flush, close...
        return getattr(self.raw, name)


def _hashing_filesystem() -> Any:
    from torch.distributed.checkpoint.filesystem import FileSystem

    class HashingFileSystem(FileSystem):
        """DCP's local file system, keeping (size, sha256) of every file it creates."""

        def __init__(self) -> None:
            self.written: dict[str, tuple[int, str]] = {}

        @contextlib.contextmanager
        def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
            with super().create_stream(path, mode) as raw:
                if "w" not in mode:
                    yield raw
                    return
                stream = _HashingStream(raw)
                yield stream
            self.written[os.fspath(path)] = (stream.size, stream.digest.hexdigest())

    return HashingFileSystem()


def write_shards(storage: Storage, folder: str, state: ShardedState, *, group: Any) -> list[FileEntry]:
    """This rank's part of a sharded save into ``folder`` (every rank calls it at once).

    On a local root DCP writes straight into the folder; on object stores into a temporary
    folder that this rank then uploads. Returns this rank's files with size and sha256.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    rank = distributed.rank()
    with _local_folder(storage, folder) as base:
        fs = _hashing_filesystem()
        for sub, tensors in ((MODEL_DIR, state.model), (OPTIMIZER_DIR, state.tensors)):
            if not tensors:  # the same keys on every rank: all skip together
                continue
            writer = HuggingFaceStorageWriter(os.path.join(base, sub), save_distributed=True)
            writer.fs = fs
            with _dcp_failures("writing the shards"):
                dcp.save(dict(tensors), storage_writer=writer, process_group=group)
        written = {os.path.relpath(path, base).replace(os.sep, "/"): got for path, got in fs.written.items()}
        if storage.is_local:
            for sub in {rel.rpartition("/")[0] for rel in written}:
                fsync_dir(os.path.join(base, sub))
        else:
            for rel in written:
                _upload(storage, os.path.join(base, rel), f"{folder}/{rel}")
    entries = [FileEntry(rel, size, sha) for rel, (size, sha) in sorted(written.items())]
    if state.rank_state is not None:
        from ._serialization import write_chunks, write_safetensors

        doc, tensors = state.rank_state.to_files(step=0, epoch=None)
        for rel, produce in (
            (rank_file(rank, "safetensors"), lambda f: write_safetensors(f, tensors, {"format": "pt"})),
            (rank_file(rank, "json"), lambda f: write_chunks(f, [doc])),
        ):
            size, sha = storage.write_stream(f"{folder}/{rel}", produce)
            entries.append(FileEntry(rel, size, sha))
    return entries


@contextlib.contextmanager
def _local_folder(storage: Storage, folder: str) -> Iterator[str]:
    if storage.is_local:
        yield storage.path(folder)
        return
    scratch = tempfile.mkdtemp(prefix="ckpt-shards-")
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _upload(storage: Storage, local: str, rel: str) -> None:
    def produce(out: Any) -> None:
        with open(local, "rb") as f:
            while chunk := f.read(_BLOCK):
                out.write(chunk)

    storage.write_stream(rel, produce)


def read_model_shards(storage: Storage, folder: str, shards: list[FileEntry]) -> dict[str, torch.Tensor]:
    """The full model from the shards every rank wrote into ``folder`` (rank 0, for consolidation).

    Read on the writer's side of the commit: a local folder as it is, an object store's shards
    downloaded to a temporary folder first (each checked against the size and sha256 its rank sent).
    """
    if storage.is_local:
        return load_plain(os.path.join(storage.path(folder), MODEL_DIR))
    with tempfile.TemporaryDirectory(prefix="ckpt-consolidate-") as scratch:
        for entry in shards:
            target = os.path.join(scratch, entry.path)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            digest, size = hashlib.sha256(), 0
            with storage.open_read(f"{folder}/{entry.path}") as src, open(target, "wb") as out:
                while chunk := src.read(_BLOCK):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            if (size, digest.hexdigest()) != (entry.size, entry.sha256):
                raise SaveError(f"{storage.display(folder, entry.path)} changed after its rank wrote it")
        return load_plain(os.path.join(scratch, MODEL_DIR))


def remove_files(storage: Storage, folder: str, entries: list[FileEntry]) -> None:
    for entry in entries:
        storage.remove(f"{folder}/{entry.path}")
    if storage.is_local:
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(storage.path(folder), MODEL_DIR))


# --- reading ------------------------------------------------------------------------------------


def is_training_part(rel: str) -> bool:
    """Whether ``rel`` is one of a sharded checkpoint's shard, optimizer or per-rank files (not for inference)."""
    return rel.partition("/")[0] in (MODEL_DIR, OPTIMIZER_DIR, RANKS_DIR) and "/" in rel


def read_by_dcp(rel: str, parts: tuple[str, ...] = (MODEL_DIR, OPTIMIZER_DIR)) -> bool:
    """Whether DCP's reader reads file ``rel`` of a sharded checkpoint when it reads the folders ``parts``
    (every safetensors file in them)."""
    folder, _, base = rel.rpartition("/")
    return base.endswith(".safetensors") and folder in parts


def parse_skeleton(doc: Any, where: str) -> Any:
    if not isinstance(doc, dict) or "state" not in doc:
        raise CorruptCheckpointError(f"{where} is not a training state document")
    return doc["state"]


def set_full_model(module: torch.nn.Module, state: dict[str, torch.Tensor], *, strict: bool) -> None:
    """Load full (unsharded) tensors into a sharded model: each rank keeps its own shards of them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    with _dcp_errors("the checkpoint"):
        set_model_state_dict(module, cast(Any, state), options=StateDictOptions(full_state_dict=True, strict=strict))


def load_plain(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of the DCP folder ``path`` (verified, local) as plain full tensors, in this process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    with _dcp_errors(path):
        state = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in _tensor_metadata(path).items()}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*single process.*")
            dcp.load(state, storage_reader=HuggingFaceStorageReader(path), no_dist=True)
    return state


@contextlib.contextmanager
def _dcp_failures(what: str) -> Iterator[None]:
    """DCP's CheckpointException (a BaseException, raised on every rank) as a `SaveError` naming each rank's error."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as exc:
        failures = "; ".join(f"rank {rank}: {type(error).__name__}: {error}"
                             for rank, (error, _) in sorted(exc.failures.items()))
        raise SaveError(f"{what} failed on {failures}") from exc


@contextlib.contextmanager
def _dcp_errors(path: str) -> Iterator[None]:
    """Whatever DCP raises reading files that passed their sha256 check: a checkpoint that does not fit."""
    try:
        yield
    except (CorruptCheckpointError, InvalidArgumentError):
        raise
    except Exception as exc:
        raise _unfit(path, exc) from exc
    except BaseException as exc:  # DCP's CheckpointException: the first failed rank's error
        from torch.distributed.checkpoint.api import CheckpointException

        if not isinstance(exc, CheckpointException):
            raise
        first = next(iter(exc.failures.values()), (exc, None))[0]
        raise _unfit(path, first) from exc


def _unfit(path: str, exc: BaseException) -> CorruptCheckpointError:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CorruptCheckpointError(f"the sharded checkpoint in {path} does not fit or is malformed: {message[:500]}")


def load_into(folder: str, module: torch.nn.Module, *, full_model: dict[str, torch.Tensor] | None,
              aliases: Mapping[str, str], optimizer: Any, skeleton: Any, saved_world: int,
              rank_state: tuple[bytes, dict[str, torch.Tensor]] | None, rng: bool, strict: bool, group: Any) -> Any:
    """Load a verified local sharded checkpoint into a live (sharded or plain) model and optimizer.

    DCP reshards the shards to the model's current placements; ``full_model`` (the weights of a
    consolidated checkpoint) is instead split by each rank itself. Returns the loaded training
    state values (scheduler, extra) for the caller to apply.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    no_dist = distributed.world_size() == 1
    options = StateDictOptions(strict=strict)
    with _dcp_errors(folder), warnings.catch_warnings():
        # Every shard's offsets are checked before DCP fills live tensors from them.
        if full_model is None:
            _tensor_metadata(os.path.join(folder, MODEL_DIR))
        optimizer_dir = os.path.join(folder, OPTIMIZER_DIR)
        saved = _tensor_metadata(optimizer_dir) if os.path.isdir(optimizer_dir) else {}
        warnings.filterwarnings("ignore", message=".*single process.*")
        if full_model is not None:
            set_model_state_dict(module, cast(Any, full_model),
                                 options=StateDictOptions(full_state_dict=True, strict=strict))
        else:
            model_sd = get_model_state_dict(module, options=options)
            stored = {k: v for k, v in model_sd.items() if k not in aliases}  # a tied one is loaded once
            dcp.load(stored, storage_reader=HuggingFaceStorageReader(os.path.join(folder, MODEL_DIR)),
                     process_group=group, no_dist=no_dist, planner=None if strict else _lenient_planner())
            model_sd.update(stored)
            for alias, name in aliases.items():
                if alias in model_sd and name in stored:
                    model_sd[alias] = stored[name]
            set_model_state_dict(module, model_sd, options=options)
        use_optimizer = optimizer is not None and isinstance(skeleton, dict) and "optimizer" in skeleton
        values: Any = {}
        if skeleton is not None:
            live = flatten_state({"optimizer": get_optimizer_state_dict(module, optimizer, options=options)})[1] \
                if use_optimizer else {}
            targets = _targets(optimizer_dir, skeleton, live, saved)
            if targets:
                dcp.load(targets, storage_reader=HuggingFaceStorageReader(optimizer_dir),
                         process_group=group, no_dist=no_dist)
            values = unflatten_state(skeleton, targets, where=os.path.join(folder, "training_state.json"))
        if use_optimizer:
            set_optimizer_state_dict(module, optimizer, values["optimizer"], options=options)
    if rng:
        _restore_rank_rng(rank_state, saved_world)
    return values


def _tensor_metadata(path: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor DCP finds in folder ``path``."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    found = {}
    for key, m in HuggingFaceStorageReader(path).read_metadata().state_dict_metadata.items():
        if not isinstance(m, TensorStorageMetadata):
            raise CorruptCheckpointError(f"{path}: {key!r} is not a tensor")
        shape = tuple(m.size)
        _check_chunks(path, key, shape, [(tuple(c.offsets), tuple(c.sizes)) for c in m.chunks])
        found[key] = (shape, m.properties.dtype)
    return found


def _check_chunks(path: str, key: str, shape: tuple[int, ...], chunks: list[tuple[tuple[int, ...], ...]]) -> None:
    """The shards of tensor ``key`` cover it exactly once (offsets come from untrusted files: a gap
    would leave uninitialized memory in what `load` returns, an overlap would mix two shards)."""
    def volume(sizes: tuple[int, ...]) -> int:
        total = 1
        for n in sizes:
            total *= n
        return total

    def overlap(a: tuple[tuple[int, ...], ...], b: tuple[tuple[int, ...], ...]) -> bool:
        return all(o1 < o2 + s2 and o2 < o1 + s1 for o1, s1, o2, s2 in zip(a[0], a[1], b[0], b[1], strict=True))

    bad = any(len(off) != len(shape) or len(sizes) != len(shape) for off, sizes in chunks)
    bad = bad or sum(volume(sizes) for _, sizes in chunks) != volume(shape)
    bad = bad or any(o < 0 or n < 0 or o + n > dim for off, sizes in chunks
                     for o, n, dim in zip(off, sizes, shape, strict=True))
    if not bad and len(chunks) <= 4096:
        nonempty = [c for c in chunks if volume(c[1])]
        bad = any(overlap(a, b) for i, a in enumerate(nonempty) for b in nonempty[i + 1:])
    if bad:
        raise CorruptCheckpointError(f"{path}: the shards of {key!r} do not cover its shape {list(shape)} "
                                     "exactly once; the checkpoint is corrupt")


def _lenient_planner() -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner

    return DefaultLoadPlanner(allow_partial_load=True)


def _targets(path: str, skeleton: Any, live: dict[str, torch.Tensor],
             metadata: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
    """Tensors to load the training state into: the live optimizer's (resharded in place) where it
    has one, else plain tensors of the saved shape (scheduler, extra)."""
    targets = {}
    for key in tensor_keys(skeleton):
        if key in live:
            targets[key] = live[key]
        elif key in metadata:
            shape, dtype = metadata[key]
            targets[key] = torch.empty(shape, dtype=dtype)
        else:
            raise CorruptCheckpointError(f"{path} has no tensor {key!r}, which training_state.json names")
    return targets


def _restore_rank_rng(rank_state: tuple[bytes, dict[str, torch.Tensor]] | None, saved_world: int) -> None:
    world = distributed.world_size()
    if saved_world != world:
        warnings.warn(f"the RNG states were saved by {saved_world} ranks and this run has {world}: they are not "
                      "restored (random draws will differ from the run that saved)", stacklevel=3)
        return
    if rank_state is None:
        return
    doc, tensors = rank_state
    values = TrainingState.from_files(doc, tensors, where=rank_file(distributed.rank(), "json")).values
    if "rng" in values:
        from ._training import restore_rng

        restore_rng(values["rng"])

