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
    seconds = int(os.environ.get("QOS_FUZZ_SECONDS", "20"))
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
