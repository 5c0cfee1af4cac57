"""`qos-nets multipliers list|show|import|remove`: browse the multiplier library and add circuits to it.

The library is the bundled EvoApprox circuits followed by the user's imported ones
(``$QOS_COMPILE_HOME/multipliers/``, see `qos_compile.multipliers.user_library`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from ..errors import QosError
from ..multipliers.importers import KINDS, find_c_multiplier, import_multiplier, kind_of
from ..multipliers.library import bundled
from ..multipliers.multiplier import Multiplier
from ..multipliers.user_library import (
    add_user_multiplier,
    load_library,
    remove_user_multiplier,
    save_multiplier,
    user_file,
)

#: Field names of `list --json` rows (and the first fields of `show --json`), in order.
JSON_FIELDS = ("name", "aliases", "signed", "power_mw", "area_um2", "delay_ns", "mae", "mae_pct", "wce",
               "wce_pct", "mre_pct", "wcre_pct", "ep_pct", "mse", "mean_error", "std_error", "sha256")

# Published figure keys (Multiplier.published) next to the computed metric they round.
_PUBLISHED = (("mae_lsb", "mae", "MAE [lsb]"), ("mae_pct", "mae_pct", "MAE% [of 2^16]"),
              ("wce_lsb", "wce", "WCE [lsb]"), ("wce_pct", "wce_pct", "WCE% [of 2^16]"),
              ("mre_pct", "mre_pct", "MRE% [exact!=0]"), ("wcre_pct", "wcre_pct", "WCRE% [exact!=0]"),
              ("ep_pct", "ep_pct", "EP%"), ("mse_lsb2", "mse", "MSE [lsb^2]"),
              (None, "mean_error", "bias (mean error)"), (None, "std_error", "std of error"))


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register the `multipliers` subcommand and its actions."""
    p = sub.add_parser("multipliers", help="the approximate-multiplier library",
                       description="Browse the approximate 8x8 multiplier library and import circuits into it.")
    s = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    lp = s.add_parser("list", help="one row per circuit", description="List the circuits, in library order.")
    sign = lp.add_mutually_exclusive_group()
    sign.add_argument("--signed", dest="signed", action="store_const", const=True, help="signed circuits only")
    sign.add_argument("--unsigned", dest="signed", action="store_const", const=False, help="unsigned circuits only")
    lp.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    lp.set_defaults(func=_list)

    sp = s.add_parser("show", help="all about one circuit",
                      description="Show a circuit's figures, metrics (computed and published), source and citation.")
    sp.add_argument("name", metavar="NAME", help="name, alias, or master:NAME / v2022:NAME")
    sp.add_argument("--json", action="store_true", help="print a JSON object")
    sp.set_defaults(func=_show)

    ip = s.add_parser(
        "import", help="import a circuit into the user library",
        description="Import a circuit from an EvoApprox-style C model (.c), a NumPy table (.npy/.npz, "
                    "int, shape (256, 256), lut[A, B], signed: index code+128) or a TFApprox table (.bin), "
                    "and save it to the user library ($QOS_COMPILE_HOME/multipliers/, default "
                    "~/.local/share/qos-compile/multipliers/) or to --output.")
    ip.add_argument("file", metavar="FILE", type=Path, help="a .c, .npy, .npz or .bin file")
    ip.add_argument("--name", required=True, help="the circuit's name in the library")
    ip.add_argument("--kind", choices=KINDS, help="input format (default: from the file suffix)")
    sign = ip.add_mutually_exclusive_group()
    sign.add_argument("--signed", dest="signed", action="store_const", const=True,
                      help="signed circuit (default: from a mul8s/mul8u C function or --name)")
    sign.add_argument("--unsigned", dest="signed", action="store_const", const=False, help="unsigned circuit")
    ip.add_argument("--key", help="the array to use in a .npz archive holding several")
    ip.add_argument("--function", help="the C function to use when the model defines several")
    ip.add_argument("--transpose", action="store_true", help="the source's first operand is port B: swap the ports")
    ip.add_argument("--power-mw", type=_nonneg, metavar="MW", help="published power in mW (default: unknown)")
    ip.add_argument("--area-um2", type=_nonneg, metavar="UM2", help="published area in um^2 (default: unknown)")
    ip.add_argument("--delay-ns", type=_nonneg, metavar="NS", help="published delay in ns (default: unknown)")
    ip.add_argument("--citation", default="", help="what to cite for this circuit")
    ip.add_argument("--output", type=Path, metavar="PATH.npz",
                    help="write the circuit to this file instead of the user library")
    ip.set_defaults(func=_import)

    rp = s.add_parser("remove", help="remove an imported circuit from the user library")
    rp.add_argument("name", metavar="NAME")
    rp.set_defaults(func=_remove)


def _nonneg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return v


# --------------------------------------------------------------------------- list / show
def record(m: Multiplier) -> dict[str, Any]:
    """The `list --json` object of a circuit (fields `JSON_FIELDS`)."""
    rec: dict[str, Any] = {"name": m.name, "aliases": list(m.aliases), "signed": m.signed,
                           "power_mw": m.power_mw, "area_um2": m.area_um2, "delay_ns": m.delay_ns}
    rec.update(m.metrics.to_dict())
    rec["sha256"] = m.sha256
    return rec


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _table(rows: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _list(args: argparse.Namespace) -> int:
    circuits = load_library().select(args.signed)
    if args.json:
        json.dump([record(m) for m in circuits], sys.stdout, indent=1)
        print()
        return 0
    rows = [("name", "kind", "power mW", "area um2", "MAE%", "WCE%", "MRE%", "EP%", "bias", "aliases")]
    for m in circuits:
        x = m.metrics
        rows.append((m.name, "signed" if m.signed else "unsigned", _fmt(m.power_mw, ".4f"), _fmt(m.area_um2, ".1f"),
                     f"{x.mae_pct:.4f}", f"{x.wce_pct:.3f}", f"{x.mre_pct:.2f}", f"{x.ep_pct:.2f}",
                     f"{x.mean_error:+.2f}", ", ".join(m.aliases) or "-"))
    print(_table(rows, right={2, 3, 4, 5, 6, 7, 8}))
    return 0


def _show(args: argparse.Namespace) -> int:
    m = load_library().get(args.name)
    stored = user_file(m.name) if _is_user(m) else None
    if args.json:
        rec = record(m)
        rec.update(power_is_estimate=m.power_is_estimate, is_exact=m.is_exact, source=m.source,
                   citation=m.citation, published=dict(m.published), file=None if stored is None else str(stored))
        json.dump(rec, sys.stdout, indent=1)
        print()
        return 0
    power = _fmt(m.power_mw, "g") + (" mW" if m.power_mw is not None else "")
    power += " (estimate)" if m.power_is_estimate else ""
    info = [
        ("name", m.name),
        ("aliases", ", ".join(m.aliases) or "-"),
        ("signedness", "signed (codes -128..127, index code+128)" if m.signed else "unsigned (codes 0..255)"),
        ("exact", "yes" if m.is_exact else "no"),
        ("power", power),
        ("area", _fmt(m.area_um2, "g") + (" um^2" if m.area_um2 is not None else "")),
        ("delay", _fmt(m.delay_ns, "g") + (" ns" if m.delay_ns is not None else "")),
        ("sha256", m.sha256),
        ("source", m.source or "-"),
        ("citation", m.citation or "-"),
    ]
    if stored is not None:
        info.append(("stored in", str(stored)))
    print(_table([(k + ":", v) for k, v in info], right=set()))
    print()
    metrics = m.metrics.to_dict()
    rows = [("metric", "computed", "published")]
    for pub_key, field, label in _PUBLISHED:
        rows.append((label, f"{metrics[field]:.6g}", (m.published.get(pub_key) or "-") if pub_key else "-"))
    print(_table(rows, right={1, 2}))
    return 0


def _is_user(m: Multiplier) -> bool:
    # Names are unique across bundled and user circuits, so a user file of that name is this circuit.
    try:
        return user_file(m.name).is_file()
    except QosError:  # a name that cannot be a user file name is a bundled one
        return False


# --------------------------------------------------------------------------- import / remove
def _import(args: argparse.Namespace) -> int:
    if args.output is not None and args.output.suffix.lower() != ".npz":
        raise QosError(f"--output must name a .npz file, got {args.output}")
    m = import_multiplier(args.file, args.name, kind=args.kind, signed=args.signed, key=args.key,
                          function=args.function, transpose=args.transpose)
    given = {k: v for k, v in (("power_mw", args.power_mw), ("area_um2", args.area_um2),
                               ("delay_ns", args.delay_ns), ("citation", args.citation or None)) if v is not None}
    if given:
        m = dataclasses.replace(m, **given)
    is_c = kind_of(args.file, args.kind) == "evoapprox-c"
    ports = _ports_note(args.file, args.function, args.transpose) if is_c else ""  # before writing anything
    same: list[str] = []
    if args.output is not None:
        try:
            lib = load_library()
        except QosError:  # a broken user library must not block writing to a chosen file
            lib = bundled()
        same = [other.name for other in lib if other == m]
        where = save_multiplier(m, args.output)
    else:
        where = add_user_multiplier(m)
    x = m.metrics
    kind = "signed" if m.signed else "unsigned"
    print(f"imported {m.name} ({kind}) from {args.file}")
    if ports:
        print(f"  {ports}")
    print(f"  sha256 {m.sha256}")
    print(f"  MAE% {x.mae_pct:.4g}  WCE% {x.wce_pct:.4g}  MRE% {x.mre_pct:.4g}  EP% {x.ep_pct:.4g}  "
          f"bias {x.mean_error:+.4g}{'  (exact)' if m.is_exact else ''}")
    for name in same:
        print(f"  note: the same table as library circuit {name}")
    print(f"saved to {where}")
    return 0


def _ports_note(path: Path, function: str | None, transpose: bool) -> str:
    f = find_c_multiplier(path.read_bytes().decode("utf-8", errors="replace"), function)
    a, b = (f.params[0], f.params[1]) if f.port_a_index == 0 else (f.params[1], f.params[0])
    if transpose:
        a, b = b, a
    how = "by parameter name" if f.ports_from_names else "by position (parameters not named A/B)"
    how += ", transposed" if transpose else ""
    return f"function {f.signature()}: port A = {a.name}, port B = {b.name} ({how})"


def _remove(args: argparse.Namespace) -> int:
    print(f"removed {args.name} ({remove_user_multiplier(args.name)})")
    return 0
