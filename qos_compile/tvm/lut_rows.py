"""Per-weight table-row kernels: approximate conv as byte-permute lookups, emitted from TIR.

With the weights fixed at compile time, weight code ``a`` selects one 256-entry row
``lut[a, :]`` of the (per-OP, run-time) table; an output channel is the sum over its
``K = C/groups * kh * kw`` weights of that weight's row looked up at the activation codes
of every output position. A row is kept as byte planes and looked up with the CPU's byte
permute, one vector of output positions at a time. Two variants (``RowsLayout.residual``):

* ``rows``: the whole table, two planes (low and high byte of ``lut[a, b] + bias``, a 16-bit
  value; ``fits_rows``);
* ``rows8``: the exact conv plus the residual ``lut[a, b] - code(a) * code(b)`` in ONE
  plane: ``residual - rowmin[a]`` must fit 8 bits in every row of every table of the layer
  (``fits_rows8``; mul8u_DG8 and mul8u_GTR do, a residual range of 44 and 231). Half the
  lookups; the exact part runs on the cheapest exact kernel of the target (``variants``),
  and ``rowmin`` comes back in per output channel (``sum_k rowmin[row(k)]``). Activations
  whose residual columns are equal in every table of the layer share a class
  (``Fit.classes``; mul8u_DG8 has 29, mul8s_1KX2 16): the padded input is mapped to classes
  once per element and the planes hold one entry per class, so fewer permutes
  (``lookup_share`` prices it).

Byte permutes per ISA (``ROW_ISAS``: positions per vector):

* ``avx512vbmi`` (x86-64): 64 positions per vector, ``vpermi2b`` over two 64-byte
  registers covers 128 entries, bit 7 of the index picks the half (``vpmovb2m`` + blend):
  2 permutes per 64 lookups and plane.
* ``avx2`` (x86-64): 32 positions, ``vpshufb`` looks up 16 entries per 128-bit lane and
  writes 0 where bit 7 of the index is set; each 16-entry sub-table is stored twice (one
  copy per lane). Per half of the index range (bit 7), sub-table ``j`` looked up at ``idx -
  16 j`` (one subtraction per j, shared by the planes) answers every index from ``16 j`` to
  the half's end, so the planes hold the differences of neighbouring sub-tables
  (``_xor_chain``) and the XOR of the half's 8 results is the entry; bit 7 then picks the
  half (one blend): 16 shuffles, 15 XORs and 1 blend per 32 lookups and plane, plus 15
  index operations shared by the planes. (The first version selected each sub-table
  exactly, ``min(idx - 16 j, 0x8F) + 0x70``, and OR-ed: 80 operations per 32 lookups of one
  plane instead of 47.)
* ``neon`` (aarch64): 16 positions per vector, ``tbl`` over four 16-byte registers covers
  64 entries, three ``tbx`` fill in the other quarters.

A plane covers ``RowsLayout.entries`` indices in whole permute steps (``PLANE_STEP``): all
256 activation codes with lanes on positions; with lanes on channels (below) the R distinct
weight rows rounded up, so a layer with R <= 128 needs one ``vpermi2b`` per plane (R <= 64:
one ``vpermb``), 8 ``vpshufb`` on AVX2, and less memory.

**Lanes on positions or on output channels** (``RowsLayout.by_channel``). A vector holds
``lanes`` output positions of one output channel, all looked up in that channel's weight
row; a layer with fewer positions than lanes (a 4x4 feature map has 16, a VBMI vector 64)
would waste most of every permute. There the vector holds ``lanes`` output channels of one
position instead: the activation code ``b`` at that position and tap selects one *column*
of the table, ``lut[., b]`` over the layer's distinct weight codes, kept as byte planes
just like a row, and the lanes' index vector is the constant column of the weights' row
numbers at that tap. Same permutes, same sums, the table transposed (``planes(...,
by_channel=True)``: one row per activation code ``b``). ``rows_layout`` picks the
axis by its vectors' price (ungrouped convs only: a vector of channels must read one
group's taps): each vector costs its lookups plus, on ISAs whose lookups need the table in
registers (``TABLE_LOADS``), its share of loading them, which a tile of ``nv`` vectors
shares, per permute step of its planes (positions: the activations or their classes;
channels: the distinct weights); ties go to channels. On AMD Zen 5 (``u8``, 1 thread) that rule made the faster
choice for all 16 shapes measured on VBMI and AVX2, ResNet-8/20 layers among them: a
64->64 conv at 4x4 took 108 us on positions and 21 us on channels (VBMI), 300 and 176 us
(AVX2); a 16->16 conv at 16x16 14 us on positions, 82 us on channels.

Sums of bytes are kept exact in 16-bit lanes: per word lane (two neighbouring positions)
the kernel adds the plane's word (``lo(2q) + 256*lo(2q+1)`` mod 2**16) and its high byte
(``lo(2q+1)``); both stay exact for up to ``CHUNK`` = 256 weights, after which the two
positions' byte sums are recovered and added into the int32 accumulator (``flush``).
Everything is emitted from TIR (``T.call_llvm_pure_intrin``); the kernels are bit-exact by
construction whenever their ``fits`` condition holds for every circuit of the layer,
which the lowering checks before it picks them.

Stages (each its own PrimFunc, so the plan shows them): ``taps`` packs the padded
activation table indices position-major per weight tap (``(N, G, Kg, P_pad)`` uint8); the
microkernel reads the rows of the layer's distinct weight codes as byte planes (``(R,
RowsLayout.width)`` uint8, ``planes``; ``by_channel``: ``(256, width)``; ``rows8`` subtracts
each row's ``rowmin``, ``(R,)`` int32, ``row_minima``). Weights and table are constants of an
OP, so both are per-OP tensors the compiler computes once per OP (``slot.<layer>.planes``,
``.rowmin``; at most 256 rows of 256 bytes per plane, 512 on AVX2), not per inference (per call they took 6% of a ResNet-20); the
microkernel
(``rows_microkernel``) writes int32 ``(N, O, P_pad)``; the caller's epilogue reads the
first ``Ho*Wo`` positions. Threads split ``n x o`` (output channels).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
from tvm import te
from tvm.script import tirx as T

from ..errors import QosError
from ..multipliers.structure import fits_rows, fits_rows8, residual_rows  # noqa: F401 - fits_*: the kernels' conditions
from ..multipliers.table import exact_table
from ..numerics import code_offset
from .kernels import KERNEL_ATTR, register_block_schedules

#: Byte-permute ISAs with a rows microkernel: lanes (positions per vector) per ISA.
ROW_ISAS = {"avx512vbmi": 64, "avx2": 32, "neon": 16}
#: Entries one permute step of an ISA covers (a plane is a whole number of them): a 64-byte
#: register (VBMI), a 16-entry sub-table (AVX2), four 16-byte registers (NEON ``tbl4``).
PLANE_STEP = {"avx512vbmi": 64, "avx2": 16, "neon": 64}
#: Weights accumulated in 16-bit lanes before a flush (byte sums stay below 2**16).
CHUNK = 256
#: Most position vectors one output tile keeps in registers.
MAX_VECTORS = 4
#: Loading a row (or column) of planes into registers, per tile, in vectors' lookups: VBMI's
#: ``vpermi2b`` and NEON's ``tbl`` take the table in registers, AVX2's ``vpshufb`` as a memory
#: operand of each shuffle (measured on AMD Zen 5 for VBMI and AVX2; NEON by that analogy).
TABLE_LOADS = {"avx512vbmi": 1.0, "avx2": 0.0, "neon": 1.0}
#: A ``rows8`` residual's work besides its permute steps (taps, sums, flushes), in steps:
#: fitted on AMD Zen 5 to ResNet-20's 19 convs with mul8u_DG8's 29 column classes against
#: all 256 (``bench.kernels --no-network``, 2026-12-08): VBMI's residual hardly shrinks with
#: fewer steps (0.88x at 1 of 4), AVX2's does (0.19x at 2 of 16). NEON: ESTIMATED with
#: ``bench.estimate``'s method (1 against 256 classes, mul8s_1KV8 / mul8s_1KR8, ResNet-20's
#: 16->16 @32 and 64->64 @8 convs, 2026-12-08): 0.0-0.1 steps on the neoverse-n1 model,
#: 0.25-0.4 on cortex-a72's, 0.4-0.8 on cortex-a55's: its ``tbl``/``tbx`` chain is the work.
LOOKUP_FIXED = {"avx512vbmi": 21.0, "avx2": 1.3, "neon": 0.5}


@dataclass(frozen=True)
class RowsLayout:
    """Compile-time layout of one rows conv: distinct weight codes and the tiling."""

    isa: str
    codes: np.ndarray        # (R,) int32 table indices (code + offset) of the distinct weights
    wrow: np.ndarray         # (O, Kg) int32: row of each weight in ``codes``
    positions: int           # Ho * Wo
    vectors: int             # vectors per tile (of positions, or of channels ``by_channel``)
    p_pad: int               # positions rounded up to whole tiles (``by_channel``: ``positions``)
    residual: bool = False   # rows8: one plane of the residual over the exact product
    by_channel: bool = False  # lanes on output channels (column planes), not on positions
    o_pad: int = 0           # ``by_channel``: output channels rounded up to whole tiles
    #: rows8: (256,) uint8 class of each activation's residual column (the taps hold classes;
    #: ``Fit.classes``), None: the activation codes themselves
    classes: np.ndarray | None = None

    @property
    def activations(self) -> int:
        """Distinct activation values the planes answer: the column classes, or 256."""
        return 256 if self.classes is None else int(self.classes.max()) + 1

    @property
    def lanes(self) -> int:
        return ROW_ISAS[self.isa]

    @property
    def planes(self) -> int:
        return 1 if self.residual else 2

    @property
    def entries(self) -> int:
        """Entries per plane: the activations (``activations``), or (``by_channel``) the R weight
        rows, rounded up to whole permute steps: fewer of them, fewer permutes."""
        return plane_entries(self.isa, len(self.codes) if self.by_channel else self.activations)

    @property
    def width(self) -> int:
        """Bytes per row of the ``planes`` operand (all planes)."""
        return self.planes * plane_bytes(self.isa, self.entries)

    def weight_operand(self) -> np.ndarray:
        """The microkernel's weight operand: per output channel and tap the row number ``(O, Kg)``
        int32; ``by_channel``: per tap the lanes' index vector of row numbers ``(Kg, o_pad)``
        uint8 (padding channels read row 0 and are not written)."""
        if not self.by_channel:
            return self.wrow
        out = np.zeros((self.wrow.shape[1], self.o_pad), np.uint8)
        out[:, :self.wrow.shape[0]] = self.wrow.T
        return out


def plane_entries(isa: str, count: int) -> int:
    """``count`` looked-up entries rounded up to whole permute steps (``PLANE_STEP``)."""
    step = PLANE_STEP[isa]
    return max(1, -(-count // step)) * step


def lookup_share(isa: str, classes: Any) -> float:
    """A ``rows8`` residual's price with these column classes (``Fit.classes``) relative to one
    that looks up all 256 activations: (fixed work + its permute steps) over the same for 256
    (``LOOKUP_FIXED``)."""
    n = int(max(classes)) + 1 if len(classes) else 256
    full, steps = 256 // PLANE_STEP[isa], plane_entries(isa, n) // PLANE_STEP[isa]
    return (LOOKUP_FIXED[isa] + steps) / (LOOKUP_FIXED[isa] + full)


def plane_bytes(isa: str, entries: int) -> int:
    """Bytes a plane of ``entries`` takes (AVX2: each 16-entry sub-table twice)."""
    return 2 * entries if isa == "avx2" else entries


def _tiling(count: int, lanes: int) -> tuple[int, int]:
    """(vectors per tile, count padded to whole tiles): at most ``MAX_VECTORS`` vectors, as
    few padding lanes as the tile count allows."""
    vecs = max(1, -(-count // lanes))
    tiles = -(-vecs // MAX_VECTORS)
    vectors = -(-vecs // tiles)
    return vectors, tiles * vectors * lanes


def rows_layout(w: np.ndarray, signed: bool, positions: int, isa: str, residual: bool = False,
                groups: int = 1, classes: Any = ()) -> RowsLayout:
    """Distinct weight rows and the tiling for weights ``w`` (O, Cg, kh, kw) codes of a conv with
    ``positions`` = Ho * Wo outputs per channel: lanes on the cheaper axis (module docstring;
    channels only for ``groups == 1``). ``classes``: ``rows8``'s residual column classes
    (``Fit.classes``; used where there are fewer than 256)."""
    if isa not in ROW_ISAS:
        raise QosError(f"no rows microkernel for {isa!r} (have {', '.join(ROW_ISAS)})")
    if positions < 1:
        raise QosError(f"internal error: a rows layout needs the layer's output positions, got {positions}")
    idx = w.astype(np.int64).reshape(w.shape[0], -1) + code_offset(signed)
    codes, inv = np.unique(idx, return_inverse=True)
    lanes, o = ROW_ISAS[isa], int(w.shape[0])
    vectors, p_pad = _tiling(positions, lanes)
    cvectors, o_pad = _tiling(o, lanes)
    cls = None
    if residual and len(classes):
        cls = np.asarray(classes, np.uint8)
        if cls.shape != (256,):
            raise QosError(f"internal error: residual column classes need one per activation (256), got {cls.shape}")
        if int(cls.max()) == 255:              # every column its own class: the codes themselves
            cls = None
    loads = TABLE_LOADS[isa]

    def price(vecs: int, nv: int, entries: int) -> float:       # per tap: vectors x (steps x table share + sums)
        return vecs * ((entries // PLANE_STEP[isa]) * (1 + loads / nv) + 1)

    price_positions = price(o * (p_pad // lanes), vectors, plane_entries(isa, 256 if cls is None else int(cls.max()) + 1))
    price_channels = price(positions * (o_pad // lanes), cvectors, plane_entries(isa, len(codes)))
    by_channel = groups == 1 and price_channels <= price_positions
    if by_channel:
        vectors, p_pad = cvectors, positions
    return RowsLayout(isa, codes.astype(np.int32), inv.reshape(idx.shape).astype(np.int32), positions,
                      vectors, p_pad, residual, by_channel, o_pad if by_channel else 0, cls)


# --------------------------------------------------------------------------- TE stages
def taps(xp: te.Tensor, groups: int, kh: int, kw: int, stride: tuple[int, int], dilation: tuple[int, int],
         ho: int, wo: int, p_pad: int, name: str = "rows_taps") -> te.Tensor:
    """(N, G, Cg*kh*kw, p_pad) uint8: the index each weight tap reads at each output position."""
    n, c = int(xp.shape[0]), int(xp.shape[1])
    cg = c // groups
    (sh, sw), (dh, dw) = stride, dilation
    kk = kh * kw

    def f(nn, g, k, p):
        i = tvm.tirx.min(p // wo, ho - 1)            # padding positions re-read the last row
        ci, r = k // kk, k % kk
        return xp[nn, g * cg + ci, i * sh + (r // kw) * dh, (p % wo) * sw + (r % kw) * dw]

    # row width as a block annotation: the schedule splits p into (row, column) and
    # vectorises the column copy
    return te.compute((n, groups, cg * kk, p_pad), f, name=name, attrs={KERNEL_ATTR: "rows_taps", "qos_row": wo})


#: The per-OP graph input of a ``rows8`` layer: each weight row's smallest residual.
ROWMIN_SUFFIX = "rowmin"
#: The per-OP graph input of a ``rows``/``rows8`` layer: its weight rows as byte planes.
PLANES_SUFFIX = "planes"


def row_minima(lut: np.ndarray, codes: np.ndarray, signed: bool) -> np.ndarray:
    """(R,) int32: the smallest residual (``multipliers.structure.residual_rows``) of each weight
    row ``codes`` of one table (``rows8``). A constant of an OP: the compiler computes it once
    per OP (the per-OP tensor ``slot.<layer>.rowmin``), not per inference."""
    return residual_rows(lut, signed)[np.asarray(codes, np.int64)].min(1).astype(np.int32)


def planes(lut: np.ndarray, codes: np.ndarray, bias: int, isa: str, rowmin: np.ndarray | None = None,
           signed: bool = False, by_channel: bool = False, classes: np.ndarray | None = None) -> np.ndarray:
    """The ``planes`` operand, uint8: per weight row r (``by_channel``: per activation b) one
    row of ``RowsLayout.width`` bytes, its planes side by side: ``rows``: low then high byte of
    ``lut[codes[r], b] + bias``; ``rows8`` (``rowmin`` given): the residual minus ``rowmin[r]``.
    A plane holds every activation b (``by_channel``: every row r, rounded up with zeros to
    ``plane_entries``). ``classes`` (``rows8``): one activation per residual column class
    stands for its class, and the planes hold classes instead of activations (rounded up with
    zeros to ``plane_entries``). AVX2 keeps the XOR chain of its 16-entry sub-tables
    (``_xor_chain``), each twice (both 128-bit lanes of a ``vpshufb``)."""
    c = np.asarray(codes, np.int64)
    vals = np.asarray(lut, np.int64)[c]                                        # (R, 256): [r, b]
    if rowmin is not None:
        off = code_offset(signed)
        vals = vals - (c[:, None] - off) * (np.arange(256)[None, :] - off) - np.asarray(rowmin, np.int64)[:, None]
        per_plane = [vals & 255]
        if classes is not None:
            cls = np.asarray(classes, np.int64)
            first = np.array([int(np.flatnonzero(cls == k)[0]) for k in range(int(cls.max()) + 1)])
            v = per_plane[0][:, first]                                          # (R, classes)
            width = len(first) if by_channel else plane_entries(isa, len(first))
            per_plane = [np.concatenate([v, np.zeros((len(c), width - len(first)), np.int64)], axis=1)]
    else:
        per_plane = [(vals + bias) & 255, ((vals + bias) >> 8) & 255]
    if by_channel:
        n = plane_entries(isa, len(c))
        per_plane = [np.concatenate([v.T, np.zeros((v.shape[1], n - len(c)), np.int64)], axis=1) for v in per_plane]
    if isa == "avx2":
        per_plane = [_xor_chain(v) for v in per_plane]
    return np.ascontiguousarray(np.concatenate(per_plane, axis=1).astype(np.uint8))


def _xor_chain(v: np.ndarray) -> np.ndarray:
    """(rows, 16 S) bytes -> (rows, 32 S): per half of the index range (bit 7) the sub-tables
    ``D_h = T_h ^ T_(h-1)`` (``D`` = ``T`` at the half's first), so that the XOR of ``D_j``
    over ``j <= h`` is sub-table ``h`` (``_lookup_avx2``); each stored for both 128-bit lanes."""
    t = v.reshape(v.shape[0], -1, 16)
    d = t.copy()
    for h in range(t.shape[1]):
        if h % 8:
            d[:, h] = t[:, h] ^ t[:, h - 1]
    return np.repeat(d, 2, axis=1).reshape(v.shape[0], -1)


def _lookup_vbmi(pl: Any, row: Any, base: int, entries: int, idx: Any) -> Any:
    """Byte lookup of 64 indices below ``entries`` in the plane at byte ``base`` of row ``row``:
    ``vpermb`` per 64 entries, ``vpermi2b`` per 128, bit 7 of the index picks the half."""
    t = [pl[row, T.ramp(base + 64 * i, 1, 64)] for i in range(entries // 64)]
    perm2, perm1 = "llvm.x86.avx512.vpermi2var.qi.512", "llvm.x86.avx512.permvar.qi.512"
    halves = [T.call_llvm_pure_intrin("uint8x64", perm2, t[h], idx, t[h + 1]) if h + 1 < len(t)
              else T.call_llvm_pure_intrin("uint8x64", perm1, t[h], idx) for h in range(0, len(t), 2)]
    if len(halves) == 1:
        return halves[0]
    return T.Select(T.reinterpret("int8x64", idx) < T.broadcast(T.int8(0), 64), halves[1], halves[0])


def _lookup_neon(pl: Any, row: Any, base: int, entries: int, idx: Any) -> Any:
    """Byte lookup of 16 indices below ``entries`` in the plane at byte ``base`` of row ``row``:
    ``tbl`` over four registers, a ``tbx`` per further 64 entries."""
    t = [pl[row, T.ramp(base + 16 * i, 1, 16)] for i in range(entries // 16)]
    out = T.call_llvm_pure_intrin("uint8x16", "llvm.aarch64.neon.tbl4", t[0], t[1], t[2], t[3], idx)
    for q in range(1, entries // 64):
        iq = idx - T.broadcast(T.uint8(64 * q), 16)
        out = T.call_llvm_pure_intrin("uint8x16", "llvm.aarch64.neon.tbx4", out, t[4 * q], t[4 * q + 1],
                                      t[4 * q + 2], t[4 * q + 3], iq)
    return out


def _lookup_avx2(pl: Any, row: Any, nplanes: int, entries: int, idx: Any) -> list:
    """Byte lookups of 32 indices below ``entries`` in every plane of row ``row``. Per half of
    the indices (bit 7; the upper one looked up at ``idx ^ 0x80``): sub-table ``j`` of the half
    at ``idx - 16 j``, whose bit 7 is clear (``vpshufb`` reads entry ``idx & 15``) exactly for
    the indices from ``16 j`` to the half's end, so the XOR of its ``D_j`` (``_xor_chain``) over
    ``j`` is the entry; then bit 7 of ``idx`` picks the half. The shifted indices are shared by
    the planes."""
    subs = entries // 16
    halves: list = []
    for half in range(-(-subs // 8)):
        outs: list = [None] * nplanes
        cur = idx if half == 0 else T.bitwise_xor(idx, T.broadcast(T.uint8(0x80), 32))
        for j in range(8 * half, min(subs, 8 * half + 8)):
            if j % 8:
                cur = cur - T.broadcast(T.uint8(16), 32)
            for p in range(nplanes):
                t = pl[row, T.ramp(p * 2 * entries + 32 * j, 1, 32)]
                hit = T.call_llvm_pure_intrin("uint8x32", "llvm.x86.avx2.pshuf.b", t, cur)
                outs[p] = hit if outs[p] is None else T.bitwise_xor(outs[p], hit)
        halves.append(outs)
    if len(halves) == 1:
        return halves[0]
    upper = T.reinterpret("int8x32", idx) < T.broadcast(T.int8(0), 32)
    return [T.Select(upper, hi, lo) for lo, hi in zip(*halves)]


def _lookups(isa: str, pl: Any, row: Any, nplanes: int, entries: int, idx: Any) -> list:
    """Every plane of row ``row`` (planes of ``entries``) looked up at ``idx``."""
    if isa == "avx2":
        return _lookup_avx2(pl, row, nplanes, entries, idx)
    one = _lookup_vbmi if isa == "avx512vbmi" else _lookup_neon
    return [one(pl, row, p * entries, entries, idx) for p in range(nplanes)]


def _pair_sums(s_word: Any, s_high: Any) -> tuple[Any, Any]:
    """The byte sums of the even and odd lane of a word lane, from its word sum and its
    high-byte sum (both mod 2**16), as int32."""
    odd = T.Cast("int32", s_high)
    return T.Cast("int32", T.Cast("uint16", s_word - T.Cast("uint16", odd * 256))), odd


def rows_microkernel(n: int, groups: int, o: int, kg: int, r: int, layout: RowsLayout, bias: int,
                     name: str | None = None) -> "tvm.tirx.PrimFunc":
    """PrimFunc ``(taps (N, G, Kg, P_pad) u8, planes u8, weights, rowmin (R,) i32, acc (N, O,
    P_pad) i32)``, planes and weights as ``planes(..., by_channel=layout.by_channel)`` and
    ``layout.weight_operand()``; ``rowmin`` is read by ``rows8`` only (``rows``: zeros)."""
    if layout.by_channel:
        kernel = _channels_microkernel(n, o, kg, r, layout, bias)
        return kernel.with_attr("global_symbol", name) if name else kernel
    lanes, nv, p_pad, isa = layout.lanes, layout.vectors, layout.p_pad, layout.isa
    tile, words = lanes * nv, lanes // 2
    og = o // groups
    nkc = -(-kg // CHUNK)
    u16v = f"uint16x{words}"
    npl, ent = layout.planes, layout.entries
    width = layout.width
    base = 0 if layout.residual else bias            # what every looked-up value carries on top

    @T.prim_func(private=True)
    def kernel(tp: T.Buffer((n, groups, kg, p_pad), "uint8"), pl: T.Buffer((r, width), "uint8"),
               wrow: T.Buffer((o, kg), "int32"), rowmin: T.Buffer((r,), "int32"),
               acc: T.Buffer((n, o, p_pad), "int32")):
        T.func_attr({"qos_prescheduled": True})
        for no in T.parallel(n * o):
            corr = T.decl_buffer((1,), "int32", scope="local")
            corr[0] = 0
            if layout.residual:
                for k in range(kg):
                    corr[0] = corr[0] + rowmin[wrow[no % o, k]]
            for pt in range(p_pad // tile):
                for p in T.vectorized(tile):
                    acc[no // o, no % o, pt * tile + p] = corr[0]
                for kc in range(nkc):
                    s0 = T.decl_buffer((nv * words,), "uint16", scope="local")
                    s1 = T.decl_buffer((nv * words,), "uint16", scope="local")
                    s2 = T.decl_buffer((nv * words,), "uint16", scope="local")
                    s3 = T.decl_buffer((nv * words,), "uint16", scope="local")
                    for q in T.vectorized(nv * words):
                        s0[q] = T.uint16(0)
                        s1[q] = T.uint16(0)
                        s2[q] = T.uint16(0)
                        s3[q] = T.uint16(0)
                    for k in range(kc * CHUNK, T.min(kg, kc * CHUNK + CHUNK)):
                        row: T.let = wrow[no % o, k]
                        for v in T.unroll(nv):
                            idx: T.let = tp[no // o, (no % o) // og, k, T.ramp(pt * tile + v * lanes, 1, lanes)]
                            lo: T.let = T.reinterpret(u16v, _lookups(isa, pl, row, npl, ent, idx)[0])
                            s0[T.ramp(v * words, 1, words)] = s0[T.ramp(v * words, 1, words)] + lo
                            s1[T.ramp(v * words, 1, words)] = s1[T.ramp(v * words, 1, words)] + T.shift_right(
                                lo, T.broadcast(T.uint16(8), words))
                            if npl == 2:
                                hi: T.let = T.reinterpret(u16v, _lookups(isa, pl, row, npl, ent, idx)[1])
                                s2[T.ramp(v * words, 1, words)] = s2[T.ramp(v * words, 1, words)] + hi
                                s3[T.ramp(v * words, 1, words)] = s3[T.ramp(v * words, 1, words)] + T.shift_right(
                                    hi, T.broadcast(T.uint16(8), words))
                    # flush: the two positions of each word lane from (word sum, high-byte sum)
                    cnt: T.let = T.min(kg, kc * CHUNK + CHUNK) - kc * CHUNK
                    for v in range(nv):
                        for q in range(words):
                            leven, lodd = _pair_sums(s0[v * words + q], s1[v * words + q])
                            heven, hodd = _pair_sums(s2[v * words + q], s3[v * words + q])
                            pos: T.let = pt * tile + v * lanes + 2 * q
                            acc[no // o, no % o, pos] = acc[no // o, no % o, pos] + leven + heven * 256 - cnt * base
                            acc[no // o, no % o, pos + 1] = acc[no // o, no % o, pos + 1] + lodd + hodd * 256 - cnt * base

    return kernel.with_attr("global_symbol", name) if name else kernel


def _channels_microkernel(n: int, o: int, kg: int, r: int, layout: RowsLayout, bias: int) -> "tvm.tirx.PrimFunc":
    """The ``by_channel`` microkernel (ungrouped): per batch and tile of output channels, per
    position, the column planes of the activation code each tap reads there looked up at the
    lanes' row numbers ``widx (Kg, o_pad)``; ``planes (256, width)``."""
    lanes, nv, positions, isa = layout.lanes, layout.vectors, layout.positions, layout.isa
    tile, words, o_pad = lanes * nv, lanes // 2, layout.o_pad
    otiles = o_pad // tile
    nkc = -(-kg // CHUNK)
    u16v = f"uint16x{words}"
    npl, ent = layout.planes, layout.entries
    width = layout.width
    base = 0 if layout.residual else bias

    @T.prim_func(private=True)
    def kernel(tp: T.Buffer((n, 1, kg, positions), "uint8"), pl: T.Buffer((layout.activations, width), "uint8"),
               widx: T.Buffer((kg, o_pad), "uint8"), rowmin: T.Buffer((r,), "int32"),
               acc: T.Buffer((n, o, positions), "int32")):
        T.func_attr({"qos_prescheduled": True})
        for nt in T.parallel(n * otiles):
            for c in range(tile):
                if (nt % otiles) * tile + c < o:
                    corr = T.decl_buffer((1,), "int32", scope="local")
                    corr[0] = 0
                    if layout.residual:
                        for k in range(kg):
                            corr[0] = corr[0] + rowmin[T.Cast("int32", widx[k, (nt % otiles) * tile + c])]
                    for p in range(positions):
                        acc[nt // otiles, (nt % otiles) * tile + c, p] = corr[0]
            for p in range(positions):
                for kc in range(nkc):
                    s0 = T.decl_buffer((nv * words,), "uint16", scope="local")
                    s1 = T.decl_buffer((nv * words,), "uint16", scope="local")
                    s2 = T.decl_buffer((nv * words,), "uint16", scope="local")
                    s3 = T.decl_buffer((nv * words,), "uint16", scope="local")
                    for q in T.vectorized(nv * words):
                        s0[q] = T.uint16(0)
                        s1[q] = T.uint16(0)
                        s2[q] = T.uint16(0)
                        s3[q] = T.uint16(0)
                    for k in range(kc * CHUNK, T.min(kg, kc * CHUNK + CHUNK)):
                        col: T.let = T.Cast("int32", tp[nt // otiles, 0, k, p])
                        for v in T.unroll(nv):
                            idx: T.let = widx[k, T.ramp((nt % otiles) * tile + v * lanes, 1, lanes)]
                            lo: T.let = T.reinterpret(u16v, _lookups(isa, pl, col, npl, ent, idx)[0])
                            s0[T.ramp(v * words, 1, words)] = s0[T.ramp(v * words, 1, words)] + lo
                            s1[T.ramp(v * words, 1, words)] = s1[T.ramp(v * words, 1, words)] + T.shift_right(
                                lo, T.broadcast(T.uint16(8), words))
                            if npl == 2:
                                hi: T.let = T.reinterpret(u16v, _lookups(isa, pl, col, npl, ent, idx)[1])
                                s2[T.ramp(v * words, 1, words)] = s2[T.ramp(v * words, 1, words)] + hi
                                s3[T.ramp(v * words, 1, words)] = s3[T.ramp(v * words, 1, words)] + T.shift_right(
                                    hi, T.broadcast(T.uint16(8), words))
                    cnt: T.let = T.min(kg, kc * CHUNK + CHUNK) - kc * CHUNK
                    for v in range(nv):
                        for q in range(words):
                            leven, lodd = _pair_sums(s0[v * words + q], s1[v * words + q])
                            heven, hodd = _pair_sums(s2[v * words + q], s3[v * words + q])
                            ch: T.let = (nt % otiles) * tile + v * lanes + 2 * q
                            if ch < o:
                                acc[nt // otiles, ch, p] = acc[nt // otiles, ch, p] + leven + heven * 256 - cnt * base
                            if ch + 1 < o:
                                acc[nt // otiles, ch + 1, p] = acc[nt // otiles, ch + 1, p] + lodd + hodd * 256 - cnt * base

    return kernel


def rows_inputs(x: te.Tensor, kh: int, kw: int, stride: tuple[int, int], padding: tuple[int, int, int, int],
                dilation: tuple[int, int], groups: int, pad_code: int, signed: bool, ho: int, wo: int,
                p_pad: int, classes: te.Tensor | None = None) -> te.Tensor:
    """TE for ``bb.call_te``: the padded table indices of ``x`` (mapped through ``classes``, a
    (256,) uint8 tensor, if given: once per input element, before the taps repeat them)
    packed by ``taps``."""
    from .kernels import _padded_index

    xp = _padded_index(x, padding, pad_code, code_offset(signed), "rows_pad", classes)
    return taps(xp, groups, kh, kw, stride, dilation, ho, wo, p_pad)


def unpack_positions(acc: te.Tensor, ho: int, wo: int) -> te.Tensor:
    """(N, O, P_pad) -> (N, O, Ho, Wo): the first Ho*Wo positions (fuses into the epilogue)."""
    n, o = int(acc.shape[0]), int(acc.shape[1])
    return te.compute((n, o, ho, wo), lambda a, b, i, j: acc[a, b, i * wo + j], name="rows_unpack")


def rows_stage_funcs(spec: Any, w: np.ndarray, isa: str, bias: int, residual: bool = False,
                     classes: Any = ()) -> tuple[RowsLayout, dict[str, Any]]:
    """Stand-alone PrimFuncs of the stages for one conv ``spec`` (kernels.ConvSpec) with
    weights ``w``: ``taps(x[, classes]) -> tp``, ``micro(tp, pl, wrow, m) -> acc`` (N, O, P_pad; ``rows8``:
    the residual part only) with ``pl = planes(...)`` and (``rows8``) ``m = row_minima(...)``
    computed ahead like the compiler's per-OP tensors. For benchmarks and tests; the compiler
    builds the same stages through Relax."""
    from .kernels import _finish

    layout = rows_layout(w, spec.signed, spec.ho * spec.wo, isa, residual, spec.groups, classes)
    xs = te.placeholder(spec.x_shape, spec.code_dtype, name="x")
    cls = None if layout.classes is None else te.placeholder((256,), "uint8", name="classes")
    tp = rows_inputs(xs, spec.kh, spec.kw, spec.stride, spec.padding, spec.dilation, spec.groups, spec.pad_code,
                     spec.signed, spec.ho, spec.wo, layout.p_pad, cls)
    kg = (spec.c // spec.groups) * spec.kh * spec.kw
    funcs = {"taps": _finish([xs, tp] if cls is None else [xs, cls, tp], None, None, True),
             "micro": rows_microkernel(spec.n, spec.groups, spec.o, kg, len(layout.codes), layout, bias)}
    return layout, funcs


def run_rows_conv(built: Any, prefix: str, layout: RowsLayout, x: np.ndarray, lut: np.ndarray, spec: Any,
                  bias: int, repeat: int = 0, threads: int | None = None) -> tuple[np.ndarray, float]:
    """Run the stages built from ``rows_stage_funcs`` (named ``prefix + stage``) on the planes of
    ``lut`` (``bias``: the ``rows`` planes' bias): accumulators (N, O, Ho, Wo) (``rows8``: the residual part) and the summed best time in ms of the stages
    (0 unless ``repeat``)."""
    ms = 0.0

    def run(stage: str, *args: Any) -> Any:
        nonlocal ms
        out = built.run(prefix + stage, *args, repeat=repeat, threads=threads)
        ms += built.last_time_ns / 1e6 if repeat else 0.0
        return out

    lut = np.asarray(lut, np.int32)
    tp = run("taps", x) if layout.classes is None else run("taps", x, layout.classes)
    if layout.residual:
        m = row_minima(lut, layout.codes, spec.signed)
        pl = planes(lut, layout.codes, 0, layout.isa, m, spec.signed, layout.by_channel, layout.classes)
    else:
        m = np.zeros(len(layout.codes), np.int32)
        pl = planes(lut, layout.codes, bias, layout.isa, by_channel=layout.by_channel)
    acc = run("micro", tp, pl, layout.weight_operand(), m)
    n, o, ho, wo = spec.out_shape
    return acc[:, :, :ho * wo].reshape(n, o, ho, wo), ms


# --------------------------------------------------------------------------- registry hooks
def _schedule_taps(sch: "tvm.s_tir.Schedule", block: Any, features: frozenset[str], style: str | None) -> None:
    """(n, g, k, p): p -> (row, column), ``n, g, k`` in parallel, columns copied as vectors."""
    n, g, k, p = sch.get_loops(block)
    wo = int(sch.get(block).annotations["qos_row"])
    _, col = sch.split(p, [None, wo])
    sch.parallel(sch.fuse(n, g, k))
    sch.vectorize(col)


#: Block schedules of this module's TE stages (``variants.block_schedules``); the
#: microkernel is written in its final form (``qos_prescheduled``).
SCHEDULES = {"rows_taps": _schedule_taps}
register_block_schedules(SCHEDULES)


def emit_conv(bb: Any, ops: Any, low: Any) -> Any:
    """Relax emission of a ``rows``/``rows8`` variant (``variants.Variant.emit``; needs constant
    weights): taps + the byte-permute microkernel on the per-OP graph input
    ``slot.<layer>.planes``, then the positions unpacked; ``rows8`` reads its row minima from
    ``slot.<layer>.rowmin`` and adds the exact conv of ``low.exact`` (its own variant, emitted
    by its own family on constant exact-product operands, so its weight-only stages fold at
    compile time). Every PrimFunc is named after the variant."""
    from tvm import relax

    spec, wn, sym = ops.spec, ops.weights, low.symbol
    residual = low.variant.kind == "rows8"
    if (low.positions, low.groups) != (spec.ho * spec.wo, spec.groups):   # per_op_tensors tiled by them
        raise QosError(f"internal error: {low.describe()} was chosen for {low.positions} positions in "
                       f"{low.groups} group(s), the layer has {spec.ho * spec.wo} in {spec.groups}")
    layout = rows_layout(wn, spec.signed, spec.ho * spec.wo, low.isa, residual, spec.groups, low.fit.classes)
    kg = wn.shape[1] * spec.kh * spec.kw
    cls = () if layout.classes is None else (relax.const(layout.classes),)
    tp = bb.call_te(rows_inputs, ops.x, spec.kh, spec.kw, spec.stride, spec.padding, spec.dilation,
                    spec.groups, spec.pad_code, spec.signed, spec.ho, spec.wo, layout.p_pad, *cls,
                    primfunc_name_hint=f"{sym}_taps")
    if residual:
        pl, m = ops.slot_inputs((PLANES_SUFFIX, ROWMIN_SUFFIX), "rows8 planes and row minima")
    else:
        pl = ops.slot_inputs((PLANES_SUFFIX,), "rows planes")[0]
        m = relax.const(np.zeros(len(layout.codes), np.int32))
    micro = rows_microkernel(spec.n, spec.groups, spec.o, kg, len(layout.codes), layout, low.bias)
    gv = bb.add_func(micro, f"{sym}_micro")
    acc = bb.emit(relax.call_tir(gv, [tp, pl, relax.const(layout.weight_operand()), m],
                                 relax.TensorType((spec.n, spec.o, layout.p_pad), "int32")))
    out = bb.call_te(unpack_positions, acc, spec.ho, spec.wo, primfunc_name_hint=f"{sym}_unpack")
    if not residual:
        return out
    exact = low.exact
    return bb.emit(relax.op.add(exact.variant.emit(bb, exact_operands(ops, exact), exact), out))


def exact_operands(ops: Any, exact: Any) -> Any:
    """``ops`` with the exact product's table (and, for a factor kernel, its factor tables and
    dot bias) as constants: the operands of the exact part of a ``rows8`` layer."""
    from dataclasses import replace

    from tvm import relax

    table = exact_table(ops.spec.signed).astype(np.int32)
    slots = exact.variant.per_op(ops.weights, table, exact) if exact.variant.per_op else {}
    return replace(ops, lut=relax.const(table),
                   slot_inputs=lambda suffixes, what: [relax.const(np.ascontiguousarray(slots[s])) for s in suffixes])


def per_op_tensors(w: np.ndarray, lut: np.ndarray, low: Any) -> dict[str, np.ndarray]:
    """The per-OP tensors of a ``rows``/``rows8`` layer running the circuit ``lut``
    (``variants.Variant.per_op``): its byte planes and (``rows8``) the row minima of its
    residual plane."""
    signed = low.variant.signed
    layout = rows_layout(w, signed, low.positions, low.isa, low.variant.kind == "rows8", low.groups, low.fit.classes)
    if not layout.residual:
        return {PLANES_SUFFIX: planes(lut, layout.codes, low.bias, low.isa, by_channel=layout.by_channel)}
    m = row_minima(lut, layout.codes, signed)
    return {PLANES_SUFFIX: planes(lut, layout.codes, 0, low.isa, m, signed, layout.by_channel, layout.classes),
            ROWMIN_SUFFIX: m}


def bench_stages(spec: Any, low: Any, w: np.ndarray, target: Any) -> dict[str, Any]:
    """Stand-alone PrimFuncs of a ``rows``/``rows8`` variant for the weights ``w``
    (``rows_stage_funcs``; ``rows8``: the exact part as ``exact_<stage>``)."""
    funcs = rows_stage_funcs(spec, w, low.isa, low.bias, low.variant.kind == "rows8", low.fit.classes)[1]
    if low.variant.kind == "rows8":
        ex = low.exact
        funcs.update({f"exact_{k}": f for k, f in ex.variant.stages(spec, ex, w, target).items()})
    return funcs


def bench_run(built: Any, prefix: str, spec: Any, low: Any, x: Any, w: np.ndarray, lut: np.ndarray, repeat: int = 0,
              threads: int | None = None) -> tuple[np.ndarray, float]:
    """Run a ``rows``/``rows8`` variant built from ``bench_stages``: (acc, summed best ms of the stages or 0)."""
    residual = low.variant.kind == "rows8"
    layout = rows_layout(w, spec.signed, spec.ho * spec.wo, low.isa, residual, spec.groups, low.fit.classes)
    acc, ms = run_rows_conv(built, prefix, layout, x, np.asarray(lut, np.int32), spec, low.bias, repeat, threads)
    if residual:
        ex = low.exact
        acc_x, ms_x = ex.variant.run(built, prefix + "exact_", spec, ex, x, w,
                                     exact_table(spec.signed).astype(np.int32), repeat, threads)
        acc, ms = acc + acc_x, ms + ms_x
    return acc, ms
