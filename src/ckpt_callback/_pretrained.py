"""What a HuggingFace or PEFT model becomes on storage, and the proof that it loads as it is.

`pretrained_payload` turns a live module into what a checkpoint holds: for a transformers
model, its weights as ``save_pretrained`` names them plus ``config.json`` and
``generation_config.json``; for a peft model, the adapter alone in peft's own layout
(``adapter_model.safetensors`` from `peft.get_peft_model_state_dict`, ``adapter_config.json``
from the adapter config's ``save_pretrained``), never the frozen base. Anything else is a plain
module: its state dict, and no claim that it loads anywhere.

``inferenceReady`` is proven here, never assumed (`prove`): the saved weight names and shapes
must be exactly what ``from_pretrained`` expects. For an HF folder the architecture named by
the saved ``config.json`` is built on the ``meta`` device (no memory, no weights) and its
state dict compared with what is written, taking tied weights and the model's
``_keys_to_ignore_on_load_missing/unexpected`` into account; for an adapter folder the adapter
described by the saved ``adapter_config.json`` is injected into a meta copy of the base, and
its adapter state dict compared the same way. Without transformers (or peft) nothing is proven
and the flag is false.

transformers and peft are never imported here unless the model at hand is one of theirs
(then they are imported already) or a saved config names an architecture.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_PREFIX",
    "ADAPTER_WEIGHTS",
    "MERGED_DIR",
    "Payload",
    "Proof",
    "SavePlan",
    "hf_state",
    "is_hf_model",
    "is_peft_model",
    "load_adapter_state",
    "merged_extras",
    "merged_payload",
    "plan_save",
    "pretrained_payload",
    "prove",
    "with_tied_aliases",
]

logger = logging.getLogger("ckpt_callback")

# peft's own file names (peft.utils.constants SAFETENSORS_WEIGHTS_NAME, CONFIG_NAME): fixed by its format,
# spelled here so that reading a checkpoint never needs peft.
ADAPTER_PREFIX = "adapter_model"
ADAPTER_WEIGHTS = ADAPTER_PREFIX + ".safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MERGED_DIR = "merged"  # the merged full model of an adapter checkpoint, an HF folder of its own
CONFIG = "config.json"


@dataclass
class Payload:
    """What a checkpoint of one model holds besides training state.

    ``state`` goes to ``{prefix}.safetensors`` (or shards of it); ``files`` are small files
    (relative path → bytes). ``adapter`` describes a peft adapter (`Adapter` fields: type, base_model),
    None for a full model; ``proof`` (adapters only: they are proven against the live base) says
    whether the folder loads as it is.
    """

    state: dict[str, torch.Tensor]
    files: dict[str, bytes] = field(default_factory=dict)
    prefix: str = "model"
    adapter: dict[str, Any] | None = None
    proof: Proof | None = None


@dataclass(frozen=True)
class Proof:
    """Whether a folder loads with ``from_pretrained`` exactly as saved; ``why`` not when it does not."""

    ok: bool
    why: str = ""

    def __bool__(self) -> bool:
        return self.ok


def is_peft_model(module: Any) -> bool:
    """Whether ``module`` is a `peft.PeftModel` (checked without importing peft)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(module, peft.PeftModel)


def is_hf_model(module: Any) -> bool:
    """Whether ``module`` is a transformers `PreTrainedModel` (checked without importing transformers)."""
    modeling = sys.modules.get("transformers.modeling_utils")
    return modeling is not None and isinstance(module, modeling.PreTrainedModel)


def pretrained_payload(module: Any) -> Payload | None:
    """The payload of a peft or transformers model, None for anything else (a plain module, a state dict)."""
    if is_peft_model(module):
        return _adapter_payload(module)
    if is_hf_model(module):
        return Payload(state=with_tied_aliases(module, hf_state(module)), files=config_files(module))
    return None


def with_tied_aliases(model: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` plus, after it, the tied copies ``save_pretrained`` dropped (``lm_head.weight``): the writer
    stores each once under the kept name and records the alias, so `load` gives every name back while
    the file holds what ``save_pretrained`` writes."""
    from ._serialization import view_key

    kept = {view_key(t) for t in state.values() if t.numel()}
    out = dict(state)
    for key, tensor in model.state_dict().items():
        if key not in out and tensor.numel() and view_key(tensor) in kept:
            out[key] = tensor
    return out


@dataclass
class SavePlan:
    """What one save writes for its model: weights under ``prefix``, ``more_weights`` (prefix → state,
    the merged model), small ``files``, the sidecar's ``adapter`` fields, and the ``proof`` of
    ``inferenceReady``; ``claims`` is whether the folder looks like something ``from_pretrained`` reads."""

    model: dict[str, torch.Tensor]
    files: dict[str, bytes]
    proof: Proof
    prefix: str = "model"
    more_weights: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    adapter: dict[str, Any] | None = None
    claims: bool = False


def plan_save(module: Any, model: dict[str, torch.Tensor], files: Mapping[str, bytes], *, sharded: bool,
              merge: bool) -> SavePlan:
    """Plan the model part of a save of ``module`` (``model`` is its state dict, ``files`` the caller's).

    The caller's files win over what is derived (its own ``config.json``, say), and the proof is
    made against what is written. ``merge``: a peft model also gets its merged full model under ``merged/``.
    """
    payload = pretrained_payload(module) if not sharded else None
    if payload is None:
        extra = dict(files)
        if sharded and is_hf_model(module) and CONFIG not in extra:  # DTensor shards: consolidated ones load
            extra = {**config_files(module), **extra}
        proof = prove(extra, _shapes(_written(model, sharded)))
        return SavePlan(model=model, files=extra, proof=proof, claims=CONFIG in extra)
    extra = {**payload.files, **files}
    plan = SavePlan(model=payload.state, files=extra, proof=Proof(False), prefix=payload.prefix,
                    adapter=payload.adapter, claims=True)
    if payload.adapter is None:
        plan.proof = prove(extra, _shapes(_written(payload.state, False)))
        return plan
    plan.proof = payload.proof if ADAPTER_CONFIG not in files and payload.proof is not None else Proof(
        False, "adapter_config.json was given by the caller, not made from the live model")
    if merge:
        merged = merged_payload(module)
        plan.more_weights = {merged.prefix: merged.state}
        extra.update({f"{MERGED_DIR}/{rel}": data for rel, data in merged_extras(extra)})
        extra.update({f"{MERGED_DIR}/{rel}": data for rel, data in merged.files.items()})
        plan.adapter = {**payload.adapter, "merged": MERGED_DIR}
    return plan


def _written(model: dict[str, torch.Tensor], sharded: bool) -> dict[str, torch.Tensor]:
    """The tensors a save writes under their names (tied copies stored once; DTensors at their full shape)."""
    from ._errors import InvalidArgumentError
    from ._serialization import dedupe_tensors

    if sharded:
        return model
    try:
        return dedupe_tensors(model)[0]
    except InvalidArgumentError:  # the writer says what is wrong with the state
        return model


# --- full HF models ------------------------------------------------------------------------------


def hf_state(model: Any) -> dict[str, torch.Tensor]:
    """The state dict as ``save_pretrained`` writes it: ignored keys, tied aliases and renames dropped."""
    state = dict(model.state_dict())
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    try:
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:  # transformers 4: drop the tied copies the model lists, as its save_pretrained does
        return {k: v for k, v in state.items() if k not in (getattr(model, "_tied_weights_keys", None) or ())}
    return revert_weight_conversion(model, remove_tied_weights_from_state_dict(state, model))


def config_files(model: Any) -> dict[str, bytes]:
    """``config.json`` and ``generation_config.json`` as ``save_pretrained`` writes them."""
    with tempfile.TemporaryDirectory(prefix="ckpt-hf-") as tmp:
        config = copy.deepcopy(model.config)  # set what save_pretrained sets, on a copy
        config.architectures = [type(model).__name__]
        # the dtype's name: `dtype` since transformers 4.56, `torch_dtype` before
        setattr(config, "dtype" if "dtype" in vars(config) else "torch_dtype", str(model.dtype).split(".")[-1])
        if getattr(config, "_attn_implementation_autoset", False):  # transformers 4.46-4.47 (as save_pretrained)
            config._attn_implementation_autoset = False  # else from_pretrained keeps "eager", not the default
        config.save_pretrained(tmp)
        if model.can_generate() and getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        return read_folder(tmp)


def read_folder(folder: str) -> dict[str, bytes]:
    """Every file under ``folder`` (relative POSIX path → bytes)."""
    out = {}
    for dirpath, _, filenames in os.walk(folder):
        for filename in filenames:
            path = os.path.join(dirpath, filename)
            out[os.path.relpath(path, folder).replace(os.sep, "/")] = Path(path).read_bytes()
    return out


# --- peft adapters -------------------------------------------------------------------------------


def _adapter_payload(model: Any) -> Payload:
    """The adapters of a peft model, laid out as `PeftModel.save_pretrained` lays them out: the
    ``default`` adapter at the top, any other in a folder of its name (as extra files)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save as safetensors_bytes

    state: dict[str, torch.Tensor] = {}
    files: dict[str, bytes] = {}
    adapter: dict[str, Any] | None = None
    proof = Proof(False, "the peft model has no adapter named 'default' at the top of the folder")
    for name, config in model.peft_config.items():
        tensors = _unshared(get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers="auto"))
        prefix = "" if name == "default" else f"{name}/"
        doc = _adapter_config(model, config)
        files[prefix + ADAPTER_CONFIG] = doc
        if name == "default":
            state = tensors
            base = json.loads(doc).get("base_model_name_or_path")
            adapter = {"type": _peft_type(config), "base_model": base}
            proof = _prove_adapter(model, doc, _shapes(tensors))
        else:
            files[prefix + ADAPTER_WEIGHTS] = safetensors_bytes(
                {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    if adapter is None and model.peft_config:  # only named adapters: describe the active one
        config = model.peft_config[model.active_adapter]
        adapter = {"type": _peft_type(config), "base_model": config.base_model_name_or_path}
    return Payload(state=state, files=files, prefix=ADAPTER_PREFIX, adapter=adapter, proof=proof)


def _peft_type(config: Any) -> str:
    kind = getattr(config, "peft_type", None)
    return str(getattr(kind, "value", kind))


def _unshared(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Shared tensors cloned apart, as peft's save_pretrained does (it stores no aliases)."""
    seen: set[tuple[Any, ...]] = set()
    out = {}
    for key, tensor in state.items():
        ident = (tensor.device, tensor.untyped_storage().data_ptr())
        out[key] = tensor.clone() if ident in seen and tensor.numel() else tensor
        seen.add(ident)
    return out


def _adapter_config(model: Any, config: Any) -> bytes:
    """``adapter_config.json`` exactly as `PeftModel.save_pretrained` writes it (on a copy of the config)."""
    config = copy.copy(config)
    if config.base_model_name_or_path is None:
        owner = model.base_model if config.is_prompt_learning else model.base_model.model
        config.base_model_name_or_path = owner.__dict__.get("name_or_path", None) or None
    config.inference_mode = True
    auto_mapping = None
    if config.task_type is None:
        base_class = model._get_base_model_class(is_prompt_tuning=config.is_prompt_learning)
        auto_mapping = {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}
    with tempfile.TemporaryDirectory(prefix="ckpt-peft-") as tmp:
        config.save_pretrained(tmp, auto_mapping_dict=auto_mapping)
        return Path(tmp, ADAPTER_CONFIG).read_bytes()


def load_adapter_state(model: Any, state: Mapping[str, torch.Tensor], *, strict: bool = True,
                       where: str = "checkpoint") -> None:
    """Put a saved ``default`` adapter back into the live peft ``model`` (peft's ``set_peft_model_state_dict``).

    Raises:
        CorruptCheckpointError: with ``strict``, the saved adapter does not fit the model's.
    """
    from peft import set_peft_model_state_dict

    from ._errors import CorruptCheckpointError

    live = _shapes(_unshared(_peft_state(model)))
    saved = _shapes(state)
    if strict and live != saved:
        extra, missing = sorted(set(saved) - set(live)), sorted(set(live) - set(saved))
        shapes = [k for k in saved.keys() & live.keys() if saved[k] != live[k]]
        raise CorruptCheckpointError(
            f"{where}: the saved adapter does not fit the model's (unexpected {extra[:2]}, missing {missing[:2]}, "
            f"other shapes {shapes[:2]}); pass strict=False to load what matches")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    set_peft_model_state_dict(model, {k: v.to(device) for k, v in state.items()}, adapter_name="default")


def _peft_state(model: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return dict(get_peft_model_state_dict(model, adapter_name="default", save_embedding_layers="auto"))


def merged_payload(model: Any) -> Payload:
    """The full model with the adapter merged in (peft's ``merge_and_unload`` on a copy: the live
    model keeps its adapter), as an HF folder under ``merged/``."""
    merged = copy.deepcopy(model).merge_and_unload()
    state = with_tied_aliases(merged, hf_state(merged))
    files = config_files(merged)
    return Payload(state=state, files=files, prefix=f"{MERGED_DIR}/model", proof=prove(files, _shapes(state)))


_NOT_MERGED = {ADAPTER_CONFIG, ADAPTER_WEIGHTS, CONFIG, "generation_config.json", "README.md",
               "trainer_state.json", "training_state.json"}


def merged_extras(files: Mapping[str, bytes]) -> list[tuple[str, bytes]]:
    """The files of an adapter checkpoint that the merged folder needs too (tokenizer, processor)."""
    return [(rel, data) for rel, data in files.items() if "/" not in rel and rel not in _NOT_MERGED]


# --- the proof -----------------------------------------------------------------------------------


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def prove(files: Mapping[str, bytes], weights: Mapping[str, Iterable[int]]) -> Proof:
    """Whether a folder of ``files`` and weights (written name → shape) loads with ``from_pretrained``
    exactly: every weight the saved ``config.json``'s architecture expects is there with its shape,
    nothing else is. Adapter folders are proven when their payload is made (they need the base).
    """
    if ADAPTER_CONFIG in files:
        return Proof(False, "an adapter folder is proven against its live base model only")
    if CONFIG not in files:
        return Proof(False, "no config.json")
    if not weights:
        return Proof(False, "no weights")
    try:
        candidates = _expected_from_config(bytes(files[CONFIG]))
    except Exception as exc:  # whatever fails while building the architecture: not proven
        return Proof(False, f"config.json does not build a transformers model: {type(exc).__name__}: {exc}")
    saved = {k: tuple(int(d) for d in v) for k, v in weights.items()}
    proofs = [expected.check(saved) for expected in candidates]
    return next((p for p in proofs if p), proofs[0])


@dataclass(frozen=True)
class _Expected:
    """The weights an architecture loads: required names with shapes, tied groups, ignore patterns."""

    required: dict[str, tuple[int, ...]]
    allowed: dict[str, tuple[int, ...]]  # required plus tied copies that may be written too
    tied: dict[str, frozenset[str]]  # name -> the other names of its tied group
    ignore_missing: tuple[str, ...] = ()
    ignore_unexpected: tuple[str, ...] = ()

    def check(self, saved: Mapping[str, tuple[int, ...]]) -> Proof:
        unexpected = [k for k in saved if k not in self.allowed and not _matches(k, self.ignore_unexpected)]
        if unexpected:
            return Proof(False, f"{len(unexpected)} unexpected weights, e.g. {unexpected[0]!r}")
        wrong = [k for k, shape in saved.items() if k in self.allowed and self.allowed[k] != shape]
        if wrong:
            k = wrong[0]
            return Proof(False, f"{k!r} has shape {list(saved[k])}, the config's architecture wants "
                                f"{list(self.allowed[k])}")
        # a tied weight is there when any name of its group is written: from_pretrained ties the others to it
        missing = [k for k in self.required if k not in saved and not (self.tied.get(k, frozenset()) & saved.keys())
                   and not _matches(k, self.ignore_missing)]
        if missing:
            return Proof(False, f"{len(missing)} weights missing, e.g. {missing[0]!r}")
        return Proof(True)


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(p, key) for p in patterns)


@functools.lru_cache(maxsize=8)
def _expected_from_config(config_json: bytes) -> tuple[_Expected, ...]:
    """Build the architecture ``config.json`` names on the meta device and read what it loads.

    A config that names no ``architectures`` (``config.save_pretrained`` of a fresh config) is
    loaded by the ``AutoModel*`` class the user picks: then every model class transformers maps
    its ``model_type`` to is a candidate, and the weights must fit one of them exactly.
    """
    import transformers

    doc = json.loads(config_json)
    if not isinstance(doc, dict):
        raise ValueError("it is not a JSON object")
    architectures = doc.get("architectures")
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        names = [architectures[0]]
    else:
        names = _classes_of(doc.get("model_type"))
        if not names:
            raise ValueError(f"it names no architectures and transformers maps no model to {doc.get('model_type')!r}")
    out, failure = [], None
    for name in names:
        try:
            out.append(_expected_of_class(getattr(transformers, name, None), name, config_json))
        except Exception as exc:  # this candidate is out; one that builds may remain
            failure = failure or exc
    if not out:
        raise failure or ValueError("no model class builds from it")
    return tuple(out)


def _expected_of_class(cls: Any, name: str, config_json: bytes) -> _Expected:
    if cls is None or not hasattr(cls, "config_class"):
        raise ValueError(f"transformers has no model class {name!r} (custom code is never assumed)")
    with tempfile.TemporaryDirectory(prefix="ckpt-config-") as tmp:
        Path(tmp, CONFIG).write_bytes(config_json)
        config = cls.config_class.from_pretrained(tmp)
    with _quiet(), torch.device("meta"):
        model = cls._from_config(config)
    return _expected_of(model, hf_state(model))


def _classes_of(model_type: Any) -> list[str]:
    """Every model class name transformers' auto mappings give ``model_type`` (AutoModel, ...ForCausalLM, ...)."""
    from transformers.models.auto import modeling_auto

    names: list[str] = []
    for attr, mapping in vars(modeling_auto).items():
        if attr.startswith("MODEL") and attr.endswith("MAPPING_NAMES") and isinstance(mapping, Mapping):
            found = mapping.get(model_type) if isinstance(model_type, str) else None
            for name in [found] if isinstance(found, str) else list(found or ()):
                if isinstance(name, str) and name not in names:
                    names.append(name)
    return names


def _expected_of(model: torch.nn.Module, saved_form: Mapping[str, torch.Tensor]) -> _Expected:
    groups: dict[int, list[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        groups.setdefault(id(tensor), []).append(name)
    tied = {n: frozenset(g) - {n} for g in groups.values() if len(g) > 1 for n in g}
    full = _shapes(model.state_dict())
    required = _shapes(saved_form)
    allowed = {**{k: v for k, v in full.items() if k in tied}, **required}
    return _Expected(required=required, allowed=allowed, tied=tied,
                     ignore_missing=tuple(getattr(model, "_keys_to_ignore_on_load_missing", None) or ()),
                     ignore_unexpected=tuple(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()))


def _prove_adapter(model: Any, adapter_config: bytes, saved: Mapping[str, tuple[int, ...]]) -> Proof:
    """Whether ``PeftModel.from_pretrained(base, folder)`` loads exactly the saved adapter: the adapter
    ``adapter_config.json`` describes, injected into a meta copy of the live base, has these weights."""
    if not saved:
        return Proof(False, "the adapter has no weights")
    try:
        base: Any = model.get_base_model()
        cls: Any = type(base)
        expected = _expected_adapter(cls, base.config.to_json_string(), adapter_config)
    except Exception as exc:  # whatever fails: not proven
        return Proof(False, f"adapter_config.json does not rebuild the adapter: {type(exc).__name__}: {exc}")
    if expected != dict(saved):
        extra = sorted(set(saved) - set(expected))
        missing = sorted(set(expected) - set(saved))
        return Proof(False, f"the adapter's weights differ from what its config builds (unexpected {extra[:2]}, "
                            f"missing {missing[:2]}, or other shapes)")
    return Proof(True)


@functools.lru_cache(maxsize=8)
def _expected_adapter(cls: Any, base_config: str, adapter_config: bytes) -> dict[str, tuple[int, ...]]:
    """The adapter weights (name → shape) ``adapter_config`` injects into a meta copy of the base."""
    import peft

    with tempfile.TemporaryDirectory(prefix="ckpt-peft-") as tmp:  # read as PeftModel.from_pretrained reads them
        Path(tmp, ADAPTER_CONFIG).write_bytes(adapter_config)
        config = peft.PeftConfig.from_pretrained(tmp)
        Path(tmp, CONFIG).write_text(base_config)
        model_config = cls.config_class.from_pretrained(tmp)
    with _quiet(), torch.device("meta"):
        meta = peft.get_peft_model(cls._from_config(model_config), config)
    return _shapes(peft.get_peft_model_state_dict(meta, save_embedding_layers="auto"))


@contextlib.contextmanager
def _quiet() -> Any:
    """Building a meta copy repeats warnings the user saw when building the real model: hide them."""
    loggers = [logging.getLogger(n) for n in ("transformers", "peft")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
