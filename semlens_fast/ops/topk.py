"""Streaming per-channel top-k: the public face of the top-k kernels.

A :class:`TopKState` holds, for each of ``C`` channels, the ``k`` best entries seen
so far, sorted best first. The order is total and the same in every backend:

* larger value first;
* among equal values, the lower sample id first;
* empty slots (id ``-1``, value ``-inf``, position ``-1``) after every real entry,
  so a real ``-inf`` activation still ranks above an empty slot;
* NaN never enters the state: it is counted per channel in ``nan_counts``.

Values are float32 whatever the input dtype (fp16/bf16 convert exactly). Because the
order is total and ids are unique, top-k of a union equals top-k of the union of the
parts' top-k, which is why :func:`merge_topk` of shard states equals one pass over
all the data.

Pooling (:func:`pool_topk_update`):

* ``max``: the largest element; its value is that element's, its position the first
  (lowest flattened) index where it occurs. NaN anywhere makes the pooled value NaN.
* ``absmax``: ``max |x|`` (stored as the absolute value), position as for max.
* ``sum``: float64 accumulation, rounded once to float32; ``mean`` = that sum / S.
  ``-0.0`` results are stored as ``+0.0``. Backends agree bit for bit whenever the
  float64 sum is exact (always so for fp16/bf16 inputs of moderate length and for
  float32 inputs whose magnitudes span less than ~2^(29 - log2 S)); otherwise they
  may differ in the last float32 ulp, since the summation order differs.

Positions are flattened spatial indices ``h * W + w`` for ``[B, C, H, W]`` maps and
token indices for ``[B, T, C]`` activations; they are recorded for ``max`` and
``absmax`` and are ``-1`` otherwise (and for :func:`topk_update`).

Sample ids are ``>= 0`` and unique over the whole stream: ids that are negative or occur
twice within one batch are refused (:class:`~semlens_fast.errors.ArgumentError`, the
state untouched); an id repeated across batches cannot be detected cheaply and is the
caller's contract. :func:`merge_topk` checks both states fully (see there).

Backends (see :mod:`semlens_fast.ops._backend`): torch reference, C++ CPU, Triton CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import ArgumentError, DeviceError, DTypeError, ShapeError
from . import _backend
from ._validate import check_merge_states, check_result_size, check_tensor_device, parse_device

Pool = Literal["max", "mean", "absmax", "sum"]
POOLS: tuple[str, ...] = ("max", "mean", "absmax", "sum")
ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_POSITION = 2**31 - 1


@dataclass(frozen=True)
class TopKState:
    """Running top-k of ``C`` channels.

    Attributes:
        values: ``[C, k]`` float32, best first; ``-inf`` in empty slots.
        ids: ``[C, k]`` int64 sample ids; ``-1`` in empty slots.
        positions: ``[C, k]`` int32 flattened position of the max (max/absmax pooling), else -1.
        nan_counts: ``[C]`` int64, how many NaN pooled values each channel met (excluded).
    """

    values: torch.Tensor
    ids: torch.Tensor
    positions: torch.Tensor
    nan_counts: torch.Tensor

    def __post_init__(self) -> None:
        _validate_state(self, "state")

    @classmethod
    def empty(cls, channels: int, k: int, device: torch.device | str | None = None) -> "TopKState":
        """A state with every slot empty."""
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 0:
            raise ArgumentError(f"channels must be an int >= 0, got {channels!r}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ArgumentError(f"k must be an int >= 1, got {k!r}")
        dev = parse_device(device, "device")
        check_result_size(channels, k, 16, "a state")
        return cls(
            values=torch.full((channels, k), float("-inf"), dtype=torch.float32, device=dev),
            ids=torch.full((channels, k), -1, dtype=torch.int64, device=dev),
            positions=torch.full((channels, k), -1, dtype=torch.int32, device=dev),
            nan_counts=torch.zeros(channels, dtype=torch.int64, device=dev),
        )

    @property
    def channels(self) -> int:
        return int(self.values.shape[0])

    @property
    def k(self) -> int:
        return int(self.values.shape[1])

    @property
    def device(self) -> torch.device:
        return self.values.device

    def valid_counts(self) -> torch.Tensor:
        """``[C]`` number of filled slots per channel."""
        return (self.ids >= 0).sum(dim=1)

    def clone(self) -> "TopKState":
        return TopKState(self.values.clone(), self.ids.clone(), self.positions.clone(), self.nan_counts.clone())

    def to(self, device: torch.device | str) -> "TopKState":
        device = parse_device(device, "device")
        return TopKState(
            self.values.to(device), self.ids.to(device), self.positions.to(device), self.nan_counts.to(device)
        )

    def equal(self, other: "TopKState") -> bool:
        """Exact equality of all fields (values compared bitwise)."""
        return (
            self.values.shape == other.values.shape
            and torch.equal(self.values.view(torch.int32).cpu(), other.values.view(torch.int32).cpu())
            and torch.equal(self.ids.cpu(), other.ids.cpu())
            and torch.equal(self.positions.cpu(), other.positions.cpu())
            and torch.equal(self.nan_counts.cpu(), other.nan_counts.cpu())
        )


# --------------------------------------------------------------------------- validation

def check_state(state: object, name: str = "state") -> TopKState:
    """``state`` is a TopKState (its fields were validated when it was built; it is frozen)."""
    if not isinstance(state, TopKState):
        raise ArgumentError(f"{name} must be a TopKState (see TopKState.empty), got {type(state).__name__}")
    return state


def _validate_state(state: TopKState, name: str) -> None:
    v, i, p, n = state.values, state.ids, state.positions, state.nan_counts
    for field, t, dt in (("values", v, torch.float32), ("ids", i, torch.int64), ("positions", p, torch.int32)):
        if not isinstance(t, torch.Tensor) or t.dtype != dt or t.dim() != 2:
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise DTypeError(f"{name}.{field} must be a 2-D {dt} tensor [C, k], got {got}")
        if t.shape != v.shape:
            raise ShapeError(f"{name}.{field} has shape {tuple(t.shape)}, expected {tuple(v.shape)} like {name}.values")
        if t.device != v.device:
            raise DeviceError(f"{name}.{field} is on {t.device} but {name}.values is on {v.device}")
        if not t.is_contiguous():
            raise ShapeError(f"{name}.{field} must be contiguous (it is updated in place)")
    if not isinstance(n, torch.Tensor) or n.dtype != torch.int64 or tuple(n.shape) != (v.shape[0],):
        got = f"{tuple(n.shape)} {n.dtype}" if isinstance(n, torch.Tensor) else type(n).__name__
        raise ShapeError(f"{name}.nan_counts must be int64 of shape ({v.shape[0]},), got {got}")
    if n.device != v.device or not n.is_contiguous():
        raise DeviceError(f"{name}.nan_counts must be contiguous and on {v.device}")
    if v.shape[1] < 1:
        raise ShapeError(f"{name} must have k >= 1 slots per channel, got shape {tuple(v.shape)}")
    check_tensor_device(v, f"{name}.values")


def _check_ids(sample_ids: object, batch: int, device: torch.device) -> torch.Tensor:
    if not isinstance(sample_ids, torch.Tensor):
        try:
            sample_ids = torch.as_tensor(sample_ids)
        except Exception as exc:
            raise DTypeError(f"sample_ids must be a 1-D integer tensor, got {type(sample_ids).__name__}") from exc
    if sample_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise DTypeError(f"sample_ids must be an integer tensor, got dtype {sample_ids.dtype}")
    if sample_ids.dim() != 1 or sample_ids.shape[0] != batch:
        raise ShapeError(f"sample_ids must have shape ({batch},) (one id per sample), got {tuple(sample_ids.shape)}")
    if sample_ids.device != device:
        raise DeviceError(f"sample_ids is on {sample_ids.device}, expected {device} like the activations")
    if sample_ids.dtype != torch.int64:
        sample_ids = sample_ids.to(torch.int64)
    if not sample_ids.is_contiguous():
        sample_ids = sample_ids.contiguous()
    return sample_ids


def negative_ids_error(sample_ids: torch.Tensor) -> ArgumentError:
    bad = torch.nonzero(sample_ids < 0).flatten()[:5].tolist()
    return ArgumentError(f"sample_ids must be >= 0 (-1 marks empty slots); negative at batch rows {bad}")


def duplicate_ids_error(sample_ids: torch.Tensor) -> ArgumentError:
    s, order = torch.sort(sample_ids.cpu())
    dup = torch.nonzero(s[1:] == s[:-1]).flatten()
    vals = torch.unique(s[1:][dup])
    first = int(vals[0]) if vals.numel() else None
    rows = torch.nonzero(sample_ids.cpu() == first).flatten()[:5].tolist() if first is not None else []
    return ArgumentError(
        f"sample_ids must be distinct (one id per sample, unique over the whole stream); "
        f"{vals.numel()} id(s) occur more than once in this batch, e.g. {first} at batch rows {rows}"
    )


def check_batch_ids(sample_ids: torch.Tensor) -> None:
    """Sample ids of one batch are >= 0 and distinct (torch backends; the C++ kernel checks itself)."""
    if sample_ids.numel() == 0:
        return
    if bool((sample_ids < 0).any()):
        raise negative_ids_error(sample_ids)
    if sample_ids.numel() > 1 and not bool((sample_ids[1:] > sample_ids[:-1]).all()):
        s = torch.sort(sample_ids).values
        if bool((s[1:] == s[:-1]).any()):
            raise duplicate_ids_error(sample_ids)


def _check_acts(x: object, name: str, state: TopKState) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise DTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in ACT_DTYPES:
        raise DTypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.device != state.device:
        raise DeviceError(f"{name} is on {x.device} but the state is on {state.device}")
    return x


def _as_bcs(fmap: torch.Tensor, state: TopKState) -> tuple[torch.Tensor, int]:
    """View ``fmap`` as ``[B, C, S]`` (no copy when its strides allow it); returns (view, S)."""
    if fmap.dim() == 4:
        B, C, H, W = fmap.shape
        if C != state.channels:
            raise ShapeError(f"fmap has {C} channels (shape {tuple(fmap.shape)} as [B, C, H, W]), the state has {state.channels}")
        if H * W == 0:
            raise ShapeError(f"fmap has an empty spatial extent {H}x{W}; pooling needs at least one position")
        # a view whenever H and W merge (contiguous, channels_last, H or W of 1), else a copy
        return fmap.flatten(2), H * W
    if fmap.dim() == 3:
        B, T, C = fmap.shape
        if C != state.channels:
            raise ShapeError(f"fmap has {C} channels (shape {tuple(fmap.shape)} as [B, T, C]), the state has {state.channels}")
        if T == 0:
            raise ShapeError(f"fmap has 0 tokens (shape {tuple(fmap.shape)}); pooling needs at least one")
        return fmap.transpose(1, 2), T
    if fmap.dim() == 2:
        if fmap.shape[1] != state.channels:
            raise ShapeError(f"fmap has {fmap.shape[1]} channels (shape {tuple(fmap.shape)} as [B, C]), the state has {state.channels}")
        return fmap.unsqueeze(2), 1
    raise ShapeError(
        f"fmap must be [B, C, H, W] (feature maps), [B, T, C] (tokens) or [B, C], got shape {tuple(fmap.shape)}"
    )


def _backend_module(device: torch.device):
    return _backend.module(_backend.choose(device))


# --------------------------------------------------------------------------- public ops

def topk_update(state: TopKState, acts: torch.Tensor, sample_ids: torch.Tensor) -> TopKState:
    """Merge per-sample activations ``acts [B, C]`` into ``state`` in place and return it.

    ``sample_ids [B]`` are the samples' ids (>= 0, unique across the whole stream;
    negative or repeated ids within the batch raise ArgumentError). Positions of new
    entries are -1. NaN activations are skipped and counted in ``state.nan_counts``.
    Cost: one read of ``acts``; no copy unless ``acts`` has a channel stride other than 1
    and a sample stride other than 1. At large k (C++ backend, k >= 256) candidates are
    merged per channel in one pass per batch instead of one insertion each.
    """
    check_state(state)
    acts = _check_acts(acts, "acts", state)
    if acts.dim() != 2 or acts.shape[1] != state.channels:
        raise ShapeError(f"acts must have shape [B, {state.channels}] (C from the state), got {tuple(acts.shape)}")
    ids = _check_ids(sample_ids, acts.shape[0], state.device)
    if acts.shape[0] == 0:
        return state
    _run(state, acts.unsqueeze(2), ids, "max", False)
    return state


def _run(state: TopKState, view: torch.Tensor, ids: torch.Tensor, pool: str, track: bool) -> None:
    torch.ops.semlens.pool_topk_update_(state.values, state.ids, state.positions, state.nan_counts, view, ids, pool, track)


def pool_topk_update(
    state: TopKState, fmap: torch.Tensor, sample_ids: torch.Tensor, pool: Pool = "max"
) -> TopKState:
    """Pool ``fmap`` per (sample, channel) and merge into ``state`` in place, in one pass.

    ``fmap`` is ``[B, C, H, W]`` (contiguous or channels_last, no copy either way),
    ``[B, T, C]`` token activations (pooled over T), or ``[B, C]``. The pooled batch is
    never materialised as a separate pass over the data. With ``max``/``absmax`` the
    flattened position of the maximum is kept per entry. See the module docstring for
    the exact pooling semantics.
    """
    check_state(state)
    if pool not in POOLS:
        raise ArgumentError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    fmap = _check_acts(fmap, "fmap", state)
    view, S = _as_bcs(fmap, state)
    if S > MAX_POSITION:
        raise ShapeError(f"fmap has {S} positions per channel; positions are int32 (at most {MAX_POSITION})")
    ids = _check_ids(sample_ids, fmap.shape[0], state.device)
    if fmap.shape[0] == 0:
        return state
    _run(state, view, ids, pool, pool in ("max", "absmax"))
    return state


def merge_topk(a: TopKState, b: TopKState) -> TopKState:
    """A new state equal to one pass over the data of both ``a`` and ``b``.

    The two states must come from disjoint sets of samples (shards of a dataset, or a
    run and its resumption on the remaining data); NaN counts add up. Neither input is
    modified. Both states are checked first (O(C k log k)): sorted best first, no NaN
    values, ids >= 0 or -1 for empty slots, no sample id twice in a channel, and no
    channel holding the same sample id in both states; any violation raises
    :class:`~semlens_fast.errors.ArgumentError`.
    """
    check_state(a, "a")
    check_state(b, "b")
    if a.values.shape != b.values.shape:
        raise ShapeError(f"a has shape [C, k] = {tuple(a.values.shape)} but b has {tuple(b.values.shape)}; states must agree in C and k")
    if a.device != b.device:
        raise DeviceError(f"a is on {a.device} but b is on {b.device}")
    out = a.clone()
    torch.ops.semlens.merge_topk_(out.values, out.ids, out.positions, out.nan_counts,
                                  b.values, b.ids, b.positions, b.nan_counts)
    return out


# --------------------------------------------------------------------------- registered torch ops
#
# Each public op above validates what its arguments' metadata tell (types, dtypes,
# shapes, devices: traceable, so torch.compile(fullgraph=True) goes through it), then
# calls one registered op, ``torch.ops.semlens.<name>``, declared with
# ``torch.library.custom_op``. The op's implementation runs eagerly (also inside compiled
# graphs, where it is opaque): it first makes the checks that read the data (negative
# or repeated sample ids, the merged states' contents: sortedness, NaN, ids, overlapping
# shards; NaN rows and exclusions of the similarity op) -- so nothing unchecked ever
# reaches a kernel -- then picks the backend. ``register_fake`` gives shapes to fake and meta tensors; ops that update
# a TopKState in place name its tensors in ``mutates_args`` and return nothing.
# A new op follows the same three steps (see docs/ARCHITECTURE.md, "Registered ops").

_STATE_ARGS = ("values", "ids", "positions", "nan_counts")


@torch.library.custom_op("semlens::pool_topk_update_", mutates_args=_STATE_ARGS)
def _pool_topk_update_op(values: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, nan_counts: torch.Tensor,
                         x: torch.Tensor, sample_ids: torch.Tensor, pool: str, track: bool) -> None:
    """Pool ``x [B, C, S]`` and merge into the state in place (validated by the public ops)."""
    state = TopKState(values, ids, positions, nan_counts)
    name = _backend.choose(state.device)
    if name != "cpu":  # the C++ kernel checks the ids itself (returns a code)
        check_batch_ids(sample_ids)
    rc = _backend.module(name).pool_topk_update(state, x, sample_ids, pool, track)
    if rc == 1:
        raise negative_ids_error(sample_ids)
    if rc == 2:
        raise duplicate_ids_error(sample_ids)


@_pool_topk_update_op.register_fake
def _(values, ids, positions, nan_counts, x, sample_ids, pool, track) -> None:
    return None


@torch.library.custom_op("semlens::merge_topk_", mutates_args=_STATE_ARGS)
def _merge_topk_op(values: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, nan_counts: torch.Tensor,
                   b_values: torch.Tensor, b_ids: torch.Tensor, b_positions: torch.Tensor,
                   b_nan_counts: torch.Tensor) -> None:
    """Merge state ``b`` into the state in place (validated by :func:`merge_topk`)."""
    out = TopKState(values, ids, positions, nan_counts)
    b = TopKState(b_values, b_ids, b_positions, b_nan_counts)
    check_merge_states(out, b, "a", "b")  # out is a copy of a
    _backend_module(out.device).merge_topk(out, b)


@_merge_topk_op.register_fake
def _(values, ids, positions, nan_counts, b_values, b_ids, b_positions, b_nan_counts) -> None:
    return None
