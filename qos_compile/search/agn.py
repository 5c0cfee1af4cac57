"""The tolerance stage (method step 3): learn each layer's noise tolerance with AGN.

In NOISE mode every approximate layer adds, in training mode only,
``ε · std(y) · σ_l`` to its output (``qos_compile.nn``). This stage trains all
parameters and the σ's jointly on

    L = CE − λ · Σ_l (ops_l / ops_total) · min(|σ_l|, σ_max)

with SGD (lr 1e-2, momentum 0.9) and StepLR(10). The learned ``|σ_l|`` is the
relative output noise layer l tolerates; the search turns it into an absolute
tolerance ``T_l = |σ_l| · s_l``. The weights keep what they learned (they were
trained to tolerate the noise), as the reference code does.

The stage trains on the model's device; under torchrun through DDP (``train.distributed``),
every process drawing its own noise, the penalty read from the plain model (DDP averages
its gradient like the cross-entropy's).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..data import DatasetSplits
from ..errors import QosError
from ..nn import Mode, QoSNet
from ..train import History, evaluate, fit
from ..train import distributed as dist_rt

__all__ = ["AGNConfig", "AGNResult", "agn_penalty", "mac_shares", "train_agn"]


@dataclass(frozen=True)
class AGNConfig:
    """Hyper-parameters of the AGN stage (``lam``, ``sigma_max``, ``sigma_init`` per model:
    see ``qos_compile.search.presets``)."""

    lam: float = 0.3
    sigma_max: float = 0.3
    sigma_init: float = 0.1
    epochs: int = 5
    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 0.0
    step_size: int = 10
    gamma: float = 0.1
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        from .presets import check_agn_values

        check_agn_values(self.lam, self.sigma_max, self.sigma_init)
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise QosError(f"AGN epochs must be a non-negative integer, got {self.epochs!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise QosError(f"AGN learning rate must be positive, got {self.lr!r}")


@dataclass
class AGNResult:
    """What the stage learned: final ``sigmas`` (signed; tolerance uses |σ|), their values
    at the start of every epoch (``sigma_history``), the mean penalty per epoch, and the
    training history (CE loss and accuracy per epoch; val in eval mode = exact QUANT)."""

    sigmas: list[float]
    layer_names: list[str]
    mac_shares: list[float]
    sigma_history: list[list[float]] = field(default_factory=list)
    penalty: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    history: History | None = None
    val_top1: float | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary (no history objects)."""
        return {
            "sigmas": self.sigmas,
            "abs_sigmas": [abs(s) for s in self.sigmas],
            "layers": self.layer_names,
            "mac_shares": self.mac_shares,
            "sigma_history": self.sigma_history,
            "penalty_per_epoch": self.penalty,
            "loss_per_epoch": self.loss,
            "train_ce_per_epoch": [e.loss for e in self.history.train] if self.history else [],
            "val_top1_per_epoch": [e.top1 for e in self.history.val] if self.history else [],
            "val_top1": self.val_top1,
        }


def _layer_macs(qnet: QoSNet, example: torch.Tensor | None) -> list[int]:
    infos = qnet.approx_layers()
    if any(i.macs is None for i in infos):
        if example is None:
            raise QosError("layer MAC counts unknown: wrap the model with input_shape or pass an example batch")
        was = qnet.training
        qnet.eval()
        with torch.no_grad():
            qnet(example[:1])
        qnet.train(was)
        infos = qnet.approx_layers()
    return [int(i.macs) for i in infos]  # type: ignore[arg-type]


def mac_shares(qnet: QoSNet, example: torch.Tensor | None = None) -> torch.Tensor:
    """``ops_l / ops_total`` per approximate layer (float32 tensor, layer order)."""
    macs = torch.tensor(_layer_macs(qnet, example), dtype=torch.float64)
    if macs.sum() <= 0:
        raise QosError("the model's approximate layers have no multiply-accumulates")
    return (macs / macs.sum()).to(torch.float32)


def agn_penalty(qnet: QoSNet, shares: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """``Σ_l shares_l · min(|σ_l|, σ_max)`` (differentiable in the σ's)."""
    sig = torch.stack([s.reshape(()) for s in qnet.sigmas()])
    return (shares.to(sig.device) * torch.clamp(sig.abs(), max=float(sigma_max))).sum()


def train_agn(qnet: QoSNet, splits: DatasetSplits, cfg: AGNConfig = AGNConfig(), progress: bool = True,
              log: Callable[[str], None] | None = None) -> AGNResult:
    """Run the AGN stage on a QAT-trained ``qnet`` (in place, on its device); leaves it in QUANT mode.

    Every σ is reset to ``cfg.sigma_init`` and made trainable; all other parameters
    train as they are (SGD over every parameter with ``requires_grad``). Observers
    keep their QAT behaviour (they update in training mode unless frozen).
    """
    torch.manual_seed(cfg.seed)
    loaders = splits.loaders(cfg.batch_size, shuffle=True, seed=cfg.seed, eval_batch_size=256)
    if dist_rt.current().distributed:
        loaders = loaders._replace(train=dist_rt.train_loader(splits.train, cfg.batch_size, cfg.seed))
    device = dist_rt.module_device(qnet)
    example = next(iter(loaders.val))[0].to(device)
    shares = mac_shares(qnet, example).to(device)
    names = [i.name for i in qnet.approx_layers()]
    with torch.no_grad():
        for s in qnet.sigmas():
            s.fill_(float(cfg.sigma_init))
    for s in qnet.sigmas():
        s.requires_grad_(True)
    sigma_ids = {id(s) for s in qnet.sigmas()}
    params = [p for p in qnet.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in sigma_ids], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if id(p) in sigma_ids], "weight_decay": 0.0}]
    opt = torch.optim.SGD([g for g in groups if g["params"]], lr=cfg.lr, momentum=cfg.momentum)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    result = AGNResult(sigmas=[], layer_names=names, mac_shares=[float(v) for v in shares])
    pen_sum = [0.0, 0.0, 0]  # penalty sum, loss sum, batches in the current epoch

    def loss_fn(model: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pen = agn_penalty(qnet, shares, cfg.sigma_max)
        loss = nn.functional.cross_entropy(logits, y) - cfg.lam * pen
        pen_sum[0] += float(pen.detach())
        pen_sum[1] += float(loss.detach())
        pen_sum[2] += 1
        return loss

    def on_epoch(epoch: int) -> None:
        if epoch > 0 and pen_sum[2]:
            result.penalty.append(pen_sum[0] / pen_sum[2])
            result.loss.append(pen_sum[1] / pen_sum[2])
        pen_sum[:] = [0.0, 0.0, 0]
        result.sigma_history.append([float(s.detach()) for s in qnet.sigmas()])
        qnet.set_mode(Mode.NOISE)

    qnet.set_mode(Mode.NOISE)
    result.history = fit(qnet, loaders.train, loaders.val, cfg.epochs, opt, sched, loss_fn=loss_fn,
                         on_epoch_start=on_epoch, progress=progress, desc="agn")
    if pen_sum[2]:
        result.penalty.append(pen_sum[0] / pen_sum[2])
        result.loss.append(pen_sum[1] / pen_sum[2])
    result.sigma_history.append([float(s.detach()) for s in qnet.sigmas()])
    result.sigmas = [float(s.detach()) for s in qnet.sigmas()]
    qnet.set_mode(Mode.QUANT)
    result.val_top1 = result.history.val[-1].top1 if result.history.val else evaluate(qnet, loaders.val).top1
    if log:
        shown = ", ".join(f"{n}={abs(s):.3f}" for n, s in zip(names, result.sigmas))
        log(f"  learned |sigma|: {shown}")
    return result


def config_dict(cfg: AGNConfig) -> dict[str, Any]:
    """JSON-ready copy of a config."""
    return asdict(cfg)
