"""The sidecar ``checkpoint.json``: a typed record with a schema version.

The sidecar is written last; its presence is what makes a checkpoint complete.
Keys on storage are camelCase (as the hosted checkpoint APIs spell them);
attributes in Python are snake_case, and the camelCase names work as aliases.

This module is also the parsing boundary for everything JSON the library reads back:
`CheckpointInfo.loads` turns *any* bytes into a checked record or a `SidecarError`
(never a TypeError, RecursionError or a path that leaves the checkpoint), `loads_strict`
does the same for other JSON files, and `dumps_strict` writes JSON that has no
``NaN``/``Infinity`` in it.
"""

from __future__ import annotations

import getpass
import json
import math
import re
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, TypeGuard

from ._errors import CheckpointError, CorruptCheckpointError, InvalidArgumentError, InvalidNameError, SidecarError

__all__ = [
    "CHECKPOINT_TYPES",
    "Adapter",
    "MAX_PATH_LENGTH",
    "MAX_SIDECAR_BYTES",
    "MONITOR_MODES",
    "RESERVED_NAMES",
    "SCHEMA_VERSION",
    "SIDECAR_NAME",
    "CODECS",
    "CODEC_SUFFIX",
    "CheckpointInfo",
    "FileEntry",
    "Monitor",
    "Sharding",
    "Source",
    "check_relative_path",
    "clean_metrics",
    "clean_number",
    "dumps_strict",
    "loads_strict",
    "now_iso",
    "validate_name",
]

SCHEMA_VERSION = 1
SIDECAR_NAME = "checkpoint.json"
BLOBS_DIR = ".ckpt-blobs"  # object stores: frozen files stored once, by sha256 (see _blobs.py)
CHECKPOINT_TYPES = ("automatic", "best", "manual", "final")
MONITOR_MODES = ("min", "max")
RESERVED_NAMES = frozenset({"latest", "best", "final"})
MAX_SIDECAR_BYTES = 16 << 20  # far above any real sidecar (1,000 files is ~150 KB); read at most this much
MAX_PATH_LENGTH = 1024
_MAX_NAME_LENGTH = 200
_MAX_RANKS = 1 << 20
_MAX_INT = 2**63 - 1  # steps and sizes fit an int64 everywhere they go (torch, numpy, other languages)
_MAX_FILE_SIZE = 2**53  # JSON readers that hold numbers as doubles still see exact sizes
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=@-]*")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_DRIVE_RE = re.compile(r"[A-Za-z]:")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def now_iso() -> str:
    """The current time as ISO 8601 UTC with microseconds and a ``Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def validate_name(name: object) -> str:
    """Return ``name`` if it can be a checkpoint folder name, else raise `InvalidNameError`.

    The whole string must match: letters, digits and ``. _ - + = @``, not starting with
    ``.`` or ``-``, no ``..``, at most 200 characters, and not ``latest``, ``best`` or ``final``.

    Example:
        >>> validate_name("checkpoint-500")
        'checkpoint-500'
    """
    if not isinstance(name, str) or not name.strip():
        raise InvalidNameError(f"checkpoint name must be a non-empty string, got {name!r}")
    if "/" in name or "\\" in name:
        raise InvalidNameError(f"checkpoint name {name!r} contains a path separator; use a plain folder name")
    if name.startswith(".") or ".." in name:
        raise InvalidNameError(
            f"checkpoint name {name!r} starts with '.' or contains '..'; use a plain folder name"
        )
    if name in RESERVED_NAMES:
        raise InvalidNameError(
            f"checkpoint name {name!r} is reserved: 'latest', 'best' and 'final' always refer to "
            "those checkpoints; choose another name"
        )
    if len(name) > _MAX_NAME_LENGTH or not _NAME_RE.fullmatch(name):
        raise InvalidNameError(
            f"checkpoint name {name!r} is not allowed: use letters, digits and . _ - + = @ "
            f"(not starting with '.' or '-'), at most {_MAX_NAME_LENGTH} characters"
        )
    return name


def check_relative_path(
    path: object, where: str, *, error: type[CheckpointError] = CorruptCheckpointError
) -> str:
    """Return ``path`` if it names a file inside a checkpoint folder, else raise ``error``.

    Every path read from a sidecar, an index or a header goes through here before it is joined
    to anything: a non-empty ``/``-separated relative path, no empty, ``.`` or ``..`` component,
    no backslash, colon (drive letters, URL schemes) or control character, not the sidecar itself,
    at most `MAX_PATH_LENGTH` characters. ``error`` is `CorruptCheckpointError` for what storage
    holds; pass `InvalidArgumentError` for a path a caller gave.

    Example:
        >>> check_relative_path("tokenizer/vocab.json", "checkpoint.json")
        'tokenizer/vocab.json'
    """
    def bad(why: str) -> CheckpointError:
        return error(f"{where}: file path {path!r} {why}; the checkpoint is corrupt or was tampered with")

    if not isinstance(path, str) or not path:
        raise bad("is not a non-empty string")
    if len(path) > MAX_PATH_LENGTH:
        raise bad(f"is longer than {MAX_PATH_LENGTH} characters")
    if not _is_text(path) or _CONTROL_RE.search(path):
        raise bad("holds control characters or invalid Unicode")
    if path.startswith("/") or "\\" in path or _DRIVE_RE.match(path):
        raise bad("is not a relative '/'-separated path")
    if ":" in path:
        raise bad("holds a ':' (a drive letter or URL scheme)")
    for part in path.split("/"):
        if not part or part.strip(".") == "":
            raise bad("has an empty, '.' or '..' component")
        if part != part.rstrip(". "):  # Windows drops trailing dots and spaces: "x." would be "x"
            raise bad("has a component ending in '.' or ' '")
    if path == SIDECAR_NAME:
        raise bad("is the sidecar itself")
    return path


CODECS = ("zstd-bytegroup",)
CODEC_SUFFIX = ".ckptz"  # a compressed file's stored name: its logical path plus this


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint: its path relative to the checkpoint folder, size and sha256.

    ``path``, ``size`` and ``sha256`` describe the bytes as stored. A compressed file
    (``codec`` set) is stored as ``<logical path>.ckptz`` and decodes to ``raw_size`` bytes;
    ``shared``: the stored file is the same data as a file of another checkpoint (a hard link),
    stored once.
    """

    path: str
    size: int
    sha256: str
    codec: str | None = None
    raw_size: int | None = None
    shared: bool = False
    raw_sha256: str | None = None  # of the decoded bytes, for compressed files that may be stored once
    blob: str | None = None  # object stores: the bytes live at ``ROOT/.ckpt-blobs/<blob>`` (equal to ``sha256``)

    def location(self, name: str) -> str:
        """Where the stored bytes are, relative to the root: ``NAME/<path>``, or the blob area for a blob entry."""
        return f"{BLOBS_DIR}/{self.blob}" if self.blob is not None else f"{name}/{self.path}"

    @property
    def logical_path(self) -> str:
        """The file's name once decoded (what ``from_pretrained`` and our reader look for)."""
        return self.path[: -len(CODEC_SUFFIX)] if self.codec is not None else self.path

    @property
    def logical_size(self) -> int:
        return self.raw_size if self.raw_size is not None else self.size

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "size": self.size, "sha256": self.sha256}
        if self.codec is not None:
            out.update(codec=self.codec, rawSize=self.raw_size)
            if self.raw_sha256 is not None:
                out["rawSha256"] = self.raw_sha256
        if self.shared:
            out["shared"] = True
        if self.blob is not None:
            out["blob"] = self.blob
        return out


@dataclass(frozen=True)
class Monitor:
    """What tagged ``best`` in the run: a metric name and whether lower (``min``) or higher (``max``) is better."""

    name: str
    mode: str = "min"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "mode": self.mode}


@dataclass(frozen=True)
class Sharding:
    """How a sharded checkpoint was split: by torch.distributed.checkpoint over ``world_size`` ranks.

    ``meshes`` are the shapes of the device meshes the tensors lived on, ``placements`` the
    distinct DTensor placements (``Shard(dim=0)``, ``Replicate()``), ``consolidated`` whether
    the model weights were also merged into the HF layout (then they load as they are).
    """

    world_size: int
    engine: str = "torch.distributed.checkpoint"
    format: str = "hf-safetensors"
    meshes: tuple[tuple[int, ...], ...] = ()
    placements: tuple[str, ...] = ()
    consolidated: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"worldSize": self.world_size, "engine": self.engine, "format": self.format,
                "meshes": [list(m) for m in self.meshes], "placements": list(self.placements),
                "consolidated": self.consolidated}


@dataclass(frozen=True)
class Source:
    """Where an imported checkpoint came from (FlexAI's ``spec``): its provenance, recorded once.

    ``from_local_files``: the local files it was made from (absolute paths); ``storage_provider``:
    the fsspec protocol of a remote source (``s3``, ``gs``, ...), else ""; ``source_path``: the
    remote source URL, else "".
    """

    from_local_files: tuple[str, ...] = ()
    storage_provider: str = ""
    source_path: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"fromLocalFiles": list(self.from_local_files), "storageProvider": self.storage_provider,
                "sourcePath": self.source_path}


@dataclass(frozen=True)
class Adapter:
    """A peft adapter checkpoint (the sidecar's ``adapter``): the folder holds the adapter, not the base.

    ``type`` is peft's adapter type (``LORA``, ``IA3``, ...), ``base_model`` the config's
    ``base_model_name_or_path`` (what ``AutoPeftModel*.from_pretrained`` loads the base from),
    ``merged`` the folder holding the merged full model, or None.
    """

    type: str
    base_model: str | None = None
    merged: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "baseModel": self.base_model, "merged": self.merged}


def _user() -> str | None:
    """The writing process's user name, if the system knows one."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers) and no USER/LOGNAME
        return None


# snake_case attribute -> camelCase key on storage, in the documented order
_KEYS = {
    "schema_version": "schemaVersion",
    "id": "id",
    "name": "name",
    "type": "type",
    "description": "description",
    "step": "step",
    "epoch": "epoch",
    "train_loss": "trainLoss",
    "eval_loss": "evalLoss",
    "metrics": "metrics",
    "model": "model",
    "version": "version",
    "inference_ready": "inferenceReady",
    "node": "node",
    "created_at": "createdAt",
    "updated_at": "updatedAt",
    "files": "files",
    "size": "size",
    "monitor": "monitor",
    "run_id": "runId",
    "sharding": "sharding",
    "created_by": "createdBy",
    "source": "source",
    "adapter": "adapter",
}
_ATTRS = {camel: snake for snake, camel in _KEYS.items()}
_REQUIRED = ("id", "name", "type", "step", "createdAt")


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint's sidecar, as a typed object.

    Attributes are snake_case; the sidecar's camelCase keys work too
    (``info.evalLoss is info.eval_loss``), and so does ``info["evalLoss"]``.

    Example:
        >>> info = CheckpointInfo(name="checkpoint-10", step=10, train_loss=0.5)
        >>> info.to_json()["trainLoss"]
        0.5
        >>> CheckpointInfo.from_json(info.to_json()) == info
        True
    """

    name: str
    step: int
    type: str = "automatic"
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    description: str | None = None
    epoch: float | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    model: str | None = None
    version: str | None = None
    inference_ready: bool = False
    node: str = field(default_factory=socket.gethostname)
    created_at: str = field(default_factory=now_iso)
    updated_at: str = field(default_factory=now_iso)
    files: tuple[FileEntry, ...] = ()
    size: int = 0
    monitor: Monitor | None = None
    run_id: str | None = None
    sharding: Sharding | None = None
    created_by: str | None = field(default_factory=_user)
    source: Source | None = None
    adapter: Adapter | None = None
    schema_version: int = SCHEMA_VERSION

    def __getattr__(self, key: str) -> Any:
        # Only called for attributes not found normally: map camelCase aliases.
        snake = _ATTRS.get(key)
        if snake is None or snake == key:
            raise AttributeError(f"{type(self).__name__!s} has no attribute {key!r}")
        return getattr(self, snake)

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    @property
    def logical_size(self) -> int:
        """Bytes of its files once decoded (``size`` is the bytes as stored)."""
        return sum(f.logical_size for f in self.files)

    @property
    def shared_size(self) -> int:
        """Bytes of its stored files that are the same data as another checkpoint's, stored once."""
        return sum(f.size for f in self.files if f.shared)

    @property
    def compressed(self) -> bool:
        return any(f.codec is not None for f in self.files)

    def metric(self, key: str) -> float | None:
        """The value of a monitored quantity: ``evalLoss``, ``trainLoss``, ``epoch`` or a metric name."""
        aliases = {"evalLoss": "eval_loss", "eval_loss": "eval_loss", "trainLoss": "train_loss",
                   "train_loss": "train_loss", "loss": "train_loss", "epoch": "epoch", "step": "step"}
        if key in aliases:
            value = getattr(self, aliases[key])
            if value is None and key in ("evalLoss", "eval_loss"):
                value = self.metrics.get("eval_loss")
            return None if value is None else float(value)
        for candidate in (key, f"eval_{key}"):
            if candidate in self.metrics:
                return float(self.metrics[candidate])
        return None

    def replace(self, **changes: Any) -> CheckpointInfo:
        """A copy with ``changes`` applied and ``updated_at`` moved to now."""
        changes.setdefault("updated_at", now_iso())
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The sidecar as a JSON-ready dict with camelCase keys, in the documented order.

        Non-finite numbers become null (and leave ``metrics``), so what is written always reads back.
        """
        out: dict[str, Any] = {}
        for attr, key in _KEYS.items():
            value = getattr(self, attr)
            if attr == "files":
                value = [entry.to_json() for entry in value]
            elif attr == "metrics":
                value = {k: v for k, v in value.items() if _finite(v) is not None}
            elif attr in ("epoch", "train_loss", "eval_loss"):
                value = None if _finite(value) is None else value
            elif attr in ("monitor", "source"):
                value = None if value is None else value.to_json()
            elif attr in ("sharding", "adapter"):  # only sharded / adapter checkpoints have the key
                if value is None:
                    continue
                value = value.to_json()
            out[key] = value
            if attr == "size":
                out["logicalSize"] = self.logical_size
                out["sharedSize"] = self.shared_size
        return out

    def dumps(self) -> str:
        """The sidecar as JSON text."""
        return dumps_strict(self.to_json(), indent=2) + "\n"

    @classmethod
    def from_json(cls, data: Any, *, where: str = SIDECAR_NAME) -> CheckpointInfo:
        """Build from a parsed sidecar, raising `SidecarError` naming ``where`` on malformed input.

        Every value is checked against the documented type before anything uses it; unknown keys
        are ignored. Nothing but `SidecarError` leaves this method, whatever ``data`` is.
        """
        try:
            return cls._from_json(data, where)
        except SidecarError:
            raise
        except (CorruptCheckpointError, InvalidNameError) as exc:
            raise SidecarError(str(exc)) from exc
        except RecursionError as exc:
            raise SidecarError(f"{where}: nested too deeply; the sidecar is corrupt") from exc
        except Exception as exc:  # a check this module missed: still the sidecar's fault
            raise SidecarError(f"{where}: malformed sidecar ({type(exc).__name__}: {exc})") from exc

    @classmethod
    def _from_json(cls, data: Any, where: str) -> CheckpointInfo:
        if not isinstance(data, dict):
            raise SidecarError(f"{where}: expected a JSON object, got {type(data).__name__}")
        version = data.get("schemaVersion")
        if version != SCHEMA_VERSION or isinstance(version, bool):
            raise SidecarError(
                f"{where}: unknown schemaVersion {_short(version)} (this version of ckpt-callback reads "
                f"{SCHEMA_VERSION}); upgrade ckpt-callback or remove the folder"
            )
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise SidecarError(f"{where}: missing keys {', '.join(missing)}")
        check = _Checker(data, where)
        files = check.files()
        created_at = check.text("createdAt")
        return cls(
            name=check.name(),
            step=check.integer("step", maximum=_MAX_INT),
            type=check.choice("type", CHECKPOINT_TYPES),
            id=check.text("id"),
            description=check.text("description", nullable=True),
            epoch=check.number("epoch"),
            train_loss=check.number("trainLoss"),
            eval_loss=check.number("evalLoss"),
            metrics=check.metrics(),
            model=check.text("model", nullable=True),
            version=check.text("version", nullable=True),
            inference_ready=check.boolean("inferenceReady", default=False),
            node=check.text("node", default=""),
            created_at=created_at,
            updated_at=check.text("updatedAt", default=created_at),
            files=files,
            size=check.total_size(files),
            **check.derived_sizes(files),
            monitor=check.monitor(),
            run_id=check.text("runId", nullable=True),
            sharding=check.sharding(),
            created_by=check.text("createdBy", nullable=True),
            source=check.source(),
            adapter=check.adapter(),
        )

    @classmethod
    def loads(cls, text: str | bytes | bytearray | memoryview, *, where: str = SIDECAR_NAME) -> CheckpointInfo:
        """Parse sidecar JSON text (UTF-8); see `from_json`. Raises only `SidecarError`."""
        return cls.from_json(loads_strict(text, where, error=SidecarError, limit=MAX_SIDECAR_BYTES), where=where)


class _Checker:
    """Typed reads of one parsed sidecar; each raises `SidecarError` naming the key."""

    def __init__(self, data: dict[str, Any], where: str) -> None:
        self.data = data
        self.where = where

    def bad(self, key: str, expected: str) -> SidecarError:
        return SidecarError(f"{self.where}: {key!r} must be {expected}, got {_short(self.data.get(key))}")

    def text(self, key: str, *, nullable: bool = False, default: str | None = None) -> Any:
        if key not in self.data:
            return None if nullable else default
        value = self.data[key]
        if value is None and nullable:
            return None
        if not isinstance(value, str) or not _is_text(value):
            raise self.bad(key, "a string or null" if nullable else "a string")
        return value

    def name(self) -> str:
        value = self.data["name"]
        try:
            return validate_name(value)
        except InvalidNameError as exc:
            raise SidecarError(f"{self.where}: 'name' is not a valid checkpoint name ({exc})") from exc

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        value = self.data[key]
        if not isinstance(value, str) or value not in choices:
            raise self.bad(key, f"one of {', '.join(choices)}")
        return value

    def integer(self, key: str, *, maximum: int, default: int | None = None) -> int:
        value = self.data.get(key, default)
        if not _is_int(value) or not 0 <= value <= maximum:
            raise self.bad(key, "a non-negative integer")
        return int(value)

    def number(self, key: str) -> float | None:
        value = self.data.get(key)
        if value is None:
            return None
        if _finite(value) is None:
            raise self.bad(key, "a finite number or null")
        return float(value) if isinstance(value, float) else value

    def boolean(self, key: str, *, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self.bad(key, "true or false")
        return value

    def metrics(self) -> dict[str, float]:
        value = self.data.get("metrics", {})
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and _is_text(k) and _finite(v) is not None for k, v in value.items()
        ):
            raise self.bad("metrics", "an object of finite numbers")
        return dict(value)

    def monitor(self) -> Monitor | None:
        value = self.data.get("monitor")
        if value is None:
            return None
        if (
            not isinstance(value, dict)
            or not isinstance(value.get("name"), str)
            or not value["name"]
            or not _is_text(value["name"])
            or value.get("mode") not in MONITOR_MODES
        ):
            raise self.bad("monitor", 'null or {"name": "<metric>", "mode": "min" or "max"}')
        return Monitor(name=value["name"], mode=value["mode"])

    def sharding(self) -> Sharding | None:
        value = self.data.get("sharding")
        if value is None:
            return None
        expected = ('null or {"worldSize": int, "engine": str, "format": str, "meshes": [[int]], '
                    '"placements": [str], "consolidated": bool}')
        if not isinstance(value, dict):
            raise self.bad("sharding", expected)
        world, meshes, placements = value.get("worldSize"), value.get("meshes", []), value.get("placements", [])
        texts = [value.get("engine", ""), value.get("format", "")]
        texts += placements if isinstance(placements, list) else []
        if (
            not _is_int(world) or not 1 <= world <= _MAX_RANKS
            or not all(isinstance(t, str) and _is_text(t) and len(t) <= 200 for t in texts)
            or not isinstance(placements, list) or len(placements) > 64
            or not isinstance(meshes, list) or len(meshes) > 64
            or not all(isinstance(m, list) and len(m) <= 8 and all(_is_int(d) and 1 <= d <= _MAX_RANKS for d in m)
                       for m in meshes)
            or not isinstance(value.get("consolidated", False), bool)
        ):
            raise self.bad("sharding", expected)
        return Sharding(world_size=int(world), engine=value.get("engine", ""), format=value.get("format", ""),
                        meshes=tuple(tuple(int(d) for d in m) for m in meshes), placements=tuple(placements),
                        consolidated=value.get("consolidated", False))

    def adapter(self) -> Adapter | None:
        value = self.data.get("adapter")
        if value is None:
            return None
        expected = 'null or {"type": "LORA", "baseModel": string or null, "merged": string or null}'
        if not isinstance(value, dict):
            raise self.bad("adapter", expected)
        kind, base, merged = value.get("type"), value.get("baseModel"), value.get("merged")
        if (not isinstance(kind, str) or not _is_text(kind) or len(kind) > 200
                or not all(v is None or (isinstance(v, str) and _is_text(v) and len(v) <= MAX_PATH_LENGTH)
                           for v in (base, merged))):
            raise self.bad("adapter", expected)
        if merged is not None:
            check_relative_path(merged, f"{self.where}: adapter.merged", error=SidecarError)
        return Adapter(type=kind, base_model=base, merged=merged)

    def source(self) -> Source | None:
        value = self.data.get("source")
        if value is None:
            return None
        expected = 'null or {"fromLocalFiles": [paths], "storageProvider": "...", "sourcePath": "..."}'
        if not isinstance(value, dict):
            raise self.bad("source", expected)
        local = value.get("fromLocalFiles", [])
        provider, path = value.get("storageProvider", ""), value.get("sourcePath", "")
        if (not isinstance(local, list) or not all(isinstance(p, str) and _is_text(p) for p in local)
                or not all(isinstance(v, str) and _is_text(v) for v in (provider, path))):
            raise self.bad("source", expected)
        return Source(from_local_files=tuple(local), storage_provider=provider, source_path=path)

    def files(self) -> tuple[FileEntry, ...]:
        value = self.data.get("files", [])
        if not isinstance(value, list):
            raise self.bad("files", "a list of {path, size, sha256} objects")
        entries: list[FileEntry] = []
        seen: set[str] = set()
        for k, item in enumerate(value):
            at = f"{self.where}: files[{k}]"
            if not isinstance(item, dict):
                raise SidecarError(f"{at} must be an object with path, size and sha256, got {_short(item)}")
            missing = [key for key in ("path", "size", "sha256") if key not in item]
            if missing:
                raise SidecarError(f"{at} is missing {', '.join(missing)}")
            path = check_relative_path(item["path"], at, error=SidecarError)
            size = item["size"]
            if not _is_int(size) or not 0 <= size < _MAX_FILE_SIZE:
                raise SidecarError(f"{at}: 'size' must be an integer from 0 to 2**53, got {_short(size)}")
            sha = item["sha256"]
            if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha):
                raise SidecarError(f"{at}: 'sha256' must be 64 lowercase hex digits, got {_short(sha)}")
            codec, raw_size, shared = item.get("codec"), item.get("rawSize"), item.get("shared", False)
            if codec is not None:
                if codec not in CODECS:
                    raise SidecarError(f"{at}: 'codec' {_short(codec)} is not one this version of ckpt-callback "
                                       f"decodes ({', '.join(CODECS)}); upgrade ckpt-callback")
                if not _is_int(raw_size) or not 0 <= raw_size < _MAX_FILE_SIZE:
                    raise SidecarError(f"{at}: 'rawSize' must be an integer from 0 to 2**53 for a compressed "
                                       f"file, got {_short(raw_size)}")
                if not path.endswith(CODEC_SUFFIX) or path == CODEC_SUFFIX or path.endswith("/" + CODEC_SUFFIX):
                    raise SidecarError(f"{at}: a compressed file's path must end in {CODEC_SUFFIX!r}, "
                                       f"got {_short(path)}")
                check_relative_path(path[: -len(CODEC_SUFFIX)], at, error=SidecarError)
            elif raw_size is not None or "rawSha256" in item:
                raise SidecarError(f"{at}: 'rawSize' or 'rawSha256' is given for a file without a 'codec'")
            raw_sha = item.get("rawSha256")
            if raw_sha is not None and (not isinstance(raw_sha, str) or not _SHA256_RE.fullmatch(raw_sha)):
                raise SidecarError(f"{at}: 'rawSha256' must be 64 lowercase hex digits, got {_short(raw_sha)}")
            if not isinstance(shared, bool):
                raise SidecarError(f"{at}: 'shared' must be true or false, got {_short(shared)}")
            blob = item.get("blob")
            if "blob" in item and blob != sha:
                raise SidecarError(f"{at}: 'blob' must equal the file's sha256 (64 lowercase hex digits), "
                                   f"got {_short(blob)}")
            logical = path[: -len(CODEC_SUFFIX)] if codec is not None else path
            for key in {path, logical}:
                if key in seen:
                    raise SidecarError(f"{at}: {key!r} is listed twice")
                seen.add(key)
            entries.append(FileEntry(path=path, size=int(size), sha256=sha, codec=codec,
                                     raw_size=None if codec is None or raw_size is None else int(raw_size),
                                     shared=shared, raw_sha256=raw_sha, blob=blob))
        for path in seen:  # "a" and "a/b" cannot both be files
            parent = path.rpartition("/")[0]
            while parent:
                if parent in seen:
                    raise SidecarError(f"{self.where}: {parent!r} is listed as a file and as a folder of {path!r}")
                parent = parent.rpartition("/")[0]
        return tuple(entries)

    def derived_sizes(self, files: tuple[FileEntry, ...]) -> dict[str, Any]:
        """``logicalSize`` and ``sharedSize`` must be non-negative integers; their values are always
        recomputed from the files (tools that edit ``files`` and ``size`` need not know them)."""
        for key in ("logicalSize", "sharedSize"):
            if key in self.data:
                self.integer(key, maximum=_MAX_INT)
        return {}

    def total_size(self, files: tuple[FileEntry, ...]) -> int:
        total = sum(entry.size for entry in files)
        size = self.integer("size", maximum=_MAX_INT, default=total)
        if size != total:
            raise SidecarError(f"{self.where}: 'size' is {size} but its files add up to {total} bytes")
        return size


def loads_strict(
    data: str | bytes | bytearray | memoryview,
    where: str,
    *,
    error: type[CorruptCheckpointError] = CorruptCheckpointError,
    limit: int | None = None,
) -> Any:
    """Parse JSON the library wrote, raising only ``error`` (naming ``where``) on anything else.

    Strict where Python's `json` is lenient: UTF-8 only, no ``NaN``/``Infinity`` (nor numbers
    that overflow to them), no duplicate keys, bounded nesting and (with ``limit``) size.
    """
    if isinstance(data, bytearray | memoryview):
        data = bytes(data)
    if isinstance(data, bytes):
        if limit is not None and len(data) > limit:
            raise error(f"{where}: {len(data)} bytes is larger than the {limit} a valid file can be; it is corrupt")
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{where}: not UTF-8 text ({exc}); the file is corrupt") from exc
    elif not isinstance(data, str):
        raise error(f"{where}: expected JSON text, got {type(data).__name__}")
    elif limit is not None and len(data) > limit // 4 and len(data.encode("utf-8", "surrogatepass")) > limit:
        raise error(f"{where}: larger than the {limit} bytes a valid file can be; it is corrupt")
    try:
        return json.loads(data, parse_constant=_refuse_constant, parse_float=_finite_float,
                          object_pairs_hook=_unique_keys)
    except _NotStrictJSON as exc:
        raise error(f"{where}: {exc}; the file is corrupt") from exc
    except RecursionError as exc:
        raise error(f"{where}: JSON nested too deeply; the file is corrupt") from exc
    except ValueError as exc:  # JSONDecodeError, and integers of more than 4,300 digits
        raise error(f"{where}: not valid JSON ({exc}); the file is corrupt") from exc


class _NotStrictJSON(ValueError):
    pass


def _refuse_constant(token: str) -> Any:
    raise _NotStrictJSON(f"{token} is not JSON")


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise _NotStrictJSON(f"number {token[:40]} does not fit a float")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _NotStrictJSON(f"key {key[:80]!r} appears twice")
        out[key] = value
    return out


def dumps_strict(obj: Any, **json_kwargs: Any) -> str:
    """JSON text with every non-finite float (in nested dicts, lists, tuples) written as null.

    Use for every JSON file the library writes; numpy and 0-d torch scalars become numbers.

    Example:
        >>> dumps_strict({"best": float("inf"), "lr": [0.1, float("nan")]})
        '{"best": null, "lr": [0.1, null]}'
    """
    json_kwargs["allow_nan"] = False
    json_kwargs.setdefault("default", _json_default)
    return json.dumps(_strict(obj), **json_kwargs)


def _strict(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, Mapping):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    if _is_scalar(value):
        return _strict(value.item())
    return value  # left to json's ``default``


def _is_scalar(value: Any) -> bool:
    """A numpy scalar or a one-element tensor / array (has ``item()``)."""
    if not hasattr(value, "item"):
        return False
    numel = getattr(value, "numel", None)
    if callable(numel):
        return bool(numel() == 1)
    return getattr(value, "size", None) == 1


def clean_number(value: Any, *, key: str = "value") -> float | None:
    """A plain float for JSON, or None for missing / non-finite / non-numeric values (never a made-up 0).

    Raises:
        InvalidArgumentError: a number too large for a float (``10**400``), naming ``key``.
    """
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value.item() if hasattr(value, "item") else value)
    except OverflowError as exc:
        raise InvalidArgumentError(
            f"{key} = {_short(value)} does not fit a 64-bit float, so it cannot be stored in JSON; "
            "pass a smaller number (or its logarithm) or leave it out"
        ) from exc
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several elements
        return None
    return number if math.isfinite(number) else None


def clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Keep the finite numeric entries of ``metrics``, by their own names.

    Raises:
        InvalidArgumentError: a value too large for a float, or a name that is not valid Unicode.
    """
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, bool):
            continue
        name = str(key)
        if not _is_text(name):
            raise InvalidArgumentError(f"metric name {name!r} is not valid Unicode text; rename it")
        number = clean_number(value, key=f"metric {name!r}")
        if number is not None:
            out[name] = int(value) if isinstance(value, int) else number
    return out


def _finite(value: Any) -> float | None:
    """``value`` as a float if it is a finite JSON number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_text(value: str) -> bool:
    """Valid Unicode: no lone surrogates (JSON's ``"\\ud800"``), which no file system or terminal takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _short(value: Any) -> str:
    """``repr(value)`` cut to a readable length (a hostile sidecar may hold megabytes)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # ints past 4,300 digits, deep nesting
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
