"""collect() on large architectures vs their plain forward pass, side by side (random weights).

* ``transformer``: a 12-layer BERT-base configuration (hidden 768, MLP 3072; random weights, no
  download), ``NT`` sequences of 128 tokens in batches of 16: ``collect(model, data,
  "encoder.layer.*.intermediate", k=20)`` (all 12 MLP layers, 36,864 neurons, max over tokens with
  the attention mask) vs ``model(**batch)`` over the same batches. The collect forward stops after
  layer 11's MLP activation (its output projection, LayerNorm and the pooler are skipped); the
  ``through the end`` row also tracks ``pooler`` so nothing is skipped.
* ``resnet50`` / ``vit_b_16`` (torchvision, random weights, ``NI`` images 224 x 224 in batches of
  16): every block (``layer*.*`` = 16 bottlenecks; ``encoder.layers.*`` = 12 encoder blocks) vs the
  plain forward.

Peak memory: each row also runs once in a fresh subprocess that reports the growth of its
resident set over the model and the inputs (``extra_info["peak_rss_mb"]``).

    python benchmarks/run.py bench_models.py
    SEMLENS_BENCH_SCALE=0.25 pytest benchmarks/bench_models.py --benchmark-only -o python_files=bench_*.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch.utils.data import Dataset

from conftest import scaled

NT = scaled(128, 16)
NI = scaled(64, 16)
BS = 16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Tokens(Dataset):
    def __init__(self, n, T=128, vocab=30522, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1000, vocab, (n, T), generator=g)
        self.mask = torch.ones(n, T, dtype=torch.int64)
        lens = torch.randint(T // 2, T + 1, (n,), generator=g)
        for i, L in enumerate(lens.tolist()):
            self.mask[i, L:] = 0

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}


class Images(Dataset):
    def __init__(self, n, seed=0):
        self.x = torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], 0


def build(family):
    torch.manual_seed(0)
    if family == "transformer":
        import transformers as tf

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tf.logging.set_verbosity_error()
            m = tf.BertModel(tf.BertConfig())  # BERT-base: 12 layers, 768 / 3072
        return m.eval(), Tokens(NT), "encoder.layer.*.intermediate"
    import torchvision

    if family == "resnet50":
        return torchvision.models.resnet50().eval(), Images(NI), "layer[1-4].*"
    return torchvision.models.vit_b_16().eval(), Images(NI), "encoder.layers.*"


def plain(model, ds, layers=None):
    from torch.utils.data import DataLoader

    with torch.inference_mode():
        for b in DataLoader(ds, batch_size=BS):
            model(**b) if isinstance(b, dict) else model(b[0])


def tracked(model, ds, layers, extra=()):
    from semlens_fast.collect import collect

    return collect(model, ds, [layers, *extra], k=20, batch_size=BS, progress=False)


ROWS = {
    "plain forward": lambda m, ds, lay: plain(m, ds),
    "ours: collect": lambda m, ds, lay: tracked(m, ds, lay),
    "ours: collect, through the end": lambda m, ds, lay: tracked(m, ds, lay, ("pooler",)),
}

_MEM = r"""
import json, resource, sys, torch
sys.path[:0] = [{root!r}, {here!r}]
import bench_models as bm
m, ds, lay = bm.build({family!r})
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
bm.ROWS[{row!r}](m, ds, lay)
print(json.dumps({{"peak_rss_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}}))
"""


def peak_rss(family, row):
    code = _MEM.format(root=ROOT, here=os.path.dirname(os.path.abspath(__file__)), family=family, row=row)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return float(json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_mb"])


@pytest.fixture(scope="module", params=["transformer", "resnet50", "vit_b_16"])
def model(request):
    return (request.param, *build(request.param))


@pytest.mark.parametrize("row", list(ROWS))
def test_models(benchmark, model, row):
    family, m, ds, lay = model
    if row.endswith("through the end") and family != "transformer":
        pytest.skip("only the transformer has a head the collect forward skips")
    n = len(ds)
    benchmark.group = f"{family}: {lay}, {n} inputs, batch {BS}"
    benchmark.extra_info.update(ours=row == "ours: collect", label=row, items=n, unit="inputs")
    benchmark.extra_info["peak_rss_mb"] = round(peak_rss(family, row), 1)
    benchmark.extra_info["note"] = f"peak RSS +{benchmark.extra_info['peak_rss_mb']} MB"
    benchmark.pedantic(ROWS[row], args=(m, ds, lay), rounds=int(os.environ.get("SEMLENS_BENCH_ROUNDS", "2")),
                       iterations=1, warmup_rounds=0)
