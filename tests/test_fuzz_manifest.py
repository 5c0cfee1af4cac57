"""libFuzzer over the manifest loader and executor (runtime/fuzz/fuzz_manifest.c), bounded in time.

QOS_FUZZ_SECONDS (default 20) sets the run time. Any crash, sanitizer report, leak, timeout or
out-of-memory fails the test, naming the reproducer file. Without clang + libFuzzer the test FAILS
(it does not skip): install Debian's `clang libclang-rt-14-dev` (scripts/setup.sh).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from qos_compile.errors import QosError
from qos_compile.runtime import build as B
from qos_compile.runtime.testing import seed_manifests


def test_fuzz_manifest_loader(tmp_path):
    if not shutil.which("clang"):
        pytest.fail("clang is not installed: the manifest fuzzer needs clang with libFuzzer "
                    "(Debian: apt-get install clang libclang-rt-14-dev)")
    try:
        fuzzer = B.build_fuzzer()
    except QosError as exc:
        pytest.fail(f"cannot build the libFuzzer target (Debian: apt-get install clang libclang-rt-14-dev): {exc}")
    seconds = int(os.environ.get("QOS_FUZZ_SECONDS", "12"))
    seeds, corpus, artifacts = tmp_path / "seeds", tmp_path / "corpus", tmp_path / "artifacts"
    for d in (seeds, corpus, artifacts):
        d.mkdir()
    for name, data in seed_manifests().items():
        (seeds / name).write_bytes(data)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:allocator_may_return_null=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    cmd = [str(fuzzer), f"-max_total_time={seconds}", "-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1",
           f"-artifact_prefix={artifacts}/", "-seed=1", str(corpus), str(seeds)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 180, env=env)
    findings = sorted(p.name for p in artifacts.iterdir())
    log = proc.stderr
    execs = re.search(r"stat::number_of_executed_units:\s*(\d+)", log)
    cov = re.findall(r"cov: (\d+)", log)
    print(f"fuzz: {seconds}s, {execs.group(1) if execs else '?'} executions, coverage {cov[-1] if cov else '?'} "
          f"edges, findings: {findings or 'none'}")
    assert proc.returncode == 0 and not findings, (
        f"the fuzzer found a problem (exit {proc.returncode}); reproduce with: {fuzzer} {artifacts}/<file>\n"
        f"findings: {findings}\n{log[-6000:]}")
    assert execs and int(execs.group(1)) > 100, log[-3000:]


# --------------------------------------------------------------------------- structure-aware campaign
# A Python mutator that knows the .qosm layout (qos_compile.runtime.fuzzing) changes fields of real
# manifests -- counts, offsets, dtypes, shapes, names, kernel names, argument kinds and indices --
# with the CRC-32 recomputed, and sanitized (ASan + UBSan) builds run every mutant: the loader
# harness with the touching kernel, the same harness linked with a compiled model's real TVM
# kernels and kernel table, and that model's qos-run. Seeds: a model compiled by qos-compile (the
# small conv + BN + linear network of test_compile), the runtime tests' tiny model and the seed
# manifests. Findings are kept as recipes in tests/data/fuzz_manifest_regressions.json.
# QOS_FUZZ_STRUCT_SECONDS (default 30) bounds the campaign, QOS_FUZZ_STRUCT_MUTANTS (default 20000)
# the mutants.
import json  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from qos_compile.runtime import fuzzing as F  # noqa: E402
from qos_compile.runtime.testing import tiny_model  # noqa: E402

REGRESSIONS = Path(__file__).parent / "data" / "fuzz_manifest_regressions.json"
CODES = {0: "OK", -4: "FORMAT", -5: "VERSION", -6: "CHECKSUM", -7: "KERNEL_MISSING", -10: "LIMIT", -3: "NOMEM"}


@pytest.fixture(scope="module")
def fuzz_setup(tmp_path_factory):
    """The compiled seed model, the sanitized runners and every seed manifest."""
    from test_compile import _tiny_qnet

    from qos_compile.compiler import compile_qnet

    root = tmp_path_factory.mktemp("structfuzz")
    res = compile_qnet(_tiny_qnet(), "x86_64", root / "model", input_shape=(1, 8, 8), verify=False)
    work = root / "work"
    runners = {"touch": F.build_recipe_runner(work), "model": F.build_recipe_runner(work, res.out_dir)}
    seeds = {"compiled": res.manifest.read_bytes(), "tiny": tiny_model(seed=7).data, **seed_manifests()}
    qos_run = F.build_sanitized_qos_run(res.out_dir, work)
    return {"root": root, "work": work, "out": res.out_dir, "runners": runners, "seeds": seeds, "qos_run": qos_run}


def _recipe(seed: str, mutations) -> str:
    return json.dumps({"seed": seed, "mutations": [m.to_json() for m in mutations]})


def _run_checked(setup, runner: str, seed: str, muts: list) -> list:
    data = setup["seeds"][seed]
    try:
        return F.run_mutants(setup["runners"][runner], data, [F.patches(data, m)[1] for m in muts], setup["work"])
    except F.Finding as f:
        recipe = _recipe(seed, muts[f.index]) if 0 <= f.index < len(muts) else "?"
        pytest.fail(f"the {runner} runner {f.kind}ed on mutant {f.index} of seed {seed!r}; add this recipe to "
                    f"{REGRESSIONS.name} once fixed:\n{recipe}\n{f.log[-4000:]}")


def test_structure_aware_campaign(fuzz_setup):
    """Field-level mutations with the CRC recomputed reach the parser and never crash, hang or trip
    a sanitizer, through the loader (touching kernel) and through a compiled model's real kernels."""
    seconds = float(os.environ.get("QOS_FUZZ_STRUCT_SECONDS", "18"))
    budget = int(os.environ.get("QOS_FUZZ_STRUCT_MUTANTS", "20000"))
    rng = random.Random(int(os.environ.get("QOS_FUZZ_SEED", "17")))
    plan = [("model", "compiled"), ("touch", "compiled"), ("touch", "tiny")] + \
        [("touch", name) for name in seed_manifests()]
    names = {seed: F.interesting_names(data) for seed, data in fuzz_setup["seeds"].items()}
    codes: dict[tuple[str, str], dict[int, int]] = {}
    run_codes: dict[int, int] = {}
    done, t0, k = 0, time.monotonic(), 0
    floor = min(budget, 2000)      # always this many; the time budget only adds more on a fast machine
    while done < budget and (done < floor or time.monotonic() - t0 < seconds):
        runner, seed = plan[k % len(plan)]
        k += 1
        data = fuzz_setup["seeds"][seed]
        muts = [F.random_mutant(data, rng, names[seed]) for _ in range(min(250, budget - done))]
        for r in _run_checked(fuzz_setup, runner, seed, muts):
            c = codes.setdefault((runner, seed), {})
            c[r.open_rc] = c.get(r.open_rc, 0) + 1
            if runner == "model" and r.open_rc == 0:
                run_codes[r.run_rc] = run_codes.get(r.run_rc, 0) + 1
        done += len(muts)
    summary = {f"{r}/{s}": {CODES.get(c, c): n for c, n in sorted(v.items())} for (r, s), v in codes.items()}
    print(f"structure-aware fuzz: {done} mutants in {time.monotonic() - t0:.1f} s: {json.dumps(summary)}; "
          f"real-kernel runs of accepted mutants: {run_codes}")
    assert done >= floor, done
    compiled = codes[("model", "compiled")]
    # the mutants reach deep: some pass every check and run, the rest fail in many different ways
    assert compiled.get(0, 0) > 0 and compiled.get(-4, 0) > 0 and compiled.get(-7, 0) > 0, compiled
    assert run_codes.get(0, 0) > 0 and run_codes.get(-8, 0) > 0, run_codes     # kernels refuse bad arguments


def test_sanitized_qos_run_on_mutants(fuzz_setup, tmp_path):
    """The compiled model's own qos-run, built with ASan + UBSan, on mutated manifests: exit 0, 1 or 2
    with a message, never a signal or a sanitizer report, each run bounded in time."""
    rng = random.Random(5)
    data = fuzz_setup["seeds"]["compiled"]
    names = F.interesting_names(data)
    muts = [F.random_mutant(data, rng, names) for _ in range(400)]
    results = _run_checked(fuzz_setup, "model", "compiled", muts)
    # every accepted mutant, a sample of the rejected ones, and each kernel-name attack
    chosen = [i for i, r in enumerate(results) if r.open_rc == 0][:25]
    chosen += [i for i, r in enumerate(results) if r.open_rc == -7][:8]
    chosen += [i for i, r in enumerate(results) if r.open_rc not in (0, -7)][:12]
    x = tmp_path / "x.bin"
    x.write_bytes(bytes(4 * 64))             # the model's input: float32 (1, 1, 8, 8)
    env = {**os.environ, **F.SANITIZER_ENV}
    for i in chosen:
        path = tmp_path / f"m{i}.qosm"
        path.write_bytes(F.apply(data, muts[i]))
        proc = subprocess.run([str(fuzz_setup["qos_run"]), str(path), "--input", str(x), "--output",
                               str(tmp_path / "y.bin"), "--op", "0"], capture_output=True, text=True, env=env,
                              timeout=60)
        want = (0, 1, 2) if results[i].open_rc == 0 else (2,)     # accepted: runs, a kernel refuses, or a bad input
        assert proc.returncode in want and "Sanitizer" not in proc.stderr and "runtime error" not in proc.stderr, (
            f"qos-run on mutant {i}: exit {proc.returncode}, want {want}\n{_recipe('compiled', muts[i])}\n"
            f"{proc.stderr[-3000:]}")
        if proc.returncode:
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("qos-run: "), proc.stderr
    assert len(chosen) >= 20


def test_stored_fuzz_findings_stay_fixed(fuzz_setup, tmp_path):
    """Every recipe in tests/data/fuzz_manifest_regressions.json: the sanitized runners (and the
    sanitized qos-run for the compiled seed) reject it cleanly with the expected error code."""
    recipes = F.load_recipes(REGRESSIONS)
    assert recipes
    env = {**os.environ, **F.SANITIZER_ENV}
    for k, r in enumerate(recipes):
        runners = ("touch", "model") if r["seed"] == "compiled" else ("touch",)
        for runner in runners:
            res = _run_checked(fuzz_setup, runner, r["seed"], [r["mutations"]])[0]
            if runner == "model" or r["seed"] != "compiled" or r.get("expect_open") != -7:
                assert res.open_rc == r.get("expect_open", res.open_rc), (k, runner, res)
        if r["seed"] == "compiled":
            path = tmp_path / f"r{k}.qosm"
            path.write_bytes(F.apply(fuzz_setup["seeds"]["compiled"], r["mutations"]))
            proc = subprocess.run([str(fuzz_setup["qos_run"]), str(path), "--info"], capture_output=True, text=True,
                                  env=env, timeout=60)
            assert proc.returncode == 2 and "not one of the kernels this program was built with" in proc.stderr, \
                (k, proc.returncode, proc.stderr[-2000:])
            real = subprocess.run([str(fuzz_setup["out"] / "qos-run"), str(path), "--info"], capture_output=True,
                                  text=True, timeout=60)
            assert real.returncode == 2 and "not one of the kernels" in real.stderr, (k, real.stderr)


def test_mutator_recipes_round_trip_and_recompute_the_crc():
    from qos_compile.runtime.manifest import read_manifest

    data = tiny_model(seed=7).data
    rng = random.Random(3)
    for _ in range(50):
        muts = F.random_mutant(data, rng, F.interesting_names(data))
        again = [F.Mutation.from_json(json.loads(json.dumps(m.to_json()))) for m in muts]
        assert F.apply(data, again) == F.apply(data, muts)
    # a field change with the CRC recomputed gets past the checksum to the parser
    bad = F.apply(data, [F.Mutation("record", "kernel", 99, "STEPS", 0)])
    with pytest.raises(QosError, match="kernel 99 out of range"):
        read_manifest(bad)
    stale = F.apply(data, [F.Mutation("record", "kernel", 99, "STEPS", 0)], fix_crc=False)
    with pytest.raises(QosError, match="checksum"):
        read_manifest(stale)
