"""Write the fuzzer's seed corpus: small valid manifests from qos_compile.runtime.manifest.

    python runtime/fuzz/make_corpus.py DIR

(qos_compile.runtime.testing.seed_manifests: a minimal one, one with per-OP slots, overlapping
buffers, several dtypes and metadata, and one with an int16 multiplier bank and layer slots.)
"""
from __future__ import annotations

import sys
from pathlib import Path


def write_corpus(directory: str | Path) -> list[Path]:
    from qos_compile.runtime.testing import seed_manifests

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for name, data in seed_manifests().items():
        (d / name).write_bytes(data)
        out.append(d / name)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_corpus.py DIR")
    for p in write_corpus(sys.argv[1]):
        print(p)
