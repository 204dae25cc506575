"""benchmarks/gpu.py: argument parsing, the dry-run plan (bytes, flops, roofline), and a
clean refusal without CUDA (the machine of the tests has none)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu.py")


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_arguments(gpu):
    a = gpu.parse_args(["--suite", "search", "--repeat", "3", "--quick", "--peak-gbs", "3350"])
    assert (a.suite, a.repeat, a.quick, a.peak_gbs, a.dry_run) == ("search", 3, True, 3350.0, False)
    with pytest.raises(SystemExit):
        gpu.parse_args(["--suite", "nope"])
    with pytest.raises(SystemExit):
        gpu.parse_args(["--repeat", "0"])


def test_peaks_and_roofline(gpu):
    assert gpu.device_peaks("NVIDIA H100 80GB HBM3", None, None) == (3350.0, 989.0)
    assert gpu.device_peaks("NVIDIA H200", None, None) == (4800.0, 989.0)
    assert gpu.device_peaks("Some GPU", None, 100.0) == (None, 100.0)
    nbytes, flops = gpu.search_cost(1024, 10**6, 512, torch.bfloat16)
    assert flops == 2 * 1024 * 10**6 * 512 and nbytes == 10**6 * 512 * 2 + 1024 * 512 * 4
    roof = gpu.roofline_s(nbytes, flops, 3350.0, 989.0)
    assert roof == pytest.approx(flops / 989e12)  # Q = 1024 is compute-bound
    assert gpu.roofline_s(*gpu.search_cost(1, 10**6, 512, torch.bfloat16), 3350.0, 989.0) == pytest.approx(
        (10**6 * 512 * 2 + 512 * 4) / 3350e9)  # Q = 1 reads the rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_refuses_cleanly_without_cuda(gpu):
    proc = subprocess.run([sys.executable, PATH, "--suite", "tracking"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "needs a CUDA device" in proc.stderr and "Traceback" not in proc.stderr
    dry = subprocess.run([sys.executable, PATH, "--dry-run", "--peak-gbs", "3350", "--peak-tflops", "989"],
                         capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr
    assert "[search] Q=1024 k=20 bfloat16 storage: 1.026 GB, 1.049 TFLOP per call; roofline 1.060 ms" in dry.stdout
    assert dry.stdout.count("[tracking]") == len(gpu.TRACKING)
