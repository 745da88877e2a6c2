"""The loss plot of ``ckpt plot``: train and eval loss per checkpoint, types and the best one marked.

With a loss history (HF runs: the ``log_history`` of ``trainer_state.json`` saved with each
checkpoint) the lines are the run's whole train and eval loss, logged step by step, and the
checkpoints are marked on them; without one, the lines join the checkpoints' own losses.
Pure functions of the sidecars (`CheckpointInfo` records) and that history; they never touch
the checkpoint storage. matplotlib is an optional extra (``pip install 'ckpt-callback[plot]'``) and is
imported only when a plot is drawn. No pyplot: a bare `Figure` leaves no global state behind.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._sidecar import CHECKPOINT_TYPES, CheckpointInfo

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["MATPLOTLIB_MISSING", "draw_losses", "loss_history", "plot_losses", "unsupported_suffix"]

History = Mapping[str, Sequence[tuple[float, float]]]  # "train_loss"/"eval_loss" -> [(step, loss), ...]


def loss_history(trainer_state: Mapping[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """The train and eval loss logged at each step, from a Trainer's ``trainer_state.json``.

    Example:
        >>> loss_history({"log_history": [{"step": 1, "loss": 2.0}, {"step": 2, "eval_loss": 1.5}]})
        {'train_loss': [(1, 2.0)], 'eval_loss': [(2, 1.5)]}
    """
    out: dict[str, list[tuple[float, float]]] = {"train_loss": [], "eval_loss": []}
    for entry in trainer_state.get("log_history") or []:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("step"), int | float):
            continue
        for key, series in (("loss", "train_loss"), ("eval_loss", "eval_loss")):
            value = entry.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[series].append((entry["step"], float(value)))
    return {k: sorted(v) for k, v in out.items()}

MATPLOTLIB_MISSING = "ckpt plot needs matplotlib; install it with: pip install 'ckpt-callback[plot]'"

_TRAIN_COLOR = "#1f77b4"
_EVAL_COLOR = "#d62728"
_BEST_COLOR = "#f2b701"
_MARKERS = {"automatic": "o", "best": "*", "manual": "s", "final": "D"}
_MARKER_SIZE = {"automatic": 30, "best": 150, "manual": 45, "final": 45}


def plot_losses(
    infos: Sequence[CheckpointInfo],
    output: str | os.PathLike[str],
    *,
    best: CheckpointInfo | None = None,
    monitor: str = "evalLoss",
    title: str = "",
    log_scale: bool = False,
    history: History | None = None,
) -> Path:
    """Draw train and eval loss over steps, one point per checkpoint, and write it to ``output``.

    Each checkpoint's type is shown by its marker shape; ``best`` gets a gold star, a dotted
    line at its step and a label. The file format follows the suffix (png, svg, pdf, ...).

    Args:
        infos: the checkpoints to draw (any order).
        output: the image file to write.
        best: the checkpoint to mark as best (by ``monitor``), if any.
        monitor: the quantity ``best`` was chosen by, for its label.
        title: the plot's title (usually the root).
        log_scale: a logarithmic loss axis.
        history: the run's logged losses (`loss_history`); drawn as the lines when given.

    Returns:
        The path written.

    Raises:
        ImportError: matplotlib is not installed (the message says how to install it).
        ValueError: no checkpoint has a loss, or the file suffix is not an image format.

    Example:
        >>> a = CheckpointInfo(name="checkpoint-1", step=1, train_loss=2.0, eval_loss=2.1)
        >>> b = CheckpointInfo(name="final", step=2, type="final", train_loss=1.0, eval_loss=1.2)
        >>> plot_losses([a, b], "/tmp/ckpt-doc-plot.png", best=b).name
        'ckpt-doc-plot.png'
    """
    path = Path(output)
    problem = unsupported_suffix(path)
    if problem is not None:
        raise ValueError(f"cannot write {str(path)!r}: {problem}")
    fig = draw_losses(infos, best=best, monitor=monitor, title=title, log_scale=log_scale, history=history)
    fig.savefig(path, format=path.suffix.lstrip(".").lower())
    return path


def draw_losses(
    infos: Sequence[CheckpointInfo],
    *,
    best: CheckpointInfo | None = None,
    monitor: str = "evalLoss",
    title: str = "",
    log_scale: bool = False,
    history: History | None = None,
) -> Any:
    """The matplotlib ``Figure`` that `plot_losses` writes (arguments as there)."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError as exc:
        raise ImportError(MATPLOTLIB_MISSING) from exc

    points = sorted(infos, key=lambda i: (i.step, i.created_at))
    history = {k: v for k, v in (history or {}).items() if v}
    if not history and not any(i.train_loss is not None or i.eval_loss is not None for i in points):
        raise ValueError("no checkpoint records trainLoss or evalLoss; there is nothing to plot")
    fig = Figure(figsize=(9, 5.5), dpi=150, layout="constrained")

    ax = fig.add_subplot()
    for attr, color, dashed in (("train_loss", _TRAIN_COLOR, False), ("eval_loss", _EVAL_COLOR, True)):
        logged = history.get(attr)
        if logged:
            ax.plot([s for s, _ in logged], [v for _, v in logged], color=color, linestyle="--" if dashed else "-",
                    linewidth=1.2, alpha=0.85, zorder=2, label=f"{attr} history")
        _series(ax, points, attr, color, hollow=not dashed, line=not logged)
    for info in points:
        y = info.eval_loss if info.eval_loss is not None else info.train_loss
        if info.type == "manual" and y is not None:  # user-chosen names say something; others would clutter
            ax.annotate(info.name, (info.step, y), textcoords="offset points", xytext=(6, 6), fontsize=8,
                        color="0.3")
    if best is not None:
        _mark_best(ax, best, monitor)

    ax.set_xlabel("step")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_ylabel("loss")
    if log_scale:
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")  # 0.6, not 6 x 10^-1
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    ax.grid(True, alpha=0.3)
    heading = "loss history" if history else "loss per checkpoint"
    ax.set_title(f"{heading}: {title}" if title else heading, loc="left", fontsize=11)
    logged_steps = len({s for series in history.values() for s, _ in series})
    ax.set_title(f"{len(points)} checkpoints" + (f", {logged_steps} logged steps" if history else ""),
                 loc="right", fontsize=9, color="0.4")

    handles: list[Any] = [
        Line2D([], [], color=_TRAIN_COLOR, marker="o", markerfacecolor="white", label="train loss"),
        Line2D([], [], color=_EVAL_COLOR, marker="o", linestyle="--", label="eval loss"),
    ]
    present = {i.type for i in points}
    for kind in CHECKPOINT_TYPES:
        if kind in present:
            handles.append(Line2D([], [], color="0.35", marker=_MARKERS[kind], linestyle="none",
                                  markersize=11 if kind == "best" else 7, label=kind))
    if best is not None:
        handles.append(Line2D([], [], color=_BEST_COLOR, marker="o", markeredgecolor="none", linestyle=":",
                              markersize=14, alpha=0.6, label=f"best by {monitor}"))
    ax.legend(handles=handles, loc="best", fontsize=9, framealpha=0.9)
    return fig


def unsupported_suffix(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be an image file (its suffix), or None when it can.

    Raises:
        ImportError: matplotlib is not installed (the message says how to install it).
    """
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as exc:
        raise ImportError(MATPLOTLIB_MISSING) from exc
    formats = FigureCanvasBase.get_supported_filetypes()
    if Path(path).suffix.lstrip(".").lower() in formats:
        return None
    return f"the suffix must be one of .{', .'.join(sorted(formats))}"


def _series(ax: Axes, points: Sequence[CheckpointInfo], attr: str, color: str, *, hollow: bool,
            line: bool = True) -> None:
    """One loss at the checkpoints that have it (joined by a line unless a history is drawn), shaped by type."""
    have = [i for i in points if getattr(i, attr) is not None]
    if not have:
        return
    if line:
        ax.plot([i.step for i in have], [getattr(i, attr) for i in have], color=color,
                linestyle="-" if hollow else "--", linewidth=1.6, zorder=2)
    for kind in CHECKPOINT_TYPES:
        group = [i for i in have if i.type == kind]
        if group:
            ax.scatter([i.step for i in group], [getattr(i, attr) for i in group], marker=_MARKERS[kind],
                       s=_MARKER_SIZE[kind], facecolors="white" if hollow else color, edgecolors=color,
                       linewidths=1.4, zorder=3)


def _mark_best(ax: Axes, best: CheckpointInfo, monitor: str) -> None:
    """A gold halo behind the best checkpoint's point (its type marker stays visible), a dotted line, a label."""
    ax.axvline(best.step, color=_BEST_COLOR, linestyle=":", linewidth=1.5, zorder=1)
    value = best.metric(monitor)
    label = f"best: {best.name}" + (f"\n{monitor} {value:.4g}" if value is not None else "")
    y = best.train_loss if monitor in ("trainLoss", "train_loss", "loss") else best.eval_loss
    y = y if y is not None else (best.eval_loss if best.eval_loss is not None else best.train_loss)
    if y is not None:
        ax.scatter([best.step], [y], marker="o", s=420, facecolors=_BEST_COLOR, alpha=0.45, edgecolors="none",
                   zorder=2.5)
    # Put the label on the side of the line with more room, so it stays inside the axes.
    left, right = ax.get_xlim()
    on_left = best.step > (left + right) / 2
    ax.annotate(label, (best.step, 1.0), xycoords=("data", "axes fraction"), textcoords="offset points",
                xytext=(-8 if on_left else 8, -10), ha="right" if on_left else "left", va="top", fontsize=9,
                bbox={"boxstyle": "round,pad=0.3", "facecolor": "white", "edgecolor": _BEST_COLOR})
