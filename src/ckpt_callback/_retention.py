"""Re-tagging and pruning: carries out the pure policies of `_policy` on committed checkpoints.

"Best" is judged by the monitor the run recorded in its sidecars unless one was given, so a
manager opened later (or `ckpt` without ``--monitor``) agrees with the run that tagged it.
Deletes happen only after the new checkpoint is committed, go through `_commit`, and a failed
one is logged: retention never stops training.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from ._catalog import Catalog
from ._commit import CommitProtocol
from ._errors import CheckpointError
from ._policy import RetentionPolicy, newest
from ._sidecar import CheckpointInfo

__all__ = ["Retention"]

logger = logging.getLogger("ckpt_callback")

DEFAULT_MONITOR = ("evalLoss", "min")


class Retention:
    """Keeps ``keep_last`` automatic checkpoints, the ``keep_best`` best, every final and manual one."""

    def __init__(self, commit: CommitProtocol, catalog: Catalog, *, keep_last: int | None, keep_best: int,
                 monitor: str | None, mode: str | None) -> None:
        self.commit, self.catalog = commit, catalog
        self.given = (monitor, mode)
        # Validates the options now (the monitor may still be resolved from the sidecars later).
        self.defaults = RetentionPolicy(keep_last=keep_last, keep_best=keep_best,
                                        monitor=monitor or DEFAULT_MONITOR[0], mode=mode or DEFAULT_MONITOR[1])
        self.protect: set[str] = set()
        self.lock = threading.RLock()  # sidecar read-modify-writes of this process, one at a time

    def monitor(self, infos: Sequence[CheckpointInfo] = ()) -> tuple[str, str]:
        """(name, mode) of "best": as given, else as the newest sidecar that records one, else evalLoss/min."""
        name, mode = self.given
        if name is None:
            recorded = newest(i for i in infos if i.monitor)
            if recorded is not None and recorded.monitor:
                return recorded.monitor.name, mode or recorded.monitor.mode
        return name or DEFAULT_MONITOR[0], mode or DEFAULT_MONITOR[1]

    def policy(self, infos: Sequence[CheckpointInfo] = ()) -> RetentionPolicy:
        name, mode = self.monitor(infos)
        return RetentionPolicy(keep_last=self.defaults.keep_last, keep_best=self.defaults.keep_best,
                               monitor=name, mode=mode)

    def best(self, infos: Sequence[CheckpointInfo]) -> CheckpointInfo | None:
        return self.policy(infos).best(infos)

    def settle(self, infos: list[CheckpointInfo]) -> list[CheckpointInfo]:
        """Re-tag best and prune, now that something was committed; returns what remains."""
        with self.lock:
            infos = self.retag(infos)
            doomed = self.prune(infos)
        gone = {i.name for i in doomed}
        return [i for i in infos if i.name not in gone]

    def retag(self, infos: list[CheckpointInfo]) -> list[CheckpointInfo]:
        changes = self.policy(infos).retag(infos)
        out = []
        for info in infos:
            if info.name in changes:
                updated = info.replace(type=changes[info.name])
                try:
                    if self.commit.rewrite(updated):
                        self.catalog.note(updated)
                        info = updated
                except CheckpointError as exc:
                    logger.error("could not re-tag %s as %s: %s", info.name, changes[info.name], exc)
            out.append(info)
        return out

    def doomed(self, infos: Sequence[CheckpointInfo], keep_last: int | None = None) -> list[CheckpointInfo]:
        return self.policy(infos).to_delete(infos, protect=self.protect, keep_last=keep_last)

    def prune(self, infos: Sequence[CheckpointInfo], keep_last: int | None = None) -> list[CheckpointInfo]:
        """Delete what the policy drops; a delete that fails is logged and left for the next time."""
        removed = []
        for info in self.doomed(infos, keep_last):
            try:
                if not self.commit.delete(info.name, expected_id=info.id):
                    continue  # gone already, or replaced by a newer save of that name
            except CheckpointError as exc:
                logger.error("retention could not remove %s: %s", info.name, exc)
                continue
            self.catalog.forget(info.name)
            removed.append(info)
            logger.info("retention removed %s from %s", info.name, self.commit.storage.display())
        return removed
