"""model.pt's typed meta: round trips of zoo and user models, loading without the user's code,
version-1 files, and hostile meta or a file that is no model.pt (one line each, quickly, without
memory). ``fresh_python`` (a fresh interpreter where no test module is importable) is shared with
tests/test_user_architectures.py."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
import time
from typing import Any, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qos_compile import model_schema
from qos_compile.checkpoint import FORMAT, VERSION, load_checkpoint
from qos_compile.cli.nets import main as nets_main
from qos_compile.errors import QosError
from qos_compile.model_schema import FORMAT_VERSION, LIMITS, ModelMeta, parse, parse_records
from qos_compile.models import build_model
from qos_compile.multipliers import bundled, get
from qos_compile.nn import Mode, wrap_model
from qos_compile.qosmodel import load_float_model, load_qos_model, save_float_model, save_qos_model

BANK = [bundled().exact(False), get("mul8u_2NDH"), get("mul8u_C67")]


class UserNet(nn.Module):
    """A model that exists only in this test: fc is defined before the convs it follows, the
    input is not square, there is a residual add, a method call and a functional pool."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8 * 3 * 5, 7)
        self.conv1 = nn.Conv2d(2, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.unused = nn.Linear(3, 3)   # never called: not part of the architecture

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = y + self.conv2(y)
        y = F.max_pool2d(y, 2)
        return self.fc(y.flatten(1))


SHAPE = (2, 6, 10)


def _calibrated(q, x):
    """Every OP's BatchNorm and bias sees different data, then APPROX/eval at OP 0."""
    layers = len(q.approx_layers())
    q.set_assignment([[0] * layers, [1] * layers, [2] * (layers - 1) + [0]][:q.num_ops])
    q.set_mode(Mode.QUANT)
    q.train()
    with torch.no_grad():
        for op in range(q.num_ops):
            q.set_operating_point(op)
            q(x * (1 + op))
            for mod in q.net.modules():
                if getattr(mod, "bias_per_op", None) is not None:
                    mod.bias_per_op[op].add_(0.1 * op)
    q.freeze_observers(True)
    q.set_mode(Mode.APPROX)
    q.set_operating_point(0)
    q.eval()
    return q


def _outputs(q, x):
    outs = []
    with torch.no_grad():
        for op in range(q.num_ops):
            q.set_operating_point(op)
            outs.append(q(x))
    q.set_operating_point(0)
    return outs


def _user_qnet():
    torch.manual_seed(3)
    x = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(7))
    return _calibrated(wrap_model(UserNet(), BANK, num_ops=3, input_shape=SHAPE), x), x


def _zoo_qnet():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    return _calibrated(wrap_model(build_model("resnet8", 10, 1, 8), BANK, num_ops=3, input_shape=(1, 8, 8)), x), x


@pytest.fixture(scope="module")
def user_file(tmp_path_factory):
    q, x = _user_qnet()
    path = tmp_path_factory.mktemp("user") / "model.pt"
    save_qos_model(path, q, {"ops": [{"op": j, "scale": s} for j, s in enumerate((0.5, 1.0, 2.0))],
                             "normalization": {"mean": [0.1, 0.2], "std": [0.5, 0.25]}})
    return q, x, path


@pytest.fixture(scope="module")
def zoo_file(tmp_path_factory):
    q, x = _zoo_qnet()
    path = tmp_path_factory.mktemp("zoo") / "model.pt"
    save_qos_model(path, q, {"provenance": {"dataset": {"name": "digits", "image_size": 8}}})
    return q, x, path


def _write_raw(path, tensors, meta):
    """A container written without save_checkpoint's checks (meta may hold NaN)."""
    torch.save({"format": FORMAT, "version": VERSION, "meta_json": json.dumps(meta), "tensors": tensors}, path)


def _edited(src, dst, edit_meta=None, edit_tensors=None):
    tensors, meta = load_checkpoint(src)
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    _write_raw(dst, tensors, meta)
    return dst


# ----------------------------------------------------------------------------- round trips
def test_user_model_round_trip(user_file):
    q, x, path = user_file
    q2, meta = load_qos_model(path)
    assert type(q2.net).__name__ == "QosArchitecture"
    # the layers keep the original's order (fc was defined first), so the assignment means the same
    assert [i.name for i in q2.approx_layers()] == [i.name for i in q.approx_layers() if i.name != "unused"]
    assert q2.assignment() == [[row[j] for j, i in enumerate(q.approx_layers()) if i.name != "unused"]
                               for row in q.assignment()]
    for a, b in zip(_outputs(q2, x), _outputs(q, x)):
        assert torch.equal(a, b)
    assert meta.input_shape == SHAPE and meta.output_shape == (7,) and meta.num_classes == 7
    assert meta.zoo is None and meta.model_name is None and meta.format_version == FORMAT_VERSION
    assert [o.scale for o in meta.ops] == [0.5, 1.0, 2.0] and meta.normalization.std == (0.5, 0.25)
    assert not any(k.startswith("net.unused") for k in load_checkpoint(path)[0])
    # the typed meta round-trips through its JSON form, which is what the file holds
    assert parse(meta.to_json()) == meta and dict(meta) == load_checkpoint(path)[1]


def test_zoo_model_round_trip(zoo_file):
    q, x, path = zoo_file
    q2, meta = load_qos_model(path)
    for a, b in zip(_outputs(q2, x), _outputs(q, x)):
        assert torch.equal(a, b)
    assert meta.zoo["name"] == "resnet8" and q2.net.qos_arch == q.net.qos_arch
    assert meta.dataset.name == "digits" and meta.dataset.image_size == 8
    assert [i.name for i in q2.approx_layers()] == [i.name for i in q.approx_layers()]
    # a loaded model saves again to the same meta (its re-captured record is equivalent)
    again = path.with_name("again.pt")
    save_qos_model(again, q2, meta)
    q3, meta3 = load_qos_model(again)
    assert meta3.layers == meta.layers and meta3.assign == meta.assign and meta3.provenance == meta.provenance
    for a, b in zip(_outputs(q3, x), _outputs(q, x)):
        assert torch.equal(a, b)


TESTS = os.path.dirname(os.path.abspath(__file__))


def fresh_python(script: str, *args: object, cwd: os.PathLike | str, forbid: Sequence[str],
                 env_update: dict[str, str] | None = None, **popen: Any) -> subprocess.Popen:
    """Start ``python -I -c SCRIPT ARGS...`` in ``cwd``: a fresh interpreter where no test module
    can be imported (isolated mode: no PYTHONPATH, neither the current nor the tests' folder on
    sys.path), one OpenMP thread. The script first asserts that none of the modules ``forbid``
    names is imported or importable; ``env_update`` adds to its environment. stdout and stderr are
    pipes unless ``popen`` says otherwise; wait with ``finish``."""
    guard = textwrap.dedent(f"""
        import importlib.util as _util, os as _os, sys as _sys
        assert {TESTS!r} not in [_os.path.abspath(_p or ".") for _p in _sys.path], _sys.path
        for _name in {list(forbid)!r}:
            assert _name not in _sys.modules and _util.find_spec(_name) is None, _name + " is importable"
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(OMP_NUM_THREADS="1", **(env_update or {}))
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return subprocess.Popen([sys.executable, "-I", "-c", guard + textwrap.dedent(script), *map(str, args)],
                            cwd=cwd, env=env, text=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``proc`` ("" where not a pipe); past ``timeout`` s it is
    killed and the test fails."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"{proc.args[:3]}... ran past {timeout} s")
    return proc.returncode, out or "", err or ""


_SUBPROCESS = """
    import sys, torch
    torch.set_num_threads(1)
    from qos_compile.qosmodel import load_qos_model
    qnet, meta = load_qos_model(sys.argv[1])
    x = torch.load(sys.argv[2], weights_only=True)
    outs = []
    with torch.no_grad():
        for op in range(qnet.num_ops):
            qnet.set_operating_point(op)
            outs.append(qnet(x))
    torch.save(outs, sys.argv[3])
    print(type(qnet.net).__name__, meta.num_ops)
"""


def test_loads_where_the_users_class_does_not_exist(user_file, tmp_path):
    q, x, path = user_file
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = _outputs(q, x)
    finally:
        torch.set_num_threads(threads)
    torch.save(x, tmp_path / "x.pt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code, stdout, stderr = finish(fresh_python(_SUBPROCESS, path, tmp_path / "x.pt", tmp_path / "out.pt",
                                               cwd=elsewhere, forbid=["test_model_schema"]))
    assert code == 0, stderr
    assert stdout.split() == ["QosArchitecture", "3"]
    outs = torch.load(tmp_path / "out.pt", weights_only=True)
    assert len(outs) == 3 and not torch.equal(outs[0], outs[1])
    for a, b in zip(outs, ref):
        assert torch.equal(a, b)   # bit-exact: same torch, same numerics


def test_qos_compile_on_a_python_file_is_one_line(tmp_path):
    """`qos-compile mynet.py` (the model's source, not a model.pt): exit 2, one line saying so, no
    traceback, nothing written. (Source text parses as a few pickle opcodes, "import" as INST, so
    it used to be refused as "a pickle that imports or calls something".)"""
    src = tmp_path / "mynet.py"
    src.write_text("import torch\nfrom torch import nn\n\n\ndef build():\n    return nn.Linear(4, 2)\n")
    cli = os.path.join(os.path.dirname(sys.executable), "qos-compile")
    cmd = [cli] if os.path.exists(cli) else [sys.executable, "-m", "qos_compile.cli.compile"]
    res = subprocess.run([*cmd, str(src), "--target", "x86_64", "-o", str(tmp_path / "out")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith(f"qos-compile: error: {src} is not a model.pt: not a PyTorch checkpoint file "
                               "(neither a zip archive nor a pickle); a Python file: "), lines[0]
    assert "pickle that imports" not in lines[0] and "qos-nets pipeline --model FILE.py:FUNCTION" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mynet.py"]
    # the same for any other text, e.g. JSON; real pickles keep their messages (tests/test_checkpoint.py)
    (tmp_path / "config.json").write_text(json.dumps({"model": "mynet.py:build"}))
    with pytest.raises(QosError, match=r"config.json is not a model.pt: not a PyTorch checkpoint file \(neither "
                                       r"a zip archive nor a pickle\)$"):
        load_qos_model(tmp_path / "config.json")


def test_float_model_of_a_user_network(tmp_path):
    torch.manual_seed(1)
    m = UserNet()
    with pytest.raises(QosError, match="input shape is unknown"):
        save_float_model(tmp_path / "f.pt", m)
    save_float_model(tmp_path / "f.pt", m, {"float": {"epochs": 0}}, input_shape=SHAPE)
    m2, meta = load_float_model(tmp_path / "f.pt")
    x = torch.randn(3, *SHAPE)
    m.eval()
    m2.eval()
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))
    assert meta.is_float and meta.num_ops == 0 and meta.input_shape == SHAPE and meta["float"] == {"epochs": 0}
    with pytest.raises(QosError, match="not a QoS model"):
        load_qos_model(tmp_path / "f.pt")


def test_unsaveable_models_are_refused_in_one_line(tmp_path):
    class Exp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return torch.exp(self.conv(x)).flatten(1)

    q = wrap_model(Exp(), num_ops=1, input_shape=(1, 5, 5), strict=False)
    assert q.architecture is None
    with pytest.raises(QosError, match=r"wrap_model\(strict=False\)") as e:
        save_qos_model(tmp_path / "x.pt", q)
    assert "\n" not in str(e.value)
    with pytest.raises(QosError, match="unsupported function torch.exp"):
        save_float_model(tmp_path / "x.pt", Exp(), input_shape=(1, 5, 5))
    no_shape = wrap_model(UserNet(), num_ops=1)
    with pytest.raises(QosError, match="input shape is unknown"):
        save_qos_model(tmp_path / "x.pt", no_shape)
    assert not (tmp_path / "x.pt").exists()


# ----------------------------------------------------------------------------- version 1
def _as_v1(meta):
    """The meta the version-1 writer produced: the zoo's arch, assignment by names, no record."""
    names = [b["name"] for b in meta["bank"]]
    meta["format_version"] = 1
    meta["arch"] = meta.pop("zoo")
    meta["assign"] = [[names[i] for i in row] for row in meta["assign"]]
    for key in ("architecture", "output_shape"):
        meta.pop(key)


def test_version_1_files_still_load(zoo_file, tmp_path):
    q, x, path = zoo_file
    v1 = _edited(path, tmp_path / "v1.pt", _as_v1)
    q1, meta = load_qos_model(v1)
    assert meta.format_version == 1 and meta.zoo["name"] == "resnet8" and meta.output_shape == (10,)
    assert meta.assign_names[1][0] == "mul8u_2NDH" and meta.to_json()["format_version"] == FORMAT_VERSION
    for a, b in zip(_outputs(q1, x), _outputs(q, x)):
        assert torch.equal(a, b)
    # a version-1 file of a model outside the zoo never existed; one without arch is refused
    no_arch = _edited(path, tmp_path / "v1-noarch.pt", lambda m: _as_v1(m) or m.pop("arch"))
    with pytest.raises(QosError, match="version-1 model.pt without a model-zoo architecture") as e:
        load_qos_model(no_arch)
    assert "\n" not in str(e.value)
    # version-1 float files
    torch.manual_seed(2)
    save_float_model(tmp_path / "f.pt", build_model("lenet5", 10, 1, 12))

    def float_v1(m):
        m["format_version"] = 1
        m["arch"] = m.pop("zoo")
        for key in ("architecture", "output_shape", "input_shape"):
            m.pop(key)

    m1, fmeta = load_float_model(_edited(tmp_path / "f.pt", tmp_path / "f1.pt", float_v1))
    assert fmeta.format_version == 1 and fmeta.input_shape == (1, 12, 12)


# ----------------------------------------------------------------------------- hostile meta
def _conv1(m):
    return m["architecture"]["modules"]["conv1"]


def _set_node_target(m, target):
    node = next(n for n in m["architecture"]["nodes"] if n["op"] == "call_function")
    node["target"] = target


def _forward_reference(m):
    nodes = m["architecture"]["nodes"]
    later = nodes[-2]["name"]
    nodes[1]["args"] = {"tuple": [{"node": later}]}


HOSTILE = {
    "num_ops": (lambda m: m.update(num_ops=10**9), "meta.num_ops = 1000000000 is out of range 1..256"),
    "num_ops_1e5": (lambda m: m.update(num_ops=10**5), "meta.num_ops = 100000 is out of range 1..256"),
    "out_features": (lambda m: m["architecture"]["modules"]["fc"].update(out_features=10**9), "out_features"),
    "output_shape": (lambda m: m.update(output_shape=[10**9]), "meta.output_shape"),
    "input_elements": (lambda m: m.update(input_shape=[1, 1 << 14, 1 << 14]), "meta.input_shape"),
    "input_rank_0": (lambda m: m.update(input_shape=[]), "meta.input_shape"),
    "input_size_4000": (lambda m: m.update(input_shape=[1, 4000, 4000]), "elements per sample"),
    "in_channels": (lambda m: _conv1(m).update(in_channels=10**9), "in_channels = 1000000000 is out of range"),
    "nan_meta": (lambda m: m.update(ops=[{"op": j, "scale": float("nan")} for j in range(3)]),
                 "meta.ops[0].scale = nan is not a finite number"),
    "nan_normalization": (lambda m: m.update(normalization={"mean": [0.0], "std": [float("inf")]}),
                          "meta.normalization.std[0] = inf is not a finite number"),
    "nan_free_form": (lambda m: m.update(agn={"sigmas": [0.1, float("nan")]}), "meta.agn.sigmas[1] = nan"),
    "assign_99": (lambda m: m["assign"][0].__setitem__(3, 99), "meta.assign[0][3] = 99 is out of range 0..2"),
    "assign_name": (lambda m: m["assign"][1].__setitem__(0, "mul8u_nope"), "meta.assign[1][0]"),
    "assign_rows": (lambda m: m["assign"].pop(), "meta.assign has 2 rows"),
    "layers": (lambda m: m.update(layers=[{"name": f"l{i}", "kind": "conv"} for i in range(LIMITS.layers + 1)]),
               "meta.layers has 10001 items (at most 10000)"),
    "bank_sha": (lambda m: m["bank"][0].update(sha256="../../etc/passwd"), "meta.bank[0].sha256"),
    "module_type": (lambda m: _conv1(m).update(type="os.system"), "'os.system', which is not on the allowlist"),
    "function": (lambda m: _set_node_target(m, "os.system"), "'os.system', which is not on the allowlist"),
    "later_node": (_forward_reference, "unknown or later node"),
    "version": (lambda m: m.update(format_version=3), "unsupported model.pt format version 3"),
    "kind": (lambda m: m.update(kind="qos-other"), "not a QoS model"),
    "qconfig": (lambda m: m["qconfig"].update(evil=True), "meta.qconfig has unknown settings"),
}


def test_hostile_meta_is_one_line_quickly_and_cheaply(zoo_file, tmp_path):
    _, _, path = zoo_file
    load_qos_model(path)  # warm up imports, so the timings below are the checks' own
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name, (edit, needle) in HOSTILE.items():
        bad = _edited(path, tmp_path / f"{name}.pt", edit)
        t0 = time.perf_counter()
        with pytest.raises(QosError) as e:
            load_qos_model(bad)
        took = time.perf_counter() - t0
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(str(bad)), (name, msg)
        assert needle in msg, (name, msg)
        assert took < 2.0, (name, took)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200, grown_mb


def test_hostile_version_1_zoo_records(zoo_file, tmp_path):
    _, _, path = zoo_file
    cases = {
        "classes": (lambda m: _as_v1(m) or m["arch"].update(num_classes=10**9),
                    "meta.arch.num_classes = 1000000000 is out of range 1..100000"),
        "input_size": (lambda m: _as_v1(m) or m["arch"].update(input_size=4000) or m.pop("input_shape"),
                       "elements per sample"),
        "unknown": (lambda m: _as_v1(m) or m["arch"].update(name="resnet9000"), "unknown model"),
    }
    for name, (edit, needle) in cases.items():
        t0 = time.perf_counter()
        with pytest.raises(QosError) as e:
            load_qos_model(_edited(path, tmp_path / f"{name}.pt", edit))
        assert needle in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
        assert time.perf_counter() - t0 < 2.0, name


def test_non_finite_tensors_are_refused(zoo_file, tmp_path):
    _, _, path = zoo_file

    def nan_range(t):
        t["net.conv1.act_range"] = t["net.conv1.act_range"].clone()
        t["net.conv1.act_range"][1] = float("nan")

    with pytest.raises(QosError, match="tensor net.conv1.act_range has non-finite values"):
        load_qos_model(_edited(path, tmp_path / "nan.pt", edit_tensors=nan_range))


def test_eval_with_a_bad_assignment_is_one_line_exit_2(zoo_file, tmp_path, capsys):
    _, _, path = zoo_file
    bad = _edited(path, tmp_path / "assign99.pt", HOSTILE["assign_99"][0])
    capsys.readouterr()
    code = nets_main(["eval", str(bad)])
    out, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "meta.assign[0][3] = 99 is out of range 0..2" in err


# ----------------------------------------------------------------------------- the schema itself
def test_records_of_a_stage_dict_are_typed_and_validated():
    rec = parse_records({"ops": [{"op": 0, "bn_only": {"test": {"top1": 91.5, "count": 64}}, "relative_power": 0.4}],
                         "search": {"exact_power_mw": 0.391, "misfits": [{"op": 0, "layer": "fc", "ratio": 1.2}]},
                         "architecture": "ignored: structural", "note": "kept"})
    assert rec.ops[0].test_top1 == 91.5 and rec.ops[0].bn_only.test.count == 64
    assert rec.search.misfits[0].layer == "fc" and rec.extra == {"note": "kept"}
    with pytest.raises(QosError, match=r"meta.ops\[0\].bn_only.test.top1 = 101 is out of range"):
        parse_records({"ops": [{"bn_only": {"test": {"top1": 101}}}]})
    with pytest.raises(QosError, match=r"meta.ops\[1\].op = 0 is out of range 1..1"):
        parse_records({"ops": [{"op": 0}, {"op": 0}]})


def test_model_meta_is_a_read_only_mapping_of_its_json(zoo_file):
    _, _, path = zoo_file
    raw = load_checkpoint(path)[1]
    meta = parse(raw, source="model.pt")
    assert isinstance(meta, ModelMeta) and meta["num_ops"] == 3 and "architecture" in meta
    assert meta.get("missing") is None and set(meta) == set(raw)
    assert model_schema.records_of(meta) is meta
    with pytest.raises(TypeError):
        meta["num_ops"] = 4  # type: ignore[index]
