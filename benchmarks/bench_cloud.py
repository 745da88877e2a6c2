"""Upload memory and throughput to the GCS and Azure emulators: ckpt-callback's save against the driver's put.

Run:  python benchmarks/bench_cloud.py [--mb 500] [--runs 1] [--backends gcs,azure] [--out BENCHMARKS.md]

Starts a throw-away emulator per backend on loopback (tests/_gcsserver.py: gcp-storage-emulator;
tests/_azurite.py: Azurite, found as the tests find it), builds a state of ``--mb`` MB of float32
tensors, and in fresh subprocesses (so RSS is clean) measures:
- baseline: the same state written once as a local safetensors file, then the driver's own
  ``fs.put_file`` of it (gcsfs / adlfs defaults) — only the put is timed;
- ours: ``CheckpointManager(url).save(state, step=1)`` (serialize + hash + upload + commit).
Reports seconds, MB/s and peak extra RSS per backend as ratios to the put of the same run, and
writes a section into BENCHMARKS.md. Emulators are not cloud services: the ratios say how our upload
path compares with the driver's on the same server, not what a real bucket does.
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
sys.path[:0] = [sys.argv[5]]
import torch, fsspec, safetensors.torch
from _measure import measure
method, mb, url, opts = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
n = 10
state = {f"layer{i}": torch.randn(mb * 2**20 // 4 // n) for i in range(n)}
url = f"{url}/{method}-{uuid.uuid4().hex}"
if method == "put":
    from ckpt_callback._storage import Storage
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

LABELS = {"gcs": ("GCS (gcp-storage-emulator)", "gcsfs"), "azure": ("Azure Blob (Azurite)", "adlfs")}


def run(method: str, mb: int, url: str, options: dict, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, method, str(mb), url, json.dumps(options), str(HERE)],
                         capture_output=True, text=True, env={**os.environ, **env})
    if out.returncode != 0:
        raise SystemExit(f"{method} on {url} failed:\n{out.stdout}\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(backend: str, mb: int, runs: int) -> dict[str, list[dict]]:
    if backend == "gcs":
        from _gcsserver import GcsEmulator

        server: object = GcsEmulator(buckets=["bench"])
        url = "gs://bench"
        # plain gcsfs for the baseline too: its bucket-type probe would wait 60 s per call on an emulator
        env = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    else:
        from _azurite import Azurite

        server = Azurite(containers=["bench"])
        url, env = "az://bench", {}
    rows: dict[str, list[dict]] = {"put": [], "ours": []}
    with server as s:  # type: ignore[attr-defined]
        options = {k: v for k, v in s.storage_options.items() if k != "skip_instance_cache"}
        if backend == "gcs":
            options = {"endpoint_url": s.endpoint_url, "token": "anon"}
        for _ in range(runs):  # interleaved: put, ours, put, ours, ...
            for method in rows:
                rows[method].append(run(method, mb, url, options, env))
                r = rows[method][-1]
                print(f"{backend:6s} {method:5s} {r['seconds']:.2f}s  {r['bytes'] / r['seconds'] / 1e6:.0f} MB/s  "
                      f"peak extra RSS {r['extra'] / 2**20:.0f} MiB", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=500)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--backends", default="gcs,azure")
    parser.add_argument("--out", default=str(HERE.parent / "BENCHMARKS.md"))
    args = parser.parse_args()

    results = {b: bench(b, args.mb, args.runs) for b in args.backends.split(",")}
    size = next(iter(results.values()))["ours"][0]["bytes"]
    lines = [
        "## Upload to GCS and Azure emulators",
        "",
        f"`python benchmarks/bench_cloud.py --mb {args.mb} --runs {args.runs}`: a {size / 1e6:.0f} MB state "
        f"(10 float32 tensors), {args.runs} run(s) of each method in a fresh process, interleaved; "
        f"{os.cpu_count()} cores. Baseline: the driver's own `put_file` of the same bytes as a local safetensors "
        "file (its defaults), to the same emulator in the same run. The emulators are single local processes "
        "(the GCS one is pure Python), so absolute MB/s say little about a real bucket.",
        "",
        "| backend | method | seconds | MB/s | throughput vs put | peak extra RSS | RSS vs put |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for backend, rows in results.items():
        label, driver = LABELS[backend]
        base = statistics.median(r["seconds"] for r in rows["put"])
        base_rss = max(r["extra"] for r in rows["put"])
        for method, what in (("put", f"`{driver}` `put_file` (baseline)"),
                             ("ours", "`CheckpointManager.save` (serialize + sha256 + upload + commit)")):
            med = statistics.median(r["seconds"] for r in rows[method])
            rss = max(r["extra"] for r in rows[method])
            lines.append(f"| {label} | {what} | {med:.2f} | {size / med / 1e6:.0f} | {base / med:.2f}x | "
                         f"{rss / 2**20:.0f} MiB | {rss / max(base_rss, 1):.2f}x |")
    section = "\n".join(lines) + "\n"
    print(section)
    write_section(Path(args.out), "## Upload to GCS and Azure emulators", section)


if __name__ == "__main__":
    main()
