"""Test-session set-up.

Triton kernels are tested on the CPU through Triton's interpreter when no GPU is
present; TRITON_INTERPRET must be set before triton is first imported.
"""
import os

import torch
from hypothesis import settings

# CI gates on a fixed sample of examples (the same on every run); HYPOTHESIS_PROFILE=explore
# draws new ones each run, e.g. `HYPOTHESIS_PROFILE=explore pytest tests/ops --hypothesis-seed=$RANDOM`
settings.register_profile("fixed", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fixed"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# a Triton kernel that fails must fail the test, not fall back to the reference silently
os.environ.setdefault("SEMLENS_TRITON_STRICT", "1")

# the tests use only models shipped inside packages; never reach for a hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
