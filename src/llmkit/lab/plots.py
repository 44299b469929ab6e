"""Small matplotlib helpers for the lab: object-oriented Figure + Agg canvas, no pyplot global state."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path


def _figure(width: float = 6.0, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out_dir: Path, name: str) -> str:
    fig.tight_layout()
    path = Path(out_dir) / f"{name}.png"
    fig.savefig(path)
    return path.name


def subplots(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (6.0, 3.6)):
    """(figure, axes) like pyplot.subplots, on an Agg canvas outside pyplot's global state."""
    fig = _figure(*figsize)
    return fig, fig.subplots(nrows, ncols)


def save_png(fig, out_dir: Path, filename: str) -> str:
    """Lay out and write `fig` as out_dir/filename; returns the file name (a Result plot path)."""
    fig.tight_layout()
    fig.savefig(Path(out_dir) / filename)
    return filename


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = list(values)
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def bars(out_dir: Path, name: str, labels: Sequence[str], values: Sequence[Sequence[float]], ylabel: str,
         title: str, reference: float | tuple[float, float] | None = None, ref_label: str = "guide",
         logy: bool = False) -> str:
    """Bar chart of mean ± std per label (values: one list per label); `reference` draws a line (or band)."""
    fig = _figure(width=max(6.0, 1.1 * len(labels)))
    ax = fig.add_subplot(1, 1, 1)
    stats = [_mean_std(v) for v in values]
    ax.bar(range(len(labels)), [m for m, _ in stats], yerr=[s for _, s in stats], capsize=3, color="#4c72b0")
    ax.set_xticks(range(len(labels)), labels, rotation=20 if max(map(len, labels)) > 8 else 0, fontsize=8)
    _reference(ax, reference, ref_label)
    if logy:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return _save(fig, out_dir, name)


def lines(out_dir: Path, name: str, x: Sequence[float], series: dict[str, Sequence[Sequence[float]]],
          xlabel: str, ylabel: str, title: str, reference: float | tuple[float, float] | None = None,
          ref_label: str = "guide", logx: bool = False) -> str:
    """One line (mean, with a ±std band) per series; each series holds one list of values per x."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for label, ys in series.items():
        stats = [_mean_std(v) for v in ys]
        mean = [m for m, _ in stats]
        std = [s for _, s in stats]
        ax.plot(x, mean, marker="o", label=label)
        ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    _reference(ax, reference, ref_label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, out_dir, name)


def _reference(ax, reference, label: str) -> None:
    if reference is None:
        return
    if isinstance(reference, tuple):
        ax.axhspan(reference[0], reference[1], color="#dd8452", alpha=0.2, label=label)
    else:
        ax.axhline(reference, color="#dd8452", linestyle="--", label=label)
    ax.legend(fontsize=8)
