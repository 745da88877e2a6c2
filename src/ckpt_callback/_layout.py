"""Every file name and prefix this library puts on storage, in one place.

A checkpoint is the folder ``ROOT/NAME/`` with its sidecar written last. Everything else the
library writes is hidden (a leading ``.``) and recognisable by its prefix, so cleanup touches
only what is provably ours:

- ``ROOT/.ckpt-staging-TXID/``: a checkpoint being written before it gets its name (local roots
  always; object stores when it replaces a committed checkpoint of the same name).
- ``ROOT/.ckpt-trash-TXID-NAME/``: a local checkpoint renamed away to be deleted.
- ``NAME/.ckpt-incomplete``: the lease of the process writing or deleting a folder (JSON: who,
  where, until when); a folder carrying it and no sidecar is never listed.
- ``NAME/checkpoint.json.tmp-XXXX``: a local sidecar rewrite in progress.
- ``ROOT/.ckpt-requests/ID.request.json``: a checkpoint asked for from outside the job (``ckpt
  request``), until the job takes it; ``ID.outcome.json``: what became of it (accepted, saved,
  failed). A hidden folder, so never listed as a checkpoint and never touched by cleanup.
- ``ROOT/.ckpt-blobs/SHA256``: on object stores, a file of frozen tensors stored once for every
  checkpoint whose sidecar entry names it (``"blob": SHA256``); ``SHA256.ref-TXID``: a save that
  is about to commit a sidecar naming it (removed after the commit). Freed by `_blobs.collect`
  only when no committed sidecar names it and it and its markers are older than a grace period.
"""

from __future__ import annotations

from ._sidecar import BLOBS_DIR, SIDECAR_NAME

__all__ = [
    "BLOBS_DIR",
    "BLOB_REF_INFIX",
    "MARKER",
    "MODEL_INDEX",
    "MODEL_PREFIX",
    "OPTIMIZER_FILE",
    "OUTCOME_SUFFIX",
    "REQUESTS_DIR",
    "REQUEST_SUFFIX",
    "SIDECAR",
    "STAGING_PREFIX",
    "TMP_INFIX",
    "TRAINER_STATE_FILE",
    "TRAINING_STATE_FILE",
    "TRASH_PREFIX",
    "default_name",
    "is_library_temp",
    "is_model_weights",
    "outcome_file",
    "request_file",
]

SIDECAR = SIDECAR_NAME
MODEL_PREFIX = "model"
MODEL_INDEX = "model.safetensors.index.json"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINING_STATE_FILE = "training_state.json"
TRAINER_STATE_FILE = "trainer_state.json"
MARKER = ".ckpt-incomplete"
STAGING_PREFIX = ".ckpt-staging-"
TRASH_PREFIX = ".ckpt-trash-"
TMP_INFIX = ".tmp-"
REQUESTS_DIR = ".ckpt-requests"
REQUEST_SUFFIX = ".request.json"
OUTCOME_SUFFIX = ".outcome.json"
BLOB_REF_INFIX = ".ref-"


def default_name(step: int) -> str:
    return f"checkpoint-{step}"


def request_file(request_id: str) -> str:
    return f"{REQUESTS_DIR}/{request_id}{REQUEST_SUFFIX}"


def outcome_file(request_id: str) -> str:
    return f"{REQUESTS_DIR}/{request_id}{OUTCOME_SUFFIX}"


def is_model_weights(rel: str) -> bool:
    """Whether ``rel`` is one of the model's safetensors files (``model.safetensors`` or a shard)."""
    return "/" not in rel and rel.startswith(MODEL_PREFIX) and rel.endswith(".safetensors")


def is_library_temp(rel: str) -> bool:
    """A file of a checkpoint folder that the library writes only for a moment (lease, sidecar rewrite)."""
    base = rel.rsplit("/", 1)[-1]
    return base == MARKER or base.startswith(SIDECAR + TMP_INFIX)
