"""The target table: one declarative TOML file per compilation target.

Every part of qos-compile that depends on the machine a model is compiled for
(TVM code generation, kernel schedules, cross compiling and linking the C
runtime, running under an emulator) reads it from here, so adding a board means
adding one small file, not editing code.

Where the files are found, first match of a name wins:

1. each folder in ``QOS_TARGETS_PATH`` (``os.pathsep``-separated; user boards),
2. the built-in table: the copy a wheel ships as package data
   (``qos_compile/_data/targets``), else the repository's top-level ``targets/``
   folder in a checkout (``qos_compile.resources.data_dir``).

A file (``targets/<name>.toml``)::

    name = "aarch64"                       # must equal the file name
    arch = "aarch64"                       # machine (uname -m) that runs the code
    aliases = ["arm", "arm64"]
    description = "..."
    package = "gcc-aarch64-linux-gnu"      # Debian package of the compiler (for messages)
    features = ["neon"]                    # or "native": detected from /proc/cpuinfo
    [kernel_costs]                         # optional: conv kernel time / exact int8 conv time per
    gather = 5.1                           # unit, keys kernel_costs.COST_KEYS (bench.kernels
                                           # measures them, bench.estimate estimates them)
    [kernel_costs_by_mcpu.znver5]          # optional: these replace [kernel_costs]' where the
    gather = 22.0                          # resolved [tvm] mcpu is znver5 (a native target's
                                           # costs follow the CPU it runs on)
    [tvm]                                  # TVM target dict; mcpu = "native" -> LLVM host CPU
    kind = "llvm"
    mtriple = "aarch64-linux-gnu"
    mcpu = "generic"
    mattr = ["+neon"]
    [toolchain]
    cc = "aarch64-linux-gnu-gcc"           # C compiler and linker
    cflags = ["-O2", "-std=c99"]
    ldflags = ["-static", "-pthread"]
    sysroot = "/usr/aarch64-linux-gnu"     # the target's libc (emulator -L); not passed to cc
    emulator = ["qemu-aarch64-static", "-L", "/usr/aarch64-linux-gnu"]   # runs it when not the host
    emulator_package = "qemu-user-static"
"""
from __future__ import annotations

import os
import platform
import shutil
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import QosError
from .kernel_costs import COST_KEYS
from .resources import data_dir, data_dir_candidates
from .runtime_env import import_tvm

#: x86 feature flags (names as in /proc/cpuinfo) that kernel selection may use.
X86_FEATURES = ("sse2", "sse4_1", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                "avx512vnni", "avx512_vnni", "avx512vbmi", "avx_vnni")

_TOP_KEYS = {"name", "arch", "aliases", "description", "package", "features", "tvm", "toolchain", "kernel_costs",
             "kernel_costs_by_mcpu"}
_TOOL_KEYS = {"cc", "cflags", "ldflags", "sysroot", "emulator", "emulator_package"}
_ARCH_ALIASES = {"amd64": "x86_64", "x86-64": "x86_64", "arm64": "aarch64", "aarch64_be": "aarch64"}


def host_arch() -> str:
    """This machine's architecture, normalised (``x86_64`` or ``aarch64``)."""
    m = platform.machine().lower()
    return _ARCH_ALIASES.get(m, m)


def _host_cpu_features() -> frozenset[str]:
    """The CPU flags of this machine that appear in X86_FEATURES (or neon/dotprod on ARM)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
            break
    out = {f for f in flags if f in X86_FEATURES}
    if "avx512_vnni" in out:          # the kernel spells it avx512_vnni; accept both names
        out.add("avx512vnni")
    if "asimd" in flags:
        out.add("neon")
    if "asimddp" in flags:
        out.add("dotprod")
    return frozenset(out)


def _llvm_host_cpu() -> str:
    return str(import_tvm().target.codegen.llvm_get_system_cpu())


@dataclass(frozen=True, eq=False)
class Target:
    """One compilation target, as declared in ``targets/<name>.toml`` (with ``native`` resolved)."""

    name: str
    arch: str
    aliases: tuple[str, ...]
    description: str
    tvm: dict[str, Any]
    cc: str
    cflags: tuple[str, ...] = ()
    ldflags: tuple[str, ...] = ()
    sysroot: str | None = None
    emulator: list[str] | None = None
    package: str = ""
    emulator_package: str | None = None
    features: frozenset[str] = frozenset()
    kernel_costs: dict[str, float] = field(default_factory=dict)
    source: Path | None = field(default=None, compare=False)
    costs_mcpu: str | None = None          # the [kernel_costs_by_mcpu] table applied, if any

    def __repr__(self) -> str:
        return f"Target({self.name!r}, {self.tvm.get('mtriple')}, mcpu={self.tvm.get('mcpu')})"

    @property
    def is_host(self) -> bool:
        """True when code for this target runs directly on this machine (no emulator)."""
        return self.arch == host_arch()

    def costs_text(self) -> str:
        """Where this target's kernel costs come from, for headers and reports."""
        if self.costs_mcpu is not None:
            return f"defaults + [kernel_costs] + [kernel_costs_by_mcpu.{self.costs_mcpu}]"
        return "defaults + [kernel_costs]" if self.kernel_costs else "defaults"

    def has(self, feature: str) -> bool:
        """Whether the target declares CPU feature ``feature`` (e.g. ``neon``, ``avx512f``)."""
        return feature in self.features

    def tvm_target(self) -> "Any":
        """The ``tvm.target.Target`` for code generation (imports tvm)."""
        tvm = import_tvm()
        try:
            return tvm.target.Target(dict(self.tvm))
        except Exception as e:  # noqa: BLE001 - TVM raises its own error types
            raise QosError(f"target {self.name}: TVM rejects its target dict {self.tvm}: {e}") from None

    def check_toolchain(self) -> str:
        """Return the full path of the C compiler; QosError naming the Debian package if it is missing."""
        path = shutil.which(self.cc)
        if path is None:
            raise QosError(
                f"target {self.name}: C compiler {self.cc!r} not found; install the Debian package "
                f"{self.package} (apt-get install {self.package})")
        return path

    def missing_features(self) -> frozenset[str]:
        """The CPU features this target's code uses that this machine lacks (on its arch only;
        e.g. ``x86_64-avxvnni``'s ``avx_vnni`` on a CPU without AVX-VNNI)."""
        if not self.is_host:
            return frozenset()
        return frozenset(f for f in self.features if f in X86_FEATURES or f in ("neon", "dotprod")) - \
            _host_cpu_features()

    def run_prefix(self) -> list[str]:
        """The command prefix that runs this target's programs here: [] on the host, else the
        emulator. QosError where neither can: no emulator, or a CPU of the target's arch that
        lacks some of its features (the code would stop on an illegal instruction; qemu-x86_64
        7.2 executes such AVX2 code wrongly, so it is no way out)."""
        if self.is_host:
            missing = self.missing_features()
            if missing:
                raise QosError(f"target {self.name}'s code cannot run on this CPU: it lacks "
                               f"{', '.join(sorted(missing))}")
            return []
        if not self.emulator:
            raise QosError(f"target {self.name} ({self.arch}) cannot run on this {host_arch()} machine "
                           "and declares no emulator")
        if shutil.which(self.emulator[0]) is None:
            pkg = self.emulator_package or "qemu-user-static"
            raise QosError(f"target {self.name}: emulator {self.emulator[0]!r} not found; install the "
                           f"Debian package {pkg} (apt-get install {pkg})")
        return list(self.emulator)


def _str_list(v: Any, what: str, path: Path) -> tuple[str, ...]:
    if isinstance(v, str) or not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise QosError(f"{path}: {what} must be a list of strings, got {v!r}")
    return tuple(v)


def _parse(path: Path, resolve_native: bool = True) -> Target:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise QosError(f"cannot read target file {path}: {e}") from None
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise QosError(f"{path}: unknown keys {sorted(unknown)} (allowed: {sorted(_TOP_KEYS)})")
    for key in ("name", "arch", "description", "package", "tvm", "toolchain"):
        if key not in data:
            raise QosError(f"{path}: missing key {key!r}")
    name = data["name"]
    if not isinstance(name, str) or name != path.stem:
        raise QosError(f"{path}: name {name!r} must equal the file name {path.stem!r}")
    tvm = dict(data["tvm"])
    if tvm.get("kind") not in ("llvm", "c"):
        raise QosError(f"{path}: [tvm] kind must be 'llvm' or 'c', got {tvm.get('kind')!r}")
    if "mtriple" not in tvm:
        raise QosError(f"{path}: [tvm] needs an mtriple")
    tool = dict(data["toolchain"])
    unknown = set(tool) - _TOOL_KEYS
    if unknown:
        raise QosError(f"{path}: unknown [toolchain] keys {sorted(unknown)} (allowed: {sorted(_TOOL_KEYS)})")
    if not isinstance(tool.get("cc"), str) or not tool["cc"]:
        raise QosError(f"{path}: [toolchain] cc must name the C compiler")
    arch = _ARCH_ALIASES.get(data["arch"], data["arch"])
    native = arch == host_arch()
    feats = data.get("features", [])
    if feats == "native":
        features = _host_cpu_features() if native else frozenset()
    else:
        features = frozenset(_str_list(feats, "features", path))
    if tvm.get("mcpu") == "native":
        if not native:
            raise QosError(f"{path}: mcpu = 'native' only works on a {arch} host (this is {host_arch()})")
        if resolve_native:
            tvm["mcpu"] = _llvm_host_cpu()
    if "mattr" in tvm:
        tvm["mattr"] = list(_str_list(tvm["mattr"], "[tvm] mattr", path))
    costs = _costs(data.get("kernel_costs", {}), "[kernel_costs]", path)
    by_mcpu = data.get("kernel_costs_by_mcpu", {})
    if not isinstance(by_mcpu, dict):
        raise QosError(f"{path}: [kernel_costs_by_mcpu] takes one table per LLVM CPU name")
    by_mcpu = {cpu: _costs(table, f"[kernel_costs_by_mcpu.{cpu}]", path) for cpu, table in by_mcpu.items()}
    costs_mcpu = tvm.get("mcpu") if tvm.get("mcpu") in by_mcpu else None
    if costs_mcpu is not None:
        costs = {**costs, **by_mcpu[costs_mcpu]}
    emulator = tool.get("emulator")
    if emulator is not None:
        emulator = list(_str_list(emulator, "[toolchain] emulator", path)) or None
    return Target(
        name=name, arch=arch, aliases=_str_list(data.get("aliases", []), "aliases", path),
        description=str(data["description"]), tvm=tvm, cc=tool["cc"],
        cflags=_str_list(tool.get("cflags", []), "[toolchain] cflags", path),
        ldflags=_str_list(tool.get("ldflags", []), "[toolchain] ldflags", path),
        sysroot=tool.get("sysroot") or None, emulator=emulator, package=str(data["package"]),
        emulator_package=tool.get("emulator_package"), features=features,
        kernel_costs=costs, source=path, costs_mcpu=costs_mcpu)


def _costs(table: Any, what: str, path: Path) -> dict[str, float]:
    """A checked cost table: positive numbers for keys of ``COST_KEYS``."""
    if not isinstance(table, dict) or set(table) - set(COST_KEYS) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in table.values()):
        raise QosError(f"{path}: {what} takes positive numbers for {', '.join(COST_KEYS)}")
    return {k: float(v) for k, v in table.items()}


def target_dirs() -> list[Path]:
    """The folders searched for target files, in priority order (existing ones only)."""
    dirs = [Path(p) for p in os.environ.get("QOS_TARGETS_PATH", "").split(os.pathsep) if p]
    try:
        dirs.append(builtin_targets_dir())
    except QosError:      # a broken install: QOS_TARGETS_PATH alone may still describe the targets
        pass
    return [d for d in dirs if d.is_dir()]


def builtin_targets_dir() -> Path:
    """The folder of the target files that ship with qos-compile (QosError if it is missing)."""
    return data_dir("targets")


@lru_cache(maxsize=8)
def _load(files: tuple[tuple[Path, int], ...]) -> dict[str, Target]:
    table: dict[str, Target] = {}
    for path, _mtime in files:
        if path.stem not in table:
            table[path.stem] = _parse(path)
    return table


def load_targets() -> dict[str, Target]:
    """All targets by name. QosError if no target folder exists or a file is malformed."""
    dirs = target_dirs()
    if not dirs:
        packaged, checkout = data_dir_candidates("targets")
        raise QosError(f"no target files found: expected a targets/ folder at {packaged} (installed) or "
                       f"{checkout} (checkout); reinstall qos-compile, or set QOS_TARGETS_PATH to a folder "
                       "of <name>.toml files")
    files = tuple((p, p.stat().st_mtime_ns) for d in dirs for p in sorted(d.glob("*.toml")))
    if not files:
        raise QosError(f"no *.toml target files in {', '.join(map(str, dirs))}")
    table = _load(files)
    seen: dict[str, str] = {}
    for t in table.values():
        for key in (t.name, *t.aliases):
            if key in seen and seen[key] != t.name:
                raise QosError(f"target name/alias {key!r} is used by both {seen[key]} and {t.name}")
            seen[key] = t.name
    return dict(sorted(table.items()))


def get_target(name_or_alias: "str | Target") -> Target:
    """The target with this name or alias; QosError listing the valid names otherwise."""
    if isinstance(name_or_alias, Target):
        return name_or_alias
    table = load_targets()
    key = str(name_or_alias).strip()
    if key in table:
        return table[key]
    for t in table.values():
        if key in t.aliases:
            return t
    names = ", ".join(f"{t.name} ({', '.join(t.aliases)})" if t.aliases else t.name for t in table.values())
    raise QosError(f"unknown target {key!r}; valid targets (aliases): {names}")


def host_target() -> Target:
    """The target for this machine: the one named after its architecture (``x86_64``), else any that runs here."""
    table = load_targets()
    if host_arch() in table:
        return table[host_arch()]
    for t in table.values():
        if t.is_host:
            return t
    raise QosError(f"no target file describes this {host_arch()} machine")
