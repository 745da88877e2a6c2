"""When to save and what to keep: small pure policies over committed sidecars.

They never touch storage or torch; given plain `CheckpointInfo` records they answer
"save now?", "which one is best?", "which type should each carry?" and "which to delete?".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ._errors import InvalidArgumentError
from ._sidecar import CheckpointInfo

__all__ = ["RetentionPolicy", "SavePolicy", "newest"]

KEPT_TYPES = ("final", "manual")  # never removed by retention


def _age_key(info: CheckpointInfo) -> tuple[int, str, str]:
    return (info.step, info.created_at, info.name)


def newest(infos: Iterable[CheckpointInfo]) -> CheckpointInfo | None:
    """The most recent checkpoint: highest step, then latest creation."""
    return max(infos, key=_age_key, default=None)


@dataclass(frozen=True)
class SavePolicy:
    """Save every ``every_n_steps`` optimizer steps and/or every ``every_n_seconds``.

    Example:
        >>> SavePolicy(every_n_steps=100).should_save(200, last_step=100, last_time=0.0, now=1.0)
        True
    """

    every_n_steps: int | None = None
    every_n_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.every_n_steps is not None and (not isinstance(self.every_n_steps, int) or self.every_n_steps < 1):
            raise InvalidArgumentError(f"every_n_steps must be a positive integer or None, got {self.every_n_steps!r}")
        if self.every_n_seconds is not None and not self.every_n_seconds > 0:
            raise InvalidArgumentError(f"every_n_seconds must be positive or None, got {self.every_n_seconds!r}")

    def should_save(self, step: int, *, last_step: int | None, last_time: float, now: float) -> bool:
        """Whether a scheduled checkpoint is due at ``step`` (never twice for one step)."""
        if last_step is not None and step <= last_step:
            return False
        if self.every_n_steps is not None and step % self.every_n_steps == 0:
            return True
        return self.every_n_seconds is not None and now - last_time >= self.every_n_seconds


@dataclass(frozen=True)
class RetentionPolicy:
    """Keep the ``keep_last`` newest automatic checkpoints, the ``keep_best`` best, every final and manual one.

    ``keep_last=None`` keeps every automatic checkpoint. The best is judged by ``monitor``
    (``evalLoss``, ``trainLoss`` or any metric name) in ``mode`` ``"min"`` or ``"max"``.

    Example:
        >>> a = CheckpointInfo(name="a", step=1, eval_loss=0.5)
        >>> b = CheckpointInfo(name="b", step=2, eval_loss=0.9)
        >>> c = CheckpointInfo(name="c", step=3, eval_loss=0.7)
        >>> [i.name for i in RetentionPolicy(keep_last=1).to_delete([a, b, c])]
        ['b']
    """

    keep_last: int | None = 3
    keep_best: int = 1
    monitor: str = "evalLoss"
    mode: str = "min"

    def __post_init__(self) -> None:
        if self.keep_last is not None and (not isinstance(self.keep_last, int) or self.keep_last < 0):
            raise InvalidArgumentError(f"keep_last must be a non-negative integer or None, got {self.keep_last!r}")
        if not isinstance(self.keep_best, int) or self.keep_best < 0:
            raise InvalidArgumentError(f"keep_best must be a non-negative integer, got {self.keep_best!r}")
        if self.mode not in ("min", "max"):
            raise InvalidArgumentError(f"mode must be 'min' or 'max', got {self.mode!r}")
        if not isinstance(self.monitor, str) or not self.monitor:
            raise InvalidArgumentError(f"monitor must be a metric name, got {self.monitor!r}")

    def ranked(self, infos: Iterable[CheckpointInfo]) -> list[CheckpointInfo]:
        """Checkpoints that have the monitored value, best first (ties: the newer wins)."""
        scored = [(info.metric(self.monitor), info) for info in infos]
        present = [(value, info) for value, info in scored if value is not None]
        sign = 1.0 if self.mode == "min" else -1.0
        present.sort(key=lambda vi: (sign * vi[0], -vi[1].step))
        return [info for _, info in present]

    def best(self, infos: Iterable[CheckpointInfo]) -> CheckpointInfo | None:
        ranked = self.ranked(infos)
        return ranked[0] if ranked else None

    def retag(self, infos: Sequence[CheckpointInfo]) -> dict[str, str]:
        """``{name: new_type}`` for the checkpoints whose type tag must change.

        The best one is tagged ``best`` unless it is ``final`` or ``manual`` (those tags say
        more and keep it anyway); every other former ``best`` goes back to ``automatic``.
        """
        best = self.best(infos)
        changes: dict[str, str] = {}
        for info in infos:
            if info.type in KEPT_TYPES:
                continue
            wanted = "best" if best is not None and info.name == best.name else "automatic"
            if info.type != wanted:
                changes[info.name] = wanted
        return changes

    def to_delete(
        self, infos: Sequence[CheckpointInfo], *, protect: Iterable[str] = (), keep_last: int | None = None
    ) -> list[CheckpointInfo]:
        """Checkpoints retention removes, oldest first.

        Never the final, manual, newest, ``protect``-ed (e.g. the one training resumed from),
        one of the ``keep_best`` best, or the one tagged ``best`` (unless ``keep_best`` is 0).
        ``keep_last`` overrides the policy's own for one call.
        """
        limit = self.keep_last if keep_last is None else keep_last
        if limit is None:
            return []
        keep = set(protect)
        latest = newest(infos)
        if latest is not None:
            keep.add(latest.name)
        keep.update(info.name for info in self.ranked(infos)[: self.keep_best])
        if self.keep_best:
            # The stored tag was set by the run's own monitor, which may differ from this policy's
            # (e.g. `ckpt prune` with the default monitor on a run that monitored accuracy).
            keep.update(info.name for info in infos if info.type == "best")
        scheduled = sorted((i for i in infos if i.type not in KEPT_TYPES), key=_age_key, reverse=True)
        keep.update(info.name for info in scheduled[:limit])
        return sorted((i for i in scheduled if i.name not in keep), key=_age_key)
