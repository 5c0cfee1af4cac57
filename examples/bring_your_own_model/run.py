"""Bring your own model: a plain PyTorch CNN (mynet.py) -> wrap_model -> short QAT -> per-OP approximate
accuracy -> save model.pt -> qos-compile -> qos-run switching OPs mid-stream.

    .venv/bin/python examples/bring_your_own_model/run.py [--epochs 3] [--out runs/byom]
    .venv/bin/python examples/bring_your_own_model/run.py --cli     # the same model through the CLI tools

Nothing here is specific to the model zoo: any nn.Module built from the supported ops works.
``--cli`` writes the digits as ``data.npz`` (standing in for your data) and runs
``qos-nets pipeline --model mynet.py:build --dataset npz:data.npz``, ``qos-compile`` and ``qos-run``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from mynet import SmallCNN  # noqa: E402  (your model file)

BIN = Path(sys.executable).parent  # qos-nets / qos-compile of this environment


def train(model, x, y, epochs: int, lr: float) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 32):
            idx = perm[i:i + 32]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return 100.0 * float((model(x).argmax(1) == y).float().mean())


def qos_run_stream(out: Path, x: np.ndarray, sequence: list[int]) -> np.ndarray:
    """Feed ``x`` (N, C, H, W float32, normalised) through one ``qos-run`` process, item i at OP
    ``sequence[i % len]`` (mid-stream switching); returns the (N, classes) logits."""
    (out / "x.bin").write_bytes(np.ascontiguousarray(x, dtype="<f4").tobytes())
    cmd = [str(out / "compiled" / "qos-run"), str(out / "compiled" / "model.qosm"), "--input", str(out / "x.bin"),
           "--output", str(out / "y.bin"), "--op-sequence", ",".join(map(str, sequence))]
    print("   $ " + " ".join(cmd))
    subprocess.run(cmd, check=True)
    return np.fromfile(out / "y.bin", dtype="<f4").reshape(len(x), -1)


def device_report(out: Path, x: np.ndarray, y: np.ndarray, num_ops: int) -> None:
    """Run the test images through qos-run, switching OP every 8 images, and print top-1 per OP."""
    sequence = [op for op in range(num_ops) for _ in range(8)]
    logits = qos_run_stream(out, x, sequence)
    ops = np.array([sequence[i % len(sequence)] for i in range(len(x))])
    hit = logits.argmax(1) == y
    for op in range(num_ops):
        print(f"   qos-run OP{op}: top-1 {100 * hit[ops == op].mean():.2f}% on {int((ops == op).sum())} images")


def main_cli(a: argparse.Namespace) -> None:
    """The QoS-Nets flow on your model file and your data, through the command-line tools."""
    from qos_compile.checkpoint import load_checkpoint
    from qos_compile.data.digits import load_digits_splits

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # 1. your data as an .npz: uint8 N,H,W images and integer labels (here: the bundled digits, 16x16)
    splits = load_digits_splits(16, 0)

    def pixels(ds):  # back to 0..255 uint8 pixels, as your own images would be
        return np.round(ds.images[:, 0].numpy() * 255).clip(0, 255).astype(np.uint8), ds.labels.numpy()

    (xtr, ytr), (xte, yte) = pixels(splits.train), pixels(splits.test)
    np.savez(out / "data.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    print(f"1. wrote {out / 'data.npz'}: x_train {xtr.shape} uint8, x_test {xte.shape}")
    # 2. the whole flow on mynet.py:build (your code runs in the float stage only)
    run = [str(BIN / "qos-nets"), "pipeline", "--model", f"{HERE / 'mynet.py'}:build",
           "--dataset", f"npz:{out / 'data.npz'}", "--multipliers", "evoapprox-unsigned", "--max-circuits", "3",
           "--epochs-float", str(a.epochs), "--epochs-qat", "3", "--epochs-agn", "3", "--epochs-finetune", "3",
           "--threads", "2", "--no-progress", "-o", str(out / "model.pt")]  # short schedules: a demo, not a result
    print("2. $ " + " ".join(run))
    subprocess.run(run, check=True)
    # 3. compile for this machine (--target arm cross-compiles; run that qos-run under qemu-aarch64-static)
    comp = [str(BIN / "qos-compile"), str(out / "model.pt"), "--target", "x86_64", "-o", str(out / "compiled")]
    print("3. $ " + " ".join(comp))
    subprocess.run(comp, check=True)
    # 4. qos-run with the normalization the pipeline recorded in model.pt
    _, meta = load_checkpoint(out / "model.pt")
    norm = meta["normalization"]
    mean, std = (np.array(norm[k], dtype=np.float32).reshape(1, -1, 1, 1) for k in ("mean", "std"))
    x = ((xte[:, None].astype(np.float32) / 255 - mean) / std).astype(np.float32)
    print(f"4. qos-run, inputs (pixel/255 - {norm['mean']}) / {norm['std']} as recorded in model.pt:")
    device_report(out, x, yte, int(meta["num_ops"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", default="runs/byom", help="output folder (default runs/byom)")
    ap.add_argument("--cli", action="store_true", help="run the flow through qos-nets pipeline / qos-compile")
    a = ap.parse_args()
    if a.cli:
        main_cli(a)
        return
    from qos_compile.compiler import compile_model
    from qos_compile.data.digits import load_digits_splits
    from qos_compile.nn import wrap_model
    from qos_compile.qosmodel import save_qos_model

    torch.manual_seed(0)
    torch.set_num_threads(2)
    splits = load_digits_splits(16, 0)
    xtr, ytr = splits.train.tensors
    xte, yte = splits.test.tensors

    model = SmallCNN(in_channels=1, classes=10)
    train(model, xtr, ytr, a.epochs, 3e-3)
    print(f"1. float training: top-1 {accuracy(model, xte, yte):.2f}%")

    # 2. wrap: Conv2d/Linear -> approximate layers, BatchNorm2d -> one BN per OP; 3 OPs over 3 circuits
    circuits = ["mul8u_1JFF", "mul8u_KEM", "mul8u_2AC"]            # exact, mild, aggressive
    qnet = wrap_model(model, circuits, num_ops=3, input_shape=(1, 16, 16))
    n = len(qnet.approx_layers())
    # OP0 exact everywhere; OP1 mild everywhere; OP2 aggressive on all but the first and last layer
    qnet.set_assignment([[0] * n, [1] * n, [0] + [2] * (n - 2) + [0]])
    print(f"2. wrapped: {n} approximate layers, {qnet.num_ops} OPs, circuits {circuits}")

    # 3. short QAT (8-bit fake quantization, exact products), then freeze the observers
    qnet.set_mode("quant")
    train(qnet, xtr, ytr, 1, 1e-3)
    qnet.freeze_observers(True)
    print(f"3. QAT: top-1 {accuracy(qnet, xte, yte):.2f}% (exact 8-bit products)")

    # 4. approximate evaluation: bit-exact emulation of each OP's circuits; switching is one call
    qnet.set_mode("approx")
    for op in range(qnet.num_ops):
        qnet.set_operating_point(op)
        used = sorted({circuits[i] for i in qnet.assignment()[op]})
        print(f"4. set_operating_point({op}): top-1 {accuracy(qnet, xte, yte):.2f}% with {', '.join(used)}")

    # 5. save: weights, quantization, circuits, per-OP BN, the traced architecture, and how inputs are made
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    save_qos_model(out / "model.pt", qnet, {"normalization": {"mean": list(splits.mean), "std": list(splits.std)}})
    print(f"5. saved {out / 'model.pt'} (never executes code when loaded)")

    # 6. compile for this machine: ONNX, TVM table-lookup kernels, the .qosm manifest and a static qos-run
    res = compile_model(out / "model.pt", "x86_64", out / "compiled")
    print(f"6. compiled -> {res.out_dir} (same as `qos-compile {out / 'model.pt'} --target x86_64 "
          f"-o {out / 'compiled'}`)")

    # 7. the device runtime: one process, OP switched mid-stream (qos_select: one atomic store)
    print("7. qos-run, switching OP every 8 images:")
    device_report(out, xte.numpy(), yte.numpy(), qnet.num_ops)
    print("or let `qos-nets pipeline --model examples/bring_your_own_model/mynet.py:build ...` search the circuits "
          "and fine-tune the BNs per OP (run.py --cli)")


if __name__ == "__main__":
    main()
