"""Structure-aware fuzzing of ``.qosm`` manifests: a mutator that knows the format, and the
sanitizer builds it drives (used by tests/test_fuzz_manifest.py).

The mutator reads a manifest's header and section table with the spec of
``qos_compile.runtime.manifest`` (``HEADER``, ``SECTION``, ``SECTION_RECORDS``) and changes
*fields*: header fields, section counts/offsets/entry sizes, and any field of any record (counts,
offsets, dtypes, ndims, shapes, roles, string references, kernel ids, argument kinds and
indices, bank/tensor/layer indices), with values chosen for that field (the boundaries of the
table it indexes, alignment neighbours, huge and negative values, other records' values), and
rewrites strings in place (a kernel name becomes another symbol of the program, e.g.
``<prefix>__tvm_ffi__library_ctx``). The CRC-32 is recomputed, so a normal build's loader gets
past its checksum and every mutant reaches the parser.

A mutant is a list of ``Mutation``s (JSON: ``Mutation.to_json``), so a finding is kept as a
*recipe* (seed name + mutations), not as a binary file; ``apply`` turns it back into bytes.

``build_recipe_runner`` builds ``runtime/fuzz/fuzz_recipes.c`` with AddressSanitizer and
UndefinedBehaviorSanitizer, either with the touching kernel (every name resolves; every DLTensor
is read at both ends) or linked with a compiled model's own ``kernels.o`` and kernel table (its
real TVM kernels, which check every argument). ``build_sanitized_qos_run`` builds a compiled
model's ``qos-run`` the same way. ``run_mutants`` feeds mutants to a runner and returns one
result per mutant, or names the mutant that crashed or hung.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import QosError
from . import manifest as M

__all__ = ["Mutation", "Layout", "apply", "patches", "random_mutant", "interesting_names", "load_recipes",
           "SANITIZER_FLAGS", "build_recipe_runner", "build_sanitized_qos_run", "run_mutants", "MutantResult",
           "Finding"]

SANITIZER_FLAGS = ("-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                   "-fno-omit-frame-pointer", "-DQOS_MAX_ARENA_BYTES=((uint64_t)1<<30)")
SANITIZER_ENV = {"ASAN_OPTIONS": "allocator_may_return_null=1:detect_leaks=1:abort_on_error=0",
                 "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1", "QOS_NUM_THREADS": "1"}

_SECTION_NAMES = {s.name: s for s in M.Section}
_STRING_FIELDS = {"name", "sha256"}
_U64 = (1 << 64) - 1


# --------------------------------------------------------------------------- layout
class Layout:
    """The header and section table of a (possibly broken) manifest, read without validation."""

    def __init__(self, data: bytes | bytearray):
        self.size = len(data)
        if len(data) < M.HEADER.size:
            raise QosError("not a manifest: shorter than its header")
        self.header = M.HEADER.unpack(data, 0)
        n = min(int(self.header["num_sections"]), M.MAX_SECTIONS, (len(data) - M.HEADER.size) // M.SECTION.size)
        self.sections = [M.SECTION.unpack(data, M.HEADER.size + M.SECTION.size * i) for i in range(n)]

    def count(self, sec: M.Section) -> int:
        return int(self.sections[sec]["count"]) if int(sec) < len(self.sections) else 0

    def offset(self, sec: M.Section) -> int:
        return int(self.sections[sec]["offset"]) if int(sec) < len(self.sections) else 0

    def records(self, sec: M.Section) -> int:
        """How many whole records of ``sec`` lie inside the file."""
        rec = M.SECTION_RECORDS[sec]
        off, cnt = self.offset(sec), self.count(sec)
        if off <= 0 or off >= self.size:
            return 0
        return max(0, min(cnt, (self.size - off) // rec.size))

    def record_offset(self, sec: M.Section, index: int) -> int:
        return self.offset(sec) + index * M.SECTION_RECORDS[sec].size

    def string_fields(self, data: bytes) -> list[tuple[M.Section, int, str, int]]:
        """(section, record, field, reference) of every string reference in ``data``."""
        out = []
        for sec, rec in M.SECTION_RECORDS.items():
            for f in rec.fields:
                if f.name in _STRING_FIELDS:
                    for i in range(self.records(sec)):
                        v = struct.unpack_from("<I", data, self.record_offset(sec, i) + f.offset)[0]
                        out.append((sec, i, f.name, v))
        return out


# --------------------------------------------------------------------------- mutations
@dataclasses.dataclass(frozen=True)
class Mutation:
    """One change. ``where``: ``header`` (a header field), ``section`` (field of section-table
    entry ``section``), ``record`` (field of record ``index`` of ``section``), ``string`` (the
    string that field ``field`` of that record references is rewritten in place with ``value``,
    NUL-terminated, clipped to STRINGS). ``element``: the element of an array field (``shape``),
    -1 for scalar fields."""

    where: str
    field: str
    value: Any
    section: str = ""
    index: int = 0
    element: int = -1

    def to_json(self) -> dict[str, Any]:
        defaults = {"section": "", "index": 0, "element": -1}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in defaults or v != defaults[k]}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "Mutation":
        return Mutation(**d)

    def describe(self) -> str:
        loc = {"header": "header", "section": f"section {self.section}",
               "record": f"{self.section}[{self.index}]", "string": f"string of {self.section}[{self.index}]"}
        el = f"[{self.element}]" if self.element >= 0 else ""
        return f"{loc.get(self.where, self.where)}.{self.field}{el} = {self.value!r}"


def _field(rec: M.Record, name: str) -> M.Field:
    for f in rec.fields:
        if f.name == name:
            return f
    raise QosError(f"record {rec.name} has no field {name!r}")


def _pack_value(f: M.Field, value: Any, element: int) -> tuple[int, bytes]:
    """(offset inside the record, bytes) of ``value`` written into field ``f`` (element ``element``)."""
    code, size, _ = M._TYPES[f.type]
    if f.type == "char":
        raw = value.encode("latin-1") if isinstance(value, str) else bytes(value)
        return f.offset, (raw + bytes(f.count))[:f.count]
    if f.count > 1 and element < 0:
        vals = list(value)
        return f.offset, b"".join(_pack_scalar(code, size, v) for v in vals[:f.count])
    return f.offset + size * max(element, 0), _pack_scalar(code, size, value)


def _pack_scalar(code: str, size: int, v: Any) -> bytes:
    if code == "f":
        return struct.pack("<f", float(v))
    bits = 8 * size
    v = int(v) & ((1 << bits) - 1)            # wrap: -1 is all ones, 2**64 + 3 is 3
    if code.islower():                         # signed
        v = v - (1 << bits) if v >> (bits - 1) else v
    return struct.pack("<" + code, v)


def patches(data: bytes, mutations: Sequence[Mutation], fix_crc: bool = True) -> tuple[bytes, list[tuple[int, bytes]]]:
    """Apply ``mutations`` in order (each one sees the layout the previous ones left); returns the
    mutated bytes and the list of (offset, bytes) writes, the CRC-32 rewrite last. In a string
    value, ``{kernel_prefix}`` stands for the seed's kernel symbol prefix (its metadata), so a
    stored recipe fits every build of its seed."""
    buf = bytearray(data)
    writes: list[tuple[int, bytes]] = []

    def put(off: int, raw: bytes) -> None:
        if off < 0 or off >= len(buf):
            return
        raw = raw[: len(buf) - off]
        buf[off:off + len(raw)] = raw
        writes.append((off, bytes(raw)))

    for mu in mutations:
        lay = Layout(buf)
        if mu.where == "header":
            off, raw = _pack_value(_field(M.HEADER, mu.field), mu.value, mu.element)
            put(off, raw)
        elif mu.where == "section":
            sec = _SECTION_NAMES[mu.section]
            off, raw = _pack_value(_field(M.SECTION, mu.field), mu.value, mu.element)
            put(M.HEADER.size + M.SECTION.size * int(sec) + off, raw)
        elif mu.where == "record":
            sec = _SECTION_NAMES[mu.section]
            if mu.index >= lay.records(sec):
                continue
            off, raw = _pack_value(_field(M.SECTION_RECORDS[sec], mu.field), mu.value, mu.element)
            put(lay.record_offset(sec, mu.index) + off, raw)
        elif mu.where == "string":
            sec = _SECTION_NAMES[mu.section]
            if mu.index >= lay.records(sec):
                continue
            f = _field(M.SECTION_RECORDS[sec], mu.field)
            ref = struct.unpack_from("<I", buf, lay.record_offset(sec, mu.index) + f.offset)[0]
            s_off, s_len = lay.offset(M.Section.STRINGS), lay.count(M.Section.STRINGS)
            if ref >= s_len or s_off + s_len > len(buf):
                continue
            value = mu.value.replace("{kernel_prefix}", _kernel_prefix(data)) if "{" in mu.value else mu.value
            text = value.encode("utf-8", "surrogateescape") + b"\0"
            put(s_off + ref, text[: s_len - ref])
        else:
            raise QosError(f"unknown mutation target {mu.where!r}")
    if fix_crc and len(buf) >= M.HEADER.size:
        crc = struct.pack("<I", M.checksum(buf))
        buf[M.CHECKSUM_OFFSET:M.CHECKSUM_OFFSET + 4] = crc
        writes.append((M.CHECKSUM_OFFSET, crc))
    return bytes(buf), writes


def _kernel_prefix(data: bytes) -> str:
    try:
        meta = M.read_manifest(data).metadata_json()
    except Exception:  # noqa: BLE001 - not a valid seed: no prefix
        return ""
    return str(meta.get("kernel_prefix", "")) if isinstance(meta, dict) else ""


def apply(data: bytes, mutations: Sequence[Mutation], fix_crc: bool = True) -> bytes:
    """The bytes of ``data`` after ``mutations`` (CRC-32 recomputed unless ``fix_crc`` is False)."""
    return patches(data, mutations, fix_crc)[0]


def interesting_names(data: bytes) -> list[str]:
    """Kernel names worth trying: symbols that exist in a linked qos-run / libqos_model.so but are
    not kernels (library context data, the shim's and runtime's functions, main), and near-misses
    of the manifest's own kernel names."""
    try:
        m = M.read_manifest(data)
        kernels, meta = m.kernels, m.metadata_json()
    except Exception:  # noqa: BLE001 - a seed that does not parse: no names from it
        kernels, meta = [], None
    prefix = meta.get("kernel_prefix", "") if isinstance(meta, dict) else ""
    names = [f"{prefix}__tvm_ffi__library_ctx", "__tvm_ffi__library_ctx", "_library_ctx", "__tvm_ffi_main", "main",
             "qos_table_lookup", "qos_linked_kernel_lookup", "qos_linked_kernels", "qos_open_file",
             "TVMBackendAllocWorkspace", "TVMFFIEnvModRegisterSystemLibSymbol", "qos_shim_get_function", "free",
             "system", "abort", "", "x" * 300]
    for k in kernels[:4]:
        names += [f"__tvm_ffi_{k}", k + "_compute_", k[:-1], k.upper()]
    names += kernels
    return names


_INT_EDGES = (0, 1, 2, 3, 7, 8, 63, 64, 65, 255, 256, 4095, 4096, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000,
              0xFFFFFFFE, 0xFFFFFFFF, 1 << 32, (1 << 62), (1 << 63) - 1, 1 << 63, _U64, -1, -2, -64)


def _int_candidates(cur: int, rng: random.Random, extra: Iterable[int] = ()) -> int:
    extra = list(extra)
    pool = [cur + 1, cur - 1, cur + 8, cur - 8, cur + 64, cur - 64, cur * 2, cur // 2, cur ^ (1 << rng.randrange(64))]
    if extra and rng.random() < 0.6:
        return rng.choice(extra)
    return rng.choice(pool + list(_INT_EDGES))


def _record_value(lay: Layout, data: bytes, sec: M.Section, index: int, f: M.Field,
                  rng: random.Random) -> tuple[Any, int]:
    """A value for field ``f`` of record ``index`` of ``sec`` (and the array element, -1 for scalars)."""
    base = lay.record_offset(sec, index)
    code, size, _ = M._TYPES[f.type]
    element = rng.randrange(f.count) if f.count > 1 and f.type != "char" else -1
    off = base + f.offset + size * max(element, 0)
    cur = struct.unpack_from("<" + code, data, off)[0]
    S = M.Section
    counts = {name: lay.count(s) for name, s in (("tensors", S.TENSORS), ("kernels", S.KERNELS), ("args", S.ARGS),
                                                 ("bank", S.BANK), ("layers", S.LAYERS), ("slots", S.SLOTS),
                                                 ("buffers", S.BUFFERS), ("inputs", S.INPUTS),
                                                 ("outputs", S.OUTPUTS), ("ops", S.OPS))}

    def around(n: int) -> list[int]:
        return [0, max(n - 1, 0), n, n + 1, rng.randrange(max(n, 1))]

    name = f.name
    if f.type == "f32":
        return rng.choice([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e38, -1.0, 1e-45]), element
    if name in _STRING_FIELDS:
        refs = [v for *_x, v in lay.string_fields(data)]
        s_len = lay.count(S.STRINGS)
        return _int_candidates(cur, rng, refs + [0, s_len - 1, s_len, s_len + 1, 0xFFFFFFFF]), element
    if name == "dtype":
        return rng.randrange(0, 8) if rng.random() < 0.9 else rng.randrange(256), element
    if name == "ndim":
        return rng.randrange(0, 8) if rng.random() < 0.9 else 255, element
    if name == "role":
        return rng.randrange(0, 5), element
    if name == "kind":
        return rng.randrange(0, 6) if rng.random() < 0.9 else 0xFFFFFFFF, element
    if name == "shape":
        return rng.choice([0, 1, 2, -1, cur + 1, cur - 1, cur * 2, M.MAX_DIM, M.MAX_DIM + 1, 1 << 40, -(1 << 63),
                           cur]), element
    if name == "kernel":
        return _int_candidates(cur, rng, around(counts["kernels"])), element
    if name in ("first_arg", "num_args"):
        return _int_candidates(cur, rng, around(counts["args"]) + [M.MAX_STEP_ARGS, M.MAX_STEP_ARGS + 1]), element
    if name == "index" and sec == S.ARGS:
        kind = struct.unpack_from("<I", data, base)[0]
        table = {0: "tensors", 1: "slots", 2: "buffers", 3: "inputs", 4: "outputs"}.get(kind, "tensors")
        return _int_candidates(cur, rng, around(counts[table])), element
    if name in ("table", "tensor"):
        return _int_candidates(cur, rng, around(counts["tensors"])), element
    if name == "bank":
        return _int_candidates(cur, rng, around(counts["bank"])), element
    if name == "layer":
        return _int_candidates(cur, rng, around(counts["layers"]) + [M.NO_LAYER]), element
    if name == "offset":
        d_off, d_len = lay.offset(S.DATA), lay.count(S.DATA)
        arena = int(lay.header["arena_size"])
        return _int_candidates(cur, rng, [d_off, d_off + d_len, d_off + d_len - 64, lay.size, cur + 1, arena,
                                          arena - 64, 0]), element
    if name == "nbytes":
        return _int_candidates(cur, rng, [0, cur + 1, cur - 1, cur * 2, 1 << 62, (1 << 62) + 1]), element
    return _int_candidates(cur, rng), element


def _shape_pair(lay: Layout, data: bytes, sec: M.Section, index: int, rng: random.Random) -> list[Mutation]:
    """A *consistent* shape change (ndim, shape and nbytes agree), which gets past the size checks."""
    rec = M.SECTION_RECORDS[sec]
    base = lay.record_offset(sec, index)
    dtype = data[base + _field(rec, "dtype").offset]
    item = M.DTYPE_INFO[M.DType(dtype)][1] if dtype in M.DTYPE_INFO.keys() else 1
    ndim = rng.randrange(0, M.MAX_NDIM + 1)
    shape = [rng.choice([1, 2, 3, 4, 8, 16, 64, 256, 1 << 20]) for _ in range(ndim)]
    n = item
    for d in shape:
        n *= d
    out = [Mutation("record", "ndim", ndim, sec.name, index), Mutation("record", "shape", shape + [0] * (6 - ndim),
                                                                          sec.name, index)]
    if any(f.name == "nbytes" for f in rec.fields):
        out.append(Mutation("record", "nbytes", n, sec.name, index))
    return out


def random_mutant(data: bytes, rng: random.Random, names: Sequence[str] | None = None) -> list[Mutation]:
    """1-4 structure-aware mutations of ``data`` (a list of ``Mutation``)."""
    lay = Layout(data)
    n = rng.choices((1, 2, 3, 4), weights=(55, 25, 12, 8))[0]
    out: list[Mutation] = []
    present = [s for s in M.Section if s not in (M.Section.STRINGS, M.Section.METADATA, M.Section.DATA)
               and lay.records(s)]
    for _ in range(n):
        r = rng.random()
        if r < 0.06:                                            # header
            f = rng.choice([f for f in M.HEADER.fields if f.name not in ("magic",)])
            cur = lay.header[f.name]
            cur = cur[0] if isinstance(cur, tuple) else cur
            extra = [lay.size, lay.size - 1, lay.size + 64, M.HEADER.size + M.SECTION.size * len(lay.sections)]
            el = rng.randrange(f.count) if f.count > 1 else -1
            out.append(Mutation("header", f.name, _int_candidates(int(cur), rng, extra), element=el))
        elif r < 0.18:                                          # section table
            sec = rng.choice(list(M.Section))
            f = rng.choice(M.SECTION.fields)
            cur = int(lay.sections[sec][f.name]) if int(sec) < len(lay.sections) else 0
            others = [int(s["offset"]) for s in lay.sections] + [int(s["offset"]) + int(s["count"]) for s in
                                                                 lay.sections]
            out.append(Mutation("section", f.name, _int_candidates(cur, rng, others + [lay.size]), sec.name))
        elif r < 0.30 and names and lay.records(M.Section.KERNELS):   # a kernel name -> another symbol
            idx = rng.randrange(lay.records(M.Section.KERNELS))
            out.append(Mutation("string", "name", rng.choice(list(names)), "KERNELS", idx))
        elif r < 0.36 and present:                              # some other name rewritten
            sec = rng.choice([s for s in present if any(f.name in _STRING_FIELDS for f in M.SECTION_RECORDS[s].fields)]
                             or present)
            fields = [f for f in M.SECTION_RECORDS[sec].fields if f.name in _STRING_FIELDS]
            if not fields:
                continue
            text = rng.choice(["", "x", "op0", "\xff\xfe", "a" * 5000, "0" * 64, "f" * 63 + "g"])
            out.append(Mutation("string", rng.choice(fields).name, text, sec.name, rng.randrange(lay.records(sec))))
        elif r < 0.46 and any(lay.records(s) for s in (M.Section.TENSORS, M.Section.BUFFERS, M.Section.INPUTS,
                                                       M.Section.OUTPUTS)):
            secs = [s for s in (M.Section.TENSORS, M.Section.BUFFERS, M.Section.INPUTS, M.Section.OUTPUTS)
                    if lay.records(s)]
            sec = rng.choice(secs)
            out += _shape_pair(lay, data, sec, rng.randrange(lay.records(sec)), rng)
        elif present:                                           # any record field
            sec = rng.choice(present)
            idx = rng.randrange(lay.records(sec))
            f = rng.choice(M.SECTION_RECORDS[sec].fields)
            value, el = _record_value(lay, data, sec, idx, f, rng)
            out.append(Mutation("record", f.name, value, sec.name, idx, el))
    return out


def load_recipes(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Stored recipes: a JSON list of {"seed", "mutations": [Mutation.to_json()...], "why", "expect"?}."""
    try:
        recipes = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise QosError(f"cannot read fuzz recipes {path}: {e}") from None
    for r in recipes:
        r["mutations"] = [Mutation.from_json(m) for m in r["mutations"]]
    return recipes


# --------------------------------------------------------------------------- sanitizer builds
def _glue(workdir: Path, symbols: Sequence[str]) -> Path:
    from ..tvm.plan import glue_source

    p = workdir / "qos_linked_lookup.c"
    p.write_text(glue_source(symbols))
    return p


def _compiled_parts(out_dir: Path, workdir: Path) -> tuple[list[Path], list[str]]:
    """Sources and flags to link a compiled model's kernels.o with its kernel table (sanitized)."""
    from ..tvm import build as tvm_build

    kernels = M.read_manifest(out_dir / "model.qosm").kernels
    return ([*tvm_build.shim_sources(), _glue(workdir, kernels), out_dir / "kernels.o"],
            [f"-I{d}" for d in tvm_build.include_dirs()])


def build_recipe_runner(workdir: str | os.PathLike, compiled: str | os.PathLike | None = None,
                        cc: str | None = None) -> Path:
    """``runtime/fuzz/fuzz_recipes.c`` with ASan + UBSan: with the touching kernel (``compiled``
    None), else linked with the compiled model folder ``compiled`` (its kernels.o and kernel table)."""
    from .. import cbuild
    from . import build as B

    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    rd = B.runtime_dir()
    srcs = [rd / "fuzz" / "fuzz_recipes.c", *(rd / s for s in B.RUNTIME_SOURCES)]
    flags = [*B.CFLAGS, *SANITIZER_FLAGS, f"-I{rd}"]
    if compiled is None:
        srcs.append(rd / "tests" / "qos_touch_kernel.c")
        flags.append("-DQOS_FUZZ_TOUCH")
        name = "fuzz_recipes_touch"
    else:
        extra, inc = _compiled_parts(Path(compiled), wd)
        srcs += extra
        flags += inc
        name = "fuzz_recipes_model"
    return cbuild.compile_c(cbuild.find_compiler(cc), srcs, wd / name, flags=flags, ldflags=["-lpthread", "-lm"],
                            what=f"the sanitized {name}")


def build_sanitized_qos_run(compiled: str | os.PathLike, workdir: str | os.PathLike, cc: str | None = None) -> Path:
    """A compiled model's ``qos-run`` (runtime + qos_run_main.c + shim + kernel table + kernels.o),
    built with ASan + UBSan for this machine."""
    from .. import cbuild
    from . import build as B

    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    rd = B.runtime_dir()
    extra, inc = _compiled_parts(Path(compiled), wd)
    srcs = [rd / B.DRIVER_SOURCE, *(rd / s for s in B.RUNTIME_SOURCES), *extra]
    return cbuild.compile_c(cbuild.find_compiler(cc), srcs, wd / "qos-run-asan",
                            flags=[*B.CFLAGS, *SANITIZER_FLAGS, f"-I{rd}", *inc], ldflags=["-lpthread", "-lm"],
                            what="the sanitized qos-run")


# --------------------------------------------------------------------------- running
@dataclasses.dataclass
class MutantResult:
    open_rc: int
    run_rc: int
    message: str


@dataclasses.dataclass
class Finding(Exception):
    """A mutant that crashed, tripped a sanitizer or hung the runner."""

    index: int
    kind: str                 # "crash" | "hang" | "sanitizer"
    returncode: int
    log: str

    def __str__(self) -> str:
        return f"mutant {self.index}: {self.kind} (exit {self.returncode})\n{self.log[-4000:]}"


def run_mutants(runner: Path, base: bytes, mutants: Sequence[Sequence[tuple[int, bytes]]], workdir: Path,
                per_mutant_s: int = 10, timeout_s: float = 300.0) -> list[MutantResult]:
    """Run ``mutants`` (patch lists from ``patches``) through ``runner`` on ``base``. Raises
    ``Finding`` naming the first mutant that crashed, tripped a sanitizer or hung."""
    fd, base_name = tempfile.mkstemp(prefix="base_", suffix=".qosm", dir=workdir)
    os.close(fd)
    fd, pack_name = tempfile.mkstemp(prefix="mutants_", suffix=".bin", dir=workdir)
    os.close(fd)
    try:
        Path(base_name).write_bytes(base)
        with open(pack_name, "wb") as f:
            for ps in mutants:
                f.write(struct.pack("<I", len(ps)))
                for off, raw in ps:
                    f.write(struct.pack("<QI", off, len(raw)) + raw)
        env = {**os.environ, **SANITIZER_ENV}
        try:
            proc = subprocess.run([str(runner), base_name, pack_name, str(per_mutant_s)], capture_output=True,
                                  text=True, errors="replace", env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            begun = [ln for ln in out.splitlines() if ln.startswith("B ")]
            raise Finding(int(begun[-1].split()[1]) if begun else -1, "hang", -9, out[-2000:]) from None
    finally:
        for p in (base_name, pack_name):
            Path(p).unlink(missing_ok=True)
    results: list[MutantResult] = []
    last_begun = -1
    for ln in proc.stdout.splitlines():
        if ln.startswith("B "):
            last_begun = int(ln.split()[1])
        elif ln.startswith("R "):
            _r, _i, rc, run_rc, msg = (ln.split(" ", 4) + [""])[:5]
            results.append(MutantResult(int(rc), int(run_rc), msg))
    if proc.returncode != 0 or len(results) != len(mutants):
        kind = "hang" if proc.returncode == -14 else ("sanitizer" if "Sanitizer" in proc.stderr or
                                                     "runtime error" in proc.stderr else "crash")
        raise Finding(last_begun, kind, proc.returncode, proc.stderr[-6000:])
    return results
