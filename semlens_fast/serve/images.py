"""Images in and out of the explorer: uploads decoded safely, samples and crops encoded as PNG.

Uploads (:func:`decode_upload`) are bounded before any pixel is decoded: the byte count,
the format (only PNG, JPEG, GIF, BMP and WebP decoders are tried, so Pillow never hands a
file to an external program such as Ghostscript), and the pixel count read from the header.
A file that fails any check, or whose decoder fails (truncated data included), raises
:class:`UploadError` with the reason.
"""
from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import ArgumentError

ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")
THUMB_PX = 84  # thumbnails are upscaled (nearest neighbour) to at least this long side


class UploadError(ArgumentError):
    """An uploaded image was refused. ``status`` is the HTTP status it maps to (400 or 413)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, *, max_bytes: int, max_pixels: int, name: str = "image") -> Image.Image:
    """Decode an uploaded image into an RGB :class:`PIL.Image.Image`, refusing anything unsafe.

    Args:
        data: the raw bytes of the file.
        max_bytes: largest accepted file (else :class:`UploadError` with status 413).
        max_pixels: largest accepted width x height, read from the header before decoding
            (status 413).
        name: what the error messages call the upload.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise UploadError(f"{name}: expected the file's bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise UploadError(f"{name}: the uploaded file is empty")
    if len(data) > max_bytes:
        raise UploadError(f"{name}: {len(data)} bytes is larger than the limit of {max_bytes} bytes", 413)
    # (no warnings.catch_warnings here: it is not thread-safe. Pillow raises DecompressionBombError at
    # open time for > 2x its MAX_IMAGE_PIXELS; the smaller max_pixels limit below refuses the rest
    # from the header, before a pixel is decoded.)
    try:
        im = Image.open(io.BytesIO(bytes(data)), formats=list(ALLOWED_FORMATS))
    except Image.DecompressionBombError as exc:
        raise UploadError(f"{name}: refused as a decompression bomb ({exc})", 413) from None
    except Exception as exc:  # noqa: BLE001 - any failure to identify is the same answer
        raise UploadError(f"{name}: not a readable image (accepted formats: {', '.join(ALLOWED_FORMATS)}): "
                          f"{type(exc).__name__}") from None
    try:
        w, h = im.size
        if w < 1 or h < 1:
            raise UploadError(f"{name}: the image has no pixels ({w}x{h})")
        if w * h > max_pixels:
            raise UploadError(f"{name}: {w}x{h} = {w * h} pixels is more than the limit of {max_pixels} pixels", 413)
        try:
            im.seek(0)  # first frame of an animation
            im.load()
            out = im.convert("RGB")
        except Exception as exc:  # noqa: BLE001 - truncated data, bad chunks, decoder errors
            raise UploadError(f"{name}: the {im.format} data cannot be decoded ({type(exc).__name__}: {exc})") from None
    finally:
        im.close()
    return out


def to_pil(img: Any) -> Image.Image:
    """A data-set image (tensor ``[H, W]`` / ``[C, H, W]``, numpy ``[H, W]`` / ``[H, W, C]``, uint8 or
    float in ``[0, 1]``, or a PIL image) as an ``L``/``RGB`` PIL image."""
    if isinstance(img, Image.Image):
        return img if img.mode in ("L", "RGB") else img.convert("RGB")
    if isinstance(img, torch.Tensor):
        t = img.detach().cpu()
        if t.dim() == 3:
            t = t.permute(1, 2, 0)
        a = t.numpy() if t.dtype == torch.uint8 else t.float().numpy()
    else:
        a = np.asarray(img)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3) or a.size == 0:
        raise ArgumentError(f"cannot show an image of shape {list(a.shape)}; expected [H, W], [H, W, 3] or [C, H, W]")
    if a.dtype != np.uint8:
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        a = np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a))


def png_bytes(img: Any, min_side: int = THUMB_PX) -> bytes:
    """PNG of ``img``, upscaled by an integer factor (nearest neighbour) to at least ``min_side`` px."""
    pil = to_pil(img)
    s = max(1, math.ceil(min_side / max(pil.width, pil.height, 1)))
    if s > 1:
        pil = pil.resize((pil.width * s, pil.height * s), Image.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()
