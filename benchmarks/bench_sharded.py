#!/usr/bin/env python
"""Sharded (FSDP2) save / restore benchmark on 2 processes (CPU, gloo): ckpt_callback vs DCP alone.

    python benchmarks/bench_sharded.py [--quick] [--runs N] [--n-layer L] [--out FILE]

Run plainly, the script launches itself under
``torchrun --standalone --nproc_per_node=2`` (or run it under torchrun yourself).
Every rank builds the same GPT-2-shaped model from a ``GPT2Config`` (random init, nothing
downloaded; ``--quick``: 2 layers, n_embd=64), wraps every block with FSDP2 ``fully_shard`` and
then the root, and takes one AdamW step so the optimizer state exists. Then, in the same
process pair and interleaved (round 0 of every row, then round 1, ...; the order of the rows
rotates every round; the first round is an untimed warm-up), it measures:

Saves (every rank calls the method at the same moment, right after a barrier):

* ``ours_sync``       ``CheckpointManager(dir).save(model, step=, optimizer=opt)`` (sync; returns
                      once committed, i.e. every rank's shards and the sidecar are fsynced);
* ``ours_async``      ``CheckpointManager(dir, async_save=True).save(...)``: stall = until save()
                      returns, durable = until ``wait()`` returns (one manager for all rounds:
                      its staging buffers are allocated by the warm-up save and reused);
* ``dcp_save``        ``get_state_dict(model, opt)`` + ``dcp.save({"model", "optim"}, checkpoint_id=dir)``
                      (FileSystemWriter, which fsyncs its files);
* ``dcp_async_save``  the same through ``dcp.async_save`` with its default stager (a new
                      ``DefaultStager`` per call, closed when the upload finishes), on a
                      dedicated gloo group: stall = until it returns, durable = until the upload
                      future is done;
* ``dcp_async_save_reused_stager``  the same with one ``DefaultStager`` kept for all rounds (its
                      staging copies are cached and reused, like our staging buffers);
* ``full_rank0_model``  ``get_state_dict(..., StateDictOptions(full_state_dict=True, cpu_offload=True))``
                      (a gather to rank 0), then rank 0 alone ``CheckpointManager(dir).save(full model
                      state, step=)``; the other ranks wait at a barrier;
* ``full_rank0_model_optim``  the same with the full optimizer state dict passed as
                      ``extra_state={"optimizer": ...}``.

A row's time for one round is the largest over the ranks (each rank measures from the same
barrier to the end of its own call). Between rounds every output is deleted and ``os.sync()`` run.

Restores (every rank, into the live FSDP2 model and optimizer, whose local shards are first
perturbed, untimed, so a restore that did nothing would be caught; the restored values are
compared with the saved ones after every round). Before every restore the page cache is dropped
(``os.sync()`` + ``echo 3 > /proc/sys/vm/drop_caches``) when allowed:

* ``ours_restore``    ``CheckpointManager(dir).restore(name, model=model, optimizer=opt)`` (verify=True);
* ``dcp_load``        ``get_state_dict`` + ``dcp.load(..., checkpoint_id=dir)`` + ``set_state_dict``.

Medians over the rounds; ratios are of medians, against ``dcp_save`` (saves) and ``dcp_load``
(restores), from the same invocation. The section "Sharded saves (FSDP2, 2 processes)" of
BENCHMARKS.md is (re)written; the rest of the file is kept.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
HEADING = "## Sharded saves (FSDP2, 2 processes)"
NPROC = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model (2 layers, n_embd=64): a smoke run")
    p.add_argument("--n-layer", type=int, default=None, help="GPT-2 layers (default 12: GPT-2 small, 124M)")
    p.add_argument("--untie", action="store_true",
                   help="untie GPT-2's lm_head from wte (tie_word_embeddings=False; 163M parameters at 12 layers)")
    p.add_argument("--cold-restore", action="store_true",
                   help="drop the page cache before every restore (on a VM with free-page reporting this "
                        "also slows the next saves: the page cache must be faulted in from the host again)")
    p.add_argument("--runs", type=int, default=3, help="measured rounds (after 1 untimed warm-up round)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dir", default=None, help="scratch folder (default: a new one under $TMPDIR)")
    p.add_argument("--rows", default=None, help="comma-separated subset of rows")
    p.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "BENCHMARKS.md"),
                   help="Markdown file whose sharded section is written ('' or '-': don't write)")
    return p.parse_args(argv)


def launch(argv: list[str]) -> int:
    """Not under torchrun: run this script under torchrun with NPROC processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}",
           os.path.abspath(__file__), *argv]
    print("+ " + " ".join(cmd), flush=True)
    os.execv(sys.executable, cmd)
    return 1  # not reached


# =============================================================================
# Worker side (under torchrun)
# =============================================================================

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, HERE)
from _measure import write_section  # noqa: E402
from bench_save import drop_page_cache, machine_info, read_loadavg, tree_bytes  # noqa: E402

RANK = 0
WORLD = 1


def log(msg: str) -> None:
    if RANK == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)  # the same init on every rank
    if args.quick:
        cfg = GPT2Config(n_layer=args.n_layer or 2, n_embd=64, n_head=4, tie_word_embeddings=not args.untie)
    else:
        cfg = GPT2Config(n_layer=args.n_layer or 12, tie_word_embeddings=not args.untie)
    model = GPT2LMHeadModel(cfg)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    x = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(RANK))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt, (cfg, n_params)


def local_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """This rank's local shards of every parameter and optimizer state tensor (live objects)."""
    out = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                out.append(v.to_local() if hasattr(v, "to_local") else v)
    return out


def local_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for t in local_tensors(model, opt))


# --- the rows ---------------------------------------------------------------------------------

class Ctx:
    def __init__(self, args: argparse.Namespace, model: torch.nn.Module, opt: torch.optim.Optimizer, root: str):
        self.args = args
        self.model = model
        self.opt = opt
        self.root = root
        self.round = 0
        self.state: dict[str, Any] = {}  # per-row state kept across rounds
        self.async_group = dist.new_group(backend="gloo")  # for dcp.async_save's background collectives

    def fresh(self, name: str, *, keep: bool = False) -> str:
        """A new empty folder (same path on every rank) for this row's output this round (``keep``:
        one kept for every round, not deleted after it)."""
        d = os.path.join(self.root, f"keep-{name}" if keep else f"{name}-r{self.round}")
        if RANK == 0:
            os.makedirs(d, exist_ok=False)
        dist.barrier()
        return d


ROWS: dict[str, dict[str, Any]] = {}


def row(name: str, kind: str = "save", doc: str = "") -> Callable[[Callable[[Ctx], dict[str, float]]], Any]:
    def deco(fn: Callable[[Ctx], dict[str, float]]) -> Callable[[Ctx], dict[str, float]]:
        ROWS[name] = {"fn": fn, "kind": kind, "doc": doc or " ".join((fn.__doc__ or "").split())}
        return fn

    return deco


def start() -> float:
    dist.barrier()
    return time.perf_counter()


@row("ours_sync")
def ours_sync(c: Ctx) -> dict[str, float]:
    """`CheckpointManager(dir, keep_last=None).save(model, step=s, optimizer=opt)`, sync (returns committed + fsynced)
    """
    from ckpt_callback import CheckpointManager

    d = c.fresh("ours_sync")
    mgr = CheckpointManager(d, keep_last=None)
    t0 = start()
    mgr.save(c.model, step=c.round + 1, optimizer=c.opt)
    t = time.perf_counter() - t0
    mgr.close()
    c.state["bytes:ours_sync"] = tree_bytes(d) if RANK == 0 else 0
    return {"durable": t}


@row("ours_sync_consolidated")
def ours_sync_consolidated(c: Ctx) -> dict[str, float]:
    """The same with `consolidate="always"`: rank 0 also merges the model shards into HF-layout weights and drops
    the shards (what a `final` save does by default)
    """
    from ckpt_callback import CheckpointManager

    d = c.fresh("ours_sync_consolidated")
    mgr = CheckpointManager(d, keep_last=None, consolidate="always")
    t0 = start()
    mgr.save(c.model, step=c.round + 1, optimizer=c.opt)
    t = time.perf_counter() - t0
    mgr.close()
    c.state["bytes:ours_sync_consolidated"] = tree_bytes(d) if RANK == 0 else 0
    return {"durable": t}


@row("ours_async")
def ours_async(c: Ctx) -> dict[str, float]:
    """`CheckpointManager(dir, async_save=True).save(...)`: stall until it returns, durable until `wait()` returns (one
    manager for all rounds: warm staging buffers)
    """
    from ckpt_callback import CheckpointManager

    st = c.state.setdefault("ours_async", {})
    if "mgr" not in st:
        d = c.fresh("ours_async", keep=True)
        st["dir"], st["mgr"] = d, CheckpointManager(d, keep_last=None, async_save=True)
    mgr = st["mgr"]
    t0 = start()
    info = mgr.save(c.model, step=c.round + 1, optimizer=c.opt)
    t1 = time.perf_counter()
    mgr.wait()
    t2 = time.perf_counter()
    dist.barrier()
    if RANK == 0:  # untimed: keep the disk from filling up
        mgr.delete(info.name)
    return {"stall": t1 - t0, "durable": t2 - t0}


def _dcp_state(c: Ctx) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(c.model, c.opt)
    return {"model": msd, "optim": osd}


@row("dcp_save")
def dcp_save(c: Ctx) -> dict[str, float]:
    """`get_state_dict(model, opt)` + `dcp.save({"model": ..., "optim": ...}, checkpoint_id=dir)` (FileSystemWriter,
    fsyncs)
    """
    import torch.distributed.checkpoint as dcp

    d = c.fresh("dcp_save")
    t0 = start()
    dcp.save(_dcp_state(c), checkpoint_id=d)
    t = time.perf_counter() - t0
    c.state["bytes:dcp_save"] = tree_bytes(d) if RANK == 0 else 0
    return {"durable": t}


@row("dcp_save_hf_writer")
def dcp_save_hf_writer(c: Ctx) -> dict[str, float]:
    """`get_state_dict(model, opt)` + `dcp.save(model state (a tied weight under its first name only),
    storage_writer=HuggingFaceStorageWriter(dir/sharded, save_distributed=True))` + the same for the optimizer's
    tensors (flattened) into dir/optimizer: DCP's HF safetensors writer, which our sharded save uses, without our
    hashing and commit
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    d = c.fresh("dcp_save_hf_writer")
    t0 = start()
    sd = _dcp_state(c)
    # safetensors refuses two names for one storage: keep the first name of a tied parameter
    seen: set[int] = set()
    aliases = set()
    for fqn, p in c.model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases.add(fqn)
        seen.add(id(p))
    sd["model"] = {k: v for k, v in sd["model"].items() if k not in aliases}
    optim = {f"state.{fqn}.{k}": v for fqn, st in sd["optim"]["state"].items() for k, v in st.items()
             if torch.is_tensor(v)}
    for sub, tensors in (("sharded", sd["model"]), ("optimizer", optim)):
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(os.path.join(d, sub), save_distributed=True))
    t = time.perf_counter() - t0
    c.state["bytes:dcp_save_hf_writer"] = tree_bytes(d) if RANK == 0 else 0
    return {"durable": t}


def _dcp_async(c: Ctx, name: str, stager: Any) -> dict[str, float]:
    import torch.distributed.checkpoint as dcp

    d = c.fresh(name)
    t0 = start()
    res = dcp.async_save(_dcp_state(c), checkpoint_id=d, process_group=c.async_group, async_stager=stager)
    t1 = time.perf_counter()
    upload = getattr(res, "upload_completion", res)  # AsyncSaveResponse or a Future
    upload.result()
    t2 = time.perf_counter()
    return {"stall": t1 - t0, "durable": t2 - t0}


@row("dcp_async_save")
def dcp_async_save(c: Ctx) -> dict[str, float]:
    """`dcp.async_save(...)` with its default stager (a new `DefaultStager` per call), thread executor, own gloo group:
    stall until it returns, durable until the upload future is done
    """
    return _dcp_async(c, "dcp_async_save", None)


@row("dcp_async_save_reused_stager")
def dcp_async_save_reused(c: Ctx) -> dict[str, float]:
    """the same with one `DefaultStager(StagingOptions(False, False, False, False))` kept for all rounds (its staging
    copies cached and reused)
    """
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    if "stager" not in c.state:
        c.state["stager"] = DefaultStager(StagingOptions(False, False, False, False))
    return _dcp_async(c, "dcp_async_save_reused_stager", c.state["stager"])


def _full_rank0(c: Ctx, name: str, with_optim: bool) -> dict[str, float]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from ckpt_callback import CheckpointManager

    d = c.fresh(name)
    mgr = CheckpointManager(d, keep_last=None) if RANK == 0 else None
    t0 = start()
    msd, osd = get_state_dict(c.model, c.opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    t_gather = time.perf_counter() - t0
    if RANK == 0:
        assert mgr is not None
        mgr.save(msd, step=c.round + 1, extra_state={"optimizer": osd} if with_optim else None)
    del msd, osd
    dist.barrier()
    t = time.perf_counter() - t0
    if mgr is not None:
        mgr.close()
    c.state[f"bytes:{name}"] = tree_bytes(d) if RANK == 0 else 0
    return {"durable": t, "gather": t_gather}


@row("full_rank0_model")
def full_rank0_model(c: Ctx) -> dict[str, float]:
    """`get_state_dict(..., StateDictOptions(full_state_dict=True, cpu_offload=True))`, then rank 0
    `CheckpointManager(dir).save(full model state dict, step=s)`; other ranks wait at a barrier
    """
    return _full_rank0(c, "full_rank0_model", with_optim=False)


@row("full_rank0_model_optim")
def full_rank0_model_optim(c: Ctx) -> dict[str, float]:
    """the same, with the full optimizer state dict saved too (`extra_state={"optimizer": full optim state dict}`)"""
    return _full_rank0(c, "full_rank0_model_optim", with_optim=True)


# --- restores ---------------------------------------------------------------------------------


def _perturb(c: Ctx) -> list[torch.Tensor]:
    """Untimed: remember this rank's saved shards, then change them all (so a no-op restore is caught)."""
    live = local_tensors(c.model, c.opt)
    saved = [t.detach().clone() for t in live]
    with torch.no_grad():
        for t in live:
            t.add_(1)
    return saved


def _check(c: Ctx, saved: list[torch.Tensor], name: str) -> None:
    live = local_tensors(c.model, c.opt)
    ok = len(live) == len(saved) and all(torch.equal(a, b) for a, b in zip(live, saved, strict=True))
    flags: list[Any] = [None] * WORLD
    dist.all_gather_object(flags, ok)
    c.state.setdefault(f"exact:{name}", []).append(all(flags))


def _cold(c: Ctx) -> None:
    if not c.args.cold_restore:
        c.state["cold"] = False
        return
    dist.barrier()
    ok = drop_page_cache() if RANK == 0 else True
    c.state["cold"] = c.state.get("cold", True) and ok
    dist.barrier()


@row("ours_restore", kind="restore")
def ours_restore(c: Ctx) -> dict[str, float]:
    """`CheckpointManager(dir).restore(name, model=fsdp_model, optimizer=opt)` (verify=True: every file's sha256
    checked first)
    """
    from ckpt_callback import CheckpointManager

    if "ours_restore_dir" not in c.state:  # untimed, once: a checkpoint of the current state
        d = c.fresh("ours_restore_src", keep=True)
        mgr = CheckpointManager(d, keep_last=None)
        mgr.save(c.model, step=1, optimizer=c.opt)
        mgr.close()
        c.state["ours_restore_dir"] = d
    d = c.state["ours_restore_dir"]
    saved = _perturb(c)
    mgr = CheckpointManager(d, keep_last=None)
    _cold(c)
    t0 = start()
    mgr.restore("checkpoint-1", model=c.model, optimizer=c.opt)
    t = time.perf_counter() - t0
    mgr.close()
    _check(c, saved, "ours_restore")
    return {"time": t}


@row("dcp_load", kind="restore")
def dcp_load(c: Ctx) -> dict[str, float]:
    """`get_state_dict(model, opt)` + `dcp.load(sd, checkpoint_id=dir)` + `set_state_dict(model, opt, ...)`"""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if "dcp_load_dir" not in c.state:
        d = c.fresh("dcp_load_src", keep=True)
        dcp.save(_dcp_state(c), checkpoint_id=d)
        c.state["dcp_load_dir"] = d
    d = c.state["dcp_load_dir"]
    saved = _perturb(c)
    _cold(c)
    t0 = start()
    sd = _dcp_state(c)
    dcp.load(sd, checkpoint_id=d)
    set_state_dict(c.model, c.opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    t = time.perf_counter() - t0
    _check(c, saved, "dcp_load")
    return {"time": t}


# --- driver -----------------------------------------------------------------------------------


def cleanup_round(c: Ctx) -> None:
    dist.barrier()
    if RANK == 0:
        for n in os.listdir(c.root):
            p = os.path.join(c.root, n)
            if n.endswith(f"-r{c.round}"):
                shutil.rmtree(p, ignore_errors=True)
        os.sync()
    dist.barrier()


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    return f"{med(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}]"


def ratio(a: list[float], b: list[float]) -> str:
    return f"{med(a) / med(b):.2f}x" if a and b and med(b) > 0 else "n/a"


def render(args: argparse.Namespace, meta: dict[str, Any], results: dict[str, list[list[dict[str, float]]]],
           errors: dict[str, str], c: Ctx) -> str:
    """results[row] = one entry per measured round: the list of every rank's metrics."""

    def per_round_max(name: str, key: str) -> list[float]:
        return [max(r[key] for r in ranks) for ranks in results.get(name, []) if all(key in r for r in ranks)]

    def per_rank(name: str, key: str, rank: int) -> list[float]:
        return [ranks[rank][key] for ranks in results.get(name, []) if key in ranks[rank]]

    cfg, n_params = meta["cfg"], meta["n_params"]
    size = "GPT-2 small (`GPT2Config()` defaults: 12 layers" if cfg.n_layer == 12 and cfg.n_embd == 768 else \
        f"GPT-2-shaped `GPT2Config(n_layer={cfg.n_layer}, n_embd={cfg.n_embd}, n_head={cfg.n_head})` ("
    size += f"{', ' if size.endswith('layers') else ''}{n_params:,} parameters"
    size += ("; lm_head.weight tied to transformer.wte.weight)" if cfg.tie_word_embeddings
             else "; `tie_word_embeddings=False`: lm_head untied)")
    lines = [
        HEADING,
        "",
        f"Issue 11, item 8. `python benchmarks/bench_sharded.py{' --quick' if args.quick else ''}"
        f"{' --untie' if args.untie else ''}{' --cold-restore' if args.cold_restore else ''}"
        f"{f' --n-layer {args.n_layer}' if args.n_layer else ''} --runs {args.runs}` ({meta['date']}; runs itself "
        f"under `torchrun --standalone --nproc_per_node={NPROC}`, CPU, gloo; {meta['wall']:.0f} s in all). "
        f"Model: {size}, built from config with random init, fp32; every GPT-2 block wrapped with FSDP2 "
        "`fully_shard`, then the root, on a 1-D mesh of the 2 ranks; `torch.optim.AdamW` after one real step. "
        f"Each rank holds {meta['local_mb'][0]:.0f} / {meta['local_mb'][1]:.0f} MB of parameter + optimizer "
        f"shards (ranks 0 / 1); full state {meta['full_mb']:.0f} MB. ckpt_callback at commit `{meta['commit']}`.",
        "",
        f"Machine: {meta['machine']['cpu']}, {os.cpu_count()} logical cores shared by the 2 ranks (torch intra-op "
        f"threads per rank: {meta['threads']}, torchrun's default) and by other processes on this VM; "
        f"{meta['machine']['ram']} RAM; output on {meta['machine']['disk']}; {meta['machine']['software']}. "
        f"Load average (1/5/15 min) before: {meta['load_before']}, after: {meta['load_after']}.",
        "",
        f"{args.warmup} untimed warm-up round, then {args.runs} measured rounds; rows interleaved (every row once "
        "per round, the order rotated every round), so drift and the page cache hit every row alike. Each rank "
        "times from a common barrier to the end of its own call; a round's time is the largest over the ranks. "
        "Median [min-max] seconds over the measured rounds; ratios are ratios of medians against `dcp_save` "
        "(durable) from this same run. Every output is deleted and `os.sync()` run after each round.",
        "",
        "### Saves",
        "",
        "| row | stall s (max over ranks) | durable s (max over ranks) | stall vs dcp_save | durable vs dcp_save "
        "| rank 0 / rank 1 durable s (medians) | on disk MB | what is timed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = per_round_max("dcp_save", "durable")
    for name, r in ROWS.items():
        if r["kind"] != "save" or (name not in results and name not in errors):
            continue
        if name in errors:
            lines.append(f"| `{name}` | FAILED | | | | | | {r['doc']}: `{errors[name]}` |")
            continue
        stall = per_round_max(name, "stall") or per_round_max(name, "durable")
        durable = per_round_max(name, "durable")
        r0, r1 = per_rank(name, "durable", 0), per_rank(name, "durable", 1)
        extra = ""
        if name.startswith("full_rank0"):
            g = per_round_max(name, "gather")
            extra = f" Gather (`get_state_dict` full) alone: {fmt(g)} s."
        nbytes = c.state.get(f"bytes:{name}")
        disk = f"{nbytes / 1e6:.0f}" if nbytes else "—"
        lines.append(
            f"| `{name}` | {fmt(stall)} | {fmt(durable)} | {ratio(stall, base)} | {ratio(durable, base)} | "
            f"{med(r0):.2f} / {med(r1):.2f} | {disk} | {r['doc']}.{extra} |"
        )
    cold = c.state.get("cold")
    lines += [
        "",
        "Stall = time until the call returns (the training thread is blocked); for sync rows it is the "
        "durable time. Durable = until the data is fsynced and (ours) committed.",
        "",
    ]

    def m(name: str, key: str = "durable") -> float | None:
        xs = per_round_max(name, key)
        return med(xs) if xs else None

    notes = []
    ours, hf, plain = m("ours_sync"), m("dcp_save_hf_writer"), m("dcp_save")
    if ours and hf and plain:
        notes.append(
            f"- Where the sync save's time goes: DCP's HF safetensors writer alone takes {hf / plain:.2f}x "
            f"`dcp_save` ({hf:.2f} s vs {plain:.2f} s; for each file it builds the whole safetensors file in "
            "memory with `safetensors.torch.save` and then writes it in one call, where the FileSystemWriter "
            f"streams each tensor); ours takes {ours / hf:.2f}x the HF writer ({ours - hf:+.2f} s): on top of it, "
            "sha256 of every byte on the write path, per-rank RNG files, the rank-0 commit (sidecar) and its "
            "collectives.")
    cons = m("ours_sync_consolidated")
    if ours and cons:
        notes.append(
            f"- Consolidation: a sync save that also merges the model into HF-layout weights takes {cons / ours:.2f}x "
            f"the sharded one ({cons:.2f} s vs {ours:.2f} s). It is rank 0's alone (it reads the model's shards back, "
            "holds the whole model in host memory once and writes it again), so its share grows with the world size "
            "while a sharded save's shrinks: only `final` saves consolidate by default (`consolidate=`), and "
            "`ckpt export` makes an HF folder of any checkpoint.")
    oa, oa_stall = m("ours_async"), m("ours_async", "stall")
    da, da_stall = m("dcp_async_save"), m("dcp_async_save", "stall")
    dr, dr_stall = m("dcp_async_save_reused_stager"), m("dcp_async_save_reused_stager", "stall")
    if oa and oa_stall and da and da_stall:
        extra = (f", {oa_stall / dr_stall:.2f}x with a reused stager ({dr_stall:.2f} s)"
                 if dr and dr_stall else "")
        notes.append(
            f"- Async stall per rank: ours {oa_stall:.2f} s = {oa_stall / da_stall:.2f}x `dcp.async_save`'s "
            f"({da_stall:.2f} s){extra}; until durable ours takes {oa:.2f} s, `dcp.async_save` {da:.2f} s.")
    f0, f1 = m("full_rank0_model"), m("full_rank0_model_optim")
    g0, g1 = m("full_rank0_model", "gather"), m("full_rank0_model_optim", "gather")
    if f0 and f1 and ours and g0 and g1:
        notes.append(
            f"- Rank-0 full-state saves: model only {f0:.2f} s, model + optimizer {f1:.2f} s "
            f"({f1 / ours:.2f}x our sharded save of the same state), of which the gather to rank 0 "
            f"(`get_state_dict` with `full_state_dict=True, cpu_offload=True`) is {g0:.2f} s / {g1:.2f} s; every "
            "rank waits for the whole of it, and rank 0 holds the full state in memory.")
    lines += [
        *notes,
        "",
        "### Restores",
        "",
        ("Cache state: cold (before every restore `os.sync()` + `echo 3 > /proc/sys/vm/drop_caches` succeeded; "
         "host-side caching of the virtual disk is outside our control)." if cold else
         "Cache state: warm (the page cache is not dropped; each checkpoint was written once, in the warm-up "
         "round, and read in every round; `--cold-restore` drops it before each restore).")
        + " The live model's and optimizer's local shards are changed (untimed) before each restore and compared "
        "with the saved values after it.",
        "",
        "| row | time s (max over ranks) | vs dcp_load | rank 0 / rank 1 s (medians) | values exact after restore "
        "| what is timed |",
        "|---|---|---|---|---|---|",
    ]
    base_r = per_round_max("dcp_load", "time")
    for name, r in ROWS.items():
        if r["kind"] != "restore" or (name not in results and name not in errors):
            continue
        if name in errors:
            lines.append(f"| `{name}` | FAILED | | | | {r['doc']}: `{errors[name]}` |")
            continue
        t = per_round_max(name, "time")
        exact = c.state.get(f"exact:{name}", [])
        lines.append(
            f"| `{name}` | {fmt(t)} | {ratio(t, base_r)} | {med(per_rank(name, 'time', 0)):.2f} / "
            f"{med(per_rank(name, 'time', 1)):.2f} | {sum(exact)}/{len(exact)} rounds (incl. warm-up) | {r['doc']} |"
        )
    return "\n".join(lines) + "\n"


def git_commit() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "-C", os.path.dirname(HERE), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", os.path.dirname(HERE), "status", "--porcelain", "src"],
                               capture_output=True, text=True).stdout.strip()
        return out + (" + uncommitted changes in src/" if dirty else "")
    except Exception:
        return "?"


def worker(args: argparse.Namespace) -> int:
    global RANK, WORLD
    t_start = time.perf_counter()
    dist.init_process_group("gloo")
    RANK, WORLD = dist.get_rank(), dist.get_world_size()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torch.distributed.checkpoint.*")
    load_before = " ".join(read_loadavg())

    root_obj: list[Any] = [None]
    if RANK == 0:
        root_obj[0] = args.dir or tempfile.mkdtemp(prefix="bench_sharded-")
        os.makedirs(root_obj[0], exist_ok=True)
    dist.broadcast_object_list(root_obj, src=0)
    root = root_obj[0]

    log(f"building the model (quick={args.quick}) in {root}")
    model, opt, (cfg, n_params) = build(args)
    local = [None] * WORLD
    dist.all_gather_object(local, local_bytes(model, opt) / 1e6)
    log(f"{n_params:,} params; local shard MB per rank: {local}")
    c = Ctx(args, model, opt, root)

    names = [n for n in ROWS if not args.rows or n in args.rows.split(",")]
    saves = [n for n in names if ROWS[n]["kind"] == "save"]
    restores = [n for n in names if ROWS[n]["kind"] == "restore"]
    results: dict[str, list[list[dict[str, float]]]] = {}
    errors: dict[str, str] = {}
    total = args.warmup + args.runs
    for rnd in range(total):
        c.round = rnd
        k = rnd % max(1, len(saves))
        order = saves[k:] + saves[:k]
        k = rnd % max(1, len(restores))
        order += restores[k:] + restores[:k]
        for name in order:
            if name in errors:
                continue
            try:
                m = ROWS[name]["fn"](c)
                err = None
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # DCP's CheckpointException is a BaseException
                traceback.print_exc()
                m, err = {}, f"rank {RANK}: {type(exc).__name__}: " + " ".join(str(exc).split())
            gathered: list[Any] = [None] * WORLD
            dist.all_gather_object(gathered, (m, err))
            errs = [e for _, e in gathered if e]
            if errs:
                errors[name] = "; ".join(errs)[:400]
                log(f"round {rnd} {name}: FAILED {errors[name]}")
                continue
            ms = [g[0] for g in gathered]
            log(f"round {rnd}{' (warm-up)' if rnd < args.warmup else ''} {name}: " + ", ".join(
                f"{key}=" + "/".join(f"{r[key]:.2f}" for r in ms) for key in ms[0]))
            if rnd >= args.warmup:
                results.setdefault(name, []).append(ms)
        cleanup_round(c)

    st = c.state.get("ours_async")
    if st:
        st["mgr"].close()
    if "stager" in c.state:
        c.state["stager"].close()
    dist.barrier()
    if RANK == 0:
        meta = {
            "cfg": cfg, "n_params": n_params, "local_mb": local, "full_mb": sum(local),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "wall": time.perf_counter() - t_start, "machine": machine_info(root),
            "threads": torch.get_num_threads(), "load_before": load_before,
            "load_after": " ".join(read_loadavg()), "commit": git_commit(),
        }
        md = render(args, meta, results, errors, c)
        print(md, flush=True)
        if args.out not in ("", "-"):
            write_section(args.out, HEADING, md)
            print(f"wrote the section {HEADING!r} of {args.out}", flush=True)
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    dist.barrier()
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        return launch(argv)
    rc = worker(args)
    sys.stdout.flush()
    sys.stderr.flush()
    # Exit without interpreter finalization: a Gloo thread still releasing a collective's tensors
    # can abort a rank at exit (pytorch#190489; see README, "torchrun").
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
