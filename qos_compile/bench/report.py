"""`qos-nets bench OUT`: accuracy, power, latency and switch cost of every OP of a ``qos-compile`` output,
with the float / int8 / TVM-exact baselines measured in the same run.

Per OP: top-1/top-5 on the held-out test split of the checkpoint's dataset (inference through the
compiled runtime: the Python binding for host targets, ``qos-run`` under the target's emulator
otherwise), relative multiplication power and savings, circuits, latency per inference (median and
quartiles over repeats) and the cost of ``qos_select``.

Emulated targets (aarch64 under qemu): every time is labelled *emulated*; only ratios between OPs
are reported, never a device latency, and the host-native baselines are not divided by emulated
times. ``qos_select`` is timed by ``qos-run --switch-bench`` in C on the target (emulated under
qemu for aarch64, labelled so).

``--ort-isa avx2`` adds onnxruntime's int8 model run by its AVX2 code (``cpuid_mask``: a child
process whose CPUID shows no AVX-512 or AVX-VNNI), the baseline for an ``x86_64-avx2`` build
on an AVX-512 host; it runs in a process of its own after the interleaved run, and says so.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import QosError
from .host import host_info, host_line
from .timing import Timing, measure

__all__ = ["run_bench", "load_out", "bench_markdown"]

MANIFEST = "model.qosm"
REPORT = "report.json"
RUN = "qos-run"


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- inputs
def load_out(out_dir: "str | os.PathLike") -> dict[str, Any]:
    """report.json of a qos-compile output folder; QosError when it is not one."""
    out = Path(out_dir)
    if not out.is_dir():
        raise QosError(f"{out}: no such folder (give a qos-compile output folder)")
    if not (out / MANIFEST).is_file() or not (out / REPORT).is_file():
        raise QosError(f"{out} is not a qos-compile output folder (needs {MANIFEST} and {REPORT})")
    try:
        rep = json.loads((out / REPORT).read_text())
        rep["target"]["name"], rep["operating_points"], rep["model"]
    except (OSError, ValueError, KeyError, TypeError):
        raise QosError(f"{out}/{REPORT} is not a qos-compile report") from None
    return rep


def _checkpoint(out: Path, rep: dict[str, Any]) -> Path:
    src = Path(((rep["model"].get("source") or {}).get("path")) or "")
    for cand in (src, out / src.name, out.parent / src.name):
        if str(cand) and cand.is_file():
            return cand
    raise QosError(f"the checkpoint {src} that {out} was compiled from is missing (needed for the dataset "
                   "and the baselines)")


def _chunks(x: np.ndarray, batch: int) -> list[tuple[np.ndarray, int]]:
    """x cut into full batches (the last one zero-padded); (batch, valid rows)."""
    res = []
    for i in range(0, len(x), batch):
        part = x[i:i + batch]
        n = len(part)
        if n < batch:
            part = np.concatenate([part, np.zeros((batch - n, *x.shape[1:]), x.dtype)])
        res.append((np.ascontiguousarray(part), n))
    return res


def _topk(logits: np.ndarray, y: np.ndarray) -> tuple[float, float | None]:
    top1 = 100.0 * float(np.mean(logits.argmax(1) == y))
    if logits.shape[1] < 5:
        return top1, None
    top5 = np.argsort(-logits, axis=1)[:, :5]
    return top1, 100.0 * float(np.mean((top5 == y[:, None]).any(1)))


# --------------------------------------------------------------------------- runners
class _QosRun:
    """qos-run (under the emulator when needed) on batch files."""

    def __init__(self, out: Path, prefix: list[str], batch_shape: Sequence[int], out_shape: Sequence[int],
                 work: Path):
        self.cmd = [*prefix, str(out / RUN), str(out / MANIFEST)]
        self.out_shape, self.work = tuple(out_shape), work
        self.batch_shape = tuple(batch_shape)
        if not (out / RUN).is_file():
            raise QosError(f"{out} has no {RUN} binary")

    def _call(self, args: list[str]) -> str:
        p = subprocess.run(self.cmd + args, capture_output=True, text=True, timeout=900)
        if p.returncode != 0:
            raise QosError(f"qos-run failed (exit {p.returncode}): {(p.stderr or p.stdout).strip()[-300:]}")
        return p.stdout

    def predict(self, op: int, xb: np.ndarray) -> np.ndarray:
        inp, outp = self.work / "in.bin", self.work / "out.bin"
        xb.astype(np.float32).tofile(inp)
        self._call(["--op", str(op), "--input", str(inp), "--output", str(outp)])
        return np.fromfile(outp, dtype=np.float32).reshape(self.out_shape)

    def time_batch_ms(self, op: int, xb_path: Path, number: int) -> float:
        """Mean ms per batch over ``number`` in-process runs (qos-run --repeat; excludes start-up)."""
        out = self._call(["--op", str(op), "--input", str(xb_path), "--repeat", str(max(2, number))])
        for line in out.splitlines():
            if line.startswith("mean time per inference:"):
                return float(line.split(":")[1].split()[0]) / 1e3
        raise QosError(f"qos-run printed no timing: {out.strip()[-200:]}")


# --------------------------------------------------------------------------- the bench
def run_bench(out_dir: "str | os.PathLike", *, repeats: int = 10, samples: int | None = None,
              rpc_tracker: str | None = None, rpc_key: str | None = None, dataset: str | None = None,
              data_dir: str | None = None, threads: int | None = None, baselines: bool = True,
              ort_isa: str = "native", log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Measure everything (see the module doc); returns the JSON-ready result. ``ort_isa``
    "avx2": also time onnxruntime's int8 model in a child whose CPUID shows no AVX-512 or
    AVX-VNNI (``cpuid_mask``: its AVX2 code), in its own process, after the interleaved run."""
    t_start = time.perf_counter()
    out = Path(out_dir)
    rep = load_out(out)
    if repeats < 1:
        raise QosError("--repeats must be >= 1")
    if samples is not None and samples < 1:
        raise QosError("--samples must be >= 1")
    if rpc_tracker:
        from .rpc import check_tracker

        check_tracker(rpc_tracker, rpc_key or "qos-local", 5.0, 5.0)
    from ..targets import get_target

    target = get_target(rep["target"]["name"])
    host = target.is_host
    if ort_isa not in ("native", "avx2"):
        raise QosError(f"--ort-isa must be native or avx2, got {ort_isa!r}")
    if ort_isa == "avx2":
        from . import cpuid_mask

        why = cpuid_mask.unavailable() or (None if baselines else "--ort-isa avx2 needs the baselines")
        if why:
            raise QosError(f"--ort-isa avx2: {why}")
    prefix = [] if host else target.run_prefix()
    emulated = bool(prefix)
    ckpt = _checkpoint(out, rep)

    # ---- model, data
    import torch

    from ..pipeline import data_from_meta
    from ..qosmodel import load_qos_model

    qnet, meta = load_qos_model(ckpt)
    splits = data_from_meta(meta, dataset, data_dir)
    x_all, y_all = splits.test.tensors
    n = len(x_all) if samples is None else min(samples, len(x_all))
    if samples is None and emulated:
        n = min(n, 200)   # every batch is one emulator process: keep the default short
    x = x_all[:n].numpy().astype(np.float32)
    y = y_all[:n].numpy()
    batch = int(rep["options"].get("batch") or rep["model"]["input_shape"][0])
    in_shape = [batch, *rep["model"]["input_shape"][1:]]
    if list(x.shape[1:]) != in_shape[1:]:
        raise QosError(f"dataset {splits.name} gives {tuple(x.shape[1:])} images but the model takes "
                       f"{tuple(in_shape[1:])}")
    out_shape = rep["model"].get("output_shape") or [batch, *meta.output_shape]
    ops = rep["operating_points"]
    num_ops = len(ops)
    chunks = _chunks(x, batch)
    log(f"{out}: target {target.name}{' (emulated: ' + prefix[0] + ')' if emulated else ''}, {num_ops} OPs, "
        f"batch {batch}; {splits.name} test split, {n} samples")

    work = Path(tempfile.mkdtemp(prefix="qos_bench_"))
    model = None
    try:
        if host:
            from ..runtime.model import Model

            model = Model(out, threads=threads)

            def predict(op: int, xb: np.ndarray) -> np.ndarray:
                model.select(op)
                return np.asarray(model.run(xb)).reshape(out_shape)
        else:
            qrun = _QosRun(out, prefix, in_shape, out_shape, work)
            predict = qrun.predict

        # ---- accuracy per OP
        rows: list[dict[str, Any]] = []
        for op in range(num_ops):
            t0 = time.perf_counter()
            logits = np.concatenate([predict(op, xb)[:k] for xb, k in chunks]).reshape(n, -1)
            top1, top5 = _topk(logits, y)
            r = ops[op]
            rel = r.get("relative_power")
            rows.append({"op": op, "name": r.get("name", f"op{op}"), "top1": top1, "top5": top5,
                         "relative_power": rel, "savings_pct": None if rel is None else 100.0 * (1.0 - rel),
                         "circuits": r.get("distinct_circuits") or sorted(set(r.get("circuits") or [])),
                         "circuits_per_layer": r.get("circuits")})
            log(f"accuracy OP{op}: top-1 {top1:.2f}%" + (f", top-5 {top5:.2f}%" if top5 is not None else "")
                + f" ({len(chunks)} batch(es), {time.perf_counter() - t0:.1f} s)")

        # ---- latency: our OPs (and, on the host, the baselines) in one interleaved run
        xb0 = chunks[0][0]
        xb_path = work / "bench_in.bin"
        xb0.tofile(xb_path)
        fns: dict[str, Callable[[], Any]] = {}
        for op in range(num_ops):
            if host:
                fns[f"op{op}"] = (lambda op=op: (model.select(op), model.run(xb0)))
        base_fns: dict[str, Callable[[], Any]] = {}
        base_info: dict[str, Any] = {}
        if baselines:
            log("building baselines: float torch, onnxruntime int8 (QLinearConv), TVM exact conv kernels")
            from .baselines import TvmExactLayers, conv_layers, float_runner, onnx_op_types, ort_int8_model, ort_runner

            xt = torch.from_numpy(xb0)
            base_fns["float torch"] = float_runner(qnet.net, xt, threads)
            import logging

            logging.disable(logging.WARNING)    # the onnxruntime quantizer warns about every shape it skips
            try:
                int8 = ort_int8_model(qnet.net, torch.from_numpy(x[:64]), work / "model.int8.onnx")
            finally:
                logging.disable(logging.NOTSET)
            base_info["ort_int8_op_types"] = onnx_op_types(int8)
            base_fns["ort int8 (QLinearConv)"] = ort_runner(int8, xt, threads or 1)
            layers = conv_layers(qnet.net, tuple(xt.shape))
            tvm_layers = TvmExactLayers(layers, threads=threads)
            base_fns["tvm exact conv layers (sum)"] = tvm_layers.run_all
        log(f"timing: {repeats} repeats" + (" (emulated OPs via qos-run --repeat)" if emulated else ""))
        timings = measure({**fns, **base_fns}, repeats=repeats, warmup=2) if (fns or base_fns) else {}
        if emulated:
            samples_ms: dict[int, list[float]] = {op: [] for op in range(num_ops)}
            for r_ in range(repeats):
                for op in [(op + r_) % num_ops for op in range(num_ops)]:
                    samples_ms[op].append(qrun.time_batch_ms(op, xb_path, 5))
            for op in range(num_ops):
                timings[f"op{op}"] = Timing.from_samples(samples_ms[op], emulated=True)

        alone: list[str] = []              # baselines timed in a process of their own, not interleaved
        if baselines and ort_isa == "avx2":
            from . import cpuid_mask

            log("timing onnxruntime int8 with its AVX2 code (CPUID masked, own process)")
            lib = cpuid_mask.build(work)
            np.save(work / "bench_in.npy", xb0)
            name = "ort int8 (QLinearConv), AVX2 code (CPUID masked, own process)"
            alone.append(name)
            timings[name] = cpuid_mask.ort_latency_masked(lib, Path(int8), work / "bench_in.npy", threads or 1,
                                                          repeats)

        # per inference = per batch / batch
        def per_inf(t: Timing) -> Timing:
            return t.scaled(1.0 / batch)

        ref = per_inf(timings["op0"]).median_ms
        for row in rows:
            t = per_inf(timings[f"op{row['op']}"])
            row["latency"] = _timing_json(t)
            row["latency_ratio_vs_op0"] = t.median_ms / ref if ref > 0 else None

        base_rows = []
        for name in [*base_fns, *alone]:
            t = per_inf(timings[name])
            base_rows.append({"baseline": name, "latency": _timing_json(t), "host_native": True,
                              "ratio_to_ops": None if emulated else
                              {f"op{row['op']}": t.median_ms / row["latency"]["median_ms"] for row in rows},
                              **({"note": "native host time; not comparable to emulated OP times"} if emulated else {})})

        # ---- RPC: the TVM-built exact kernels on the remote board
        rpc_res = None
        if rpc_tracker:
            rpc_res = _rpc_tvm(qnet.net, tuple(xb0.shape), rpc_tracker, rpc_key or "qos-local",
                               "x86_64" if host else target.name, repeats, log)
            if rpc_res is not None:
                base_rows.append({"baseline": "tvm exact conv layers (RPC, sum of medians)",
                                  "latency": {"median_ms": rpc_res["sum_of_medians_ms"] / batch},
                                  "host_native": False, "rpc": rpc_res,
                                  "ratio_to_ops": None if emulated else
                                  {f"op{row['op']}": rpc_res["sum_of_medians_ms"] / batch / row["latency"]["median_ms"]
                                   for row in rows}})

        # ---- qos_select cost
        switch = _switch_cost(out, prefix, emulated)
        log(f"qos_select: {switch['ns_per_select']:.1f} ns per switch" + (" (emulated)" if emulated else ""))
    finally:
        if model is not None:
            model.close()
        import shutil

        shutil.rmtree(work, ignore_errors=True)

    return {
        "tool": "qos-nets bench", "out": str(out), "checkpoint": str(ckpt), "target": target.name,
        "emulated": emulated, "emulator": prefix[0] if emulated else None, "host": host_info(),
        "model": meta.model_name, "dataset": splits.name, "split": "test", "samples": n,
        "batch": batch, "repeats": repeats, "threads": threads,
        "ops": rows, "baselines": base_rows, "baseline_info": base_info, "switch_cost": switch,
        "rpc": rpc_res, "seconds": round(time.perf_counter() - t_start, 2),
    }


def _timing_json(t: Timing) -> dict[str, Any]:
    return {"median_ms": t.median_ms, "p25_ms": t.p25_ms, "p75_ms": t.p75_ms, "min_ms": t.min_ms,
            "max_ms": t.max_ms, "n": t.n, "emulated": t.emulated}


def _switch_cost(out: Path, prefix: Sequence[str], emulated: bool, calls: int = 1_000_000) -> dict[str, Any]:
    """ns per ``qos_select``, timed in C by ``qos-run --switch-bench`` (under the emulator if any)."""
    p = subprocess.run([*prefix, str(out / "qos-run"), str(out / "model.qosm"), "--switch-bench", str(calls)],
                       capture_output=True, text=True, timeout=600)
    if p.returncode != 0 or "qos_select: " not in p.stdout:
        raise QosError(f"qos-run --switch-bench failed: {(p.stderr or p.stdout).strip()[:200]}")
    ns = float(p.stdout.split("qos_select: ")[1].split(" ns")[0])
    return {"ns_per_select": ns, "calls": calls, "emulated": emulated,
            "method": "qos-run --switch-bench (C, cycling through the OPs)"}


def _rpc_tvm(net: Any, shape: tuple[int, ...], tracker: str, key: str, target: str, repeats: int,
             log: Callable[[str], None]) -> dict[str, Any]:
    """TVM exact conv kernels of every conv layer, built as one shared library, timed on the board."""
    from ..tvm.build import build_kernels
    from ..tvm.kernels import exact_conv2d_func
    from .baselines import conv_layers
    from .rpc import rpc_time_module

    layers = conv_layers(net, shape)
    uniq: dict[Any, str] = {}
    for lay in layers:
        uniq.setdefault(lay.spec, f"exact{len(uniq)}")
    log(f"RPC: {len(uniq)} exact conv kernels -> {key}@{tracker}")
    rng = np.random.default_rng(0)
    per_kernel: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="qos_bench_rpc_") as d:
        built = build_kernels({k: exact_conv2d_func(s, target) for s, k in uniq.items()}, target, out_dir=d,
                              system_lib=False)
        for s, k in uniq.items():
            args = [rng.integers(0, 256, s.x_shape, dtype=np.uint8), rng.integers(0, 256, s.w_shape, dtype=np.uint8),
                    np.zeros(s.out_shape, np.int32)]
            res = rpc_time_module(built, tracker, key, built.symbols[k], args, repeats=max(3, repeats), number=1)
            per_kernel[k] = res.timing.median_ms
    total = sum(per_kernel[uniq[lay.spec]] for lay in layers)
    return {"tracker": tracker, "key": key, "target": target, "layers": len(layers),
            "kernels_ms": per_kernel, "sum_of_medians_ms": total}


# --------------------------------------------------------------------------- output
def _f(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def bench_markdown(res: dict[str, Any]) -> str:
    emu = res["emulated"]
    lat = "latency spread vs OP0 median, EMULATED" if emu else "latency/inference (ms, median [p25-p75])"
    head = (f"## qos-nets bench: {res['model']} on {res['dataset']} ({res['samples']} test samples), "
            f"target {res['target']}{' (EMULATED under ' + str(res['emulator']) + ')' if emu else ''}\n")
    if res.get("host"):
        head += host_line(res["host"]) + "\n"
    lines = [head, "| OP | circuits | rel. power | saving % | top-1 % | top-5 % | " + lat + " | ratio vs OP0 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["ops"]:
        t = r["latency"]
        if emu:   # ratios only: an emulated time is no device latency
            m = t["median_ms"] / r["latency_ratio_vs_op0"] if r["latency_ratio_vs_op0"] else None
            cell = "-" if not m else f"{t['p25_ms'] / m:.2f}-{t['p75_ms'] / m:.2f} (IQR, emulated)"
        else:
            cell = f"{t['median_ms']:.4f} [{t['p25_ms']:.4f}-{t['p75_ms']:.4f}]"
        lines.append(f"| OP{r['op']} | {', '.join(r['circuits'])} | {_f(r['relative_power'], '.3f')} | "
                     f"{_f(r['savings_pct'], '.1f')} | {_f(r['top1'])} | {_f(r['top5'])} | "
                     f"{cell} | {_f(r['latency_ratio_vs_op0'], '.2f')}{' emulated' if emu else ''} |")
    sw = res["switch_cost"]
    lines.append("")
    lines.append(f"qos_select cost: {sw['ns_per_select']:.1f} ns per switch"
                 + (" (EMULATED)" if sw["emulated"] else "") + f" ({sw['method']}, {sw['calls']} calls)")
    if res["baselines"]:
        lines += ["", "| baseline | latency/inference (ms, median) | baseline time / our OP time |", "| --- | --- | --- |"]
        for b in res["baselines"]:
            ratio = ("n/a (" + b.get("note", "") + ")") if b["ratio_to_ops"] is None else \
                ", ".join(f"{k}: {v:.2f}x" for k, v in b["ratio_to_ops"].items())
            lines.append(f"| {b['baseline']} | {b['latency']['median_ms']:.4f} | {ratio} |")
        if not emu:
            lines.append("")
            lines.append("ratio > 1: the baseline is slower than our approximate kernels at that OP "
                         "(same input, same interleaved run).")
    if emu:
        lines.append("")
        lines.append("Times marked emulated ran under qemu: compare the ratios within this table only; they are "
                     "not device latencies.")
    return "\n".join(lines)


def write_plots(res: dict[str, Any], prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from ..plots import plot_operating_points

    p1 = f"{prefix}_accuracy.png"
    rows = [r for r in res["ops"] if r["relative_power"] is not None]
    if rows:
        plot_operating_points(rows, p1, None, f"{res['model']} on {res['dataset']}: accuracy per OP "
                              f"(compiled, {res['target']})")
    p2 = f"{prefix}_latency.png"
    emu = res["emulated"]
    names = [f"OP{r['op']}" for r in res["ops"]]
    unit = res["ops"][0]["latency"]["median_ms"] if emu else 1.0    # emulated: ratios to OP0 only
    vals = [r["latency"]["median_ms"] / unit for r in res["ops"]]
    errs = [[(r["latency"]["median_ms"] - r["latency"]["p25_ms"]) / unit for r in res["ops"]],
            [(r["latency"]["p75_ms"] - r["latency"]["median_ms"]) / unit for r in res["ops"]]]
    colors = ["C0"] * len(names)
    if not emu:
        for b in res["baselines"]:
            names.append(b["baseline"].replace(" (", "\n("))
            vals.append(b["latency"]["median_ms"])
            lo = b["latency"].get("p25_ms", vals[-1])
            hi = b["latency"].get("p75_ms", vals[-1])
            errs[0].append(vals[-1] - lo)
            errs[1].append(hi - vals[-1])
            colors.append("C1")
    fig, ax = plt.subplots(figsize=(8.0, 4.6), dpi=120)
    try:
        ax.bar(range(len(names)), vals, yerr=errs, color=colors, capsize=4)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, fontsize=8)
        for i, v in enumerate(vals):
            ax.text(i, v / 2, f"{v:.3g}" + ("x" if emu else " ms"), ha="center", va="center", fontsize=9,
                    color="white", fontweight="bold")     # inside the bar: clear of the IQR whiskers
        ax.set_ylabel("EMULATED latency / OP0 latency (median, IQR bars)" if emu else
                      "ms per inference (median, IQR bars)")
        title = f"{res['model']} latency per OP, target {res['target']}"
        if emu:
            title += "\nEMULATED under qemu: ratios between OPs only (host baselines not comparable, not shown)"
        else:
            title += " (blue) vs baselines (orange)"
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(p2)
    finally:
        plt.close(fig)
    return ([p1] if rows else []) + [p2]


def check_writable(path: str | None, what: str) -> None:
    if path:
        parent = Path(path).resolve().parent
        if not parent.is_dir():
            raise QosError(f"cannot write {what} {path}: folder {parent} does not exist")
