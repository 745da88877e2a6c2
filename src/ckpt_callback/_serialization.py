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
import struct
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

import torch

from ._errors import CorruptCheckpointError, InvalidArgumentError

__all__ = [
    "MODEL_INDEX",
    "ModelPlan",
    "ParallelDigest",
    "flatten_state",
    "plan_model_files",
    "read_safetensors",
    "unflatten_state",
    "write_safetensors",
]

MODEL_INDEX = "model.safetensors.index.json"
ALIASES_KEY = "ckpt_callback.aliases"
_CHUNK = 16 << 20
_HASH_LAG_BYTES = 64 << 20  # how far hashing may fall behind the I/O (bounds memory kept alive)

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


def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.device, t.untyped_storage().data_ptr())


def _view_key(t: torch.Tensor) -> tuple[Any, ...]:
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
        view = _view_key(tensor)
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
    state: Mapping[str, torch.Tensor], *, max_shard_size: int | str = "5GB", prefix: str = "model"
) -> ModelPlan:
    """Decide the files of a model state dict, in HuggingFace's layout.

    One ``model.safetensors`` when it fits in ``max_shard_size``, else
    ``model-00001-of-0000N.safetensors`` files plus ``model.safetensors.index.json``.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    tensors, aliases = dedupe_tensors(state)
    split = split_torch_state_dict_into_shards(
        tensors, filename_pattern=prefix + "{suffix}.safetensors", max_shard_size=max_shard_size
    )
    files = {
        filename: {name: tensors[name] for name in names}
        for filename, names in split.filename_to_tensors.items()
    }
    index = None
    if split.is_sharded:
        weight_map = dict(split.tensor_to_filename)
        index = {"metadata": {**split.metadata, ALIASES_KEY: aliases}, "weight_map": weight_map}
    return ModelPlan(files=files, aliases=aliases, index=index)


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
    head, order = _header(tensors, metadata)
    yield head
    for name in order:
        data = _tensor_bytes(tensors[name])
        for start in range(0, len(data), _CHUNK):
            yield data[start : start + _CHUNK]


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
        if self._executor is None:
            self._digest.update(data)
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
    """What `read_safetensors` needs of a stream (``readinto`` is used when present)."""

    def read(self, n: int = -1, /) -> bytes: ...


def read_safetensors(
    src: Readable, *, where: str = "safetensors file", into: Mapping[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors stream into CPU tensors; return (tensors, metadata).

    Each tensor's bytes are read straight into its own memory, so peak memory is the
    state itself, not the state plus a copy of the file. A tensor of ``into`` with the same
    name, shape and dtype (contiguous, on the CPU) is filled in place instead of a new one,
    e.g. the parameters of the model being restored: no new memory at all.
    """
    (length,) = struct.unpack("<Q", _read_exact(src, 8, where))
    if length > 100 << 20:
        raise CorruptCheckpointError(f"{where}: header length {length} is not plausible; the file is corrupt")
    try:
        header = json.loads(_read_exact(src, length, where))
    except ValueError as exc:
        raise CorruptCheckpointError(f"{where}: header is not valid JSON; the file is corrupt") from exc
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{where}: header is not a JSON object; the file is corrupt")
    metadata = header.pop("__metadata__", None) or {}
    try:
        entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    except (TypeError, KeyError, IndexError) as exc:
        raise CorruptCheckpointError(f"{where}: malformed header; the file is corrupt") from exc
    tensors: dict[str, torch.Tensor] = {}
    position = 0
    for name, entry in entries:
        try:
            dtype = _CODES[entry["dtype"]]
            shape = [int(d) for d in entry["shape"]]
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(f"{where}: bad header entry for {name!r}") from exc
        target = into.get(name) if into is not None else None
        if (target is not None and target.device.type == "cpu" and target.dtype == dtype
                and list(target.shape) == shape and target.is_contiguous()):
            tensor = target.detach()
        else:
            tensor = torch.empty(shape, dtype=dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if begin != position or end - begin != nbytes:
            raise CorruptCheckpointError(f"{where}: offsets of {name!r} do not match its shape; the file is corrupt")
        if nbytes:
            view = tensor.view(-1).view(torch.uint8).numpy().data.cast("B")
            got = _readinto_all(src, view)
            if got != nbytes:
                raise CorruptCheckpointError(
                    f"{where}: file is truncated inside tensor {name!r} ({got} of {nbytes} bytes)"
                )
        position = end
        tensors[name] = tensor
    return tensors, metadata


def _readinto_all(src: Readable, view: memoryview) -> int:
    got = 0
    readinto = getattr(src, "readinto", None)
    while got < len(view):
        if readinto is not None:
            n = readinto(view[got : got + _CHUNK])
        else:
            data = src.read(min(_CHUNK, len(view) - got))
            n = len(data)
            view[got : got + n] = data
        if not n:
            break
        got += n
    return got


def aliases_from_metadata(metadata: Mapping[str, Any]) -> dict[str, str]:
    raw = metadata.get(ALIASES_KEY)
    if not raw:
        return {}
    return dict(json.loads(raw) if isinstance(raw, str) else raw)


# --- nested state (optimizer, scheduler, RNG) -> JSON skeleton + tensors ---------------------

_TENSOR, _NDARRAY, _TUPLE, _DICT = "__tensor__", "__ndarray__", "__tuple__", "__dict__"


def flatten_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested structure into a JSON-able skeleton and a flat ``{key: tensor}`` dict.

    Tensors (and numpy arrays) are replaced by ``{"__tensor__": key}``; tuples and dicts with
    non-string keys are tagged so `unflatten_state` gives back exactly the same types.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach()
            return {_TENSOR: path}
        if type(value).__module__ == "numpy" and hasattr(value, "dtype") and hasattr(value, "shape"):
            if value.shape == ():  # numpy scalar
                return value.item()
            tensors[path] = torch.from_numpy(value.copy())
            return {_NDARRAY: path}
        if value is None or isinstance(value, bool | int | float | str):
            return value
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


def unflatten_state(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of `flatten_state`."""

    def walk(value: Any) -> Any:
        if isinstance(value, list):
            return [walk(v) for v in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            (key, inner), = value.items()
            if key == _TENSOR:
                return tensors[inner]
            if key == _NDARRAY:
                return tensors[inner].numpy()
            if key == _TUPLE:
                return tuple(walk(v) for v in inner)
            if key == _DICT:
                return {walk(k): walk(v) for k, v in inner}
        return {k: walk(v) for k, v in value.items()}

    try:
        return walk(skeleton)
    except KeyError as exc:
        raise CorruptCheckpointError(f"training state refers to tensor {exc} that is not stored") from exc
