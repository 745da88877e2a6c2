"""Why a root shows no checkpoints, when the reason is a common mix-up: a hint for the ``ckpt`` command.

Looked for only after a listing came back empty, with a bounded number of listings: ROOT is one
checkpoint folder (its parent is the root), ROOT holds roots below it (``runs/`` of ``runs/a``,
``runs/b``), or ROOT is an HF Trainer ``output_dir`` of ``checkpoint-N`` folders that
``ckpt import`` can register.
"""

from __future__ import annotations

import re

from ._errors import CheckpointError
from ._layout import SIDECAR, TRAINER_STATE_FILE
from ._storage import Storage

__all__ = ["empty_root_hint"]

_TRAINER_CHECKPOINT = re.compile(r"checkpoint-\d+")
_MAX_FOLDERS = 20  # subfolders looked into; a hint is not worth a walk of a whole bucket


def empty_root_hint(storage: Storage) -> str | None:
    """A one-line hint for a root without checkpoints, or None when nothing looks mixed up.

    Example:
        >>> s = Storage("memory://doc-hints/run")
        >>> s.write_bytes_atomic("checkpoint-5/trainer_state.json", b"{}")
        >>> print(empty_root_hint(s))  # doctest: +ELLIPSIS
        memory://doc-hints/run looks like an HF Trainer output_dir (checkpoint-5); register ... ckpt import ...
    """
    try:
        entries = storage.list_dir("")
    except CheckpointError:
        return None
    names = {name for name, kind in entries if kind == "file"}
    folders = sorted(name for name, kind in entries if kind == "directory" and not name.startswith("."))
    where = storage.display()
    if SIDECAR in names:
        parent = where.rstrip("/").rsplit("/", 1)[0] if "/" in where.rstrip("/") else "."
        return f"{where} is a checkpoint folder itself, not a root of checkpoints; try: ckpt list {parent}"
    trainer, roots = [], []
    for folder in folders[:_MAX_FOLDERS]:
        try:
            inside = storage.list_dir(folder)
        except CheckpointError:
            continue
        files = {name for name, kind in inside if kind == "file"}
        if _TRAINER_CHECKPOINT.fullmatch(folder) and TRAINER_STATE_FILE in files and SIDECAR not in files:
            trainer.append(folder)
            continue
        for sub in sorted(name for name, kind in inside if kind == "directory")[:_MAX_FOLDERS]:
            try:
                if any(name == SIDECAR for name, _ in storage.list_dir(f"{folder}/{sub}")):
                    roots.append(folder)
                    break
            except CheckpointError:
                continue
    if trainer:
        steps = sorted(trainer, key=lambda n: int(n.rsplit("-", 1)[1]))
        shown = ", ".join(steps[:3]) + (", ..." if len(steps) > 3 else "")
        return (f"{where} looks like an HF Trainer output_dir ({shown}); register its checkpoints with: "
                f"ckpt import NEW_ROOT {where}")
    if roots:
        shown = ", ".join(roots[:5]) + (", ..." if len(roots) > 5 else "")
        return f"{where} holds checkpoint roots below it ({shown}); try: ckpt list {where.rstrip('/')}/{roots[0]}"
    return None
