"""ckpt-callback: crash-safe, fast safetensors checkpoints for HF Trainer and plain PyTorch loops.

Example:
    >>> from ckpt_callback import CheckpointManager
    >>> manager = CheckpointManager("memory://doc-init", keep_last=3)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._catalog import CheckpointPage, CheckpointSummary, CheckpointWarning
from ._errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidArgumentError,
    InvalidNameError,
    RequestTimeoutError,
    SaveError,
    SidecarError,
    StorageError,
    UnsupportedSourceError,
)
from ._manager import CheckpointManager, CheckpointRequest, VerifyResult
from ._policy import RetentionPolicy, SavePolicy
from ._sidecar import CheckpointInfo, FileEntry
from ._trackers import MlflowLink, WandbLink

if TYPE_CHECKING:
    from ._export import export_checkpoint as export_checkpoint
    from ._hf import CheckpointCallback as CheckpointCallback
    from ._hook import CheckpointHook as CheckpointHook
    from ._import import import_checkpoints as import_checkpoints
    from ._sampler import ResumableSampler as ResumableSampler

# Names whose modules import torch (or transformers) are loaded when first asked for, so that
# `ckpt list` and `ckpt inspect` start without torch (`CheckpointManager` imports it when it
# saves or loads tensors).
_LAZY = {
    "CheckpointCallback": "._hf",
    "CheckpointHook": "._hook",
    "ResumableSampler": "._sampler",
    "export_checkpoint": "._export",
    "import_checkpoints": "._import",
}

__version__ = "0.1.0"

# CheckpointCallback is public too, but left out of __all__ so that `from ckpt_callback import *`
# works without transformers installed; `from ckpt_callback import CheckpointCallback` loads it.
__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointHook",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointPage",
    "CheckpointRequest",
    "CheckpointSummary",
    "CheckpointWarning",
    "CorruptCheckpointError",
    "FileEntry",
    "InvalidArgumentError",
    "InvalidNameError",
    "MlflowLink",
    "RequestTimeoutError",
    "ResumableSampler",
    "RetentionPolicy",
    "SaveError",
    "SavePolicy",
    "SidecarError",
    "StorageError",
    "UnsupportedSourceError",
    "VerifyResult",
    "WandbLink",
    "export_checkpoint",
    "import_checkpoints",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ckpt_callback' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # asked once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
