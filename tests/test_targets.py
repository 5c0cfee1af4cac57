"""The target table: every targets/*.toml loads, aliases resolve, clear errors."""
from __future__ import annotations

import dataclasses
import shutil

import pytest

from qos_compile.errors import QosError
from qos_compile.targets import (Target, builtin_targets_dir, get_target, host_arch, host_target,
                                 load_targets)

REQUIRED = {"x86_64", "aarch64", "aarch64-cortex-a53", "aarch64-cortex-a72", "aarch64-cortex-a76"}


def test_every_file_loads_into_the_table():
    files = sorted(p.stem for p in builtin_targets_dir().glob("*.toml"))
    table = load_targets()
    assert REQUIRED <= set(files)
    assert set(files) <= set(table)
    for name, t in table.items():
        assert isinstance(t, Target) and t.name == name
        assert t.description and t.package and t.cc
        assert t.tvm["kind"] == "llvm" and t.tvm["mtriple"].startswith(t.arch)
        assert t.tvm.get("mcpu") != "native"                   # resolved at load time
        assert isinstance(t.emulator, (list, type(None)))
        assert all(isinstance(f, str) for f in t.features)


def test_tvm_targets_build():
    for t in load_targets().values():
        tt = t.tvm_target()
        assert str(tt.attrs["mtriple"]) == t.tvm["mtriple"]


def test_arm_variants_and_features():
    a = get_target("aarch64")
    assert "neon" in a.features and a.arch == "aarch64"
    assert a.emulator and a.emulator[0] == "qemu-aarch64-static"
    assert a.package == "gcc-aarch64-linux-gnu"
    a76 = get_target("aarch64-cortex-a76")
    assert a76.has("dotprod") and "+dotprod" in a76.tvm["mattr"] and a76.tvm["mcpu"] == "cortex-a76"
    for cpu in ("a53", "a72"):
        t = get_target(f"aarch64-cortex-{cpu}")
        assert t.tvm["mcpu"] == f"cortex-{cpu}" and not t.has("dotprod")


@pytest.mark.parametrize("alias,name", [("arm", "aarch64"), ("arm64", "aarch64"), ("aarch64", "aarch64"),
                                        ("cortex-a76", "aarch64-cortex-a76"), ("host", "x86_64")])
def test_aliases_resolve(alias, name):
    assert get_target(alias).name == name
    assert get_target(get_target(alias)) is get_target(alias)


def test_kernel_costs_of_measured_and_estimated_targets(tmp_path):
    from qos_compile.targets import COST_KEYS
    from qos_compile.tvm.variants import DEFAULT_COSTS, VARIANTS

    assert COST_KEYS == tuple(dict.fromkeys(v.cost_key for v in VARIANTS))   # from the registry
    assert set(DEFAULT_COSTS) == set(COST_KEYS)                       # a target file may state each default
    for name in ("aarch64", "aarch64-cortex-a53", "aarch64-cortex-a55", "aarch64-cortex-a72", "aarch64-cortex-a76"):
        t = get_target(name)
        runs = {v.cost_key for v in VARIANTS if v.available(t.features)}
        assert set(t.kernel_costs) == runs, name                        # every key it runs, estimated
        assert "ESTIMATED (llvm-mca " in t.source.read_text(), name    # and labelled so
        assert t.kernel_costs["gather"] > 1.0, name                     # a model, not qemu's ranking
    assert get_target("x86_64-avx2").kernel_costs == {"lowrank": 1.05, "dot": 0.95, "gather": 6.0, "pshufb_rows": 8.5,
                                                      "pshufb_rows8": 4.8}
    from qos_compile.targets import _parse

    host = get_target("x86_64")                    # the defaults, or this CPU's own measurement
    assert host.costs_mcpu in (None, host.tvm["mcpu"])
    assert (host.kernel_costs == {}) == (host.costs_mcpu is None)

    path = tmp_path / "aarch64.toml"                                   # a key that is no cost key
    path.write_text(get_target("aarch64").source.read_text().replace("[kernel_costs]", "[kernel_costs]\nfast = 1.0"))
    with pytest.raises(QosError, match=r"\[kernel_costs\] takes positive numbers for masked, dot"):
        _parse(path)


def test_host_target_is_native():
    t = host_target()
    assert t.is_host and t.arch == host_arch()
    if host_arch() == "x86_64":
        assert t.name == "x86_64"
        assert t.tvm["mcpu"] not in ("native", "")
        flags = open("/proc/cpuinfo").read()
        if " avx2" in flags:
            assert t.has("avx2")
        assert not get_target("aarch64").is_host
        assert get_target("aarch64").run_prefix()[0] == "qemu-aarch64-static"
        assert t.run_prefix() == []


def test_unknown_target_lists_valid_names():
    with pytest.raises(QosError) as e:
        get_target("riscv-nonexistent")
    msg = str(e.value)
    assert "riscv-nonexistent" in msg
    for name in load_targets():
        assert name in msg
    assert "arm" in msg and "\n" not in msg


def test_missing_compiler_names_the_package():
    t = dataclasses.replace(get_target("aarch64"), cc="aarch64-qos-missing-gcc")
    with pytest.raises(QosError) as e:
        t.check_toolchain()
    assert "gcc-aarch64-linux-gnu" in str(e.value) and "aarch64-qos-missing-gcc" in str(e.value)


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="cross compiler not installed")
def test_present_compiler_is_found():
    assert get_target("arm").check_toolchain().endswith("aarch64-linux-gnu-gcc")


def test_missing_emulator_names_the_package():
    t = dataclasses.replace(get_target("aarch64"), emulator=["qemu-qos-missing"])
    if t.is_host:
        pytest.skip("aarch64 host")
    with pytest.raises(QosError, match="qemu-user-static"):
        t.run_prefix()


def _write(d, name, text):
    (d / f"{name}.toml").write_text(text)


BOARD = """
name = "myboard"
arch = "aarch64"
aliases = ["board"]
description = "a user board"
package = "gcc-aarch64-linux-gnu"
features = ["neon"]
[tvm]
kind = "llvm"
mtriple = "aarch64-linux-gnu"
mattr = ["+neon"]
[toolchain]
cc = "aarch64-linux-gnu-gcc"
"""


def test_user_target_folder(tmp_path, monkeypatch):
    _write(tmp_path, "myboard", BOARD)
    monkeypatch.setenv("QOS_TARGETS_PATH", str(tmp_path))
    t = get_target("board")
    assert t.name == "myboard" and t.emulator is None and t.cflags == () and t.kernel_costs == {}
    assert "aarch64" in load_targets()          # the repository's targets are still there


@pytest.mark.parametrize("text,match", [
    (BOARD.replace('name = "myboard"', 'name = "other"'), "must equal the file name"),
    (BOARD.replace('arch = "aarch64"', 'arch = "aarch64"\nbogus = 1'), "unknown keys"),
    (BOARD.replace('cc = "aarch64-linux-gnu-gcc"', 'cc = ""'), "cc"),
    (BOARD.replace('features = ["neon"]', 'features = "neon"'), "features"),
    (BOARD.replace('mtriple = "aarch64-linux-gnu"', ''), "mtriple"),
    ("name = [", "cannot read"),
    (BOARD.replace('aliases = ["board"]', 'aliases = ["arm"]'), "used by both"),
    (BOARD.replace('[tvm]', '[kernel_costs]\nfast = 1.0\n[tvm]'), "kernel_costs"),
    (BOARD.replace('[tvm]', '[kernel_costs]\ngather = -1\n[tvm]'), "kernel_costs"),
])
def test_malformed_target_file(tmp_path, monkeypatch, text, match):
    _write(tmp_path, "myboard", text)
    monkeypatch.setenv("QOS_TARGETS_PATH", str(tmp_path))
    with pytest.raises(QosError, match=match):
        load_targets()


def test_kernel_costs_follow_the_targets_cpu(tmp_path):
    """A target file's [kernel_costs_by_mcpu.<cpu>] replaces its [kernel_costs] where the resolved
    mcpu is <cpu>; on Zen 5's measured costs a table that fits rows8 runs it, where the general
    costs price rows cheaper."""
    from qos_compile.multipliers import get
    from qos_compile.targets import _parse
    from qos_compile.tvm.lowering import choose_conv_lowering

    text = get_target("x86_64").source.read_text()
    assert "[kernel_costs_by_mcpu.znver5]" in text and "2026-12-07" in text
    path = tmp_path / "x86_64.toml"
    # a general [kernel_costs] that makes rows the cheapest; Zen 5's own costs replace it there
    text = text.replace("[tvm]", "[kernel_costs]\nrows = 1.0\n\n[tvm]", 1)
    path.write_text(text.replace('mcpu = "native"', 'mcpu = "znver5"'))
    zen5 = _parse(path)
    assert zen5.costs_mcpu == "znver5" and zen5.kernel_costs["gather"] == 22.0 and zen5.kernel_costs["rows8"] == 1.3
    path.write_text(text.replace('mcpu = "native"', 'mcpu = "icelake-server"'))
    other = _parse(path)
    assert other.costs_mcpu is None and other.kernel_costs == {"rows": 1.0}
    vbmi = frozenset({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avx512vbmi"})
    dg8 = [get("mul8u_DG8").lut]
    assert choose_conv_lowering(dg8, False, vbmi, taps=144, costs=zen5.kernel_costs).describe() == \
        "u8-lutconv-avx512vbmi-rows8"
    assert choose_conv_lowering(dg8, False, vbmi, taps=144, costs=other.kernel_costs).describe() == \
        "u8-lutconv-avx512vbmi-rows"
    path.write_text(text.replace("gather = 22.0", "gather = -1"))
    with pytest.raises(QosError, match=r"\[kernel_costs_by_mcpu.znver5\] takes positive numbers"):
        _parse(path)
    path.write_text(text.replace("[kernel_costs_by_mcpu.znver5]", "[kernel_costs_by_mcpu]\nznver5 = 1"))
    with pytest.raises(QosError, match=r"takes positive numbers"):
        _parse(path)


def test_code_for_features_this_cpu_lacks_is_not_run(monkeypatch, tmp_path, capsys):
    """A host-arch target whose features the CPU lacks (AVX-VNNI on Zen 2-4) is refused with one
    line by whatever would run its code, not stopped by an illegal instruction."""
    import qos_compile.targets as T
    from qos_compile.bench import kernels

    t = get_target("x86_64-avxvnni")
    assert "avx_vnni" in t.features and t.tvm["mattr"] == ["+avxvnni"]
    if host_arch() != "x86_64":
        assert t.missing_features() == frozenset()
        return
    monkeypatch.setattr(T, "_host_cpu_features", lambda: frozenset({"sse2", "sse4_1", "avx", "avx2", "fma"}))
    assert t.missing_features() == {"avx_vnni"} and get_target("x86_64-avx2").missing_features() == frozenset()
    with pytest.raises(QosError, match=r"^target x86_64-avxvnni's code cannot run on this CPU: it lacks avx_vnni$"):
        t.run_prefix()
    assert kernels.main(["--target", "alderlake", "--no-network"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "kernels: error: target x86_64-avxvnni's code cannot run on this CPU: it lacks avx_vnni", err
