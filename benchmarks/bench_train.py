#!/usr/bin/env python
"""Training throughput with and without background checkpoint saves (issue 7, item 3).

    python benchmarks/bench_train.py [--layers 6] [--batch 1] [--seq 64] [--steps 29] [--every 10]
                                     [--rounds 3] [--threads N] [--small] [--out BENCHMARKS.md]

Trains a GPT-2 built from a config (random init, never downloads) with AdamW on random tokens
and measures steps/s for four configurations, each on a fresh `CheckpointHook`:

* ``none``      -- no checkpointing (the reference);
* ``async_2``   -- ``CheckpointHook(..., every_n_steps=K, async_save=True, save_threads=2)``;
* ``async_1``   -- the same with ``save_threads=1`` (sha256 inline in the writer thread);
* ``sync``      -- ``CheckpointHook(..., every_n_steps=K)``, blocking saves.

A timed run is ``--steps`` steps; saves fall on steps K, 2K, ... (K = ``--every``); the default
29 = 3 x 10 - 1 ends the run K-1 steps after the last save, so every background save has the same
number of training steps to overlap with. The time
of a step is forward + backward + optimizer step + ``hook.step()`` (which includes the save's
stall). Configurations are interleaved over ``--rounds`` rounds. torch's intra-op thread count is
left at torch's default and reported. Writes the section "## Training throughput with background
saves" into BENCHMARKS.md, keeping every other section of the file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _measure import write_section  # noqa: E402

HEADING = "## Training throughput with background saves"
CONFIGS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "async_2": {"async_save": True, "save_threads": 2},
    "async_1": {"async_save": True, "save_threads": 1},
    "sync": {"async_save": False, "save_threads": 2},
}
LABELS = {
    "none": "no checkpointing",
    "async_2": "async saves, `save_threads=2`",
    "async_1": "async saves, `save_threads=1`",
    "sync": "sync saves",
}


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4) if args.small else GPT2Config(n_layer=args.layers)
    model = GPT2LMHeadModel(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    return model, opt, cfg


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    seen: set[int] = set()
    total = 0
    tensors = list(model.state_dict().values())
    tensors += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    for t in tensors:
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.numel() * t.element_size()
    return total


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.item())


def run_config(
    name: str,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    vocab: int,
    args: argparse.Namespace,
    root: str,
    gen: torch.Generator,
) -> dict[str, Any]:
    from ckpt_callback import CheckpointHook

    options = CONFIGS[name]
    hook = None
    folder = tempfile.mkdtemp(prefix=f"{name}-", dir=root)
    if options is not None:
        hook = CheckpointHook(folder, model, optimizer=opt, every_n_steps=args.every, keep_last=2, **options)
    step_s: list[float] = []
    overlapped: list[bool] = []
    stalls: list[float] = []
    cpu0 = time.process_time()
    t_start = time.perf_counter()
    for step in range(1, args.steps + 1):
        pending = hook.manager._writer._pending if hook is not None else None  # benchmark-only peek
        busy = pending is not None and not pending.done()
        x = torch.randint(0, vocab, (args.batch, args.seq), generator=gen)
        t0 = time.perf_counter()
        loss = train_step(model, opt, x)
        t1 = time.perf_counter()
        if hook is not None:
            hook.step(step, loss=loss)
        t2 = time.perf_counter()
        step_s.append(t2 - t0)
        overlapped.append(busy)
        if hook is not None and step % args.every == 0:
            stalls.append(t2 - t1)
    elapsed = time.perf_counter() - t_start
    cpu = time.process_time() - cpu0
    drain = 0.0
    if hook is not None:
        t0 = time.perf_counter()
        hook.wait()
        drain = time.perf_counter() - t0
        hook.manager.close()
    shutil.rmtree(folder, ignore_errors=True)
    # compute-only step times (saving steps excluded), split by whether a background save was running
    plain = [t for i, t in enumerate(step_s) if (i + 1) % args.every and not overlapped[i]]
    during = [t for i, t in enumerate(step_s) if (i + 1) % args.every and overlapped[i]]
    return {
        "steps_per_s": args.steps / elapsed,
        "elapsed": elapsed,
        "cpu": cpu,
        "stalls": stalls,
        "drain": drain,
        "plain": plain,
        "during": during,
    }


def fmt(vals: list[float], nd: int = 2) -> str:
    if not vals:
        return "—"
    med = statistics.median(vals)
    return f"{med:.{nd}f}" if len(vals) == 1 else f"{med:.{nd}f} [{min(vals):.{nd}f}-{max(vals):.{nd}f}]"


def render(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace, info: dict[str, Any]) -> str:
    # Interference from other processes only ever slows a run down, so each configuration is
    # summarised by its best round (shortest loop); the median and the range are shown beside it.
    def best(runs: list[dict[str, Any]]) -> float:
        return min(r["elapsed"] for r in runs)

    base_elapsed = best(results["none"]) if results.get("none") else None
    n_saves = args.steps // args.every
    model_desc = (
        "GPT-2 *tiny* (`--small`: n_layer=2, n_embd=64)"
        if args.small
        else f"GPT-2 with `GPT2Config(n_layer={args.layers})` (other fields default: n_embd=768, 12 heads, "
        "vocab 50257, 1024 positions; GPT-2 small has 12 layers, too slow for a few-minute run on 2 cores)"
    )
    cmd = "python benchmarks/bench_train.py " + " ".join(sys.argv[1:])
    L = [HEADING, ""]
    L.append(
        f"`{cmd.strip()}` ({info['date']}): {model_desc}, built from config with random init, fp32, "
        f"{info['params']:,} parameters, AdamW; model + optimizer state {info['state'] / 1e9:.2f} GB. "
        f"Batch {args.batch} x {args.seq} random tokens. Each run: {args.steps} timed steps after "
        f"{args.warmup} untimed warm-up steps at the start; the checkpointing configurations save every "
        f"{args.every} steps ({n_saves} saves per run, the last one followed by {args.steps - n_saves * args.every} "
        f"steps), with a fresh `CheckpointHook` (keep_last=2) per run, so the first save of a run allocates the "
        f"staging buffers. {args.rounds} round(s), configurations interleaved, their order rotated every round. "
        "torch intra-op threads: "
        f"{info['threads']} ({info['threads_note']}) on {os.cpu_count()} logical cores; machine as described "
        "at the top. Load average before / after: "
        f"{info['load_before']} / {info['load_after']}."
    )
    L.append("")
    L.append(
        f"| configuration | steps/s: best of {args.rounds} (median) [min-max] | vs no checkpointing (best) "
        "| stall per save s: first of a run / later | training time lost per save s (best) "
        "| compute step s: while a background save runs / otherwise | wait for the last save after the loop s "
        "| process CPU s per run |"
    )
    L.append("|---|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        sps = [r["steps_per_s"] for r in runs]
        top = args.steps / best(runs)
        ratio = f"{best(results['none']) / best(runs):.2f}x" if base_elapsed else "—"
        lost = "—"
        if base_elapsed is not None and CONFIGS[name] is not None and n_saves:
            lost = f"{(best(runs) - base_elapsed) / n_saves:.2f}"
        if CONFIGS[name] is None:
            stall = drain = "—"
        else:
            first = [r["stalls"][0] for r in runs if r["stalls"]]
            later = [s for r in runs for s in r["stalls"][1:]]
            stall = f"{fmt(first, 3)} / {fmt(later, 3)}"
            drain = fmt([r["drain"] for r in runs])
        during = [t for r in runs for t in r["during"]]
        plain = [t for r in runs for t in r["plain"]]
        steps = f"{statistics.median(during):.3f} / " if during else "— / "
        steps += f"{statistics.median(plain):.3f}" if plain else "—"
        L.append(
            f"| {LABELS[name]} | **{top:.3f}** ({statistics.median(sps):.3f}) [{min(sps):.3f}-{max(sps):.3f}] "
            f"| {ratio} | {stall} | {lost} | {steps} | {drain} | {fmt([r['cpu'] for r in runs], 0)} |"
        )
    L.append("")
    L.extend(reading(results, args, n_saves))
    interval = base_elapsed / args.steps * args.every if base_elapsed else 0
    L.append(
        "steps/s = timed steps / wall time of the loop (forward, backward, AdamW step and `hook.step()`, which "
        "includes a save's stall). Other processes on this shared 2-core VM can only slow a run down, so the "
        "best round of each configuration is the headline and the ratios and time lost are computed from it; "
        f"the median and range show the spread. Saving every {args.every} steps (every ~{interval:.0f} s of "
        "training here) is far more often than a real run would; the training time lost per save ((loop time - "
        "loop time without checkpointing) / saves per run) does not depend on that choice: at a save interval "
        "of S seconds the slowdown is about lost / S. A stall is the time `hook.step()` blocks on a saving step: "
        "for async saves the snapshot into the staging buffers (plus waiting for the previous save if it has not "
        "finished); for sync saves the whole save including fsync. Compute step = a non-saving step, split by "
        "whether a background save was still running when it began (median seconds over all rounds)."
    )
    L.append("")
    return "\n".join(L)


def reading(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace, n_saves: int) -> list[str]:
    """One computed sentence per checkpointing configuration: where its lost time goes."""
    if not results.get("none") or not n_saves:
        return []
    base_elapsed = min(r["elapsed"] for r in results["none"])
    plain = [t for r in results["none"] for t in r["plain"]]
    ref = statistics.median(plain) if plain else None
    out = []
    for name, runs in results.items():
        if CONFIGS[name] is None:
            continue
        lost = (min(r["elapsed"] for r in runs) - base_elapsed) / n_saves
        stalls = [s for r in runs for s in r["stalls"]]
        during = [t for r in runs for t in r["during"]]
        text = f"- {LABELS[name]}: {lost:.2f} s of training time lost per save (best rounds), of which the stall is "
        text += f"{statistics.median(stalls):.2f} s (median)" if stalls else "—"
        if during and ref:
            per_save = len(during) / (len(runs) * n_saves)
            slow = statistics.median(during)
            text += (
                f"; the rest is the {per_save:.1f} steps per save that overlap the background save, each taking "
                f"{slow:.2f} s instead of {ref:.2f} s ({slow / ref:.1f}x): the background writer (and hasher) "
                f"threads share the {os.cpu_count()} cores with torch's {torch.get_num_threads()} intra-op threads"
            )
        out.append(text + ".")
    return [*out, ""] if out else []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=6, help="GPT2Config n_layer (default 6)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=29, help="timed steps per run (default 29)")
    ap.add_argument("--every", type=int, default=10, help="save every N steps (default 10)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps before the first run (default 10)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all configurations (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    ap.add_argument("--small", action="store_true", help="tiny GPT-2 (n_layer=2, n_embd=64) for debugging")
    ap.add_argument("--dir", default=None, help="where checkpoints are written (default: a temp dir)")
    ap.add_argument("--out", default=str(HERE.parent / "BENCHMARKS.md"), help="Markdown file to update")
    ap.add_argument("--json", default=None, help="also write the raw per-run results as JSON here")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    if unknown := [n for n in names if n not in CONFIGS]:
        ap.error(f"unknown configs {unknown}")
    # keep the manager's "monitor never appears" hint out of the timing output
    warnings.filterwarnings("ignore", message=".*never appears.*")
    logging.getLogger("ckpt_callback").setLevel(logging.ERROR)

    default_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, opt, cfg = build(args)
    gen = torch.Generator().manual_seed(1)
    for _ in range(args.warmup):
        train_step(model, opt, torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen))
    info = {
        "params": sum(p.numel() for p in model.parameters()),
        "state": state_bytes(model, opt),
        "threads": torch.get_num_threads(),
        "threads_note": "torch's default, not changed"
        if torch.get_num_threads() == default_threads and not args.threads
        else f"set by --threads; torch's default here: {default_threads}",
        "load_before": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    gb = info["state"] / 1e9
    print(f"[train] {info['params']:,} params, state {gb:.2f} GB, threads {info['threads']}", flush=True)
    root = tempfile.mkdtemp(prefix="ckpt-train-", dir=args.dir)
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    try:
        for r in range(args.rounds):
            for n in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order every round
                res = run_config(n, model, opt, cfg.vocab_size, args, root, gen)
                results[n].append(res)
                print(
                    f"[train] round {r} {n:8s} {res['steps_per_s']:.3f} steps/s ({res['elapsed']:.1f} s, "
                    f"cpu {res['cpu']:.0f} s) stalls {[round(s, 3) for s in res['stalls']]} "
                    f"drain {res['drain']:.2f} s",
                    flush=True,
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    info["load_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "info": info, "results": results}, f, indent=1)
    section = render(results, args, info)
    print(section)
    write_section(args.out, HEADING, section)
    print(f"[train] wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
