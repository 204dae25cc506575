"""Torch reference implementations of every op (the specification)."""
from .topk import merge_topk, pool, pool_topk_update, select_topk

__all__ = ["merge_topk", "pool", "pool_topk_update", "select_topk"]
from . import similarity  # noqa: E402,F401  (cosine_topk & co. live in reference.similarity)
from . import sae  # noqa: E402,F401
from . import maxpool  # noqa: E402,F401
