"""The search stage (method steps 4-6) on a tolerance-trained QoSNet.

1. trace every approximate layer's integer operands on 128 training samples (``trace``);
2. ``s_l`` (reference spread) and ``T_l = |σ_l|·s_l`` from the AGN σ's;
3. ``σ_{l,m}`` = predicted error std of every candidate circuit in every layer;
4. operating points: ratios against the scaled tolerances, one k-means over all OPs,
   at most ``n`` circuits (the exact one always a candidate), OPs ordered by power,
   misfits reported;
5. power table per OP and per layer;
6. Monte-Carlo check: every candidate on a few layers, and every chosen circuit on
   every layer it is assigned to, by running the layer's bit-exact emulation on
   traced inputs; ``agreement`` of predicted and measured error stds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import QosError
from ..multipliers import Multiplier, bundled
from ..nn import QoSNet
from .error_model import agreement, predict_error_std_many
from .operating_points import DEFAULT_SCALES, OperatingPointResult, layer_tolerance, select_operating_points
from .power import circuit_powers, op_power_table
from .trace import LayerTrace, measure_layer_error, trace_layers

__all__ = ["SearchConfig", "SearchResult", "with_exact", "run_search", "check_scales"]


def check_scales(scales: Any) -> tuple[float, ...]:
    """Scales as a tuple of positive finite floats (QosError otherwise)."""
    try:
        vals = tuple(float(s) for s in scales)
    except (TypeError, ValueError):
        raise QosError(f"scales must be numbers, got {scales!r}") from None
    if not vals or not all(math.isfinite(v) and v > 0 for v in vals):
        raise QosError(f"scales must be one or more positive numbers, got {list(scales)!r}")
    return vals


@dataclass(frozen=True)
class SearchConfig:
    """``scales``: one OP per scale (0.3 most accurate, 2.0 cheapest); ``n``: circuits for all
    OPs together; ``trace_samples``: training samples traced; ``pred_rows``: receptive-field
    rows per layer for the prediction; ``max_rows``: rows kept per layer and group;
    ``measure_layers``: layers (evenly spread) on which *every* candidate is measured
    (0: none, -1: all); ``measure_samples``: samples the Monte-Carlo check runs on."""

    scales: tuple[float, ...] = DEFAULT_SCALES
    n: int = 4
    seed: int = 0
    trace_samples: int = 128
    pred_rows: int = 512
    max_rows: int = 4096
    measure_layers: int = 3
    measure_samples: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", check_scales(self.scales))
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise QosError(f"n (circuits for all OPs) must be a positive integer, got {self.n!r}")
        for key in ("trace_samples", "pred_rows", "max_rows", "measure_samples"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise QosError(f"{key} must be a positive integer, got {v!r}")


@dataclass
class SearchResult:
    """Everything the search found; ``assign_names[op][layer]`` is the final assignment,
    ``bank`` the circuits it uses (bank order: descending power, exact first when used)."""

    layer_names: list[str]
    macs: list[int]
    agn_sigma: list[float]
    spread: list[float]
    tolerance: list[float]
    candidates: list[Multiplier]
    exact_index: int
    sigma_pred: np.ndarray                      # (L, M) over candidates
    ops: OperatingPointResult
    bank: list[Multiplier]
    assign_names: list[list[str]]
    power_table: list[dict[str, Any]]
    measured: list[dict[str, Any]] = field(default_factory=list)
    agreement: dict[str, Any] | None = None
    traces: list[LayerTrace] = field(default_factory=list, repr=False)

    @property
    def scales(self) -> list[float]:
        """Scale of each OP, in the final (power) order."""
        return [float(s) for s in self.ops.scales]

    @property
    def assign_bank(self) -> list[list[int]]:
        """``assign[op][layer]`` as indices into ``bank``."""
        names = [m.name for m in self.bank]
        return [[names.index(n) for n in row] for row in self.assign_names]

    def misfits(self) -> list[dict[str, Any]]:
        """Rows whose circuit does not fit their scaled tolerance (r > 1), with names."""
        return [{"op": j, "layer": self.layer_names[l], "ratio": r} for j, l, r in self.ops.misfits]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready report (what model.pt stores as ``search``)."""
        names = [m.name for m in self.candidates]

        def finite(v: float) -> float | None:
            return float(v) if math.isfinite(v) else None

        return {
            "layers": [
                {"layer": n, "macs": m, "agn_sigma": s, "spread": sp, "tolerance": t,
                 "sigma_pred": {c: finite(v) for c, v in zip(names, row)}}
                for n, m, s, sp, t, row in zip(self.layer_names, self.macs, self.agn_sigma, self.spread,
                                                self.tolerance, self.sigma_pred)
            ],
            "candidates": names,
            "exact": names[self.exact_index],
            "scales": self.scales,
            "op_order": [int(i) for i in self.ops.op_order],
            "reordered_by_power": self.ops.reordered,
            "bank": [m.name for m in self.bank],
            "assign": self.assign_names,
            "kmeans_candidates": [names[i] for i in self.ops.candidates],
            "cluster_circuits": [names[i] for i in self.ops.cluster_circuits],
            "misfits": self.misfits(),
            "power": self.power_table,
            "measured": self.measured,
            "agreement": self.agreement,
        }


def with_exact(candidates: Sequence[Multiplier]) -> tuple[list[Multiplier], int]:
    """The candidates with the exact circuit of their signedness added when missing, and its index."""
    cands = list(candidates)
    if not cands:
        raise QosError("no candidate multipliers given")
    kinds = {m.signed for m in cands}
    if len(kinds) != 1:
        raise QosError("candidate multipliers mix signed and unsigned circuits")
    for i, m in enumerate(cands):
        if m.is_exact:
            return cands, i
    cands.append(bundled().exact(cands[0].signed))
    return cands, len(cands) - 1


def _measure_layers(n_layers: int, count: int) -> list[int]:
    if count < 0 or count >= n_layers:
        return list(range(n_layers))
    if count == 0:
        return []
    return sorted({int(round(v)) for v in np.linspace(0, n_layers - 1, count)})


def run_search(qnet: QoSNet, samples: torch.Tensor, candidates: Sequence[Multiplier],
               cfg: SearchConfig = SearchConfig(), progress: bool = True,
               log: Callable[[str], None] | None = None) -> SearchResult:
    """Search operating points for the tolerance-trained ``qnet`` (its σ's are the AGN result).

    ``samples``: the training inputs to trace (e.g. ``trace_samples(splits.train, 128)``);
    ``candidates``: circuits of the model's signedness (the exact one is added when missing).
    """
    from tqdm import tqdm

    say = log or (lambda s: None)
    cands, exact_index = with_exact(candidates)
    if cands[0].signed != qnet.qconfig.signed:
        raise QosError("the candidate circuits' signedness differs from the model's quantization "
                       f"({'signed' if qnet.qconfig.signed else 'unsigned'})")
    traces = trace_layers(qnet, samples[:cfg.trace_samples], max_rows=cfg.max_rows,
                          measure_samples=cfg.measure_samples, seed=cfg.seed)
    names = [t.name for t in traces]
    macs = [t.macs for t in traces]
    sig_agn = [float(s.detach()) for s in qnet.sigmas()]
    spread = np.array([t.spread for t in traces])
    tol = layer_tolerance(sig_agn, spread)
    sigma_pred = np.zeros((len(traces), len(cands)))
    for l, t in enumerate(tqdm(traces, desc="predict", leave=False, disable=not progress, dynamic_ncols=True)):
        sigma_pred[l] = predict_error_std_many(t.all_rows(), t.all_weights(), cands, n_rows=cfg.pred_rows,
                                               rng=cfg.seed + l)
    power, cnames = circuit_powers(cands)
    ops = select_operating_points(sigma_pred, tol, cfg.scales, power, cfg.n, exact_index=exact_index,
                                  seed=cfg.seed, macs=macs, names=cnames)
    used = sorted({int(m) for m in ops.circuits}, key=lambda m: (m != exact_index, -power[m], m))
    bank = [cands[m] for m in used]
    assign_names = [[cands[int(m)].name for m in row] for row in ops.assign]
    table = op_power_table(ops.assign, macs, power, cands[exact_index], cnames, list(ops.scales), names)

    # Monte-Carlo check
    pairs: list[tuple[int, int]] = []
    for l in _measure_layers(len(traces), cfg.measure_layers):
        pairs += [(l, m) for m in range(len(cands))]
    for l in range(len(traces)):
        for m in sorted({int(v) for v in ops.assign[:, l]}):
            if (l, m) not in pairs:
                pairs.append((l, m))
    measured = []
    for l, m in tqdm(pairs, desc="measure", leave=False, disable=not progress, dynamic_ncols=True):
        meas = measure_layer_error(traces[l], cands[m], cands[exact_index])
        measured.append({"layer": names[l], "circuit": cands[m].name, "predicted": float(sigma_pred[l, m]),
                         "measured": meas})
    agree = agreement([p["predicted"] for p in measured], [p["measured"] for p in measured]) if measured else None
    result = SearchResult(layer_names=names, macs=macs, agn_sigma=sig_agn, spread=[float(v) for v in spread],
                          tolerance=[float(v) for v in tol], candidates=cands, exact_index=exact_index,
                          sigma_pred=sigma_pred, ops=ops, bank=bank, assign_names=assign_names, power_table=table,
                          measured=measured, agreement=agree, traces=traces)
    say(f"  candidates {len(cands)} ({len(ops.candidates)} fit some (OP, layer)), chosen {len(bank)}: "
        + ", ".join(m.name for m in bank))
    for row in table:
        say(f"  OP{row['op']} scale {row['scale']:g}: relative power {row['relative_power']:.3f} "
            f"(savings {row['savings_pct']:.1f}%), circuits {', '.join(row['circuits'])}")
    if ops.misfits:
        say(f"  {len(ops.misfits)} (OP, layer) row(s) got a circuit above their tolerance (misfits): "
            + ", ".join(f"OP{j}/{names[l]} r={r:.2f}" for j, l, r in ops.misfits[:6])
            + (" ..." if len(ops.misfits) > 6 else ""))
    if agree:
        def fmt(v: Any) -> str:
            return "n/a" if v is None else f"{v:.3f}"
        say(f"  prediction vs Monte-Carlo ({agree['n']} layer/circuit pairs): spearman(log) "
            f"{fmt(agree['spearman_log'])}, median ratio {fmt(agree['median_ratio'])}, "
            f"within 2x {fmt(agree['within_2x'])}")
    return result
