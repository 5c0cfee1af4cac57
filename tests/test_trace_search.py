"""Operand tracing (im2col rows incl. zero-point padding, groups, per-channel zero points) and the search stage."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qos_compile.errors import QosError
from qos_compile.multipliers import bundled, get
from qos_compile.nn import ApproxConv2d, Mode, QuantConfig, wrap_model
from qos_compile.search import measure_error_std, reference_spread
from qos_compile.search.search import SearchConfig, check_scales, run_search, with_exact
from qos_compile.search.trace import measure_layer_error, trace_layers, trace_samples

torch.set_num_threads(2)
EXACT_U = bundled().exact(False)
SOME_U = ["mul8u_2NDH", "mul8u_C67", "mul8u_185Q", "mul8u_NGR", "mul8u_DG8"]


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=True)
        self.conv3 = nn.Conv2d(6, 6, 3, padding=(1, 2), dilation=(1, 2), bias=False)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))  # no ReLU: conv2's input has negative values, so its zero point is > 0
        x = torch.relu(self.conv3(self.conv2(x)))
        return self.fc(x.flatten(1))


def _calibrated(qconfig: QuantConfig | None = None, mults=None):
    torch.manual_seed(0)
    q = wrap_model(Tiny(), mults, num_ops=1, qconfig=qconfig, input_shape=(2, 8, 8))
    q.set_mode(Mode.QUANT)
    q.train()
    with torch.no_grad():
        q(torch.randn(16, 2, 8, 8, generator=torch.Generator().manual_seed(1)))
    q.eval()
    return q


def _x(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 2, 8, 8, generator=torch.Generator().manual_seed(2))


def _centred_conv(codes: torch.Tensor, layer: ApproxConv2d, zx: int, w: np.ndarray, zw: np.ndarray) -> torch.Tensor:
    pt, pl, pb, pr = layer.pads()
    xp = F.pad(codes.double() - zx, (pl, pr, pt, pb))
    wt = torch.from_numpy(w.reshape(layer.weight.shape).astype(np.float64))
    wt = wt - (torch.from_numpy(zw.astype(np.float64)).view(-1, 1, 1, 1) if zw.ndim else float(zw))
    return F.conv2d(xp, wt, None, layer.stride, 0, layer.dilation, layer.groups)


@pytest.mark.parametrize("qconfig", [QuantConfig(), QuantConfig(per_channel=True), QuantConfig(signed=True)],
                         ids=["per-tensor", "per-channel", "signed"])
def test_trace_rows_reproduce_the_layer(qconfig: QuantConfig):
    q = _calibrated(qconfig, [bundled().exact(qconfig.signed)])
    x = _x()
    seen: dict[str, list[torch.Tensor]] = {i.name: [] for i in q.approx_layers()}
    hooks = [i.module.register_forward_pre_hook(lambda m, a, n=i.name: seen[n].append(m.quantize_input(a[0])[0]))
             for i in q.approx_layers()]
    traces = trace_layers(q, x, batch_size=4, max_rows=10**6, measure_samples=6)
    for h in hooks:
        h.remove()
    codes_in = {k: torch.cat(v) for k, v in seen.items()}
    assert [t.name for t in traces] == ["conv1", "conv2", "conv3", "fc"]
    c1, c2, c3, fc = traces
    # shapes: (G, R, K) rows and (G, O/G, K) weights; every position kept (max_rows large)
    assert c1.rows.shape == (1, 6 * 4 * 4, 2 * 9) and c1.weights.shape == (1, 4, 18)
    assert c2.groups == 2 and c2.rows.shape == (2, 6 * 4 * 4, 2 * 9) and c2.weights.shape == (2, 3, 18)
    assert c3.rows.shape == (1, 6 * 4 * 4, 6 * 9)
    assert fc.kind == "linear" and fc.rows.shape == (1, 6, 96) and fc.weights.shape == (1, 5, 96)
    assert c2.positions == 6 * 16 and fc.positions == 6
    lo, hi = (-128, 127) if qconfig.signed else (0, 255)
    for t in traces:
        assert t.rows.dtype == np.int16 and lo <= t.rows.min() and t.rows.max() <= hi
        assert t.w_zero_point.shape == ((t.out_channels,) if qconfig.per_channel else ())
        assert t.sample_codes is not None and t.sample_codes.shape[0] == 6
    assert c2.x_zero_point != 0  # the padding code differs from 0: the check below is meaningful
    for t in traces[:3]:
        layer = dict(q.net.named_modules())[t.name]
        ref = _centred_conv(codes_in[t.name], layer, t.x_zero_point, t.all_weights(), t.w_zero_point)
        n, o, ho, wo = ref.shape
        outs = []
        for g in range(t.groups):
            zw = t.group_w_zero_point(g)
            wg = t.weights[g].astype(np.float64) - (zw[:, None] if np.ndim(zw) else zw)
            outs.append((t.rows[g].astype(np.float64) - t.x_zero_point) @ wg.T)  # (N*Ho*Wo, O/G)
        y = torch.from_numpy(np.concatenate(outs, axis=1)).view(n, ho, wo, o).permute(0, 3, 1, 2)
        assert torch.equal(y, ref)  # the rows, padding included, are the layer's receptive fields
        assert t.spread == pytest.approx(float(ref.std(unbiased=False)), rel=1e-9)
        if t.groups == 1:
            assert t.spread == pytest.approx(reference_spread(t.all_rows(), t.all_weights(), t.x_zero_point,
                                                              t.w_zero_point), rel=1e-9)
    # the top-left receptive field of conv2 (padding 1) starts with padding: zero-point codes
    first = c2.rows[0, 0].reshape(2, 3, 3)
    assert (first[:, 0, :] == c2.x_zero_point).all() and (first[:, :, 0] == c2.x_zero_point).all()


def test_trace_subsamples_rows_and_leaves_model_state():
    q = _calibrated()
    q.set_mode(Mode.FLOAT)
    q.train()
    before = {k: v.clone() for k, v in q.state_dict().items() if isinstance(v, torch.Tensor)}
    traces = trace_layers(q, _x(8), batch_size=3, max_rows=20, seed=0)
    assert q.mode == Mode.FLOAT and q.training
    for k, v in q.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k
    for t in traces[:3]:
        assert 20 <= t.rows.shape[1] <= 20 + 3  # proportional share per batch, rounded up
    again = trace_layers(q, _x(8), batch_size=3, max_rows=20, seed=0)
    assert all(np.array_equal(a.rows, b.rows) for a, b in zip(traces, again))  # seeded


def test_measure_layer_error_matches_rowwise_measurement():
    q = _calibrated()
    traces = trace_layers(q, _x(4), batch_size=4, max_rows=10**6, measure_samples=4)
    m = get("mul8u_2NDH")
    for t in (traces[0], traces[2], traces[3]):  # groups == 1: rows × all neurons is the whole layer
        lay = measure_layer_error(t, m, EXACT_U)
        rows = measure_error_std(t.all_rows(), t.all_weights(), m, n_rows=None)
        assert lay == pytest.approx(rows, rel=1e-9) and lay > 0
        assert measure_layer_error(t, EXACT_U, EXACT_U) == 0.0


def test_trace_samples_is_seeded():
    from qos_compile.data import load_dataset

    ds = load_dataset("digits", image_size=8).train
    a, b = trace_samples(ds, 10, seed=3), trace_samples(ds, 10, seed=3)
    assert a.shape == (10, 1, 8, 8) and torch.equal(a, b)
    assert not torch.equal(a, trace_samples(ds, 10, seed=4))


def test_run_search_picks_at_most_n_and_orders_ops_by_power():
    q = _calibrated()
    with torch.no_grad():
        for s, v in zip(q.sigmas(), [0.05, 0.2, 0.3, 0.1]):
            s.fill_(v)
    cands = [get(n) for n in SOME_U]
    cfg = SearchConfig(scales=(0.3, 1.0, 2.0), n=2, trace_samples=8, measure_layers=1, measure_samples=4)
    res = run_search(q, _x(8), cands, cfg, progress=False)
    assert res.candidates[res.exact_index].is_exact and len(res.candidates) == len(cands) + 1  # exact added
    assert 1 <= len(res.bank) <= 2
    rel = [r["relative_power"] for r in res.power_table]
    assert rel == sorted(rel, reverse=True)
    assert np.asarray(res.ops.assign).shape == (3, 4)
    bank_names = [m.name for m in res.bank]
    assert all(n in bank_names for row in res.assign_names for n in row)
    assert res.assign_bank == [[bank_names.index(n) for n in row] for row in res.assign_names]
    assert res.sigma_pred.shape == (4, len(res.candidates)) and (res.sigma_pred[:, res.exact_index] == 0).all()
    assert res.tolerance == pytest.approx([abs(s) * sp for s, sp in zip(res.agn_sigma, res.spread)])
    assert res.agreement is not None and res.agreement["n"] == len(res.measured) >= len(res.candidates)
    report = json.loads(json.dumps(res.to_json(), allow_nan=False))
    assert report["bank"] == bank_names and report["exact"] == EXACT_U.name
    assert all(set(m) == {"op", "layer", "ratio"} for m in report["misfits"])


def test_search_refuses_wrong_signedness_and_checks_inputs():
    q = _calibrated()
    with pytest.raises(QosError, match="signedness"):
        run_search(q, _x(4), [get("mul8s_1KV6")], SearchConfig(trace_samples=4), progress=False)
    with pytest.raises(QosError):
        SearchConfig(n=0)
    with pytest.raises(QosError):
        check_scales([0.3, -1])
    with pytest.raises(QosError):
        check_scales([])
    cands, i = with_exact([get("mul8u_2NDH")])
    assert cands[i] == EXACT_U and len(cands) == 2
    assert with_exact([EXACT_U, get("mul8u_2NDH")])[1] == 0
