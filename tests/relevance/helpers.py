"""Small models and helpers shared by the relevance tests."""
from __future__ import annotations

import pytest
import torch
from torch import nn


def seq_cnn(bias: bool = True, seed: int = 0) -> nn.Sequential:
    """The Sequential CNN used for the dl-backtrace agreement (conv, relu, maxpool, conv, relu,
    avgpool with a non-divisible size, flatten, linear)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=bias), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, bias=bias), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 10, bias=bias),
    ).eval()


def mlp(bias: bool = True, seed: int = 1) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16, bias=bias), nn.ReLU(), nn.Linear(16, 8, bias=bias), nn.ReLU(),
                         nn.Linear(8, 5, bias=bias)).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are 0)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    den = b.abs().max().item()
    num = (a - b).abs().max().item()
    return num / den if den > 0 else num


