"""`qos-nets train|search|finetune`: the pipeline's stages one at a time, file to file.

* ``train``: float training (or ``--float-weights``) → QAT → AGN tolerance; writes a
  single-OP QoS model (stage ``agn``) that records the exact QAT baseline;
* ``search``: operand tracing, error prediction, OPs and power on a ``train`` output;
  writes the multi-OP QoS model before fine-tuning (stage ``search``);
* ``finetune``: BN-only fine-tuning of a ``search`` output (optionally the full-retraining
  comparison); writes the final ``model.pt``.

The dataset is the one recorded in the input file unless ``--dataset``/``--data-dir`` say
otherwise. Every output is written atomically; an existing output must be a QoS checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import QosError

#: The stages whose output each command accepts as input.
ACCEPTS = {"search": ("agn",), "finetune": ("search",)}


def one_line_errors(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make argparse report a bad argument as a QosError (``run_cli`` prints one line, exit 2)."""
    def error(message: str) -> None:  # argparse calls this and expects it not to return
        command = p.prog.split()[-1]
        raise QosError(f"{command}: {' '.join(str(message).split())} (see qos-nets {command} --help)")

    p.error = error  # type: ignore[method-assign]
    return p


def diverged_as_error(func: Any) -> Any:
    """Wrap a command so a diverging training (non-finite loss) is one QosError line, not a traceback."""
    import functools

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except FloatingPointError as e:
            raise QosError(f"training diverged: {e}; try a lower learning rate") from None

    return runtime_scoped(wrapper)


def scales_arg(text: str) -> tuple[float, ...]:
    """``0.3,1,2`` → (0.3, 1.0, 2.0); positive finite numbers only."""
    from ..search.search import check_scales

    try:
        parts = [s for s in text.split(",")]
        if any(not s.strip() for s in parts):
            raise ValueError
        return check_scales([float(s) for s in parts])
    except (ValueError, QosError):
        raise argparse.ArgumentTypeError(f"--scales wants positive numbers separated by commas, got {text!r}") from None


def input_size_arg(text: str) -> int | tuple[int, int]:
    """``16`` → 16; ``12x16`` → (12, 16) (height x width); every side 4..1024."""
    from ..data.core import check_image_size

    try:
        sides = [int(v) for v in text.lower().replace("x", " ").split()]
        if not 1 <= len(sides) <= 2 or text.strip().lower().count("x") != len(sides) - 1:
            raise ValueError
        return check_image_size(sides, None)  # type: ignore[no-any-return]
    except (ValueError, QosError):
        raise argparse.ArgumentTypeError(f"--input-size wants N or HxW with sides 4..1024, got {text!r}") from None


def normalize_arg(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``0.49,0.48,0.45:0.25,0.24,0.26`` → ((mean...), (std...)); one value each applies to every channel."""
    from ..pipeline import check_normalize

    try:
        mean, sep, std = text.partition(":")
        if not sep:
            raise ValueError
        return check_normalize(([float(v) for v in mean.split(",")], [float(v) for v in std.split(",")]))
    except (ValueError, QosError):
        raise argparse.ArgumentTypeError(f"--normalize wants MEAN:STD, comma lists of numbers (one per channel, "
                                         f"or one for all), std > 0, e.g. 0.5,0.5,0.5:0.25,0.25,0.25; "
                                         f"got {text!r}") from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model / --weights: the network the flow starts from (``pipeline`` and ``train``)."""
    p.add_argument("--model", default="resnet8", metavar="NAME|FILE.py:FUNC|MODULE:FUNC",
                   help="a zoo model (resnet8/14/20/32, mobilenetv2, lenet5; default resnet8), or your own: "
                        "FILE.py:FUNC or package.module:FUNC, where FUNC() returns your float torch.nn.Module. "
                        "This imports and runs your code, in this stage only: later stages, model.pt and "
                        "qos-compile keep its traced architecture and its weights, never the code")
    p.add_argument("--weights", "--float-weights", dest="float_weights", metavar="FLOAT.pt",
                   help="start from these trained float weights and skip float training: a state dict "
                        "(torch.save(model.state_dict(), FILE)), read with torch.load(weights_only=True)")


def add_data_args(p: argparse.ArgumentParser, required: bool) -> None:
    """--dataset / --data-dir / --input-size / --normalize (every stage; ``required``: the flow's
    first stage, where --dataset defaults to digits; later ones default to what the file records)."""
    p.add_argument("--dataset", default="digits" if required else None, metavar="NAME|npz:FILE|imagefolder:DIR",
                   help="digits (bundled), cifar10, cifar100, tinyimagenet, or your own files: npz:FILE.npz "
                        "(arrays x_train, y_train, x_test, y_test; x uint8 N,H,W / N,H,W,C or float32 N,C,H,W) "
                        "or imagefolder:DIR (DIR/train/<class>/*.png|jpg and DIR/test/<class>/...)"
                        + ("" if required else " (default: the one in the file)"))
    p.add_argument("--data-dir", help="folder holding a built-in dataset (default $QOS_DATA_DIR or ./data)")
    p.add_argument("--input-size", "--image-size", dest="image_size", type=input_size_arg, metavar="N|HxW",
                   help="resize images to N x N or H x W pixels (default: " +
                        ("the data's own size; digits 16)" if required else "the size the model was made with)"))
    p.add_argument("--normalize", type=normalize_arg, metavar="MEAN:STD",
                   help="per-channel input normalization x = (image - MEAN) / STD, image in [0, 1] (uint8 pixels "
                        "/ 255; float32 data as stored), comma lists, e.g. 0.49,0.48,0.45:0.25,0.24,0.26 or "
                        "0.5:0.25 (negative means: --normalize=-0.1:0.5). Recorded in model.pt and the compiled "
                        "model (default: " + ("computed on the training split)" if required else
                                             "the model's recorded normalization)"))


def add_common_args(p: argparse.ArgumentParser) -> None:
    """--seed, --batch-size, --threads, --no-progress, --max-samples."""
    p.add_argument("--seed", type=int, default=None, help="seed of the split, the weights and the search (default 0)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default 64)")
    p.add_argument("--threads", type=int, help="CPU threads (default $QOS_THREADS or all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--max-samples", type=int, help="use at most this many samples per split (quick tries)")
    add_emulation_arg(p)
    add_device_arg(p)


#: ``qos_compile.nn.emulation.EMULATIONS``, spelled out so that building the parser imports no torch.
EMULATION_CHOICES = ("auto", "native", "torch")


def add_emulation_arg(p: argparse.ArgumentParser) -> None:
    """--emulation auto|native|torch: how general-table circuits are emulated (applied by ``setup_threads``)."""
    p.add_argument("--emulation", choices=EMULATION_CHOICES, default=None,
                   help="how circuits without a cheap table structure (the 'general' strategy) are emulated, "
                        "bit-identically either way: auto = the C kernel for CPU tensors, pure torch on other "
                        "devices; native = always the C kernel (CPU only); torch = always pure torch "
                        "(default $QOS_EMULATION or auto)")


def setup_emulation(args: argparse.Namespace) -> None:
    """Apply ``--emulation`` to the whole process (before any model runs); without it, check
    ``$QOS_EMULATION`` now rather than at the first general-table layer."""
    from ..nn.emulation import emulation_backend, set_emulation

    choice = getattr(args, "emulation", None)
    if choice is not None:
        set_emulation(choice)
    else:
        emulation_backend()


#: ``qos_compile.train.distributed.DEVICES``, spelled out so that building the parser imports no torch.
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    """--device cpu|cuda|auto (applied by ``setup_threads``, with torchrun's process group)."""
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                   help="where models train and run: cpu, cuda (an error without a CUDA GPU), or auto = cuda when "
                        "torch sees a GPU, else cpu (default auto). Under torchrun every process takes GPU "
                        "LOCAL_RANK and the processes train data-parallel (NCCL on cuda, gloo on cpu; "
                        "rendezvous timeout $QOS_DIST_TIMEOUT seconds, default 1800)")


def _threads_per_process(threads: int | None) -> int | None:
    """Under torchrun with several processes on this node and no --threads / $QOS_THREADS: the
    node's cores shared out (every process taking every core would oversubscribe them)."""
    import os

    if threads is not None or (os.environ.get("QOS_THREADS") or "").strip():
        return threads
    try:
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    except ValueError:
        return threads
    return max(1, (os.cpu_count() or 1) // local) if local > 1 else threads


def setup_device(args: argparse.Namespace) -> None:
    """Apply ``--device`` and, under torchrun, join the process group (one QosError line when the
    device is missing or the rendezvous fails). Processes other than rank 0 print nothing on
    stdout (rank 0 prints the tables); their errors still reach stderr."""
    import os

    if not hasattr(args, "device"):  # a command without --device (bench) keeps the CPU runtime
        return
    from ..train.distributed import init_runtime

    rt = init_runtime(args.device or "auto")
    if not rt.is_main and sys.stdout is sys.__stdout__:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process


def runtime_scoped(func: Any) -> Any:
    """Wrap a command so the device and process group it set up end with it: after success every
    process meets at a barrier and leaves the group; after an error the process just leaves
    (waiting for the others could hang: torchrun stops them when one fails)."""
    import functools

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        from ..train import distributed as dist_rt

        try:
            code = func(args)
        except BaseException:
            dist_rt.shutdown_runtime(wait=False)
            raise
        dist_rt.shutdown_runtime(wait=True)
        return code

    return wrapper


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Float, QAT and AGN hyper-parameters (defaults: model preset / dataset defaults)."""
    g = p.add_argument_group("training (defaults: per model and dataset, see qos_compile.search.presets)")
    g.add_argument("--epochs-float", type=int, help="float training epochs")
    g.add_argument("--lr-float", type=float, help="float training learning rate")
    g.add_argument("--epochs-qat", type=int, help="quantization-aware training epochs")
    g.add_argument("--lr-qat", type=float, help="QAT learning rate")
    g.add_argument("--per-channel", action="store_true", help="per-output-channel weight quantization")
    g.add_argument("--epochs-agn", type=int, help="noise-tolerance (AGN) epochs")
    g.add_argument("--lambda", dest="agn_lambda", type=float, help="AGN noise reward weight λ")
    g.add_argument("--sigma-max", type=float, help="AGN cap of the rewarded |σ| per layer")
    g.add_argument("--sigma-init", type=float, help="AGN initial σ")


def add_search_args(p: argparse.ArgumentParser, defaults: bool) -> None:
    """--multipliers, --max-circuits (alias --n; use the long name under torchrun, whose own options
    --nnodes/--nproc-per-node/... make ``--n`` ambiguous), --scales."""
    p.add_argument("--multipliers", default="evoapprox-unsigned",
                   help="evoapprox-unsigned, evoapprox-signed, or a comma list of circuit names")
    p.add_argument("--max-circuits", "--n", dest="n", type=int, metavar="N",
                   help="at most N circuits for all OPs together (default: the model's preset); --n is short "
                        "for it, except under torchrun")
    p.add_argument("--scales", type=scales_arg, default=None,
                   help="tolerance scale per OP, most accurate first (default 0.3,1,2)")


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    """--epochs-finetune, --lr-finetune, --baseline."""
    p.add_argument("--epochs-finetune", type=int, help="BN-only fine-tuning epochs")
    p.add_argument("--lr-finetune", type=float, help="fine-tuning learning rate")
    p.add_argument("--baseline", choices=("none", "full"), default="none",
                   help="also run full retraining per OP (each OP its own weights) for comparison")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """PipelineConfig fields given on the command line (None = not given)."""
    get = lambda name: getattr(args, name, None)  # noqa: E731
    return {
        "image_size": get("image_size"), "seed": get("seed"), "batch_size": get("batch_size"),
        "max_samples": get("max_samples"), "float_epochs": get("epochs_float"), "float_lr": get("lr_float"),
        "float_weights": get("float_weights"), "qat_epochs": get("epochs_qat"), "qat_lr": get("lr_qat"),
        "agn_epochs": get("epochs_agn"), "agn_lambda": get("agn_lambda"), "agn_sigma_max": get("sigma_max"),
        "agn_sigma_init": get("sigma_init"), "n": get("n"), "scales": get("scales"),
        "ft_epochs": get("epochs_finetune"), "ft_lr": get("lr_finetune"),
        "multipliers": get("multipliers"), "baseline": get("baseline"), "normalize": get("normalize"),
    }


def setup_threads(args: argparse.Namespace) -> int:
    """Thread count, the emulation backend (``--emulation``) and the device with torchrun's process group
    (``--device``) first (before torch does real work)."""
    from ..runtime_env import configure_threads

    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise QosError(f"--threads must be a positive integer, got {threads}")
    n = configure_threads(_threads_per_process(threads))
    setup_emulation(args)
    setup_device(args)
    return n


def log(msg: str) -> None:
    """Progress line on stderr (rank 0 only under torchrun)."""
    from ..train.distributed import is_main

    if is_main():
        print(msg, file=sys.stderr, flush=True)


def _load_stage(path: str, command: str) -> tuple[Any, dict[str, Any]]:
    from ..qosmodel import load_qos_model

    qnet, meta = load_qos_model(path)
    want = ACCEPTS[command]
    if meta.stage not in want:
        raise QosError(f"{path}: a QoS model of stage {meta.stage!r}; `qos-nets {command}` needs the output "
                       f"of `qos-nets {'train' if want == ('agn',) else 'search'}` (stage {want[0]!r})")
    return qnet, meta


# ----------------------------------------------------------------------------- commands
def _train(args: argparse.Namespace) -> int:
    from ..pipeline import PipelineConfig, check_output_path, load_data, stage_agn, stage_float, stage_qat
    from ..qosmodel import save_qos_model
    from ..train.distributed import is_main

    cfg = PipelineConfig(model=args.model, dataset=args.dataset, data_dir=args.data_dir,
                         **{k: v for k, v in overrides(args).items() if v is not None and k in
                            {"image_size", "seed", "batch_size", "max_samples", "float_epochs", "float_lr",
                             "float_weights", "qat_epochs", "qat_lr", "agn_epochs", "agn_lambda", "agn_sigma_max",
                             "agn_sigma_init", "normalize"}},
                         per_channel=args.per_channel).resolved()
    out = check_output_path(args.output)
    setup_threads(args)
    progress = not args.no_progress
    splits = load_data(cfg)
    log(f"[1/3] float training ({cfg.model}, {cfg.dataset}, {cfg.float_epochs} epochs) ...")
    model, meta = stage_float(cfg, splits, progress, log)
    log(f"[2/3] quantization-aware training ({cfg.qat_epochs} epochs) ...")
    qnet, meta = stage_qat(cfg, splits, model, meta, args.signed, progress, log)
    log(f"[3/3] noise tolerance (AGN, {cfg.agn_epochs} epochs) ...")
    qnet, meta = stage_agn(cfg, splits, qnet, meta, progress, log)
    if is_main():
        save_qos_model(out, qnet, meta, stage="agn")
    print(f"wrote {out} (stage agn): exact QAT baseline test top-1 "
          f"{meta['baseline']['qat_exact']['test']['top1']:.2f}%; |sigma| per layer "
          + ", ".join(f"{abs(s):.3f}" for s in meta["agn"]["sigmas"]))
    return 0


def _search(args: argparse.Namespace) -> int:
    from ..pipeline import check_output_path, config_from_meta, data_from_meta, resolve_multipliers, stage_search
    from ..qosmodel import save_qos_model
    from ..train.distributed import is_main

    out = check_output_path(args.output)
    candidates = resolve_multipliers(args.multipliers)
    setup_threads(args)
    qnet, meta = _load_stage(args.input, "search")
    ov = overrides(args)
    cfg = config_from_meta(meta, **{k: ov[k] for k in ("n", "scales", "seed", "multipliers")})
    if cfg.n is None or cfg.n < 1:
        raise QosError("--max-circuits must be a positive integer")
    if candidates[0].signed != qnet.qconfig.signed:
        raise QosError(f"--multipliers are {'signed' if candidates[0].signed else 'unsigned'} but {args.input} was "
                       f"trained for {'signed' if qnet.qconfig.signed else 'unsigned'} codes")
    splits = data_from_meta(meta, args.dataset, args.data_dir, args.image_size, args.normalize)
    log(f"[1/1] search ({len(candidates)} circuits, n={cfg.n}, scales {','.join(f'{s:g}' for s in cfg.scales)}) ...")
    qops, meta = stage_search(cfg, splits, qnet, meta, candidates, not args.no_progress, log)
    meta.setdefault("provenance", {})["config"] = cfg.to_json()
    if is_main():
        save_qos_model(out, qops, meta, stage="search")
    print(f"wrote {out} (stage search, {qops.num_ops} OPs, circuits {', '.join(qops.bank.names)})")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from ..pipeline import (check_output_path, config_from_meta, data_from_meta, format_table, op_rows,
                            stage_finetune, stage_full_baseline)
    from ..qosmodel import save_qos_model
    from ..train.distributed import is_main

    out = check_output_path(args.output)
    setup_threads(args)
    qops, meta = _load_stage(args.input, "finetune")
    ov = overrides(args)
    cfg = config_from_meta(meta, **{k: ov[k] for k in ("ft_epochs", "ft_lr", "seed", "batch_size", "baseline")})
    splits = data_from_meta(meta, args.dataset, args.data_dir, args.image_size, args.normalize)
    progress = not args.no_progress
    full_meta = None
    if cfg.baseline == "full":
        log(f"[1/2] full retraining per OP, the baseline ({cfg.ft_epochs} epochs each) ...")
        full_meta = stage_full_baseline(cfg, splits, qops, meta, progress, log)
    log(f"[{2 if full_meta else 1}/{2 if full_meta else 1}] BN-only fine-tuning ({cfg.ft_epochs} epochs) ...")
    final, meta = stage_finetune(cfg, splits, qops, meta, progress, log)
    if full_meta:
        meta["ops"] = [{**o, "full_retrain": f.get("full_retrain")} for o, f in zip(meta["ops"], full_meta["ops"])]
        meta["full_retrain"] = full_meta["full_retrain"]
    meta.setdefault("provenance", {})["config"] = cfg.to_json()
    if is_main():
        save_qos_model(out, final, meta, stage="final")
    rows = op_rows(final, meta)
    for r, o in zip(rows, meta["ops"]):
        t = o["bn_only"]["test"]
        r.update(top1=t["top1"], top5=t.get("top5"))
    base = ((meta.get("baseline") or {}).get("qat_exact") or {}).get("test")
    extra = [("before-FT", [((o.get("before_finetune") or {}).get("test") or {}).get("top1") for o in meta["ops"]])]
    if full_meta:
        extra.append(("full-retrain", [o["full_retrain"]["test"]["top1"] for o in meta["ops"]]))
    print(format_table(rows, base, extra))
    print(f"wrote {out}")
    return 0


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register `train`, `search` and `finetune`."""
    t = one_line_errors(sub.add_parser(
        "train", help="float → QAT → noise tolerance (AGN); writes a stage file for `search`",
        description="Train a zoo model or your own (--model FILE.py:FUNC) in float (or load --weights), "
                    "quantization-aware at 8 bit, then learn each layer's noise tolerance (AGN). Writes a single-OP "
                    "QoS model (stage 'agn')."))
    add_model_args(t)
    add_data_args(t, required=True)
    t.add_argument("--signed", action="store_true", help="train for signed circuits (codes -128..127)")
    add_train_args(t)
    add_common_args(t)
    t.add_argument("-o", "--output", required=True, help="the stage file to write")
    t.set_defaults(func=diverged_as_error(_train))

    s = one_line_errors(sub.add_parser(
        "search", help="error prediction, operating points and power; writes a stage file for `finetune`",
        description="Trace every layer's integer operands, predict each circuit's error, pick at most n circuits "
                    "for all OPs by k-means over scaled tolerances, and report power. Input: `qos-nets train` output."))
    s.add_argument("input", metavar="TRAINED.pt", help="output of `qos-nets train`")
    add_search_args(s, defaults=False)
    add_data_args(s, required=False)
    add_common_args(s)
    s.add_argument("-o", "--output", required=True, help="the stage file to write")
    s.set_defaults(func=diverged_as_error(_search))

    f = one_line_errors(sub.add_parser(
        "finetune", help="BN-only fine-tuning of every OP; writes the final model.pt",
        description="Fine-tune every OP's BatchNorm and biases with shared frozen weights (and optionally the "
                    "full-retraining baseline). Input: `qos-nets search` output."))
    f.add_argument("input", metavar="SEARCHED.pt", help="output of `qos-nets search`")
    add_finetune_args(f)
    add_data_args(f, required=False)
    add_common_args(f)
    f.add_argument("-o", "--output", required=True, help="the model.pt to write")
    f.set_defaults(func=diverged_as_error(_finetune))


def dumps(obj: Any) -> str:
    """JSON for stdout."""
    return json.dumps(obj, indent=2, allow_nan=False)
