"""The few collective operations integrations need so that every rank takes the same decision.

Without an initialized process group (or with one process) each is a no-op.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch

__all__ = ["barrier", "from_rank0", "is_writer", "world_size"]

T = TypeVar("T")


def world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_writer() -> bool:
    """Whether this process writes replicated state: rank 0, or the only process."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Keep ranks in step, e.g. so none reads a checkpoint before rank 0 committed it."""
    if world_size() > 1:
        torch.distributed.barrier()


def from_rank0(value: T) -> T:
    """Rank 0's ``value`` on every rank (a picklable Python value, broadcast by torch.distributed)."""
    if world_size() == 1:
        return value
    box: list[Any] = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
