"""The Triton SAE kernels equal the torch reference bit for bit (TRITON_INTERPRET=1 on the CPU,
tiny shapes), and compile ahead of time for sm_80 / sm_90 without a GPU."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from .test_sae import cases, run

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)
pytest.importorskip("triton")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
def test_triton_equals_reference(case):
    case["batches"] = [(x.float() if x.dtype == torch.bfloat16 else x, i, m) for x, i, m in case["batches"]]
    want = run(case, "reference")
    got = run(case, "triton")
    assert got.equal(want), (case["pool"], case["act"])


AOT = r'''
import os, re, subprocess, sys, tempfile, triton
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from semlens_fast.ops.triton import sae
S = sae
bound_sig = {"x_ptr": "*fp32", "valid_ptr": "*i8", "nx_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32",
             "gate_ptr": "*fp32", "epsa_ptr": "*fp32", "out_ptr": "*fp32", "T": "i32", "D": "i32", "L": "i32",
             "c0": "fp32", "c1": "fp32", "c2": "fp32", "POOL": "constexpr", "BT": "constexpr", "BD": "constexpr",
             "BL": "constexpr"}
exact_sig = {"x_ptr": "*fp32", "valid_ptr": "*i8", "w_ptr": "*fp32", "b_ptr": "*fp32", "gate_ptr": "*fp32",
             "cb_ptr": "*i64", "cl_ptr": "*i64", "val_ptr": "*fp32", "pos_ptr": "*i32", "T": "i32", "D": "i32",
             "L": "i32", "POOL": "constexpr", "BT": "constexpr"}
for cc in (80, 90):
    target = GPUTarget("cuda", cc, 32)
    for pool in (0, 1, 3):
        for fn, sig, consts in ((S._sae_bound_kernel, bound_sig, {"POOL": pool, "BT": S.BT, "BD": S.BD, "BL": S.BL}),
                                (S._sae_exact_kernel, exact_sig, {"POOL": pool, "BT": S.BT_EXACT})):
            k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=target)
            with tempfile.TemporaryDirectory() as tmp:
                ptx = os.path.join(tmp, "k.ptx")
                open(ptx, "w").write(k.asm["ptx"])
                arch = re.search(r"^\.target\s+(sm_\w+)", k.asm["ptx"], re.M).group(1)  # sm_90a on Hopper
                r = subprocess.run([PTXAS, f"--gpu-name={arch}", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                                   capture_output=True, text=True)
            rep = r.stdout + r.stderr
            regs = re.search(r"Used (\d+) registers", rep)
            spill = re.search(r"(\d+) bytes spill stores", rep)
            spills = int(spill.group(1)) if spill else 0
            print(fn.__name__, cc, pool, "regs", regs.group(1) if regs else "?", "spills", spills)
            if r.returncode or spills:
                sys.exit(f"{fn.__name__} on sm_{cc}: ptxas rc {r.returncode}, {spills} bytes spilled\n{rep}")
'''


def test_kernels_compile_ahead_of_time_for_sm80_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", AOT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("spills 0") == 12, r.stdout
