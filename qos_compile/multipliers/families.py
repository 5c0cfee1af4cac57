"""Built-in parametric families of approximate 8x8 multipliers, computed from their definitions.

Every family returns a :class:`Multiplier` with a full exhaustive table (port A =
weight code, port B = activation code, see ``multiplier.py``) and a *modelled*
power figure (``power_is_estimate=True``); none of these is a synthesised circuit.

Operands
    Unsigned circuits take codes 0..255. Signed circuits use **sign-magnitude**
    handling: the product is ``sign(a)*sign(b) * f(|a|, |b|)`` where ``f`` is the
    family's unsigned approximate product of the 8-bit magnitudes (``|-128| = 128``
    still fits in 8 bits). So every signed table is odd in each operand, and an
    approximation that underestimates magnitudes moves results towards zero.

Bits
    ``a_i`` is bit ``i`` of port A's magnitude, ``b_j`` bit ``j`` of port B's; the
    exact product is ``sum_{i,j} a_i b_j 2^(i+j)`` over the 64 partial-product (PP)
    bits, which an array multiplier sums with one AND gate and (about) one adder
    cell per PP bit.

Power model (relative, documented, crude)
    ``P = P_exact * fraction``, with ``P_exact`` the bundled exact EvoApprox 8x8
    circuit's published 45 nm power (0.391 mW unsigned ``mul8u_1JFF``, 0.425 mW
    signed ``mul8s_1KV8``).

    * truncated / broken array: ``fraction`` = PP bits kept / 64 (each dropped PP
      bit removes its AND gate and its carry-save cell).
    * DRUM-k: ``fraction = k^2/64 + 0.20`` for ``k < 8``: a k x k exact core plus a
      flat 20 % for the two leading-one detectors, operand multiplexers and the
      output barrel shifter; ``k >= 8`` is the exact circuit (fraction 1).
    * Mitchell: ``fraction = 0.30``: two leading-one detectors, two shifters, one
      adder and the antilog shifter instead of the array; an assumption, not a
      synthesis result.
"""
from __future__ import annotations

import re
from typing import Callable

import numpy as np

from ..errors import QosError
from ..numerics import table_codes
from .multiplier import Multiplier

P_EXACT_UNSIGNED_MW = 0.391  # mul8u_1JFF, EvoApproxLib PDK45_PWR
P_EXACT_SIGNED_MW = 0.425    # mul8s_1KV8
DRUM_OVERHEAD = 0.20
MITCHELL_FRACTION = 0.30
_SOURCE = "qos-compile built-in family"

FAMILY_NAMES = (
    "built-in multiplier families (append _s8 for signed, _u8 or nothing for unsigned): "
    "truncK (K=0..14, drop partial-product columns below 2^K, e.g. trunc4), "
    "bam-H-V (broken array: drop rows j<H of port B and columns i+j<V, H=0..7, V=0..14, e.g. bam-2-6), "
    "drumK (DRUM, keep K=1..16 bits from the leading one, e.g. drum4), "
    "mitchell (logarithmic multiplier)"
)

_MAG = np.arange(256, dtype=np.int64)                           # 8-bit magnitudes
_BITS = ((_MAG[:, None] >> np.arange(8)) & 1).astype(np.int64)  # (256, 8): bit i of m


def _p_exact(signed: bool) -> float:
    return P_EXACT_SIGNED_MW if signed else P_EXACT_UNSIGNED_MW


def _suffix(signed: bool) -> str:
    return "s8" if signed else "u8"


def _table(mag_table: np.ndarray, signed: bool) -> np.ndarray:
    """Lay an unsigned magnitude table f(|a|, |b|) (256x256) out as a circuit table."""
    if not signed:
        return mag_table
    codes = table_codes(True)  # table index -> code
    mag = np.abs(codes)
    sign = np.sign(codes)
    return np.outer(sign, sign) * mag_table[mag[:, None], mag[None, :]]


def _kept_pp_table(keep: np.ndarray) -> np.ndarray:
    """Sum of the kept partial-product bits: ``f(a, b) = sum_{keep[i, j]} a_i b_j 2^(i+j)``."""
    weights = keep.astype(np.int64) << (np.arange(8)[:, None] + np.arange(8)[None, :])
    return _BITS @ weights @ _BITS.T


def _check_int(value: object, lo: int, hi: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise QosError(f"{what} must be an integer in {lo}..{hi}, got {value!r}")
    if not lo <= int(value) <= hi:
        raise QosError(f"{what} must be in {lo}..{hi}, got {value}")
    return int(value)


def _make(name: str, signed: bool, mag_table: np.ndarray, fraction: float, doc: str) -> Multiplier:
    return Multiplier(
        name=name,
        signed=signed,
        lut=_table(mag_table, signed),
        power_mw=round(_p_exact(signed) * fraction, 6),
        power_is_estimate=True,
        source=f"{_SOURCE}: {doc}; power modelled as {fraction:.4f} x exact ({_p_exact(signed)} mW)",
    )


def truncated(k: int, signed: bool = False) -> Multiplier:
    """Truncated multiplier: PP bits ``a_i b_j`` with ``i + j < k`` are not summed.

    ``k = 0`` is exact; magnitudes are never overestimated. Power: kept PP bits / 64.
    Name ``trunc_k{k}_{u8|s8}``.
    """
    k = _check_int(k, 0, 14, "truncation k")
    ij = np.arange(8)[:, None] + np.arange(8)[None, :]
    keep = ij >= k
    return _make(f"trunc_k{k}_{_suffix(signed)}", signed, _kept_pp_table(keep), keep.sum() / 64,
                 f"truncated array, PP columns i+j<{k} dropped")


def broken_array(hbl: int, vbl: int, signed: bool = False) -> Multiplier:
    """Broken-array multiplier (BAM, Mahdiani et al. 2010) on the 8x8 carry-save array.

    Definition used here: row ``j`` of the array adds the partial product
    ``A * b_j`` (port B = activation, bit ``j``), column ``i + j`` has weight
    ``2^(i+j)``. The horizontal break level ``hbl`` omits the ``hbl`` least
    significant rows entirely (``j < hbl``); the vertical break level ``vbl`` omits
    every cell in the columns right of it (``i + j < vbl``). A PP bit is summed iff
    ``j >= hbl and i + j >= vbl``. ``bam(0, v)`` equals ``truncated(v)``; for
    ``hbl > 0`` the circuit is asymmetric. Power: kept PP bits / 64.
    Name ``bam_h{hbl}_v{vbl}_{u8|s8}``.
    """
    # hbl = 8 or vbl = 15 would drop every PP bit (a constant-zero "multiplier")
    hbl = _check_int(hbl, 0, 7, "BAM horizontal break level")
    vbl = _check_int(vbl, 0, 14, "BAM vertical break level")
    i, j = np.arange(8)[:, None], np.arange(8)[None, :]
    keep = (j >= hbl) & (i + j >= vbl)
    return _make(f"bam_h{hbl}_v{vbl}_{_suffix(signed)}", signed, _kept_pp_table(keep), keep.sum() / 64,
                 f"broken array, rows j<{hbl} and columns i+j<{vbl} dropped")


def _leading_one(m: np.ndarray) -> np.ndarray:
    """Position of the leading one of each positive magnitude (floor(log2 m)); -1 for 0."""
    out = np.full(m.shape, -1, dtype=np.int64)
    pos = m > 0
    out[pos] = np.floor(np.log2(m[pos])).astype(np.int64)  # exact for m < 2^52
    return out


def drum(k: int, signed: bool = False) -> Multiplier:
    """DRUM-k (Hashemi, Bahar, Reda 2015): dynamic range unbiased multiplier.

    Each magnitude ``m`` with leading one at ``t >= k`` keeps its ``k`` bits from the
    leading one, ``m' = (m >> s) | 1`` with ``s = t - k + 1`` (the lowest kept bit
    forced to 1 to unbias the dropped bits); smaller magnitudes pass unchanged.
    Result: ``(m'_a * m'_b) << (s_a + s_b)``. ``k >= 8`` is exact for 8-bit operands.
    Power: ``k^2/64 + 0.20`` of exact (k < 8). Name ``drum_k{k}_{u8|s8}``.
    """
    k = _check_int(k, 1, 16, "DRUM k")
    t = _leading_one(_MAG)
    shift = np.maximum(t - k + 1, 0)
    kept = np.where(shift > 0, (_MAG >> shift) | 1, _MAG)
    mag_table = np.outer(kept, kept) << (shift[:, None] + shift[None, :])
    fraction = 1.0 if k >= 8 else k * k / 64 + DRUM_OVERHEAD
    return _make(f"drum_k{k}_{_suffix(signed)}", signed, mag_table, fraction,
                 f"DRUM with {k} bits kept from the leading one")


def mitchell(signed: bool = False) -> Multiplier:
    """Mitchell's logarithmic multiplier (1962), exact integer arithmetic.

    ``m = 2^t (1 + x)`` with ``t`` the leading-one position and ``x = m/2^t - 1``;
    ``log2 m ~ t + x``. The sum ``t_a + t_b + x_a + x_b`` is taken back by the
    piecewise-linear antilog: ``2^(t_a+t_b) (1 + x_a + x_b)`` if ``x_a + x_b < 1``,
    else ``2^(t_a+t_b+1) (x_a + x_b)``. With 8-bit operands both are integers
    (``2^(t_a+t_b) x_a = (m_a - 2^t_a) 2^t_b``), so no rounding enters. A zero
    operand gives 0. Never overestimates (worst case about -11.1 %). Power: 0.30 of
    exact (crude assumption). Name ``mitchell_{u8|s8}``.
    """
    t = _leading_one(_MAG)
    tt = np.maximum(t, 0)
    frac = np.where(_MAG > 0, _MAG - (1 << tt), 0)         # x * 2^t, integer
    ta, tb = tt[:, None], tt[None, :]
    fa, fb = frac[:, None], frac[None, :]
    cross = (fa << tb) + (fb << ta)                         # (x_a + x_b) * 2^(t_a + t_b)
    base = np.int64(1) << (ta + tb)
    mag_table = np.where(cross < base, base + cross, 2 * cross)
    mag_table = np.where((_MAG[:, None] == 0) | (_MAG[None, :] == 0), 0, mag_table)
    return _make(f"mitchell_{_suffix(signed)}", signed, mag_table, MITCHELL_FRACTION,
                 "Mitchell logarithmic multiplier")


_SIGN_SUFFIX = r"(?:[-_:](?P<sign>u8|s8|u|s|unsigned|signed))?"
_PATTERNS: list[tuple[re.Pattern[str], Callable[..., Multiplier]]] = [
    (re.compile(r"trunc(?:ated)?[-_]?k?(?P<k>\d+)" + _SIGN_SUFFIX), truncated),
    (re.compile(r"bam[-_]?h?(?P<hbl>\d+)[-_]v?(?P<vbl>\d+)" + _SIGN_SUFFIX), broken_array),
    (re.compile(r"drum[-_]?k?(?P<k>\d+)" + _SIGN_SUFFIX), drum),
    (re.compile(r"mitchell" + _SIGN_SUFFIX), mitchell),
]


def family(name: str, signed: bool | None = None) -> Multiplier:
    """Build a family circuit from a name such as ``trunc4``, ``bam-4-8``, ``drum4``, ``mitchell``.

    Also accepts the circuit names the families produce (``trunc_k4_u8``,
    ``bam_h4_v8_s8``, ...). A ``_s8``/``_u8`` suffix chooses the signedness;
    ``signed`` does too (default unsigned) and must not contradict the suffix.
    Raises QosError (one line) for an unknown name or a bad parameter.
    """
    text = str(name).strip().lower()
    for pattern, build in _PATTERNS:
        match = pattern.fullmatch(text)
        if match is None:
            continue
        params = {k: v for k, v in match.groupdict().items() if k != "sign" and v is not None}
        sign = match.group("sign")
        from_name = None if sign is None else sign.startswith("s")
        if from_name is not None and signed is not None and from_name != signed:
            raise QosError(f"multiplier {name!r} is {'signed' if from_name else 'unsigned'} but signed={signed}")
        is_signed = from_name if from_name is not None else bool(signed)
        try:
            return build(**{k: int(v) for k, v in params.items()}, signed=is_signed)
        except QosError as exc:
            raise QosError(f"multiplier {name!r}: {exc}") from None
    raise QosError(f"unknown multiplier family name {name!r}; {FAMILY_NAMES}")


def is_family_name(name: str) -> bool:
    """True when ``name`` has the shape of a family name (its parameters may still be out of range)."""
    text = str(name).strip().lower()
    return any(p.fullmatch(text) for p, _ in _PATTERNS)
