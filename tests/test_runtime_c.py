"""The C runtime (runtime/): loader, executor, OP switching, robustness, races, aarch64 under qemu.

Kernels are the packed-ABI test kernels of runtime/tests/qos_test_kernels.c. Everything that might
crash on a bad manifest runs in a subprocess (an AddressSanitizer build of qos_open_many), or through
ctypes only for cases that are known to be rejected cleanly.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import random
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qos_compile.runtime import build as B
from qos_compile.runtime import manifest as M
from qos_compile.runtime.binding import QosRuntimeError, RuntimeLibrary
from qos_compile.runtime.manifest import Arg, ManifestError, ManifestWriter, Section, read_manifest
from qos_compile.runtime.testing import TEST_KERNELS, seed_manifests, tiny_model

TEST_FLAGS = ["-ffp-contract=off"]
QEMU = shutil.which("qemu-aarch64-static")
CROSS = shutil.which("aarch64-linux-gnu-gcc")
ERR = {"ARG": -1, "IO": -2, "NOMEM": -3, "FORMAT": -4, "VERSION": -5, "CHECKSUM": -6, "KERNEL_MISSING": -7,
       "KERNEL": -8, "SIZE": -9, "LIMIT": -10}


@pytest.fixture(scope="module")
def rt():
    return RuntimeLibrary(B.build_host_library())


@pytest.fixture(scope="module")
def kernels(rt):
    path = B.build_program([B.TEST_KERNELS_SOURCE], "libqos_test_kernels.so", with_runtime=False,
                           extra_flags=[*TEST_FLAGS, "-shared", "-fPIC"], libs=())
    return ctypes.CDLL(str(path))


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=7)


def fix_crc(buf: bytearray) -> bytes:
    struct.pack_into("<I", buf, M.CHECKSUM_OFFSET, M.checksum(buf))
    return bytes(buf)


def section(data: bytes, sec: Section) -> tuple[int, int]:
    off, count = struct.unpack_from("<QQ", data, M.HEADER.size + M.SECTION.size * int(sec))
    return off, count


def record(data: bytes, sec: Section, index: int) -> int:
    off, count = section(data, sec)
    assert index < count
    return off + index * M.SECTION_RECORDS[sec].size


def field_off(rec: M.Record, name: str) -> int:
    return next(f.offset for f in rec.fields if f.name == name)


def patch(data: bytes, sec: Section, index: int, fname: str, fmt: str, value) -> bytes:
    buf = bytearray(data)
    values = value if isinstance(value, tuple) else (value,)
    struct.pack_into("<" + fmt, buf, record(data, sec, index) + field_off(M.SECTION_RECORDS[sec], fname), *values)
    return fix_crc(buf)


def patch_header(data: bytes, fname: str, fmt: str, value, crc: bool = True) -> bytes:
    buf = bytearray(data)
    struct.pack_into("<" + fmt, buf, field_off(M.HEADER, fname), value)
    return fix_crc(buf) if crc else bytes(buf)


def patch_section(data: bytes, sec: Section, fname: str, fmt: str, value) -> bytes:
    buf = bytearray(data)
    struct.pack_into("<" + fmt, buf, M.HEADER.size + M.SECTION.size * int(sec) + field_off(M.SECTION, fname), value)
    return fix_crc(buf)


def change_table_cell(data: bytes, at: int, delta: int) -> bytes:
    """The int32 table cell at file offset ``at`` changed by ``delta``, CRC recomputed (the sha256 is stale)."""
    buf = bytearray(data)
    struct.pack_into("<i", buf, at, struct.unpack_from("<i", buf, at)[0] + delta)
    return fix_crc(buf)


def sha_string_at(data: bytes, bank: int) -> int:
    """File offset of bank entry ``bank``'s sha256 string."""
    ref = struct.unpack_from("<I", data, record(data, Section.BANK, bank) + field_off(M.BANK, "sha256"))[0]
    return section(data, Section.STRINGS)[0] + ref


def py_code(data: bytes) -> str:
    try:
        read_manifest(data)
        return "ok"
    except ManifestError as exc:
        return exc.code


# ----------------------------------------------------------------------------- loader + executor
def test_c_loader_accepts_writer_output(rt, tiny):
    for name, data in {**seed_manifests(), "tiny.qosm": tiny.data}.items():
        m = read_manifest(data)
        with rt.open(data, None) as model:  # inspection only
            assert model.operating_points == m.ops, name
            assert [(i.name, i.shape, i.nbytes) for i in model.inputs] == [(i.name, i.shape, i.nbytes) for i in m.inputs]
            assert [(o.name, o.shape) for o in model.outputs] == [(o.name, o.shape) for o in m.outputs]
            assert model.metadata == m.metadata
            assert model.arena_bytes == m.arena_size
            with pytest.raises(QosRuntimeError) as ei:
                model.run(*[np.zeros(i.shape, i.dtype) for i in model.inputs])
            assert ei.value.name == "KERNEL_MISSING"


def test_end_to_end_two_operating_points(rt, kernels, tiny, tmp_path):
    path = tmp_path / "tiny.qosm"
    path.write_bytes(tiny.data)
    with rt.open(path, kernels) as model:
        assert model.operating_points == ["exact", "approx"]
        assert model.inputs[0].scale == pytest.approx(0.05)
        assert model.metadata_json()["ops"] == ["exact", "approx"]
        for seed in range(5):
            x = tiny.random_input(seed)
            outs = []
            for op in (0, 1):
                model.select(op)
                assert model.selected == op
                y = model.run(x)
                assert y.dtype == np.float32 and y.shape == (1, 4)
                np.testing.assert_array_equal(y, tiny.reference(x, op))
                outs.append(y)
            assert not np.array_equal(outs[0], outs[1])
        model.select("exact")
        np.testing.assert_array_equal(model.run(tiny.random_input(0)), tiny.reference(tiny.random_input(0), 0))
        with pytest.raises(QosRuntimeError, match="out of range"):
            model.select(2)
        assert model.selected == 0
        with pytest.raises(Exception, match="no operating point"):
            model.select("nope")


def test_run_checks_sizes_and_stages_unaligned_buffers(rt, kernels, tiny):
    lib = rt.lib
    with rt.open(tiny.data, kernels) as model:
        model.select(1)
        x = tiny.random_input(3)
        expect = tiny.reference(x, 1)
        # input and output at odd addresses: the runtime copies through its aligned staging areas
        raw_in = ctypes.create_string_buffer(16 + 128)
        raw_out = ctypes.create_string_buffer(16 + 128)
        a_in, a_out = ctypes.addressof(raw_in), ctypes.addressof(raw_out)
        for pin, pout in [(a_in + (1 if (a_in + 1) % 64 else 2), a_out + (5 if (a_out + 5) % 64 else 6)),
                          ((a_in + 63) // 64 * 64, (a_out + 63) // 64 * 64)]:   # staged, then direct
            ctypes.memset(pout, 0, 16)
            ctypes.memmove(pin, x.tobytes(), 16)
            assert lib.qos_run(model._h, pin, 16, pout, 16) == 0
            got = np.frombuffer(ctypes.string_at(pout, 16), np.float32).reshape(1, 4)
            np.testing.assert_array_equal(got, expect)
        assert lib.qos_run(model._h, pin, 15, pout, 16) == ERR["SIZE"]
        assert "got 15 bytes" in model.last_error
        assert lib.qos_run(model._h, pin, 16, pout, 17) == ERR["SIZE"]
        assert lib.qos_run(model._h, None, 16, pout, 16) == ERR["ARG"]
        assert lib.qos_select(model._h, 99) == ERR["ARG"] and model.selected == 1
        assert lib.qos_run(None, pin, 16, pout, 16) == ERR["ARG"]


def test_missing_kernel_and_kernel_error(rt, kernels, tiny):
    lookup = {name: getattr(kernels, name) for name in TEST_KERNELS if name != "qos_test_scale"}
    with pytest.raises(QosRuntimeError, match="kernel 'qos_test_scale' not found") as ei:
        rt.open(tiny.data, lookup)
    assert ei.value.name == "KERNEL_MISSING"
    with rt.open(_bad_shape_model(), kernels) as model:
        with pytest.raises(QosRuntimeError, match=r"step 0 \(kernel 'qos_test_lut_dot'\) failed") as ei:
            model.run(np.zeros((1, 16), np.int8))
        assert ei.value.name == "KERNEL"


def _bad_shape_model() -> bytes:
    """lut_dot with weights (8, 15) for an input (1, 16): the kernel's own check fails."""
    w = ManifestWriter()
    w.add_op("a")
    e = w.add_bank_entry("mul8s_exact", np.zeros((256, 256), np.int32))
    layer = w.add_layer("fc")
    w.set_assignment([[e]])
    s = w.add_slot("lut", layer=layer)
    wt = w.add_tensor("w", np.ones((8, 15), np.int8))
    x = w.add_input("x", np.int8, (1, 16))
    y = w.add_output("y", np.int32, (1, 8))
    w.add_step("qos_test_lut_dot", [Arg.input(x), Arg.const(wt), Arg.slot(s), Arg.output(y)])
    return w.to_bytes()


def test_open_file_errors(rt, tmp_path):
    with pytest.raises(QosRuntimeError, match="cannot open") as ei:
        rt.open(tmp_path / "missing.qosm", None)
    assert ei.value.name == "IO"
    (tmp_path / "empty.qosm").write_bytes(b"")
    with pytest.raises(QosRuntimeError, match="too short") as ei:
        rt.open(tmp_path / "empty.qosm", None)
    assert ei.value.name == "FORMAT"


# ----------------------------------------------------------------------------- targeted corruptions
def _targeted_cases(tiny_data: bytes) -> list[tuple[str, bytes, str, str]]:
    """(name, manifest, expected C error name, message pattern)."""
    d = tiny_data
    m = read_manifest(d)
    str_off, str_size = section(d, Section.STRINGS)
    data_off, data_count = section(d, Section.DATA)
    kern_off, _ = section(d, Section.KERNELS)
    cases = [
        ("empty", b"", "FORMAT", "too short"),
        ("wrong magic", b"QOSX" + d[4:], "FORMAT", "bad magic"),
        ("version 2", patch_header(d, "version_major", "H", 2), "VERSION", r"unsupported manifest version 2\.0"),
        ("truncated", d[:-1], "FORMAT", "file size mismatch"),
        ("padded", d + b"\0", "FORMAT", "file size mismatch"),
        ("flipped byte, stale crc", d[:1000] + bytes([d[1000] ^ 0x10]) + d[1001:], "CHECKSUM", "checksum mismatch"),
        ("bad header size", patch_header(d, "header_size", "I", 9999), "FORMAT", "bad header size"),
        ("few sections", patch_header(d, "num_sections", "I", 3), "FORMAT", "bad section count"),
        ("reserved header", patch_header(d, "flags", "I", 1), "FORMAT", "reserved header fields"),
        ("huge count", patch_section(d, Section.TENSORS, "count", "Q", 1 << 60), "FORMAT", "do not fit"),
        ("entry size", patch_section(d, Section.STEPS, "entry_size", "I", 12), "FORMAT", "entry size 12"),
        ("section past end", patch_section(d, Section.METADATA, "offset", "Q", len(d) - 8), "FORMAT",
         "outside the file body"),
        ("section misaligned", patch_section(d, Section.KERNELS, "offset", "Q", kern_off + 4), "FORMAT",
         "not a multiple of 8"),
        ("sections overlap", patch_section(d, Section.OPS, "offset", "Q", kern_off), "FORMAT", "overlap"),
        ("empty section with offset", patch_section(d, Section.SLOTS, "count", "Q", 0), "FORMAT", "empty but offset"),
        ("tensor misaligned", patch(d, Section.TENSORS, 0, "offset", "Q", m.tensors[0].offset + 8), "FORMAT",
         "not a multiple of 64"),
        ("tensor past end", patch(d, Section.TENSORS, 3, "offset", "Q", (data_off + data_count + 63) // 64 * 64),
         "FORMAT",
         "outside the data section"),
        ("tensor offset huge", patch(d, Section.TENSORS, 3, "offset", "Q", (1 << 64) - 64), "FORMAT",
         "outside the data section"),
        ("shape/nbytes mismatch", patch(d, Section.TENSORS, 3, "nbytes", "Q", 129), "FORMAT", "nbytes 129"),
        ("ndim 7", patch(d, Section.TENSORS, 3, "ndim", "B", 7), "FORMAT", "ndim 7"),
        ("bad dtype", patch(d, Section.TENSORS, 3, "dtype", "B", 9), "FORMAT", "bad dtype"),
        ("unused dim", patch(d, Section.TENSORS, 3, "shape", "6q", (8, 16, 0, 0, 0, 5)), "FORMAT", "unused dim 5"),
        ("negative dim", patch(d, Section.TENSORS, 3, "shape", "6q", (-8, -16, 0, 0, 0, 0)), "FORMAT", "dim 0"),
        ("overflowing shape", patch(patch(d, Section.TENSORS, 3, "ndim", "B", 3), Section.TENSORS, 3, "shape", "6q",
                                    (2**31 - 1,) * 3 + (0,) * 3), "FORMAT", "shape too large"),
        ("bad role", patch(d, Section.TENSORS, 3, "role", "H", 9), "FORMAT", "bad role"),
        ("plan arg out of range", patch(d, Section.ARGS, 1, "index", "I", 999), "FORMAT",
         "const index 999 out of range"),
        ("bad arg kind", patch(d, Section.ARGS, 1, "kind", "I", 5), "FORMAT", "bad kind"),
        ("step args out of range", patch(d, Section.STEPS, 3, "num_args", "I", 65), "FORMAT", "out of range"),
        ("step first arg huge", patch(d, Section.STEPS, 3, "first_arg", "I", 0xFFFFFFFF), "FORMAT", "out of range"),
        ("step kernel", patch(d, Section.STEPS, 0, "kernel", "I", 3), "FORMAT", "kernel 3 out of range"),
        ("slot tensor out of range", patch(d, Section.SLOT_TENSORS, 6 + 2, "tensor", "I", 9999), "FORMAT",
         "operating point 1: tensor 9999 out of range"),
        ("slot shapes differ", patch(d, Section.SLOT_TENSORS, 6 + 2, "tensor", "I", m.slots[4].tensors[1]),
         "FORMAT", "differs"),
        ("layer slot not its table", patch(d, Section.SLOT_TENSORS, 6 + 0, "tensor", "I", m.bank[0].table),
         "FORMAT", r"not the table of assign\[1\]\[0\]"),
        ("slot layer out of range", patch(d, Section.SLOTS, 0, "layer", "I", 5), "FORMAT", "layer 5 out of range"),
        ("assign out of range", patch(d, Section.ASSIGN, 3, "bank", "I", 7), "FORMAT", "bank index out of range"),
        ("string outside", patch(d, Section.OPS, 0, "name", "I", 0xFFFFFFF0), "FORMAT", "outside the string table"),
        ("duplicate op names", patch(d, Section.OPS, 1, "name", "I",
                                     struct.unpack_from("<I", d, record(d, Section.OPS, 0))[0]),
         "FORMAT", "duplicate name"),
        ("empty kernel name", patch(d, Section.KERNELS, 0, "name", "I", 0), "FORMAT", "empty name"),
        ("no NUL", fix_crc(bytearray(d[:str_off + str_size - 1] + b"X" + d[str_off + str_size:])), "FORMAT",
         "not NUL-terminated"),
        ("sha256 not hex", patch(d, Section.BANK, 0, "sha256", "I", 0), "FORMAT", "sha256"),
        ("bank table not a LUT", patch(d, Section.BANK, 0, "table", "I", 3), "FORMAT", "256, 256"),
        ("bank table changed", change_table_cell(d, m.tensors[m.bank[1].table].offset + 4 * 1000, 1), "FORMAT",
         r"^bank entry 1 \(mul8s_trunc2\): table does not match its sha256"),
        ("zero ops", patch_section(patch_section(d, Section.OPS, "count", "Q", 0), Section.OPS, "offset", "Q", 0),
         "FORMAT", "operating point count 0"),
        ("buffer outside arena", patch(d, Section.BUFFERS, 2, "offset", "Q", 192), "FORMAT", "outside the arena"),
        ("buffer misaligned", patch(d, Section.BUFFERS, 2, "offset", "Q", 8), "FORMAT", "not a multiple of 64"),
        ("arena size", patch_header(d, "arena_size", "Q", 256), "FORMAT", "arena size 256"),
        ("output never written", patch(d, Section.ARGS, 15, "kind", "I", int(M.ArgKind.BUFFER)), "FORMAT",
         "output 0 is not an argument of any step"),
        ("input nbytes", patch(d, Section.INPUTS, 0, "nbytes", "Q", 17), "FORMAT", "input 0: nbytes 17"),
        ("no outputs", patch_section(patch_section(d, Section.OUTPUTS, "count", "Q", 0), Section.OUTPUTS,
                                     "offset", "Q", 0), "FORMAT", "no outputs"),
    ]
    # a huge (consistent) arena: valid format, but over the runtime's allocation limit
    buf = patch(d, Section.BUFFERS, 0, "shape", "6q", (1 << 20, 1 << 20, 0, 0, 0, 0))
    buf = patch(buf, Section.BUFFERS, 0, "nbytes", "Q", 4 << 40)
    buf = patch_header(buf, "arena_size", "Q", 4 << 40)
    cases.append(("arena over the limit", buf, "LIMIT", "QOS_MAX_ARENA_BYTES"))
    return cases


def test_targeted_corruptions_are_clean_errors(rt, kernels, tiny):
    for name, data, code, pattern in _targeted_cases(tiny.data):
        c, msg = rt.try_open(data, kernels)
        assert c == ERR[code], f"{name}: got {c} ({msg})"
        assert msg and re.search(pattern, msg), f"{name}: message {msg!r} lacks {pattern!r}"
        expect_py = {"FORMAT": "format", "VERSION": "version", "CHECKSUM": "checksum", "LIMIT": "ok"}[code]
        assert py_code(data) == expect_py, name


def test_c_loader_rechecks_bank_tables_against_their_sha256(rt, tiny):
    """The C loader recomputes each bank table's SHA-256 with its own FIPS 180-4 code and agrees with
    read_manifest (hashlib). Intact int32 (tiny) and int16 (bank.qosm) manifests loading is the known-answer
    test: their sha256 strings come from hashlib in the writer."""
    for name, data in (("tiny", tiny.data), ("bank.qosm", seed_manifests()["bank.qosm"])):
        m = read_manifest(data)
        assert rt.try_open(data, None) == (0, ""), name
        for k, b in enumerate(m.bank):
            info = m.tensors[b.table]
            # a changed cell (CRC recomputed): both refuse, with the same words
            buf = bytearray(data)
            buf[info.offset + info.nbytes - 1] ^= 0x80       # the last cell's sign bit
            bad = fix_crc(buf)
            c, msg = rt.try_open(bad, None)
            want = f"bank entry {k} ({b.name}): table does not match its sha256"
            assert c == ERR["FORMAT"] and msg.split(" [QOS_ERR_")[0] == want, (name, k, c, msg)  # binding adds [code]
            with pytest.raises(ManifestError) as ei:
                read_manifest(bad)
            assert str(ei.value) == want and ei.value.code == "format"
            # with the sha256 string rewritten to the changed table's (widened) hash it loads again
            cells = np.frombuffer(bad, dtype=info.numpy_dtype, count=256 * 256, offset=info.offset)
            at = sha_string_at(data, k)
            buf[at:at + 64] = hashlib.sha256(cells.astype("<i4").tobytes()).hexdigest().encode()
            good = fix_crc(buf)
            assert rt.try_open(good, None) == (0, "") and py_code(good) == "ok", (name, k)
            if info.dtype == M.DType.INT16:      # the hash of the raw int16 bytes is not the format's hash
                buf[at:at + 64] = hashlib.sha256(bytes(cells.tobytes())).hexdigest().encode()
                raw16 = fix_crc(buf)
                assert rt.try_open(raw16, None)[0] == ERR["FORMAT"] and py_code(raw16) == "format", (name, k)


def test_sha256_mismatch_message_shows_odd_names_alike(rt):
    """The bank name in the message comes from the file: both readers show it as printable ASCII ('?'
    for any other byte, so no newline or invalid UTF-8 reaches a log line), cut at 64 characters."""
    for name, shown in (("mul\n\x1b[2Jé", "mul??[2J??"), ("ü" * 40, "?" * 64 + "..."),
                        ("x" * 64, "x" * 64), ("y" * 65, "y" * 64 + "...")):
        w = ManifestWriter()
        w.add_op("a")
        e = w.add_bank_entry(name, np.zeros((256, 256), np.int32))
        layer = w.add_layer("fc")
        w.set_assignment([[e]])
        s = w.add_slot("lut", layer=layer)
        x = w.add_input("x", np.int8, (1, 16))
        y = w.add_output("y", np.int32, (1, 8))
        w.add_step("k", [Arg.input(x), Arg.slot(s), Arg.output(y)])
        data = w.to_bytes()
        assert rt.try_open(data, None) == (0, "") and py_code(data) == "ok"
        m = read_manifest(data)
        bad = change_table_cell(data, m.tensors[m.bank[0].table].offset + 4 * 300, -7)
        want = f"bank entry 0 ({shown}): table does not match its sha256"
        c, msg = rt.try_open(bad, None)
        assert c == ERR["FORMAT"] and msg.split(" [QOS_ERR_")[0] == want, (name, msg)
        with pytest.raises(ManifestError) as ei:
            read_manifest(bad)
        assert str(ei.value) == want


# ----------------------------------------------------------------------------- mass corruption (ASan subprocess)
@pytest.fixture(scope="module")
def open_many():
    return B.build_program(["tests/qos_open_many.c", "tests/qos_touch_kernel.c"], "qos_open_many_asan",
                           extra_flags=["-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                                        "-fno-omit-frame-pointer", "-DQOS_MAX_ARENA_BYTES=((uint64_t)1<<30)"])


def _run_pack(prog: Path, manifests: list[bytes], tmp_path: Path) -> list[tuple[int, int, str]]:
    pack = tmp_path / "pack.bin"
    with open(pack, "wb") as f:
        for data in manifests:
            f.write(struct.pack("<Q", len(data)) + data)
    env = dict(os.environ, ASAN_OPTIONS="allocator_may_return_null=1:detect_leaks=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    proc = subprocess.run([str(prog), str(pack)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"qos_open_many crashed or reported a sanitizer error:\n{proc.stderr[-4000:]}"
    rows = []
    for line in proc.stdout.splitlines():
        idx, rc, run_rc, msg = line.split(" ", 3)
        rows.append((int(rc), int(run_rc), msg))
    assert len(rows) == len(manifests), proc.stderr[-2000:]
    return rows


def _mutations(data: bytes, rng: random.Random, n: int, fix: bool, lo: int = 0, hi: int | None = None) -> list[bytes]:
    out = []
    hi = len(data) if hi is None else hi
    for _ in range(n):
        buf = bytearray(data)
        for _ in range(rng.choice((1, 1, 2, 4))):
            pos = rng.randrange(lo, hi)
            if rng.random() < 0.5:
                buf[pos] ^= 1 << rng.randrange(8)
            else:
                buf[pos] = rng.choice((0, 0xFF, 0x7F, 0x80, 1, 64, rng.randrange(256)))
        if buf == data:
            buf[hi - 1] ^= 0x01
        out.append(fix_crc(buf) if fix and len(buf) >= M.HEADER.size else bytes(buf))
    return out


def test_truncations_flips_and_parity_with_python_reader(open_many, tiny, tmp_path):
    rng = random.Random(1234)
    seeds = seed_manifests()
    small = seeds["slots.qosm"]
    tables_end = section(tiny.data, Section.DATA)[0]          # flip tables/strings, not tensor contents
    cases: list[tuple[str, bytes]] = []
    cases += [(f"prefix {n}", small[:n]) for n in range(len(small))]              # every prefix
    cases += [(f"tiny prefix {n}", tiny.data[:n]) for n in sorted(rng.sample(range(len(tiny.data)), 40))]
    cases += [("flip", b) for b in _mutations(small, rng, 300, fix=False)]        # stale checksum
    for data in seeds.values():                                                   # checksum recomputed
        cases += [("flip+crc", b) for b in _mutations(data, rng, 700, fix=True, hi=min(len(data), 4096))]
    cases += [("tiny flip+crc", b) for b in _mutations(tiny.data, rng, 60, fix=True, hi=tables_end)]
    cases += [(name, data) for name, data, _c, _p in _targeted_cases(tiny.data)]
    rows = _run_pack(open_many, [c[1] for c in cases], tmp_path)

    cat = {0: "ok", -4: "format", -5: "version", -6: "checksum", -10: "ok"}
    accepted = 0
    for (name, data), (rc, run_rc, msg) in zip(cases, rows):
        assert rc in cat, f"{name}: unexpected code {rc} ({msg})"
        if rc != 0:
            assert msg.strip(), f"{name}: error without a message"
        if name.startswith(("prefix", "tiny prefix")):
            assert rc != 0
        if name == "flip":
            assert rc != 0
        assert cat[rc] == py_code(data), f"{name}: C says {rc} ({msg}), Python says {py_code(data)}"
        if rc == 0:
            accepted += 1
            assert run_rc == 0, f"{name}: run failed with {run_rc}"
    assert all(rows[i][0] != 0 for i in range(len(small)))
    assert accepted > 0   # some flips (e.g. in names or float fields) keep a valid file


# ----------------------------------------------------------------------------- C programs: qemu, race, bench
def _write_io(tmp_path: Path, tiny, seed: int) -> tuple[Path, np.ndarray]:
    x = tiny.random_input(seed)
    p = tmp_path / f"in{seed}.bin"
    p.write_bytes(x.tobytes())
    return p, x


@pytest.fixture(scope="module")
def native_driver():
    return B.build_program([B.DRIVER_SOURCE, B.TEST_KERNELS_SOURCE], "qos-run-test", extra_flags=TEST_FLAGS)


def test_native_driver_and_kernel_error_message(native_driver, rt, kernels, tiny, tmp_path):
    model = tmp_path / "tiny.qosm"
    model.write_bytes(tiny.data)
    inp, x = _write_io(tmp_path, tiny, 11)
    for op in ("0", "approx"):
        out = tmp_path / f"out_{op}.bin"
        proc = subprocess.run([str(native_driver), str(model), "--op", op, "--input", str(inp), "--output", str(out),
                               "--info"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "operating points: 2" in proc.stdout
        expect = tiny.reference(x, 0 if op == "0" else 1)
        assert out.read_bytes() == expect.tobytes()
    bad = tmp_path / "bad.qosm"
    bad.write_bytes(_bad_shape_model())
    inp16 = tmp_path / "zeros.bin"
    inp16.write_bytes(bytes(16))
    proc = subprocess.run([str(native_driver), str(bad), "--input", str(inp16)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert "step 0 (kernel 'qos_test_lut_dot') failed with -1: ValueError: qos_test_lut_dot: shape mismatch" \
        in proc.stderr
    proc = subprocess.run([str(native_driver), str(tmp_path / "nope.qosm")], capture_output=True, text=True)
    assert proc.returncode == 2 and "cannot open" in proc.stderr          # a bad file: 2, like bad arguments


def _drive(driver: Path, *args, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(driver), *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, fragment", [
    (["--bench", "1e3"], "bad --bench '1e3'"),
    (["--bench", "3x"], "bad --bench"),
    (["--bench", " 3"], "bad --bench"),
    (["--bench", "+3"], "bad --bench"),
    (["--bench", "0"], "bad --bench"),
    (["--bench", "1000000001"], "bad --bench"),
    (["--bench", str(2**61)], "bad --bench"),          # n * sizeof(double) would overflow
    (["--bench", str(2**64 + 3)], "bad --bench"),
    (["--switch-bench", "99999999999"], "bad --switch-bench"),
    (["--profile", "-1"], "bad --profile"),
    (["--profile", "5.5"], "bad --profile"),
    (["--repeat", "0x10"], "bad --repeat"),
    (["--op", "4294967298"], "no operating point '4294967298'"),   # not OP 2 modulo 2^32
    (["--op", "2"], "no operating point '2'"),
    (["--op", "-1"], "no operating point '-1'"),
    (["--op", "1junk"], "no operating point"),
    (["--op-sequence", "0,1,"], "bad --op-sequence"),
    (["--op-sequence", "0,,1"], "bad --op-sequence"),
    (["--op-sequence", "4294967297"], "bad --op-sequence"),
    (["--op-sequence", ",".join(["0"] * 257)], "bad --op-sequence"),
    (["--output", "y.bin"], "--output needs --input"),
    (["--bench"], "usage"),
    (["--frobnicate", "1"], "usage"),
    (["second.qosm"], "usage"),
])
def test_qos_run_numbers_are_strict_and_bounded(native_driver, tiny, tmp_path, args, fragment):
    """qos-run's numbers: digits only, counts 1..10^9, OPs inside the model; a bad one is one line
    and exit 2 (never silently a different number)."""
    model = tmp_path / "tiny.qosm"
    model.write_bytes(tiny.data)
    proc = _drive(native_driver, model, *args)
    assert proc.returncode == 2, (args, proc.returncode, proc.stdout, proc.stderr)
    assert fragment in proc.stderr and "Sanitizer" not in proc.stderr, proc.stderr


def test_qos_run_accepts_good_numbers_and_writes_output_atomically(native_driver, tiny, tmp_path):
    model = tmp_path / "tiny.qosm"
    model.write_bytes(tiny.data)
    inp, x = _write_io(tmp_path, tiny, 2)
    for args in (["--bench", "2"], ["--switch-bench", "1000"], ["--profile", "2", "--op", "approx"],
                 ["--op", "1", "--bench", "1000000000"][:2], ["--op-sequence", "1,0,approx", "--input", inp]):
        proc = _drive(native_driver, model, *args)
        assert proc.returncode == 0, (args, proc.stderr)
    out = tmp_path / "sub" / "y.bin"
    out.parent.mkdir()
    out.write_bytes(b"old")
    os.chmod(out, 0o640)
    proc = _drive(native_driver, model, "--op", "1", "--input", inp, "--output", out, "--repeat", "3")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == tiny.reference(x, 1).tobytes()
    assert (out.stat().st_mode & 0o777) == 0o640                       # the old file's mode is kept
    assert sorted(q.name for q in out.parent.iterdir()) == ["y.bin"]    # no temporary file left
    # a failed write leaves the old file alone and no temporary file behind
    bad = _drive(native_driver, model, "--input", inp, "--output", tmp_path / "no" / "dir" / "y.bin")
    assert bad.returncode == 2 and "cannot write" in bad.stderr
    bad = _drive(native_driver, model, "--input", inp, "--output", out.parent)          # a folder
    assert bad.returncode == 2 and "cannot write" in bad.stderr
    assert out.read_bytes() == tiny.reference(x, 1).tobytes()
    assert sorted(q.name for q in out.parent.iterdir()) == ["y.bin"]
    # a wrong-sized input and a model qos-run cannot drive are bad input: 2
    short = tmp_path / "short.bin"
    short.write_bytes(bytes(15))
    assert _drive(native_driver, model, "--input", short).returncode == 2


def test_qos_run_resolves_kernels_only_through_its_table(native_driver, tiny, tmp_path):
    """A manifest naming a symbol of the program that is not one of its kernels (the lookup, main,
    a library function) is refused when opened: exit 2, one line, nothing called."""
    from qos_compile.runtime import fuzzing as F

    for name in ("main", "qos_table_lookup", "free", "qos_open_file", "qos_test_lut_do", "TVMFFIError"):
        assert len(name) <= len("qos_test_lut_dot")      # rewritten in place over kernel 0's name
        bad = tmp_path / "bad.qosm"
        bad.write_bytes(F.apply(tiny.data, [F.Mutation("string", "name", name, "KERNELS", 0)]))
        proc = _drive(native_driver, bad, "--info")
        assert proc.returncode == 2, (name, proc.stderr)
        assert f"kernel '{name}' not found: not one of the kernels this program was built with" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not (QEMU and CROSS), reason="needs aarch64-linux-gnu-gcc and qemu-aarch64-static "
                                                 "(Debian: gcc-aarch64-linux-gnu qemu-user-static)")
def test_aarch64_under_qemu_matches_host_bytes(rt, kernels, tiny, tmp_path):
    driver = B.build_program([B.DRIVER_SOURCE, B.TEST_KERNELS_SOURCE], "qos-run-test-aarch64",
                             cc="aarch64-linux-gnu-gcc", static=True, extra_flags=TEST_FLAGS)
    static_lib = B.build_static(cc="aarch64-linux-gnu-gcc")
    assert static_lib.stat().st_size > 0
    model = tmp_path / "tiny.qosm"
    model.write_bytes(tiny.data)
    with rt.open(tiny.data, kernels) as host:
        for seed in range(3):
            inp, x = _write_io(tmp_path, tiny, seed)
            for op in (0, 1):
                host.select(op)
                host_out = host.run(x).tobytes()
                out = tmp_path / f"a64_{seed}_{op}.bin"
                proc = subprocess.run([QEMU, str(driver), str(model), "--op", str(op), "--input", str(inp),
                                       "--output", str(out)], capture_output=True, text=True, timeout=120)
                assert proc.returncode == 0, proc.stderr
                assert out.read_bytes() == host_out == tiny.reference(x, op).tobytes()


def _race(prog: Path, tiny, tmp_path: Path, seconds: float, *extra: str) -> subprocess.CompletedProcess:
    model = tmp_path / "tiny.qosm"
    model.write_bytes(tiny.data)
    inp, x = _write_io(tmp_path, tiny, 5)
    e0, e1 = tmp_path / "e0.bin", tmp_path / "e1.bin"
    e0.write_bytes(tiny.reference(x, 0).tobytes())
    e1.write_bytes(tiny.reference(x, 1).tobytes())
    return subprocess.run([str(prog), str(model), str(inp), str(e0), str(e1), str(seconds), *extra],
                          capture_output=True, text=True, timeout=seconds * 10 + 60)


def test_select_racing_with_run_never_mixes_ops(tiny, tmp_path):
    seconds = float(os.environ.get("QOS_RACE_SECONDS", "2"))
    prog = B.build_program(["tests/qos_race.c", B.TEST_KERNELS_SOURCE], "qos_race", extra_flags=TEST_FLAGS)
    proc = _race(prog, tiny, tmp_path, seconds, "--spin", "300")
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stats = dict(kv.split("=") for kv in proc.stdout.split())
    assert int(stats["mixed"]) == 0 and int(stats["op0"]) > 0 and int(stats["op1"]) > 0
    assert int(stats["selects"]) > int(stats["runs"])


def test_race_check_detects_a_broken_runtime(tiny, tmp_path):
    """Self-check of the race test: a runtime that re-reads the OP per step must be caught mixing OPs."""
    prog = B.build_program(["tests/qos_race.c", B.TEST_KERNELS_SOURCE], "qos_race_broken",
                           extra_flags=[*TEST_FLAGS, "-DQOS_TEST_REREAD_OP"])
    proc = _race(prog, tiny, tmp_path, 3.0, "--spin", "20000", "--expect-mix")
    print(proc.stdout)
    assert proc.returncode == 0, "the race test did not detect the deliberately broken runtime:\n" + proc.stdout


def test_select_cost_benchmark_prints_ns(tiny, tmp_path):
    prog = B.build_program(["tests/qos_bench_select.c", B.TEST_KERNELS_SOURCE], "qos_bench_select",
                           extra_flags=TEST_FLAGS)
    model = tmp_path / "tiny.qosm"
    model.write_bytes(tiny.data)
    inp, _ = _write_io(tmp_path, tiny, 0)
    proc = subprocess.run([str(prog), str(model), "2000000", str(inp)], capture_output=True, text=True, timeout=120)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr
    ns = float(re.search(r"qos_select: ([0-9.]+) ns/call", proc.stdout).group(1))
    assert ns > 0
    assert re.search(r"qos_run: [0-9.]+ us/call", proc.stdout)


def test_newer_minor_version_with_an_extra_section_is_accepted(rt):
    """Minor versions may append sections: both readers bounds-check and skip unknown ones."""
    old = seed_manifests()["minimal.qosm"]        # no DATA section, so a 24-byte shift keeps alignment
    ns = M.SECTION_COUNT
    hs = M.HEADER.size + M.SECTION.size * ns
    table = bytearray(old[M.HEADER.size:hs])
    for i in range(ns):
        off, count, esz, res = struct.unpack_from("<QQII", table, i * 24)
        if off:
            struct.pack_into("<Q", table, i * 24, off + 24)
    body = old[hs:] + b"EXTRA\0\0\0"
    extra = struct.pack("<QQII", len(old) + 24, 8, 1, 0)    # unknown section id 16: 8 bytes at the end
    buf = bytearray(old[:M.HEADER.size] + table + extra + body)
    struct.pack_into("<HHII", buf, 4, M.VERSION_MAJOR, M.VERSION_MINOR + 1, hs + 24, ns + 1)
    struct.pack_into("<Q", buf, 16, len(buf))
    data = fix_crc(buf)
    assert read_manifest(data).version == (M.VERSION_MAJOR, M.VERSION_MINOR + 1)
    assert rt.try_open(data) == (0, "")
    bad = patch_header(data, "num_sections", "I", ns + 2)     # header_size no longer matches
    assert rt.try_open(bad)[0] == ERR["FORMAT"] and py_code(bad) == "format"
