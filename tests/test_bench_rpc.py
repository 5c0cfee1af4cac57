"""TVM RPC timing path, on loopback only (127.0.0.1): tracker + server, remote LUT conv, bit-exact."""
from __future__ import annotations

import os
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("tvm")

from qos_compile import multipliers  # noqa: E402
from qos_compile.bench.rpc import (check_tracker, parse_tracker, rpc_time_module,  # noqa: E402
                                   start_local_tracker_and_server)
from qos_compile.errors import QosError  # noqa: E402
from qos_compile.reference import approx_conv2d_acc  # noqa: E402
from qos_compile.targets import host_arch  # noqa: E402

pytestmark = pytest.mark.skipif(host_arch() != "x86_64", reason="kernels are built for the x86-64 host")


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_parse_tracker():
    assert parse_tracker("127.0.0.1:9190") == ("127.0.0.1", 9190)
    for bad in ("127.0.0.1", ":9190", "h:0", "h:x", "h:70000"):
        with pytest.raises(QosError, match="HOST:PORT"):
            parse_tracker(bad)


def test_missing_tracker_is_a_quick_clear_error():
    port = _free_port()                         # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(QosError) as e:
        rpc_time_module("/nonexistent.so", f"127.0.0.1:{port}", "k", "f", [], connect_timeout_s=1)
    assert time.monotonic() - t0 < 3
    msg = str(e.value)
    assert msg.startswith(f"cannot reach the RPC tracker at 127.0.0.1:{port} ") and "\n" not in msg


def test_rpc_times_lut_conv_bit_exact(tmp_path):
    from qos_compile.tvm.build import build_kernels
    from qos_compile.tvm.kernels import ConvSpec, approx_conv2d_func, exact_conv2d_func

    spec = ConvSpec.make((1, 8, 10, 10), (8, 8, 3, 3), stride=1, padding=1, pad_code=5, signed=False)
    built = build_kernels({"lut": approx_conv2d_func(spec, "x86_64"), "exact": exact_conv2d_func(spec, "x86_64")},
                          "x86_64", out_dir=tmp_path)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, spec.x_shape, dtype=np.uint8)
    w = rng.integers(0, 256, spec.w_shape, dtype=np.uint8)
    lut = multipliers.get("mul8u_2AC").lut                          # asymmetric: catches swapped ports
    out = np.zeros(spec.out_shape, np.int32)
    with start_local_tracker_and_server("qos-test", lifetime_s=120) as rpc:
        assert rpc.tracker.startswith("127.0.0.1:")
        res = rpc_time_module(built, rpc.tracker, rpc.key, built.symbols["lut"], [x, w, lut, out], repeats=3)
        want = approx_conv2d_acc(x, w, lut, spec.stride, spec.padding, spec.dilation, spec.groups, spec.pad_code,
                                 False)
        assert res.outputs[0].dtype == np.int32 and np.array_equal(res.outputs[0], want)
        assert res.timing.n == 3 and res.timing.median_ms > 0 and not res.timing.emulated
        ex = rpc_time_module(built.path, rpc.tracker, rpc.key, built.symbols["exact"], [x, w, out], repeats=2)
        exact = approx_conv2d_acc(x, w, multipliers.exact_table(False), spec.stride, spec.padding, spec.dilation,
                                  spec.groups, spec.pad_code, False)
        assert np.array_equal(ex.outputs[0], exact)
        with pytest.raises(QosError, match="no free server with key 'other'"):
            check_tracker(rpc.tracker, "other", wait_s=0.5)
        tracker = rpc.tracker
    with pytest.raises(QosError, match="cannot reach the RPC tracker"):   # cleaned up
        check_tracker(tracker, "qos-test", timeout_s=1)
