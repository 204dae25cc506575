"""Test-session set-up.

Triton kernels are tested on the CPU through Triton's interpreter when no GPU is
present; TRITON_INTERPRET must be set before triton is first imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# a Triton kernel that fails must fail the test, not fall back to the reference silently
os.environ.setdefault("SEMLENS_TRITON_STRICT", "1")

# the tests use only models shipped inside packages; never reach for a hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
