"""The typed, versioned schema of ``model.pt``'s meta (the JSON next to the tensors; docs/model_pt.md).

:func:`parse` turns the meta dict of a QoS model or float model file into a :class:`ModelMeta`
and validates *everything* first: types, ranges (:data:`LIMITS`), that every float is finite,
that every assignment entry names a circuit of the bank, and the architecture record itself,
which it rebuilds on torch's ``meta`` device (no memory) and runs on the recorded input shape,
so sizes, activations and multiply-accumulates are bounded before a single weight is
allocated. Any problem is one :class:`~qos_compile.errors.QosError` line naming the field, e.g.
``model.pt: meta.num_ops = 1000000000 is out of range 1..256``.

:meth:`ModelMeta.to_json` is what :mod:`qos_compile.qosmodel` writes (always
:data:`FORMAT_VERSION`). Version 1 files (a model-zoo ``arch`` instead of an architecture
record, assignments as circuit names) are upgraded while parsing: the zoo model is built on
the meta device and captured like any other model.

Readers use the typed fields (``meta.input_shape``, ``meta.ops[j].relative_power``,
``meta.provenance.dataset``). A ModelMeta is also a read-only mapping over its JSON form, so
code that passes a stage's meta on to the next stage (``dict(meta)``) keeps working.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterator, Sequence

from .errors import QosError

__all__ = ["FORMAT_VERSION", "READABLE_VERSIONS", "KIND", "FLOAT_KIND", "STRUCTURAL", "LIMITS", "Limits",
           "Circuit", "Layer", "Stats", "Accuracy", "OpRecord", "PredictedRatio", "Normalization", "DatasetRecord",
           "DistributedRecord", "Provenance", "Misfit", "SearchRecord", "FinetuneRecord", "Baseline", "Baselines",
           "Records", "ModelMeta", "ArchitectureShape", "parse", "parse_records", "records_of", "check_architecture"]

#: The meta format this package writes.
FORMAT_VERSION = 2
#: The meta formats it reads (1: zoo models only, upgraded while parsing).
READABLE_VERSIONS = (1, 2)
KIND = "qos-model"
FLOAT_KIND = "qos-float-model"

#: Keys that describe the network itself: the writer (qosmodel) sets them, never a stage's extra meta.
STRUCTURAL = ("kind", "format_version", "stage", "architecture", "zoo", "arch", "input_shape", "output_shape",
              "qconfig", "num_ops", "layers", "bank", "assign", "extra_state", "versions")


@dataclass(frozen=True)
class Limits:
    """What a model.pt may describe. Checked before anything is built, so a hostile file costs
    milliseconds; a file within every limit costs at most what a network of that size costs."""

    ops: int = 256                     # operating points
    classes: int = 100_000             # output features of a classifier (per-sample output of rank 1)
    input_elements: int = 1 << 26      # elements of one input sample
    input_rank: int = 6                # dimensions of one input sample
    activation_elements: int = 1 << 26  # elements of any intermediate tensor, per sample
    macs: int = 1 << 34                # multiply-accumulates of conv/linear layers, per sample
    layers: int = 10_000               # approximate (conv/linear) layers
    circuits: int = 1024               # multipliers in the bank
    assignment_entries: int = 1 << 20  # operating points x layers
    name_chars: int = 200              # layer, circuit, OP and stage names
    text_chars: int = 1 << 16          # any other string
    list_items: int = 1 << 20          # any list
    json_depth: int = 32               # nesting of free-form records


LIMITS = Limits()

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_STAGE = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")
_MISSING: Any = object()


class _Bad(Exception):
    """A field problem; ``parse`` turns it into one QosError line with the file name."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path} {problem}")


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


# ----------------------------------------------------------------------------- free-form JSON
def _json(v: Any, path: str, depth: int = 0) -> Any:
    """``v`` if it is plain JSON within the limits (finite floats, bounded strings and lists)."""
    if depth > LIMITS.json_depth:
        raise _Bad(path, f"is nested more than {LIMITS.json_depth} levels deep")
    if v is None or isinstance(v, (bool, int)):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            raise _Bad(path, f"= {v} is not a finite number")
        return v
    if isinstance(v, str):
        if len(v) > LIMITS.text_chars:
            raise _Bad(path, f"is a string of {len(v)} characters (at most {LIMITS.text_chars})")
        return v
    if isinstance(v, list):
        if len(v) > LIMITS.list_items:
            raise _Bad(path, f"has {len(v)} items (at most {LIMITS.list_items})")
        for i, x in enumerate(v):
            _json(x, f"{path}[{i}]", depth + 1)
        return v
    if isinstance(v, dict):
        if len(v) > LIMITS.list_items:
            raise _Bad(path, f"has {len(v)} keys (at most {LIMITS.list_items})")
        for k, x in v.items():
            if not isinstance(k, str):
                raise _Bad(path, f"has a non-string key {_show(k)}")
            _json(x, f"{path}.{k}", depth + 1)
        return v
    raise _Bad(path, f"has a value of type {type(v).__name__}, which JSON does not have")


class _Obj:
    """Typed reads from one JSON object; every error names ``path.key``."""

    def __init__(self, v: Any, path: str) -> None:
        if not isinstance(v, dict):
            raise _Bad(path, f"= {_show(v)} is not an object")
        self.d, self.path, self.used = v, path, set()

    def _get(self, key: str, default: Any) -> Any:
        self.used.add(key)
        v = self.d.get(key, _MISSING)
        if v is _MISSING:
            if default is _MISSING:
                raise _Bad(f"{self.path}.{key}", "is missing")
            return default
        return v

    def int(self, key: str, lo: int, hi: int, default: Any = _MISSING) -> Any:
        v = self._get(key, default)
        return v if v is None and default is None else _int(v, f"{self.path}.{key}", lo, hi)

    def float(self, key: str, lo: float = -math.inf, hi: float = math.inf, default: Any = _MISSING) -> Any:
        v = self._get(key, default)
        return v if v is None and default is None else _float(v, f"{self.path}.{key}", lo, hi)

    def str(self, key: str, limit: int = LIMITS.text_chars, default: Any = _MISSING) -> Any:
        v = self._get(key, default)
        return v if v is None and default is None else _str(v, f"{self.path}.{key}", limit)

    def bool(self, key: str, default: Any = _MISSING) -> Any:
        v = self._get(key, default)
        if v is None and default is None:
            return v
        if not isinstance(v, bool):
            raise _Bad(f"{self.path}.{key}", f"= {_show(v)} is not true/false")
        return v

    def list(self, key: str, limit: int, default: Any = _MISSING) -> Any:
        v = self._get(key, default)
        return v if v is None and default is None else _list(v, f"{self.path}.{key}", limit)

    def obj(self, key: str) -> "_Obj | None":
        v = self._get(key, None)
        return None if v is None else _Obj(v, f"{self.path}.{key}")

    def json(self, key: str) -> Any:
        """A free-form JSON value (validated, kept as is), None when absent."""
        v = self._get(key, None)
        return None if v is None else _json(v, f"{self.path}.{key}", 1)

    def extra(self) -> dict[str, Any]:
        """The keys not read so far (free-form, validated): kept so nothing a writer adds is lost."""
        return {k: _json(v, f"{self.path}.{k}", 1) for k, v in self.d.items() if k not in self.used}


def _int(v: Any, path: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Bad(path, f"= {_show(v)} is not an integer")
    if not lo <= v <= hi:
        raise _Bad(path, f"= {v} is out of range {lo}..{hi}")
    return v


def _float(v: Any, path: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _Bad(path, f"= {_show(v)} is not a number")
    f = float(v)
    if not math.isfinite(f):
        raise _Bad(path, f"= {v} is not a finite number")
    if not lo <= f <= hi:
        raise _Bad(path, f"= {v} is out of range {lo:g}..{hi:g}")
    return f


def _str(v: Any, path: str, limit: int) -> str:
    if not isinstance(v, str):
        raise _Bad(path, f"= {_show(v)} is not a string")
    if len(v) > limit:
        raise _Bad(path, f"is a string of {len(v)} characters (at most {limit})")
    return v


def _list(v: Any, path: str, limit: int) -> list[Any]:
    if not isinstance(v, list):
        raise _Bad(path, f"= {_show(v)} is not a list")
    if len(v) > limit:
        raise _Bad(path, f"has {len(v)} items (at most {limit})")
    return v


def _names(v: Any, path: str, limit: int, unique: bool = True) -> tuple[str, ...]:
    items = tuple(_str(x, f"{path}[{i}]", LIMITS.name_chars) for i, x in enumerate(_list(v, path, limit)))
    if any(not x for x in items):
        raise _Bad(path, "has an empty name")
    if unique and len(set(items)) != len(items):
        dup = next(x for x in items if items.count(x) > 1)
        raise _Bad(path, f"names {dup!r} twice")
    return items


def _shape(v: Any, path: str, max_elements: int) -> tuple[int, ...]:
    items = _list(v, path, LIMITS.input_rank)
    shape = tuple(_int(x, f"{path}[{i}]", 1, max_elements) for i, x in enumerate(items))
    if math.prod(shape) > max_elements:
        raise _Bad(path, f"= {list(shape)} has {math.prod(shape)} elements (at most {max_elements})")
    return shape


# ----------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Circuit:
    """One multiplier of the bank: name, SHA-256 of its table, published power (None when
    unknown) and signedness. The tables themselves are the tensor ``bank.luts``."""

    name: str
    sha256: str
    power_mw: float | None
    signed: bool

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        return {"name": self.name, "sha256": self.sha256, "power_mw": self.power_mw, "signed": self.signed}


@dataclass(frozen=True)
class Layer:
    """One approximate layer in assignment order: dotted module name, ``conv``/``linear`` and
    multiply-accumulates per sample (None when not measured)."""

    name: str
    kind: str
    macs: int | None

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        return {"name": self.name, "kind": self.kind, "macs": self.macs}


def _with_extra(d: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in d.items() if v is not None}
    out.update(extra)
    return out


@dataclass(frozen=True)
class Stats:
    """Accuracy of one evaluation: top-1/top-5 in percent, mean loss, samples (each may be absent)."""

    top1: float | None = None
    top5: float | None = None
    loss: float | None = None
    count: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        return _with_extra({"top1": self.top1, "top5": self.top5, "loss": self.loss, "count": self.count}, self.extra)


@dataclass(frozen=True)
class Accuracy:
    """One measurement on the validation and test splits."""

    val: Stats | None = None
    test: Stats | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        return _with_extra({"val": self.val and self.val.to_json(), "test": self.test and self.test.to_json()},
                           self.extra)


@dataclass(frozen=True)
class PredictedRatio:
    """The search's predicted fit of an OP: max and mean over layers of σ_pred / (scale·T) (<= 1 fits)."""

    max: float
    mean: float

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        return {"max": self.max, "mean": self.mean}


@dataclass(frozen=True)
class OpRecord:
    """What the stages recorded about one operating point (``ops[j]``)."""

    op: int
    scale: float | None = None
    circuits: tuple[str, ...] = ()
    relative_power: float | None = None
    savings_pct: float | None = None
    predicted_ratio: PredictedRatio | None = None
    before_finetune: Accuracy | None = None
    bn_only: Accuracy | None = None
    full_retrain: Accuracy | None = None
    accuracy: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def test_top1(self) -> float | None:
        """The OP's best known test top-1: ``accuracy``, else after BN-only fine-tuning, else before it."""
        if self.accuracy is not None:
            return self.accuracy
        for rec in (self.bn_only, self.before_finetune):
            if rec is not None and rec.test is not None and rec.test.top1 is not None:
                return rec.test.top1
        return None

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        return _with_extra({
            "op": self.op, "scale": self.scale, "circuits": list(self.circuits) if self.circuits else None,
            "relative_power": self.relative_power, "savings_pct": self.savings_pct,
            "predicted_ratio": self.predicted_ratio and self.predicted_ratio.to_json(),
            "before_finetune": self.before_finetune and self.before_finetune.to_json(),
            "bn_only": self.bn_only and self.bn_only.to_json(),
            "full_retrain": self.full_retrain and self.full_retrain.to_json(), "accuracy": self.accuracy,
        }, self.extra)


@dataclass(frozen=True)
class Normalization:
    """How model inputs are made from raw samples: ``x = (sample - mean) / std``, one value per
    channel (the first per-sample dimension) or one for all."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        return _with_extra({"mean": list(self.mean), "std": list(self.std)}, self.extra)


@dataclass(frozen=True)
class DatasetRecord:
    """The data a model was made with: name (or spec), folder, image size, split seed, sample cap."""

    name: str | None = None
    data_dir: str | None = None
    image_size: int | None = None
    split_seed: int | None = None
    max_samples: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON form (``data_dir``, ``image_size`` and ``max_samples`` kept even when null)."""
        out = {"name": self.name, "data_dir": self.data_dir, "image_size": self.image_size,
               "split_seed": self.split_seed, "max_samples": self.max_samples}
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class DistributedRecord:
    """How many processes trained the model together (``torchrun``; 1 = a single process), their
    ``torch.distributed`` backend (``gloo``/``nccl``; None for one process), the device type
    (``cpu``/``cuda``) and each process's share of a step's batch. Results depend on the
    process count (per-process BatchNorm statistics, data order)."""

    world_size: int = 1
    backend: str | None = None
    device: str | None = None
    per_process_batch: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        return _with_extra({"world_size": self.world_size, "backend": self.backend, "device": self.device,
                            "per_process_batch": self.per_process_batch}, self.extra)


@dataclass(frozen=True)
class Provenance:
    """Where the model came from: dataset, model (zoo name or user spec), seed, the pipeline
    configuration, versions, candidate circuits, run statistics (free-form parts kept as JSON),
    and the processes that trained it (``distributed``)."""

    dataset: DatasetRecord | None = None
    model: str | None = None
    seed: int | None = None
    config: Mapping[str, Any] | None = None
    versions: Mapping[str, Any] | None = None
    candidates: tuple[str, ...] | None = None
    run: Mapping[str, Any] | None = None
    distributed: DistributedRecord | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        return _with_extra({"dataset": self.dataset and self.dataset.to_json(), "model": self.model, "seed": self.seed,
                            "config": self.config, "versions": self.versions,
                            "candidates": None if self.candidates is None else list(self.candidates),
                            "run": self.run, "distributed": self.distributed and self.distributed.to_json()},
                           self.extra)


@dataclass(frozen=True)
class Misfit:
    """A layer whose circuit at an OP does not fit its scaled tolerance (ratio > 1)."""

    op: int
    layer: str
    ratio: float

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        return {"op": self.op, "layer": self.layer, "ratio": self.ratio}


@dataclass(frozen=True)
class SearchRecord:
    """The search stage's report: OP scales, the exact circuit's power, misfits, the agreement of
    predicted and measured error; the rest (per-layer predictions, k-means, power table) as JSON."""

    scales: tuple[float, ...] = ()
    exact_power_mw: float | None = None
    misfits: tuple[Misfit, ...] = ()
    agreement: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        return _with_extra({"scales": list(self.scales), "exact_power_mw": self.exact_power_mw,
                            "misfits": [m.to_json() for m in self.misfits], "agreement": self.agreement}, self.extra)


@dataclass(frozen=True)
class FinetuneRecord:
    """The fine-tuning stage's report: mode (``bn-only``), schedule, history, parameter overhead."""

    mode: str | None = None
    config: Mapping[str, Any] | None = None
    history: Mapping[str, Any] | None = None
    param_overhead: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        return _with_extra({"mode": self.mode, "config": self.config, "history": self.history,
                            "param_overhead": self.param_overhead}, self.extra)


@dataclass(frozen=True)
class Baseline:
    """A reference model's accuracy (e.g. the QAT model with the exact multiplier)."""

    val: Stats | None = None
    test: Stats | None = None
    relative_power: float | None = None
    dataset: DatasetRecord | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        return _with_extra({"val": self.val and self.val.to_json(), "test": self.test and self.test.to_json(),
                            "relative_power": self.relative_power,
                            "dataset": self.dataset and self.dataset.to_json()}, self.extra)


@dataclass(frozen=True)
class Baselines:
    """The baselines measured by the pipeline (``qat_exact``)."""

    qat_exact: Baseline | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        return _with_extra({"qat_exact": self.qat_exact and self.qat_exact.to_json()}, self.extra)


@dataclass(frozen=True, kw_only=True)
class Records:
    """What the stages recorded (all optional). ``extra``: every other top-level key, verbatim
    (free-form stage records such as ``float``, ``qat``, ``agn``, ``full_retrain``, ``stage_seconds``)."""

    stage: str | None = None
    ops: tuple[OpRecord, ...] = ()
    op_names: tuple[str, ...] | None = None
    normalization: Normalization | None = None
    search: SearchRecord | None = None
    finetune: FinetuneRecord | None = None
    baseline: Baselines | None = None
    provenance: Provenance | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def records_json(self) -> dict[str, Any]:
        """The JSON form of the records."""
        out: dict[str, Any] = {}
        if self.stage is not None:
            out["stage"] = self.stage
        if self.ops:
            out["ops"] = [o.to_json() for o in self.ops]
        if self.op_names is not None:
            out["op_names"] = list(self.op_names)
        for key in ("normalization", "search", "finetune", "baseline", "provenance"):
            rec = getattr(self, key)
            if rec is not None:
                out[key] = rec.to_json()
        out.update(self.extra)
        return out

    @property
    def dataset(self) -> DatasetRecord | None:
        """The recorded dataset (``provenance.dataset``)."""
        return self.provenance.dataset if self.provenance is not None else None


@dataclass(frozen=True, kw_only=True)
class ModelMeta(Records, Mapping):  # type: ignore[misc]
    """The whole meta of a model.pt (see the module doc and docs/model_pt.md).

    Float model files (``kind == FLOAT_KIND``) have no quantization, bank, layers or assignment
    (``num_ops == 0``). ``format_version`` is the version the file was written with; ``to_json``
    always writes :data:`FORMAT_VERSION`.
    """

    kind: str
    format_version: int
    architecture: Mapping[str, Any]
    zoo: Mapping[str, Any] | None
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    qconfig: Any = None  # nn.QuantConfig (imported lazily: the schema needs no torch to be read)
    num_ops: int = 0
    layers: tuple[Layer, ...] = ()
    bank: tuple[Circuit, ...] = ()
    assign: tuple[tuple[int, ...], ...] = ()
    extra_state: Mapping[str, Any] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=dict)

    # --- derived -------------------------------------------------------------------------
    @property
    def is_float(self) -> bool:
        """True for a float (pre-QAT) model file."""
        return self.kind == FLOAT_KIND

    @property
    def num_classes(self) -> int | None:
        """Output features of a classifier (per-sample output of rank 1), else None."""
        return self.output_shape[0] if len(self.output_shape) == 1 else None

    @property
    def model_name(self) -> str | None:
        """The zoo name, else the recorded model spec (``provenance.model``), else None."""
        if self.zoo is not None:
            return str(self.zoo["name"])
        return self.provenance.model if self.provenance is not None else None

    @property
    def assign_names(self) -> list[list[str]]:
        """``assign[op][layer]`` as circuit names."""
        names = [c.name for c in self.bank]
        return [[names[i] for i in row] for row in self.assign]

    # --- JSON ----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The meta as written to a file (format :data:`FORMAT_VERSION`)."""
        out: dict[str, Any] = {"kind": self.kind, "format_version": FORMAT_VERSION, "architecture": self.architecture,
                               "input_shape": list(self.input_shape), "output_shape": list(self.output_shape)}
        if self.zoo is not None:
            out["zoo"] = dict(self.zoo)
        if not self.is_float:
            out.update(qconfig=dataclasses.asdict(self.qconfig), num_ops=self.num_ops,
                       layers=[x.to_json() for x in self.layers], bank=[c.to_json() for c in self.bank],
                       assign=[list(row) for row in self.assign])
        out["extra_state"] = dict(self.extra_state)
        out["versions"] = dict(self.versions)
        out.update(self.records_json())
        return out

    @cached_property
    def _view(self) -> dict[str, Any]:
        return self.to_json()

    def __getitem__(self, key: str) -> Any:
        return self._view[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._view)

    def __len__(self) -> int:
        return len(self._view)


# ----------------------------------------------------------------------------- parsing records
def _stats(o: _Obj | None) -> Stats | None:
    if o is None:
        return None
    return Stats(top1=o.float("top1", 0.0, 100.0, None), top5=o.float("top5", 0.0, 100.0, None),
                 loss=o.float("loss", default=None), count=o.int("count", 0, 1 << 62, None), extra=o.extra())


def _accuracy(o: _Obj | None) -> Accuracy | None:
    if o is None:
        return None
    return Accuracy(val=_stats(o.obj("val")), test=_stats(o.obj("test")), extra=o.extra())


def _dataset(o: _Obj | None) -> DatasetRecord | None:
    if o is None:
        return None
    return DatasetRecord(name=o.str("name", default=None), data_dir=o.str("data_dir", default=None),
                         image_size=o.int("image_size", 1, 1 << 16, None),
                         split_seed=o.int("split_seed", 0, (1 << 32) - 1, None),
                         max_samples=o.int("max_samples", 1, 1 << 62, None), extra=o.extra())


def _op(o: _Obj, j: int, bank_names: set[str] | None) -> OpRecord:
    op = o.int("op", j, j, j)  # ops[j] describes OP j
    circuits = _names(o.list("circuits", LIMITS.circuits, []), f"{o.path}.circuits", LIMITS.circuits, unique=False)
    if bank_names is not None:
        for i, c in enumerate(circuits):
            if c not in bank_names:
                raise _Bad(f"{o.path}.circuits[{i}]", f"= {c!r} is not a circuit of the bank")
    pr = o.obj("predicted_ratio")
    ratio = None if pr is None else PredictedRatio(max=pr.float("max", 0.0), mean=pr.float("mean", 0.0))
    return OpRecord(op=op, scale=o.float("scale", 0.0, default=None), circuits=circuits,
                    relative_power=o.float("relative_power", 0.0, default=None),
                    savings_pct=o.float("savings_pct", -1e9, 100.0, None), predicted_ratio=ratio,
                    before_finetune=_accuracy(o.obj("before_finetune")), bn_only=_accuracy(o.obj("bn_only")),
                    full_retrain=_accuracy(o.obj("full_retrain")), accuracy=o.float("accuracy", 0.0, 100.0, None),
                    extra=o.extra())


def _normalization(o: _Obj | None, input_shape: tuple[int, ...] | None) -> Normalization | None:
    if o is None:
        return None
    mean = tuple(_float(v, f"{o.path}.mean[{i}]") for i, v in enumerate(o.list("mean", 1 << 16)))
    std = tuple(_float(v, f"{o.path}.std[{i}]") for i, v in enumerate(o.list("std", 1 << 16)))
    if not mean or len(mean) != len(std):
        raise _Bad(o.path, f"needs as many mean as std values, at least one (got {len(mean)} and {len(std)})")
    for i, s in enumerate(std):
        if not s > 0:
            raise _Bad(f"{o.path}.std[{i}]", f"= {s} is not positive")
    if input_shape is not None and len(mean) not in (1, input_shape[0]):
        raise _Bad(f"{o.path}.mean", f"has {len(mean)} values but the input has {input_shape[0]} channels")
    return Normalization(mean=mean, std=std, extra=o.extra())


def _provenance(o: _Obj | None) -> Provenance | None:
    if o is None:
        return None
    cands = o.list("candidates", LIMITS.list_items, None)
    return Provenance(dataset=_dataset(o.obj("dataset")), model=o.str("model", default=None),
                      seed=o.int("seed", 0, (1 << 32) - 1, None), config=_opt_obj(o, "config"),
                      versions=_opt_obj(o, "versions"),
                      candidates=None if cands is None else _names(cands, f"{o.path}.candidates", LIMITS.list_items,
                                                                   unique=False),
                      run=_opt_obj(o, "run"), distributed=_distributed(o.obj("distributed")), extra=o.extra())


def _distributed(o: _Obj | None) -> DistributedRecord | None:
    if o is None:
        return None
    return DistributedRecord(world_size=o.int("world_size", 1, 1 << 20, 1),
                             backend=o.str("backend", LIMITS.name_chars, None),
                             device=o.str("device", LIMITS.name_chars, None),
                             per_process_batch=o.int("per_process_batch", 1, 1 << 30, None), extra=o.extra())


def _opt_obj(o: _Obj, key: str) -> dict[str, Any] | None:
    v = o.json(key)
    if v is not None and not isinstance(v, dict):
        raise _Bad(f"{o.path}.{key}", f"= {_show(v)} is not an object")
    return v


def _search(o: _Obj | None, num_ops: int | None) -> SearchRecord | None:
    if o is None:
        return None
    scales = tuple(_float(v, f"{o.path}.scales[{i}]", 0.0) for i, v in enumerate(o.list("scales", LIMITS.ops, [])))
    misfits = []
    for i, m in enumerate(o.list("misfits", LIMITS.assignment_entries, [])):
        mo = _Obj(m, f"{o.path}.misfits[{i}]")
        hi = num_ops - 1 if num_ops else LIMITS.ops - 1
        misfits.append(Misfit(op=mo.int("op", 0, hi), layer=mo.str("layer", LIMITS.name_chars),
                              ratio=mo.float("ratio")))
    return SearchRecord(scales=scales, exact_power_mw=o.float("exact_power_mw", 0.0, default=None),
                        misfits=tuple(misfits), agreement=_opt_obj(o, "agreement"), extra=o.extra())


def _finetune(o: _Obj | None) -> FinetuneRecord | None:
    if o is None:
        return None
    return FinetuneRecord(mode=o.str("mode", LIMITS.name_chars, None), config=_opt_obj(o, "config"),
                          history=_opt_obj(o, "history"), param_overhead=_opt_obj(o, "param_overhead"),
                          extra=o.extra())


def _baselines(o: _Obj | None) -> Baselines | None:
    if o is None:
        return None
    q = o.obj("qat_exact")
    qat = None if q is None else Baseline(val=_stats(q.obj("val")), test=_stats(q.obj("test")),
                                          relative_power=q.float("relative_power", 0.0, default=None),
                                          dataset=_dataset(q.obj("dataset")), extra=q.extra())
    return Baselines(qat_exact=qat, extra=o.extra())


def _records(top: _Obj, num_ops: int | None, bank_names: set[str] | None,
             input_shape: tuple[int, ...] | None) -> dict[str, Any]:
    """The Records fields of the top-level object ``top`` (keys read are marked used)."""
    stage = top.str("stage", 40, None)
    if stage is not None and not _STAGE.match(stage):
        raise _Bad(f"{top.path}.stage", f"= {stage!r} is not a stage name")
    raw_ops = top.list("ops", LIMITS.ops, [])
    if raw_ops and num_ops is not None and len(raw_ops) != num_ops:
        raise _Bad(f"{top.path}.ops", f"has {len(raw_ops)} entries but the model has {num_ops} operating point(s)")
    ops = tuple(_op(_Obj(o, f"{top.path}.ops[{j}]"), j, bank_names) for j, o in enumerate(raw_ops))
    names = top.list("op_names", LIMITS.ops, None)
    op_names = None if names is None else _names(names, f"{top.path}.op_names", LIMITS.ops)
    if op_names is not None and num_ops is not None and len(op_names) != num_ops:
        raise _Bad(f"{top.path}.op_names", f"has {len(op_names)} names but the model has {num_ops} operating point(s)")
    return {"stage": stage, "ops": ops, "op_names": op_names,
            "normalization": _normalization(top.obj("normalization"), input_shape),
            "search": _search(top.obj("search"), num_ops), "finetune": _finetune(top.obj("finetune")),
            "baseline": _baselines(top.obj("baseline")), "provenance": _provenance(top.obj("provenance"))}


def _fail(source: str | None, e: _Bad | QosError, what: str = "") -> QosError:
    prefix = f"{source}: " if source else ""
    return QosError(f"{prefix}{what}{e}")


def parse_records(meta: Mapping[str, Any], source: str | None = None, *, num_ops: int | None = None,
                  bank_names: Sequence[str] | None = None) -> Records:
    """Only the stage records of a meta dict (e.g. one a stage is still building), validated
    like :func:`parse` does; structural keys are ignored, other keys go to ``extra``."""
    try:
        top = _Obj(dict(meta), "meta")
        top.used.update(STRUCTURAL)
        fields = _records(top, num_ops, None if bank_names is None else set(bank_names), None)
        return Records(**fields, extra=top.extra())
    except _Bad as e:
        raise _fail(source, e) from None


def records_of(meta: Records | Mapping[str, Any] | None) -> Records:
    """``meta``'s records: a ModelMeta or Records as is, a plain dict parsed (:func:`parse_records`)."""
    if isinstance(meta, Records):
        return meta
    return parse_records(meta or {})


# ----------------------------------------------------------------------------- architecture
@dataclass(frozen=True)
class ArchitectureShape:
    """What one sample does in an architecture: output shape (per sample), the largest
    intermediate tensor and the conv/linear multiply-accumulates (both per sample)."""

    output_shape: tuple[int, ...]
    largest_activation: int
    macs: int


def check_architecture(record: Any, input_shape: Sequence[int], max_params: int | None = None) -> ArchitectureShape:
    """Rebuild ``record`` on torch's meta device (no memory is allocated) and run one sample of
    ``input_shape`` through it, refusing an activation or MAC count beyond :data:`LIMITS`.

    QosError (one line) for every problem :func:`qos_compile.nn.graph.rebuild` finds (unknown
    module types, functions, methods, sizes, node references) and for an input the graph
    cannot take (e.g. a channel count that does not match the first layer).
    """
    import torch
    import torch.fx as fx
    from torch import nn

    from .nn.graph import rebuild

    with torch.device("meta"):
        gm = rebuild(record, max_params)
    gm.eval()
    lim = LIMITS
    state = {"largest": 0, "macs": 0}

    def check(v: Any, where: str) -> None:
        if isinstance(v, torch.Tensor):
            n = v.numel()
            if n > lim.activation_elements:
                raise QosError(f"node {where} makes a tensor of {n} elements per sample "
                               f"(at most {lim.activation_elements})")
            state["largest"] = max(state["largest"], n)
        elif isinstance(v, (tuple, list)):
            for x in v:
                check(x, where)

    class ShapePass(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            check(out, n.name)
            if n.op == "call_module" and isinstance(out, torch.Tensor):
                mod = self.module.get_submodule(str(n.target))
                if isinstance(mod, nn.Conv2d):
                    state["macs"] += out.numel() * (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
                elif isinstance(mod, nn.Linear):
                    state["macs"] += out.numel() * mod.in_features
                if state["macs"] > lim.macs:
                    raise QosError(f"the architecture needs more than {lim.macs} multiply-accumulates per sample "
                                   f"(at node {n.name})")
            return out

    shape_pass = ShapePass(gm)
    shape_pass.extra_traceback = False  # fx would append the node's traceback to our one-line errors
    try:
        with torch.no_grad():
            out = shape_pass.run(torch.empty((1, *input_shape), device="meta"))
    except QosError:
        raise
    except Exception as e:  # noqa: BLE001 - a shape error of any op: the record does not fit the input
        first = " ".join(str(e).split())[:160]
        raise QosError(f"the architecture does not run on input shape {list(input_shape)} "
                       f"({type(e).__name__}: {first})") from None
    if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != 1:
        raise QosError("the architecture must return one tensor with a batch dimension")
    return ArchitectureShape(tuple(int(v) for v in out.shape[1:]), state["largest"], state["macs"])


def _v1_architecture(arch: _Obj) -> tuple[dict[str, Any], dict[str, Any], tuple[int, ...]]:
    """A version-1 file's zoo entry -> (zoo record, architecture record, input shape)."""
    import torch

    from .models import build_from_arch
    from .nn.graph import capture

    arch.str("name", LIMITS.name_chars)
    arch.int("num_classes", 1, LIMITS.classes)
    channels = arch.int("in_channels", 1, 1 << 16, 3)
    size = arch.int("input_size", 1, 1 << 16, 32)
    zoo = _json(arch.d, arch.path)
    if channels * size * size > LIMITS.input_elements:
        raise _Bad(f"{arch.path}.input_size", f"= {size} makes {channels * size * size} input elements "
                                              f"(at most {LIMITS.input_elements})")
    try:
        with torch.device("meta"):  # the zoo builds its model; the meta device keeps that free
            model = build_from_arch(zoo)
        record = capture(model)
    except QosError as e:
        raise _Bad(arch.path, f"cannot be rebuilt ({e})") from None
    return zoo, record, (channels, size, size)


# ----------------------------------------------------------------------------- parse
def parse(meta: Any, source: str | None = None) -> ModelMeta:
    """Validate a model.pt meta dict completely and return it typed (see the module doc).

    ``source`` (e.g. the file name) starts every error line. Reads format versions
    :data:`READABLE_VERSIONS`; version 1 (model-zoo files) is upgraded on the way.
    """
    from .nn.graph import validate_record

    try:
        top = _Obj(meta, "meta")
        kind = top.str("kind", 40, None)
        if kind not in (KIND, FLOAT_KIND):
            raise QosError(f"a QoS checkpoint but not a QoS model (kind {kind!r}, expected {KIND!r} or {FLOAT_KIND!r})")
        version = top.d.get("format_version")
        top.used.add("format_version")
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            raise QosError(f"unsupported model.pt format version {_show(version)} (this qos-compile reads "
                           f"{' and '.join(map(str, READABLE_VERSIONS))}; newer files need a newer qos-compile)")
        if version == 1:
            top.used.update(("arch", "input_shape", "architecture", "zoo", "output_shape"))
            if not isinstance(top.d.get("arch"), dict):
                raise QosError("a version-1 model.pt without a model-zoo architecture (meta.arch) cannot be rebuilt")
            zoo, architecture, input_shape = _v1_architecture(_Obj(top.d["arch"], "meta.arch"))
            if "input_shape" in top.d:
                input_shape = _shape(top.d["input_shape"], "meta.input_shape", LIMITS.input_elements)
            stored_out = None
        else:
            top.used.add("arch")
            architecture = top.d.get("architecture")
            top.used.add("architecture")
            if architecture is None:
                raise _Bad("meta.architecture", "is missing")
            try:
                validate_record(architecture)
            except QosError as e:
                raise _Bad("meta.architecture:", str(e)) from None
            zoo_obj = top.obj("zoo")
            zoo = None
            if zoo_obj is not None:
                zoo_obj.str("name", LIMITS.name_chars)
                zoo = _json(zoo_obj.d, zoo_obj.path)
            input_shape = _shape(top._get("input_shape", _MISSING), "meta.input_shape", LIMITS.input_elements)
            raw_out = top.list("output_shape", LIMITS.input_rank, None)
            stored_out = None if raw_out is None else tuple(
                _int(v, f"meta.output_shape[{i}]", 1, LIMITS.activation_elements) for i, v in enumerate(raw_out))
        if len(input_shape) < 1:
            raise _Bad("meta.input_shape", "is empty (one sample needs at least one dimension)")
        try:
            shape = check_architecture(architecture, input_shape)
        except QosError as e:
            raise _Bad("meta.architecture:", str(e)) from None
        if stored_out is not None and stored_out != shape.output_shape:
            raise _Bad("meta.output_shape", f"= {list(stored_out)} but the architecture gives "
                                            f"{list(shape.output_shape)}")
        if len(shape.output_shape) == 1 and shape.output_shape[0] > LIMITS.classes:
            raise _Bad("meta.output_shape", f"= {list(shape.output_shape)}: {shape.output_shape[0]} classes is out "
                                            f"of range 1..{LIMITS.classes}")
        fields: dict[str, Any] = {"kind": kind, "format_version": version, "architecture": architecture, "zoo": zoo,
                                  "input_shape": input_shape, "output_shape": shape.output_shape}
        bank_names: set[str] | None = None
        if kind == KIND:
            fields.update(_quantized(top, version))
            bank_names = {c.name for c in fields["bank"]}
        fields["extra_state"] = _opt_obj(top, "extra_state") or {}
        versions = top.obj("versions")
        fields["versions"] = {} if versions is None else {
            k: _str(v, f"meta.versions.{k}", LIMITS.name_chars) for k, v in versions.d.items()}
        fields.update(_records(top, fields.get("num_ops") if kind == KIND else None, bank_names, input_shape))
        return ModelMeta(**fields, extra=top.extra())
    except (_Bad, QosError) as e:
        raise _fail(source, e) from None


def _quantized(top: _Obj, version: int) -> dict[str, Any]:
    """qconfig, num_ops, layers, bank and assignment of a QoS model (not of a float file)."""
    from .nn.quant import QuantConfig

    q = top.obj("qconfig")
    if q is None:
        raise _Bad("meta.qconfig", "is missing")
    qconfig = QuantConfig(signed=q.bool("signed"), per_channel=q.bool("per_channel"),
                          act_momentum=q.float("act_momentum", 1e-9, 1.0))
    unknown = sorted(set(q.d) - q.used)
    if unknown:
        raise _Bad("meta.qconfig", f"has unknown settings {unknown[:5]}")
    num_ops = top.int("num_ops", 1, LIMITS.ops)
    raw_layers = top.list("layers", LIMITS.layers)
    if not raw_layers:
        raise _Bad("meta.layers", "is empty (a QoS model has at least one approximate layer)")
    if num_ops * len(raw_layers) > LIMITS.assignment_entries:
        raise _Bad("meta.layers", f"has {len(raw_layers)} layers: with {num_ops} OPs that is more than "
                                  f"{LIMITS.assignment_entries} assignment entries")
    layers = []
    for i, v in enumerate(raw_layers):
        lo = _Obj(v, f"meta.layers[{i}]")
        kind = lo.str("kind", 20)
        if kind not in ("conv", "linear"):
            raise _Bad(f"meta.layers[{i}].kind", f"= {kind!r} is not 'conv' or 'linear'")
        layers.append(Layer(name=lo.str("name", LIMITS.name_chars), kind=kind,
                            macs=lo.int("macs", 0, LIMITS.macs, None)))
    _names([x.name for x in layers], "meta.layers (names)", LIMITS.layers)
    raw_bank = top.list("bank", LIMITS.circuits)
    if not raw_bank:
        raise _Bad("meta.bank", "is empty (a QoS model has at least one circuit)")
    bank = []
    for i, v in enumerate(raw_bank):
        b = _Obj(v, f"meta.bank[{i}]")
        sha = b.str("sha256", 64)
        if not _SHA256.match(sha):
            raise _Bad(f"meta.bank[{i}].sha256", f"= {_show(sha)} is not a lower-case hex SHA-256")
        bank.append(Circuit(name=b.str("name", LIMITS.name_chars), sha256=sha,
                            power_mw=b.float("power_mw", 0.0, default=None), signed=b.bool("signed")))
    names = _names([c.name for c in bank], "meta.bank (names)", LIMITS.circuits)
    for i, c in enumerate(bank):
        if c.signed != qconfig.signed:
            raise _Bad(f"meta.bank[{i}].signed", f"= {str(c.signed).lower()} but the quantization is "
                                                 f"{'signed' if qconfig.signed else 'unsigned'}")
    index = {n: i for i, n in enumerate(names)}
    rows = top.list("assign", LIMITS.ops)
    if len(rows) != num_ops:
        raise _Bad("meta.assign", f"has {len(rows)} rows but meta.num_ops = {num_ops}")
    assign = []
    for op, row in enumerate(rows):
        row = _list(row, f"meta.assign[{op}]", LIMITS.layers)
        if len(row) != len(layers):
            raise _Bad(f"meta.assign[{op}]", f"has {len(row)} entries but there are {len(layers)} layers")
        out = []
        for j, v in enumerate(row):
            where = f"meta.assign[{op}][{j}]"
            if isinstance(v, str):  # version 1 stored names
                if v not in index:
                    raise _Bad(where, f"= {_show(v)} is not a circuit of the bank")
                out.append(index[v])
            else:
                out.append(_int(v, where, 0, len(bank) - 1))
        assign.append(tuple(out))
    return {"qconfig": qconfig, "num_ops": num_ops, "layers": tuple(layers), "bank": tuple(bank),
            "assign": tuple(assign)}
