"""Does the cost of switching operating points grow with the model? (a benchmark, not a test)

    python -m qos_compile.bench.switch_cost [--target x86_64] [--calls 10000000]

Builds two 3-OP QoS networks of very different size (ResNet-8 and ResNet-32, 32x32, untrained,
calibrated on random data: accuracy is irrelevant here), compiles both with ``qos-compile`` and
prints the ns per ``qos_select`` that ``qos-run --switch-bench`` measures for each, with their
size in bytes and layer count. Under qemu the times are emulated (labelled so).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from ..models import build_model
from ..multipliers import get
from ..nn import Mode, wrap_model
from ..qosmodel import save_qos_model
from ..targets import get_target
from .host import host_line

CIRCUITS = ("mul8u_1JFF", "mul8u_2P7", "mul8u_1446")


def _checkpoint(name: str, path: Path) -> int:
    torch.manual_seed(0)
    qnet = wrap_model(build_model(name, 10, 3, 32), [get(c) for c in CIRCUITS], num_ops=3,
                      input_shape=(3, 32, 32))
    n = len(qnet.approx_layers())
    qnet.set_assignment([[op] * n for op in range(3)])
    qnet.train()
    with torch.no_grad():
        qnet(torch.randn(16, 3, 32, 32))          # calibrate the observers
    qnet.eval()
    qnet.set_mode(Mode.APPROX)
    save_qos_model(path, qnet, {"dataset": {"name": "random"}})
    return n


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="x86_64")
    ap.add_argument("--calls", type=int, default=10_000_000)
    a = ap.parse_args(argv)
    target = get_target(a.target)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("resnet8", "resnet32"):
            ckpt, out = Path(tmp) / f"{name}.pt", Path(tmp) / f"{name}-out"
            layers = _checkpoint(name, ckpt)
            subprocess.run([sys.executable, "-m", "qos_compile.cli.compile", str(ckpt), "--target", target.name,
                            "-o", str(out), "--no-verify"], check=True, capture_output=True)
            p = subprocess.run([*target.run_prefix(), str(out / "qos-run"), str(out / "model.qosm"),
                                "--switch-bench", str(a.calls)], check=True, capture_output=True, text=True)
            ns = float(p.stdout.split("qos_select: ")[1].split(" ns")[0])
            size = json.loads((out / "report.json").read_text()).get("sizes", {}).get("model.qosm")
            rows.append((name, layers, (out / "model.qosm").stat().st_size if size is None else size, ns))
    label = " (EMULATED under qemu)" if not target.is_host else ""
    print(host_line())
    print(f"| model | approx layers | model.qosm bytes | ns per qos_select{label} |")
    print("| --- | ---: | ---: | ---: |")
    for name, layers, size, ns in rows:
        print(f"| {name} | {layers} | {size} | {ns:.2f} |")
    print(f"ratio resnet32 / resnet8: {rows[1][3] / rows[0][3]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
