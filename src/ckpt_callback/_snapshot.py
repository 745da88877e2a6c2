"""Staging buffers for background saves: the only part of a checkpoint that stops training.

An async save copies every tensor into host buffers that are allocated once and reused by
every later save of the same shapes (pinned memory when the source is on a GPU, so the copy
is a DMA), then the training thread goes on while a background thread writes the buffers.
Tensors that share memory (tied weights) share one buffer, so the snapshot is never larger
than the state. Host tensors are copied by one plain memcpy each on the training thread: torch's
own copy splits a large tensor across its intra-op threads and waits for all of them, which is
several times slower as soon as another process holds a core.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from typing import Any

import torch

from ._serialization import view_key

__all__ = ["StagingArea"]


class StagingArea:
    """Host buffers kept between saves; `snapshot` copies a flat tensor dict into them.

    Example:
        >>> area = StagingArea()
        >>> w = torch.ones(3)
        >>> snap = area.snapshot({"a": w, "b": w})
        >>> _ = w.add_(1)  # training goes on
        >>> snap["a"].tolist(), snap["a"] is snap["b"]
        ([1.0, 1.0, 1.0], True)
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def _buffer(self, key: str, like: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != like.shape or buffer.dtype != like.dtype:
            pin = like.device.type == "cuda"
            buffer = torch.empty(like.shape, dtype=like.dtype, pin_memory=pin)
            self._buffers[key] = buffer
        return buffer

    def snapshot(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copies of ``tensors`` in the staging buffers, taken now; aliases stay aliases."""
        out: dict[str, torch.Tensor] = {}
        seen: dict[tuple[Any, ...], torch.Tensor] = {}
        used: set[str] = set()
        asynchronous = False
        for key, tensor in tensors.items():
            source = tensor.detach()
            if source.layout != torch.strided:
                out[key] = source.to("cpu", copy=True)
                continue
            alias = view_key(source) if source.numel() else None
            if alias is not None and alias in seen:
                out[key] = seen[alias]
                continue
            buffer = self._buffer(key, source)
            non_blocking = source.device.type == "cuda"
            if source.device.type == "cpu" and source.is_contiguous():
                _copy_one_thread(buffer, source)
            else:
                buffer.copy_(source, non_blocking=non_blocking)
            asynchronous |= non_blocking
            used.add(key)
            out[key] = buffer
            if alias is not None:
                seen[alias] = buffer
        if asynchronous:
            torch.cuda.synchronize()
        for stale in set(self._buffers) - used:  # shapes that went away: free them
            del self._buffers[stale]
        return out


def _copy_one_thread(buffer: torch.Tensor, source: torch.Tensor) -> None:
    """Copy contiguous host tensor ``source`` into ``buffer`` (same shape and dtype) with one memcpy."""
    nbytes = source.numel() * source.element_size()
    if nbytes:
        ctypes.memmove(buffer.data_ptr(), source.data_ptr(), nbytes)  # releases the GIL
