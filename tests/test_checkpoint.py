"""The QoS checkpoint container: round trip, refusal of code payloads, bad files, atomic save."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from qos_compile import checkpoint
from qos_compile.checkpoint import FORMAT, load_checkpoint, save_checkpoint, verify_tables
from qos_compile.errors import QosError
from qos_compile.multipliers import bundled


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def sample_tensors() -> dict[str, torch.Tensor]:
    luts = torch.from_numpy(np.stack([m.lut for m in bundled().select(signed=True)[:3]]))
    return {
        "luts": luts,
        "conv1.weight": torch.randn(4, 3, 3, 3),
        "op1.bn1.weight": torch.ones(4, requires_grad=True),
        "assign": torch.tensor([[0, 1], [1, 2]], dtype=torch.int64),
        "mask": torch.tensor([True, False]),
        "view": torch.arange(100)[10:13],
    }


def leftovers(folder) -> list[str]:
    return [p for p in os.listdir(folder) if p.endswith(".tmp")]


def test_round_trip(tmp_path):
    tensors = sample_tensors()
    meta = {"arch": "resnet8", "ops": [{"scale": 0.3}], "names": ["a", "b"], "n": 4, "nested": {"x": None}}
    path = tmp_path / "model.pt"
    save_checkpoint(path, tensors, meta)
    got, got_meta = load_checkpoint(path)
    assert got_meta == meta
    assert set(got) == set(tensors)
    for k, t in tensors.items():
        assert torch.equal(got[k], t.detach()) and got[k].dtype == t.dtype
    assert got["view"].untyped_storage().nbytes() == 3 * 8   # a view is saved without its base
    assert leftovers(tmp_path) == []
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and raw["version"] == 1 and isinstance(raw["meta_json"], str)


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_malicious_raw_pickle_is_refused_and_never_runs(tmp_path, monkeypatch, protocol):
    marker = tmp_path / "pwned"
    # control: this payload really runs when unpickled unsafely
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(str(control)), protocol=protocol))
    assert control.exists()
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"format": FORMAT, "x": Payload(str(marker))}, protocol=protocol))
    # even with torch's escape hatch set in the environment
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(QosError, match="refusing to load .*code/objects that a QoS checkpoint never has") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_torch_file_is_refused_and_never_runs(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    obj = {"format": FORMAT, "version": 1, "meta_json": "{}", "tensors": {}, "x": Payload(str(marker))}
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(QosError, match="refusing to load"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_file(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, sample_tensors(), {"a": 1})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(QosError, match="truncated or corrupt") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


def test_not_a_qos_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    with pytest.raises(QosError, match="not a QoS checkpoint"):
        load_checkpoint(path)
    torch.save({"format": FORMAT, "version": 2, "meta_json": "{}", "tensors": {}}, path)
    with pytest.raises(QosError, match="unsupported QoS checkpoint version 2"):
        load_checkpoint(path)
    torch.save({"format": FORMAT, "version": 1, "meta_json": "{not json", "tensors": {}}, path)
    with pytest.raises(QosError, match="meta_json is not valid JSON"):
        load_checkpoint(path)
    torch.save({"format": FORMAT, "version": 1, "meta_json": "{}", "tensors": {"a": 1}}, path)
    with pytest.raises(QosError, match="must map names to tensors"):
        load_checkpoint(path)
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(QosError, match="not a PyTorch checkpoint file"):
        load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(QosError, match="empty file"):
        load_checkpoint(path)
    with pytest.raises(QosError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(QosError, match="not a file"):
        load_checkpoint(tmp_path)


def test_verify_tables():
    mults = bundled().select(signed=False)[:4]
    luts = torch.from_numpy(np.stack([m.lut for m in mults]))
    hashes = [m.sha256 for m in mults]
    names = [m.name for m in mults]
    verify_tables(luts, hashes, names)
    edited = luts.clone()
    edited[2, 10, 20] += 1
    with pytest.raises(QosError, match=f"table of circuit {names[2]} does not match"):
        verify_tables(edited, hashes, names)
    with pytest.raises(QosError, match="3 hashes"):
        verify_tables(luts, hashes[:3], names)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    save_checkpoint(path, {"a": torch.ones(3)}, {"v": 1})
    before = path.read_bytes()
    # meta that JSON cannot hold: refused before any file is touched
    with pytest.raises(QosError, match="not JSON-serialisable"):
        save_checkpoint(path, {"a": torch.zeros(3)}, {"v": object()})
    with pytest.raises(QosError, match="not JSON-serialisable"):
        save_checkpoint(path, {"a": torch.zeros(3)}, {"v": float("nan")})
    with pytest.raises(QosError, match="not a torch.Tensor"):
        save_checkpoint(path, {"a": np.zeros(3)}, {"v": 2})
    assert path.read_bytes() == before

    # a failure in the middle of writing: the old file survives and no temp file is left
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)  # checkpoint imports torch lazily
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, {"a": torch.zeros(3)}, {"v": 3})
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []
    assert load_checkpoint(path)[1] == {"v": 1}


def _no_torch_load(monkeypatch):
    """Fail the test if anything reaches torch.load: the refusal must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)


def test_oversized_archives_are_refused_before_torch_reads_them(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    save_checkpoint(path, sample_tensors(), {"a": "x" * 1000})
    load_checkpoint(path)
    _no_torch_load(monkeypatch)
    limits = checkpoint.ContainerLimits
    for lim, needle in [(limits(tensors=3), "6 tensors (at most 3)"),
                        (limits(tensor_bytes=1000, pickle_bytes=100), "bytes"),
                        (limits(pickle_bytes=64), "data.pkl"),
                        (limits(directory_bytes=100), "entries in a directory of")]:
        monkeypatch.setattr(checkpoint, "CONTAINER_LIMITS", lim)
        with pytest.raises(QosError) as e:
            load_checkpoint(path)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_oversized_meta_text_is_refused_before_parsing(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    save_checkpoint(path, {}, {"a": "x" * 5000})
    monkeypatch.setattr(checkpoint, "CONTAINER_LIMITS", checkpoint.ContainerLimits(meta_chars=4096))
    monkeypatch.setattr(checkpoint.json, "loads", lambda *a, **k: pytest.fail("meta was parsed"))
    with pytest.raises(QosError, match="meta_json has 50.. characters \\(at most 4096\\)"):
        load_checkpoint(path)


def test_compressed_or_lying_archives_are_refused(tmp_path, monkeypatch):
    import zipfile

    path = tmp_path / "model.pt"
    save_checkpoint(path, sample_tensors(), {"a": 1})
    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    _no_torch_load(monkeypatch)
    with pytest.raises(QosError, match="compressed entry"):
        load_checkpoint(deflated)
    # a central directory that claims more bytes than the file has (stored sizes patched)
    data = bytearray(path.read_bytes())
    at = data.rfind(b"PK\x01\x02")          # the last central directory entry
    data[at + 20:at + 24] = (1 << 30).to_bytes(4, "little")   # compressed size
    data[at + 24:at + 28] = (1 << 30).to_bytes(4, "little")   # uncompressed size
    lying = tmp_path / "lying.pt"
    lying.write_bytes(bytes(data))
    with pytest.raises(QosError) as e:
        load_checkpoint(lying)
    assert "\n" not in str(e.value) and ("corrupt" in str(e.value) or "bytes" in str(e.value))


def test_legacy_torch_files_are_refused_unread(tmp_path, monkeypatch):
    path = tmp_path / "legacy.pt"
    torch.save({"format": FORMAT, "version": 1, "meta_json": "{}", "tensors": {"w": torch.ones(2)}}, path,
               _use_new_zipfile_serialization=False)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"format": FORMAT, "version": 1, "meta_json": "{}", "tensors": {}}))
    _no_torch_load(monkeypatch)
    for p in (path, raw):
        with pytest.raises(QosError, match="refusing to load|not a QoS checkpoint") as e:
            load_checkpoint(p)
        assert "\n" not in str(e.value)
