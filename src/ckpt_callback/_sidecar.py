"""The sidecar ``checkpoint.json``: a typed record with a schema version.

The sidecar is written last; its presence is what makes a checkpoint complete.
Keys on storage are camelCase (as the hosted checkpoint APIs spell them);
attributes in Python are snake_case, and the camelCase names work as aliases.
"""

from __future__ import annotations

import json
import math
import re
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from ._errors import InvalidNameError, SidecarError

__all__ = [
    "CHECKPOINT_TYPES",
    "RESERVED_NAMES",
    "SCHEMA_VERSION",
    "SIDECAR_NAME",
    "CheckpointInfo",
    "FileEntry",
    "now_iso",
    "validate_name",
]

SCHEMA_VERSION = 1
SIDECAR_NAME = "checkpoint.json"
CHECKPOINT_TYPES = ("automatic", "best", "manual", "final")
RESERVED_NAMES = frozenset({"latest", "best", "final"})
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+=@-]*$")


def now_iso() -> str:
    """The current time as ISO 8601 UTC with microseconds and a ``Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def validate_name(name: object) -> str:
    """Return ``name`` if it can be a checkpoint folder name, else raise `InvalidNameError`."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidNameError(f"checkpoint name must be a non-empty string, got {name!r}")
    if "/" in name or "\\" in name:
        raise InvalidNameError(f"checkpoint name {name!r} contains a path separator; use a plain folder name")
    if name in (".", "..") or ".." in name:
        raise InvalidNameError(f"checkpoint name {name!r} contains '..'; use a plain folder name")
    if name in RESERVED_NAMES:
        raise InvalidNameError(
            f"checkpoint name {name!r} is reserved: 'latest', 'best' and 'final' always refer to "
            "those checkpoints; choose another name"
        )
    if len(name) > 200 or not _NAME_RE.match(name):
        raise InvalidNameError(
            f"checkpoint name {name!r} is not allowed: use letters, digits and . _ - + = @ "
            "(not starting with '.' or '-'), at most 200 characters"
        )
    return name


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint: its path relative to the checkpoint folder, size and sha256."""

    path: str
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


# snake_case attribute -> camelCase key on storage
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
}
_ATTRS = {camel: snake for snake, camel in _KEYS.items()}


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
    schema_version: int = SCHEMA_VERSION

    def __getattr__(self, key: str) -> Any:
        # Only called for attributes not found normally: map camelCase aliases.
        snake = _ATTRS.get(key)
        if snake is None or snake == key:
            raise AttributeError(f"{type(self).__name__!s} has no attribute {key!r}")
        return getattr(self, snake)

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

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
        """The sidecar as a JSON-ready dict with camelCase keys, in the documented order."""
        out: dict[str, Any] = {}
        for attr, key in _KEYS.items():
            value = getattr(self, attr)
            if attr == "files":
                value = [entry.to_json() for entry in value]
            elif attr == "metrics":
                value = dict(value)
            out[key] = value
        return out

    def dumps(self) -> str:
        """The sidecar as JSON text."""
        return json.dumps(self.to_json(), indent=2, allow_nan=False, default=_json_default) + "\n"

    @classmethod
    def from_json(cls, data: Any, *, where: str = "checkpoint.json") -> CheckpointInfo:
        """Build from a parsed sidecar, raising `SidecarError` naming ``where`` on malformed input."""
        if not isinstance(data, dict):
            raise SidecarError(f"{where}: expected a JSON object, got {type(data).__name__}")
        version = data.get("schemaVersion")
        if version != SCHEMA_VERSION:
            raise SidecarError(
                f"{where}: unknown schemaVersion {version!r} (this version of ckpt-callback reads "
                f"{SCHEMA_VERSION}); upgrade ckpt-callback or remove the folder"
            )
        missing = [k for k in ("id", "name", "type", "step", "createdAt") if k not in data]
        if missing:
            raise SidecarError(f"{where}: missing keys {', '.join(missing)}")
        kwargs: dict[str, Any] = {}
        for camel, value in data.items():
            snake = _ATTRS.get(camel)
            if snake is not None:
                kwargs[snake] = value
        try:
            kwargs["files"] = tuple(
                FileEntry(path=str(f["path"]), size=int(f["size"]), sha256=str(f["sha256"]))
                for f in kwargs.get("files") or ()
            )
        except (TypeError, KeyError, ValueError) as exc:
            raise SidecarError(f"{where}: malformed 'files' list ({exc})") from exc
        info = cls(**kwargs)
        info._check(where)
        return info

    @classmethod
    def loads(cls, text: str | bytes, *, where: str = "checkpoint.json") -> CheckpointInfo:
        """Parse sidecar JSON text; see `from_json`."""
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SidecarError(f"{where}: not valid JSON ({exc})") from exc
        return cls.from_json(data, where=where)

    def _check(self, where: str) -> None:
        """Reject values of the wrong type, so a bad sidecar fails here and not deep inside."""
        def bad(key: str, expected: str) -> SidecarError:
            return SidecarError(f"{where}: {key!r} must be {expected}, got {self[key]!r}")

        if not isinstance(self.name, str) or not self.name:
            raise bad("name", "a non-empty string")
        if self.type not in CHECKPOINT_TYPES:
            raise bad("type", f"one of {', '.join(CHECKPOINT_TYPES)}")
        if not isinstance(self.step, int) or isinstance(self.step, bool) or self.step < 0:
            raise bad("step", "a non-negative integer")
        for key in ("epoch", "trainLoss", "evalLoss"):
            value = self[key]
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise bad(key, "a number or null")
        if not isinstance(self.metrics, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in self.metrics.values()
        ):
            raise bad("metrics", "an object of numbers")
        if not isinstance(self.size, int) or not isinstance(self.inference_ready, bool):
            raise SidecarError(f"{where}: 'size' must be an integer and 'inferenceReady' a boolean")


def clean_number(value: Any) -> float | None:
    """A plain float for JSON, or None for missing / non-finite values (never a made-up 0)."""
    if value is None:
        return None
    try:
        number = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Keep the finite numeric entries of ``metrics``, by their own names."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, bool):
            continue
        number = clean_number(value)
        if number is not None:
            out[str(key)] = int(number) if isinstance(value, int) else number
    return out


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to checkpoint.json")
