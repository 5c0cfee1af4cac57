"""The bundled EvoApprox 8x8 library and name lookup.

Naming: the primary name of every bundled circuit is its EvoApproxLib **master**
name (branch master, 2022-07-26); the 15 circuits that exist only in branch
v2022 keep their v2022 names. The v2022 name of a circuit is an alias. v2022
reuses three master names for *other* circuits (``mul8s_1KV8``, ``mul8s_1KVA``,
``mul8u_17C8``): a plain lookup of such a name is refused as ambiguous, and the
caller chooses with a qualified name, ``master:NAME`` or ``v2022:NAME``.
"""
from __future__ import annotations

import csv
from functools import lru_cache
from importlib import resources
from typing import Iterable, Iterator

import numpy as np

from ..errors import QosError
from .multiplier import Multiplier
from .table import exact_table

NAMINGS = ("master", "v2022")
_DATA = "data"


class Library:
    """An ordered set of circuits with name and alias lookup (see module doc for naming rules)."""

    def __init__(self, multipliers: Iterable[Multiplier] = ()) -> None:
        self._items: list[Multiplier] = []
        self._names: dict[str, dict[str, list[Multiplier]]] = {"": {}, **{n: {} for n in NAMINGS}}
        for m in multipliers:
            self.add(m)

    # building -----------------------------------------------------------------
    def add(self, m: Multiplier, namings: dict[str, str] | None = None, allow_ambiguous: bool = False) -> None:
        """Add a circuit under its name and aliases; ``namings`` maps 'master'/'v2022' to its name there.

        Refuses a table already present, and (unless ``allow_ambiguous``, used only for
        the bundled data's known v2022 name reuse) a name that already means another circuit.
        """
        for other in self._items:
            if other == m:
                raise QosError(f"{m.name}: the same table is already in the library as {other.name}")
        for key in (m.name, *(a.partition(":")[2] or a for a in m.aliases)):
            taken = self._names[""].get(key)
            if taken and not allow_ambiguous:
                raise QosError(f"name {key!r} is already taken by {taken[0].name}")
        self._items.append(m)
        # a qualified alias ("v2022:X") still registers its bare name, so that lookup of X reports the clash
        for key in (m.name, *(a.partition(":")[2] or a for a in m.aliases)):
            self._names[""].setdefault(key, []).append(m)
        for naming, key in (namings or {}).items():
            self._names[naming].setdefault(key, []).append(m)

    def copy(self) -> "Library":
        """A new library with the same circuits and names; adding to the copy leaves this one unchanged."""
        new = Library()
        new._items = list(self._items)
        new._names = {naming: {key: list(ms) for key, ms in names.items()} for naming, names in self._names.items()}
        return new

    # lookup -------------------------------------------------------------------
    def get(self, name: str) -> Multiplier:
        """The circuit called ``name`` (primary name, alias, or ``master:``/``v2022:`` qualified name)."""
        if ":" in name:
            naming, _, key = name.partition(":")
            if naming not in NAMINGS:
                raise QosError(f"unknown naming {naming!r} in {name!r}; use one of {', '.join(NAMINGS)}")
            found = self._names[naming].get(key, [])
            if not found:
                raise QosError(f"no circuit is called {key!r} in EvoApproxLib {naming}")
            return found[0]
        found = self._names[""].get(name, [])
        if not found:
            raise QosError(f"unknown multiplier {name!r}; 'qos-nets multipliers list' shows the names")
        if len(found) > 1:
            meaning = "; ".join(
                f"{n}:{name} is {m.name}" for n in NAMINGS for m in self._names[n].get(name, [])
            )
            raise QosError(f"multiplier name {name!r} is ambiguous ({meaning}); write master:{name} or v2022:{name}")
        return found[0]

    def __contains__(self, name: str) -> bool:
        try:
            self.get(name)
        except QosError:
            return False
        return True

    def __iter__(self) -> Iterator[Multiplier]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def select(self, signed: bool | None = None) -> list[Multiplier]:
        """Circuits of one signedness (all when ``signed`` is None), in library order."""
        return [m for m in self._items if signed is None or m.signed == signed]

    def exact(self, signed: bool) -> Multiplier:
        """The exact circuit of that signedness."""
        for m in self._items:
            if m.signed == signed and m.is_exact:
                return m
        raise QosError(f"the library has no exact {'signed' if signed else 'unsigned'} circuit")


def _float_or_none(text: str) -> float | None:
    return float(text) if text.strip() else None


@lru_cache(maxsize=1)
def bundled() -> Library:
    """The 64 bundled EvoApprox 8x8 circuits (13 signed, 51 unsigned), in published order."""
    pkg = resources.files(__package__) / _DATA
    with resources.as_file(pkg / "evoapprox8_errors.npz") as path:
        errors = dict(np.load(path))
    rows = list(csv.DictReader((pkg / "evoapprox8.csv").read_text().splitlines()))
    lib = Library()
    master_names = {r["name"] for r in rows if r["source_branch"] == "master"}
    for row in rows:
        name, signed = row["name"], row["signedness"] == "signed"
        v2022 = row["name_in_v2022"]
        namings = {"v2022": v2022} if v2022 else {}
        if row["source_branch"] == "master":
            namings["master"] = name
        lut = errors[name].astype(np.int64) + exact_table(signed)
        m = Multiplier(
            name=name,
            signed=signed,
            lut=lut,
            # a v2022 name that is another circuit's master name is shown qualified
            aliases=() if not v2022 or v2022 == name else
            (f"v2022:{v2022}",) if v2022 in master_names else (v2022,),
            power_mw=_float_or_none(row["power_mW"]),
            area_um2=_float_or_none(row["area_um2"]),
            delay_ns=_float_or_none(row["delay_ns"]),
            source=f"EvoApproxLib LITE {row['source_branch']} {row['source_commit'][:8]}",
            citation=row["reference"],
            published={k[4:]: v for k, v in row.items() if k.startswith("pub_")},
        )
        lib.add(m, namings, allow_ambiguous=True)
    return lib


def get(name: str) -> Multiplier:
    """Look up a bundled circuit by name (see module doc for the naming rules)."""
    return bundled().get(name)
