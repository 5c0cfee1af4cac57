"""The bundled library's lookup rules and the user library (save/load, clashes, atomic writes)."""
from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from qos_compile.errors import QosError
from qos_compile.multipliers import Multiplier, bundled, exact_table
from qos_compile.multipliers.user_library import (
    add_user_multiplier,
    check_addable,
    home_dir,
    load_library,
    load_multiplier_file,
    remove_user_multiplier,
    save_multiplier,
    user_dir,
    user_multipliers,
)


def approx(name: str = "mine", signed: bool = False, k: int = 2, **kw: object) -> Multiplier:
    """A circuit not in the bundled library: exact product with the k low bits of A cleared."""
    codes = np.arange(256) - (128 if signed else 0)
    lut = np.outer(codes & ~((1 << k) - 1), codes)
    return Multiplier(name=name, signed=signed, lut=lut, **kw)  # type: ignore[arg-type]


def one_line(e: pytest.ExceptionInfo[QosError]) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


# --------------------------------------------------------------------------- bundled
def test_bundled_library_shape() -> None:
    lib = bundled()
    assert len(lib) == 64 and len(lib.select(True)) == 13 and len(lib.select(False)) == 51
    assert len({m.sha256 for m in lib}) == 64


def test_bundled_lookup_by_name_alias_and_qualified_name() -> None:
    lib = bundled()
    assert lib.get("mul8s_1KV6").name == "mul8s_1KV8"          # v2022 alias of the exact signed circuit
    assert lib.get("master:mul8s_1KV8").name == "mul8s_1KV8"
    assert lib.get("v2022:mul8s_1KV8").name == "mul8s_1KVA"
    assert lib.get("v2022:mul8u_17C8").name == "mul8u_17KS"
    for name in ("mul8s_1KV8", "mul8s_1KVA", "mul8u_17C8"):
        with pytest.raises(QosError) as e:
            lib.get(name)
        assert "ambiguous" in one_line(e)
    with pytest.raises(QosError) as e:
        lib.get("mul8u_NOPE")
    assert "unknown multiplier" in one_line(e)
    assert lib.exact(False).name == "mul8u_1JFF" and lib.exact(True).name == "mul8s_1KV8"


def test_library_copy_is_independent() -> None:
    lib = bundled()
    copy = lib.copy()
    copy.add(approx())
    assert len(copy) == 65 and len(lib) == 64 and "mine" in copy and "mine" not in lib
    assert copy.get("v2022:mul8s_1KV8").name == "mul8s_1KVA"  # qualified names survive the copy


# --------------------------------------------------------------------------- file format
def test_home_and_user_dir(qos_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert home_dir() == qos_home and user_dir() == qos_home / "multipliers"
    monkeypatch.delenv("QOS_COMPILE_HOME")
    monkeypatch.setenv("HOME", "/home/someone")
    assert user_dir() == Path("/home/someone/.local/share/qos-compile/multipliers")


def test_save_and_load_keep_every_field(tmp_path: Path) -> None:
    ref = bundled().get("master:mul8s_1KV8")
    path = save_multiplier(ref, tmp_path / "x.npz")
    m = load_multiplier_file(path)
    for f in dataclasses.fields(Multiplier):
        got, want = getattr(m, f.name), getattr(ref, f.name)
        if isinstance(want, np.ndarray):
            np.testing.assert_array_equal(got, want)
        else:
            assert got == want, f.name
    assert m.sha256 == ref.sha256


def test_saved_file_is_plain_numpy_without_pickle(tmp_path: Path) -> None:
    path = save_multiplier(approx(power_mw=0.1, citation="me"), tmp_path / "x.npz")
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == ["lut", "meta"]
        assert z["lut"].dtype == np.dtype("<i4") and z["lut"].shape == (256, 256)
        meta = json.loads(str(z["meta"][()]))
    assert meta["format"] == "qos-compile.multiplier" and meta["version"] == 1
    assert meta["name"] == "mine" and meta["power_mw"] == 0.1 and meta["area_um2"] is None
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_save_refuses_other_suffix_and_unwritable_places(tmp_path: Path) -> None:
    with pytest.raises(QosError):
        save_multiplier(approx(), tmp_path / "x.npy")
    (tmp_path / "file").write_text("")
    with pytest.raises(QosError) as e:
        save_multiplier(approx(), tmp_path / "file" / "x.npz")  # parent is a file
    assert "cannot write" in one_line(e)


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_multiplier(approx(), tmp_path / "x.npz")
    before = path.read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", boom)
    with pytest.raises(QosError) as e:
        save_multiplier(approx(k=3), path)
    assert "No space left" in one_line(e)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def _rewrite(path: Path, lut: np.ndarray | None = None, **meta_changes: object) -> None:
    with np.load(path, allow_pickle=False) as z:
        old_lut, meta = z["lut"], json.loads(str(z["meta"][()]))
    meta.update(meta_changes)
    np.savez(path, lut=old_lut if lut is None else lut, meta=np.array(json.dumps(meta)))


@pytest.mark.parametrize("change, fragment", [
    ({"format": "something"}, "not a qos-compile multiplier file"),
    ({"version": 99}, "format version"),
    ({"signed": "yes"}, "'signed'"),
    ({"power_mw": "hot"}, "'power_mw'"),
    ({"aliases": [1]}, "strings"),
    ({"name": "bad:name"}, "invalid multiplier name"),
    ({"sha256": "0" * 64}, "corrupt"),
])
def test_load_rejects_bad_metadata(tmp_path: Path, change: dict, fragment: str) -> None:
    path = save_multiplier(approx(), tmp_path / "x.npz")
    _rewrite(path, **change)
    with pytest.raises(QosError) as e:
        load_multiplier_file(path)
    assert fragment in one_line(e)


def test_load_rejects_tampered_table_and_broken_files(tmp_path: Path) -> None:
    path = save_multiplier(approx(), tmp_path / "x.npz")
    _rewrite(path, lut=exact_table(False).astype(np.int32))
    with pytest.raises(QosError) as e:
        load_multiplier_file(path)
    assert "corrupt" in one_line(e)
    data = save_multiplier(approx(), tmp_path / "y.npz").read_bytes()
    (tmp_path / "y.npz").write_bytes(data[:100])
    with pytest.raises(QosError) as e:
        load_multiplier_file(tmp_path / "y.npz")
    assert "not a readable multiplier file" in one_line(e)
    np.savez(tmp_path / "z.npz", a=np.zeros(3))
    with pytest.raises(QosError):
        load_multiplier_file(tmp_path / "z.npz")
    with zipfile.ZipFile(tmp_path / "p.npz", "w") as zf:  # a pickled member must never be loaded
        zf.writestr("lut.npy", open(_pickled_npy(tmp_path), "rb").read())
        zf.writestr("meta.npy", open(_pickled_npy(tmp_path), "rb").read())
    with pytest.raises(QosError):
        load_multiplier_file(tmp_path / "p.npz")


def _pickled_npy(tmp_path: Path) -> Path:
    p = tmp_path / "obj.npy"
    np.save(p, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    return p


# --------------------------------------------------------------------------- the user library
def test_empty_user_library_is_the_bundled_one(qos_home: Path) -> None:
    lib = load_library()
    assert [m.name for m in lib] == [m.name for m in bundled()]
    assert not (qos_home / "multipliers").exists()


def test_add_load_and_remove(qos_home: Path) -> None:
    path = add_user_multiplier(approx("mul8u_MINE"))
    assert path == qos_home / "multipliers" / "mul8u_MINE.npz" and path.is_file()
    add_user_multiplier(approx("mul8s_MINE", signed=True))
    lib = load_library()
    assert len(lib) == 66 and [m.name for m in lib][-2:] == ["mul8s_MINE", "mul8u_MINE"]  # after bundled, by file
    assert lib.get("mul8u_MINE") == approx() and lib.get("mul8s_MINE").signed
    assert [m.name for _, m in user_multipliers()] == ["mul8s_MINE", "mul8u_MINE"]
    assert len(bundled()) == 64  # the cached bundled library is untouched
    assert remove_user_multiplier("mul8u_MINE") == path and not path.exists()
    assert "mul8u_MINE" not in load_library()


@pytest.mark.parametrize("m, fragment", [
    (approx("mul8u_2AC"), "already taken"),                 # a bundled primary name
    (approx("mul8s_1KV6"), "already taken"),                # a bundled alias
    (approx("mul8s_1KV8"), "already taken"),                # an ambiguous bundled name
    (dataclasses.replace(bundled().get("mul8u_2AC"), name="other", aliases=()), "same table"),
    (approx("x", aliases=("mul8u_1JFF",)), "already taken"),
])
def test_clashes_are_refused_and_nothing_written(qos_home: Path, m: Multiplier, fragment: str) -> None:
    with pytest.raises(QosError) as e:
        add_user_multiplier(m)
    assert fragment in one_line(e)
    assert not (qos_home / "multipliers").exists()


def test_clash_with_an_earlier_import(qos_home: Path) -> None:
    add_user_multiplier(approx("first"))
    with pytest.raises(QosError) as e:
        add_user_multiplier(approx("first", k=3))
    assert "already taken" in one_line(e)
    with pytest.raises(QosError) as e:
        add_user_multiplier(approx("second"))
    assert "same table" in one_line(e)
    assert [p.name for p in (qos_home / "multipliers").iterdir()] == ["first.npz"]


def test_check_addable_against_a_given_library() -> None:
    check_addable(approx("fresh"))
    lib = bundled().copy()
    lib.add(approx("fresh"))
    with pytest.raises(QosError):
        check_addable(approx("fresh", k=3), lib)
    assert len(lib) == 65  # the check does not add


def test_broken_user_files_give_one_clear_error(qos_home: Path) -> None:
    d = qos_home / "multipliers"
    d.mkdir()
    (d / "junk.npz").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(QosError) as e:
        load_library()
    assert "junk.npz" in one_line(e) and "remove" in one_line(e)
    (d / "junk.npz").unlink()
    save_multiplier(approx("inner"), d / "outer.npz")  # file name must match the circuit name
    with pytest.raises(QosError) as e:
        load_library()
    assert "outer.npz" in one_line(e)
    (d / "outer.npz").unlink()
    save_multiplier(approx("mul8u_1JFF"), d / "mul8u_1JFF.npz")  # copied in by hand, clashes with bundled
    with pytest.raises(QosError) as e:
        load_library()
    assert "mul8u_1JFF.npz" in one_line(e)


def test_temporary_files_in_the_folder_are_ignored(qos_home: Path) -> None:
    d = qos_home / "multipliers"
    d.mkdir()
    (d / ".mine.npz.abc.tmp").write_bytes(b"partial")
    assert len(load_library()) == 64


def test_remove_errors(qos_home: Path) -> None:
    for name, fragment in (("mul8u_2AC", "bundled"), ("mul8s_1KV6", "bundled"), ("nothing", "no imported circuit")):
        with pytest.raises(QosError) as e:
            remove_user_multiplier(name)
        assert fragment in one_line(e)
