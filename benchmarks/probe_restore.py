"""Cold restore of GPT-2 small (124M) + AdamW: ours against torch.load and safetensors, in one process.

Issue 16 item 2 asks a restore with full verification (sha256 of every byte against the sidecar)
to take <= 1.0x ``torch.load(weights_only=True, map_location="cpu")`` + ``model.load_state_dict`` +
``optimizer.load_state_dict``, and <= 1.2x ``safetensors.torch.load_file`` + the same two calls.
This probe measures the four rows that ratio needs, with the page cache dropped before each
restore (``sync; echo 3 > /proc/sys/vm/drop_caches``: run it as root), interleaved, and prints
the medians, the ratios and the load average (timings on a shared 2-core VM are noisy: compare
the ratios of one run, not numbers across runs). Beside each wall time it prints the CPU seconds
of every thread of the process: sha256 costs about 0.6 s of CPU per GB here, which stays hidden
behind the reads only while a second core is free.

Rows:
- ``torch_load``: torch.load of one ``torch.save`` file + both ``load_state_dict`` calls;
- ``safetensors``: ``load_file`` of ``model.safetensors`` (default mmap backend, copied into the
  parameters by ``load_state_dict``) and of ``optimizer.safetensors`` (``backend="pread"``, so
  the state is in memory, not mapped) + both ``load_state_dict`` calls;
- ``ours``: ``CheckpointManager.restore("latest", model=, optimizer=)`` with its defaults
  (verify=True: sha256 of every byte read, RNG states restored);
- ``ours_noverify``: the same with ``verify=False``.

Before each restore, freed memory is handed back to the kernel and the probe waits ``--settle``
seconds (default 3): this VM hands freed memory back to the host after a pause, and touching it
again costs 2-3x more CPU, so without the wait a row's time depends on how long ago the row before
it freed its memory. With it every row meets memory as a new process after an idle pause does.

Targets (``--target``): ``live`` restores into the model and optimizer that saved (the optimizer
already holds state, as in ``bench_save.py``), ``fresh`` into the same model and a new AdamW
without state (a resume in a new process: the optimizer state needs new memory), ``both``.

    sudo python benchmarks/probe_restore.py [--reps 3] [--target both] [--dir /tmp] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

ROWS = ("torch_load", "safetensors", "ours", "ours_noverify")


def drop_page_cache() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """GPT2Config() defaults (124M, random init, nothing downloaded) + AdamW after one step."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, model.config.vocab_size, (1, 16))
    model(tokens, labels=tokens).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def _fsync_tree(root: str) -> None:
    for folder, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# --- the safetensors baseline's files: the model without its tied copy, the optimizer flattened ---


def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    kept: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for name, t in model.state_dict().items():  # registration order keeps wte, drops the tied lm_head
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            kept[name] = t.contiguous()
    return kept


def _flatten_optimizer(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, Any] = {}
    for pid, state in osd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v) and v.dim() > 0:
                tensors[f"state.{pid}.{k}"] = v.contiguous()
            else:
                extra[f"state.{pid}.{k}"] = v.item() if torch.is_tensor(v) else v
    return tensors, {"param_groups": json.dumps(osd["param_groups"]), "extra": json.dumps(extra)}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(json.loads(meta["extra"]).items()):
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = torch.tensor(v, dtype=torch.float32) if k == "step" else v
    return {"state": state, "param_groups": json.loads(meta["param_groups"])}


# --- the rows ---------------------------------------------------------------------------------


class Probe:
    def __init__(self, folder: str) -> None:
        import safetensors.torch as st

        import ckpt_callback

        self.folder = folder
        self.model, self.optimizer = build()
        self.expected = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.expected_state = {k: v.clone() for k, v in self.optimizer.state[next(iter(self.model.parameters()))]
                               .items()}
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()},
                   self.path("checkpoint.pt"))
        st.save_file(_model_tensors(self.model), self.path("model.safetensors"), metadata={"format": "pt"})
        tensors, meta = _flatten_optimizer(self.optimizer.state_dict())
        st.save_file(tensors, self.path("optimizer.safetensors"), metadata=meta)
        self.manager = ckpt_callback.CheckpointManager(self.path("ours"), keep_last=None)
        self.manager.save(self.model, step=1, optimizer=self.optimizer)
        _fsync_tree(folder)
        self.bytes = os.path.getsize(self.path("checkpoint.pt"))

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def torch_load(self, optimizer: torch.optim.Optimizer) -> None:
        sd = torch.load(self.path("checkpoint.pt"), weights_only=True, map_location="cpu")
        self.model.load_state_dict(sd["model"])
        optimizer.load_state_dict(sd["optimizer"])

    def safetensors(self, optimizer: torch.optim.Optimizer) -> None:
        import safetensors
        import safetensors.torch as st

        missing, unexpected = self.model.load_state_dict(st.load_file(self.path("model.safetensors")), strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        with safetensors.safe_open(self.path("optimizer.safetensors"), "pt") as f:
            meta = f.metadata()
        tensors = st.load_file(self.path("optimizer.safetensors"), backend="pread")
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta))

    def ours(self, optimizer: torch.optim.Optimizer) -> None:
        self.manager.restore("latest", model=self.model, optimizer=optimizer)

    def ours_noverify(self, optimizer: torch.optim.Optimizer) -> None:
        self.manager.restore("latest", model=self.model, optimizer=optimizer, verify=False)

    def scramble(self, optimizer: torch.optim.Optimizer) -> None:
        """Untimed: change every weight and optimizer state, so a restore that loads nothing fails `check`."""
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(1.0)
            for state in optimizer.state.values():
                for v in state.values():
                    if torch.is_tensor(v):
                        v.add_(1.0)

    def check(self, optimizer: torch.optim.Optimizer, row: str) -> None:
        live = self.model.state_dict()
        bad = [k for k, v in self.expected.items() if not torch.equal(live[k], v)]
        first = next(iter(self.model.parameters()))
        state = optimizer.state.get(first, {})
        bad += [f"optimizer.{k}" for k, v in self.expected_state.items() if not torch.equal(state.get(k), v)]
        if bad:
            raise AssertionError(f"{row} did not restore {bad[:3]}")


def release_memory() -> None:
    """Hand freed memory back to the kernel (gc + malloc_trim), as a new process would start."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def run(probe: Probe, target: str, reps: int, settle: float) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds (every thread of this process) of each row, ``reps`` times, interleaved."""
    times: dict[str, list[float]] = {row: [] for row in ROWS}
    cpu: dict[str, list[float]] = {row: [] for row in ROWS}
    for rep in range(reps):
        order = ROWS[rep % len(ROWS):] + ROWS[: rep % len(ROWS)]  # rotated: no row always follows the same one
        for row in order:
            optimizer = probe.optimizer
            if target == "fresh":
                optimizer = torch.optim.AdamW(probe.model.parameters(), lr=1e-4)
            probe.scramble(optimizer)
            release_memory()
            time.sleep(settle)  # the VM hands freed memory back to the host after a pause: same state for every row
            drop_page_cache()
            fn: Callable[[torch.optim.Optimizer], None] = getattr(probe, row)
            t0, c0 = time.perf_counter(), time.process_time()
            fn(optimizer)
            elapsed, used = time.perf_counter() - t0, time.process_time() - c0
            probe.check(optimizer, row)
            if target == "live":
                probe.optimizer = optimizer
            times[row].append(elapsed)
            cpu[row].append(used)
            print(f"  [{target}] rep {rep + 1} {row:14s} {elapsed:6.3f} s  cpu {used:6.3f} s   "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    return times, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--target", choices=("live", "fresh", "both"), default="both")
    parser.add_argument("--dir", default=None, help="where to write the files (default: the system temp dir)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds to wait after freeing memory before each restore (default 3)")
    args = parser.parse_args(argv)
    try:
        drop_page_cache()
    except OSError as exc:
        print(f"cannot drop the page cache ({exc}): run as root", file=sys.stderr)
        return 2
    folder = tempfile.mkdtemp(prefix="probe-restore-", dir=args.dir)
    try:
        import ckpt_callback

        print(f"ckpt_callback from {ckpt_callback.__file__}; torch {torch.__version__}; "
              f"{torch.get_num_threads()} intra-op threads; {os.cpu_count()} cpus", flush=True)
        probe = Probe(folder)
        print(f"checkpoint: {probe.bytes / 1e9:.2f} GB (torch.save file); load average at start "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        results: dict[str, Any] = {"bytes": probe.bytes, "load_start": os.getloadavg(), "targets": {}, "cpu": {}}
        targets = ("live", "fresh") if args.target == "both" else (args.target,)
        for target in targets:
            results["targets"][target], results["cpu"][target] = run(probe, target, args.reps, args.settle)
        results["load_end"] = os.getloadavg()
        print(f"\nmedians of {args.reps} cold restores, interleaved; load average at end "
              f"{' '.join(f'{x:.2f}' for x in results['load_end'])}")
        for target, times in results["targets"].items():
            med = {row: statistics.median(ts) for row, ts in times.items()}
            cpu = {row: statistics.median(ts) for row, ts in results["cpu"][target].items()}
            print(f"[{target}] " + "  ".join(f"{row} {med[row]:.3f} s (cpu {cpu[row]:.2f})" for row in ROWS))
            for row in ("ours", "ours_noverify"):
                print(f"[{target}]   {row:14s} {med[row] / med['torch_load']:.2f}x torch_load (target <= 1.0)  "
                      f"{med[row] / med['safetensors']:.2f}x safetensors (target <= 1.2)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
