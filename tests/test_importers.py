"""Importers: EvoApprox-style C models, .npy/.npz tables, TFApprox .bin files."""
from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from qos_compile.errors import QosError
from qos_compile.multipliers import bundled
from qos_compile.multipliers.importers import (
    find_c_multiplier,
    import_evoapprox_c,
    import_multiplier,
    import_table,
    import_tfapprox_bin,
    kind_of,
)
from qos_compile.multipliers.multiplier import table_sha256
from qos_compile.multipliers.user_library import save_multiplier

needs_cc = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")),
                              reason="no C compiler")

U = np.arange(256)          # unsigned codes
S = np.arange(-128, 128)    # signed codes
BY_NAME = {m.name: m for m in bundled()}


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def one_line_error(excinfo: pytest.ExceptionInfo[QosError]) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


# --------------------------------------------------------------------------- C models
EXACT_U = """
#include <stdint.h>
uint16_t mul8u_TEST(uint8_t B, uint8_t A) { return (uint16_t)(A * B); }
"""

# Truncates the 4 low bits of port A only, so a swapped operand order is visible.
TRUNC_BA = """
#include <stdint.h>
uint16_t mul8u_TRNC(uint8_t B, uint8_t A)
{
  return (uint16_t)((A & 0xF0) * B);
}
"""
TRUNC_AB = TRUNC_BA.replace("(uint8_t B, uint8_t A)", "(uint8_t A, uint8_t B)")
TRUNC_XY = """
#include <stdint.h>
uint16_t mul8u_XY(uint8_t x, uint8_t y) { return (uint16_t)((x & 0xF0) * y); }
"""

# EvoApprox-like gate-level style: uint64 operands named (B, A); the partial products of A's bit 0 are dropped.
BITS_U64 = """
#include <stdint.h>
#include <stdlib.h>

uint64_t mul8u_BITS(const uint64_t B,const uint64_t A)
{
  uint64_t O = 0, i, j;
  for (i = 1; i < 8; i++)
    for (j = 0; j < 8; j++)
      O += (((A >> i) & 1) & ((B >> j) & 1)) << (i + j);
  return O;
}
"""

# Signed, raw bit patterns in and out (like the v2022 signed C models).
SIGNED_RAW = """
#include <stdint.h>
uint16_t mul8s_RAW(uint8_t A, uint8_t B)
{
  int16_t a = (int8_t)A, b = (int8_t)B;
  return (uint16_t)(int16_t)((a & ~3) * b);
}
"""
# Signed values, ports named in (B, A) order.
SIGNED_VAL_BA = """
#include <stdint.h>
int16_t mul8s_VAL(int8_t B, int8_t A) { return (int16_t)((A & ~3) * B); }
"""
# Signed, plain int parameters: must receive values, not bit patterns.
SIGNED_INT = "int mul8s_INT(int A, int B) { return (A & ~3) * B; }\n"
# Signed, uint64 bit patterns in, 16-bit pattern out in a uint64.
SIGNED_U64 = """
#include <stdint.h>
uint64_t mul8s_U64(const uint64_t B, const uint64_t A)
{
  int8_t a = (int8_t)(A & 0xFF), b = (int8_t)(B & 0xFF);
  return (uint64_t)(uint16_t)(a * (b & ~1));
}
"""

DECOYS = r"""
/* EvoApprox-style header
   uint16_t mul8u_FAKE(uint8_t a, uint8_t b) { in a comment
***/
// MAE% = 0.0 %   uint16_t mul8u_FAKE2(uint8_t a, uint8_t b) {
#include <stdint.h>
#define HELPER(x, y) \
  ((x) & (y))
static const char *doc = "uint16_t mul8u_FAKE3(uint8_t a, uint8_t b) {";
static int twice(int v) { return 2 * v; }
static int add3(int a, int b, int c) { return a + b + c; }
struct pair { int a; int b; };

uint16_t mul8u_REAL(uint8_t B, uint8_t A)
{
  if (A == 0) { return 0; }
  for (int i = 0; i < 1; i++) { (void)doc; }
  return (uint16_t)(twice(A) * B / 2 + add3(0, 0, 0));
}

int main(int argc, char **argv) { (void)argc; (void)argv; return 3; }
"""


@pytest.mark.parametrize("text, expected_a, ports_from_names", [
    (EXACT_U, 1, True), (TRUNC_AB, 0, True), (TRUNC_XY, 0, False), (BITS_U64, 1, True),
    (SIGNED_RAW, 0, True), (SIGNED_VAL_BA, 1, True),
])
def test_find_c_multiplier_ports(text: str, expected_a: int, ports_from_names: bool) -> None:
    f = find_c_multiplier(text)
    assert f.name.startswith("mul8")
    assert f.port_a_index == expected_a and f.ports_from_names is ports_from_names


def test_find_c_multiplier_parameter_types() -> None:
    f = find_c_multiplier(SIGNED_RAW)
    assert [(q.name, q.type, q.takes_value) for q in f.params] == [("A", "uint8_t", False), ("B", "uint8_t", False)]
    assert [q.takes_value for q in find_c_multiplier(SIGNED_VAL_BA).params] == [True, True]
    assert [q.takes_value for q in find_c_multiplier(SIGNED_INT).params] == [True, True]
    assert find_c_multiplier(BITS_U64).signature() == "uint64_t mul8u_BITS(const uint64_t B, const uint64_t A)"


def test_find_c_multiplier_ignores_comments_strings_macros_and_helpers() -> None:
    assert find_c_multiplier(DECOYS).name == "mul8u_REAL"


def test_find_c_multiplier_single_two_parameter_function_of_any_name() -> None:
    text = "static int helper(int v) { return v; }\nint approx(int A, int B) { return helper(A) * B; }\n"
    assert find_c_multiplier(text).name == "approx"


@pytest.mark.parametrize("text, fragment", [
    ("int f(int a) { return a; }\n", "no 8x8 multiplier function"),
    ("", "no 8x8 multiplier function"),
    ("int main(int argc, char **argv) { return 0; }\n", "no 8x8 multiplier function"),
    (EXACT_U + TRUNC_BA, "several candidate"),
    ("int g(int a, int b) { return a*b; }\nint h(int a, int b) { return a+b; }\n", "several candidate"),
    ("double mul8u_F(int A, int B) { return A * B; }\n", "returns"),
])
def test_find_c_multiplier_errors(text: str, fragment: str) -> None:
    with pytest.raises(QosError) as e:
        find_c_multiplier(text)
    assert fragment in one_line_error(e)


def test_find_c_multiplier_chooses_with_function() -> None:
    assert find_c_multiplier(EXACT_U + TRUNC_BA, function="mul8u_TRNC").name == "mul8u_TRNC"
    with pytest.raises(QosError) as e:
        find_c_multiplier(EXACT_U, function="nope")
    assert "nope" in one_line_error(e)


@needs_cc
@pytest.mark.parametrize("text, signed, expected", [
    (EXACT_U, False, np.outer(U, U)),
    (TRUNC_BA, False, np.outer(U & 0xF0, U)),
    (TRUNC_AB, False, np.outer(U & 0xF0, U)),
    (TRUNC_XY, False, np.outer(U & 0xF0, U)),   # positional: first parameter = port A
    (BITS_U64, False, np.outer(U & ~1, U)),
    (SIGNED_RAW, True, np.outer(S & ~3, S)),
    (SIGNED_VAL_BA, True, np.outer(S & ~3, S)),
    (SIGNED_INT, True, np.outer(S & ~3, S)),
    (SIGNED_U64, True, np.outer(S, S & ~1)),
    (DECOYS, False, np.outer(U, U)),
], ids=["exact", "trunc-BA", "trunc-AB", "trunc-xy", "bits-u64", "s-raw", "s-val-BA", "s-int", "s-u64", "decoys"])
def test_import_c_models(tmp_path: Path, text: str, signed: bool, expected: np.ndarray) -> None:
    src = write(tmp_path, "model.c", text)
    m = import_evoapprox_c(src, "imported")
    assert m.signed is signed
    np.testing.assert_array_equal(m.lut, expected)
    assert m.power_mw is None and m.area_um2 is None and m.delay_ns is None
    assert m.source == str(src.resolve())


@needs_cc
def test_import_c_signedness_from_argument(tmp_path: Path) -> None:
    src = write(tmp_path, "f.c", "int approx(int A, int B) { return A * B; }\n")
    np.testing.assert_array_equal(import_evoapprox_c(src, "s", signed=True).lut, np.outer(S, S))
    np.testing.assert_array_equal(import_evoapprox_c(src, "u", signed=False).lut, np.outer(U, U))
    with pytest.raises(QosError) as e:
        import_evoapprox_c(src, "x")
    assert "signed" in one_line_error(e)


def test_import_c_signedness_conflict(tmp_path: Path) -> None:
    with pytest.raises(QosError) as e:
        import_evoapprox_c(write(tmp_path, "m.c", SIGNED_RAW), "x", signed=False)
    assert "mul8s_RAW" in one_line_error(e)


def _c_table_model(func: str, lut: np.ndarray, signed: bool, style: str) -> str:
    """A C model of ``lut`` as a static lookup array, in the parameter style of an EvoApprox model."""
    values = ",".join(str(int(v)) for v in lut.ravel())
    table = f"#include <stdint.h>\n\nstatic const int32_t T[65536] = {{{values}}};\n\n"
    if style == "u64-BA":    # EvoApprox unsigned: uint64_t f(const uint64_t B, const uint64_t A)
        return table + (f"uint64_t {func}(const uint64_t B, const uint64_t A) {{\n"
                        "  return (uint64_t)T[(A & 255) * 256 + (B & 255)];\n}\n")
    if style == "u8-AB":
        return table + f"uint16_t {func}(uint8_t A, uint8_t B) {{ return (uint16_t)T[A * 256 + B]; }}\n"
    if style == "s8-BA":     # signed values, ports in (B, A) order
        return table + f"int16_t {func}(int8_t B, int8_t A) {{ return (int16_t)T[(A + 128) * 256 + (B + 128)]; }}\n"
    if style == "raw-AB":    # signed, raw uint8 patterns in, uint16 pattern out
        return table + (f"uint16_t {func}(uint8_t A, uint8_t B) {{\n"
                        "  return (uint16_t)T[((int8_t)A + 128) * 256 + ((int8_t)B + 128)];\n}\n")
    raise AssertionError(style)


@needs_cc
@pytest.mark.parametrize("name, style", [
    ("mul8u_2AC", "u64-BA"),     # asymmetric unsigned, master
    ("mul8u_DG8", "u64-BA"),     # asymmetric unsigned, v2022-only circuit
    ("mul8u_2NDH", "u8-AB"),     # asymmetric unsigned whose C model takes (A, B)
    ("mul8s_1KR6", "s8-BA"),     # asymmetric signed
    ("mul8s_1KTY", "raw-AB"),    # asymmetric signed, raw bit patterns
])
def test_import_c_round_trips_bundled_tables(tmp_path: Path, name: str, style: str) -> None:
    ref = BY_NAME[name]
    assert not np.array_equal(ref.lut, ref.lut.T)  # the operand order matters
    src = write(tmp_path, f"{name}.c", _c_table_model(name, ref.lut, ref.signed, style))
    m = import_evoapprox_c(src, "copy")
    assert m.signed is ref.signed
    np.testing.assert_array_equal(m.lut, ref.lut)
    assert m.sha256 == ref.sha256 and m == ref


@needs_cc
@pytest.mark.parametrize("text, fragment", [
    ("uint16_t mul8u_BAD(uint8_t A, uint8_t B) { return A * B }\n", "does not compile"),
    ("int add(int a) { return a; }\n", "no 8x8 multiplier function"),
    ("#include <stdint.h>\nuint32_t mul8u_BIG(uint8_t A, uint8_t B) { return (uint32_t)A * B * 2; }\n",
     "not a 16-bit unsigned product"),
    ("int mul8u_NEG(int A, int B) { return A - B; }\n", "not a 16-bit unsigned product"),
    ("#include <stdint.h>\n#include <stdlib.h>\n"
     "uint16_t mul8u_CRASH(uint8_t A, uint8_t B) { if (A == 7) abort(); return A * B; }\n", "signal"),
    ("#include <stdint.h>\n#include <stdlib.h>\n"
     "uint16_t mul8u_EXIT(uint8_t A, uint8_t B) { if (A == 7) exit(9); return A * B; }\n", "status 9"),
])
def test_import_c_errors(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(QosError) as e:
        import_evoapprox_c(write(tmp_path, "bad.c", text), "bad")
    assert fragment in one_line_error(e)


@needs_cc
def test_import_c_compile_error_names_the_users_file(tmp_path: Path) -> None:
    src = write(tmp_path, "broken.c",
                "#include <stdint.h>\n\nuint16_t mul8u_B(uint8_t A, uint8_t B) { return A * ; }\n")
    with pytest.raises(QosError) as e:
        import_evoapprox_c(src, "b")
    msg = one_line_error(e)
    assert f"{src}:3" in msg and "error" in msg


def test_import_c_without_compiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write(tmp_path, "m.c", EXACT_U)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(QosError) as e:
        import_evoapprox_c(src, "x")
    assert "C compiler" in one_line_error(e)
    monkeypatch.delenv("CC")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(QosError) as e:
        import_evoapprox_c(src, "x")
    assert "no C compiler found" in one_line_error(e)


# --------------------------------------------------------------------------- the C-model sandbox
SANDBOXED = pytest.mark.skipif(
    not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")) or
    __import__("qos_compile.multipliers.sandbox", fromlist=["supported"]).supported() is not None,
    reason="needs a C compiler on x86-64/aarch64 Linux")


def _hostile(body: str, *, marker: Path, extra: str = "") -> str:
    """A model whose multiplier runs ``body`` once (A == 3 and B == 5), else multiplies."""
    return ("#include <stdint.h>\n#include <stdlib.h>\n#include <stdio.h>\n" + extra +
            f'static const char* MARK = "{marker}";\n'
            "uint16_t mul8u_EVIL(uint8_t A, uint8_t B) {\n"
            f"  if (A == 3 && B == 5) {{ {body} }}\n"
            "  return (uint16_t)(A * B);\n}\n")


@SANDBOXED
@pytest.mark.parametrize("body", [
    'if (system("touch /tmp/qos-never") != 12345) {} FILE* f = fopen(MARK, "w"); if (f) fclose(f);',
    'extern int fork(void); fork(); FILE* f = fopen(MARK, "w"); if (f) fclose(f);',
    'FILE* f = fopen(MARK, "w"); if (f) { fputs("x", f); fclose(f); }',
    'void* p = malloc(1 << 20); if (p) { FILE* f = fopen(MARK, "w"); if (f) fclose(f); }',
    'extern long syscall(long, ...); syscall(39);',          # a raw system call: getpid
], ids=["system", "fork", "fopen", "malloc", "syscall"])
def test_c_model_that_calls_the_system_is_stopped(tmp_path: Path, body: str) -> None:
    """Anything but computing (system(), fork(), files, memory, raw system calls) is killed by
    seccomp strict mode: the import fails with one line and nothing happened."""
    marker = tmp_path / "escaped"
    with pytest.raises(QosError) as e:
        import_evoapprox_c(write(tmp_path, "evil.c", _hostile(body, marker=marker)), "evil")
    msg = one_line_error(e)
    assert "while tabulating" in msg and "signal" in msg, msg
    assert not marker.exists()


@SANDBOXED
@pytest.mark.parametrize("extra, fragment", [
    ('__attribute__((constructor)) static void evil(void) { FILE* f = fopen(MARK_PATH, "w"); if (f) fclose(f); }\n',
     "runs before main"),
    ('static void run_me(void) { FILE* f = fopen(MARK_PATH, "w"); if (f) fclose(f); }\n'
     '__attribute__((section(".preinit_array"), used)) static void (*early)(void) = run_me;\n', "runs before main"),
    ('static void* pick(void) { FILE* f = fopen(MARK_PATH, "w"); if (f) fclose(f); return 0; }\n'
     'int twice(int) __attribute__((ifunc("pick")));\n', "ifunc"),
    ('void* memcpy(void* d, const void* s, size_t n) { FILE* f = fopen(MARK_PATH, "w"); if (f) fclose(f);\n'
     '  char* a = d; const char* b = s; while (n--) *a++ = *b++; return d; }\n', "memcpy"),
    ('int __libc_start_main(void) { FILE* f = fopen(MARK_PATH, "w"); if (f) fclose(f); return 0; }\n',
     "__libc_start_main"),
], ids=["constructor", "preinit_array", "ifunc", "libc-memcpy", "libc-start"])
def test_c_model_code_that_would_run_before_main_is_refused(tmp_path: Path, extra: str, fragment: str) -> None:
    """In an ordinary program, constructors, ifunc resolvers and replaced C library functions run
    before main, so before any sandbox: such a model is refused and none of it runs."""
    marker = tmp_path / "escaped"
    extra = f'#include <string.h>\n#define MARK_PATH "{marker}"\n' + extra
    src = write(tmp_path, "early.c", _hostile("", marker=marker, extra=extra))
    with pytest.raises(QosError) as e:
        import_evoapprox_c(src, "early")
    assert fragment in one_line_error(e)
    assert not marker.exists()


@SANDBOXED
def test_c_model_that_spins_is_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import qos_compile.multipliers.importers as imp

    monkeypatch.setattr(imp, "_RUN_TIMEOUT_S", 2.0)
    src = write(tmp_path, "spin.c", "#include <stdint.h>\nuint16_t mul8u_SPIN(uint8_t A, uint8_t B) "
                                    "{ volatile int k = 1; while (k) {} return A * B; }\n")
    with pytest.raises(QosError) as e:
        import_evoapprox_c(src, "spin")
    assert "did not finish" in one_line_error(e)


@SANDBOXED
@pytest.mark.parametrize("directive", [
    '#include "/etc/passwd"', "#include </etc/passwd>", '%:include "/etc/passwd"', '# /* c */ include "/etc/passwd"',
    '#\\\ninclude "/etc/passwd"', '#define F "/etc/passwd"\n#include F', "#include_next <stdint.h>",
    '#import "/etc/passwd"', "#include <sys/syscall.h>",
])
def test_c_model_may_include_only_standard_headers(tmp_path: Path, directive: str) -> None:
    """Any include but <ALLOWED_HEADERS> is refused before compiling, naming the line; nothing of the
    named file is printed."""
    text = f"#include <stdint.h>\n{directive}\nuint16_t mul8u_I(uint8_t A, uint8_t B) {{ return A * B; }}\n"
    src = write(tmp_path, "inc.c", text)
    with pytest.raises(QosError) as e:
        import_evoapprox_c(src, "inc")
    msg = one_line_error(e)
    line = 3 if directive.startswith("#define") else 2      # a continued directive: its first line
    assert f"{src}:{line}:" in msg and "may include only" in msg, msg
    assert "root:" not in msg and "/bin/" not in msg and "/etc/passwd" not in msg


@SANDBOXED
def test_c_compiler_errors_never_show_other_files(tmp_path: Path) -> None:
    """Diagnostics are filtered to the imported file: a #line pointing at another file makes the
    error anonymous rather than printing a line of that file."""
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-LINE\n")
    src = write(tmp_path, "line.c", f'#include <stdint.h>\n#line 1 "{secret}"\n'
                                    "uint16_t mul8u_L(uint8_t A, uint8_t B) { return A * ; }\n")
    with pytest.raises(QosError) as e:
        import_evoapprox_c(src, "line")
    msg = one_line_error(e)
    assert "does not compile" in msg and "TOP-SECRET" not in msg and str(secret) not in msg, msg


def test_sandbox_entry_point_is_warning_free(tmp_path: Path) -> None:
    from qos_compile import cbuild
    from qos_compile.multipliers import sandbox

    if sandbox.supported():
        pytest.skip(sandbox.supported())
    src = write(tmp_path, "guard.c", sandbox.SANDBOX_SOURCE)
    for cc in ("gcc", "clang"):
        for variant in ([], ["-DQOS_SANDBOX_OWN_START", "-ffreestanding", "-fno-stack-protector"]):
            if shutil.which(cc):
                cbuild.compile_c([shutil.which(cc)], [src], tmp_path / f"guard-{cc}.o",
                                 flags=["-std=c99", "-O2", "-fno-pie", *variant, "-Werror", "-c"])


@SANDBOXED
def test_import_c_without_a_static_c_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without libc.a the sandbox is the program's own entry point and the model gets no C library:
    a model that only computes imports as usual, one that calls system() does not link."""
    from qos_compile.multipliers import sandbox

    monkeypatch.setattr(sandbox, "_static_libc", lambda cc: False)
    m = import_evoapprox_c(write(tmp_path, "m.c", TRUNC_BA), "t")
    np.testing.assert_array_equal(m.lut, np.outer(U & 0xF0, U))
    with pytest.raises(QosError) as e:
        import_evoapprox_c(write(tmp_path, "s.c", _hostile('system("true");', marker=tmp_path / "x")), "s")
    assert "does not link" in one_line_error(e) and "system" in one_line_error(e)
    with pytest.raises(QosError) as e:
        import_evoapprox_c(write(tmp_path, "exit.c", "#include <stdint.h>\n#include <stdlib.h>\n"
                                 "uint16_t mul8u_X(uint8_t A, uint8_t B) { if (A == 7) exit(9); return A * B; }\n"),
                           "x")
    assert "status 9" in one_line_error(e)


@SANDBOXED
def test_import_c_with_clang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not shutil.which("clang"):
        pytest.skip("no clang")
    monkeypatch.setenv("CC", "clang")
    m = import_evoapprox_c(write(tmp_path, "m.c", TRUNC_BA), "t")
    np.testing.assert_array_equal(m.lut, np.outer(U & 0xF0, U))


def test_import_c_missing_file(tmp_path: Path) -> None:
    with pytest.raises(QosError) as e:
        import_evoapprox_c(tmp_path / "nope.c", "x")
    assert "no such file" in one_line_error(e)


# --------------------------------------------------------------------------- .npy / .npz
@pytest.mark.parametrize("name, dtype", [("mul8u_2AC", np.int32), ("mul8u_2AC", np.int64), ("mul8u_2AC", np.uint16),
                                         ("mul8s_1KR6", np.int16), ("mul8s_1KR6", np.int32)])
def test_npy_round_trip(tmp_path: Path, name: str, dtype: type) -> None:
    ref = BY_NAME[name]
    np.save(tmp_path / "t.npy", ref.lut.astype(dtype))
    m = import_table(tmp_path / "t.npy", "t", signed=ref.signed)
    assert m == ref and m.lut.dtype == np.int32 and m.source == str((tmp_path / "t.npy").resolve())


def test_npy_signed_from_name(tmp_path: Path) -> None:
    ref = BY_NAME["mul8s_1KR6"]
    np.save(tmp_path / "t.npy", ref.lut)
    assert import_table(tmp_path / "t.npy", "mul8s_MINE", signed=None) == ref
    with pytest.raises(QosError) as e:
        import_table(tmp_path / "t.npy", "mine", signed=None)
    assert "--signed" in one_line_error(e)


def test_npz_round_trips(tmp_path: Path) -> None:
    a, b = BY_NAME["mul8u_2AC"], BY_NAME["mul8u_DG8"]
    np.savez(tmp_path / "one.npz", whatever=a.lut)
    assert import_table(tmp_path / "one.npz", "x", False) == a
    np.savez_compressed(tmp_path / "two.npz", first=a.lut, second=b.lut)
    assert import_table(tmp_path / "two.npz", "x", False, key="second") == b
    with pytest.raises(QosError) as e:
        import_table(tmp_path / "two.npz", "x", False)
    assert "--key" in one_line_error(e)
    with pytest.raises(QosError) as e:
        import_table(tmp_path / "two.npz", "x", False, key="third")
    assert "first, second" in one_line_error(e)
    np.savez(tmp_path / "lut.npz", lut=b.lut, other=a.lut)
    assert import_table(tmp_path / "lut.npz", "x", False) == b  # 'lut' is chosen by default


def test_npz_publisher_layout_with_key(tmp_path: Path) -> None:
    # EvoApprox's table archives: every circuit of one signedness under its name, int32 lut[A, B]
    # (docs/design.md, "Regenerating the bundled data"); rebuilt here from the bundled library.
    for prefix, signed, picks in (("mul8u", False, ("mul8u_2AC", "mul8u_1JFF")), ("mul8s", True, ("mul8s_1KR6",))):
        path = tmp_path / f"luts_{prefix}.npz"
        np.savez_compressed(path, **{m.name: np.asarray(m.lut, np.int32) for m in bundled().select(signed)})
        for name in picks:
            assert import_table(path, "x", signed, key=name) == BY_NAME[name]


def _write_bad_files(tmp_path: Path) -> None:
    good = np.zeros((256, 256), np.int32)
    np.save(tmp_path / "shape.npy", np.zeros((256, 255), np.int32))
    np.save(tmp_path / "float.npy", good.astype(np.float64))
    np.save(tmp_path / "big.npy", np.full((256, 256), 2**40, np.int64))
    np.save(tmp_path / "bool.npy", good.astype(bool))
    np.save(tmp_path / "object.npy", np.empty((256, 256), dtype=object), allow_pickle=True)
    np.save(tmp_path / "ok.npy", good)
    (tmp_path / "truncated.npy").write_bytes((tmp_path / "ok.npy").read_bytes()[:5000])
    np.savez_compressed(tmp_path / "ok.npz", lut=good)
    data = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.npy").write_text("hello")
    (tmp_path / "dir.npy").mkdir()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("lut.npy", b"\x93NUMPY garbage")
    (tmp_path / "badmember.npz").write_bytes(buf.getvalue())


@pytest.mark.parametrize("file, fragment", [
    ("shape.npy", "shape (256, 256)"), ("float.npy", "integers"), ("big.npy", "outside int32"),
    ("bool.npy", "integers"), ("object.npy", "not a readable .npy"), ("truncated.npy", "not a readable .npy"),
    ("truncated.npz", "not a readable .npz"), ("badmember.npz", "not a readable .npz"),
    ("text.npy", "neither a .npy"), ("dir.npy", "not a regular file"), ("missing.npy", "no such file"),
])
def test_table_errors(tmp_path: Path, file: str, fragment: str) -> None:
    _write_bad_files(tmp_path)
    with pytest.raises(QosError) as e:
        import_table(tmp_path / file, "x", signed=False)
    assert fragment in one_line_error(e)


# --------------------------------------------------------------------------- TFApprox .bin
def test_tfapprox_bin_unsigned_round_trip(tmp_path: Path) -> None:
    ref = BY_NAME["mul8u_2AC"]
    (tmp_path / "t.bin").write_bytes(ref.lut.astype("<u2").tobytes())
    assert import_tfapprox_bin(tmp_path / "t.bin", "x", signed=False) == ref


def test_tfapprox_bin_signed_layout(tmp_path: Path) -> None:
    # Independent construction: row r / column c hold the operands int8(r) / int8(c).
    raw = np.zeros((256, 256), np.uint16)
    for r in range(256):
        a = r - 256 if r >= 128 else r
        for c in range(256):
            b = c - 256 if c >= 128 else c
            raw[r, c] = ((a & ~3) * b) & 0xFFFF
    (tmp_path / "s.bin").write_bytes(raw.astype("<u2").tobytes())
    m = import_tfapprox_bin(tmp_path / "s.bin", "mul8s_X", signed=None)
    assert m.signed
    np.testing.assert_array_equal(m.lut, np.outer(S & ~3, S))


def test_tfapprox_bin_signed_round_trip_of_bundled(tmp_path: Path) -> None:
    ref = BY_NAME["mul8s_1KTY"]
    raw = np.roll(ref.lut, (-128, -128), axis=(0, 1)).astype(np.int64) & 0xFFFF  # index by raw byte
    (tmp_path / "s.bin").write_bytes(raw.astype("<u2").tobytes())
    assert import_tfapprox_bin(tmp_path / "s.bin", "x", signed=True) == ref


@pytest.mark.parametrize("size", [0, 131071, 131073, 65536])
def test_tfapprox_bin_wrong_size(tmp_path: Path, size: int) -> None:
    (tmp_path / "t.bin").write_bytes(b"\0" * size)
    with pytest.raises(QosError) as e:
        import_tfapprox_bin(tmp_path / "t.bin", "x", signed=False)
    assert "131072 bytes" in one_line_error(e)


# --------------------------------------------------------------------------- dispatch
def test_kind_of() -> None:
    assert [kind_of(f"x{s}") for s in (".c", ".npy", ".npz", ".bin", ".NPY")] == \
        ["evoapprox-c", "npy", "npy", "tfapprox-bin", "npy"]
    assert kind_of("x.dat", "npz") == "npy"
    for bad in (lambda: kind_of("x.dat"), lambda: kind_of("x.c", "verilog")):
        with pytest.raises(QosError) as e:
            bad()
        one_line_error(e)


@needs_cc
def test_import_multiplier_dispatch(tmp_path: Path) -> None:
    ref = BY_NAME["mul8u_2AC"]
    np.save(tmp_path / "t.npy", ref.lut)
    (tmp_path / "t.bin").write_bytes(ref.lut.astype("<u2").tobytes())
    (tmp_path / "t.dat").write_bytes((tmp_path / "t.npy").read_bytes())
    write(tmp_path, "t.c", _c_table_model("mul8u_2AC", ref.lut, False, "u64-BA"))
    for f, kind in (("t.npy", None), ("t.bin", None), ("t.c", None), ("t.dat", "npy")):
        assert import_multiplier(tmp_path / f, "mul8u_X", kind=kind) == ref, f
    t = import_multiplier(tmp_path / "t.npy", "mul8u_X", transpose=True)
    np.testing.assert_array_equal(t.lut, ref.lut.T)
    with pytest.raises(QosError):
        import_multiplier(tmp_path / "t.bin", "mul8u_X", key="k")


def test_import_multiplier_reads_own_files_with_metadata(tmp_path: Path) -> None:
    ref = BY_NAME["mul8s_1KR6"]
    save_multiplier(ref, tmp_path / "own.npz")
    m = import_multiplier(tmp_path / "own.npz", "renamed")
    assert m == ref and m.name == "renamed" and m.aliases == ()
    assert m.signed and m.power_mw == ref.power_mw and m.published == ref.published
    with pytest.raises(QosError):
        import_multiplier(tmp_path / "own.npz", "renamed", signed=False)


@pytest.mark.parametrize("name", ["", "a:b", "master:x", "a/b", "-x", "x" * 65, "a b"])
def test_invalid_names(tmp_path: Path, name: str) -> None:
    np.save(tmp_path / "t.npy", BY_NAME["mul8u_2AC"].lut)
    with pytest.raises(QosError) as e:
        import_table(tmp_path / "t.npy", name, signed=False)
    assert "invalid multiplier name" in one_line_error(e)


def test_sha_helper_matches_multiplier() -> None:
    ref = BY_NAME["mul8u_2AC"]
    assert table_sha256(ref.lut) == ref.sha256
