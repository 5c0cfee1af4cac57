"""Benchmarks (scripts, not tests): ``python -m qos_compile.bench.emulation_speed``."""
