"""Figures of evaluation results (matplotlib, headless)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402

from bipe.io import atomic_write  # noqa: E402
from evaluation.stats import Spread  # noqa: E402

MARKERS = "os^Dv<>pP*hX"


def _save(fig: plt.Figure, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write the figure as PNG atomically (`bipe.io.atomic_write`) and close it; `metadata`
    becomes PNG text chunks (e.g. `{"Description": ...}`)."""
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, metadata=metadata))
    finally:
        plt.close(fig)


def as_spread(value: Spread | float) -> Spread:
    """A plain number is a Spread of one value (no interval)."""
    return value if isinstance(value, Spread) else Spread.of([value])


def _label_log_axis(ax: plt.Axes, values: list[float], ticks: int = 6) -> None:
    """Readable labels on a log y axis. Matplotlib labels only powers of ten, so a range inside
    one decade (perplexity 163 to 281) would show no number at all: there, label ~`ticks`
    geometrically spaced values, rounded to the precision their spacing needs."""
    finite = [v for v in values if v is not None and np.isfinite(v) and v > 0]
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    if not finite:
        return
    lo, hi = min(finite), max(finite)
    if math.floor(math.log10(lo)) != math.floor(math.log10(hi)) and hi / lo >= 10:
        return  # a power of ten lies inside: the default labels are enough
    raw = np.geomspace(lo, hi, ticks) if hi > lo else np.array([lo])
    spacing = (hi - lo) / (ticks - 1) if hi > lo else abs(lo)
    digits = -math.floor(math.log10(spacing))
    values = sorted({round(float(v), digits) for v in raw})
    ax.set_yticks(values)
    ax.set_yticklabels([f"{v:g}" for v in values])
    ax.set_ylim(lo / 1.05, hi * 1.05)


def plot_ppl_vs_length(curves: dict[str, list[tuple[int, Spread | float]]],
                       train_length: int | None, path: str | Path,
                       title: str = "Perplexity against length",
                       metadata: dict[str, str] | None = None) -> Path:
    """One line per model: `curves[label] = [(length, ppl or its Spread over seeds), ...]`;
    log-scale perplexity; a Spread over several seeds is drawn with its 95% interval as a band.

    Variants of one model (`rope`, `rope+lminf`, `rope+yarn4`) share its colour; a variant is
    dashed, so the effect of LM-Infinite or scaling reads as the gap between two lines.
    """
    bases = sorted({label.split("+")[0] for label in curves})
    many = len(bases) > 10  # past the default cycle: 20 colours and a marker per model
    fig, ax = plt.subplots(figsize=(8.4, 4.6) if many else (6.4, 4.2))
    palette = plt.get_cmap("tab20").colors if many else [f"C{i}" for i in range(10)]
    style = {b: (palette[i % len(palette)], MARKERS[i % len(MARKERS)] if many else "o")
             for i, b in enumerate(bases)}
    values: list[float] = []
    for label, points in sorted(curves.items()):
        spreads = [(x, as_spread(y)) for x, y in sorted(points, key=lambda p: p[0])]
        xs = [x for x, _ in spreads]
        ys = [s.mean for _, s in spreads]
        colour, marker = style[label.split("+")[0]]
        ax.plot(xs, ys, marker=marker, label=label, color=colour,
                linestyle="--" if "+" in label else "-")
        values += ys
        if any(s.n > 1 for _, s in spreads):
            low = [s.low if s.n > 1 else s.mean for _, s in spreads]
            high = [s.high if s.n > 1 else s.mean for _, s in spreads]
            ax.fill_between(xs, [max(v, 1e-9) for v in low], high, color=colour, alpha=0.15,
                            linewidth=0)
            values += [v for v in low + high if v > 0]
    if train_length:
        ax.axvline(train_length, color="grey", linestyle="--", linewidth=1, label="train length")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _label_log_axis(ax, values)
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if many:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path, metadata)
    return Path(path)


def log_bins(nll: np.ndarray, bins: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Mean NLL by position averaged in log-spaced bins: `(bin centres, means)`.

    Position p (0-based) has p tokens of context; bins of geometrically growing width keep the
    short-context start readable and average the thousands of positions of a long window into
    a trend (one point per bin; empty bins dropped)."""
    nll = np.asarray(nll, dtype=float)
    n = len(nll)
    edges = np.unique(np.geomspace(1, n + 1, bins + 1).astype(int)) - 1  # 0 .. n
    centres, means = [], []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        if b > a:
            centres.append(np.sqrt((a + 1) * b) - 1)  # geometric centre of positions a..b-1
            means.append(float(nll[a:b].mean()))
    return np.asarray(centres), np.asarray(means)


def plot_nll_by_position(curves: dict[str, np.ndarray], train_length: int | None,
                         path: str | Path, bins: int = 48) -> Path:
    """Mean NLL by position in the window (averaged over windows and seeds, then over
    log-spaced bins of positions), one line per model, log-scale positions."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, nll in sorted(curves.items()):
        xs, ys = log_bins(nll, bins)
        ax.plot(xs + 1, ys, label=label, linewidth=1.2, marker=".", markersize=3)
    if train_length:
        ax.axvline(train_length, color="grey", linestyle="--", linewidth=1, label="train length")
    ax.set_xscale("log")
    ax.set_xlabel("position in window (tokens, log-spaced bins)")
    ax.set_ylabel("mean NLL (nats)")
    ax.set_title("NLL by position")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return Path(path)


def plot_passkey_heatmap(rows: list[dict], path: str | Path, title: str) -> Path:
    """Accuracy by (depth, length) from `passkey_accuracy` rows."""
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for r in rows:
        grid[depths.index(r["depth"]), lengths.index(r["length"])] = r["accuracy"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(x) for x in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("key depth")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    _save(fig, path)
    return Path(path)


def plot_accuracy_vs_hidden(panels: dict[str, dict[str, list[tuple[int, Spread | float]]]],
                            path: str | Path, metric: str = "accuracy",
                            title: str = "Accuracy against hidden size",
                            metadata: dict[str, str] | None = None) -> Path:
    """One panel per evaluation setting, one line per encoding:
    `panels[setting][label] = [(hidden_size, accuracy in [0, 1] or its Spread over seeds)]`;
    a Spread over several seeds is drawn with its 95% interval as error bars."""
    n = max(len(panels), 1)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n + 0.6, 3.6), sharey=True, squeeze=False)
    for ax, (setting, curves) in zip(axes[0], panels.items(), strict=False):
        for i, (label, points) in enumerate(sorted(curves.items())):
            spreads = [(x, as_spread(y)) for x, y in sorted(points, key=lambda p: p[0])]
            xs = [x for x, _ in spreads]
            ys = [100 * s.mean for _, s in spreads]
            err = [100 * s.ci95 if s.n > 1 else 0.0 for _, s in spreads]
            ax.errorbar(xs, ys, yerr=err, marker="o", label=label, capsize=3,
                        color=f"C{i % 10}")
        ax.set_title(setting)
        ax.set_xlabel("hidden size")
        ax.set_ylim(-3, 103)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel(f"{metric} (%)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path, metadata)
    return Path(path)
