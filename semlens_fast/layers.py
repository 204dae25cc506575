"""Layer names for :func:`semlens_fast.collect.collect`: exact module names, globs, input hooks.

A layer spec is a module name as ``model.named_modules()`` gives it (``"encoder.layer.3"``),
or a **glob** over those names:

* ``*`` matches any characters *within one* dotted component (``"encoder.layer.*.intermediate"``
  matches ``encoder.layer.0.intermediate`` .. ``encoder.layer.11.intermediate``, not
  ``encoder.layer.3.attention.intermediate``);
* ``**`` matches across components (``"**.mlp.act"``; also zero components: ``"**.fc"``
  matches a top-level ``fc``);
* ``?`` one character within a component, ``[...]`` a character class (``"h.[0-3].mlp.act"``).

A glob expands to the matching modules **in the model's module order**; a glob that matches
nothing raises :class:`~semlens_fast.errors.ArgumentError` listing the closest names.

A name (or glob) ending in ``@input`` reads the module's first positional **input** instead of
its output: ``"model.layers.*.mlp.down_proj@input"`` are the MLP neurons of a LLaMA (the
``act(gate) * up`` product that enters the down projection).
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from .errors import ArgumentError

INPUT_SUFFIX = "@input"
_GLOB_CHARS = set("*?[")

__all__ = ["INPUT_SUFFIX", "is_glob", "glob_to_regex", "expand_layers", "split_input", "per_layer"]


def is_glob(name: str) -> bool:
    return any(c in _GLOB_CHARS for c in name)


def split_input(name: str) -> tuple[str, bool]:
    """``("module.name", reads_input)`` of a layer spec."""
    if name.endswith(INPUT_SUFFIX):
        return name[: -len(INPUT_SUFFIX)], True
    return name, False


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """The regular expression of a layer glob (see the module docstring)."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**.", i):
            out.append(r"(?:.*\.)?")  # any number of leading components, including none
            i += 3
        elif pattern.startswith("**", i):
            out.append(r".*")
            i += 2
        elif c == "*":
            out.append(r"[^.]*")
            i += 1
        elif c == "?":
            out.append(r"[^.]")
            i += 1
        elif c == "[":
            j = pattern.find("]", i + 2 if pattern.startswith("[!", i) or pattern.startswith("[^", i) else i + 1)
            if j < 0:
                raise ArgumentError(f"layers: glob {pattern!r} has an unclosed '['")
            body = pattern[i + 1 : j]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    try:
        return re.compile("".join(out) + r"\Z")
    except re.error as exc:
        raise ArgumentError(f"layers: {pattern!r} is not a valid glob ({exc})") from None


def _close_names(name: str, names: Sequence[str]) -> list[str]:
    probe = re.sub(r"[*?\[\]!]+", "0", name)
    close = difflib.get_close_matches(probe, names, n=5, cutoff=0.3)
    if not close:  # e.g. "conv" vs "features.0": names containing a part of it
        parts = [p for p in re.split(r"[.*?\[\]]+", name) if p]
        close = [n for n in names if any(p in n for p in parts)][:5] or list(names[:5])
    return close


def _unknown(model: nn.Module, name: str, names: Sequence[str], glob: bool) -> ArgumentError:
    what = "matches no module of the model" if glob else "is not a module of the model"
    close = _close_names(name, names)
    return ArgumentError(
        f"layers: {name!r} {what} ({type(model).__name__}, {len(names)} named modules); "
        f"closest names: {', '.join(repr(c) for c in close)}"
    )


def expand_layers(model: nn.Module, layers: str | Sequence[str]) -> dict[str, nn.Module]:
    """Map layer specs (names, globs, ``@input`` suffixes) to modules, globs expanded in module order.

    The keys are the expanded names (with their ``@input`` suffix). An unknown name or a glob
    matching nothing raises :class:`ArgumentError` listing the closest real names; a name
    listed twice (or matched by two globs) is kept once, but an exact name given twice is an error.
    """
    if isinstance(layers, str):
        layers = [layers]
    if not isinstance(layers, Sequence) or not layers:
        raise ArgumentError(f"layers must be a module name, a glob or a non-empty list of them, got {layers!r}")
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    out: dict[str, nn.Module] = {}
    exact_seen: set[str] = set()
    for spec in layers:
        if not isinstance(spec, str):
            raise ArgumentError(f"layers must hold module names or globs (str), got {spec!r} ({type(spec).__name__})")
        base, reads_input = split_input(spec)
        suffix = INPUT_SUFFIX if reads_input else ""
        if is_glob(base):
            rx = glob_to_regex(base)
            hits = [n for n in names if rx.match(n)]
            if not hits:
                raise _unknown(model, base, names, True)
            for n in hits:
                out.setdefault(n + suffix, modules[n])
            continue
        if spec in exact_seen:
            raise ArgumentError(f"layers lists {spec!r} twice")
        exact_seen.add(spec)
        if base not in modules or base == "":
            raise _unknown(model, base, names, False)
        out.setdefault(spec, modules[base])
    return out


def per_layer(spec: Any, names: Sequence[str], what: str, default: Any) -> dict[str, Any]:
    """Expand a per-layer argument: one value for all layers, or a ``{name or glob: value}`` mapping.

    Exact names win over globs; among globs the first matching key wins. A key matching no
    layer raises :class:`ArgumentError`.
    """
    if not isinstance(spec, Mapping):
        return {n: spec for n in names}
    out: dict[str, Any] = {}
    used: set[str] = set()
    for n in names:
        if n in spec:
            out[n] = spec[n]
            used.add(n)
    for key in spec:
        if not isinstance(key, str) or key in used:
            continue
        base, reads_input = split_input(key)
        if not is_glob(base):
            continue
        rx = glob_to_regex(base)
        for n in names:
            nb, ni = split_input(n)
            if ni == reads_input and rx.match(nb):
                used.add(key)
                out.setdefault(n, spec[key])
    unknown = [k for k in spec if k not in used]
    if unknown:
        raise ArgumentError(f"{what} names layers {unknown} that are not in layers={list(names)}")
    return {n: out.get(n, default) for n in names}
