"""Shared timing helpers: median and spread over repeats, interleaved measurement, Markdown tables.

``measure`` runs the candidates round-robin (one repeat of every candidate, then the next
round, with the order rotated each round), so every row sees the same machine load, and
reports the median and the inter-quartile range of the per-call times in ms.

Times taken under an emulator (qemu) are *emulation* times: ``Timing.emulated`` marks them
and ``format_table`` labels them, so that nobody reads them as device latencies
(docs/design.md, section 7: compare ratios within one run only).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ..errors import QosError


@dataclass(frozen=True)
class Timing:
    """Per-call time in ms: median and quartiles over ``n`` samples (one sample = mean of ``number`` calls)."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    n: int
    min_ms: float = float("nan")
    max_ms: float = float("nan")
    emulated: bool = False

    @classmethod
    def from_samples(cls, samples_ms: Iterable[float], emulated: bool = False) -> "Timing":
        a = np.asarray(list(samples_ms), dtype=np.float64)
        if a.size == 0:
            raise QosError("no timing samples")
        p25, med, p75 = np.percentile(a, [25, 50, 75])
        return cls(float(med), float(p25), float(p75), int(a.size), float(a.min()), float(a.max()), emulated)

    @property
    def iqr_ms(self) -> float:
        return self.p75_ms - self.p25_ms

    def scaled(self, factor: float) -> "Timing":
        """The same timing with every figure multiplied by ``factor``."""
        return Timing(self.median_ms * factor, self.p25_ms * factor, self.p75_ms * factor, self.n,
                      self.min_ms * factor, self.max_ms * factor, self.emulated)

    def __str__(self) -> str:
        tag = " (emulated)" if self.emulated else ""
        return f"{self.median_ms:.3f} ms [{self.p25_ms:.3f}-{self.p75_ms:.3f}] n={self.n}{tag}"


def measure(fns: Mapping[str, Callable[[], Any]], repeats: int = 20, warmup: int = 2, number: int = 1,
            emulated: bool = False) -> dict[str, Timing]:
    """Time every callable in ``fns`` interleaved round-robin; returns ``{name: Timing}`` (ms per call).

    Each callable is first called ``warmup`` times; then, ``repeats`` rounds, each taking one
    sample of every callable (``number`` back-to-back calls, averaged). The order of the
    callables is rotated each round so none always runs right after the same neighbour.
    """
    if not fns:
        raise QosError("nothing to measure")
    if repeats < 1 or number < 1 or warmup < 0:
        raise QosError("repeats and number must be >= 1 and warmup >= 0")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    samples: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn = fns[name]
            t0 = time.perf_counter_ns()
            for _ in range(number):
                fn()
            samples[name].append((time.perf_counter_ns() - t0) / 1e6 / number)
    return {k: Timing.from_samples(v, emulated) for k, v in samples.items()}


def _cell(v: Any) -> str:
    if isinstance(v, Timing):
        s = f"{v.median_ms:.3f} ({v.p25_ms:.3f}-{v.p75_ms:.3f})"
        return s + " emulated" if v.emulated else s
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def format_table(rows: Sequence[Mapping[str, Any]] | Mapping[str, Timing], columns: Sequence[str] | None = None,
                 emulated: bool = False) -> str:
    """A Markdown table.

    ``rows``: a list of dicts (column -> value; Timing values print as ``median (p25-p75)`` ms),
    or ``{label: Timing}`` which becomes columns ``name`` and ``time (ms)``. ``emulated=True``
    (or any emulated Timing) labels the times as emulation times, not device latencies.
    """
    if isinstance(rows, Mapping):
        rows = [{"name": k, "time (ms)": v} for k, v in rows.items()]
    rows = list(rows)
    if columns is None:
        columns = []
        for r in rows:
            columns += [c for c in r if c not in columns]
    any_emulated = emulated or any(isinstance(v, Timing) and v.emulated for r in rows for v in r.values())
    header = [f"{c} EMULATED" if any_emulated and any(isinstance(r.get(c), Timing) for r in rows) else c
              for c in columns]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |")
    if any_emulated:
        lines.append("")
        lines.append("Times marked EMULATED ran under an emulator (qemu): compare ratios within this "
                     "table only; they are not device latencies.")
    return "\n".join(lines)
