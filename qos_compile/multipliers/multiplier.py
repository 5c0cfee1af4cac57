"""The `Multiplier`: one 8x8 approximate multiplier circuit as an exhaustive table.

Numerics contract (docs/design.md, section 3): ``lut[A, B]`` is int32 of shape (256, 256); port A
takes the weight code, port B the activation code. Unsigned circuits index with
the code itself (0..255); signed circuits with ``code + 128`` (codes -128..127).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Mapping

import numpy as np

from ..errors import QosError
from ..numerics import code_offset, code_range
from .metrics import Metrics, compute_metrics
from .table import exact_table, table_sha256, validate_table


@dataclass(frozen=True, eq=False)
class Multiplier:
    """An 8x8 multiplier circuit: its table, hardware figures and provenance.

    ``power_mw``/``area_um2``/``delay_ns`` are published synthesis figures (EvoApprox:
    45 nm PDK) or ``None`` when unknown; ``power_is_estimate`` marks modelled figures.
    """

    name: str
    signed: bool
    lut: np.ndarray
    aliases: tuple[str, ...] = ()
    power_mw: float | None = None
    area_um2: float | None = None
    delay_ns: float | None = None
    power_is_estimate: bool = False
    source: str = ""
    citation: str = ""
    published: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lut", validate_table(self.lut, f"table of {self.name}"))
        object.__setattr__(self, "aliases", tuple(self.aliases))

    # identity -----------------------------------------------------------------
    @cached_property
    def sha256(self) -> str:
        """SHA-256 of the table bytes (little-endian int32, row-major)."""
        return table_sha256(self.lut)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Multiplier) and self.signed == other.signed and self.sha256 == other.sha256

    def __hash__(self) -> int:
        return hash((self.signed, self.sha256))

    def __repr__(self) -> str:
        kind = "signed" if self.signed else "unsigned"
        power = "?" if self.power_mw is None else f"{self.power_mw:g} mW"
        return f"Multiplier({self.name!r}, {kind}, {power}, sha256={self.sha256[:12]})"

    # numerics -----------------------------------------------------------------
    @property
    def offset(self) -> int:
        """Table index of code 0 (128 for signed circuits, else 0)."""
        return code_offset(self.signed)

    @property
    def code_range(self) -> tuple[int, int]:
        """Inclusive operand code range."""
        return code_range(self.signed)

    @cached_property
    def error(self) -> np.ndarray:
        """Error table ``lut - a*b`` (int64), same layout as ``lut``."""
        err = self.lut.astype(np.int64) - exact_table(self.signed)
        err.flags.writeable = False
        return err

    @property
    def is_exact(self) -> bool:
        """True when the table equals the exact product everywhere."""
        return not self.error.any()

    def __call__(self, w_code: Any, x_code: Any) -> np.ndarray:
        """Look up products elementwise: port A = weight code, port B = activation code."""
        w = np.asarray(w_code, dtype=np.int64) + self.offset
        x = np.asarray(x_code, dtype=np.int64) + self.offset
        if (w.size and (w.min() < 0 or w.max() > 255)) or (x.size and (x.min() < 0 or x.max() > 255)):
            a, b = self.code_range
            raise QosError(f"{self.name}: operand codes must lie in {a}..{b}")
        return self.lut[w, x]

    @cached_property
    def metrics(self) -> Metrics:
        """Error metrics of the table (EvoApprox conventions)."""
        return compute_metrics(self.lut, self.signed)
