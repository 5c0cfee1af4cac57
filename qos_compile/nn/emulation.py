"""How to emulate one multiplier circuit fast: one plan per table, from its structure.

The table's structure (``multipliers.structure.analyse``, NumPy only and shared with the
compiler) writes it as a sum of ``T`` separable terms,
``denom * lut[a, b] = sum_t wterms[t, a] * xterms[t, b]`` (``a`` = weight index, ``b`` =
activation index), verified on all 65,536 entries. The emulation evaluates it with ordinary
float convolutions over the transformed operands ``wterms[t][w]`` and ``xterms[t][x]`` when
that is cheap; the strategy is the structure's kind:

* ``exact``   - ``lut == a*b``: one term, ``code(a) * code(b)``.
* ``masked``  - ``lut == (a & mask) * b``: one term on masked weight codes.
* ``lowrank`` - the exact product plus factor pairs of the error table, or the table's own
  factors (the three signed circuits of table rank 1 become a single convolution), as long
  as the number of terms stays below what the general kernel costs on this machine
  (``max_lowrank_terms``).
* ``general`` - everything else: a table lookup per product (C kernel or ``functional.table_conv``).

Whether the float convolutions that evaluate a plan are exact for a given layer (all
partial sums integers below 2**24 in float32) is checked per call in ``functional``, which
splits or widens the convolution when the bound fails.

Every strategy runs on the tensors' own device (CPU, CUDA, ...). The emulation backend
(``set_emulation`` / ``use_emulation``, the CLI's ``--emulation``) only chooses how the
*general* strategy is evaluated; the float-convolution strategies are torch convolutions
everywhere (on CPU tensors helped by the C quantize/expand kernels, whatever the choice):

* ``auto``   - the C kernel (``kernels.lut_gemm``) for CPU tensors when it can be built,
  else the pure torch path;
* ``native`` - always the C kernel: a QosError for tensors off the CPU or without a C
  compiler;
* ``torch``  - always the pure torch path (``functional.table_conv``), bit-exact with the
  C kernel.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..errors import QosError
from ..multipliers import structure
from ..multipliers.multiplier import Multiplier
from ..multipliers.table import table_sha256, validate_table
from ..numerics import code_offset
from . import kernels

#: The strategies are the table structures (``multipliers.structure.KINDS``).
STRATEGIES = structure.KINDS


@dataclass(frozen=True, eq=False)
class EmulationPlan(structure.Structure):
    """A circuit's verified ``structure.Structure`` (kind, factors, rank, mask) plus what the
    emulation needs besides: ``table``, the int32 table (general strategy), and its SHA-256."""

    table: np.ndarray
    sha256: str

    @property
    def strategy(self) -> str:
        """The emulation strategy: the structure's kind (one of ``STRATEGIES``)."""
        return self.kind

    @property
    def offset(self) -> int:
        """Table index of code 0."""
        return code_offset(self.signed)

    def describe(self) -> str:
        """One line for logs and reports."""
        if self.strategy == "masked":
            return f"masked (weight low {self.mask_bits} bits cleared)"
        if self.strategy == "lowrank":
            pairs = self.terms - self.main_term
            main = "code term + " if self.main_term else ""
            return f"lowrank ({main}{pairs} factor pair{'s' * (pairs != 1)}, denom {self.denom})"
        if self.strategy == "general":
            return f"general (error rank {self.rank})"
        return self.strategy


def max_lowrank_terms() -> int:
    """Most stacked convolution terms for which a low-rank plan beats the general path here.

    Measured on ResNet-20 (batch 32, 2 cores, AVX-512): every term costs ~15-20 ms of
    float32 convolution and expansion; the AVX-512 VBMI lookup kernel costs ~65 ms over
    the exact plan (break-even at 4 terms), the portable C kernel ~5x that; with the pure
    torch path (``--emulation torch``, or no C compiler) the break-even is at 6 terms
    (batch 32, one thread: a 5-term plan 186 ms, the general path 240-320 ms, 7 terms 267 ms).
    """
    if emulation_backend() == "torch" or kernels.load() is None:
        return 6
    return 4 if kernels.simd_enabled() else 16


def _plan(table: np.ndarray, signed: bool, sha: str, max_terms: int) -> EmulationPlan:
    s = structure.analyse(table, signed, max_terms)
    frozen = np.array(table, dtype=np.int32)
    frozen.flags.writeable = False
    return EmulationPlan(**{f.name: getattr(s, f.name) for f in dataclasses.fields(s)}, table=frozen, sha256=sha)


_PLANS: dict[tuple[str, bool, int], EmulationPlan] = {}  # by (table SHA-256, signed, max_terms)


def plan_for(lut: Multiplier | np.ndarray | torch.Tensor, signed: bool | None = None,
             max_terms: int | None = None) -> EmulationPlan:
    """The verified emulation plan of a circuit or table (cached by SHA-256 and signedness).

    ``signed`` is required for a bare table and must agree with a Multiplier's;
    ``max_terms``: most convolution terms of a low-rank plan (default: what pays off with
    this machine's kernels, ``max_lowrank_terms()``).
    """
    if isinstance(lut, Multiplier):
        if signed is not None and signed != lut.signed:
            raise QosError(f"signed={signed} contradicts circuit {lut.name}")
        table, signed, sha = lut.lut, lut.signed, lut.sha256
    else:
        if signed is None:
            raise QosError("pass signed=True/False with a bare multiplier table")
        if isinstance(lut, torch.Tensor):
            lut = lut.detach().cpu().numpy()
        table = validate_table(lut)
        sha = table_sha256(table)
    key = (sha, bool(signed), max_lowrank_terms() if max_terms is None else int(max_terms))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _plan(table, key[1], sha, key[2])
    return plan


_forced = threading.local()


def forced_strategy() -> str | None:
    """The strategy override of this thread (see ``force_strategy``), or None."""
    return getattr(_forced, "name", None)


@contextlib.contextmanager
def force_strategy(name: str | None) -> Iterator[None]:
    """Route every table through one path, for tests and the benchmark.

    ``"general"``: the table path (C kernel or torch, as ``table_backend`` decides);
    ``"lookup"``: the straightforward chunked per-element ``lut[w, x]`` gather in torch
    (``functional.lookup_gemm``, the benchmark's baseline); None: each plan's own strategy.
    """
    if name not in (None, "general", "lookup"):
        raise QosError(f"unknown forced strategy {name!r}; use 'general', 'lookup' or None")
    old = forced_strategy()
    _forced.name = name
    try:
        yield
    finally:
        _forced.name = old


# --- emulation backend of the general strategy ----------------------------------------

#: ``--emulation`` choices (see the module docstring).
EMULATIONS = ("auto", "native", "torch")

#: Environment variable holding the process setting, so that worker processes started by
#: ``multiprocessing`` (spawn) or a launcher inherit the parent's choice.
EMULATION_ENV = "QOS_EMULATION"

_thread_emulation = threading.local()


def _check_emulation(name: str) -> str:
    if name not in EMULATIONS:
        raise QosError(f"unknown emulation {name!r}; use one of {', '.join(EMULATIONS)}")
    return name


def set_emulation(name: str) -> None:
    """Select the general strategy's backend for the whole process: ``auto``, ``native`` or
    ``torch`` (the CLI's ``--emulation``; threads inside ``use_emulation`` keep their own).
    Stored in ``$QOS_EMULATION``, which child processes inherit."""
    os.environ[EMULATION_ENV] = _check_emulation(name)


def emulation_backend() -> str:
    """The selected backend of this thread: its ``use_emulation`` override, else the process
    setting (``set_emulation``, or ``$QOS_EMULATION``; default ``auto``)."""
    name = getattr(_thread_emulation, "name", None)
    if name is not None:
        return name
    value = os.environ.get(EMULATION_ENV, "").strip() or "auto"
    if value not in EMULATIONS:
        raise QosError(f"${EMULATION_ENV}={value!r} is not one of {', '.join(EMULATIONS)}")
    return value


@contextlib.contextmanager
def use_emulation(name: str | None) -> Iterator[None]:
    """Select the general strategy's backend for this thread inside the block (None: the
    process setting)."""
    if name is not None:
        _check_emulation(name)
    old = getattr(_thread_emulation, "name", None)
    _thread_emulation.name = name
    try:
        yield
    finally:
        _thread_emulation.name = old


def table_backend(device: torch.device | str) -> str:
    """How the general strategy runs for tensors on ``device`` under the current selection:
    ``"native"`` (the C kernel) or ``"torch"``; ``native`` on another device than the CPU, or
    without a usable C kernel, is a QosError."""
    dev = torch.device(device)
    choice = emulation_backend()
    if choice == "torch":
        return "torch"
    if dev.type != "cpu":
        if choice == "native":
            raise QosError(f"emulation 'native' (--emulation native) runs the C kernel on the CPU only, but the "
                           f"tensors are on {dev}; use --emulation auto or torch")
        return "torch"
    if kernels.load() is None:
        if choice == "native":
            raise QosError("emulation 'native' (--emulation native): the C kernel cannot be built or loaded here "
                           "(see the warning above, or QOS_COMPILE_NO_CKERNEL); use --emulation auto or torch")
        return "torch"
    return "native"
