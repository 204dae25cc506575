"""Explanation methods behind one interface: ``explainer(x, target) -> attribution``.

* ours: DLBacktrace default and contrast mode, LRP-epsilon (with AttnLRP's softmax and
  LayerNorm rules on transformers), EpsilonPlusFlat (CNN, MLP) —
  :class:`semlens_fast.relevance.RelevanceEngine`, one batched pass;
* baselines from Captum (a dependency, used as it is): Integrated Gradients, SmoothGrad,
  GradCAM (images), KernelSHAP, LIME; attention rollout (transformers, Abnar & Zuidema 2020)
  and a random attribution.

For text, attributions are one value per token: ours directly (relevance of the token ids),
Captum's gradient methods on the word embeddings (summed over the embedding dimension),
KernelSHAP/LIME on the tokens (removed tokens become [MASK]; special tokens and padding never
move).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..errors import ArgumentError
from .tasks import Task

__all__ = ["Explainer", "make_explainers", "OURS", "BASELINES"]

OURS = ("DLBacktrace", "DLBacktrace contrast", "LRP-eps", "LRP eps-z+-flat")
BASELINES = ("Integrated Gradients", "SmoothGrad", "GradCAM", "KernelSHAP", "LIME", "Attention rollout", "Random")


@dataclass
class Explainer:
    """``fn(x, target) -> attribution``; ``family`` is ``"ours"`` or ``"baseline"``; ``batched``
    tells whether one call explains a whole batch at once (else it loops over samples)."""

    name: str
    family: str
    fn: Callable[[Tensor, Tensor], Tensor]
    batched: bool = True

    def __call__(self, x: Tensor, target: Tensor) -> Tensor:
        return self.fn(x, target)


def _ours(task: Task) -> dict[str, Explainer]:
    from ..relevance import RelevanceEngine, dlbacktrace, dlbacktrace_contrast, epsilon_plus_flat, lrp_epsilon

    comps = {"DLBacktrace": dlbacktrace(), "DLBacktrace contrast": dlbacktrace_contrast(), "LRP-eps": lrp_epsilon()}
    if task.kind == "image":  # the flat first-layer rule ignores the input: meant for images only
        comps["LRP eps-z+-flat"] = epsilon_plus_flat()
    out = {}
    for name, comp in comps.items():
        eng = RelevanceEngine(task.model, comp)

        def fn(x: Tensor, t: Tensor, _e: RelevanceEngine = eng) -> Tensor:
            return _e(x, t).input.detach()
        out[name] = Explainer(name, "ours", fn)
    return out


def _per_sample(f: Callable[[Tensor, int], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    def fn(x: Tensor, t: Tensor) -> Tensor:
        return torch.cat([f(x[i:i + 1], int(t[i])) for i in range(x.shape[0])])
    return fn


def _lime_kernel(width: float = 0.75) -> Callable:
    """LIME's kernel on the interpretable representation: ``exp(-d^2 / width^2)``, ``d`` the
    cosine distance between the all-ones vector (the instance) and the perturbed one."""
    def sim(original: Tensor, perturbed: Tensor, interp: Tensor, **_: object) -> Tensor:
        z = interp.float().reshape(-1)
        cos = z.sum() / (z.numel() ** 0.5 * z.norm().clamp(min=1e-12))
        return torch.exp(-((1 - cos) ** 2) / width ** 2)
    return sim


def _captum_dense(task: Task, samples: int) -> dict[str, Explainer]:
    """Captum baselines for continuous inputs (images, tables)."""
    from captum.attr import (IntegratedGradients, KernelShap, LayerAttribution, LayerGradCam, Lime, NoiseTunnel,
                             Saliency)

    model = task.model
    base = torch.as_tensor(task.baseline, dtype=task.x.dtype)
    spread = float(task.x.max() - task.x.min())
    out: dict[str, Explainer] = {}
    ig = IntegratedGradients(model)

    def f_ig(x: Tensor, t: Tensor) -> Tensor:
        return ig.attribute(x, baselines=base.expand_as(x) if base.dim() else float(base), target=t, n_steps=32,
                            internal_batch_size=512).detach()
    out["Integrated Gradients"] = Explainer("Integrated Gradients", "baseline", f_ig)
    sg = NoiseTunnel(Saliency(model))

    def f_sg(x: Tensor, t: Tensor) -> Tensor:
        return sg.attribute(x, nt_type="smoothgrad", nt_samples=16, nt_samples_batch_size=16, stdevs=0.15 * spread,
                            target=t).detach()
    out["SmoothGrad"] = Explainer("SmoothGrad", "baseline", f_sg)
    layer = task.extra.get("gradcam_layer")
    if layer is not None:
        gc = LayerGradCam(model, layer)

        def f_gc(x: Tensor, t: Tensor) -> Tensor:
            a = gc.attribute(x, target=t, relu_attributions=True)
            return LayerAttribution.interpolate(a, tuple(x.shape[-2:]), "bilinear").expand_as(x).detach()
        out["GradCAM"] = Explainer("GradCAM", "baseline", f_gc)
    fm = task.coarse_mask if task.coarse_mask is not None else task.feature_mask
    ks, lime = KernelShap(model), Lime(model, similarity_func=_lime_kernel())

    def f_ks(x: Tensor, t: int) -> Tensor:
        b = base.expand_as(x) if base.dim() else float(base)
        return ks.attribute(x, baselines=b, target=t, feature_mask=fm.unsqueeze(0).expand_as(x).contiguous(),
                            n_samples=samples, perturbations_per_eval=64).detach()

    def f_lime(x: Tensor, t: int) -> Tensor:
        b = base.expand_as(x) if base.dim() else float(base)
        return lime.attribute(x, baselines=b, target=t, feature_mask=fm.unsqueeze(0).expand_as(x).contiguous(),
                              n_samples=samples, perturbations_per_eval=64).detach()
    out["KernelSHAP"] = Explainer("KernelSHAP", "baseline", _per_sample(f_ks), batched=False)
    out["LIME"] = Explainer("LIME", "baseline", _per_sample(f_lime), batched=False)
    return out


def _captum_text(task: Task, samples: int) -> dict[str, Explainer]:
    """Captum baselines for token inputs: gradient methods on the word embeddings, SHAP/LIME on tokens."""
    from captum.attr import IntegratedGradients, KernelShap, Lime, NoiseTunnel, Saliency

    model = task.model
    embed, fwd_e = task.extra["embed"], task.extra["forward_embeds"]
    tok = task.extra["tokenizer"]
    special = torch.tensor(sorted(set(tok.all_special_ids)))

    def baseline_ids(ids: Tensor) -> Tensor:
        b = ids.clone()
        b[~torch.isin(ids, special)] = tok.mask_token_id
        return b

    ig = IntegratedGradients(fwd_e)

    def f_ig(ids: Tensor, t: Tensor) -> Tensor:
        e = embed(ids).detach()
        a = ig.attribute(e, baselines=embed(baseline_ids(ids)).detach(), target=t, additional_forward_args=(ids,),
                         n_steps=32, internal_batch_size=256)
        return a.sum(-1).detach()
    sg = NoiseTunnel(Saliency(fwd_e))

    def f_sg(ids: Tensor, t: Tensor) -> Tensor:
        e = embed(ids).detach()
        a = sg.attribute(e, nt_type="smoothgrad", nt_samples=16, nt_samples_batch_size=16,
                         stdevs=0.15 * float(e.std()), target=t, additional_forward_args=(ids,))
        return a.sum(-1).detach()
    ks, lime = KernelShap(model), Lime(model, similarity_func=_lime_kernel())

    def _ptb(method: object, ids: Tensor, t: int) -> Tensor:
        fm = torch.arange(ids.shape[1]).unsqueeze(0)
        return method.attribute(ids, baselines=baseline_ids(ids), target=t, feature_mask=fm, n_samples=samples,
                                perturbations_per_eval=64).detach().float()
    return {"Integrated Gradients": Explainer("Integrated Gradients", "baseline", f_ig),
            "SmoothGrad": Explainer("SmoothGrad", "baseline", f_sg),
            "KernelSHAP": Explainer("KernelSHAP", "baseline", _per_sample(lambda i, t: _ptb(ks, i, t)), batched=False),
            "LIME": Explainer("LIME", "baseline", _per_sample(lambda i, t: _ptb(lime, i, t)), batched=False)}


def _rollout(task: Task) -> Explainer:
    """Attention rollout (Abnar & Zuidema 2020) over the encoder's layers: per layer the
    head-averaged attention plus the identity, rows normalised, multiplied from the first
    layer to the last; a token's score is its column mean over the real (pooled) positions."""
    enc = copy.deepcopy(task.model.encoder)
    if hasattr(enc, "set_attn_implementation"):
        enc.set_attn_implementation("eager")
    pad = task.model.pad_id

    def fn(ids: Tensor, t: Tensor) -> Tensor:
        mask = (ids != pad).long()
        with torch.no_grad():
            att = enc(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        T = ids.shape[1]
        eye = torch.eye(T, dtype=att[0].dtype)
        roll = eye.expand(ids.shape[0], T, T)
        for a in att:
            a = 0.5 * a.mean(1) + 0.5 * eye
            a = a / a.sum(-1, keepdim=True)
            roll = a @ roll
        mf = mask.to(roll.dtype)
        return ((roll * mf[:, :, None]).sum(1) / mf.sum(1, keepdim=True)) * mf
    return Explainer("Attention rollout", "baseline", fn)


def _random(task: Task) -> Explainer:
    g = torch.Generator().manual_seed(12345 + task.seed)

    def fn(x: Tensor, t: Tensor) -> Tensor:
        return torch.rand(x.shape, generator=g)
    return Explainer("Random", "baseline", fn)


def make_explainers(task: Task, methods: list[str] | tuple[str, ...] | None = None, samples: int = 256
                    ) -> dict[str, Explainer]:
    """The methods that apply to ``task`` (all by default; GradCAM needs a conv layer, attention
    rollout a transformer), in the order ours then baselines. ``samples``: KernelSHAP/LIME
    perturbations per explanation."""
    out = _ours(task)
    out.update(_captum_text(task, samples) if task.kind == "text" else _captum_dense(task, samples))
    if task.kind == "text":
        out["Attention rollout"] = _rollout(task)
    out["Random"] = _random(task)
    if methods is not None:
        unknown = [m for m in methods if m not in OURS + BASELINES]
        if unknown:
            raise ArgumentError(f"methods: unknown {unknown}; expected names from {OURS + BASELINES}")
        out = {k: v for k, v in out.items() if k in methods}
    return out
