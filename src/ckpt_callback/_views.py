"""The hosted checkpoint APIs' shapes of our checkpoints: OpenAI, TensorOne and FlexAI.

Pure functions of sidecars (`CheckpointInfo`) and of a few facts about the root (its URL,
whether it can sign URLs); nothing here touches storage or imports torch. Each view follows
its service's field names and types, so code written for that service's SDK reads ours:

- OpenAI's fine-tuning checkpoint list (``fine_tuning.job.checkpoint`` items, validated by the
  ``openai`` SDK's own ``FineTuningJobCheckpoint`` in the tests);
- TensorOne's checkpoints list (``checkpoints``, ``checkpointId``, ``downloadUrl``, ``deployable``,
  ``summary``) and its metric names (``loss``, ``accuracy``, ``validationLoss``, ``validationAccuracy``);
- FlexAI's ``checkpoint inspect`` document (``kind``, ``metadata``, ``spec``, ``status``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from ._layout import MODEL_INDEX, SIDECAR
from ._sidecar import CheckpointInfo

__all__ = [
    "NO_PROVIDER_ID",
    "OPENAI_METRICS",
    "TENSORONE_METRICS",
    "compact_size",
    "deployable",
    "flexai_document",
    "human_size",
    "openai_checkpoint",
    "openai_list",
    "storage_provider_id",
    "tensorone_checkpoint",
    "tensorone_list",
    "tensorone_metric",
    "unix_time",
    "weights_file",
]

Signer = Callable[[CheckpointInfo], "str | None"]

# TensorOne's metric names -> where each comes from, first match wins: a sidecar field or the
# names training code logs (HF Trainer prefixes evaluation metrics with ``eval_``; TRL logs
# ``mean_token_accuracy``). A metric logged under the TensorOne name itself always wins.
TENSORONE_METRICS: dict[str, tuple[str, ...]] = {
    "loss": ("loss", "trainLoss", "train_loss"),
    "accuracy": ("accuracy", "train_accuracy", "mean_token_accuracy", "train_mean_token_accuracy"),
    "validationLoss": ("validationLoss", "evalLoss", "eval_loss", "validation_loss", "val_loss", "valid_loss"),
    "validationAccuracy": ("validationAccuracy", "eval_accuracy", "validation_accuracy", "val_accuracy",
                           "valid_accuracy", "eval_mean_token_accuracy"),
}
_FIELDS = {"trainLoss": "train_loss", "evalLoss": "eval_loss"}

# OpenAI's checkpoint metrics -> the names they are looked up under (sidecar fields, then logged metrics).
OPENAI_METRICS: dict[str, tuple[str, ...]] = {
    "train_loss": ("trainLoss", "train_loss", "loss"),
    "train_mean_token_accuracy": ("train_mean_token_accuracy", "mean_token_accuracy"),
    "valid_loss": ("evalLoss", "valid_loss", "eval_loss"),
    "valid_mean_token_accuracy": ("valid_mean_token_accuracy", "eval_mean_token_accuracy"),
    "full_valid_loss": ("full_valid_loss", "eval_full_valid_loss"),
    "full_valid_mean_token_accuracy": ("full_valid_mean_token_accuracy", "eval_full_valid_mean_token_accuracy"),
}


def _lookup(info: CheckpointInfo, names: Sequence[str]) -> float | None:
    for name in names:
        value = getattr(info, _FIELDS[name]) if name in _FIELDS else info.metrics.get(name)
        if value is not None:
            return float(value)
    return None


def tensorone_metric(info: CheckpointInfo, name: str) -> float | None:
    """TensorOne metric ``name`` (``loss``, ``accuracy``, ``validationLoss``, ``validationAccuracy``) of ``info``.

    Example:
        >>> info = CheckpointInfo(name="c", step=1, train_loss=0.5, metrics={"eval_accuracy": 0.9})
        >>> tensorone_metric(info, "loss"), tensorone_metric(info, "validationAccuracy")
        (0.5, 0.9)
    """
    return _lookup(info, TENSORONE_METRICS[name])


def unix_time(iso: str) -> int:
    """An ISO 8601 UTC time (``2025-02-03T13:14:37.730471Z``) as whole Unix seconds."""
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())


def human_size(size: int) -> str:
    """Bytes in decimal units, as model hubs and FlexAI show them: ``343.79 MB`` (1 MB = 10**6 bytes).

    Example:
        >>> human_size(343_790_000), human_size(512)
        ('343.79 MB', '512 B')
    """
    return _decimal(size, ("B", "kB", "MB", "GB", "TB", "PB"), digits=2, space=" ")


def compact_size(size: int) -> str:
    """A size as TensorOne writes it: ``2.3GB`` (decimal units, one decimal).

    Example:
        >>> compact_size(2_300_000_000), compact_size(4_200_784), compact_size(12)
        ('2.3GB', '4.2MB', '12B')
    """
    return _decimal(size, ("B", "KB", "MB", "GB", "TB", "PB"), digits=1, space="")


def _decimal(size: int, units: tuple[str, ...], *, digits: int, space: str) -> str:
    """``size`` bytes in decimal ``units`` (bytes first), with ``digits`` decimals after the first unit."""
    if size < 1000:
        return f"{size}{space}{units[0]}"
    value = float(size)
    for unit in units[1:-1]:
        value /= 1000
        if round(value, digits) < 1000:
            return f"{value:.{digits}f}{space}{unit}"
    return f"{value / 1000:.{digits}f}{space}{units[-1]}"


def deployable(info: CheckpointInfo) -> bool:
    """Whether `ckpt serve` can serve ``info``: an inference-ready HF folder (config, weights, tokenizer)."""
    paths = {f.path for f in info.files}
    weights = "model.safetensors" in paths or MODEL_INDEX in paths
    return bool(info.inference_ready and "config.json" in paths and weights)


def _job_id(info: CheckpointInfo, root: str) -> str:
    # Sidecars written before run ids existed: one stable id per root, so a page still groups as one job.
    return info.run_id or uuid.uuid5(uuid.NAMESPACE_URL, root.rstrip("/")).hex


def _location(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if root else name


# --- OpenAI ------------------------------------------------------------------------------------


def openai_checkpoint(info: CheckpointInfo, *, root: str = "") -> dict[str, Any]:
    """``info`` as OpenAI's ``fine_tuning.job.checkpoint`` object.

    ``fine_tuned_model_checkpoint`` is where the checkpoint lives (``ROOT/NAME``: what
    ``from_pretrained``, ``ckpt download`` and ``ckpt serve`` take); ``fine_tuning_job_id`` the
    run id of the training run. ``metrics`` holds the OpenAI names known for the checkpoint
    (``step`` always), nothing made up.

    Example:
        >>> info = CheckpointInfo(name="checkpoint-5", step=5, train_loss=0.5, run_id="abc",
        ...                       created_at="2025-02-03T13:14:37.730471Z")
        >>> item = openai_checkpoint(info, root="s3://b/run")
        >>> item["step_number"], item["created_at"], item["fine_tuned_model_checkpoint"], item["metrics"]
        (5, 1738588477, 's3://b/run/checkpoint-5', {'step': 5.0, 'train_loss': 0.5})
    """
    metrics: dict[str, float] = {"step": float(info.step)}
    for name, sources in OPENAI_METRICS.items():
        value = _lookup(info, sources)
        if value is not None:
            metrics[name] = value
    return {
        "object": "fine_tuning.job.checkpoint",
        "id": info.id,
        "created_at": unix_time(info.created_at),
        "fine_tuned_model_checkpoint": _location(root, info.name),
        "fine_tuning_job_id": _job_id(info, root),
        "metrics": metrics,
        "step_number": info.step,
    }


def openai_list(infos: Sequence[CheckpointInfo], *, has_more: bool, root: str = "") -> dict[str, Any]:
    """OpenAI's cursor page: ``object``, ``data``, ``first_id``, ``last_id``, ``has_more``."""
    data = [openai_checkpoint(info, root=root) for info in infos]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


# --- TensorOne ---------------------------------------------------------------------------------


def tensorone_checkpoint(info: CheckpointInfo, *, include_metrics: bool = True,
                         sign: Signer | None = None) -> dict[str, Any]:
    """``info`` as an item of TensorOne's ``checkpoints`` list.

    ``size`` is TensorOne's text (``2.3GB``), ``sizeBytes`` the exact number; ``downloadUrl`` a
    signed URL of the weights (valid 1 h) where the storage signs, else null; ``deployable``
    whether `ckpt serve` can serve it.
    """
    item: dict[str, Any] = {"checkpointId": info.id, "name": info.name, "epoch": info.epoch, "step": info.step}
    if include_metrics:
        item["metrics"] = {name: tensorone_metric(info, name) for name in TENSORONE_METRICS}
    item.update({
        "size": compact_size(info.size),
        "sizeBytes": info.size,
        "type": info.type,
        "downloadUrl": sign(info) if sign is not None else None,
        "deployable": deployable(info),
        "createdAt": info.created_at,
        "description": info.description,
    })
    return item


def tensorone_list(infos: Sequence[CheckpointInfo], *, total_count: int, best: CheckpointInfo | None,
                   latest: CheckpointInfo | None, total_size: int, include_metrics: bool = True,
                   sign: Signer | None = None) -> dict[str, Any]:
    """TensorOne's list response: ``checkpoints``, ``totalCount``, ``summary``."""
    best_metrics = {} if best is None else {
        k: v for k in TENSORONE_METRICS if (v := tensorone_metric(best, k)) is not None}
    return {
        "checkpoints": [tensorone_checkpoint(i, include_metrics=include_metrics, sign=sign) for i in infos],
        "totalCount": total_count,
        "summary": {
            "bestCheckpoint": None if best is None else {"checkpointId": best.id, "metrics": best_metrics},
            "latestCheckpoint": None if latest is None else {"checkpointId": latest.id,
                                                             "createdAt": latest.created_at},
            "totalSize": compact_size(total_size),
            "totalSizeBytes": total_size,
        },
    }


def weights_file(info: CheckpointInfo) -> str:
    """The file a single download link points at: ``model.safetensors`` or the shard index."""
    paths = [f.path for f in info.files]
    for candidate in ("model.safetensors", MODEL_INDEX, "adapter_model.safetensors"):
        if candidate in paths:
            return candidate
    return next((p for p in paths if p.endswith(".safetensors")), SIDECAR)


# --- FlexAI ------------------------------------------------------------------------------------

NO_PROVIDER_ID = "00000000-0000-0000-0000-000000000000"  # FlexAI's id when no remote provider is involved


def storage_provider_id(root: str) -> str:
    """A stable id of the storage holding ``root``: FlexAI's zero UUID locally, else one per bucket."""
    protocol, sep, rest = root.partition("://")
    if not sep or protocol in ("file", "local"):
        return NO_PROVIDER_ID
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{protocol}://{rest.split('/', 1)[0]}"))


def flexai_document(info: CheckpointInfo, *, root: str, path: str) -> dict[str, Any]:
    """FlexAI's ``checkpoint inspect`` document of ``info``, with our extra fields beside FlexAI's.

    FlexAI's fields are where FlexAI puts them, with its types (sizes as text such as
    ``343.79 MB``); ours are added: ``spec.root/path/type/description/epoch/metrics/runId/sharding/adapter``,
    ``sizeBytes`` and each file's ``sha256``.

    Example:
        >>> doc = flexai_document(CheckpointInfo(name="c-1", step=1), root="/runs/a", path="/runs/a/c-1")
        >>> doc["kind"], doc["status"]["status"], doc["spec"]["fromLocalFiles"]
        ('Checkpoint', 'available', [])
    """
    source = info.source
    return {
        "kind": "Checkpoint",
        "metadata": {
            "name": info.name,
            "id": info.id,
            "creatorUserID": info.created_by or "",
            "ownerOrgID": "",
        },
        "spec": {
            "fromLocalFiles": list(source.from_local_files) if source else [],
            "storageProvider": source.storage_provider if source else "",
            "sourcePath": source.source_path if source else "",
            "root": root,
            "path": path,
            "type": info.type,
            "description": info.description,
            "epoch": info.epoch,
            "metrics": dict(info.metrics),
            "runId": info.run_id,
            "sharding": info.sharding.to_json() if info.sharding else None,
            "adapter": info.adapter.to_json() if info.adapter else None,
        },
        "status": {
            "status": "available",  # a sidecar exists only for a complete, committed checkpoint
            "storageProviderID": storage_provider_id(root),
            "size": human_size(info.size),
            "sizeBytes": info.size,  # as stored (compressed files by their compressed size)
            "logicalSize": human_size(info.logical_size),
            "logicalSizeBytes": info.logical_size,  # once decoded
            "sharedSizeBytes": info.shared_size,  # stored once with other checkpoints (hard links, blobs)
            "files": [_file_view(f) for f in info.files],
            "metadata": {
                "name": info.name,
                "node": info.node,
                "step": info.step,
                "trainLoss": info.train_loss,
                "evalLoss": info.eval_loss,
                "model": info.model,
                "version": info.version,
                "inferenceReady": info.inference_ready,
            },
            "createdAt": info.created_at,
            "updatedAt": info.updated_at,
        },
    }


def _file_view(f: Any) -> dict[str, Any]:
    out = {"path": f.path, "size": human_size(f.size), "sizeBytes": f.size, "sha256": f.sha256}
    if f.codec is not None:
        out.update(codec=f.codec, logicalPath=f.logical_path, rawSizeBytes=f.raw_size)
    if f.shared:
        out["shared"] = True
    if f.blob is not None:
        out["storedAt"] = f.location("")  # the object store's shared copy: .ckpt-blobs/<sha256>
    return out
