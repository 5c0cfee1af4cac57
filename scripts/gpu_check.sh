#!/usr/bin/env bash
# The CUDA check of issue #19, in a few minutes on one NVIDIA GPU, after `bash scripts/setup.sh`:
#
#  1. the bit-exactness tests of the emulation (tests/test_emulation_torch.py, every strategy)
#     with QOS_TEST_DEVICE=cuda, the variable that test file reads for its device;
#  2. a tiny `qos-nets pipeline --device cuda` (float, QAT, AGN, search, BN-only fine-tuning on
#     the GPU) whose model.pt must load and evaluate on the CPU;
#  3. the emulation's forward time, ResNet-20 at 32x32, batch 128, eval mode: QUANT and APPROX
#     with every layer on one circuit of each strategy (exact, masked, lowrank, general), on CUDA
#     and on the CPU (every core), medians of a few runs.
#
# Prints what it does, then one summary line starting "gpu_check:". Exit status 0 when all
# passed, 1 when a check failed, 2 when there is nothing to check on (no .venv, no CUDA GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [ ! -x "$PY" ]; then
  echo "gpu_check: no .venv here: run 'bash scripts/setup.sh' first" >&2
  exit 2
fi
if ! "$PY" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, no GPU or driver visible"
    print(f"gpu_check: no CUDA GPU: torch {torch.__version__} is {build}; this check needs an NVIDIA GPU "
          f"(and a CUDA build of torch)", file=sys.stderr)
    sys.exit(2)
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
then
  exit 2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/qos-gpu-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
export QOS_COMPILE_HOME="$work/home" PYTHONUNBUFFERED=1
failed=()

echo "== 1. emulation bit-exactness on CUDA (QOS_TEST_DEVICE=cuda pytest tests/test_emulation_torch.py)"
QOS_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider tests/test_emulation_torch.py 2>&1 | tee "$work/pytest.log"
tests_rc=${PIPESTATUS[0]}
tests_line=$(grep -E '(passed|failed|error)' "$work/pytest.log" | tail -n 1 | sed -e 's/=//g' -e 's/^ *//' -e 's/ *$//')
[ "$tests_rc" = 0 ] || failed+=("emulation tests")

echo "== 2. tiny pipeline on CUDA"
pipe_line="pipeline failed"
if .venv/bin/qos-nets pipeline --device cuda --dataset digits --image-size 8 --max-samples 64 --epochs-float 1 \
     --epochs-qat 1 --epochs-agn 1 --epochs-finetune 1 --multipliers mul8u_2NDH,mul8u_C67,mul8u_185Q \
     --max-circuits 2 --no-progress -o "$work/model.pt" >"$work/pipe.log" 2>&1 \
   && .venv/bin/qos-nets eval "$work/model.pt" --device cpu --json >"$work/eval.json" 2>>"$work/pipe.log"; then
  pipe_line=$("$PY" - "$work/eval.json" <<'EOF'
import json, sys
rep = json.load(open(sys.argv[1]))
print("pipeline --device cuda OK, its model.pt evaluates on the CPU (top-1 per OP "
      + ", ".join(f"{r['top1']:.1f}" for r in rep["ops"]) + ")")
EOF
)
else
  tail -n 20 "$work/pipe.log"
  failed+=("pipeline on cuda")
fi
echo "$pipe_line"

echo "== 3. emulation speed, ResNet-20 batch 128: CUDA vs CPU"
speed_line=$("$PY" - <<'EOF'
import os
import statistics
import sys
import time

import torch

from qos_compile.models import build_model
from qos_compile.multipliers import bundled
from qos_compile.nn import Mode, QuantConfig, wrap_model
from qos_compile.nn.emulation import STRATEGIES, plan_for

torch.set_num_threads(os.cpu_count() or 1)
torch.backends.cudnn.conv.fp32_precision = "ieee"   # QUANT products in full float32, as the runs use them
lib = bundled()
picks = {}
for m in lib.select(signed=False):
    picks.setdefault(plan_for(m).strategy, m)
circuits = [picks[k] for k in STRATEGIES if k in picks]
x = torch.randn(128, 3, 32, 32, generator=torch.Generator().manual_seed(0))
torch.manual_seed(0)
net = wrap_model(build_model("resnet20", 10), circuits, num_ops=1, qconfig=QuantConfig(signed=False),
                 input_shape=(3, 32, 32))
net.set_mode(Mode.QUANT)
net.train()
with torch.no_grad():
    for _ in range(3):   # observers calibrated once, on the CPU; the same model runs on both devices
        net(x)
net.eval()
net.freeze_observers(True)
rows = [("QUANT", None)] + [(f"APPROX {plan_for(m).strategy} ({m.name})", i) for i, m in enumerate(circuits)]


def timed(device: torch.device, repeats: int) -> tuple[list[float], list[torch.Tensor]]:
    net.to(device)
    xd = x.to(device)
    out_ms, outs = [], []
    for _, index in rows:
        net.set_mode(Mode.QUANT if index is None else Mode.APPROX)
        if index is not None:
            net.set_assignment([[index] * len(net.approx_layers())])
        with torch.no_grad():
            y = net(xd)                      # warm-up: kernels, caches, prepared weights
            times = []
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                y = net(xd)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(1e3 * (time.perf_counter() - t0))
        out_ms.append(statistics.median(times))
        outs.append(y.float().cpu())
    return out_ms, outs


gpu_ms, gpu_out = timed(torch.device("cuda"), 10)
cpu_ms, cpu_out = timed(torch.device("cpu"), 3)
print(f"ResNet-20, 128x3x32x32, eval; CPU: {torch.get_num_threads()} threads; GPU: {torch.cuda.get_device_name(0)}",
      file=sys.stderr)
print("| forward pass | CPU ms | CUDA ms | CPU/CUDA | vs QUANT on CUDA | top-1 agreement | max abs logit diff |",
      file=sys.stderr)
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |", file=sys.stderr)
for (name, _), c, g, yc, yg in zip(rows, cpu_ms, gpu_ms, cpu_out, gpu_out):
    agree = 100.0 * float((yc.argmax(1) == yg.argmax(1)).float().mean())
    print(f"| {name} | {c:.1f} | {g:.1f} | {c / g:.1f}x | {g / gpu_ms[0]:.2f}x | {agree:.1f}% | "
          f"{float((yc - yg).abs().max()):.3g} |", file=sys.stderr)
print("ms per batch CUDA vs CPU: " + ", ".join(f"{name.split(' (')[0]} {g:.1f} vs {c:.1f} ({c / g:.1f}x)"
                                               for (name, _), c, g in zip(rows, cpu_ms, gpu_ms)))
EOF
)
speed_rc=$?
[ "$speed_rc" = 0 ] || { failed+=("speed"); speed_line="speed run failed"; }

if [ ${#failed[@]} -eq 0 ]; then
  echo "gpu_check: PASSED: emulation tests on cuda: ${tests_line}; ${pipe_line}; ${speed_line}"
  exit 0
fi
echo "gpu_check: FAILED (${failed[*]}): emulation tests on cuda: ${tests_line:-none}; ${pipe_line}; ${speed_line}"
exit 1
