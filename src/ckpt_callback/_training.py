"""What a training run is made of, turned into plain data: model tensors, RNG states, descriptions."""

from __future__ import annotations

import random
import sys
from collections.abc import Mapping
from typing import Any

import torch

from ._errors import InvalidArgumentError

__all__ = ["capture_rng", "describe_model", "model_state", "restore_rng"]


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
