""""Save now?" for every reason a save happens, agreed by every rank.

The reasons are the schedule (`SaveTrigger`: `SavePolicy`'s every N steps and/or seconds), the
framework asking (the HF Trainer's ``should_save``), and interruptions (`Interrupts`): a signal
(preemption, Ctrl-C) or a checkpoint requested from outside (``ckpt request``). Wall clocks
differ between ranks, so a time-based decision is rank 0's, broadcast to all; step-based ones
agree by construction; a signal any rank received and a request rank 0 read are agreed with
one all-reduce at each step boundary, so every rank saves and stops at the same step.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ._distributed import from_rank0, world_size
from ._errors import CheckpointError, InvalidArgumentError
from ._policy import SavePolicy
from ._requests import CheckpointRequest, RequestChannel
from ._sidecar import CheckpointInfo
from ._signals import SignalWatch, signal_name

__all__ = ["Interruption", "Interrupts", "SaveTrigger"]

logger = logging.getLogger("ckpt_callback")


class SaveTrigger:
    """Tracks the last save and answers whether one is due at a step.

    Example:
        >>> trigger = SaveTrigger(every_n_steps=2)
        >>> [trigger.due(s) for s in (1, 2)]
        [False, True]
        >>> trigger.saved(2); trigger.due(2)
        False
    """

    def __init__(self, every_n_steps: int | None = None, every_n_seconds: float | None = None) -> None:
        self.policy = SavePolicy(every_n_steps=every_n_steps, every_n_seconds=every_n_seconds)
        self.last_step: int | None = None
        self.last_time = time.monotonic()

    @property
    def scheduled(self) -> bool:
        """Whether a schedule was given (else saves happen only when the framework asks)."""
        return self.policy.every_n_steps is not None or self.policy.every_n_seconds is not None

    def due(self, step: int, *, asked: bool = False) -> bool:
        """Whether to save at ``step``: the schedule says so (or, without one, the framework ``asked``)."""
        if self.last_step is not None and step <= self.last_step:
            return False
        if not self.scheduled:
            return asked
        due = self.policy.should_save(step, last_step=self.last_step, last_time=self.last_time, now=time.monotonic())
        if self.policy.every_n_seconds is not None:
            due = bool(from_rank0(due))  # clocks differ between ranks: rank 0 decides for all
        return due

    def saved(self, step: int) -> None:
        self.last_step, self.last_time = step, time.monotonic()

    def reset(self, step: int | None = None) -> None:
        """Start over (a new training run) with ``step`` as the last one saved."""
        self.last_step, self.last_time = step, time.monotonic()


@dataclass(frozen=True)
class Interruption:
    """A save off the schedule, agreed by every rank: a signal came, or a request from outside.

    A signal or a ``stop`` request asks for a ``final`` checkpoint and the end of the run; any
    other request for a ``manual`` one. A request that came with a signal gets the final one.
    """

    signum: int | None = None
    request: CheckpointRequest | None = None

    @property
    def stop(self) -> bool:
        return self.signum is not None or (self.request is not None and self.request.stop)

    @property
    def type(self) -> str:
        return "final" if self.stop else "manual"

    @property
    def name(self) -> str | None:
        return self.request.name if self.request is not None and self.signum is None else None

    def description(self, step: int) -> str:
        if self.signum is not None:
            return f"stopped by {signal_name(self.signum)} at step {step}"
        assert self.request is not None
        why = f"{'stopped' if self.request.stop else 'requested'} by ckpt request {self.request.id} at step {step}"
        return f"{self.request.description} ({why})" if self.request.description else why


class Interrupts:
    """Signals and outside requests, checked at step boundaries and agreed by every rank.

    Args:
        signals: the signals to save on (see `SignalWatch`); installed by `install`.
        channel: where outside requests arrive, or None.
        every: seconds between two looks for requests (rank 0 only; no storage call in between);
            None: never look.
    """

    def __init__(self, signals: Iterable[int], channel: RequestChannel | None, *, every: float | None = 10.0) -> None:
        if every is not None and (isinstance(every, bool) or not isinstance(every, (int, float)) or every < 0):
            raise InvalidArgumentError(f"check_requests_every must be a number of seconds >= 0 or None, got {every!r}")
        self.watch = SignalWatch(signals)
        self.channel = channel if every is not None else None
        self.every = every
        self._looked: float | None = None

    def install(self) -> None:
        self.watch.install()

    def restore(self) -> None:
        self.watch.restore()

    def check(self, *, look: bool) -> Interruption | None:
        """What interrupts the run at this step boundary, the same on every rank (one collective when
        distributed). ``look``: this process reads requests (the writer, rank 0), when one is due."""
        if not self.watch.signals and self.channel is None:  # both turned off: not even a collective
            return None
        signum = self.watch.received or 0
        request = None
        if look and not signum and self.channel is not None and self._due():
            try:
                request = self.channel.take()
            except CheckpointError as exc:  # storage trouble must not stop training: look again later
                logger.warning("could not look for checkpoint requests in %s: %s", self.channel.storage.display(), exc)
        signum, asked = _max_over_ranks(signum, int(request is not None))
        if asked:
            request = from_rank0(request)
        if not signum and request is None:
            return None
        return Interruption(signum=signum or None, request=request)

    def _due(self) -> bool:
        now = time.monotonic()
        if self._looked is not None and now - self._looked < (self.every or 0.0):
            return False
        self._looked = now
        return True

    def serve(self, event: Interruption, step: int, *, writer: bool,
              save: Callable[[str, str | None, str], CheckpointInfo | None]) -> bool:
        """Save what ``event`` asks for at ``step`` with ``save(type, name, description)`` (on every
        rank), tell the requester how it went; whether it was saved, as every rank sees it.

        A failure is logged (and sent to the requester), never raised: training must not die of a
        request, and a signal's stop must not be kept from happening.
        """
        if event.signum is not None:
            logger.warning("received %s: saving a final checkpoint at step %d, then stopping",
                           signal_name(event.signum), step)
        elif event.request is not None:
            logger.warning("checkpoint request %s: saving a %s checkpoint at step %d%s", event.request.id,
                           event.type, step, ", then stopping" if event.stop else "")
        channel = self.channel if writer and event.request is not None else None
        if channel is not None and event.request is not None:
            with contextlib.suppress(CheckpointError):
                channel.accepted(event.request, step)
        info, error = None, None
        try:
            info = save(event.type, event.name, event.description(step))
        except CheckpointError as exc:  # a taken name, a failed write
            error = exc
            logger.error("the %s checkpoint at step %d was not saved: %s", event.type, step, exc)
        if channel is not None and event.request is not None:
            try:
                channel.answer(event.request, info=info, error=error, step=step)
            except CheckpointError as exc:
                logger.error("could not record the outcome of checkpoint request %s: %s", event.request.id, exc)
        return bool(from_rank0(error is None))


def _max_over_ranks(*values: int) -> tuple[int, ...]:
    """The largest of each value over every rank (one all-reduce; no-op in a single process)."""
    if world_size() == 1:
        return values
    dist = torch.distributed
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":  # NCCL reduces device tensors only
        device = torch.device("cuda", torch.cuda.current_device())
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tuple(int(v) for v in tensor.tolist())
