"""The first two pipeline stages: float training and quantization-aware training (QAT).

Schedules follow the method (docs/design.md, section 2): SGD with momentum 0.9; QAT runs its first
``observer_epochs`` epochs in float mode while the activation observers settle
(fake quantization off), then fake-quantizes at 8 bit.

Both train the model on the device it is on. Under data parallelism (torchrun) each process
takes a ``DistributedSampler`` share in batches of ``batch_size // world_size`` (see
``distributed``); with one process the loaders are exactly the single-process ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..data import DatasetSplits
from ..nn import Mode, QoSNet
from . import distributed as dist_rt
from .loops import History, fit, make_loader, seed_everything, sgd


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training stage."""

    epochs: int = 15
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    seed: int = 0


def _loaders(splits: DatasetSplits, cfg: TrainConfig) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    gen = seed_everything(cfg.seed)
    if dist_rt.current().distributed:
        return (dist_rt.train_loader(splits.train, cfg.batch_size, cfg.seed),
                make_loader(splits.val, 256, shuffle=False))
    return (make_loader(splits.train, cfg.batch_size, shuffle=True, generator=gen),
            make_loader(splits.val, 256, shuffle=False))


def train_float(model: nn.Module, splits: DatasetSplits, cfg: TrainConfig = TrainConfig(),
                progress: bool = True) -> History:
    """Train a float model (cosine learning-rate decay)."""
    train, val = _loaders(splits, cfg)
    opt = sgd(model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1))
    return fit(model, train, val, cfg.epochs, opt, sched, progress=progress, desc="float")


def train_qat(qnet: QoSNet, splits: DatasetSplits, cfg: TrainConfig = TrainConfig(epochs=6, lr=0.01),
              observer_epochs: int = 2, progress: bool = True) -> History:
    """Quantization-aware training of a wrapped model; leaves it in QUANT mode.

    The first ``observer_epochs`` run in FLOAT mode (observers update in training mode
    in every mode), the rest with 8-bit fake quantization and the exact product.
    """
    train, val = _loaders(splits, cfg)
    opt = sgd(qnet.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1))

    def on_epoch(epoch: int) -> None:
        qnet.set_mode(Mode.FLOAT if epoch < observer_epochs else Mode.QUANT)

    # the σ's take no part in FLOAT/QUANT forwards: outside DDP's parameters (their grad stays
    # None either way, so the optimizer skips them as in one process)
    frozen = [s for s in qnet.sigmas() if s.requires_grad] if dist_rt.current().distributed else []
    for s in frozen:
        s.requires_grad_(False)
    try:
        hist = fit(qnet, train, val, cfg.epochs, opt, sched, on_epoch_start=on_epoch, progress=progress, desc="qat")
    finally:
        for s in frozen:
            s.requires_grad_(True)
    qnet.set_mode(Mode.QUANT)
    return hist
