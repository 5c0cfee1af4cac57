"""Import 8x8 multiplier circuits from C models, NumPy tables and TFApprox ``.bin`` files.

Every importer returns a `Multiplier` whose table follows the numerics contract:
``lut[A, B]`` (first index = hardware port A), signed circuits indexed by ``code + 128``.
Hardware figures (power, area, delay) are never invented: they stay ``None``.
Every bad input raises `QosError` with a one-line message.

Signedness: ``signed=None`` means "take it from the name": names starting with
``mul8s`` are signed, ``mul8u`` unsigned (EvoApprox's convention); anything else must
say so explicitly.
"""
from __future__ import annotations

import dataclasses
import io
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import cbuild
from ..errors import QosError
from ..numerics import code_offset
from .multiplier import Multiplier
from .multiplier_file import check_name, is_multiplier_file, load_multiplier_file
from .table import validate_table

#: Import kinds accepted by `import_multiplier` (and ``qos-nets multipliers import --kind``).
KINDS = ("evoapprox-c", "npy", "tfapprox-bin")
#: File suffix -> kind, used when no kind is given.
SUFFIX_KINDS = {".c": "evoapprox-c", ".npy": "npy", ".npz": "npy", ".bin": "tfapprox-bin"}

# Generous caps that keep a wrong or hostile file from exhausting memory before it is rejected.
_MAX_TABLE_FILE_BYTES = 8 << 20
_MAX_C_SOURCE_BYTES = 64 << 20
_TFAPPROX_BYTES = 256 * 256 * 2
_COMPILE_TIMEOUT_S = 300.0
_RUN_TIMEOUT_S = 60.0


# --------------------------------------------------------------------------- helpers
def signedness_from_name(name: str) -> bool | None:
    """True for ``mul8s*`` names, False for ``mul8u*``, None when the name does not say."""
    low = name.lower()
    if low.startswith("mul8s"):
        return True
    if low.startswith("mul8u"):
        return False
    return None


def _resolve_signed(signed: bool | None, name: str, what: str) -> bool:
    if signed is not None:
        return bool(signed)
    guess = signedness_from_name(name)
    if guess is None:
        raise QosError(
            f"cannot tell whether {what} is signed: its name does not start with mul8s/mul8u; "
            "say --signed or --unsigned"
        )
    return guess


def _read_bytes(path: Path, limit: int, what: str) -> bytes:
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise QosError(f"{path} is not a regular file")
        if size > limit:
            raise QosError(f"{path} is {size} bytes, too large for {what}")
        return path.read_bytes()
    except FileNotFoundError:
        raise QosError(f"no such file: {path}") from None
    except OSError as e:
        raise QosError(f"cannot read {path}: {e.strerror or e}") from None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _make(name: str, signed: bool, table: Any, source: Path) -> Multiplier:
    lut = validate_table(table, f"table in {source}")
    return Multiplier(name=name, signed=signed, lut=lut, source=str(source.resolve()))


# --------------------------------------------------------------------------- tables
def _read_npy_member(open_member: Callable[[], Any], what: str) -> np.ndarray:
    with open_member() as fh:
        arr = np.lib.format.read_array(fh, allow_pickle=False)
    if not isinstance(arr, np.ndarray):
        raise QosError(f"{what} is not an array")
    return arr


def import_table(path: str | os.PathLike[str], name: str, signed: bool | None,
                 key: str | None = None) -> Multiplier:
    """Import a table from a ``.npy`` file, or from a ``.npz`` archive.

    The array must be integer, shape (256, 256), values within int32, laid out as
    ``lut[A, B]`` (signed: index ``code + 128``). For a ``.npz`` with several arrays,
    ``key`` chooses one; without ``key`` the archive must hold exactly one array or an
    array called ``lut`` (the layout qos-compile itself writes). Nothing is unpickled.
    """
    check_name(name)
    p = Path(path)
    data = _read_bytes(p, _MAX_TABLE_FILE_BYTES, "a 256x256 table")
    signed = _resolve_signed(signed, name, name)
    if data.startswith(b"\x93NUMPY"):
        if key is not None:
            raise QosError(f"{p} is a .npy file holding one array; --key applies only to .npz archives")
        try:
            arr = _read_npy_member(lambda: io.BytesIO(data), str(p))
        except QosError:
            raise
        except Exception as e:  # any parse failure of an untrusted file is a bad input
            raise QosError(f"{p} is not a readable .npy file ({_one_line(e)})") from None
    elif data.startswith(b"PK"):
        arr = _read_npz(p, key)
    else:
        raise QosError(f"{p} is neither a .npy file nor a .npz archive")
    return _make(name, signed, arr, p)


def _read_npz(p: Path, key: str | None) -> np.ndarray:
    try:
        with zipfile.ZipFile(p) as zf:
            members = {i.filename[:-4] if i.filename.endswith(".npy") else i.filename: i for i in zf.infolist()}
            if key is not None:
                if key not in members:
                    raise QosError(f"{p} has no array {key!r} (it has {_list_names(members)})")
                chosen = key
            elif len(members) == 1:
                chosen = next(iter(members))
            elif "lut" in members:
                chosen = "lut"
            else:
                raise QosError(f"{p} holds {len(members)} arrays ({_list_names(members)}); choose one with --key")
            info = members[chosen]
            if info.file_size > _MAX_TABLE_FILE_BYTES:
                raise QosError(f"array {chosen!r} in {p} is too large for a 256x256 table")
            return _read_npy_member(lambda: zf.open(info), f"array {chosen!r} in {p}")
    except QosError:
        raise
    except Exception as e:  # truncated/corrupt zip, bad CRC, bad .npy header, pickled data ...
        raise QosError(f"{p} is not a readable .npz archive ({_one_line(e) or type(e).__name__})") from None


def _list_names(members: dict[str, Any], limit: int = 8) -> str:
    names = sorted(members)
    more = f", ... {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def import_tfapprox_bin(path: str | os.PathLike[str], name: str, signed: bool | None) -> Multiplier:
    """Import a TFApprox multiplication table (``.bin``).

    Format: 65,536 little-endian uint16 values, row-major, value at ``first*256 + second``.
    The file does not record which hardware port each operand is; we take the **first
    operand (the row) as port A**, which keeps the circuit's ports when the file was
    tabulated as ``f(A=row, B=column)``. Use ``transpose`` (CLI ``--transpose``) for a file
    tabulated the other way. Note that TFApprox itself feeds the *activation* as the first
    operand, whereas qos-compile feeds the weight to port A and the activation to port B.

    Signed circuits (an extension; TFApprox ships unsigned tables only): rows and columns
    are indexed by the operand's raw 8-bit two's-complement pattern, so row ``r`` holds
    operand code ``int8(r)`` (0..127, then -128..-1), and each value is the 16-bit
    two's-complement output, sign-extended. We reorder to our ``code + 128`` layout.
    """
    check_name(name)
    p = Path(path)
    data = _read_bytes(p, _MAX_TABLE_FILE_BYTES, "a TFApprox table")
    signed = _resolve_signed(signed, name, name)
    if len(data) != _TFAPPROX_BYTES:
        raise QosError(f"{p} is {len(data)} bytes; a TFApprox 8x8 table is 65,536 uint16 values "
                       f"= {_TFAPPROX_BYTES} bytes")
    raw = np.frombuffer(data, dtype="<u2").reshape(256, 256).astype(np.int64)
    if signed:
        raw = (raw ^ 0x8000) - 0x8000  # sign-extend the 16-bit pattern
        # raw[r] is code int8(r): index r -> code r (r < 128) or r - 256; our index is code + 128.
        raw = np.roll(raw, (128, 128), axis=(0, 1))
    return _make(name, signed, raw, p)


# --------------------------------------------------------------------------- C models
_C_KEYWORDS = frozenset(
    "if else for while do switch case return sizeof goto break continue typedef struct union enum".split()
)
_QUALIFIERS = frozenset("const volatile register restrict static inline extern __restrict __inline".split())
_SIGNED_INT_RE = re.compile(r"(signed|int|short|long|int(_least|_fast)?(8|16|32|64)_t|intmax_t|ptrdiff_t|ssize_t)")


@dataclasses.dataclass(frozen=True)
class CParam:
    """One parameter of a C multiplier function."""

    name: str
    type: str
    #: For signed circuits: pass the operand's value (-128..127) rather than its 8-bit
    #: pattern (0..255). True for signed integer types (int8_t, int, ...), whose value the
    #: function reads arithmetically; False for unsigned types, which receive the pattern.
    takes_value: bool


@dataclasses.dataclass(frozen=True)
class CFunction:
    """The multiplier function found in a C model."""

    name: str
    return_type: str
    params: tuple[CParam, CParam]
    #: True when the parameters are named A and B (any case), which fixes the ports;
    #: otherwise the first parameter is taken as port A.
    ports_from_names: bool

    @property
    def port_a_index(self) -> int:
        """Position (0 or 1) of the parameter that is hardware port A."""
        if self.ports_from_names:
            return 0 if self.params[0].name.upper() == "A" else 1
        return 0

    def signature(self) -> str:
        """E.g. ``uint64_t mul8u_2AC(const uint64_t B, const uint64_t A)``."""
        args = ", ".join(f"{q.type} {q.name}".strip() for q in self.params)
        return f"{self.return_type} {self.name}({args})"


# Comments, string/char literals and preprocessor lines (with backslash continuations). The
# leftmost match wins, so a "//" inside a string or a quote inside a comment is handled right.
_BLANK_RE = re.compile(
    r"//[^\n]*"
    r"|/\*.*?(?:\*/|\Z)"
    r"|\"(?:\\.|[^\"\\\n])*\"?"
    r"|'(?:\\.|[^'\\\n])*'?"
    r"|^[ \t]*\#(?:\\\n|[^\n])*",
    re.DOTALL | re.MULTILINE,
)


def _strip_c(text: str) -> str:
    """Blank out comments, literals and preprocessor lines, keeping every offset and newline."""
    return _BLANK_RE.sub(lambda m: re.sub(r"[^\n]", " ", m.group()), text)


_FUNC_RE = re.compile(r"\b([A-Za-z_]\w*)\s*\(([^(){};]*)\)\s*\{")


def _parse_param(text: str) -> CParam | None:
    words = re.findall(r"[A-Za-z_]\w*", re.sub(r"\[[^\]]*\]", " ", text))
    if len(words) < 2 or "*" in text:  # need a type and a name; pointers are not operands
        return None
    name, type_words = words[-1], [w for w in words[:-1] if w not in _QUALIFIERS]
    unsigned = any(w == "unsigned" or w.startswith("uint") or w in ("size_t", "bool", "_Bool") for w in type_words)
    signed_int = any(_SIGNED_INT_RE.fullmatch(w) for w in type_words)
    return CParam(name=name, type=" ".join(words[:-1]), takes_value=signed_int and not unsigned)


def _c_functions(text: str) -> list[tuple[str, str, list[str]]]:
    """(name, return type, raw parameter texts) of every function definition at file scope."""
    stripped = _strip_c(text)
    chars = np.frombuffer(stripped.encode("utf-32-le"), dtype="<u4")
    depth = np.cumsum((chars == ord("{")).astype(np.int64) - (chars == ord("}")))  # brace depth after each char
    found = []
    for m in _FUNC_RE.finditer(stripped):
        name = m.group(1)
        if name in _C_KEYWORDS or (m.start() > 0 and depth[m.start() - 1] != 0):
            continue
        head_start = max(stripped.rfind(";", 0, m.start()), stripped.rfind("}", 0, m.start())) + 1
        ret = " ".join(stripped[head_start:m.start()].split())
        if not ret:  # a definition needs a return type (K&R/implicit int is not supported)
            continue
        params = [q.strip() for q in m.group(2).split(",")]
        if params in ([""], ["void"]):
            params = []
        found.append((name, ret, params))
    return found


def find_c_multiplier(source: str, function: str | None = None) -> CFunction:
    """Find the 8x8 multiplier function in C source text.

    With ``function`` given, that function. Otherwise the one two-parameter function whose
    name starts with ``mul8``, or else the file's only two-parameter function (``main`` is
    never a candidate). Raises QosError when there is no candidate or several.
    """
    funcs = _c_functions(source)
    two = [(n, r, ps) for n, r, ps in funcs if len(ps) == 2 and n != "main"]
    if function is not None:
        cands = [f for f in two if f[0] == function]
        if not cands:
            if any(n == function for n, _, _ in funcs):
                raise QosError(f"C function {function!r} does not take exactly two operands")
            raise QosError(f"no C function {function!r} is defined in the model")
    else:
        cands = [f for f in two if f[0].lower().startswith("mul8")] or two
        if not cands:
            raise QosError("no 8x8 multiplier function found: the C model defines no function of two parameters")
        if len(cands) > 1:
            names = ", ".join(sorted({f[0] for f in cands}))
            raise QosError(f"several candidate multiplier functions in the C model ({names}); "
                           "choose one with --function")
    name, ret, raw = cands[0]
    params = [_parse_param(q) for q in raw]
    if params[0] is None or params[1] is None:
        raise QosError(f"C function {name}: cannot read its parameters ({', '.join(raw)}); "
                       "expected two integer operands")
    if "*" in ret or any(w in ("float", "double", "void") for w in ret.split()):
        raise QosError(f"C function {name} returns {ret!r}; an 8x8 multiplier returns an integer")
    pa, pb = params
    by_name = {pa.name.upper(), pb.name.upper()} == {"A", "B"}
    return CFunction(name=name, return_type=ret, params=(pa, pb), ports_from_names=by_name)


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'


def _driver(func: CFunction, signed: bool, model: bytes, model_path: str) -> bytes:
    """C source: the model, then ``qos_model_entry_(i, j)`` = f(A, B) for table indices i (port A)
    and j (port B), which the sandbox's entry point (``sandbox.SANDBOX_SOURCE``) calls for all
    65,536 pairs. ``exit()`` in the model ends the program with that status (the C library's
    would use a system call the sandbox forbids); a ``main`` of the model is renamed away."""
    def arg(port: str, param: CParam) -> str:
        # Unsigned codes are 0..255 already. Signed: the value for signed-typed parameters,
        # the 8-bit two's-complement pattern for unsigned ones (EvoApprox's raw-bit models).
        return port if not signed or param.takes_value else f"({port} & 0xFF)"

    ia = func.port_a_index
    ports = ["a", "b"] if ia == 0 else ["b", "a"]
    call = f"{func.name}({arg(ports[0], func.params[0])}, {arg(ports[1], func.params[1])})"
    off = code_offset(signed)
    head = (
        "#include <stdint.h>\n#include <stdlib.h>\n"
        "void qos_model_exit_(int status) __attribute__((noreturn));\n"
        "#define exit qos_model_exit_\n#define _Exit qos_model_exit_\n#define _exit qos_model_exit_\n"
        "#define quick_exit qos_model_exit_\n"
        "#define main qos_compile_model_main_\n"  # a main() in the model must not clash with anything
        f"#line 1 {_c_string(model_path)}\n"      # compiler messages point into the user's file
    ).encode()
    tail = f"""
#undef main
#line 1 "<qos-compile driver>"
long long qos_model_entry_(int i, int j) {{
  int a = i - {off}, b = j - {off};
  return (long long) {call};
}}
""".encode()
    return head + model + b"\n" + tail


def find_c_compiler() -> list[str]:
    """The C compiler command: ``$CC`` if set (may include flags), else ``cc``, ``gcc`` or ``clang`` on PATH."""
    return cbuild.find_compiler()


def _tabulate_c(func: CFunction, signed: bool, model: bytes, model_path: str) -> np.ndarray:
    """Compile the model with our entry point and run it in the sandbox (``sandbox``): the table."""
    from . import sandbox

    why = sandbox.supported()
    if why:
        raise QosError(why)
    sandbox.check_includes(model.decode("utf-8", errors="replace"), model_path)
    cc = find_c_compiler()
    return sandbox.tabulate(cc, _driver(func, signed, model, model_path), model_path,
                            _COMPILE_TIMEOUT_S, _RUN_TIMEOUT_S)


def import_evoapprox_c(path: str | os.PathLike[str], name: str, signed: bool | None = None,
                       function: str | None = None) -> Multiplier:
    """Import an EvoApprox-style C model by compiling it and tabulating all 65,536 inputs.

    The model is compiled with the system C compiler (``$CC``, else ``cc``) together with a
    generated driver, in a temporary folder, and run confined (``qos_compile.multipliers.sandbox``:
    only a few standard headers may be included, and the program computes under seccomp strict
    mode with resource limits, an empty folder and environment). Supported shapes, e.g.::

        uint64_t mul8u_XXX(const uint64_t B, const uint64_t A)   // unsigned
        uint16_t mul8s_XXX(uint8_t A, uint8_t B)                  // signed, raw bit patterns
        int16_t  mul8s_XXX(int8_t A, int8_t B)                    // signed, values

    The function (see `find_c_multiplier`) must take two operands. Ports: parameters named
    ``A``/``B`` are put on ports A/B whatever their position (EvoApprox's unsigned models
    take ``(B, A)``); with other names the first parameter is port A. Signedness: from
    ``signed``, else from the function name (``mul8s``/``mul8u``); a conflict is an error.
    Signed operands are passed as 8-bit two's-complement patterns to unsigned-typed
    parameters and as values to signed-typed ones; the result is read as a 16-bit
    two's-complement number (int16, sign-extended) for signed circuits and as uint16 for
    unsigned ones. An output that does not fit 16 bits is an error, not truncated.
    """
    check_name(name)
    p = Path(path)
    model = _read_bytes(p, _MAX_C_SOURCE_BYTES, "a C model")
    func = find_c_multiplier(model.decode("utf-8", errors="replace"), function)
    by_func = signedness_from_name(func.name)
    if signed is not None and by_func is not None and bool(signed) != by_func:
        raise QosError(
            f"C function {func.name} is {'signed' if by_func else 'unsigned'} by its name, "
            f"but {'signed' if signed else 'unsigned'} was requested"
        )
    if signed is None and by_func is None:
        raise QosError(f"cannot tell whether C function {func.name} is signed (name not mul8s/mul8u); "
                       "say --signed or --unsigned")
    is_signed = bool(signed) if signed is not None else bool(by_func)
    values = _tabulate_c(func, is_signed, model, str(p))
    lo, hi = (-(2**15), 2**16 - 1) if is_signed else (0, 2**16 - 1)
    bad = np.argwhere((values < lo) | (values > hi))
    if bad.size:
        i, j = (int(x) for x in bad[0])
        off = code_offset(is_signed)
        raise QosError(
            f"C function {func.name} returned {int(values[i, j])} for A={i - off}, B={j - off}: "
            f"not a 16-bit {'signed' if is_signed else 'unsigned'} product ({len(bad)} such outputs)"
        )
    if is_signed:
        values = ((values & 0xFFFF) ^ 0x8000) - 0x8000  # int16 pattern or value -> sign-extended
    return _make(name, is_signed, values, p)


# --------------------------------------------------------------------------- dispatch
def kind_of(path: str | os.PathLike[str], kind: str | None = None) -> str:
    """The import kind for ``path``: ``kind`` if given (``npz`` means ``npy``), else from the suffix."""
    if kind is not None:
        k = "npy" if kind == "npz" else kind
        if k not in KINDS:
            raise QosError(f"unknown import kind {kind!r}; use one of {', '.join(KINDS)}")
        return k
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIX_KINDS:
        raise QosError(
            f"cannot tell the format of {path} from its suffix {suffix or '(none)'!r}; "
            f"use .c, .npy, .npz or .bin, or give --kind ({', '.join(KINDS)})"
        )
    return SUFFIX_KINDS[suffix]


def import_multiplier(path: str | os.PathLike[str], name: str, kind: str | None = None,
                      signed: bool | None = None, key: str | None = None,
                      function: str | None = None, transpose: bool = False) -> Multiplier:
    """Import a circuit from ``path``, dispatching on ``kind`` or the file suffix.

    ``kind``: ``evoapprox-c`` (.c), ``npy`` (.npy/.npz) or ``tfapprox-bin`` (.bin).
    ``signed``: None = from the name (see module doc). ``key``: the array in a .npz.
    ``function``: the C function to use. ``transpose``: swap the ports after import, for
    sources whose first operand is port B.
    """
    k = kind_of(path, kind)
    if key is not None and k != "npy":
        raise QosError("--key applies only to .npz archives")
    if function is not None and k != "evoapprox-c":
        raise QosError("--function applies only to C models")
    if k == "evoapprox-c":
        m = import_evoapprox_c(path, name, signed, function=function)
    elif k == "npy" and key is None and is_multiplier_file(path):
        m = _import_own_file(path, name, signed)
    elif k == "npy":
        m = import_table(path, name, signed, key=key)
    else:
        m = import_tfapprox_bin(path, name, signed)
    if transpose:
        m = dataclasses.replace(m, lut=m.lut.T)
    return m


def _import_own_file(path: str | os.PathLike[str], name: str, signed: bool | None) -> Multiplier:
    """A file written by qos-compile (``--output``): keep its metadata, take the new name, drop aliases."""
    check_name(name)
    m = load_multiplier_file(path)
    if signed is not None and bool(signed) != m.signed:
        raise QosError(f"{path} holds a {'signed' if m.signed else 'unsigned'} circuit, "
                       f"but {'signed' if signed else 'unsigned'} was requested")
    return dataclasses.replace(m, name=name, aliases=())
