"""The QoS-Nets flow on the user's own model and data: npz and image-folder readers, normalization,
``--model FILE.py:FUNC`` / ``package.module:FUNC``, ``--weights``, option spellings, and the CLI
pipeline end to end on a model file written here and a tiny npz."""
from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from qos_compile.cli.nets import build_parser, main
from qos_compile.data import load_dataset
from qos_compile.errors import QosError

torch.set_num_threads(2)

MODEL_SRC = '''
import torch
from torch import nn
import torch.nn.functional as F


class Net(nn.Module):
    """A small user CNN for 1-channel 8x8 images and 4 classes."""

    def __init__(self, classes=4):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build():
    return Net()


def build_wrong_classes():
    return Net(classes=7)


def build_raises():
    raise ValueError("no weights here")


def build_not_a_module():
    return [1, 2, 3]


class Sorting(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        x = torch.cumsum(self.conv(x), dim=1)
        return self.fc(x.mean((2, 3)))


def build_unsupported():
    return Sorting()
'''

FAST = ["--epochs-float", "1", "--epochs-qat", "1", "--epochs-agn", "1", "--epochs-finetune", "1",
        "--multipliers", "mul8u_2NDH,mul8u_C67,mul8u_185Q", "--max-circuits", "2", "--threads", "2", "--no-progress"]


def tiny_images(n: int, rng: np.random.Generator, classes: int = 4, shape: tuple[int, ...] = (8, 8)
                ) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images whose class is a bright band of rows (learnable in one epoch or two)."""
    y = rng.integers(0, classes, n)
    x = rng.integers(0, 60, (n, *shape)).astype(np.uint8)
    for i, c in enumerate(y):
        x[i, 2 * c:2 * c + 2] += 150
    return x, y


def write_npz(path: Path, n_train: int = 200, n_test: int = 60, seed: int = 0, compressed: bool = False,
              **override: np.ndarray) -> Path:
    rng = np.random.default_rng(seed)
    xt, yt = tiny_images(n_train, rng)
    xe, ye = tiny_images(n_test, rng)
    arrays = {"x_train": xt, "y_train": yt, "x_test": xe, "y_test": ye}
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, out: str, err: str) -> str:
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("qos-nets") and "error" in lines[0]
    return lines[0]


@pytest.fixture()
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "mynet.py"
    path.write_text(textwrap.dedent(MODEL_SRC))
    return path


# ----------------------------------------------------------------------------- npz reader
def test_npz_uint8_nhw(tmp_path):
    path = write_npz(tmp_path / "d.npz")
    s = load_dataset(f"npz:{path}")
    assert s.input_shape == (1, 8, 8) and s.num_classes == 4 and s.classes == ("0", "1", "2", "3")
    assert len(s.train) + len(s.val) == 200 and len(s.test) == 60 and len(s.val) >= 4
    assert s.train.images.dtype == torch.uint8
    # normalization computed on the training split only, images scaled to [0, 1]
    x = s.train.images.double() / 255
    assert s.mean[0] == pytest.approx(float(x.mean()), rel=1e-9)
    assert s.std[0] == pytest.approx(float(x.std(unbiased=False)), rel=1e-6)
    xb, yb = s.train[:]
    assert abs(float(xb.mean())) < 1e-5 and float(xb.std()) == pytest.approx(1, abs=1e-2)
    assert yb.dtype == torch.int64
    raw = np.load(path)
    assert np.array_equal(s.test.images[:, 0].numpy(), raw["x_test"]) and np.array_equal(s.test.labels, raw["y_test"])


def test_npz_uint8_nhwc_compressed_and_resized(tmp_path):
    rng = np.random.default_rng(1)
    xt = rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    xe = rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    path = write_npz(tmp_path / "c.npz", compressed=True, x_train=xt, y_train=np.arange(50) % 2, x_test=xe,
                     y_test=np.arange(20, dtype=np.uint8) % 2)
    s = load_dataset(f"npz:{path}")
    assert s.input_shape == (3, 8, 8) and s.num_classes == 2
    assert np.array_equal(s.test.images.numpy(), xe.transpose(0, 3, 1, 2))  # NHWC -> NCHW, exact
    r = load_dataset(f"npz:{path}", image_size=(12, 16))
    assert r.input_shape == (3, 12, 16) and r.test.images.dtype == torch.uint8
    assert load_dataset(f"npz:{path}", image_size=6).input_shape == (3, 6, 6)


def test_npz_float_nchw(tmp_path):
    rng = np.random.default_rng(2)
    xt = rng.normal(0.5, 2.0, (60, 2, 8, 8)).astype(np.float32)
    xe = rng.normal(0.5, 2.0, (20, 2, 8, 8)).astype(np.float32)
    path = write_npz(tmp_path / "f.npz", x_train=xt, y_train=np.arange(60) % 3, x_test=xe, y_test=np.arange(20) % 3)
    s = load_dataset(f"npz:{path}")
    assert s.input_shape == (2, 8, 8) and s.train.images.dtype == torch.float32
    assert np.array_equal(s.test.images.numpy(), xe)  # used as stored, no /255
    assert s.mean[0] == pytest.approx(float(s.train.images[:, 0].double().mean()), rel=1e-9)
    assert s.train.images.numpy().flags.writeable  # a private copy, never a read-only memory map


def _bad(**override: np.ndarray | None) -> dict[str, np.ndarray | None]:
    return override


R = np.random.default_rng(3)
U8 = R.integers(0, 256, (20, 8, 8), dtype=np.uint8)
Y = np.arange(20) % 2


@pytest.mark.parametrize("override, needle", [
    (_bad(y_test=None), "missing y_test"),
    (_bad(x_train=U8.astype(np.float64)), "dtype float64"),
    (_bad(x_train=U8.astype(np.int16)), "dtype int16"),
    (_bad(x_train=U8[:, 0]), "uint8 with shape (20, 8)"),
    (_bad(x_train=U8.astype(np.float32)), "float32 images are N,C,H,W"),
    (_bad(x_train=R.integers(0, 256, (20, 3, 8, 8), dtype=np.uint8)), "N,C,H,W uint8 is not accepted"),
    (_bad(x_train=U8[:0], y_train=Y[:0]), "holds no images"),
    (_bad(x_train=U8, y_train=Y[:19]), "20 images but y_train has 19 labels"),
    (_bad(x_train=U8, y_train=Y.astype(np.float32)), "labels must be integers"),
    (_bad(x_train=U8, y_train=Y[:, None]), "shape (20, 1)"),
    (_bad(x_train=U8, y_train=Y - 1), "negative label"),
    (_bad(x_train=U8, y_train=Y, x_test=U8[:5], y_test=np.array([0, 1, 2, 0, 1])), "label 2"),
    (_bad(x_train=U8, y_train=Y, x_test=U8[:5, :, :, None].repeat(3, 3), y_test=Y[:5]), "channel"),
    (_bad(x_train=U8, y_train=Y, x_test=U8[:5].astype(np.float32)[:, None], y_test=Y[:5]), "use one type"),
    (_bad(x_train=U8, y_train=Y, x_test=U8[:5, :6], y_test=Y[:5]), "--input-size"),
    (_bad(x_train=U8[:, :2, :2], y_train=Y, x_test=U8[:5, :2, :2], y_test=Y[:5]), "--input-size"),
    (_bad(x_train=U8[:4], y_train=Y[:4], x_test=U8[:4], y_test=Y[:4]), "validation split"),
    (_bad(x_train=np.full((20, 1, 8, 8), np.nan, np.float32), y_train=Y,
          x_test=np.zeros((5, 1, 8, 8), np.float32), y_test=Y[:5]), "NaN"),
])
def test_npz_bad_input(tmp_path, override, needle):
    path = write_npz(tmp_path / "bad.npz", **override)
    with pytest.raises(QosError) as e:
        load_dataset(f"npz:{path}")
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and msg.startswith(f"npz:{path}")


def test_npz_bad_files(tmp_path, monkeypatch):
    cases = {"missing.npz": None, "text.npz": b"not an archive", "folder.npz": "dir"}
    for name, content in cases.items():
        if content == "dir":
            (tmp_path / name).mkdir()
        elif content is not None:
            (tmp_path / name).write_bytes(content)
    np.save(tmp_path / "one.npy", U8)
    np.savez(tmp_path / "obj.npz", x_train=np.array([{"a": 1}] * 20, dtype=object), y_train=Y, x_test=U8, y_test=Y)
    for name, needle in [("missing.npz", "no such file"), ("text.npz", "not a readable .npz"),
                         ("folder.npz", "not a file"), ("one.npy", "single .npy array"),
                         ("obj.npz", "Python objects")]:
        with pytest.raises(QosError, match=needle):
            load_dataset(f"npz:{tmp_path / name}")
    # the size limit is checked from the headers, before any data is read
    path = write_npz(tmp_path / "ok.npz")
    monkeypatch.setenv("QOS_MAX_DATA_BYTES", "1000")
    with pytest.raises(QosError, match="over the limit"):
        load_dataset(f"npz:{path}")
    monkeypatch.setenv("QOS_MAX_DATA_BYTES", "lots")
    with pytest.raises(QosError, match="QOS_MAX_DATA_BYTES"):
        load_dataset(f"npz:{path}")
    with pytest.raises(QosError, match="give a path"):
        load_dataset("npz:")


# ----------------------------------------------------------------------------- image folders
def write_folder(root: Path, classes: dict[str, int], split: str, mode: str = "L", size: tuple[int, int] = (8, 6),
                 seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for cls, count in classes.items():
        folder = root / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
                folder / f"{i}.{'png' if i % 2 else 'jpg'}")


def test_imagefolder_reads_grey_and_rgb(tmp_path):
    root = tmp_path / "imgs"
    write_folder(root, {"cat": 6, "dog": 5}, "train")
    write_folder(root, {"cat": 2, "dog": 2}, "test", seed=1)
    (root / "train" / "cat" / "notes.txt").write_text("ignored")
    (root / "train" / ".hidden").mkdir()
    s = load_dataset(f"imagefolder:{root}")
    assert s.classes == ("cat", "dog") and s.input_shape == (1, 6, 8) and len(s.test) == 4
    assert len(s.train) + len(s.val) == 11 and s.train.images.dtype == torch.uint8
    # one RGB image makes the whole set RGB; --input-size resizes every image
    write_folder(root, {"dog": 1}, "test", mode="RGB", seed=2)
    r = load_dataset(f"imagefolder:{root}", image_size=(10, 12))
    assert r.input_shape == (3, 10, 12) and r.notes["mode"] == "RGB"
    # PNG is lossless: the pixels come back exactly
    from PIL import Image

    png = np.asarray(Image.open(root / "test" / "cat" / "1.png"))
    assert np.array_equal(s.test.images[1, 0].numpy(), png)


def test_imagefolder_bad_input(tmp_path):
    def check(root: Path, needle: str, **kw: object) -> None:
        with pytest.raises(QosError) as e:
            load_dataset(f"imagefolder:{root}", **kw)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)

    check(tmp_path / "nope", "no such folder")
    a = tmp_path / "a"
    write_folder(a, {"x": 2, "y": 2}, "train")
    check(a, "no test/ folder")
    write_folder(a, {"x": 1, "z": 1}, "test")
    check(a, "only in train/: y; only in test/: z")
    (a / "test" / "z" / "0.jpg").unlink()
    (a / "test" / "z").rmdir()
    write_folder(a, {"y": 1}, "test")
    (a / "train" / "y" / "empty_sub").mkdir()
    (a / "train" / "x2").mkdir()
    (a / "test" / "x2").mkdir()
    check(a, "empty class folder train/x2")
    (a / "train" / "x2").rmdir()
    (a / "test" / "x2").rmdir()
    (a / "train" / "x" / "broken.png").write_bytes(b"\x89PNG not really")
    check(a, "cannot read image train/x/broken.png")
    (a / "train" / "x" / "broken.png").unlink()
    write_folder(a, {"y": 1}, "test", size=(5, 5), seed=3)  # overwrites test/y/0.jpg with another size
    check(a, "differ in size")
    check(a, "validation split", image_size=8)  # 2 images per class: nothing to hold out
    b = tmp_path / "b"
    (b / "train").mkdir(parents=True)
    (b / "test").mkdir()
    check(b, "train/ has no class folders")


# ----------------------------------------------------------------------------- normalization
def test_given_normalization_is_applied(tmp_path):
    path = write_npz(tmp_path / "d.npz")
    s = load_dataset(f"npz:{path}", normalize=([0.5], [0.25]))
    assert s.mean == (0.5,) and s.std == (0.25,)
    x, _ = s.test[[0]]
    raw = np.load(path)["x_test"][0].astype(np.float32) / 255
    assert torch.allclose(x[0, 0], torch.from_numpy((raw - 0.5) / 0.25), atol=1e-6)
    with pytest.raises(QosError, match="3 mean"):
        load_dataset(f"npz:{path}", normalize=([0.1, 0.2, 0.3], [1, 1, 1]))


def test_normalization_recorded_by_the_float_stage(tmp_path, model_file):
    from qos_compile.pipeline import PipelineConfig, load_data, stage_float

    path = write_npz(tmp_path / "d.npz")
    cfg = PipelineConfig(model=f"{model_file}:build", dataset=f"npz:{path}", float_epochs=0,
                         normalize=((0.2,), (0.3,))).resolved()
    splits = load_data(cfg)
    model, meta = stage_float(cfg, splits, progress=False, log=lambda m: None)
    assert meta["normalization"]["mean"] == [0.2] and meta["normalization"]["std"] == [0.3]
    assert meta["provenance"]["dataset"]["name"] == f"npz:{path.resolve()}"
    assert meta["provenance"]["dataset"]["normalize"] == [[0.2], [0.3]]
    computed = PipelineConfig(model=f"{model_file}:build", dataset=f"npz:{path}", float_epochs=0).resolved()
    _, meta = stage_float(computed, load_data(computed), progress=False, log=lambda m: None)
    assert meta["normalization"]["mean"] == [pytest.approx(load_data(computed).mean[0])]
    assert meta["normalization"]["image_range"].startswith("[0, 1] (uint8")


# ----------------------------------------------------------------------------- the user's model
def test_weights_start_from_the_users_state_dict(tmp_path, model_file, capsys):
    import importlib.util

    from qos_compile.pipeline import PipelineConfig, load_data, stage_float

    spec = importlib.util.spec_from_file_location("mynet_for_test", model_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    trained = mod.build()
    with torch.no_grad():
        trained.conv1.weight.fill_(0.125)
    torch.save(trained.state_dict(), tmp_path / "float.pt")
    data = write_npz(tmp_path / "d.npz")
    cfg = PipelineConfig(model=f"{model_file}:build", dataset=f"npz:{data}",
                         float_weights=str(tmp_path / "float.pt")).resolved()
    model, meta = stage_float(cfg, load_data(cfg), progress=False, log=lambda m: None)
    assert torch.equal(model.conv1.weight, trained.conv1.weight) and meta["float"]["weights_from"]
    assert "epochs" not in meta["float"]  # no float training
    # mismatched keys and shapes: one line naming them
    state = trained.state_dict()
    state.pop("fc.bias")
    state["conv2.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "bad.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    for name, needle in [("bad.pt", "missing fc.bias"), ("bad.pt", "conv2.weight is (3, 3) in the file"),
                         ("list.pt", "not a state dict"), ("junk.pt", "weights_only=True"),
                         ("none.pt", "no such file")]:
        line = one_line_error(*run(capsys, "pipeline", "--model", f"{model_file}:build", "--dataset", f"npz:{data}",
                                   "--weights", str(tmp_path / name), *FAST, "-o", str(tmp_path / "m.pt")))
        assert needle in line, line
    assert not (tmp_path / "m.pt.work").exists()


def test_model_spec_bad_input(tmp_path, model_file, capsys, monkeypatch):
    data = write_npz(tmp_path / "d.npz")
    (tmp_path / "broken.py").write_text("def build(:\n")
    (tmp_path / "raising.py").write_text("import nothing_called_this_exists\n")
    (tmp_path / "returns.py").write_text("def an_int():\n    return 3\n\n\ndef nothing():\n    pass\n")
    cases = [
        (f"{tmp_path / 'absent.py'}:build", "no such file"),
        (f"{model_file}:nope", "has no function 'nope' (it defines: Net, Sorting, build"),
        (f"{model_file}:build_raises", "build_raises() raised ValueError: no weights here (line"),
        (f"{model_file}:build_not_a_module", "build_not_a_module() returned a list, not a torch.nn.Module"),
        (f"{tmp_path / 'returns.py'}:an_int", "an_int() returned an int, not a torch.nn.Module"),
        (f"{tmp_path / 'returns.py'}:nothing", "nothing() returned None, not a torch.nn.Module"),
        (f"{model_file}:build_unsupported", "unsupported function torch.cumsum"),
        (f"{model_file}:build_wrong_classes", "returns 7 logits per sample but the dataset"),
        (f"{tmp_path / 'broken.py'}:build", "raised SyntaxError"),
        (f"{tmp_path / 'raising.py'}:build", "raised ModuleNotFoundError"),
        ("no_such_package.mod:build", "no module named 'no_such_package'"),
        (f"{model_file}:1x", "not a Python function name"),
        ("resnet9000", "unknown model"),
    ]
    for spec, needle in cases:
        line = one_line_error(*run(capsys, "pipeline", "--model", spec, "--dataset", f"npz:{data}", *FAST,
                                   "-o", str(tmp_path / "m.pt")))
        assert needle in line, (spec, line)
    cumsum_line = textwrap.dedent(MODEL_SRC).splitlines().index("        x = torch.cumsum(self.conv(x), dim=1)") + 1
    assert f"mynet.py:{cumsum_line}" in one_line_error(*run(capsys, "pipeline", "--model", f"{model_file}:build_unsupported",
                                                  "--dataset", f"npz:{data}", "-o", str(tmp_path / "m.pt")))
    assert sorted(os.listdir(tmp_path)) == ["broken.py", "d.npz", "mynet.py", "raising.py", "returns.py"]
    # package.module:FUNC resolves from the current folder
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent(MODEL_SRC))
    monkeypatch.chdir(tmp_path)
    from qos_compile.models.user import build_user_model, model_source_sha256

    assert type(build_user_model("userpkg.nets:build")).__name__ == "Net"
    assert model_source_sha256("userpkg.nets:build") == model_source_sha256(f"{pkg / 'nets.py'}:build")


@pytest.mark.parametrize("args, needle", [
    (["--input-size", "8x"], "--input-size"),
    (["--input-size", "2"], "--input-size"),
    (["--input-size", "8x8x8"], "--input-size"),
    (["--normalize", "0.5"], "--normalize"),
    (["--normalize", "0.5:0"], "--normalize"),
    (["--normalize", "a:b"], "--normalize"),
    (["--dataset", "npz:"], "give a path"),
    (["--dataset", "imagefolder:/nonexistent/qos"], "no such folder"),
    (["--dataset", "mnist"], "npz:FILE.npz, imagefolder:DIR"),
])
def test_data_options_bad_input(capsys, tmp_path, args, needle):
    line = one_line_error(*run(capsys, "pipeline", *args, "-o", str(tmp_path / "m.pt")))
    assert needle in line, line
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- option spellings
def _options(parser) -> dict[str, set[str]]:
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {name: {o for a in p._actions for o in a.option_strings} for name, p in sub.choices.items()}


def test_shared_options_and_aliases():
    opts = _options(build_parser())
    data = {"--dataset", "--data-dir", "--input-size", "--image-size", "--normalize"}
    for cmd in ("pipeline", "train", "search", "finetune", "eval"):
        assert data <= opts[cmd], cmd
    for cmd in ("pipeline", "train"):
        assert {"--model", "--weights", "--float-weights"} <= opts[cmd]
    for cmd in ("pipeline", "search"):
        assert {"--max-circuits", "--n"} <= opts[cmd]
    p = build_parser()
    assert p.parse_args(["pipeline", "--n", "3", "-o", "x"]).n == 3
    a = p.parse_args(["pipeline", "--max-circuits", "2", "--input-size", "12x16", "--normalize", "0.1,0.2:0.3,0.4",
                      "--weights", "w.pt", "-o", "x"])
    assert (a.n, a.image_size, a.normalize, a.float_weights) == (2, (12, 16), ((0.1, 0.2), (0.3, 0.4)), "w.pt")
    assert p.parse_args(["train", "--image-size", "16", "--float-weights", "w.pt", "-o", "x"]).image_size == 16


def test_no_option_is_a_torchrun_prefix():
    """torchrun's parser scans every argument: an option that is a prefix of one of its own
    (e.g. --n: --nnodes, --nproc-per-node) is ambiguous there, so only the --n alias may be one."""
    run_mod = pytest.importorskip("torch.distributed.run")
    theirs = {o for a in run_mod.get_args_parser()._actions for o in a.option_strings if o.startswith("--")}
    for cmd, ours in _options(build_parser()).items():
        risky = sorted(o for o in ours if o.startswith("--") and o not in ("--help", "--n")
                       and any(t.startswith(o) for t in theirs))
        assert not risky, (cmd, risky)


# ----------------------------------------------------------------------------- end to end
def test_pipeline_end_to_end_on_a_user_model_and_npz(tmp_path, model_file, capsys):
    from qos_compile.compiler import _export
    from qos_compile.qosmodel import load_qos_model

    data = write_npz(tmp_path / "data.npz")
    out = tmp_path / "model.pt"
    args = ["pipeline", "--model", f"{model_file}:build", "--dataset", f"npz:{data}", *FAST,
            "--epochs-float", "2", "-o", str(out)]
    code, stdout, err = run(capsys, *args)
    assert code == 0, err
    assert "mynet.py:build on npz:" in stdout and "OP2" in stdout
    qnet, meta = load_qos_model(out)
    assert qnet.num_ops == 3 and meta["stage"] == "final" and list(meta["input_shape"]) == [1, 8, 8]
    assert meta["provenance"]["model"] == f"{model_file}:build"
    assert meta["provenance"]["dataset"]["name"] == f"npz:{data.resolve()}"
    norm = meta["normalization"]
    x = np.load(data)["x_train"]
    assert len(norm["mean"]) == 1 and 0.2 < norm["mean"][0] < 0.4 and norm["std"][0] > 0
    assert abs(norm["mean"][0] - x.mean() / 255) < 0.02  # the training split (90 % of x_train)
    # the ONNX export the compiler makes carries it as qos.normalization
    full, _ = _export(qnet, tmp_path, None, meta)
    props = {p.key: p.value for p in full.model.metadata_props}
    assert json.loads(props["qos.normalization"])["mean"] == norm["mean"]
    # eval works from the recorded data and normalization, from any folder
    code, stdout, err = run(capsys, "eval", str(out), "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["samples"] == 60 and rep["num_ops"] == 3 and rep["model"] == f"{model_file}:build"
    for r, o in zip(rep["ops"], meta["ops"]):
        assert r["top1"] == pytest.approx(o["bn_only"]["test"]["top1"])  # same model, same data, same inputs
    assert rep["baseline"] is not None
    # a rerun resumes from the cache (the user's code runs again: it is how the model is checked)
    code, stdout, err = run(capsys, *args)
    assert code == 0, err
    assert err.count(": cached (") == 5 and "recomputing" not in err
