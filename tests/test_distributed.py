"""Distributed collection: 2 CPU processes (gloo) launched with torchrun equal one process exactly."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from semlens_fast.collect import collect
from semlens_fast.store import TopKStore
from tests.helpers_collect import REPO, RandomImages, TinyCNN

LAYERS = ["conv1", "block.0", "head"]
POOLS = {"conv1": "max", "block.0": "absmax", "head": "mean"}

_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {repo!r})
    import torch.distributed as dist
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler
    from semlens_fast import distributed as sd
    from semlens_fast.collect import collect
    from tests.helpers_collect import TinyCNN, RandomImages

    out = sys.argv[1]
    sd.init("gloo")
    rank = dist.get_rank()
    assert sd.is_distributed() and dist.get_world_size() == 2
    model = TinyCNN(0)
    layers, pools = {layers!r}, {pools!r}
    # 1) a plain Dataset (101 samples: DistributedSampler pads one duplicate, which must be dropped)
    st = collect(model, RandomImages(101), layers, k=6, pool=pools, batch_size=8, store=out + "/merged", progress=False)
    st.save(out + f"/returned-{{rank}}")
    # 2) a loader with its own shuffling DistributedSampler
    ds = RandomImages(101)
    sampler = DistributedSampler(ds, shuffle=True, seed=3)
    st2 = collect(model, DataLoader(ds, batch_size=5, sampler=sampler), layers, k=6, pool=pools, progress=False)
    st2.save(out + f"/shuffled-{{rank}}")
    # 3) one sample: rank 1 sees no data at all
    st3 = collect(model, RandomImages(1), layers, k=3, progress=False)
    st3.save(out + f"/tiny-{{rank}}")
    # 4) the same call again: the complete merged store is reused (rank 0 decides, broadcasts)
    model.calls["forward"] = 0
    again = collect(model, RandomImages(101), layers, k=6, pool=pools, batch_size=8, store=out + "/merged", progress=False)
    assert model.calls["forward"] == 0 and again.equal(st)
    sd.shutdown()
    """
)


def test_two_gloo_ranks_equal_single_process(tmp_path):
    script = tmp_path / "dist_collect.py"
    script.write_text(_SCRIPT.format(repo=REPO, layers=LAYERS, pools=POOLS))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    # the ranks ran with one thread each; conv results may depend on the thread count in the
    # last ulp, so the single-process references run with one thread too
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _compare(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _compare(tmp_path):
    model = TinyCNN(0)
    single = collect(model, RandomImages(101), LAYERS, k=6, pool=POOLS, batch_size=8, progress=False)
    merged = TopKStore.load(tmp_path / "merged")
    assert merged.equal(single)
    assert merged.meta["progress"]["n_samples"] == 101 and merged.meta["distributed"] == {"world_size": 2}
    # The shuffled run used other batch compositions; conv kernels may then differ in the
    # last ulp (a property of the model, not of the merge), so its single-process twin runs
    # the very same index batches in one process.
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    twin_batches = []
    for r in (0, 1):
        idx = list(DistributedSampler(RandomImages(101), num_replicas=2, rank=r, shuffle=True, seed=3))
        idx = idx[: (101 - r + 1) // 2]  # drop the padding duplicate
        twin_batches += [idx[i : i + 5] for i in range(0, len(idx), 5)]
    twin = collect(model, DataLoader(RandomImages(101), batch_sampler=twin_batches), LAYERS, k=6, pool=POOLS, progress=False)
    for r in (0, 1):
        assert TopKStore.load(tmp_path / f"returned-{r}").equal(single)
        shuffled = TopKStore.load(tmp_path / f"shuffled-{r}")
        assert shuffled.equal(twin)
        for n in LAYERS:  # and the same samples as the sequential run, values to fp32 rounding
            assert torch.equal(shuffled[n].ids, single[n].ids)
            assert torch.allclose(shuffled[n].values, single[n].values, rtol=1e-5, atol=1e-5)
    tiny = collect(model, RandomImages(1), LAYERS, k=3, progress=False)
    assert TopKStore.load(tmp_path / "tiny-1").equal(tiny)
    # each rank checkpointed its own shard
    shards = sorted(p.name for p in (tmp_path / "merged" / "_shards").iterdir())
    assert shards == ["rank-0-of-2", "rank-1-of-2"]
    # a single-process run accepts the merged store as its own (same fingerprints)
    model.calls["forward"] = 0
    reuse = collect(model, RandomImages(101), LAYERS, k=6, pool=POOLS, batch_size=8, store=tmp_path / "merged", progress=False)
    assert model.calls["forward"] == 0 and reuse.equal(single)


def test_distributed_true_without_process_group_is_an_error():
    from semlens_fast.errors import ArgumentError

    with pytest.raises(ArgumentError, match="init_process_group"):
        collect(TinyCNN(0), RandomImages(4), ["conv1"], k=2, distributed=True, progress=False)


_SHARD = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {repo!r})
    import torch.distributed as dist
    from semlens_fast import distributed as sd
    from semlens_fast.collect import collect
    from tests.test_sae import random_sae
    from tests.test_transformers import TokenBatches, tiny_bert

    sd.init("gloo")
    model, ds, sae = tiny_bert(), TokenBatches(30, seed=3), random_sae(L=71)
    part = sae.shard()                       # this rank's latents, all the data
    st = collect(model, ds, [], k=5, sae={{"encoder.layer.1": part}}, batch_size=8, collate_fn=ds.collate,
                 distributed=False, progress=False)
    full = sd.gather_components(st["encoder.layer.1"])
    if dist.get_rank() == 0:
        torch.save({{"part": part.L, "v": full.values, "i": full.ids, "p": full.positions, "n": full.nan_counts}}, sys.argv[1])
    sd.shutdown()
    """
)


def test_sae_latents_sharded_by_component_equal_one_process(tmp_path):
    from tests.test_sae import random_sae
    from tests.test_transformers import TokenBatches, tiny_bert

    script = tmp_path / "shard.py"
    script.write_text(_SHARD.format(repo=REPO))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path / "out.pt")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert got["part"] == 36  # 71 latents over 2 ranks: 36 + 35
    model, ds = tiny_bert(), TokenBatches(30, seed=3)
    want = collect(model, ds, [], k=5, sae={"encoder.layer.1": random_sae(L=71)}, batch_size=8,
                   collate_fn=ds.collate, progress=False)["encoder.layer.1"]
    from semlens_fast.ops import TopKState

    assert TopKState(got["v"], got["i"], got["p"], got["n"]).equal(want)
