"""Batch plumbing shared by the stages that run a model: moving a batch to a device,
the default way to call a model on a batch, and the rule that picks the activation tensor
out of a module's output."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def first_tensor(out: Any) -> torch.Tensor | None:
    """The documented tuple rule: the first tensor found depth-first in ``out`` (tensors,
    mappings by value order, tuples/lists, Hugging Face ``ModelOutput`` via ``to_tuple``)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        items = list(out.values())
    elif isinstance(out, (tuple, list)):
        items = list(out)
    elif hasattr(out, "to_tuple"):  # HF ModelOutput
        items = list(out.to_tuple())
    else:
        return None
    for item in items:
        t = first_tensor(item)
        if t is not None:
            return t
    return None


def to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """``batch`` with every tensor in it (nested mappings, named tuples, tuples, lists) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*[to_device(v, device, non_blocking) for v in batch])
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, non_blocking) for v in batch)
    return batch


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for mappings (tokenizer outputs), ``model(batch[0])`` for
    ``(inputs, labels, ...)`` tuples, else ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(batch[0])
    return model(batch)
