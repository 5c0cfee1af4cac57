"""`qos-nets pipeline|train|search|finetune|eval`: bad input is one line + exit 2; a tiny end-to-end run."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from qos_compile.cli.nets import main
from qos_compile.qosmodel import load_qos_model

torch.set_num_threads(2)
TINY = ["--dataset", "digits", "--image-size", "8", "--max-samples", "64", "--epochs-float", "1", "--epochs-qat", "1",
        "--epochs-agn", "1", "--epochs-finetune", "1", "--multipliers", "mul8u_2NDH,mul8u_C67,mul8u_185Q",
        "--threads", "2", "--no-progress"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, out: str, err: str) -> str:
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("qos-nets") and "error" in lines[0]
    return lines[0]


@pytest.mark.parametrize("args, needle", [
    (["--model", "resnet9000"], "unknown model"),
    (["--dataset", "mnist-fashion"], "unknown dataset"),
    (["--scales", "0.3,x"], "--scales"),
    (["--scales", "0,1"], "--scales"),
    (["--scales", ""], "--scales"),
    (["--scales", "0.3,,2"], "--scales"),
    (["--n", "0"], "n"),
    (["--n", "two"], "--n"),
    (["--epochs-float", "-1"], "float-epochs"),
    (["--baseline", "half"], "--baseline"),
    (["--multipliers", "mul8u_NOPE"], "unknown multiplier"),
    (["--multipliers", "mul8u_2NDH,mul8s_1KV6"], "signed"),
    (["--multipliers", "mul8u_17C8"], "ambiguous"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/qos-data"], "cifar"),
])
def test_pipeline_bad_input(capsys, tmp_path, args, needle):
    out_file = tmp_path / "model.pt"
    line = one_line_error(*run(capsys, "pipeline", *args, "-o", str(out_file)))
    assert needle.lower() in line.lower()
    assert not out_file.exists() and not (tmp_path / "model.pt.work").exists()
    assert os.listdir(tmp_path) == []


def test_pipeline_refuses_to_overwrite_a_non_qos_file(capsys, tmp_path):
    target = tmp_path / "notes.pt"
    target.write_text("my notes\n")
    line = one_line_error(*run(capsys, "pipeline", *TINY, "-o", str(target)))
    assert "refusing to overwrite" in line
    assert target.read_text() == "my notes\n" and sorted(os.listdir(tmp_path)) == ["notes.pt"]
    one_line_error(*run(capsys, "pipeline", *TINY, "-o", str(tmp_path / "no-such-dir" / "m.pt")))
    one_line_error(*run(capsys, "pipeline", *TINY))  # -o missing: argparse, still one line


def test_eval_bad_model_files(capsys, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"format": "qos-nets-checkpoint", "x": Payload()}))
    text = tmp_path / "text.pt"
    text.write_text("not a model")
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(2)}, plain)
    for f in (evil, text, plain, tmp_path / "missing.pt"):
        one_line_error(*run(capsys, "eval", str(f)))
    assert not marker.exists()
    one_line_error(*run(capsys, "eval", str(text), "--split", "train"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny pipeline run shared by the end-to-end checks."""
    folder = tmp_path_factory.mktemp("pipe")
    model = folder / "model.pt"
    code = main(["pipeline", *TINY, "--n", "2", "--baseline", "full", "-o", str(model), "--plot", str(folder / "p.png")])
    assert code == 0
    return folder, model


def test_pipeline_end_to_end(capsys, tiny_run):
    folder, model = tiny_run
    capsys.readouterr()
    qnet, meta = load_qos_model(model)
    assert qnet.num_ops == 3 and len(qnet.bank) <= 2 and meta["stage"] == "final"
    assert (folder / "p.png").stat().st_size > 1000
    work = sorted(p.name.split("-")[0] for p in (folder / "model.pt.work").iterdir())
    assert work == ["agn", "finetune", "float", "full", "qat", "search"]
    ops = meta["ops"]
    assert len(ops) == 3 and all({"before_finetune", "bn_only", "full_retrain"} <= set(o) for o in ops)
    rel = [o["relative_power"] for o in ops]
    assert rel == sorted(rel, reverse=True)
    assert meta["search"]["agreement"]["n"] > 0 and "misfits" in meta["search"]
    assert meta["finetune"]["param_overhead"]["bn_affine_pct"] > 0
    prov = meta["provenance"]
    assert prov["dataset"]["name"] == "digits" and prov["config"]["n"] == 2 and prov["versions"]["torch"]
    assert meta["baseline"]["qat_exact"]["test"]["count"] == 64

    code, out, err = run(capsys, "eval", str(model), "--json", "--plot", str(folder / "eval.png"))
    assert code == 0, err
    rep = json.loads(out)
    assert rep["split"] == "test" and rep["num_ops"] == 3 and rep["samples"] == 64
    assert [r["op"] for r in rep["ops"]] == [0, 1, 2]
    for r, o in zip(rep["ops"], ops):
        assert r["relative_power"] == pytest.approx(o["relative_power"])
        assert r["top1"] == pytest.approx(o["bn_only"]["test"]["top1"])  # same model, same data
        assert r["savings_pct"] == pytest.approx(100 * (1 - r["relative_power"]))
        assert set(r["circuits"]) <= set(qnet.bank.names) and r["top5"] is not None
    assert rep["baseline"]["top1"] == meta["baseline"]["qat_exact"]["test"]["top1"]
    assert (folder / "eval.png").stat().st_size > 1000
    code, out, err = run(capsys, "eval", str(model))
    assert code == 0 and "OP2" in out and "QAT baseline" in out


def test_pipeline_rerun_resumes_from_the_cache(capsys, tiny_run):
    folder, model = tiny_run
    before = model.stat().st_mtime_ns
    code, out, err = run(capsys, "pipeline", *TINY, "--n", "2", "--baseline", "full", "-o", str(model))
    assert code == 0, err
    assert err.count(": cached (") == 6 and "OP0" in out
    assert model.stat().st_mtime_ns >= before
    # a changed search argument recomputes the search and what follows, nothing before it
    code, out, err = run(capsys, "pipeline", *TINY, "--n", "1", "-o", str(folder / "n1.pt"),
                         "--work-dir", str(folder / "model.pt.work"), "--json")
    assert code == 0, err
    assert err.count(": cached (") == 3
    rep = json.loads(out)
    assert len({c for o in rep["ops"] for c in o["circuits"]}) == 1


def test_stage_commands_chain(capsys, tiny_run, tmp_path):
    folder, model = tiny_run
    one_line_error(*run(capsys, "search", str(model), "-o", str(tmp_path / "s.pt")))  # a final model is no input
    trained = tmp_path / "trained.pt"
    stage_args = ["--dataset", "digits", "--image-size", "8", "--max-samples", "64", "--threads", "2",
                  "--no-progress"]
    code, out, err = run(capsys, "train", *stage_args, "--epochs-float", "1", "--epochs-qat", "1", "--epochs-agn", "1",
                         "-o", str(trained))
    assert code == 0, err
    searched = tmp_path / "searched.pt"
    code, out, err = run(capsys, "search", str(trained), "--multipliers", "mul8u_2NDH,mul8u_C67", "--n", "2",
                         "--scales", "0.5,2", "--threads", "2", "--no-progress", "-o", str(searched))
    assert code == 0, err
    q, meta = load_qos_model(searched)
    assert q.num_ops == 2 and meta["stage"] == "search" and meta["search"]["scales"] == [0.5, 2.0]
    final = tmp_path / "final.pt"
    one_line_error(*run(capsys, "finetune", str(trained), "-o", str(final)))  # needs a search output
    code, out, err = run(capsys, "finetune", str(searched), "--epochs-finetune", "1", "--threads", "2",
                         "--no-progress", "-o", str(final))
    assert code == 0, err
    assert "OP1" in out
    q, meta = load_qos_model(final)
    assert meta["stage"] == "final" and all("bn_only" in o for o in meta["ops"])
    code, out, err = run(capsys, "eval", str(final), "--json")
    assert code == 0 and json.loads(out)["num_ops"] == 2
    assert sorted(os.listdir(tmp_path)) == ["final.pt", "searched.pt", "trained.pt"]
