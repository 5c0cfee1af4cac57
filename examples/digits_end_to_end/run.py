"""Digits, end to end: train ResNet-8 -> QoS-Nets search (4 circuits, 3 OPs) -> BN-only fine-tune ->
qos-compile for aarch64 -> run under qemu switching OPs mid-stream -> qos-nets bench.

    .venv/bin/python examples/digits_end_to_end/run.py [--out runs/digits] [--fast]

Everything goes to --out; rerunning resumes (the pipeline caches its stages, the compile and the
bench are skipped when their outputs are there). The digits data are bundled: no download.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402


def stage(i: int, n: int, msg: str) -> None:
    print(f"[{i}/{n}] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/digits", help="output folder (default runs/digits)")
    ap.add_argument("--fast", action="store_true", help="tiny epochs and sample counts (smoke test)")
    ap.add_argument("--target", default="arm", help="qos-compile target (default arm = aarch64 under qemu)")
    ap.add_argument("--switch-every", type=int, default=None,
                    help="switch OP every k batches of 16 images in the stream (default 2; 1 with --fast)")
    ap.add_argument("--threads", type=int, default=2)
    # the same flow for another model/dataset (examples/cifar10_resnet20/run.py uses these)
    ap.add_argument("--model", default="resnet8", help=argparse.SUPPRESS)
    ap.add_argument("--dataset", default="digits", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=4, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    from qos_compile.bench.report import bench_markdown, run_bench, write_plots
    from qos_compile.compiler import compile_model
    from qos_compile.errors import QosError
    from qos_compile.pipeline import PipelineConfig, data_from_meta, run_pipeline
    from qos_compile.qosmodel import load_qos_model
    from qos_compile.runtime_env import configure_threads
    from qos_compile.targets import get_target

    configure_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    N = 4
    try:
        # 1. pipeline: float -> QAT -> AGN -> search (4 circuits, 3 OPs) -> BN-only fine-tune (cached)
        stage(1, N, f"QoS-Nets pipeline (train {a.model} on {a.dataset}, search {a.n} circuits / 3 OPs, "
                    "BN-only fine-tune)")
        cfg = dict(model=a.model, dataset=a.dataset, data_dir=a.data_dir, n=a.n, scales=(0.3, 1.0, 2.0))
        if a.fast:
            cfg.update(max_samples=64, float_epochs=1, qat_epochs=1, agn_epochs=1, ft_epochs=1,
                       observer_epochs=1, trace_samples=32, image_size=8 if a.dataset == "digits" else None)
        model_pt = out / "model.pt"
        res = run_pipeline(PipelineConfig(**cfg), model_pt, out / "work", progress=False,
                           log=lambda m: print("    " + m, flush=True))
        print(res.table)

        # 2. compile for the target (batch 16: the stream below is fed 16 images at a time)
        batch = 16
        cdir = out / f"compiled-{a.target}"
        stage(2, N, f"qos-compile model.pt --target {a.target} -o {cdir}")
        if (cdir / "report.json").is_file() and json.loads((cdir / "report.json").read_text())["model"]["source"][
                "sha256"] == _sha(model_pt):
            print(f"    cached ({cdir})")
        else:
            shutil.rmtree(cdir, ignore_errors=True)
            compile_model(model_pt, a.target, cdir, batch=batch, progress=lambda m: print("    " + m, flush=True))

        # 3. one stream of test images through qos-run, switching OP every k batches
        stage(3, N, "stream the test split through qos-run, switching OP mid-stream")
        qnet, meta = load_qos_model(model_pt)
        splits = data_from_meta(meta)
        x, y = (t.numpy() for t in splits.test.tensors)
        if a.fast:
            x, y = x[:64], y[:64]
        every = a.switch_every or (1 if a.fast else 2)
        stream = _stream(cdir, get_target(a.target), x.astype(np.float32), y, batch, qnet.num_ops, every)
        for op, s in sorted(stream["per_op"].items()):
            print(f"    OP{op}: {s['correct']}/{s['count']} correct in its stretches of the stream")
        print(f"    {stream['switches']} OP switches in {stream['batches']} batches; stream top-1 "
              f"{stream['top1']:.2f}%")

        # 4. bench
        stage(4, N, "qos-nets bench (accuracy, power, latency, switch cost, baselines)")
        bench = run_bench(cdir, repeats=3 if a.fast else 10, samples=64 if a.fast else None, threads=1,
                          log=lambda m: print("    " + m, flush=True))
        bench["stream"] = stream
        bench["plots"] = write_plots(bench, str(out / "bench"))
        md = bench_markdown(bench)
        (out / "bench.md").write_text(md + "\n")
        (out / "bench.json").write_text(json.dumps(bench, indent=2, default=str) + "\n")
    except QosError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    print()
    print(md)
    print()
    print(f"== summary ({time.time() - t_all:.0f} s; everything in {out}/) ==")
    emu = " (emulated)" if bench["emulated"] else ""
    for r in bench["ops"]:
        print(f"  OP{r['op']}: {', '.join(r['circuits'])}; saves {r['savings_pct']:.1f}% multiplication power; "
              f"top-1 {r['top1']:.2f}%; latency {r['latency_ratio_vs_op0']:.2f}x OP0{emu}")
    sw = bench["switch_cost"]
    print(f"  switch cost: {sw['ns_per_select']:.1f} ns per qos_select"
          + (" (emulated)" if sw.get("emulated") else "") + f"; mid-stream switches: {stream['switches']}")
    print(f"  table: {out / 'bench.md'}, JSON: {out / 'bench.json'}, plots: {', '.join(bench['plots'])}")
    return 0


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stream(cdir: Path, target, x: np.ndarray, y: np.ndarray, batch: int, num_ops: int, every: int) -> dict:
    """Feed x as ONE stream to one qos-run process, OP = (batch index // every) % num_ops.

    qos-run's --op-sequence calls qos_select between the inferences of the stream, as a device
    would when its power budget changes mid-stream."""
    prefix = target.run_prefix()
    nb = -(-len(x) // batch)
    ops = [(b // every) % num_ops for b in range(nb)]
    xs = np.zeros((nb * batch, *x.shape[1:]), np.float32)
    xs[:len(x)] = x
    tmp = cdir / "stream"
    tmp.mkdir(exist_ok=True)
    xs.tofile(tmp / "in.bin")
    p = subprocess.run([*prefix, str(cdir / "qos-run"), str(cdir / "model.qosm"), "--input", str(tmp / "in.bin"),
                        "--op-sequence", ",".join(map(str, ops)), "--output", str(tmp / "out.bin")],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"qos-run failed: {p.stderr.strip()}")
    pred = np.fromfile(tmp / "out.bin", np.float32).reshape(nb * batch, -1)[:len(x)].argmax(1)
    shutil.rmtree(tmp, ignore_errors=True)
    per_op: dict[int, dict[str, int]] = {}
    for b, op in enumerate(ops):
        s = per_op.setdefault(op, {"correct": 0, "count": 0})
        s["correct"] += int((pred[b * batch:(b + 1) * batch] == y[b * batch:(b + 1) * batch]).sum())
        s["count"] += len(y[b * batch:(b + 1) * batch])
    switches = sum(a != b for a, b in zip(ops, ops[1:]))
    return {"batches": nb, "batch": batch, "switch_every_batches": every, "switches": int(switches),
            "top1": 100.0 * float((pred == y).mean()), "per_op": per_op}


if __name__ == "__main__":
    sys.exit(main())
