"""What a training run is made of, turned into plain data and back.

`TrainingState` owns the optimizer, scheduler, RNG and extra state of a checkpoint: capture
from live objects, the files it becomes (``optimizer.safetensors`` + ``training_state.json``),
parsing those files, and applying the result back. Model helpers (state dicts, unwrapping,
descriptions) live here too.
"""

from __future__ import annotations

import json
import logging
import random
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ._errors import CorruptCheckpointError, InvalidArgumentError
from ._layout import TRAINING_STATE_FILE
from ._serialization import flatten_state, unflatten_state

__all__ = ["TrainingState", "TrainingStateValues", "capture_rng", "check_stateful", "describe_model", "model_state",
           "restore_rng", "unwrap_model"]

_FORMAT = "ckpt_callback.training_state/1"

logger = logging.getLogger("ckpt_callback")


@dataclass
class TrainingState:
    """Optimizer, scheduler, RNG and extra state as a JSON skeleton plus a flat tensor dict.

    Example:
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> state = TrainingState.capture(optimizer=opt, rng=False)
        >>> doc, tensors = state.to_files(step=3, epoch=None)
        >>> sorted(TrainingState.from_files(doc, tensors).values)
        ['optimizer']
    """

    skeleton: Any
    tensors: dict[str, torch.Tensor]

    @classmethod
    def capture(
        cls,
        *,
        optimizer: Any = None,
        scheduler: Any = None,
        rng: bool = False,
        extra: Mapping[str, Any] | None = None,
        stateful: Mapping[str, Any] | None = None,
    ) -> TrainingState | None:
        """What is live now (nothing copied yet: `_writer` snapshots tensors for background saves).

        ``stateful``: name → object with ``state_dict()``/``load_state_dict()`` (a
        ``StatefulDataLoader``, a sampler, an EMA); its state is saved under its name.

        Raises:
            InvalidArgumentError: a state holds something JSON and safetensors cannot store (named).
        """
        payload: dict[str, Any] = {}
        if optimizer is not None:
            payload["optimizer"] = optimizer.state_dict()
        if scheduler is not None:
            payload["scheduler"] = scheduler.state_dict()
        if extra:
            payload["extra"] = dict(extra)
        if rng:
            payload["rng"] = capture_rng()
        if stateful:
            payload["stateful"] = {name: obj.state_dict() for name, obj in check_stateful(stateful).items()}
        if not payload:
            return None
        try:
            skeleton, tensors = flatten_state(payload)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"{exc} (in {_where(str(exc))})") from exc
        return cls(skeleton, tensors)

    def to_files(self, *, step: int, epoch: float | None) -> tuple[bytes, dict[str, torch.Tensor]]:
        """``training_state.json`` bytes (strict JSON) and the tensors of ``optimizer.safetensors``."""
        doc = {"format": _FORMAT, "step": step, "epoch": epoch, "state": self.skeleton}
        return (json.dumps(doc, allow_nan=False) + "\n").encode(), self.tensors

    @staticmethod
    def from_files(doc: bytes, tensors: Mapping[str, torch.Tensor], *, where: str = TRAINING_STATE_FILE
                   ) -> TrainingStateValues:
        """Parse what `to_files` wrote (``tensors`` from ``optimizer.safetensors``)."""
        try:
            parsed = json.loads(doc)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise CorruptCheckpointError(f"{where} is not valid JSON: {exc}") from exc
        if not isinstance(parsed, dict) or "state" not in parsed:
            raise CorruptCheckpointError(f"{where} is not a training state document")
        values = unflatten_state(parsed["state"], tensors, where=where)
        if not isinstance(values, dict):
            raise CorruptCheckpointError(f"{where} holds no training state object")
        return TrainingStateValues(values)


@dataclass
class TrainingStateValues:
    """A loaded training state: ``values`` holds optimizer, scheduler, rng, extra (those saved)."""

    values: dict[str, Any]

    def apply(self, *, optimizer: Any = None, scheduler: Any = None, rng: bool = True,
              stateful: Mapping[str, Any] | None = None) -> None:
        """Load the saved states into ``optimizer``/``scheduler``, the RNGs and the ``stateful`` objects.

        A ``stateful`` object the checkpoint has no state for keeps its own (with a warning):
        a checkpoint saved before it was added.
        """
        saved = self.values.get("stateful") or {}
        for name, obj in check_stateful(stateful or {}).items():
            if name not in saved:
                logger.warning("the checkpoint holds no state for stateful[%r] (saved: %s); it starts afresh",
                               name, ", ".join(sorted(saved)) or "none")
                continue
            try:
                obj.load_state_dict(saved[name])
            except (KeyError, ValueError, TypeError, IndexError, RuntimeError, AttributeError) as exc:
                raise CorruptCheckpointError(f"the saved state of stateful[{name!r}] does not fit "
                                             f"{type(obj).__name__}: {exc}") from exc
        try:
            if optimizer is not None and "optimizer" in self.values:
                optimizer.load_state_dict(self.values["optimizer"])
            if scheduler is not None and "scheduler" in self.values:
                scheduler.load_state_dict(self.values["scheduler"])
            if rng and "rng" in self.values:
                restore_rng(self.values["rng"])
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as exc:
            raise CorruptCheckpointError(f"the saved training state does not fit: {exc}") from exc


def check_stateful(stateful: Mapping[str, Any]) -> dict[str, Any]:
    """``stateful`` as a dict, once each name is a string and each object has both methods.

    Raises:
        InvalidArgumentError: not a mapping, a name that is not a non-empty string, or an object
            without ``state_dict``/``load_state_dict``.
    """
    if not isinstance(stateful, Mapping):
        raise InvalidArgumentError(f"stateful must be a dict of name -> object, got {type(stateful).__name__}")
    for name, obj in stateful.items():
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"stateful names must be non-empty strings, got {name!r}")
        if not callable(getattr(obj, "state_dict", None)) or not callable(getattr(obj, "load_state_dict", None)):
            raise InvalidArgumentError(
                f"stateful[{name!r}] is a {type(obj).__name__}, which has no state_dict()/load_state_dict(); "
                "pass objects that have both (torchdata's StatefulDataLoader, a sampler, an EMA)")
    return dict(stateful)


def _where(message: str) -> str:
    """Which part of the training state a `flatten_state` error's path names."""
    match = re.search(r" at (\S+) of the training state", message)
    parts = match.group(1).split(".") if match else []
    if parts[:1] == ["stateful"] and len(parts) > 1:
        return f"the state_dict() of stateful[{parts[1]!r}]"
    return f"the {parts[0]} state" if parts else "the training state"



def model_state(state: Any) -> dict[str, torch.Tensor]:
    """The name → tensor dict of a module or a state dict (as given, nothing copied)."""
    if isinstance(state, torch.nn.Module):
        return dict(state.state_dict())
    if isinstance(state, Mapping):
        return dict(state)
    raise InvalidArgumentError(
        f"save() takes a torch.nn.Module or a state dict (name -> tensor), got {type(state).__name__}"
    )


def unwrap_model(model: Any) -> Any:
    """The module inside DDP / FSDP / torch.compile wrappers, whose state dict has clean names."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def describe_model(state: Any) -> tuple[str | None, str]:
    """(model name, library version) for the sidecar: HF config name and transformers version, else torch's."""
    config = getattr(state, "config", None)
    name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
    if config is not None and "transformers" in sys.modules:
        # The running transformers, not config.transformers_version (whoever wrote a downloaded config).
        version = sys.modules["transformers"].__version__
        return (name or getattr(config, "model_type", None) or type(state).__name__), str(version)
    if isinstance(state, torch.nn.Module):
        return type(state).__name__, torch.__version__
    return None, torch.__version__


def capture_rng() -> dict[str, Any]:
    """Every RNG state a training loop draws from: python, numpy (if imported), torch CPU and CUDA."""
    states: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        states["numpy"] = numpy.random.get_state(legacy=False)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: Mapping[str, Any]) -> None:
    """Put back the RNG states of `capture_rng`."""
    if "python" in states:
        random.setstate(_as_tuple(states["python"]))
    if "torch" in states:
        torch.set_rng_state(states["torch"].to(torch.uint8))
    if "numpy" in states:
        import numpy

        numpy.random.set_state(states["numpy"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(states["cuda"]))


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value
