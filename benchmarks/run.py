"""Run the benchmark suites and write BENCHMARKS.md.

    python benchmarks/run.py                 # every suite
    python benchmarks/run.py bench_topk.py   # some suites (the others keep their stored results)
    python benchmarks/run.py relevance       # short name: every bench_relevance*.py
    SEMLENS_BENCH_SCALE=0.1 python benchmarks/run.py   # quick, smaller data

Each suite puts the implementations that compete in one pytest-benchmark *group*; the
one marked ``extra_info["ours"]`` is the reference point of the ratios in the table
("x ours" = that row's mean time / ours, so 20.0 means ours is 20x faster).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _machine() -> list[str]:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        from semlens_fast.ops import cpu_isa

        isa = cpu_isa()
    except Exception:  # pragma: no cover
        isa = "unknown"
    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("semanticlens", "faiss-cpu", "zennit", "zennit-crp", "dl-backtrace", "triton"):
        try:
            versions.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            pass
    return [
        f"- machine: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
        f"semlens_fast CPU kernels: {isa}",
        f"- versions: {', '.join(versions)}",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- scale: SEMLENS_BENCH_SCALE={os.environ.get('SEMLENS_BENCH_SCALE', '1.0')}",
    ]


def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def tables(data: dict) -> list[str]:
    groups: dict[str, list[dict]] = {}
    for b in data.get("benchmarks", []):
        groups.setdefault(b.get("group") or b["name"], []).append(b)
    out: list[str] = []
    for group, rows in groups.items():
        ours = next((r for r in rows if r.get("extra_info", {}).get("ours")), None)
        out += [f"### {group}", "", "| implementation | mean | min | throughput | x ours |", "|---|---|---|---|---|"]
        for r in rows:
            st = r["stats"]
            info = r.get("extra_info", {})
            name = r.get("param") or r["name"]
            label = info.get("label") or r["name"].split("[", 1)[-1].rstrip("]")
            thr = ""
            if info.get("items"):
                thr = f"{info['items'] / st['mean']:,.0f} {info.get('unit', 'items')}/s"
            ratio = f"{st['mean'] / ours['stats']['mean']:.2f}" if ours else ""
            extra = info.get("note", "")
            out.append(f"| {label}{' — ' + extra if extra else ''} | {_fmt_time(st['mean'])} | {_fmt_time(st['min'])} | {thr} | {ratio} |")
            del name
        out.append("")
        for r in rows:  # suites may add a table of their own (e.g. the relevance evaluation)
            md = r.get("extra_info", {}).get("markdown")
            if md:
                out += [md.rstrip(), ""]
    return out


RESULTS = HERE / "results"


def run_suite(suite: str) -> int:
    """Run one suite; on success store its JSON (with the machine description) in results/."""
    RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        js = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--benchmark-json={js}",
               "--benchmark-only", "-o", "python_files=bench_*.py", "--rootdir", str(HERE), str(HERE / suite)]
        print("running:", " ".join(cmd), flush=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        rc = subprocess.call(cmd, cwd=str(HERE), env=env)
        if not js.exists() or not js.read_text().strip():
            print(f"{suite}: no benchmark results were written", file=sys.stderr)
            return rc or 1
        data = json.loads(js.read_text())
    data["semlens_machine"] = _machine()
    data["semlens_command"] = f"python benchmarks/run.py {suite}"
    out = RESULTS / (Path(suite).stem + ".json")
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(data, indent=1))
    os.replace(tmp_out, out)
    return rc


def write_markdown() -> Path:
    lines = ["# Benchmarks", "",
             "Written by `python benchmarks/run.py [suite ...]` from the stored results in",
             "`benchmarks/results/`. Times are pytest-benchmark means over the rounds each suite sets. In every",
             "group the competing implementations ran side by side in one run; *x ours* is that row's mean time",
             "divided by ours (above 1: ours is faster; below 1: ours is slower).", ""]
    for js in sorted(RESULTS.glob("*.json")):
        data = json.loads(js.read_text())
        lines += [f"## {js.stem}", "", f"Command: `{data.get('semlens_command', '')}`", ""]
        lines += data.get("semlens_machine", []) + [""]
        extra = data.get("semlens_markdown", [])  # suites that measure accuracy, not time (planted.json)
        lines += extra + ([""] if extra else [])
        lines += tables(data)
    notes = HERE / "NOTES.md"
    if notes.exists():
        lines += ["## Notes", "", notes.read_text().strip(), ""]
    out = ROOT / "BENCHMARKS.md"
    tmp_out = out.with_suffix(".md.tmp")
    tmp_out.write_text("\n".join(lines) + "\n")
    os.replace(tmp_out, out)
    return out


def resolve_suite(name: str) -> list[str]:
    """A suite file (``bench_topk.py``) or a short name: ``relevance`` -> every ``bench_relevance*.py``."""
    if (HERE / name).is_file():
        return [name]
    return sorted(p.name for p in HERE.glob(f"bench_{name}*.py"))


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    suites = []
    unknown = []
    for a in argv:
        found = resolve_suite(a)
        suites += found
        if not found:
            unknown.append(a)
    if unknown:
        print(f"unknown suite(s) {unknown}; expected names of benchmarks/bench_*.py or a short name such as "
              f"'relevance' (every bench_relevance*.py)", file=sys.stderr)
        return 2
    suites = list(dict.fromkeys(suites)) or sorted(p.name for p in HERE.glob("bench_*.py"))
    rc = 0
    for suite in suites:
        rc = run_suite(suite) or rc
    print(f"wrote {write_markdown()}")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
