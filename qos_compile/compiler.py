"""The ``qos-compile`` driver: QoS checkpoint -> ONNX -> TVM Relax -> plan -> kernels -> manifest -> qos-run.

Stages (each prints one progress line with its time)::

    load      model.pt (qos_compile.qosmodel.load_qos_model) -> QoSNet + typed meta (model_schema)
    export    ONNX, full variant (every OP, ``operating_point`` input) -> OUT/model.onnx,
              and the slots variant (per-OP tensors as ``slot.*`` inputs) for TVM
    check     onnx.checker (full_check) on both; onnxruntime runs the full variant for every OP
    relax     slots variant -> Relax (ApproxConv/ApproxGemm -> TIR LUT kernels)
    plan      fuse (TVM CPU pipeline), extract the flat plan, plan the arena, schedule
    kernels   every kernel in ONE system-lib object (OUT/kernels.o); on a target that runs
              here also OUT/libqos_model.so (runtime + kernels) for the Python binding
    manifest  OUT/model.qosm: bank tables, assign, per-OP slot tensors, plan, I/O, metadata
    link      OUT/qos-run: runtime + TVM shim + kernels.o, statically linked for the target
    verify    qos-run (natively or under the target's emulator) against onnxruntime, every OP
    report    OUT/report.json

OUT is built in a temporary folder next to it and renamed into place at the end; a
failure (or Ctrl-C / SIGTERM, see ``qos_compile.cli.run_cli``) leaves OUT as it was and removes
the temporary folder. An existing OUT is replaced only if it is an empty folder or holds exactly
qos-compile's artefacts (``ARTEFACTS``, nothing else, report.json by qos-compile), checked before
the compile and again at the moment of replacement.

A verification that fails (qos-run outside the tolerance of onnxruntime, e.g. NaN outputs) is
an error and OUT is not written, unless ``keep_mismatch`` (``--keep-mismatch``) is given; the
report then records ``verification.kept_mismatch``.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import math
import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .atomic import fresh_name
from .errors import QosError
from .model_schema import ModelMeta, Records, records_of
from .numerics import code_range

__all__ = ["compile_model", "compile_qnet", "CompileResult", "default_output_dir", "list_targets_text",
           "REPORT_TOOL", "ARTEFACTS"]

REPORT_TOOL = "qos-compile"
REPORT_VERSION = 1
ONNX_NAME = "model.onnx"
KERNELS_NAME = "kernels.o"
HOST_LIB_NAME = "libqos_model.so"
MANIFEST_NAME = "model.qosm"
RUN_NAME = "qos-run"
REPORT_NAME = "report.json"
ARTEFACTS = (ONNX_NAME, KERNELS_NAME, HOST_LIB_NAME, MANIFEST_NAME, RUN_NAME, REPORT_NAME)
_ORT_CHUNK = 4          # samples per onnxruntime call (its ApproxConv function body is memory hungry)
_VERIFY_SAMPLES = 4


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("qos-compile")
    except Exception:  # noqa: BLE001 - not installed
        return "0"


@dataclass
class CompileResult:
    """What ``compile_model``/``compile_qnet`` produced: the output folder and the report."""

    out_dir: Path
    report: dict[str, Any]

    @property
    def manifest(self) -> Path:
        return self.out_dir / MANIFEST_NAME

    @property
    def qos_run(self) -> Path:
        return self.out_dir / RUN_NAME

    @property
    def onnx(self) -> Path:
        return self.out_dir / ONNX_NAME


class _Progress:
    """Numbered stage lines: ``[k/n] stage  detail  (t s)``; times go into the report."""

    STAGES = ("load", "export", "check", "relax", "plan", "kernels", "manifest", "link", "verify", "report")

    def __init__(self, out: Callable[[str], None] | None, skip: Sequence[str] = ()):
        self.out = out
        self.times: dict[str, float] = {}
        self.stages = [s for s in self.STAGES if s not in skip]
        self._t0 = 0.0
        self._name = ""

    def start(self, name: str) -> None:
        from .cli import raise_if_signalled

        raise_if_signalled()      # a Ctrl-C / SIGTERM that a library swallowed stops us here
        self._name, self._t0 = name, time.perf_counter()

    def done(self, detail: str = "") -> None:
        dt = time.perf_counter() - self._t0
        self.times[self._name] = round(dt, 3)
        if self.out is not None:
            k = self.stages.index(self._name) + 1 if self._name in self.stages else 0
            self.out(f"[{k}/{len(self.stages)}] {self._name:<8} {detail}  ({dt:.2f} s)")


# --------------------------------------------------------------------------- output folder
def default_output_dir(model_path: "str | Path", target_name: str) -> Path:
    """``<model folder>/<model stem>-<target>`` (e.g. ``runs/model-aarch64``)."""
    p = Path(model_path)
    return p.parent / f"{p.stem}-{target_name}"


def _foreign_entries(out: Path) -> list[str]:
    """What in folder ``out`` is not a qos-compile artefact: any entry whose name is not one of
    ``ARTEFACTS``, or that is not a regular file (a folder, a symlink, a device)."""
    try:
        entries = list(os.scandir(out))
    except OSError as e:
        return [f"(unreadable: {e.strerror or e})"]
    bad = []
    for e in entries:
        try:
            regular = e.is_file(follow_symlinks=False)
        except OSError:
            regular = False
        if e.name not in ARTEFACTS or not regular:
            bad.append(e.name)
    return sorted(bad)


def _is_previous_output(out: Path) -> bool:
    """True if ``out`` holds exactly qos-compile's artefacts: only files named in ``ARTEFACTS``
    (nothing else: no other file, folder or link), a model.qosm, and a report.json written by qos-compile."""
    if out.is_symlink() or not out.is_dir() or _foreign_entries(out):
        return False
    try:
        report = json.loads((out / REPORT_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and report.get("tool") == REPORT_TOOL and (out / MANIFEST_NAME).is_file()


def _replaceable(out: Path) -> str | None:
    """None if compiling into ``out`` may replace it (absent, an empty folder, or a previous
    qos-compile output); else the reason why not, as a sentence fragment."""
    if not out.exists() and not out.is_symlink():
        return None
    if out.is_symlink() or not out.is_dir():
        return "exists and is not a folder"
    try:
        empty = not any(out.iterdir())
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if empty or _is_previous_output(out):
        return None
    foreign = _foreign_entries(out)
    what = f" (it holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})" if foreign else ""
    return f"exists and is not a previous qos-compile output{what}"


def _check_output_dir(out: Path) -> None:
    """Refuse an OUT that qos-compile may not replace, before any work: one that is not a folder,
    holds anything but qos-compile's artefacts, or whose parent folder cannot take OUT's temporary
    folder (missing, not writable, not a real file system)."""
    why = _replaceable(out)
    if why is not None:
        if why == "exists and is not a folder":
            raise QosError(f"output {out} exists and is not a folder; choose another -o")
        raise QosError(f"output folder {out} {why}; choose another -o or remove it")
    parent = out.parent
    if not parent.is_dir():
        raise QosError(f"cannot create output folder {out}: its parent {parent} does not exist")
    probe = fresh_name(parent, f".{out.name}.probe-")   # can OUT's temporary folder be made next to it?
    made = True
    try:
        try:
            os.mkdir(probe, 0o700)
        except OSError as e:
            made = False
            raise QosError(f"cannot create output folder {out}: {e.strerror or e} in {parent}") from None
    finally:          # a signal landing anywhere after the mkdir still removes it
        if made:
            with contextlib.suppress(OSError):
                os.rmdir(probe)



def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fix_modes(tmp: Path) -> None:
    """Ordinary permissions (the temporary folder and some files are created private)."""
    mask = _umask()
    os.chmod(tmp, 0o777 & ~mask)
    for p in tmp.iterdir():
        if p.is_file():
            os.chmod(p, (0o777 if p.name in (RUN_NAME, HOST_LIB_NAME) else 0o666) & ~mask)


def _finalize(tmp: Path, out: Path) -> None:
    """Rename the finished temporary folder to ``out``, replacing only what qos-compile may replace.

    ``out`` is checked again now, after the long compile: if meanwhile it became something that
    is not ours (a user created it, or put a file into it), nothing is touched and this raises
    QosError. A previous output is first moved aside (atomic), checked once more where it now
    lies (nobody else writes there), and deleted only after the new folder is in place.
    """
    _fix_modes(tmp)
    why = _replaceable(out)
    if why is not None:
        raise QosError(f"output folder {out} {why} (it changed while compiling); nothing was replaced, "
                       "choose another -o or remove it")
    old = None
    if out.exists() or out.is_symlink():
        old = fresh_name(out.parent, f".{out.name}.old-")
        try:
            os.rename(out, old)
        except OSError as e:
            raise QosError(f"cannot replace {out}: {e.strerror or e}") from None
        why = _replaceable(old)
        if why is not None:                      # it changed between the check and the rename
            try:
                os.rename(old, out)
            except OSError:
                raise QosError(f"output folder {out} changed while it was being replaced; it was kept, "
                               f"unchanged, as {old}") from None
            raise QosError(f"output folder {out} {why} (it changed while compiling); nothing was replaced")
    try:
        os.rename(tmp, out)
    except OSError as e:
        if old is not None:
            with contextlib.suppress(OSError):
                os.rename(old, out)
        raise QosError(f"cannot create output folder {out}: {e.strerror or e}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- helpers
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


def _load(model_path: Path) -> tuple[Any, Records]:
    if not model_path.is_file():
        raise QosError(f"model file {model_path} not found")
    try:
        from .qosmodel import load_qos_model
    except ImportError as e:
        raise QosError(f"cannot load QoS checkpoints: qos_compile.qosmodel is unavailable ({e})") from None
    try:
        qnet, meta = load_qos_model(model_path)
    except QosError:
        raise
    except Exception as e:  # noqa: BLE001 - any other failure means: not a usable QoS checkpoint
        raise QosError(f"{model_path} is not a valid QoS checkpoint ({_one_line(e)})") from None
    return qnet, records_of(meta)


def _resolve_target(target: Any, cross_compiler: str | None) -> Any:
    from . import cbuild

    t = cbuild.target_with_compiler(target, cross_compiler)
    cbuild.target_compiler(t)       # QosError naming the Debian package when the compiler is missing
    return t


def _op_names(num_ops: int, meta: Records) -> list[str]:
    """The recorded OP names (the schema checked them: unique, one per OP), else op0, op1, ..."""
    if meta.op_names is not None and len(meta.op_names) == num_ops:
        return list(meta.op_names)
    return [f"op{i}" for i in range(num_ops)]


def _finite(x: Any) -> Any:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _layer_macs(layer: Any) -> int:
    return int(layer.terms) * int(np.prod(layer.output_shape))


def _assign_column(qnet: Any, ex: Any) -> dict[str, int]:
    """Export layer name -> its column in ``qnet.assignment()``. The columns follow the layers'
    definition order, ``ex.layers`` their call order; a user's model may differ in the two."""
    col = {info.name: j for j, info in enumerate(qnet.approx_layers())}
    missing = [layer.name for layer in ex.layers if layer.name not in col]
    if missing:
        raise QosError(f"exported layer {missing[0]} is not an approximate layer of the model")
    return col


def _per_op_table(qnet: Any, ex: Any, meta: dict[str, Any], op_names: list[str]) -> list[dict[str, Any]]:
    """Per OP: circuits per layer, relative multiplication power (checkpoint meta, else the
    MAC-weighted power model of qos_compile.search.power), accuracy if the meta has it."""
    bank = qnet.bank
    col = _assign_column(qnet, ex)
    # assignment columns in export order, so they pair with the MACs of the same layer
    assign = np.asarray(qnet.assignment(), dtype=np.int64)[:, [col[layer.name] for layer in ex.layers]]
    macs = [_layer_macs(layer) for layer in ex.layers]
    computed: list[float | None] = [None] * qnet.num_ops
    try:
        from .multipliers import bundled
        from .search.power import relative_power

        exact = bundled().exact(bank.signed)
        for op in range(qnet.num_ops):
            computed[op] = relative_power(assign[op], macs, bank.power_mw, exact, bank.names)
    except Exception:  # noqa: BLE001 - unknown powers: leave None
        pass
    ops = meta.ops if len(meta.ops) == qnet.num_ops else ()
    meta_power = [o.relative_power for o in ops] if any(o.relative_power is not None for o in ops) else None
    meta_acc = [o.test_top1 for o in ops] if any(o.test_top1 is not None for o in ops) else None
    rows = []
    for op in range(qnet.num_ops):
        rel = _finite(meta_power[op]) if meta_power else None
        rows.append({
            "index": op,
            "name": op_names[op],
            "circuits": [bank.names[int(m)] for m in assign[op]],
            "distinct_circuits": sorted({bank.names[int(m)] for m in assign[op]}),
            "relative_power": rel if rel is not None else computed[op],
            "relative_power_source": "checkpoint" if rel is not None else
            ("power model (MAC-weighted circuit power / exact)" if computed[op] is not None else None),
            "relative_power_model": computed[op],
            "accuracy": _finite(meta_acc[op]) if meta_acc else None,
        })
    return rows


# --------------------------------------------------------------------------- stages
def _layer_lowerings(qnet: Any, ex: Any, t: Any, lowering: str) -> dict[str, Any]:
    """Per conv layer: the kernel that computes it on ``t`` (``tvm.lowering``), verified on
    every circuit the layer runs over the OPs. ``lowering``: "auto", a family or a registry
    name (``tvm.variants``) to force (with the gather kernel where it does not fit)."""
    from .tvm.lowering import choose_conv_lowering, lowering_allow
    from .tvm.variants import FAMILIES, LOWERING_CHOICES

    if lowering not in LOWERING_CHOICES:
        raise QosError(f"--lowering must be auto, a family ({', '.join(FAMILIES)}) or a kernel variant's "
                       f"registry name (python -m qos_compile.tvm.variants), got {lowering!r}")
    allow = lowering_allow(lowering)
    assign = qnet.assignment()
    col = _assign_column(qnet, ex)
    out = {}
    for layer in ex.layers:
        if layer.kind != "conv":
            continue
        luts = list(_layer_circuits(qnet, assign, col[layer.name]).values())
        out[layer.name] = choose_conv_lowering(luts, bool(qnet.bank.signed), t.features, allow,
                                               taps=layer.terms, costs=t.kernel_costs,
                                               positions=int(np.prod(layer.output_shape[1:])),
                                               groups=int(layer.attrs.get("group", 1)))
    return out


def _layer_circuits(qnet: Any, assign: Any, j: int) -> dict[int, np.ndarray]:
    """Bank index -> table of every circuit that column ``j`` of the assignment runs over the OPs."""
    return {m: qnet.bank.luts[m].detach().cpu().numpy() for m in sorted({int(row[j]) for row in assign})}


def _kernel_slots(qnet: Any, ex: Any, lowerings: dict[str, Any]) -> tuple[Any, dict[str, list[np.ndarray]]]:
    """The per-OP tensors the chosen kernels read besides the LUT (``Variant.per_op``): the
    factor tables of the low-rank layers (``tvm.lut_factors``), the activation factors, packed
    weight factors and accumulator start of the dot layers (``tvm.lut_dot``) and the row minima
    of the ``rows8`` layers (``tvm.lut_rows``): the slots model with their graph inputs
    ``slot.<layer>.wterms|xterms|dotw|dotbias|rowmin`` added (for the TVM import only) and their
    values per OP (one array per circuit, so the manifest stores each once)."""
    import onnx
    from onnx import helper, numpy_helper

    assign = qnet.assignment()
    values: dict[str, list[np.ndarray]] = {}
    col = _assign_column(qnet, ex)
    inits = {t.name: t for t in ex.model.graph.initializer}
    for layer in ex.layers:
        low = lowerings.get(layer.name)
        if low is None or low.variant.per_op is None:
            continue
        w = numpy_helper.to_array(inits[f"{layer.name}.weight_codes"])
        circuits = _layer_circuits(qnet, assign, col[layer.name])
        by_circuit = {m: low.variant.per_op(w, t, low) for m, t in circuits.items()}
        for suffix in next(iter(by_circuit.values())):
            values[f"slot.{layer.name}.{suffix}"] = [by_circuit[int(row[col[layer.name]])][suffix] for row in assign]
    if not values:
        return ex.model, values
    model = onnx.ModelProto()
    model.CopyFrom(ex.model)
    for name, per_op in values.items():
        model.graph.input.append(helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(per_op[0].dtype), list(per_op[0].shape)))
    return model, values


def _export(qnet: Any, tmp: Path, input_shape: Sequence[int] | None, meta: Records) -> tuple[Any, Any]:
    from .onnx.export import export_onnx

    extra = {}
    if meta.normalization is not None:
        extra["normalization"] = meta.normalization.to_json()
    full = export_onnx(qnet, tmp / ONNX_NAME, input_shape=input_shape, slots=False, metadata=extra or None)
    slotted = export_onnx(qnet, None, input_shape=input_shape, slots=True)
    return full, slotted


def _sample_input(ex: Any, batch: int, seed: int = 0) -> np.ndarray:
    """Inputs spanning the first layer's quantization range (deterministic)."""
    rng = np.random.default_rng(seed)
    shape = (batch, *ex.input_shape)
    first = ex.layers[0] if ex.layers else None
    if first is not None and tuple(first.input_shape) == tuple(ex.input_shape):
        lo = (code_range(first.signed)[0] - first.x_zero_point) * first.x_scale
        hi = lo + 255 * first.x_scale
        return rng.uniform(lo, hi, shape).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def _check_onnx(full: Any, slotted: Any, x: np.ndarray) -> tuple[list[np.ndarray], str]:
    """onnx.checker on both variants; onnxruntime on the full one, every OP. Returns its outputs."""
    import onnx

    for ex, what in ((full, "full"), (slotted, "slots")):
        try:
            onnx.checker.check_model(ex.model, full_check=True)
        except Exception as e:  # noqa: BLE001 - checker errors
            raise QosError(f"the exported ONNX ({what} variant) fails onnx.checker: {_one_line(e)}") from None
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise QosError(f"onnxruntime is not available ({e})") from None
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(os.environ.get("TVM_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1))
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(full.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise QosError(f"onnxruntime cannot load the exported ONNX: {_one_line(e)}") from None
    in_name = sess.get_inputs()[0].name
    names = {i.name for i in sess.get_inputs()}
    outs = []
    for op in range(full.num_ops):
        ys = []
        for k in range(0, x.shape[0], _ORT_CHUNK):
            feed = {in_name: x[k:k + _ORT_CHUNK]}
            if "operating_point" in names:
                feed["operating_point"] = np.array(op, dtype=np.int64)
            try:
                ys.append(sess.run(None, feed)[0])
            except Exception as e:  # noqa: BLE001
                raise QosError(f"onnxruntime failed to run the exported ONNX (OP {op}): {_one_line(e)}") from None
        y = np.concatenate(ys)
        if not np.all(np.isfinite(y)):
            raise QosError(f"onnxruntime output of OP {op} is not finite")
        outs.append(y)
    return outs, f"checker ok (full + slots), onnxruntime ran {full.num_ops} OP(s) on {x.shape[0]} sample(s)"


def _slot_layer(name: str, layer_index: dict[str, int]) -> tuple[int | None, str]:
    """``slot.<layer>.<kind>`` -> (layer index or None, kind)."""
    body = name[len("slot."):]
    base, _, kind = body.rpartition(".")
    return layer_index.get(base), kind


def _write_manifest(path: Path, plan: Any, symbols: dict[str, str], qnet: Any, ex: Any, op_names: list[str],
                    metadata: dict[str, Any], input_names: dict[str, str], output_names: list[str],
                    slot_values: dict[str, list[np.ndarray]] | None = None) -> None:
    from .runtime.manifest import Arg, ArgKind, ManifestWriter, Role

    bank = qnet.bank
    assign = qnet.assignment()
    # manifest layers in the assignment's (definition) order; the plan names them
    names = [info.name for info in qnet.approx_layers()]
    if sorted(names) != sorted(layer.name for layer in ex.layers):
        raise QosError("the exported layers are not the model's approximate layers")
    w = ManifestWriter()
    for name in op_names:
        w.add_op(name)
    used = sorted({int(m) for row in assign for m in row})
    bank_ids = {}
    for m in used:
        bank_ids[m] = w.add_bank_entry(bank.names[m], bank.luts[m].detach().cpu().numpy().astype(np.int32),
                                       sha256=bank.sha256[m],
                                       power_mw=float("nan") if bank.power_mw[m] is None else float(bank.power_mw[m]))
    layer_index = {}
    for name in names:
        layer_index[name] = w.add_layer(name)
    for op, row in enumerate(assign):
        for j, m in enumerate(row):
            w.set_assign(op, j, bank_ids[int(m)])
    slot_ids = []
    slot_values = ex.slots if slot_values is None else slot_values
    for s in plan.slots:
        if s.name not in slot_values:
            raise QosError(f"the slots export has no values for graph input {s.name!r}")
        values = [np.asarray(v) for v in slot_values[s.name]]
        if len(values) != qnet.num_ops:
            raise QosError(f"slot {s.name}: {len(values)} values for {qnet.num_ops} OPs")
        layer, kind = _slot_layer(s.name, layer_index)
        for op, v in enumerate(values):
            if tuple(v.shape) != tuple(s.shape) or str(v.dtype) != s.dtype:
                raise QosError(f"slot {s.name} (OP {op}): value {v.dtype} {v.shape} does not match the graph input "
                               f"{s.dtype} {s.shape}")
        if kind == "lut" and layer is not None:
            for op in range(qnet.num_ops):
                want = bank.luts[int(assign[op][layer])].detach().cpu().numpy()
                if not np.array_equal(values[op], want):
                    raise QosError(f"slot {s.name} (OP {op}) is not the table of the assigned circuit")
            slot_ids.append(w.add_slot(s.name, layer=layer))
        else:
            slot_ids.append(w.add_per_op_tensor(s.name, values))
    const_ids = [w.add_tensor(f"const/{name}", arr, Role.WEIGHT) for name, arr in plan.consts]
    buffer_ids = [w.add_buffer(b.name, b.dtype, b.shape, b.offset) for b in plan.buffers]
    first = ex.layers[0] if ex.layers else None
    for io in plan.inputs:
        scale, zp = float("nan"), 0
        if first is not None and tuple(first.input_shape) == tuple(io.shape[1:]):
            scale, zp = float(first.x_scale), int(first.x_zero_point)
        w.add_input(input_names.get(io.name, io.name), io.dtype, io.shape, scale=scale, zero_point=zp)
    for k, io in enumerate(plan.outputs):
        w.add_output(output_names[k] if k < len(output_names) else io.name, io.dtype, io.shape)
    table = {ArgKind.CONST: const_ids, ArgKind.SLOT: slot_ids, ArgKind.BUFFER: buffer_ids}
    for step in plan.steps:
        args = [Arg(a.kind, table[a.kind][a.index] if a.kind in table else a.index) for a in step.args]
        w.add_step(symbols[step.kernel], args)
    w.set_metadata(metadata)
    w.write(path)


def _manifest_report(path: Path, num_ops: int) -> dict[str, Any]:
    from .runtime.manifest import read_manifest

    m = read_manifest(path)
    sizes = m.size_breakdown()
    # what one more OP adds to the file when its per-OP tensors are its own (identical tensors are
    # stored once, so the file can grow by less): its per-OP tensors (each 64-byte aligned), one
    # assign row (4 B per layer) and one slot_tensors row (4 B per slot); circuit tables excluded
    per_op_tensors = [t for t in m.tensors if int(t.role) == 3]
    raw_each = sum(t.nbytes for t in per_op_tensors) // max(1, num_ops)
    aligned_each = sum(-(-t.nbytes // 64) * 64 for t in per_op_tensors) // max(1, num_ops)
    extra = aligned_each + 4 * len(m.layers) + 4 * len(m.slots)
    one_op_file = sizes["file"] - (num_ops - 1) * extra
    return {
        **sizes,
        "per_extra_op_bytes": extra,
        "per_extra_op_tensor_bytes": raw_each,
        "per_extra_op_percent_of_weights": round(100.0 * raw_each / sizes["weights"], 4) if sizes["weights"] else None,
        "per_extra_op_percent_of_file": round(100.0 * extra / one_op_file, 4) if one_op_file > 0 else None,
        "tensors": len(m.tensors), "steps": len(m.steps), "kernels": len(m.kernels), "slots": len(m.slots),
        "buffers": len(m.buffers), "bank": [{"name": b.name, "sha256": b.sha256,
                                             "power_mw": None if _finite(b.power_mw) is None else round(b.power_mw, 6)}
                                            for b in m.bank],
    }


def _mismatch_message(verification: dict[str, Any]) -> str:
    """One line: which OPs the built qos-run got wrong, and how to keep the output anyway."""
    bad = [r for r in verification["per_op"] if not r["ok"]]
    parts = [f"OP {r['op']}: max |diff| {r['max_abs_diff']:.3g} (largest |ref| {r['max_abs_ref']:.3g}), "
             f"top-1 agreement {r['top1_agreement']:.2f}" for r in bad[:3]]
    return ("verification failed: the built qos-run disagrees with onnxruntime beyond the tolerance "
            f"({'; '.join(parts)}{'; ...' if len(bad) > 3 else ''}); nothing was written (a NaN or "
            "infinite weight in the model causes this); pass --keep-mismatch to write the output anyway")


def _verify(exe: Path, manifest: Path, target: Any, x: np.ndarray, refs: list[np.ndarray], n_check: int,
            workdir: Path) -> dict[str, Any]:
    """Run qos-run for every OP and compare with onnxruntime's outputs of the first n_check samples."""
    try:
        prefix = target.run_prefix()
    except QosError as e:
        return {"ran": False, "reason": str(e)}
    inp = workdir / "verify_in.bin"
    x.tofile(inp)
    results = []
    ok = True
    for op, ref in enumerate(refs):
        out = workdir / f"verify_out{op}.bin"
        cmd = [*prefix, str(exe), str(manifest), "--op", str(op), "--input", str(inp), "--output", str(out)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            return {"ran": False, "reason": f"qos-run timed out (OP {op})"}
        if proc.returncode != 0:
            raise QosError(f"the built qos-run failed (OP {op}, exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[-500:]}")
        y = np.fromfile(out, dtype=ref.dtype).reshape((x.shape[0], *ref.shape[1:]))[:n_check]
        r = ref[:n_check]
        diff = float(np.max(np.abs(y.astype(np.float64) - r))) if y.size else 0.0
        span = float(np.max(np.abs(r))) if r.size else 0.0
        top1 = float(np.mean(np.argmax(y.reshape(n_check, -1), 1) == np.argmax(r.reshape(n_check, -1), 1))) \
            if r.ndim >= 2 and n_check else 1.0
        good = top1 == 1.0 and diff <= 0.05 * max(span, 1e-6)
        ok = ok and good
        results.append({"op": op, "max_abs_diff": diff, "max_abs_ref": span, "top1_agreement": top1,
                        "bit_exact": bool(np.array_equal(y, r)), "ok": good})
    return {"ran": True, "emulated": bool(prefix), "samples": n_check, "ok": ok,
            "bit_exact": all(r["bit_exact"] for r in results), "per_op": results}


# --------------------------------------------------------------------------- the driver
def compile_model(model: "str | os.PathLike", target: Any = "x86_64", out: "str | os.PathLike | None" = None, *,
                  cross_compiler: str | None = None, threads: int | None = None, batch: int = 1,
                  verify: bool = True, progress: Callable[[str], None] | None = None,
                  lowering: str = "auto", keep_mismatch: bool = False) -> CompileResult:
    """Compile a QoS checkpoint (model.pt) for ``target`` into ``out`` (see the module docstring)."""
    model_path = Path(model)
    t = _resolve_target(target, cross_compiler)
    out_dir = Path(out) if out is not None else default_output_dir(model_path, t.name)
    _check_output_dir(out_dir)
    pr = _Progress(progress)
    pr.start("load")
    qnet, meta = _load(model_path)
    pr.done(f"{model_path.name}: {len(qnet.approx_layers())} approximate layers, {qnet.num_ops} OPs, "
            f"{len(qnet.bank)} circuits")
    source = {"path": str(model_path), "sha256": _sha256_file(model_path), "bytes": model_path.stat().st_size}
    return _compile(qnet, meta, t, out_dir, source, threads=threads, batch=batch, verify=verify, pr=pr,
                    lowering=lowering, keep_mismatch=keep_mismatch)


def compile_qnet(qnet: Any, target: Any, out: "str | os.PathLike", *, meta: Mapping[str, Any] | None = None,
                 cross_compiler: str | None = None, threads: int | None = None, batch: int = 1,
                 verify: bool = True, input_shape: Sequence[int] | None = None,
                 progress: Callable[[str], None] | None = None, lowering: str = "auto",
                 keep_mismatch: bool = False) -> CompileResult:
    """Compile an in-memory QoSNet (calibrated, APPROX-ready) exactly as ``compile_model`` would."""
    t = _resolve_target(target, cross_compiler)
    out_dir = Path(out)
    _check_output_dir(out_dir)
    pr = _Progress(progress, skip=("load",))
    return _compile(qnet, records_of(meta), t, out_dir, {"path": None}, threads=threads, batch=batch, verify=verify,
                    pr=pr, input_shape=input_shape, lowering=lowering, keep_mismatch=keep_mismatch)


def _compile(qnet: Any, meta: Records, t: Any, out_dir: Path, source: dict[str, Any], *, threads: int | None,
             batch: int, verify: bool, pr: _Progress, input_shape: Sequence[int] | None = None,
             lowering: str = "auto", keep_mismatch: bool = False) -> CompileResult:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise QosError(f"batch must be a positive integer, got {batch!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise QosError(f"--threads must be a positive integer, got {threads!r}")
    from .nn.wrap import QoSNet

    if not isinstance(qnet, QoSNet):
        raise QosError(f"expected a QoSNet, got {type(qnet).__name__}")
    if input_shape is None:  # the file's (any rank, non-square too), else what wrap_model was given
        input_shape = meta.input_shape if isinstance(meta, ModelMeta) else qnet.input_shape
    # made by name inside the try that removes it, so that a SIGINT/SIGTERM landing anywhere
    # after the mkdir removes it too (``atomic.fresh_name``)
    tmp = fresh_name(out_dir.parent, f".{out_dir.name}.tmp-")
    build = tmp / "_build"
    ours = True
    try:
        try:
            os.mkdir(tmp, 0o700)
        except OSError as e:
            ours = False                 # nothing was made (or the name was taken meanwhile: not ours)
            raise QosError(f"cannot create output folder {out_dir}: {e.strerror or e} in {out_dir.parent}") \
                from None
        build.mkdir()
        result = _run_stages(qnet, meta, t, out_dir, tmp, build, source, threads, batch, verify, pr, input_shape,
                             lowering, keep_mismatch)
        shutil.rmtree(build, ignore_errors=True)
        _finalize(tmp, out_dir)
        return CompileResult(out_dir, result)
    except BaseException:
        if ours:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _run_stages(qnet: Any, meta: Records, t: Any, out_dir: Path, tmp: Path, build: Path,
                source: dict[str, Any], threads: int | None, batch: int, verify: bool, pr: _Progress,
                input_shape: Sequence[int] | None, lowering: str = "auto",
                keep_mismatch: bool = False) -> dict[str, Any]:
    t_start = time.perf_counter()
    qnet.eval()
    # ---- export
    pr.start("export")
    full, slotted = _export(qnet, tmp, input_shape, meta)
    pr.done(f"{ONNX_NAME}: {len(full.model.graph.node)} nodes, {len(full.layers)} approximate layers, "
            f"{full.num_ops} OPs; slots variant: {len(slotted.slots)} per-OP inputs")
    op_names = _op_names(full.num_ops, meta)
    # ---- check
    pr.start("check")
    n_check = min(batch, _VERIFY_SAMPLES)
    sample = _sample_input(full, n_check)
    x = np.concatenate([sample] * (-(-batch // n_check)))[:batch]
    refs, detail = _check_onnx(full, slotted, sample)
    pr.done(detail)
    # ---- relax
    pr.start("relax")
    from .tvm import plan as tvm_plan
    from .tvm.relax_import import from_onnx
    from .tvm.variants import dense_kernel_name

    in_name = slotted.model.graph.input[0].name
    lowerings = _layer_lowerings(qnet, slotted, t, lowering)
    import_model, factors = _kernel_slots(qnet, slotted, lowerings)
    imported = from_onnx(import_model, shape_dict={in_name: [batch, *slotted.input_shape]},
                         lowerings={f"slot.{name}.lut": low for name, low in lowerings.items()})
    kinds = collections.Counter(low.describe() for low in lowerings.values())
    pr.done(f"{len(imported.input_names)} parameters ({len(slotted.slots)} per-OP slots); conv kernels: "
            + (", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())) or "none"))
    # ---- plan
    pr.start("plan")
    plan = tvm_plan.compile_plan(imported.mod, t, imported.input_names)
    pr.done(plan.summary())
    # ---- kernels
    pr.start("kernels")
    digest = hashlib.sha256(slotted.model.SerializeToString()).hexdigest()
    prefix = f"qos{digest[:8]}_"
    built = tvm_plan.build_objects(plan.kernels, plan.n_outputs, t, build, prefix=prefix)
    shutil.copyfile(built.object_path, tmp / KERNELS_NAME)
    host_lib = None
    if t.is_host:
        host_lib = tvm_plan.link_host_library(tmp / KERNELS_NAME, t, tmp / HOST_LIB_NAME, build, threads=threads,
                                              symbols=list(built.symbols.values()))
    pr.done(f"{len(plan.kernels)} kernels -> {KERNELS_NAME}" + (f" + {HOST_LIB_NAME}" if host_lib else "")
            + f" ({t.name}, {t.tvm.get('mtriple')}, mcpu={t.tvm.get('mcpu')})")
    # ---- manifest
    pr.start("manifest")
    per_op = _per_op_table(qnet, slotted, meta, op_names)
    arch = getattr(qnet.net, "qos_arch", None)   # the model-zoo entry, when the model came from the zoo
    metadata = {
        "tool": REPORT_TOOL, "version": _version(), "target": t.name,
        "model": {"arch": arch if isinstance(arch, dict) else None, "sha256": source.get("sha256")},
        "batch": batch, "input_shape": [batch, *slotted.input_shape], "threads": threads,
        "kernel_prefix": prefix, "signed": bool(qnet.bank.signed),
        "ops": [{k: r[k] for k in ("name", "circuits", "relative_power", "accuracy")} for r in per_op],
        "layers": [{"name": layer.name, "kind": layer.kind, "x_scale": float(layer.x_scale),
                    "x_zero_point": int(layer.x_zero_point), "macs": _layer_macs(layer),
                    "kernel": lowerings[layer.name].describe() if layer.name in lowerings
                    else dense_kernel_name(bool(qnet.bank.signed))}
                   for layer in slotted.layers],
    }
    if meta.normalization is not None:
        metadata["normalization"] = meta.normalization.to_json()
    _write_manifest(tmp / MANIFEST_NAME, plan, built.symbols, qnet, slotted, op_names, metadata,
                    {}, imported.output_names, {**slotted.slots, **factors})
    msizes = _manifest_report(tmp / MANIFEST_NAME, qnet.num_ops)
    pr.done(f"{MANIFEST_NAME}: {msizes['file']} B (weights {msizes['weights']}, tables {msizes['tables']}, "
            f"per-OP {msizes['per_op']}, plan {msizes['plan']}); +{msizes['per_extra_op_bytes']} B per extra OP")
    # ---- link
    pr.start("link")
    tvm_plan.link_qos_run(tmp / KERNELS_NAME, t, tmp / RUN_NAME, build, threads=threads,
                          symbols=list(built.symbols.values()))
    pr.done(f"{RUN_NAME} ({t.name}, static, {(tmp / RUN_NAME).stat().st_size} B)")
    # ---- verify
    verification: dict[str, Any] = {"ran": False, "reason": "disabled"}
    if verify:
        pr.start("verify")
        verification = _verify(tmp / RUN_NAME, tmp / MANIFEST_NAME, t, x, refs, n_check, build)
        if not verification.get("ran"):
            pr.done(f"skipped: {verification.get('reason')}")
        else:
            worst = max(r["max_abs_diff"] for r in verification["per_op"])
            agree = "bit-exact" if verification["bit_exact"] else (
                f"top-1 {'agrees' if all(r['top1_agreement'] == 1.0 for r in verification['per_op']) else 'DIFFERS'}, "
                f"max |diff| {worst:.3g}")
            pr.done(f"qos-run{' (emulated)' if verification['emulated'] else ''} vs onnxruntime, "
                    f"{full.num_ops} OPs x {n_check} samples: {agree}"
                    + ("" if verification["ok"] else "  MISMATCH: outside tolerance, kept (--keep-mismatch)"
                       if keep_mismatch else ""))
            if not verification["ok"]:
                if not keep_mismatch:
                    raise QosError(_mismatch_message(verification))
                verification["kept_mismatch"] = True
    # ---- report
    pr.start("report")
    artefacts = {name: (tmp / name).stat().st_size for name in ARTEFACTS if (tmp / name).is_file()}
    report = {
        "tool": REPORT_TOOL, "report_version": REPORT_VERSION, "version": _version(),
        "target": {"name": t.name, "arch": t.arch, "tvm": dict(t.tvm), "cc": t.cc,
                   "features": sorted(t.features), "runs_here": t.is_host},
        "model": {"source": source, "arch": arch if isinstance(arch, dict) else None,
                  "num_ops": qnet.num_ops, "layers": [layer.name for layer in slotted.layers],
                  "kernels": {la["name"]: la["kernel"] for la in metadata["layers"]},   # registry names
                  "input_shape": [batch, *slotted.input_shape],
                  "output_shape": list(plan.outputs[0].shape) if plan.outputs else None},
        "options": {"batch": batch, "threads": threads, "cross_compiler": t.cc, "kernel_prefix": prefix,
                    "keep_mismatch": bool(keep_mismatch)},
        "artefacts": artefacts,
        "manifest": msizes,
        "operating_points": per_op,
        "tables": {b["name"]: b["sha256"] for b in msizes["bank"]},
        "plan": {"steps": len(plan.steps), "kernels": sorted(plan.kernels), "constants": len(plan.consts),
                 "slots": len(plan.slots), "buffers": len(plan.buffers), "arena_bytes": plan.arena_bytes,
                 "arena_bytes_without_reuse": plan.unshared_bytes},
        "verification": verification,
        "times_s": pr.times,
    }
    report["times_s"]["report"] = 0.0
    report["times_s"]["total"] = round(time.perf_counter() - t_start + pr.times.get("load", 0.0), 3)
    (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, sort_keys=False, default=str) + "\n")
    report["artefacts"][REPORT_NAME] = (tmp / REPORT_NAME).stat().st_size
    pr.done(f"{REPORT_NAME} -> {out_dir}")
    return report


def list_targets_text() -> str:
    """One line per target: name, aliases, compiler (and whether it is installed), description."""
    from .targets import load_targets

    lines = []
    for t in load_targets().values():
        have = shutil.which(t.cc) is not None
        alias = f" ({', '.join(t.aliases)})" if t.aliases else ""
        where = "runs here" if t.is_host else (f"emulator {t.emulator[0]}" if t.emulator else "no emulator")
        lines.append(f"{t.name}{alias}: {t.description} [cc {t.cc}: "
                     f"{'installed' if have else 'missing, apt-get install ' + t.package}; {where}]")
    return "\n".join(lines)

