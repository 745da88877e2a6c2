"""`CheckpointCallback`: the HuggingFace Trainer adapter over `CheckpointManager`.

It takes the Trainer's saving over rather than reusing it: on every save the Trainer asks for,
the callback sets ``control.should_save = False`` (so the Trainer writes no ``checkpoint-N`` of
its own) and writes the checkpoint once through the manager, in HF's layout. Reusing the
Trainer's folder would mean pickled ``optimizer.pt`` / ``rng_state.pth`` / ``training_args.bin``
on local disk only, then a second copy of every byte to reach the root. The save runs at the
first quiet point after the Trainer asked for it (the next step's start, the epoch's end, or
the end of training), which is after that step's logging and evaluation, just where the
Trainer's own ``_save_checkpoint`` would run.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import signal
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ._distributed import barrier
from ._errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, InvalidArgumentError
from ._layout import TRAINER_STATE_FILE, default_name
from ._manager import CheckpointManager
from ._pretrained import is_hf_model, is_peft_model, read_folder
from ._sharded import is_sharded
from ._sidecar import CheckpointInfo, clean_metrics, dumps_strict
from ._training import TrainingStateValues, check_stateful, restore_rng, unwrap_model
from ._trigger import Interruption, Interrupts, SaveTrigger

__all__ = ["CheckpointCallback"]

logger = logging.getLogger("ckpt_callback")


class CheckpointCallback(TrainerCallback):
    """Checkpoints for `transformers.Trainer`: inference-ready folders on any fsspec root, exact resume.

    Args:
        root: a local folder or an fsspec URL (``s3://bucket/run``); checked for writing at train start.
        every_n_steps, every_n_seconds: save on this schedule instead of the Trainer's
            ``save_strategy`` / ``save_steps`` (the default).
        load_best_at_end: load the best checkpoint's weights into the model when training ends
            (default: ``args.load_best_model_at_end``); works on remote roots too.
        save_on_signals: on these signals (while training) save a ``final`` checkpoint at the next
            step boundary or evaluation/prediction step, then stop as the signal would have
            (SIGTERM ends the process, SIGINT raises KeyboardInterrupt out of ``train()``; a second
            Ctrl-C interrupts at once). Add ``signal.SIGUSR1`` for SLURM's ``--signal``; ``()``
            installs no handler.
        stateful: name → object with ``state_dict()``/``load_state_dict()`` (an EMA, a data stream)
            saved with each checkpoint and restored on resume; the Trainer's own dataloader position
            needs none (it skips the batches already seen).
        check_requests_every: seconds between two looks for ``ckpt request`` requests (rank 0);
            None: never look. A ``--stop`` request ends ``train()`` normally after the final checkpoint.
        **manager_options: `CheckpointManager` options (keep_last, keep_best, monitor, mode,
            storage_options, async_save, max_shard_size, writer, on_commit,
            compression, compression_level, save_merged for peft models).

    Example:
        >>> callback = CheckpointCallback("memory://doc-hf", keep_last=3, monitor="evalLoss")
        >>> # trainer = Trainer(model=model, args=args, callbacks=[callback], processing_class=tokenizer)
        >>> # trainer.train(resume_from_checkpoint=callback.resume_from())   # None on a fresh root
        >>> callback.resume_from() is None
        True
    """

    def __init__(
        self,
        root: str,
        *,
        every_n_steps: int | None = None,
        every_n_seconds: float | None = None,
        load_best_at_end: bool | None = None,
        save_on_signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
        check_requests_every: float | None = 10.0,
        stateful: Mapping[str, Any] | None = None,
        **manager_options: Any,
    ) -> None:
        self.stateful = check_stateful(stateful or {})
        self.manager = CheckpointManager(root, **manager_options)
        self._storage_options = manager_options.get("storage_options")
        self.trigger = SaveTrigger(every_n_steps, every_n_seconds)
        self.interrupts = Interrupts(save_on_signals, self.manager.requests, every=check_requests_every)
        self._training = False
        self._stopping: Interruption | None = None  # a signal or stop request: the final checkpoint is due
        self._final_step: int | None = None  # the step whose final checkpoint was saved already
        self.load_best_at_end = load_best_at_end
        self._writer_given = "writer" in manager_options
        self._due = False  # the Trainer (or our schedule) asked for a save not yet written
        self._resume: tuple[str, str, CheckpointManager] | None = None  # (name, local folder, reader)
        self._rng: Any = None  # RNG states to put back once the resumed run reaches the saved point
        self._rng_at_epoch = False
        self._processor: tuple[Any, dict[str, bytes]] | None = None  # (processing_class, its files)

    def resume_from(self, name: str = "latest") -> str | None:
        """A local folder to pass as ``trainer.train(resume_from_checkpoint=...)``; None if the root is empty.

        A local root gives the checkpoint folder itself, once every file of it passed its sha256
        check (the Trainer reads the weights without one); a remote one is downloaded (sha256-checked)
        to a temporary folder first, removed again once training starts. The Trainer reads weights
        and ``trainer_state.json`` from it; this callback restores optimizer, scheduler and RNG.

        Raises:
            CorruptCheckpointError: a file of the checkpoint is missing or does not match its sha256.
        """
        info = self.manager.latest() if name == "latest" else self.manager.get(name)
        if info is None:
            self._hint_empty()
            return None
        local = self.manager.local_path(info.name)
        if local is not None and not info.compressed:
            problems = self.manager.verify(info.name)[0].problems
            if problems:
                raise CorruptCheckpointError(f"cannot resume from {info.name!r} in {self.manager.root}: "
                                             f"{'; '.join(problems)}; resume from another checkpoint")
            folder, reader = local, self.manager
        else:
            # The Trainer reads the weights itself: compressed ones are decoded into the copy.
            folder = str(self.manager.download(info.name, Path(tempfile.mkdtemp(prefix="ckpt-resume-")) / info.name,
                                               decompress=True))
            reader = CheckpointManager(str(Path(folder).parent), writer=False)
        self._resume = (info.name, folder, reader)
        return folder

    def _hint_empty(self) -> None:
        """Training starts from scratch: say so when the root looks like something to import first."""
        from ._hints import empty_root_hint
        from ._storage import Storage

        try:
            hint = empty_root_hint(Storage(self.manager.root, self._storage_options))
        except CheckpointError:
            return
        if hint is not None:
            logger.warning("no checkpoint to resume from in %s, training starts from scratch: %s",
                           self.manager.root, hint)

    # --- Trainer events -------------------------------------------------------------------------

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.save_strategy == "best":
            raise InvalidArgumentError(
                "CheckpointCallback cannot follow save_strategy='best': the Trainer decides it after every "
                "callback has run and would write its own checkpoint; use save_strategy='steps' or 'epoch' "
                "(the best checkpoint is kept and tagged 'best' anyway)"
            )

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self._writer_given:  # the Trainer's rank, known even if torch.distributed started late
            self.manager.writer = args.process_index == 0
        self.manager.check_writable()
        self._due = False
        self.trigger.reset()
        self._stopping, self._final_step, self._training = None, None, True
        self.interrupts.install()
        if state.global_step > 0:
            self._restore(state.global_step, kwargs.get("optimizer"), kwargs.get("lr_scheduler"))
        monitor = self.manager.monitor[0]
        if args.eval_strategy == "no" and (monitor in ("evalLoss", "eval_loss") or monitor.startswith("eval_")):
            self._warn_monitor("the Trainer never evaluates (eval_strategy='no')")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._schedule(state, control)
        self._interrupted(args, state, control, kwargs)

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._training:  # an evaluation during training: a long one must not hide a signal
            self._interrupted(args, state, control, kwargs, evaluating=True)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._rng is not None:
            restore_rng(self._rng)
            self._rng = None
        self._flush(args, state, control, kwargs)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._rng is not None and self._rng_at_epoch:  # resumed at an epoch boundary: before the shuffle
            restore_rng(self._rng)
            self._rng = None
        self._flush(args, state, control, kwargs)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not control.should_training_stop:  # else on_train_end writes this step as the final one
            self._flush(args, state, control, kwargs)
        self._schedule(state, control)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step
        self._check_monitor(state.log_history)  # the eval metrics are logged before on_evaluate
        metrics = _step_metrics(state.log_history, step)
        if not self._due and self.trigger.last_step == step:  # evaluated after this step's checkpoint was saved
            try:
                self.manager.update_metrics(step, eval_loss=metrics.get("eval_loss"), metrics=metrics)
            except CheckpointError as exc:  # storage trouble must not stop training
                logger.error("the evaluation at step %d was not recorded in %s: %s", step, default_name(step), exc)
            barrier()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._due = False
        step = state.global_step
        late = self.interrupts.check(look=False)  # a signal after the last step
        event = self._stopping or (late if late is not None and late.signum is not None else None)
        self._training = False
        if event is not None:
            if self._final_step != step:
                self._final(args, state, control, kwargs, event)
            if event.signum is not None:
                self.interrupts.watch.stop(event.signum)  # ends the process as the signal would have
        else:
            self._save(args, state, control, kwargs, "final", description=f"training ended at step {step}")
            if self.interrupts.watch.received is not None:  # it came during that save: stop as it would have
                self.interrupts.watch.stop(self.interrupts.watch.received)
        self.interrupts.restore()
        self._check_monitor(state.log_history)
        load_best = args.load_best_model_at_end if self.load_best_at_end is None else self.load_best_at_end
        if load_best:
            self._load_best(kwargs["model"])

    # --- helpers --------------------------------------------------------------------------------

    def _interrupted(self, args: Any, state: Any, control: Any, kwargs: dict[str, Any], *,
                     evaluating: bool = False) -> None:
        """Act on a signal or an outside request, agreed by every rank at this step boundary."""
        if self._stopping is not None:
            return
        event = self.interrupts.check(look=self.manager.writer)
        if event is None:
            return
        if not event.stop:
            self._serve(args, state, control, kwargs, event)  # a failure went to the requester and the log
            return
        self._due = False  # the final checkpoint covers it
        if not self._final(args, state, control, kwargs, event):
            return  # a failed stop request: the requester hears of it, training goes on
        self._stopping = event
        control.should_training_stop = True
        control.should_evaluate = control.should_save = False  # no evaluation in a grace period
        if evaluating and event.signum is not None:  # the evaluation may go on for long: stop now
            self._training = False
            self.interrupts.watch.stop(event.signum)

    def _final(self, args: Any, state: Any, control: Any, kwargs: dict[str, Any], event: Interruption) -> bool:
        """The final checkpoint of an interrupted run; False for a stop request that failed."""
        ok = self._serve(args, state, control, kwargs, event) or event.signum is not None
        if ok:
            self._final_step = state.global_step
        return ok

    def _serve(self, args: Any, state: Any, control: Any, kwargs: dict[str, Any], event: Interruption) -> bool:
        def save(type: str, name: str | None, description: str) -> CheckpointInfo | None:
            info = self._save(args, state, control, kwargs, type, name=name, description=description)
            return self.manager.wait() or info

        return self.interrupts.serve(event, state.global_step, writer=self.manager.writer, save=save)

    def _schedule(self, state: Any, control: Any) -> None:
        """Note a due save and stop the Trainer from writing its own checkpoint."""
        due = self.trigger.due(state.global_step, asked=bool(control.should_save))
        control.should_save = False
        self._due = self._due or due

    def _flush(self, args: Any, state: Any, control: Any, kwargs: dict[str, Any]) -> None:
        if not self._due:
            return
        self._due = False
        try:
            self._save(args, state, control, kwargs, "automatic")
        except CheckpointError as exc:  # a scheduled save may fail, whatever the storage did; training goes on
            logger.error("scheduled checkpoint %s (step %d) was not saved: %s", default_name(state.global_step),
                         state.global_step, exc)

    def _save(self, args: Any, state: Any, control: Any, kwargs: dict[str, Any], type: str, *,
              name: str | None = None, description: str | None = None) -> CheckpointInfo | None:
        step, info = state.global_step, None
        try:
            # The other ranks only wait for rank 0, unless the model is sharded (FSDP2, tensor parallel):
            # then every rank writes its own shards.
            if self.manager.writer or is_sharded(unwrap_model(kwargs["model"]).state_dict()):
                info = self.manager.save(**self._payload(args, state, control, kwargs), step=step, type=type,
                                         name=name, description=description)
                if type == "final":
                    self.manager.close()  # a background save is committed too
        finally:
            barrier()  # no rank goes on (or reads) before the checkpoint is committed
        self.trigger.saved(step)
        return info

    def _payload(self, args: Any, state: Any, control: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        """What `CheckpointManager.save` gets for the Trainer's current step, besides step and type.

        The manager lays the model out (HF folder, or a peft adapter folder) and proves whether
        it loads as it is; the callback adds the tokenizer and the Trainer's own state.
        """
        model = unwrap_model(kwargs["model"])
        # transformers < 4.46 hands the tokenizer to callbacks as ``tokenizer``, later as ``processing_class``.
        processor = kwargs.get("processing_class") or kwargs.get("tokenizer")
        files = self._processor_files(processor) if is_hf_model(model) or is_peft_model(model) else {}
        trainer_state = dataclasses.asdict(state)
        trainer_state["stateful_callbacks"] = {**(trainer_state.get("stateful_callbacks") or {}),
                                               "TrainerControl": control.state()}
        files[TRAINER_STATE_FILE] = (dumps_strict(trainer_state, indent=2, sort_keys=True) + "\n").encode()
        metrics = _step_metrics(state.log_history, state.global_step)
        payload = dict(
            state=model, epoch=state.epoch, metrics=metrics,
            train_loss=_nearest_loss(state.log_history, state.global_step), eval_loss=metrics.get("eval_loss"),
            files=files, rng=not args.save_only_model, stateful=self.stateful,
        )
        if not args.save_only_model:
            payload.update(optimizer=kwargs.get("optimizer"), scheduler=kwargs.get("lr_scheduler"))
        return payload

    def _processor_files(self, processing_class: Any) -> dict[str, bytes]:
        """The processing_class's files (tokenizer, processor), read once: it does not change during training."""
        if processing_class is None:
            return {}
        if self._processor is None or self._processor[0] is not processing_class:
            with tempfile.TemporaryDirectory(prefix="ckpt-hf-") as tmp:
                processing_class.save_pretrained(tmp)
                self._processor = (processing_class, read_folder(tmp))
        return dict(self._processor[1])

    def _restore(self, step: int, optimizer: Any, scheduler: Any) -> None:
        """The Trainer restored weights and trainer state; put back optimizer, scheduler and (later) RNG."""
        name, folder, reader = self._resume or ("", "", self.manager)
        self._resume = None
        info = reader.get(name) if name else None
        if info is None or info.step != step:  # resumed from a path given by hand: our checkpoint of that step
            info = next((i for i in self.manager.list(sort_by="createdAt").data if i.step == step), None) \
                if self.manager.latest() is not None else None
            reader = self.manager
        try:
            training = reader.load_training_state(info.name) if info is not None else None
        except CheckpointNotFoundError:
            training = None
        if info is None or training is None:
            logger.warning("resumed at step %d, but %s has no training state of that step (save_only_model?): "
                           "optimizer, scheduler and RNG start afresh", step, self.manager.root)
            return
        TrainingStateValues(training).apply(optimizer=optimizer, scheduler=scheduler, rng=False, stateful=self.stateful)
        self._rng = training.get("rng")
        self._rng_at_epoch = info.epoch is not None and float(info.epoch).is_integer()
        self.manager.resumed(info)  # retention keeps it; new checkpoints continue its run id
        self.trigger.reset(step)
        if reader is not self.manager:  # a downloaded copy of a remote checkpoint: fully read by now
            shutil.rmtree(Path(folder).parent, ignore_errors=True)
        logger.info("resumed from %s (step %d)", info.name, step)

    def _load_best(self, model: Any) -> None:
        best = self.manager.best()
        if best is None:
            logger.warning("no best checkpoint in %s (monitor %r never appeared); the model keeps its last weights",
                           self.manager.root, self.manager.monitor[0])
            return
        module = unwrap_model(model)
        if is_sharded(module.state_dict()) or is_peft_model(module):  # own shards; or the adapter, by peft
            self.manager.restore(best.name, model=module, rng=False)
            logger.info("loaded the best checkpoint %s (step %d) into the model", best.name, best.step)
            return
        state = self.manager.load(best.name)
        result = module.load_state_dict(state, strict=False)
        live = module.state_dict()
        loaded = {live[k].data_ptr() for k in state if k in live}
        missing = [k for k in result.missing_keys if live[k].data_ptr() not in loaded]  # tied ones are loaded
        if missing or result.unexpected_keys:
            raise CorruptCheckpointError(
                f"best checkpoint {best.name!r} does not fit the model (missing {missing[:3]}, unexpected "
                f"{result.unexpected_keys[:3]})"
            )
        logger.info("loaded the best checkpoint %s (step %d) into the model", best.name, best.step)

    def _check_monitor(self, log_history: list[dict[str, Any]]) -> None:
        """Warn if nothing the Trainer logged so far gives the monitored value."""
        seen: dict[str, Any] = {}
        for entry in log_history:
            seen.update(entry)
        probe = CheckpointInfo(name="probe", step=0, epoch=seen.get("epoch"), train_loss=seen.get("loss"),
                               eval_loss=seen.get("eval_loss"), metrics=clean_metrics(seen))
        if probe.metric(self.manager.monitor[0]) is None:
            self._warn_monitor(f"the Trainer's metrics are {', '.join(sorted(probe.metrics))}")

    def _warn_monitor(self, why: str) -> None:
        self.manager.warn_missing_monitor(why)  # once per manager, naming what the Trainer produces

def _step_metrics(log_history: list[dict[str, Any]], step: int) -> dict[str, float]:
    """Every numeric value the Trainer logged at ``step`` (train log, eval metrics), by its own name."""
    merged: dict[str, Any] = {}
    for entry in log_history:
        if entry.get("step") == step:
            merged.update({k: v for k, v in entry.items() if k not in ("step", "epoch")})
    return clean_metrics(merged)


def _nearest_loss(log_history: list[dict[str, Any]], step: int) -> float | None:
    """The train loss logged nearest ``step`` (the earlier one on a tie)."""
    logged = [e for e in log_history if "loss" in e and "step" in e]
    if not logged:
        return None
    return float(min(logged, key=lambda e: (abs(e["step"] - step), e["step"]))["loss"])
