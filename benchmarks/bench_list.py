#!/usr/bin/env python
"""`ckpt list` of 1,000 checkpoints as a user runs it: a fresh `ckpt` process, cold start included (issue 16, item 4).

    python benchmarks/bench_list.py [--n 1000] [--runs 3] [--backends local,s3]

For each backend -- a local folder under a temporary directory, and S3 on a throw-away SeaweedFS
server on loopback (tests/_s3server.py, reached through the AWS_* variables as users do) -- a root
is filled with ``--n`` committed checkpoints of a tiny state (bench_catalog.py's `populate`: one
saved checkpoint copied N times, each copy's sidecar rewritten with its own name, id, step and
times). Then each command below runs ``--runs`` times as a subprocess and the median is kept:

* ``ckpt --version``: the floor, what starting the command costs at all;
* ``ckpt list ROOT --limit 20``: the first page (it still reads every sidecar: the page is sorted
  by createdAt over all of them);
* ``ckpt list ROOT``: the whole table.

Each list runs cold (``CKPT_CACHE_DIR`` an empty folder: every sidecar is read from the root) and,
on S3, warm too (the folder a previous untimed ``ckpt list`` filled: the sidecars whose listed
stamp did not change come from it; the listing itself is always made). Local roots keep no cache.

Every list run is checked (exit status 0, the footer counts N checkpoints). Prints one JSON object:
seconds per backend and command (median, and every run), the load average before and after, N and
where ``ckpt_callback`` was imported from. `measure_list` is the same as a function, for
bench_save.py. The code measured is what ``ckpt`` imports: run with ``PYTHONPATH=src`` to measure
this checkout rather than the installed package.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

# name: (arguments, cache: None for none to use, "cold" an empty folder per run, "warm" one filled beforehand)
COMMANDS: dict[str, tuple[list[str], str | None]] = {
    "version": (["--version"], None),
    "list_limit20_cold": (["list", "{root}", "--limit", "20"], "cold"),
    "list_cold": (["list", "{root}"], "cold"),
    "list_limit20_warm": (["list", "{root}", "--limit", "20"], "warm"),
    "list_warm": (["list", "{root}"], "warm"),
}


def ckpt_command() -> list[str]:
    """The ``ckpt`` console script beside this interpreter, else the same entry point through ``python -c``."""
    script = Path(sys.executable).parent / "ckpt"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-c", "import sys; from ckpt_callback._cli import main; sys.exit(main())"]


def time_command(args: Sequence[str], env: dict[str, str], *, n: int | None) -> float:
    """Seconds one ``ckpt`` run takes, start to exit; a list must succeed and count ``n`` checkpoints."""
    start = time.perf_counter()
    out = subprocess.run([*ckpt_command(), *args], capture_output=True, text=True, env=env, timeout=600)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"ckpt {' '.join(args)} failed ({out.returncode}):\n"
                         f"{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    if n is not None:
        footer = out.stdout.strip().splitlines()[-1]
        if not footer.startswith(f"{n} checkpoints"):
            raise SystemExit(f"ckpt {' '.join(args)}: expected {n} checkpoints, the footer says {footer!r}")
    return seconds


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def measure_list(n: int = 1000, runs: int = 3, backends: Sequence[str] = ("local", "s3")) -> dict[str, Any]:
    """Fill a root with ``n`` checkpoints per backend and time each `COMMANDS` entry ``runs`` times (fresh processes).

    Returns ``{"n", "runs", "load_before", "load_after", "imported_from", "seconds": {backend: {command:
    {"median", "runs"}}}}``, times in seconds.
    """
    from bench_catalog import make_template, populate

    import ckpt_callback

    result: dict[str, Any] = {"n": n, "runs": runs, "load_before": load_average(),
                              "imported_from": str(Path(ckpt_callback.__file__).resolve().parent), "seconds": {}}
    scratch = tempfile.mkdtemp(prefix="bench-list-")
    try:
        template = make_template(scratch)
        with contextlib.ExitStack() as stack:
            for backend in backends:
                env = dict(os.environ)
                if backend == "local":
                    options: dict[str, Any] = {}
                    root = os.path.join(scratch, "local", f"n{n}")
                elif backend == "s3":
                    from _s3server import SeaweedS3

                    server = stack.enter_context(SeaweedS3())
                    server.make_bucket("bench")
                    options = server.storage_options
                    root = f"s3://bench/n{n}"
                    env.update(AWS_ENDPOINT_URL=server.endpoint_url, AWS_ACCESS_KEY_ID=server.access_key,
                               AWS_SECRET_ACCESS_KEY=server.secret_key, AWS_DEFAULT_REGION="us-east-1")
                else:
                    raise SystemExit(f"unknown backend {backend!r}")
                populate(root, options, n, template)
                warm = tempfile.mkdtemp(prefix="warm-", dir=scratch)
                time_command(["list", root], {**env, "CKPT_CACHE_DIR": warm}, n=n)  # fills it, untimed
                timings: dict[str, Any] = {}
                for key, (template_args, cache) in COMMANDS.items():
                    if cache == "warm" and backend == "local":
                        continue
                    args = [a.format(root=root) for a in template_args]
                    samples = []
                    for _ in range(runs):
                        folder = warm if cache == "warm" else tempfile.mkdtemp(prefix="cold-", dir=scratch)
                        samples.append(time_command(args, {**env, "CKPT_CACHE_DIR": folder},
                                                    n=None if key == "version" else n))
                    timings[key] = {"median": round(statistics.median(samples), 3),
                                    "runs": [round(s, 3) for s in samples]}
                    print(f"{backend:5s} {key:18s} ckpt {' '.join(template_args)}: {timings[key]['median']:.2f} s "
                          f"({', '.join(f'{s:.2f}' for s in samples)})", file=sys.stderr, flush=True)
                result["seconds"][backend] = timings
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result["load_after"] = load_average()
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="checkpoints in each root")
    parser.add_argument("--runs", type=int, default=3, help="runs per command (the median is reported)")
    parser.add_argument("--backends", default="local,s3", help="comma-separated: local, s3")
    args = parser.parse_args(argv)
    result = measure_list(args.n, args.runs, [b.strip() for b in args.backends.split(",") if b.strip()])
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
