"""Every error this package raises on purpose.

The hierarchy::

    CheckpointError
    ├── CheckpointNotFoundError (FileNotFoundError)   no such checkpoint or root
    ├── CheckpointExistsError (FileExistsError)       a manual name already taken
    ├── InvalidNameError (ValueError)                 a name that cannot be a folder
    ├── InvalidArgumentError (ValueError)             a bad option (sort key, limit, ...)
    ├── CorruptCheckpointError (ValueError)           bytes or sidecar do not match
    │   └── SidecarError                              malformed or unknown-schema sidecar
    ├── UnsupportedSourceError (ValueError)           `ckpt import`: not a checkpoint it can read safely
    ├── StorageError (OSError)                        the storage refused or failed
    ├── SaveError (RuntimeError)                      a (background) save failed
    └── RequestTimeoutError (TimeoutError)            a `ckpt request` got no answer in time

Each also subclasses the built-in exception a caller would already catch, so
``except FileNotFoundError`` keeps working around this package.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "InvalidArgumentError",
    "InvalidNameError",
    "RequestTimeoutError",
    "SaveError",
    "SidecarError",
    "StorageError",
    "UnsupportedSourceError",
]


class CheckpointError(Exception):
    """Base class of every error raised on purpose by ckpt_callback."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint (or the root) does not exist, or is incomplete."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A checkpoint of that name is already committed."""


class InvalidNameError(CheckpointError, ValueError):
    """A checkpoint name that cannot be used as a folder name."""


class InvalidArgumentError(CheckpointError, ValueError):
    """An option outside what is accepted (sort key, limit, mode, ...)."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """Stored bytes do not match what the sidecar promises."""


class SidecarError(CorruptCheckpointError):
    """A ``checkpoint.json`` that is malformed or of an unknown schema version."""


class StorageError(CheckpointError, OSError):
    """The storage backend refused or failed an operation."""


class SaveError(CheckpointError, RuntimeError):
    """A save failed; for background saves this is raised by the next call."""


class RequestTimeoutError(CheckpointError, TimeoutError):
    """A checkpoint request (``ckpt request --wait``) was not answered by the running job in time."""


class UnsupportedSourceError(CheckpointError, ValueError):
    """An import source with no weights we recognise, or pickled objects beyond tensors (never unpickled)."""
