"""scripts/bundle_evoapprox.py: from the publisher's table layout back to the bundled data, exactly.

The publisher's folder is not part of the repository, so the test rebuilds one in that layout
from the bundled library (docs/design.md, "Regenerating the bundled data") and requires the
script to reproduce the bundled files.
"""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from qos_compile.multipliers import bundled

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "qos_compile" / "multipliers" / "data"


def _script():
    spec = importlib.util.spec_from_file_location("bundle_evoapprox", ROOT / "scripts" / "bundle_evoapprox.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _publisher_folder(folder: Path) -> None:
    """luts_mul8u.npz / luts_mul8s.npz keyed by name (int32, lut[A, B]) and a metrics.csv with extra columns."""
    for prefix, signed in (("mul8u", False), ("mul8s", True)):
        luts = {m.name: np.asarray(m.lut, dtype=np.int32) for m in bundled().select(signed)}
        assert all(n.startswith(prefix) for n in luts)
        np.savez_compressed(folder / f"luts_{prefix}.npz", **luts)
    rows = list(csv.DictReader((DATA / "evoapprox8.csv").read_text().splitlines()))
    by_name = {m.name: m for m in bundled()}
    with open(folder / "metrics.csv", "w", newline="") as f:
        fields = ["mae_lsb", *rows[0].keys(), "mre_max1_pct"]  # extra columns, one before the kept ones
        w = csv.DictWriter(f, fields)
        w.writeheader()
        for r in rows:
            w.writerow({**r, "mae_lsb": by_name[r["name"]].metrics.mae, "mre_max1_pct": "0"})


def test_bundler_reproduces_the_bundled_data(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    _publisher_folder(src)
    _script().main(src, out)
    assert (out / "evoapprox8.csv").read_bytes() == (DATA / "evoapprox8.csv").read_bytes()
    with np.load(out / "evoapprox8_errors.npz") as got, np.load(DATA / "evoapprox8_errors.npz") as want:
        assert sorted(got.files) == sorted(want.files) and len(got.files) == 64
        for name in want.files:
            assert got[name].dtype == np.int32
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_bundler_refuses_incomplete_input(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _publisher_folder(src)
    (src / "luts_mul8s.npz").unlink()
    with pytest.raises(SystemExit, match="missing luts_mul8s.npz"):
        _script().main(src, tmp_path)
    assert not (tmp_path / "evoapprox8.csv").exists()
