"""Every Triton kernel configuration the dispatchers can choose compiles for sm_80 and
sm_90 -- ahead of time, without a GPU and without the interpreter -- and does not spill.

The compile runs in a subprocess (tests/conftest.py sets TRITON_INTERPRET=1 for this
process) through ``python -m semlens_fast.ops.triton.aot``, which reads ptxas's report
(``ptxas -v``: registers, spill stores/loads) of each configuration. It compiles into a
fresh temporary cache: nothing from an earlier run can hide a failure.

The table is :data:`semlens_fast.ops.triton.aot.FAMILIES`: a kernel family (a module
with ``compile_cases()``) is added there with one entry, and this test covers it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from semlens_fast.ops.triton import aot  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "semlens_fast.ops.triton.aot", "--jobs", "2", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert out.exists(), f"the compile run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    data = json.loads(out.read_text())
    data["returncode"], data["stderr"] = proc.returncode, proc.stderr
    return data


def test_every_family_and_arch_is_covered(report):
    rows = report["rows"]
    for family in aot.FAMILIES:
        name = family.rsplit(".", 1)[1]
        cases = list(aot._cases(family))
        assert cases, f"{family}.compile_cases() yields nothing"
        for arch in ("sm_80", "sm_90"):
            got = [r for r in rows if r["family"] == name and r["arch"] == arch]
            assert len(got) == len(cases), (family, arch)


def test_no_compile_error_and_no_spill(report):
    bad = [f"{r['kernel']} [{r['label']}] {r['arch']}: {r.get('error')}" for r in report["rows"] if not r["ok"]]
    assert not bad, "\n".join(bad)
    assert report["returncode"] == 0, report["stderr"][-2000:]
    for r in report["rows"]:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["regs"] <= 255


def test_autotune_configs_are_all_compiled(report):
    """Each autotuned tile shape of the similarity kernel is one of the compiled cases."""
    from semlens_fast.ops.triton import similarity as sim

    labels = {r["label"] for r in report["rows"] if r["family"] == "similarity"}
    for dt in ("fp32/tf32", "fp16", "bf16"):
        dot = {"fp32/tf32": 0, "fp16": 1, "bf16": 2}[dt]
        for KP in sim.KPS:
            for cfg in sim.tile_configs(KP, dot):
                bq, bn, bd = cfg.kwargs["BQ"], cfg.kwargs["BN"], cfg.kwargs["BD"]
                assert f"{dt} KP={KP} tile {bq}x{bn}x{bd} w{cfg.num_warps}" in labels


def test_the_command_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", "from semlens_fast.ops.triton import aot; aot.run(archs=(90,))"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "TRITON_INTERPRET=1" in proc.stderr
