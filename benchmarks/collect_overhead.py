"""Overhead of ``collect`` over a plain forward on the BERT-base of ``bench_models.py`` (12 MLP
layers tracked, 32 right-padded sequences of 64-128 tokens, batch 16), as interleaved repeats and
CPU time, so that the slow phases of a shared machine hit every row alike; the minimum of each row
is compared. Rows: the plain forward, ``collect``, and ``collect`` with the in-place reading of
right-padded batches switched off (the masked copy of ``[B, T, C]`` it replaced).

    python benchmarks/collect_overhead.py [repeats]      # default 4; ~1 min per repeat on 2 cores
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_models as bm  # noqa: E402

import semlens_fast.collect as col  # noqa: E402


def main(repeats: int) -> None:
    m, _, layers = bm.build("transformer")
    ds = bm.Tokens(32)

    def masked():
        old, col.PREFIX_MIN_ELEMENTS = col.PREFIX_MIN_ELEMENTS, 1 << 62
        try:
            bm.tracked(m, ds, layers)
        finally:
            col.PREFIX_MIN_ELEMENTS = old

    rows = {"plain forward": lambda: bm.plain(m, ds), "collect": lambda: bm.tracked(m, ds, layers),
            "collect, masked copy": masked}
    for f in rows.values():  # warm-up
        f()
    times: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(repeats):
        for k, f in rows.items():
            t = time.process_time()
            f()
            times[k].append(time.process_time() - t)
    base = min(times["plain forward"])
    for k, v in times.items():
        print(f"{k}: min {min(v):.3f} s CPU ({', '.join(f'{x:.2f}' for x in v)}); "
              f"overhead {100 * (min(v) / base - 1):+.1f} %")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
