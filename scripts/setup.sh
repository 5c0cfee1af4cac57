#!/usr/bin/env bash
# Set up everything qos-compile needs on a Debian machine, idempotently:
# the aarch64 cross toolchain and qemu (Debian packages) and a virtual
# environment .venv with the package and its pinned dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || missing+=(gcc-aarch64-linux-gnu)
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || missing+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64-static >/dev/null 2>&1 || missing+=(qemu-user-static)
# llvm-mca-19 / llvm-objdump-19 for the kernel cost estimate (python -m qos_compile.bench.estimate)
command -v llvm-mca-19 >/dev/null 2>&1 || missing+=(llvm-19)
# clang + its runtime libraries (libFuzzer, sanitizers) for the manifest fuzz test
command -v clang >/dev/null 2>&1 || missing+=(clang)
dpkg -s libclang-rt-14-dev >/dev/null 2>&1 || missing+=(libclang-rt-14-dev)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
stamp=$(cat pyproject.toml setup.py | sha256sum | cut -c1-16)
if [ "$(cat .venv/.qos-stamp 2>/dev/null)" != "$stamp" ]; then
  echo "setup: installing Python packages into .venv (torch==2.13.0 CPU, apache-tvm==0.27.0.post1, ...)"
  # (pip warns about every missing extra-index folder of this machine's pip.conf: drop those lines)
  .venv/bin/python -m pip install -q -e '.[dev]' 2>&1 | { grep -v '^WARNING: Location' || true; }
  echo "$stamp" > .venv/.qos-stamp
fi
