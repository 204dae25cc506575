"""``open_clip`` models (CLIP, SigLIP, ...) as :class:`~semlens_fast.foundation.FoundationModel`.

``OpenCLIP("ViT-B-32", pretrained="laion2b_s34b_b79k")`` needs the weights in the hub cache
or network access; ``OpenCLIP("ViT-B-32", checkpoint="/path/open_clip_model.pt")`` loads a
local checkpoint; ``pretrained=None`` and no checkpoint builds the architecture with
*random* weights (useful only to exercise the code path, never for semantics).
``model_cfg=`` registers a custom architecture (a dict in open_clip's config format)
under ``model_name`` first.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import ArgumentError
from .base import IMAGE, TEXT, FoundationModel


class OpenCLIP(FoundationModel):
    modalities = frozenset({IMAGE, TEXT})

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = None,
        *,
        checkpoint: str | os.PathLike | None = None,
        model_cfg: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        autocast: Any = "auto",
        cache_dir: str | None = None,
    ):
        try:
            import open_clip
        except ImportError as exc:  # pragma: no cover
            raise ImportError("OpenCLIP needs the open_clip_torch package: pip install open_clip_torch") from exc
        super().__init__(device=device, autocast=autocast)
        if pretrained is not None and checkpoint is not None:
            raise ArgumentError("pass either pretrained= (a tag) or checkpoint= (a local file), not both")
        if model_cfg is not None:
            from open_clip import factory

            factory._MODEL_CONFIGS[model_name] = dict(model_cfg)
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise ArgumentError(f"checkpoint {str(checkpoint)!r} is not a file")
        weights = str(checkpoint) if checkpoint is not None else pretrained
        try:
            model = open_clip.create_model(model_name, pretrained=weights, device=self._device, cache_dir=cache_dir)
        except (RuntimeError, OSError, ValueError) as exc:
            raise ArgumentError(
                f"OpenCLIP could not build {model_name!r} with pretrained={weights!r}: {exc}. Without network "
                "access pass checkpoint= a local file, or pretrained=None for random weights (tests only)"
            ) from exc
        model.eval()
        self.model = model
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.model_name = model_name
        self.pretrained = weights
        self.random_weights = weights is None
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        size = cfg.get("size", getattr(model.visual, "image_size", 224))
        if isinstance(size, (tuple, list)):
            size = size[0]
        self.image_size = int(size)
        self.mean = tuple(float(v) for v in cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        self.std = tuple(float(v) for v in cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))
        tag = "random" if weights is None else (Path(weights).name if checkpoint is not None else weights)
        self.name = f"open_clip:{model_name}/{tag}"
        with torch.inference_mode():
            self._dim = int(model.encode_text(self.tokenizer(["x"]).to(self._device)).shape[-1])

    @property
    def dim(self) -> int:
        return self._dim

    def modules(self):
        return [self.model]

    def config(self):
        c = super().config()
        c["name"] = f"open_clip:{self.model_name}"  # the weights are hashed; the tag is not part of the identity
        return c

    def _encode_image_batch(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)

    def _encode_text_batch(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self._device))
