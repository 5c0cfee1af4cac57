"""The .qosm spec (qos_compile/runtime/manifest.py): writer <-> reader round trip, generated files, validation."""
from __future__ import annotations

import hashlib
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from qos_compile.errors import QosError
from qos_compile.runtime import manifest as M
from qos_compile.runtime.manifest import (Arg, ArgKind, DType, ManifestError, ManifestWriter, Role, Section,
                                          read_manifest)
from qos_compile.runtime.testing import exact_table, seed_manifests, tiny_model, truncated_table

ROOT = Path(__file__).resolve().parents[1]


def test_generated_c_header_and_docs_are_current():
    header = (ROOT / "runtime" / "qos_manifest_format.h").read_text()
    assert header == M.generate_c_header(), \
        "runtime/qos_manifest_format.h is stale: run python -m qos_compile.runtime.manifest --write"
    docs = (ROOT / "docs" / "manifest.md").read_text()
    assert docs == M.generate_markdown(), "docs/manifest.md is stale: run python -m qos_compile.runtime.manifest --write"


def test_record_layouts_are_natural_and_fixed():
    assert M.HEADER.size == 64 and M.SECTION.size == 24
    assert {r.name: r.size for r in M.RECORDS} == {
        "header": 64, "section": 24, "tensor": 72, "bank": 16, "kernel": 8, "op": 8, "layer": 8, "assign": 4,
        "slot": 8, "slot_tensor": 4, "buffer": 72, "step": 16, "arg": 8, "io": 72}
    for rec in M.RECORDS:
        for f in rec.fields:
            assert f.offset % M._TYPES[f.type][1] == 0, (rec.name, f.name)
    assert [f.offset for f in M.HEADER.fields if f.name == "checksum"] == [M.CHECKSUM_OFFSET]
    assert len(M.SECTION_RECORDS) == len(Section) == M.SECTION_COUNT


def test_round_trip_tiny_model():
    t = tiny_model(seed=4)
    m = read_manifest(t.data)
    assert m.version == (M.VERSION_MAJOR, M.VERSION_MINOR)
    assert m.ops == ["exact", "approx"]
    assert m.assign == [[0, 0], [1, 2]]
    assert [b.name for b in m.bank] == ["mul8s_exact", "mul8s_trunc2", "mul8s_noisy"]
    assert m.bank[0].power_mw == 1.0 and math.isnan(m.bank[2].power_mw)
    for b, lut in zip(m.bank, t.luts):
        assert np.array_equal(m.tensor_data(b.table), lut)
        assert m.tensors[b.table].role == Role.LUT
        import hashlib
        assert b.sha256 == hashlib.sha256(lut.astype("<i4").tobytes()).hexdigest()
    assert m.kernels == ["qos_test_lut_dot", "qos_test_requant", "qos_test_scale"]
    assert [s.name for s in m.slots] == ["fc0.lut", "fc1.lut", "fc0.scale", "fc0.shift", "fc1.scale", "fc1.shift"]
    assert m.slots[0].layer == 0 and m.slots[1].layer == 1 and m.slots[2].layer is None
    assert m.slots[1].tensors == [m.bank[0].table, m.bank[2].table]
    for op in range(2):
        assert np.array_equal(m.tensor_data(m.slots[2].tensors[op]), t.scale[op][0])
        assert np.array_equal(m.tensor_data(m.slots[5].tensors[op]), t.shift[op][1])
    assert [s.kernel for s in m.steps] == [0, 1, 0, 2]
    assert m.steps[0].args == [Arg.input(0), Arg.const(3), Arg.slot(0), Arg.buffer(0)]
    assert (m.inputs[0].name, m.inputs[0].dtype, m.inputs[0].shape, m.inputs[0].nbytes) == ("x", DType.INT8, (1, 16), 16)
    assert m.inputs[0].scale == pytest.approx(0.05)
    assert (m.outputs[0].dtype, m.outputs[0].shape) == (DType.FLOAT32, (1, 4))
    assert [b.offset % 64 for b in m.buffers] == [0, 0, 0] and m.arena_size == 192
    assert m.metadata_json()["model"] == "tiny"
    for tinfo in m.tensors:
        assert tinfo.offset % M.ALIGN == 0
    sizes = m.size_breakdown()
    assert sizes["tables"] == 3 * 256 * 256 * 4
    assert sizes["weights"] == 8 * 16 + 4 * 8
    assert sizes["per_op"] == 2 * 4 * (8 + 8 + 4 + 4)
    assert sizes["file"] == len(t.data) and sizes["plan"] > 0


def test_write_is_atomic_and_readable(tmp_path):
    w = ManifestWriter()
    w.add_op("a")
    i = w.add_input("x", np.uint8, (3,))
    o = w.add_output("y", np.uint8, (3,))
    w.add_step("k", [Arg.input(i), Arg.output(o)])
    path = w.write(tmp_path / "sub" / "m.qosm")
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.qosm"]
    assert read_manifest(path).kernels == ["k"]
    assert read_manifest(path.read_bytes()).ops == ["a"]


def test_checksum_is_crc32_without_its_field():
    data = seed_manifests()["slots.qosm"]
    crc = struct.unpack_from("<I", data, M.CHECKSUM_OFFSET)[0]
    assert crc == zlib.crc32(data[28:], zlib.crc32(data[:24]))


def test_dedupe_and_writer_validation():
    w = ManifestWriter()
    a = w.add_tensor("a", np.ones((2, 2), np.float32))
    b = w.add_tensor("b", np.ones((2, 2), np.float32))
    assert a != b
    w.add_op("x")
    with pytest.raises(QosError):
        w.add_op("x")
    with pytest.raises(QosError, match="dtype"):
        w.add_tensor("f64", np.ones(2, np.float64))
    with pytest.raises(QosError, match="shape"):
        w.add_tensor("7d", np.ones((1,) * 7, np.int8))
    with pytest.raises(QosError, match="256, 256"):
        w.add_bank_entry("bad", np.zeros((16, 16), np.int32))
    with pytest.raises(QosError, match="sha256"):
        w.add_bank_entry("m", exact_table(), sha256="0" * 64)
    with pytest.raises(QosError, match="int16"):
        w.add_bank_entry("m", exact_table() * 4, dtype=np.int16)
    with pytest.raises(QosError, match="exactly one"):
        w.add_slot("s")
    i = w.add_input("x", np.int8, (2, 2))
    o = w.add_output("y", np.float32, (2, 2))
    w.add_step("k", [Arg.input(i), Arg.const(a), Arg.const(b), Arg.output(o)])
    m = read_manifest(w.to_bytes())
    assert m.tensors[0].offset == m.tensors[1].offset  # identical data stored once
    assert m.size_breakdown()["weights"] == 16


def test_missing_assign_is_an_error():
    w = ManifestWriter()
    w.add_op("a")
    w.add_layer("l")
    with pytest.raises(QosError, match=r"assign\[0\]\[0\]"):
        w.to_bytes()


def _fix(buf: bytearray) -> bytes:
    struct.pack_into("<I", buf, M.CHECKSUM_OFFSET, M.checksum(buf))
    return bytes(buf)


@pytest.mark.parametrize("mutate, code, pattern", [
    (lambda b: b[:10], "format", "too short"),
    (lambda b: b"QOSX" + b[4:], "format", "bad magic"),
    (lambda b: b[:4] + struct.pack("<H", 2) + b[6:], "version", "unsupported manifest version 2"),
    (lambda b: b[:-1], "format", "file size mismatch"),
    (lambda b: b[:500] + bytes([b[500] ^ 1]) + b[501:], "checksum", "checksum"),
])
def test_reader_rejects_header_damage(mutate, code, pattern):
    data = seed_manifests()["slots.qosm"]
    with pytest.raises(ManifestError, match=pattern) as ei:
        read_manifest(mutate(data))
    assert ei.value.code == code


def test_reader_rejects_bad_plan_index():
    data = bytearray(seed_manifests()["slots.qosm"])
    off = struct.unpack_from("<Q", data, M.HEADER.size + M.SECTION.size * Section.ARGS)[0]
    struct.pack_into("<I", data, off + 4, 77)     # args[0].index
    with pytest.raises(ManifestError, match="index 77 out of range"):
        read_manifest(_fix(data))


def test_arg_kinds_and_dtypes_match_dlpack():
    assert [k.value for k in ArgKind] == [0, 1, 2, 3, 4]
    assert {d.name: M.DTYPE_INFO[d][2:4] for d in DType} == {
        "INT8": (0, 8), "UINT8": (1, 8), "INT16": (0, 16), "INT32": (0, 32), "FLOAT32": (2, 32), "INT64": (0, 64)}


def test_int16_bank_tables_and_truncated_table():
    data = seed_manifests()["bank.qosm"]
    m = read_manifest(data)
    assert m.tensors[m.bank[1].table].dtype == DType.INT16
    assert np.array_equal(m.tensor_data(m.bank[1].table), truncated_table(2) // 2)


# ----------------------------------------------------------------------------- bank tables vs their sha256
def _bank_sha_offset(data: bytes, bank: int) -> int:
    """File offset of bank entry ``bank``'s sha256 string (64 hex digits + NUL in STRINGS)."""
    sec = M.HEADER.size + M.SECTION.size * Section.BANK
    bank_off = struct.unpack_from("<Q", data, sec)[0]
    ref_at = bank_off + bank * M.BANK.size + next(f.offset for f in M.BANK.fields if f.name == "sha256")
    str_off = struct.unpack_from("<Q", data, M.HEADER.size + M.SECTION.size * Section.STRINGS)[0]
    return str_off + struct.unpack_from("<I", data, ref_at)[0]


def test_reader_rechecks_each_int32_table_against_its_sha256():
    """A table cell changed after compilation, with the CRC recomputed so the file reaches the parser,
    is refused: the hash names the circuit that the report and the bank claim. The untouched file loads."""
    t = tiny_model(seed=4)
    m = read_manifest(t.data)
    info = m.tensors[m.bank[1].table]
    assert info.dtype == DType.INT32
    data = bytearray(t.data)
    cell = info.offset + 4 * 1000
    struct.pack_into("<i", data, cell, struct.unpack_from("<i", data, cell)[0] + 1)
    with pytest.raises(ManifestError, match=r"^bank entry 1 \(mul8s_trunc2\): table does not match its sha256$") \
            as ei:
        read_manifest(_fix(data))
    assert ei.value.code == "format"
    # the check recomputes the hash (it does not compare against a list of known circuits): the same
    # change with the sha256 string rewritten to the new table's hash is a valid manifest again
    new = hashlib.sha256(bytes(data[info.offset:info.offset + info.nbytes])).hexdigest()
    at = _bank_sha_offset(t.data, 1)
    data[at:at + 64] = new.encode()
    assert read_manifest(_fix(data)).bank[1].sha256 == new


def test_reader_hashes_int16_tables_widened_to_int32():
    """bank.qosm stores its tables as int16 (negative cells too): the sha256 is of the cells widened to
    little-endian int32, so a sign flip is caught and a hash of the raw int16 bytes is refused."""
    data = seed_manifests()["bank.qosm"]
    m = read_manifest(data)
    info = m.tensors[m.bank[0].table]
    assert info.dtype == DType.INT16 and (m.tensor_data(m.bank[0].table) < 0).any()
    buf = bytearray(data)
    buf[info.offset + 1] ^= 0x80                     # cell 0's sign bit (int16, little-endian)
    with pytest.raises(ManifestError, match=r"bank entry 0 \(mul8s_exact\): table does not match its sha256"):
        read_manifest(_fix(buf))
    raw16 = hashlib.sha256(data[info.offset:info.offset + info.nbytes]).hexdigest()
    assert raw16 != m.bank[0].sha256
    buf = bytearray(data)
    at = _bank_sha_offset(data, 0)
    assert buf[at:at + 64] == m.bank[0].sha256.encode()
    buf[at:at + 64] = raw16.encode()
    with pytest.raises(ManifestError, match=r"bank entry 0 \(mul8s_exact\): table does not match its sha256"):
        read_manifest(_fix(buf))
