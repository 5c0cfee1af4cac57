"""Regenerate the bundled EvoApprox data from the publisher's tables (a developer tool, not run at install).

    python scripts/bundle_evoapprox.py SOURCE_DIR [--out DIR]

SOURCE_DIR must contain:

* ``luts_mul8u.npz`` and ``luts_mul8s.npz``: one array per circuit, keyed by the circuit's
  name, int32 of shape (256, 256), ``lut[A, B]`` with the first index = hardware port A;
  signed circuits are indexed by ``code + 128`` and hold the sign-extended 16-bit product;
* ``metrics.csv``: one row per circuit, names matching the two archives exactly, with at
  least the columns in ``KEEP`` (other columns are ignored; values are copied as strings).

Writes ``evoapprox8_errors.npz`` (each circuit's *error* table ``lut - exact``, which
compresses far better than the table) and ``evoapprox8.csv`` (the ``KEEP`` columns, in
the CSV's row order) into DIR, by default ``qos_compile/multipliers/data/``. Metrics are
recomputed from the tables at run time. See docs/design.md, "Regenerating the bundled data".
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

KEEP = ["name", "signedness", "power_mW", "area_um2", "delay_ns", "pub_mae_lsb", "pub_mae_pct",
        "pub_wce_lsb", "pub_wce_pct", "pub_mre_pct", "pub_ep_pct", "pub_wcre_pct", "pub_mse_lsb2",
        "is_exact", "symmetric", "c_first_param", "source_branch", "source_commit", "name_in_v2022",
        "pareto_sets", "reference"]


INPUTS = ("luts_mul8u.npz", "luts_mul8s.npz", "metrics.csv")
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "qos_compile" / "multipliers" / "data"


def main(src: Path, dst: Path) -> None:
    missing = [f for f in INPUTS if not (src / f).is_file()]
    if missing:
        raise SystemExit(f"{src}: missing {', '.join(missing)} (expected {', '.join(INPUTS)})")
    with open(src / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    absent = [k for k in KEEP if rows and k not in rows[0]]
    if not rows or absent:
        raise SystemExit(f"{src / 'metrics.csv'}: no rows, or missing columns {', '.join(absent)}")
    errors = {}
    for kind in ("mul8u", "mul8s"):
        with np.load(src / f"luts_{kind}.npz", allow_pickle=False) as tables:
            codes = np.arange(256, dtype=np.int64) - (128 if kind == "mul8s" else 0)
            for name in tables.files:
                lut = tables[name]
                if lut.shape != (256, 256) or lut.dtype != np.int32:
                    raise SystemExit(f"luts_{kind}.npz[{name}]: want int32 (256, 256), got {lut.dtype} {lut.shape}")
                errors[name] = (lut.astype(np.int64) - np.outer(codes, codes)).astype(np.int32)
    if sorted(errors) != sorted(r["name"] for r in rows):
        raise SystemExit("the circuit names in metrics.csv and in the two .npz archives differ")
    np.savez_compressed(dst / "evoapprox8_errors.npz", **errors)
    with open(dst / "evoapprox8.csv", "w", newline="") as f:
        w = csv.DictWriter(f, KEEP, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in KEEP})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Regenerate the bundled EvoApprox data from the publisher's tables.")
    parser.add_argument("source", type=Path, help="folder with luts_mul8u.npz, luts_mul8s.npz and metrics.csv")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    args = parser.parse_args()
    main(args.source, args.out)
