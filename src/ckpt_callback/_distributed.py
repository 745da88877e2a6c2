"""The few collective operations integrations need so that every rank takes the same decision.

Without an initialized process group (or with one process) each is a no-op. Sharded saves and
loads talk over their own Gloo group (`checkpoint_group`), so a save running on a background
thread never interleaves with the training's collectives, and a rank that dies makes the others
fail after a bounded time instead of hanging.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, TypeVar

import torch

from . import _errors
from ._errors import CheckpointError, SaveError

__all__ = ["agree", "all_ranks", "barrier", "checkpoint_group", "from_rank0", "is_writer", "rank", "world_size"]

T = TypeVar("T")

# How long a rank waits for the others inside a sharded save or load before it fails.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("CKPT_COLLECTIVE_TIMEOUT", "600")))
_GROUP: Any = None


def _initialized() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if _initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if _initialized() else 0


def is_writer() -> bool:
    """Whether this process writes replicated state: rank 0, or the only process."""
    return rank() == 0


def barrier() -> None:
    """Keep ranks in step, e.g. so none reads a checkpoint before rank 0 committed it."""
    if world_size() > 1:
        torch.distributed.barrier()


def from_rank0(value: T, *, group: Any = None) -> T:
    """Rank 0's ``value`` on every rank (a picklable Python value, broadcast by torch.distributed)."""
    if world_size() == 1:
        return value
    box: list[Any] = [value]
    torch.distributed.broadcast_object_list(box, src=0, group=group)
    return box[0]


def all_ranks(value: T, *, group: Any = None) -> list[T]:
    """Every rank's ``value``, in rank order, on every rank."""
    if world_size() == 1:
        return [value]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, value, group=group)
    return out


def checkpoint_group() -> Any:
    """The Gloo group of sharded saves and loads (created on first use: every rank must call this together)."""
    global _GROUP
    if not _initialized():
        return None
    if _GROUP is None:
        _GROUP = torch.distributed.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    return _GROUP


def describe(exc: BaseException) -> tuple[str, str]:
    """An error as (class name, message), to send to the other ranks."""
    name = type(exc).__name__ if isinstance(exc, CheckpointError) else "SaveError"
    message = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
    return name, message


def rebuild(error: tuple[str, str], *, rank: int | None = None) -> CheckpointError:
    """The `CheckpointError` another rank (``rank``) sent with `describe`."""
    cls = getattr(_errors, error[0], SaveError)
    if not (isinstance(cls, type) and issubclass(cls, CheckpointError)):
        cls = SaveError
    return cls(error[1] if rank is None else f"on rank {rank}: {error[1]}")


def agree(error: BaseException | None, *, group: Any = None) -> None:
    """Raise on every rank if any rank had an error (its own, else the first rank's); a no-op when none had.

    Every rank must call this at the same point, whether or not it failed.
    """
    errors = all_ranks(None if error is None else describe(error), group=group)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if not failed:
        return
    failed_rank, first = failed[0]
    if error is not None:
        raise error
    raise rebuild(first, rank=failed_rank)
