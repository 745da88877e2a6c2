"""Frozen files stored once on object stores: the content-addressed blob area and its freeing pass.

On an object-store root a file of frozen tensors is kept at ``ROOT/.ckpt-blobs/<sha256>`` (the
sha256 of its stored bytes) and every checkpoint's sidecar entry for it names the blob
(``"blob": "<sha256>"``); its ``path`` stays the file's place in the checkpoint. Local roots use
hard links instead (`Transaction.reuse`).

Freeing without compare-and-swap:

- A save that commits a sidecar naming blob X first writes a marker ``X.ref-<writer>`` (and
  rewrites it just before the sidecar goes up, then checks that X is still there in full); the
  marker is removed after the commit.
- `collect` frees X only if X and every marker of it are older than `grace_seconds`, and, from a
  listing of every sidecar (committed and staged) taken *after* the candidates were chosen, none
  names X; the markers are looked at once more just before the literal delete. A killed save's
  blob and markers age past the grace period and are freed by the same pass.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

from ._errors import CheckpointNotFoundError, SidecarError
from ._layout import BLOB_REF_INFIX, BLOBS_DIR, SIDECAR
from ._sidecar import CheckpointInfo
from ._storage import Storage

__all__ = ["GRACE_ENV", "blob_path", "collect", "grace_seconds", "present", "ref_path"]

logger = logging.getLogger("ckpt_callback")

GRACE_ENV = "CKPT_BLOB_GRACE_SECONDS"
_DEFAULT_GRACE = 120.0  # two lease periods (`LEASE_SECONDS`): longer than any marker-to-commit step
_SHA = re.compile(r"[0-9a-f]{64}")


def grace_seconds() -> float:
    """How old an unreferenced blob and its markers must be before `collect` frees it (``CKPT_BLOB_GRACE_SECONDS``)."""
    raw = os.environ.get(GRACE_ENV)
    try:
        return max(0.0, float(raw)) if raw else _DEFAULT_GRACE
    except ValueError:
        return _DEFAULT_GRACE


def blob_path(sha: str) -> str:
    return f"{BLOBS_DIR}/{sha}"


def ref_path(sha: str, writer: str) -> str:
    return f"{BLOBS_DIR}/{sha}{BLOB_REF_INFIX}{writer}"


def _ages(listed: dict[str, dict[str, Any]], now: float) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Per blob sha: the newest time of it and its markers; and every file of the area that belongs to it."""
    from ._commit import _seconds

    newest: dict[str, float] = {}
    owned: dict[str, list[str]] = {}
    for rel, detail in listed.items():
        sha, _, ref = rel.partition(BLOB_REF_INFIX)
        if "/" in rel or not _SHA.fullmatch(sha) or (ref == "" and rel != sha):
            continue  # not a file this library writes there: never touched
        t = _seconds(detail)
        newest[sha] = max(newest.get(sha, 0.0), now if t is None else t)
        owned.setdefault(sha, []).append(rel)
    return newest, owned


def _referenced(storage: Storage) -> set[str] | None:
    """Every blob named by a sidecar under the root (checkpoints and staged replacements); None if one is unreadable."""
    names: set[str] = set()
    for rel in storage.list_files(""):
        top, _, inner = rel.partition("/")
        if inner != SIDECAR or top == BLOBS_DIR:
            continue
        try:
            info = CheckpointInfo.loads(storage.read_bytes(rel), where=storage.display(rel))
        except CheckpointNotFoundError:
            continue  # deleted while we looked
        except SidecarError as exc:
            logger.warning("not freeing shared blobs of %s: %s", storage.display(), exc)
            return None
        names.update(e.blob for e in info.files if e.blob is not None)
    return names


def collect(storage: Storage, grace: float | None = None) -> list[str]:
    """Free the blobs no sidecar names any more, and markers older than the grace; returns the files removed.

    Safe against a concurrent save: see the module docstring. Never raises for a failed delete
    (logged; the next pass retries).
    """
    if storage.is_local:
        return []
    grace = grace_seconds() if grace is None else grace
    now = time.time()
    newest, _ = _ages(storage.list_files(BLOBS_DIR), now)
    candidates = {sha for sha, t in newest.items() if now - t >= grace}
    if not candidates:
        return []
    referenced = _referenced(storage)  # listed after the candidates were chosen
    if referenced is None:
        return []
    removed: list[str] = []
    for sha in sorted(candidates):
        again, owned = _ages(storage.list_files(BLOBS_DIR), time.time())
        if sha not in again or time.time() - again[sha] < grace:
            continue  # a save touched it meanwhile
        if sha in referenced:  # in use: only the stale markers killed saves left go
            files = [rel for rel in owned[sha] if rel != sha]
        else:
            files = sorted(owned[sha], key=lambda rel: rel != sha)  # the blob first, then its markers
        for name in files:
            rel = f"{BLOBS_DIR}/{name}"  # a literal path, never a glob
            try:
                storage.remove(rel)
                removed.append(rel)
            except Exception as exc:
                logger.warning("could not free %s: %s", storage.display(rel), exc)
                break
    for rel in removed:
        logger.info("freed %s", storage.display(rel))
    return removed


def present(storage: Storage) -> dict[str, int]:
    """The blobs of the area with their sizes (markers left out)."""
    out = {}
    for rel, detail in storage.list_files(BLOBS_DIR).items():
        if _SHA.fullmatch(rel):
            out[rel] = int(detail.get("size") or 0)
    return out
