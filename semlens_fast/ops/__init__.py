"""The kernels' Python face: pure functions on tensors, dispatched by device.

See :mod:`semlens_fast.ops._backend` for backend selection (``SEMLENS_BACKEND``).
"""
from ._backend import cpu_isa
from .topk import POOLS, TopKState, merge_topk, pool_topk_update, topk_update

__all__ = ["POOLS", "TopKState", "cpu_isa", "merge_topk", "pool_topk_update", "topk_update"]
from .similarity import cosine_topk, pairwise_max, pairwise_topk  # noqa: E402

__all__ += ["cosine_topk", "pairwise_max", "pairwise_topk"]
from .sae import SAE_POOLS, sae_topk_update  # noqa: E402

__all__ += ["SAE_POOLS", "sae_topk_update"]
from .maxpool import maxpool_relevance  # noqa: E402

__all__ += ["maxpool_relevance"]
