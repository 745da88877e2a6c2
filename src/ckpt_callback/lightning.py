"""`LightningCheckpoint`: the PyTorch Lightning adapter over `CheckpointManager`.

Lightning builds the checkpoint (``trainer.save_checkpoint``: weights, loop progress, optimizers,
LR schedulers, callbacks', the datamodule's and the LightningModule's ``on_save_checkpoint``
state); a `CheckpointIO` plugin that this callback installs on the strategy stores it as ours:
the weights in ``model.safetensors``, everything else as JSON + tensors in the training state (no
pickle), with RNG states and ``stateful`` objects beside. ``trainer.fit(ckpt_path=...)`` reads it
back through the same plugin, so Lightning restores every piece as from its own ``.ckpt`` file.

Example:
    >>> cb = LightningCheckpoint("memory://doc-lightning", every_n_steps=100, monitor="val_loss")
    >>> # trainer = L.Trainer(callbacks=[cb], enable_checkpointing=False)
    >>> # trainer.fit(model, ckpt_path=cb.resume_from())     # None on a fresh root
    >>> cb.resume_from() is None
    True
"""

from __future__ import annotations

import copy
import logging
import os
import signal
from collections.abc import Mapping, Sequence
from typing import Any

try:  # the unified package first, the standalone one otherwise
    from lightning.pytorch import Callback
    from lightning.pytorch.plugins.io import CheckpointIO
except ImportError:  # pragma: no cover - only pytorch_lightning installed
    from pytorch_lightning import Callback  # type: ignore[assignment]
    from pytorch_lightning.plugins.io import CheckpointIO  # type: ignore[assignment]

from ._errors import InvalidArgumentError, SaveError, StorageError
from ._layout import default_name
from ._manager import CheckpointManager
from ._sidecar import CheckpointInfo, clean_metrics
from ._training import TrainingStateValues, check_stateful, restore_rng
from ._trigger import SaveTrigger

__all__ = ["LightningCheckpoint"]

logger = logging.getLogger("ckpt_callback")


class LightningCheckpoint(Callback):
    """Checkpoints for `lightning.Trainer`: our safetensors + sidecar layout, exact resume.

    Pass it with ``enable_checkpointing=False`` (Lightning's own ``ModelCheckpoint`` would write
    pickled ``.ckpt`` files besides) and resume with ``trainer.fit(model, ckpt_path=cb.resume_from())``.

    Args:
        root: a local folder or an fsspec URL.
        every_n_steps: save every N optimizer steps (after that step's validation, if one runs).
        every_n_epochs: save at the end of every N-th epoch (default 1 when no schedule is given).
        every_n_seconds: and/or every N seconds of wall time (decided by rank 0).
        stateful: name → object with ``state_dict()``/``load_state_dict()`` saved and restored too
            (Lightning already saves resumable dataloaders, the datamodule and stateful callbacks).
        save_on_signals: ``(signal.SIGTERM,)`` (default) or ``()``. On SIGTERM Lightning stops the run
            at the next step boundary (its SignalConnector, on every rank); a ``final`` checkpoint
            described ``stopped by SIGTERM at step N`` is saved there first. Only SIGTERM: Ctrl-C
            interrupts Lightning mid-step, and SIGUSR1 is its SLURM requeue signal.
        **manager_options: `CheckpointManager` options: keep_last, keep_best, monitor (any logged
            metric, e.g. ``val_loss``), mode, storage_options, async_save, on_commit, ...

    Raises:
        InvalidArgumentError: a state Lightning hands over holds something that cannot be stored
            without pickle (named), at the first save.
    """

    def __init__(self, root: str, *, every_n_steps: int | None = None, every_n_epochs: int | None = None,
                 every_n_seconds: float | None = None, stateful: Mapping[str, Any] | None = None,
                 save_on_signals: Sequence[int] = (signal.SIGTERM,), **manager_options: Any) -> None:
        if "check_requests_every" in manager_options:
            raise InvalidArgumentError("LightningCheckpoint does not take check_requests_every yet (`ckpt request` "
                                       "is served by CheckpointHook and CheckpointCallback)")
        if isinstance(save_on_signals, int) or not all(s == signal.SIGTERM for s in save_on_signals):
            raise InvalidArgumentError(
                f"LightningCheckpoint saves on SIGTERM only (save_on_signals=(signal.SIGTERM,) or ()), got "
                f"{save_on_signals!r}: Lightning stops a run at the next step boundary on SIGTERM, where the state "
                "is whole, while Ctrl-C interrupts it mid-step and SIGUSR1 is its SLURM requeue signal")
        if every_n_epochs is not None and (not isinstance(every_n_epochs, int) or every_n_epochs < 1):
            raise InvalidArgumentError(f"every_n_epochs must be a positive integer, got {every_n_epochs!r}")
        self.manager = CheckpointManager(root, **manager_options)
        self.trigger = SaveTrigger(every_n_steps, every_n_seconds)
        self.every_n_epochs = every_n_epochs if every_n_epochs or self.trigger.scheduled else 1
        self.stateful = check_stateful(stateful or {})
        self.save_on_sigterm = bool(save_on_signals)
        self._writer_given = "writer" in manager_options
        self._deferred = False  # a save due at this step waits for the validation that follows it
        self._pending: tuple[str, str | None, bool] | None = None  # (type, description, at epoch end) of a save
        self._rng: Any = None  # RNG states to put back when the resumed run starts training
        self._rng_at_epoch = False
        self._loader_states: list[Any] = []  # the resumed train loaders' states, for `_iterate_at_the_saved_epoch`
        self._trainer: Any = None

    # --- resuming -------------------------------------------------------------------------------

    def resume_from(self, name: str = "latest") -> str | None:
        """What to pass as ``trainer.fit(ckpt_path=...)``: checkpoint ``name``'s location, None on an empty root."""
        info = self.manager.latest() if name == "latest" else self.manager.get(name)
        return None if info is None else _join(self.manager.root, info.name)

    def _owns(self, path: Any) -> str | None:
        """The checkpoint name if ``path`` is a checkpoint folder under our root, else None."""
        parent, _, name = str(path).rstrip("/").rpartition("/")
        return name if name and _same_place(parent, self.manager.root) else None

    def _read(self, name: str) -> dict[str, Any]:
        """Lightning's checkpoint dict, rebuilt from our checkpoint ``name`` (sha256-checked)."""
        info = self.manager.get(name)
        training = TrainingStateValues(self.manager.load_training_state(info.name))
        saved = (training.values.get("extra") or {}).get("lightning")
        if not isinstance(saved, dict):
            raise InvalidArgumentError(f"checkpoint {info.name!r} in {self.manager.root} was not saved by "
                                       "LightningCheckpoint (no Lightning state); load its weights with "
                                       "CheckpointManager.load() instead")
        training.apply(rng=False, stateful=self.stateful)
        # Put back once training starts: mid-epoch after the resumed loader made its iterator, else
        # at the next epoch's start, before its shuffle (as in the run that saved it).
        self._rng = training.values.get("rng")
        self._rng_at_epoch = bool(saved.get("_ckpt_at_epoch_end", False))
        self._loader_states = _loader_states(saved)
        self.manager.resumed(info)
        self.trigger.reset(info.step)
        logger.info("resuming from %s (step %d)", info.name, info.step)
        checkpoint = {k: v for k, v in saved.items() if k != "_ckpt_at_epoch_end"}
        checkpoint["state_dict"] = self.manager.load(info.name)
        return checkpoint

    # --- Trainer events -------------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._trainer = trainer
        if not self._writer_given:
            self.manager.writer = bool(trainer.is_global_zero)
        io = trainer.strategy.checkpoint_io
        if not isinstance(io, _CheckpointIO) or io.owner is not self:
            trainer.strategy.checkpoint_io = _CheckpointIO(self, io)
        if stage == "fit":
            self.manager.check_writable()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._rng is not None and not self._rng_at_epoch:
            _iterate_at_the_saved_epoch(trainer, self._loader_states)
            restore_rng(self._rng)
            self._rng = None
        self._loader_states = []

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self._rng is not None:
            restore_rng(self._rng)
            self._rng = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.trigger.due(trainer.global_step):
            return
        if _validates_now(trainer):
            self._deferred = True  # its metrics, and the RNG after it, belong in the checkpoint
        else:
            self._save(trainer, "automatic", at_epoch_end=_last_batch(trainer))

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        step = trainer.global_step
        if self._deferred:
            self._deferred = False
            self._save(trainer, "automatic", at_epoch_end=_last_batch(trainer))
        elif self.trigger.last_step == step:  # validated after this step's checkpoint: record its metrics
            try:
                self.manager.update_metrics(step, **self._metrics(trainer))
            except (SaveError, StorageError) as exc:
                logger.error("the validation at step %d was not recorded in %s: %s", step, default_name(step), exc)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0 \
                and self.trigger.last_step != trainer.global_step:
            self._save(trainer, "automatic", at_epoch_end=True)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        step = trainer.global_step
        try:
            self._save(trainer, "final", description=f"training ended at step {step}",
                       at_epoch_end=_last_batch(trainer), scheduled=False)
        finally:
            self.manager.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        try:
            if self.save_on_sigterm and type(exception).__name__ == "SIGTERMException" and trainer.state.fn == "fit":
                self._save_on_sigterm(trainer)
        finally:
            self.manager.close()

    def _save_on_sigterm(self, trainer: Any) -> None:
        """Lightning raises SIGTERMException at the step boundary after a SIGTERM, on every rank: save there."""
        step = trainer.global_step
        logger.warning("SIGTERM: saving a final checkpoint at step %d before Lightning stops the run", step)
        try:
            self._save(trainer, "final", description=f"stopped by SIGTERM at step {step}",
                       at_epoch_end=_last_batch(trainer), scheduled=False)
        except (SaveError, StorageError) as exc:  # the run stops anyway: say so, let Lightning's exception through
            logger.error("SIGTERM: the final checkpoint at step %d was not saved: %s", step, exc)

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.trigger.last_step}

    # --- helpers --------------------------------------------------------------------------------

    def _save(self, trainer: Any, type: str, *, at_epoch_end: bool, description: str | None = None,
              scheduled: bool = True) -> None:
        step = trainer.global_step
        self._pending = (type, description, at_epoch_end)
        try:
            trainer.save_checkpoint(_join(self.manager.root, default_name(step)))  # every rank: Lightning's contract
        except (SaveError, StorageError) as exc:
            if not scheduled:
                raise
            logger.error("scheduled checkpoint %s (step %d) was not saved: %s", default_name(step), step, exc)
            return
        finally:
            self._pending = None
        self.trigger.saved(step)

    def _write(self, checkpoint: dict[str, Any]) -> CheckpointInfo | None:
        """Store the dict ``trainer.save_checkpoint`` built (called on the writing rank)."""
        assert self._pending is not None
        type, description, at_epoch_end = self._pending
        trainer = self._trainer
        rest = {k: v for k, v in checkpoint.items() if k != "state_dict"}
        rest["_ckpt_at_epoch_end"] = at_epoch_end
        module = trainer.lightning_module
        try:
            return self.manager.save(checkpoint["state_dict"], step=trainer.global_step, epoch=_epoch(trainer),
                                     type=type, description=description, extra_state={"lightning": rest},
                                     stateful=self.stateful, rng=True, model_name=module.__class__.__name__,
                                     **self._metrics(trainer))
        except InvalidArgumentError as exc:
            if "extra.lightning." not in str(exc):
                raise
            key = str(exc).split("extra.lightning.", 1)[1].split(" ", 1)[0]
            raise InvalidArgumentError(
                f"{str(exc).split(' (in ')[0]}: Lightning's checkpoint entry {key!r} (put there by an "
                "on_save_checkpoint hook, hyper_parameters or a callback's state_dict) must hold only tensors, "
                "numbers, strings, lists and dicts; convert it or leave it out") from exc

    def _metrics(self, trainer: Any) -> dict[str, Any]:
        """What Lightning logged (``self.log``), by its own names; train/val loss for the sidecar's columns."""
        logged = {k: v.item() if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1 else v
                  for k, v in trainer.callback_metrics.items()}
        metrics = clean_metrics(logged)
        train = next((metrics[k] for k in ("train_loss", "loss", "train_loss_step") if k in metrics), None)
        return {"metrics": metrics, "train_loss": train, "eval_loss": metrics.get("val_loss")}


class _CheckpointIO(CheckpointIO):
    """Routes Lightning's checkpoint reads and writes for our root to `LightningCheckpoint`; others to ``inner``."""

    def __init__(self, owner: LightningCheckpoint, inner: Any) -> None:
        self.owner, self.inner = owner, inner

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if self.owner._pending is None:  # someone else's trainer.save_checkpoint("x.ckpt")
            return self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
        self.owner._write(checkpoint)
        return None

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        name = self.owner._owns(path)
        if name is None:
            return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return self.owner._read(name)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


def _loader_states(saved: dict[str, Any]) -> list[Any]:
    """The train loaders' states in Lightning's checkpoint dict (its fit loop keeps them), else []."""
    try:
        states = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    except (KeyError, TypeError):
        return []
    return copy.deepcopy(list(states)) if isinstance(states, list | tuple) else []  # Lightning consumes its own


def _iterate_at_the_saved_epoch(trainer: Any, states: list[Any]) -> None:
    """Make a resumed train iterator again once its sampler knows the epoch, when it did not.

    Lightning (2.6, ``FitLoop.setup_data``) loads the loaders' states and makes the iterator before
    ``on_advance_start`` calls the samplers' ``set_epoch``: under DDP a ``DistributedSampler`` resumed
    mid-way through epoch 2 or later then replays epoch 0's order. Here (``on_train_start``, called
    right after) the epoch is set, the states loaded again and the iterator made again, as it would
    have been with the epoch known. Private attributes: if Lightning moves them, nothing is done.
    """
    fit_loop = trainer.fit_loop
    combined, fetcher = getattr(fit_loop, "_combined_loader", None), getattr(fit_loop, "_data_fetcher", None)
    if not states or combined is None or fetcher is None:
        return
    epoch = fit_loop.epoch_progress.current.processed
    samplers: list[Any] = [s for dl in combined.flattened
                for s in (getattr(dl, "sampler", None), getattr(getattr(dl, "batch_sampler", None), "sampler", None))
                if callable(getattr(s, "set_epoch", None)) and isinstance(getattr(s, "epoch", None), int)]
    if all(s.epoch == epoch for s in samplers):
        return
    for sampler in samplers:
        sampler.set_epoch(epoch)
    combined._load_state_dicts(states)
    iter(fetcher)


def _validates_now(trainer: Any) -> bool:
    """Whether validation runs right after this training batch (then the save waits for it)."""
    loop = trainer.fit_loop.epoch_loop
    try:  # Lightning's own decision (private: if it moves, save at once, which is only less exact)
        return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
    except Exception:
        return False


def _last_batch(trainer: Any) -> bool:
    """Whether the epoch's last batch is done (a resume then starts a new epoch, with a new shuffle)."""
    return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


def _epoch(trainer: Any) -> float:
    """Epochs done, with the fraction of the current one (the sidecar's ``epoch``)."""
    before = max(trainer.fit_loop.epoch_progress.current.started - 1, 0)  # epochs before the current (or last) one
    total = trainer.num_training_batches
    done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    if not isinstance(total, int) or total <= 0:
        return float(before)
    return before + min(done, total) / total


def _join(root: str, name: str) -> str:
    return os.path.join(root, name) if "://" not in root else f"{root.rstrip('/')}/{name}"


def _same_place(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.abspath(os.path.expanduser(a)) == os.path.abspath(os.path.expanduser(b))
