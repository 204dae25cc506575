"""Ahead-of-time compilation of every Triton kernel configuration, without a GPU.

Each kernel family (a module of :mod:`semlens_fast.ops.triton`) lists the
configurations its dispatcher can choose in ``compile_cases()``, yielding
``(label, kernel, example_args, kwargs)``: the example arguments are bound by the
same code a launch uses (so signature, constants and specialisations are exactly a
launch's), then ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``
runs the whole pipeline down to a cubin with Triton's bundled ``ptxas -v``, whose
report gives registers, spills and stack per kernel.

Command line (no GPU needed; the interpreter must be off)::

    python -m semlens_fast.ops.triton.aot                  # every family, sm_80 + sm_90, 2 processes
    python -m semlens_fast.ops.triton.aot --markdown       # the register/spill table of the docs
    python -m semlens_fast.ops.triton.aot --json out.json  # machine-readable (the tests use it)

Exit status 1 if a configuration fails to compile or spills. Nothing is cached
between runs: each run compiles into a fresh temporary Triton cache.

To add a kernel family, give its module a ``compile_cases()`` and add the module to
:data:`FAMILIES`.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

FAMILIES = [
    "semlens_fast.ops.triton.topk",
    "semlens_fast.ops.triton.similarity",
    "semlens_fast.ops.triton.sae",
    "semlens_fast.ops.triton.maxpool",
]
ARCHS = (80, 90)

_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")


def _cases(family: str):
    return list(importlib.import_module(family).compile_cases())


def compile_case(kernel, args, kwargs, cc: int) -> dict:
    """Compile one configuration for ``sm_<cc>``; returns the ptxas figures."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    log = io.StringIO()
    t0, c0 = time.perf_counter(), _cpu_seconds()
    with contextlib.redirect_stdout(log), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="tl.make_block_ptr is deprecated", category=UserWarning)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    text = log.getvalue()
    regs = _REGS.search(text)
    spill = _SPILL.search(text)
    if regs is None or spill is None:
        raise RuntimeError(f"no ptxas report in the compile log:\n{text}")
    smem = compiled.metadata.shared
    return dict(regs=int(regs.group(1)), stack=int(spill.group(1)), spill_stores=int(spill.group(2)),
                spill_loads=int(spill.group(3)), shared=int(smem), ptx_bytes=len(compiled.asm["ptx"]),
                num_warps=compiled.metadata.num_warps, num_stages=compiled.metadata.num_stages,
                seconds=round(seconds, 3), cpu_seconds=round(cpu, 3))


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _work(job):
    family, index, cc = job
    label, kernel, args, kwargs = _cases(family)[index]
    row = dict(family=family.rsplit(".", 1)[1], label=label, arch=f"sm_{cc}", kernel=kernel.__name__)
    try:
        row.update(compile_case(kernel, args, kwargs, cc))
        row["ok"] = row["spill_stores"] == 0 and row["spill_loads"] == 0
        if not row["ok"]:
            row["error"] = "register spill"
    except Exception as exc:  # reported, not raised: one bad configuration must not hide the others
        row.update(ok=False, error=f"{type(exc).__name__}: {_tail(exc)}")
    return row


def _tail(exc: BaseException) -> str:
    """The message of a compile error without the echoed source (its last lines)."""
    text = str(exc).strip()
    causes = []
    while exc.__cause__ is not None:
        exc = exc.__cause__
        causes.append(f"{type(exc).__name__}: {exc}")
    lines = (text.splitlines() + causes)[-6:]
    return " | ".join(line.strip() for line in lines if line.strip())[:1500]


def _init_worker(cache: str) -> None:
    from triton import knobs

    os.environ["TRITON_CACHE_DIR"] = cache
    knobs.cache.dir = cache


def run(families=None, archs=ARCHS, jobs: int = 2, match: str | None = None) -> list[dict]:
    """Compile every configuration of ``families`` for every arch (``jobs`` processes)."""
    if os.environ.get("TRITON_INTERPRET", "") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 is set: ahead-of-time compilation needs the real compiler")
    families = families or FAMILIES
    cache = tempfile.mkdtemp(prefix="semlens-aot-")
    _init_worker(cache)
    jobs_list = [(f, i, cc) for f in families for i, case in enumerate(_cases(f)) for cc in archs
                 if match is None or re.search(match, case[0])]
    # the most expensive configurations (largest lists) first, so the pool ends together
    jobs_list.sort(key=lambda j: -_cost_hint(_cases(j[0])[j[1]][3]))
    if jobs <= 1:
        rows = [_work(j) for j in jobs_list]
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork"), initializer=_init_worker,
                                 initargs=(cache,)) as pool:
            rows = list(pool.map(_work, jobs_list))
    rows.sort(key=lambda r: (r["family"], r["kernel"], r["label"], r["arch"]))
    return rows


def _cost_hint(kwargs: dict) -> int:
    return int(kwargs.get("KP", 0)) * int(kwargs.get("MC", kwargs.get("BQ", 1)))


def markdown(rows: list[dict]) -> str:
    out = ["| kernel | configuration | arch | warps | registers | spill stores / loads (bytes) | stack | shared (bytes) | PTX (kB) | compile (s) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "regs" not in r:
            out.append(f"| {r['kernel']} | {r['label']} | {r['arch']} | | FAILED: {r['error'][:80]} | | | | | |")
            continue
        out.append(f"| {r['kernel']} | {r['label']} | {r['arch']} | {r['num_warps']} | {r['regs']} | "
                   f"{r['spill_stores']} / {r['spill_loads']} | {r['stack']} | {r['shared']} | "
                   f"{r['ptx_bytes'] / 1000:.0f} | {r['seconds']:.1f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", action="append", help="module of a kernel family (default: all of FAMILIES)")
    p.add_argument("--arch", action="append", type=int, help="compute capability, e.g. 80 or 90 (default: both)")
    p.add_argument("--jobs", type=int, default=2, help="compiler processes (default 2)")
    p.add_argument("--match", help="only the configurations whose label matches this regular expression")
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(a.family, tuple(a.arch) if a.arch else ARCHS, a.jobs, a.match)
    wall = time.perf_counter() - t0
    cpu = sum(r.get("cpu_seconds", 0.0) for r in rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(rows=rows, wall_seconds=wall, cpu_seconds=cpu), f, indent=1)
    if a.markdown:
        print(markdown(rows))
    bad = [r for r in rows if not r["ok"]]
    cpu = sum(r.get("cpu_seconds", 0.0) for r in rows)
    worst = max((r for r in rows if "regs" in r), key=lambda r: r["regs"], default=None)
    print(f"{len(rows)} configurations compiled in {wall:.1f} s ({a.jobs} processes, {cpu:.1f} CPU s); "
          f"{len(bad)} failed or spilled" + (f"; most registers: {worst['regs']} ({worst['label']}, {worst['arch']})" if worst else ""),
          file=sys.stderr)
    for r in bad:
        print(f"FAILED {r['kernel']} [{r['label']}] {r['arch']}: {r['error'][:500]}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
