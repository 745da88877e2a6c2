"""``ckpt export``: an inference-only, self-contained HF folder from any checkpoint we wrote.

The weights come from `CheckpointManager.load` (so sharded, compressed or deduplicated
checkpoints export the same way), are cast to ``dtype`` if asked (tied tensors stay tied), and
are written in HF's file names, split by huggingface_hub's shard planner (shards above
``max_shard_size``); a tensor stored under two names (tied weights) is written once, as
``save_pretrained`` does, and ``from_pretrained`` ties it again. config, generation config and
tokenizer files are copied verified; the optimizer, training state, Trainer state and our
sidecar are left out. The folder is built
next to DEST and renamed into place, so DEST is never half-written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._errors import InvalidArgumentError
from ._layout import MODEL_INDEX, OPTIMIZER_FILE, SIDECAR, TRAINER_STATE_FILE, TRAINING_STATE_FILE, is_model_weights
from ._sharded import is_training_part

__all__ = ["DTYPES", "export_checkpoint"]

DTYPES = ("float32", "bfloat16", "float16")
_LEFT_OUT = {MODEL_INDEX, OPTIMIZER_FILE, TRAINING_STATE_FILE, TRAINER_STATE_FILE, SIDECAR}


def export_checkpoint(
    root: str,
    name: str,
    dest: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    format: str = "hf",
    force: bool = False,
    max_shard_size: int | str = "5GB",
    storage_options: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``name`` of ``root`` to ``dest`` as an HF folder for inference; return ``dest``.

    ``AutoModel*.from_pretrained(dest)`` and ``AutoTokenizer.from_pretrained(dest)`` load it with
    nothing else at hand. A peft adapter checkpoint exports its merged full model when it holds
    one (saved with ``save_merged``), else the adapter folder as peft lays it out
    (``adapter_model.safetensors``, ``adapter_config.json``, tokenizer), which
    ``PeftModel.from_pretrained(base, dest)`` loads.

    Args:
        root: the checkpoint root; name: the checkpoint (``latest``, ``best``, an id...).
        dest: a local folder that does not exist or is empty (else pass ``force``).
        dtype: ``bfloat16``, ``float16`` or ``float32`` for the floating-point weights (default: as stored).
        format: ``hf`` (the only one so far).
        max_shard_size: largest weights file before splitting into shards.

    Raises:
        InvalidArgumentError: not an HF checkpoint (no ``config.json``), a bad dtype, a non-empty ``dest``.

    Example:
        >>> # export_checkpoint("s3://bucket/run", "best", "./gpt2-best", dtype="bfloat16")
    """
    from ._manager import CheckpointManager

    if format != "hf":
        raise InvalidArgumentError(f"format must be 'hf', got {format!r}")
    if dtype is not None and dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    target = Path(dest).absolute()
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise InvalidArgumentError(f"{dest} is not empty: pass force=True (--force) or choose an empty folder")
    manager = CheckpointManager(root, storage_options=storage_options, writer=False)
    info = manager.get(name)
    paths = {f.logical_path for f in info.files}
    if info.adapter is not None:
        return _export_adapter(manager, info, target, dtype)
    if "config.json" not in paths:
        raise InvalidArgumentError(
            f"checkpoint {info.name!r} in {manager.root} has no config.json, so it is not an HF model folder; "
            "'ckpt download' copies its files as they are")
    with _staging(target) as staging:
        extra = [p for p in paths if p not in _LEFT_OUT and not is_model_weights(p) and not is_training_part(p)]
        copied = manager.download(info.name, staging / "files", include=extra, progress=False, decompress=True)
        (copied / SIDECAR).unlink()
        _write_weights(_dedupe(_cast(manager.load(info.name), dtype)), copied, max_shard_size)
        if dtype is not None:
            _set_config_dtype(copied / "config.json", dtype)
        _place(copied, target)
    return target


def _export_adapter(manager: Any, info: Any, target: Path, dtype: str | None) -> Path:
    """A peft checkpoint: its merged full model when it holds one (``save_merged``), else the adapter
    folder as peft saves it (``PeftModel.from_pretrained(base, DEST)`` loads it)."""
    from safetensors.torch import load_file, save_file

    merged = info.adapter.merged
    paths = [f.logical_path for f in info.files]  # a compressed file by its decoded name: it is decoded below
    if merged:
        wanted = [p for p in paths if p.startswith(merged + "/")]
    else:
        wanted = [p for p in paths if p not in _LEFT_OUT and not is_training_part(p)]
    with _staging(target) as staging:
        copied = manager.download(info.name, staging / "files", include=wanted, progress=False, decompress=True)
        (copied / SIDECAR).unlink()
        folder = copied / merged if merged else copied
        if dtype is not None:
            for path in sorted(folder.rglob("*.safetensors")):
                save_file(_dedupe(_cast(load_file(str(path)), dtype)), str(path), metadata={"format": "pt"})
            if (folder / "config.json").exists():
                _set_config_dtype(folder / "config.json", dtype)
        _place(folder, target)
    return target


@contextlib.contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A temporary folder beside ``target`` (the same file system, so what is built there moves into place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.export-", dir=target.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _place(folder: Path, target: Path) -> None:
    """Move the finished ``folder`` to ``target``: renamed into place, or merged into an existing (forced) one."""
    if target.exists():
        _merge(folder, target)
    else:
        os.replace(folder, target)


def _cast(state: dict[str, Any], dtype: str | None) -> dict[str, Any]:
    """Floating-point tensors in ``dtype``; tensors that shared storage still share it."""
    if dtype is None:
        return state
    import torch

    to = getattr(torch, dtype)
    done: dict[tuple[int, int, tuple[int, ...]], Any] = {}
    out = {}
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            out[key] = tensor
            continue
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ident not in done:
            done[ident] = tensor.to(to)
        out[key] = done[ident]
    return out


def _dedupe(state: dict[str, Any]) -> dict[str, Any]:
    """One name per stored tensor (tied copies dropped), views of a shared buffer made separate."""
    kept: dict[str, Any] = {}
    exact: set[tuple[int, int, tuple[int, ...]]] = set()
    buffers: set[int] = set()
    for key, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        ident = (ptr, tensor.storage_offset(), tuple(tensor.shape))
        if ident in exact and tensor.numel():
            continue
        kept[key] = tensor.clone() if ptr in buffers and tensor.numel() else tensor.contiguous()
        exact.add(ident)
        buffers.add(ptr)
    return kept


def _write_weights(state: dict[str, Any], folder: Path, max_shard_size: int | str) -> None:
    """``model.safetensors``, or shards and ``model.safetensors.index.json``, as save_pretrained names them."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: state[name] for name in names}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / MODEL_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _set_config_dtype(path: Path, dtype: str) -> None:
    config = json.loads(path.read_text())
    for key in ("torch_dtype", "dtype"):  # `dtype` since transformers 4.56, `torch_dtype` before
        config[key] = dtype
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _merge(source: Path, target: Path) -> None:
    """--force into an existing folder: our files replace those of the same name."""
    for path in sorted(source.rglob("*")):
        if path.is_file():
            out = target / path.relative_to(source)
            out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, out)
