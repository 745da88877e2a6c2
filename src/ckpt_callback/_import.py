"""``ckpt import``: register checkpoints that exist elsewhere, with their provenance.

A source is a torch ``.pt``/``.bin`` file (a state dict, or a training checkpoint such as
nanoGPT's ``{"model", "optimizer", "iter_num", "best_val_loss", ...}``), a ``.safetensors``
file, an HF ``save_pretrained`` folder, an HF Trainer ``checkpoint-N`` folder or a whole
Trainer ``output_dir`` (every ``checkpoint-N`` in it), on local disk or any fsspec URL.

Plan, then act: `plan_import` reads the sources and returns one `ImportPlan` per checkpoint
(state, training state, files, step, losses, provenance); `import_checkpoints` commits each
through `CheckpointManager.save`, so imports get the same commit protocol, sidecar and
retention as any save. Pickles are read with ``torch.load(weights_only=True)`` only: a file
that needs arbitrary code to load is refused, never executed; nothing pickled is stored.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._errors import CheckpointError, InvalidArgumentError, UnsupportedSourceError
from ._layout import SIDECAR, TRAINER_STATE_FILE, default_name
from ._sidecar import RESERVED_NAMES, CheckpointInfo, Source, clean_metrics, clean_number

__all__ = ["ImportPlan", "import_checkpoints", "plan_import"]

logger = logging.getLogger("ckpt_callback")

_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
_TRAINER_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_STATE_KEYS = ("model", "state_dict", "model_state_dict", "module")
_OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict")
_SCHEDULER_KEYS = ("scheduler", "lr_scheduler", "scheduler_state_dict")
_STEP_KEYS = ("iter_num", "global_step", "step")
_MAX_FILE = 64 << 20  # non-weight files carried along (config, tokenizer): far below this


@dataclass
class _Frozen:
    """An optimizer or scheduler state read from a file, given to `save` as if it were live."""

    state: dict[str, Any]

    def state_dict(self) -> dict[str, Any]:
        return self.state


@dataclass
class ImportPlan:
    """One checkpoint to create: what `CheckpointManager.save` gets, and where it came from."""

    kind: str  # "state-dict", "training-checkpoint", "safetensors", "hf-folder", "trainer-checkpoint"
    state: dict[str, Any]
    name: str | None
    step: int
    type: str
    source: Source
    origin: str = ""  # the file or folder, for messages
    epoch: float | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    optimizer: _Frozen | None = None
    scheduler: _Frozen | None = None
    model_name: str | None = None
    version: str | None = None
    inference_ready: bool | None = None  # None: proven by the save; False: never
    skipped: list[str] = field(default_factory=list)  # what could not be carried over, and why


def import_checkpoints(
    root: str,
    sources: Sequence[str | os.PathLike[str]],
    *,
    name: str | None = None,
    step: int | None = None,
    type: str | None = None,
    description: str | None = None,
    storage_options: dict[str, Any] | None = None,
    source_options: dict[str, Any] | None = None,
) -> list[CheckpointInfo]:
    """Register existing checkpoints under ``root``; return the committed ones.

    Args:
        root: the checkpoint root (a folder or an fsspec URL).
        sources: files or folders, local paths or fsspec URLs (see the module docstring).
        name: the checkpoint name (only for a single checkpoint; default: ``checkpoint-N`` for
            Trainer checkpoints, else the source's file or folder name).
        step: the training step (default: what the source records, else 0).
        type: ``automatic``, ``manual`` or ``final`` (default: ``automatic`` for Trainer
            checkpoints, ``manual`` otherwise, so retention never removes a lone import).
        description: free text for the sidecar.
        storage_options: for ``root``; source_options: for remote sources (default: the same
            options when the source uses the root's protocol).

    Raises:
        UnsupportedSourceError: a source has no recognisable weights, or holds pickled objects other than
            tensors and plain containers (never unpickled).
        CheckpointExistsError: a checkpoint of that name exists already.

    Example:
        >>> import torch, tempfile, os
        >>> folder = tempfile.mkdtemp()
        >>> torch.save({"w": torch.ones(2)}, os.path.join(folder, "weights.pt"))
        >>> [info] = import_checkpoints("memory://doc-import", [os.path.join(folder, "weights.pt")])
        >>> info.name, info.type, info.source.from_local_files[0].endswith("weights.pt")
        ('weights', 'manual', True)
    """
    from ._manager import CheckpointManager

    if type is not None and type not in ("automatic", "manual", "final"):
        raise InvalidArgumentError(f"type must be 'automatic', 'manual' or 'final', got {type!r}")
    if not sources:
        raise InvalidArgumentError("give at least one source to import")
    if source_options is None and storage_options:
        protocol = str(root).split("://", 1)[0] if "://" in str(root) else "file"
        same = [s for s in sources if str(s).split("://", 1)[0] == protocol]
        source_options = storage_options if same else None
    manager = CheckpointManager(root, keep_last=None, storage_options=storage_options)
    done = []
    with plan_import(sources, name=name, step=step, type=type, source_options=source_options) as plans:
        for plan in plans:
            for why in plan.skipped:
                logger.warning("%s: %s", plan.origin, why)
            info = manager.save(
                plan.state, step=plan.step, epoch=plan.epoch, train_loss=plan.train_loss, eval_loss=plan.eval_loss,
                metrics=plan.metrics, type=plan.type, name=plan.name, description=description,
                optimizer=plan.optimizer, scheduler=plan.scheduler, rng=False, files=plan.files,
                model_name=plan.model_name, version=plan.version, inference_ready=plan.inference_ready,
                source=plan.source,
            )
            assert info is not None
            done.append(info)
    return [manager.get(info.name) for info in done]  # with their tags now (a later import may be the best)


@contextlib.contextmanager
def plan_import(
    sources: Sequence[str | os.PathLike[str]],
    *,
    name: str | None = None,
    step: int | None = None,
    type: str | None = None,
    source_options: dict[str, Any] | None = None,
) -> Iterator[Iterator[ImportPlan]]:
    """The checkpoints ``sources`` hold, one `ImportPlan` at a time (remote sources are fetched first).

    A context manager: temporary copies of remote sources are removed on exit.
    """
    with tempfile.TemporaryDirectory(prefix="ckpt-import-") as scratch:
        found: list[tuple[Path, Source, str]] = []
        for k, raw in enumerate(sources):
            local, remote = _fetch(str(os.fspath(raw)), Path(scratch) / str(k), source_options or {})
            found += [(path, _provenance(path, local, remote), kind) for path, kind in _checkpoints_in(local)]
        if not found:
            raise UnsupportedSourceError(f"nothing to import in {', '.join(map(str, sources))}")
        if len(found) > 1 and (name is not None or step is not None):
            raise InvalidArgumentError(
                f"--name and --step apply to one checkpoint, but the sources hold {len(found)}; "
                "import them one at a time to name them")
        yield (_plan(path, kind, source, name=name, step=step, type=type) for path, source, kind in found)


# --- finding the checkpoints in a source -----------------------------------------------------


def _fetch(source: str, scratch: Path, options: dict[str, Any]) -> tuple[Path, str | None]:
    """(a local path holding the source, the remote URL it came from or None)."""
    protocol = source.split("://", 1)[0] if "://" in source else "file"
    if protocol in ("file", "local"):
        path = Path(source.split("://", 1)[1] if "://" in source else source).expanduser().absolute()
        if not path.exists():
            raise UnsupportedSourceError(f"{source} does not exist")
        return path, None
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(source, **options)
        target = scratch / (path.rstrip("/").rsplit("/", 1)[-1] or "source")
        if fs.isdir(path):
            for remote in fs.find(path):  # literal paths, one file at a time
                rel = remote[len(path.rstrip("/")) + 1:]
                local = target / rel
                local.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(remote, str(local))
        elif fs.exists(path):
            scratch.mkdir(parents=True, exist_ok=True)
            fs.get_file(path, str(target))
        else:
            raise UnsupportedSourceError(f"{source} does not exist")
    except CheckpointError:
        raise
    except Exception as exc:
        raise UnsupportedSourceError(f"cannot read {source}: {type(exc).__name__}: {exc}") from exc
    return target, source


def _provenance(path: Path, top: Path, remote: str | None) -> Source:
    if remote is None:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        return Source(from_local_files=tuple(str(p) for p in files))
    rel = path.relative_to(top).as_posix() if path != top else ""
    url = remote.rstrip("/") + (f"/{rel}" if rel and rel != "." else "")
    return Source(storage_provider=remote.split("://", 1)[0], source_path=url)


def _checkpoints_in(path: Path) -> list[tuple[Path, str]]:
    """(path, kind) of every checkpoint at ``path``: itself, or each Trainer ``checkpoint-N`` in it."""
    if path.is_file():
        if path.suffix == ".safetensors":
            return [(path, "safetensors")]
        if path.suffix in _PICKLE_SUFFIXES:
            return [(path, "torch")]
        raise UnsupportedSourceError(f"{path}: not a .safetensors, .pt, .pth, .bin or .ckpt file")
    if (path / TRAINER_STATE_FILE).exists() and _weights(path):
        return [(path, "trainer-checkpoint")]
    if _weights(path):
        return [(path, "hf-folder")]
    inner = [p for p in path.iterdir() if p.is_dir() and _TRAINER_CHECKPOINT.fullmatch(p.name)
             and (p / TRAINER_STATE_FILE).exists()]
    if inner:
        return [(p, "trainer-checkpoint") for p in sorted(inner, key=lambda p: int(p.name.split("-")[1]))]
    raise UnsupportedSourceError(f"{path}: no weights (model.safetensors, pytorch_model.bin, shards) and no Trainer "
                       "checkpoint-N folders in it")


def _weights(folder: Path) -> list[Path]:
    """The model weight files of an HF folder (safetensors preferred over .bin), from its index if sharded."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index).exists():
            names = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            return [folder / n for n in names]
        if (folder / single).exists():
            return [folder / single]
    return []


# --- reading -----------------------------------------------------------------------------------


def _torch_load(path: Path) -> Any:
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise UnsupportedSourceError(
            f"{path} holds pickled Python objects other than tensors and plain containers{what}, so it was not "
            "loaded: torch.load(weights_only=True) never runs code from a file. If you trust the file, load it "
            "yourself (torch.load(path, weights_only=False)) and save its state dict with CheckpointManager.save"
        ) from exc
    except Exception as exc:
        raise UnsupportedSourceError(
            f"{path} is not a torch file that can be read: {type(exc).__name__}: {exc}") from exc


def _tensors_only(value: Any) -> bool:
    import torch

    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _default_name(path: Path, type: str) -> str:
    stem = path.name if path.is_dir() else path.stem
    cleaned = re.sub(r"[^A-Za-z0-9._+=@-]+", "-", stem).strip(".-")
    if not cleaned or cleaned in RESERVED_NAMES or ".." in cleaned:
        cleaned = f"imported-{cleaned or 'checkpoint'}".replace("..", ".")
    return cleaned[:200]


def _plan(path: Path, kind: str, source: Source, *, name: str | None, step: int | None,
          type: str | None) -> ImportPlan:
    if kind == "safetensors":
        from safetensors.torch import load_file

        plan = ImportPlan("safetensors", dict(load_file(str(path))), None, 0, "manual", source)
    elif kind == "torch":
        plan = _plan_torch(path, source)
    else:
        plan = _plan_folder(path, source, trainer=kind == "trainer-checkpoint")
    plan.origin = plan.source.source_path or str(path)
    if step is not None:
        plan.step = step
    if type is not None:
        plan.type = type
    plan.name = name or plan.name or (default_name(plan.step) if plan.type == "automatic"
                                      else _default_name(path, plan.type))
    return plan


def _plan_torch(path: Path, source: Source) -> ImportPlan:
    loaded = _torch_load(path)
    if _tensors_only(loaded):
        return ImportPlan("state-dict", dict(loaded), None, 0, "manual", source)
    if not isinstance(loaded, Mapping):
        raise UnsupportedSourceError(
            f"{path} holds a {type(loaded).__name__}, not a state dict or a training checkpoint")
    key = next((k for k in _STATE_KEYS if _tensors_only(loaded.get(k))), None)
    if key is None:
        keys = ", ".join(sorted(map(str, loaded))[:12])
        raise UnsupportedSourceError(f"{path}: no state dict (name -> tensor) at the top level or under "
                           f"{', '.join(_STATE_KEYS)}; its keys are {keys}")
    prefix = "_orig_mod."  # torch.compile'd modules (nanoGPT strips the same prefix on load)
    state = {k.removeprefix(prefix): v for k, v in loaded[key].items()}
    plan = ImportPlan("training-checkpoint", state, None, 0, "manual", source)
    found_step = next((loaded[k] for k in _STEP_KEYS if isinstance(loaded.get(k), int)), None)
    plan.step = max(0, int(found_step)) if found_step is not None else 0
    plan.epoch = clean_number(loaded.get("epoch"))
    plan.train_loss = clean_number(loaded.get("loss", loaded.get("train_loss")))
    plan.eval_loss = clean_number(next((loaded[k] for k in ("val_loss", "eval_loss", "best_val_loss")
                                        if k in loaded), None))
    optimizer = next((loaded[k] for k in _OPTIMIZER_KEYS if isinstance(loaded.get(k), Mapping)), None)
    scheduler = next((loaded[k] for k in _SCHEDULER_KEYS if isinstance(loaded.get(k), Mapping)), None)
    plan.optimizer = _Frozen(dict(optimizer)) if optimizer is not None else None
    plan.scheduler = _Frozen(dict(scheduler)) if scheduler is not None else None
    # nanoGPT: the model's shape and the run's settings (not `config.json`, which would claim an HF model)
    for k, filename in (("model_args", "model_args.json"), ("config", "train_config.json")):
        if isinstance(loaded.get(k), Mapping):
            try:
                plan.files[filename] = (json.dumps(loaded[k], indent=2, sort_keys=True) + "\n").encode()
            except (TypeError, ValueError):
                plan.skipped.append(f"{k!r} is not JSON data; it was left out")
    return plan


def _plan_folder(folder: Path, source: Source, *, trainer: bool) -> ImportPlan:
    state: dict[str, Any] = {}
    weights = _weights(folder)
    for path in weights:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(str(path)))
        else:
            loaded = _torch_load(path)
            if not _tensors_only(loaded):
                raise UnsupportedSourceError(f"{path} is not a state dict (name -> tensor)")
            state.update(loaded)
    skip = {p.name for p in weights} | {"model.safetensors.index.json", "pytorch_model.bin.index.json", SIDECAR}
    plan = ImportPlan("trainer-checkpoint" if trainer else "hf-folder", state, None, 0,
                      "automatic" if trainer else "manual", source)
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if not path.is_file() or rel in skip or rel.startswith("."):
            continue
        if path.suffix in _PICKLE_SUFFIXES:  # optimizer.pt, scheduler.pt, rng_state.pth, training_args.bin
            continue
        if path.stat().st_size > _MAX_FILE:
            plan.skipped.append(f"{rel} ({path.stat().st_size} bytes) is too large to carry along; left out")
            continue
        plan.files[rel] = path.read_bytes()
    config: dict[str, Any] = {}
    if "config.json" in plan.files:
        with contextlib.suppress(ValueError):
            config = json.loads(plan.files["config.json"])
    plan.model_name = config.get("_name_or_path") or config.get("model_type")
    plan.version = config.get("transformers_version")
    # inferenceReady is not decided here: `CheckpointManager.save` proves it from config.json and the weights
    if trainer:
        _trainer_state(folder, plan)
    return plan


def _trainer_state(folder: Path, plan: ImportPlan) -> None:
    """Step, epoch, losses and metrics from trainer_state.json; optimizer and scheduler where they load safely."""
    try:
        state = json.loads((folder / TRAINER_STATE_FILE).read_text())
    except ValueError as exc:
        raise UnsupportedSourceError(f"{folder / TRAINER_STATE_FILE} is not valid JSON: {exc}") from exc
    plan.step = int(state.get("global_step") or 0)
    plan.epoch = clean_number(state.get("epoch"))
    history = [e for e in state.get("log_history") or [] if isinstance(e, dict)]
    at_step: dict[str, Any] = {}
    for entry in history:
        if entry.get("step") == plan.step:
            at_step.update({k: v for k, v in entry.items() if k not in ("step", "epoch")})
    plan.metrics = clean_metrics(at_step)
    plan.eval_loss = clean_number(at_step.get("eval_loss"))
    logged = [e for e in history if "loss" in e and isinstance(e.get("step"), int)]
    if logged:  # the train loss logged nearest the step (the earlier one on a tie), as the callback records it
        plan.train_loss = clean_number(min(logged, key=lambda e: (abs(e["step"] - plan.step), e["step"]))["loss"])
    for filename, attr in (("optimizer.pt", "optimizer"), ("scheduler.pt", "scheduler")):
        path = folder / filename
        if not path.exists():
            continue
        try:
            loaded = _torch_load(path)
        except UnsupportedSourceError as exc:
            plan.skipped.append(f"{filename} not imported: {exc}")
            continue
        if isinstance(loaded, Mapping):
            setattr(plan, attr, _Frozen(dict(loaded)))
    if (folder / "rng_state.pth").exists():
        plan.skipped.append("rng_state.pth not imported (RNG states start afresh on resume)")
