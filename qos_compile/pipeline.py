"""The whole QoS-Nets flow as stages, with a resumable cache: float → QAT → AGN → search → fine-tune.

Every stage is a function ``stage_*(cfg, splits, <input>, ...) -> (output, meta)`` that the
separate CLI stages (``qos-nets train|search|finetune``) and :func:`run_pipeline` share.
A stage's ``meta`` is the previous stage's meta plus what the stage adds, so the final
``model.pt`` carries the provenance of every stage.

:func:`run_pipeline` keeps each stage's result in a work folder (default ``<output>.work``)
as ``<stage>-<key>.pt``, written atomically with ``save_checkpoint``. The key is a hash of
everything the stage's result depends on (its own arguments and the previous stage's
key), so a rerun with the same arguments resumes where it stopped, and a cache made
with other arguments is never reused. ``fresh=True`` recomputes every stage.

Every stage computes on ``train.distributed.current().device`` (set by ``--device``). Under
``torchrun`` every process runs every stage: the training ones data-parallel, the search
identically (rank 0's result is then taken by all), evaluation split over the processes.
Rank 0 alone logs and writes the stage files and the output; the others read a cached stage
only after rank 0 decided it is one (a file system all processes see is assumed).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .checkpoint import load_checkpoint
from .data import DatasetSplits, ImageDataset, load_dataset
from .data.core import check_image_size, with_normalization
from .errors import QosError
from .model_schema import DatasetRecord, ModelMeta, Records, records_of
from .finetune import (FinetuneConfig, evaluate_ops, expand_operating_points, finetune_bn, finetune_full,
                       overhead_report)
from .models import build_model
from .multipliers import Multiplier, bundled, load_library
from .nn import Mode, QoSNet, QuantConfig, wrap_model
from .qosmodel import load_float_model, load_qos_model, save_float_model, save_qos_model, versions
from .search.agn import AGNConfig, train_agn
from .search.operating_points import DEFAULT_SCALES
from .search.power import op_power_table
from .search.presets import agn_preset, stage_defaults
from .search.search import SearchConfig, check_scales, run_search, with_exact
from .search.trace import trace_samples
from .train import EpochStats, TrainConfig, evaluate, train_float, train_qat
from .train import distributed as dist_rt

__all__ = ["PipelineConfig", "PipelineResult", "resolve_multipliers", "load_data", "stage_float", "stage_qat",
           "stage_agn", "stage_search", "stage_finetune", "stage_full_baseline", "run_pipeline", "op_rows",
           "format_table", "check_output_path", "evaluate_qos_model", "config_from_meta", "data_from_meta"]

Log = Callable[[str], None]
BASELINES = ("none", "full")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- configuration
def resolve_multipliers(spec: str | Sequence[str]) -> list[Multiplier]:
    """``evoapprox-unsigned`` / ``evoapprox-signed`` (the bundled EvoApprox circuits of that
    signedness) or a comma list of names (bundled or imported; the library's lookup rules,
    e.g. ambiguous names are refused). One signedness only."""
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key in ("evoapprox-unsigned", "evoapprox-signed"):
            return bundled().select(signed=key.endswith("-signed"))
        names = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        names = [str(s).strip() for s in spec]
    if not names:
        raise QosError("--multipliers: give evoapprox-unsigned, evoapprox-signed or a comma list of circuit names")
    lib = load_library()
    mults = []
    for name in names:
        m = lib.get(name)
        if m not in mults:
            mults.append(m)
    if len({m.signed for m in mults}) > 1:
        raise QosError("--multipliers mixes signed and unsigned circuits; a model uses one kind")
    return mults


def _positive_or_none(value: Any, what: str, zero_ok: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero_ok else 1):
        raise QosError(f"{what} must be a {'non-negative' if zero_ok else 'positive'} integer, got {value!r}")


def check_normalize(value: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)``, each one value or one per channel: finite, std > 0 (channels checked on the data)."""
    try:
        mean, std = value
        out = (tuple(float(v) for v in mean), tuple(float(v) for v in std))
    except (TypeError, ValueError):
        raise QosError(f"normalize must be (mean values, std values), got {value!r}") from None
    if not out[0] or not out[1] or not all(math.isfinite(v) for v in out[0]) \
            or not all(math.isfinite(v) and v > 0 for v in out[1]):
        raise QosError(f"normalize: mean values must be finite and std values positive, got {value!r}")
    return out


@dataclass(frozen=True)
class PipelineConfig:
    """Every argument of the flow. ``None`` means: the model's preset / the dataset's default
    (see :meth:`resolved`)."""

    model: str = "resnet8"
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | tuple[int, int] | None = None
    multipliers: str = "evoapprox-unsigned"
    n: int | None = None
    scales: tuple[float, ...] = DEFAULT_SCALES
    seed: int = 0
    batch_size: int = 64
    per_channel: bool = False
    float_epochs: int | None = None
    float_lr: float | None = None
    qat_epochs: int | None = None
    qat_lr: float | None = None
    observer_epochs: int = 2
    agn_epochs: int | None = None
    agn_lambda: float | None = None
    agn_sigma_max: float | None = None
    agn_sigma_init: float | None = None
    ft_epochs: int | None = None
    ft_lr: float | None = None
    baseline: str = "none"
    max_samples: int | None = None
    trace_samples: int = 128
    float_weights: str | None = None
    #: per-channel (mean, std) of the model input, images in [0, 1]; None = the training split's
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", check_scales(self.scales))
        # JSON (a stored config) gives lists: back to the tuple/int spellings
        object.__setattr__(self, "image_size", check_image_size(self.image_size, None))
        if self.normalize is not None:
            object.__setattr__(self, "normalize", check_normalize(self.normalize))
        _positive_or_none(self.n, "n (circuits for all OPs)")
        for key in ("float_epochs", "qat_epochs", "agn_epochs", "ft_epochs", "observer_epochs"):
            _positive_or_none(getattr(self, key), f"{key.replace('_', '-')}", zero_ok=True)
        _positive_or_none(self.max_samples, "max-samples")
        _positive_or_none(self.batch_size, "batch-size")
        _positive_or_none(self.trace_samples, "trace-samples")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise QosError(f"seed must be an integer in 0..2**32-1, got {self.seed!r}")
        if self.baseline not in BASELINES:
            raise QosError(f"--baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        for key in ("float_lr", "qat_lr", "ft_lr"):
            v = getattr(self, key)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise QosError(f"{key.replace('_', '-')} must be a positive number, got {v!r}")

    def resolved(self) -> "PipelineConfig":
        """A copy with every ``None`` replaced by the preset/default (model and dataset checked)."""
        from .data import canonical_dataset_name
        from .models import model_names
        from .models.user import is_user_model, parse_model_spec

        if is_user_model(self.model):
            model = parse_model_spec(self.model).text  # checked now, imported by the float stage only
        else:
            model = str(self.model).strip().lower()
            if model not in model_names():
                raise QosError(f"unknown model {self.model!r}; valid names: {', '.join(model_names())}, or your own: "
                               f"FILE.py:FUNC or package.module:FUNC")
        ds = canonical_dataset_name(self.dataset)
        p = agn_preset(model, ds)
        d = stage_defaults(model, ds)
        pick = lambda v, default: default if v is None else v  # noqa: E731
        return dataclasses.replace(
            self, model=model, dataset=ds, n=pick(self.n, p.n),
            float_epochs=pick(self.float_epochs, d.float_epochs), float_lr=pick(self.float_lr, d.float_lr),
            qat_epochs=pick(self.qat_epochs, d.qat_epochs), qat_lr=pick(self.qat_lr, d.qat_lr),
            agn_epochs=pick(self.agn_epochs, d.agn_epochs), agn_lambda=pick(self.agn_lambda, p.lam),
            agn_sigma_max=pick(self.agn_sigma_max, p.sigma_max),
            agn_sigma_init=pick(self.agn_sigma_init, p.sigma_init),
            ft_epochs=pick(self.ft_epochs, d.ft_epochs), ft_lr=pick(self.ft_lr, d.ft_lr))

    def to_json(self) -> dict[str, Any]:
        """JSON-ready copy."""
        d = asdict(self)
        d["scales"] = list(self.scales)
        if isinstance(self.image_size, tuple):
            d["image_size"] = list(self.image_size)
        if self.normalize is not None:
            d["normalize"] = [list(self.normalize[0]), list(self.normalize[1])]
        return d

    def agn_config(self) -> AGNConfig:
        """The AGN stage's configuration (resolve first)."""
        return AGNConfig(lam=float(self.agn_lambda), sigma_max=float(self.agn_sigma_max),  # type: ignore[arg-type]
                         sigma_init=float(self.agn_sigma_init), epochs=int(self.agn_epochs),  # type: ignore[arg-type]
                         batch_size=self.batch_size, seed=self.seed)

    def finetune_config(self) -> FinetuneConfig:
        """The fine-tuning schedule (resolve first)."""
        return FinetuneConfig(epochs=int(self.ft_epochs), lr=float(self.ft_lr),  # type: ignore[arg-type]
                              batch_size=self.batch_size, seed=self.seed)

    def search_config(self) -> SearchConfig:
        """The search stage's configuration (resolve first)."""
        return SearchConfig(scales=self.scales, n=int(self.n), seed=self.seed,  # type: ignore[arg-type]
                            trace_samples=self.trace_samples)


# ----------------------------------------------------------------------------- data
def _subset(ds: ImageDataset, n: int, seed: int) -> ImageDataset:
    if len(ds) <= n:
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    src = ds.source_indices[idx.numpy()] if ds.source_indices is not None else None
    return ImageDataset(ds.images[idx], ds.labels[idx], ds.mean.flatten().tolist(), ds.std.flatten().tolist(), src)


def normalization(splits: DatasetSplits) -> dict[str, Any]:
    """How model inputs are made from images: ``x = (image - mean) / std`` per channel, image in [0, 1]."""
    if splits.name == "digits":
        image_range = "[0, 1] (digits: pixel / 16)"
    elif splits.train.images.dtype == torch.uint8:
        image_range = "[0, 1] (uint8 pixel / 255)"
    else:
        image_range = "float32 values as stored (no scaling)"
    return {"mean": list(splits.mean), "std": list(splits.std), "channels": splits.in_channels,
            "image_size": splits.image_size if splits.input_shape[1] == splits.input_shape[2]
            else list(splits.input_shape[1:]), "dataset": splits.name, "image_range": image_range}


def dataset_record(cfg: PipelineConfig) -> dict[str, Any]:
    """What identifies the data a model was trained on (stored as provenance)."""
    from .data import canonical_dataset_name

    data_dir = None if cfg.data_dir is None else str(Path(cfg.data_dir).expanduser().resolve())
    # the user's files by absolute path, so later stages find them from any folder
    name = canonical_dataset_name(cfg.dataset, absolute=True)
    rec: dict[str, Any] = {"name": name, "data_dir": data_dir, "image_size": cfg.image_size, "split_seed": cfg.seed,
                           "max_samples": cfg.max_samples}
    if isinstance(cfg.image_size, tuple):  # image_size is one side; a non-square size goes beside it
        rec.update(image_size=None, input_size=list(cfg.image_size))
    if cfg.normalize is not None:  # only when given: older cache keys stay valid
        rec["normalize"] = [list(cfg.normalize[0]), list(cfg.normalize[1])]
    return rec


def load_data(cfg: PipelineConfig) -> DatasetSplits:
    """The dataset of ``cfg`` (split with ``cfg.seed``), each split cut to ``max_samples`` if given."""
    splits = load_dataset(cfg.dataset, cfg.data_dir, cfg.image_size, cfg.seed, normalize=cfg.normalize)
    if cfg.max_samples:
        splits = dataclasses.replace(splits, train=_subset(splits.train, cfg.max_samples, cfg.seed),
                                     val=_subset(splits.val, cfg.max_samples, cfg.seed + 1),
                                     test=_subset(splits.test, cfg.max_samples, cfg.seed + 2))
    return splits


def _model_name(meta: Records | Mapping[str, Any]) -> str | None:
    """The zoo name of a loaded model (else its recorded model spec), or a stage meta's ``provenance.model``."""
    if isinstance(meta, ModelMeta):
        return meta.model_name
    prov = records_of(meta).provenance
    return prov.model if prov is not None else None


def data_from_meta(meta: Records | Mapping[str, Any], dataset: str | None = None, data_dir: str | None = None,
                   image_size: Any = None, normalize: Any = None) -> DatasetSplits:
    """The dataset a stage file was made with (``provenance.dataset``), or an override.

    Inputs are normalised as the model was trained (``meta.normalization``) unless
    ``normalize`` says otherwise; ``image_size`` overrides the recorded size.
    """
    typed = records_of(meta)
    ds = typed.dataset or DatasetRecord()
    name, folder, seed, cap = ds.name, ds.data_dir, ds.split_seed or 0, ds.max_samples
    size_rec = ds.extra.get("input_size") or ds.image_size
    if dataset is not None:
        size_rec = ds.image_size if ds.name == dataset else None
        name, folder, cap = dataset, data_dir, None
    elif data_dir is not None:
        folder = data_dir
    if not name:
        raise QosError("the model file does not record its dataset; pass --dataset (and --data-dir)")
    zoo_size = meta.zoo.get("input_size") if isinstance(meta, ModelMeta) and meta.zoo is not None else None
    size = image_size or size_rec or zoo_size
    cfg = PipelineConfig(dataset=str(name), data_dir=folder, image_size=size, seed=int(seed), max_samples=cap,
                         normalize=normalize)
    splits = load_data(cfg)
    norm = typed.normalization
    mean = list(norm.mean) if norm is not None else None
    std = list(norm.std) if norm is not None else None
    if normalize is None and mean is not None and std is not None and len(mean) == splits.in_channels:
        # the model's own input convention; other channel counts are reported by the caller's shape check
        splits = with_normalization(splits, mean, std, what="the model's recorded normalization")
    return splits


def config_from_meta(meta: Records | Mapping[str, Any], **overrides: Any) -> PipelineConfig:
    """The (resolved) configuration a stage file was made with, with ``overrides`` (None = keep)."""
    prov = records_of(meta).provenance
    stored = dict(prov.config or {}) if prov is not None else {}
    names = {f.name for f in dataclasses.fields(PipelineConfig)}
    base = {k: v for k, v in stored.items() if k in names}
    if "scales" in base:
        base["scales"] = tuple(base["scales"])
    if not base.get("model"):
        base["model"] = str(_model_name(meta) or "resnet8")
    base.update({k: v for k, v in overrides.items() if v is not None})
    return PipelineConfig(**base).resolved()


def _stats(s: EpochStats) -> dict[str, Any]:
    def num(v: float | None) -> float | None:  # JSON has no NaN/inf (a diverged loss)
        return v if v is None or math.isfinite(v) else None

    return {"top1": num(s.top1), "top5": num(s.top5), "loss": num(s.loss), "count": s.count}


def _quiet(progress: bool, log: Log) -> tuple[bool, Log]:
    """Progress bars and log lines on rank 0 only."""
    main = dist_rt.is_main()
    return progress and main, log if main else (lambda msg: None)


def _with_runtime(meta: dict[str, Any], cfg: PipelineConfig) -> dict[str, Any]:
    """``meta`` with ``provenance.distributed``: how many processes computed it, their backend and
    device type, and the per-process batch (results depend on the process count)."""
    out = dict(meta)
    out["provenance"] = {**(out.get("provenance") or {}),
                         "distributed": dist_rt.current().record(cfg.batch_size)}
    return out


def _on_device(module: Any) -> Any:
    """``module`` moved (in place) to the run's device."""
    return module.to(dist_rt.current().device)


# ----------------------------------------------------------------------------- stages
def build_float_model(cfg: PipelineConfig, splits: DatasetSplits) -> torch.nn.Module:
    """The untrained float model of ``cfg`` for ``splits``: a zoo model built to the data's shape, or
    the user's ``FUNC()`` (their code runs here), checked against the supported ops and the data."""
    from .models.user import build_user_model, check_supported, is_user_model

    torch.manual_seed(cfg.seed)
    if is_user_model(cfg.model):
        model = build_user_model(cfg.model)
        check_supported(model, cfg.model)
        _check_model_fits(model, splits, cfg.model)
        return model
    c, h, w = splits.input_shape
    if h != w:
        raise QosError(f"{cfg.model}: zoo models take square images but the data are {h}x{w}; give --input-size N")
    return build_model(cfg.model, splits.num_classes, c, h)


def _check_model_fits(model: torch.nn.Module, splits: DatasetSplits, spec: str) -> None:
    """QosError unless ``model`` maps a batch of the data to (batch, classes) logits."""
    x, _ = splits.train[[0, 1] if len(splits.train) > 1 else [0]]
    was_training = model.training
    model.eval()  # no BatchNorm statistics updated by this probe
    try:
        with torch.no_grad():
            y = model(x)
    except Exception as e:  # noqa: BLE001 - the user's forward may raise anything
        first = " ".join(str(e).split())[:160]
        raise QosError(f"--model {spec}: the model fails on an input batch of shape {tuple(x.shape)} "
                       f"({type(e).__name__}: {first})") from None
    finally:
        model.train(was_training)
    if not isinstance(y, torch.Tensor) or y.ndim != 2 or y.shape[0] != x.shape[0]:
        got = f"shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else f"a {type(y).__name__}"
        raise QosError(f"--model {spec}: the model must return logits of shape (batch, classes); for an input of "
                       f"shape {tuple(x.shape)} it returned {got}")
    if y.shape[1] != splits.num_classes:
        raise QosError(f"--model {spec}: the model returns {y.shape[1]} logits per sample but the dataset "
                       f"{splits.name} has {splits.num_classes} classes")


def stage_float(cfg: PipelineConfig, splits: DatasetSplits, progress: bool = True,
                log: Log = _stderr, model: torch.nn.Module | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the model (``build_float_model``, unless ``model`` is given: built by the caller) and train
    it in float, or load ``cfg.float_weights`` (the user's trained weights; no training then)."""
    progress, log = _quiet(progress, log)
    if model is None:
        model = build_float_model(cfg, splits)
    info: dict[str, Any] = {"epochs": cfg.float_epochs, "lr": cfg.float_lr}
    if cfg.float_weights:
        _load_user_weights(model, cfg.float_weights)
        info = {"weights_from": str(cfg.float_weights)}
    _on_device(model)
    if not cfg.float_weights and cfg.float_epochs:
        train_float(model, splits, TrainConfig(epochs=int(cfg.float_epochs), lr=float(cfg.float_lr),
                                               batch_size=cfg.batch_size, seed=cfg.seed), progress=progress)
    loaders = splits.loaders(256, shuffle=False)
    val = evaluate(model, loaders.val)
    info["val"] = _stats(val)
    log(f"  float model: val top-1 {val.top1:.2f}%")
    return model, _with_runtime({"provenance": {"dataset": dataset_record(cfg), "model": cfg.model, "seed": cfg.seed,
                                                "config": cfg.to_json()},
                                 "normalization": normalization(splits), "float": info}, cfg)


def _load_user_weights(model: torch.nn.Module, path: str) -> None:
    """Load a plain state dict (``torch.save(model.state_dict(), path)``, read with
    ``weights_only=True``) or a float model file of this package into ``model``, strictly."""
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise QosError(f"--weights {p}: no such file")
    try:
        loaded, _ = load_float_model(p)
        state = loaded.state_dict()
    except QosError:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - anything unreadable is one clear error
            raise QosError(f"--weights {p}: not a state dict readable with torch.load(weights_only=True) "
                           f"({type(e).__name__}: {_first_line(e)})") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        elif isinstance(state, dict) and isinstance(state.get("tensors"), dict) and "meta_json" in state:
            state = state["tensors"]  # a QoS checkpoint of another kind: its tensors
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise QosError(f"--weights {p}: not a state dict (a {type(state).__name__}; save model.state_dict())")
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise QosError(f"--weights {p}: entry {bad!r} is a {type(state[bad]).__name__}, not a tensor")
    mismatch = _state_mismatch(model.state_dict(), state)
    if mismatch:
        raise QosError(f"--weights {p}: does not fit the model: {mismatch}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise QosError(f"--weights {p}: does not fit the model ({' '.join(str(e).split())[:200]})") from None


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else "")[:160]


def _state_mismatch(own: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    """Missing and unexpected keys and differing shapes, in a few words ('' when they fit)."""
    def few(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    missing = [k for k in own if k not in given]
    unexpected = [k for k in given if k not in own]
    shapes = [f"{k} is {tuple(given[k].shape)} in the file, {tuple(own[k].shape)} in the model"
              for k in own if k in given and tuple(given[k].shape) != tuple(own[k].shape)]
    parts = ([f"missing {few(missing)}"] if missing else []) + ([f"unexpected {few(unexpected)}"] if unexpected
                                                                else []) + ([few(shapes)] if shapes else [])
    return "; ".join(parts)


def stage_qat(cfg: PipelineConfig, splits: DatasetSplits, model: torch.nn.Module, meta: dict[str, Any],
              signed: bool, progress: bool = True, log: Log = _stderr) -> tuple[QoSNet, dict[str, Any]]:
    """Wrap the float model (one OP, exact circuit) and run QAT; measure the exact baseline."""
    progress, log = _quiet(progress, log)
    torch.manual_seed(cfg.seed)
    qcfg = QuantConfig(signed=signed, per_channel=cfg.per_channel)
    # wrapped on the CPU (wrap_model probes the shapes with a CPU batch), then moved
    qnet = _on_device(wrap_model(model.to("cpu"), None, num_ops=1, qconfig=qcfg, input_shape=splits.input_shape))
    train_qat(qnet, splits, TrainConfig(epochs=int(cfg.qat_epochs), lr=float(cfg.qat_lr), batch_size=cfg.batch_size,
                                        seed=cfg.seed), observer_epochs=cfg.observer_epochs, progress=progress)
    qnet.set_mode(Mode.QUANT)
    loaders = splits.loaders(256, shuffle=False)
    val, test = evaluate(qnet, loaders.val), evaluate(qnet, loaders.test)
    log(f"  QAT model (exact 8-bit multiplier): val top-1 {val.top1:.2f}%, test top-1 {test.top1:.2f}%")
    out = dict(meta)
    out["qat"] = {"epochs": cfg.qat_epochs, "lr": cfg.qat_lr, "observer_epochs": cfg.observer_epochs,
                  "qconfig": asdict(qcfg)}
    out["baseline"] = {"qat_exact": {"val": _stats(val), "test": _stats(test), "relative_power": 1.0,
                                     "dataset": dataset_record(cfg)}}
    return qnet, _with_runtime(out, cfg)


def stage_agn(cfg: PipelineConfig, splits: DatasetSplits, qnet: QoSNet, meta: dict[str, Any], progress: bool = True,
              log: Log = _stderr) -> tuple[QoSNet, dict[str, Any]]:
    """Learn the per-layer noise tolerances (in place)."""
    progress, log = _quiet(progress, log)
    acfg = cfg.agn_config()
    res = train_agn(_on_device(qnet), splits, acfg, progress=progress, log=log)
    out = dict(meta)
    out["agn"] = {**res.to_json(), "config": asdict(acfg), "preset": agn_preset(cfg.model, cfg.dataset).as_dict()}
    log(f"  after AGN: val top-1 {res.val_top1:.2f}% (exact products)")
    return qnet, _with_runtime(out, cfg)


def stage_search(cfg: PipelineConfig, splits: DatasetSplits, qnet: QoSNet, meta: dict[str, Any],
                 candidates: Sequence[Multiplier], progress: bool = True,
                 log: Log = _stderr) -> tuple[QoSNet, dict[str, Any]]:
    """Trace, predict, choose OPs; return the multi-OP QoSNet before fine-tuning (measured per OP).

    Under torchrun every process searches (deterministic on the CPU, so no process waits) and
    then takes rank 0's result, so all expand the same OPs even where GPU kernels differ."""
    progress, log = _quiet(progress, log)
    scfg = cfg.search_config()
    samples = trace_samples(splits.train, scfg.trace_samples, cfg.seed)
    res = run_search(_on_device(qnet), samples, candidates, scfg, progress=progress, log=log)
    if dist_rt.current().distributed:
        res = _rank0_search(res)
    qops = _on_device(expand_operating_points(qnet, res.bank, res.assign_names))
    qops.freeze_observers(True)
    qops.set_mode(Mode.APPROX)
    qops.eval()
    loaders = splits.loaders(256, shuffle=False)
    val, test = evaluate_ops(qops, loaders.val), evaluate_ops(qops, loaders.test)
    out = dict(meta)
    report = res.to_json()
    exact = res.candidates[res.exact_index]
    report.update(exact_power_mw=exact.power_mw, config={**asdict(scfg), "scales": list(scfg.scales)},
                  candidates_spec=cfg.multipliers)
    out["search"] = report
    # predicted fit of each OP: its rows' ratio σ_pred / (scale·T) (<= 1 fits; see search.misfits)
    ratios = res.ops.ratios.reshape(len(res.scales), len(res.layer_names), -1)
    cand_index = {m.name: i for i, m in enumerate(res.candidates)}
    fit = [[float(ratios[j, l, cand_index[name]]) for l, name in enumerate(row)] for j, row in enumerate(res.assign_names)]
    out["ops"] = [{"op": j, "scale": float(s), "circuits": row["circuits"], "relative_power": row["relative_power"],
                   "savings_pct": row["savings_pct"],
                   "predicted_ratio": {"max": max(fit[j]), "mean": sum(fit[j]) / len(fit[j])},
                   "before_finetune": {"val": _stats(v), "test": _stats(t)}}
                  for j, (s, row, v, t) in enumerate(zip(res.scales, res.power_table, val, test))]
    log("  before fine-tuning (APPROX): test top-1 per OP "
        + ", ".join(f"OP{j} {t.top1:.2f}%" for j, t in enumerate(test)))
    return qops, _with_runtime(out, cfg)


def _rank0_search(res: Any) -> Any:
    """Rank 0's search result on every process: its small fields are broadcast (not the traces
    or the candidates' tables, which every process holds alike) and the bank rebuilt by name."""
    small = {f.name: getattr(res, f.name) for f in dataclasses.fields(res)
             if f.name not in ("candidates", "traces", "bank")}
    small["bank"] = [m.name for m in res.bank]
    got = dist_rt.broadcast_object(small)
    by_name = {m.name: m for m in res.candidates}
    bank = [by_name[name] for name in got.pop("bank")]
    return dataclasses.replace(res, bank=bank, **got)


def stage_finetune(cfg: PipelineConfig, splits: DatasetSplits, qops: QoSNet, meta: dict[str, Any],
                   progress: bool = True, log: Log = _stderr) -> tuple[QoSNet, dict[str, Any]]:
    """BN-only fine-tuning of all OPs (in place); per-OP results into ``meta['ops']``."""
    progress, log = _quiet(progress, log)
    fcfg = cfg.finetune_config()
    res = finetune_bn(_on_device(qops), splits, fcfg, progress=progress, log=None)
    loaders = splits.loaders(256, shuffle=False)
    test = evaluate_ops(qops, loaders.test)
    out = dict(meta)
    ops = [dict(o) for o in out.get("ops") or [{"op": j} for j in range(qops.num_ops)]]
    for o, v, t in zip(ops, res.val, test):
        o["bn_only"] = {"val": _stats(v), "test": _stats(t)}
    out["ops"] = ops
    out["finetune"] = {"mode": "bn-only", "config": fcfg.to_json(), "history": res.to_json(),
                       "param_overhead": overhead_report(qops, qops.num_ops)}
    log("  after BN-only fine-tuning: test top-1 per OP " + ", ".join(f"OP{j} {t.top1:.2f}%" for j, t in enumerate(test)))
    return qops, _with_runtime(out, cfg)


def stage_full_baseline(cfg: PipelineConfig, splits: DatasetSplits, qops: QoSNet, meta: dict[str, Any],
                        progress: bool = True, log: Log = _stderr) -> dict[str, Any]:
    """Full retraining per OP (the comparison only); returns meta with ``ops[j]['full_retrain']``."""
    progress, log = _quiet(progress, log)
    fcfg = cfg.finetune_config()
    models, res = finetune_full(_on_device(qops), splits, fcfg, progress=progress, log=None)
    loaders = splits.loaders(256, shuffle=False)
    out = dict(meta)
    ops = [dict(o) for o in out.get("ops") or [{"op": j} for j in range(qops.num_ops)]]
    for j, (o, m, v) in enumerate(zip(ops, models, res.val)):
        t = evaluate_ops(m, loaders.test, [j])[0]
        o["full_retrain"] = {"val": _stats(v), "test": _stats(t)}
    out["ops"] = ops
    out["full_retrain"] = {"config": fcfg.to_json(), "history": res.to_json(),
                           "stored_params_per_op": sum(p.numel() for p in qops.net.parameters())}
    log("  full retraining per OP: test top-1 " + ", ".join(f"OP{j} {o['full_retrain']['test']['top1']:.2f}%"
                                                           for j, o in enumerate(ops)))
    return out


# ----------------------------------------------------------------------------- tables
def op_rows(qnet: QoSNet, meta: Records | Mapping[str, Any],
            stats: Sequence[EpochStats] | None = None) -> list[dict[str, Any]]:
    """One row per OP: scale, circuits, relative power and savings (recomputed from the model's
    assignment, bank power and layer MACs), and ``stats`` when given. ``meta``: a loaded
    model's meta or a stage's meta dict."""
    typed = records_of(meta)
    layers = qnet.approx_layers()
    macs = [i.macs for i in layers]
    exact_pw = typed.search.exact_power_mw if typed.search is not None else None
    exact_pw = exact_pw or bundled().exact(qnet.bank.signed).power_mw
    table = op_power_table(qnet.assignment(), macs, qnet.bank.power_mw, exact_pw, list(qnet.bank.names),
                           layer_names=[i.name for i in layers])
    stored = typed.ops
    rows = []
    for j, t in enumerate(table):
        scale = stored[j].scale if j < len(stored) else None
        row = {"op": j, "scale": scale, "circuits": t["circuits"], "relative_power": t["relative_power"],
               "savings_pct": t["savings_pct"]}
        if stats is not None:
            row.update(top1=stats[j].top1, top5=stats[j].top5, loss=stats[j].loss, count=stats[j].count)
        rows.append(row)
    return rows


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: Sequence[dict[str, Any]], baseline: dict[str, Any] | None,
                 extra: Sequence[tuple[str, Sequence[Any]]] = ()) -> str:
    """A plain-text table of OP rows (``top1``/``top5`` required), the exact baseline and
    extra columns ``(title, values per row)`` (e.g. accuracies before fine-tuning)."""
    head = ["OP", "scale", "circuits", "rel.power", "savings%", "top-1%", "top-5%", "d.top-1"]
    head += [t for t, _ in extra]
    base1 = None if not baseline else baseline.get("top1")
    lines = []
    for i, r in enumerate(rows):
        delta = None if base1 is None or r.get("top1") is None else r["top1"] - base1
        cells = [f"OP{r['op']}", _fmt(r.get("scale"), "g"), ",".join(r["circuits"]), _fmt(r["relative_power"], ".3f"),
                 _fmt(r["savings_pct"], ".1f"), _fmt(r.get("top1")), _fmt(r.get("top5")),
                 "-" if delta is None else f"{delta:+.2f}"]
        cells += [_fmt(vals[i]) if isinstance(vals[i], (int, float)) or vals[i] is None else str(vals[i])
                  for _, vals in extra]
        lines.append(cells)
    if baseline:
        cells = ["exact", "-", "QAT baseline", "1.000", "0.0", _fmt(baseline.get("top1")), _fmt(baseline.get("top5")),
                 "+0.00"] + ["" for _ in extra]
        lines.append(cells)
    widths = [max(len(h), *(len(c[k]) for c in lines)) for k, h in enumerate(head)]
    fmt_line = lambda cells: "  ".join(c.ljust(w) if k == 2 else c.rjust(w)  # noqa: E731
                                       for k, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt_line(head), fmt_line(["-" * w for w in widths])] + [fmt_line(c) for c in lines])


def evaluate_qos_model(qnet: QoSNet, meta: Records | Mapping[str, Any], splits: DatasetSplits, split: str = "test",
                       same_data: bool = True) -> dict[str, Any]:
    """Per-OP accuracy on ``split`` plus power (JSON-ready); the QAT baseline from the
    provenance when the data are the ones the model was made with."""
    loader = getattr(splits.loaders(256, shuffle=False), split)
    stats = evaluate_ops(qnet, loader)
    rows = op_rows(qnet, meta, stats)
    typed = records_of(meta)
    base = typed.baseline.qat_exact if same_data and typed.baseline is not None else None
    measured = getattr(base, split) if base is not None else None
    baseline = None
    if measured is not None and measured.top1 is not None:
        baseline = {"top1": measured.top1, "top5": measured.top5, "relative_power": 1.0,
                    "source": "QAT model with the exact multiplier, measured by the pipeline"}
    model = _model_name(meta)
    return {"model": model, "dataset": splits.name, "split": split,
            "samples": len(getattr(splits, split)), "num_ops": qnet.num_ops, "ops": rows, "baseline": baseline,
            "bank": [{"name": n, "power_mw": p} for n, p in zip(qnet.bank.names, qnet.bank.power_mw)]}


# ----------------------------------------------------------------------------- output checks
def check_output_path(path: str | os.PathLike[str]) -> Path:
    """QosError unless ``path`` can be written: its folder exists, and an existing file there
    is a QoS checkpoint (never overwrite something else)."""
    p = Path(path)
    if p.exists():
        if p.is_dir():
            raise QosError(f"output {p} is a folder")
        try:
            load_checkpoint(p)
        except QosError as e:
            raise QosError(f"refusing to overwrite {p}: it is not a QoS checkpoint ({e})") from None
    parent = p.resolve().parent
    if not parent.is_dir():
        raise QosError(f"cannot write {p}: folder {parent} does not exist")
    return p


# ----------------------------------------------------------------------------- the pipeline
@dataclass
class PipelineResult:
    """The final model, its meta (what model.pt holds) and the printed table."""

    qnet: QoSNet
    meta: dict[str, Any]
    table: str
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    cached: list[str] = field(default_factory=list)


def _key(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _file_sha(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        raise QosError(f"--weights {path}: cannot read the file") from None



def _cached_meta(path: Path, key: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        _, meta = load_checkpoint(path)
    except QosError:
        return None
    return meta if meta.get("cache_key") == key else None


def run_pipeline(cfg: PipelineConfig, output: str | os.PathLike[str], work_dir: str | os.PathLike[str] | None = None,
                 fresh: bool = False, progress: bool = True, log: Log = _stderr) -> PipelineResult:
    """float → QAT → AGN → search → BN-only fine-tune (→ full-retraining baseline), cached in
    ``work_dir`` (default ``<output>.work``); writes the final QoS model to ``output``.

    Under torchrun every process calls this with the same arguments (see the module doc); the
    cache key includes the process count when there are several (results depend on it)."""
    t_start = time.time()
    load_start = _loadavg()
    rt = dist_rt.current()
    progress, log = _quiet(progress, log)
    cfg = cfg.resolved()
    out_path = check_output_path(output)
    candidates = resolve_multipliers(cfg.multipliers)
    cands, _ = with_exact(candidates)
    signed = cands[0].signed
    work = Path(work_dir) if work_dir is not None else out_path.with_name(out_path.name + ".work")
    if work.exists() and not work.is_dir():
        raise QosError(f"work folder {work} exists and is not a folder")
    splits = load_data(cfg)  # validates dataset/data dir before anything is written
    from .data import dataset_fingerprint
    from .models.user import check_supported, is_user_model, model_source_sha256

    # the user's model is built (their code runs) and checked now, so bad input fails before any work
    user_model = build_float_model(cfg, splits) if is_user_model(cfg.model) else None
    if cfg.float_weights:  # likewise weights that do not fit the model
        _load_user_weights(user_model if user_model is not None else build_float_model(cfg, splits),
                           cfg.float_weights)

    total = 6 if cfg.baseline == "full" else 5
    stage_seconds: dict[str, float] = {}
    cached: list[str] = []
    data_parts: list[Any] = [dataset_record(cfg), cfg.max_samples]
    fingerprint = dataset_fingerprint(cfg.dataset)
    if fingerprint is not None:  # the user's files: edited data invalidate the cache
        data_parts.append(fingerprint)
    data_key = _key(*data_parts)
    float_parts: list[Any] = ["float", data_key, cfg.model, cfg.float_epochs, cfg.float_lr, cfg.batch_size, cfg.seed,
                              _file_sha(cfg.float_weights)]
    if rt.distributed:  # only then: single-process keys (and their caches) stay what they were
        float_parts.append({"world_size": rt.world_size})
    if user_model is not None:  # the defining file and the traced architecture: an edited model recomputes
        float_parts += [model_source_sha256(cfg.model), check_supported(user_model, cfg.model)]
    k_float = _key(*float_parts)
    k_qat = _key("qat", k_float, cfg.qat_epochs, cfg.qat_lr, cfg.observer_epochs, cfg.per_channel, signed)
    k_agn = _key("agn", k_qat, cfg.agn_epochs, cfg.agn_lambda, cfg.agn_sigma_max, cfg.agn_sigma_init)
    k_search = _key("search", k_agn, [m.sha256 for m in cands], list(cfg.scales), cfg.n, cfg.trace_samples)
    k_ft = _key("finetune", k_search, cfg.ft_epochs, cfg.ft_lr)
    k_full = _key("full", k_search, cfg.ft_epochs, cfg.ft_lr)

    per_process = dist_rt.per_process_batch(cfg.batch_size)  # QosError when the batch cannot be shared out
    if rt.is_main:
        work.mkdir(parents=True, exist_ok=True)
    dist_rt.barrier()
    where = "" if not rt.distributed and rt.device.type == "cpu" else (
        f", device {rt.device}" + (f", {rt.world_size} processes ({rt.backend}), per-process batch {per_process}"
                                   if rt.distributed else ""))
    log(f"qos-nets pipeline: {cfg.model} on {splits!r}, {torch.get_num_threads()} thread(s){where}, work folder {work}")

    def agreed(ok: bool) -> bool:
        """Rank 0's verdict on every process (so all take the same branch)."""
        return dist_rt.broadcast_object(ok) if rt.distributed else ok

    def step(i: int, title: str, name: str, key: str) -> tuple[Path, dict[str, Any] | None]:
        path = work / f"{name}-{key}.pt"
        meta = None if fresh or not rt.is_main else _cached_meta(path, key)
        if agreed(meta is not None) and meta is None:  # rank 0 found it (and wrote it before this point)
            meta = _cached_meta(path, key)
            if meta is None:
                raise QosError(f"process {rt.rank} cannot read the cached stage {path} that rank 0 read: the work "
                               f"folder must be on a file system every process sees (or pass --fresh)")
        log(f"[{i}/{total}] {title}" + (f": cached ({path})" if meta is not None else " ..."))
        return path, meta

    def timed(name: str, t0: float) -> None:
        stage_seconds[name] = round(time.time() - t0, 2)
        log(f"  done in {stage_seconds[name]:.1f} s")

    # 1. float
    title = (f"float model ({cfg.model}, {cfg.dataset}) from --weights {cfg.float_weights}, no training"
             if cfg.float_weights else f"float training ({cfg.model}, {cfg.dataset}, {cfg.float_epochs} epochs)")
    path, meta = step(1, title, "float", k_float)
    if meta is not None:
        failure: QosError | None = None
        try:
            model, meta = load_float_model(path)
        except QosError as e:
            failure = e
        if agreed(failure is None):
            if failure is not None:
                raise QosError(f"process {rt.rank} cannot load the cached stage {path} that rank 0 loaded "
                               f"({failure})")
            cached.append("float")
        else:  # a cache entry that does not load is recomputed, not fatal
            log(f"  the cached float stage does not load ({failure}); recomputing")
            meta = None
    if meta is None:
        t0 = time.time()
        model, meta = stage_float(cfg, splits, progress, log, model=user_model)
        timed("float", t0)
        meta["stage_seconds"] = {"float": stage_seconds["float"]}
        if rt.is_main:
            save_float_model(path, model, {**meta, "cache_key": k_float}, input_shape=splits.input_shape)
    def qos_stage(i: int, title: str, name: str, key: str,
                  compute: Callable[[], tuple[QoSNet, dict[str, Any]]]) -> tuple[QoSNet, dict[str, Any]]:
        """Load stage ``name`` from the cache, or compute it, time it and cache it."""
        path, cmeta = step(i, title, name, key)
        if cmeta is not None:
            cached.append(name)
            return load_qos_model(path)
        t0 = time.time()
        net, m = compute()
        timed(name, t0)
        m["stage_seconds"] = {**m.get("stage_seconds", {}), name: stage_seconds[name]}
        if rt.is_main:
            save_qos_model(path, net, {**m, "cache_key": key}, stage="final" if name == "finetune" else name)
        return net, m

    qnet, meta = qos_stage(2, f"quantization-aware training ({cfg.qat_epochs} epochs, 8 bit, "
                              f"{'signed' if signed else 'unsigned'})", "qat", k_qat,
                           lambda: stage_qat(cfg, splits, model, meta, signed, progress, log))
    qnet, meta = qos_stage(3, f"noise tolerance (AGN, {cfg.agn_epochs} epochs, lambda {cfg.agn_lambda:g}, "
                              f"sigma_max {cfg.agn_sigma_max:g})", "agn", k_agn,
                           lambda: stage_agn(cfg, splits, qnet, meta, progress, log))
    qops, meta = qos_stage(4, f"search ({len(cands)} circuits, n={cfg.n}, scales "
                              f"{','.join(f'{s:g}' for s in cfg.scales)})", "search", k_search,
                           lambda: stage_search(cfg, splits, qnet, meta, candidates, progress, log))
    final, meta = qos_stage(5, f"BN-only fine-tuning of {qops.num_ops} OPs ({cfg.ft_epochs} epochs)", "finetune",
                            k_ft, lambda: stage_finetune(cfg, splits, qops, meta, progress, log))
    # 6. full retraining baseline (comparison only; needs the model before fine-tuning)
    if cfg.baseline == "full":
        path, cmeta = step(6, f"full retraining per OP, the baseline ({cfg.ft_epochs} epochs each)", "full", k_full)
        if cmeta is None:
            t0 = time.time()
            before, _ = load_qos_model(work / f"search-{k_search}.pt")
            fmeta = stage_full_baseline(cfg, splits, before, {"ops": meta.get("ops")}, progress, log)
            timed("full", t0)
            from .checkpoint import save_checkpoint

            if rt.is_main:
                save_checkpoint(path, {}, {"kind": "qos-stage-report", "stage": "full", "cache_key": k_full,
                                           "ops": fmeta["ops"], "full_retrain": fmeta["full_retrain"],
                                           "seconds": stage_seconds["full"]})
            cmeta = {"ops": fmeta["ops"], "full_retrain": fmeta["full_retrain"], "seconds": stage_seconds["full"]}
        else:
            cached.append("full")
        ops = [dict(o) for o in meta.get("ops") or []]
        for o, f in zip(ops, cmeta["ops"]):
            o["full_retrain"] = f.get("full_retrain")
        meta = {**meta, "ops": ops, "full_retrain": cmeta["full_retrain"]}
        meta["stage_seconds"] = {**meta.get("stage_seconds", {}), "full": cmeta.get("seconds")}

    seconds = time.time() - t_start
    meta = {k: v for k, v in meta.items() if k != "cache_key"}
    prov = dict(meta.get("provenance") or {})
    prov.update(config=cfg.to_json(), versions=versions(), candidates=[m.name for m in cands],
                run={"seconds": round(seconds, 2), "cached_stages": cached, "threads": torch.get_num_threads(),
                     "cpus": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": _loadavg()},
                distributed=rt.record(cfg.batch_size))
    meta["provenance"] = prov
    rows = _final_rows(final, meta)
    meta["ops"] = [{**o, "relative_power": r["relative_power"], "savings_pct": r["savings_pct"]}
                   for o, r in zip(meta.get("ops") or [], rows)]
    if rt.is_main:
        save_qos_model(out_path, final, meta, stage="final")
    dist_rt.barrier()  # every process returns once the output exists
    table = _pipeline_table(rows, meta)
    return PipelineResult(final, meta, table, seconds, stage_seconds, cached)


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def _test(acc: Any) -> Any:
    """The test-split Stats of an Accuracy record (None when absent)."""
    return acc.test if acc is not None else None


def _final_rows(final: QoSNet, meta: Records | Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = op_rows(final, meta)
    for r, o in zip(rows, records_of(meta).ops):
        bn = _test(o.bn_only)
        r.update(top1=bn and bn.top1, top5=bn and bn.top5)
    return rows


def _pipeline_table(rows: list[dict[str, Any]], meta: Records | Mapping[str, Any]) -> str:
    typed = records_of(meta)
    qat = typed.baseline.qat_exact if typed.baseline is not None else None
    base = _test(qat).to_json() if _test(qat) is not None else None
    top1 = lambda acc: _test(acc) and _test(acc).top1  # noqa: E731
    extra: list[tuple[str, list[Any]]] = [("before-FT", [top1(o.before_finetune) for o in typed.ops])]
    if any(o.full_retrain for o in typed.ops):
        extra.append(("full-retrain", [top1(o.full_retrain) for o in typed.ops]))
    return format_table(rows, base, extra)
