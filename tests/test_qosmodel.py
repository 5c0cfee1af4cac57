"""model.pt: round trip of every OP, and refusal of non-QoS, tampered, truncated and malicious files."""
from __future__ import annotations

import os
import pickle
import zipfile

import pytest
import torch

from qos_compile.checkpoint import load_checkpoint, save_checkpoint
from qos_compile.errors import QosError
from qos_compile.models import build_model
from qos_compile.multipliers import bundled, get
from qos_compile.nn import Mode, wrap_model
from qos_compile.model_schema import FORMAT_VERSION, Layer
from qos_compile.qosmodel import (KIND, load_float_model, load_qos_model, save_float_model, save_qos_model)

torch.set_num_threads(2)
BANK = [bundled().exact(False), get("mul8u_2NDH"), get("mul8u_C67")]
X = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(5))


def _model(num_ops: int = 3):
    torch.manual_seed(0)
    q = wrap_model(build_model("resnet8", 10, 1, 8), BANK, num_ops=num_ops, input_shape=(1, 8, 8))
    layers = len(q.approx_layers())
    q.set_assignment([[0] * layers, [1] * layers, [2] * (layers - 2) + [1, 0]][:num_ops])
    q.set_mode(Mode.QUANT)
    q.train()
    with torch.no_grad():
        for op in range(num_ops):  # every OP's BatchNorm sees different statistics
            q.set_operating_point(op)
            q(X * (1 + op))
            for mod in q.net.modules():
                if hasattr(mod, "bias_per_op") and mod.bias_per_op is not None:
                    mod.bias_per_op[op].add_(0.1 * op)
    q.freeze_observers(True)
    q.set_mode(Mode.APPROX)
    q.set_operating_point(0)
    q.eval()
    return q


def _outputs(q):
    outs = []
    with torch.no_grad():
        for op in range(q.num_ops):
            q.set_operating_point(op)
            outs.append(q(X))
    q.set_operating_point(0)
    return outs


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    q = _model()
    path = tmp_path_factory.mktemp("qm") / "model.pt"
    save_qos_model(path, q, {"ops": [{"op": j} for j in range(3)], "provenance": {"dataset": {"name": "digits"}},
                             "kind": "ignored"})
    return q, path


def test_round_trip_every_op_identical(saved):
    q, path = saved
    ref = _outputs(q)
    assert not torch.equal(ref[0], ref[1]) and not torch.equal(ref[1], ref[2])
    q2, meta = load_qos_model(path)
    assert q2.mode == Mode.APPROX and not q2.training and q2.operating_point == 0
    assert q2.num_ops == 3 and q2.bank.names == q.bank.names and q2.assignment() == q.assignment()
    for a, b in zip(_outputs(q2), ref):
        assert torch.equal(a, b)
    assert meta.kind == KIND and meta.stage == "final" and meta.provenance.dataset.name == "digits"
    assert meta.zoo["name"] == "resnet8" and meta.num_ops == 3 and meta.input_shape == (1, 8, 8)
    assert meta.output_shape == (10,) and meta.num_classes == 10 and meta.format_version == FORMAT_VERSION == 2
    assert meta.assign_names[2][-1] == BANK[0].name and meta.assign_names[1][0] == "mul8u_2NDH"
    assert [b.sha256 for b in meta.bank] == [m.sha256 for m in BANK]
    assert [b.power_mw for b in meta.bank] == [m.power_mw for m in BANK]
    assert meta.layers[0] == Layer("conv1", "conv", 16 * 9 * 64)
    assert "bank._extra_state" in meta.extra_state and meta.versions["torch"] == torch.__version__
    assert set(q.state_dict()) == set(load_checkpoint(path)[0]) | set(meta.extra_state)
    # the JSON view is what the file holds
    raw = load_checkpoint(path)[1]
    assert dict(meta) == raw and raw["architecture"]["format"] == "qos-graph" and "arch" not in raw


def _rewrite(src, dst, edit_tensors=None, edit_meta=None):
    tensors, meta = load_checkpoint(src)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_checkpoint(dst, tensors, meta)


def test_table_hash_mismatch_is_refused(saved, tmp_path):
    _, path = saved

    def flip(t):
        t["bank.luts"] = t["bank.luts"].clone()
        t["bank.luts"][1, 3, 7] += 1

    bad = tmp_path / "tampered.pt"
    _rewrite(path, bad, edit_tensors=flip)
    with pytest.raises(QosError, match="SHA-256") as e:
        load_qos_model(bad)
    assert "\n" not in str(e.value)


def test_other_problems_are_one_line_errors(saved, tmp_path):
    _, path = saved
    cases = {}
    cases["text"] = tmp_path / "text.pt"
    cases["text"].write_text("hello\n")
    cases["empty"] = tmp_path / "empty.pt"
    cases["empty"].write_bytes(b"")
    cases["plain"] = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(3)}, cases["plain"])
    cases["other_kind"] = tmp_path / "other.pt"
    save_checkpoint(cases["other_kind"], {}, {"kind": "something-else"})
    cases["truncated"] = tmp_path / "truncated.pt"
    cases["truncated"].write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    cases["unknown_arch"] = tmp_path / "arch.pt"
    _rewrite(path, cases["unknown_arch"], edit_meta=lambda m: m["architecture"]["modules"]["conv1"].update(
        type="Conv9000d"))
    cases["wrong_shape"] = tmp_path / "shape.pt"
    _rewrite(path, cases["wrong_shape"], edit_tensors=lambda t: t.update({"net.fc.weight": torch.zeros(3, 3)}))
    cases["missing_tensor"] = tmp_path / "missing.pt"
    _rewrite(path, cases["missing_tensor"], edit_tensors=lambda t: t.pop("net.conv1.weight"))
    cases["no_bank"] = tmp_path / "nobank.pt"
    _rewrite(path, cases["no_bank"], edit_meta=lambda m: m.pop("bank"))
    cases["assign"] = tmp_path / "assign.pt"
    _rewrite(path, cases["assign"], edit_meta=lambda m: m["assign"][0].reverse() or m["assign"][0].__setitem__(0, "x"))
    cases["assign_differs"] = tmp_path / "assign_differs.pt"
    _rewrite(path, cases["assign_differs"], edit_meta=lambda m: m["assign"][0].__setitem__(0, 2))
    cases["float_kind"] = tmp_path / "float.pt"
    save_float_model(cases["float_kind"], build_model("resnet8", 10, 1, 8))
    cases["missing"] = tmp_path / "does-not-exist.pt"
    for name, p in cases.items():
        with pytest.raises(QosError) as e:
            load_qos_model(p)
        assert "\n" not in str(e.value) and str(e.value), name


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["raw-pickle", "torch-zip"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, container):
    marker = tmp_path / "pwned"
    bad = tmp_path / "model.pt"
    payload = {"format": "qos-nets-checkpoint", "version": 1, "meta_json": "{}", "tensors": {},
               "x": _Payload(str(marker))}
    if container == "raw-pickle":
        bad.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, bad)
        assert zipfile.is_zipfile(bad)
    with pytest.raises(QosError) as e:
        load_qos_model(bad)
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_float_model_round_trip(tmp_path):
    torch.manual_seed(1)
    m = build_model("lenet5", 10, 1, 12)
    save_float_model(tmp_path / "f.pt", m, {"float": {"epochs": 0}})
    m2, meta = load_float_model(tmp_path / "f.pt")
    assert meta.stage == "float" and meta["float"] == {"epochs": 0} and meta.is_float and meta.zoo["name"] == "lenet5"
    for (k, v), (k2, v2) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    with pytest.raises(QosError):
        load_float_model(tmp_path / "missing.pt")
