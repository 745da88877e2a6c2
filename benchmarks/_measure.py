"""Tiny measurement helpers shared by the benchmarks: peak extra RSS while a call runs."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """Resident set size of this process, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def measure(fn: Callable[[], Any], interval: float = 0.002) -> tuple[float, int, Any]:
    """Run ``fn``; return (seconds, peak RSS above the RSS before the call, fn's result)."""
    base = rss()
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss())
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        result = fn()
    finally:
        elapsed = time.perf_counter() - start
        done.set()
        sampler.join()
    return elapsed, max(peak, rss()) - base, result


# --- BENCHMARKS.md sections -----------------------------------------------------------------------
#
# BENCHMARKS.md is shared by several scripts: bench_save.py writes the head of the file (title,
# machine, save / restore tables, targets, ...), the others each own one `## ` section. Every
# script rewrites only what it produces and keeps the rest.


def split_sections(text: str) -> tuple[str, list[tuple[str, str]]]:
    """Split Markdown into (preamble, [(heading line, full section text incl. heading)]) at `## ` lines."""
    preamble: list[str] = []
    sections: list[tuple[str, list[str]]] = []
    in_fence = False
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        if not in_fence and line.startswith("## "):
            sections.append((line.rstrip("\n"), [line]))
        elif sections:
            sections[-1][1].append(line)
        else:
            preamble.append(line)
    return "".join(preamble), [(h, "".join(body)) for h, body in sections]


def _join(parts: list[str]) -> str:
    return "\n\n".join(p.strip("\n") for p in parts if p.strip()) + "\n"


def write_section(path: str | os.PathLike[str], heading: str, section: str) -> None:
    """Replace the `## ` section whose heading line starts with ``heading`` in the Markdown file
    ``path`` (or append it at the end); everything else in the file is kept as it is."""
    path = os.fspath(path)
    text = "# Benchmarks\n"
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    preamble, sections = split_sections(text)
    parts, replaced = [preamble], False
    for head, body in sections:
        if head.startswith(heading):
            if not replaced:
                parts.append(section)
                replaced = True
        else:
            parts.append(body)
    if not replaced:
        parts.append(section)
    with open(path, "w") as f:
        f.write(_join(parts))


def write_document(path: str | os.PathLike[str], document: str, owned: list[str]) -> list[str]:
    """Write ``document`` (preamble + `## ` sections) to ``path``, keeping every `## ` section of
    the existing file whose heading does not start with one of ``owned`` (the headings the
    caller may produce) after the document, in their existing order. Returns the kept headings."""
    path = os.fspath(path)
    kept: list[tuple[str, str]] = []
    if os.path.exists(path):
        with open(path) as f:
            _, old = split_sections(f.read())
        kept = [(h, body) for h, body in old if not any(h.startswith(o) for o in owned)]
    with open(path, "w") as f:
        f.write(_join([document] + [body for _, body in kept]))
    return [h for h, _ in kept]
