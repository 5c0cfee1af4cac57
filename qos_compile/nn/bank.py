"""The model's shared set of multiplier circuits, with their verified emulation plans."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import QosError
from ..multipliers import Multiplier, table_sha256
from .emulation import EmulationPlan, plan_for


class MultiplierBank(nn.Module):
    """The circuits a QoS-Net may use: buffer ``luts`` (M, 256, 256) int32 plus metadata.

    Names, SHA-256 and power travel in the module's extra state (``<prefix>_extra_state``
    in ``state_dict``), so a checkpoint holds the tables and their identity. Loading a
    state replaces the circuits (same count; same signedness as the layers were built
    for) after checking every table against its SHA-256. Emulation plans are computed at
    construction and after loading (cached process-wide by table hash).
    """

    def __init__(self, multipliers: Sequence[Multiplier]) -> None:
        super().__init__()
        mults = list(multipliers)
        if not mults:
            raise QosError("a multiplier bank needs at least one circuit")
        for m in mults:
            if not isinstance(m, Multiplier):
                raise QosError(f"multiplier bank entries must be Multiplier objects, got {type(m).__name__}")
        kinds = {m.signed for m in mults}
        if len(kinds) > 1:
            names = ", ".join(f"{m.name} ({'signed' if m.signed else 'unsigned'})" for m in mults)
            raise QosError(f"all circuits of a bank must share one signedness: {names}")
        self.register_buffer("luts", torch.from_numpy(np.stack([m.lut for m in mults]).astype(np.int32)))
        self._set_multipliers(mults)

    def _set_multipliers(self, mults: list[Multiplier]) -> None:
        self._multipliers = mults
        self.signed: bool = mults[0].signed
        self.names: list[str] = [m.name for m in mults]
        self.sha256: list[str] = [m.sha256 for m in mults]
        self.power_mw: list[float | None] = [m.power_mw for m in mults]
        self._plans: list[EmulationPlan] = [plan_for(m) for m in mults]

    def __len__(self) -> int:
        return len(self._multipliers)

    def multipliers(self) -> list[Multiplier]:
        """The circuits, in bank order."""
        return list(self._multipliers)

    def plan(self, index: int) -> EmulationPlan:
        """The verified emulation plan of circuit ``index``."""
        return self._plans[index]

    def index(self, name: str) -> int:
        """Bank index of the circuit called ``name``."""
        try:
            return self.names.index(name)
        except ValueError:
            raise QosError(f"multiplier {name!r} is not in the bank ({', '.join(self.names)})") from None

    def get_extra_state(self) -> dict[str, Any]:
        return {"names": list(self.names), "sha256": list(self.sha256), "signed": self.signed,
                "power_mw": list(self.power_mw)}

    def set_extra_state(self, state: Any) -> None:
        # luts were loaded before this is called (torch loads buffers first)
        try:
            names, shas, signed = list(state["names"]), list(state["sha256"]), bool(state["signed"])
            power = list(state.get("power_mw", [None] * len(names)))
        except (TypeError, KeyError) as exc:
            raise QosError(f"multiplier bank state is malformed ({exc})") from None
        if len(names) != self.luts.shape[0] or len(shas) != len(names) or len(power) != len(names):
            raise QosError("multiplier bank state does not match its tables")
        if signed != self.signed:
            raise QosError("the checkpoint's multipliers differ in signedness from the model's quantization")
        luts = self.luts.cpu().numpy()
        mults = []
        for i, (name, sha, pw) in enumerate(zip(names, shas, power)):
            if table_sha256(luts[i]) != sha:
                raise QosError(f"multiplier {name}: table does not match its SHA-256 (corrupt state)")
            current = self._multipliers[i] if i < len(self._multipliers) else None
            if current is not None and current.sha256 == sha and current.name == name:
                mults.append(current)  # keeps the library's full metadata
            else:
                mults.append(Multiplier(name=name, signed=signed, lut=luts[i], power_mw=pw))
        self._set_multipliers(mults)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], prefix: str = "") -> "MultiplierBank":
        """Rebuild a bank from a ``state_dict`` holding ``<prefix>luts`` and ``<prefix>_extra_state``."""
        try:
            luts, meta = state[prefix + "luts"], state[prefix + "_extra_state"]
            mults = [Multiplier(name=n, signed=bool(meta["signed"]), lut=np.asarray(t), power_mw=p)
                     for n, t, p in zip(meta["names"], luts.cpu().numpy(), meta["power_mw"])]
        except (KeyError, TypeError, AttributeError) as exc:
            raise QosError(f"no multiplier bank under prefix {prefix!r} ({exc})") from None
        bank = cls(mults)
        bank.set_extra_state(meta)  # verifies the hashes
        return bank

    def extra_repr(self) -> str:
        return ", ".join(f"{n}:{p.strategy}" for n, p in zip(self.names, self._plans))
