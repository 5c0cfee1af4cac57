"""Forward-pass speed of the approximate-multiplier emulation on ResNet-20 (CIFAR shapes).

    python -m qos_compile.bench.emulation_speed [--threads N] [--batch 32] [--repeats 5] [--emulation auto|native|torch]

Times (median over ``--repeats`` runs, interleaved round-robin so every row sees the same
machine load; inference: eval mode, no grad) one forward pass
of ResNet-20 at 32x32 with 10 classes in FLOAT mode, QUANT mode (exact 8-bit), and
APPROX mode with every layer on one circuit: the exact circuit, low-rank circuits
(signed mul8s_1KR6, unsigned mul8u_1446) and full-rank unsigned circuits (mul8u_12N4,
mul8u_L40); then the same layers through the straightforward per-element lookup
(``lut[w, x]`` gathered per chunk and summed). Prints a Markdown table.

``--emulation`` selects how the general (full-rank) circuits run (``emulation.table_backend``):
the C kernel (``native``; ``auto`` on the CPU) or pure torch (``torch``); the other strategies
are torch either way.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import QosError
from ..models import build_model
from ..multipliers import bundled, get
from ..nn import Mode, QoSNet, QuantConfig, wrap_model
from ..nn.emulation import EMULATIONS, force_strategy, table_backend, use_emulation
from ..nn.kernels import simd_enabled

LOWRANK = {"unsigned": "mul8u_1446", "signed": "mul8s_1KR6"}
FULLRANK = ("mul8u_12N4", "mul8u_L40")


@dataclass
class _Case:
    """One row: ``setup()`` (untimed) then ``run()`` timed ``repeats`` times."""

    setup: Callable[[], None]
    run: Callable[[], object]
    repeats: int
    warm_up: bool = True


def _interleaved_medians(cases: Sequence[_Case]) -> list[float]:
    """Median milliseconds of each case, timed round-robin so that every case sees the same
    machine conditions (the cores may be shared with other work)."""
    for case in cases:
        if case.warm_up:  # kernel build, oneDNN primitive creation, caches
            case.setup()
            case.run()
    times: list[list[float]] = [[] for _ in cases]
    for r in range(max(c.repeats for c in cases)):
        for case, acc in zip(cases, times):
            if r < case.repeats:
                case.setup()
                t0 = time.perf_counter()
                case.run()
                acc.append(time.perf_counter() - t0)
    return [1e3 * statistics.median(t) for t in times]


def _prepared(signed: bool, circuits: Sequence[str], x: torch.Tensor) -> QoSNet:
    """ResNet-20 wrapped with the exact circuit + ``circuits``, observers calibrated, eval mode."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10)
    mults = [bundled().exact(signed), *(get(n) for n in circuits)]
    net = wrap_model(model, mults, num_ops=1, qconfig=QuantConfig(signed=signed), input_shape=tuple(x.shape[1:]))
    net.set_mode(Mode.QUANT)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(x)
    net.eval()
    return net


def _case(net: QoSNet, x: torch.Tensor, mode: Mode, repeats: int, circuit: int = 0,
          strategy: str | None = None) -> _Case:
    """A forward pass of ``net`` with every layer on bank entry ``circuit`` in ``mode``."""
    def setup() -> None:
        net.set_mode(mode)
        net.set_assignment([[circuit] * len(net.approx_layers())])

    def run() -> object:
        with force_strategy(strategy):
            return net(x)

    return _Case(setup, run, repeats, warm_up=strategy is None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(prog="python -m qos_compile.bench.emulation_speed", description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch/OpenMP threads (default: all cores)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per row (median reported)")
    ap.add_argument("--lookup-repeats", type=int, default=3, help="timed runs of the slow straightforward lookup")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--emulation", choices=EMULATIONS, default="auto",
                    help="backend of the general circuits: auto (C kernel on the CPU), native (C kernel), torch")
    args = ap.parse_args(argv)
    if min(args.threads, args.batch, args.repeats, args.lookup_repeats) < 1:
        ap.error("--threads, --batch, --repeats and --lookup-repeats must be >= 1")
    torch.set_num_threads(args.threads)
    with use_emulation(args.emulation):  # this thread only: an in-process caller keeps its own setting
        try:
            backend = table_backend("cpu")
        except QosError as e:
            ap.error(str(e))
        return _run(args, backend)


def _run(args: argparse.Namespace, backend: str) -> int:
    """Time every row with the general circuits on ``backend`` ("native" or "torch")."""
    x = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed))
    print(f"ResNet-20 (qos_compile.models), input {args.batch}x3x32x32, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, lookup kernel AVX-512 VBMI: {simd_enabled()}, "
          f"emulation {args.emulation} (general circuits: {'C kernel' if backend == 'native' else 'pure torch'})\n")

    rows: list[tuple[str, str, str]] = []  # kind, forward pass, strategy
    cases: list[_Case] = []
    for signed in (False, True):
        kind = "signed" if signed else "unsigned"
        net = _prepared(signed, [LOWRANK[kind], *(FULLRANK if not signed else ())], x)
        if not signed:
            rows.append((kind, "float", "FLOAT"))
            cases.append(_case(net, x, Mode.FLOAT, args.repeats))
        rows.append((kind, f"quant ({kind})", "QUANT"))
        cases.append(_case(net, x, Mode.QUANT, args.repeats))
        for i, name in enumerate(net.bank.names):
            plan = net.bank.plan(i)
            via = f", {backend}" if plan.strategy == "general" else ""
            rows.append((kind, f"approx {name}", plan.describe() + via))
            cases.append(_case(net, x, Mode.APPROX, args.repeats, i))
        rows.append((kind, f"approx ({kind}), straightforward lookup", "per-element lut[w, x] gather"))
        cases.append(_case(net, x, Mode.APPROX, args.lookup_repeats, 1, "lookup"))
    with torch.no_grad():
        times = _interleaved_medians(cases)
    table = [(*row, ms) for row, ms in zip(rows, times)]

    quant = {k: ms for k, name, _, ms in table if name.startswith("quant")}
    lookup = {k: ms for k, name, _, ms in table if "straightforward" in name}
    print("| forward pass | strategy | ms / batch | vs QUANT | straightforward lookup / this |")
    print("| --- | --- | ---: | ---: | ---: |")
    for kind, name, strategy, ms in table:
        print(f"| {name} | {strategy} | {ms:.1f} | {ms / quant[kind]:.2f}x | {lookup[kind] / ms:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
