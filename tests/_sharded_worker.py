"""A torchrun worker (or a plain process) of test_sharded.py: trains, saves and restores sharded models.

    python _sharded_worker.py train ROOT STOP [--tp] [--async] [--s3-options JSON]
        resume from ROOT's latest checkpoint (if any), train to step STOP saving every 2 steps,
        end with a final checkpoint; report the step and a digest of the full model and optimizer.
    python _sharded_worker.py restore ROOT NAME [--tp] [--plain]
        build a fresh model (FSDP2 or tensor parallel at this world size, or --plain: unsharded),
        restore NAME into it with its optimizer; report the same digest.

Faults, from the environment: CKPT_TEST_KILL=RANK:STEP[:before|after] SIGKILLs that rank right after
(or before) DCP writes its shards of the save at STEP; CKPT_TEST_FAIL=RANK:STEP makes that rank's write
fail (an OSError).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from _rank_report import Saves, finish, watch_saves
from ckpt_callback import CheckpointError, CheckpointHook, CheckpointManager

CURRENT_STEP = 0


def build(world: int, *, tp: bool, plain: bool) -> nn.Module:
    torch.manual_seed(0)
    if tp:
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 6))
    else:
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 5), nn.Linear(5, 3))
    if plain:
        return model
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    if tp:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        return parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def batch(step: int, rank: int, *, tp: bool) -> torch.Tensor:
    # Tensor parallel ranks see the same batch; data parallel ones their own.
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(100 * step + (0 if tp else rank)))


def full_digest(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, str]:
    """sha256 of the full (gathered) model and optimizer tensors, by name, the same at any world size."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    out = {}
    tensors = {f"model/{k}": v for k, v in model_sd.items()}
    for fqn, state in optim_sd["state"].items():
        tensors.update({f"optim/{fqn}/{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)})
    for key, t in sorted(tensors.items()):
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        out[key] = hashlib.sha256(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
    return out


def inject_faults(rank: int) -> None:
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    kill, fail = os.environ.get("CKPT_TEST_KILL"), os.environ.get("CKPT_TEST_FAIL")
    original = HuggingFaceStorageWriter.write_data

    def write_data(self, plan, planner):  # type: ignore[no-untyped-def]
        if fail and fail == f"{rank}:{CURRENT_STEP}":
            raise OSError(28, "No space left on device (injected)")
        if kill and kill == f"{rank}:{CURRENT_STEP}:before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(self, plan, planner)
        if kill and kill in (f"{rank}:{CURRENT_STEP}", f"{rank}:{CURRENT_STEP}:after"):
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    HuggingFaceStorageWriter.write_data = write_data  # type: ignore[method-assign]


def report(rank: int, saves: Saves | None, **fields: object) -> None:
    fields.update(rank=rank, saved=saves.names if saves else [])
    with open(os.path.join(os.environ["REPORT_DIR"], f"rank-{rank}.json"), "w") as f:
        json.dump(fields, f)


def hf_checkpoints(root: str, rank: int, world: int) -> None:
    """An FSDP2-sharded tiny GPT-2 saved with its config and tokenizer: an automatic checkpoint at step 1
    (sharded) and a final one at step 2 (consolidated); reports the live model's logits on PROBE."""
    import tempfile

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from test_hf import PROBE, tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {path.name: path.read_bytes() for path in Path(tmp).iterdir()}
    mesh = init_device_mesh("cpu", (world,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    manager = CheckpointManager(root)
    logits = {}
    for step, kind in ((1, "automatic"), (2, "final")):
        model.train()
        loss = model(PROBE, labels=PROBE).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        manager.save(model, step=step, type=kind, optimizer=optimizer, files=files, inference_ready=True)
        with torch.no_grad():
            logits[step] = model.eval()(PROBE).logits.tolist()
    manager.restore("checkpoint-1", model=model, optimizer=optimizer)  # sharded, with a tied LM head
    with torch.no_grad():
        logits["restored-1"] = model.eval()(PROBE).logits.tolist()
    report(rank, None, logits=logits)


def main() -> None:
    global CURRENT_STEP
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["train", "restore", "hf"])
    parser.add_argument("root")
    parser.add_argument("arg")
    parser.add_argument("--tp", action="store_true")
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--async", dest="async_save", action="store_true")
    parser.add_argument("--s3-options", default=None)
    parser.add_argument("--consolidate", default="final")
    args = parser.parse_args()
    options = {"storage_options": json.loads(args.s3_options)} if args.s3_options else {}

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s rank-log %(message)s")
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if args.mode == "hf":
        hf_checkpoints(args.root, rank, world)
        finish()
    inject_faults(rank)
    model = build(world, tp=args.tp, plain=args.plain or not distributed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    if args.mode == "train":
        saves = watch_saves()
        with CheckpointHook(args.root, model, optimizer=optimizer, every_n_steps=2, keep_last=None,
                            async_save=args.async_save, consolidate=args.consolidate, **options) as hook:
            start = hook.resume()
            for step in range(start + 1, int(args.arg) + 1):
                CURRENT_STEP = step
                loss = model(batch(step, rank, tp=args.tp)).pow(2).mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                hook.step(step, loss=loss.item())
        report(rank, saves, start=start, step=CURRENT_STEP, digest=full_digest(model, optimizer))
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                info = CheckpointManager(args.root, **options).restore(args.arg, model=model, optimizer=optimizer)
            except CheckpointError as exc:  # every rank must get here, none may hang
                report(rank, None, error=f"{type(exc).__name__}: {exc}")
            else:
                report(rank, None, step=info.step, digest=full_digest(model, optimizer),
                       warnings=[str(w.message) for w in caught if "RNG" in str(w.message)])
    if distributed:
        finish()


if __name__ == "__main__":
    main()
