"""What a torchrun worker of test_distributed.py reports (the checkpoints it saved, a digest of its weights), and
how it shuts down."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from typing import Any, NoReturn

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


def finish() -> NoReturn:
    """Leave the process group as PyTorch asks, then exit 0 without finalizing the interpreter.

    `destroy_process_group()` alone does not make exiting safe: Gloo's worker threads run on while anything
    still holds the group (a DDP model does, even once deleted), and one of them may not yet have released
    the last collective's tensors (a `broadcast_object_list`'s, say). Releasing them takes the GIL; a thread
    asking a finalizing interpreter for it is ended by pthread_exit, which cannot unwind through the noexcept
    destructor it is in, so the process aborts: "terminate called without an active exception", now and
    then on a busy machine. With no finalization there is no such window.
    """
    torch.distributed.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
