"""Thread setup has one home: ``TVM_NUM_THREADS`` is set before the first ``import tvm``, whoever imports it."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from qos_compile import runtime_env

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: records TVM_NUM_THREADS at the moment tvm itself is first imported.
_SPY = """
import os, sys
os.environ.pop("TVM_NUM_THREADS", None)
os.environ["QOS_THREADS"] = "3"

class Spy:
    seen = None
    def find_spec(self, name, path=None, target=None):
        if name == "tvm" and Spy.seen is None:
            Spy.seen = os.environ.get("TVM_NUM_THREADS", "unset")
        return None

sys.meta_path.insert(0, Spy())
{body}
print(Spy.seen)
"""


def _seen_when_tvm_loads(body: str) -> str:
    out = subprocess.run([sys.executable, "-c", _SPY.format(body=body)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_ensure_tvm_threads_sets_a_default_and_keeps_the_users(monkeypatch):
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    monkeypatch.setenv("QOS_THREADS", "5")
    assert runtime_env.ensure_tvm_threads() == 5 and os.environ["TVM_NUM_THREADS"] == "5"
    assert runtime_env.ensure_tvm_threads(7) == 5          # the first value wins (TVM reads it once)
    monkeypatch.setenv("TVM_NUM_THREADS", "2")
    assert runtime_env.ensure_tvm_threads(9) == 2
    monkeypatch.delenv("TVM_NUM_THREADS")
    monkeypatch.delenv("QOS_THREADS")
    assert runtime_env.ensure_tvm_threads() == (os.cpu_count() or 1)


def test_importing_a_tvm_submodule_sets_the_threads_first():
    assert _seen_when_tvm_loads("import qos_compile.tvm.lut_rows") == "3"


def test_code_outside_the_tvm_package_gets_the_threads_too():
    assert _seen_when_tvm_loads("from qos_compile.targets import get_target\n"
                                "get_target('x86_64').tvm_target()") == "3"


def test_tvm_is_imported_only_behind_the_thread_setting():
    """Outside ``qos_compile/tvm/`` (whose ``__init__`` sets the threads), only ``runtime_env``
    imports tvm; the variable is set in ``runtime_env`` alone."""
    bad = []
    for path in sorted((ROOT / "qos_compile").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        source = path.read_text(encoding="utf-8")
        if rel != "qos_compile/runtime_env.py" and 'setdefault("TVM_NUM_THREADS"' in source:
            bad.append(f"{rel}: sets TVM_NUM_THREADS itself")
        if rel.startswith("qos_compile/tvm/") or rel == "qos_compile/runtime_env.py":
            continue
        for node in ast.walk(ast.parse(source)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{rel}:{node.lineno}: imports {n}" for n in names if n == "tvm" or n.startswith("tvm.")]
    assert not bad, "\n".join(bad)
