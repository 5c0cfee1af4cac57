"""Accuracy against relative multiplication power, one point per operating point (PNG)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from .atomic import atomic_path
from .errors import QosError

__all__ = ["plot_operating_points"]


def _label_offsets(xs: Sequence[float], ys: Sequence[float | None], span: float, top: float,
                   near: float = 14.0) -> dict[int, int]:
    """Vertical offsets (points) of the OP labels: of OPs closer than ``near`` in power, the
    highest (then the rightmost) is labelled above and the others below, each label one row
    further out than a close neighbour's on its side; none above where the axis' ``top`` is
    within a tenth of its ``span`` (the title is there)."""
    order = sorted((i for i, y in enumerate(ys) if y is not None), key=lambda i: xs[i])
    out: dict[int, int] = {}
    for rank, i in enumerate(order):
        close = [j for j in order if j != i and abs(xs[j] - xs[i]) < near]
        up = (ys[i], xs[i]) >= max((ys[j], xs[j]) for j in close) if close else rank % 2 == 0
        up = up and ys[i] + 0.1 * span < top
        taken = {out[j] for j in close if j in out}
        dy = 14 if up else -16
        while dy in taken:
            dy += 14 if up else -14
        out[i] = dy
    return out


def plot_operating_points(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str],
                          baseline: dict[str, Any] | None = None, title: str = "Operating points",
                          series: Sequence[tuple[str, Sequence[float | None]]] = (),
                          metric: str = "top1", label: str = "operating points (this model)") -> Path:
    """Write a PNG: ``metric`` (``top1``/``top5``, %) of every OP row (keys ``op``,
    ``relative_power``, ``savings_pct``, ``scale``, ``circuits``) against its relative power,
    the exact baseline (``baseline['top1']`` at relative power 1) as a star, and optional
    extra ``series`` (label, one accuracy per row; e.g. before fine-tuning); ``label``: legend of
    the rows' own accuracies. Atomic write."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    if not rows:
        raise QosError("nothing to plot: no operating points")
    target = Path(path)
    if not target.resolve().parent.is_dir():
        raise QosError(f"cannot write {target}: folder {target.resolve().parent} does not exist")
    xs = [100.0 * r["relative_power"] for r in rows]
    ys = [r.get(metric) for r in rows]
    fig, ax = plt.subplots(figsize=(7.0, 4.6), dpi=120)
    try:
        markers = ["s", "^", "v", "D", "x"]
        for k, (series_label, vals) in enumerate(series):
            pts = [(x, v) for x, v in zip(xs, vals) if v is not None]
            if pts:
                # hollow and larger than the main markers, so coinciding points stay visible
                ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=":", marker=markers[k % len(markers)],
                        markersize=11, markerfacecolor="none", markeredgewidth=1.5, color=f"C{k + 2}",
                        label=series_label, zorder=2)
        ax.plot(xs, ys, "-o", color="C0", markersize=6, label=label, zorder=3)
        if baseline and baseline.get(metric) is not None:
            ax.plot([100.0], [baseline[metric]], marker="*", markersize=15, color="C3", linestyle="none",
                    label="exact multiplier (QAT baseline)", zorder=4)
            ax.annotate("exact", (100.0, baseline[metric]), textcoords="offset points", xytext=(0, -14),
                        fontsize=8, color="C3", ha="center", va="top")
        vals = [v for v in ys if v is not None] + [v for _, s in series for v in s if v is not None]
        if baseline and baseline.get(metric) is not None:
            vals.append(baseline[metric])
        bottom, top = 0.0, 100.5
        if vals:
            lo, hi = min(vals), max(vals)
            pad = max(1.5, 0.15 * (hi - lo))
            bottom, top = max(lo - pad, 0.0), min(hi + pad, 100.5)   # an accuracy axis ends just above 100 %
            ax.set_ylim(bottom, top)
        for i, dy in _label_offsets(xs, ys, top - bottom, top).items():
            r, x, y, up = rows[i], xs[i], ys[i], dy > 0
            scale = r.get("scale")
            name = f"OP{r['op']}" + (f" (s={scale:g})" if scale is not None else "")
            ax.annotate(f"{name}: {r['savings_pct']:.1f}% saved", (x, y), textcoords="offset points",
                        xytext=(0, dy), ha="center", va="bottom" if up else "top", fontsize=8,
                        color="C0", bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8},
                        zorder=5)
        ax.set_xlim(min(xs + [100.0]) - 12, 106)
        ax.set_xlabel("relative multiplication power (% of the exact 8x8 multiplier)")
        ax.set_ylabel(f"{'top-1' if metric == 'top1' else 'top-5'} accuracy (%)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        with atomic_path(target, mode=0o644) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return target
