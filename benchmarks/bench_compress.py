"""Compression and frozen-tensor sharing: ratio, speed, time to durable, restore, bytes on storage.

Run:  python benchmarks/bench_compress.py [--runs 2] [--out BENCHMARKS.md]

All in one run on one machine, GPT-2 small from its config (random init; trained weights
compress differently: their exponents spread less and their low mantissa bytes are as noisy):

1. Codec: the bytes of ``model.safetensors`` + ``optimizer.safetensors`` (fp32 weights and AdamW
   moments after one step) and of bf16 weights; ours (bytes grouped by position, then zstd level 1,
   on 2 threads as ``save_threads=2`` runs it, and on 1) against plain zstd (levels 1 and 3, one
   thread) and zipnn (its defaults for the dtype, its own threads). Ratio = raw / compressed.
2. Time to durable (``save`` returns, files fsynced / uploaded and committed) and restore
   (``restore(model, optimizer)``, every byte sha256-checked) with and without ``compression="zstd"``,
   on a local folder and on S3 (a throw-away SeaweedFS on loopback).
3. Bytes on storage for 10 checkpoints of a frozen-base run (embeddings and blocks 0-9 frozen,
   blocks 10-11 and ln_f trained with AdamW), every checkpoint kept: frozen tensors in their own
   shard, hard-linked from save to save locally (`du` real blocks, unique inodes), against 10 full
   copies (the same run with ``frozen=()``), with and without compression; on S3 the sum of the
   listed object sizes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests"), str(HERE.parent / "src")]

import torch  # noqa: E402
import zstandard  # noqa: E402
from _measure import write_section  # noqa: E402


def gpt2(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randint(0, 50257, (1, 16)), labels=torch.randint(0, 50257, (1, 16))).loss.backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def file_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer | None) -> list[tuple[str, bytes, list]]:
    """The raw bytes (and byte-grouping pieces) of the files a save writes."""
    from ckpt_callback._serialization import dedupe_tensors, safetensors_chunks, safetensors_pieces
    from ckpt_callback._training import TrainingState

    files = []
    tensors, _ = dedupe_tensors(model.state_dict())
    files.append(("model", tensors))
    if opt is not None:
        _, otensors = TrainingState.capture(optimizer=opt, scheduler=None, extra=None, rng=False).to_files(step=1,
                                                                                                            epoch=None)
        files.append(("optimizer", otensors))
    return [(name, b"".join(bytes(c) for c in safetensors_chunks(t)), list(safetensors_pieces(t)))
            for name, t in files]


def timed(fn, runs: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def codec_rows(runs: int) -> list[list[str]]:
    rows: list[list[str]] = []
    for label, dtype, with_opt in [("fp32 weights + AdamW", torch.float32, True), ("bf16 weights", torch.bfloat16,
                                                                                    False)]:
        rows += codec_rows_for(label, dtype, with_opt, runs)
    return rows


def codec_rows_for(label: str, dtype: torch.dtype, with_opt: bool, runs: int) -> list[list[str]]:
    from concurrent.futures import ThreadPoolExecutor

    from ckpt_callback import _codec

    rows = []
    model, opt = gpt2(dtype)
    parts = file_bytes(model, opt if with_opt else None)
    raw = sum(len(b) for _, b, _ in parts)
    zname = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]

    def ours(threads: int):
        def go():
            with ThreadPoolExecutor(threads) as pool:
                return [b"".join(bytes(c) for c in _codec.encode(iter(p), level=1,
                                                               pool=pool if threads > 1 else None,
                                                               in_flight=threads)) for _, _, p in parts]
        return go

    def ours_decode(packed):
        import io
        out = []
        for blob, (_, b, _) in zip(packed, parts, strict=True):
            r = _codec.DecodingReader(io.BytesIO(blob), len(b), "bench")
            buf = bytearray(len(b))
            r.readinto(memoryview(buf))
            r.finish()
            out.append(buf)
        return out

    methods = {
        "ours, 2 threads": (ours(2), ours_decode),
        "ours, 1 thread": (ours(1), ours_decode),
        "zstd -1": (lambda: [zstandard.ZstdCompressor(level=1).compress(b) for _, b, _ in parts],
                    lambda packed: [zstandard.ZstdDecompressor().decompress(c) for c in packed]),
        "zstd -3": (lambda: [zstandard.ZstdCompressor(level=3).compress(b) for _, b, _ in parts],
                    lambda packed: [zstandard.ZstdDecompressor().decompress(c) for c in packed]),
    }
    # zipnn: one dtype per call; optimizer moments are fp32 like the weights here.
    try:  # where installable (pip install zipnn: it builds a C extension)
        import zipnn
    except ImportError:
        zipnn = None
    # zipnn 0.5.4 overwrites the buffer it compresses, even an immutable bytes object: it gets a copy (timed
    # with it: a memcpy is a few % of its time).
    if zipnn is not None:
        zn = zipnn.ZipNN(bytearray_dtype=zname, input_format="byte")
        methods["zipnn (defaults)"] = (lambda: [zn.compress(bytearray(b)) for _, b, _ in parts],
                                       lambda packed: [zn.decompress(c) for c in packed])
    for name, (compress, decompress) in methods.items():
        seconds_c, packed = timed(compress, runs)
        seconds_d, back = timed(lambda p=packed, d=decompress: d(p), runs)
        exact = all(bytes(x) == b for x, (_, b, _) in zip(back, parts, strict=True))
        assert exact, f"{name} did not give back the bytes it was given"
        stored = sum(len(p) for p in packed)
        rows.append([label, name, f"{raw / 1e6:.0f}", f"{stored / 1e6:.0f}", f"{raw / stored:.3f}x",
                     f"{raw / 1e6 / seconds_c:.0f}", f"{raw / 1e6 / seconds_d:.0f}",
                     "yes" if exact else "**no**: decoded bytes differ"])
        print(rows[-1], flush=True)
    return rows


def save_restore_rows(runs: int, s3_url: str | None, options: dict) -> list[list[str]]:
    from ckpt_callback import CheckpointManager

    model, opt = gpt2()
    rows = []
    roots = [("local", lambda: tempfile.mkdtemp(prefix="bench-compress-", dir="/tmp"))]
    if s3_url:
        roots.append(("S3 (SeaweedFS, loopback)", lambda: f"{s3_url}/run-{uuid.uuid4().hex}"))
    base: dict[str, tuple[float, float]] = {}
    for where, make in roots:
        for compression in (None, "zstd"):
            durable, restore, size = [], [], 0
            for _ in range(runs):
                root = make()
                m = CheckpointManager(root, storage_options=options if root.startswith("s3") else None,
                                      compression=compression, keep_last=None)
                start = time.perf_counter()
                info = m.save(model, step=1, optimizer=opt)
                durable.append(time.perf_counter() - start)
                size = info.size
                fresh, fresh_opt = gpt2()
                start = time.perf_counter()
                m.restore("latest", model=fresh, optimizer=fresh_opt)
                restore.append(time.perf_counter() - start)
                m.close()
                remove(root, options)
            d, r = statistics.median(durable), statistics.median(restore)
            base.setdefault(where, (d, r))
            rows.append([where, str(compression), f"{size / 1e6:.0f}", f"{d:.2f}", f"{r:.2f}",
                         f"{d / base[where][0]:.2f}x", f"{r / base[where][1]:.2f}x"])
            print(rows[-1], flush=True)
    return rows


def remove(root: str, options: dict) -> None:
    """Free what a run stored (the loopback S3 server has a bounded volume space)."""
    import shutil

    import fsspec

    if root.startswith("s3"):
        fs, path = fsspec.core.url_to_fs(root, **options)
        fs.rm(path, recursive=True)
    else:
        shutil.rmtree(root, ignore_errors=True)


def du(root: str) -> int:
    inodes = {}
    for dirpath, _, filenames in os.walk(root):
        for f in filenames:
            st = os.stat(os.path.join(dirpath, f))
            inodes[st.st_ino] = st.st_blocks * 512
    return sum(inodes.values())


def frozen_rows(s3_url: str | None, options: dict) -> list[list[str]]:
    import fsspec

    from ckpt_callback import CheckpointManager

    model, _ = gpt2()
    for p in model.parameters():
        p.requires_grad_(False)
    for module in (model.transformer.h[10], model.transformer.h[11], model.transformer.ln_f):
        module.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rows = []
    targets = [("local", "du real blocks", lambda: tempfile.mkdtemp(prefix="bench-frozen-", dir="/tmp"))]
    if s3_url:
        targets.append(("S3", "object sizes", lambda: f"{s3_url}/frozen-{uuid.uuid4().hex}"))
    for where, how, make in targets:
        full = None
        for compression in (None, "zstd"):
            for share in (False, True):
                root = make()
                m = CheckpointManager(root, keep_last=None, compression=compression,
                                      storage_options=options if root.startswith("s3") else None)
                started = time.perf_counter()
                for step in range(1, 11):
                    with torch.no_grad():
                        for p in opt.param_groups[0]["params"]:
                            p.add_(1e-3)
                    m.save(model, step=step, optimizer=opt, frozen=None if share else ())
                seconds = time.perf_counter() - started
                if root.startswith("s3"):
                    fs, path = fsspec.core.url_to_fs(root, **options)
                    used = sum(d["size"] for d in fs.find(path, detail=True).values())
                else:
                    used = du(root)
                full = full or used
                logical = sum(i.logical_size for i in m.list())
                label = "frozen shard shared" if share else "10 full copies"
                rows.append([where, how, str(compression), label, f"{used / 1e6:.0f}", f"{logical / 1e6:.0f}",
                             f"{used / full:.2f}x", f"{seconds:.1f}"])
                print(rows[-1], flush=True)
                m.close()
                remove(root, options)
    return rows


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument("--out", default=str(HERE.parent / "BENCHMARKS.md"))
    args = parser.parse_args()
    load_before = os.getloadavg()
    from contextlib import ExitStack

    with ExitStack() as stack:
        s3_url, options = None, {}
        if not args.no_s3:
            from _s3server import SeaweedS3

            server = stack.enter_context(SeaweedS3(max_volumes=400))
            server.make_bucket("bench")
            s3_url = "s3://bench"
            options = {"endpoint_url": server.endpoint_url, "key": server.access_key, "secret": server.secret_key}
        codec = codec_rows(args.runs)
        saves = save_restore_rows(args.runs, s3_url, options)
        frozen = frozen_rows(s3_url, options)
    load_after = os.getloadavg()
    text = "\n".join([
        "## Compression and frozen-tensor sharing (issue 13)",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python benchmarks/bench_compress.py "
        f"--runs {args.runs}` on the machine above (2 cores; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after; speeds are medians of {args.runs} runs). "
        "GPT-2 small from its config, random init: trained weights compress differently. Compare within a "
        "table: every ratio is against a baseline measured in the same run; byte counts and compression ratios "
        "do not depend on the load.",
        "",
        "### Codec: ratio and speed",
        "",
        "MB/s of raw (decoded) bytes. `ours` is what `compression=\"zstd\"` writes (bytes grouped by position, "
        "zstd level 1, noisy streams stored raw); decoding is single-threaded and checks every frame. "
        "zipnn (0.5.4) overwrites the buffer it is given, even an immutable `bytes`, so it compresses a copy "
        "(the copy is inside its time).",
        "",
        table(["state", "method", "raw MB", "stored MB", "ratio", "compress MB/s", "decompress MB/s",
               "exact round trip"], codec),
        "",
        "### Time to durable and restore, GPT-2 small fp32 + AdamW (1.49 GB)",
        "",
        "Ratios against the uncompressed save / restore on the same storage in this run.",
        "",
        table(["storage", "compression", "stored MB", "durable s", "restore s", "durable vs plain",
               "restore vs plain"], saves),
        "",
        "### Bytes on storage: 10 checkpoints of a frozen-base run",
        "",
        "GPT-2 small fp32, embeddings and blocks 0-9 frozen (requires_grad=False), blocks 10-11 and ln_f "
        "trained with AdamW; all 10 checkpoints kept. `10 full copies` is the same run with `frozen=()`; "
        "ratios against the uncompressed full copies on the same storage. Locally the frozen shard is a hard link "
        "(every folder stays self-contained); on S3 it is stored once in `ROOT/.ckpt-blobs/<sha256>` and named by "
        "each sidecar that uses it. S3 bytes are the sizes of every object under the root, blobs included.",
        "",
        table(["storage", "measured as", "compression", "layout", "stored MB", "logical MB", "vs full copies",
               "10 saves s"], frozen),
        "",
    ])
    write_section(Path(args.out), "## Compression and frozen-tensor sharing", text)
    print(text)


if __name__ == "__main__":
    main()
