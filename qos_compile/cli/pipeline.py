"""`qos-nets pipeline`: float → QAT → AGN → search → BN-only fine-tune (→ full-retraining baseline) → model.pt.

Each stage's result is cached in the work folder (default ``<output>.work/``) under a hash
of the arguments it depends on, so a rerun resumes and a changed argument recomputes
only the stages it affects; ``--fresh`` recomputes everything.
"""
from __future__ import annotations

import argparse
import json
import sys

from .stages import (add_common_args, add_data_args, add_finetune_args, add_model_args, add_search_args,
                     add_train_args, diverged_as_error, log, one_line_errors, overrides, setup_threads)


def _run(args: argparse.Namespace) -> int:
    from ..pipeline import PipelineConfig, check_output_path, resolve_multipliers, run_pipeline

    ov = {k: v for k, v in overrides(args).items() if v is not None}
    cfg = PipelineConfig(model=args.model, dataset=args.dataset, data_dir=args.data_dir, per_channel=args.per_channel,
                         **ov).resolved()
    check_output_path(args.output)
    resolve_multipliers(cfg.multipliers)  # bad names fail before any work
    setup_threads(args)
    res = run_pipeline(cfg, args.output, args.work_dir, fresh=args.fresh, progress=not args.no_progress, log=log)
    meta = res.meta
    from ..train.distributed import is_main

    if args.plot and is_main():  # under torchrun rank 0 writes every file
        from ..plots import plot_operating_points
        from ..pipeline import _final_rows

        rows = _final_rows(res.qnet, meta)
        base = ((meta.get("baseline") or {}).get("qat_exact") or {}).get("test")
        series = [("before fine-tuning", [((o.get("before_finetune") or {}).get("test") or {}).get("top1")
                                          for o in meta["ops"]])]
        if any(o.get("full_retrain") for o in meta["ops"]):
            series.append(("full retraining per OP (baseline)",
                           [((o.get("full_retrain") or {}).get("test") or {}).get("top1") for o in meta["ops"]]))
        plot_operating_points(rows, args.plot, base, f"{cfg.model} on {cfg.dataset}: test top-1 per OP", series,
                              label="BN-only fine-tuned OPs (model.pt)")
    if args.json:
        print(json.dumps({"output": str(args.output), "seconds": round(res.seconds, 2), "cached": res.cached,
                          "ops": meta["ops"], "baseline": meta.get("baseline"),
                          "param_overhead": meta["finetune"]["param_overhead"],
                          "misfits": meta["search"]["misfits"], "agreement": meta["search"]["agreement"]},
                         indent=2, allow_nan=False))
        return 0
    print(f"{cfg.model} on {cfg.dataset} (test split, {meta['baseline']['qat_exact']['test']['count']} samples); "
          f"relative power = multiplication power vs the exact 8x8 multiplier")
    print(res.table)
    ov_rep = meta["finetune"]["param_overhead"]
    print(f"parameter overhead of {ov_rep['num_ops']} OPs: {ov_rep['bn_affine_pct']:.3f}% (BatchNorm affine only, "
          f"the paper's definition), {ov_rep['bn_affine_and_bias_pct']:.3f}% (BatchNorm affine + per-OP biases)")
    mis = meta["search"]["misfits"]
    if mis:
        print("misfits (circuit above its scaled tolerance after clustering): "
              + ", ".join(f"OP{m['op']}/{m['layer']} r={m['ratio']:.2f}" for m in mis))
    ag = meta["search"].get("agreement") or {}
    if ag.get("n"):
        print(f"error prediction vs Monte-Carlo: {ag['n']} pairs, spearman(log) {ag.get('spearman_log') or 0:.3f}, "
              f"median ratio {ag.get('median_ratio') or 0:.3f}, within 2x {100 * (ag.get('within_2x') or 0):.0f}%")
    print(f"wrote {args.output} in {res.seconds:.1f} s"
          + (f" (cached stages: {', '.join(res.cached)})" if res.cached else ""))
    return 0


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register `pipeline`."""
    p = one_line_errors(sub.add_parser(
        "pipeline", help="the whole QoS-Nets flow to a model.pt",
        description="Float training (or your trained --weights), QAT, noise tolerance (AGN), error prediction and "
                    "operating points, BN-only fine-tuning of every OP; writes model.pt and prints the per-OP table. "
                    "The model is a zoo model or your own (--model FILE.py:FUNC), the data built-in or your own "
                    "(--dataset npz:FILE or imagefolder:DIR). Stages are cached in the work folder, so a rerun "
                    "resumes."))
    add_model_args(p)
    add_data_args(p, required=True)
    add_search_args(p, defaults=True)
    add_train_args(p)
    add_finetune_args(p)
    add_common_args(p)
    p.add_argument("-o", "--output", required=True, help="the model.pt to write")
    p.add_argument("--work-dir", help="stage cache folder (default: <output>.work next to the output)")
    p.add_argument("--fresh", action="store_true", help="recompute every stage, ignoring the cache")
    p.add_argument("--plot", metavar="PNG", help="also write the accuracy-vs-power plot")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of the table")
    p.set_defaults(func=diverged_as_error(_run))


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: qos-nets pipeline ...")
