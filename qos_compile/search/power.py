"""Power and parameter-overhead model of operating points (method step 6).

Only multiplication power is modelled, as in the paper: an OP's relative power is the
MAC-weighted mean of its circuits' published power over the exact circuit's,
``Σ_l (ops_l / Σ ops) · P(m_l) / P(exact)``; savings = 1 − that.

Parameter overhead (the paper's "2.75% parameters" for 3 OPs): every OP beyond the
first stores its own copy of the per-OP parameters, i.e. BatchNorm affine (γ, β) and
the per-OP biases; running statistics are buffers and not counted. Definition:

    overhead % = 100 · (num_ops − 1) · (bn_affine_params + bias_params) / total_params

``bias_params`` is the number of bias elements that are actually kept per OP. The
paper's figure for MobileNetV2/TinyImageNet (2,480,072 params, 34,112 BN affine)
is reproduced exactly with ``bias_params = 0``: 2·34,112 / 2,480,072 = 2.7509 %.
Counting the classifier's 200-element bias as per-OP too would give 68,624 → 2.7670 %,
which would round to 2.77 %, so the paper's figure counts BatchNorm affine only. Callers
pass the biases their fine-tuning really duplicates, and the report states both numbers
where they differ.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ..errors import QosError
from ..multipliers import Multiplier

__all__ = ["circuit_powers", "relative_power", "op_power_table", "param_overhead"]


def circuit_powers(mults: Sequence[Multiplier]) -> tuple[np.ndarray, list[str]]:
    """Published powers (mW; NaN where unknown) and names of ``mults``, for the functions here.

    Unknown powers become an error only when a circuit without one is actually used.
    """
    pw = np.array([math.nan if m.power_mw is None else float(m.power_mw) for m in mults], dtype=np.float64)
    return pw, [m.name for m in mults]


def _power_vector(power: Any) -> np.ndarray:
    vals = [math.nan if p is None else p for p in (power.tolist() if isinstance(power, np.ndarray) else power)]
    pw = np.asarray(vals, dtype=np.float64)
    if pw.ndim != 1 or pw.size == 0:
        raise QosError(f"power must be a non-empty vector, one value per circuit, got shape {pw.shape}")
    return pw


def _name(m: int, names: Sequence[str] | None) -> str:
    return names[m] if names is not None and 0 <= m < len(names) else f"#{m}"


def _checked_assign(assign: Any, n_layers: int, pw: np.ndarray, names: Sequence[str] | None) -> np.ndarray:
    a = np.asarray(assign)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise QosError(f"assignments must be circuit indices, got dtype {a.dtype}")
    a = a.astype(np.int64)
    if a.shape[-1:] != (n_layers,):
        raise QosError(f"assignment has {a.shape[-1] if a.ndim else 0} layers but macs has {n_layers}")
    if a.size and (a.min() < 0 or a.max() >= pw.size):
        raise QosError(f"assignment uses circuit index outside 0..{pw.size - 1}")
    for m in np.unique(a):
        p = pw[m]
        if not math.isfinite(p):
            raise QosError(f"circuit {_name(int(m), names)} has no published power; the power model needs it")
        if p < 0:
            raise QosError(f"circuit {_name(int(m), names)} has a negative power {p}")
    return a


def _mac_shares(macs: Any) -> np.ndarray:
    w = np.asarray(macs, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise QosError("macs must be a non-empty vector of non-negative MAC counts with a positive sum")
    return w / w.sum()


def _exact(exact_power: "float | Multiplier | None") -> float:
    name = "exact"
    if isinstance(exact_power, Multiplier):
        name, exact_power = exact_power.name, exact_power.power_mw
    if exact_power is None:
        raise QosError(f"circuit {name} has no published power; the power model needs it")
    p = float(exact_power)
    if not (math.isfinite(p) and p > 0):
        raise QosError(f"the exact circuit's power must be positive, got {exact_power!r}")
    return p


def relative_power(
    assign_op: Any,
    macs: Any,
    power: Any,
    exact_power: float | Multiplier | None,
    names: Sequence[str] | None = None,
) -> float:
    """Relative multiplication power of one OP: ``Σ_l (ops_l/Σ ops)·P(m_l)/P(exact)``.

    ``assign_op`` (L,): circuit index per layer; ``macs`` (L,): MACs per layer and sample;
    ``power`` (M,): power per circuit (None/NaN = unknown: an error if used);
    ``exact_power``: P(exact) in the same unit (or the exact Multiplier itself);
    ``names``: circuit names for messages.
    """
    share = _mac_shares(macs)
    pw = _power_vector(power)
    a = _checked_assign(assign_op, share.size, pw, names)
    if a.ndim != 1:
        raise QosError(f"assign_op must be one OP's (layers,) vector, got shape {a.shape}")
    return float((share * pw[a]).sum() / _exact(exact_power))


def op_power_table(
    assign: Any,
    macs: Any,
    power: Any,
    exact_power: float | Multiplier | None,
    names: Sequence[str] | None = None,
    scales: Sequence[float] | None = None,
    layer_names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Per-OP power summary (JSON-ready), one dict per row of ``assign`` (S, L).

    Each dict: ``op``, ``scale`` (when given), ``relative_power``, ``savings_pct``
    (= 100·(1 − relative)), ``circuits`` (distinct circuits used, names when given) and
    ``layers``: per layer ``layer``, ``circuit``, ``mac_share``, ``relative_power``
    (P(m)/P(exact)) and ``contribution`` (mac_share · relative_power; they sum to the
    OP's relative power).
    """
    share = _mac_shares(macs)
    pw = _power_vector(power)
    a = _checked_assign(assign, share.size, pw, names)
    if a.ndim != 2:
        raise QosError(f"assign must be an (OPs, layers) matrix, got shape {a.shape}")
    if scales is not None and len(scales) != a.shape[0]:
        raise QosError(f"{len(scales)} scales for {a.shape[0]} OPs")
    p_exact = _exact(exact_power)
    table: list[dict[str, Any]] = []
    for j, row in enumerate(a):
        rel_l = pw[row] / p_exact
        contrib = share * rel_l
        rel = float(contrib.sum())
        entry: dict[str, Any] = {"op": j}
        if scales is not None:
            entry["scale"] = float(scales[j])
        entry.update(
            relative_power=rel,
            savings_pct=100.0 * (1.0 - rel),
            circuits=[_name(int(m), names) if names is not None else int(m) for m in np.unique(row)],
            layers=[
                {
                    "layer": layer_names[l] if layer_names is not None else l,
                    "circuit": _name(int(row[l]), names) if names is not None else int(row[l]),
                    "mac_share": float(share[l]),
                    "relative_power": float(rel_l[l]),
                    "contribution": float(contrib[l]),
                }
                for l in range(row.size)
            ],
        )
        table.append(entry)
    return table


def param_overhead(total_params: int, bn_affine_params: int, bias_params: int, num_ops: int) -> float:
    """Extra parameters of ``num_ops`` OPs over one model, in % of ``total_params``.

    ``100·(num_ops − 1)·(bn_affine_params + bias_params)/total_params`` (see module doc:
    the paper's 2.75 % for MobileNetV2 with 3 OPs is ``bias_params = 0``).
    """
    vals = {"total_params": total_params, "bn_affine_params": bn_affine_params,
            "bias_params": bias_params, "num_ops": num_ops}
    for key, v in vals.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise QosError(f"{key} must be a non-negative integer, got {v!r}")
    if total_params <= 0 or num_ops < 1:
        raise QosError("total_params must be positive and num_ops at least 1")
    return 100.0 * (num_ops - 1) * (bn_affine_params + bias_params) / total_params
