"""The evaluation harness: metrics on models whose right answer is known, chunking, masks,
and every explainer (ours and Captum's) on small real tasks."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from semlens_fast.errors import ArgumentError, ShapeError
from semlens_fast.evaluate import (Task, curve_auc, evaluate, faithfulness_correlation, feature_scores,
                                   make_explainers, markdown_table, max_sensitivity, perturbation_curve)


class Linear2(nn.Module):
    """Two classes, logit difference w . x: the exact attribution of class 1 is w * x / 2 per
    logit (and IG with baseline 0 recovers it)."""

    def __init__(self, d: int = 12, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(d, generator=g))

    def forward(self, x):
        z = x @ self.w / 2
        return torch.stack([-z, z], 1)


@pytest.fixture
def linear():
    torch.manual_seed(0)
    m = Linear2().eval()
    x = torch.randn(16, 12)
    t = torch.ones(16, dtype=torch.long)
    return m, x, t, (m.w.detach() * x)


def test_curves_rank_the_exact_attribution_above_random_and_its_opposite(linear):
    m, x, t, a = linear
    fm = torch.arange(12)
    morf = {k: curve_auc(perturbation_curve(m, x, v, t, fm, steps=12)).mean() for k, v in
            (("exact", a), ("random", torch.rand_like(a)), ("opposite", -a))}
    lerf = {k: curve_auc(perturbation_curve(m, x, v, t, fm, order="lerf", steps=12)).mean() for k, v in
            (("exact", a), ("random", torch.rand_like(a)), ("opposite", -a))}
    assert morf["exact"] < morf["random"] < morf["opposite"]
    assert lerf["exact"] > lerf["random"] > lerf["opposite"]
    assert torch.isclose(morf["exact"], lerf["opposite"])  # MoRF of a == LeRF of -a


def test_curve_endpoints_insertion_identity_chunking(linear):
    m, x, t, a = linear
    fm = torch.arange(12)
    p0 = torch.softmax(m(x).double(), 1)[:, 1]
    pb = torch.softmax(m(torch.zeros_like(x)).double(), 1)[:, 1]
    c = perturbation_curve(m, x, a, t, fm, steps=6)
    assert c.shape == (16, 7)
    assert torch.allclose(c[:, 0], p0) and torch.allclose(c[:, -1], pb)
    ins = perturbation_curve(m, x, a, t, fm, mode="insertion", steps=6)
    lerf = perturbation_curve(m, x, a, t, fm, order="lerf", steps=6)
    assert torch.allclose(ins, lerf.flip(1))  # insertion = LeRF deletion read backwards
    assert torch.allclose(perturbation_curve(m, x, a, t, fm, steps=6, chunk=1), c)
    with pytest.raises(ArgumentError, match="mode"):
        perturbation_curve(m, x, a, t, fm, mode="sideways")
    with pytest.raises(ShapeError, match="feature_mask"):
        perturbation_curve(m, x, a, t, torch.arange(5))


def test_feature_groups_valid_mask_and_broadcast_maps():
    torch.manual_seed(1)

    class Img(nn.Module):
        def forward(self, x):
            s = x.flatten(1).sum(1)
            return torch.stack([-s, s], 1)

    x = torch.rand(3, 2, 4, 4)
    fm = (torch.arange(4)[:, None] // 2 * 2 + torch.arange(4)[None] // 2).expand(2, 4, 4)  # 2x2 patches, both channels
    attr = torch.rand(3, 1, 4, 4)  # one map for both channels
    sc = feature_scores(attr.expand_as(x), fm)
    assert sc.shape == (3, 4)
    assert torch.allclose(sc.sum(1), attr.sum((1, 2, 3)).double() * 2)
    valid = torch.tensor([[True, False, True, True]] * 3)
    c = perturbation_curve(Img(), x, attr.expand_as(x), torch.ones(3, dtype=torch.long), fm, steps=3, valid=valid)
    keep = (fm == 1).unsqueeze(0)
    last = torch.softmax(Img()(x * keep).double(), 1)[:, 1]  # only the invalid patch is left
    assert torch.allclose(c[:, -1], last)


def test_faithfulness_correlation_sign_and_strength(linear):
    m, x, t, a = linear
    fm = torch.arange(12)
    f = faithfulness_correlation(m, x, a, t, fm, subsets=40, fraction=0.25)
    fr = faithfulness_correlation(m, x, -a, t, fm, subsets=40, fraction=0.25)
    assert torch.allclose(f, -fr, atol=1e-9)
    assert f.mean() > 0.8
    assert faithfulness_correlation(m, x, torch.ones_like(a), t, fm, subsets=40, fraction=1.0).abs().max() == 0


def test_max_sensitivity(linear):
    m, x, t, a = linear
    const = max_sensitivity(lambda xx, tt: m.w.detach().expand_as(xx), x, t, radius=0.1, samples=4)
    assert const[0].abs().max() == 0 and const[1].abs().max() == 0
    ident_max, ident_mean = max_sensitivity(lambda xx, tt: xx, x, t, radius=0.1, samples=6, chunk=5)
    bound = 0.1 * math.sqrt(12) / x.norm(dim=1)
    assert (ident_max <= bound + 1e-6).all() and (ident_mean <= ident_max + 1e-12).all() and ident_max.min() > 0


def _tabular_task() -> Task:
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(8, 6)
    return Task(name="toy", kind="tabular", model=m, x=x, labels=m(x).argmax(1), target=m(x).argmax(1),
                feature_mask=torch.arange(6), baseline=0.0, seed=0, accuracy=1.0, radius=0.1)


def test_every_dense_explainer_and_the_table():
    task = _tabular_task()
    exps = make_explainers(task, samples=24)
    assert set(exps) == {"DLBacktrace", "DLBacktrace contrast", "LRP-eps", "Integrated Gradients", "SmoothGrad",
                         "KernelSHAP", "LIME", "Random"}
    res = evaluate(task, exps, steps=6, subsets=8, sensitivity_n=4, sensitivity_samples=2)
    for name, r in res.items():
        assert 0 <= r["morf_auc"] <= 1 and 0 <= r["lerf_auc"] <= 1, name
        assert math.isclose(r["abpc"], r["lerf_auc"] - r["morf_auc"], abs_tol=1e-9)
        assert -1 <= r["faithfulness"] <= 1 and r["max_sensitivity"] >= 0 and r["ms_per_explanation"] > 0
    # the exact-ish methods beat random on the toy MLP
    assert res["Integrated Gradients"]["abpc"] > res["Random"]["abpc"]
    assert res["LRP-eps"]["abpc"] > res["Random"]["abpc"]
    table = markdown_table({"tasks": {"toy": {"title": "toy", "kind": "tabular", "seeds": {
        "0": {"accuracy": 1.0, "n": 8, "features": 6, "methods": res},
        "1": {"accuracy": 1.0, "n": 8, "features": 6, "methods": res}}}}})
    assert "| DLBacktrace |" in table and "Faithfulness" in table and "(worst seed)" in table
    with pytest.raises(ArgumentError, match="methods"):
        make_explainers(task, methods=["nope"])


def test_fashion_task_with_gradcam():
    from semlens_fast.evaluate import fashion_task

    task = fashion_task(seed=0, n=4)
    exps = make_explainers(task, methods=["DLBacktrace", "GradCAM", "KernelSHAP"], samples=16)
    res = evaluate(task, exps, steps=4, subsets=4, sensitivity_n=2, sensitivity_samples=1)
    assert set(res) == {"DLBacktrace", "GradCAM", "KernelSHAP"}
    attr = exps["GradCAM"](task.x, task.target)
    assert attr.shape == task.x.shape


def test_text_task_explainers():
    pytest.importorskip("transformers")
    from semlens_fast.evaluate import text_task

    try:
        task = text_task(seed=0, n=3, max_len=24, max_per_class=60, steps=50)
    except ArgumentError as e:  # no fortunes or no MiniLM on this machine
        pytest.skip(str(e))
    exps = make_explainers(task, methods=["DLBacktrace", "LRP-eps", "Integrated Gradients", "SmoothGrad", "LIME",
                                          "Attention rollout"], samples=12)
    for name, e in exps.items():
        a = e(task.x, task.target)
        assert a.shape == task.x.shape and torch.isfinite(a).all(), name
    res = evaluate(task, exps, steps=4, subsets=4)
    assert all(r["max_sensitivity"] is None for r in res.values())  # token ids: no noise ball
