#!/usr/bin/env python
"""Checkpoint save / restore benchmark: GPT-2 small + AdamW state on CPU.

    python benchmarks/bench_save.py [--runs N] [--small] [--out FILE] [--dir TMPDIR]
                                    [--methods a,b,c] [--json FILE]

For each method (a row) and each run we measure

* stall      -- how long the calling ("training") thread is blocked by the call.
                Sync methods: the full time, including fsync when the method
                itself fsyncs.
* durable    -- time from the start of the call until the data is on disk and
                fsynced (async methods: background work finished + fsync).
                Methods that do not fsync themselves (HF Trainer) get an
                fsync of every file they wrote appended.
* peak extra -- peak RSS above the RSS right before the call, sampled by a
                background thread every ~5 ms from /proc/self/statm, plus the
                exact kernel high-water mark (VmHWM, reset through
                /proc/self/clear_refs) when the kernel allows it.

Methods are interleaved (run 0 of every method, then run 1 of every method,
...) so drift (other processes, thermal, writeback) hits all rows alike.
Between runs the previous output is deleted and os.sync() is called.

Adding a row
------------
A row is a function ``fn(b: Bench) -> Result`` registered with ``@register``.
``b`` holds the model, optimizer, a fresh empty output dir ``b.out_dir`` for
this run and a per-method ``b.cache`` that survives across runs. Untimed
preparation goes into ``setup=`` (runs before the RSS baseline is taken).
See the "OUR LIBRARY ROWS" section at the bottom of the registry.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime as _dt
import gc
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import write_document

MB = 1024 * 1024
GB = 1024**3


# =============================================================================
# Measurement helpers
# =============================================================================

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Current resident set size of this process (from /proc/self/statm)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM). Returns False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"^VmHWM:\s+(\d+)\s+kB", f.read(), re.M)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


class RssSampler:
    """Background thread sampling RSS every `interval` seconds; tracks the peak."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._fd = os.open("/proc/self/statm", os.O_RDONLY)
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _read(self) -> int:
        os.lseek(self._fd, 0, os.SEEK_SET)
        return int(os.read(self._fd, 128).split()[1]) * _PAGE

    def _run(self) -> None:
        while not self._stop.is_set():
            v = self._read()
            self.samples += 1
            if v > self.peak:
                self.peak = v
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = self._read()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read())
        os.close(self._fd)


def _fsync_fd_path(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    """fsync a file and its parent directory (so the directory entry is durable too)."""
    _fsync_fd_path(path, os.O_RDONLY)
    _fsync_fd_path(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)


def fsync_tree(root: str) -> list[str]:
    """fsync every file under `root`, then every directory (bottom-up) incl. `root`.

    Returns the list of files that were fsynced.
    """
    files: list[str] = []
    dirs: list[str] = []
    for d, _subdirs, names in os.walk(root):
        dirs.append(d)
        for n in names:
            p = os.path.join(d, n)
            if os.path.isfile(p) and not os.path.islink(p):
                _fsync_fd_path(p, os.O_RDONLY)
                files.append(p)
    for d in reversed(dirs):
        _fsync_fd_path(d, os.O_RDONLY)
    _fsync_fd_path(os.path.dirname(os.path.abspath(root)), os.O_RDONLY)
    return files


def tree_bytes(root: str) -> int:
    total = 0
    for d, _s, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            if os.path.isfile(p) and not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def drop_page_cache() -> bool:
    """os.sync() + echo 3 > /proc/sys/vm/drop_caches. Returns whether the drop worked."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


try:
    _libc = ctypes.CDLL("libc.so.6")
except OSError:  # pragma: no cover - non-glibc
    _libc = None


def release_memory() -> None:
    """gc + malloc_trim so freed memory goes back to the OS and baselines are stable."""
    gc.collect()
    if _libc is not None:
        with contextlib.suppress(Exception):
            _libc.malloc_trim(0)


def fresh_memory_touch_gbps(nbytes: int = GB) -> float:
    """Throughput (GB/s) of allocating + first-touching `nbytes` of new anonymous memory.

    On VMs whose balloon device does free-page reporting, freed guest memory is handed back to
    the host and every re-touch faults on the host too, which makes anything that needs new
    memory (staging copies, restore buffers, page cache for writes) much slower than on bare metal.
    """
    release_memory()
    t0 = time.perf_counter()
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    dt = time.perf_counter() - t0
    del x
    release_memory()
    return nbytes / dt / 1e9


def sha256_gbps(tensors: list[torch.Tensor]) -> float:
    """Throughput (GB/s) of hashlib.sha256 over the bytes of ``tensors``, one thread."""
    h = hashlib.sha256()
    total = 0
    t0 = time.perf_counter()
    for t in tensors:
        data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        h.update(data)
        total += data.nbytes
    return total / (time.perf_counter() - t0) / 1e9


def balloon_free_page_reporting() -> bool | None:
    """True if a virtio-balloon device with VIRTIO_BALLOON_F_REPORTING (bit 5) is bound."""
    base = "/sys/bus/virtio/devices"
    try:
        for d in os.listdir(base):
            with open(os.path.join(base, d, "device")) as f:
                if int(f.read().strip(), 16) != 5:
                    continue
            with open(os.path.join(base, d, "features")) as f:
                feats = f.read().strip()
            return len(feats) > 5 and feats[5] == "1"
    except OSError:
        return None
    return False


def read_loadavg() -> list[str]:
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


# =============================================================================
# Bench object, results, registry
# =============================================================================


@dataclasses.dataclass
class Result:
    """What a method returns for one run. Times in seconds.

    durable_s=None means "not applicable" (in-memory copy, restores).
    """

    stall_s: float
    durable_s: float | None
    note: str = ""


@dataclasses.dataclass
class Bench:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    root: str  # benchmark scratch root (survives across runs)
    out_dir: str = ""  # fresh, empty, per (method, run); deleted after the run
    run_index: int = 0
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)  # per-method, survives runs
    small: bool = False
    cold_restore: bool | None = None  # set by restore setups: did dropping the page cache work?

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def path(self, *names: str) -> str:
        return os.path.join(self.out_dir, *names)

    def cached(self, key: str, factory: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = factory()
        return self.cache[key]


@dataclasses.dataclass
class Method:
    name: str
    fn: Callable[[Bench], Result]
    kind: str  # "save" | "restore"
    setup: Callable[[Bench], None] | None
    requires: tuple[str, ...]  # importable modules; row is skipped (with a note) if missing
    doc: str


METHODS: dict[str, Method] = {}


def register(
    name: str,
    *,
    kind: str = "save",
    setup: Callable[[Bench], None] | None = None,
    requires: tuple[str, ...] = (),
    doc: str = "",
) -> Callable[[Callable[[Bench], Result]], Callable[[Bench], Result]]:
    """Register a benchmark row. `fn(b) -> Result`; `setup(b)` is untimed."""

    def deco(fn: Callable[[Bench], Result]) -> Callable[[Bench], Result]:
        METHODS[name] = Method(name, fn, kind, setup, requires, doc or (fn.__doc__ or "").strip())
        return fn

    return deco


def timed_sync(b: Bench, fn: Callable[[], Any]) -> Result:
    """For a synchronous save that writes into b.out_dir: stall = call time,
    durable = call time + fsync of every file it wrote (no-op-ish if it fsynced itself)."""
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    fsync_tree(b.out_dir)
    t2 = time.perf_counter()
    return Result(stall_s=t1 - t0, durable_s=t2 - t0)


# --- state dict helpers ------------------------------------------------------


def unique_tensors(b: Bench) -> list[torch.Tensor]:
    """All model + optimizer tensors, deduplicated by storage (tied weights counted once)."""
    seen: set[int] = set()
    out: list[torch.Tensor] = []
    tensors = list(b.model.state_dict().values())
    for st in b.optimizer.state.values():
        tensors += [v for v in st.values() if torch.is_tensor(v)]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        out.append(t)
    return out


def dedup_model_sd(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Drop tensors sharing storage with an already-kept one (GPT-2: lm_head.weight == wte)."""
    kept: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    # keep transformer.* before lm_head.* so the canonical name survives
    for k in sorted(sd, key=lambda k: (k.startswith("lm_head"), k)):
        t = sd[k]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            dropped.append(k)
            continue
        seen[key] = k
        kept[k] = t.contiguous()
    return kept, dropped


def flatten_optimizer(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, Any] = {}
    for pid, st in osd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{k}"] = v.contiguous()
            else:
                extra[f"state.{pid}.{k}"] = v
    meta = {"param_groups": json.dumps(osd["param_groups"]), "extra": json.dumps(extra)}
    return tensors, meta


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(json.loads(meta["extra"]).items()):
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": json.loads(meta["param_groups"])}


def write_safetensors_pair(b: Bench) -> None:
    import safetensors.torch as st

    msd, _dropped = dedup_model_sd(b.model.state_dict())
    st.save_file(msd, b.path("model.safetensors"), metadata={"format": "pt"})
    otensors, ometa = flatten_optimizer(b.optimizer.state_dict())
    st.save_file(otensors, b.path("optimizer.safetensors"), metadata=ometa)


# =============================================================================
# Baseline rows
# =============================================================================


# Destination buffers shared by the bare_copy rows: allocated and first-touched once (untimed, in
# the first setup) and kept for the whole benchmark, like the staging buffers of an async manager.
_BARE: dict[str, Any] = {}


def _named_sources(b: Bench) -> dict[str, torch.Tensor]:
    """Every unique model + optimizer tensor under a name that does not depend on the order in
    which a restore rebuilt the optimizer state (parameter index + state key)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    named = [(f"model.{k}", t) for k, t in b.model.state_dict().items()]
    params = [p for g in b.optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        st = b.optimizer.state.get(p, {})
        named += [(f"optimizer.{i}.{k}", st[k]) for k in sorted(st) if torch.is_tensor(st[k])]
    for name, t in named:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


def _setup_bare_copy(b: Bench) -> None:
    # Sources are re-collected every run (restore rows replace the optimizer's state tensors);
    # destination buffers are allocated once, matched by name, and reused, like staging buffers.
    dsts: dict[str, torch.Tensor] = _BARE.setdefault("dsts", {})
    pairs = []
    for name, src in _named_sources(b).items():
        dst = dsts.get(name)
        if dst is None or dst.shape != src.shape or dst.dtype != src.dtype:
            dst = dsts[name] = torch.empty_like(src)
            dst.zero_()  # fault the pages in now, so the timed copy is a pure memcpy
            _BARE["allocated"] = _BARE.get("allocated", 0) + 1
        pairs.append((src, dst))
    b.cache["bare_copy_pairs"] = pairs


def _minor_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _bare_copy(b: Bench, threads: int | None) -> Result:
    pairs = b.cache.pop("bare_copy_pairs")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        faults = _minor_faults()
        t0 = time.perf_counter()
        for src, dst in pairs:
            dst.copy_(src)
        t = time.perf_counter() - t0
        faults = _minor_faults() - faults
    finally:
        torch.set_num_threads(before)
    held = sum(d.numel() * d.element_size() for _, d in pairs)
    note = (
        f"memory only; {len(pairs)} tensors into buffers ({held / MB:.0f} MB) allocated + touched once, kept "
        f"across runs ({_BARE['allocated']} buffers allocated in the whole benchmark); page faults in the timed copy: "
        f"{faults}"
    )
    return Result(t, None, note=note)


@register("bare_copy", setup=_setup_bare_copy)
def bare_copy(b: Bench) -> Result:
    """dst.copy_(src) of every unique model+optimizer tensor into buffers that exist already
    (allocated and first-touched once, kept across runs), with torch's default intra-op threads,
    as the staging copy of an async save does: the lower bound for an in-memory snapshot (not durable)."""
    return _bare_copy(b, None)


@register("bare_copy_1thread", setup=_setup_bare_copy)
def bare_copy_1thread(b: Bench) -> Result:
    """Same copy into the same buffers with torch.set_num_threads(1): one memcpy stream, no
    fork/join of intra-op threads per tensor (which waits for a second core that other processes,
    or our own background threads, may hold)."""
    return _bare_copy(b, 1)


@register("torch_save")
def torch_save(b: Bench) -> Result:
    """torch.save({'model': sd, 'optimizer': opt.state_dict()}) + fsync(file, dir)."""
    p = b.path("checkpoint.pt")
    t0 = time.perf_counter()
    torch.save(b.state_dict(), p)
    fsync_file(p)
    t = time.perf_counter() - t0
    return Result(t, t)


@register("safetensors_save_file")
def safetensors_save_file(b: Bench) -> Result:
    """safetensors.torch.save_file of the model (tied lm_head dropped) and of the flattened
    optimizer tensors (param_groups in metadata) + fsync."""
    t0 = time.perf_counter()
    write_safetensors_pair(b)
    fsync_tree(b.out_dir)
    t = time.perf_counter() - t0
    return Result(t, t)


def _setup_hf_trainer(b: Bench) -> None:
    def make() -> Any:
        from transformers import Trainer, TrainingArguments
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        args = TrainingArguments(
            output_dir=os.path.join(b.root, "hf_trainer_init"),
            report_to=[],
            use_cpu=True,
        )
        trainer = Trainer(model=b.model, args=args, optimizers=(b.optimizer, None))
        trainer.create_optimizer_and_scheduler(num_training_steps=10)  # creates the LR scheduler only
        assert trainer.optimizer is b.optimizer
        return trainer

    trainer = b.cached("trainer", make)
    trainer.args.output_dir = b.out_dir
    trainer.state.global_step = b.run_index + 1


@register("hf_trainer", setup=_setup_hf_trainer)
def hf_trainer(b: Bench) -> Result:
    """transformers.Trainer._save_checkpoint(model, trial=None): model.safetensors (save_pretrained)
    + optimizer.pt + scheduler.pt + rng_state.pth + trainer_state.json + args. It does not fsync;
    durable = call + fsync of every file it wrote."""
    trainer = b.cache["trainer"]
    return timed_sync(b, lambda: trainer._save_checkpoint(b.model, trial=None))


@register("dcp_save")
def dcp_save(b: Bench) -> Result:
    """torch.distributed.checkpoint.save(...) without a process group (FileSystemWriter fsyncs
    by default) + fsync of written files."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        t0 = time.perf_counter()
        dcp.save(b.state_dict(), checkpoint_id=b.path("dcp"))
        fsync_tree(b.out_dir)
        t = time.perf_counter() - t0
    return Result(t, t)


@register("dcp_async_save")
def dcp_async_save(b: Bench) -> Result:
    """torch.distributed.checkpoint.async_save (default: thread executor, DefaultStager copies the
    state to CPU memory before returning); durable = future done + fsync."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        t0 = time.perf_counter()
        fut = dcp.async_save(b.state_dict(), checkpoint_id=b.path("dcp"))
        t1 = time.perf_counter()
        # newer torch may return AsyncSaveResponse(staging_completion, upload_completion)
        upload = getattr(fut, "upload_completion", fut)
        upload.result()
        fsync_tree(b.out_dir)
        t2 = time.perf_counter()
    return Result(t1 - t0, t2 - t0)


def _cold(b: Bench) -> None:
    b.cold_restore = drop_page_cache()


def _setup_restore_torch(b: Bench) -> None:
    p = b.path("checkpoint.pt")
    torch.save(b.state_dict(), p)
    fsync_file(p)
    _cold(b)


@register("restore_torch_load", kind="restore", setup=_setup_restore_torch)
def restore_torch_load(b: Bench) -> Result:
    """torch.load(weights_only=True, map_location='cpu') + model.load_state_dict +
    optimizer.load_state_dict."""
    t0 = time.perf_counter()
    sd = torch.load(b.path("checkpoint.pt"), weights_only=True, map_location="cpu")
    b.model.load_state_dict(sd["model"])
    b.optimizer.load_state_dict(sd["optimizer"])
    del sd
    t = time.perf_counter() - t0
    return Result(t, None)


def _setup_restore_safetensors(b: Bench) -> None:
    write_safetensors_pair(b)
    fsync_tree(b.out_dir)
    _cold(b)


@register("restore_safetensors", kind="restore", setup=_setup_restore_safetensors)
def restore_safetensors(b: Bench) -> Result:
    """safetensors.torch.load_file of both files (model: default mmap backend, copied by
    load_state_dict; optimizer: backend="pread" so the state is really in memory, not lazily mmapped)
    + load_state_dict (strict except the tied lm_head) + optimizer.load_state_dict."""
    import safetensors
    import safetensors.torch as st

    t0 = time.perf_counter()
    msd = st.load_file(b.path("model.safetensors"))
    missing, unexpected = b.model.load_state_dict(msd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    with safetensors.safe_open(b.path("optimizer.safetensors"), "pt") as f:
        meta = f.metadata()
    # The default "mmap" backend is lazy: the model's load_state_dict copies out of the mapping, but the
    # optimizer would keep file-backed tensors and defer the reads to the next step. Read them for real.
    try:
        otensors = st.load_file(b.path("optimizer.safetensors"), backend="pread")
    except TypeError:  # older safetensors without `backend`
        otensors = {k: v.clone() for k, v in st.load_file(b.path("optimizer.safetensors")).items()}
    b.optimizer.load_state_dict(unflatten_optimizer(otensors, meta))
    del msd, otensors
    t = time.perf_counter() - t0
    return Result(t, None)


# =============================================================================
# >>> OUR LIBRARY ROWS (ckpt_callback) -- add / adapt rows here <<<
#
# Rows with requires=("ckpt_callback",) are skipped with a note when
# `import ckpt_callback` fails. A row that raises is reported as FAILED with
# the exception, the rest of the benchmark still runs. Adapt the calls below
# to the real API once it exists; the pattern for a new row is:
#
#   @register("ours_sync_sharded", setup=_ours_setup(max_shard_size="200MB"),
#             requires=("ckpt_callback",))
#   def ours_sync_sharded(b: Bench) -> Result:
#       mgr = b.cache.pop("ours")            # made untimed by setup, on b.out_dir
#       t0 = time.perf_counter()
#       mgr.save(b.model, step=b.run_index + 1, optimizer=b.optimizer)
#       t = time.perf_counter() - t0
#       fsync_tree(b.out_dir)                # durable = + fsync (no-op-ish if already synced)
#       return Result(stall_s=t, durable_s=time.perf_counter() - t0)
#
# - write into b.out_dir (fresh + deleted after each run) or use your own dir
#   under b.root and clean it up yourself;
# - for async: stall = until save() returns, durable = until the handle /
#   future completes (+ fsync if the library does not fsync itself);
# - untimed preparation goes into setup=..., restore rows use kind="restore".
# =============================================================================


def _ours_setup(**kwargs: Any) -> Callable[[Bench], None]:
    """Untimed: a fresh CheckpointManager on this run's empty out_dir (kept in b.cache["ours"])."""

    def setup(b: Bench) -> None:
        import ckpt_callback

        # ADAPT if the constructor changes. keep_last=None: no retention work inside the timing.
        b.cache["ours"] = ckpt_callback.CheckpointManager(b.out_dir, keep_last=None, **kwargs)

    return setup


@register("ours_sync", setup=_ours_setup(), requires=("ckpt_callback",))
def ours_sync(b: Bench) -> Result:
    """ckpt_callback.CheckpointManager(dir).save(model, step=..., optimizer=opt) (blocking; local
    files written with O_DIRECT, sha256 on a second thread); durable = call + fsync of every file it
    wrote (cheap: the library already fsynced)."""
    mgr = b.cache.pop("ours")
    res = timed_sync(b, lambda: mgr.save(b.model, step=b.run_index + 1, optimizer=b.optimizer))
    mgr.close()
    return res


@register("ours_sync_buffered", setup=_ours_setup(), requires=("ckpt_callback",))
def ours_sync_buffered(b: Bench) -> Result:
    """Same as ours_sync with ckpt_callback._storage.DIRECT_IO = False (buffered writes through the
    page cache + fsync), restored afterwards."""
    from ckpt_callback import _storage

    mgr = b.cache.pop("ours")
    old = _storage.DIRECT_IO
    _storage.DIRECT_IO = False
    try:
        res = timed_sync(b, lambda: mgr.save(b.model, step=b.run_index + 1, optimizer=b.optimizer))
    finally:
        _storage.DIRECT_IO = old
    mgr.close()
    return res


# One async manager per row, kept for the whole benchmark, as in training: its staging buffers
# are allocated by the first (warm-up) save and reused by every later one.
_ASYNC: dict[str, dict[str, Any]] = {}


def _ours_async_setup(**kwargs: Any) -> Callable[[Bench], None]:
    def setup(b: Bench) -> None:
        import ckpt_callback

        name = "ours_async" + "".join(f"-{k}{v}" for k, v in sorted(kwargs.items()))
        if name not in _ASYNC:
            d = tempfile.mkdtemp(prefix=name + "-", dir=b.root)
            _ASYNC[name] = {
                "manager": ckpt_callback.CheckpointManager(d, keep_last=None, async_save=True, **kwargs),
                "step": 0,
            }
        b.cache["async"] = _ASYNC[name]

    return setup


def _ours_async(b: Bench) -> Result:
    st = b.cache["async"]
    mgr = st["manager"]
    st["step"] += 1
    first = st["step"] == 1
    if first:  # the first save allocates the staging buffers: record what the manager keeps
        base = rss_bytes()
        sampler = RssSampler().__enter__()
    t0 = time.perf_counter()
    info = mgr.save(b.model, step=st["step"], optimizer=b.optimizer)
    t1 = time.perf_counter()
    mgr.wait()
    t2 = time.perf_counter()
    if first:
        sampler.__exit__(None, None, None)
        release_memory()
        st["first_growth"] = rss_bytes() - base
        st["first_peak"] = sampler.peak - base
    st["staging"] = mgr._staging.nbytes
    mgr.delete(info.name)  # untimed: keep the disk from filling up
    note = (
        f"staging buffers held between saves: {st['staging'] / MB:.0f} MB; first save (allocates them): "
        f"RSS +{st.get('first_growth', 0) / MB:.0f} MB after, peak +{st.get('first_peak', 0) / MB:.0f} MB"
    )
    return Result(t1 - t0, t2 - t0, note=note)


@register("ours_async", setup=_ours_async_setup(), requires=("ckpt_callback",))
def ours_async(b: Bench) -> Result:
    """CheckpointManager(dir, async_save=True).save(...) on a manager that saved before (warm
    staging buffers, save_threads=2): stall until save() returns, durable until wait() returns (it
    fsyncs). Peak extra is ~0 for a warm save; the memory the manager holds is in the notes."""
    return _ours_async(b)


@register("ours_async_1thread", setup=_ours_async_setup(save_threads=1), requires=("ckpt_callback",))
def ours_async_1thread(b: Bench) -> Result:
    """Same as ours_async with save_threads=1 (sha256 inline in the writer thread)."""
    return _ours_async(b)


def _ours_restore_setup(b: Bench) -> None:
    _ours_setup()(b)
    b.cache["ours"].save(b.model, step=b.run_index + 1, optimizer=b.optimizer)
    fsync_tree(b.out_dir)
    _cold(b)


@register("ours_restore", kind="restore", setup=_ours_restore_setup, requires=("ckpt_callback",))
def ours_restore(b: Bench) -> Result:
    """CheckpointManager.restore('latest', model=, optimizer=) with defaults (verify=True: sha256 of
    every byte read, RNG states restored)."""
    mgr = b.cache.pop("ours")
    t0 = time.perf_counter()
    mgr.restore("latest", model=b.model, optimizer=b.optimizer)
    t = time.perf_counter() - t0
    mgr.close()
    return Result(t, None)


@register("ours_restore_noverify", kind="restore", setup=_ours_restore_setup, requires=("ckpt_callback",))
def ours_restore_noverify(b: Bench) -> Result:
    """Same as ours_restore with verify=False (no sha256 check)."""
    mgr = b.cache.pop("ours")
    t0 = time.perf_counter()
    mgr.restore("latest", model=b.model, optimizer=b.optimizer, verify=False)
    t = time.perf_counter() - t0
    mgr.close()
    return Result(t, None)


# =============================================================================
# Model / optimizer
# =============================================================================


def build_model_and_optimizer(small: bool, seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4) if small else GPT2Config()
    model = GPT2LMHeadModel(cfg)  # random init, never downloads
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    # one real optimizer step on a tiny batch so exp_avg / exp_avg_sq / step exist
    x = torch.randint(0, cfg.vocab_size, (1, 8))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)  # grads freed: not part of the state
    return model, opt


def state_sizes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    seen: set[int] = set()
    model_bytes = 0
    for t in model.state_dict().values():
        k = t.untyped_storage().data_ptr()
        if k not in seen:
            seen.add(k)
            model_bytes += t.numel() * t.element_size()
    opt_bytes = sum(
        v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v)
    )
    n_params = sum(p.numel() for p in model.parameters())
    return {"params": n_params, "model": model_bytes, "optimizer": opt_bytes, "total": model_bytes + opt_bytes}


# =============================================================================
# Machine description
# =============================================================================


def machine_info(out_root: str) -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        info["cpu"] = m.group(1).strip() if m else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    info["cores"] = f"{os.cpu_count()} logical (torch intra-op threads: {torch.get_num_threads()})"
    try:
        with open("/proc/meminfo") as f:
            kb = int(re.search(r"^MemTotal:\s+(\d+)", f.read(), re.M).group(1))
        info["ram"] = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, AttributeError):
        info["ram"] = "?"
    import safetensors
    import transformers

    info["software"] = (
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"safetensors {safetensors.__version__}, kernel {platform.release()}"
    )
    info["disk"] = describe_disk(out_root)
    return info


def describe_disk(path: str) -> str:
    path = os.path.realpath(path)
    best = ("?", "?", "")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[2]):
                    best = (dev, fstype, mnt)
    except OSError:
        pass
    dev, fstype, mnt = best
    extra = ""
    name = os.path.basename(dev)
    base = re.sub(r"p?\d+$", "", name) if not os.path.exists(f"/sys/block/{name}") else name
    try:
        with open(f"/sys/block/{base}/queue/rotational") as f:
            rot = f.read().strip()
        kind = "virtio (virtual) disk" if base.startswith("vd") else ("HDD" if rot == "1" else "SSD/NVMe")
        extra = f", {kind}, rotational flag={rot}"
    except OSError:
        pass
    return f"`{path}` on {dev} ({fstype}, mounted at {mnt}{extra})"


# =============================================================================
# Runner
# =============================================================================


@dataclasses.dataclass
class RunRecord:
    method: str
    run: int
    stall_s: float | None = None
    durable_s: float | None = None
    peak_sampled_mb: float | None = None
    peak_hwm_mb: float | None = None
    disk_mb: float | None = None
    note: str = ""
    error: str | None = None
    cold: bool | None = None
    samples: int = 0


def module_available(name: str) -> str | None:
    """None if importable, else the error text."""
    try:
        __import__(name)
        return None
    except Exception as e:  # any import failure means skip
        return f"{type(e).__name__}: {e}"


def run_one(m: Method, b: Bench, run: int, hwm_ok: bool) -> RunRecord:
    rec = RunRecord(m.name, run)
    b.out_dir = os.path.join(b.root, "out", f"{m.name}-run{run}")
    b.run_index = run
    b.cold_restore = None
    shutil.rmtree(b.out_dir, ignore_errors=True)
    os.makedirs(b.out_dir)
    try:
        if m.setup:
            m.setup(b)
        release_memory()
        base = rss_bytes()
        if hwm_ok:
            reset_hwm()
        with RssSampler() as sampler:
            res = m.fn(b)
        hwm = hwm_bytes() if hwm_ok else None
        rec.stall_s, rec.durable_s, rec.note = res.stall_s, res.durable_s, res.note
        rec.peak_sampled_mb = max(0, sampler.peak - base) / MB
        rec.samples = sampler.samples
        rec.peak_hwm_mb = max(0, hwm - base) / MB if hwm is not None else None
        rec.disk_mb = tree_bytes(b.out_dir) / MB
        rec.cold = b.cold_restore
    except Exception as e:  # keep the other rows running
        rec.error = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    finally:
        shutil.rmtree(b.out_dir, ignore_errors=True)
        release_memory()
        os.sync()
    return rec


def fmt_range(vals: list[float], nd: int = 2) -> str:
    if not vals:
        return "—"
    med = statistics.median(vals)
    if len(vals) == 1:
        return f"{med:.{nd}f}"
    return f"{med:.{nd}f} [{min(vals):.{nd}f}-{max(vals):.{nd}f}]"


def fmt_ratio(num: list[float], den: list[float]) -> str:
    if not num or not den or statistics.median(den) == 0:
        return "—"
    return f"{statistics.median(num) / statistics.median(den):.2f}x"


# Headings bench_save.py may write (incl. older names): every other `## ` section of the output
# file (bench_train.py's, bench_s3.py's, ...) is kept, after this script's content.
OWNED_HEADINGS = ["## Machine", "## Workload", "## Save", "## Restore", "## Targets", "## Methods", "## Notes"]


def render_targets(records: dict[str, list[RunRecord]], sizes: dict[str, int], meta: dict[str, Any]) -> list[str]:
    """The "## Targets (issue 7)" section: each target as a ratio of medians from this run."""

    def med(name: str, attr: str = "stall_s") -> float | None:
        v = [getattr(r, attr) for r in records.get(name, []) if r.error is None and getattr(r, attr) is not None]
        return statistics.median(v) if v else None

    def s(x: float | None) -> str:
        return "—" if x is None else f"{x:.3f} s"

    def row(target: str, measured: str, ratio: float | None, limit: float, bound: str) -> str:
        if ratio is None:
            return f"| {target} | {measured} | - | <= {limit:.2f}x | not measured | |"
        ok = ratio <= limit
        return (
            f"| {target} | {measured} | **{ratio:.2f}x** | <= {limit:.2f}x | {'pass' if ok else '**miss**'} "
            f"| {'' if ok else bound} |"
        )

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    state = sizes["total"]
    gb = state / 1e9
    sha = statistics.mean(meta["sha256_gbps"])
    hash_s = gb / sha
    a_stall, a1_stall = med("ours_async"), med("ours_async_1thread")
    hf, hf_dur = med("hf_trainer"), med("hf_trainer", "durable_s")
    bc_t, bc_1 = med("bare_copy"), med("bare_copy_1thread")
    bcs = [(v, n) for v, n in ((bc_t, "bare_copy"), (bc_1, "bare_copy_1thread")) if v is not None]
    bc, bc_name = min(bcs) if bcs else (None, "bare_copy")
    ts = med("torch_save", "durable_s")
    sync, sync_buf = med("ours_sync", "durable_s"), med("ours_sync_buffered", "durable_s")
    tl, ours_r, ours_nv = med("restore_torch_load"), med("ours_restore"), med("ours_restore_noverify")
    writers = [(med(n, "durable_s"), n) for n in records if METHODS[n].kind == "save" and med(n, "durable_s")]
    fastest = min(writers) if writers else (None, "—")
    staging = max((st.get("staging", 0) for st in _ASYNC.values()), default=0)
    growth = max((st.get("first_growth", 0) for st in _ASYNC.values()), default=0)

    L = ["## Targets (issue 7)", ""]
    L.append(
        "Ratios of medians from the run above (the same invocation). Where a target is missed, the last column "
        "gives what bounds it, computed from this run's data."
    )
    L.append("")
    L.append("| target | measured (medians) | ratio | limit | result | what bounds it |")
    L.append("|---|---|---|---|---|---|")
    also = f"; save_threads=1: {s(a1_stall)} ({div(a1_stall, hf) or 0:.2f}x)" if a1_stall is not None else ""
    L.append(
        row(
            "async stall <= 0.10x HF Trainer `_save_checkpoint` stall",
            f"`ours_async` {s(a_stall)} / `hf_trainer` {s(hf)}{also}",
            div(a_stall, hf),
            0.10,
            f"copying the {gb:.2f} GB state into existing memory alone takes {s(bc)} (`{bc_name}`) = "
            f"{div(bc, hf) or 0:.2f}x the HF stall"
            + (
                ", so no save that snapshots the state in memory before returning can reach 0.10x here"
                if bc is not None and hf and bc > 0.10 * hf
                else ""
            )
            + f"; the HF Trainer's stall is short because it only hands the bytes to the page cache (no fsync: "
            f"durable after {s(hf_dur)}). Our stall beyond that copy: "
            f"{s(None if a_stall is None or bc is None else a_stall - bc)}.",
        )
    )
    also = f"; save_threads=1: {div(a1_stall, bc) or 0:.2f}x" if a1_stall is not None else ""
    L.append(
        row(
            "async stall <= 2x a bare copy of the same bytes into existing buffers",
            f"`ours_async` {s(a_stall)} / `{bc_name}` {s(bc)} (faster of `bare_copy` {s(bc_t)}, "
            f"`bare_copy_1thread` {s(bc_1)}){also}",
            div(a_stall, bc),
            2.0,
            f"the stall is the staging copy (the same bytes as the bare copy, with torch's {torch.get_num_threads()} "
            f"intra-op threads: {s(bc_t)}) plus per-save work on the training thread "
            f"({s(None if a_stall is None or bc_t is None else a_stall - bc_t)}: state_dict, optimizer state_dict, "
            "flattening, RNG capture, starting the background job)",
        )
    )
    also = (
        f"; buffered writes (`ours_sync_buffered`): {s(sync_buf)} ({div(sync_buf, ts) or 0:.2f}x)" if sync_buf else ""
    )
    L.append(
        row(
            "sync time-to-durable <= 0.8x `torch.save` + fsync",
            f"`ours_sync` {s(sync)} / `torch_save` {s(ts)}{also}",
            div(sync, ts),
            0.8,
            f"`ours_sync` makes {gb:.2f} GB durable at {gb / sync if sync else 0:.2f} GB/s; sha256 of the state alone "
            f"takes {hash_s:.2f} s ({sha:.2f} GB/s, one core, beside the writes); the fastest durable writer in this "
            f"run was `{fastest[1]}` ({s(fastest[0])}, {gb / fastest[0] if fastest[0] else 0:.2f} GB/s), i.e. the "
            "disk write + fsync bounds every row",
        )
    )
    verify_cost = None if ours_r is None or ours_nv is None else ours_r - ours_nv
    also = f"; verify=False: {s(ours_nv)} ({div(ours_nv, tl) or 0:.2f}x)" if ours_nv is not None else ""
    L.append(
        row(
            "restore <= 1.0x `torch.load` (+ load_state_dict)",
            f"`ours_restore` (verify=True) {s(ours_r)} / `restore_torch_load` {s(tl)}{also}",
            div(ours_r, tl),
            1.0,
            f"verify=True (sha256 of every byte read) costs {s(verify_cost)} "
            f"over verify=False; hashing the {gb:.2f} GB in memory alone takes {hash_s:.2f} s ({sha:.2f} GB/s, one "
            "thread), and reads hash inline (a hashing thread beside the page-cache copy slowed both "
            "on these 2 vCPUs), so the restore costs read + hash. "
            f"verify=False ({s(ours_nv)}, {div(ours_nv, tl) or 0:.2f}x) is the cold read from this virtio disk "
            f"into the tensors (`torch.load` reads at {gb / tl if tl else 0:.2f} GB/s)",
        )
    )
    L.append(
        row(
            "async extra memory <= 1.1x the state size",
            f"staging buffers held between saves {staging / MB:.0f} MB / state {state / MB:.0f} MB; RSS growth of "
            f"the first save {growth / MB:.0f} MB ({growth / state:.2f}x); a warm save adds ~0 (Save table)",
            staging / state if staging else None,
            1.1,
            f"the manager keeps one staging copy of every tensor ({staging / state:.2f}x the state) plus I/O buffers",
        )
    )
    L.append("")
    L.append(
        "Training throughput with and without background saves (issue 7, item 3) is measured by "
        "`benchmarks/bench_train.py`, in its own section below."
    )
    L.append("")
    return L


def render(
    records: dict[str, list[RunRecord]],
    skipped: dict[str, str],
    sizes: dict[str, int],
    info: dict[str, str],
    args: argparse.Namespace,
    meta: dict[str, Any],
) -> str:
    def vals(name: str, attr: str) -> list[float]:
        return [getattr(r, attr) for r in records.get(name, []) if r.error is None and getattr(r, attr) is not None]

    L: list[str] = []
    L.append("# Benchmarks")
    L.append("")
    cmd = "python benchmarks/bench_save.py " + " ".join(sys.argv[1:])
    L.append(
        f"Machine, workload, save / restore tables and the issue 7 targets: generated {meta['date']} by "
        f"`{cmd.strip()}`: {args.warmup} untimed warm-up round(s), then {args.runs} measured runs per method, "
        "interleaved (run 1 of every method, then run 2, ...). The sections after them are written by "
        "`benchmarks/bench_train.py` (training throughput with background saves) and `benchmarks/bench_s3.py` "
        "(upload to S3) on the same machine; each names its own command."
    )
    L.append("")
    L.append("## Machine")
    L.append("")
    L.append(f"- CPU: {info['cpu']}, {info['cores']}")
    L.append(f"- RAM: {info['ram']}")
    L.append(f"- Software: {info['software']}")
    L.append(f"- Output dir: {info['disk']}")
    L.append(f"- Load average (1/5/15 min) before: {meta['load_before']}, after: {meta['load_after']}")
    balloon = {True: "yes", False: "no", None: "unknown"}[meta["balloon_reporting"]]
    L.append(
        f"- Allocating + first-touching new memory: {meta['touch_gbps']:.2f} GB/s; "
        f"virtio-balloon free-page reporting: {balloon}"
    )
    L.append(
        "- sha256 (hashlib, one thread) over the state: "
        + " / ".join(f"{g:.2f}" for g in meta["sha256_gbps"])
        + " GB/s (measured before / after the runs)"
    )
    L.append("")
    L.append("## Workload")
    L.append("")
    model_desc = (
        "GPT-2 *tiny* (`--small`: n_layer=2, n_embd=64)" if args.small else "GPT-2 small (`GPT2Config()` defaults)"
    )
    L.append(
        f"- {model_desc}, built from config with random init, fp32, {sizes['params']:,} parameters; "
        "lm_head.weight is tied to transformer.wte.weight."
    )
    L.append("- `torch.optim.AdamW` after one real step on a tiny batch (exp_avg, exp_avg_sq, step per param).")
    L.append(
        f"- State size (unique storages): model {sizes['model']:,} B + optimizer {sizes['optimizer']:,} B "
        f"= **{sizes['total']:,} B ({sizes['total'] / 1e9:.2f} GB, {sizes['total'] / GB:.2f} GiB)**."
    )
    L.append("")

    save_rows = [n for n in records if METHODS[n].kind == "save"]
    restore_rows = [n for n in records if METHODS[n].kind == "restore"]
    hwm_used = any(r.peak_hwm_mb is not None for rs in records.values() for r in rs)

    def err_of(name: str) -> str | None:
        errs = [r.error for r in records[name] if r.error]
        return f"FAILED ({len(errs)}/{len(records[name])} runs): {errs[0]}" if errs else None

    if save_rows:
        L.append("## Save")
        L.append("")
        L.append(
            "Times in seconds, median [min-max]. Peak extra = peak RSS above the RSS just before the call, MB, "
            "median [min-max]" + (" (kernel VmHWM; 5 ms samples in parentheses)." if hwm_used else " (5 ms samples).")
        )
        L.append(
            "Ratios are ratios of medians from this invocation: stall / stall(hf_trainer), "
            "durable / durable(torch_save)."
        )
        L.append("")
        L.append(
            "| method | stall s | durable s | peak extra MB | on disk MB | stall vs hf_trainer "
            "| durable vs torch_save | notes |"
        )
        L.append("|---|---|---|---|---|---|---|---|")
        for n in save_rows:
            e = err_of(n)
            notes = "; ".join(sorted({r.note for r in records[n] if r.note}))
            if e:
                notes = (notes + "; " if notes else "") + e.replace("|", "\\|")[:300]
            peak = fmt_range(vals(n, "peak_hwm_mb"), 0) if hwm_used else fmt_range(vals(n, "peak_sampled_mb"), 0)
            if hwm_used:
                peak += f" ({fmt_range(vals(n, 'peak_sampled_mb'), 0).split(' ')[0]})"
            dur = vals(n, "durable_s")
            L.append(
                f"| `{n}` | {fmt_range(vals(n, 'stall_s'))} | {fmt_range(dur) if dur else 'n/a'} | {peak} "
                f"| {fmt_range(vals(n, 'disk_mb'), 0).split(' ')[0]} "
                f"| {fmt_ratio(vals(n, 'stall_s'), vals('hf_trainer', 'stall_s'))} "
                f"| {fmt_ratio(dur, vals('torch_save', 'durable_s')) if dur else 'n/a'} | {notes} |"
            )
        L.append("")

    if restore_rows:
        colds = [r.cold for n in restore_rows for r in records[n] if r.error is None and r.cold is not None]
        if colds and all(colds):
            cache_txt = (
                "**cold**: before every restore run the file was written, fsynced, `os.sync()` + "
                "`echo 3 > /proc/sys/vm/drop_caches` succeeded (guest page cache dropped; any host-side "
                "caching of the virtual disk is outside our control)"
            )
        elif colds and not any(colds):
            cache_txt = (
                "**warm**: dropping the page cache (`/proc/sys/vm/drop_caches`) was not permitted, so the file "
                "written just before the restore is (mostly) in the page cache"
            )
        else:
            cache_txt = "mixed: dropping the page cache worked for some runs only"
        L.append("## Restore")
        L.append("")
        L.append(f"Cache state: {cache_txt}.")
        L.append(
            "Time = from the start of the load until model and optimizer hold the restored state (the training "
            "thread is blocked the whole time). Ratio = time / time(restore_torch_load)."
        )
        L.append("")
        L.append("| method | time s | peak extra MB | file(s) MB | vs restore_torch_load | notes |")
        L.append("|---|---|---|---|---|---|")
        for n in restore_rows:
            e = err_of(n)
            notes = "; ".join(sorted({r.note for r in records[n] if r.note}))
            if e:
                notes = (notes + "; " if notes else "") + e.replace("|", "\\|")[:300]
            peak = fmt_range(vals(n, "peak_hwm_mb"), 0) if hwm_used else fmt_range(vals(n, "peak_sampled_mb"), 0)
            if hwm_used:
                peak += f" ({fmt_range(vals(n, 'peak_sampled_mb'), 0).split(' ')[0]})"
            L.append(
                f"| `{n}` | {fmt_range(vals(n, 'stall_s'))} | {peak} "
                f"| {fmt_range(vals(n, 'disk_mb'), 0).split(' ')[0]} "
                f"| {fmt_ratio(vals(n, 'stall_s'), vals('restore_torch_load', 'stall_s'))} | {notes} |"
            )
        L.append("")

    L.extend(render_targets(records, sizes, meta))

    L.append("## Save / restore methods")
    L.append("")
    for n in list(records) + list(skipped):
        L.append(f"- `{n}`: {' '.join(METHODS[n].doc.split())}")
    L.append("")
    L.append("## Save / restore notes")
    L.append("")
    L.append(
        "- Between runs the previous output is deleted and `os.sync()` is called, so no run inherits dirty pages "
        "from the previous one. Save rows write into an empty directory each run."
    )
    L.append(
        f"- `drop_caches` permitted: {'yes' if meta['drop_caches_ok'] else 'no'}. "
        f"VmHWM reset via `/proc/self/clear_refs` permitted: {'yes' if meta['hwm_ok'] else 'no'}."
    )
    L.append(
        "- Async rows: durable is measured with the training thread idle (it just waits on the future). In real "
        "training the background serialization/writes compete with the training step for the same CPU cores "
        "(and the GIL), so both the step and the save would slow down."
    )
    L.append(
        "- DCP runs in a single process without `torch.distributed.init_process_group()`: torch warns "
        '"torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to save in a single '
        'process" and proceeds (no_dist mode). `FileSystemWriter` fsyncs its files itself (`sync_files=True`).'
    )
    if meta["balloon_reporting"]:
        L.append(
            "- This is a VM whose balloon device reports freed pages to the host: memory the process frees is "
            "given back, and touching new memory faults on the host as well (see the first-touch GB/s above). "
            "Everything that needs *new* memory is inflated compared with bare metal: the staging copy of "
            "async saves, restore buffers, and the page cache pages that writes go through. This is why "
            "`dcp_async_save`'s background write can take longer than `dcp_save`'s (profiled: the same "
            "`write()` calls, several times slower, right after staging has taken the recently freed pages)."
        )
    bc_t = [r.stall_s for r in records.get("bare_copy", []) if r.error is None]
    bc_1 = [r.stall_s for r in records.get("bare_copy_1thread", []) if r.error is None]
    if bc_t and bc_1:
        n_bc = _BARE.get("n", "~600")
        L.append(
            f"- `bare_copy` vs `bare_copy_1thread` (medians {statistics.median(bc_t):.2f} s vs "
            f"{statistics.median(bc_1):.2f} s): the destination buffers are allocated and first-touched once, "
            "untimed, and kept across runs (matched by name, so a restore that rebuilds the optimizer state in "
            "another order does not reallocate them); the timed copy takes no page faults (getrusage, in the "
            "notes), so neither first-touch nor the balloon reclaiming them is in the timing. What makes the "
            f"default copy slow when it is slow is torch's intra-op parallelism: every one of the {n_bc} `copy_` "
            f"calls is split over {torch.get_num_threads()} threads and joins them, and on this 2-core VM a join "
            "waits for a scheduler slice whenever the other core is busy (other processes, see the load "
            "average; our own background threads). Measured standalone on this VM under a concurrent test "
            "suite: per-tensor copy 0.5-1.3 s with 2 threads, 0.28-0.36 s with 1 thread, one flat 1.4 GB copy "
            "0.3-0.7 s; idle, the 2-thread copy is 0.12-0.2 s. The staging copy of an async save does the same "
            "per-tensor `copy_` with torch's threads, so `bare_copy` is its like-for-like floor."
        )
    L.append("- The machine may be shared with other work (see load average); ranges show the run-to-run spread.")
    for n, why in skipped.items():
        L.append(f"- Skipped `{n}`: {why}")
    L.append("")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per method (default 3)")
    ap.add_argument("--small", action="store_true", help="tiny GPT-2 (n_layer=2, n_embd=64) for debugging")
    ap.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md"),
        help="Markdown output file (default: the repo's BENCHMARKS.md; its `## ` sections written by other "
        "scripts are kept, after this script's content)",
    )
    ap.add_argument("--dir", default=None, help="scratch directory (default: a new temp dir, removed at the end)")
    ap.add_argument("--methods", default=None, help=f"comma-separated subset of: {','.join(METHODS)}")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds of every method before measuring (default 1)")
    ap.add_argument("--json", default=None, help="also write raw per-run records as JSON here")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch default)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)

    names = list(METHODS) if not args.methods else [s.strip() for s in args.methods.split(",") if s.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {list(METHODS)}")

    skipped: dict[str, str] = {}
    active: list[str] = []
    for n in names:
        missing = [f"`import {mod}` failed ({err})" for mod in METHODS[n].requires if (err := module_available(mod))]
        if missing:
            skipped[n] = "; ".join(missing)
        else:
            active.append(n)

    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
        root = tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir)
    else:
        root = tempfile.mkdtemp(prefix="ckpt-bench-")
    load_before = read_loadavg()

    print(f"[bench] building model (small={args.small}) ...", flush=True)
    model, opt = build_model_and_optimizer(args.small)
    sizes = state_sizes(model, opt)
    print(f"[bench] state: {sizes['total']:,} B ({sizes['total'] / 1e9:.2f} GB); scratch: {root}", flush=True)
    for n, why in skipped.items():
        print(f"[bench] skipping {n}: {why}", flush=True)

    hwm_ok = reset_hwm() and hwm_bytes() is not None
    drop_ok = drop_page_cache()
    touch_gbps = fresh_memory_touch_gbps(GB // 8 if args.small else GB)
    print(f"[bench] first-touch of new memory: {touch_gbps:.2f} GB/s", flush=True)
    sha_gbps = [sha256_gbps(unique_tensors(Bench(model=model, optimizer=opt, root=root)))]
    print(f"[bench] sha256 (hashlib, one thread): {sha_gbps[0]:.2f} GB/s", flush=True)
    b = Bench(model=model, optimizer=opt, root=root, small=args.small)
    records: dict[str, list[RunRecord]] = {n: [] for n in active}
    try:
        for w in range(args.warmup):
            for n in active:
                rec = run_one(METHODS[n], b, -1 - w, hwm_ok)
                state = "FAILED: " + rec.error if rec.error else f"{rec.stall_s:.3f}s"
                print(f"[bench] warm-up {w} {n:24s} {state}", flush=True)
        for run in range(args.runs):
            for n in active:
                rec = run_one(METHODS[n], b, run, hwm_ok)
                records[n].append(rec)
                if rec.error:
                    print(f"[bench] run {run} {n:24s} FAILED: {rec.error}", flush=True)
                else:
                    dur = f"{rec.durable_s:8.3f}s" if rec.durable_s is not None else "     n/a "
                    hwm = f"{rec.peak_hwm_mb:7.0f}" if rec.peak_hwm_mb is not None else "    n/a"
                    print(
                        f"[bench] run {run} {n:24s} stall {rec.stall_s:8.3f}s durable {dur} "
                        f"peak+ {rec.peak_sampled_mb:7.0f} MB (hwm {hwm}) disk {rec.disk_mb:7.0f} MB"
                        + (f" cold={rec.cold}" if rec.cold is not None else ""),
                        flush=True,
                    )
        sha_gbps.append(sha256_gbps(unique_tensors(b)))
    finally:
        for st in _ASYNC.values():
            with contextlib.suppress(Exception):
                st["manager"].close()
        b.cache.clear()
        _BARE["n"] = len(_BARE.pop("dsts", {}))
        shutil.rmtree(root, ignore_errors=True)

    meta = {
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "load_before": " ".join(load_before),
        "load_after": " ".join(read_loadavg()),
        "drop_caches_ok": drop_ok,
        "hwm_ok": hwm_ok,
        "touch_gbps": touch_gbps,
        "sha256_gbps": sha_gbps,
        "balloon_reporting": balloon_free_page_reporting(),
    }
    info = machine_info(os.path.dirname(root))
    md = render(records, skipped, sizes, info, args, meta)
    print()
    print(md)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    kept = write_document(args.out, md, OWNED_HEADINGS)
    print(f"[bench] wrote {args.out}" + (f" (kept sections: {kept})" if kept else ""), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "sizes": sizes,
                    "meta": meta,
                    "info": info,
                    "skipped": skipped,
                    "records": {n: [dataclasses.asdict(r) for r in rs] for n, rs in records.items()},
                },
                f,
                indent=2,
            )
    return 0 if all(r.error is None for rs in records.values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
