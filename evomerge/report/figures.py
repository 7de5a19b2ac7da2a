"""The report's plots, drawn with matplotlib's object API (``Figure``, no pyplot), so building a
report never touches the global backend of the notebook or program that calls it.

Each function takes the tables of :mod:`evomerge.analysis` and returns PNG bytes.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100
FEW_POINTS = 20
"""Curves with at most this many values get a marker on each, so a single evaluation shows."""


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def _time_unit(span_seconds: float) -> tuple[float, str]:
    """Seconds per unit and the axis label for wall time, in the unit that suits the run's length."""
    unit, scale = ("seconds", 1.0) if span_seconds < 120 else ("minutes", 60.0) if span_seconds < 7200 else ("hours", 3600.0)
    return scale, f"wall time ({unit} since the run started)"


def progress(curves: pd.DataFrame) -> bytes:
    """Best (solid) and rolling median (dashed) fitness per population, against the population's
    evaluations and against wall time since the run started."""
    fig = Figure(figsize=(11, 4))
    by_count, by_time = fig.subplots(1, 2, sharey=True)
    scale, time_label = _time_unit(float(curves["elapsed"].max()))
    for i, (population, group) in enumerate(curves.groupby("population", sort=False)):
        color = f"C{i}"
        marker = "o" if group["best"].notna().sum() <= FEW_POINTS else None  # a line through one point draws nothing
        for ax, x in ((by_count, group["evaluation"]), (by_time, group["elapsed"] / scale)):
            ax.plot(x, group["best"], color=color, marker=marker, label=f"{population} best")
            ax.plot(x, group["median"], color=color, linestyle="--", alpha=0.7, label=f"{population} median")
    by_count.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    by_count.set_xlim(0.5, float(curves["evaluation"].max()) + 0.5)
    by_count.set_xlabel("evaluations of the population")
    by_count.set_ylabel("fitness")
    by_time.set_xlabel(time_label)
    by_count.legend(fontsize="small")
    for ax in (by_count, by_time):
        ax.grid(alpha=0.3)
    return _png(fig)


def archive(history: pd.DataFrame) -> bytes:
    """Training coverage and mean per-example entropy of each M2N2 / GA archive."""
    fig = Figure(figsize=(11, 3.5))
    coverage, entropy = fig.subplots(1, 2)
    for i, (population, group) in enumerate(history.groupby("population", sort=False)):
        coverage.plot(group["evaluation"], group["coverage"], color=f"C{i}", label=population)
        entropy.plot(group["evaluation"], group["entropy"], color=f"C{i}", label=population)
    coverage.set_ylabel("training coverage")
    entropy.set_ylabel("mean per-example entropy (nats)")
    for ax in (coverage, entropy):
        ax.set_xlabel("evaluations of the population")
        ax.grid(alpha=0.3)
    coverage.legend(fontsize="small")
    return _png(fig)


def recipe(tables: dict[str, pd.DataFrame], title: str) -> bytes:
    """One heat map per searched parameter: layer group (rows) × model (columns), values written in."""
    fig = Figure(figsize=(4.5 * len(tables), max(2.5, 0.35 * max(len(t) for t in tables.values()) + 1.5)))
    axes = np.atleast_1d(fig.subplots(1, len(tables), squeeze=False)[0])
    for ax, (param, table) in zip(axes, tables.items()):
        image = ax.imshow(table.to_numpy(dtype=float), aspect="auto", cmap="viridis")
        ax.set_xticks(range(table.shape[1]), [str(c) for c in table.columns], rotation=30, ha="right")
        ax.set_yticks(range(table.shape[0]), [str(i) for i in table.index])
        ax.set_title(f"{param}: {title}" if len(tables) == 1 else param)
        if table.size <= 400:
            for (r, c), value in np.ndenumerate(table.to_numpy(dtype=float)):
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", color="white", fontsize="small")
        fig.colorbar(image, ax=ax, shrink=0.8)
    if len(tables) > 1:
        fig.suptitle(title, y=1.02)
    return _png(fig)


def workers(busy: pd.DataFrame) -> bytes:
    """Busy workers over time (top) and each worker's busy share per time bin (bottom)."""
    fig = Figure(figsize=(11, 2.5 + 0.3 * busy.shape[1]))
    total, per_worker = fig.subplots(2, 1, sharex=True, height_ratios=[1, max(1, busy.shape[1] // 4 + 1)])
    scale, time_label = _time_unit(float(busy.index.max()))
    when = busy.index.to_numpy() / scale
    total.step(when, busy.sum(axis=1), where="post")
    total.set_ylabel("busy workers")
    total.set_ylim(0, busy.shape[1] + 0.2)
    total.grid(alpha=0.3)
    step = when[1] - when[0] if len(when) > 1 else 1.0
    per_worker.imshow(
        busy.to_numpy().T, aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest",
        extent=(when[0], when[-1] + step, busy.shape[1] - 0.5, -0.5),
    )
    per_worker.set_yticks(range(busy.shape[1]), list(busy.columns))
    per_worker.set_xlabel(time_label)
    return _png(fig)


def usage(evaluations: pd.DataFrame, column: str) -> bytes:
    """Cumulative API usage (cost when recorded, else tokens) per population over its evaluations."""
    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    for i, (population, group) in enumerate(evaluations.sort_values("seq").groupby("population", sort=False)):
        ax.plot(np.arange(1, len(group) + 1), group[column].fillna(0).cumsum(), color=f"C{i}", label=population)
    ax.set_xlabel("evaluations of the population")
    ax.set_ylabel(f"cumulative {column.split('.', 1)[-1].replace('_', ' ')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _png(fig)


def experts(comparison: pd.DataFrame) -> bytes:
    """The best merge's fitness beside each expert's."""
    fig = Figure(figsize=(7, 0.5 * len(comparison) + 1.2))
    ax = fig.subplots()
    colors = ["C2" if m.startswith("best merge") else "C7" for m in comparison["model"]]
    ax.barh(comparison["model"], comparison["fitness"].fillna(0), color=colors)
    ax.invert_yaxis()
    ax.set_xlabel("fitness on the fitness data")
    ax.grid(alpha=0.3, axis="x")
    return _png(fig)
