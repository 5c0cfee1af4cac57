"""Data parallelism under torchrun (real torch.distributed: gloo on loopback, two processes) and --device.

The end-to-end checks share one single-process and one two-process pipeline run of the same
small digits configuration (full digits splits at 8x8: accurate enough that two runs of the
method differ by noise of a point, not by chance-level guessing).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qos_compile.cli.nets import build_parser, main
from qos_compile.qosmodel import load_qos_model
from qos_compile.train import distributed as dist_rt

BIN = Path(sys.executable).parent
TORCHRUN, QOS_NETS = BIN / "torchrun", BIN / "qos-nets"
FLAGS = ["--model", "resnet8", "--dataset", "digits", "--multipliers", "evoapprox-unsigned", "--max-circuits", "4",
         "--scales", "0.3,1,2", "--image-size", "8", "--epochs-float", "4", "--epochs-qat", "1", "--epochs-agn", "1",
         "--epochs-finetune", "1", "--threads", "1", "--device", "cpu", "--no-progress", "--json"]
TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                "MASTER_PORT", "TORCHELASTIC_RUN_ID", "QOS_DIST_TIMEOUT", "QOS_THREADS")

needs_gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()
                                     and TORCHRUN.exists() and QOS_NETS.exists()),
                                reason="needs torch.distributed with gloo and the torchrun/qos-nets scripts")


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The test process's environment without torchrun's variables, with a private QOS_COMPILE_HOME."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(QOS_COMPILE_HOME=str(home), **extra)
    return env


def torchrun(folder: Path, home: Path, output: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.time()
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node=2", "--no-python", str(QOS_NETS),
                           "pipeline", *FLAGS, "-o", str(output)], cwd=folder, env=clean_env(home),
                          capture_output=True, text=True, timeout=600)
    return proc, time.time() - t0


def bn_only_top1(meta) -> list[float]:
    return [o.bn_only.test.top1 for o in meta.ops]


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("qos-nets") and "error" in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    """The same pipeline in one process (in this one) and in two (torchrun, gloo)."""
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available() and TORCHRUN.exists()):
        pytest.skip("needs torch.distributed with gloo and torchrun")
    folder = tmp_path_factory.mktemp("ddp")
    home = tmp_path_factory.mktemp("ddp_home")
    one, two = folder / "one.pt", folder / "two.pt"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QOS_COMPILE_HOME", str(home))
        for k in TORCHRUN_ENV:
            mp.delenv(k, raising=False)
        assert main(["pipeline", *FLAGS, "-o", str(one)]) == 0
    torch.set_num_threads(threads)  # the run set one thread for this whole process
    proc, seconds = torchrun(folder, home, two)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"folder": folder, "home": home, "one": one, "two": two, "proc": proc, "seconds": seconds}


@needs_gloo
def test_two_processes_write_one_model_close_to_one_process(runs):
    proc = runs["proc"]
    report = json.loads(proc.stdout)            # rank 0 alone printed: one JSON document
    assert report["cached"] == []
    assert proc.stderr.count("[1/5] float training") == 1 and proc.stderr.count("[5/5]") == 1
    assert "2 processes (gloo), per-process batch 32" in proc.stderr
    q1, m1 = load_qos_model(runs["one"])
    q2, m2 = load_qos_model(runs["two"])
    assert all(t.device.type == "cpu" for t in q2.state_dict().values() if isinstance(t, torch.Tensor))
    d1, d2 = m1.provenance.distributed, m2.provenance.distributed
    assert (d1.world_size, d1.backend, d1.device, d1.per_process_batch) == (1, None, "cpu", 64)
    assert (d2.world_size, d2.backend, d2.device, d2.per_process_batch) == (2, "gloo", "cpu", 32)
    assert q2.num_ops == 3 and len(q2.bank) <= 4
    assert m2.baseline.qat_exact.test.count == m1.baseline.qat_exact.test.count == 269  # the full test split
    top1, top2 = bn_only_top1(m1), bn_only_top1(m2)
    assert min(top1) > 90, top1
    assert all(abs(a - b) <= 2.0 for a, b in zip(top1, top2)), (top1, top2)
    work = sorted(p.name.split("-")[0] for p in (runs["folder"] / "two.pt.work").iterdir())
    assert work == ["agn", "finetune", "float", "qat", "search"]  # no stray temporary files either
    assert sorted(p.name for p in runs["folder"].iterdir()) == ["one.pt", "one.pt.work", "two.pt", "two.pt.work"]


@needs_gloo
def test_two_process_model_evaluates_to_its_recorded_full_split_numbers(runs, capsys):
    capsys.readouterr()
    assert main(["eval", str(runs["two"]), "--json", "--threads", "1", "--device", "cpu"]) == 0
    rep = json.loads(capsys.readouterr().out)
    _, meta = load_qos_model(runs["two"])
    assert rep["samples"] == 269 and rep["num_ops"] == 3
    # evaluated by two processes on halves of the split, summed; here by one on all of it
    assert [r["top1"] for r in rep["ops"]] == pytest.approx(bn_only_top1(meta), abs=1e-9)
    assert [r["count"] for r in rep["ops"]] == [269] * 3


@needs_gloo
def test_two_process_rerun_resumes_from_the_cache(runs):
    proc, _ = torchrun(runs["folder"], runs["home"], runs["two"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count(": cached (") == 5  # rank 0's log only
    rep = json.loads(proc.stdout)
    assert rep["cached"] == ["float", "qat", "agn", "search", "finetune"]
    _, meta = load_qos_model(runs["two"])
    assert [o["bn_only"]["test"]["top1"] for o in rep["ops"]] == bn_only_top1(meta)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("command", [["pipeline", "--dataset", "digits"], ["train"], ["eval", "missing.pt"]])
def test_device_cuda_without_a_gpu_is_one_line(tmp_path, capsys, command):
    args = [*command, "--device", "cuda"] + (["-o", str(tmp_path / "m.pt")] if command[0] != "eval" else [])
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "--device cuda" in one_line(err) and "no CUDA GPU" in err
    assert os.listdir(tmp_path) == []


@needs_gloo
def test_unreachable_rendezvous_is_one_line_in_bounded_time(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = clean_env(tmp_path / "home", WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2",
                    MASTER_ADDR="10.255.255.1", MASTER_PORT=str(port), QOS_DIST_TIMEOUT="3")
    t0 = time.time()
    proc = subprocess.run([str(QOS_NETS), "pipeline", "--dataset", "digits", "--device", "cpu", "--no-progress",
                           "-o", str(tmp_path / "m.pt")], env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.time() - t0
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = one_line(proc.stderr)
    assert "distributed start-up failed" in line and f"10.255.255.1:{port}" in line and "QOS_DIST_TIMEOUT" in line
    assert elapsed < 60, elapsed
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "m.pt.work").exists()


@pytest.mark.parametrize("env, needle", [
    ({"QOS_DIST_TIMEOUT": "soon"}, "QOS_DIST_TIMEOUT"),
    ({"QOS_DIST_TIMEOUT": "-5"}, "QOS_DIST_TIMEOUT"),
    ({"RANK": "7"}, "RANK=7"),
    ({"RANK": "x"}, "RANK"),
])
def test_bad_launch_variables_are_one_line(tmp_path, capsys, monkeypatch, env, needle):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code = main(["pipeline", "--dataset", "digits", "-o", str(tmp_path / "m.pt")])  # fails before any rendezvous
    out, err = capsys.readouterr()
    assert code == 2 and needle in one_line(err)
    assert dist_rt.current() == dist_rt.Runtime(torch.device("cpu"))


def _option_strings(parser) -> list[list[str]]:
    import argparse

    return [a.option_strings for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def test_every_option_has_a_spelling_torchrun_does_not_claim():
    """torchrun's argparse takes abbreviations even after the script name (``--n`` is ambiguous
    with --nnodes/--nproc-per-node/...); every qos-nets option needs a spelling that is no
    prefix of a torchrun option. --n, the short alias of --max-circuits, is the known one."""
    from torch.distributed.run import get_args_parser

    theirs = {s for strings in _option_strings(get_args_parser()) for s in strings}
    sub = next(a for a in build_parser()._actions if a.choices and "pipeline" in a.choices)
    colliding: set[str] = set()
    for command in ("pipeline", "train", "search", "finetune", "eval"):
        for strings in _option_strings(sub.choices[command]):
            bad = {s for s in strings if any(t.startswith(s) for t in theirs)}
            colliding |= bad
            assert set(strings) - bad, f"qos-nets {command} {strings}: every spelling is claimed by torchrun"
    assert colliding == {"--n"}


# ----------------------------------------------------------------------------- helpers without a process group
def test_device_choice_and_launch_variables():
    assert dist_rt.resolve_device("cpu") == torch.device("cpu")
    assert dist_rt.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert dist_rt.launch_env({}) == (1, 0, 0, 1)
    assert dist_rt.launch_env({"WORLD_SIZE": "1", "RANK": "0"}) == (1, 0, 0, 1)
    assert dist_rt.launch_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}) \
        == (4, 3, 1, 2)
    assert dist_rt.dist_timeout({}) == 1800 and dist_rt.dist_timeout({"QOS_DIST_TIMEOUT": "2.5"}) == 2.5


def test_shards_cover_the_split_once_in_order():
    from qos_compile.data import load_dataset

    splits = load_dataset("digits", None, 8, 0)
    loader = splits.loaders(64, shuffle=False).test
    seen = []
    for rank in range(3):
        rt = dist_rt.Runtime(torch.device("cpu"), rank=rank, world_size=3)
        for _, y in dist_rt.shard(loader, rt):
            seen.append(y)
    assert torch.equal(torch.cat(seen), splits.test.labels)
    assert dist_rt.shard(loader) is loader  # one process: the loader itself
    assert dist_rt.per_process_batch(64, dist_rt.Runtime(torch.device("cpu"), world_size=3)) == 21
    with pytest.raises(Exception, match="smaller than the 3 processes"):
        dist_rt.per_process_batch(2, dist_rt.Runtime(torch.device("cpu"), world_size=3))
