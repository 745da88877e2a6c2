"""What happens after a commit: the ``on_commit`` callables, and links to experiment trackers.

`WandbLink` and `MlflowLink` record a *reference* to each committed checkpoint in the run a user
already looks at (its URL, step, type, sidecar metrics); the bytes stay where they are. Both import
their library only when called, so ``import ckpt_callback`` needs neither.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from ._errors import InvalidArgumentError
from ._sidecar import CheckpointInfo

__all__ = ["MlflowLink", "WandbLink", "check_callables", "checkpoint_url", "notify"]

logger = logging.getLogger("ckpt_callback")


def check_callables(value: Any, what: str) -> tuple[Callable[[CheckpointInfo], Any], ...]:
    """``value`` (one callable or a sequence of them) as a tuple.

    Raises:
        InvalidArgumentError: something in it is not callable.
    """
    items = (value,) if callable(value) else tuple(value or ())
    for item in items:
        if not callable(item):
            raise InvalidArgumentError(f"{what} takes callables given a CheckpointInfo, got {item!r}")
    return items


def notify(callables: Sequence[Callable[[CheckpointInfo], Any]], info: CheckpointInfo) -> None:
    """Call each of ``callables`` with ``info``; one that raises is logged, the others still run."""
    for callback in callables:
        try:
            callback(info)
        except Exception as exc:  # a tracker's trouble must never stop training or the other callables
            logger.error("on_commit callable %s failed for %s: %s: %s", _name(callback), info.name,
                         type(exc).__name__, exc)


def checkpoint_url(root: str, name: str) -> str:
    """The URL of checkpoint ``name`` under ``root``: ``file:///abs/...`` for local roots, else ``scheme://...``."""
    if "://" in root and not root.startswith("file://"):
        return f"{root.rstrip('/')}/{name}"
    path = root[len("file://"):] if root.startswith("file://") else root
    return "file://" + os.path.join(os.path.abspath(os.path.expanduser(path)), name)


def _summary(info: CheckpointInfo, url: str) -> dict[str, Any]:
    """The part of the sidecar a tracker shows, with the checkpoint's URL."""
    return {"url": url, "name": info.name, "id": info.id, "type": info.type, "step": info.step,
            "epoch": info.epoch, "trainLoss": info.train_loss, "evalLoss": info.eval_loss,
            "metrics": dict(info.metrics), "size": info.size, "runId": info.run_id,
            "description": info.description, "createdAt": info.created_at}


class _Link:
    """What both links share: the root they are bound to (by the manager) and each checkpoint's URL."""

    def __init__(self) -> None:
        self.root: str | None = None

    def bind(self, root: str) -> None:
        """Called by `CheckpointManager` with its root, so each checkpoint's URL is known."""
        self.root = root

    def url(self, info: CheckpointInfo) -> str:
        if self.root is None:
            raise InvalidArgumentError(f"{type(self).__name__} is not bound to a root: pass it as on_commit= "
                                       "to a CheckpointManager, CheckpointHook or callback")
        return checkpoint_url(self.root, info.name)

    def aliases(self, info: CheckpointInfo) -> list[str]:
        """The checkpoint's name, ``latest``, and its type when it is ``best`` or ``final``."""
        return [info.name, "latest", *([info.type] if info.type in ("best", "final") else [])]


class WandbLink(_Link):
    """Logs each committed checkpoint to the active W&B run as a reference artifact (no upload).

    Each commit becomes a new version of one artifact (``checkpoints-<run id>`` by default, type
    ``model``) whose single entry references the checkpoint folder's URL (``checksum=False``: W&B
    neither reads nor uploads the files), with the sidecar summary as metadata and the aliases
    ``<name>``, ``latest``, and ``best``/``final`` for such checkpoints (W&B moves an alias to the
    newest version that claims it).

    Args:
        run: the ``wandb`` run to log to (default: ``wandb.run`` at each commit).
        artifact: the artifact's name (default ``checkpoints-<run id>``).
        type: the artifact's type.

    Example:
        >>> link = WandbLink()
        >>> # CheckpointHook(root, model, on_commit=[link]) inside `with wandb.init(...):`
    """

    def __init__(self, *, run: Any = None, artifact: str | None = None, type: str = "model") -> None:
        super().__init__()
        self.run, self.artifact, self.type = run, artifact, type
        self._warned = False

    def __call__(self, info: CheckpointInfo) -> Any:
        import wandb

        run = self.run if self.run is not None else wandb.run
        if run is None:
            if not self._warned:
                self._warned = True
                logger.warning("WandbLink: no active wandb run (call wandb.init first); %s is not linked", info.name)
            return None
        url = self.url(info)
        name = self.artifact or f"checkpoints-{run.id}"
        artifact = wandb.Artifact(re.sub(r"[^\w.-]", "-", name), type=self.type,
                                  description=info.description, metadata=_summary(info, url))
        artifact.add_reference(url, name=info.name, checksum=False)
        return run.log_artifact(artifact, aliases=self.aliases(info))


class MlflowLink(_Link):
    """Records each committed checkpoint in an MLflow run: a small JSON document and tags (no upload).

    For each commit: ``checkpoints/<name>.json`` (the sidecar summary with the URL, via
    ``log_dict``) and the tags ``ckpt.latest``, and ``ckpt.best`` / ``ckpt.final`` when the
    checkpoint is that type, each set to its URL (the tags move with each new one).

    Args:
        run_id: the run to record in (default: the active run at each commit, else the last active one;
            the active run is per thread in MLflow, and background saves commit on another thread).
        tracking_uri: the tracking server or store (default: MLflow's own default).

    Example:
        >>> link = MlflowLink()
        >>> # CheckpointHook(root, model, on_commit=[link]) inside `with mlflow.start_run():`
    """

    def __init__(self, *, run_id: str | None = None, tracking_uri: str | None = None) -> None:
        super().__init__()
        self.run_id, self.tracking_uri = run_id, tracking_uri
        self._bound_run: str | None = None
        self._warned = False

    def bind(self, root: str) -> None:
        super().bind(root)
        if self.run_id is None:  # the active run is the creating thread's: note it while on that thread
            import sys

            mlflow = sys.modules.get("mlflow")
            active = mlflow.active_run() if mlflow is not None else None
            self._bound_run = active.info.run_id if active is not None else None

    def __call__(self, info: CheckpointInfo) -> None:
        import mlflow

        active = mlflow.active_run()
        run_id = self.run_id or (active.info.run_id if active is not None else None) or self._bound_run \
            or _running_elsewhere(mlflow)
        if run_id is None:
            if not self._warned:
                self._warned = True
                logger.warning("MlflowLink: no active MLflow run (call mlflow.start_run first); %s is not linked",
                               info.name)
            return
        client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        url = self.url(info)
        client.log_dict(run_id, _summary(info, url), f"checkpoints/{info.name}.json")
        for alias in self.aliases(info)[1:]:
            client.set_tag(run_id, f"ckpt.{alias}", url)


def _running_elsewhere(mlflow: Any) -> str | None:
    """The run another thread started (a background save commits off the training thread), if still running."""
    try:
        last = mlflow.last_active_run()
    except Exception:  # it looks the run up in the store, where it may not be
        return None
    return last.info.run_id if last is not None and last.info.status == "RUNNING" else None


def _name(callback: Any) -> str:
    return getattr(callback, "__qualname__", None) or type(callback).__name__
