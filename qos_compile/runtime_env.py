"""Thread settings for the whole process, set explicitly and early.

Importing TVM without ``TVM_NUM_THREADS`` may pick one thread and pin the whole
process (torch included) to CPU 0 (DESIGN.md), so every entry point calls
``configure_threads()`` before anything imports tvm.
"""
from __future__ import annotations

import os


def configure_threads(threads: int | None = None) -> int:
    """Use ``threads`` (default: ``QOS_THREADS`` or every core) for torch and TVM; return the count."""
    n = threads or int(os.environ.get("QOS_THREADS", "0") or 0) or (os.cpu_count() or 1)
    os.environ.setdefault("TVM_NUM_THREADS", str(n))
    import torch

    torch.set_num_threads(n)
    return n
