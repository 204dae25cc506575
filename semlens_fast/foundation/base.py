"""The :class:`FoundationModel` interface shared by every foundation model.

A foundation model turns images (and/or texts) into unit-normalised embedding vectors of
dimension :attr:`~FoundationModel.dim`. Subclasses implement two small hooks,
``_encode_image_batch(x)`` on an already preprocessed ``[B, 3, S, S]`` tensor and
``_encode_text_batch(texts)`` on a list of strings; the base class does the rest:

* **Input images** (:meth:`FoundationModel.preprocess`): a float tensor with values in
  ``[0, 1]`` or a ``uint8`` tensor, ``[B, C, H, W]`` or ``[C, H, W]`` with ``C`` = 1
  (grey, repeated to RGB) or 3 (a bare ``[3, H, W]`` tensor is refused as ambiguous: one RGB
  image or three grey ones; say which with ``[1, 3, H, W]`` / ``[img]`` or ``[3, 1, H, W]``),
  a list of such tensors of *different* sizes (crops),
  numpy arrays ``[H, W]`` / ``[H, W, C]``, or PIL images. Anything else (RGBA, 2
  channels, values outside ``[0, 1]`` such as already-normalised tensors, images smaller
  than ``min_image_size``) raises a clear error. Images are resized (bilinear, antialiased)
  to the model's input size and normalised with its mean/std.
* **Batching, devices and precision**: inputs are split into ``batch_size`` chunks, moved
  to the model's device and run under ``torch.inference_mode``; on CUDA under
  ``torch.autocast`` (bf16 where supported, else fp16, or as given by ``autocast=``).
  Outputs are float32 on the CPU, unit-normalised.
* **Counters**: :attr:`images_encoded` / :attr:`texts_encoded` count the samples that went
  through the network (the benchmark's "forward passes").
* **Fingerprint**: SHA-256 of the weights (names, dtypes, shapes, bytes) and of the
  configuration that changes the outputs (class, input size, mean/std, ...). Computed once.
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

from .._io import hash_tensors
from ..errors import ArgumentError, DTypeError, ShapeError

log = logging.getLogger("semlens_fast")

IMAGE = "image"
TEXT = "text"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModalityError(ArgumentError):
    """A foundation model was asked to embed a modality it does not have (e.g. text on a vision-only model)."""


def _autocast_dtype(spec: Any, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None
    if spec is None or spec is False:
        return None
    if spec == "auto" or spec is True:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if spec in (torch.float16, torch.bfloat16):
        return spec
    raise ArgumentError(f"autocast must be 'auto', None, torch.float16 or torch.bfloat16, got {spec!r}")


def _image_to_tensor(img: Any, i: int) -> torch.Tensor:
    """One image -> float32 ``[3, H, W]`` in ``[0, 1]`` (validating mode and range)."""
    if not isinstance(img, torch.Tensor):
        if hasattr(img, "mode") and hasattr(img, "size") and hasattr(img, "convert"):  # PIL
            mode = img.mode
            if mode not in ("L", "RGB", "I;16", "F", "1"):
                raise ShapeError(
                    f"images[{i}] is a PIL image in mode {mode!r}; expected 'L' (grey) or 'RGB' "
                    "(convert with img.convert('RGB'))"
                )
            import numpy as np

            arr = np.asarray(img.convert("RGB") if mode != "RGB" else img)
            img = torch.from_numpy(arr.copy()).permute(2, 0, 1)
        else:
            try:
                import numpy as np

                arr = np.asarray(img)
            except Exception as exc:  # pragma: no cover
                raise DTypeError(f"images[{i}] must be a tensor, numpy array or PIL image, got {type(img).__name__}") from exc
            if arr.dtype == object:
                raise DTypeError(f"images[{i}] must be a tensor, numpy array or PIL image, got {type(img).__name__}")
            t = torch.from_numpy(arr.copy())
            if t.dim() == 3 and t.shape[-1] in (1, 3, 4) and t.shape[0] not in (1, 3):
                t = t.permute(2, 0, 1)  # HWC -> CHW
            img = t
    t = img
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3:
        raise ShapeError(f"images[{i}] must be [C, H, W] or [H, W], got shape {tuple(t.shape)}")
    if t.shape[0] not in (1, 3):
        raise ShapeError(
            f"images[{i}] has {t.shape[0]} channels (shape {tuple(t.shape)}); expected 1 (grey) or 3 (RGB), "
            "channels first. Drop the alpha channel of RGBA images; pass a batch of grey images as [N, 1, H, W] "
            "(x.unsqueeze(1))"
        )
    if t.dtype == torch.uint8:
        t = t.to(torch.float32) / 255.0
    elif t.dtype == torch.bool or not (t.is_floating_point()):
        raise DTypeError(f"images[{i}] has dtype {t.dtype}; expected uint8 (0..255) or float (0..1)")
    else:
        t = t.to(torch.float32)
        if t.numel():
            lo, hi = float(t.min()), float(t.max())
            if not (lo >= -1e-3 and hi <= 1 + 1e-3):
                raise ArgumentError(
                    f"images[{i}] has values in [{lo:.3g}, {hi:.3g}]; expected raw images with values in [0, 1] "
                    "(float) or 0..255 (uint8), not model-normalised tensors. Pass the un-normalised images "
                    "(e.g. dataset.denormalise(x)) to the foundation model"
                )
            t = t.clamp(0, 1)
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return t


def _check_bare(images: Any, min_size: int = 1) -> None:
    """A bare ``[3, H, W]`` tensor is ambiguous: one RGB image, or three grey images ``[N, H, W]`` (how data sets
    store them). Refuse it rather than guess; a list (``[img]``) or a batch axis says which. Tensors that are
    wrong under either reading (a dtype that is not an image's, fewer than ``min_size`` pixels a side) are left
    to the checks that name that problem."""
    shape = tuple(getattr(images, "shape", ()))
    dtype = getattr(images, "dtype", None)
    if dtype is not None and isinstance(images, torch.Tensor) and not (dtype == torch.uint8 or dtype.is_floating_point):
        return
    if len(shape) == 3 and min(shape[1], shape[2]) < min_size:
        return
    if len(shape) == 3 and shape[0] == 3 and not (shape[-1] in (1, 3, 4) and shape[1] not in (1, 3, 4)):
        raise ShapeError(
            f"images of shape {shape} are ambiguous: one RGB image [3, H, W] or three grey images "
            f"[N, H, W]; pass images[None] ([1, 3, H, W]) or [image] for one RGB image, images.unsqueeze(1) "
            f"([3, 1, H, W]) for three grey images")


class FoundationModel:
    """Base class of foundation models (see the module docstring).

    Attributes:
        name: a readable name (``"open_clip:ViT-B-32/openai"``, ``"mobilenetv2"``...).
        modalities: subset of ``{"image", "text"}``.
        dim: embedding dimension.
        image_size: input side length (square) for images, if the model has an image tower.
        mean, std: per-channel normalisation applied after resizing.
    """

    name: str = "foundation"
    modalities: frozenset[str] = frozenset()
    image_size: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    min_image_size: int = 2
    default_batch_size: int = 64

    def __init__(self, device: torch.device | str | None = None, autocast: Any = "auto"):
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self.autocast = autocast
        _autocast_dtype(autocast, torch.device("cuda"))  # validate early
        self.images_encoded = 0
        self.texts_encoded = 0
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------ subclass hooks
    @property
    def dim(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def modules(self) -> list[torch.nn.Module]:
        """The torch modules holding the weights (hashed by :attr:`fingerprint`, moved by :meth:`to`)."""
        return []

    def config(self) -> dict[str, Any]:
        """JSON-able configuration that changes the outputs (hashed by :attr:`fingerprint`)."""
        return {
            "class": type(self).__qualname__,
            "name": self.name,
            "dim": self.dim,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "modalities": sorted(self.modalities),
        }

    def _encode_image_batch(self, x: torch.Tensor) -> torch.Tensor:
        raise ModalityError(self._no_modality_msg(IMAGE))

    def _encode_text_batch(self, texts: list[str]) -> torch.Tensor:
        raise ModalityError(self._no_modality_msg(TEXT))

    # ------------------------------------------------------------------ common
    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: torch.device | str) -> "FoundationModel":
        self._device = torch.device(device)
        for m in self.modules():
            m.to(self._device)
        return self

    @property
    def fingerprint(self) -> str:
        """Stable SHA-256 of the weights and of :meth:`config` (computed once)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(json.dumps(self.config(), sort_keys=True, default=str).encode())
            for j, m in enumerate(self.modules()):
                items = [(f"{j}.{n}", t) for n, t in m.state_dict().items() if isinstance(t, torch.Tensor)]
                h.update(hash_tensors(items).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        """What a manifest records about this model."""
        return {"name": self.name, "class": type(self).__qualname__, "dim": self.dim,
                "modalities": sorted(self.modalities), "fingerprint": self.fingerprint}

    def _no_modality_msg(self, modality: str) -> str:
        if modality == TEXT:
            return (
                f"{self.name} ({type(self).__name__}) is a vision-only foundation model: it cannot embed text "
                "queries. For text search use a vision-language model: "
                "Aligned.fit(PackagedVision(), SentenceTransformerText(), images, labels, class_names) offline, or "
                "OpenCLIP('ViT-B-32', pretrained='laion2b_s34b_b79k') with the weights available"
            )
        return (
            f"{self.name} ({type(self).__name__}) is a text-only foundation model: it cannot embed images. "
            "Use PackagedVision(), OpenCLIP(...) or Aligned(vision, text) for images"
        )

    def _check_modality(self, modality: str) -> None:
        if modality not in self.modalities:
            raise ModalityError(self._no_modality_msg(modality))

    def _autocast_ctx(self):
        dt = _autocast_dtype(self.autocast, self._device)
        if dt is None:
            import contextlib

            return contextlib.nullcontext()
        return torch.autocast(device_type=self._device.type, dtype=dt)

    def preprocess(self, images: Any) -> torch.Tensor:
        """Images (see the module docstring) -> normalised float32 ``[B, 3, S, S]`` on the CPU.

        Each image is resized on its own, so a list may hold crops of different sizes.
        """
        self._check_modality(IMAGE)
        S = int(self.image_size or 224)
        if isinstance(images, torch.Tensor):
            _check_bare(images, self.min_image_size)
            if images.dim() == 4:
                seq: Sequence[Any] = list(images.unbind(0)) if images.shape[0] else []
            elif images.dim() in (2, 3):
                seq = [images]
            else:
                raise ShapeError(f"images must be [B, C, H, W], [C, H, W] or [H, W], got shape {tuple(images.shape)}")
        elif isinstance(images, (list, tuple)):
            seq = images
        else:
            _check_bare(images, self.min_image_size)
            seq = [images]
        if len(seq) == 0:
            return torch.zeros(0, 3, S, S)
        out = torch.empty(len(seq), 3, S, S, dtype=torch.float32)
        # group images of the same size to resize them together
        groups: dict[tuple[int, int], list[int]] = {}
        tensors = []
        for i, img in enumerate(seq):
            t = _image_to_tensor(img, i)
            h, w = int(t.shape[-2]), int(t.shape[-1])
            if min(h, w) < self.min_image_size:
                raise ShapeError(
                    f"images[{i}] is {h}x{w} pixels; {type(self).__name__} needs at least "
                    f"{self.min_image_size}x{self.min_image_size}"
                )
            tensors.append(t)
            groups.setdefault((h, w), []).append(i)
        for (h, w), idx in groups.items():
            x = torch.stack([tensors[i] for i in idx])
            if (h, w) != (S, S):
                x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False, antialias=(h > S or w > S))
            out[idx] = x
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return (out - mean) / std

    @torch.inference_mode()
    def encode_images(
        self, images: Any, batch_size: int | None = None, preprocessed: bool = False, progress: bool = False
    ) -> torch.Tensor:
        """Unit-normalised float32 embeddings ``[N, dim]`` (CPU) of ``images``.

        ``preprocessed=True``: ``images`` is already the output of :meth:`preprocess`.
        """
        self._check_modality(IMAGE)
        bs = int(batch_size or self.default_batch_size)
        if bs < 1:
            raise ArgumentError(f"batch_size must be >= 1, got {batch_size!r}")
        if preprocessed:
            if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
                raise ShapeError(f"preprocessed images must be a [B, 3, S, S] tensor, got {getattr(images, 'shape', type(images))}")
            n = images.shape[0]
            chunks: Iterable[Any] = (images[i : i + bs] for i in range(0, n, bs))
        else:
            if isinstance(images, torch.Tensor) and images.dim() not in (2, 3, 4):
                raise ShapeError(f"images must be [B, C, H, W], [C, H, W] or [H, W], got shape {tuple(images.shape)}")
            if not isinstance(images, (list, tuple)):
                _check_bare(images, self.min_image_size)
            seq = list(images.unbind(0)) if isinstance(images, torch.Tensor) and images.dim() == 4 else (
                images if isinstance(images, (list, tuple)) else [images])
            n = len(seq)
            chunks = (self.preprocess(list(seq[i : i + bs])) for i in range(0, n, bs))
        outs = []
        it: Iterable[Any] = chunks
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(chunks, total=(n + bs - 1) // bs, desc=f"embed images ({self.name})")
        for x in it:
            x = x.to(self._device, non_blocking=True)
            with self._autocast_ctx():
                e = self._encode_image_batch(x)
            self.images_encoded += int(x.shape[0])
            outs.append(F.normalize(e.float(), dim=-1).cpu())
        if not outs:
            return torch.zeros(0, self.dim)
        return torch.cat(outs)

    @torch.inference_mode()
    def encode_texts(self, texts: str | Sequence[str], batch_size: int | None = None, progress: bool = False) -> torch.Tensor:
        """Unit-normalised float32 embeddings ``[N, dim]`` (CPU) of ``texts``."""
        self._check_modality(TEXT)
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise DTypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
        bs = int(batch_size or self.default_batch_size)
        outs = []
        rng: Iterable[int] = range(0, len(texts), bs)
        if progress:
            from tqdm.auto import tqdm

            rng = tqdm(rng, desc=f"embed texts ({self.name})")
        for i in rng:
            chunk = texts[i : i + bs]
            with self._autocast_ctx():
                e = self._encode_text_batch(chunk)
            self.texts_encoded += len(chunk)
            outs.append(F.normalize(e.float(), dim=-1).cpu())
        if not outs:
            return torch.zeros(0, self.dim)
        return torch.cat(outs)

    def reset_counters(self) -> None:
        self.images_encoded = 0
        self.texts_encoded = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, modalities={sorted(self.modalities)}, device={self._device})"
