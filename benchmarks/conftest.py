"""Shared benchmark settings.

Benchmarks are run with ``python benchmarks/run.py``, which
calls pytest-benchmark and writes BENCHMARKS.md. ``SEMLENS_BENCH_SCALE`` (default 1.0)
scales the data sizes down for quick runs; the published figures use 1.0.
"""
import os

SCALE = float(os.environ.get("SEMLENS_BENCH_SCALE", "1.0"))


def scaled(n: int, minimum: int = 1) -> int:
    return max(minimum, int(n * SCALE))
