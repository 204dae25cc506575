"""Small offline datasets for tests, benchmarks and the demo.

* :func:`fashion_mnist` reads the IDX files of the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``); where it is absent
  it falls back to scikit-learn's bundled 8x8 digits, upsampled to 28x28 (with a
  warning), so that everything still runs offline.
* :func:`fortunes` reads real English text from the Debian package ``fortunes``
  (``/usr/share/games/fortunes``).
* :class:`TextDataset` + :func:`text_collate` turn strings into tokenised batches
  (mappings with ``input_ids`` / ``attention_mask``) for :func:`semlens_fast.collect.collect`.
"""
from __future__ import annotations

import gzip
import os
import re
import struct
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from .errors import ArgumentError

FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)
FORTUNE_DIRS = ("/usr/share/games/fortunes",)
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set statistics


def _read_idx(path: Path) -> torch.Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ArgumentError(f"{path} is not an unsigned-byte IDX file (magic {data[:4]!r})")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    t = torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8)
    return t.reshape(shape)


class ImageDataset(Dataset):
    """In-memory grayscale images ``uint8 [N, H, W]`` with labels.

    ``ds[i]`` is ``(image, label)`` with ``image`` a float32 ``[1, H, W]`` tensor
    normalised with ``(x / 255 - mean) / std``. ``ds.images`` / ``ds.labels`` hold the raw
    data; ``ds.source`` says where it came from (``"fashion-mnist"`` or ``"digits"``).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, source: str, classes: Sequence[str], mean: float = MEAN, std: float = STD):
        self.images = images
        self.labels = labels.to(torch.int64)
        self.source = source
        self.name = source
        self.classes = tuple(classes)
        self.mean, self.std = float(mean), float(std)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = (self.images[i].to(torch.float32).unsqueeze(0) / 255.0 - self.mean) / self.std
        return x, int(self.labels[i])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images normalised as ``[N, 1, H, W]`` float32 (a copy) and labels ``[N]``."""
        return (self.images.to(torch.float32).unsqueeze(1) / 255.0 - self.mean) / self.std, self.labels

    def fingerprint(self) -> str:
        """SHA-256 of all images, labels and the normalisation (what collect records)."""
        import hashlib

        h = hashlib.sha256(f"{self.mean!r},{self.std!r},{tuple(self.images.shape)}".encode())
        h.update(self.images.contiguous().numpy().tobytes())
        h.update(self.labels.contiguous().numpy().tobytes())
        return h.hexdigest()

    def subset(self, n: int) -> "ImageDataset":
        """The first ``n`` samples (views, no copy)."""
        return ImageDataset(self.images[:n], self.labels[:n], self.source, self.classes, self.mean, self.std)

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.std + self.mean).clamp(0, 1)


def fashion_mnist_available(root: str | os.PathLike | None = None) -> bool:
    return _fashion_root(root) is not None


def _fashion_root(root: str | os.PathLike | None) -> Path | None:
    dirs = [root] if root is not None else [os.environ.get("SEMLENS_FASHION_MNIST")] + list(FASHION_DIRS)
    for d in dirs:
        if d and (Path(d) / "train-images-idx3-ubyte.gz").exists():
            return Path(d)
    return None


def fashion_mnist(split: str = "train", root: str | os.PathLike | None = None, fallback: bool = True) -> ImageDataset:
    """Fashion-MNIST (60 000 train / 10 000 test 28x28 images) from the Debian package.

    Falls back to scikit-learn's digits (1 797 images, upsampled to 28x28, split 80/20)
    when the package is absent and ``fallback`` is true; ``ds.source`` tells which.
    """
    if split not in ("train", "test"):
        raise ArgumentError(f"split must be 'train' or 'test', got {split!r}")
    r = _fashion_root(root)
    if r is not None:
        prefix = "train" if split == "train" else "t10k"
        images = _read_idx(r / f"{prefix}-images-idx3-ubyte.gz")
        labels = _read_idx(r / f"{prefix}-labels-idx1-ubyte.gz")
        return ImageDataset(images, labels, "fashion-mnist", FASHION_CLASSES)
    if not fallback:
        raise ArgumentError(
            f"Fashion-MNIST not found (looked in {root or FASHION_DIRS}); install the Debian package "
            "dataset-fashion-mnist or pass root="
        )
    warnings.warn("Fashion-MNIST not found; falling back to scikit-learn's digits (upsampled to 28x28)", UserWarning, stacklevel=2)
    return digits(split)


def digits(split: str = "train") -> ImageDataset:
    """scikit-learn's 8x8 digits, upsampled (bilinear) to 28x28 uint8; 80/20 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    images = (x.squeeze(1) * 255).round().clamp(0, 255).to(torch.uint8)
    labels = torch.as_tensor(d.target)
    cut = int(len(images) * 0.8)
    sl = slice(0, cut) if split == "train" else slice(cut, None)
    m = float(images[:cut].float().mean() / 255)
    s = float(images[:cut].float().std() / 255)
    return ImageDataset(images[sl].contiguous(), labels[sl].contiguous(), "digits", [str(i) for i in range(10)], m, s)


# ---------------------------------------------------------------------- text


def fortunes(
    max_items: int | None = None,
    min_chars: int = 20,
    max_chars: int = 400,
    files: Sequence[str] | None = None,
    root: str | os.PathLike | None = None,
) -> list[str]:
    """Real English text: the fortunes of the Debian package ``fortunes``.

    Each fortune (``%``-separated) is whitespace-normalised; those shorter than
    ``min_chars`` or longer than ``max_chars`` are skipped. Files are read in sorted
    order (``files`` restricts them, e.g. ``["fortunes", "literature"]``), so the list is
    deterministic. Raises :class:`ArgumentError` when the package is not installed.
    """
    base = Path(root) if root is not None else next((Path(d) for d in FORTUNE_DIRS if Path(d).is_dir()), None)
    if base is None or not base.is_dir():
        raise ArgumentError(f"fortunes not found in {root or FORTUNE_DIRS}; install the Debian package 'fortunes'")
    names = sorted(p.name for p in base.iterdir() if p.is_file() and not p.suffix and not p.is_symlink())
    if files is not None:
        names = [n for n in names if n in set(files)]
    out: list[str] = []
    for n in names:
        try:
            text = (base / n).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for chunk in text.split("\n%\n"):
            s = re.sub(r"\s+", " ", chunk.strip().strip("%")).strip()
            if min_chars <= len(s) <= max_chars and s.isascii():
                out.append(s)
                if max_items is not None and len(out) >= max_items:
                    return out
    return out


def fortunes_available() -> bool:
    return any(Path(d).is_dir() for d in FORTUNE_DIRS)


class TextDataset(Dataset):
    """A list of strings; ``ds[i]`` is the string (tokenise in the collate function)."""

    def __init__(self, texts: Sequence[str], name: str = "text"):
        self.texts = list(texts)
        self.name = name

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> str:
        return self.texts[i]


def text_collate(tokenizer: Any, max_length: int = 64) -> Callable[[list[str]], dict[str, torch.Tensor]]:
    """A collate_fn tokenising a list of strings with padding (HF tokenizer interface)."""

    def collate(texts: list[str]) -> dict[str, torch.Tensor]:
        enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return dict(enc)

    return collate
