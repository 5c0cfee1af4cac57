"""`qos-nets multipliers list|show|import` (placeholder: list only)."""
from __future__ import annotations

import argparse

from ..multipliers import bundled


def add_parser(sub: "argparse._SubParsersAction") -> None:
    """Register the `multipliers` subcommand."""
    p = sub.add_parser("multipliers", help="the approximate-multiplier library")
    s = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    lp = s.add_parser("list", help="one row per circuit")
    lp.set_defaults(func=_list)


def _list(args: argparse.Namespace) -> int:
    for m in bundled():
        print(m.name, m.power_mw)
    return 0
