#!/usr/bin/env python
"""Checkpoint save / restore benchmark (issue 16): GPT-2 + AdamW at 124M, 355M and 774M parameters,
a tiny model's fixed cost per save, `ckpt` startup, and every issue-16 target marked pass or miss.

    python benchmarks/bench_save.py [--sizes 124m,355m,774m] [--runs 3] [--warmup 1] [--idle-pause 5]
                                    [--sections cold,warm,quiet,busy,restore,tiny,cli] [--methods a,b,c]
                                    [--with-s3-list] [--out BENCHMARKS.md] [--json FILE] [--dir TMPDIR]
    python benchmarks/bench_save.py --quick      # tiny GPT-2, 1 run, 1-2 minutes; prints, writes no file

The default sweep (124m,355m,774m, 3 runs, all rows) takes about 1.5-2 hours on a 2-core VM with
24 GiB of RAM and a ~1 GB/s disk; the 774M rows dominate it (each run writes ~9 GB many times).

Everything comes from one invocation, and BENCHMARKS.md's sections of this script are rewritten
together from it (the sections other scripts write are kept, see `_measure.write_document`).
Models are built from configs with random init (nothing is downloaded); AdamW has made one step.

Sections, and the page-cache state every row of a section is measured in
--------------------------------------------------------------------------
* ``cold``  -- Save, cold page cache. Before each timed save: ``os.sync()``, ``echo 3 >
  /proc/sys/vm/drop_caches``, ``malloc_trim``, then ``--idle-pause`` seconds idle, so the freed
  memory goes back to the host as it does between two periodic checkpoints on a VM with
  virtio-balloon free-page reporting (buffered writes then need pages the host must hand back).
* ``warm``  -- Save, warm page cache. Right before each timed save a file of the state's size is
  written, fsynced and deleted: the page cache holds freshly freed pages, as right after another
  large write.
* ``quiet`` / ``busy`` -- Async stall. ``os.sync()`` before each timed save (the stall is a copy
  between memory buffers that exist already); ``busy`` also starts ``python -c "while True: pass"``
  0.5 s before the timed save and kills it after (the second core of a 2-core machine busy). The
  floor is ``bare_copy_1thread``: one thread copying the state into buffers allocated before.
* ``restore`` -- Restore, cold: the file is written and fsynced untimed, then the page cache is
  dropped. ``cold_read`` reads the same bytes with plain ``read`` calls: the disk's floor.
* ``tiny``  -- Fixed cost per save: a 10k-parameter MLP + AdamW; time to durable of one save and
  fsync calls per save (counted by wrapping ``os.fsync`` / ``os.fdatasync`` in this process), then a
  training loop that saves every step (``--tiny-steps``, keep_last=2 retention) for each way of saving.
* ``cli``   -- ``ckpt --version``, ``ckpt list ROOT`` and ``ckpt inspect ROOT NAME`` as fresh
  processes on a local root, beside ``python -c pass`` and ``python -c "import torch"``. With
  ``--with-s3-list``, ``ckpt list`` of 1,000 checkpoints on S3 from ``benchmarks/bench_list.py``.

Rows of a section are interleaved (run 0 of every row, then run 1, ...) and so are the sections
(one run of every section, then the next run), so drift hits every row alike. ``--warmup`` untimed
rounds run at the first size only: they warm process-wide one-time costs (imports, lazy module
set-up, thread pools). Rows that keep a copy of the state (staging buffers of an async manager,
copy destinations, a loaded state dict) allocate it untimed in their setup -- an async manager
makes one untimed save first, so the timed save reuses its staging buffers -- and free it after
their run, so at most one extra copy of the state is alive at any time; a row that needs one is
skipped at a size whose copy does not fit in MemAvailable (the reason is printed and written).

On a GPU machine
----------------
With ``torch.cuda.is_available()`` the stall sections gain three rows at every size, on a copy of
the model and optimizer state on ``cuda:0`` (made once per size): ``d2h_pinned`` (every tensor
copied into pinned host buffers allocated before, ``copy_(non_blocking=True)``, then one
``torch.cuda.synchronize()``: the floor of an async save's stall from GPU memory), and
``ours_async_gpu`` / ``ours_async_gpu_1thread`` (``CheckpointManager(async_save=True)`` saving the GPU
model), whose stall target is <= 1.2x ``d2h_pinned``, quiet and busy. Without CUDA these rows are
skipped and say so. Run it with a CUDA build of torch, on a local disk (not a network filesystem),
as root if the cold section should really be cold (``drop_caches``):

    PYTHONPATH=src python benchmarks/bench_save.py --sizes 124m,355m,774m --runs 3

Adding a row
------------
A row is ``fn(b: Bench) -> Result`` registered with ``@register(name, kinds=(...))``: kinds are
"save" (the cold and warm sections), "stall" (quiet and busy) and "restore". ``b.out_dir`` is a
fresh empty directory for the run; untimed preparation goes into ``setup=`` (it runs before the
page-cache preparation and before the RSS baseline is taken); ``needs_copy=True`` if the row holds
a second copy of the state.
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
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
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


def mem_available() -> int:
    """MemAvailable from /proc/meminfo, bytes (0 if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"^MemAvailable:\s+(\d+)\s+kB", f.read(), re.M)
        return int(m.group(1)) * 1024 if m else 0
    except OSError:
        return 0


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
    """fsync every file under `root`, then every directory (bottom-up) incl. `root` and its parent.

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


_libc: ctypes.CDLL | None
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


_FILL_CHUNK = 64 * MB
_FILL: list[bytearray] = []


def write_file(path: str, nbytes: int) -> None:
    """Write ``nbytes`` to ``path`` through the page cache from one reused 64 MiB buffer, then fsync."""
    if not _FILL:
        _FILL.append(bytearray(os.urandom(MB)) * (_FILL_CHUNK // MB))
    view = memoryview(_FILL[0])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, view[: min(left, len(view))])
        os.fsync(fd)
    finally:
        os.close(fd)


# --- page-cache states, set right before a timed call ------------------------------------------


def prepare_cold(pause: float) -> bool:
    """Cold: sync, drop the page cache, give freed heap back, then sit idle ``pause`` seconds."""
    release_memory()
    ok = drop_page_cache()
    time.sleep(pause)
    return ok


def prepare_warm(scratch: str, nbytes: int) -> None:
    """Warm: write, fsync and delete a file of ``nbytes``, so freshly freed page-cache pages are at hand."""
    path = os.path.join(scratch, "warm-page-cache.bin")
    write_file(path, nbytes)
    os.unlink(path)


@contextlib.contextmanager
def busy_core() -> Iterator[int]:
    """A CPU-bound process beside us (started here, killed on exit by its own handle); yields its pid."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # past interpreter start-up: spinning
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def counting_fsyncs() -> Iterator[list[float]]:
    """Count os.fsync / os.fdatasync calls made in this process (any thread) while the block runs.

    Yields ``[calls, seconds spent in them]``, filled in as the calls happen.
    """
    count = [0.0, 0.0]
    lock = threading.Lock()
    originals = {name: getattr(os, name) for name in ("fsync", "fdatasync") if hasattr(os, name)}

    def counted(fn: Callable[[Any], None]) -> Callable[[Any], None]:
        def call(fd: Any) -> None:
            t0 = time.perf_counter()
            try:
                fn(fd)
            finally:
                with lock:
                    count[0] += 1
                    count[1] += time.perf_counter() - t0

        return call

    for name, fn in originals.items():
        setattr(os, name, counted(fn))
    try:
        yield count
    finally:
        for name, fn in originals.items():
            setattr(os, name, fn)


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


def sha256_gbps(tensors: list[torch.Tensor], limit: int = GB) -> float:
    """Throughput (GB/s) of hashlib.sha256 over (up to ``limit`` bytes of) ``tensors``, one thread."""
    h = hashlib.sha256()
    total = 0
    t0 = time.perf_counter()
    for t in tensors:
        data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        h.update(data.data)
        total += data.nbytes
        if total >= limit:
            break
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


_T0 = time.perf_counter()


def log(msg: str) -> None:
    """A progress line on stdout with the seconds since the start."""
    print(f"[bench {time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def read_loadavg() -> list[str]:
    """The 1, 5 and 15 minute load averages (bench_sharded.py imports this)."""
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
    """One size's model and optimizer plus the per-run scratch a row works in."""

    size: str
    config: Any  # GPT2Config
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    root: str  # benchmark scratch root (survives across runs)
    state_bytes: int = 0
    out_dir: str = ""  # fresh, empty, per (method, run); deleted after the run
    run_index: int = 0
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)  # cleared after every run
    keep: dict[str, Any] = dataclasses.field(default_factory=dict)  # kept for the whole size

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def path(self, *names: str) -> str:
        return os.path.join(self.out_dir, *names)


@dataclasses.dataclass
class Method:
    name: str
    fn: Callable[[Bench], Result]
    kinds: tuple[str, ...]  # "save" (cold, warm sections), "stall" (quiet, busy), "restore"
    setup: Callable[[Bench], None] | None
    requires: tuple[str, ...]  # importable modules; row is skipped (with a note) if missing
    needs_copy: bool  # holds a second copy of the state in host memory while it runs
    cuda: bool  # needs a CUDA device
    doc: str


METHODS: dict[str, Method] = {}


def register(
    name: str,
    *,
    kinds: tuple[str, ...] = ("save",),
    setup: Callable[[Bench], None] | None = None,
    requires: tuple[str, ...] = (),
    needs_copy: bool = False,
    cuda: bool = False,
    doc: str = "",
) -> Callable[[Callable[[Bench], Result]], Callable[[Bench], Result]]:
    """Register a benchmark row. `fn(b) -> Result`; `setup(b)` is untimed."""

    def deco(fn: Callable[[Bench], Result]) -> Callable[[Bench], Result]:
        METHODS[name] = Method(name, fn, kinds, setup, requires, needs_copy, cuda, doc or (fn.__doc__ or "").strip())
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


def unique_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """All model + optimizer tensors, deduplicated by storage (tied weights counted once)."""
    seen: set[int] = set()
    out: list[torch.Tensor] = []
    tensors = list(model.state_dict().values())
    for st in optimizer.state.values():
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
        key = (t.untyped_storage().data_ptr(), int(t.storage_offset()), tuple(t.shape))
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


def write_safetensors_pair(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_path: str,
                           optimizer_path: str) -> None:
    """safetensors.torch.save_file of the model (tied tensors once) and of the flattened optimizer state."""
    import safetensors.torch as st

    msd, _dropped = dedup_model_sd(model.state_dict())
    st.save_file(msd, model_path, metadata={"format": "pt"})
    otensors, ometa = flatten_optimizer(optimizer.state_dict())
    st.save_file(otensors, optimizer_path, metadata=ometa)


# =============================================================================
# Baseline rows
# =============================================================================


def _named_sources(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every unique model + optimizer tensor under a name that does not depend on the order in
    which a restore rebuilt the optimizer state (parameter index + state key)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    named = [(f"model.{k}", t) for k, t in model.state_dict().items()]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        st = optimizer.state.get(p, {})
        named += [(f"optimizer.{i}.{k}", st[k]) for k in sorted(st) if torch.is_tensor(st[k])]
    for name, t in named:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


def _setup_bare_copy(b: Bench) -> None:
    # Destination buffers allocated and first-touched here, untimed, as an async manager's staging
    # buffers are by its first save; freed after the run (at most one extra copy of the state alive).
    pairs = []
    for src in _named_sources(b.model, b.optimizer).values():
        dst = torch.empty_like(src)
        dst.zero_()  # fault the pages in now, so the timed copy is a pure memcpy
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
    del pairs
    note = (
        f"memory only; {b.keep.get('n_tensors', '?')} tensors into buffers ({held / MB:.0f} MB) allocated + touched "
        f"before the timing; page faults in the timed copy: {faults}"
    )
    return Result(t, None, note=note)


@register("bare_copy", kinds=("stall",), setup=_setup_bare_copy, needs_copy=True)
def bare_copy(b: Bench) -> Result:
    """dst.copy_(src) of every unique model+optimizer tensor into buffers that exist already
    (allocated and first-touched untimed), with torch's default intra-op threads: an async save's
    staging copy as torch does it by default (not durable)."""
    return _bare_copy(b, None)


@register("bare_copy_1thread", kinds=("stall",), setup=_setup_bare_copy, needs_copy=True)
def bare_copy_1thread(b: Bench) -> Result:
    """Same copy into the same kind of buffers with torch.set_num_threads(1): one memcpy stream, no
    fork/join of intra-op threads per tensor. The floor for the async stall on CPU (issue 16, item 5)."""
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


@register("safetensors_save_file", requires=("safetensors",))
def safetensors_save_file(b: Bench) -> Result:
    """safetensors.torch.save_file of the model (tied lm_head dropped) and of the flattened
    optimizer tensors (param_groups in metadata) + fsync of both files and the directory: the
    baseline of issue 16's save target."""
    t0 = time.perf_counter()
    write_safetensors_pair(b.model, b.optimizer, b.path("model.safetensors"), b.path("optimizer.safetensors"))
    fsync_tree(b.out_dir)
    t = time.perf_counter() - t0
    return Result(t, t)


def _setup_hf_trainer(b: Bench) -> None:
    if "trainer" not in b.keep:
        from transformers import Trainer, TrainingArguments
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        args = TrainingArguments(output_dir=os.path.join(b.root, "hf_trainer_init"), report_to=[], use_cpu=True)
        trainer = Trainer(model=b.model, args=args, optimizers=(b.optimizer, None))
        trainer.create_optimizer_and_scheduler(num_training_steps=10)  # creates the LR scheduler only
        assert trainer.optimizer is b.optimizer
        b.keep["trainer"] = trainer
    trainer = b.keep["trainer"]
    trainer.args.output_dir = b.out_dir
    trainer.state.global_step = b.run_index + 1


@register("hf_trainer", setup=_setup_hf_trainer, requires=("transformers",))
def hf_trainer(b: Bench) -> Result:
    """transformers.Trainer._save_checkpoint(model, trial=None): model.safetensors (save_pretrained)
    + optimizer.pt + scheduler.pt + rng_state.pth + trainer_state.json + args. It does not fsync;
    durable = call + fsync of every file it wrote."""
    trainer = b.keep["trainer"]
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


@register("dcp_async_save", needs_copy=True)
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
        upload: Any = getattr(fut, "upload_completion", fut)
        upload.result()
        fsync_tree(b.out_dir)
        t2 = time.perf_counter()
    return Result(t1 - t0, t2 - t0)


def _cold_read_setup(b: Bench) -> None:
    write_file(b.path("state.bin"), b.state_bytes)
    b.cache["read_buffer"] = bytearray(_FILL_CHUNK)


@register("cold_read", kinds=("restore",), setup=_cold_read_setup)
def cold_read(b: Bench) -> Result:
    """Plain read() of a file of the state's size (written + fsynced, page cache dropped) into one
    reused 64 MiB buffer: what the disk gives any restore, with nothing decoded or hashed."""
    view = memoryview(b.cache.pop("read_buffer"))
    t0 = time.perf_counter()
    with open(b.path("state.bin"), "rb", buffering=0) as f:
        while f.readinto(view):
            pass
    t = time.perf_counter() - t0
    return Result(t, None, note=f"{b.state_bytes / t / 1e9:.2f} GB/s")


def _setup_restore_torch(b: Bench) -> None:
    p = b.path("checkpoint.pt")
    torch.save(b.state_dict(), p)
    fsync_file(p)


@register("restore_torch_load", kinds=("restore",), setup=_setup_restore_torch, needs_copy=True)
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
    write_safetensors_pair(b.model, b.optimizer, b.path("model.safetensors"), b.path("optimizer.safetensors"))
    fsync_tree(b.out_dir)


@register("restore_safetensors", kinds=("restore",), setup=_setup_restore_safetensors, requires=("safetensors",),
          needs_copy=True)
def restore_safetensors(b: Bench) -> Result:
    """safetensors.torch.load_file of both files (model: default mmap backend, copied by
    load_state_dict; optimizer: backend="pread" so the state is really in memory, not lazily mmapped)
    + load_state_dict (strict except the tied lm_head) + optimizer.load_state_dict: the baseline of
    issue 16's restore target."""
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
# OUR LIBRARY ROWS (ckpt_callback): public API only, plus the private switch
# ckpt_callback._storage.DIRECT_IO for the buffered-write row.
# =============================================================================


def _ours_setup(b: Bench) -> None:
    """Untimed: a fresh CheckpointManager on this run's empty out_dir (keep_last=None: no retention)."""
    import ckpt_callback

    b.cache["ours"] = ckpt_callback.CheckpointManager(b.out_dir, keep_last=None)


def _ours_sync(b: Bench) -> Result:
    mgr = b.cache.pop("ours")
    try:
        return timed_sync(b, lambda: mgr.save(b.model, step=b.run_index + 1, optimizer=b.optimizer))
    finally:
        mgr.close()


@register("ours_sync", setup=_ours_setup, requires=("ckpt_callback",))
def ours_sync(b: Bench) -> Result:
    """ckpt_callback.CheckpointManager(dir, keep_last=None).save(model, step=..., optimizer=opt), blocking,
    library defaults; durable = call + fsync of every file it wrote (cheap: the library already fsynced)."""
    return _ours_sync(b)


def _ours_buffered_setup(b: Bench) -> None:
    from ckpt_callback import _storage

    if not hasattr(_storage, "DIRECT_IO"):
        raise RuntimeError("ckpt_callback._storage.DIRECT_IO is gone: adapt or drop the ours_sync_buffered row")
    _ours_setup(b)


@register("ours_sync_buffered", setup=_ours_buffered_setup, requires=("ckpt_callback",))
def ours_sync_buffered(b: Bench) -> Result:
    """Same as ours_sync with ckpt_callback._storage.DIRECT_IO = False (buffered writes through the
    page cache + fsync), restored afterwards."""
    from ckpt_callback import _storage

    old = _storage.DIRECT_IO
    _storage.DIRECT_IO = False
    try:
        return _ours_sync(b)
    finally:
        _storage.DIRECT_IO = old


def _gpu_state(b: Bench) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The size's model and AdamW state on cuda:0 (built once per size from the CPU copy)."""
    if "gpu" not in b.keep:
        from transformers import GPT2LMHeadModel

        with torch.device("cuda"):
            model = GPT2LMHeadModel(b.config)
        model.load_state_dict(b.model.state_dict())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
        opt.load_state_dict(b.optimizer.state_dict())  # moves the state next to its parameter
        torch.cuda.synchronize()
        b.keep["gpu"] = (model, opt)
    return b.keep["gpu"]


def _ours_async_setup(*, gpu: bool = False, **kwargs: Any) -> Callable[[Bench], None]:
    """Untimed: an async manager on out_dir whose first save (made, committed and deleted here)
    allocated its staging buffers, as in training; the RSS it keeps goes in the row's notes."""

    def setup(b: Bench) -> None:
        import ckpt_callback

        model, opt = _gpu_state(b) if gpu else (b.model, b.optimizer)
        release_memory()
        base = rss_bytes()
        mgr = ckpt_callback.CheckpointManager(b.out_dir, keep_last=None, async_save=True, **kwargs)
        info = mgr.save(model, step=1, optimizer=opt)
        assert info is not None
        mgr.wait()
        mgr.delete(info.name)
        release_memory()
        b.cache["async"] = {"manager": mgr, "model": model, "optimizer": opt, "held": rss_bytes() - base}

    return setup


def _ours_async(b: Bench) -> Result:
    st = b.cache.pop("async")
    mgr = st["manager"]
    try:
        t0 = time.perf_counter()
        mgr.save(st["model"], step=2, optimizer=st["optimizer"])
        t1 = time.perf_counter()
        mgr.wait()
        t2 = time.perf_counter()
    finally:
        mgr.close()
    note = f"memory the manager holds between saves (RSS after its first save): {st['held'] / MB:.0f} MB"
    return Result(t1 - t0, t2 - t0, note=note)


@register("ours_async", kinds=("save", "stall"), setup=_ours_async_setup(), requires=("ckpt_callback",),
          needs_copy=True)
def ours_async(b: Bench) -> Result:
    """CheckpointManager(dir, async_save=True).save(...) on a manager that saved once before (its
    staging buffers exist; save_threads default): stall until save() returns, durable until wait()
    returns (it fsyncs)."""
    return _ours_async(b)


@register("ours_async_1thread", kinds=("save", "stall"), setup=_ours_async_setup(save_threads=1),
          requires=("ckpt_callback",), needs_copy=True)
def ours_async_1thread(b: Bench) -> Result:
    """Same as ours_async with save_threads=1."""
    return _ours_async(b)


def _ours_restore_setup(b: Bench) -> None:
    _ours_setup(b)
    b.cache["ours"].save(b.model, step=b.run_index + 1, optimizer=b.optimizer)
    fsync_tree(b.out_dir)


def _ours_restore(b: Bench, verify: bool) -> Result:
    mgr = b.cache.pop("ours")
    try:
        t0 = time.perf_counter()
        mgr.restore("latest", model=b.model, optimizer=b.optimizer, verify=verify)
        t = time.perf_counter() - t0
    finally:
        mgr.close()
    return Result(t, None)


@register("ours_restore", kinds=("restore",), setup=_ours_restore_setup, requires=("ckpt_callback",),
          needs_copy=True)
def ours_restore(b: Bench) -> Result:
    """CheckpointManager.restore('latest', model=, optimizer=) with defaults (verify=True: every byte
    read is checked against the sidecar, RNG states restored)."""
    return _ours_restore(b, True)


@register("ours_restore_noverify", kinds=("restore",), setup=_ours_restore_setup, requires=("ckpt_callback",),
          needs_copy=True)
def ours_restore_noverify(b: Bench) -> Result:
    """Same as ours_restore with verify=False (no hash check): what verification costs."""
    return _ours_restore(b, False)


# --- GPU rows (issue 16, item 7): skipped without CUDA -------------------------------------------


def _setup_d2h(b: Bench) -> None:
    model, opt = _gpu_state(b)
    pairs = []
    for src in _named_sources(model, opt).values():
        dst = torch.empty(src.shape, dtype=src.dtype, pin_memory=src.is_cuda)  # page-locked: the copy is a DMA
        dst.zero_()
        pairs.append((src, dst))
    b.cache["d2h_pairs"] = pairs


@register("d2h_pinned", kinds=("stall",), setup=_setup_d2h, needs_copy=True, cuda=True)
def d2h_pinned(b: Bench) -> Result:
    """Model and AdamW state on cuda:0: dst.copy_(src, non_blocking=True) of every unique tensor into
    pinned host buffers allocated before, then one torch.cuda.synchronize(): the floor for the async
    stall of a GPU model (issue 16, item 7)."""
    pairs = b.cache.pop("d2h_pairs")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for src, dst in pairs:
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter() - t0
    held = sum(d.numel() * d.element_size() for _, d in pairs)
    return Result(t, None, note=f"{len(pairs)} tensors, {held / MB:.0f} MB of pinned host buffers")


@register("ours_async_gpu", kinds=("stall",), setup=_ours_async_setup(gpu=True), requires=("ckpt_callback",),
          needs_copy=True, cuda=True)
def ours_async_gpu(b: Bench) -> Result:
    """ours_async with the model and AdamW state on cuda:0 (the manager stages into host buffers)."""
    return _ours_async(b)


@register("ours_async_gpu_1thread", kinds=("stall",), setup=_ours_async_setup(gpu=True, save_threads=1),
          requires=("ckpt_callback",), needs_copy=True, cuda=True)
def ours_async_gpu_1thread(b: Bench) -> Result:
    """ours_async_gpu with save_threads=1."""
    return _ours_async(b)


# Which row is each stall row's floor, and the baseline of each ratio table.
FLOOR = {"ours_async": "bare_copy_1thread", "ours_async_1thread": "bare_copy_1thread", "bare_copy": "bare_copy_1thread",
         "ours_async_gpu": "d2h_pinned", "ours_async_gpu_1thread": "d2h_pinned"}


# =============================================================================
# Sections, sizes, models
# =============================================================================


@dataclasses.dataclass(frozen=True)
class Section:
    key: str
    kind: str  # the Method kind its rows have
    title: str


SECTIONS = {
    "cold": Section("cold", "save", "Save, cold page cache"),
    "warm": Section("warm", "save", "Save, warm page cache"),
    "quiet": Section("quiet", "stall", "Async stall, quiet"),
    "busy": Section("busy", "stall", "Async stall, second core busy"),
    "restore": Section("restore", "restore", "Restore, cold page cache"),
}
OTHER_SECTIONS = ("tiny", "cli")

SIZES: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny": ("GPT-2 tiny (n_layer=2, n_embd=64, n_head=4; for --quick)", {"n_layer": 2, "n_embd": 64, "n_head": 4}),
    "124m": ("GPT-2 124M (`GPT2Config()` defaults)", {}),
    "355m": ("GPT-2 355M (n_embd=1024, n_layer=24, n_head=16)", {"n_embd": 1024, "n_layer": 24, "n_head": 16}),
    "774m": ("GPT-2 774M (n_embd=1280, n_layer=36, n_head=20)", {"n_embd": 1280, "n_layer": 36, "n_head": 20}),
}


def build_model_and_optimizer(size: str, seed: int = 0) -> tuple[Any, torch.nn.Module, torch.optim.Optimizer]:
    """GPT-2 of ``size`` from its config (random init, never downloads) and AdamW after one real step."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = GPT2Config(**SIZES[size][1])
    model = GPT2LMHeadModel(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    x = torch.randint(0, cfg.vocab_size, (1, 8))  # one real step, so exp_avg / exp_avg_sq / step exist
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)  # grads freed: not part of the state
    return cfg, model, opt


def build_peak_bytes(size: str) -> int:
    """Memory `build_model_and_optimizer` peaks at: fp32 weights + gradients + AdamW's two moments
    (16 B per parameter; GPT-2 has about 12 * n_layer * n_embd^2 + (vocab + positions) * n_embd
    parameters), plus 1 GiB for activations and the interpreter."""
    from transformers import GPT2Config

    cfg = GPT2Config(**SIZES[size][1])
    params = 12 * cfg.n_layer * cfg.n_embd**2 + (cfg.vocab_size + cfg.n_positions) * cfg.n_embd
    return 16 * params + GB


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


def gpu_problem(state_bytes: int) -> str | None:
    """Why the GPU rows cannot run at this state size, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    free, _total = torch.cuda.mem_get_info()
    if free < 1.2 * state_bytes:
        return f"the state ({state_bytes / 1e9:.2f} GB) does not fit in free GPU memory ({free / 1e9:.2f} GB)"
    return None


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
            m = re.search(r"^MemTotal:\s+(\d+)", f.read(), re.M)
        info["ram"] = f"{int(m.group(1)) / 1024 / 1024:.1f} GiB" if m else "?"
    except OSError:
        info["ram"] = "?"
    versions = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    for mod in ("transformers", "safetensors"):
        with contextlib.suppress(Exception):
            versions.append(f"{mod} {__import__(mod).__version__}")
    info["software"] = ", ".join(versions) + f", kernel {platform.release()}"
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (the GPU rows are skipped)"
    info["disk"] = describe_disk(out_root)
    with contextlib.suppress(Exception):
        import ckpt_callback

        info["library"] = f"`ckpt_callback` imported from `{os.path.dirname(ckpt_callback.__file__)}`"
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
# Runner for the GPT-2 rows
# =============================================================================


@dataclasses.dataclass
class RunRecord:
    size: str
    section: str
    method: str
    run: int
    stall_s: float | None = None
    durable_s: float | None = None
    peak_sampled_mb: float | None = None
    peak_hwm_mb: float | None = None
    disk_mb: float | None = None
    note: str = ""
    error: str | None = None
    prepared: bool | None = None  # cold sections: did dropping the page cache work?
    samples: int = 0
    load1: float | None = None  # 1-minute load average right before the timed call (before a busy process)


Records = dict[str, dict[str, dict[str, list[RunRecord]]]]  # size -> section -> method -> runs


def module_available(name: str) -> str | None:
    """None if importable, else the error text."""
    try:
        __import__(name)
        return None
    except Exception as e:  # any import failure means skip
        return f"{type(e).__name__}: {e}"


def prepare(section: str, b: Bench, args: argparse.Namespace) -> bool | None:
    """Put the page cache in the section's state, right before the timed call."""
    if section == "cold":
        return prepare_cold(args.idle_pause)
    if section == "warm":
        prepare_warm(b.root, b.state_bytes)
        return None
    if section == "restore":
        return prepare_cold(0.0)
    os.sync()  # quiet, busy: no dirty pages of an earlier row are written back during the copy
    return None


def run_one(m: Method, b: Bench, run: int, section: str, hwm_ok: bool, args: argparse.Namespace) -> RunRecord:
    rec = RunRecord(b.size, section, m.name, run)
    b.out_dir = os.path.join(b.root, "out", f"{section}-{m.name}-run{run}")
    b.run_index = run
    shutil.rmtree(b.out_dir, ignore_errors=True)
    os.makedirs(b.out_dir)
    try:
        if m.setup:
            m.setup(b)
        release_memory()
        rec.prepared = prepare(section, b, args)
        rec.load1 = os.getloadavg()[0]
        with busy_core() if section == "busy" else contextlib.nullcontext():
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
    except Exception as e:  # keep the other rows running
        rec.error = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    finally:
        b.cache.clear()
        shutil.rmtree(b.out_dir, ignore_errors=True)
        release_memory()
        os.sync()
    return rec


def log_record(rec: RunRecord, prefix: str) -> None:
    if rec.error:
        log(f"{prefix} {rec.section:7s} {rec.method:24s} FAILED: {rec.error}")
        return
    dur = f"{rec.durable_s:8.3f}s" if rec.durable_s is not None else "     n/a "
    log(
        f"{prefix} {rec.section:7s} {rec.method:24s} stall {rec.stall_s:8.3f}s durable {dur} "
        f"peak+ {rec.peak_sampled_mb:7.0f} MB disk {rec.disk_mb:7.0f} MB"
        + (f" cache-dropped={rec.prepared}" if rec.prepared is not None else "")
    )


def run_size(
    size: str, args: argparse.Namespace, rows: dict[str, list[str]], warmup: int, hwm_ok: bool, root: str,
    skipped: dict[str, dict[str, str]], meta: dict[str, Any],
) -> dict[str, dict[str, list[RunRecord]]]:
    """Every section's rows at one size, interleaved; returns section -> method -> runs."""
    log(f"{size}: building {SIZES[size][0]} ...")
    need = build_peak_bytes(size)
    if need > mem_available():
        raise MemoryError(f"building it peaks at about {need / 1e9:.1f} GB (weights, gradients and AdamW state), "
                          f"more than MemAvailable ({mem_available() / 1e9:.1f} GB)")
    t0 = time.perf_counter()
    cfg, model, opt = build_model_and_optimizer(size)
    sizes = state_sizes(model, opt)
    state = sizes["total"]
    release_memory()
    avail = mem_available()
    size_meta: dict[str, Any] = {"sizes": sizes, "mem_available_after_build": avail,
                                 "build_s": time.perf_counter() - t0}
    meta["sizes"][size] = size_meta
    log(f"{size}: state {state:,} B ({state / 1e9:.2f} GB), MemAvailable {avail / 1e9:.1f} GB, built in "
        f"{size_meta['build_s']:.0f} s")
    skips = skipped.setdefault(size, {})
    margin = int(1.5 * GB + 0.05 * state)
    gpu_why = gpu_problem(state)
    for section_rows in rows.values():
        for n in section_rows:
            m = METHODS[n]
            if m.cuda and gpu_why:
                skips[n] = gpu_why
            elif m.needs_copy and state + margin > avail:
                skips[n] = (f"needs a second copy of the {state / 1e9:.2f} GB state beside the model and optimizer "
                            f"(+{margin / 1e9:.1f} GB margin); MemAvailable after building them: {avail / 1e9:.1f} GB")
    for n, why in skips.items():
        log(f"{size}: skipping {n}: {why}")
    active = {s: [n for n in names if n not in skips] for s, names in rows.items()}

    b = Bench(size=size, config=cfg, model=model, optimizer=opt, root=os.path.join(root, size), state_bytes=state)
    os.makedirs(b.root, exist_ok=True)
    b.keep["n_tensors"] = len(_named_sources(model, opt))
    size_meta["sha256_gbps"] = [sha256_gbps(unique_tensors(model, opt))]
    log(f"{size}: sha256 (hashlib, one thread): {size_meta['sha256_gbps'][0]:.2f} GB/s")
    base_rss = rss_bytes()
    leaks: list[str] = meta.setdefault("leaks", [])
    records: dict[str, dict[str, list[RunRecord]]] = {s: {n: [] for n in names} for s, names in active.items()}
    try:
        for run in range(-warmup, args.runs):
            for section, names in active.items():
                for n in names:
                    if METHODS[n].needs_copy and state + margin > (now := mem_available()):
                        # something still holds memory (another process, or a copy not given back): running
                        # the row could bring the OOM killer onto the whole benchmark
                        rec = RunRecord(size, section, n, run, error=(
                            f"not run: MemAvailable {now / 1e9:.1f} GB < the {state / 1e9:.2f} GB copy it needs "
                            f"+ {margin / 1e9:.1f} GB margin"))
                    else:
                        rec = run_one(METHODS[n], b, run, section, hwm_ok, args)
                    if run >= 0:
                        records[section][n].append(rec)
                    log_record(rec, f"{size} {'warm-up' if run < 0 else f'run {run}'}")
                    grown = rss_bytes() - base_rss
                    if grown > 0.25 * state + 256 * MB:
                        leaks.append(f"{size}: RSS {grown / MB:.0f} MB above the size's baseline after {section} "
                                     f"{n} run {run}")
                        log(f"WARNING {leaks[-1]}")
        size_meta["sha256_gbps"].append(sha256_gbps(unique_tensors(b.model, b.optimizer)))
    finally:
        b.cache.clear()
        b.keep.clear()
        shutil.rmtree(b.root, ignore_errors=True)
        del b, model, opt
        release_memory()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return records


# =============================================================================
# Tiny model: fixed cost per save and a loop that saves every step (issue 16, item 3)
# =============================================================================


def tiny_model(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, tuple[torch.Tensor, torch.Tensor]]:
    """An MLP 64-128-16 (10,384 parameters) with AdamW after one step, and its fixed batch."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = (torch.randn(32, 64), torch.randn(32, 16))
    train_step(model, opt, batch)
    return model, opt, batch


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    loss = torch.nn.functional.mse_loss(model(batch[0]), batch[1])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


class TinySaver:
    """One way of saving the tiny model each step into ``root``, keeping the last two saves."""

    def __init__(self, kind: str, root: str, model: torch.nn.Module, opt: torch.optim.Optimizer):
        self.kind, self.root, self.model, self.opt = kind, root, model, opt
        self.mgr: Any = None
        if kind.startswith("ours"):
            import ckpt_callback

            keep = None if kind == "ours_sync_keep_all" else 2
            self.mgr = ckpt_callback.CheckpointManager(root, keep_last=keep, async_save=kind == "ours_async")

    def save(self, step: int) -> None:
        if self.mgr is not None:
            self.mgr.save(self.model, step=step, optimizer=self.opt)
            return
        if self.kind == "torch_save":
            paths = [os.path.join(self.root, f"step-{step}.pt")]
            torch.save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}, paths[0])
        else:  # safetensors_save_file
            paths = [os.path.join(self.root, f"model-{step}.safetensors"),
                     os.path.join(self.root, f"optimizer-{step}.safetensors")]
            write_safetensors_pair(self.model, self.opt, *paths)
        for p in paths:
            _fsync_fd_path(p, os.O_RDONLY)
        _fsync_fd_path(self.root, os.O_RDONLY)
        for old in os.listdir(self.root):  # keep the last two saves, as keep_last=2 does
            if int(re.split(r"[-.]", old)[1]) <= step - 2:
                os.unlink(os.path.join(self.root, old))

    def wait(self) -> None:
        if self.mgr is not None:
            self.mgr.wait()

    def close(self) -> None:
        if self.mgr is not None:
            self.mgr.close()


TINY_SAVERS = ["torch_save", "safetensors_save_file", "ours_sync", "ours_sync_keep_all", "ours_async"]
TINY_LOOPS = ["no_save", "torch_save", "safetensors_save_file", "ours_sync", "ours_async"]
TINY_DOCS = {
    "no_save": "the training step alone (forward, backward, AdamW step)",
    "torch_save": "torch.save({'model', 'optimizer'}) to a new file each save + fsync(file) + fsync(dir), "
                  "then unlink the file of the save before last (as keep_last=2)",
    "safetensors_save_file": "safetensors save_file of the model and of the flattened optimizer state, two new "
                             "files each save + fsync of both and of the dir, then unlink the save before last",
    "ours_sync": "CheckpointManager(root, keep_last=2).save(model, step=, optimizer=): durable when it returns",
    "ours_sync_keep_all": "the same with keep_last=None (no retention): what retention adds",
    "ours_async": "CheckpointManager(root, keep_last=2, async_save=True).save(...); time to durable = save() + "
                  "wait(); in the loop the last save's wait() is inside the timing",
}


def fsync_latency_s(root: str, n: int = 20) -> float:
    """Median seconds of writing 4 KiB to a new file and fsyncing it."""
    out = []
    for i in range(n):
        p = os.path.join(root, f"fsync-probe-{i}")
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"x" * 4096)
            t0 = time.perf_counter()
            os.fsync(fd)
            out.append(time.perf_counter() - t0)
        finally:
            os.close(fd)
            os.unlink(p)
    return statistics.median(out)


def run_tiny(args: argparse.Namespace, root: str) -> dict[str, Any]:
    """Fixed cost of one save and the every-step loop, each way of saving, interleaved over rounds."""
    model, opt, batch = tiny_model()
    state = sum(t.numel() * t.element_size() for t in unique_tensors(model, opt))
    savers = [k for k in TINY_SAVERS if k.startswith("ours") is False or module_available("ckpt_callback") is None]
    res: dict[str, Any] = {
        "params": sum(p.numel() for p in model.parameters()), "state_bytes": state, "saves": args.tiny_saves,
        "steps": args.tiny_steps, "durable_s": {k: [] for k in savers}, "stall_s": {k: [] for k in savers},
        "fsyncs": {k: [] for k in savers}, "fsync_s": {k: [] for k in savers},
        "loop_sps": {k: [] for k in TINY_LOOPS if k == "no_save" or k in savers},
        "loop_save_call_s": {k: [] for k in TINY_LOOPS if k in savers},
    }
    base = os.path.join(root, "tiny")
    os.makedirs(base, exist_ok=True)
    res["fsync_latency_s"] = fsync_latency_s(base)
    for rnd in range(max(3, args.runs)):  # cheap: at least 3 rounds even with --quick, for a median
        order = savers[rnd % len(savers):] + savers[: rnd % len(savers)]
        for kind in order:  # one save at a time
            d = tempfile.mkdtemp(prefix=f"save-{kind}-", dir=base)
            saver = TinySaver(kind, d, model, opt)
            try:
                for step in range(1, 4):  # untimed: the first save makes the writer; retention gets going
                    saver.save(step)
                    saver.wait()
                os.sync()
                with counting_fsyncs() as count:
                    for step in range(4, 4 + args.tiny_saves):
                        t0 = time.perf_counter()
                        saver.save(step)
                        t1 = time.perf_counter()
                        saver.wait()
                        t2 = time.perf_counter()
                        res["stall_s"][kind].append(t1 - t0)
                        res["durable_s"][kind].append(t2 - t0)
                res["fsyncs"][kind].append(count[0] / args.tiny_saves)
                res["fsync_s"][kind].append(count[1] / args.tiny_saves)
            finally:
                saver.close()
                shutil.rmtree(d, ignore_errors=True)
        loops = list(res["loop_sps"])
        for kind in loops[rnd % len(loops):] + loops[: rnd % len(loops)]:  # the every-step loop
            d = tempfile.mkdtemp(prefix=f"loop-{kind}-", dir=base)
            looper = None if kind == "no_save" else TinySaver(kind, d, model, opt)
            calls: list[float] = []
            os.sync()
            try:
                t0 = time.perf_counter()
                for step in range(1, args.tiny_steps + 1):
                    train_step(model, opt, batch)
                    if looper is not None:
                        s0 = time.perf_counter()
                        looper.save(step)
                        calls.append(time.perf_counter() - s0)
                if looper is not None:
                    looper.wait()
                res["loop_sps"][kind].append(args.tiny_steps / (time.perf_counter() - t0))
                if calls:
                    res["loop_save_call_s"][kind].append(statistics.median(calls))
            finally:
                if looper is not None:
                    looper.close()
                shutil.rmtree(d, ignore_errors=True)
        saves = ", ".join(f"{k} {statistics.median(v) * 1e3:.2f} ms" for k, v in res["durable_s"].items() if v)
        rates = ", ".join(f"{k} {v[-1]:.0f} steps/s" for k, v in res["loop_sps"].items() if v)
        log(f"tiny round {rnd}: {saves}; loop {rates}")
    shutil.rmtree(base, ignore_errors=True)
    return res


# =============================================================================
# CLI startup (issue 16, item 4)
# =============================================================================


def ckpt_command() -> list[str]:
    """The ``ckpt`` console script beside this interpreter, else the same entry point through ``python -c``."""
    script = os.path.join(os.path.dirname(sys.executable), "ckpt")
    if os.path.isfile(script) and os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-c", "import sys; from ckpt_callback._cli import main; sys.exit(main())"]


def run_cli(args: argparse.Namespace, root: str) -> dict[str, Any]:
    """Median wall time of each command as a fresh process, interleaved over ``--cli-runs`` rounds."""
    import ckpt_callback

    model, opt, _batch = tiny_model()
    croot = os.path.join(root, "cli-root")
    mgr = ckpt_callback.CheckpointManager(croot, keep_last=None)
    for step in (1, 2, 3):
        info = mgr.save(model, step=step, optimizer=opt)
    mgr.close()
    name = info.name if info is not None else "latest"
    ckpt = ckpt_command()
    commands = {
        "ckpt --version": [*ckpt, "--version"],
        "ckpt list ROOT": [*ckpt, "list", croot],
        f"ckpt inspect ROOT {name}": [*ckpt, "inspect", croot, name],
        "python -c pass": [sys.executable, "-c", "pass"],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
    }
    seconds: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(args.cli_runs):
        for key, cmd in commands.items():
            t0 = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            t = time.perf_counter() - t0
            if out.returncode != 0:
                raise RuntimeError(f"{key} failed ({out.returncode}): {out.stderr[-1000:]}")
            seconds[key].append(t)
    shutil.rmtree(croot, ignore_errors=True)
    log("cli: " + ", ".join(f"{k} {statistics.median(v):.2f} s" for k, v in seconds.items()))
    return {"seconds": seconds, "command": " ".join(ckpt), "checkpoints": 3}


def run_s3_list(args: argparse.Namespace) -> dict[str, Any]:
    """``ckpt list`` of 1,000 checkpoints on S3, from benchmarks/bench_list.py if it is there."""
    try:
        import bench_list  # written beside this script (issue 16, item 4)
    except ImportError as e:
        return {"seconds": None, "why": f"not measured: benchmarks/bench_list.py is not importable ({e})"}
    try:
        if hasattr(bench_list, "measure_list"):
            out = bench_list.measure_list(n=1000, runs=max(1, args.cli_runs), backends=("s3",))
        else:
            out = bench_list.main(["--backends", "s3"])
        value = out if isinstance(out, (int, float)) else out["seconds"]["s3"]["list_cold"]["median"]
        return {"seconds": float(value), "raw": out, "why": ""}
    except Exception as e:  # it is another script's measurement: report, go on
        traceback.print_exc()
        return {"seconds": None, "why": f"not measured: bench_list.py failed ({type(e).__name__}: {e})"}


# =============================================================================
# Targets (issue 16): pass / miss and what bounds a miss, from this run's data
# =============================================================================


@dataclasses.dataclass
class Target:
    item: str
    what: str
    measured: str
    value: float | None
    limit: float
    op: str = "<="  # value op limit passes
    unit: str = "x"
    bound: str = ""

    @property
    def result(self) -> str:
        if self.value is None:
            return "not measured"
        ok = self.value <= self.limit if self.op == "<=" else self.value >= self.limit
        return "pass" if ok else "miss"


def _med(vals: list[float] | None) -> float | None:
    return statistics.median(vals) if vals else None


def _vals(runs: list[RunRecord] | None, attr: str) -> list[float]:
    return [getattr(r, attr) for r in runs or [] if r.error is None and getattr(r, attr) is not None]


def _load(runs: list[RunRecord] | None) -> str:
    loads = _vals(runs, "load1")
    return fmt_range(loads) if loads else "—"


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _s(x: float | None, nd: int = 2) -> str:
    return "—" if x is None else f"{x:.{nd}f} s"


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x * 1e3:.2f} ms"


def _x(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}x"


def size_label(size: str) -> str:
    return size.upper() if size != "tiny" else "tiny GPT-2"


def collect_targets(records: Records, meta: dict[str, Any], tiny: dict[str, Any] | None,
                    cli: dict[str, Any] | None, s3: dict[str, Any] | None) -> list[Target]:
    out: list[Target] = []
    for size, sections in records.items():
        sm = meta["sizes"][size]
        gb = sm["sizes"]["total"] / 1e9
        sha = statistics.mean(sm["sha256_gbps"])
        hash_s = gb / sha
        lab = size_label(size)

        def med(section: str, name: str, attr: str, sections: dict[str, dict[str, list[RunRecord]]] = sections) -> (
                float | None):
            return _med(_vals(sections.get(section, {}).get(name), attr))

        # (1) sync save, time to durable, cold and warm
        for sec in ("cold", "warm"):
            if sec not in sections:
                continue
            ours, st = med(sec, "ours_sync", "durable_s"), med(sec, "safetensors_save_file", "durable_s")
            buf, ts = med(sec, "ours_sync_buffered", "durable_s"), med(sec, "torch_save", "durable_s")
            bound = (
                f"ours makes the {gb:.2f} GB durable at {gb / ours if ours else 0:.2f} GB/s, safetensors at "
                f"{gb / st if st else 0:.2f} GB/s; sha256 of the state on one core alone takes {hash_s:.2f} s "
                f"({sha:.2f} GB/s measured in this run) = {_x(_div(hash_s, st))} safetensors' whole save"
                + (" (hashing on one core is slower than the whole baseline: it must run beside the writes)"
                   if st and hash_s > st else "")
                + f"; ours with buffered writes (`ours_sync_buffered`): {_s(buf)} ({_x(_div(buf, st))}); "
                f"`torch_save`: {_s(ts)} ({_x(_div(ts, st))})"
            )
            out.append(Target(
                "1", f"sync save, time to durable <= 1.0x `safetensors_save_file` + fsync, {lab}, {sec} page cache",
                f"`ours_sync` {_s(ours)} / `safetensors_save_file` {_s(st)}", _div(ours, st), 1.0, bound=bound))
        # (2) restore with verification
        if "restore" in sections:
            ours, nv = med("restore", "ours_restore", "stall_s"), med("restore", "ours_restore_noverify", "stall_s")
            tl, sf = med("restore", "restore_torch_load", "stall_s"), med("restore", "restore_safetensors", "stall_s")
            cr = med("restore", "cold_read", "stall_s")
            bound = (
                f"the cold read of the state's bytes alone (`cold_read`) takes {_s(cr)} "
                f"({gb / cr if cr else 0:.2f} GB/s); ours without verification takes {_s(nv)} ({_x(_div(nv, cr))} "
                f"the cold read), and verification adds {_s(None if ours is None or nv is None else ours - nv)}; "
                f"sha256 of the state on one core alone takes {hash_s:.2f} s ({sha:.2f} GB/s)"
            )
            out.append(Target("2", f"restore (verify=True) <= 1.0x `torch.load` + `load_state_dict`, {lab}",
                              f"`ours_restore` {_s(ours)} / `restore_torch_load` {_s(tl)}", _div(ours, tl), 1.0,
                              bound=bound))
            out.append(Target("2", f"restore (verify=True) <= 1.2x `safetensors.torch.load_file`, {lab}",
                              f"`ours_restore` {_s(ours)} / `restore_safetensors` {_s(sf)}", _div(ours, sf), 1.2,
                              bound=bound))
        # (5) async stall against its floor, quiet and busy
        for sec in ("quiet", "busy"):
            if sec not in sections:
                continue
            for row in ("ours_async", "ours_async_1thread", "ours_async_gpu", "ours_async_gpu_1thread"):
                if row not in sections[sec]:
                    continue
                floor = FLOOR[row]
                a, f = med(sec, row, "stall_s"), med(sec, floor, "stall_s")
                bc = med(sec, "bare_copy", "stall_s")
                bound = (
                    f"the stall exceeds the copy (`{floor}` {_s(f, 3)}) by "
                    f"{_s(None if a is None or f is None else a - f, 3)}"
                    + (f"; the same copy with torch's {torch.get_num_threads()} intra-op threads (`bare_copy`) takes "
                       f"{_s(bc, 3)} ({_x(_div(bc, f))} the one-thread copy; the stall is {_x(_div(a, bc))} it)"
                       if floor == "bare_copy_1thread" else "")
                    + f"; 1-min load average at these saves: {_load(sections[sec].get(row))}"
                )
                where = "second core busy" if sec == "busy" else "quiet"
                out.append(Target("5", f"async stall (`{row}`) <= 1.2x `{floor}`, {lab}, {where}",
                                  f"`{row}` {_s(a, 3)} / `{floor}` {_s(f, 3)}", _div(a, f), 1.2, bound=bound))
    if tiny:
        d, c = tiny["durable_s"], tiny["fsyncs"]
        ours, ts = _med(d.get("ours_sync")), _med(d.get("torch_save"))
        keep_all = _med(d.get("ours_sync_keep_all"))
        k, kt = _med(c.get("ours_sync")), _med(c.get("torch_save"))
        fk, fkt = _med(tiny["fsync_s"].get("ours_sync")), _med(tiny["fsync_s"].get("torch_save"))
        bound = (
            f"ours makes {k or 0:.1f} fsync calls per save, which take {_ms(fk)} of its {_ms(ours)} (torch.save: "
            f"{kt or 0:.1f} calls, {_ms(fkt)} of {_ms(ts)}; one fsync of a new 4 KiB file: "
            f"{_ms(tiny['fsync_latency_s'])}); retention (keep_last=2 against keeping all) adds "
            f"{_ms(None if ours is None or keep_all is None else ours - keep_all)}; the rest, "
            f"{_ms(None if ours is None or fk is None or keep_all is None else keep_all - fk)} without retention, "
            "is the save's own work outside fsync"
        )
        out.append(Target("3", "tiny model: one save's time to durable <= 2x `torch.save` + fsync",
                          f"`ours_sync` {_ms(ours)} / `torch_save` {_ms(ts)}; fsync calls per save: ours "
                          f"{k or 0:.1f}, torch.save {kt or 0:.1f}", _div(ours, ts), 2.0, bound=bound))
        sps = tiny["loop_sps"]
        calls = tiny["loop_save_call_s"]
        o, t, a, n = (_med(sps.get(x)) for x in ("ours_sync", "torch_save", "ours_async", "no_save"))
        step_ms = 1e3 / n if n else 0.0
        out.append(Target(
            "3", f"tiny model, a save every step ({tiny['steps']} steps): steps/s >= 0.5x the `torch.save` + fsync "
            "loop", f"`ours_sync` {o or 0:.0f} / `torch_save` {t or 0:.0f} steps/s", _div(o, t), 0.5, op=">=",
            bound=f"a step alone takes {step_ms:.2f} ms; a save call in the loop takes "
                  f"{_ms(_med(calls.get('ours_sync')))} (ours) against {_ms(_med(calls.get('torch_save')))} "
                  "(torch.save + fsync)"))
        ad = _med(d.get("ours_async"))
        out.append(Target(
            "3", "tiny model, a save every step: `async_save` loop steps/s >= the sync-save loop's",
            f"`ours_async` {a or 0:.0f} / `ours_sync` {o or 0:.0f} steps/s", _div(a, o), 1.0, op=">=",
            bound=f"in the loop a `save()` call blocks {_ms(_med(calls.get('ours_async')))} (async) against "
                  f"{_ms(_med(calls.get('ours_sync')))} (sync); one async save alone stalls "
                  f"{_ms(_med(tiny['stall_s'].get('ours_async')))} and is durable after {_ms(ad)}"
                  + (f", longer than a step ({step_ms:.2f} ms): at a save per step the next save meets the previous "
                     "one still running" if ad and ad * 1e3 > step_ms else f"; a step takes {step_ms:.2f} ms")))
    if cli:
        sec = cli["seconds"]
        py, imp = _med(sec.get("python -c pass")), _med(sec.get('python -c "import torch"'))
        for key, vals in sec.items():
            if not key.startswith("ckpt"):
                continue
            v = _med(vals)
            out.append(Target("4", f"`{key}` on a local root (fresh process) <= 0.5 s", f"{_s(v)} (median)", v, 0.5,
                              unit="s", bound=f"starting Python alone takes {_s(py)}, `import torch` {_s(imp)}"))
    if s3 is not None:
        bound = "see `benchmarks/bench_list.py`"
        with contextlib.suppress(Exception):  # its other numbers, when it reports them
            seconds = s3["raw"]["seconds"]["s3"]
            bound = (f"a fresh process with an empty catalog cache; `--limit 20`: "
                     f"{_s(seconds['list_limit20_cold']['median'])}; with the cache of an earlier `ckpt list`: "
                     f"{_s(seconds['list_warm']['median'])}; `ckpt --version`: {_s(seconds['version']['median'])}")
        out.append(Target("4", "`ckpt list` of 1,000 checkpoints on S3 <= 2 s (empty cache)",
                          _s(s3["seconds"]) if s3["seconds"] is not None else s3["why"], s3["seconds"], 2.0,
                          unit="s", bound=bound))
    return sorted(out, key=lambda t: t.item)  # stable: sizes and sections keep their order within an item


# =============================================================================
# Rendering
# =============================================================================

# Headings bench_save.py may write (incl. older names): every other `## ` section of the output file
# (bench_train.py's, bench_s3.py's, ...) is kept, after this script's content.
OWNED_HEADINGS = ["## Machine", "## Workload", "## Save", "## Async stall", "## Restore", "## Fixed cost",
                  "## CLI startup", "## Targets", "## Methods", "## Notes"]


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


def _peak(runs: list[RunRecord]) -> str:
    hwm = _vals(runs, "peak_hwm_mb")
    sampled = _vals(runs, "peak_sampled_mb")
    if hwm:
        return f"{fmt_range(hwm, 0)} ({fmt_range(sampled, 0).split(' ')[0]})"
    return fmt_range(sampled, 0)


def _notes(runs: list[RunRecord], extra: str = "") -> str:
    notes = [r.note for r in runs if r.note and r.error is None][:1]  # the first run's (numbers differ per run)
    errs = [r.error for r in runs if r.error]
    if errs:
        notes.append(f"FAILED ({len(errs)}/{len(runs)} runs): {errs[0]}"[:300])
    if extra:
        notes.append(extra)
    return "; ".join(notes).replace("|", "\\|")


def _section_load(records: Records, sections: tuple[str, ...]) -> str:
    """The 1-minute load average sampled right before the timed calls of ``sections``, all sizes."""
    loads = [r.load1 for s in records.values() for sec in sections for rs in s.get(sec, {}).values() for r in rs
             if r.load1 is not None]
    return fmt_range(loads) if loads else "—"


def _size_heading(size: str, meta: dict[str, Any]) -> str:
    s = meta["sizes"][size]["sizes"]
    return f"### {size_label(size)}: {s['params'] / 1e6:.0f}M parameters, {s['total'] / 1e9:.2f} GB state"


def _skipped_line(size: str, kind: str, skipped: dict[str, dict[str, str]]) -> list[str]:
    rows = {n: why for n, why in skipped.get(size, {}).items() if kind in METHODS[n].kinds}
    if not rows:
        return []
    groups: dict[str, list[str]] = {}
    for n, why in rows.items():
        groups.setdefault(why, []).append(f"`{n}`")
    return ["", "Skipped at this size: " + "; ".join(f"{', '.join(ns)}: {why}" for why, ns in groups.items()) + "."]


def render_save(records: Records, meta: dict[str, Any], skipped: dict[str, dict[str, str]], sec: str,
                args: argparse.Namespace) -> list[str]:
    L = [f"## {SECTIONS[sec].title}", ""]
    if sec == "cold":
        drops = [r.prepared for s in records.values() for rs in s.get("cold", {}).values() for r in rs
                 if r.prepared is not None]
        state = (f"`echo 3 > /proc/sys/vm/drop_caches` succeeded before {sum(drops)} of {len(drops)} timed saves"
                 + ("" if drops and all(drops) else " -- **where it failed the save was not cold**"))
        L.append(
            f"Page cache: **cold**. Before every timed save: `os.sync()`, drop the page cache ({state}), "
            f"`malloc_trim`, then {args.idle_pause:g} s idle, so freed memory is handed back to the host as it is "
            "between two periodic checkpoints (see free-page reporting under Machine).")
    else:
        L.append(
            "Page cache: **warm**. Right before every timed save a file of the state's size was written, fsynced and "
            "deleted (the page cache holds freshly freed pages, as right after another large write).")
    L.append("")
    L.append(
        "Times in seconds, median [min-max]; ratios are ratios of medians from this run. Durable = until the bytes "
        "and directory entries are fsynced (rows that do not fsync themselves get an fsync of every file they wrote). "
        "Peak extra = peak RSS above the RSS just before the call, MB (kernel VmHWM; 5 ms samples in parentheses). "
        f"1-minute load average right before the timed calls: {_section_load(records, (sec,))}.")
    for size, sections in records.items():
        rows = sections.get(sec)
        if rows is None:
            continue
        L += ["", _size_heading(size, meta), ""]
        st = _vals(rows.get("safetensors_save_file"), "durable_s")
        ts = _vals(rows.get("torch_save"), "durable_s")
        L.append("| method | stall s | durable s | peak extra MB | on disk MB | durable vs `safetensors_save_file` "
                 "| durable vs `torch_save` | notes |")
        L.append("|---|---|---|---|---|---|---|---|")
        for n, runs in rows.items():
            dur = _vals(runs, "durable_s")
            L.append(
                f"| `{n}` | {fmt_range(_vals(runs, 'stall_s'))} | {fmt_range(dur)} | {_peak(runs)} "
                f"| {fmt_range(_vals(runs, 'disk_mb'), 0).split(' ')[0]} | {fmt_ratio(dur, st)} | {fmt_ratio(dur, ts)} "
                f"| {_notes(runs)} |")
        L += _skipped_line(size, "save", skipped)
    L.append("")
    return L


def render_stall(records: Records, meta: dict[str, Any], skipped: dict[str, dict[str, str]]) -> list[str]:
    L = ["## Async stall: quiet and with the second core busy", ""]
    L.append(
        "How long `save()` blocks the training thread, against the floor: `bare_copy_1thread` (one thread copying "
        "every tensor into buffers that exist already) for CPU rows, `d2h_pinned` (device-to-host copy into pinned "
        "buffers) for GPU rows. Page cache: not prepared, `os.sync()` before every timed save (the stall is a copy "
        "between memory buffers allocated before; durable times of the async rows are in the save sections). "
        "**Quiet**: nothing else runs. **Busy**: a `python -c \"while True: pass\"` process is started 0.5 s before "
        "each timed save and killed after it. Times in seconds, median [min-max]; ratios of medians from this run; "
        "the last column compares the stall with a blocking safetensors save (warm section's median). 1-minute load "
        f"average right before the timed calls, quiet: {_section_load(records, ('quiet',))}, busy: "
        f"{_section_load(records, ('busy',))} (sampled before the busy process starts).")
    for size, sections in records.items():
        quiet, busy = sections.get("quiet"), sections.get("busy")
        if quiet is None and busy is None:
            continue
        quiet, busy = quiet or {}, busy or {}
        L += ["", _size_heading(size, meta), ""]
        st = _vals(sections.get("warm", {}).get("safetensors_save_file"), "durable_s")
        L.append("| method | floor | quiet stall s | busy stall s | quiet vs floor | busy vs floor "
                 "| quiet stall vs `safetensors_save_file` | notes |")
        L.append("|---|---|---|---|---|---|---|---|")
        for n in dict.fromkeys([*quiet, *busy]):
            q, bz = quiet.get(n, []), busy.get(n, [])
            floor = FLOOR.get(n)
            qs, bs = _vals(q, "stall_s"), _vals(bz, "stall_s")
            L.append(
                f"| `{n}` | {f'`{floor}`' if floor else '—'} | {fmt_range(qs, 3)} | {fmt_range(bs, 3)} "
                f"| {fmt_ratio(qs, _vals(quiet.get(floor), 'stall_s')) if floor else '1.00x'} "
                f"| {fmt_ratio(bs, _vals(busy.get(floor), 'stall_s')) if floor else '1.00x'} "
                f"| {fmt_ratio(qs, st)} | {_notes(q + bz)} |")
        L += _skipped_line(size, "stall", skipped)
    L.append("")
    return L


def render_restore(records: Records, meta: dict[str, Any], skipped: dict[str, dict[str, str]]) -> list[str]:
    drops = [r.prepared for s in records.values() for rs in s.get("restore", {}).values() for r in rs
             if r.prepared is not None]
    state = ("`os.sync()` + `echo 3 > /proc/sys/vm/drop_caches` succeeded before every restore"
             if drops and all(drops) else
             f"dropping the page cache succeeded before {sum(drops)} of {len(drops)} restores only: the others were "
             "(partly) warm")
    L = ["## Restore, cold page cache", ""]
    L.append(
        f"Page cache: **cold**: the file was written and fsynced (untimed), then {state} (the guest's page cache; any "
        "host-side caching of a virtual disk is outside our control). Time = from the start of the load until model "
        "and optimizer hold the restored state. Times in seconds, median [min-max]; ratios of medians from this run. "
        f"1-minute load average right before the timed calls: {_section_load(records, ('restore',))}.")
    for size, sections in records.items():
        rows = sections.get("restore")
        if rows is None:
            continue
        L += ["", _size_heading(size, meta), ""]
        sf = _vals(rows.get("restore_safetensors"), "stall_s")
        tl = _vals(rows.get("restore_torch_load"), "stall_s")
        L.append("| method | time s | peak extra MB | file(s) MB | vs `restore_safetensors` | vs `restore_torch_load` "
                 "| notes |")
        L.append("|---|---|---|---|---|---|---|")
        for n, runs in rows.items():
            v = _vals(runs, "stall_s")
            L.append(f"| `{n}` | {fmt_range(v)} | {_peak(runs)} | {fmt_range(_vals(runs, 'disk_mb'), 0).split(' ')[0]} "
                     f"| {fmt_ratio(v, sf)} | {fmt_ratio(v, tl)} | {_notes(runs)} |")
        L += _skipped_line(size, "restore", skipped)
    L.append("")
    return L


def render_tiny(tiny: dict[str, Any]) -> list[str]:
    L = ["## Fixed cost per save (tiny model)", ""]
    L.append(
        f"An MLP 64-128-16 ({tiny['params']:,} parameters) with AdamW after one step: {tiny['state_bytes']:,} B of "
        f"tensors. Per way of saving and round: 3 untimed saves, then {tiny['saves']} timed ones, each into a fresh "
        "directory keeping the last two saves; fsync calls counted and timed by wrapping `os.fsync` / `os.fdatasync` "
        "in this process during the timed saves (any thread). One write + fsync of a new 4 KiB file here: "
        f"{_ms(tiny['fsync_latency_s'])}. "
        "Page cache: not prepared (`os.sync()` before each way of saving). Ratios of medians from this run.")
    L.append("")
    d, st, fs = tiny["durable_s"], tiny["stall_s"], tiny["fsyncs"]
    sf, ts = d.get("safetensors_save_file"), d.get("torch_save")
    L.append("| method | time to durable ms | save() returns ms | fsync calls per save | ms in fsync per save "
             "| vs `safetensors_save_file` | vs `torch_save` |")
    L.append("|---|---|---|---|---|---|---|")
    for k in d:
        ms = [v * 1e3 for v in d[k]]
        L.append(f"| `{k}` | {fmt_range(ms)} | {fmt_range([v * 1e3 for v in st[k]])} | {_med(fs[k]) or 0:.1f} "
                 f"| {fmt_range([v * 1e3 for v in tiny['fsync_s'][k]])} "
                 f"| {fmt_ratio(d[k], sf or [])} | {fmt_ratio(d[k], ts or [])} |")
    L.append("")
    L.append(
        f"A training loop of {tiny['steps']} steps (forward, backward, AdamW step on a fixed batch of 32) that saves "
        "after every step; steps/s = steps / wall time of the loop, the last async save's `wait()` included.")
    L.append("")
    sps, calls = tiny["loop_sps"], tiny["loop_save_call_s"]
    L.append("| loop | steps/s | vs `safetensors_save_file` loop | vs `torch_save` loop | save call ms (median) |")
    L.append("|---|---|---|---|---|")
    for k, v in sps.items():
        L.append(f"| `{k}` | {fmt_range(v, 0)} | {fmt_ratio(v, sps.get('safetensors_save_file', []))} "
                 f"| {fmt_ratio(v, sps.get('torch_save', []))} "
                 f"| {fmt_range([c * 1e3 for c in calls.get(k, [])]) if k in calls else '—'} |")
    L.append("")
    for k, doc in TINY_DOCS.items():
        L.append(f"- `{k}`: {doc}.")
    L.append("")
    return L


def render_cli(cli: dict[str, Any], s3: dict[str, Any] | None) -> list[str]:
    L = ["## CLI startup", ""]
    L.append(
        f"Each command as a fresh process (`{cli['command']}`), wall time from start to exit, interleaved, "
        f"{len(next(iter(cli['seconds'].values())))} runs each; the root is a local folder with {cli['checkpoints']} "
        "checkpoints of the tiny model. `python -c pass` and `python -c \"import torch\"` are the references.")
    L.append("")
    L.append("| command | seconds, median [min-max] |")
    L.append("|---|---|")
    for k, v in cli["seconds"].items():
        L.append(f"| `{k}` | {fmt_range(v)} |")
    if s3 is None:
        L.append("| `ckpt list` of 1,000 checkpoints on S3 | not measured (run with `--with-s3-list`) |")
    elif s3["seconds"] is None:
        L.append(f"| `ckpt list` of 1,000 checkpoints on S3 | {s3['why']} |")
    else:
        L.append(f"| `ckpt list` of 1,000 checkpoints on S3, empty catalog cache (`benchmarks/bench_list.py`) | "
                 f"{s3['seconds']:.2f} |")
        with contextlib.suppress(Exception):
            warm = s3["raw"]["seconds"]["s3"]["list_warm"]
            L.append(f"| `ckpt list` of 1,000 checkpoints on S3, cache of an earlier `ckpt list` | "
                     f"{warm['median']:.2f} |")
    L.append("")
    return L


def render_targets(targets: list[Target]) -> list[str]:
    L = ["## Targets (issue 16)", ""]
    n_pass = sum(t.result == "pass" for t in targets)
    n_miss = sum(t.result == "miss" for t in targets)
    L.append(
        f"Every target of issue 16 measured by this run, as a ratio of medians from the sections above ({n_pass} pass, "
        f"{n_miss} miss, {len(targets) - n_pass - n_miss} not measured). For a miss, the last column gives what bounds "
        "it, computed from this run's data.")
    L.append("")
    L.append("| # | target | measured (medians) | value | limit | result | what bounds it |")
    L.append("|---|---|---|---|---|---|---|")
    for t in targets:
        value = "—" if t.value is None else (f"{t.value:.2f}x" if t.unit == "x" else f"{t.value:.2f} s")
        limit = f"{t.op} {t.limit:.2f}{'x' if t.unit == 'x' else ' s'}"
        res = {"pass": "pass", "miss": "**miss**"}.get(t.result, t.result)
        bound = t.bound.replace("|", "\\|") if t.result == "miss" else ""
        L.append(f"| {t.item} | {t.what} | {t.measured} | **{value}** | {limit} | {res} | {bound} |")
    L.append("")
    return L


def render(records: Records, skipped: dict[str, dict[str, str]], info: dict[str, str], args: argparse.Namespace,
           meta: dict[str, Any], tiny: dict[str, Any] | None, cli: dict[str, Any] | None, s3: dict[str, Any] | None,
           targets: list[Target]) -> str:
    L: list[str] = ["# Benchmarks", ""]
    cmd = ("python benchmarks/bench_save.py " + " ".join(sys.argv[1:])).strip()
    L.append(
        f"Machine, workload, the save / async stall / restore tables at each size, the fixed cost per save, CLI "
        f"startup and the issue 16 targets: generated {meta['date']} by `{cmd}` in one run "
        f"({meta['elapsed_min']:.0f} min): {args.warmup} untimed warm-up round(s) at the first size, then "
        f"{args.runs} measured run(s) of every row; rows interleaved within a section, sections interleaved per run. "
        "The sections after \"Save / restore notes\" are written by the other scripts in `benchmarks/`; each names "
        "its command.")
    L += ["", "## Machine", ""]
    L.append(f"- CPU: {info['cpu']}, {info['cores']}")
    L.append(f"- RAM: {info['ram']}; GPU: {info['gpu']}")
    L.append(f"- Software: {info['software']}")
    if "library" in info:
        L.append(f"- Library: {info['library']}")
    L.append(f"- Output dir: {info['disk']}")
    L.append(f"- Load average (1/5/15 min) before: {meta['load_before']}, after: {meta['load_after']}")
    balloon = {True: "yes", False: "no", None: "unknown"}[meta["balloon_reporting"]]
    L.append(f"- Allocating + first-touching new memory: {meta['touch_gbps']:.2f} GB/s; virtio-balloon free-page "
             f"reporting: {balloon}; `drop_caches` permitted: {'yes' if meta['drop_caches_ok'] else '**no**'}")
    for size, sm in meta["sizes"].items():
        if "sha256_gbps" in sm:
            L.append(f"- sha256 (hashlib, one thread) at {size_label(size)}: "
                     + " / ".join(f"{g:.2f}" for g in sm["sha256_gbps"]) + " GB/s (before / after the runs)")
    L.append("")
    if records:
        L += render_workload(meta, skipped)
    present = {sec for s in records.values() for sec in s}
    for sec in ("cold", "warm"):
        if sec in present:
            L += render_save(records, meta, skipped, sec, args)
    if present & {"quiet", "busy"}:
        L += render_stall(records, meta, skipped)
    if "restore" in present:
        L += render_restore(records, meta, skipped)
    if tiny:
        L += render_tiny(tiny)
    if cli:
        L += render_cli(cli, s3)
    L += render_targets(targets)
    if records or meta.get("size_errors"):
        L += render_methods(records, skipped, meta)
    return "\n".join(L)


def render_workload(meta: dict[str, Any], skipped: dict[str, dict[str, str]]) -> list[str]:
    L = ["## Workload", ""]
    L.append("GPT-2 (`GPT2LMHeadModel`) built from its config with random init (never downloaded), fp32, lm_head "
             "tied to the token embedding; `torch.optim.AdamW` after one real step on a tiny batch (exp_avg, "
             "exp_avg_sq, step per parameter). State = unique storages of model + optimizer.")
    L.append("")
    L.append("| size | config | parameters | model B | optimizer B | state | MemAvailable after build "
             "| rows skipped |")
    L.append("|---|---|---|---|---|---|---|---|")
    for size, sm in meta["sizes"].items():
        s = sm["sizes"]
        L.append(f"| {size_label(size)} | {SIZES[size][0]} | {s['params']:,} | {s['model']:,} | {s['optimizer']:,} "
                 f"| {s['total'] / 1e9:.2f} GB | {sm['mem_available_after_build'] / 1e9:.1f} GB "
                 f"| {', '.join(f'`{n}`' for n in skipped.get(size, {})) or '—'} |")
    L.append("")
    return L


def render_methods(records: Records, skipped: dict[str, dict[str, str]], meta: dict[str, Any]) -> list[str]:
    L = ["## Save / restore methods", ""]
    used = {n for s in records.values() for rows in s.values() for n in rows} | {
        n for s in skipped.values() for n in s}
    for n, m in METHODS.items():
        if n in used:
            L.append(f"- `{n}`: {' '.join(m.doc.split())}")
    L += ["", "## Save / restore notes", ""]
    L.append("- Every run of a row starts in an empty directory that is deleted after it, followed by `os.sync()`. "
             "Rows that hold a copy of the state (async managers' staging buffers, copy destinations, a loaded state "
             "dict) allocate it untimed in their setup and free it after their run, so at most one extra copy of the "
             "state is alive at a time; an async manager's setup makes one save (committed, then deleted) so the "
             "timed save reuses its staging buffers, as every save after the first does in training.")
    L.append("- Async rows in the save sections: durable is measured with the training thread idle (it waits on "
             "`wait()`); in training the background writes compete with the step for the same cores.")
    L.append("- DCP runs in one process without `torch.distributed.init_process_group()` (no_dist mode; torch warns "
             "and proceeds). `FileSystemWriter` fsyncs its files itself.")
    if meta["balloon_reporting"]:
        L.append("- This VM's balloon device reports freed pages to the host: memory freed by the guest is given back, "
                 "and touching new memory faults on the host too (first-touch GB/s under Machine). What needs *new* "
                 "memory -- page cache for buffered writes after an idle pause, restore buffers, staging -- is slower "
                 "than on bare metal; this is what the cold section shows.")
    for size, err in meta.get("size_errors", {}).items():
        L.append(f"- {size_label(size)} was not measured: {err}")
    for leak in meta.get("leaks", []):
        L.append(f"- Memory not given back: {leak}.")
    for n, why in meta.get("skipped_everywhere", {}).items():
        L.append(f"- Skipped `{n}` everywhere: {why}")
    L.append("- The machine may be shared with other work (see the load average); ranges show the run-to-run spread.")
    L.append("")
    return L


# =============================================================================
# Main
# =============================================================================


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=None, help=f"comma-separated of {','.join(SIZES)} (default 124m,355m,774m; "
                    "--quick: tiny)")
    ap.add_argument("--runs", type=int, default=None, help="measured runs of every row (default 3; --quick: 1)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed rounds of every row at the first size (default 1; --quick: 0)")
    ap.add_argument("--idle-pause", type=float, default=None,
                    help="seconds idle after dropping the page cache, before each cold save (default 5; --quick: 1)")
    ap.add_argument("--sections", default=",".join([*SECTIONS, *OTHER_SECTIONS]),
                    help="comma-separated subset of: " + ",".join([*SECTIONS, *OTHER_SECTIONS]))
    ap.add_argument("--methods", default=None, help=f"comma-separated subset of the rows: {','.join(METHODS)}")
    ap.add_argument("--tiny-saves", type=int, default=None, help="timed saves per round of the tiny model (default 50)")
    ap.add_argument("--tiny-steps", type=int, default=None, help="steps of the every-step loop (default 200)")
    ap.add_argument("--cli-runs", type=int, default=None, help="runs of each CLI command (default 5; --quick: 2)")
    ap.add_argument("--with-s3-list", action="store_true",
                    help="also time `ckpt list` of 1,000 checkpoints on S3 through benchmarks/bench_list.py")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: tiny GPT-2, 1 run, no warm-up, 1 s idle pause, a shorter tiny loop; prints the "
                         "Markdown and writes no file unless --out is given")
    ap.add_argument("--out", default=None, help="Markdown output file (default: the repo's BENCHMARKS.md, none with "
                    "--quick); its `## ` sections written by other scripts are kept, after this script's content")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a new temp dir, removed at the end)")
    ap.add_argument("--json", default=None, help="also write raw per-run records as JSON here")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch default)")
    args = ap.parse_args(argv)
    q = args.quick
    defaults = {"sizes": "tiny" if q else "124m,355m,774m", "runs": 1 if q else 3, "warmup": 0 if q else 1,
                "idle_pause": 1.0 if q else 5.0, "tiny_saves": 20 if q else 50, "tiny_steps": 50 if q else 200,
                "cli_runs": 2 if q else 5}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.out is None and not q:
        args.out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md")
    args.size_list = [s.strip() for s in args.sizes.split(",") if s.strip()]
    args.section_list = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in args.size_list if s not in SIZES] + [
        s for s in args.section_list if s not in SECTIONS and s not in OTHER_SECTIONS]
    if bad:
        ap.error(f"unknown sizes/sections {bad}")
    args.method_list = list(METHODS) if not args.methods else [s.strip() for s in args.methods.split(",") if s.strip()]
    unknown = [n for n in args.method_list if n not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {list(METHODS)}")
    return args


def quiet_library() -> None:
    """The benchmark's checkpoints record no metrics: the manager's "monitor never appears" warning is noise here."""
    import logging

    logging.getLogger("ckpt_callback").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="monitor .* never appears")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_library()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    skipped_everywhere: dict[str, str] = {}
    active: list[str] = []
    for n in args.method_list:
        missing = [f"`import {mod}` failed ({err})" for mod in METHODS[n].requires if (err := module_available(mod))]
        if missing:
            skipped_everywhere[n] = "; ".join(missing)
        else:
            active.append(n)
    rows = {s: [n for n in active if SECTIONS[s].kind in METHODS[n].kinds] for s in args.section_list
            if s in SECTIONS}

    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
        root = tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir)
    else:
        root = tempfile.mkdtemp(prefix="ckpt-bench-")
    meta: dict[str, Any] = {"load_before": " ".join(read_loadavg()), "sizes": {},
                            "skipped_everywhere": skipped_everywhere}
    for n, why in skipped_everywhere.items():
        log(f"skipping {n}: {why}")
    hwm_ok = reset_hwm() and hwm_bytes() is not None
    meta["hwm_ok"] = hwm_ok
    meta["drop_caches_ok"] = drop_page_cache()
    meta["touch_gbps"] = fresh_memory_touch_gbps(GB // 8 if args.quick else GB)
    meta["balloon_reporting"] = balloon_free_page_reporting()
    log(f"scratch {root}; first-touch of new memory: {meta['touch_gbps']:.2f} GB/s; "
        f"load {meta['load_before']}")

    records: Records = {}
    skipped: dict[str, dict[str, str]] = {}
    tiny = cli = s3 = None
    try:
        if rows:
            for i, size in enumerate(args.size_list):
                try:
                    records[size] = run_size(size, args, rows, args.warmup if i == 0 else 0, hwm_ok, root, skipped,
                                             meta)
                except Exception as e:  # e.g. building the model ran out of memory: keep the other sizes
                    traceback.print_exc()
                    meta.setdefault("size_errors", {})[size] = f"{type(e).__name__}: {e}"
                    meta["sizes"].pop(size, None)
                    release_memory()
        if "tiny" in args.section_list and module_available("ckpt_callback") is None:
            tiny = run_tiny(args, root)
        if "cli" in args.section_list and module_available("ckpt_callback") is None:
            cli = run_cli(args, root)
        if args.with_s3_list:
            s3 = run_s3_list(args)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    meta["date"] = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    meta["load_after"] = " ".join(read_loadavg())
    meta["elapsed_min"] = (time.perf_counter() - started) / 60
    targets = collect_targets(records, meta, tiny, cli, s3 if args.with_s3_list else None)
    info = machine_info(os.path.dirname(root))
    md = render(records, skipped, info, args, meta, tiny, cli, s3, targets)
    print()
    print(md)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        kept = write_document(args.out, md, OWNED_HEADINGS)
        log(f"wrote {args.out}" + (f" (kept sections: {kept})" if kept else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "info": info, "skipped": skipped, "tiny": tiny, "cli": cli,
                       "s3": None if s3 is None else {k: v for k, v in s3.items() if k != "raw"},
                       "targets": [dataclasses.asdict(t) | {"result": t.result} for t in targets],
                       "records": {size: {sec: {n: [dataclasses.asdict(r) for r in rs] for n, rs in secs.items()}
                                          for sec, secs in s.items()} for size, s in records.items()}},
                      f, indent=2, default=str)
    failed = [r for s in records.values() for secs in s.values() for rs in secs.values() for r in rs if r.error]
    return 1 if failed or meta.get("size_errors") else 0


if __name__ == "__main__":
    sys.exit(main())
