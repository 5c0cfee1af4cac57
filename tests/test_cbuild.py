"""qos_compile.cbuild: finding the compiler, the cache key, atomic outputs, error reports; the
project's own C compiles without a single -Wall -Wextra warning (host and aarch64 cross builds,
with the flags the real builds use); qos_compile.resources finds the data folders."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from qos_compile import cbuild
from qos_compile.errors import QosError

HOST_CC = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
CROSS = shutil.which("aarch64-linux-gnu-gcc")
needs_cc = pytest.mark.skipif(HOST_CC is None, reason="needs a C compiler")
HELLO = '#include <stdio.h>\nint main(void) { printf("%d\\n", VALUE); return 0; }\n'


def _src(tmp_path: Path, text: str = HELLO, name: str = "hello.c") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@needs_cc
def test_find_compiler_cc_variable_and_fallbacks(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", f"{HOST_CC} -O1")
    cmd = cbuild.find_compiler()
    assert cmd == [shutil.which(HOST_CC), "-O1"]                 # $CC may carry flags
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(QosError, match=r"\$CC"):
        cbuild.find_compiler()
    monkeypatch.delenv("CC")
    assert len(cbuild.find_compiler()) == 1                              # cc, gcc or clang, no flags
    assert cbuild.find_compiler(HOST_CC) == [shutil.which(HOST_CC)]
    with pytest.raises(QosError, match="not found"):
        cbuild.find_compiler("no-such-compiler-gcc")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(QosError, match="no C compiler found"):
        cbuild.find_compiler()


def test_target_compiler_names_the_package(tmp_path, monkeypatch):
    tdir = tmp_path / "targets"
    tdir.mkdir()
    (tdir / "nocc.toml").write_text(
        'name = "nocc"\narch = "riscv64"\ndescription = "test"\npackage = "gcc-riscv64-linux-gnu"\n'
        'features = []\n[tvm]\nkind = "llvm"\nmtriple = "riscv64-linux-gnu"\n[toolchain]\ncc = "riscv64-none-gcc"\n')
    monkeypatch.setenv("QOS_TARGETS_PATH", str(tdir))
    with pytest.raises(QosError, match="apt-get install gcc-riscv64-linux-gnu"):
        cbuild.target_compiler("nocc")
    with pytest.raises(QosError, match="cross compiler '/no/such-gcc' not found.*gcc-riscv64-linux-gnu"):
        cbuild.target_with_compiler("nocc", "/no/such-gcc")
    if HOST_CC:
        t = cbuild.target_with_compiler("nocc", HOST_CC)
        assert t.cc == shutil.which(HOST_CC) and cbuild.target_compiler(t) == [t.cc]


@needs_cc
def test_cached_compile_reuses_and_rekeys(tmp_path):
    cc = cbuild.find_compiler(HOST_CC)
    src = _src(tmp_path)
    out = tmp_path / "cache"
    a = cbuild.cached_compile(cc, [src], "hello", flags=["-DVALUE=1"], out_dir=out)
    assert a.parent == out and a.name.startswith("hello-") and os.access(a, os.X_OK)
    assert subprocess.run([str(a)], capture_output=True, text=True).stdout == "1\n"
    stamp = a.stat().st_mtime_ns
    assert cbuild.cached_compile(cc, [src], "hello", flags=["-DVALUE=1"], out_dir=out) == a
    assert a.stat().st_mtime_ns == stamp                                    # reused, not rebuilt
    b = cbuild.cached_compile(cc, [src], "hello", flags=["-DVALUE=2"], out_dir=out)     # new flags, new key
    src.write_text(HELLO.replace("main(void)", "main(void) /* edited */"))
    c = cbuild.cached_compile(cc, [src], "hello", flags=["-DVALUE=1"], out_dir=out)     # new bytes, new key
    assert len({a, b, c}) == 3
    so = cbuild.cached_compile(cc, [src], "libhello.so", flags=["-DVALUE=1", "-shared", "-fPIC"], out_dir=out)
    assert so.suffix == ".so" and so.stem.startswith("libhello-")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []    # no temporary files left


def test_native_flags_key_the_cpu(monkeypatch):
    cc = ["/usr/bin/true-cc"]
    calls = []
    monkeypatch.setattr(cbuild, "_cpu_identity", lambda: calls.append(1) or "cpu")
    cbuild.cache_key(cc, [], ["-O2"])
    assert calls == []
    cbuild.cache_key(cc, [], ["-march=native"])
    assert calls == [1]


@needs_cc
def test_compile_error_reports_and_leaves_nothing(tmp_path):
    cc = cbuild.find_compiler(HOST_CC)
    bad = _src(tmp_path, "int main(void) { return x; }\n", "bad.c")
    out = tmp_path / "bad"
    with pytest.raises(cbuild.CompileError) as e:
        cbuild.compile_c(cc, [bad], out, what="the test program")
    assert e.value.returncode not in (None, 0) and "bad.c" in e.value.stderr
    assert "building the test program failed" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.c"]          # no output, no temporary file
    with pytest.raises(cbuild.CompileError) as e:
        cbuild.compile_c([str(tmp_path / "bad.c")], [bad], out)            # not an executable
    assert e.value.returncode is None and not e.value.timed_out


@needs_cc
def test_compile_c_replaces_an_existing_output_atomically(tmp_path):
    cc = cbuild.find_compiler(HOST_CC)
    out = tmp_path / "prog"
    out.write_text("old")
    cbuild.compile_c(cc, [_src(tmp_path)], out, flags=["-DVALUE=3"])
    assert subprocess.run([str(out)], capture_output=True, text=True).stdout == "3\n"
    obj = cbuild.compile_c(cc, [_src(tmp_path)], tmp_path / "hello.o", flags=["-DVALUE=3", "-c"])
    assert not os.access(obj, os.X_OK)


# --------------------------------------------------------------------------- our own C: warning-free
def _own_c_builds(tmp_path: Path) -> list[tuple[str, list[Path], list[str]]]:
    """(what, sources, flags) for the runtime, shim, driver and glue C, with the flags of their
    real builds (the target's cflags come on top)."""
    from qos_compile.runtime import build as B
    from qos_compile.tvm import build as T
    from qos_compile.tvm.plan import GLUE_SOURCE

    rd = B.runtime_dir()
    inc = [f"-I{rd}", *(f"-I{d}" for d in T.include_dirs())]
    runtime = [rd / s for s in (*B.RUNTIME_SOURCES, B.DRIVER_SOURCE)]
    tests = sorted((rd / "tests").glob("*.c"))
    return [
        ("runtime", [*runtime, *tests], [*B.CFLAGS, *inc]),
        ("shim", [*T.shim_sources(), T.SHIM_DIR / T.DRIVER_SOURCE], inc),
        ("glue", [_src(tmp_path, GLUE_SOURCE, "qos_linked_lookup.c")], inc),
    ]


@pytest.mark.parametrize("target", ["x86_64", "aarch64"])
def test_own_c_is_warning_free(target, tmp_path):
    from qos_compile.nn import kernels as K
    from qos_compile.targets import get_target

    t = get_target(target)
    try:
        cc = cbuild.target_compiler(t)
    except QosError as e:
        pytest.skip(str(e))
    builds = [(what, srcs, [*t.cflags, *flags]) for what, srcs, flags in _own_c_builds(tmp_path)]
    if t.is_host:     # the multiplier kernels: -fopenmp build and its single-threaded fallback
        kflags = [f for f in K._FLAGS if f not in ("-shared", "-fPIC")]
        builds += [("lut_gemm", [K._SOURCE], kflags),
                   ("lut_gemm without OpenMP", [K._SOURCE], [f for f in kflags if f != "-fopenmp"]),
                   ("lut_gemm portable", [K._SOURCE], [*kflags, "-DQOS_PORTABLE"])]
    for what, srcs, flags in builds:
        for s in srcs:
            cbuild.compile_c(cc, [s], tmp_path / f"{s.stem}.o", flags=[*flags, "-Werror", "-c"],
                             what=f"{s.name} ({what}, {target})")


# --------------------------------------------------------------------------- data folders
def test_data_dir_in_a_checkout():
    from qos_compile import resources

    root = Path(__file__).resolve().parents[1]
    packaged, checkout = resources.data_dir_candidates("runtime")
    assert checkout == root / "runtime" and packaged.parent.name == "_data"
    if not packaged.is_dir():                       # an editable install: the checkout's folders
        assert resources.data_dir("targets") == root / "targets"
        assert resources.data_dir("runtime") == root / "runtime"
    with pytest.raises(ValueError):
        resources.data_dir("docs")
