"""Is PyTorch's accuracy the device's? PyTorch inference of a model.pt against onnxruntime on
its exported ONNX model, per OP, over the recorded dataset's test split plus random inputs.

    python -m qos_compile.bench.agreement model.pt [--samples N] [--random N] [--threads T]

Prints, per OP, how many inputs give outputs that differ in any bit, the largest logit
difference and the top-1 agreement. The compiled runtime (qos-run on every target) is
bit-identical to onnxruntime (``qos-compile``'s verify stage and the tests check that), so
"0 differ" means ``qos-nets eval`` reports exactly what the device computes. Networks with
sigmoid/tanh/SiLU differ by each runtime's own ``exp``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import QosError
from .host import host_line


def agreement(model_pt: str, samples: int | None = None, random: int = 64, threads: int = 1,
              seed: int = 0, dataset: str | None = None, data_dir: str | None = None,
              image_size: Any = None) -> list[dict[str, Any]]:
    """Per OP: ``{"op", "inputs", "differ", "max_abs_diff", "top1_agree"}`` (see the module doc);
    the data is the model's recorded dataset unless ``dataset`` (``--dataset``) names another."""
    import torch

    from ..onnx import export_onnx, run_onnxruntime
    from ..pipeline import data_from_meta
    from ..qosmodel import load_qos_model

    qnet, meta = load_qos_model(model_pt)
    x = data_from_meta(meta, dataset, data_dir, image_size).test.tensors[0]
    if samples is not None:
        x = x[:samples]
    if random:
        lo, hi = float(x.min()), float(x.max())
        rng = np.random.default_rng(seed)
        noise = rng.uniform(lo, hi, (random, *x.shape[1:])).astype(np.float32)
        x = torch.cat([x, torch.from_numpy(noise)])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(qnet, path)
        qnet.eval()
        for op in range(qnet.num_ops):
            qnet.set_operating_point(op)
            with torch.no_grad():
                t = qnet(x).numpy()
            o = run_onnxruntime(path, x.numpy(), op, batch_size=64, threads=threads)
            rows.append({"op": op, "inputs": len(x), "differ": int(np.any(t != o, axis=1).sum()),
                         "max_abs_diff": float(np.max(np.abs(t - o))),
                         "top1_agree": float(np.mean(t.argmax(1) == o.argmax(1)))})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", metavar="MODEL.pt")
    ap.add_argument("--samples", type=int, help="test samples (default: the whole test split)")
    ap.add_argument("--random", type=int, default=64, help="random inputs over the data's range (default 64)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dataset", help="evaluate on this dataset instead of the model's recorded one")
    ap.add_argument("--data-dir")
    ap.add_argument("--input-size", type=int, help="input side with --dataset")
    a = ap.parse_args(argv)
    try:
        rows = agreement(a.model, a.samples, a.random, a.threads, dataset=a.dataset, data_dir=a.data_dir,
                         image_size=a.input_size)
    except QosError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(host_line())
    print(f"# PyTorch inference vs onnxruntime, {a.model}")
    print("| OP | inputs | outputs that differ | max abs diff | top-1 agreement |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['op']} | {r['inputs']} | {r['differ']} | {r['max_abs_diff']:.4g} | {100 * r['top1_agree']:.2f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
