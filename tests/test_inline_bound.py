"""plan._schedule_generic: element-wise chains are inlined, but a block is kept as its own loop
where inlining would copy its expression into a consumer beyond the bound (a mean's halving tree
doubles the copies per level). Both give the same numbers."""
from __future__ import annotations

import numpy as np
import tvm
from tvm import te

from qos_compile.tvm import plan


def _epilogue_then_halving_tree(n: int = 64):
    """x (C, n) float32 -> (C,): a 6-load epilogue, then a halving tree over its n outputs."""
    x = te.placeholder((4, n), "float32", name="x")
    s = te.placeholder((4,), "float32", name="s")
    y = te.compute((4, n), lambda c, i: te.max(x[c, i] * s[c] + x[c, (i + 1) % n] - x[c, 0] + s[0] * x[c, i], 0.0),
                   name="epilogue")
    level = y
    width = n
    while width > 1:
        width //= 2
        prev, w = level, width
        level = te.compute((4, w), lambda c, i: prev[c, i] + prev[c, i + w], name=f"half{w}")
    out = te.compute((4,), lambda c: level[c, 0], name="out")
    return te.create_prim_func([x, s, out])


def _blocks(func) -> int:
    """Blocks other than the root."""
    text = func.script()
    return text.count("T.sblock(") - text.count('T.sblock("root")')


def _x_loads(func) -> int:
    """Loads of the input x written in the function (each copy of the epilogue has 4)."""
    return sum(ln.count("x[v_") for ln in func.script().splitlines() if "T.reads" not in ln)


def _run(func, x, s):
    lib = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    out = tvm.runtime.tensor(np.zeros(4, np.float32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(s), out)
    return out.numpy()


def test_halving_tree_keeps_the_epilogue_as_a_loop_and_computes_the_same(monkeypatch):
    f = _epilogue_then_halving_tree()
    with monkeypatch.context() as m:                 # unbounded: everything collapses into one huge block
        m.setattr(plan, "_INLINE_MAX_LOADS", 10**9)
        unbounded = plan._schedule_generic(f)
    assert _blocks(unbounded) == 1 and _x_loads(unbounded) == 64 * 4        # the epilogue once per tap
    g = plan._schedule_generic(f)
    assert _blocks(g) >= 2 and _x_loads(g) == 4      # the epilogue stays one loop, read by the tree
    rng = np.random.default_rng(0)
    x, s = rng.standard_normal((4, 64)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    assert np.array_equal(_run(f, x, s), _run(g, x, s))


def test_chains_read_once_are_inlined_into_one_block():
    x = te.placeholder((8, 8), "int32", name="x")
    a = te.compute((8, 8), lambda i, j: x[i, j] * 3, name="a")
    b = te.compute((8, 8), lambda i, j: a[i, j] + 1, name="b")
    c = te.compute((8, 8), lambda i, j: te.max(b[i, j], 0), name="c")
    g = plan._schedule_generic(te.create_prim_func([x, c]))
    assert _blocks(g) == 1
