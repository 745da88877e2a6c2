"""Upload memory and throughput to S3: ckpt-callback's save against a plain ``s3fs.put``.

Run:  python benchmarks/bench_s3.py [--mb 500] [--runs 3] [--out BENCHMARKS.md]

Starts a throw-away SeaweedFS S3 server on loopback (tests/_s3server.py), builds a state of
``--mb`` MB of float32 tensors, and in fresh subprocesses (so RSS is clean) measures:
- baseline: the same state written once as a local safetensors file, then ``fs.put`` of it
  (s3fs defaults: 50 MiB parts, 10 in flight) — only the put is timed;
- ours: ``CheckpointManager("s3://...").save(state, step=1)`` (serialize + hash + upload + commit).
Reports median seconds, MB/s and peak extra RSS, and writes a section into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from _measure import write_section  # noqa: E402

CHILD = r"""
import json, os, sys, tempfile, uuid
sys.path[:0] = [sys.argv[4]]
import torch, fsspec, safetensors.torch
from _measure import measure
method, mb, opts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
n = 10
state = {f"layer{i}": torch.randn(mb * 2**20 // 4 // n) for i in range(n)}
url = f"s3://bench/{method}-{uuid.uuid4().hex}"
if method == "s3fs_put":
    tmp = tempfile.mkdtemp()
    local = os.path.join(tmp, "model.safetensors")
    safetensors.torch.save_file(state, local)
    fs, path = fsspec.core.url_to_fs(url, **opts)
    seconds, extra, _ = measure(lambda: fs.put_file(local, path + "/model.safetensors"))
    os.unlink(local)
else:
    from ckpt_callback import CheckpointManager
    manager = CheckpointManager(url, storage_options=opts)
    seconds, extra, _ = measure(lambda: manager.save(state, step=1))
print(json.dumps({"seconds": seconds, "extra": extra, "bytes": sum(t.numel() * 4 for t in state.values())}))
"""


def run(method: str, mb: int, options: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, method, str(mb), json.dumps(options), str(HERE)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=str(HERE.parent / "BENCHMARKS.md"))
    args = parser.parse_args()

    from _s3server import SeaweedS3

    with SeaweedS3() as server:
        server.make_bucket("bench")
        options = server.storage_options
        rows = {}
        for method in ("s3fs_put", "ours"):
            results = [run(method, args.mb, options) for _ in range(args.runs)]
            rows[method] = results
            med = statistics.median(r["seconds"] for r in results)
            print(f"{method:10s} median {med:.2f}s  {results[0]['bytes'] / med / 1e6:.0f} MB/s  "
                  f"peak extra RSS {max(r['extra'] for r in results) / 2**20:.0f} MiB", flush=True)

    size = rows["ours"][0]["bytes"]
    base = statistics.median(r["seconds"] for r in rows["s3fs_put"])
    lines = [
        "## Upload to S3 (SeaweedFS on loopback)",
        "",
        f"`python benchmarks/bench_s3.py --mb {args.mb} --runs {args.runs}`: a {size / 1e6:.0f} MB state "
        f"(10 float32 tensors), {args.runs} runs each in a fresh process; {os.cpu_count()} cores.",
        "",
        "| method | median s [min-max] | MB/s | throughput vs s3fs.put | peak extra RSS |",
        "| --- | --- | --- | --- | --- |",
    ]
    for method, label in (("s3fs_put", "`s3fs.put_file` of a local safetensors file (baseline)"),
                          ("ours", "`CheckpointManager.save` to s3:// (serialize + sha256 + upload + commit)")):
        secs = [r["seconds"] for r in rows[method]]
        med = statistics.median(secs)
        lines.append(
            f"| {label} | {med:.2f} [{min(secs):.2f}-{max(secs):.2f}] | {size / med / 1e6:.0f} | "
            f"{base / med:.2f}x | {max(r['extra'] for r in rows[method]) / 2**20:.0f} MiB |"
        )
    section = "\n".join(lines) + "\n"
    print(section)
    write_section(Path(args.out), "## Upload to S3", section)


if __name__ == "__main__":
    main()
