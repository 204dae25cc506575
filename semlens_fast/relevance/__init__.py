"""Relevance propagation: DLBacktrace (default and contrast modes) and LRP, batched, on any
device, through models captured with ``torch.fx`` or ``torch.export`` (CNNs, U-Nets, vision
transformers, LSTM/GRU models, BERT-style encoders, causal language models; module-hook
fallback for plain chains).

Quick start::

    from semlens_fast.relevance import RelevanceEngine, dlbacktrace, lrp_epsilon
    eng = RelevanceEngine(model, dlbacktrace())
    res = eng(x, target=None, record=["features.6"])   # None: each sample's argmax
    heat = res.input                                      # [B, *x.shape[1:]]
    per_channel = channel_relevance(eng, x, "features.6")  # [B, C]

See ``docs/relevance.md`` for every rule's formula.
"""
from __future__ import annotations

from . import rules
from .components import (
    ChannelRelevanceStats,
    channel_relevance,
    conditional_relevance,
    dataset_channel_relevance,
    relevance_crop_box,
)
from .composite import (
    Composite,
    dlbacktrace,
    dlbacktrace_compat,
    dlbacktrace_contrast,
    epsilon_plus_flat,
    lrp_alpha_beta,
    lrp_epsilon,
    lrp_zplus,
)
from .engine import RelevanceEngine, RelevanceResult, UnsupportedOpError, relevance
from .rules_nn import (Embedding, EvalIdentity, LayerNormLRP, Recurrent, Refuse, ScaledDotProductAttention,
                       SoftmaxLRP)
from .rules import (
    AddSplit,
    AlphaBeta,
    DLBAffine,
    DLBContrastAffine,
    DLBProportional,
    Epsilon,
    Flat,
    IndexMap,
    MaxPoolWinnerTakesAll,
    MulHalf,
    Norm,
    PassThrough,
    Product,
    Rule,
    UniformUpsample,
    ZPlus,
)

__all__ = [
    "RelevanceEngine", "RelevanceResult", "UnsupportedOpError", "relevance", "Composite", "dlbacktrace",
    "dlbacktrace_contrast", "dlbacktrace_compat", "lrp_epsilon", "lrp_zplus", "lrp_alpha_beta",
    "epsilon_plus_flat", "channel_relevance", "ChannelRelevanceStats", "dataset_channel_relevance",
    "conditional_relevance", "relevance_crop_box", "rules", "Rule", "PassThrough", "IndexMap", "DLBAffine",
    "DLBContrastAffine", "DLBProportional", "MaxPoolWinnerTakesAll", "UniformUpsample", "AddSplit", "MulHalf",
    "Product", "Epsilon", "ZPlus", "AlphaBeta", "Flat", "Norm", "SoftmaxLRP", "LayerNormLRP",
    "ScaledDotProductAttention", "Embedding", "Recurrent", "EvalIdentity", "Refuse",
]
