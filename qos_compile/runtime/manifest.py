"""The ``.qosm`` manifest format: the ONE specification, plus a writer and a validating reader.

Everything the C runtime knows about the format comes from here:
``generate_c_header()`` emits ``runtime/qos_manifest_format.h`` and
``generate_markdown()`` emits ``docs/manifest.md`` (tests check both files equal
what this module generates; regenerate them with
``python -m qos_compile.runtime.manifest --write``).

A manifest is one little-endian file::

    header (64 B) | section table (24 B x num_sections) | sections ... | DATA (64-byte aligned tensors)

The pure-Python reader (``read_manifest``) applies exactly the checks of the C
loader (``runtime/qos_manifest.c``); a test feeds both the same corrupted files
and requires them to agree.
"""
from __future__ import annotations

import hashlib
import os
import struct
import zlib
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..atomic import write_bytes
from ..errors import QosError

__all__ = [
    "MAGIC", "VERSION_MAJOR", "VERSION_MINOR", "ALIGN", "MAX_NDIM", "DType", "ArgKind", "Role", "Section",
    "NO_LAYER", "Arg", "ManifestWriter", "Manifest", "ManifestError", "read_manifest", "checksum",
    "generate_c_header", "generate_markdown", "HEADER", "SECTION", "RECORDS", "SECTION_RECORDS",
]

# ----------------------------------------------------------------------------- constants
MAGIC = b"QOSM"
VERSION_MAJOR = 1
VERSION_MINOR = 0
ALIGN = 64                      # tensor data (file) and buffers (arena) start at multiples of this
TABLE_ALIGN = 8                 # every non-DATA section starts at a multiple of this
MAX_NDIM = 6
MAX_DIM = 2**31 - 1             # each shape entry is in [1, MAX_DIM]
MAX_NBYTES = 2**62              # shape product x element size must stay below this
MAX_STRING = 4096               # longest string, without its NUL
MAX_OPS = 1024
MAX_STEP_ARGS = 64
MAX_SECTIONS = 64
NO_LAYER = 0xFFFFFFFF           # slot.layer when the slot is not a layer's multiplier table
CHECKSUM_OFFSET = 24            # CRC-32 field inside the header (excluded from the checksum)
CHECKSUM_SIZE = 4


class DType(IntEnum):
    """Element types (codes in the file). DLPack: code kDLInt=0 / kDLUInt=1 / kDLFloat=2, bits, lanes 1."""
    INT8 = 1
    UINT8 = 2
    INT16 = 3
    INT32 = 4
    FLOAT32 = 5
    INT64 = 6      # the integer epilogue's per-OP offsets and clamp bounds (numerics contract v2)


# code -> (name, element size, DLPack type code, bits, numpy dtype)
DTYPE_INFO: dict[DType, tuple[str, int, int, int, str]] = {
    DType.INT8: ("int8", 1, 0, 8, "<i1"),
    DType.UINT8: ("uint8", 1, 1, 8, "<u1"),
    DType.INT16: ("int16", 2, 0, 16, "<i2"),
    DType.INT32: ("int32", 4, 0, 32, "<i4"),
    DType.FLOAT32: ("float32", 4, 2, 32, "<f4"),
    DType.INT64: ("int64", 8, 0, 64, "<i8"),
}


class ArgKind(IntEnum):
    """What a plan argument's ``index`` refers to."""
    CONST = 0    # tensor table entry (data in the file)
    SLOT = 1     # slot: tensor slot_tensor[op][index] for the OP read at the start of qos_run
    BUFFER = 2   # arena buffer
    INPUT = 3    # model input (the caller's memory, or an aligned staging copy)
    OUTPUT = 4   # model output (the caller's memory, or an aligned staging area copied out)


class Role(IntEnum):
    """What a tensor is for (the report's size breakdown; bank tables must be LUT)."""
    OTHER = 0
    WEIGHT = 1   # shared by every OP (weights, shared biases, constants)
    LUT = 2      # a multiplier table of the bank
    PER_OP = 3   # one OP's version of a per-OP tensor (BN-folded scale/shift, bias)


class Section(IntEnum):
    """Section ids = positions in the section table."""
    STRINGS = 0
    TENSORS = 1
    BANK = 2
    KERNELS = 3
    OPS = 4
    LAYERS = 5
    ASSIGN = 6
    SLOTS = 7
    SLOT_TENSORS = 8
    BUFFERS = 9
    STEPS = 10
    ARGS = 11
    INPUTS = 12
    OUTPUTS = 13
    METADATA = 14
    DATA = 15


SECTION_COUNT = len(Section)

# ----------------------------------------------------------------------------- record layouts
_TYPES = {"u8": ("B", 1, "uint8_t"), "u16": ("H", 2, "uint16_t"), "u32": ("I", 4, "uint32_t"),
          "u64": ("Q", 8, "uint64_t"), "i32": ("i", 4, "int32_t"), "i64": ("q", 8, "int64_t"),
          "f32": ("f", 4, "float"), "char": ("s", 1, "char")}


@dataclass(frozen=True)
class Field:
    name: str
    type: str
    count: int
    offset: int
    doc: str


class Record:
    """A fixed-size little-endian record; field offsets are natural (each field aligned to its size)."""

    def __init__(self, name: str, fields: Sequence[tuple], doc: str = ""):
        self.name, self.doc = name, doc
        out, off, fmt = [], 0, "<"
        for spec in fields:
            fname, ftype, count, fdoc = spec if len(spec) == 4 else (spec[0], spec[1], 1, spec[2])
            code, size, _ = _TYPES[ftype]
            if off % size:
                raise AssertionError(f"{name}.{fname} misaligned")
            out.append(Field(fname, ftype, count, off, fdoc))
            fmt += f"{count}s" if ftype == "char" else (f"{count}{code}" if count > 1 else code)
            off += size * count
        if off % 4 and off != 1:
            raise AssertionError(f"{name} size {off} not a multiple of 4")
        self.fields, self.size, self.struct = out, off, struct.Struct(fmt)
        assert self.struct.size == off, (name, self.struct.size, off)

    def unpack(self, buf: bytes | memoryview, offset: int = 0) -> dict[str, Any]:
        vals = list(self.struct.unpack_from(buf, offset))
        res: dict[str, Any] = {}
        for f in self.fields:
            if f.count > 1 and f.type != "char":
                res[f.name], vals = tuple(vals[:f.count]), vals[f.count:]
            else:
                res[f.name], vals = vals[0], vals[1:]
        return res

    def pack(self, **kw: Any) -> bytes:
        vals: list[Any] = []
        for f in self.fields:
            v = kw.get(f.name, 0 if f.type != "char" else b"")
            if f.count > 1 and f.type != "char":
                v = list(v) if v else []
                v = v + [0] * (f.count - len(v))
                vals.extend(v)
            else:
                vals.append(v)
        return self.struct.pack(*vals)


HEADER = Record("header", [
    ("magic", "char", 4, 'the 4 bytes "QOSM"'),
    ("version_major", "u16", "format major version; a reader accepts only its own"),
    ("version_minor", "u16", "minor version; newer minors only append sections (older readers skip them)"),
    ("header_size", "u32", "64 + 24 x num_sections: where the sections may start"),
    ("num_sections", "u32", f"entries of the section table ({SECTION_COUNT}..{MAX_SECTIONS})"),
    ("file_size", "u64", "total file length; must equal the bytes given (detects truncation)"),
    ("checksum", "u32", "CRC-32 (zlib / IEEE 802.3) of the whole file except these 4 bytes"),
    ("flags", "u32", "must be 0"),
    ("arena_size", "u64", "bytes of the arena holding all BUFFERS: 0 without buffers, else the "
                          "largest buffer end rounded up to 64"),
    ("reserved", "u64", 3, "must be 0"),
], "At offset 0.")

SECTION = Record("section", [
    ("offset", "u64", "absolute file offset of the first entry (0 when count is 0)"),
    ("count", "u64", "number of entries (bytes for STRINGS, METADATA, DATA)"),
    ("entry_size", "u32", "must equal the record size of this section id"),
    ("reserved", "u32", "must be 0"),
], "The section table follows the header: entry i describes section id i.")

BYTE = Record("byte", [("value", "u8", "one byte")], "")

TENSOR = Record("tensor", [
    ("name", "u32", "string"),
    ("dtype", "u8", "DType code"),
    ("ndim", "u8", f"0..{MAX_NDIM}"),
    ("role", "u16", "Role code"),
    ("offset", "u64", "absolute file offset of the data, a multiple of 64, inside DATA"),
    ("nbytes", "u64", "= product(shape) x element size"),
    ("shape", "i64", MAX_NDIM, f"dims [0, ndim) in 1..{MAX_DIM}; the rest 0"),
], "A constant tensor stored in the file.")

BANK = Record("bank", [
    ("name", "u32", "string, non-empty: the circuit's name"),
    ("sha256", "u32", "string: 64 lowercase hex digits, SHA-256 of the table as little-endian int32 (C order)"),
    ("table", "u32", "tensor id of its (256, 256) int32 or int16 table, role LUT; index [A][B], A = weight code"),
    ("power_mw", "f32", "power in mW, NaN when unknown"),
], "One multiplier circuit.")

KERNEL = Record("kernel", [
    ("name", "u32", "string, non-empty: the kernel's symbol, resolved only through the program's table of its "
                    "own kernels"),
    ("flags", "u32", "must be 0"),
], "A kernel function with TVM's packed ABI.")

OP = Record("op", [
    ("name", "u32", "string, non-empty, unique among OPs"),
    ("reserved", "u32", "must be 0"),
], "An operating point.")

LAYER = Record("layer", [
    ("name", "u32", "string"),
    ("reserved", "u32", "must be 0"),
], "An approximate layer (a column of assign).")

ASSIGN = Record("assign", [("bank", "u32", "bank index < bank count")],
                "num_ops x num_layers entries, row-major: assign[op][layer].")

SLOT = Record("slot", [
    ("name", "u32", "string"),
    ("layer", "u32", "NO_LAYER (0xFFFFFFFF), or the layer whose multiplier table this slot carries: then "
                     "slot_tensor[op][slot] must be bank[assign[op][layer]].table for every op"),
], "An argument whose tensor depends on the OP.")

SLOT_TENSOR = Record("slot_tensor", [("tensor", "u32", "tensor id")],
                     "num_ops x num_slots entries, row-major: slot_tensor[op][slot]. All OPs' tensors of one "
                     "slot have the same dtype, ndim and shape.")

BUFFER = Record("buffer", [
    ("name", "u32", "string"),
    ("dtype", "u8", "DType code"),
    ("ndim", "u8", f"0..{MAX_NDIM}"),
    ("reserved", "u16", "must be 0"),
    ("offset", "u64", "offset in the arena, a multiple of 64 (buffers may overlap: the compiler reuses memory)"),
    ("nbytes", "u64", "= product(shape) x element size; offset + nbytes <= arena_size"),
    ("shape", "i64", MAX_NDIM, f"dims [0, ndim) in 1..{MAX_DIM}; the rest 0"),
], "An intermediate tensor in the arena.")

STEP = Record("step", [
    ("kernel", "u32", "kernel id"),
    ("first_arg", "u32", "index of its first ARGS entry"),
    ("num_args", "u32", f"argument count, 0..{MAX_STEP_ARGS}; first_arg + num_args <= ARGS count"),
    ("reserved", "u32", "must be 0"),
], "One kernel call of the plan, in execution order.")

ARG = Record("arg", [
    ("kind", "u32", "ArgKind code"),
    ("index", "u32", "index into the table of that kind (tensors, slots, buffers, inputs, outputs)"),
], "One argument of a step (passed as a DLTensor*).")

IO = Record("io", [
    ("name", "u32", "string"),
    ("dtype", "u8", "DType code"),
    ("ndim", "u8", f"0..{MAX_NDIM}"),
    ("reserved", "u16", "must be 0"),
    ("scale", "f32", "quantization scale (information only; NaN when not quantized)"),
    ("zero_point", "i32", "quantization zero point (information only)"),
    ("nbytes", "u64", "= product(shape) x element size: the exact byte count qos_run expects"),
    ("shape", "i64", MAX_NDIM, f"dims [0, ndim) in 1..{MAX_DIM}; the rest 0"),
], "A model input or output. Every output must be an OUTPUT argument of some step.")

SECTION_RECORDS: dict[Section, Record] = {
    Section.STRINGS: BYTE, Section.TENSORS: TENSOR, Section.BANK: BANK, Section.KERNELS: KERNEL,
    Section.OPS: OP, Section.LAYERS: LAYER, Section.ASSIGN: ASSIGN, Section.SLOTS: SLOT,
    Section.SLOT_TENSORS: SLOT_TENSOR, Section.BUFFERS: BUFFER, Section.STEPS: STEP, Section.ARGS: ARG,
    Section.INPUTS: IO, Section.OUTPUTS: IO, Section.METADATA: BYTE, Section.DATA: BYTE,
}
SECTION_DOCS: dict[Section, str] = {
    Section.STRINGS: "NUL-terminated strings; a string is referenced by its byte offset here. Offset 0 is \"\" "
                     f"by convention. A reference must be inside and reach a NUL within {MAX_STRING} bytes.",
    Section.TENSORS: "tensor records", Section.BANK: "the multiplier bank",
    Section.KERNELS: "kernel symbol names", Section.OPS: f"operating points, 1..{MAX_OPS}",
    Section.LAYERS: "approximate layers", Section.ASSIGN: "assign[op][layer] -> bank index",
    Section.SLOTS: "OP-dependent arguments", Section.SLOT_TENSORS: "slot_tensor[op][slot] -> tensor id",
    Section.BUFFERS: "arena buffers", Section.STEPS: "the plan, at least one step",
    Section.ARGS: "step arguments", Section.INPUTS: "model inputs, at least one",
    Section.OUTPUTS: "model outputs, at least one",
    Section.METADATA: "free-form JSON text (UTF-8, no NUL needed); the runtime only hands it out",
    Section.DATA: "tensor data; offset a multiple of 64; conventionally last",
}
RECORDS = [HEADER, SECTION, TENSOR, BANK, KERNEL, OP, LAYER, ASSIGN, SLOT, SLOT_TENSOR, BUFFER, STEP, ARG, IO]
assert HEADER.size == 64 and SECTION.size == 24 and HEADER.fields[6].offset == CHECKSUM_OFFSET


def checksum(data: bytes | memoryview) -> int:
    """CRC-32 of a whole manifest, skipping the checksum field itself."""
    crc = zlib.crc32(data[:CHECKSUM_OFFSET])
    return zlib.crc32(data[CHECKSUM_OFFSET + CHECKSUM_SIZE:], crc) & 0xFFFFFFFF


def dtype_of(array_dtype: Any) -> DType:
    """The manifest DType of a numpy dtype (those of ``DTYPE_INFO``; any byte order)."""
    dt = np.dtype(array_dtype)
    for code, info in DTYPE_INFO.items():
        if np.dtype(info[4]).kind == dt.kind and np.dtype(info[4]).itemsize == dt.itemsize:
            return code
    names = ", ".join(info[0] for info in DTYPE_INFO.values())
    raise QosError(f"the manifest cannot store dtype {dt} (only {names})")


def numpy_dtype(code: int) -> np.dtype:
    return np.dtype(DTYPE_INFO[DType(code)][4])


# ----------------------------------------------------------------------------- writer
@dataclass(frozen=True)
class Arg:
    """One step argument: ``Arg.const(t)``, ``Arg.slot(s)``, ``Arg.buffer(b)``, ``Arg.input(i)``, ``Arg.output(o)``."""
    kind: ArgKind
    index: int

    @staticmethod
    def const(i: int) -> "Arg":
        return Arg(ArgKind.CONST, i)

    @staticmethod
    def slot(i: int) -> "Arg":
        return Arg(ArgKind.SLOT, i)

    @staticmethod
    def buffer(i: int) -> "Arg":
        return Arg(ArgKind.BUFFER, i)

    @staticmethod
    def input(i: int) -> "Arg":
        return Arg(ArgKind.INPUT, i)

    @staticmethod
    def output(i: int) -> "Arg":
        return Arg(ArgKind.OUTPUT, i)


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _shape_nbytes(dtype: DType, shape: Sequence[int]) -> int:
    n = DTYPE_INFO[dtype][1]
    for d in shape:
        n *= int(d)
    return n


def _check_shape(shape: Sequence[int], what: str) -> tuple[int, ...]:
    shape = tuple(int(d) for d in shape)
    if len(shape) > MAX_NDIM or any(not 1 <= d <= MAX_DIM for d in shape):
        raise QosError(f"{what}: shape {shape} not storable (ndim <= {MAX_NDIM}, dims 1..{MAX_DIM})")
    return shape


class ManifestWriter:
    """Builds a ``.qosm`` file. Indices returned by the ``add_*`` methods are what the plan refers to."""

    def __init__(self, dedupe: bool = True):
        self._strings = bytearray(b"\0")
        self._string_index: dict[bytes, int] = {b"": 0}
        self._tensors: list[dict[str, Any]] = []
        self._tensor_data: list[bytes] = []
        self._data_index: dict[bytes, int] = {}   # sha256 -> data slot (dedupe identical data)
        self._dedupe = dedupe
        self._bank: list[dict[str, Any]] = []
        self._kernels: list[str] = []
        self._ops: list[str] = []
        self._layers: list[str] = []
        self._assign: dict[tuple[int, int], int] = {}
        self._slots: list[dict[str, Any]] = []
        self._buffers: list[dict[str, Any]] = []
        self._arena_end = 0
        self._steps: list[tuple[int, list[Arg]]] = []
        self._inputs: list[dict[str, Any]] = []
        self._outputs: list[dict[str, Any]] = []
        self._metadata = b""

    # -- tables
    def add_string(self, s: str) -> int:
        b = s.encode("utf-8")
        if b"\0" in b or len(b) > MAX_STRING:
            raise QosError(f"string {s[:40]!r}... has a NUL or is longer than {MAX_STRING} bytes")
        if b not in self._string_index:
            self._string_index[b] = len(self._strings)
            self._strings += b + b"\0"
        return self._string_index[b]

    def add_tensor(self, name: str, array: Any, role: Role = Role.WEIGHT) -> int:
        arr = np.asarray(array)
        code = dtype_of(arr.dtype)
        shape = _check_shape(arr.shape, f"tensor {name!r}")
        data = np.ascontiguousarray(arr, dtype=DTYPE_INFO[code][4]).tobytes()
        key = hashlib.sha256(data).digest()
        if self._dedupe and key in self._data_index:
            slot = self._data_index[key]
        else:
            slot = len(self._tensor_data)
            self._tensor_data.append(data)
            self._data_index.setdefault(key, slot)
        self._tensors.append(dict(name=self.add_string(name), dtype=int(code), shape=shape, role=int(role),
                                  data=slot, nbytes=len(data)))
        return len(self._tensors) - 1

    def add_bank_entry(self, name: str, table: Any, sha256: str | None = None,
                       power_mw: float = float("nan"), dtype: Any = np.int32) -> int:
        """A multiplier circuit; its table is stored as a LUT tensor (int32, or int16 if asked)."""
        t = np.asarray(table)
        if t.shape != (256, 256):
            raise QosError(f"multiplier table {name!r} must have shape (256, 256), got {t.shape}")
        digest = hashlib.sha256(np.ascontiguousarray(t, dtype="<i4").tobytes()).hexdigest()
        if sha256 is not None and sha256 != digest:
            raise QosError(f"multiplier {name!r}: given sha256 {sha256[:12]}... does not match its table "
                           f"({digest[:12]}...)")
        stored = np.asarray(t, dtype=dtype)
        if not np.array_equal(stored.astype(np.int64), t.astype(np.int64)):
            raise QosError(f"multiplier table {name!r} does not fit {np.dtype(dtype)}")
        tid = self.add_tensor(f"bank/{name}", stored, Role.LUT)
        self._bank.append(dict(name=self.add_string(name), sha256=self.add_string(digest), table=tid,
                               power_mw=float(power_mw)))
        return len(self._bank) - 1

    def bank_table(self, bank: int) -> int:
        """Tensor id of a bank entry's table."""
        return self._bank[bank]["table"]

    def add_kernel(self, name: str) -> int:
        if not name:
            raise QosError("kernel names must not be empty")
        if name in self._kernels:
            return self._kernels.index(name)
        self.add_string(name)
        self._kernels.append(name)
        return len(self._kernels) - 1

    def add_op(self, name: str) -> int:
        if not name or name in self._ops:
            raise QosError(f"operating point names must be non-empty and unique: {name!r}")
        if len(self._ops) >= MAX_OPS:
            raise QosError(f"at most {MAX_OPS} operating points")
        self.add_string(name)
        self._ops.append(name)
        return len(self._ops) - 1

    def add_layer(self, name: str) -> int:
        self.add_string(name)
        self._layers.append(name)
        return len(self._layers) - 1

    def set_assign(self, op: int, layer: int, bank: int) -> None:
        self._assign[(op, layer)] = bank

    def set_assignment(self, assign: Sequence[Sequence[int]]) -> None:
        """``assign[op][layer] -> bank index`` for every OP and layer."""
        for op, row in enumerate(assign):
            for layer, bank in enumerate(row):
                self.set_assign(op, layer, int(bank))

    def add_slot(self, name: str, tensors: Sequence[int] | None = None, layer: int | None = None) -> int:
        """An OP-dependent argument: explicit per-OP tensor ids, or ``layer=`` (its table from assign)."""
        if (tensors is None) == (layer is None):
            raise QosError("add_slot needs exactly one of tensors= (one tensor id per OP) or layer=")
        self._slots.append(dict(name=self.add_string(name), layer=layer,
                                tensors=None if tensors is None else [int(t) for t in tensors]))
        return len(self._slots) - 1

    def add_per_op_tensor(self, name: str, arrays: Sequence[Any]) -> int:
        """Convenience: one PER_OP tensor per OP (``arrays[op]``) and the slot that selects them."""
        ids = [self.add_tensor(f"{name}@{self._ops[i] if i < len(self._ops) else i}", a, Role.PER_OP)
               for i, a in enumerate(arrays)]
        return self.add_slot(name, tensors=ids)

    def add_buffer(self, name: str, dtype: Any, shape: Sequence[int], offset: int | None = None) -> int:
        """An arena buffer; ``offset`` defaults to the next free 64-byte boundary (no reuse)."""
        code = DType(dtype) if isinstance(dtype, (int, DType)) and not isinstance(dtype, np.dtype) \
            else dtype_of(dtype)
        shape = _check_shape(shape, f"buffer {name!r}")
        nbytes = _shape_nbytes(code, shape)
        if offset is None:
            offset = _align(self._arena_end, ALIGN)
        if offset % ALIGN:
            raise QosError(f"buffer {name!r}: offset {offset} is not a multiple of {ALIGN}")
        self._arena_end = max(self._arena_end, offset + nbytes)
        self._buffers.append(dict(name=self.add_string(name), dtype=int(code), ndim=len(shape), shape=shape,
                                  offset=offset, nbytes=nbytes))
        return len(self._buffers) - 1

    def _io(self, name: str, dtype: Any, shape: Sequence[int], scale: float, zero_point: int) -> dict:
        code = DType(dtype) if isinstance(dtype, (int, DType)) and not isinstance(dtype, np.dtype) \
            else dtype_of(dtype)
        shape = _check_shape(shape, f"input/output {name!r}")
        return dict(name=self.add_string(name), dtype=int(code), ndim=len(shape), shape=shape,
                    nbytes=_shape_nbytes(code, shape),
                    scale=float(scale), zero_point=int(zero_point))

    def add_input(self, name: str, dtype: Any, shape: Sequence[int], scale: float = float("nan"),
                  zero_point: int = 0) -> int:
        self._inputs.append(self._io(name, dtype, shape, scale, zero_point))
        return len(self._inputs) - 1

    def add_output(self, name: str, dtype: Any, shape: Sequence[int], scale: float = float("nan"),
                   zero_point: int = 0) -> int:
        self._outputs.append(self._io(name, dtype, shape, scale, zero_point))
        return len(self._outputs) - 1

    def add_step(self, kernel: str | int, args: Iterable[Arg | tuple[int, int]]) -> int:
        kid = self.add_kernel(kernel) if isinstance(kernel, str) else int(kernel)
        lst = [a if isinstance(a, Arg) else Arg(ArgKind(a[0]), int(a[1])) for a in args]
        if len(lst) > MAX_STEP_ARGS:
            raise QosError(f"a step has at most {MAX_STEP_ARGS} arguments")
        self._steps.append((kid, lst))
        return len(self._steps) - 1

    def set_metadata(self, meta: Any) -> None:
        """Free-form metadata: a dict/list (stored as JSON), str or bytes."""
        import json

        if isinstance(meta, bytes):
            self._metadata = meta
        elif isinstance(meta, str):
            self._metadata = meta.encode("utf-8")
        else:
            self._metadata = json.dumps(meta, sort_keys=True, allow_nan=False).encode("utf-8")

    # -- output
    def to_bytes(self) -> bytes:
        nops, nlayers = len(self._ops), len(self._layers)
        if nops < 1:
            raise QosError("a manifest needs at least one operating point")
        assign = []
        for op in range(nops):
            for layer in range(nlayers):
                if (op, layer) not in self._assign:
                    raise QosError(f"assign[{op}][{layer}] is not set")
                assign.append(self._assign[(op, layer)])
        slot_rows: list[list[int]] = [[0] * len(self._slots) for _ in range(nops)]
        slots = []
        for s, slot in enumerate(self._slots):
            if slot["layer"] is not None:
                tens = [self._bank[assign[op * nlayers + slot["layer"]]]["table"] for op in range(nops)]
            else:
                tens = slot["tensors"]
                if len(tens) != nops:
                    raise QosError(f"slot {s} has {len(tens)} tensors for {nops} operating points")
            for op in range(nops):
                slot_rows[op][s] = tens[op]
            slots.append(dict(name=slot["name"], layer=NO_LAYER if slot["layer"] is None else slot["layer"]))

        kernel_recs = [KERNEL.pack(name=self.add_string(k)) for k in self._kernels]
        op_recs = [OP.pack(name=self.add_string(o)) for o in self._ops]
        layer_recs = [LAYER.pack(name=self.add_string(n)) for n in self._layers]
        steps, args = [], []
        for kid, lst in self._steps:
            steps.append(STEP.pack(kernel=kid, first_arg=len(args), num_args=len(lst)))
            args.extend(ARG.pack(kind=int(a.kind), index=a.index) for a in lst)

        bodies: dict[Section, tuple[bytes, int]] = {
            Section.STRINGS: (bytes(self._strings), len(self._strings)),
            Section.BANK: (b"".join(BANK.pack(**b) for b in self._bank), len(self._bank)),
            Section.KERNELS: (b"".join(kernel_recs), len(kernel_recs)),
            Section.OPS: (b"".join(op_recs), len(op_recs)),
            Section.LAYERS: (b"".join(layer_recs), len(layer_recs)),
            Section.ASSIGN: (b"".join(ASSIGN.pack(bank=b) for b in assign), len(assign)),
            Section.SLOTS: (b"".join(SLOT.pack(**s) for s in slots), len(slots)),
            Section.SLOT_TENSORS: (b"".join(SLOT_TENSOR.pack(tensor=t) for row in slot_rows for t in row),
                                   nops * len(slots)),
            Section.BUFFERS: (b"".join(BUFFER.pack(**b) for b in self._buffers), len(self._buffers)),
            Section.STEPS: (b"".join(steps), len(steps)),
            Section.ARGS: (b"".join(args), len(args)),
            Section.INPUTS: (b"".join(IO.pack(**i) for i in self._inputs), len(self._inputs)),
            Section.OUTPUTS: (b"".join(IO.pack(**o) for o in self._outputs), len(self._outputs)),
            Section.METADATA: (self._metadata, len(self._metadata)),
        }
        header_size = HEADER.size + SECTION.size * SECTION_COUNT
        # the tensor table needs the data offsets, which need the table sizes: lay out tables first
        pos = header_size
        table_size = len(self._tensors) * TENSOR.size
        order = [Section.STRINGS, Section.TENSORS] + [s for s in Section if s not in
                                                         (Section.STRINGS, Section.TENSORS, Section.DATA)]
        offsets: dict[Section, int] = {}
        for sec in order:
            size = table_size if sec == Section.TENSORS else len(bodies[sec][0])
            if size:
                pos = _align(pos, TABLE_ALIGN)
                offsets[sec] = pos
                pos += size
        data_start = _align(pos, ALIGN)
        data_offsets, dpos = [], data_start
        for blob in self._tensor_data:
            dpos = _align(dpos, ALIGN)
            data_offsets.append(dpos)
            dpos += len(blob)
        tensor_recs = [TENSOR.pack(name=t["name"], dtype=t["dtype"], ndim=len(t["shape"]), role=t["role"],
                                   offset=data_offsets[t["data"]], nbytes=t["nbytes"], shape=t["shape"])
                       for t in self._tensors]
        bodies[Section.TENSORS] = (b"".join(tensor_recs), len(tensor_recs))
        data = bytearray()
        for off, blob in zip(data_offsets, self._tensor_data):
            data += b"\0" * (off - data_start - len(data)) + blob
        bodies[Section.DATA] = (bytes(data), len(data))
        if data:
            offsets[Section.DATA] = data_start
        file_size = data_start + len(data) if data else pos
        out = bytearray(file_size)
        table = b""
        for sec in Section:
            body, count = bodies[sec]
            off = offsets.get(sec, 0) if body else 0
            out[off:off + len(body)] = body
            table += SECTION.pack(offset=off, count=count, entry_size=SECTION_RECORDS[sec].size)
        arena = _align(self._arena_end, ALIGN) if self._buffers else 0
        out[:HEADER.size] = HEADER.pack(magic=MAGIC, version_major=VERSION_MAJOR, version_minor=VERSION_MINOR,
                                        header_size=header_size, num_sections=SECTION_COUNT,
                                        file_size=file_size, checksum=0, arena_size=arena)
        out[HEADER.size:header_size] = table
        struct.pack_into("<I", out, CHECKSUM_OFFSET, checksum(out))
        data_bytes = bytes(out)
        read_manifest(data_bytes)  # the writer never emits a file its own reader rejects
        return data_bytes

    def write(self, path: str | os.PathLike) -> Path:
        """Write atomically (``qos_compile.atomic``: temporary file in the same folder, then rename)."""
        path = Path(path)
        data = self.to_bytes()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(path, data)
        return path


# ----------------------------------------------------------------------------- reader
class ManifestError(QosError):
    """A malformed manifest. ``code`` is "format", "version" or "checksum" (as the C loader's error codes)."""

    def __init__(self, message: str, code: str = "format"):
        super().__init__(message)
        self.code = code


@dataclass
class TensorInfo:
    name: str
    dtype: DType
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0          # file offset (tensors) or arena offset (buffers)
    role: Role = Role.OTHER
    scale: float = float("nan")
    zero_point: int = 0

    @property
    def numpy_dtype(self) -> np.dtype:
        return numpy_dtype(self.dtype)


@dataclass
class BankEntry:
    name: str
    sha256: str
    table: int
    power_mw: float


@dataclass
class SlotInfo:
    name: str
    layer: int | None
    tensors: list[int]       # per OP


@dataclass
class Step:
    kernel: int
    args: list[Arg]


@dataclass
class Manifest:
    version: tuple[int, int]
    file_size: int
    arena_size: int
    tensors: list[TensorInfo]
    bank: list[BankEntry]
    kernels: list[str]
    ops: list[str]
    layers: list[str]
    assign: list[list[int]]
    slots: list[SlotInfo]
    buffers: list[TensorInfo]
    steps: list[Step]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    metadata: bytes
    sections: dict[int, tuple[int, int]]     # section id -> (offset, byte size)
    raw: bytes = field(repr=False, default=b"")

    def tensor_data(self, tid: int) -> np.ndarray:
        t = self.tensors[tid]
        return np.frombuffer(self.raw, dtype=t.numpy_dtype, count=t.nbytes // DTYPE_INFO[t.dtype][1],
                             offset=t.offset).reshape(t.shape)

    def metadata_json(self) -> Any:
        import json

        return json.loads(self.metadata.decode("utf-8")) if self.metadata else None

    def size_breakdown(self) -> dict[str, int]:
        """Bytes by purpose (for report.json). Tensors sharing data are counted once, under their first role."""
        out = {"file": self.file_size, "weights": 0, "tables": 0, "per_op": 0, "other_tensors": 0,
               "plan": 0, "strings": 0, "metadata": len(self.metadata), "arena": self.arena_size}
        key = {Role.WEIGHT: "weights", Role.LUT: "tables", Role.PER_OP: "per_op", Role.OTHER: "other_tensors"}
        seen: set[tuple[int, int]] = set()
        for t in self.tensors:
            if (t.offset, t.nbytes) not in seen:
                seen.add((t.offset, t.nbytes))
                out[key[t.role]] += t.nbytes
        for sec in (Section.STEPS, Section.ARGS, Section.SLOTS, Section.SLOT_TENSORS, Section.ASSIGN,
                    Section.BUFFERS, Section.KERNELS, Section.OPS, Section.LAYERS, Section.BANK,
                    Section.INPUTS, Section.OUTPUTS, Section.TENSORS):
            out["plan"] += self.sections[int(sec)][1]
        out["strings"] = self.sections[int(Section.STRINGS)][1]
        out["per_op_each"] = out["per_op"] // max(1, len(self.ops))
        return out


def _fail(msg: str, code: str = "format") -> None:
    raise ManifestError(msg, code)


def _printable(raw: bytes, limit: int = 64) -> str:
    """A name from the file, for an error message, exactly as the C loader shows it: printable ASCII
    kept, every other byte '?', at most ``limit`` characters (then "...")."""
    shown = "".join(chr(c) if 0x20 <= c <= 0x7E else "?" for c in raw[:limit])
    return shown + ("..." if len(raw) > limit else "")


def _mul_limit(a: int, b: int, limit: int) -> int | None:
    """a * b if it is <= limit (the C side's overflow-safe multiply), else None."""
    if a and b > limit // a:
        return None
    return a * b


def read_manifest(src: str | os.PathLike | bytes | bytearray | memoryview) -> Manifest:
    """Parse and validate a manifest with the same rules as the C loader; raise ManifestError if bad."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        buf = bytes(src)
    else:
        try:
            buf = Path(src).read_bytes()
        except OSError as exc:
            raise ManifestError(f"cannot read {src}: {exc.strerror or exc}", "io") from exc
    n = len(buf)
    if n < HEADER.size:
        _fail(f"file too short for a manifest header ({n} < {HEADER.size} bytes)")
    h = HEADER.unpack(buf)
    if h["magic"] != MAGIC:
        _fail("not a qos manifest (bad magic)")
    if h["version_major"] != VERSION_MAJOR:
        _fail(f"unsupported manifest version {h['version_major']}.{h['version_minor']} "
              f"(this runtime reads {VERSION_MAJOR}.x)", "version")
    if h["file_size"] != n:
        _fail(f"file size mismatch: header says {h['file_size']} bytes, got {n} (truncated or padded?)")
    ns = h["num_sections"]
    if ns < SECTION_COUNT or ns > MAX_SECTIONS:
        _fail(f"bad section count {ns} (expected {SECTION_COUNT}..{MAX_SECTIONS})")
    if h["header_size"] != HEADER.size + SECTION.size * ns or h["header_size"] > n:
        _fail(f"bad header size {h['header_size']}")
    if h["flags"] != 0 or any(h["reserved"]):
        _fail("reserved header fields are not zero")
    if checksum(buf) != h["checksum"]:
        _fail("checksum mismatch (file corrupted)", "checksum")

    hs = h["header_size"]
    sections: dict[int, tuple[int, int]] = {}
    for i in range(ns):
        s = SECTION.unpack(buf, HEADER.size + SECTION.size * i)
        if s["reserved"]:
            _fail(f"section {i}: reserved field is not zero")
        if i < SECTION_COUNT and s["entry_size"] != SECTION_RECORDS[Section(i)].size:
            _fail(f"section {Section(i).name.lower()}: entry size {s['entry_size']} "
                  f"(expected {SECTION_RECORDS[Section(i)].size})")
        size = _mul_limit(s["count"], s["entry_size"], n)
        if size is None:
            _fail(f"section {i}: {s['count']} entries do not fit the file")
        if size == 0:
            if s["offset"] != 0:
                _fail(f"section {i}: empty but offset {s['offset']} is not 0")
        else:
            if s["offset"] < hs or s["offset"] > n - size:
                _fail(f"section {i}: bytes [{s['offset']}, +{size}) outside the file body [{hs}, {n})")
            align = ALIGN if i == Section.DATA else TABLE_ALIGN
            if s["offset"] % align:
                _fail(f"section {i}: offset {s['offset']} not a multiple of {align}")
        sections[i] = (s["offset"], size)
    ranges = sorted((o, sz, i) for i, (o, sz) in sections.items() if sz)
    for (o1, s1, i1), (o2, _s2, i2) in zip(ranges, ranges[1:]):
        if o1 + s1 > o2:
            _fail(f"sections {i1} and {i2} overlap")

    def count(sec: Section) -> int:
        return sections[int(sec)][1] // SECTION_RECORDS[sec].size

    def recs(sec: Section) -> list[dict[str, Any]]:
        off, _ = sections[int(sec)]
        rec = SECTION_RECORDS[sec]
        return [rec.unpack(buf, off + k * rec.size) for k in range(count(sec))]

    str_off, str_size = sections[int(Section.STRINGS)]

    def string(ref: int, what: str, nonempty: bool = False) -> str:
        if ref >= str_size:
            _fail(f"{what}: string offset {ref} outside the string table ({str_size} bytes)")
        window = buf[str_off + ref: str_off + min(str_size, ref + MAX_STRING + 1)]
        end = window.find(b"\0")
        if end < 0:
            _fail(f"{what}: string at {ref} is not NUL-terminated within {MAX_STRING} bytes")
        if nonempty and end == 0:
            _fail(f"{what}: empty name")
        return window[:end].decode("utf-8", "replace")

    def raw_string(ref: int) -> bytes:
        """The bytes of a string already checked by ``string`` (for messages shown like the C loader's)."""
        return bytes(buf[str_off + ref:str_off + min(str_size, ref + MAX_STRING + 1)]).split(b"\0", 1)[0]

    def shape_of(r: dict[str, Any], what: str) -> tuple[DType, tuple[int, ...], int]:
        if r["dtype"] not in DTYPE_INFO.keys():
            _fail(f"{what}: bad dtype code {r['dtype']}")
        if r["ndim"] > MAX_NDIM:
            _fail(f"{what}: ndim {r['ndim']} > {MAX_NDIM}")
        nd, shp = r["ndim"], r["shape"]
        prod = DTYPE_INFO[DType(r["dtype"])][1]
        for d in range(MAX_NDIM):
            if d < nd:
                if not 1 <= shp[d] <= MAX_DIM:
                    _fail(f"{what}: dim {d} = {shp[d]} outside 1..{MAX_DIM}")
                p = _mul_limit(prod, shp[d], MAX_NBYTES)
                if p is None:
                    _fail(f"{what}: shape too large")
                prod = p
            elif shp[d] != 0:
                _fail(f"{what}: unused dim {d} is not 0")
        if r["nbytes"] != prod:
            _fail(f"{what}: nbytes {r['nbytes']} != shape x element size = {prod}")
        return DType(r["dtype"]), tuple(shp[:nd]), prod

    d_off, d_size = sections[int(Section.DATA)]
    tensors: list[TensorInfo] = []
    for k, r in enumerate(recs(Section.TENSORS)):
        what = f"tensor {k}"
        name = string(r["name"], what)
        dt, shp, nb = shape_of(r, what)
        if r["role"] >= len(Role):
            _fail(f"{what}: bad role {r['role']}")
        if r["offset"] % ALIGN:
            _fail(f"{what}: data offset {r['offset']} not a multiple of {ALIGN}")
        if r["offset"] < d_off or r["offset"] - d_off > d_size or nb > d_size - (r["offset"] - d_off):
            _fail(f"{what}: data [{r['offset']}, +{nb}) outside the data section")
        tensors.append(TensorInfo(name, dt, shp, nb, r["offset"], Role(r["role"])))
    if len(tensors) > 0xFFFFFFFF:
        _fail("too many tensors")

    bank: list[BankEntry] = []
    for k, r in enumerate(recs(Section.BANK)):
        what = f"bank entry {k}"
        name = string(r["name"], what, nonempty=True)
        sha = string(r["sha256"], what + " sha256")
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            _fail(f"{what}: sha256 is not 64 lowercase hex digits")
        if r["table"] >= len(tensors):
            _fail(f"{what}: table tensor {r['table']} out of range")
        t = tensors[r["table"]]
        if t.dtype not in (DType.INT32, DType.INT16) or t.shape != (256, 256) or t.role != Role.LUT:
            _fail(f"{what}: table must be a (256, 256) int32/int16 tensor with role LUT")
        # The hash names the circuit (report, bank, emulation): a table changed after compilation with the
        # CRC recomputed is refused. Hashed as little-endian int32 (int16 tables widened), like
        # add_bank_entry and the C loader; one hash of 256 KiB per bank entry at load (hashlib ~0.2 ms,
        # the C loader's portable code ~1.3 ms on an x86-64 core).
        if t.dtype == DType.INT32:
            cells = memoryview(buf)[t.offset:t.offset + t.nbytes]
        else:
            cells = np.frombuffer(buf, dtype="<i2", count=256 * 256, offset=t.offset).astype("<i4").tobytes()
        if hashlib.sha256(cells).hexdigest() != sha:
            _fail(f"{what} ({_printable(raw_string(r['name']))}): table does not match its sha256")
        bank.append(BankEntry(name, sha, r["table"], r["power_mw"]))

    kernels = []
    for k, r in enumerate(recs(Section.KERNELS)):
        kernels.append(string(r["name"], f"kernel {k}", nonempty=True))
        if r["flags"]:
            _fail(f"kernel {k}: flags are not zero")
    ops = []
    if not 1 <= count(Section.OPS) <= MAX_OPS:
        _fail(f"operating point count {count(Section.OPS)} outside 1..{MAX_OPS}")
    for k, r in enumerate(recs(Section.OPS)):
        name = string(r["name"], f"operating point {k}", nonempty=True)
        if r["reserved"]:
            _fail(f"operating point {k}: reserved field is not zero")
        if name in ops:
            _fail(f"operating point {k}: duplicate name '{_printable(raw_string(r['name']))}'")
        ops.append(name)
    layers = []
    for k, r in enumerate(recs(Section.LAYERS)):
        layers.append(string(r["name"], f"layer {k}"))
        if r["reserved"]:
            _fail(f"layer {k}: reserved field is not zero")
    nops, nl = len(ops), len(layers)
    if count(Section.ASSIGN) != nops * nl:
        _fail(f"assign has {count(Section.ASSIGN)} entries, expected {nops} x {nl}")
    flat = [r["bank"] for r in recs(Section.ASSIGN)]
    for k, b in enumerate(flat):
        if b >= len(bank):
            _fail(f"assign[{k // max(nl, 1)}][{k % max(nl, 1)}] = {b}: bank index out of range")
    assign = [flat[op * nl:(op + 1) * nl] for op in range(nops)]

    slot_recs = recs(Section.SLOTS)
    nslots = len(slot_recs)
    if count(Section.SLOT_TENSORS) != nops * nslots:
        _fail(f"slot tensor table has {count(Section.SLOT_TENSORS)} entries, expected {nops} x {nslots}")
    st = [r["tensor"] for r in recs(Section.SLOT_TENSORS)]
    slots: list[SlotInfo] = []
    for s, r in enumerate(slot_recs):
        what = f"slot {s}"
        name = string(r["name"], what)
        layer = r["layer"]
        if layer != NO_LAYER and layer >= nl:
            _fail(f"{what}: layer {layer} out of range")
        per_op = []
        for op in range(nops):
            t = st[op * nslots + s]
            if t >= len(tensors):
                _fail(f"{what}, operating point {op}: tensor {t} out of range")
            ref, cur = tensors[st[s]], tensors[t]
            if (cur.dtype, cur.shape) != (ref.dtype, ref.shape):
                _fail(f"{what}: operating point {op}'s tensor differs in dtype/shape from operating point 0's")
            if layer != NO_LAYER and t != bank[assign[op][layer]].table:
                _fail(f"{what}: operating point {op}'s tensor is not the table of assign[{op}][{layer}]")
            per_op.append(t)
        slots.append(SlotInfo(name, None if layer == NO_LAYER else layer, per_op))

    arena = h["arena_size"]
    buffers: list[TensorInfo] = []
    end = 0
    for k, r in enumerate(recs(Section.BUFFERS)):
        what = f"buffer {k}"
        name = string(r["name"], what)
        if r["reserved"]:
            _fail(f"{what}: reserved field is not zero")
        dt, shp, nb = shape_of(r, what)
        if r["offset"] % ALIGN:
            _fail(f"{what}: arena offset {r['offset']} not a multiple of {ALIGN}")
        if r["offset"] > arena or nb > arena - r["offset"]:
            _fail(f"{what}: [{r['offset']}, +{nb}) outside the arena ({arena} bytes)")
        end = max(end, r["offset"] + nb)
        buffers.append(TensorInfo(name, dt, shp, nb, r["offset"]))
    if arena != _align(end, ALIGN):
        _fail(f"arena size {arena} is not the buffers' extent rounded up to {ALIGN} ({_align(end, ALIGN)})")

    ios: dict[Section, list[TensorInfo]] = {}
    for sec in (Section.INPUTS, Section.OUTPUTS):
        lst = []
        for k, r in enumerate(recs(sec)):
            what = f"{sec.name.lower()[:-1]} {k}"
            name = string(r["name"], what)
            if r["reserved"]:
                _fail(f"{what}: reserved field is not zero")
            dt, shp, nb = shape_of(r, what)
            lst.append(TensorInfo(name, dt, shp, nb, 0, Role.OTHER, r["scale"], r["zero_point"]))
        if not lst:
            _fail(f"the model has no {sec.name.lower()}")
        ios[sec] = lst

    nargs = count(Section.ARGS)
    limits = {ArgKind.CONST: len(tensors), ArgKind.SLOT: nslots, ArgKind.BUFFER: len(buffers),
              ArgKind.INPUT: len(ios[Section.INPUTS]), ArgKind.OUTPUT: len(ios[Section.OUTPUTS])}
    args: list[Arg] = []
    for k, r in enumerate(recs(Section.ARGS)):
        if r["kind"] >= len(ArgKind):
            _fail(f"argument {k}: bad kind {r['kind']}")
        kind = ArgKind(r["kind"])
        if r["index"] >= limits[kind]:
            _fail(f"argument {k}: {kind.name.lower()} index {r['index']} out of range ({limits[kind]})")
        args.append(Arg(kind, r["index"]))
    steps: list[Step] = []
    if count(Section.STEPS) < 1:
        _fail("the plan has no steps")
    written = set()
    for k, r in enumerate(recs(Section.STEPS)):
        if r["kernel"] >= len(kernels):
            _fail(f"step {k}: kernel {r['kernel']} out of range")
        if r["num_args"] > MAX_STEP_ARGS or r["first_arg"] > nargs or r["num_args"] > nargs - r["first_arg"]:
            _fail(f"step {k}: arguments [{r['first_arg']}, +{r['num_args']}) out of range ({nargs})")
        if r["reserved"]:
            _fail(f"step {k}: reserved field is not zero")
        a = args[r["first_arg"]:r["first_arg"] + r["num_args"]]
        written.update(x.index for x in a if x.kind == ArgKind.OUTPUT)
        steps.append(Step(r["kernel"], a))
    for k in range(len(ios[Section.OUTPUTS])):
        if k not in written:
            _fail(f"output {k} is not an argument of any step")

    m_off, m_size = sections[int(Section.METADATA)]
    return Manifest(version=(h["version_major"], h["version_minor"]), file_size=n, arena_size=arena,
                    tensors=tensors, bank=bank, kernels=kernels, ops=ops, layers=layers, assign=assign,
                    slots=slots, buffers=buffers, steps=steps, inputs=ios[Section.INPUTS],
                    outputs=ios[Section.OUTPUTS], metadata=buf[m_off:m_off + m_size], sections=sections, raw=buf)


# ----------------------------------------------------------------------------- C header + docs
def _c_field_comment(text: str) -> str:
    return text.replace("*/", "* /")


def generate_c_header() -> str:
    """The text of ``runtime/qos_manifest_format.h``."""
    L = ["/* qos_manifest_format.h -- GENERATED by qos_compile/runtime/manifest.py (generate_c_header).",
         " * Do not edit: run `python -m qos_compile.runtime.manifest --write` after changing the spec.",
         " * All multi-byte fields are little-endian. QOSM_<RECORD>_SIZE is a record's size and",
         " * QOSM_OFF_<RECORD>_<FIELD> a field's byte offset inside it. */",
         "#ifndef QOS_MANIFEST_FORMAT_H", "#define QOS_MANIFEST_FORMAT_H", "",
         f'#define QOSM_MAGIC "{MAGIC.decode()}"',
         f"#define QOSM_VERSION_MAJOR {VERSION_MAJOR}",
         f"#define QOSM_VERSION_MINOR {VERSION_MINOR}",
         f"#define QOSM_ALIGN {ALIGN}",
         f"#define QOSM_TABLE_ALIGN {TABLE_ALIGN}",
         f"#define QOSM_MAX_NDIM {MAX_NDIM}",
         f"#define QOSM_MAX_DIM {MAX_DIM}LL",
         f"#define QOSM_MAX_NBYTES {MAX_NBYTES}ULL",
         f"#define QOSM_MAX_STRING {MAX_STRING}",
         f"#define QOSM_MAX_OPS {MAX_OPS}",
         f"#define QOSM_MAX_STEP_ARGS {MAX_STEP_ARGS}",
         f"#define QOSM_MAX_SECTIONS {MAX_SECTIONS}",
         f"#define QOSM_NO_LAYER 0x{NO_LAYER:08X}u",
         f"#define QOSM_CHECKSUM_OFFSET {CHECKSUM_OFFSET}",
         f"#define QOSM_CHECKSUM_SIZE {CHECKSUM_SIZE}", "",
         "/* element types */"]
    for code, info in DTYPE_INFO.items():
        L.append(f"#define QOSM_DTYPE_{code.name} {int(code)}")
    L.append(f"#define QOSM_DTYPE_MAX {max(int(c) for c in DType)}")
    sizes = ["0"] * (max(int(c) for c in DType) + 1)
    dl = list(sizes)
    bits = list(sizes)
    names = ['"?"'] * len(sizes)
    for code, (nm, sz, dlc, b, _np) in DTYPE_INFO.items():
        sizes[code], dl[code], bits[code], names[code] = str(sz), str(dlc), str(b), f'"{nm}"'
    L += ["/* indexed by dtype code (index 0 unused) */",
          f"#define QOSM_DTYPE_SIZES {{{', '.join(sizes)}}}",
          f"#define QOSM_DTYPE_DL_CODES {{{', '.join(dl)}}}",
          f"#define QOSM_DTYPE_BITS {{{', '.join(bits)}}}",
          f"#define QOSM_DTYPE_NAMES {{{', '.join(names)}}}", "", "/* plan argument kinds */"]
    for k in ArgKind:
        L.append(f"#define QOSM_ARG_{k.name} {int(k)}")
    L += [f"#define QOSM_ARG_COUNT {len(ArgKind)}", "", "/* tensor roles */"]
    for r in Role:
        L.append(f"#define QOSM_ROLE_{r.name} {int(r)}")
    L += [f"#define QOSM_ROLE_COUNT {len(Role)}", "", "/* sections (index into the section table) */"]
    for s in Section:
        L.append(f"#define QOSM_SEC_{s.name} {int(s)}")
    L += [f"#define QOSM_SEC_COUNT {SECTION_COUNT}",
          f"#define QOSM_SEC_ENTRY_SIZES {{{', '.join(str(SECTION_RECORDS[s].size) for s in Section)}}}",
          f"#define QOSM_SEC_NAMES {{{', '.join(chr(34) + s.name.lower() + chr(34) for s in Section)}}}", ""]
    for rec in RECORDS:
        up = rec.name.upper()
        L.append(f"/* {rec.name} record: {_c_field_comment(rec.doc) or ''} */".replace(":  */", " */"))
        L.append(f"#define QOSM_{up}_SIZE {rec.size}")
        for f in rec.fields:
            arr = f"[{f.count}]" if f.count > 1 else ""
            L.append(f"#define QOSM_OFF_{up}_{f.name.upper()} {f.offset}  /* {_TYPES[f.type][2]}{arr}: "
                     f"{_c_field_comment(f.doc)} */")
        L.append("")
    L += ["#endif /* QOS_MANIFEST_FORMAT_H */", ""]
    return "\n".join(L)


def generate_markdown() -> str:
    """The text of ``docs/manifest.md``."""
    L = ["# The `.qosm` manifest format", "",
         "<!-- GENERATED by qos_compile/runtime/manifest.py (generate_markdown); do not edit. "
         "Regenerate: python -m qos_compile.runtime.manifest --write -->", "",
         f"Version {VERSION_MAJOR}.{VERSION_MINOR}. One little-endian file that the C runtime "
         "(`runtime/`) loads and executes: the network's constant tensors, the multiplier bank, the "
         "operating points (OPs), the per-OP tensor slots, the arena buffers and the execution plan (a list of "
         "kernel calls with TVM's packed ABI). `qos_compile/runtime/manifest.py` is the only specification; "
         "`runtime/qos_manifest_format.h` and this page are generated from it.", "",
         "```", "offset 0      header (64 bytes)",
         f"offset 64     section table: num_sections x {SECTION.size} bytes, entry i = section id i",
         "header_size   sections (tables 8-byte aligned, in any order, never overlapping)",
         f"...           DATA: tensor data, each tensor {ALIGN}-byte aligned (file offsets)", "```", "",
         "## Conventions", "",
         "* All integers little-endian; `f32` is IEEE 754 binary32. Records have fixed sizes; every field is "
         "naturally aligned inside its record.",
         "* Strings are byte offsets into STRINGS (NUL-terminated UTF-8).",
         f"* Checksum: CRC-32 (the zlib / IEEE 802.3 polynomial, `zlib.crc32`) of the whole file with the 4 "
         f"checksum bytes (offset {CHECKSUM_OFFSET}) skipped, i.e. `crc32(file[28:], crc32(file[:24]))`.",
         f"* Versioning: a reader accepts only its own major version. Minor versions may append sections (ids >= "
         f"{SECTION_COUNT}); an older reader bounds-checks and skips them.",
         f"* Tensor data offsets and arena buffer offsets are multiples of {ALIGN}; the runtime keeps the file in "
         f"a {ALIGN}-byte aligned copy, so tensor data pointers are {ALIGN}-byte aligned in memory.",
         "* An empty section has offset 0. Non-empty sections lie inside [header_size, file_size) and do not "
         "overlap.", "",
         "## Execution model", "",
         "The plan is run in order. Each step calls kernel `kernels[step.kernel]` (resolved by name at open time "
         "through the host's lookup callback; `qos-run` and `libqos_model.so` look names up only in the table of "
         "the model's own kernel entry points that qos-compile links in, so a manifest cannot name any other "
         "symbol) as "
         "`int32_t fn(void* self, const TVMFFIAny* args, int32_t num_args, TVMFFIAny* ret)` with `self = NULL`, "
         "every argument a DLTensor pointer (type index 7, `kTVMFFIDLTensorPtr`; CPU device, compact: "
         "`strides = NULL`, `byte_offset = 0`), and `ret` a zeroed value. A non-zero return is an error "
         "(the message comes from `TVMFFIErrorSetRaisedFromCStrParts`).", "",
         "An argument is CONST (a file tensor), BUFFER (arena), INPUT/OUTPUT (the caller's memory, or an "
         f"aligned staging copy when that is not {ALIGN}-byte aligned) or SLOT: the tensor "
         "`slot_tensor[op][slot]` for the OP that `qos_run` read (once, atomically) when it started. "
         "`qos_select` only stores the OP index. The compiler makes one slot per approximate layer "
         "(its multiplier table, `layer` set: it must equal `bank[assign[op][layer]].table`) and one per "
         "per-OP tensor (BN-folded scale/shift, bias; a low-rank conv layer's weight and activation "
         "factor tables, `slot.<layer>.wterms|xterms`, and a `vpdpbusd` layer's accumulator start "
         "`slot.<layer>.dotbias`; a rows8 layer's row minima `slot.<layer>.rowmin`).", "",
         "## Header", "", *_md_record(HEADER), "",
         "## Section table entry", "", *_md_record(SECTION), "",
         "## Sections", "", "| id | name | entry | contents |", "| --- | --- | --- | --- |"]
    for s in Section:
        rec = SECTION_RECORDS[s]
        L.append(f"| {int(s)} | {s.name} | {rec.size} B ({rec.name}) | {SECTION_DOCS[s]} |")
    L += ["", "## Records", ""]
    for rec in RECORDS[2:]:
        L += [f"### {rec.name} ({rec.size} bytes)", "", rec.doc, "", *_md_record(rec), ""]
    L += ["## Codes", "", "| dtype | code | size | DLPack (code, bits, lanes) |", "| --- | --- | --- | --- |"]
    for code, (nm, sz, dlc, b, _np) in DTYPE_INFO.items():
        L.append(f"| {nm} | {int(code)} | {sz} | ({dlc}, {b}, 1) |")
    L += ["", "| arg kind | code |", "| --- | --- |"] + [f"| {k.name} | {int(k)} |" for k in ArgKind]
    L += ["", "| tensor role | code |", "| --- | --- |"] + [f"| {r.name} | {int(r)} |" for r in Role]
    L += ["", "## Validation (the loader trusts nothing)", "",
          "The C loader and `read_manifest` apply the same checks, with overflow-safe arithmetic, and reject "
          "the file with an error code and message at the first failure:", "",
          f"1. At least {HEADER.size} bytes; magic; major version (error `QOS_ERR_VERSION`); `file_size` equals "
          "the bytes given; num_sections and header_size consistent; flags and reserved fields 0.",
          "2. CRC-32 (error `QOS_ERR_CHECKSUM`).",
          "3. Every section: known sections have the spec's entry size; count x entry size fits; inside the "
          f"body; aligned ({TABLE_ALIGN}, DATA {ALIGN}); no overlaps; empty ones have offset 0.",
          f"4. Every string reference: inside STRINGS and NUL-terminated within {MAX_STRING} bytes; names of "
          "bank entries, kernels and OPs non-empty; OP names unique.",
          f"5. Every tensor/buffer/input/output: known dtype, ndim <= {MAX_NDIM}, dims in 1..{MAX_DIM}, unused "
          f"dims 0, product x element size = nbytes (<= 2^62); tensors: known role, data offset a multiple of "
          f"{ALIGN} and the whole range inside DATA; buffers: offset a multiple of {ALIGN}, range inside the "
          f"arena, and arena_size = the largest buffer end rounded up to {ALIGN}.",
          "6. Bank: sha256 is 64 lowercase hex digits; the table is a (256, 256) int32/int16 LUT-role tensor; "
          "both readers recompute the table's SHA-256 (its cells as little-endian int32, int16 tables widened) "
          "and refuse a table that does not match it (one hash of 256 KiB per bank entry at load: about 1 ms "
          "in the C loader on an x86-64 core, a few ms on small ARM cores).",
          f"7. 1..{MAX_OPS} OPs; assign has num_ops x num_layers entries, each a bank index; slot_tensors has "
          "num_ops x num_slots entries, each a tensor id; a slot's tensors agree in dtype and shape across "
          "OPs; a layer slot's tensor is its layer's assigned table.",
          f"8. Plan: at least one step; kernel ids in range; 0..{MAX_STEP_ARGS} arguments inside ARGS; every "
          "argument's kind known and index in range; at least one input and one output; every output is an "
          "OUTPUT argument of some step.",
          "9. C only: at open, every kernel name must resolve through the lookup callback (error "
          "`QOS_ERR_KERNEL_MISSING`; qos-run: only the model's own kernels), the arena (plus I/O "
          "staging) must fit the build's `QOS_MAX_ARENA_BYTES` (error `QOS_ERR_LIMIT`), and every DLTensor "
          "built is checked against the memory it points to.", ""]
    return "\n".join(L)


def _md_record(rec: Record) -> list[str]:
    rows = ["| offset | field | type | meaning |", "| --- | --- | --- | --- |"]
    for f in rec.fields:
        t = f.type + (f"[{f.count}]" if f.count > 1 else "")
        rows.append(f"| {f.offset} | {f.name} | {t} | {f.doc} |")
    return rows


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Generate the C header and docs of the .qosm format, or check a file.")
    ap.add_argument("--write", action="store_true", help="(re)write runtime/qos_manifest_format.h and docs/manifest.md")
    ap.add_argument("--check", metavar="FILE.qosm", help="validate a manifest and print its summary")
    a = ap.parse_args(argv)
    root = _repo_root()
    if a.write:
        (root / "runtime" / "qos_manifest_format.h").write_text(generate_c_header())
        (root / "docs" / "manifest.md").write_text(generate_markdown())
        print("wrote runtime/qos_manifest_format.h and docs/manifest.md")
    if a.check:
        m = read_manifest(a.check)
        print(f"{a.check}: ok, version {m.version[0]}.{m.version[1]}, {len(m.ops)} OPs, {len(m.steps)} steps, "
              f"{len(m.tensors)} tensors, sizes {m.size_breakdown()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
