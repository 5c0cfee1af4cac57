"""Where the non-Python files that qos-compile reads at run time live.

Two folders of the repository are needed by an installed package: ``targets/`` (the
target table, ``*.toml``) and ``runtime/`` (the C runtime's sources, compiled and linked
into every model). In a checkout (editable install) they are the repository's top-level
folders; a wheel ships the same files inside the package as ``qos_compile/_data/targets``
and ``qos_compile/_data/runtime`` (``setup.py`` maps the two folders there, so git holds one
copy). ``data_dir`` is the one function that finds them.

Files that already live inside the package (the TVM shim, the multiplier kernels, the
bundled multipliers) are found next to their modules and need nothing from here.
"""
from __future__ import annotations

from pathlib import Path

from .errors import QosError

__all__ = ["DATA_FOLDERS", "data_dir", "data_dir_candidates"]

#: The top-level repository folders that the wheel ships as package data.
DATA_FOLDERS = ("targets", "runtime")

_PACKAGE = Path(__file__).resolve().parent


def data_dir_candidates(name: str) -> tuple[Path, Path]:
    """Where folder ``name`` may be: (the installed copy, the checkout's top-level folder)."""
    if name not in DATA_FOLDERS:
        raise ValueError(f"unknown data folder {name!r} (known: {', '.join(DATA_FOLDERS)})")
    return _PACKAGE / "_data" / name, _PACKAGE.parent / name


def data_dir(name: str) -> Path:
    """The folder ``name`` (``"targets"`` or ``"runtime"``): the packaged copy, else the checkout's.

    The packaged copy wins, so an unrelated ``targets/`` or ``runtime/`` folder next to an
    installed package (say, in site-packages) is never picked up. QosError naming both
    places when neither exists.
    """
    packaged, checkout = data_dir_candidates(name)
    for d in (packaged, checkout):
        if d.is_dir():
            return d
    raise QosError(f"qos-compile's {name}/ files are missing: not at {packaged} (installed package) nor at "
                   f"{checkout} (repository checkout); reinstall qos-compile")
