"""Regenerate the bundled EvoApprox data from ../shared/evoapprox (run by developers, not at install).

Stores each circuit's *error* table ``lut - exact`` (it compresses better than
the table itself) and the published figures; metrics are recomputed at run time.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

KEEP = ["name", "signedness", "power_mW", "area_um2", "delay_ns", "pub_mae_lsb", "pub_mae_pct",
        "pub_wce_lsb", "pub_wce_pct", "pub_mre_pct", "pub_ep_pct", "pub_wcre_pct", "pub_mse_lsb2",
        "is_exact", "symmetric", "c_first_param", "source_branch", "source_commit", "name_in_v2022",
        "pareto_sets", "reference"]


def main(src: Path, dst: Path) -> None:
    rows = list(csv.DictReader(open(src / "metrics.csv", newline="")))
    errors = {}
    for kind in ("mul8u", "mul8s"):
        tables = np.load(src / f"luts_{kind}.npz")
        codes = np.arange(256, dtype=np.int64) - (128 if kind == "mul8s" else 0)
        for name in tables.files:
            errors[name] = (tables[name].astype(np.int64) - np.outer(codes, codes)).astype(np.int32)
    assert sorted(errors) == sorted(r["name"] for r in rows)
    np.savez_compressed(dst / "evoapprox8_errors.npz", **errors)
    with open(dst / "evoapprox8.csv", "w", newline="") as f:
        w = csv.DictWriter(f, KEEP, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in KEEP})


if __name__ == "__main__":
    here = Path(__file__).resolve().parent.parent  # repository root
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else here.parent / "shared" / "evoapprox",
         here / "qos_compile" / "multipliers" / "data")
