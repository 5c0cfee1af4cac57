"""Operating-point plots: a PNG per call, and labels placed where they stay readable."""
from __future__ import annotations

from qos_compile.plots import _label_offsets, plot_operating_points


def test_labels_of_close_ops_take_opposite_sides_or_stack():
    # OP2 (37 %, 99.0) and OP1 (44 %, 99.5) are close in power: the higher above, the lower below;
    # OP0 far away alternates on its own
    assert _label_offsets([74.3, 43.8, 37.0], [99.5, 99.5, 99.0], span=3.0, top=102.0) == {2: -16, 1: 14, 0: 14}
    # no room above (the axis ends just over 100 %, where the title sits): both below, stacked
    got = _label_offsets([74.3, 43.8, 37.0], [99.26, 99.26, 98.88], span=57.0, top=100.5)
    assert got[2] == -16 and got[1] == -30 and got[0] == -16
    assert _label_offsets([50.0], [None], 10.0, 100.0) == {}


def test_plot_writes_a_png(tmp_path):
    rows = [dict(op=0, relative_power=0.74, savings_pct=26.0, scale=0.3, top1=99.3),
            dict(op=1, relative_power=0.44, savings_pct=56.0, scale=1.0, top1=99.3)]
    out = plot_operating_points(rows, tmp_path / "ops.png", {"top1": 99.3}, "t", [("before", [97.0, 62.0])])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
