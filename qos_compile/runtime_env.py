"""Thread settings for the whole process, set explicitly and early.

Importing TVM without ``TVM_NUM_THREADS`` may pick one thread and pin the whole process
(torch included) to CPU 0, so the variable must be set before the first ``import tvm``.
``ensure_tvm_threads`` is the one place that sets it: the ``qos_compile.tvm`` package calls
it when it is imported (so every ``qos_compile.tvm.*`` module may import tvm freely), other
code imports tvm through ``import_tvm``, and every command-line entry point calls
``configure_threads()`` first (torch too).
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = ["default_threads", "ensure_tvm_threads", "import_tvm", "configure_threads"]


def default_threads() -> int:
    """The thread count when none is given: ``$QOS_THREADS``, else every core."""
    return int(os.environ.get("QOS_THREADS", "0") or 0) or (os.cpu_count() or 1)


def ensure_tvm_threads(threads: int | None = None) -> int:
    """Set ``TVM_NUM_THREADS`` (to ``threads``, default ``default_threads()``) unless the user
    already did; return the value in effect. Cheap: imports neither tvm nor torch.

    Only the first call before tvm is imported matters: TVM reads the variable once.
    """
    value = os.environ.setdefault("TVM_NUM_THREADS", str(threads or default_threads())).strip()
    return int(value) if value.isdigit() else 0      # 0: a value TVM ignores (it picks its own)


def import_tvm(submodule: str = "") -> ModuleType:
    """``tvm`` (or ``tvm.<submodule>``, e.g. ``"rpc"``), imported after ``ensure_tvm_threads()``."""
    ensure_tvm_threads()
    return importlib.import_module(f"tvm.{submodule}" if submodule else "tvm")


def configure_threads(threads: int | None = None) -> int:
    """Use ``threads`` (default: ``QOS_THREADS`` or every core) for torch and TVM; return the count."""
    n = threads or default_threads()
    ensure_tvm_threads(n)
    import torch

    torch.set_num_threads(n)
    return n
