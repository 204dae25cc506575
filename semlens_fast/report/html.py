"""Render a :class:`ReportData` into one self-contained folder: ``index.html`` + ``img/*.png``.

No external resources: inline CSS, inline SVG for the concept map and a few lines of inline
JS that record errors and count loaded images into ``document.body.dataset`` (used by the
browser test). The folder is built beside its final place and swapped in with one atomic
``renameat2(RENAME_EXCHANGE)`` (Linux), so at every instant the final name holds a complete
report, the old or the new one; a crash leaves at most a hidden sibling folder, which the next
write removes. (Where the exchange is unavailable: two renames, with a short window without
a report.)
"""
from __future__ import annotations

import contextlib
import html
import math
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import ArgumentError, ShapeError
from .data import ComponentCard, LayerSection, ReportData, SearchSection, concept_map_arrays, fmt, validate

THUMB_PX = 84  # thumbnails are upscaled (nearest neighbour) to at least this many pixels on their long side
MARKER = ".semlens-report"  # marks a folder written by write_report (only such folders are replaced)
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]

_e = html.escape


def thumb_scale(height: int, width: int) -> int:
    """Integer upscaling factor of an image of that size (1 for images already large enough)."""
    return max(1, math.ceil(THUMB_PX / max(height, width, 1)))


# --------------------------------------------------------------------------- images

def _to_pil(img: Any, where: str) -> Image.Image:
    """Convert a tensor [C,H,W]/[H,W] or numpy [H,W]/[H,W,C] (float in [0,1] or uint8), or a PIL image."""
    if isinstance(img, Image.Image):
        return img if img.mode in ("L", "RGB", "RGBA") else img.convert("RGBA" if "A" in img.mode else "RGB")
    if isinstance(img, torch.Tensor):
        t = img.detach().cpu()
        if t.ndim == 3:
            t = t.permute(1, 2, 0)  # CHW -> HWC
        elif t.ndim != 2:
            raise ShapeError(f"{where} must be a tensor [C, H, W] or [H, W], got shape {list(img.shape)}")
        a = t.numpy() if t.dtype == torch.uint8 else t.float().numpy()
    elif isinstance(img, np.ndarray):
        a = img
        if a.ndim not in (2, 3):
            raise ShapeError(f"{where} must be an array [H, W] or [H, W, C], got shape {list(img.shape)}")
    else:
        raise ArgumentError(f"{where} must be a torch tensor, numpy array or PIL image, got {type(img).__name__}")
    if a.ndim == 3:
        if a.shape[-1] not in (1, 3, 4):
            raise ShapeError(f"{where} must have 1, 3 or 4 channels, got shape {list(img.shape)}")
        if a.shape[-1] == 1:
            a = a[..., 0]
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ShapeError(f"{where} is empty, got shape {list(img.shape)}")
    if a.dtype != np.uint8:
        if a.dtype.kind not in "fiub":
            raise ArgumentError(f"{where} has unsupported dtype {a.dtype}")
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise ArgumentError(f"{where} contains NaN or infinite values")
        a = np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a))


def _write_png(img: Image.Image, path: Path) -> None:
    """Write one PNG (a separate function so tests can make it fail)."""
    img.save(path, format="PNG")


class _Images:
    """Converts, upscales and writes images into ``img/``; returns ``<img>`` tags."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "img"
        self.dir.mkdir()

    def tag(self, img: Any, name: str, where: str, cls: str, alt: str) -> str:
        pil = _to_pil(img, where)
        s = thumb_scale(pil.height, pil.width)
        if s > 1:
            pil = pil.resize((pil.width * s, pil.height * s), Image.NEAREST)
        _write_png(pil, self.dir / f"{name}.png")
        return (
            f'<img class="{cls}" src="img/{_e(name)}.png" width="{pil.width}" height="{pil.height}" '
            f'alt="{_e(alt)}" loading="eager">'
        )


# --------------------------------------------------------------------------- HTML pieces

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#eee;padding:16px 24px}
header h1{margin:0 0 8px;font-size:22px}
nav{padding:6px 24px;background:#eceff1;font-size:13px}
nav a{margin-right:12px;color:#1a4d80}
main{padding:8px 24px 32px}
section{margin:18px 0}
h2{border-bottom:1px solid #ccc;padding-bottom:4px}
table{border-collapse:collapse;margin:6px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0}
table.meta{color:#eee}table.meta th,table.meta td{border-color:#455a64;background:transparent}
tr.flagged td{background:#ffe0e0;font-weight:600}
.cards{display:flex;flex-wrap:wrap;gap:12px}
div.card{background:#fff;border:1px solid #ccc;border-radius:6px;padding:8px;max-width:560px}
.card-head{font-weight:600;margin-bottom:4px}
.sub{font-size:12px;color:#555;margin-top:6px}
.badge{display:inline-block;font-size:11px;border-radius:8px;padding:1px 7px;margin-left:4px;background:#ddd}
.badge.flag-spurious{background:#d62728;color:#fff}
.badge.flag-most-relevant{background:#2ca02c;color:#fff}
.label{font-size:15px;margin:2px 0 4px}
.none{color:#999;font-style:italic}
table.kv td,table.kv th{font-size:12px;padding:1px 6px}
.examples{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0;text-align:center;font-size:11px;color:#555}
img{image-rendering:pixelated;border:1px solid #bbb;display:block}
.search-body{display:flex;gap:16px;align-items:flex-start}
svg.concept-map{background:#fff;border:1px solid #ccc}
circle.point{stroke:#fff;stroke-width:0.5}
circle.point.highlight{stroke:#000;stroke-width:2}
.legend span{display:inline-block;width:10px;height:10px;border-radius:5px;margin:0 4px 0 12px}
.notes li{color:#555}
"""

# Records script errors and failed resources, then counts the images that really decoded.
JS = """
window.__semlens = {errors: [], resources: []};
window.addEventListener('error', function (e) {
  var t = e.target, s = window.__semlens;
  if (t && t !== window && t.tagName) { s.resources.push(t.src || t.tagName); }
  else { s.errors.push(String(e.message)); }
  if (document.body) {
    document.body.dataset.errors = String(s.errors.length);
    document.body.dataset.resourceErrors = String(s.resources.length);
    document.body.dataset.errorText = s.errors.concat(s.resources).join(' | ');
  }
}, true);
window.addEventListener('load', function () {
  var imgs = document.images, n = 0, b = document.body, s = window.__semlens;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) { n++; } }
  b.dataset.imagesTotal = String(imgs.length);
  b.dataset.imagesLoaded = String(n);
  b.dataset.errors = String(s.errors.length);
  b.dataset.resourceErrors = String(s.resources.length);
  b.dataset.ready = '1';
});
"""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def _table(columns: list[str], rows: list[dict], cls: str) -> str:
    head = "".join(f"<th>{_e(str(c))}</th>" for c in columns)
    body = []
    for row in rows:
        attr = ' class="flagged"' if row.get("flagged") else ""
        cells = "".join(f"<td>{_e(fmt(row.get(c)))}</td>" for c in columns)
        body.append(f"<tr{attr}>{cells}</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _paragraphs(lines: list[str], cls: str) -> str:
    """Plain-text lines: "- " / "• " lines become bullets, others paragraphs."""
    out, bullets = [], []
    for line in lines:
        text = str(line)
        if text.startswith(("- ", "• ")):
            bullets.append(f"<li>{_e(text[2:])}</li>")
            continue
        if bullets:
            out.append(f"<ul>{''.join(bullets)}</ul>")
            bullets = []
        out.append(f"<p>{_e(text)}</p>")
    if bullets:
        out.append(f"<ul>{''.join(bullets)}</ul>")
    return f'<div class="{cls}">{"".join(out)}</div>'


def _card(card: ComponentCard, li: int, ci: int, images: _Images) -> str:
    badges = "".join(f'<span class="badge flag-{_slug(str(f))}">{_e(str(f))}</span>' for f in card.flags)
    label = f"{_e(card.label)}" if card.label else '<span class="none">no label</span>'
    kv = [("label score", card.label_score), ("relevance", card.relevance), *card.scores.items()]
    kv_html = "".join(f"<tr><th>{_e(str(k))}</th><td>{_e(fmt(v))}</td></tr>" for k, v in kv)
    figs = []
    for k, (img, sid) in enumerate(zip(card.images, card.image_ids)):
        where = f"layers[{li}].components[{ci}].images[{k}]"
        cap = f"id {fmt(sid)}"
        extra = card.image_captions[k] if card.image_captions is not None else ""
        tag = images.tag(img, f"l{li}_c{ci}_{k}", where, "example", f"{cap} {extra}".strip())
        extra_html = f"<br>{_e(str(extra))}" if extra else ""
        figs.append(f"<figure>{tag}<figcaption>{_e(cap)}{extra_html}</figcaption></figure>")
    ev = []
    for k, (img, sid, cap) in enumerate(card.evidence):
        where = f"layers[{li}].components[{ci}].evidence[{k}]"
        tag = images.tag(img, f"l{li}_c{ci}_e{k}", where, "evidence", f"id {fmt(sid)} {cap}".strip())
        ev.append(f"<figure>{tag}<figcaption>{_e(f'id {fmt(sid)}')}<br>{_e(cap)}</figcaption></figure>")
    ev_html = ('<div class="sub">the data behind it: the receptive field of the activation peak (outlined in red), '
               f'in its context</div>'
               f'<div class="examples evidence">{"".join(ev)}</div>') if ev else ""
    return (
        f'<div class="card" id="layer-{li}-c{int(card.component)}" data-component="{int(card.component)}">'
        f'<div class="card-head">#{int(card.component)}{badges}</div>'
        f'<div class="label">{label}</div><table class="kv">{kv_html}</table>'
        f'<div class="examples">{"".join(figs)}</div>{ev_html}</div>'
    )


def _layer(layer: LayerSection, li: int, images: _Images) -> str:
    cards = "".join(_card(c, li, ci, images) for ci, c in enumerate(layer.components))
    if not cards:
        cards = '<p class="none">no components</p>'
    return (
        f'<section class="layer" id="layer-{li}" data-layer="{_e(layer.name)}">'
        f"<h2>Layer {_e(layer.name)}</h2><p>{_e(layer.note)}</p>"
        f'<div class="cards">{cards}</div></section>'
    )


def _search(search: SearchSection, si: int, images: _Images) -> str:
    probes = "".join(
        images.tag(img, f"search{si}_{k}", f"searches[{si}].images[{k}]", "probe", "probe image")
        for k, img in enumerate(search.images)
    )
    return (
        f'<div class="search-result" id="search-{si}"><h3>{_e(search.query)}</h3><div class="search-body">'
        f'{f"<div>{probes}</div>" if probes else ""}{_table(search.columns, search.rows, "search-table")}</div></div>'
    )


def _concept_map(cmap: dict, size: int = 640, margin: int = 20) -> str:
    xy, labels, groups, highlight = concept_map_arrays(cmap)
    names = list(dict.fromkeys(groups))
    colour = {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(names)}
    lo, hi = (xy.min(axis=0), xy.max(axis=0)) if len(xy) else (np.zeros(2), np.zeros(2))
    span = float(max((hi - lo).max(), 1e-12))
    inner = size - 2 * margin
    # one scale for both axes (keeps distances honest), centred in the square
    px = margin + (xy - lo) / span * inner + (inner - (hi - lo) / span * inner) / 2
    order = sorted(range(len(xy)), key=lambda i: highlight[i])  # highlighted points on top
    pts = []
    for i in order:
        x, y = px[i, 0], size - px[i, 1]
        cls, r = ("point highlight", 7) if highlight[i] else ("point", 4)
        pts.append(
            f'<circle class="{cls}" cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{colour[groups[i]]}">'
            f"<title>{_e(labels[i])}</title></circle>"
        )
    legend = "".join(f'<span style="background:{colour[g]}"></span>{_e(g or "(none)")}' for g in names)
    return (
        f'<div class="legend">{legend}</div>'
        f'<svg class="concept-map" width="{size}" height="{size}" viewBox="0 0 {size} {size}" role="img">'
        f'{"".join(pts)}</svg><p class="none">Larger ringed points are highlighted; hover a point for its label.</p>'
    )


def render(data: ReportData, images: _Images) -> str:
    """The whole ``index.html`` (writes the images as a side effect)."""
    meta = "".join(f"<tr><th>{_e(str(k))}</th><td>{_e(fmt(v))}</td></tr>" for k, v in data.meta.items())
    parts = [f'<section id="summary"><h2>Summary</h2>{_paragraphs(data.summary, "summary")}</section>']
    nav = [("summary", "Summary")]
    if data.audit_columns or data.audit_rows:
        parts.append(f'<section id="audit"><h2>Audit</h2>{_table(data.audit_columns, data.audit_rows, "audit")}</section>')
        nav.append(("audit", "Audit"))
    if data.searches:
        body = "".join(_search(s, si, images) for si, s in enumerate(data.searches))
        parts.append(f'<section id="searches"><h2>Searches</h2>{body}</section>')
        nav.append(("searches", "Searches"))
    for li, layer in enumerate(data.layers):
        parts.append(_layer(layer, li, images))
        nav.append((f"layer-{li}", f"Layer {layer.name}"))
    if data.concept_map is not None:
        parts.append(f'<section id="concept-map"><h2>Concept map</h2>{_concept_map(data.concept_map)}</section>')
        nav.append(("concept-map", "Concept map"))
    if data.notes:
        notes = "".join(f"<li>{_e(str(n))}</li>" for n in data.notes)
        parts.append(f'<section id="notes" class="notes"><h2>Notes</h2><ul>{notes}</ul></section>')
        nav.append(("notes", "Notes"))
    nav_html = "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t in nav)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        "<meta name=\"generator\" content=\"semlens_fast.report\">"
        f"<title>{_e(data.title)}</title><style>{CSS}</style><script>{JS}</script></head>\n<body>"
        f'<header><h1>{_e(data.title)}</h1><table class="meta">{meta}</table></header>'
        f"<nav>{nav_html}</nav>\n<main>{''.join(parts)}</main>\n</body></html>\n"
    )


# --------------------------------------------------------------------------- writing

def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False if the
    system or the file system cannot."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(AT_FDCWD, os.fsencode(str(a)), AT_FDCWD, os.fsencode(str(b)), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    import errno

    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _clean_stale(out: Path) -> None:
    """Remove hidden build/old folders of earlier interrupted writes of ``out``: only those
    holding nothing but what write_report writes (a kill during a build, or during the removal
    of the previous report, leaves any subset of it)."""
    ours = {"index.html", MARKER, "img"}
    for p in out.parent.glob(f".{out.name}.*"):
        if not p.is_dir() or p.is_symlink() or not (p.name.endswith(".tmp") or ".old-" in p.name):
            continue
        if {c.name for c in p.iterdir()} <= ours:
            shutil.rmtree(p, ignore_errors=True)


def _prepare_parent(out: Path, overwrite: bool) -> None:
    """Create the parent folder and check that ``out`` may be (re)placed; errors name the path."""
    parent = out.parent
    for p in (parent, *parent.parents):
        if p.exists() and not p.is_dir():
            raise ArgumentError(f"out_dir {str(out)!r}: {str(p)!r} is not a directory")
        if p.exists():
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArgumentError(f"out_dir {str(out)!r}: cannot create its parent folder: {exc}") from exc
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise ArgumentError(f"out_dir {str(out)!r} already exists (pass overwrite=True to replace it)")
        if out.is_symlink() or not out.is_dir():
            raise ArgumentError(f"out_dir {str(out)!r} exists and is not a folder; refusing to replace it")
        if any(out.iterdir()) and not (out / MARKER).exists():
            raise ArgumentError(
                f"out_dir {str(out)!r} is a non-empty folder that was not written by write_report; "
                "refusing to replace it"
            )


def write_report(out_dir: str | os.PathLike, data: ReportData, *, overwrite: bool = True) -> Path:
    """Write ``data`` as ``out_dir/index.html`` + ``out_dir/img/*.png``; return the index path.

    The report is built in a temporary sibling folder and swapped into place atomically (see
    the module docstring); an existing report is replaced only when ``overwrite`` (and only if
    it is empty or was written by this function). On failure any previous report is left intact.
    """
    from .._io import dir_mode, file_mode

    validate(data)
    out = Path(out_dir).absolute()
    _prepare_parent(out, overwrite)
    _clean_stale(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=str(out.parent)))
    except OSError as exc:
        raise ArgumentError(f"out_dir {str(out)!r}: its parent folder is not writable: {exc}") from exc
    old: Path | None = None
    try:
        os.chmod(tmp, dir_mode())  # mkdtemp makes it private; a report is meant to be read (as the umask allows)
        page = render(data, _Images(tmp))
        index = tmp / "index.html"
        index.write_text(page, encoding="utf-8")
        (tmp / MARKER).write_text("written by semlens_fast.report.write_report\n", encoding="utf-8")
        for f in (index, tmp / MARKER, *(tmp / "img").iterdir()):
            with contextlib.suppress(OSError):
                os.chmod(f, file_mode())
            _fsync(f)
        with contextlib.suppress(OSError):
            os.chmod(tmp / "img", dir_mode())
        _fsync(tmp / "img")
        _fsync(tmp)
        if out.exists() and _exchange(tmp, out):
            old = tmp  # the temporary name now holds the previous report, out the new one
        else:
            if out.exists():
                old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(out, old)
            try:
                os.rename(tmp, out)
            except OSError:
                if old is not None:
                    os.rename(old, out)  # put the previous report back
                    old = None
                raise
        _fsync(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out / "index.html"
