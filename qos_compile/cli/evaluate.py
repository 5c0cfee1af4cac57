"""`qos-nets eval model.pt`: per-OP accuracy on the held-out test split, relative power, savings, circuits."""
from __future__ import annotations

import argparse
import json

from .stages import log, one_line_errors, setup_threads


def _eval(args: argparse.Namespace) -> int:
    from ..errors import QosError
    from ..pipeline import data_from_meta, evaluate_qos_model, format_table
    from ..qosmodel import load_qos_model

    if args.plot:
        from pathlib import Path

        parent = Path(args.plot).resolve().parent
        if not parent.is_dir():
            raise QosError(f"cannot write {args.plot}: folder {parent} does not exist")
    setup_threads(args)
    qnet, meta = load_qos_model(args.model)
    recorded = ((meta.get("provenance") or {}).get("dataset") or {})
    splits = data_from_meta(meta, args.dataset, args.data_dir)
    same = args.dataset is None or str(args.dataset).strip().lower() == str(recorded.get("name", "")).lower()
    same = same and args.data_dir is None
    if splits.in_channels != meta["input_shape"][0] or splits.image_size != meta["input_shape"][1]:
        raise QosError(f"dataset {splits.name} has {splits.in_channels}x{splits.image_size}x{splits.image_size} "
                       f"images but the model takes {'x'.join(map(str, meta['input_shape']))}")
    if splits.num_classes != int(meta["arch"]["num_classes"]):
        raise QosError(f"dataset {splits.name} has {splits.num_classes} classes but the model {meta['arch']['num_classes']}")
    report = evaluate_qos_model(qnet, meta, splits, args.split, same_data=same)
    report["file"] = str(args.model)
    report["stage"] = meta.get("stage")
    if args.plot:
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


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register `eval`."""
    p = one_line_errors(sub.add_parser(
        "eval", help="accuracy and power of every operating point of a model.pt",
        description="Evaluate every OP of a QoS model on the held-out test split (bit-exact approximate "
                    "multipliers), with relative multiplication power and savings."))
    p.add_argument("model", metavar="MODEL.pt", help="a QoS model (qos-nets pipeline/finetune output)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--plot", metavar="PNG", help="write accuracy against relative power as a PNG")
    p.add_argument("--dataset", help="evaluate on this dataset instead of the recorded one")
    p.add_argument("--data-dir", help="folder holding the dataset")
    p.add_argument("--split", choices=("test", "val"), default="test", help="which split (default test)")
    p.add_argument("--threads", type=int, help="CPU threads")
    p.set_defaults(func=_eval)
