"""`qos-nets multipliers list|show|import|remove`."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qos_compile.cli.multipliers import JSON_FIELDS
from qos_compile.cli.nets import main
from qos_compile.multipliers import bundled
from qos_compile.multipliers.user_library import load_multiplier_file

BY_NAME = {m.name: m for m in bundled()}
needs_cc = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")),
                              reason="no C compiler")
EXPECTED_FIELDS = ["name", "aliases", "signed", "power_mw", "area_um2", "delay_ns", "mae", "mae_pct", "wce",
                   "wce_pct", "mre_pct", "wcre_pct", "ep_pct", "mse", "mean_error", "std_error", "sha256"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_process(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real command line, in a fresh interpreter (QOS_COMPILE_HOME comes from the test's environment)."""
    return subprocess.run([sys.executable, "-m", "qos_compile.cli.nets", *argv], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


# --------------------------------------------------------------------------- list
def test_list_json_fields_and_rows(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "multipliers", "list", "--json")
    assert code == 0 and err == ""
    rows = json.loads(out)
    assert len(rows) == 64 and list(JSON_FIELDS) == EXPECTED_FIELDS
    assert all(list(r) == EXPECTED_FIELDS for r in rows)
    assert [r["name"] for r in rows] == [m.name for m in bundled()]
    r = next(r for r in rows if r["name"] == "mul8s_1KVA")
    m = BY_NAME["mul8s_1KVA"]
    assert r["aliases"] == ["v2022:mul8s_1KV8"] and r["signed"] is True and r["power_mw"] == 0.422
    assert r["mae"] == 1.25 and r["sha256"] == m.sha256 and r["std_error"] == m.metrics.std_error


@pytest.mark.parametrize("flag, count, signed", [("--signed", 13, True), ("--unsigned", 51, False)])
def test_list_by_signedness(capsys: pytest.CaptureFixture[str], flag: str, count: int, signed: bool) -> None:
    rows = json.loads(run(capsys, "multipliers", "list", flag, "--json")[1])
    assert len(rows) == count and all(r["signed"] is signed for r in rows)
    code, out, _ = run(capsys, "multipliers", "list", flag)
    assert code == 0 and len(out.splitlines()) == count + 1


def test_list_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "multipliers", "list")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 65
    assert lines[0].split() == ["name", "kind", "power", "mW", "area", "um2", "MAE%", "WCE%", "MRE%", "EP%", "bias",
                                "aliases"]
    assert [ln.split()[0] for ln in lines[1:]] == [m.name for m in bundled()]
    assert lines[2].split() == ["mul8s_1KVA", "signed", "0.4220", "711.0", "0.0019", "0.008", "0.28", "50.00",
                                "-1.25", "v2022:mul8s_1KV8"]
    kind_col = lines[0].index("kind")  # aligned: every row's second column starts under its header
    assert all(ln[kind_col:].startswith(("signed", "unsigned")) and ln[kind_col - 1] == " " for ln in lines[1:])


def test_list_mutually_exclusive_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["multipliers", "list", "--signed", "--unsigned"])
    assert e.value.code == 2


# --------------------------------------------------------------------------- show
@pytest.mark.parametrize("name, primary", [("mul8u_2AC", "mul8u_2AC"), ("mul8s_1KV6", "mul8s_1KV8"),
                                           ("master:mul8s_1KV8", "mul8s_1KV8"), ("v2022:mul8s_1KV8", "mul8s_1KVA")])
def test_show(capsys: pytest.CaptureFixture[str], name: str, primary: str) -> None:
    m = BY_NAME[primary]
    code, out, err = run(capsys, "multipliers", "show", name)
    assert code == 0 and err == ""
    assert f"name:        {primary}" in out and m.sha256 in out and m.citation in out and m.source in out
    for published in m.published.values():
        assert published in out
    code, out, _ = run(capsys, "multipliers", "show", name, "--json")
    rec = json.loads(out)
    assert code == 0 and list(rec)[: len(EXPECTED_FIELDS)] == EXPECTED_FIELDS
    assert rec["name"] == primary and rec["published"] == dict(m.published) and rec["citation"] == m.citation
    assert rec["is_exact"] is m.is_exact and rec["file"] is None


def test_show_places_published_next_to_computed(capsys: pytest.CaptureFixture[str]) -> None:
    out = run(capsys, "multipliers", "show", "mul8s_1KRC")[1]
    mae_row = next(ln for ln in out.splitlines() if ln.startswith("MAE [lsb]"))
    assert mae_row.split()[-2:] == ["36.5352", "36"]


# --------------------------------------------------------------------------- import
@pytest.fixture
def c_model(tmp_path: Path) -> Path:
    p = tmp_path / "model.c"
    p.write_text("#include <stdint.h>\n"
                 "uint16_t mul8u_TRNC(uint8_t B, uint8_t A) { return (uint16_t)((A & 0xF0) * B); }\n")
    return p


@needs_cc
def test_import_c_into_user_library(capsys: pytest.CaptureFixture[str], qos_home: Path, c_model: Path) -> None:
    code, out, err = run(capsys, "multipliers", "import", str(c_model), "--name", "mul8u_TRNC", "--power-mw", "0.2")
    assert code == 0 and err == ""
    saved = qos_home / "multipliers" / "mul8u_TRNC.npz"
    assert f"saved to {saved}" in out and "port A = A, port B = B (by parameter name)" in out
    m = load_multiplier_file(saved)
    u = np.arange(256)
    np.testing.assert_array_equal(m.lut, np.outer(u & 0xF0, u))
    assert m.power_mw == 0.2 and m.area_um2 is None and m.source == str(c_model.resolve())
    rows = json.loads(run(capsys, "multipliers", "list", "--json")[1])
    assert len(rows) == 65 and rows[-1]["name"] == "mul8u_TRNC" and rows[-1]["area_um2"] is None
    code, out, _ = run(capsys, "multipliers", "show", "mul8u_TRNC")
    assert code == 0 and f"stored in:   {saved}" in out
    code, out, _ = run(capsys, "multipliers", "remove", "mul8u_TRNC")
    assert code == 0 and not saved.exists()


def test_import_table_to_output_file(capsys: pytest.CaptureFixture[str], qos_home: Path, tmp_path: Path) -> None:
    ref = BY_NAME["mul8s_1KR6"]
    np.save(tmp_path / "t.npy", ref.lut)
    out_file = tmp_path / "out" / "copy.npz"
    code, out, err = run(capsys, "multipliers", "import", str(tmp_path / "t.npy"), "--name", "copy", "--signed",
                         "--output", str(out_file))
    assert code == 0 and err == ""
    assert "note: the same table as library circuit mul8s_1KR6" in out and f"saved to {out_file}" in out
    assert load_multiplier_file(out_file) == ref
    assert not (qos_home / "multipliers").exists()  # --output does not touch the user library


def test_import_tfapprox_bin(capsys: pytest.CaptureFixture[str], qos_home: Path, tmp_path: Path) -> None:
    lut = np.outer(np.arange(256) & 0xFE, np.arange(256))
    (tmp_path / "t.bin").write_bytes(lut.astype("<u2").tobytes())
    code, _, err = run(capsys, "multipliers", "import", str(tmp_path / "t.bin"), "--name", "mul8u_BIN")
    assert code == 0 and err == ""
    np.testing.assert_array_equal(load_multiplier_file(qos_home / "multipliers" / "mul8u_BIN.npz").lut, lut)


# ------------------------------------------------------------- errors: one line, exit 2, nothing written
def _bad_inputs(tmp_path: Path) -> dict[str, list[str]]:
    np.save(tmp_path / "shape.npy", np.zeros((256, 128), np.int32))
    np.save(tmp_path / "float.npy", np.zeros((256, 256), np.float64))
    np.save(tmp_path / "big.npy", np.full((256, 256), 2**40, np.int64))
    np.savez_compressed(tmp_path / "ok.npz", lut=np.outer(np.arange(256) & 0xFC, np.arange(256)))
    data = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "broken.c").write_text(
        "#include <stdint.h>\nuint16_t mul8u_X(uint8_t A, uint8_t B) { return A * ; }\n")
    (tmp_path / "nofunc.c").write_text("int add(int a) { return a + 1; }\nstatic int k = 3;\n")
    np.save(tmp_path / "exact.npy", np.outer(np.arange(256), np.arange(256)))
    imp = ["multipliers", "import"]
    return {
        "wrong shape": [*imp, "shape.npy", "--name", "mul8u_A", "--unsigned"],
        "float dtype": [*imp, "float.npy", "--name", "mul8u_A"],
        "outside int32": [*imp, "big.npy", "--name", "mul8u_A"],
        "truncated npz": [*imp, "truncated.npz", "--name", "mul8u_A"],
        "C does not compile": [*imp, "broken.c", "--name", "mul8u_A"],
        "C without multiplier": [*imp, "nofunc.c", "--name", "mul8u_A", "--unsigned"],
        "missing file": [*imp, "nothing.npy", "--name", "mul8u_A"],
        "unknown signedness": [*imp, "ok.npz", "--name", "mine"],
        "name taken": [*imp, "ok.npz", "--name", "mul8u_2AC"],
        "ambiguous name taken": [*imp, "ok.npz", "--name", "mul8s_1KV8", "--signed"],
        "table taken": [*imp, "exact.npy", "--name", "mul8u_A"],
        "invalid name": [*imp, "ok.npz", "--name", "v2022:x", "--unsigned"],
        "unknown suffix": [*imp, "broken.txt", "--name", "mul8u_A"],
        "bad output suffix": [*imp, "ok.npz", "--name", "mul8u_A", "--output", "x.npy"],
        "show unknown": ["multipliers", "show", "mul8u_NOPE"],
        "show ambiguous": ["multipliers", "show", "mul8s_1KV8"],
        "remove bundled": ["multipliers", "remove", "mul8u_2AC"],
    }


BAD_IDS = ["wrong shape", "float dtype", "outside int32", "truncated npz", "C does not compile",
           "C without multiplier", "missing file", "unknown signedness", "name taken", "ambiguous name taken",
           "table taken", "invalid name", "unknown suffix", "bad output suffix", "show unknown", "show ambiguous",
           "remove bundled"]


@pytest.mark.parametrize("case", BAD_IDS)
def test_bad_input_in_process(capsys: pytest.CaptureFixture[str], qos_home: Path, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    if case.startswith("C ") and not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler")
    argv = _bad_inputs(tmp_path)[case]
    assert set(_bad_inputs(tmp_path)) == set(BAD_IDS)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("qos-nets: error: ") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no stray output file
    assert not (qos_home / "multipliers").exists() or not any((qos_home / "multipliers").iterdir())


@pytest.mark.parametrize("case", ["wrong shape", "float dtype", "outside int32", "truncated npz",
                                  "C does not compile", "C without multiplier", "show unknown", "show ambiguous"])
def test_bad_input_real_process(qos_home: Path, tmp_path: Path, case: str) -> None:
    if case.startswith("C ") and not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler")
    res = run_process(*_bad_inputs(tmp_path)[case], cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stdout == "" and "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qos-nets: error: "), res.stderr
    assert not (qos_home / "multipliers").exists() or not any((qos_home / "multipliers").iterdir())


def test_ambiguous_message_names_both_meanings(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "multipliers", "show", "mul8s_1KV8")
    assert code == 2 and "master:mul8s_1KV8" in err and "v2022:mul8s_1KV8" in err


def test_real_process_list_json(qos_home: Path, tmp_path: Path) -> None:
    res = run_process("multipliers", "list", "--json", cwd=tmp_path)
    assert res.returncode == 0 and res.stderr == ""
    assert len(json.loads(res.stdout)) == 64
