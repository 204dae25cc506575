"""The SemanticLens adapter: label forms, mean ablation against a hand-computed reference."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from semlens_fast.errors import ArgumentError, ShapeError
from semlens_fast.validate import concept_stage, layer_means, resolve_labels, validate, validate_concepts


class Table:
    """A stand-in for a future Lens.label() result: rows (layer, component, label)."""

    def __init__(self, rows):
        self.rows = rows

    def labels_for(self, layer):
        return [(c, lab) for (l, c, lab) in self.rows if l == layer]


class FakeFrame:
    """Duck-typed pandas DataFrame: to_dict(orient='records')."""

    def __init__(self, rows):
        self.rows = rows

    def to_dict(self, orient):
        assert orient == "records"
        return [dict(layer=l, component=c, label=lab) for (l, c, lab) in self.rows]


ROWS = [("fc", 0, "dog"), ("fc", 1, "cat"), ("fc", 2, "dog"), ("other", 0, "car"), ("fc", 3, "grass")]
WANT = {0: ["dog"], 1: ["cat"], 2: ["dog"], 3: ["grass"]}


@pytest.mark.parametrize(
    "labels",
    [
        [(0, "dog"), (1, "cat"), (2, "dog"), (3, "grass")],
        {0: "dog", 1: "cat", 2: "dog", 3: "grass"},
        {"fc": {0: "dog", 1: "cat", 2: "dog", 3: "grass"}, "other": {0: "car"}},
        ROWS,
        [dict(layer=l, component=c, label=lab) for (l, c, lab) in ROWS],
        Table(ROWS),
        FakeFrame(ROWS),
        [(torch.tensor(0), "dog"), (1, ["cat"]), (2, ("dog",)), (3, "grass")],
    ],
)
def test_label_forms(labels):
    assert resolve_labels(labels, "fc") == WANT


def test_label_forms_multi_and_bad():
    assert resolve_labels([(0, "dog"), (0, "fur"), (0, "dog")], "fc") == {0: ["dog", "fur"]}
    with pytest.raises(ArgumentError, match="component must be an int"):
        resolve_labels({"zero": "dog"}, "fc")
    with pytest.raises(ArgumentError, match=r"labels\[0\]: expected a \(component, label\) pair"):
        resolve_labels([(1, 2, 3, 4)], "fc")
    with pytest.raises(ArgumentError, match="label must be a string"):
        resolve_labels([(0, 5)], "fc")
    with pytest.raises(ArgumentError, match="labels must be"):
        resolve_labels(42, "fc")


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    x = torch.randn(300, 4)
    return model, x


def reference_flips(model, x, kept, fill):
    with torch.no_grad():
        h = model[1](model[0](x))
        mask = torch.zeros(h.shape[1], dtype=torch.bool)
        mask[kept] = True
        patched = torch.where(mask, h, fill)
        return torch.nonzero(model(x).argmax(1) != model[2](patched).argmax(1)).flatten().tolist()


def test_layer_means(mlp):
    model, x = mlp
    with torch.no_grad():
        ref = model[1](model[0](x)).double().mean(0).float()
    m = layer_means(model, "1", x, batch_size=64, progress=False)
    assert m.shape == (6,) and torch.allclose(m, ref, atol=1e-6)


@pytest.mark.parametrize("kept", [[0, 1, 2], [3], [], [0, 1, 2, 3, 4, 5]])
def test_mean_ablation_matches_reference(mlp, kept):
    model, x = mlp
    res = validate_concepts(model, "1", x, components=kept, batch_size=70, progress=False, max_counterexamples=1000)
    fill = layer_means(model, "1", x, progress=False)
    flips = reference_flips(model, x, kept, fill)
    r = res.replaceability
    assert r.axiom == "A3" and r.n == 300
    assert r.counterexamples == flips
    assert res.kept == sorted(kept) and res.ablated == [c for c in range(6) if c not in kept]
    if len(kept) == 6:
        assert flips == []
    if not kept:
        assert len(flips) > 0  # ablating everything changes some decisions


def test_concepts_select_labelled_components(mlp):
    model, x = mlp
    labels = [(0, "dog"), (1, "cat"), (2, "dog"), (3, "grass"), (4, "sky"), (5, "cat")]
    a = validate_concepts(model, "1", x, ["dog", "cat"], labels=labels, progress=False, max_counterexamples=1000)
    b = validate_concepts(model, "1", x, components=[0, 1, 2, 5], progress=False, max_counterexamples=1000)
    c = validate_concepts(model, "1", x, lambda lab: lab in ("dog", "cat"), labels=labels, progress=False, max_counterexamples=1000)
    assert a.kept == b.kept == c.kept == [0, 1, 2, 5]
    assert a.concepts == ["dog", "cat"] and c.concepts == ["cat", "dog"]
    assert a.replaceability.counterexamples == b.replaceability.counterexamples == c.replaceability.counterexamples
    # union with explicit components
    d = validate_concepts(model, "1", x, "grass", labels=labels, components=[4], progress=False)
    assert d.kept == [3, 4]
    assert "kept 2 components [3, 4]" in str(d)


def test_zero_and_tensor_ablation(mlp):
    model, x = mlp
    z = validate_concepts(model, "1", x, components=[0, 1], ablation="zero", progress=False, max_counterexamples=1000)
    assert z.replaceability.counterexamples == reference_flips(model, x, [0, 1], torch.zeros(6))
    fill = torch.full((6,), 0.3)
    t = validate_concepts(model, "1", x, components=[0, 1], ablation=fill, progress=False, max_counterexamples=1000)
    assert t.replaceability.counterexamples == reference_flips(model, x, [0, 1], fill)
    with pytest.raises(ShapeError, match=r"ablation tensor of shape \(5,\).*gamma returned shape \(\d+, 5\).*\(\d+, 6\)"):
        validate_concepts(model, "1", x, components=[0], ablation=torch.zeros(5), progress=False)


class Tokens(nn.Module):
    """[B, T, 4] -> lin [B, T, 5] (components on the last dim) -> mean over T -> [B, 3]."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.relu(self.lin(x)).mean(1))


def test_component_dim_last_for_token_layers():
    torch.manual_seed(1)
    model = Tokens().eval()
    x = torch.randn(120, 7, 4)
    res = validate_concepts(model, "lin", x, components=[1, 3], component_dim=-1, progress=False, max_counterexamples=1000)
    with torch.no_grad():
        h = model.lin(x)
        fill = h.double().mean(0).float()  # per (token, component)
        patched = h.clone()
        for c in (0, 2, 4):
            patched[..., c] = fill[:, c]
        ref = model(x).argmax(1) != model.out(torch.relu(patched).mean(1)).argmax(1)
    assert res.replaceability.counterexamples == torch.nonzero(ref).flatten().tolist()
    assert res.ablated == [0, 2, 4]


def test_concept_errors(mlp):
    model, x = mlp
    labels = [(0, "dog"), (1, "cat")]
    with pytest.raises(ArgumentError, match=r"concepts \['horse'\] label no component of layer '1'; labels present: \['cat', 'dog'\]"):
        validate_concepts(model, "1", x, ["dog", "horse"], labels=labels, progress=False)
    with pytest.raises(ArgumentError, match="give concepts="):
        validate_concepts(model, "1", x, progress=False)
    with pytest.raises(ArgumentError, match="concepts= needs labels="):
        validate_concepts(model, "1", x, "dog", progress=False)
    with pytest.raises(ArgumentError, match=r"components \[9\] are out of range for layer '1', which has 6"):
        validate_concepts(model, "1", x, components=[0, 9], progress=False)
    with pytest.raises(ArgumentError, match="layer: '7' is not a module"):
        validate_concepts(model, "7", x, components=[0], progress=False)
    with pytest.raises(ArgumentError, match="component_dim=2"):
        validate_concepts(model, "1", x, components=[0], component_dim=2, progress=False)
    with pytest.raises(ArgumentError, match="ablation must be"):
        validate_concepts(model, "1", x, components=[0], ablation="median", progress=False)


def test_concept_stage_is_a_plain_stage(mlp):
    # the adapter's stage can be combined with validate() directly (e.g. other output equivalences)
    model, x = mlp
    fill = layer_means(model, "1", x, progress=False)
    st = concept_stage("1", [0, 1, 2], fill)
    res = validate(model, [st], x, axioms=("A3",), output_equiv="exact", progress=False)
    assert res.results[0].failures > 0  # logits change whenever an ablated unit was not at its mean
    res = validate(model, [st], x, axioms=("A3",), progress=False, max_counterexamples=1000)
    assert res.results[0].counterexamples == reference_flips(model, x, [0, 1, 2], fill)


def test_empty_data_is_an_error(mlp):
    model, x = mlp
    for ablation in ("mean", "zero"):
        with pytest.raises(ArgumentError, match="data is empty"):
            validate_concepts(model, "1", x[:0], components=[0], ablation=ablation, progress=False)


def test_nan_samples_are_failures_and_stay_out_of_the_mean(mlp):
    model, x = mlp
    bad = x.clone()
    bad[[5, 17, 200], 2] = float("nan")
    with pytest.warns(UserWarning, match=r"3 of 300 samples have a NaN or infinite state at layer '1'"):
        fill = layer_means(model, "1", bad, progress=False)
    clean = torch.ones(300, dtype=torch.bool)
    clean[[5, 17, 200]] = False
    assert torch.allclose(fill, layer_means(model, "1", x[clean], progress=False), atol=1e-6)
    with pytest.warns(UserWarning):
        res = validate_concepts(model, "1", bad, components=[0, 1, 2], progress=False, max_counterexamples=1000)
    r = res.replaceability
    assert r.n == 300 and {5, 17, 200} <= set(r.counterexamples)  # NaN samples never count as successes
    want = sorted(set(reference_flips(model, x, [0, 1, 2], fill)) | {5, 17, 200})
    assert r.counterexamples == want  # the other samples: as with the clean mean
    with pytest.raises(ArgumentError, match="every one of the 4 samples"):
        layer_means(model, "1", torch.full((4, 4), float("nan")), progress=False)
