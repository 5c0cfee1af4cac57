"""How far does the integer epilogue (numerics contract v2) move accuracy? PyTorch inference of
a model.pt per OP over its recorded dataset's test split, once with the float epilogue of
contract v1 after every layer (``nn.float_epilogues()``) and once as the device computes it
now (integer requantization between directly connected layers, in residual adds and global
average pools, and the output as one float32 multiply of an integer; docs/design.md section 3.7).

    python -m qos_compile.bench.epilogue model.pt [--json]

Prints, per OP, both top-1 accuracies, their difference, and on how many test inputs the
predicted class or any output bit changed. Training is unchanged (float, straight-through).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from ..errors import QosError


def compare(model_pt: str, dataset: str | None = None, data_dir: str | None = None,
            image_size: int | None = None) -> dict[str, Any]:
    """``{"layers", "integer_layers", "output_layers", "samples", "ops": [{"op", "top1_float",
    "top1_integer", "delta", "changed_prediction", "changed_output"}]}`` for ``model_pt``'s test
    split (``integer_layers``: those that requantize into the next layer's codes;
    ``output_layers``: the network outputs of the form ``float32(q + B) * s``)."""
    import torch

    from ..nn import Mode
    from ..nn import float_epilogues
    from ..pipeline import data_from_meta
    from ..qosmodel import load_qos_model

    qnet, meta = load_qos_model(model_pt)
    x, y = data_from_meta(meta, dataset, data_dir, image_size).test.tensors[:2]
    qnet.eval()
    qnet.set_mode(Mode.APPROX)
    rows = []
    with torch.no_grad():
        for op in range(qnet.num_ops):
            qnet.set_operating_point(op)
            out_int = torch.cat([qnet(x[i:i + 256]) for i in range(0, len(x), 256)])
            with float_epilogues():
                out_float = torch.cat([qnet(x[i:i + 256]) for i in range(0, len(x), 256)])
            top_i, top_f = out_int.argmax(1), out_float.argmax(1)
            t1i = 100.0 * int((top_i == y).sum()) / len(y)        # exact counts (a float32 mean is
            t1f = 100.0 * int((top_f == y).sum()) / len(y)        # off by more than one sample's 1e-7)
            rows.append({"op": op, "top1_float": t1f, "top1_integer": t1i, "delta": t1i - t1f,
                         "changed_prediction": int((top_i != top_f).sum()),
                         "changed_output": int((out_int != out_float).flatten(1).any(1).sum())})
    links = len(qnet.__dict__.get("_requant_links") or {}) + len(qnet.__dict__.get("_residual_links") or {})
    outputs = len(qnet.__dict__.get("_output_layers") or ())
    return {"layers": len(qnet.approx_layers()), "integer_layers": links, "output_layers": outputs,
            "samples": int(len(x)), "ops": rows}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qos_compile.bench.epilogue", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a model.pt (qos-nets pipeline's output)")
    ap.add_argument("--dataset", help="evaluate on another dataset than the recorded one")
    ap.add_argument("--data-dir", help="where --dataset's files are")
    ap.add_argument("--input-size", type=int, help="input side with --dataset")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    try:
        rep = compare(args.model, args.dataset, args.data_dir, args.input_size)
    except QosError as e:
        print(f"epilogue: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    print(f"{args.model}: {rep['integer_layers']} of {rep['layers']} approximate layers requantize in integers, "
          f"{rep['output_layers']} output layer(s) float32(q + B) * s; test split, {rep['samples']} samples")
    print("| OP | top-1, float epilogue (v1) | top-1, integer epilogue (v2) | change | predictions changed "
          "| outputs changed |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rep["ops"]:
        print(f"| {r['op']} | {r['top1_float']:.2f} | {r['top1_integer']:.2f} | {r['delta']:+.2f} | "
              f"{r['changed_prediction']} | {r['changed_output']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
