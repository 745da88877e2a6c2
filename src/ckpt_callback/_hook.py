"""`CheckpointHook`: the plain PyTorch training loop adapter over `CheckpointManager`."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ._distributed import barrier
from ._errors import CheckpointError
from ._layout import default_name
from ._manager import CheckpointManager
from ._sidecar import CheckpointInfo, clean_metrics, clean_number
from ._training import check_stateful
from ._trigger import Interruption, Interrupts, SaveTrigger

__all__ = ["CheckpointHook"]

logger = logging.getLogger("ckpt_callback")


class CheckpointHook:
    """Checkpointing for a plain PyTorch loop: call `step` after each optimizer step.

    Args:
        root: a local folder or an fsspec URL; created if missing, and checked for writing now.
        model: the module to save (DDP / compiled wrappers are unwrapped).
        optimizer, scheduler: saved with RNG states so `resume` continues exactly.
        stateful: name → object with ``state_dict()``/``load_state_dict()`` saved with each
            checkpoint and restored by `resume`: torchdata's ``StatefulDataLoader`` (so a
            shuffled epoch resumes at the same batch), a sampler, an EMA.
        every_n_steps: save an automatic checkpoint every N optimizer steps.
        every_n_seconds: and/or every N seconds of wall time.
        save_on_signals: on these signals save a ``final`` checkpoint at the next `step`, then
            stop as the signal would have (SIGTERM ends the process, SIGINT raises
            KeyboardInterrupt; a second Ctrl-C interrupts at once). Add ``signal.SIGUSR1`` for
            SLURM's ``--signal``; ``()`` installs no handler.
        check_requests_every: seconds between two looks for ``ckpt request`` requests (rank 0,
            at a step boundary); None: never look.
        **manager_options: `CheckpointManager` options (keep_last, keep_best, monitor, mode,
            storage_options, async_save, max_shard_size, on_commit, compression,
            compression_level, save_merged for peft models).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with CheckpointHook("memory://doc-hook", model, optimizer=opt, every_n_steps=2) as hook:
        ...     for step in range(hook.resume() + 1, 5):
        ...         loss = model(torch.ones(1, 2)).pow(2).mean()
        ...         loss.backward(); opt.step(); opt.zero_grad()
        ...         _ = hook.step(step, loss=loss.item())
        >>> [(i.name, i.type) for i in hook.manager.list(sort_by="step", order="asc")]
        [('checkpoint-2', 'automatic'), ('checkpoint-4', 'final')]
    """

    def __init__(
        self,
        root: str,
        model: torch.nn.Module,
        *,
        optimizer: Any = None,
        scheduler: Any = None,
        stateful: Mapping[str, Any] | None = None,
        every_n_steps: int | None = None,
        every_n_seconds: float | None = None,
        save_on_signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
        check_requests_every: float | None = 10.0,
        **manager_options: Any,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.stateful = check_stateful(stateful or {})
        self.trigger = SaveTrigger(every_n_steps=every_n_steps, every_n_seconds=every_n_seconds)
        self.manager = CheckpointManager(root, **manager_options)
        self.manager.check_writable()
        self.interrupts = Interrupts(save_on_signals, self.manager.requests, every=check_requests_every)
        self.interrupts.install()
        self._step = 0
        self._epoch: float | None = None
        self._train_loss: float | None = None
        self._pending_eval: dict[int, dict[str, Any]] = {}
        self._ended = False

    def __enter__(self) -> CheckpointHook:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, *rest: object) -> None:
        if self._ended:
            self.manager.close()
        elif exc_type is None or issubclass(exc_type, SystemExit):  # the block ended, a break, or sys.exit()
            code = f" by sys.exit({exc.code!r})" if isinstance(exc, SystemExit) else ""
            self.end(description=f"training ended{code} at step {self._step}")
        else:  # a crash: its state may be what caused it, so no checkpoint of it
            self._ended = True
            self.interrupts.restore()
            latest = self.trigger.last_step
            logger.error("training ended with %s at step %d: no final checkpoint saved (the last one saved by this "
                         "run is %s)", exc_type.__name__, self._step,
                         default_name(latest) if latest is not None else "none")
            self.manager.close()

    def resume(self, name: str = "latest") -> int:
        """Restore the latest checkpoint (model, optimizer, scheduler, RNG, ``stateful``) if any; its step, else 0."""
        if self.manager.latest() is None:
            return 0
        info = self.manager.restore(name, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                    stateful=self.stateful)
        self._step = info.step
        self.trigger.reset(info.step)
        self._epoch = info.epoch
        logger.info("resumed from %s (step %d)", info.name, info.step)
        barrier()
        return info.step

    def step(self, step: int, *, loss: float | None = None, epoch: float | None = None) -> CheckpointInfo | None:
        """Record optimizer step ``step`` (steps done so far) and save if one is due.

        A failed scheduled save is logged and training goes on, whatever the storage did; the
        next save tries again.
        """
        self._step, self._train_loss = step, loss
        if epoch is not None:
            self._epoch = epoch
        event = self.interrupts.check(look=self.manager.writer)
        if event is not None and event.stop:
            self._stop(event)  # a failed stop request returns: training goes on
        saved = None
        if self.trigger.due(step):
            try:
                saved = self._save("automatic")
            except CheckpointError as exc:
                logger.error("scheduled checkpoint %s (step %d) was not saved: %s", default_name(step), step, exc)
        if event is not None and not event.stop:
            self._serve(event)  # a failure went to the requester and the log; training goes on
        return saved

    def evaluate(self, step: int, *, eval_loss: float | None = None, metrics: Mapping[str, Any] | None = None) -> None:
        """Record an evaluation at ``step``; it is added to that step's checkpoint and counts for best.

        Storage trouble while the checkpoint's sidecar is rewritten is logged; training goes on.
        """
        given = CheckpointInfo(name="evaluation", step=step, train_loss=self._train_loss,
                               eval_loss=clean_number(eval_loss, key="eval_loss"), metrics=clean_metrics(metrics))
        if given.metric(self.manager.monitor[0]) is None:
            self.manager.warn_missing_monitor(f"evaluate() at step {step} gave {', '.join(_names(given)) or 'nothing'}")
        try:
            updated = self.manager.update_metrics(step, eval_loss=eval_loss, metrics=metrics)
        except CheckpointError as exc:
            logger.error("the evaluation at step %d was not recorded in %s: %s", step, default_name(step), exc)
            return
        saved = self.trigger.last_step
        if updated is None and (saved is None or step > saved):
            # No checkpoint at this step yet: keep it for a save at the same step.
            self._pending_eval[step] = {"eval_loss": eval_loss, "metrics": dict(metrics or {})}

    def save(self, *, name: str | None = None, description: str | None = None) -> CheckpointInfo | None:
        """Save a manual checkpoint now (kept by retention)."""
        return self._save("manual", name=name, description=description)

    def end(self, *, description: str | None = None) -> CheckpointInfo | None:
        """Save the final checkpoint and wait for every save to be committed; raises if it fails.

        If a signal came after the last `step`, the run then stops as that signal would have.
        """
        self._ended = True
        event = self.interrupts.check(look=False)
        if event is not None and event.signum is not None:
            self._stop(event)
        try:
            info = self._save("final", description=description or f"training ended at step {self._step}")
        finally:
            self.interrupts.restore()
            self.manager.close()
        if self.interrupts.watch.received is not None:  # it came during that save: stop as it would have
            self.interrupts.watch.stop(self.interrupts.watch.received)
        return info

    def wait(self) -> CheckpointInfo | None:
        """Block until a background save is committed."""
        return self.manager.wait()

    def _stop(self, event: Interruption) -> None:
        """Save the final checkpoint of an interrupted run (a background save is committed first),
        then stop: as the signal would have, or (a stop request) with ``SystemExit(0)``. Returns
        only for a stop request whose save failed: training goes on."""
        if not self._serve(event) and event.signum is None:
            return None
        self._ended = True
        with contextlib.suppress(CheckpointError):  # waited for already; nothing may keep the run from stopping
            self.manager.close()
        if event.signum is not None:
            self.interrupts.watch.stop(event.signum)
        self.interrupts.restore()
        logger.warning("stopping at step %d as requested (%s)", self._step, event.request.id if event.request else "")
        raise SystemExit(0)

    def _serve(self, event: Interruption) -> bool:
        """Save the checkpoint ``event`` asks for, committed (with async_save too); whether it was."""
        def save(type: str, name: str | None, description: str) -> CheckpointInfo | None:
            info = self._save(type, name=name, description=description)
            return self.manager.wait() or info

        return self.interrupts.serve(event, self._step, writer=self.manager.writer, save=save)

    def _save(self, type: str, *, name: str | None = None, description: str | None = None) -> CheckpointInfo | None:
        pending = self._pending_eval.pop(self._step, {})
        self._pending_eval = {s: v for s, v in self._pending_eval.items() if s > self._step}
        try:
            info = self.manager.save(
                self.model,
                step=self._step,
                epoch=self._epoch,
                train_loss=self._train_loss,
                eval_loss=pending.get("eval_loss"),
                metrics=pending.get("metrics"),
                type=type,
                name=name,
                description=description,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                stateful=self.stateful,
                rng=True,
            )
        finally:
            barrier()
        self.trigger.saved(self._step)
        return info


def _names(info: CheckpointInfo) -> list[str]:
    return ["evalLoss"] * (info.eval_loss is not None) + sorted(info.metrics)
