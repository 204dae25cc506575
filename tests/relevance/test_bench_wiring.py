"""`semlens bench relevance` reaches the relevance suites, and their evaluation table reaches
BENCHMARKS.md (benchmarks/run.py), without running any benchmark."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[2] / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def run_module():
    if not RUN.is_file():
        pytest.skip("benchmarks/ is not in this checkout")
    spec = importlib.util.spec_from_file_location("semlens_bench_run", RUN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_short_name_resolves_to_every_relevance_suite(run_module):
    assert run_module.resolve_suite("relevance") == ["bench_relevance.py", "bench_relevance_eval.py"]
    assert run_module.resolve_suite("bench_topk.py") == ["bench_topk.py"]
    assert run_module.resolve_suite("nope") == []
    assert run_module.main(["nope"]) == 2  # unknown names are refused before anything runs


def test_suite_tables_carry_their_markdown(run_module):
    data = {"benchmarks": [{"group": "relevance-evaluation", "name": "test_relevance_evaluation",
                            "stats": {"mean": 12.0, "min": 12.0},
                            "extra_info": {"ours": True, "label": "whole evaluation",
                                           "markdown": "#### toy\n\n| method | x |\n|---|---|\n| DLBacktrace | 1 |"}}]}
    lines = run_module.tables(data)
    text = "\n".join(lines)
    assert "### relevance-evaluation" in text and "| DLBacktrace | 1 |" in text
