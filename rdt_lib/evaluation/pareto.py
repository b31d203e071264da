"""The reward-diversity Pareto front: which schedules no other schedule beats on every axis, and its plot.

- :func:`pareto_front`: the non-dominated mask of a table of points (every coordinate maximised).
- :func:`pareto_figure`: one panel per reward, x = diversity, y = mean reward, the front drawn and highlighted.
- :func:`save_figure`: the figure as a PNG, written atomically.

The figure is built on :class:`matplotlib.figure.Figure` with the Agg canvas, without ``pyplot``: no global
figure registry, no GUI backend, safe in headless runs and in threads.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..atomic_io import write_bytes_atomic
from ..errors import InputError

__all__ = ["pareto_front", "pareto_figure", "save_figure"]

#: colours of the plot (the front in a warm colour over the grey points)
_POINT_COLOUR = "#8a8a8a"
_FRONT_COLOUR = "#d1495b"


def pareto_front(points: Sequence[Sequence[float]]) -> list[bool]:
    """The mask of non-dominated points, every coordinate maximised.

    A point is dominated when another point is ``>=`` in every coordinate and ``>`` in at least one. Equal
    points do not dominate each other, so both are kept (or both dropped, when a third point dominates them).

    Args:
        points: ``P`` points, each a sequence of ``K >= 1`` finite numbers (all the same ``K``).

    Returns:
        ``P`` booleans, ``True`` for a point on the front; ``[]`` for no points.
    """
    rows = [tuple(float(v) for v in p) for p in points]
    if not rows:
        return []
    k = len(rows[0])
    for i, r in enumerate(rows):
        if len(r) != k or k == 0:
            raise InputError(f"point {i} has {len(r)} coordinates but point 0 has {k}; give every point the same "
                             "number (>= 1) of coordinates")
        if not all(math.isfinite(v) for v in r):
            raise InputError(f"point {i} has a non-finite coordinate {r}; the Pareto front needs finite values")

    def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [not any(dominates(o, r) for j, o in enumerate(rows) if j != i) for i, r in enumerate(rows)]


def _value(row: Mapping[str, Any], key: str, index: int) -> float:
    if key not in row:
        raise InputError(f"row {index} has no key {key!r}; it has {sorted(row)}")
    try:
        return float(row[key])
    except (TypeError, ValueError):
        raise InputError(f"row {index} key {key!r} is {row[key]!r}, not a number") from None


def pareto_figure(
    rows: Sequence[Mapping[str, Any]],
    *,
    rewards: Sequence[str],
    diversity: str,
    label: str = "name",
    title: str | None = None,
) -> Figure:
    """The reward-diversity trade-off: one panel per reward key, one labelled point per row, the front drawn.

    In each panel x is ``row[diversity]`` and y is ``row[reward]`` (a mean reward); error bars show
    ``row[reward + "_std"]`` where the rows have it. The Pareto front of (diversity, reward), both maximised
    (:func:`pareto_front`), is drawn as a step line through its points, which are highlighted. Rows with a
    non-finite diversity or reward are left out of that panel.

    Args:
        rows: one mapping per schedule (e.g. the sweep's result rows).
        rewards: the reward keys, one panel each (at least one).
        diversity: the key of the diversity value (x axis).
        label: the key whose value labels each point.
        title: the figure's title (none when ``None``).

    Returns:
        A :class:`matplotlib.figure.Figure` (Agg canvas). Each panel holds two scatter collections, in this
        order: all points, then the front's points; one text annotation per plotted point; and the front's
        line (a ``Line2D`` labelled ``"Pareto front"``).
    """
    rows = list(rows)
    rewards = list(rewards)
    if not rows:
        raise InputError("pareto_figure needs at least one row")
    if not rewards:
        raise InputError("pareto_figure needs at least one reward key")
    n = len(rewards)
    fig = Figure(figsize=(5.0 * n, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, reward in zip(axes, rewards):
        xs, ys, errs, names = [], [], [], []
        for i, row in enumerate(rows):
            x, y = _value(row, diversity, i), _value(row, reward, i)
            if not (math.isfinite(x) and math.isfinite(y)):
                continue
            std_key = f"{reward}_std"
            err = _value(row, std_key, i) if std_key in row else float("nan")
            xs.append(x), ys.append(y), errs.append(err if math.isfinite(err) else 0.0)
            names.append(str(row.get(label, i)))
        front = pareto_front(list(zip(xs, ys)))
        if any(e > 0 for e in errs):
            ax.errorbar(xs, ys, yerr=errs, fmt="none", ecolor=_POINT_COLOUR, elinewidth=1, capsize=3, zorder=1)
        ax.scatter(xs, ys, color=_POINT_COLOUR, s=30, zorder=2, label="schedule")
        fx = [x for x, f in zip(xs, front) if f]
        fy = [y for y, f in zip(ys, front) if f]
        ax.scatter(fx, fy, color=_FRONT_COLOUR, s=60, zorder=3, edgecolors="black", linewidths=0.6,
                   label="on the front")
        order = sorted(range(len(fx)), key=lambda j: (fx[j], -fy[j]))
        # both axes are maximised, so along increasing diversity the front's reward falls: a staircase
        ax.step([fx[j] for j in order], [fy[j] for j in order], where="post", color=_FRONT_COLOUR,
                linewidth=1.5, zorder=2, label="Pareto front")
        for x, y, name in zip(xs, ys, names):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(f"{diversity} (higher = more diverse)")
        ax.set_ylabel(f"{reward} (mean)")
        ax.set_title(reward)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    if title is not None:
        fig.suptitle(title)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Render ``fig`` as a PNG (100 dpi) and write it to ``path`` atomically (creating parent folders)."""
    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return write_bytes_atomic(path, buf.getvalue())
