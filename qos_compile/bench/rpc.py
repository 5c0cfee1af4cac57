"""Time TVM-built kernels on a real board over TVM RPC (``--rpc-tracker HOST:PORT --rpc-key KEY``).

Board side (standard TVM)::

    python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190          # anywhere reachable
    python -m tvm.exec.rpc_server --tracker HOST:9190 --key rasp4      # on the board

Host side: ``rpc_time_module(lib, "HOST:9190", "rasp4", func_name, args)`` uploads a TVM
shared library built for the board (``build_kernels(..., target, out_dir=...)`` gives
``kernels.so``; an ``Executable`` is exported here), loads it remotely, runs it once to
fetch its outputs (for a bit-exactness check), and times it with ``time_evaluator``.

The loopback tests run TVM's own tracker and server (``tornado`` and ``psutil`` are
dependencies for that), bound to 127.0.0.1 only.
"""
from __future__ import annotations

import contextlib
import os
import socket
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .. import cbuild
from ..errors import QosError
from ..runtime_env import import_tvm
from .timing import Timing

LOOPBACK = "127.0.0.1"


def parse_tracker(addr: str) -> tuple[str, int]:
    """``"HOST:PORT"`` -> (host, port); QosError if malformed."""
    host, sep, port = str(addr).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise QosError(f"RPC tracker must be HOST:PORT, got {addr!r}")
    return host.strip("[]"), int(port)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class LocalRPC:
    tracker: str            # "127.0.0.1:PORT"
    key: str


@contextlib.contextmanager
def start_local_tracker_and_server(key: str = "qos-local", lifetime_s: float = 300.0,
                                   ready_timeout_s: float = 30.0) -> Iterator[LocalRPC]:
    """A tracker and one RPC server registered under ``key``, both on 127.0.0.1 (free ports).

    Always cleaned up on exit; a watchdog stops both after ``lifetime_s`` whatever happens.
    """
    rpc = import_tvm("rpc")
    tracker = import_tvm("rpc.tracker").Tracker(host=LOOPBACK, port=_free_port(), port_end=65535, silent=True)
    tport, stop_tracker = tracker.port, tracker.terminate
    server = None
    done = threading.Event()

    def cleanup() -> None:
        if done.is_set():
            return
        done.set()
        if server is not None:
            with contextlib.suppress(Exception):
                server.terminate()
        with contextlib.suppress(Exception):
            stop_tracker()

    watchdog = threading.Timer(lifetime_s, cleanup)
    watchdog.daemon = True
    watchdog.start()
    try:
        sport = _free_port()
        server = rpc.Server(host=LOOPBACK, port=sport, port_end=min(sport + 200, 65535),
                                tracker_addr=(LOOPBACK, tport), key=key, custom_addr=LOOPBACK, silent=True)
        addr = f"{LOOPBACK}:{tport}"
        deadline = time.monotonic() + ready_timeout_s
        while not _server_registered(LOOPBACK, tport, key):
            if time.monotonic() > deadline:
                raise QosError(f"local RPC server did not register with the tracker at {addr} "
                               f"within {ready_timeout_s:g} s")
            time.sleep(0.1)
        yield LocalRPC(addr, key)
    finally:
        watchdog.cancel()
        cleanup()


def _summary(host: str, port: int, timeout: float = 5.0) -> dict:
    base = import_tvm("rpc.base")

    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        if struct.unpack("<i", base.recvall(s, 4))[0] != base.RPC_TRACKER_MAGIC:
            raise QosError(f"{host}:{port} is not a TVM RPC tracker")
        base.sendjson(s, [base.TrackerCode.SUMMARY])
        value = base.recvjson(s)
    return value[1]


def _server_registered(host: str, port: int, key: str) -> bool:
    try:
        info = _summary(host, port)
    except (OSError, QosError):
        return False
    return info.get("queue_info", {}).get(key, {}).get("free", 0) > 0


def check_tracker(tracker: str, key: str, timeout_s: float = 5.0, wait_s: float = 10.0) -> tuple[str, int]:
    """Fail fast with one clear line if the tracker is unreachable (``timeout_s``), or has no free
    server for ``key`` within ``wait_s`` (a server re-registers a moment after each session)."""
    host, port = parse_tracker(tracker)
    deadline = time.monotonic() + wait_s
    try:
        info = _summary(host, port, timeout_s)
        while info.get("queue_info", {}).get(key, {}).get("free", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
            info = _summary(host, port, timeout_s)
    except QosError:
        raise
    except (OSError, ValueError, struct.error) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e) or type(e).__name__)
        raise QosError(f"cannot reach the RPC tracker at {host}:{port} ({reason}); start it with "
                       f"'python -m tvm.exec.rpc_tracker --port {port}' or check --rpc-tracker") from None
    q = info.get("queue_info", {}).get(key)
    if not q or q.get("free", 0) < 1:
        keys = ", ".join(sorted(info.get("queue_info", {}))) or "none"
        raise QosError(f"the RPC tracker at {host}:{port} has no free server with key {key!r} "
                       f"(keys: {keys}); start one with 'python -m tvm.exec.rpc_server "
                       f"--tracker {host}:{port} --key {key}'")
    return host, port


# --------------------------------------------------------------------------- remote timing
@dataclass
class RpcResult:
    timing: Timing                       # per call, over `repeats` samples of `number` calls each
    outputs: list[np.ndarray]            # the output arguments after one run
    key: str
    func_name: str


def _library_file(lib: Any, tmp: Path) -> Path:
    """A shared-library path for ``lib``: a path, a BuiltKernels (shared kind) or a tvm Executable."""
    if isinstance(lib, (str, os.PathLike)):
        p = Path(lib)
        if not p.is_file():
            raise QosError(f"no such library {p}")
        return p
    path = getattr(lib, "path", None)
    if path is not None and getattr(lib, "kind", "shared") == "shared":
        return Path(path)
    if hasattr(lib, "export_library"):
        p = tmp / "qos_rpc_lib.so"
        # linked by the host compiler, as TVM's default would (a board's library: pass a BuiltKernels instead)
        lib.export_library(str(p), fcompile=cbuild.tvm_fcompile(cbuild.find_compiler()))
        return p
    raise QosError("rpc_time_module wants a .so path, a shared BuiltKernels (built with out_dir) or an Executable")


def rpc_time_module(lib: Any, tracker: str, key: str, func_name: str, args: Sequence[np.ndarray],
                    repeats: int = 10, number: int = 1, n_outputs: int = 1, min_repeat_ms: int = 0,
                    connect_timeout_s: float = 5.0, session_timeout_s: int = 600) -> RpcResult:
    """Upload ``lib`` to a board behind ``tracker`` (HOST:PORT) with ``key``, run ``func_name`` there.

    ``args``: numpy arrays in the kernel's parameter order, the last ``n_outputs`` being the
    output buffers (their contents are only used for shape and dtype). For a BuiltKernels
    kernel ``name`` the symbol is ``built.symbols[name]``. Returns the remote outputs of one
    run and the time_evaluator timing (median/IQR over ``repeats`` samples, ms per call).
    """
    tvm, rpc = import_tvm(), import_tvm("rpc")
    host, port = check_tracker(tracker, key, connect_timeout_s)
    with tempfile.TemporaryDirectory(prefix="qos_rpc_") as d:
        path = _library_file(lib, Path(d))
        try:
            remote = rpc.connect_tracker(host, port).request(key, priority=1, session_timeout=session_timeout_s,
                                                                 max_retry=2)
            remote.upload(str(path))
            rmod = remote.load_module(path.name)
        except Exception as e:  # noqa: BLE001 - TVM raises its own error types
            raise QosError(f"RPC session with key {key!r} at {host}:{port} failed: "
                           f"{str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}") from None
    dev = remote.cpu()
    targs = fn = None
    try:
        targs = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in args]
        fn = rmod[func_name]
        fn(*targs)
        outs = [t.numpy() for t in targs[len(targs) - n_outputs:]]
        ev = rmod.time_evaluator(func_name, dev, number=number, repeat=repeats, min_repeat_ms=min_repeat_ms)
        res = ev(*targs)
    except Exception as e:  # noqa: BLE001
        raise QosError(f"remote run of {func_name} failed: {str(e).strip().splitlines()[-1]}") from None
    finally:
        targs = fn = rmod = remote = None          # noqa: F841 - close the session now
        import gc
        gc.collect()
    timing = Timing.from_samples([float(s) * 1e3 for s in res.results])
    return RpcResult(timing, outs, key, func_name)


# --------------------------------------------------------------------------- command line
def bench_conv_rpc(tracker: str, key: str, target: str = "x86_64", repeats: int = 20, number: int = 3,
                   multiplier: str = "mul8u_2AC", seed: int = 0) -> list[dict[str, Any]]:
    """Time a 3x3 64->64 32x32 LUT conv and the exact conv on the board behind ``tracker``; check bit-exactness.

    The kernels are built as a shared library for ``target`` (cross-compiled for aarch64),
    so the board needs TVM's runtime (``tvm.exec.rpc_server``)."""
    from .. import multipliers
    from ..reference import approx_conv2d_acc
    from ..tvm.build import build_kernels
    from ..tvm.kernels import ConvSpec, approx_conv2d_func, exact_conv2d_func

    check_tracker(tracker, key)
    spec = ConvSpec.make((1, 64, 32, 32), (64, 64, 3, 3), padding=1, pad_code=7, signed=False)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, spec.x_shape, dtype=np.uint8)
    w = rng.integers(0, 256, spec.w_shape, dtype=np.uint8)
    lut = multipliers.get(multiplier).lut
    out = np.zeros(spec.out_shape, np.int32)
    rows = []
    with tempfile.TemporaryDirectory(prefix="qos_rpc_build_") as d:
        built = build_kernels({"lut": approx_conv2d_func(spec, target), "exact": exact_conv2d_func(spec, target)},
                              target, out_dir=d, system_lib=False)
        for name, args, table in (("lut", [x, w, lut, out], lut),
                                  ("exact", [x, w, out], multipliers.exact_table(False))):
            res = rpc_time_module(built, tracker, key, built.symbols[name], args, repeats, number)
            want = approx_conv2d_acc(x, w, table, spec.stride, spec.padding, spec.dilation, spec.groups,
                                     spec.pad_code, False)
            rows.append({"kernel": f"{'LUT conv ' + multiplier if name == 'lut' else 'exact conv'} 3x3 64->64 32x32",
                         "target": target, "time (ms)": res.timing,
                         "bit-exact": bool(np.array_equal(res.outputs[0], want))})
    return rows


def _main(argv: Sequence[str] | None = None) -> int:   # python -m qos_compile.bench.rpc
    import argparse
    import sys

    from .timing import format_table

    ap = argparse.ArgumentParser(description="time TVM LUT/exact conv kernels on a board over TVM RPC")
    ap.add_argument("--rpc-tracker", help="HOST:PORT of a TVM RPC tracker")
    ap.add_argument("--rpc-key", default="qos-local", help="device key the board's rpc_server registered")
    ap.add_argument("--target", default="x86_64", help="qos-compile target name of the board (x86_64, aarch64, ...)")
    ap.add_argument("--local", action="store_true", help="start a loopback tracker + server (127.0.0.1) and use it")
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args(argv)
    try:
        if a.local:
            with start_local_tracker_and_server(a.rpc_key) as rpc:
                rows = bench_conv_rpc(rpc.tracker, rpc.key, a.target, a.repeats)
        elif a.rpc_tracker:
            rows = bench_conv_rpc(a.rpc_tracker, a.rpc_key, a.target, a.repeats)
        else:
            ap.error("give --rpc-tracker HOST:PORT (and --rpc-key KEY) or --local")
    except QosError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    return 0 if all(r["bit-exact"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(_main())
