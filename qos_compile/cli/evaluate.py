"""`qos-nets eval model.pt`: per-OP accuracy on the held-out test split, relative power, savings, circuits."""
from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from .stages import (add_data_args, add_device_arg, add_emulation_arg, log, one_line_errors, runtime_scoped,
                     setup_threads)

if TYPE_CHECKING:
    from ..model_schema import ModelMeta


def _eval(args: argparse.Namespace) -> int:
    from ..errors import QosError
    from ..pipeline import data_from_meta, evaluate_qos_model, format_table
    from ..qosmodel import load_qos_model

    if args.plot:
        from pathlib import Path

        parent = Path(args.plot).resolve().parent
        if not parent.is_dir():
            raise QosError(f"cannot write {args.plot}: folder {parent} does not exist")
    setup_threads(args)  # and --emulation, --device
    from ..train.distributed import current, is_main

    qnet, meta = load_qos_model(args.model)
    qnet.to(current().device)
    from ..data import canonical_dataset_name

    recorded = meta.dataset.name if meta.dataset is not None else None
    splits = data_from_meta(meta, args.dataset, args.data_dir, args.image_size, args.normalize)
    same = args.dataset is None or (canonical_dataset_name(args.dataset, absolute=True)
                                    == canonical_dataset_name(str(recorded or ""), absolute=True))
    same = same and args.data_dir is None and args.image_size is None and args.normalize is None
    want = list(meta.input_shape)
    if list(splits.input_shape) != want:
        raise QosError(f"dataset {splits.name} has {'x'.join(map(str, splits.input_shape))} images but the model "
                       f"takes {'x'.join(map(str, want))}")
    classes = _num_classes(qnet, meta, splits)
    if splits.num_classes != classes:
        raise QosError(f"dataset {splits.name} has {splits.num_classes} classes but the model {classes}")
    report = evaluate_qos_model(qnet, meta, splits, args.split, same_data=same)
    report["file"] = str(args.model)
    report["stage"] = meta.stage
    if args.plot and is_main():
        from ..plots import plot_operating_points

        title = f"{report['model']} on {report['dataset']} ({args.split} split): accuracy per operating point"
        plot_operating_points(report["ops"], args.plot, report["baseline"], title)
        report["plot"] = str(args.plot)
    if args.json:
        print(json.dumps(report, indent=2, allow_nan=False))
        return 0
    print(f"{args.model}: {report['model']}, {qnet.num_ops} OP(s), {report['dataset']} {args.split} split "
          f"({report['samples']} samples); relative power = multiplication power vs the exact 8x8 multiplier")
    print(format_table(report["ops"], report["baseline"]))
    if report["baseline"] is None:
        print("(no exact baseline: the data differ from the ones the model was made with)")
    if args.plot:
        log(f"wrote {args.plot}")
    return 0


def _num_classes(qnet: Any, meta: ModelMeta, splits: Any) -> int:
    """The model's class count: recorded (a per-sample output of rank 1), else the width of its
    output on one sample."""
    import torch

    if meta.num_classes is not None:
        return meta.num_classes
    x, _ = splits.test[[0]]
    with torch.no_grad():
        return int(qnet(x.to(next(iter(qnet.parameters())).device)).shape[-1])


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register `eval`."""
    p = one_line_errors(sub.add_parser(
        "eval", help="accuracy and power of every operating point of a model.pt",
        description="Evaluate every OP of a QoS model on the held-out test split (bit-exact approximate "
                    "multipliers), with relative multiplication power and savings."))
    p.add_argument("model", metavar="MODEL.pt", help="a QoS model (qos-nets pipeline/finetune output)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--plot", metavar="PNG", help="write accuracy against relative power as a PNG")
    add_data_args(p, required=False)
    p.add_argument("--split", choices=("test", "val"), default="test", help="which split (default test)")
    p.add_argument("--threads", type=int, help="CPU threads")
    add_emulation_arg(p)
    add_device_arg(p)
    p.set_defaults(func=runtime_scoped(_eval))
