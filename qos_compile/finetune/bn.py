"""BN-only multi-OP fine-tuning (the paper) and full per-OP retraining (the baseline).

BN-only: conv/linear weights and quantization parameters are shared and frozen
(observers frozen too); every OP owns its BatchNorm copies (γ, β, running statistics)
and its bias rows. Per batch, for each OP: select it, forward in APPROX mode (the
assigned circuits, bit-exact; straight-through gradient), CE loss, backward; then the
accumulated gradients are divided by the number of OPs and one optimizer step is taken
(SGD lr 1e-2, momentum 0.9, MultiStep [5, 8] for the reference 10 epochs, i.e. at 50 % and
80 % of the epochs for other lengths).

Full retraining: each OP gets its own deep copy of the model and fine-tunes *all* of it
(weights, its BatchNorm and biases; its observers keep updating like in QAT) with the
same schedule. It stores a whole model per OP and serves only as the comparison.

Both train on the model's device. Under torchrun (``train.distributed``) the forward runs
through DDP over a ``DistributedSampler`` share (per-process batch ``batch_size // world_size``):
BN-only accumulates the OPs' gradients locally (``no_sync``) and all-reduces once per batch,
with ``find_unused_parameters`` since each forward uses one OP's BatchNorm copies. BN-only
skips DDP's buffer broadcast: the observers are frozen (equal everywhere) and BatchNorm
running statistics do not enter a training-mode forward, so rank 0's evolve as they would
with it, and rank 0's state is copied to every process after training.
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from ..data import DatasetSplits
from ..errors import QosError
from ..nn import ApproxConv2d, ApproxLinear, Mode, MultiBatchNorm, QoSNet
from ..train import EpochStats, evaluate
from ..train import distributed as dist_rt
from .expand import clone_qnet

__all__ = ["FinetuneConfig", "FinetuneResult", "bn_only_parameters", "evaluate_ops", "finetune_bn", "finetune_full"]


@dataclass(frozen=True)
class FinetuneConfig:
    """Schedule of the per-OP fine-tuning (both modes). ``milestones=None``: the method's
    MultiStep [5, 8] of 10 epochs scaled to ``epochs`` (at 50 % and 80 % of the epochs)."""

    epochs: int = 10
    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: tuple[int, ...] | None = None
    gamma: float = 0.1
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise QosError(f"fine-tuning epochs must be a non-negative integer, got {self.epochs!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise QosError(f"fine-tuning learning rate must be positive, got {self.lr!r}")
        if self.milestones is None:
            scaled = sorted({max(1, int(f * self.epochs + 0.5)) for f in (0.5, 0.8)})
            object.__setattr__(self, "milestones", tuple(scaled))
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))

    def to_json(self) -> dict[str, Any]:
        """JSON-ready copy."""
        d = asdict(self)
        d["milestones"] = list(self.milestones or ())
        return d


@dataclass
class FinetuneResult:
    """Per-epoch training CE and accuracy of every OP, and val statistics per OP at the end."""

    mode: str
    train_loss: list[list[float]] = field(default_factory=list)   # [epoch][op]
    train_top1: list[list[float]] = field(default_factory=list)
    val: list[EpochStats] = field(default_factory=list)            # per OP, after training

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {"mode": self.mode, "train_loss": self.train_loss, "train_top1": self.train_top1,
                "val": [asdict(v) for v in self.val]}


def bn_only_parameters(qnet: QoSNet) -> list[nn.Parameter]:
    """Freeze every parameter except all OPs' BatchNorm affine and per-OP biases; return those."""
    keep: list[nn.Parameter] = []
    for p in qnet.parameters():
        p.requires_grad_(False)
    for mod in qnet.net.modules():
        if isinstance(mod, MultiBatchNorm):
            for p in mod.parameters():
                p.requires_grad_(True)
                keep.append(p)
        elif isinstance(mod, (ApproxConv2d, ApproxLinear)) and mod.bias_per_op is not None:
            mod.bias_per_op.requires_grad_(True)
            keep.append(mod.bias_per_op)
    if not keep:
        raise QosError("the model has no BatchNorm or bias to fine-tune per operating point")
    return keep


@torch.no_grad()
def evaluate_ops(qnet: QoSNet, loader: torch.utils.data.DataLoader, ops: list[int] | None = None,
                 mode: Mode = Mode.APPROX) -> list[EpochStats]:
    """Loss/top-1/top-5 of every OP (or ``ops``) in ``mode`` (default APPROX), eval mode;
    the model's OP and mode are restored afterwards."""
    old_op, old_mode = qnet.operating_point, qnet.mode
    qnet.set_mode(mode)
    out = []
    try:
        for op in (ops if ops is not None else range(qnet.num_ops)):
            qnet.set_operating_point(op)
            out.append(evaluate(qnet, loader))
    finally:
        qnet.set_operating_point(old_op)
        qnet.set_mode(old_mode)
    return out


def _bar(loader: Any, desc: str, progress: bool) -> tqdm:
    return tqdm(loader, desc=desc, total=len(loader), leave=False, disable=not progress, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)


def _optimizer(params: list[nn.Parameter], cfg: FinetuneConfig) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.milestones), gamma=cfg.gamma)
    return opt, sched


def finetune_bn(qnet: QoSNet, splits: DatasetSplits, cfg: FinetuneConfig = FinetuneConfig(), progress: bool = True,
                log: Callable[[str], None] | None = None) -> FinetuneResult:
    """BN-only fine-tuning of every OP of ``qnet`` together (in place; see module doc).

    Leaves the model in APPROX mode, eval, OP 0, observers frozen, and every parameter's
    ``requires_grad`` as it was before.
    """
    torch.manual_seed(cfg.seed)
    rt = dist_rt.current()
    progress, log = progress and rt.is_main, dist_rt.main_log(log)
    flags = [(p, p.requires_grad) for p in qnet.parameters()]
    params = bn_only_parameters(qnet)
    qnet.freeze_observers(True)
    qnet.set_mode(Mode.APPROX)
    loaders = _train_loaders(splits, cfg)
    device = dist_rt.module_device(qnet)
    opt, sched = _optimizer(params, cfg)
    s = qnet.num_ops
    result = FinetuneResult(mode="bn-only")
    try:
        # only the BN-only parameters require grad now: they alone are DDP's
        net = (dist_rt.data_parallel(qnet, broadcast_buffers=False, find_unused_parameters=True)
               if rt.distributed and cfg.epochs > 0 else qnet)
        for epoch in range(cfg.epochs):
            dist_rt.set_epoch(loaders.train, epoch)
            qnet.train()
            loss_sum, correct, n = [0.0] * s, [0] * s, 0
            bar = _bar(loaders.train, f"finetune {epoch + 1}/{cfg.epochs}", progress)
            for x, y in bar:
                x, y = x.to(device), y.to(device)
                opt.zero_grad(set_to_none=True)
                for op in range(s):
                    qnet.set_operating_point(op)
                    with dist_rt.no_sync(net, op < s - 1):  # one all-reduce per batch, after the last OP
                        logits = net(x)
                        loss = nn.functional.cross_entropy(logits, y)
                        if not math.isfinite(loss.item()):
                            raise FloatingPointError(f"fine-tuning: loss became {loss.item()} (OP {op}, "
                                                     f"epoch {epoch + 1})")
                        loss.backward()
                    loss_sum[op] += loss.item() * len(y)
                    correct[op] += (logits.argmax(1) == y).sum().item()
                n += len(y)
                for p in params:
                    if p.grad is not None:
                        p.grad.div_(s)
                opt.step()
                bar.set_postfix(loss=" ".join(f"{v / n:.3f}" for v in loss_sum))
            sched.step()
            loss_sum, correct, n = _summed(loss_sum, correct, n)
            result.train_loss.append([v / max(n, 1) for v in loss_sum])
            result.train_top1.append([100.0 * c / max(n, 1) for c in correct])
            if log:
                log(f"  finetune epoch {epoch + 1}/{cfg.epochs}: train CE per OP "
                    + ", ".join(f"{v:.3f}" for v in result.train_loss[-1]))
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        qnet.set_operating_point(0)
        qnet.eval()
    dist_rt.broadcast_state(qnet)
    result.val = evaluate_ops(qnet, loaders.val)
    return result


def _train_loaders(splits: DatasetSplits, cfg: FinetuneConfig) -> Any:
    """The split loaders; the training one this process's DistributedSampler share under torchrun."""
    loaders = splits.loaders(cfg.batch_size, shuffle=True, seed=cfg.seed, eval_batch_size=256)
    if dist_rt.current().distributed:
        loaders = loaders._replace(train=dist_rt.train_loader(splits.train, cfg.batch_size, cfg.seed))
    return loaders


def _summed(loss_sum: list[float], correct: list[int], n: int) -> tuple[list[float], list[int], int]:
    """Per-OP training sums over every process (themselves with one process)."""
    if not dist_rt.current().distributed:
        return loss_sum, correct, n
    tot = dist_rt.all_reduce_sum([*loss_sum, *correct, n])
    s = len(loss_sum)
    return tot[:s], [int(v) for v in tot[s:2 * s]], int(tot[-1])


def finetune_full(qnet: QoSNet, splits: DatasetSplits, cfg: FinetuneConfig = FinetuneConfig(), progress: bool = True,
                  log: Callable[[str], None] | None = None) -> tuple[list[QoSNet], FinetuneResult]:
    """Full-retraining baseline: for each OP a deep copy of ``qnet`` (left unchanged) trained
    with all parameters (AGN σ's excluded) at that OP in APPROX mode. Returns the copies
    (copy ``op`` is meant to run at OP ``op``) and the statistics."""
    rt = dist_rt.current()
    progress, log = progress and rt.is_main, dist_rt.main_log(log)
    loaders = _train_loaders(splits, cfg)
    result = FinetuneResult(mode="full")
    models: list[QoSNet] = []
    losses: list[list[float]] = [[0.0] * qnet.num_ops for _ in range(cfg.epochs)]
    tops: list[list[float]] = [[0.0] * qnet.num_ops for _ in range(cfg.epochs)]
    for op in range(qnet.num_ops):
        torch.manual_seed(cfg.seed)
        m = clone_qnet(qnet)
        m.set_operating_point(op)
        m.set_mode(Mode.APPROX)
        m.freeze_observers(False)
        sig = {id(p) for p in m.sigmas()}
        params = []
        for p in m.parameters():
            p.requires_grad_(id(p) not in sig)
            if id(p) not in sig:
                params.append(p)
        opt, sched = _optimizer(params, cfg)
        device = dist_rt.module_device(m)
        # the other OPs' BatchNorm copies and bias rows train but this OP's forward never uses them
        net = (dist_rt.data_parallel(m, find_unused_parameters=True)
               if rt.distributed and cfg.epochs > 0 else m)
        for epoch in range(cfg.epochs):
            dist_rt.set_epoch(loaders.train, epoch)
            m.train()
            loss_sum, correct, n = 0.0, 0, 0
            for x, y in _bar(loaders.train, f"full OP{op} {epoch + 1}/{cfg.epochs}", progress):
                x, y = x.to(device), y.to(device)
                logits = net(x)
                loss = nn.functional.cross_entropy(logits, y)
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"full retraining: loss became {loss.item()} (OP {op})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.item() * len(y)
                correct += (logits.argmax(1) == y).sum().item()
                n += len(y)
            sched.step()
            (loss_sum,), (correct,), n = _summed([loss_sum], [correct], n)
            losses[epoch][op] = loss_sum / max(n, 1)
            tops[epoch][op] = 100.0 * correct / max(n, 1)
        del net
        dist_rt.broadcast_state(m)
        m.freeze_observers(True)
        m.eval()
        result.val.append(evaluate_ops(m, loaders.val, [op])[0])
        if log:
            log(f"  full retraining OP{op}: val top-1 {result.val[-1].top1:.2f}%")
        models.append(m)
    result.train_loss, result.train_top1 = losses, tops
    return models, result
