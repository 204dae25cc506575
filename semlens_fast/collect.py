"""Stage 1 of SemanticLens: stream a dataset through a model and keep, for every
component (channel / neuron) of the chosen layers, its top-k most activating samples.

:func:`collect` works on any ``nn.Module``:

* **Layers** are named as ``model.named_modules()`` names them (``"layer4.1.conv2"``,
  ``"encoder.layer.3"``). An unknown name raises an error listing the closest real names.
* **Outputs.** A layer's output is read by a forward hook. Tensor layouts:
  ``[B, C, H, W]`` (conv; positions are ``h * W + w``), ``[B, C]`` (linear),
  ``[B, T, C]`` (transformer tokens; positions are token indices), ``[B, C, L]`` for
  ``nn.Conv1d`` modules, ``[B, C, *spatial]`` for 5-D and up (positions are flattened
  spatial indices). **Tuple/list/dict outputs:** the first tensor found depth-first
  (``out[0]``, ``out[0][0]``..., or the first tensor value of a mapping / HF
  ``ModelOutput``) is used, unless ``output={layer: fn}`` (or one ``fn`` for all layers)
  picks the tensor: ``fn(module_output) -> Tensor``.
* **Pools** (``pool=`` one spec, or ``{layer: spec}``): ``"max"``, ``"mean"``,
  ``"absmax"``, ``"sum"`` (fused C++/Triton ``pool_topk_update`` kernels: one read of
  the activation, nothing materialised), an ``int`` token position for ``[B, T, C]``
  outputs (``0`` / ``"cls"`` = first token; negative counts from the end), or a
  callable ``fn(act) -> [B, C]`` values (or ``(values [B, C], positions [B] or [B, C])``);
  if ``fn`` has a parameter named ``mask`` it also receives the attention mask (or None).
  Positions (``h * W + w`` or token index of the maximum) are recorded for
  ``max``/``absmax`` and token positions; ``-1`` for ``mean``/``sum``.
* **Text and padding.** With a mask (by default ``batch["attention_mask"]`` when batches
  are mappings, e.g. a HF tokenizer's output), padded tokens never win: for ``max`` they
  are set to ``-inf`` before pooling, for ``absmax`` their ``|x|`` is set to ``-inf``,
  for ``mean``/``sum`` they are excluded (``mean`` divides by the number of real
  tokens), and token positions count real tokens only (``0`` = first real token,
  ``-1`` = last real token) while the stored position is the raw index into the padded
  sequence. A sample whose tokens are all masked gets a NaN pool value (excluded and
  counted).
* **Sample ids are the dataset's own indices**, also when a ``DataLoader`` shuffles or
  uses a custom sampler: ``collect`` draws the index batches from the loader's
  ``batch_sampler`` once, up front, records them, and feeds exactly those lists back
  to a loader built on the same dataset/collate_fn/workers. The id of row ``i`` of a
  batch is the ``i``-th index of that list; batches are never counted.
* **Work.** Under ``torch.inference_mode`` (and ``model.eval()``, restored afterwards),
  the forward pass is stopped by a private exception raised from the hook of the last
  requested layer to run, so nothing after it is computed. Each batch's activations
  are pooled and merged immediately; only ``[C, k]`` states are kept. Any device: the
  states live on the device of each layer's output.
* **Non-finite values.** A pooled value that is NaN or +-Inf never enters the top-k;
  it is counted per channel in ``nan_counts`` and each layer warns once. (Detection is
  free: after the fused update, a NaN count change or an infinite value in the state
  triggers an exact redo of that batch; a ``-inf`` pooled value that could not have
  reached the top-k anyway is only counted by ``strict_finite=True``, which costs one
  extra read of each activation.)

Durable runs: ``store=path`` writes a :class:`~semlens_fast.store.TopKStore` there,
checkpointed every ``checkpoint_every`` batches, and resumes an interrupted run
(see ``docs/collect.md``).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import logging
import math
import os
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, SequentialSampler

from . import __version__
from ._io import ensure_dir, hash_tensors, locked
from .errors import ArgumentError, DeviceError, DTypeError, SemlensError, ShapeError, StoreError
from .layers import expand_layers, per_layer, split_input
from ._batch import default_forward, first_tensor, to_device
from .ops import POOLS, TopKState, pool_topk_update, topk_update
from .store import (
    TopKStore,
    _read_states,
    _write_store,
    read_manifest,
    read_order,
    remove_store,
    write_order,
)

log = logging.getLogger("semlens_fast")

PoolSpec = Union[str, int, Callable[..., Any]]
OutputSpec = Callable[[Any], torch.Tensor]

__all__ = ["collect", "resolve_layers", "TopKStore", "LayerNotCalledError", "PoolSpec"]


class LayerNotCalledError(ArgumentError):
    """A requested layer was not called during the model's forward pass."""


class _StopForward(Exception):
    """Raised from the hook of the last requested layer to cut the forward pass short."""


class ModelInputError(ArgumentError):
    """The model cannot run on what the data set yields (wrong type, channels or shape)."""


def check_device(device: Any, what: str = "device") -> torch.device:
    """``device`` as a ``torch.device`` that can run here; anything else raises :class:`DeviceError`."""
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise DeviceError(f"{what} must be a device string such as 'cpu' or 'cuda:0', got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise DeviceError(f"{what} {device!r} is not a device ({str(exc).splitlines()[0][:120]}); use 'cpu' or 'cuda[:N]'") from None
    if dev.type == "meta":
        raise DeviceError(f"{what} {device!r}: meta tensors hold no data; collect needs a real device ('cpu' or 'cuda')")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{what} {device!r}: CUDA is not available on this machine; use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"{what} {device!r}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceError(f"{what} {device!r}: MPS is not available on this machine; use 'cpu'")
    elif dev.type != "cpu":
        try:
            torch.empty(1, device=dev)
        except Exception as exc:  # noqa: BLE001 - any backend failure means "not usable here"
            raise DeviceError(f"{what} {device!r} cannot be used here: {str(exc).splitlines()[0][:120]}") from None
    return dev


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor {list(x.shape)} {str(x.dtype).replace('torch.', '')} on {x.device}"
    if isinstance(x, (list, tuple)):
        inner = ", ".join(_describe(v) for v in x[:3])
        return f"{type(x).__name__} of {len(x)} [{inner}{', ...' if len(x) > 3 else ''}]"
    if isinstance(x, Mapping):
        return "dict {" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in list(x.items())[:4]) + "}"
    return type(x).__name__


def _failing_module(model: nn.Module, run_forward: Callable, batch: Any) -> tuple[str, str] | None:
    """Re-run a failed forward with pre-hooks to find the module it failed in: (name, its inputs)."""
    last: list[tuple[str, str]] = []
    names = {m: n for n, m in model.named_modules()}

    def pre(module: nn.Module, inputs: Any) -> None:
        last.append((names.get(module, type(module).__name__) or "<model>", _describe(inputs[0] if len(inputs) == 1 else inputs)))

    handles = [m.register_forward_pre_hook(pre) for m in model.modules()]
    try:
        with contextlib.suppress(Exception):
            run_forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    return last[-1] if last else None


_LOCKS = threading.local()


def _holds_store_lock(fn: Callable) -> Callable:
    """Let ``fn`` take the store's write lock part-way (after validating its arguments) and
    release it whichever way it returns."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        prev = getattr(_LOCKS, "stack", None)
        with contextlib.ExitStack() as stack:
            _LOCKS.stack = stack
            try:
                return fn(*args, **kwargs)
            finally:
                _LOCKS.stack = prev

    return wrapper


# ---------------------------------------------------------------------- layer & pool specs


def resolve_layers(model: nn.Module, layers: str | Sequence[str]) -> dict[str, nn.Module]:
    """Map layer names (as ``model.named_modules()`` gives them), globs (``"encoder.layer.*.intermediate"``)
    and ``name@input`` specs to modules; see :mod:`semlens_fast.layers`.

    An unknown name or a glob matching nothing raises :class:`ArgumentError` listing the closest real names.
    """
    return expand_layers(model, layers)


def _describe_callable(fn: Callable[..., Any]) -> str:
    mod = getattr(fn, "__module__", None) or type(fn).__module__
    qual = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"callable:{mod}.{qual}"


def _normalise_pool(spec: PoolSpec, layer: str) -> tuple[PoolSpec, str]:
    """Returns (pool, description for the manifest)."""
    if isinstance(spec, bool):
        raise ArgumentError(f"pool for layer {layer!r} must be one of {POOLS}, an int token position or a callable, got {spec!r}")
    if isinstance(spec, str):
        s = spec.lower()
        if s == "cls":
            return 0, "token[0]"
        if s not in POOLS:
            raise ArgumentError(
                f"pool for layer {layer!r} is {spec!r}; expected one of {', '.join(POOLS)}, 'cls', "
                "an int token position or a callable"
            )
        return s, s
    if isinstance(spec, int):
        return spec, f"token[{spec}]"
    if callable(spec):
        return spec, _describe_callable(spec)
    raise ArgumentError(
        f"pool for layer {layer!r} must be one of {', '.join(POOLS)}, an int token position or a callable, got {spec!r}"
    )


def _per_layer(spec: Any, names: Sequence[str], what: str, default: Any) -> dict[str, Any]:
    return per_layer(spec, names, what, default)


# ---------------------------------------------------------------------- per-layer collector


def _reference_pool(view: torch.Tensor, pool: str) -> tuple[torch.Tensor, torch.Tensor]:
    from .ops.reference.topk import pool as ref_pool  # exact spec of the kernels' pooling

    return ref_pool(view, pool)


def _set_positions(state: TopKState, ids: torch.Tensor, pos: torch.Tensor) -> None:
    """Set the positions of the entries of ``state`` that come from this batch.

    ``pos`` is ``[B]`` or ``[B, C]`` (rows in the order of ``ids``). Ids are unique over the
    run, so the entries whose id is in ``ids`` are exactly those inserted by this batch.
    """
    sorted_ids, order = torch.sort(ids)
    hit = torch.isin(state.ids, sorted_ids)
    if not bool(hit.any()):
        return
    ch, slot = torch.nonzero(hit, as_tuple=True)
    rows = order[torch.searchsorted(sorted_ids, state.ids[ch, slot])]
    p = pos[rows] if pos.dim() == 1 else pos[rows, ch]
    state.positions[ch, slot] = p.to(torch.int32)


def _check_state_memory(name: str, channels: int, k: int) -> None:
    """Refuse a top-k state that cannot fit in memory (values f32 + ids i64 + positions i32)."""
    need = channels * k * 16
    try:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return
    if need > avail:
        raise ArgumentError(
            f"k={k}: the top-k state of layer {name!r} ({channels} channels x {k}) needs {need / 2**30:.1f} GiB, more "
            f"than this machine's {avail / 2**30:.1f} GiB; use a smaller k (at most the number of samples is useful)")


class _Layer:
    def __init__(self, name: str, module: nn.Module, pool: PoolSpec, output: OutputSpec | None, k: int, strict_finite: bool):
        self.name = name
        self.module = module
        self.pool = pool
        self.output = output
        self.k = k
        self.strict_finite = strict_finite
        self.state: TopKState | None = None
        self.shape: list[int] | None = None
        self.layout: str | None = None
        self.warned = False
        self.pool_takes_mask = False
        self._snap: list[torch.Tensor] | None = None
        self._nan_total = 0
        self._full = False
        self.sae: Any = None
        if callable(pool) and not isinstance(pool, (str, int)):
            with contextlib.suppress(TypeError, ValueError):
                self.pool_takes_mask = "mask" in inspect.signature(pool).parameters

    # -- helpers
    def _select(self, out: Any) -> torch.Tensor:
        act = self.output(out) if self.output is not None else first_tensor(out)
        if not isinstance(act, torch.Tensor):
            how = "the output= callable returned" if self.output is not None else "its output holds no tensor:"
            raise DTypeError(
                f"layer {self.name!r}: {how} {type(act if self.output is not None else out).__name__}; "
                "pass output={layer: fn} returning the activation tensor"
            )
        if act.dtype == torch.float64:
            act = act.float()
        if not act.is_floating_point():
            raise DTypeError(f"layer {self.name!r}: activation dtype is {act.dtype}; expected a floating-point tensor")
        return act

    def _layout(self, act: torch.Tensor) -> tuple[torch.Tensor, str, int]:
        """Returns (tensor in a kernel layout, layout name, channel count)."""
        d = act.dim()
        if d == 4:
            return act, "BCHW", act.shape[1]
        if d == 2:
            return act, "BC", act.shape[1]
        if d == 3:
            if isinstance(self.module, nn.Conv1d):
                return act.unsqueeze(2), "BCL", act.shape[1]
            return act, "BTC", act.shape[2]
        if d >= 5:
            return act.flatten(2).unsqueeze(3), "BC" + "S" * (d - 2), act.shape[1]
        raise ShapeError(
            f"layer {self.name!r}: activation has shape {tuple(act.shape)}; expected [B, C, H, W], [B, T, C], "
            "[B, C] (or pass a callable pool= returning [B, C])"
        )

    def _warn(self, n: int) -> None:
        if n and not self.warned:
            self.warned = True
            warnings.warn(
                f"layer {self.name!r}: {n} non-finite (NaN/Inf) pooled activation(s) in this batch; they are "
                "excluded from the top-k and counted in nan_counts (warned once per layer)",
                RuntimeWarning,
                stacklevel=4,
            )

    def _merge_pooled(self, vals: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor | None) -> None:
        st = self.state
        assert st is not None
        vals = vals.float()
        bad = ~torch.isfinite(vals)
        nbad = int(bad.sum())
        if nbad:
            vals = vals.masked_fill(bad, float("nan"))
            self._warn(nbad)
        topk_update(st, vals, ids)
        if pos is not None:
            _set_positions(st, ids, pos)

    def _update_sae(self, act: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        """The layer's components are the latents of ``self.sae``: fused encode + pool + top-k."""
        sae = self.sae
        if act.dim() not in (2, 3) or act.shape[-1] != sae.d:
            raise ShapeError(
                f"layer {self.name!r}: the SAE {sae.name!r} reads [B, T, d] or [B, d] activations of width d = {sae.d} "
                f"(W_enc {tuple(sae.W_enc.shape)}), but the layer's output has shape {tuple(act.shape)}"
            )
        B = act.shape[0]
        if B != ids.shape[0]:
            raise ShapeError(f"layer {self.name!r}: output has batch size {B} (shape {tuple(act.shape)}) but the batch has {ids.shape[0]} samples")
        if self.state is None:
            self.state = TopKState.empty(sae.L, self.k, act.device)
            self.shape = list(act.shape[1:-1]) + [sae.L]
            self.layout = "BTC" if act.dim() == 3 else "BC"
            if sae.device != act.device:
                self.sae = sae = sae.to(act.device)
        if ids.device != act.device:
            ids = ids.to(act.device)
        if mask is not None and act.dim() == 3:
            if tuple(mask.shape) != tuple(act.shape[:2]):
                raise ShapeError(f"layer {self.name!r}: attention mask has shape {tuple(mask.shape)} but the tokens are {tuple(act.shape[:2])} [B, T]")
            mask = mask.to(act.device, torch.bool)
        else:
            mask = None
        if act.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            act = act.float()
        before = int(self.state.nan_counts.sum())
        sae.topk_update(self.state, act, ids, pool=self.pool, mask=mask)  # type: ignore[arg-type]
        self._warn(int(self.state.nan_counts.sum()) - before)

    # -- main entry, called from the forward hook
    def update(self, out: Any, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        if self.sae is not None:
            self._update_sae(self._select(out), ids, mask)
            return
        act, layout, C = self._layout(self._select(out))
        B = act.shape[0]
        if B != ids.shape[0]:
            raise ShapeError(
                f"layer {self.name!r}: output has batch size {B} (shape {tuple(act.shape)}) but the batch has "
                f"{ids.shape[0]} samples; collect needs the batch dimension first"
            )
        if self.state is None:
            _check_state_memory(self.name, int(C), self.k)
            self.state = TopKState.empty(int(C), self.k, act.device)
            self.shape, self.layout = list(act.shape[1:]) if layout != "BCL" else [act.shape[1], act.shape[3]], layout
        elif self.state.channels != C:
            raise ShapeError(f"layer {self.name!r}: output has {C} channels in this batch, {self.state.channels} before")
        st = self.state
        if ids.device != act.device:
            ids = ids.to(act.device)
        pool = self.pool
        if mask is not None and layout == "BTC":
            if tuple(mask.shape) != tuple(act.shape[:2]):
                raise ShapeError(
                    f"layer {self.name!r}: attention mask has shape {tuple(mask.shape)} but the tokens are "
                    f"{tuple(act.shape[:2])} [B, T]; pass attention_mask=None or a callable pool="
                )
            mask = mask.to(act.device, torch.bool)
        else:
            mask = None if layout != "BTC" else mask

        # ---- callables and token positions: pooled here, merged with topk_update
        if callable(pool) and not isinstance(pool, (str, int)):
            res = pool(act, mask=mask) if self.pool_takes_mask else pool(act)
            pos = None
            if isinstance(res, (tuple, list)):
                res, pos = res
            if not isinstance(res, torch.Tensor) or tuple(res.shape) != (B, C):
                got = tuple(res.shape) if isinstance(res, torch.Tensor) else type(res).__name__
                raise ShapeError(f"layer {self.name!r}: the pool callable returned {got}, expected values of shape ({B}, {C})")
            self._merge_pooled(res, ids, None if pos is None else torch.as_tensor(pos, device=act.device))
            return
        if isinstance(pool, int):
            if layout != "BTC":
                raise ShapeError(
                    f"layer {self.name!r}: a token-position pool ({pool}) needs [B, T, C] outputs, got {tuple(act.shape)}"
                )
            T = act.shape[1]
            if mask is None:
                idx = pool if pool >= 0 else T + pool
                if not 0 <= idx < T:
                    raise ArgumentError(f"layer {self.name!r}: token position {pool} is outside the {T} tokens")
                self._merge_pooled(act[:, idx, :], ids, torch.full((B,), idx, device=act.device))
                return
            rank = mask.long().cumsum(1)
            count = rank[:, -1]
            target = (pool + 1) if pool >= 0 else (count + pool + 1)
            target = torch.as_tensor(target, device=act.device).expand(B)
            ok = (target >= 1) & (target <= count)
            hit = (rank == target.unsqueeze(1)) & mask
            idx = hit.int().argmax(1)
            vals = act[torch.arange(B, device=act.device), idx, :].float()
            vals = vals.masked_fill(~ok.unsqueeze(1), float("nan"))
            self._merge_pooled(vals, ids, idx)
            return

        # ---- string pools: fused kernels
        assert isinstance(pool, str)
        runs = _prefix_runs(mask, act) if mask is not None and pool in ("max", "absmax") else None
        if runs is not None:
            # right padding: the kernel reads each run of samples' valid tokens in place (a strided
            # view) instead of a masked copy of the whole [B, T, C] output; same values and positions
            if act.dtype in (torch.float32, torch.float16, torch.bfloat16) and not self.strict_finite:
                views = [(act[b0:b1, :n], ids[b0:b1]) for b0, b1, n in runs]
                src = act.abs() if pool == "absmax" else act
                self._fused(views, pool, lambda: (src.masked_fill(~mask.unsqueeze(2), float("-inf")), ids, "max"))
                return
        if mask is not None:
            m3 = mask.unsqueeze(2)
            if pool == "mean":
                n = mask.sum(1, keepdim=True).double()
                s = act.masked_fill(~m3, 0).double().sum(1)
                vals = (s / n).float() + 0.0
                self._merge_pooled(vals, ids, None)
                return
            if pool == "max":
                act = act.masked_fill(~m3, float("-inf"))
            elif pool == "absmax":
                act, pool = act.abs().masked_fill(~m3, float("-inf")), "max"
            elif pool == "sum":
                act = act.masked_fill(~m3, 0)
        if act.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            act = act.float()
        if self.strict_finite and not bool(torch.isfinite(act).all()):
            self._redo(act, pool, ids)
            return
        self._fused([(act, ids)], pool, lambda: (act, ids, pool))

    def _fused(self, parts: list[tuple[torch.Tensor, torch.Tensor]], pool: str, whole: Callable) -> None:
        """The fused update of every ``(activations, ids)`` part of one batch, then a cheap check of
        the state: on an infinite value or a new NaN the state goes back to its snapshot and the
        batch (``whole()``: its activations, ids and pool, padding masked) takes the exact slow path."""
        st = self.state
        assert st is not None
        # Snapshot (into preallocated buffers, one dispatch), fused update, cheap check.
        fields = [st.values, st.ids, st.positions, st.nan_counts]
        if self._snap is None or self._snap[0].device != st.values.device:
            self._snap = [f.clone() for f in fields]
            self._nan_total = int(st.nan_counts.sum())
            self._full = False
        else:
            torch._foreach_copy_(self._snap, fields)
        for act, ids in parts:
            pool_topk_update(st, act, ids, pool)
        nan_total = int(st.nan_counts.sum())
        if self._full:
            # a full state is sorted best first: +inf would be in column 0, a real -inf in the last
            bad = bool(torch.isinf(st.values[:, :: max(1, st.k - 1)]).any())
        else:
            bad = bool((torch.isinf(st.values) & (st.ids >= 0)).any())
            self._full = bool((st.ids[:, -1] >= 0).all())
        if bad or nan_total != self._nan_total:
            torch._foreach_copy_(fields, self._snap)
            act, ids, pool = whole()
            self._redo(act, pool, ids)
            nan_total = int(st.nan_counts.sum())
            self._full = bool((st.ids[:, -1] >= 0).all())
        self._nan_total = nan_total

    def _redo(self, act: torch.Tensor, pool: str, ids: torch.Tensor) -> None:
        """Exact slow path for a batch with non-finite values: pool with the reference, then merge."""
        if act.dim() == 4:
            view = act.flatten(2)
        elif act.dim() == 3:
            view = act.transpose(1, 2)
        else:
            view = act.unsqueeze(2)
        vals, pos = _reference_pool(view, pool)
        self._merge_pooled(vals, ids, pos if pool in ("max", "absmax") else None)


# ---------------------------------------------------------------------- data plumbing


class _ListBatchSampler:
    """Yields pre-drawn index batches (lists of dataset indices)."""

    def __init__(self, batches: Sequence[torch.Tensor]):
        self.batches = batches

    def __iter__(self):
        for b in self.batches:
            yield b.tolist()

    def __len__(self) -> int:
        return len(self.batches)


def _loader_parts(data: Any, batch_size: int, collate_fn: Callable | None, num_workers: int) -> tuple[Dataset, Any, dict[str, Any]]:
    """(dataset, batch_sampler, DataLoader kwargs) of ``data``."""
    if isinstance(data, DataLoader):
        ds = data.dataset
        if isinstance(ds, IterableDataset):
            raise ArgumentError(
                "data is a DataLoader over an IterableDataset; collect needs a map-style Dataset "
                "(ids are dataset indices) - wrap your stream in a Dataset with __getitem__/__len__"
            )
        if data.batch_sampler is None:
            raise ArgumentError("data is a DataLoader with batch_size=None (no batching); give it a batch_size")
        kwargs = dict(
            collate_fn=data.collate_fn,
            num_workers=data.num_workers,
            pin_memory=data.pin_memory,
            worker_init_fn=data.worker_init_fn,
            multiprocessing_context=data.multiprocessing_context,
            timeout=data.timeout,
        )
        if data.num_workers > 0:
            kwargs["prefetch_factor"] = data.prefetch_factor
        return ds, data.batch_sampler, kwargs
    if isinstance(data, IterableDataset):
        raise ArgumentError("data is an IterableDataset; collect needs a map-style Dataset (ids are dataset indices)")
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise ArgumentError(f"data must be a torch Dataset (with __getitem__ and __len__) or a DataLoader, got {type(data).__name__}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ArgumentError(f"batch_size must be an int >= 1, got {batch_size!r}")
    bs = BatchSampler(SequentialSampler(range(len(data))), batch_size, drop_last=False)
    kwargs: dict[str, Any] = dict(num_workers=num_workers)
    if collate_fn is not None:
        kwargs["collate_fn"] = collate_fn
    return data, bs, kwargs


def _shard_batches(dataset: Dataset, data: Any, batch_size: int, rank: int, world: int) -> list[torch.Tensor]:
    """This rank's index batches: a DistributedSampler shard without its padding duplicates."""
    from torch.utils.data.distributed import DistributedSampler

    n = len(dataset)  # type: ignore[arg-type]
    user = getattr(data, "sampler", None) if isinstance(data, DataLoader) else None
    if isinstance(user, DistributedSampler):
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=user.shuffle, seed=user.seed, drop_last=False)
        sampler.set_epoch(user.epoch)
    else:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False, drop_last=False)
    idx = list(sampler)
    # DistributedSampler pads the global list to a multiple of world by repeating its head;
    # entry i of this rank sits at global position rank + i * world. Drop positions >= n.
    keep = max(0, math.ceil((n - rank) / world))
    idx = idx[:keep]
    bsz = data.batch_size if isinstance(data, DataLoader) and data.batch_size else batch_size
    t = torch.tensor(idx, dtype=torch.int64)
    return list(torch.split(t, bsz)) if len(t) else []


#: the in-place reading of right-padded batches (see _prefix_runs) is used on the CPU when a sample's
#: [T, C] output has at least this many elements (a guess, not tuned: below it a masked copy is
#: cheap next to a kernel call per run). On a GPU the masked copy stays: it costs little there, and
#: the runs would need a device sync and a launch per run.
PREFIX_MIN_ELEMENTS = 1 << 16


def _prefix_runs(mask: torch.Tensor, act: torch.Tensor) -> list[tuple[int, int, int]] | None:
    """``[(b0, b1, n), ...]``: runs of consecutive samples whose valid tokens are the first ``n``
    (``n >= 1``), if ``mask`` is a right-padding mask and the outputs are large enough to gain
    from reading them in place; else None."""
    B, T = mask.shape
    if act.device.type != "cpu" or B == 0 or T * act.shape[2] < PREFIX_MIN_ELEMENTS:
        return None
    lens = mask.sum(1)
    if int(lens.min()) < 1 or not bool((mask == (torch.arange(T, device=mask.device) < lens[:, None])).all()):
        return None
    runs: list[tuple[int, int, int]] = []
    for b, n in enumerate(lens.tolist()):
        if runs and runs[-1][2] == n:
            runs[-1] = (runs[-1][0], b + 1, n)
        else:
            runs.append((b, b + 1, n))
    return runs


def _get_mask(batch: Any, spec: str | Callable | None) -> torch.Tensor | None:
    if spec is None:
        return None
    if callable(spec):
        m = spec(batch)
        return None if m is None else torch.as_tensor(m)
    if isinstance(batch, Mapping) and spec in batch and isinstance(batch[spec], torch.Tensor):
        return batch[spec]
    return None


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (x86 ``avx512_bf16``/``amx_bf16``, Arm ``bf16``)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = set(fh.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


# ---------------------------------------------------------------------- fingerprints


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's state dict (names, dtypes, shapes, bytes of every tensor)."""
    items = [(n, t) for n, t in model.state_dict().items() if isinstance(t, torch.Tensor)]
    return hash_tensors(items)


def _hash_obj(h: "hashlib._Hash", obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        h.update(b"T")
        h.update(hash_tensors([("", obj)]).encode())
    elif isinstance(obj, Mapping):
        h.update(b"D")
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _hash_obj(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(b"L%d" % len(obj))
        for x in obj:
            _hash_obj(h, x)
    elif isinstance(obj, (str, bytes)):
        h.update(obj.encode() if isinstance(obj, str) else obj)
    elif isinstance(obj, (int, float, bool)) or obj is None:
        h.update(repr(obj).encode())
    elif hasattr(obj, "__array__"):
        import numpy as np

        a = np.ascontiguousarray(np.asarray(obj))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    elif hasattr(obj, "tobytes"):  # PIL images
        h.update(obj.tobytes())
    else:
        h.update(type(obj).__qualname__.encode())


def dataset_fingerprint(dataset: Dataset, n_samples: int = 8) -> dict[str, Any]:
    """Length of ``dataset`` and a SHA-256 of up to ``n_samples`` evenly spread samples, or of
    the whole data when the dataset offers ``fingerprint() -> str`` (e.g. :class:`~semlens_fast.data.ImageDataset`)."""
    n = len(dataset)  # type: ignore[arg-type]
    if callable(getattr(dataset, "fingerprint", None)):
        return {"length": n, "sha256": str(dataset.fingerprint())}
    idx = sorted({(i * (n - 1)) // max(1, n_samples - 1) for i in range(n_samples)}) if n else []
    h = hashlib.sha256()
    for i in idx:
        h.update(str(i).encode())
        _hash_obj(h, dataset[i])
    return {"length": n, "sample_indices": idx, "sample_hash": h.hexdigest()}


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            a, b = repr(old.get(key)), repr(new.get(key))
            out.append(f"{key}: store has {a[:120]}, this run has {b[:120]}")
    return out


# ---------------------------------------------------------------------- collect


@_holds_store_lock
def collect(
    model: nn.Module,
    data: Dataset | DataLoader,
    layers: str | Sequence[str],
    k: int,
    pool: PoolSpec | Mapping[str, PoolSpec] = "max",
    *,
    output: OutputSpec | Mapping[str, OutputSpec] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    collate_fn: Callable[[list], Any] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    attention_mask: str | Callable[[Any], torch.Tensor | None] | None = "attention_mask",
    device: torch.device | str | None = None,
    autocast: torch.dtype | None = None,
    store: str | Path | None = None,
    checkpoint_every: int = 100,
    overwrite: bool = False,
    model_fp: str | None = None,
    dataset_fp: str | None = None,
    distributed: bool | None = None,
    strict_finite: bool = False,
    sae: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> TopKStore:
    """Stream ``data`` through ``model`` and keep the top-``k`` samples of every channel of ``layers``.

    Args:
        model: any ``nn.Module``. Put into ``eval()`` during the run (modes restored after).
        data: a map-style ``Dataset`` (batched with ``batch_size``/``collate_fn``/``num_workers``)
            or a ``DataLoader`` (its sampler, batch size, collate_fn and workers are used).
            Ids are dataset indices (see the module docstring).
        layers: module name(s) as in ``model.named_modules()``.
        k: entries kept per channel (>= 1). Larger than the dataset: slots stay empty (id -1).
        pool: ``"max"|"mean"|"absmax"|"sum"``, ``"cls"``/int token position, a callable, or a
            ``{layer: spec}`` mapping (layers not in it use ``"max"``).
        output: ``fn(module_output) -> Tensor`` (or ``{layer: fn}``) choosing the activation
            of layers that return tuples/dicts; default: the first tensor, depth-first.
        forward: ``fn(model, batch)`` running the model on a (device-moved) batch. Default:
            ``model(**batch)`` for mappings, ``model(batch[0])`` for tuples/lists (the
            ``(inputs, labels)`` convention), else ``model(batch)``.
        attention_mask: key of the mask in mapping batches, a callable ``fn(batch) -> [B, T]``
            or None. Applied to ``[B, T, C]`` outputs (padded tokens never win).
        device: where inputs go; default: the device of the model's first parameter.
        autocast: e.g. ``torch.bfloat16``: run the forward under ``torch.autocast``
            (reduced precision; values are still stored as float32).
        store: folder of a durable store: resumed if it holds an interrupted run with the
            same fingerprints, returned as is if complete, refused (:class:`StoreError`)
            if its fingerprints differ unless ``overwrite=True``.
        checkpoint_every: write a checkpoint every this many batches (with ``store``).
        model_fp, dataset_fp: fingerprints to use instead of hashing the state dict /
            sampling the dataset (e.g. for datasets with random transforms).
        distributed: shard over ``torch.distributed`` ranks and merge (default: when a
            process group is initialised with world size > 1). See
            :mod:`semlens_fast.distributed`.
        strict_finite: also count ``-inf`` pooled values that cannot reach the top-k
            (one extra read of each activation).
        sae: ``{layer or glob: SparseAutoencoder}``: the components of these layers are the SAE's
            latents (fused :func:`~semlens_fast.ops.sae_topk_update`; pools ``max``/``mean``/``sum``;
            the layer's output must be ``[B, T, d]`` or ``[B, d]`` with ``d`` the SAE's width).
            Layers named here but not in ``layers`` are added.
        progress: show a tqdm progress bar.

    Returns:
        A :class:`TopKStore` (``store[layer]`` is a ``TopKState``; ``store.meta`` holds the
        pools, per-sample activation shapes, fingerprints and progress).
    """
    from tqdm.auto import tqdm

    if not isinstance(model, nn.Module):
        raise ArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ArgumentError(f"k must be an int >= 1, got {k!r}")
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ArgumentError(f"checkpoint_every must be an int >= 1, got {checkpoint_every!r}")
    if autocast is not None and autocast not in (torch.bfloat16, torch.float16):
        raise ArgumentError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast!r}")
    if sae is not None and not isinstance(sae, Mapping):
        raise ArgumentError(f"sae must be a mapping {{layer: SparseAutoencoder}}, got {type(sae).__name__}")
    if sae:
        extra = [n for n in sae if n not in ([layers] if isinstance(layers, str) else list(layers))]
        layers = ([layers] if isinstance(layers, str) else list(layers)) + extra
    modules = resolve_layers(model, layers)
    names = list(modules)
    saes = _per_layer(sae or {}, names, "sae", None)
    for n, s_ in saes.items():
        if s_ is None:
            continue
        if not all(hasattr(s_, a) for a in ("topk_update", "d", "L", "fingerprint")):
            raise ArgumentError(f"sae for layer {n!r} must be a semlens_fast.sae.SparseAutoencoder, got {type(s_).__name__}")
    pools_raw = _per_layer(pool, names, "pool", "max")
    pools: dict[str, PoolSpec] = {}
    pool_desc: dict[str, str] = {}
    for n in names:
        pools[n], pool_desc[n] = _normalise_pool(pools_raw[n], n)
    for n, s_ in saes.items():
        if s_ is not None and pools[n] not in ("max", "mean", "sum"):
            raise ArgumentError(f"pool for SAE layer {n!r} must be 'max', 'mean' or 'sum', got {pool_desc[n]!r}")
    outputs = _per_layer(output, names, "output", None)
    for n, fn in outputs.items():
        if fn is not None and not callable(fn):
            raise ArgumentError(f"output for layer {n!r} must be a callable fn(module_output) -> Tensor, got {fn!r}")

    # ---- distributed?
    import torch.distributed as dist

    dist_on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed is None:
        distributed = dist_on
    elif distributed and not (dist.is_available() and dist.is_initialized()):
        raise ArgumentError("distributed=True but torch.distributed is not initialised (call dist.init_process_group first)")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

    dataset, batch_sampler, loader_kwargs = _loader_parts(data, batch_size, collate_fn, num_workers)
    n_total = len(dataset)  # type: ignore[arg-type]
    if n_total == 0:
        raise ArgumentError("data has no samples (len(dataset) == 0); there is nothing to collect")
    if k > n_total:
        warnings.warn(
            f"k={k} is larger than the dataset ({n_total} samples); the last slots of every channel stay "
            "empty (id -1, value -inf)",
            UserWarning,
            stacklevel=2,
        )

    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
        if device.type == "meta":
            raise DeviceError("model: its parameters are on the meta device (no data); load real weights or pass device=")
    device = check_device(device)
    if autocast == torch.bfloat16 and device.type == "cpu" and not cpu_has_bf16():
        warnings.warn(
            "autocast=torch.bfloat16 on a CPU without bf16 instructions (avx512_bf16 / amx_bf16): "
            "expect it to be slower than float32 here, not faster",
            UserWarning,
            stacklevel=2,
        )

    fingerprints = {
        "model": model_fp or model_fingerprint(model),
        "dataset": dataset_fp or dataset_fingerprint(dataset),
        "layers": names,
        "pools": pool_desc,
        "outputs": {n: (_describe_callable(f) if f is not None else "first_tensor") for n, f in outputs.items()},
        "k": k,
        "autocast": str(autocast) if autocast is not None else None,
        **({"sae": {n: s_.describe() for n, s_ in saes.items() if s_ is not None}} if any(v is not None for v in saes.values()) else {}),
        "library_version": __version__,
    }
    if distributed:
        fingerprints["world_size"] = world
        fingerprints["rank"] = rank

    # ---- the store: fresh, resumed or complete
    final_path = Path(store) if store is not None else None
    path = final_path
    if distributed:
        # Rank 0 decides about the merged store and tells the others (no shared FS needed).
        if final_path is not None:
            path = final_path / "_shards" / f"rank-{rank}-of-{world}"
        decision: list[Any] = [None]
        if rank == 0 and final_path is not None:
            try:
                if overwrite:
                    remove_store(final_path)
                elif (final_path / "manifest.json").exists():
                    fp_global = {n: v for n, v in fingerprints.items() if n not in ("world_size", "rank")}
                    found = _load_matching(final_path, fp_global)
                    if found.complete:
                        decision = [("done", {n: s.to("cpu") for n, s in found.layers.items()}, found.meta)]
            except StoreError as exc:
                decision = [("error", str(exc))]
        dist.broadcast_object_list(decision, src=0)
        if decision[0] is not None:
            if decision[0][0] == "error":
                raise StoreError(decision[0][1])
            return TopKStore(decision[0][1], decision[0][2], final_path)
    if path is not None and not ((path / "manifest.json").is_file() and not os.access(path, os.W_OK)):
        # one writer per store folder: a second collect is refused, not mixed in (a read-only
        # store can still be loaded when it is complete and matches)
        ensure_dir(path, "store")
        _LOCKS.stack.enter_context(locked(path, f"top-k store {path}"))
    batches: list[torch.Tensor] | None = None
    states: dict[str, TopKState] = {}
    done = 0
    prev_meta: dict[str, Any] = {}
    if path is not None and (path / "manifest.json").exists():
        manifest = read_manifest(path)
        old_fp = manifest.get("meta", {}).get("fingerprints", {})
        diff = _diff(old_fp, fingerprints)
        if diff and not overwrite:
            raise StoreError(
                f"store {path} was written by a different run; refusing to mix them ("
                + "; ".join(diff)
                + "). Use another store folder or collect(..., overwrite=True) to replace it"
            )
        if diff:
            remove_store(path)
        else:
            prev_meta = manifest.get("meta", {})
            states = _read_states(path, manifest, "cpu")
            if prev_meta.get("complete"):
                log.info("collect: store %s is complete and matches; loading it", path)
                res = TopKStore(states, prev_meta, path)
                if distributed:
                    return _merge_distributed(res, names, k, final_path, rank, world, prev_meta)
                return res
            batches = read_order(path, prev_meta.get("order_sha256"))
            done = int(prev_meta.get("progress", {}).get("batches_done", 0))
            log.info("collect: resuming %s at batch %d of %d", path, done, len(batches))
    elif path is not None and overwrite:
        remove_store(path)

    if batches is None:
        if distributed:
            batches = _shard_batches(dataset, data, batch_size, rank, world)
        else:
            batches = [torch.as_tensor(list(b), dtype=torch.int64) for b in batch_sampler]
        flat = torch.cat(batches) if batches else torch.zeros(0, dtype=torch.int64)
        if len(flat) and (int(flat.min()) < 0 or int(flat.max()) >= n_total):
            raise ArgumentError(
                f"the sampler yielded indices outside [0, {n_total}) (min {int(flat.min())}, max {int(flat.max())})"
            )
        if len(flat) != len(torch.unique(flat)):
            raise ArgumentError("the sampler yields some dataset index twice; top-k ids must be unique (use a sampler without replacement)")
    n_batches = len(batches)
    n_samples = int(sum(len(b) for b in batches))

    collectors = {n: _Layer(n, modules[n], pools[n], outputs[n], k, strict_finite) for n in names}
    for n, s_ in saes.items():
        collectors[n].sae = s_
    for n, st in states.items():
        collectors[n].state = st.to(device) if st.device != device else st
        collectors[n].shape = prev_meta.get("shapes", {}).get(n)
        collectors[n].layout = prev_meta.get("layouts", {}).get(n)

    def meta(complete: bool) -> dict[str, Any]:
        return {
            "k": k,
            "layers": names,
            "pools": pool_desc,
            "shapes": {n: c.shape for n, c in collectors.items() if c.shape is not None},
            "layouts": {n: c.layout for n, c in collectors.items() if c.layout is not None},
            "fingerprints": fingerprints,
            "complete": complete,
            "progress": {
                "batches_done": done,
                "n_batches": n_batches,
                "samples_done": int(sum(len(b) for b in batches[:done])),  # type: ignore[index]
                "n_samples": n_samples,
            },
            "order_sha256": order_sha,
            "library_version": __version__,
        }

    order_sha = prev_meta.get("order_sha256")
    if path is not None and not prev_meta:
        path.mkdir(parents=True, exist_ok=True)
        order_sha = write_order(path, batches)
        _write_store(path, {}, meta(False))

    def checkpoint(complete: bool) -> None:
        if path is None:
            return
        st = {n: c.state for n, c in collectors.items() if c.state is not None}
        _write_store(path, st, meta(complete))

    # ---- hooks
    ctx: dict[str, Any] = {"ids": None, "mask": None, "fired": set(), "active": False}
    n_layers = len(names)

    def make_hook(name: str):
        col = collectors[name]
        reads_input = split_input(name)[1]

        def hook(module: nn.Module, inputs: Any, out: Any) -> None:
            if not ctx["active"] or name in ctx["fired"]:
                return
            ctx["fired"].add(name)
            col.update(inputs if reads_input else out, ctx["ids"], ctx["mask"])
            if len(ctx["fired"]) == n_layers:
                raise _StopForward

        return hook

    run_forward = forward or default_forward
    training = {m: m.training for m in model.modules()}
    handles = [modules[n].register_forward_hook(make_hook(n)) for n in names]
    loader = DataLoader(dataset, batch_sampler=_ListBatchSampler(batches[done:]), **loader_kwargs)
    start = done
    amp = (lambda: torch.autocast(device_type=device.type, dtype=autocast)) if autocast is not None else contextlib.nullcontext
    bar = tqdm(total=n_batches, initial=done, desc="collect", unit="batch", disable=not progress, leave=False)
    model.eval()
    try:
        with torch.inference_mode():
            for bi, batch in enumerate(loader, start=done):
                ids = batches[bi]
                batch = to_device(batch, device, non_blocking=True)
                ctx["ids"] = ids.to(device) if device.type != "cpu" else ids
                ctx["mask"] = _get_mask(batch, attention_mask)
                ctx["fired"] = set()
                ctx["active"] = True
                try:
                    with amp():
                        run_forward(model, batch)
                except _StopForward:
                    pass
                except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                    if bi != start or isinstance(exc, SemlensError):
                        _note_checkpoint(exc, path, bi, done, n_batches)
                        raise
                    # the first batch of this call: the data most likely does not fit the model
                    ctx["active"] = False
                    where = _failing_module(model, run_forward, batch)
                    loc = f" in module {where[0]!r} given {where[1]}" if where else ""
                    raise ModelInputError(
                        f"collect: the model fails on batch {bi} (samples {ids[:4].tolist()}{'...' if len(ids) > 4 else ''}){loc}: "
                        f"{str(exc).splitlines()[0][:300]}. The data set yields {_describe(batch)}; check that it gives "
                        "what the model expects (ds[i] is an input or (input, label); channels, dtype and size)"
                    ) from exc
                except BaseException as exc:
                    if path is not None and hasattr(exc, "add_note"):
                        exc.add_note(
                            f"collect: batch {bi} failed; store {path} keeps its last checkpoint "
                            f"({done} of {n_batches} batches) and resumes from it"
                        )
                    raise
                finally:
                    ctx["active"] = False
                missing = [n for n in names if n not in ctx["fired"]]
                if missing:
                    raise LayerNotCalledError(
                        f"layers {missing} were not called during the forward pass of batch {bi} "
                        f"(the forward returned without running them); check the names or the forward= callable"
                    )
                done = bi + 1
                bar.update(1)
                if done % checkpoint_every == 0 and done < n_batches:
                    checkpoint(False)
    finally:
        bar.close()
        for h in handles:
            h.remove()
        for m, t in training.items():
            m.training = t

    states = {n: c.state for n, c in collectors.items() if c.state is not None}
    result_meta = meta(True)
    if distributed:
        checkpoint(True)
        res = TopKStore({n: s.cpu() if s.device.type != "cpu" else s for n, s in states.items()}, result_meta, path)
        return _merge_distributed(res, names, k, final_path, rank, world, result_meta)
    checkpoint(True)
    return TopKStore(states, result_meta, path)


def _note_checkpoint(exc: BaseException, path: Path | None, bi: int, done: int, n_batches: int) -> None:
    if path is not None and hasattr(exc, "add_note"):
        exc.add_note(f"collect: batch {bi} failed; store {path} keeps its last checkpoint "
                     f"({done} of {n_batches} batches) and resumes from it")


def _load_matching(path: Path, fingerprints: Mapping[str, Any]) -> TopKStore:
    manifest = read_manifest(path)
    old = dict(manifest.get("meta", {}).get("fingerprints", {}))
    diff = _diff(old, dict(fingerprints))
    if diff:
        raise StoreError(
            f"store {path} was written by a different run; refusing to mix them ("
            + "; ".join(diff)
            + "). Use another store folder or collect(..., overwrite=True) to replace it"
        )
    return TopKStore(_read_states(path, manifest, "cpu"), manifest.get("meta", {}), path)


def _merge_distributed(
    local: TopKStore, names: list[str], k: int, final_path: Path | None, rank: int, world: int, meta: Mapping[str, Any]
) -> TopKStore:
    import torch.distributed as dist

    from .distributed import gather_merge

    info = {"shapes": meta.get("shapes", {}), "layouts": meta.get("layouts", {}), "progress": meta.get("progress", {})}
    merged, infos = gather_merge(local.layers, names, k, info)
    m = dict(meta)
    m["fingerprints"] = {n: v for n, v in m.get("fingerprints", {}).items() if n not in ("world_size", "rank")}
    shapes: dict[str, Any] = {}
    layouts: dict[str, Any] = {}
    for inf in infos:
        for n, v in inf["shapes"].items():
            shapes.setdefault(n, v)
        for n, v in inf["layouts"].items():
            layouts.setdefault(n, v)
    m["shapes"], m["layouts"] = shapes, layouts
    m["progress"] = {
        key: int(sum(inf["progress"].get(key, 0) for inf in infos))
        for key in ("batches_done", "n_batches", "samples_done", "n_samples")
    }
    m["distributed"] = {"world_size": world}
    m.pop("order_sha256", None)
    out = TopKStore(merged, m, final_path)
    if final_path is not None and rank == 0:
        _write_store(final_path, merged, m)
    dist.barrier()
    return out
