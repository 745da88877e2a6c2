""""Save now?" for every reason a save happens, agreed by every rank.

Today's reasons are the schedule (`SavePolicy`: every N steps and/or seconds) and the framework
asking (the HF Trainer's ``should_save``). Wall clocks differ between ranks, so a time-based
decision is rank 0's, broadcast to all; step-based ones agree by construction.
"""

from __future__ import annotations

import time

from ._distributed import from_rank0
from ._policy import SavePolicy

__all__ = ["SaveTrigger"]


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
