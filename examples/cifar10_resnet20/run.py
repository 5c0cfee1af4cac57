"""CIFAR-10 / ResNet-20: the digits end-to-end flow (train -> QoS-Nets search, 3 circuits / 3 OPs ->
BN-only fine-tune -> qos-compile for aarch64 -> OP-switching stream under qemu -> qos-nets bench).

    .venv/bin/python examples/cifar10_resnet20/run.py --data-dir DIR [--out runs/cifar10] [--fast]

DIR holds the CIFAR-10 python batches (data_batch_1..5 and test_batch, either directly or in
DIR/cifar-10-batches-py; https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz). Nothing is
downloaded. Full training of ResNet-20 on CIFAR-10 takes hours on 2 cores; --fast is a smoke run.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True, help="folder with the CIFAR-10 python batches")
    ap.add_argument("--out", default="runs/cifar10")
    ap.add_argument("--fast", action="store_true", help="tiny epochs and sample counts (smoke test)")
    ap.add_argument("--target", default="arm")
    a = ap.parse_args()
    d = Path(a.data_dir)
    if not any((p / "data_batch_1").is_file() and (p / "test_batch").is_file() for p in (d, d / "cifar-10-batches-py")):
        print(f"error: {d} does not hold the CIFAR-10 python batches (data_batch_1..5, test_batch, directly or in "
              f"{d}/cifar-10-batches-py); get cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
              "and unpack it there", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("digits_flow", HERE.parent / "digits_end_to_end" / "run.py")
    flow = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flow)
    return flow.main(["--model", "resnet20", "--dataset", "cifar10", "--data-dir", str(d), "--n", "3",
                      "--out", a.out, "--target", a.target] + (["--fast"] if a.fast else []))


if __name__ == "__main__":
    sys.exit(main())
