"""Test-session set-up.

Triton kernels are tested on the CPU through Triton's interpreter when no GPU is
present; TRITON_INTERPRET must be set before triton is first imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
