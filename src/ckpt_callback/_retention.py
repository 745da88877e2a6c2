"""What happens to committed checkpoints: re-tagging, revising their sidecars, pruning.

Carries out the pure policies of `_policy`.

"Best" is judged by the monitor the run recorded in its sidecars unless one was given, so a
manager opened later (or `ckpt` without ``--monitor``) agrees with the run that tagged it.
Deletes happen only after the new checkpoint is committed, go through `_commit`, and a failed
one is logged: retention never stops training. The deletes a save or an evaluation causes run
on a background thread (`drain` waits for them); the checkpoint leaves this process's view at
once.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable, Sequence

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
        self.resumed_from: str | None = None  # kept whatever the policy says
        self.own: dict[str, str] = {}  # name -> id of the checkpoints this process committed
        self.lock = threading.RLock()  # sidecar read-modify-writes of this process, one at a time
        self._deleter: concurrent.futures.ThreadPoolExecutor | None = None
        self._deleting: list[concurrent.futures.Future[None]] = []

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

    # --- after a commit, and revisions of committed sidecars ------------------------------------

    def is_ours(self, info: CheckpointInfo) -> bool:
        """Whether this run saved ``info`` (or resumed from it): only those are revised."""
        return self.own.get(info.name) == info.id or info.name == self.resumed_from

    def after_commit(self, info: CheckpointInfo) -> CheckpointInfo:
        """A save committed ``info``: note it, then re-tag and prune from the catalog's view."""
        self.own[info.name] = info.id
        self.catalog.note(info)
        infos = self.catalog.recent()
        if not any(i.name == info.name for i in infos):
            infos.append(info)  # a listing may lag behind the commit on some stores
        settled = self.settle(infos)
        return next((i for i in settled if i.name == info.name), info)

    def revise(self, info: CheckpointInfo) -> CheckpointInfo | None:
        """Rewrite committed ``info``'s sidecar, then re-tag and prune; None if it is gone."""
        with self.lock:
            if not self.commit.rewrite(info):
                return None
            self.catalog.note(info)
            self.own[info.name] = info.id
            settled = self.settle(self.catalog.cached())
        return next((i for i in settled if i.name == info.name), info)

    def promote(self, existing: CheckpointInfo, new: CheckpointInfo) -> CheckpointInfo:
        """Re-tag the checkpoint already saved at this step (e.g. the last automatic one becomes final)."""
        merged = existing.replace(
            type=new.type, description=new.description or existing.description,
            epoch=new.epoch if new.epoch is not None else existing.epoch,
            train_loss=new.train_loss if new.train_loss is not None else existing.train_loss,
            eval_loss=new.eval_loss if new.eval_loss is not None else existing.eval_loss,
            metrics={**existing.metrics, **new.metrics},
        )
        return self.revise(merged) or merged

    def update(self, step: int, merge: Callable[[CheckpointInfo], CheckpointInfo]) -> CheckpointInfo | None:
        """Apply ``merge`` to this run's committed checkpoint of ``step`` (newest first); None if there is none."""
        with self.lock:
            names = [n for n in (*self.own, self.resumed_from) if n is not None]
            for candidate in (self.catalog.read(n) for n in reversed(names)):
                if candidate is not None and candidate.step == step and self.is_ours(candidate) \
                        and self.catalog.hidden.get(candidate.name) != candidate.id:  # not one being deleted
                    return self.revise(merge(candidate))
        return None

    def missing_monitor(self) -> str | None:
        """What this run's checkpoints record, when none carries the monitored value; else None."""
        infos = self.catalog.cached() if self.own else []
        if not infos or self.best(infos) is not None:
            return None
        losses = {k for i in infos for k, v in (("evalLoss", i.eval_loss), ("trainLoss", i.train_loss))
                  if v is not None}
        return ", ".join(sorted({k for i in infos for k in i.metrics} | losses)) or "nothing"

    def settle(self, infos: list[CheckpointInfo]) -> list[CheckpointInfo]:
        """Re-tag best and prune, now that something was committed; returns what remains."""
        with self.lock:
            infos = self.retag(infos)
            doomed = self.prune(infos, background=True)
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
        protect = [self.resumed_from] if self.resumed_from else []
        return self.policy(infos).to_delete(infos, protect=protect, keep_last=keep_last)

    def prune(self, infos: Sequence[CheckpointInfo], keep_last: int | None = None, *,
              background: bool = False) -> list[CheckpointInfo]:
        """Delete what the policy drops; a delete that fails is logged and left for the next time.

        ``background``: the deletes run on this retention's deleter thread (the caller, a training
        step, does not wait for storage); the doomed leave the catalog's view at once.
        """
        doomed = self.doomed(infos, keep_last)
        if not background:
            return [info for info in doomed if self._delete(info)]
        if self.commit.storage.is_local:  # the rename makes it disappear (for every process) at once
            return [info for info in doomed if self._delete(info, later=self._in_background)]
        for info in doomed:  # object stores: the whole delete is many requests
            self.catalog.hide(info)
            self._in_background(lambda info=info: self._delete_hidden(info))  # type: ignore[misc]
        return doomed

    def _in_background(self, work: Callable[[], None]) -> None:
        if self._deleter is None:
            self._deleter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-retention")
        self._deleting = [f for f in self._deleting if not f.done()]
        self._deleting.append(self._deleter.submit(_logged, work))

    def _delete(self, info: CheckpointInfo, later: Callable[[Callable[[], None]], None] | None = None) -> bool:
        try:
            if not self.commit.delete(info.name, expected_id=info.id, later=later):
                return False  # gone already, or replaced by a newer save of that name
        except CheckpointError as exc:
            logger.error("retention could not remove %s: %s", info.name, exc)
            return False
        self.catalog.forget(info.name)
        logger.info("retention removed %s from %s", info.name, self.commit.storage.display())
        return True

    def _delete_hidden(self, info: CheckpointInfo) -> None:
        try:
            self._delete(info)
        finally:  # listed again if it is still there: the next prune tries again
            self.catalog.unhide(info)

    def drain(self) -> None:
        """Wait until the background deletes asked for so far are done."""
        pending, self._deleting = self._deleting, []
        concurrent.futures.wait(pending)

    def close(self) -> None:
        self.drain()
        if self._deleter is not None:
            self._deleter.shutdown(wait=True)
            self._deleter = None


def _logged(work: Callable[[], None]) -> None:
    """Run a background part of a delete; a failure is logged (retention never stops training)."""
    try:
        work()
    except Exception as exc:
        logger.error("retention: a background delete failed: %s", exc)
