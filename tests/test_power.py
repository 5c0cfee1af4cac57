"""Power model and parameter overhead (method step 6)."""
from __future__ import annotations

import numpy as np
import pytest

from qos_compile.errors import QosError
from qos_compile.multipliers import Multiplier, bundled, exact_table
from qos_compile.search.power import circuit_powers, op_power_table, param_overhead, relative_power


def test_relative_power_is_mac_weighted():
    power = [0.4, 0.2, 0.1]
    macs = [100, 300]
    # layer 0 exact (share 1/4), layer 1 at half power (share 3/4)
    assert relative_power([0, 1], macs, power, 0.4) == pytest.approx(0.25 + 0.75 * 0.5)
    assert relative_power([0, 0], macs, power, 0.4) == pytest.approx(1.0)
    assert relative_power(np.array([2, 2]), np.array(macs), np.array(power), 0.4) == pytest.approx(0.25)


def test_op_power_table():
    power = [0.4, 0.2, 0.1]
    names = ["exact", "half", "quarter"]
    assign = np.array([[0, 1], [1, 2]])
    table = op_power_table(assign, [100, 300], power, 0.4, names=names, scales=[0.3, 1.0])
    assert [t["op"] for t in table] == [0, 1]
    assert table[0]["relative_power"] == pytest.approx(0.625)
    assert table[0]["savings_pct"] == pytest.approx(37.5)
    assert table[1]["savings_pct"] == pytest.approx(100 * (1 - (0.25 * 0.5 + 0.75 * 0.25)))
    assert table[1]["circuits"] == ["half", "quarter"] and table[0]["scale"] == 0.3
    layers = table[1]["layers"]
    assert [x["circuit"] for x in layers] == ["half", "quarter"]
    assert sum(x["contribution"] for x in layers) == pytest.approx(table[1]["relative_power"])
    assert layers[1]["mac_share"] == pytest.approx(0.75)


def test_bundled_circuits_and_missing_power():
    lib = bundled()
    unsigned = lib.select(signed=False)
    power, names = circuit_powers(unsigned)
    exact = lib.exact(False)
    i_exact = names.index(exact.name)
    assert relative_power([i_exact] * 3, [1, 2, 3], power, exact) == pytest.approx(1.0)
    unknown = Multiplier(name="mul8u_nopower", signed=False, lut=exact_table(False) + 1)
    power2, names2 = circuit_powers([exact, unknown])
    assert np.isnan(power2[1])
    assert relative_power([0, 0], [1, 1], power2, exact, names=names2) == 1.0  # unused: fine
    with pytest.raises(QosError, match="circuit mul8u_nopower has no published power; the power model needs it"):
        relative_power([0, 1], [1, 1], power2, exact, names=names2)
    with pytest.raises(QosError, match="mul8u_nopower has no published power"):
        op_power_table([[0, 1]], [1, 1], [0.39, None], exact, names=names2)
    with pytest.raises(QosError, match="circuit mul8u_nopower has no published power"):
        relative_power([0], [1], [1.0], unknown)
    with pytest.raises(QosError):
        relative_power([0, 5], [1, 1], power2, exact)          # index out of range
    with pytest.raises(QosError):
        relative_power([0, 0], [1, 1, 1], power2, exact)       # length mismatch


def test_param_overhead_reproduces_paper_mobilenetv2():
    # torchvision MobileNetV2, 200 classes: 2,480,072 params, 34,112 BN affine; 3 OPs
    pct = param_overhead(2_480_072, 34_112, 0, 3)
    assert pct == pytest.approx(100 * 68_224 / 2_480_072)
    assert round(pct, 2) == 2.75 and pct == pytest.approx(2.7509, abs=1e-4)
    # counting the classifier's 200-element bias per OP too would not give the paper's figure
    assert round(param_overhead(2_480_072, 34_112, 200, 3), 2) == 2.77
    assert param_overhead(1000, 10, 5, 1) == 0.0
    with pytest.raises(QosError):
        param_overhead(0, 10, 0, 3)
    with pytest.raises(QosError):
        param_overhead(1000, 10, 0, 0)
