#!/usr/bin/env python
"""Cost of a save, an evaluation and a listing against the number of checkpoints in the root (issue 10, item 8).

    python benchmarks/bench_catalog.py [--quick] [--runs 7] [--label TEXT] [--commit TEXT] [--out BENCHMARKS.md]

For N in (1, 100, 1000) (``--quick``: 1, 100) and two backends -- a local folder under a temporary
directory, and S3 on a throw-away SeaweedFS server on loopback (tests/_s3server.py) -- the root is
populated with N committed checkpoints of a tiny state: one checkpoint saved by
``CheckpointManager.save``, copied N times with fsspec under the names ``checkpoint-1`` ..
``checkpoint-N`` with name, id, step and times rewritten in each copy's sidecar (valid
checkpoints: same files, same sha256). The copy is checked with ``list()`` (total_count == N); if a
future layout made the copies invalid, the root is filled through ``CheckpointManager.save`` instead.

Then, in a fresh process per (backend, N), public API only:

* baseline: the hook's state (tiny model + AdamW + RNG) ``torch.save`` + fsync to a local file
  (local) / ``torch.save`` to memory + one ``fs.pipe_file`` of those bytes (S3);
* list cold: ``CheckpointManager(root).list(limit=20)`` on a new manager;
* list warm: the same call again on that manager;
* save: one ``CheckpointHook.step`` (``every_n_steps=1``, ``keep_last=None``) on a warm hook (its
  first save is not timed), which saves the tiny model, optimizer and RNG;
* evaluate: ``hook.evaluate(step, eval_loss=...)`` right after each save, with a lower loss each
  time, so every call rewrites that checkpoint's sidecar and moves the ``best`` tag from the previous one.

Reports medians in ms, the ratio N=max / N=1 per operation ("does not grow" means near 1x), and
each median as a ratio against the backend's baseline from the same invocation. Writes the
section "## Catalog: cost per operation vs number of checkpoints" into BENCHMARKS.md with one
``### <label>`` subsection per run label: a rerun with the same label replaces its subsection,
other labels (e.g. the "before" figures) are kept.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from _measure import split_sections, write_section  # noqa: E402

HEADING = "## Catalog: cost per operation vs number of checkpoints"
SIDECAR = "checkpoint.json"
OPERATIONS = ("save", "evaluate", "list_cold", "list_warm")
LABELS = {
    "save": "save (`hook.step`)",
    "evaluate": "evaluate (`hook.evaluate`)",
    "list_cold": "list cold (new manager)",
    "list_warm": "list warm (same manager)",
}
BACKENDS = {"local": "local folder", "s3": "S3 (SeaweedFS, loopback)"}
BASELINES = {
    "local": "`torch.save` + fsync of file and folder",
    "s3": "`torch.save` to memory + one `fs.pipe_file`",
}


# --- the measuring child (fresh process per backend and N) ---------------------------------------


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure baseline, list, save and evaluate on a populated root; return the timings in seconds."""
    import io

    import fsspec
    import torch

    from ckpt_callback import CheckpointHook, CheckpointManager

    logging.basicConfig(level=logging.WARNING)
    url, options, n, runs = spec["url"], spec["options"], spec["n"], spec["runs"]
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(2, 16)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()

    def over_budget(*timings: list[float]) -> bool:
        """Enough samples once the operations took ``budget`` seconds (the slow "before" figures)."""
        return len(timings[0]) >= 2 and sum(map(sum, timings)) > spec["budget"]

    def state() -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state()}

    # Baseline: the same tiny state written the plain way.
    baseline = []
    if spec["backend"] == "local":
        folder = tempfile.mkdtemp(dir=spec["scratch"])
        for i in range(runs + 1):
            path = os.path.join(folder, f"state-{i}.pt")
            start = time.perf_counter()
            with open(path, "wb") as f:
                torch.save(state(), f)
                f.flush()
                os.fsync(f.fileno())
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            baseline.append(time.perf_counter() - start)
        shutil.rmtree(folder)
    else:
        fs, path = fsspec.core.url_to_fs(spec["scratch"], **options)
        for i in range(runs + 1):
            start = time.perf_counter()
            buf = io.BytesIO()
            torch.save(state(), buf)
            fs.pipe_file(f"{path}/state-{i}.pt", buf.getvalue())
            baseline.append(time.perf_counter() - start)
    baseline = baseline[1:]  # the first one opens files / connections

    # Open the filesystem once outside the timings (s3fs session, connection pool).
    fs, path = fsspec.core.url_to_fs(url, **options)
    fs.ls(path)

    list_cold: list[float] = []
    list_warm: list[float] = []
    while len(list_cold) < spec["list_runs"] and not over_budget(list_cold, list_warm):
        manager = CheckpointManager(url, storage_options=options, keep_last=None)
        start = time.perf_counter()
        page = manager.list(limit=20)
        list_cold.append(time.perf_counter() - start)
        if page.total_count != n:
            raise SystemExit(f"{url}: list() found {page.total_count} checkpoints, expected {n}")
        start = time.perf_counter()
        manager.list(limit=20)
        list_warm.append(time.perf_counter() - start)
        manager.close()

    save: list[float] = []
    evaluate: list[float] = []
    hook = CheckpointHook(url, model, optimizer=opt, every_n_steps=1, keep_last=None, storage_options=options)
    try:
        i = 0
        while i <= runs and not over_budget(save, evaluate):  # i == 0 warms the hook up, untimed
            step = n + 1 + i
            start = time.perf_counter()
            info = hook.step(step, loss=1.0)
            middle = time.perf_counter()
            hook.evaluate(step, eval_loss=1.0 / (i + 1))
            end = time.perf_counter()
            if info is None:
                raise SystemExit(f"{url}: the save at step {step} failed (see the log above)")
            if i:
                save.append(middle - start)
                evaluate.append(end - middle)
            i += 1
        best = hook.manager.best()
        if best is None or best.step != n + i:
            raise SystemExit(f"{url}: best is {best and best.name}, expected checkpoint-{n + i}")
    finally:
        hook.manager.close()
    return {"baseline": baseline, "list_cold": list_cold, "list_warm": list_warm, "save": save, "evaluate": evaluate}


# --- populating a root ----------------------------------------------------------------------------


def make_template(scratch: str) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Save one tiny checkpoint through the public API; return its files (sidecar excluded) and sidecar."""
    import fsspec
    import torch

    from ckpt_callback import CheckpointManager

    root = os.path.join(scratch, "template")
    logging.disable(logging.WARNING)  # "monitor 'evalLoss' never appears": expected for a bare state
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            manager = CheckpointManager(root, keep_last=None)
            info = manager.save({"w": torch.zeros(4)}, step=0)
            manager.close()
    finally:
        logging.disable(logging.NOTSET)
    assert info is not None
    fs = fsspec.filesystem("file")
    folder = os.path.join(root, info.name)
    files = {os.path.relpath(p, folder): fs.cat_file(p) for p in fs.find(folder)}
    sidecar = json.loads(files.pop(SIDECAR))
    shutil.rmtree(root)
    return files, sidecar


def populate(url: str, options: dict[str, Any], n: int, template: tuple[dict[str, bytes], dict[str, Any]]) -> str:
    """Fill ``url`` with ``n`` committed checkpoints; return how ("copies" or "saves")."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    from ckpt_callback import CheckpointManager

    files, sidecar = template
    fs, base = fsspec.core.url_to_fs(url, **options)
    first = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1)
    blobs: dict[str, bytes] = {}
    sidecars: dict[str, bytes] = {}
    for k in range(1, n + 1):
        name = f"checkpoint-{k}"
        when = (first + datetime.timedelta(milliseconds=k)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        meta = {**sidecar, "id": str(uuid.uuid4()), "name": name, "step": k, "createdAt": when, "updatedAt": when}
        for rel, data in files.items():
            blobs[f"{base}/{name}/{rel}"] = data
        sidecars[f"{base}/{name}/{SIDECAR}"] = json.dumps(meta, indent=2).encode()
    if isinstance(fs, LocalFileSystem):  # local pipe_file does not create folders
        for key in sidecars:
            os.makedirs(os.path.dirname(key), exist_ok=True)
    fs.pipe(blobs)
    fs.pipe(sidecars)  # sidecars last, as a commit would
    manager = CheckpointManager(url, storage_options=options, keep_last=None)
    count = manager.list(limit=1).total_count
    if count == n:
        manager.close()
        return "copies"
    print(f"  {url}: the copies gave {count} listed checkpoints, not {n}: saving them instead", flush=True)
    fs.rm(base, recursive=True)
    import torch

    manager = CheckpointManager(url, storage_options=options, keep_last=None)
    for k in range(1, n + 1):
        manager.save({"w": torch.zeros(4)}, step=k)
    count = manager.list(limit=1).total_count
    manager.close()
    if count != n:
        raise SystemExit(f"{url}: {count} checkpoints listed after {n} saves")
    return "saves"


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"child failed ({spec['backend']}, N={spec['n']}):\n{out.stdout}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- report ---------------------------------------------------------------------------------------


def code_commit(given: str | None) -> str:
    if given:
        return given
    import ckpt_callback

    where = Path(ckpt_callback.__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"unknown (code imported from {where})"
    return head + (" + uncommitted changes in src/" if dirty else "")


def heading(label: str, commit: str) -> str:
    """``### label (commit abc1234)``: every run names the code it measured."""
    return f"### {label}" if commit.split()[0] in label else f"### {label} (commit {commit.split()[0]})"


def imported_from() -> str:
    """Where ckpt_callback came from, when it is not this repository's src/ (e.g. an exported older commit)."""
    import ckpt_callback

    where = Path(ckpt_callback.__file__).resolve().parent
    return "" if where == HERE.parent / "src" / "ckpt_callback" else f" (imported from `{where}`)"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds < 1 else f"{seconds * 1e3:.0f}"


def ratio(x: float) -> str:
    return f"{x:.2f}x" if x < 1 else f"{x:.1f}x" if x < 100 else f"{x:.0f}x"


def render(results: dict[tuple[str, int], dict[str, Any]], args: argparse.Namespace, info: dict[str, Any]) -> str:
    counts = sorted({n for _, n in results})
    backends = [b for b in BACKENDS if any(k[0] == b for k in results)]
    base = {b: statistics.median(t for (bb, _), r in results.items() if bb == b for t in r["baseline"])
            for b in backends}
    lines = [
        heading(args.label, info["commit"]),
        "",
        f"Code measured: commit `{info['commit']}`{info['imported']}. Run {info['date']} by `{info['command']}`; "
        f"{os.cpu_count()} cores, load average before / after: {info['load_before']} / {info['load_after']}. "
        f"Roots filled by {info['populated']}; {info['seconds']:.0f} s in all.",
        "",
        "Baselines (median ms over every child of the backend): "
        + "; ".join(f"{BACKENDS[b]}: {BASELINES[b]} {ms(base[b])} ms" for b in backends) + ".",
        "",
        "Median ms [min-max] (ratio of the median to the backend's baseline):",
        "",
        "| backend | checkpoints | " + " | ".join(LABELS[o] for o in OPERATIONS) + " |",
        "| --- | --- |" + " --- |" * len(OPERATIONS),
    ]
    for b in backends:
        for n in counts:
            r = results[(b, n)]
            cells = []
            for o in OPERATIONS:
                med = statistics.median(r[o])
                cells.append(f"{ms(med)} [{ms(min(r[o]))}-{ms(max(r[o]))}] ({ratio(med / base[b])})")
            lines.append(f"| {BACKENDS[b]} | {n:,} | " + " | ".join(cells) + " |")
    samples = ", ".join(f"{b} N={n:,}: {len(results[(b, n)]['save'])} / {len(results[(b, n)]['list_cold'])}"
                        for b in backends for n in counts)
    low, high = counts[0], counts[-1]
    lines += [
        "",
        f"Timed samples per cell (saves and evaluations / cold and warm lists; fewer than `--runs {args.runs}` / "
        f"`--list-runs {args.list_runs}` where `--budget {args.budget:g}` s ran out): {samples}.",
        "",
        f"Growth: median at N={high:,} / median at N={low:,} (near 1x = the cost does not grow with the checkpoints):",
        "",
        "| operation | " + " | ".join(BACKENDS[b] for b in backends) + " |",
        "| --- |" + " --- |" * len(backends),
    ]
    for o in OPERATIONS:
        ratios = [statistics.median(results[(b, high)][o]) / statistics.median(results[(b, low)][o]) for b in backends]
        lines.append(f"| {LABELS[o]} | " + " | ".join(f"**{ratio(x)}**" for x in ratios) + " |")
    return "\n".join(lines) + "\n"


def intro() -> str:
    return "\n".join([
        HEADING,
        "",
        "Issue 10, item 8: the cost of a save does not grow with the number of checkpoints in the root. "
        "`benchmarks/bench_catalog.py` fills a root with N committed checkpoints of a tiny state (one saved "
        "checkpoint copied N times with fsspec, each copy's sidecar rewritten with its own name, id, step and "
        "times), then measures in a fresh process per backend and N, through the public API: one "
        "`CheckpointHook.step` save of a tiny model (`Linear(16, 16)` + AdamW + RNG; `every_n_steps=1`, "
        "`keep_last=None`, warm: the hook's first save is not timed), one `hook.evaluate(step, eval_loss=...)` "
        "right after it (a lower loss each time: it rewrites that sidecar and moves the `best` tag), and "
        "`CheckpointManager(root).list(limit=20)` on a new manager (cold) and again on the same one (warm). "
        "A cold list has to read every sidecar once whatever the catalog does (the page is sorted by "
        "`createdAt` over all of them); the save, the evaluation and the warm list should not. Baselines, "
        "measured in each child: the same state `torch.save` + fsync (local), `torch.save` to memory + one "
        "`fs.pipe_file` (S3). Each run below is labelled with the commit of the code it measured.",
        "",
    ])


def update_section(path: Path, subsection: str, label: str) -> None:
    """Write the section with its intro, replacing the ``### label`` subsection or appending it."""
    kept: list[str] = []
    if path.exists():
        _, sections = split_sections(path.read_text())
        for head, body in sections:
            if head.startswith(HEADING):
                parts: list[list[str]] = []
                for line in body.splitlines(keepends=True):
                    if line.startswith("### "):
                        parts.append([line])
                    elif parts:
                        parts[-1].append(line)
                kept = ["".join(p) for p in parts]
    def mine(part: str) -> bool:
        head = part.split("\n", 1)[0]
        return head == f"### {label}" or head.startswith(f"### {label} (commit ")

    if any(map(mine, kept)):  # a rerun under the same label: replace it in place
        kept = [subsection if mine(p) else p for p in kept]
    else:
        kept.append(subsection)
    body = intro() + "\n" + "\n".join(p.strip("\n") + "\n" for p in kept)
    write_section(path, HEADING, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N in (1, 100) only")
    parser.add_argument("--runs", type=int, default=7, help="timed saves / evaluations / baselines per child")
    parser.add_argument("--list-runs", type=int, default=3, help="new managers listed per child")
    parser.add_argument("--budget", type=float, default=30.0,
                        help="seconds per child for the saves + evaluations (and again for the lists) after "
                             "which no more samples are taken once there are 2")
    parser.add_argument("--backends", default="local,s3", help="comma-separated: local, s3")
    parser.add_argument("--label", default=None, help="subsection heading (default: 'commit <hash>')")
    parser.add_argument("--commit", default=None,
                        help="the commit of the code measured (default: git HEAD of the imported package)")
    parser.add_argument("--out", default=str(HERE.parent / "BENCHMARKS.md"), help="Markdown file ('' = print only)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    import contextlib
    import shlex

    counts = (1, 100) if args.quick else (1, 100, 1000)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    commit = code_commit(args.commit)
    args.label = args.label or f"commit {commit}"
    started = time.monotonic()
    info: dict[str, Any] = {
        "commit": commit,
        "imported": imported_from(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + shlex.join(["benchmarks/bench_catalog.py", *sys.argv[1:]]),
        "load_before": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    results: dict[tuple[str, int], dict[str, Any]] = {}
    how: set[str] = set()
    scratch = tempfile.mkdtemp(prefix="bench-catalog-")
    try:
        template = make_template(scratch)
        with contextlib.ExitStack() as stack:
            for backend in backends:
                if backend == "local":
                    options: dict[str, Any] = {}
                    prefix, spare = os.path.join(scratch, "local"), scratch
                elif backend == "s3":
                    from _s3server import SeaweedS3

                    server = stack.enter_context(SeaweedS3())
                    server.make_bucket("bench")
                    options = server.storage_options
                    prefix, spare = "s3://bench", "s3://bench/baseline"
                else:
                    raise SystemExit(f"unknown backend {backend!r}")
                for n in counts:
                    url = f"{prefix}/n{n}"
                    t0 = time.monotonic()
                    how.add(populate(url, options, n, template))
                    filled = time.monotonic() - t0
                    spec = {"backend": backend, "url": url, "options": options, "n": n, "runs": args.runs,
                            "list_runs": args.list_runs, "budget": args.budget, "scratch": spare}
                    r = results[(backend, n)] = measure(spec)
                    print(f"{backend:5s} N={n:5d} (filled in {filled:.0f}s): "
                          + "  ".join(f"{o} {ms(statistics.median(r[o]))} ms" for o in ("baseline", *OPERATIONS)),
                          flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    info["load_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    info["populated"] = ("copying one saved checkpoint" if how == {"copies"}
                         else "`CheckpointManager.save`" if how == {"saves"} else "copies and saves")
    info["seconds"] = time.monotonic() - started
    subsection = render(results, args, info)
    print(subsection)
    if args.out:
        update_section(Path(args.out), subsection, args.label)


if __name__ == "__main__":
    main()
