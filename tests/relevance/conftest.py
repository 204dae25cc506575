"""Fixtures of the relevance tests."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from .helpers import seq_cnn


@pytest.fixture
def cnn() -> nn.Sequential:
    return seq_cnn()


@pytest.fixture
def x_img() -> torch.Tensor:
    torch.manual_seed(42)
    return torch.randn(3, 1, 14, 14)
