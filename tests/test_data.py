"""Datasets: digits split determinism, CIFAR/TinyImageNet from fabricated local fixtures, safe unpickling, errors."""
from __future__ import annotations

import hashlib
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from qos_compile.data import load_dataset, safe_load, stratified_split
from qos_compile.errors import QosError

# ----------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _sha(idx: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(idx, dtype="<i8").tobytes()).hexdigest()


def test_digits_shapes(digits):
    assert (digits.name, digits.num_classes, digits.in_channels, digits.image_size) == ("digits", 10, 1, 16)
    assert (len(digits.train), len(digits.val), len(digits.test)) == (1259, 269, 269)
    x, y = digits.train[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    xb, yb = digits.test[[0, 1, 2]]
    assert xb.shape == (3, 1, 16, 16) and yb.shape == (3,)
    # normalised with the training split's statistics
    xt, _ = digits.train.tensors
    assert abs(float(xt.mean())) < 1e-4 and abs(float(xt.std()) - 1) < 1e-3
    assert digits.classes == tuple(str(i) for i in range(10))


def test_digits_split_is_stratified_and_disjoint(digits):
    parts = [d.source_indices for d in (digits.train, digits.val, digits.test)]
    every = np.concatenate(parts)
    assert len(every) == 1797 and len(np.unique(every)) == 1797
    for d in (digits.val, digits.test):
        counts = np.bincount(d.labels.numpy(), minlength=10)
        assert counts.max() - counts.min() <= 1


def test_digits_split_is_fixed_across_runs_and_machines(digits):
    # hard-coded: the split depends only on the seed (legacy RandomState stream), never on the machine
    assert digits.train.source_indices[:8].tolist() == [0, 1, 2, 4, 6, 8, 9, 10]
    assert digits.val.source_indices[:8].tolist() == [3, 7, 13, 19, 36, 43, 48, 55]
    assert digits.test.source_indices[:8].tolist() == [5, 16, 22, 26, 33, 38, 44, 47]
    assert _sha(digits.train.source_indices).startswith("7764df8cd25202ce")
    assert _sha(digits.val.source_indices).startswith("2ccc59c032a8649f")
    assert _sha(digits.test.source_indices).startswith("83326c2f2da81fca")
    again = load_dataset("digits", seed=0)
    assert torch.equal(again.train.images, digits.train.images)
    other = load_dataset("digits", seed=1)
    assert not np.array_equal(other.val.source_indices, digits.val.source_indices)


def test_digits_resize_and_loaders():
    d = load_dataset("digits", image_size=32, seed=3)
    assert d.image_size == 32 and d.train.images.shape[1:] == (1, 32, 32)
    loaders = d.loaders(100, seed=5)
    xb, yb = next(iter(loaders.train))
    assert xb.shape == (100, 1, 32, 32) and yb.shape == (100,)
    again = next(iter(d.loaders(100, seed=5).train))[1]
    assert torch.equal(yb, again)                            # shuffling is reproducible
    seen = torch.cat([y for _, y in loaders.test])
    assert torch.equal(seen, d.test.labels)                  # eval loaders keep order
    assert sum(len(y) for _, y in loaders.val) == len(d.val)


def test_stratified_split_rounding():
    labels = np.repeat(np.arange(3), 5)
    val, train = stratified_split(labels, (0.1,), seed=0)
    assert len(val) == 3 and len(train) == 12    # 0.5 per class rounds half up
    assert sorted(np.concatenate([val, train]).tolist()) == list(range(15))


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "mnist"}, "valid names: digits, cifar10, cifar100, tinyimagenet"),
    ({"name": "digits", "image_size": 2}, "image_size"),
    ({"name": "digits", "seed": -1}, "seed"),
    ({"name": "digits", "seed": 1.5}, "seed"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(QosError, match=match):
        load_dataset(**kwargs)


# ----------------------------------------------------------------------------- CIFAR fixtures


class Py2StylePickler(pickle._Pickler):
    """Pickles like Python 2's cPickle did for the official CIFAR files: strings as BINSTRING."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_binstring(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("latin1")
        n = len(data)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + data)
        self.memoize(obj)

    dispatch[bytes] = _save_binstring
    dispatch[str] = _save_binstring


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2StylePickler(buf, protocol=2).dump(obj)
    # NumPy 1 (as in the official files) names the reconstructor numpy.core.multiarray
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def cifar_batch(rng, n: int, num_classes: int, label_key: bytes) -> dict:
    return {
        b"batch_label": b"fixture",
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in rng.integers(0, num_classes, size=n)],
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


@pytest.fixture
def cifar10_dir(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = cifar_batch(rng, 10, 10, b"labels")
        (folder / name).write_bytes(py2_pickle(batches[name]))
    meta = {b"label_names": [n.encode() for n in ("airplane automobile bird cat deer dog frog horse ship "
                                                   "truck").split()], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(py2_pickle(meta))
    return tmp_path, batches


def test_cifar10_loads(cifar10_dir):
    parent, batches = cifar10_dir
    d = load_dataset("cifar10", data_dir=parent)
    assert (d.num_classes, d.in_channels, d.image_size) == (10, 3, 32)
    assert len(d.train) + len(d.val) == 50 and len(d.test) == 10 and len(d.val) > 0
    assert d.classes[0] == "airplane" and d.classes[9] == "truck"
    test = batches["test_batch"]
    assert d.test.labels.tolist() == test[b"labels"]
    # row layout: 1024 R, 1024 G, 1024 B values, each 32x32 row-major
    row = test[b"data"][3]
    img = d.test.images[3].numpy()
    assert img[0, 0, 0] == row[0] and img[0, 0, 5] == row[5] and img[0, 1, 0] == row[32]
    assert img[1, 0, 0] == row[1024] and img[2, 31, 31] == row[3071]
    # the training pool is the five batches in order; source_indices point into it
    pool = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    labels = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    k = int(d.val.source_indices[0])
    assert np.array_equal(d.val.images[0].numpy().reshape(-1), pool[k])
    assert int(d.val.labels[0]) == labels[k]
    x, y = d.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    # the batches folder itself works too, and the split is seeded
    d2 = load_dataset("cifar10", data_dir=parent / "cifar-10-batches-py")
    assert np.array_equal(d2.val.source_indices, d.val.source_indices)
    small = load_dataset("cifar10", data_dir=parent, image_size=16)
    assert small.train.images.shape[1:] == (3, 16, 16) and small.image_size == 16


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar100_loads(tmp_path, protocol):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 40), ("test", 12)):
        batch = cifar_batch(rng, n, 100, b"fine_labels")
        batch[b"coarse_labels"] = [0] * n
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    d = load_dataset("cifar100", data_dir=tmp_path)
    assert d.num_classes == 100 and len(d.test) == 12 and len(d.train) + len(d.val) == 40
    assert d.classes[:2] == ("0", "1")   # no meta file: numbered classes


def test_cifar_missing_folder(tmp_path):
    with pytest.raises(QosError, match="does not exist") as info:
        load_dataset("cifar10", data_dir=tmp_path / "nowhere")
    assert "data_batch_1..5 and test_batch" in str(info.value)
    with pytest.raises(QosError, match="not found: all of them"):
        load_dataset("cifar100", data_dir=tmp_path)


def test_cifar_missing_file(cifar10_dir):
    parent, _ = cifar10_dir
    folder = parent / "cifar-10-batches-py"
    (folder / "data_batch_3").unlink()
    with pytest.raises(QosError) as info:
        load_dataset("cifar10", data_dir=parent)
    msg = str(info.value)
    assert msg == (f"cifar10: expected data_batch_1..5 and test_batch in {folder} "
                   f"(the 'CIFAR-10 python version' archive, extracted); not found: data_batch_3")


@pytest.mark.parametrize("content, match", [
    (b"this is not a pickle", "not a readable CIFAR python batch"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})[:-20], "not a readable"),
    (pickle.dumps([1, 2, 3]), "not a dict"),
    (pickle.dumps({b"labels": [0]}), "no 'data'"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}), "uint8 array"),
    (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}), r"\(N, 3072\)"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "2 images but 1 labels"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}), "labels must lie in 0..9"),
    (pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": ["x"]}), "list of integers"),
])
def test_cifar_malformed_batch(cifar10_dir, content, match):
    parent, _ = cifar10_dir
    (parent / "cifar-10-batches-py" / "data_batch_2").write_bytes(content)
    with pytest.raises(QosError, match=match) as info:
        load_dataset("cifar10", data_dir=parent)
    assert "data_batch_2" in str(info.value) and "\n" not in str(info.value)


class _Payload:
    """Unpickling this runs exec(): it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("protocol", [2, 5])
def test_code_payload_is_refused_and_never_runs(cifar10_dir, tmp_path, protocol):
    parent, _ = cifar10_dir
    marker = tmp_path / "payload_ran.txt"
    evil = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _Payload(marker)},
                        protocol=protocol)
    # the payload is real: a plain unpickler would run it
    probe = tmp_path / "probe_ran.txt"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()
    (parent / "cifar-10-batches-py" / "test_batch").write_bytes(evil)
    with pytest.raises(QosError, match="refus") as info:
        load_dataset("cifar10", data_dir=parent)
    assert "exec" in str(info.value)  # named __builtin__.exec at protocol 2, builtins.exec later
    assert not marker.exists()


@pytest.mark.parametrize("obj", [
    __import__("os").system, __import__("builtins").eval, np.load, __import__("subprocess").call,
])
def test_safe_load_refuses_other_globals(obj):
    class Evil:
        def __reduce__(self):
            return obj, ("true",)

    with pytest.raises(pickle.UnpicklingError, match="refused global"):
        safe_load(pickle.dumps(Evil()))


def test_safe_load_codecs_only_latin1():
    import _codecs

    class Enc:
        def __reduce__(self):
            return _codecs.encode, ("abc", "rot13")

    with pytest.raises(pickle.UnpicklingError):
        safe_load(pickle.dumps(Enc(), protocol=2))
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for protocol in (2, 3, 4, 5):
        assert np.array_equal(safe_load(pickle.dumps({"a": arr}, protocol=protocol))["a"], arr)
    with pytest.raises(pickle.UnpicklingError):
        safe_load(pickle.dumps(np.array([object()], dtype=object)))


# ----------------------------------------------------------------------------- TinyImageNet fixture

WNIDS = ["n09999999", "n01111111"]   # deliberately not sorted


def _jpeg(path: Path, rng, mode: str = "RGB") -> None:
    from PIL import Image

    shape = (64, 64, 3) if mode == "RGB" else (64, 64)
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode).save(path, "JPEG")


@pytest.fixture
def tin_dir(tmp_path):
    pytest.importorskip("PIL")
    rng = np.random.default_rng(2)
    root = tmp_path / "tiny-imagenet-200"
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    for w in WNIDS:
        folder = root / "train" / w / "images"
        folder.mkdir(parents=True)
        for i in range(5):
            _jpeg(folder / f"{w}_{i}.JPEG", rng, "L" if i == 0 else "RGB")   # some originals are greyscale
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
    lines = []
    for i, w in enumerate(["n01111111", "n09999999", "n09999999"]):
        _jpeg(root / "val" / "images" / f"val_{i}.JPEG", rng)
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_tinyimagenet_loads(tin_dir):
    d = load_dataset("tinyimagenet", data_dir=tin_dir)
    assert (d.num_classes, d.in_channels, d.image_size) == (2, 3, 64)
    assert d.classes == ("n01111111", "n09999999")          # sorted wnids, as ImageFolder numbers them
    assert len(d.train) + len(d.val) == 10 and len(d.val) == 2 and len(d.test) == 3
    assert d.test.labels.tolist() == [0, 1, 1]
    assert d.train.images.dtype == torch.uint8 and d.train.images.shape[1:] == (3, 64, 64)
    x, y = d.test[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    same = load_dataset("tinyimagenet", data_dir=tin_dir / "tiny-imagenet-200")
    assert torch.equal(same.train.images, d.train.images)
    assert load_dataset("tinyimagenet", data_dir=tin_dir, image_size=32).test.images.shape == (3, 3, 32, 32)
    xb, yb = next(iter(d.loaders(4).train))
    assert xb.shape == (4, 3, 64, 64)


def test_tinyimagenet_errors(tin_dir):
    root = tin_dir / "tiny-imagenet-200"
    with pytest.raises(QosError, match="does not exist"):
        load_dataset("tinyimagenet", data_dir=tin_dir / "missing")
    (root / "val" / "images" / "val_2.JPEG").unlink()
    with pytest.raises(QosError, match="line 3 names 'val_2.JPEG'"):
        load_dataset("tinyimagenet", data_dir=tin_dir)
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn00000000\t0\t0\t1\t1\n")
    with pytest.raises(QosError, match="wnid from wnids.txt"):
        load_dataset("tinyimagenet", data_dir=tin_dir)
    (root / "val" / "val_annotations.txt").unlink()
    with pytest.raises(QosError, match="not found: val/val_annotations.txt"):
        load_dataset("tinyimagenet", data_dir=tin_dir)
    import shutil

    shutil.rmtree(root / "train" / "n09999999")
    with pytest.raises(QosError, match="not found: train/n09999999/images"):
        load_dataset("tinyimagenet", data_dir=tin_dir)
    (root / "wnids.txt").unlink()
    with pytest.raises(QosError, match="not found: wnids.txt"):
        load_dataset("tinyimagenet", data_dir=tin_dir)


def test_tinyimagenet_bad_image(tin_dir):
    root = tin_dir / "tiny-imagenet-200"
    (root / "train" / "n01111111" / "images" / "n01111111_1.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(QosError, match="cannot read image .*n01111111_1.JPEG"):
        load_dataset("tinyimagenet", data_dir=tin_dir)
