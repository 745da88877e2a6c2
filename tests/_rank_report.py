"""What a torchrun worker of test_distributed.py reports: the checkpoints it saved and a digest of its weights."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import torch


class Saves(logging.Handler):
    """Collects the names of the "saved checkpoint-N" records this process logs."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("saved "):
            self.names.append(message.split()[1])


def watch_saves() -> Saves:
    handler = Saves()
    logger = logging.getLogger("ckpt_callback")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


def digest(model: torch.nn.Module) -> str:
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    return hashlib.sha256(params.numpy().tobytes()).hexdigest()[:16]


def report(rank: int, model: torch.nn.Module, saves: Saves, **fields: Any) -> None:
    """Write ``$REPORT_DIR/rank-N.json`` for the test to compare across ranks."""
    fields.update(rank=rank, saved=saves.names, params=digest(model))
    with open(os.path.join(os.environ["REPORT_DIR"], f"rank-{rank}.json"), "w") as f:
        json.dump(fields, f)
