"""Run the third-party ``dl-backtrace`` package in a separate process.

dl-backtrace changes process-wide torch settings when constructed (one thread,
mkldnn off, deterministic algorithms), loads CUDA-only extension modules on import
and imports a class removed from transformers 5. This module is therefore only ever
executed as a script (``python -m semlens_fast.relevance._dlb_runner IN OUT``) by
:func:`run_dlbacktrace`; it is used by the agreement tests and the benchmark.

Input file (``torch.save``): a list of jobs ``{"model", "x", "mode", "multiplier", "task",
"repeat"}``; output file: a list of ``{"relevance": {fx node: ndarray}, "seconds": [...]}``.
Exit code 3 means dl-backtrace could not be imported.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import types
from typing import Any

__all__ = ["DLBacktraceUnavailable", "run_dlbacktrace", "run_dlbacktrace_many"]


def _install_stubs() -> None:
    """Empty stand-ins for the CUDA extension modules and the removed transformers class."""
    for name in ("wt_fc_v3_ops", "wt_embedding_v2_ops", "wt_selfattention_v3_ops"):
        sys.modules.setdefault(name, types.ModuleType(name))
    try:  # transformers >= 5 lacks generation.beam_search
        import transformers.generation.beam_search  # noqa: F401
    except Exception:
        mod = types.ModuleType("transformers.generation.beam_search")

        class BeamSearchScorer:  # pragma: no cover - never used on our path
            pass

        mod.BeamSearchScorer = BeamSearchScorer
        sys.modules["transformers.generation.beam_search"] = mod
    # dl-backtrace 0.1.24 imports torch.export.export_for_training, removed in recent
    # torch; torch.export.export is its successor (same signature for our use).
    import torch.export

    if not hasattr(torch.export, "export_for_training"):
        torch.export.export_for_training = torch.export.export  # type: ignore[attr-defined]


def _import_dlb() -> Any:
    _install_stubs()
    from dl_backtrace.pytorch_backtrace import DLBacktrace  # type: ignore

    return DLBacktrace


class DLBacktraceUnavailable(RuntimeError):
    """dl-backtrace cannot be imported in the subprocess."""


_IMPORT_FAILED = 3


def run_dlbacktrace(
    model: Any,
    x: Any,
    *,
    mode: str = "default",
    multiplier: float = 100.0,
    task: str = "binary-classification",
    repeat: int = 1,
    timeout: float = 900.0,
) -> dict[str, Any]:
    """Run dl-backtrace on ``model`` and input ``x`` in a subprocess and return its output dict."""
    return run_dlbacktrace_many([dict(model=model, x=x, mode=mode, multiplier=multiplier, task=task,
                                      repeat=repeat)], timeout=timeout)[0]


def run_dlbacktrace_many(jobs: list[dict[str, Any]], timeout: float = 900.0) -> list[dict[str, Any]]:
    """Run several dl-backtrace jobs in one subprocess (the package takes seconds to import).

    Each job: ``{"model", "x", "mode"="default", "multiplier"=100.0,
    "task"="binary-classification", "repeat"=1}``. Returns per job ``{"relevance": {fx node
    name: ndarray (relevance at the node's input)}, "seconds": [wall time of predict +
    evaluation per repeat], "cpu_seconds": [CPU time of the calling thread, same span]}``. Raises :class:`DLBacktraceUnavailable` when the package cannot be
    imported, ``RuntimeError`` when it fails otherwise."""
    import torch

    full = [dict({"mode": "default", "multiplier": 100.0, "task": "binary-classification", "repeat": 1}, **j)
            for j in jobs]
    with tempfile.TemporaryDirectory() as tmp:
        inp = os.path.join(tmp, "in.pt")
        out = os.path.join(tmp, "out.pt")
        torch.save(full, inp)
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = subprocess.run([sys.executable, "-m", "semlens_fast.relevance._dlb_runner", inp, out],
                              capture_output=True, text=True, timeout=timeout, env=env)
        if os.environ.get("SEMLENS_DLB_DEBUG"):
            print(proc.stdout[-20000:], proc.stderr[-20000:])
        if proc.returncode == _IMPORT_FAILED:
            raise DLBacktraceUnavailable(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "unknown")
        if proc.returncode != 0:
            raise RuntimeError(f"dl-backtrace subprocess failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return torch.load(out, weights_only=False)


def _main(inp: str, out: str) -> None:
    import time

    try:
        DLBacktrace = _import_dlb()
    except Exception as e:  # noqa: BLE001
        print(f"dl-backtrace cannot be imported: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(_IMPORT_FAILED)
    import torch

    jobs = torch.load(inp, weights_only=False)
    results = []
    for job in jobs:
        model, x = job["model"], job["x"]
        model.eval()
        dlb = DLBacktrace(model, input_for_graph=(x,), device="cpu")
        seconds = []
        cpu_seconds = []
        rel: dict = {}
        for _ in range(int(job["repeat"])):
            t0, c0 = time.perf_counter(), time.thread_time()
            dlb.predict(x)
            rel = dlb.evaluation(mode=job["mode"], multiplier=job["multiplier"], task=job["task"])
            seconds.append(time.perf_counter() - t0)
            cpu_seconds.append(time.thread_time() - c0)

        def conv(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return v.detach().cpu().numpy()
            if isinstance(v, (list, tuple)):
                return [conv(u) for u in v]
            return v

        results.append({"relevance": {k: conv(v) for k, v in rel.items()}, "seconds": seconds,
                        "cpu_seconds": cpu_seconds})
    torch.save(results, out)


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
