"""Build TIR kernels for a target and run them there.

Two artefact kinds:

* ``shared`` (default for the host): ``tvm.compile`` -> shared library (``export_library``
  with the target's C compiler) loaded through TVM's runtime, or ``.jit()`` when no
  output folder is given. Used by the TVM/Relax path on x86-64.
* ``system-lib`` (default for every other target): ``tvm.compile`` of a module with the
  ``system_lib_prefix`` attribute -> one relocatable object (``kernels.o``) whose static
  constructor registers each kernel under ``__tvm_ffi_<symbol>`` through
  ``TVMFFIEnvModRegisterSystemLibSymbol``. It is linked statically with the C shim
  (``shim/qos_tvm_shim.c``: workspace, thread pool, error, registry) and a driver; no TVM
  runtime is needed on the device. ``run`` writes the inputs to QTNS files, runs the
  linked ``qos_kernel_driver`` natively or under the target's emulator (qemu), and reads
  the outputs back.

Kernel symbols are ``<prefix><name>`` so that objects of several models can be linked
into one program. A kernel's outputs are its last ``n_outputs`` buffer parameters
(1 unless given as ``(func, n_outputs)``); scalar parameters are passed as Python ints.
"""
from __future__ import annotations

import re
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import tvm

from .. import cbuild
from ..errors import QosError
from ..targets import Target, get_target

SHIM_DIR = Path(__file__).resolve().parent / "shim"
SHIM_SOURCES = ("qos_tvm_shim.c",)
DRIVER_SOURCE = "qos_kernel_driver.c"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DL_CODES = {"int": 0, "uint": 1, "float": 2}


def set_host_threads(n: int) -> None:
    """Re-configure TVM's own thread pool (host ``shared`` kernels) to ``n`` threads.

    Measured here (2-core VM): with ``TVM_NUM_THREADS=2`` set before import, TVM's pool ran
    parallel loops at one thread's speed (process CPU time == wall time); calling
    ``runtime.config_threadpool(0, n, [])`` afterwards gave the expected 2x.
    """
    tvm.get_global_func("runtime.config_threadpool")(0, int(n), [])


# --------------------------------------------------------------------------- C toolchain helpers
def include_dirs() -> list[Path]:
    """Include folders for C code using the shim: the shim itself and the wheel's tvm_ffi/include."""
    import tvm_ffi

    ffi_inc = Path(tvm_ffi.__file__).resolve().parent / "include"
    if not (ffi_inc / "tvm" / "ffi" / "c_api.h").is_file():
        raise QosError(f"TVM FFI C headers not found under {ffi_inc} (is apache-tvm installed?)")
    return [SHIM_DIR, ffi_inc]


def shim_sources() -> list[Path]:
    """The C shim source files a program linking system-lib kernels must compile."""
    return [SHIM_DIR / s for s in SHIM_SOURCES]


def link_executable(target: "str | Target", output: "str | Path", objects: Sequence["str | Path"] = (),
                    sources: Sequence["str | Path"] = (), extra_cflags: Sequence[str] = (),
                    extra_ldflags: Sequence[str] = ()) -> Path:
    """Compile ``sources`` + the shim with the target's compiler and link them statically with ``objects``.

    The command (``qos_compile.cbuild``, warnings on, output written atomically) is
    ``cc -Wall -Wextra <cflags> -I<shim> -I<tvm_ffi/include> <shim.c> <sources> <objects> -o out <ldflags> -lm``.
    """
    t = get_target(target)
    return cbuild.compile_c(cbuild.target_compiler(t), [*shim_sources(), *sources, *objects], output,
                            flags=[*t.cflags, *extra_cflags, *(f"-I{d}" for d in include_dirs())],
                            ldflags=[*t.ldflags, *extra_ldflags, "-lm"], what=f"{Path(output).name} for {t.name}")


# --------------------------------------------------------------------------- QTNS tensor files
def write_tensor_file(path: "str | Path", array: np.ndarray) -> None:
    """Write ``array`` as a QTNS file (the driver's tensor format, see qos_kernel_driver.c)."""
    a = np.ascontiguousarray(array)
    kind = {"i": "int", "u": "uint", "f": "float"}.get(a.dtype.kind)
    if kind is None or a.ndim > 8:
        raise QosError(f"cannot store a {a.dtype} tensor of rank {a.ndim} in a QTNS file")
    head = b"QTNS" + struct.pack("<IBBHI", 1, _DL_CODES[kind], a.dtype.itemsize * 8, 1, a.ndim)
    head += struct.pack(f"<{a.ndim}q", *a.shape)
    Path(path).write_bytes(head + a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())


def read_tensor_file(path: "str | Path") -> np.ndarray:
    """Read a QTNS file written by ``write_tensor_file`` or the driver."""
    raw = Path(path).read_bytes()
    if raw[:4] != b"QTNS":
        raise QosError(f"{path} is not a QTNS tensor file")
    _, code, bits, _, ndim = struct.unpack_from("<IBBHI", raw, 4)
    shape = struct.unpack_from(f"<{ndim}q", raw, 16)
    kind = {v: k for k, v in _DL_CODES.items()}[code]
    dt = np.dtype(f"{kind}{bits}").newbyteorder("<")
    return np.frombuffer(raw, dtype=dt, offset=16 + 8 * ndim, count=int(np.prod(shape))).reshape(shape).astype(dt.newbyteorder("="))


# --------------------------------------------------------------------------- built kernels
@dataclass(frozen=True)
class Param:
    """One kernel parameter: a tensor (shape, dtype) or a scalar (dtype, shape None)."""

    name: str
    dtype: str
    shape: tuple[int, ...] | None
    is_output: bool = False


def _signature(func: "tvm.tirx.PrimFunc", n_outputs: int) -> list[Param]:
    params, buffers = [], []
    for p in func.params:       # TVM 0.27: a tensor parameter is a Var whose type is a BufferType
        ty = p.ty
        if isinstance(ty, tvm.tirx.BufferType):
            params.append(Param(p.name, str(ty.dtype), tuple(int(s) for s in ty.shape)))
            buffers.append(len(params) - 1)
        else:
            params.append(Param(p.name, str(getattr(ty, "dtype", "int64")), None))
    if n_outputs > len(buffers):
        raise QosError(f"kernel has {len(buffers)} tensor parameters, cannot have {n_outputs} outputs")
    for i in buffers[len(buffers) - n_outputs:]:
        params[i] = Param(params[i].name, params[i].dtype, params[i].shape, True)
    return params


@dataclass
class BuiltKernels:
    """Kernels compiled for one target. ``run(name, *inputs)`` executes one there and returns its outputs."""

    target: Target
    kind: str                                   # "shared" or "system-lib"
    prefix: str
    symbols: dict[str, str]                     # kernel name -> global symbol
    signatures: dict[str, list[Param]]
    path: Path | None                           # .so or .o (None for an in-memory JIT module)
    workdir: Path
    module: Any = None                          # tvm runtime Module (shared kind on the host)
    last_time_ns: int | None = None             # set by run(..., repeat > 0)
    run_prefix: list[str] | None = None         # replaces the target's run prefix (e.g. qemu with logging)
    _exe: Path | None = None
    _tmp: Any = field(default=None, repr=False)  # TemporaryDirectory keeping workdir alive

    @property
    def names(self) -> list[str]:
        return list(self.symbols)

    def executable(self) -> Path:
        """The statically linked driver (object + shim + qos_kernel_driver.c), linked once."""
        if self.kind != "system-lib":
            raise QosError("only system-lib kernels link into the C driver")
        if self._exe is None:
            self._exe = link_executable(self.target, self.workdir / "qos_kernel_driver",
                                        objects=[self.path], sources=[SHIM_DIR / DRIVER_SOURCE])
        return self._exe

    def _check_inputs(self, name: str, inputs: Sequence[Any]) -> tuple[list[Param], list[Any]]:
        if name not in self.signatures:
            raise QosError(f"no kernel {name!r}; built: {', '.join(self.symbols)}")
        sig = self.signatures[name]
        ins = [p for p in sig if not p.is_output]
        if len(inputs) != len(ins):
            raise QosError(f"kernel {name} takes {len(ins)} inputs ({', '.join(p.name for p in ins)}), got {len(inputs)}")
        values = []
        for p, v in zip(ins, inputs):
            if p.shape is None:
                values.append(int(v))
                continue
            a = np.asarray(v)
            if a.shape != p.shape or a.dtype != np.dtype(p.dtype):
                raise QosError(f"kernel {name}: input {p.name} must be {p.dtype} {p.shape}, got {a.dtype} {a.shape}")
            values.append(np.ascontiguousarray(a))
        return sig, values

    def run(self, name: str, *inputs: Any, threads: int | None = None, repeat: int = 0,
            timeout: float = 600.0) -> Any:
        """Run kernel ``name`` on the target; returns its output array (a tuple if several).

        ``repeat`` > 0 also times that many further calls; the time (ns, best of) is then
        stored in ``self.last_time_ns``. On a non-host target this runs under the emulator:
        such times are emulation times, to be compared only with each other.
        """
        sig, values = self._check_inputs(name, inputs)
        outs = [np.zeros(p.shape, p.dtype) for p in sig if p.is_output]
        if self.kind == "shared":
            self._run_shared(name, sig, values, outs, repeat)
        else:
            self._run_system_lib(name, sig, values, outs, threads, repeat, timeout)
        return outs[0] if len(outs) == 1 else tuple(outs)

    __call__ = run

    def _run_shared(self, name, sig, values, outs, repeat) -> None:
        dev = tvm.cpu()
        it_in, args, out_t = iter(values), [], []
        for p in sig:
            if p.is_output:
                out_t.append(tvm.runtime.tensor(np.zeros(p.shape, p.dtype), dev))
                args.append(out_t[-1])
            else:
                v = next(it_in)
                args.append(v if p.shape is None else tvm.runtime.tensor(v, dev))
        fn = self.module[self.symbols[name]]
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - TVM raises its own error types
            raise QosError(f"kernel {name} failed: {str(e).strip().splitlines()[-1]}") from None
        if repeat > 0:
            best = float("inf")
            for _ in range(repeat):
                t0 = time.perf_counter_ns()
                fn(*args)
                best = min(best, time.perf_counter_ns() - t0)
            self.last_time_ns = best
        for o, t in zip(outs, out_t):
            o[...] = t.numpy()

    def _run_system_lib(self, name, sig, values, outs, threads, repeat, timeout) -> None:
        exe = self.executable()
        prefix = self.target.run_prefix() if self.run_prefix is None else list(self.run_prefix)
        with tempfile.TemporaryDirectory(prefix="run_", dir=self.workdir) as d:
            it_in, it_out, argv, out_paths = iter(values), iter(outs), [], []
            for k, p in enumerate(sig):
                path = Path(d) / f"a{k}.qt"
                if p.is_output:
                    write_tensor_file(path, next(it_out))
                    argv.append(f"out:{path}")
                    out_paths.append(path)
                else:
                    v = next(it_in)
                    if p.shape is None:
                        argv.append(f"int:{v}")
                    else:
                        write_tensor_file(path, v)
                        argv.append(f"in:{path}")
            cmd = [*prefix, str(exe)]
            if threads:
                cmd += ["-t", str(int(threads))]
            if repeat > 0:
                cmd += ["-r", str(int(repeat))]
            cmd += [self.symbols[name], *argv]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise QosError(f"kernel {name} on {self.target.name} timed out after {timeout:g} s") from None
            if proc.returncode != 0:
                raise QosError(f"kernel {name} on {self.target.name} failed (exit {proc.returncode}): "
                               f"{(proc.stderr or proc.stdout).strip()[-1000:]}")
            m = re.search(r"time_ns min=(\d+)", proc.stdout)
            if m:
                self.last_time_ns = int(m.group(1))
            for o, path in zip(outs, out_paths):
                o[...] = read_tensor_file(path)


def build_kernels(kernels: "Mapping[str, Any]", target: "str | Target", *, out_dir: "str | Path | None" = None,
                  system_lib: bool | None = None, prefix: str = "qos_") -> BuiltKernels:
    """Compile ``{name: PrimFunc or (PrimFunc, n_outputs)}`` for ``target``.

    system_lib: None = shared library on the host, system-lib object elsewhere. Objects go
    to ``out_dir`` (``kernels.so`` / ``kernels.o``), or to a temporary folder that lives as
    long as the returned BuiltKernels. QosError for an unknown target or a missing compiler.
    """
    t = get_target(target)
    if system_lib is None:
        system_lib = not t.is_host
    if not kernels:
        raise QosError("no kernels to build")
    if not _IDENT.match(prefix):
        raise QosError(f"symbol prefix {prefix!r} must be a C identifier")
    if system_lib or out_dir is not None:
        t.check_toolchain()
    funcs, symbols, sigs = {}, {}, {}
    for name, val in kernels.items():
        func, n_out = (val if isinstance(val, tuple) else (val, 1))
        if not _IDENT.match(name):
            raise QosError(f"kernel name {name!r} must be a C identifier")
        sym = prefix + name
        funcs[sym] = func.with_attr("global_symbol", sym)
        symbols[name] = sym
        sigs[name] = _signature(func, n_out)
    mod = tvm.IRModule(funcs)
    if system_lib:
        mod = mod.with_attr("system_lib_prefix", prefix)
    try:
        ex = tvm.compile(mod, target=t.tvm_target())
    except QosError:
        raise
    except Exception as e:  # noqa: BLE001 - TVM raises its own error types
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]   # TVM may raise with no message at all
        raise QosError(f"TVM could not compile the kernels for {t.name}: "
                       f"{lines[-1] if lines else type(e).__name__}") from None

    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="qos_kernels_")
        workdir = Path(tmp.name)
    else:
        workdir = Path(out_dir)
        workdir.mkdir(parents=True, exist_ok=True)
    module, path = None, None
    if system_lib:
        path = workdir / "kernels.o"
        ex.mod.write_to_file(str(path))
        kind = "system-lib"
    else:
        kind = "shared"
        if out_dir is None and t.is_host:
            module = ex.jit()
        else:
            path = workdir / "kernels.so"
            ex.export_library(str(path), fcompile=cbuild.tvm_fcompile(cbuild.target_compiler(t)))
            if t.is_host:
                module = tvm.runtime.load_module(str(path))
    return BuiltKernels(target=t, kind=kind, prefix=prefix, symbols=symbols, signatures=sigs, path=path,
                        workdir=workdir, module=module, _tmp=tmp)


def run_on_target(built: BuiltKernels, name: str, *inputs: Any, threads: int | None = None,
                  repeat: int = 0) -> Any:
    """Run kernel ``name`` of ``built`` on its target (natively, through TVM, or under the emulator)."""
    if built.kind == "shared" and built.module is None:
        raise QosError(f"kernels for {built.target.name} are a shared library for another machine; "
                       "build them with system_lib=True to run them here")
    return built.run(name, *inputs, threads=threads, repeat=repeat)


# --------------------------------------------------------------------------- benchmark
def benchmark_conv(target: "str | Target" = "x86_64", repeat: int = 20, seed: int = 0,
                   threads: int | None = None) -> dict[str, float]:
    """Time (ms, best of ``repeat``) naive vs scheduled LUT conv and the exact conv: 3x3, 64->64, 32x32.

    Checks every result against qos_compile.reference first. Runs on the host through TVM's
    runtime (threads: TVM_NUM_THREADS), or under the emulator for other targets.
    """
    from ..reference import approx_conv2d_acc
    from .kernels import ConvSpec, approx_conv2d_func, exact_conv2d_func

    t = get_target(target)
    if threads and t.is_host:
        set_host_threads(threads)
    spec = ConvSpec.make((1, 64, 32, 32), (64, 64, 3, 3), padding=1, pad_code=7)
    built = build_kernels({
        "approx_naive": approx_conv2d_func(spec, t, schedule=False),
        "approx_sched": approx_conv2d_func(spec, t),
        "exact_sched": exact_conv2d_func(spec, t),
    }, t)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, spec.x_shape, dtype=np.uint8)
    w = rng.integers(0, 256, spec.w_shape, dtype=np.uint8)
    lut = rng.integers(-30000, 30000, (256, 256)).astype(np.int32)
    ref = approx_conv2d_acc(x, w, lut, padding=1, pad_code=7, signed=False)
    exact_ref = approx_conv2d_acc(x, w, np.outer(np.arange(256), np.arange(256)), padding=1, pad_code=7, signed=False)
    times = {}
    for name, args, want in (("approx_naive", (x, w, lut), ref), ("approx_sched", (x, w, lut), ref),
                             ("exact_sched", (x, w), exact_ref)):
        got = built.run(name, *args, repeat=repeat, threads=threads)
        if not np.array_equal(got, want):
            raise QosError(f"benchmark kernel {name} is not bit-exact")
        times[name] = built.last_time_ns / 1e6
    return times


if __name__ == "__main__":   # python -m qos_compile.tvm.build [TARGET [THREADS]]
    import sys

    tgt = sys.argv[1] if len(sys.argv) > 1 else "x86_64"
    nthreads = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    res = benchmark_conv(tgt, threads=nthreads)
    note = "" if get_target(tgt).is_host else " (EMULATED: compare ratios only)"
    print(f"3x3 conv 64->64 @32x32, {tgt}, {nthreads} thread(s){note}: "
          + ", ".join(f"{k} {v:.3f} ms" for k, v in res.items()))
