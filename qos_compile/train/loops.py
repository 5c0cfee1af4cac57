"""Seeded training and evaluation loops (float training, QAT, and any mode of a QoSNet).

Reproducible on CPU: one seed fixes the initial weights (when the caller seeds
before building the model), the shuffling order (a dedicated generator) and the
AGN noise. Progress bars go to stderr and show epoch, loss and accuracy.

Batches go to the model's device. Under data parallelism (``distributed.current()`` with
several processes) ``fit`` trains through DistributedDataParallel and ``evaluate`` splits
the split over the processes and sums the counts; with one process both are the plain loops.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import distributed as dist_rt


@dataclass
class EpochStats:
    """Loss and accuracy of one pass over a data set."""

    loss: float
    top1: float
    top5: float | None = None
    count: int = 0


@dataclass
class History:
    """Per-epoch training and validation statistics."""

    train: list[EpochStats] = field(default_factory=list)
    val: list[EpochStats] = field(default_factory=list)


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global RNG (weights, dropout, noise) and return a generator for data shuffling."""
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def make_loader(ds: Dataset, batch_size: int, shuffle: bool, generator: torch.Generator | None = None) -> DataLoader:
    """A single-process DataLoader (workers would only add start-up cost for these small sets)."""
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0)


def _progress(iterable: Iterable, desc: str, total: int | None, enabled: bool) -> tqdm:
    return tqdm(iterable, desc=desc, total=total, leave=False, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, progress: bool = False, desc: str = "eval") -> EpochStats:
    """Top-1 (and top-5 when there are more than 5 classes) accuracy in % and mean CE loss, in eval mode.

    Batches go to ``model``'s device. Under data parallelism every process must call this with
    the same model state (rank 0's) and loader: each evaluates its slice, the sums are
    all-reduced, so every process returns the full split's numbers.
    """
    rt = dist_rt.current()
    loader = dist_rt.shard(loader, rt)
    device = dist_rt.module_device(model)
    was_training = model.training
    model.eval()
    loss_sum, correct1, correct5, n, classes = 0.0, 0, 0, 0, 0
    for x, y in _progress(loader, desc, len(loader), progress and rt.is_main):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        n += len(y)
        classes = logits.shape[1]
    model.train(was_training)
    if rt.distributed:  # a process with an empty slice saw no logits: the class count is the largest seen
        sums = dist_rt.all_reduce_sum([loss_sum, correct1, correct5, n])
        loss_sum, (correct1, correct5, n) = sums[0], (int(v) for v in sums[1:])
        classes = int(dist_rt.all_reduce_max([classes])[0])
    top5 = 100.0 * correct5 / n if n and classes > 5 else None
    return EpochStats(loss=loss_sum / max(n, 1), top1=100.0 * correct1 / max(n, 1), top5=top5, count=n)


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader | None,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    on_epoch_start: Callable[[int], None] | None = None,
    progress: bool = True,
    desc: str = "train",
    find_unused_parameters: bool = False,
) -> History:
    """Train ``model`` for ``epochs`` with ``optimizer``; ``loss_fn(model, logits, y)`` defaults to CE.

    ``on_epoch_start(epoch)`` lets a stage switch modes (e.g. QAT turning fake
    quantization on after the observers settled). Raises FloatingPointError when
    the loss stops being finite, instead of training on garbage.

    Batches go to ``model``'s device. Under data parallelism the forward runs through
    DistributedDataParallel (``train_loader`` should be a ``distributed.train_loader``: it is
    reshuffled every epoch), ``loss_fn`` and evaluation get the plain ``model``, the training
    statistics are summed over the processes, and every process ends with rank 0's state.
    ``find_unused_parameters``: see ``distributed.data_parallel``.
    """
    rt = dist_rt.current()
    net = (dist_rt.data_parallel(model, find_unused_parameters=find_unused_parameters)
           if rt.distributed and epochs > 0 else model)
    with dist_rt.unused_parameters_as_error(desc):
        history = _fit_epochs(model, net, train_loader, val_loader, epochs, optimizer, scheduler, loss_fn,
                              on_epoch_start, progress and rt.is_main, desc)
    dist_rt.broadcast_state(model)
    return history


def _fit_epochs(model: nn.Module, net: nn.Module, train_loader: DataLoader, val_loader: DataLoader | None,
                epochs: int, optimizer: torch.optim.Optimizer, scheduler: Any, loss_fn: Any, on_epoch_start: Any,
                shown: bool, desc: str) -> History:
    """The epochs of :func:`fit`: ``net`` (``model`` or its DDP wrapper) runs the forward."""
    rt = dist_rt.current()
    device = dist_rt.module_device(model)
    history = History()
    for epoch in range(epochs):
        if on_epoch_start:
            on_epoch_start(epoch)
        dist_rt.set_epoch(train_loader, epoch)
        model.train()
        loss_sum, correct, n = 0.0, 0, 0
        bar = _progress(train_loader, f"{desc} {epoch + 1}/{epochs}", len(train_loader), shown)
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            logits = net(x)
            ce = nn.functional.cross_entropy(logits, y)
            loss = loss_fn(model, logits, y) if loss_fn else ce
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"{desc}: loss became {loss.item()} in epoch {epoch + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += ce.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            n += len(y)
            bar.set_postfix(loss=f"{loss_sum / n:.3f}", acc=f"{100.0 * correct / n:.1f}")
        if scheduler:
            scheduler.step()
        if rt.distributed:
            loss_sum, c, m = dist_rt.all_reduce_sum([loss_sum, correct, n])
            correct, n = int(c), int(m)
        history.train.append(EpochStats(loss=loss_sum / max(n, 1), top1=100.0 * correct / max(n, 1), count=n))
        if val_loader is not None:
            dist_rt.broadcast_state(model, params=False)  # rank 0's running statistics everywhere
            history.val.append(evaluate(model, val_loader))
        if shown:
            v = f", val top-1 {history.val[-1].top1:.1f}%" if history.val else ""
            tqdm.write(f"{desc} epoch {epoch + 1}/{epochs}: loss {history.train[-1].loss:.3f}, "
                       f"train top-1 {history.train[-1].top1:.1f}%{v}", file=sys.stderr)
    return history


def sgd(params: Iterable[torch.nn.Parameter], lr: float, momentum: float = 0.9, weight_decay: float = 0.0) -> torch.optim.SGD:
    """SGD with momentum, the optimizer of every stage of the method (docs/design.md, section 2)."""
    return torch.optim.SGD(list(params), lr=lr, momentum=momentum, weight_decay=weight_decay)
