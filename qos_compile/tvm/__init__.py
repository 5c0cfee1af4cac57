"""TVM backend: TIR table-lookup kernels, per-target schedules, and building them for a target.

* ``qos_compile.tvm.kernels``: TE definitions (``approx_conv2d``, ``approx_dense``,
  ``exact_conv2d``; usable from Relax ``bb.call_te``), their schedules
  (``schedule_primfunc``) and scheduled PrimFunc builders (``approx_conv2d_func`` ...).
* ``qos_compile.tvm.build``: ``build_kernels(kernels, target) -> BuiltKernels`` (shared
  library on the host, statically linkable system-lib object elsewhere),
  ``run_on_target``, ``link_executable``, the C shim (``shim/``) and QTNS tensor files.

Importing the submodules imports tvm. Python runs this file first, and it sets
``TVM_NUM_THREADS`` (``runtime_env.ensure_tvm_threads``) so that tvm never starts with its
default (which can pin the whole process to one CPU); the submodules then import tvm directly.
"""
from ..runtime_env import ensure_tvm_threads

ensure_tvm_threads()
