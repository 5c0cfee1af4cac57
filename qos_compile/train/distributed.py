"""Where a run computes: its device, and data parallelism over processes started by ``torchrun``.

A run is one process (the default; the library's default device is the CPU) or one of
``WORLD_SIZE`` processes that ``torchrun`` started, recognised by the variables it sets
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``).
:func:`init_runtime` joins the process group (gloo for CPU tensors, NCCL for CUDA) with a
bounded rendezvous (``$QOS_DIST_TIMEOUT`` seconds, default 1800) and makes the result the
process's :func:`current` runtime; training loops, evaluation and the pipeline read it.

Conventions every stage follows under data parallelism:

* the global batch of one optimizer step stays ``batch_size``: every process takes
  ``batch_size // world_size`` samples (:func:`per_process_batch`) from its
  ``DistributedSampler`` share of the training split, and DDP averages the gradients, so the
  step count per epoch and the effective batch match one process (BatchNorm statistics are
  per process, over the smaller batch, so the numbers are close to, not equal to, one process's);
* buffers (BatchNorm running statistics, activation observers) follow DDP's default
  ``broadcast_buffers``: rank 0's are copied to every process before each forward, so all
  processes quantize with one observed range. SyncBatchNorm is not used: torch implements it
  for GPUs only, and the per-OP BatchNorm copies would all need converting;
* after training, every process takes rank 0's exact state (:func:`broadcast_state`), so
  evaluation can be split over processes (:func:`shard`) and the counts summed
  (:func:`all_reduce_sum`): each process sees the same model, the totals are the full split's;
* only rank 0 prints progress and writes files; the others wait at barriers.

With one process none of this runs: the loops are exactly the single-process ones.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Subset

from ..errors import QosError

__all__ = ["DEVICES", "TIMEOUT_ENV", "Runtime", "resolve_device", "launch_env", "dist_timeout", "init_runtime",
           "shutdown_runtime", "using", "current", "is_main", "main_log", "module_device", "per_process_batch",
           "train_loader", "set_epoch", "shard", "data_parallel", "unused_parameters_as_error", "no_sync",
           "broadcast_state", "broadcast_object", "all_reduce_sum", "all_reduce_max", "barrier"]

#: The ``--device`` choices: ``auto`` = CUDA when torch sees a GPU, else the CPU.
DEVICES = ("auto", "cpu", "cuda")
#: Seconds the rendezvous and every collective may wait (``init_process_group(timeout=...)``).
TIMEOUT_ENV = "QOS_DIST_TIMEOUT"
_DEFAULT_TIMEOUT_S = 1800.0

T = TypeVar("T")


@dataclass(frozen=True)
class Runtime:
    """This process's device and its place in the run (``world_size`` 1: a single process)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        """True when several processes train together (a process group is up)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that prints and writes files."""
        return self.rank == 0

    def record(self, batch_size: int | None = None) -> dict[str, Any]:
        """JSON provenance: world size, backend, device type, per-process batch."""
        out: dict[str, Any] = {"world_size": self.world_size, "backend": self.backend, "device": self.device.type}
        if batch_size is not None:
            out["per_process_batch"] = per_process_batch(batch_size, self)
        return out


_CPU = Runtime(torch.device("cpu"))
_runtime: Runtime = _CPU


def current() -> Runtime:
    """The process's runtime (a single CPU process unless :func:`init_runtime` said otherwise)."""
    return _runtime


def is_main() -> bool:
    """True in a single process and on rank 0."""
    return _runtime.is_main


def main_log(log: Callable[[str], None] | None) -> Callable[[str], None] | None:
    """``log`` on rank 0, a no-op on the other ranks (None stays None)."""
    if log is None or _runtime.is_main:
        return log
    return lambda msg: None


# ----------------------------------------------------------------------------- set-up
def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """``cpu``, ``cuda`` (QosError when torch sees no CUDA GPU) or ``auto``; a CUDA device is
    ``cuda:<local_rank>`` (one GPU per process on a node)."""
    key = str(spec).strip().lower()
    if key not in DEVICES:
        raise QosError(f"--device must be one of {', '.join(DEVICES)}, got {spec!r}")
    if key == "auto":
        key = "cuda" if torch.cuda.is_available() else "cpu"
    if key == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise QosError(f"--device cuda: torch sees no CUDA GPU (torch {torch.__version__}, {build}); "
                       f"use --device cpu or auto")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise QosError(f"--device cuda: process {local_rank} of this node needs GPU {local_rank} but torch sees "
                       f"{count}; start at most {count} processes per node (torchrun --nproc-per-node={count})")
    return torch.device("cuda", local_rank)


def _env_int(env: Mapping[str, str], name: str, lo: int, default: int | None = None) -> int:
    text = env.get(name)
    if text is None or not text.strip():
        if default is None:
            raise QosError(f"{name} is not set but WORLD_SIZE is: start the processes with torchrun")
        return default
    try:
        value = int(text)
    except ValueError:
        raise QosError(f"{name}={text!r} is not an integer (set by torchrun)") from None
    if value < lo:
        raise QosError(f"{name}={value} must be at least {lo}")
    return value


def launch_env(env: Mapping[str, str] | None = None) -> tuple[int, int, int, int]:
    """``(world_size, rank, local_rank, local_world_size)`` from torchrun's variables; ``(1, 0, 0, 1)``
    when ``WORLD_SIZE`` is not set (a plain process)."""
    env = os.environ if env is None else env
    if not (env.get("WORLD_SIZE") or "").strip():
        return 1, 0, 0, 1
    world = _env_int(env, "WORLD_SIZE", 1)
    if world == 1:
        return 1, 0, 0, 1
    rank = _env_int(env, "RANK", 0)
    if rank >= world:
        raise QosError(f"RANK={rank} is not below WORLD_SIZE={world}")
    local_rank = _env_int(env, "LOCAL_RANK", 0, default=0)
    local_world = _env_int(env, "LOCAL_WORLD_SIZE", 1, default=1)
    return world, rank, local_rank, local_world


def dist_timeout(env: Mapping[str, str] | None = None) -> float:
    """``$QOS_DIST_TIMEOUT`` in seconds (positive, finite), default 1800."""
    env = os.environ if env is None else env
    text = (env.get(TIMEOUT_ENV) or "").strip()
    if not text:
        return _DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise QosError(f"{TIMEOUT_ENV}={text!r} must be a positive number of seconds")
    return value


@contextlib.contextmanager
def _stderr_captured() -> Iterator[Callable[[], str]]:
    """Send fd 2 to a temporary file for the duration (torch's C++ rendezvous retries print
    multi-line stack traces there); yields a function that returns what was written."""
    sys.stderr.flush()
    saved = os.dup(2)
    text = [""]
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lambda: text[0]
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text[0] = tmp.read().decode("utf-8", "replace")


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]


def init_runtime(device: str = "auto", env: Mapping[str, str] | None = None) -> Runtime:
    """Choose the device and, under torchrun with ``WORLD_SIZE > 1``, join the process group
    (gloo for CPU, NCCL for CUDA; ``env://`` rendezvous bounded by :func:`dist_timeout`).

    Becomes :func:`current`. A rendezvous that fails or times out is one QosError line. Calling
    it again returns the runtime in effect (a process joins one group).
    """
    global _runtime
    import torch.distributed as dist

    env = os.environ if env is None else env
    world, rank, local_rank, local_world = launch_env(env)
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        _full_fp32()
    if world == 1:
        _runtime = Runtime(dev)
        return _runtime
    if dist.is_available() and dist.is_initialized():
        return _runtime
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_available() or (backend == "nccl" and not dist.is_nccl_available()) \
            or (backend == "gloo" and not dist.is_gloo_available()):
        raise QosError(f"this torch build has no torch.distributed {backend} backend; run one process")
    timeout = dist_timeout(env)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    where = f"{env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}"
    with _stderr_captured() as captured:
        try:
            dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout),
                                    world_size=world, rank=rank, device_id=dev if backend == "nccl" else None)
            failure = None
        except Exception as e:  # noqa: BLE001 - every rendezvous failure is one line
            failure = e
    if failure is not None:
        raise QosError(f"distributed start-up failed: process {rank} of {world} could not join the rendezvous at "
                       f"{where} within {timeout:g} s ({type(failure).__name__}: {_first_line(failure)}); check "
                       f"MASTER_ADDR/MASTER_PORT and that every process started, or raise {TIMEOUT_ENV}") from None
    noise = captured().strip()
    if noise and rank == 0:  # warnings of a rendezvous that worked are worth keeping
        print(noise, file=sys.stderr)
    _runtime = Runtime(dev, rank, world, local_rank, local_world, backend)
    return _runtime


def _full_fp32() -> None:
    """Full float32 convolutions and matrix products on CUDA: cuDNN's default TF32 keeps 10
    mantissa bits, which would make QUANT mode's products of fake-quantized operands drift from
    the CPU's (and from the integer products they stand for)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    else:  # older torch: the legacy switches
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def shutdown_runtime(wait: bool = True) -> None:
    """End the run's runtime: back to the single-process CPU one.

    With a process group, ``wait``: meet every process at a barrier, then leave the group;
    without ``wait`` (after an error) the group is left as it is: waiting for the others could
    hang, and the process is about to exit (torchrun then stops the others).
    """
    global _runtime
    import torch.distributed as dist

    if _runtime.distributed and dist.is_initialized():
        if not wait:
            return
        barrier()
        dist.destroy_process_group()
    _runtime = _CPU


@contextlib.contextmanager
def using(runtime: Runtime) -> Iterator[Runtime]:
    """Make ``runtime`` current for the block (library use and tests; no process group is made)."""
    global _runtime
    saved = _runtime
    _runtime = runtime
    try:
        yield runtime
    finally:
        _runtime = saved


# ----------------------------------------------------------------------------- data
def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (else buffer; CPU for a stateless module):
    where its input batches must go."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def per_process_batch(batch_size: int, runtime: Runtime | None = None) -> int:
    """``batch_size // world_size``: each process's share of one optimizer step's batch."""
    rt = runtime or _runtime
    share = batch_size // rt.world_size
    if share < 1:
        raise QosError(f"batch size {batch_size} is smaller than the {rt.world_size} processes; raise --batch-size")
    return share


def train_loader(dataset: Dataset, batch_size: int, seed: int) -> DataLoader:
    """This process's shuffled share of ``dataset`` (``DistributedSampler`` seeded with ``seed``;
    call :func:`set_epoch` every epoch) in batches of :func:`per_process_batch`.

    Datasets indexable by a list of positions (``ImageDataset``) get one gather per batch.
    """
    rt = _runtime
    sampler = DistributedSampler(dataset, num_replicas=rt.world_size, rank=rt.rank, shuffle=True, seed=seed,
                                 drop_last=False)  # padded shares: every process takes the same number of steps
    bs = per_process_batch(batch_size, rt)
    if _batch_indexable(dataset):
        return DataLoader(dataset, sampler=BatchSampler(sampler, bs, drop_last=False), batch_size=None)
    return DataLoader(dataset, sampler=sampler, batch_size=bs)


def _batch_indexable(dataset: Dataset) -> bool:
    from ..data import ImageDataset

    return isinstance(dataset, ImageDataset)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Reshuffle a :func:`train_loader` for ``epoch`` (no-op for other loaders)."""
    for sampler in (loader.sampler, getattr(loader.sampler, "sampler", None), loader.batch_sampler,
                    getattr(loader.batch_sampler, "sampler", None)):
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
            return


def shard(loader: DataLoader, runtime: Runtime | None = None) -> DataLoader:
    """This process's contiguous slice of an in-order evaluation loader, same batch size (a
    process whose slice is empty gets an empty loader); ``loader`` itself with one process."""
    rt = runtime or _runtime
    if not rt.distributed:
        return loader
    ds = loader.dataset
    n = len(ds)  # type: ignore[arg-type]
    lo, hi = n * rt.rank // rt.world_size, n * (rt.rank + 1) // rt.world_size
    if loader.batch_size is None and isinstance(loader.sampler, BatchSampler):
        bs = loader.sampler.batch_size
        return DataLoader(ds, sampler=BatchSampler(range(lo, hi), bs, drop_last=False), batch_size=None)
    return DataLoader(Subset(ds, range(lo, hi)), batch_size=loader.batch_size or 1, shuffle=False,
                      num_workers=loader.num_workers)


# ----------------------------------------------------------------------------- training
def data_parallel(module: nn.Module, broadcast_buffers: bool = True,
                  find_unused_parameters: bool = False) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel when the run is distributed, else itself.

    ``broadcast_buffers``: copy rank 0's buffers to every process before each forward (DDP's
    default); False only where they cannot differ in a way that matters (see ``finetune.bn``).

    Only parameters with ``requires_grad`` at this call take part, so callers freeze what a
    stage does not train (QAT: the AGN σ's, unused outside NOISE mode) and the wrapper needs no
    search for unused parameters. ``find_unused_parameters=True`` is for forwards that leave
    trained parameters unused by design (the per-OP BatchNorm copies of the other OPs).
    The global RNG is offset by the rank afterwards, so AGN noise differs between processes'
    samples (the wrapper broadcast rank 0's weights, so their initialisation is unaffected).
    """
    rt = _runtime
    if not rt.distributed:
        return module
    ids = [rt.device.index] if rt.device.type == "cuda" else None
    kwargs: dict[str, Any] = {}
    if not broadcast_buffers:  # buffers still start as rank 0's (synced when the wrapper is made)
        import inspect

        newer = "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
        kwargs["forward_sync_buffers" if newer else "broadcast_buffers"] = False
    net = nn.parallel.DistributedDataParallel(module, device_ids=ids, output_device=ids[0] if ids else None,
                                              find_unused_parameters=find_unused_parameters, **kwargs)
    torch.manual_seed(torch.initial_seed() + rt.rank)
    return net


@contextlib.contextmanager
def unused_parameters_as_error(what: str) -> Iterator[None]:
    """Turn DDP's error for a trained parameter the forward never used (the wrapper was made
    without ``find_unused_parameters``) into one QosError line."""
    try:
        yield
    except RuntimeError as e:
        if "finished reduction in the prior iteration" not in str(e):
            raise
        raise QosError(f"{what}: the model has trainable parameters its forward does not use, which data-parallel "
                       f"training (torchrun) does not support here; train it in one process") from None


def no_sync(net: nn.Module, skip: bool) -> contextlib.AbstractContextManager[Any]:
    """``net.no_sync()`` when ``skip`` and ``net`` is DDP (accumulate without all-reducing), else nothing."""
    if skip and isinstance(net, nn.parallel.DistributedDataParallel):
        return net.no_sync()
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- collectives
def barrier() -> None:
    """Wait for every process (no-op with one)."""
    rt = _runtime
    if rt.distributed:
        import torch.distributed as dist

        if rt.backend == "nccl":
            dist.barrier(device_ids=[rt.device.index])
        else:
            dist.barrier()


@torch.no_grad()
def broadcast_state(module: nn.Module, params: bool = True) -> None:
    """Copy rank 0's parameters (unless ``params`` is False) and buffers into every process's
    ``module`` in place (no-op with one process)."""
    rt = _runtime
    if not rt.distributed:
        return
    import torch.distributed as dist

    tensors = [p.data for p in module.parameters()] if params else []
    tensors += list(module.buffers())
    for t in tensors:
        if t.dtype == torch.bool:  # not every backend reduces or broadcasts bool tensors
            tmp = t.to(torch.uint8)
            dist.broadcast(tmp, src=0)
            t.copy_(tmp.bool())
        else:
            dist.broadcast(t, src=0)


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` (picklable) on every process; ``obj`` itself with one process."""
    rt = _runtime
    if not rt.distributed:
        return obj
    import torch.distributed as dist

    box = [obj if rt.is_main else None]
    dist.broadcast_object_list(box, src=0, device=rt.device if rt.backend == "nccl" else None)
    return box[0]  # type: ignore[return-value]


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sums over every process (float64; exact for counts below 2**53)."""
    return _all_reduce(values, "sum")


def all_reduce_max(values: Sequence[float]) -> list[float]:
    """Element-wise maxima over every process."""
    return _all_reduce(values, "max")


def _all_reduce(values: Sequence[float], op: str) -> list[float]:
    rt = _runtime
    if not rt.distributed:
        return [float(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return [float(v) for v in t.cpu()]
