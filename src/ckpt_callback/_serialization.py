"""Tensors to safetensors bytes and back, and nested training state to tensors + JSON.

Plan first, then act: `plan_model_files` decides which tensor goes to which file
(deduplicating tied tensors and sharding like HuggingFace), and the small
`write_safetensors` / `read_safetensors` functions do the byte work in one pass:
hashing and writing share the pass, reading fills fresh tensors straight from the
stream (no intermediate copy of the whole file).

Nothing here pickles: every non-tensor value goes to JSON through `flatten_state`.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import IO, Any, Protocol, TypeGuard

import torch

from ._errors import CorruptCheckpointError, InvalidArgumentError
from ._sidecar import check_relative_path, loads_strict

__all__ = [
    "MAX_HEADER_BYTES",
    "ModelPlan",
    "ParallelDigest",
    "TensorSlot",
    "add_aliases",
    "aliases_from_metadata",
    "flatten_state",
    "frozen_names",
    "parse_header",
    "parse_index",
    "plan_model_files",
    "read_safetensors",
    "safetensors_sha256",
    "safetensors_size",
    "unflatten_state",
    "write_safetensors",
]

ALIASES_KEY = "ckpt_callback.aliases"
_CHUNK = 16 << 20
_HASH_LAG_BYTES = 64 << 20  # how far hashing may fall behind the I/O (bounds memory kept alive)
_HASH_INLINE_BYTES = 256 << 10  # smaller updates are hashed on the caller's thread when none is queued
_READ_CHUNK = 16 << 20  # one read call of `read_safetensors`: 8-64 MiB all read as fast here
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit for the JSON header
_MAX_DIMS = 64

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
}
for _attr, _code in [
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
    ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
]:
    if hasattr(torch, _attr):
        _DTYPES[getattr(torch, _attr)] = _code
_CODES = {code: dtype for dtype, code in _DTYPES.items()}


@dataclass
class ModelPlan:
    """Which tensors go into which safetensors file, decided before any I/O."""

    files: dict[str, dict[str, torch.Tensor]]
    aliases: dict[str, str] = field(default_factory=dict)  # dropped name -> kept name
    index: dict[str, Any] | None = None  # model.safetensors.index.json when sharded
    frozen_files: frozenset[str] = frozenset()  # files holding only frozen tensors: they repeat from save to save


def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.device, t.untyped_storage().data_ptr())


def view_key(t: torch.Tensor) -> tuple[Any, ...]:
    """What makes two tensors the same view of the same memory (tied weights)."""
    return (*_storage_key(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def dedupe_tensors(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop exact aliases (tied weights) and copy partial overlaps, as safetensors needs.

    Returns the tensors to write and ``{dropped_name: kept_name}``, which `load` uses to give
    every original name back. The first name in state-dict order (module registration order)
    is kept, which for GPT-2 keeps ``transformer.wte.weight`` and drops ``lm_head.weight``,
    as transformers does.
    """
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_view: dict[tuple[Any, ...], str] = {}
    storages: set[tuple[Any, ...]] = set()
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise InvalidArgumentError(
                f"state entry {name!r} is a {type(tensor).__name__}, not a tensor; the model state "
                "must map names to tensors (pass training state through save(..., extra=...))"
            )
        if tensor.dtype not in _DTYPES:
            raise InvalidArgumentError(
                f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store; "
                f"convert it first (supported: {', '.join(sorted(str(d) for d in _DTYPES))})"
            )
        if tensor.numel() == 0 or tensor.layout != torch.strided:
            kept[name] = tensor
            continue
        view = view_key(tensor)
        if view in by_view:
            aliases[name] = by_view[view]
            continue
        storage = _storage_key(tensor)
        if storage in storages:
            tensor = tensor.clone()  # a different view of shared memory: store it on its own
        storages.add(storage)
        by_view[view] = name
        kept[name] = tensor
    return kept, aliases


def plan_model_files(
    state: Mapping[str, torch.Tensor], *, max_shard_size: int | str = "5GB", prefix: str = "model",
    frozen: Iterable[str] = (),
) -> ModelPlan:
    """Decide the files of a model state dict, in HuggingFace's layout.

    One ``model.safetensors`` when it fits in ``max_shard_size``, else
    ``model-00001-of-0000N.safetensors`` files plus ``model.safetensors.index.json``.

    ``frozen``: names of tensors that do not change between saves (parameters with
    ``requires_grad=False``). When some but not all tensors are frozen, the frozen ones get shard
    files of their own (numbered first), so each such file repeats byte for byte from save to save
    and can be stored once; the index maps every name to its file, so ``from_pretrained`` loads it.

    Example:
        >>> import torch
        >>> plan = plan_model_files({"base": torch.zeros(4), "head": torch.ones(2)}, frozen={"base"})
        >>> sorted(plan.files), sorted(plan.frozen_files)
        (['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors'], ['model-00001-of-00002.safetensors'])
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    tensors, aliases = dedupe_tensors(state)
    frozen = set(frozen)
    groups = [{k: v for k, v in tensors.items() if k in frozen}, {k: v for k, v in tensors.items() if k not in frozen}]
    if not groups[0] or not groups[1]:
        groups = [tensors]
    splits = [split_torch_state_dict_into_shards(group, filename_pattern=prefix + "{suffix}.safetensors",
                                                 max_shard_size=max_shard_size) for group in groups]
    parts = [(i, names) for i, split in enumerate(splits) for names in split.filename_to_tensors.values()]
    if len(splits) == 1:
        names_of = list(splits[0].filename_to_tensors)
    else:
        names_of = [f"{prefix}-{k + 1:05d}-of-{len(parts):05d}.safetensors" for k in range(len(parts))]
    files = {filename: {name: tensors[name] for name in names} for filename, (_, names) in zip(names_of, parts,
                                                                                                strict=True)}
    frozen_files = frozenset(f for f, (i, _) in zip(names_of, parts, strict=True) if i == 0 and len(splits) > 1)
    index = None
    if len(files) > 1 or splits[0].is_sharded:
        weight_map = {name: filename for filename, names in files.items() for name in names}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total, ALIASES_KEY: aliases}, "weight_map": weight_map}
    return ModelPlan(files=files, aliases=aliases, index=index, frozen_files=frozen_files)


def frozen_names(module: Any, state: Mapping[str, torch.Tensor]) -> set[str]:
    """The names of ``state`` whose tensor is a parameter of ``module`` with ``requires_grad=False``.

    Matched by memory, not by name, so it works for state dicts whose names were changed
    (HF's ``save_pretrained`` renames, wrappers' prefixes).
    """
    params = getattr(module, "named_parameters", None)
    if params is None:
        return set()
    try:
        frozen = {(p.device, p.data_ptr()) for _, p in params(remove_duplicate=False)
                  if not p.requires_grad and p.numel()}
        if not frozen:
            return set()
        trained = {(p.device, p.data_ptr()) for _, p in params(remove_duplicate=False)
                   if p.requires_grad and p.numel()}
        return {k for k, v in state.items() if isinstance(v, torch.Tensor) and v.numel()
                and (v.device, v.data_ptr()) in frozen - trained}
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):
        return set()  # tensors without one plain memory (DTensor shards, meta, subclasses): nothing shared


def safetensors_size(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> int:
    """The size of the safetensors file `write_safetensors` makes of ``tensors``, without making it."""
    head, _ = _header(tensors, metadata)
    return len(head) + sum(t.numel() * t.element_size() for t in tensors.values())


def safetensors_sha256(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """The sha256 of that file: one hashing pass over the bytes, nothing written."""
    digest = hashlib.sha256()
    for chunk in safetensors_chunks(tensors, metadata):
        digest.update(chunk)
    return digest.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of ``t`` on CPU, without a copy when already contiguous."""
    flat = t.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous()
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data.cast("B")


def _header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[bytes, list[str]]:
    # Largest dtype first keeps every tensor aligned to its element size, as safetensors does.
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, order


def safetensors_chunks(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Iterator[memoryview | bytes]:
    """The bytes of a safetensors file, as a stream of chunks (header, then each tensor)."""
    for chunk, _ in safetensors_pieces(tensors, metadata):
        yield chunk


def safetensors_pieces(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Iterator[tuple[memoryview | bytes, int]]:
    """`safetensors_chunks` with each chunk's element width (1 for the header), for byte-grouped compression."""
    head, order = _header(tensors, metadata)
    yield head, 1
    for name in order:
        data = _tensor_bytes(tensors[name])
        width = tensors[name].element_size()
        for start in range(0, len(data), _CHUNK):
            yield data[start : start + _CHUNK], width


def write_safetensors(
    out: IO[bytes],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    hasher: Executor | None = None,
) -> tuple[int, str]:
    """Write ``tensors`` as safetensors to ``out`` in one pass; return (size, sha256)."""
    return write_chunks(out, safetensors_chunks(tensors, metadata), hasher=hasher)


def write_chunks(
    out: IO[bytes], chunks: Iterable[memoryview | bytes], *, hasher: Executor | None = None
) -> tuple[int, str]:
    """Write and hash ``chunks`` in one pass over the bytes; return (size, sha256).

    With a ``hasher`` (a one-thread executor) hashing runs beside the writes instead of
    between them; both release the GIL, so on two cores the hash costs almost nothing.
    """
    digest = ParallelDigest(hasher)
    size = 0
    for chunk in chunks:
        digest.update(chunk)
        view = memoryview(chunk)
        while view:
            written = out.write(view)
            written = len(view) if written is None else written
            view = view[written:]
        size += len(chunk)
    return size, digest.hexdigest()


class ParallelDigest:
    """sha256 whose updates may run, in order, on a one-thread ``executor`` (inline without one).

    Every update goes through the executor (a FIFO, so the order holds) and the caller only
    waits when more than `_HASH_LAG_BYTES` are queued: small tensors between big ones never
    force the I/O to wait for the hash. Callers must not change a buffer after passing it to
    `update` (tensor memory and bytes are fine).
    """

    def __init__(self, executor: Executor | None = None) -> None:
        self._digest = hashlib.sha256()
        self._executor = executor
        self._pending: deque[tuple[Future[None], int]] = deque()
        self._queued = 0

    def update(self, data: memoryview | bytes) -> None:
        if self._executor is None or (not self._pending and len(data) < _HASH_INLINE_BYTES):
            self._digest.update(data)  # small: a hand-off to the thread costs more than the hash
            return
        while self._pending and self._queued + len(data) > _HASH_LAG_BYTES:
            self._wait_oldest()
        try:
            future = self._executor.submit(self._digest.update, data)
        except RuntimeError:  # the executor is shut down (interpreter exit): hash here
            self._drain()
            self._digest.update(data)
            return
        self._pending.append((future, len(data)))
        self._queued += len(data)

    def _wait_oldest(self) -> None:
        future, size = self._pending.popleft()
        self._queued -= size
        future.result()

    def _drain(self) -> None:
        while self._pending:
            self._wait_oldest()

    def hexdigest(self) -> str:
        self._drain()
        return self._digest.hexdigest()


def _read_exact(src: Readable, n: int, where: str) -> bytes:
    data = src.read(n)
    if len(data) != n:
        raise CorruptCheckpointError(f"{where}: file is truncated (wanted {n} bytes, got {len(data)})")
    return data


class Readable(Protocol):
    """What `read_safetensors` needs of a stream.

    ``readinto`` is used when present, and ``readinto_kept`` before it: the same call, with the
    promise that the bytes read stay unchanged until the stream is done (they are the tensors
    being filled), so the stream may hash them on another thread while it reads the next ones.
    """

    def read(self, n: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class TensorSlot:
    """One tensor of a checked safetensors header: where its bytes are in the data section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def parse_header(
    raw: bytes, *, where: str = "safetensors file", data_size: int | None = None
) -> tuple[list[TensorSlot], dict[str, str]]:
    """Check a safetensors JSON header; return its tensors in file order and its ``__metadata__``.

    Every entry must have a known dtype code, a shape of non-negative integers and two offsets
    that tile the data section exactly (no gap, overlap or spill past ``data_size``, the bytes
    after the header when the file's size is known). Nothing is allocated here.

    Raises:
        CorruptCheckpointError: naming ``where`` and the tensor, for any malformed header.
    """
    header = loads_strict(raw, f"{where}: header")
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{where}: header is not a JSON object; the file is corrupt")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptCheckpointError(f"{where}: __metadata__ must map strings to strings; the file is corrupt")
    slots = [_slot(name, entry, where) for name, entry in header.items()]
    slots.sort(key=lambda slot: (slot.begin, slot.end))
    position = 0
    for slot in slots:
        if slot.begin != position:
            raise CorruptCheckpointError(
                f"{where}: tensor {slot.name!r} starts at byte {slot.begin} of the data, expected {position} "
                "(gap or overlap); the file is corrupt"
            )
        position = slot.end
    if data_size is not None and position != data_size:
        raise CorruptCheckpointError(
            f"{where}: the header describes {position} bytes of tensor data but the file holds {data_size}; "
            "the file is corrupt or truncated"
        )
    return slots, metadata


def _slot(name: str, entry: Any, where: str) -> TensorSlot:
    def bad(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{where}: tensor {name[:200]!r} {why}; the file is corrupt")

    if not isinstance(entry, dict):
        raise bad("has no {dtype, shape, data_offsets} entry")
    code = entry.get("dtype")
    dtype = _CODES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise bad(f"has dtype {_short(code)}, which is not a safetensors dtype this torch can hold")
    shape = entry.get("shape")
    if not isinstance(shape, list) or len(shape) > _MAX_DIMS or not all(_is_int(d) and 0 <= d < 2**63 for d in shape):
        raise bad(f"has shape {_short(shape)}, not a list of at most {_MAX_DIMS} non-negative integers")
    offsets = entry.get("data_offsets")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(x) and x >= 0 for x in offsets):
        raise bad(f"has data_offsets {_short(offsets)}, not two non-negative integers")
    begin, end = offsets
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise bad(f"claims {end - begin} bytes at {begin}..{end} but shape {shape} of {code} needs {nbytes}")
    return TensorSlot(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def read_safetensors(
    src: Readable,
    *,
    where: str = "safetensors file",
    into: Mapping[str, torch.Tensor] | None = None,
    size: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors stream into CPU tensors; return (tensors, metadata).

    Each tensor's bytes are read straight into its own memory, so peak memory is the
    state itself, not the state plus a copy of the file. A tensor of ``into`` with the same
    name, shape and dtype (contiguous, on the CPU) is filled in place instead of a new one,
    e.g. the parameters of the model being restored: no new memory at all.

    ``size`` is the file's real size (from the sidecar or the listing). Given it, the whole
    header is checked against it before any tensor is allocated, so a damaged or hostile
    header cannot make this allocate more than the file holds.

    Raises:
        CorruptCheckpointError: a malformed header or a truncated file, naming ``where``.
    """
    if size is not None and (not _is_int(size) or size < 8):
        raise CorruptCheckpointError(f"{where}: {size!r} bytes cannot be a safetensors file; the file is corrupt")
    (length,) = struct.unpack("<Q", _read_exact(src, 8, where))
    limit = MAX_HEADER_BYTES if size is None else min(MAX_HEADER_BYTES, size - 8)
    if length > limit:
        raise CorruptCheckpointError(f"{where}: header length {length} is not plausible; the file is corrupt")
    data_size = None if size is None else size - 8 - length
    slots, metadata = parse_header(_read_exact(src, length, where), where=where, data_size=data_size)
    tensors: dict[str, torch.Tensor] = {}
    for slot in slots:
        target = into.get(slot.name) if into is not None else None
        if (target is not None and target.device.type == "cpu" and target.dtype == slot.dtype
                and tuple(target.shape) == slot.shape and target.is_contiguous()):
            tensor = target.detach()
        else:
            tensor = _allocate(slot, where, bounded=size is not None)
        nbytes = slot.end - slot.begin
        if nbytes:
            view = tensor.view(-1).view(torch.uint8).numpy().data.cast("B")
            got = _readinto_all(src, view)
            if got != nbytes:
                raise CorruptCheckpointError(
                    f"{where}: file is truncated inside tensor {slot.name!r} ({got} of {nbytes} bytes)"
                )
        tensors[slot.name] = tensor
    return tensors, metadata


def _allocate(slot: TensorSlot, where: str, *, bounded: bool) -> torch.Tensor:
    if bounded:  # the claim is no larger than the file: a failure here is this machine's memory
        return torch.empty(slot.shape, dtype=slot.dtype)
    try:
        return torch.empty(slot.shape, dtype=slot.dtype)
    except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError) as exc:
        raise CorruptCheckpointError(
            f"{where}: cannot allocate {slot.end - slot.begin} bytes for tensor {slot.name!r} of shape "
            f"{list(slot.shape)}; the header is corrupt (or the tensor larger than this machine's memory)"
        ) from exc


def _readinto_all(src: Readable, view: memoryview) -> int:
    got = 0
    readinto = getattr(src, "readinto_kept", None) or getattr(src, "readinto", None)
    while got < len(view):
        if readinto is not None:
            n = readinto(view[got : got + _READ_CHUNK])
        else:
            data = src.read(min(_READ_CHUNK, len(view) - got))
            n = len(data)
            view[got : got + n] = data
        if not n:
            break
        got += n
    return got


def aliases_from_metadata(metadata: Any, *, where: str = "safetensors metadata") -> dict[str, str]:
    """The tied-tensor aliases (``{dropped_name: kept_name}``) recorded in a file's metadata.

    Raises:
        CorruptCheckpointError: the metadata or its aliases entry is malformed.
    """
    if not isinstance(metadata, Mapping):
        raise CorruptCheckpointError(f"{where}: metadata must be an object, got {type(metadata).__name__}")
    raw = metadata.get(ALIASES_KEY)
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        raw = loads_strict(raw, f"{where}: {ALIASES_KEY}")
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise CorruptCheckpointError(f"{where}: {ALIASES_KEY} must map tensor names to tensor names")
    return dict(raw)


def add_aliases(state: dict[str, torch.Tensor], aliases: Mapping[str, str], *, where: str) -> None:
    """Give every tied tensor its dropped names back: ``state[alias] = state[kept]``, in place.

    Raises:
        CorruptCheckpointError: an alias refers to a tensor that is not stored, or is stored itself.
    """
    stored = set(state)
    for alias, target in aliases.items():
        if target not in stored or alias in stored:
            raise CorruptCheckpointError(
                f"{where}: tied tensor {alias!r} refers to {target!r}, which is "
                f"{'stored under both names' if alias in stored else 'not stored'}; the checkpoint is corrupt"
            )
        state[alias] = state[target]


def parse_index(data: bytes, where: str) -> tuple[list[str], dict[str, str]]:
    """Check ``model.safetensors.index.json``; return (its shard files, sorted and unique; its aliases).

    Raises:
        CorruptCheckpointError: not a JSON object, a ``weight_map`` that is not a non-empty map of
            tensor names to relative paths inside the checkpoint, or malformed ``metadata``.
    """
    doc = loads_strict(data, where)
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(f"{where}: expected a JSON object; the index is corrupt")
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptCheckpointError(f"{where}: 'weight_map' must map tensor names to files; the index is corrupt")
    for tensor, filename in weight_map.items():
        check_relative_path(filename, f"{where}: weight_map[{tensor[:200]!r}]")
    metadata = doc.get("metadata")
    aliases = aliases_from_metadata({} if metadata is None else metadata, where=f"{where}: metadata")
    for alias, target in aliases.items():
        if target not in weight_map or alias in weight_map:
            raise CorruptCheckpointError(
                f"{where}: tied tensor {alias!r} refers to {target!r}, which the weight_map "
                f"{'also lists under both names' if alias in weight_map else 'does not list'}; the index is corrupt"
            )
    return sorted(set(weight_map.values())), aliases


# --- nested state (optimizer, scheduler, RNG) -> JSON skeleton + tensors ---------------------

_TENSOR, _NDARRAY, _TUPLE, _DICT, _FLOAT = "__tensor__", "__ndarray__", "__tuple__", "__dict__", "__float__"
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def flatten_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested structure into a strict-JSON skeleton and a flat ``{key: tensor}`` dict.

    Tensors (and numpy arrays) are replaced by ``{"__tensor__": key}``; tuples, dicts with
    non-string keys and non-finite floats (``{"__float__": "inf"}``, e.g. ReduceLROnPlateau's
    ``best``) are tagged so `unflatten_state` gives back exactly the same values and types.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach()
            return {_TENSOR: path}
        if type(value).__module__ == "numpy" and hasattr(value, "dtype") and hasattr(value, "shape"):
            if value.shape == ():  # numpy scalar
                return walk(value.item(), path)
            tensors[path] = torch.from_numpy(value.copy())
            return {_NDARRAY: path}
        if isinstance(value, float) and not math.isfinite(value):
            return {_FLOAT: "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
        if value is None or isinstance(value, bool | int | float | str):
            return value
        if isinstance(value, tuple | list) and all(type(v) is int for v in value):  # e.g. python's RNG state
            return {_TUPLE: list(value)} if isinstance(value, tuple) else list(value)
        if isinstance(value, tuple):
            return {_TUPLE: [walk(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            if all(isinstance(k, str) and not k.startswith("__") for k in value):
                return {k: walk(v, f"{path}.{k}" if path else k) for k, v in value.items()}
            pairs = enumerate(value.items())
            return {_DICT: [[walk(k, f"{path}.k{i}"), walk(v, f"{path}.{k}")] for i, (k, v) in pairs]}
        raise InvalidArgumentError(
            f"cannot store {type(value).__name__} at {path or 'the top level'} of the training state "
            "without pickle; use tensors, numbers, strings, lists and dicts"
        )

    return walk(obj, prefix), tensors


def tensor_keys(skeleton: Any) -> list[str]:
    """The keys of the tensors a `flatten_state` skeleton refers to, in order."""
    keys: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            if len(value) == 1 and next(iter(value)) in (_TENSOR, _NDARRAY):
                keys.append(next(iter(value.values())))
                return
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(skeleton)
    return keys


def unflatten_state(skeleton: Any, tensors: Mapping[str, torch.Tensor], *, where: str = "training state") -> Any:
    """Inverse of `flatten_state`.

    Raises:
        CorruptCheckpointError: the skeleton is not one `flatten_state` writes (an unknown or
            malformed tag, a tensor that is not stored, nesting too deep), naming ``where``.
    """

    def bad(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{where}: {why}; the checkpoint is corrupt")

    def walk(value: Any) -> Any:
        if isinstance(value, list):
            return [walk(v) for v in value]
        if value is None or isinstance(value, bool | int | float | str):
            return value
        if not isinstance(value, dict):
            raise bad(f"holds a {type(value).__name__}, which is not JSON")
        if not any(isinstance(k, str) and k.startswith("__") for k in value):
            return {k: walk(v) for k, v in value.items()}
        if len(value) != 1:
            raise bad(f"holds an object with tag keys and others ({_short(list(value))})")
        ((tag, inner),) = value.items()
        if tag in (_TENSOR, _NDARRAY):
            if not isinstance(inner, str) or inner not in tensors:
                raise bad(f"refers to tensor {_short(inner)}, which is not stored")
            if tag == _TENSOR:
                return tensors[inner]
            try:
                return tensors[inner].numpy()
            except (TypeError, RuntimeError) as exc:
                raise bad(f"tensor {inner!r} cannot be a numpy array ({exc})") from exc
        if tag == _TUPLE and isinstance(inner, list):
            return tuple(walk(v) for v in inner)
        if tag == _DICT and isinstance(inner, list) and all(isinstance(p, list) and len(p) == 2 for p in inner):
            out = {}
            for k, v in inner:
                key = walk(k)
                try:
                    hash(key)
                except TypeError as exc:
                    raise bad(f"holds a dict key {_short(k)} that cannot be a key") from exc
                out[key] = walk(v)
            return out
        if tag == _FLOAT and isinstance(inner, str) and inner in _NON_FINITE:
            return _NON_FINITE[inner]
        raise bad(f"holds an unknown or malformed tag {_short(tag)}: {_short(inner)}")

    try:
        return walk(skeleton)
    except RecursionError as exc:
        raise bad("is nested too deeply") from exc


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any) -> str:
    """``repr(value)`` cut to a readable length (a hostile file may hold megabytes)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."
