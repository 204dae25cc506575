"""GPU benchmarks of the Triton kernels, side by side with their peers, in one run.

    python benchmarks/gpu.py                       # every case, on cuda:0
    python benchmarks/gpu.py --suite search --quick
    python benchmarks/gpu.py --dry-run             # the plan and the roofline, no GPU needed

Tracking (streaming per-channel top-k after warm-up: the state already holds k entries):
ours (``pool_topk_update`` / ``topk_update``) against ``torch.cat + torch.topk`` of the
state and the pooled batch (pooling by torch), as time ratios (peer / ours), plus the
achieved read bandwidth of the activations against the device's peak.

Search (exact cosine top-k, N = 10^6 rows of d = 512): ours (``cosine_topk``) against
chunked ``torch.mm + topk`` (normalised rows, the same storage dtype) and faiss GPU
``IndexFlatIP`` where installed, as ratios, plus the achieved TFLOP/s (2 Q N d per call)
against the device's bf16 tensor-core peak.

The roofline of a call is ``max(bytes / peak bandwidth, flops / peak flops)``; its
ratio to the measured time is printed as "of roofline". Peaks come from a table of
known GPUs (--peak-gbs / --peak-tflops override). Nothing is asserted: figures are
printed (and written with --json). The first call of each case compiles the Triton
kernels (and autotunes the search kernel); it is a warm-up and is not timed.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch

# name fragment -> (DRAM GB/s, dense bf16 tensor-core TFLOP/s), datasheet figures
PEAKS = [
    ("H200", 4800.0, 989.0),
    ("H100 PCIe", 2000.0, 756.0),
    ("H100", 3350.0, 989.0),  # SXM / HBM3
    ("A100-SXM4-80GB", 2039.0, 312.0),
    ("A100 80GB PCIe", 1935.0, 312.0),
    ("A100", 1555.0, 312.0),
    ("L40S", 864.0, 362.0),
    ("L4", 300.0, 121.0),
    ("A10", 600.0, 125.0),
    ("RTX 4090", 1008.0, 165.0),
    ("RTX 3090", 936.0, 71.0),
]

TRACKING = [  # (label, make_input(batch), pool, k, batches)
    ("conv NCHW fp16 [256, 2048, 14, 14] max k=100", (256, 2048, 14, 14), "nchw", torch.float16, "max", 100),
    ("conv channels_last fp16 [256, 2048, 14, 14] max k=100", (256, 2048, 14, 14), "channels_last", torch.float16, "max", 100),
    ("tokens bf16 [32, 1024, 4096] mean k=50", (32, 1024, 4096), "tokens", torch.bfloat16, "mean", 50),
    ("tokens as samples bf16 [8192, 16384] k=32", (8192, 16384), "plain", torch.bfloat16, "max", 32),
]
SEARCH = [  # (Q, k, storage dtype)
    (1, 20, torch.bfloat16), (16, 20, torch.bfloat16), (1024, 20, torch.bfloat16), (1024, 100, torch.bfloat16),
    (1024, 20, torch.float16), (1024, 20, torch.float32),
]
N_ROWS, DIM = 1_000_000, 512


def device_peaks(name: str, gbs: float | None, tflops: float | None) -> tuple[float | None, float | None]:
    for frag, bw, fl in PEAKS:
        if frag in name:
            return gbs or bw, tflops or fl
    return gbs, tflops


def tracking_bytes(shape, dtype) -> int:
    return math.prod(shape) * torch.empty(0, dtype=dtype).element_size()


def search_cost(Q: int, N: int, d: int, dtype) -> tuple[int, int]:
    """(bytes read from DRAM if the rows are read once, flops) of one search call."""
    es = torch.empty(0, dtype=dtype).element_size()
    return N * d * es + Q * d * 4, 2 * Q * N * d


def peak_for(peaks, dtype):
    """(GB/s, TFLOP/s) for a search on ``dtype`` rows: float32 rows run on TF32, half the bf16 rate."""
    gbs, tflops = peaks
    if tflops is not None and dtype == torch.float32:
        tflops = tflops / 2
    return gbs, tflops


def roofline_s(nbytes: float, flops: float, gbs: float | None, tflops: float | None) -> float | None:
    if gbs is None or tflops is None:
        return None
    return max(nbytes / (gbs * 1e9), flops / (tflops * 1e12))


def timeit(fn, repeat: int) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs (CUDA events; after one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


# --------------------------------------------------------------------------- tracking

def _make_batch(shape, layout, dtype, seed, device):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _torch_pool(x, layout, pool):
    """[B, C] pooled values by plain torch (the peer's pooling)."""
    if layout in ("nchw", "channels_last"):
        return x.amax(dim=(2, 3)).float() if pool == "max" else x.float().mean(dim=(2, 3))
    if layout == "tokens":
        return x.amax(dim=1).float() if pool == "max" else x.float().mean(dim=1)
    return x.float()


def bench_tracking(case, device, repeat, quick, peaks):
    from semlens_fast.ops import TopKState, pool_topk_update, topk_update

    label, shape, layout, dtype, pool, k = case
    if quick:
        shape = (shape[0] // 4,) + tuple(shape[1:])
    C = shape[-1] if layout in ("tokens", "plain") else shape[1]
    B = shape[0]
    batches = [_make_batch(shape, layout, dtype, s, device) for s in range(3)]
    state = TopKState.empty(C, k, device)
    step = [0]

    def ours():
        x = batches[step[0] % 3]
        ids = torch.arange(B, device=device) + B * step[0]
        step[0] += 1
        if layout == "plain":
            topk_update(state, x, ids)
        else:
            pool_topk_update(state, x, ids, pool)

    tv = torch.full((C, k), float("-inf"), device=device)
    ti = torch.full((C, k), -1, dtype=torch.int64, device=device)
    pstep = [0]

    def peer():
        nonlocal tv, ti
        x = batches[pstep[0] % 3]
        ids = torch.arange(B, device=device) + B * pstep[0]
        pstep[0] += 1
        pooled = _torch_pool(x, layout, pool).t()
        v, j = torch.topk(torch.cat([tv, pooled], dim=1), k, dim=1)
        ti = torch.gather(torch.cat([ti, ids.expand(C, B)], dim=1), 1, j)
        tv = v

    for _ in range(max(2, 4 * k // B + 1)):  # warm-up: the state holds k entries
        ours()
        peer()
    t_ours, t_peer = timeit(ours, repeat), timeit(peer, repeat)
    nbytes = tracking_bytes(shape, dtype)
    gbs, _ = peaks
    return dict(suite="tracking", case=label if not quick else label + " (B/4)", bytes=nbytes,
                ours_s=t_ours, peer_s=t_peer, ratio_torch=t_peer / t_ours, achieved_gbs=nbytes / t_ours / 1e9,
                of_peak_bw=(nbytes / t_ours / 1e9 / gbs) if gbs else None)


# --------------------------------------------------------------------------- search

def _unit_rows(n, d, dtype, seed, device):
    g = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(n, d, dtype=dtype, device=device)
    for r0 in range(0, n, 1 << 18):
        blk = torch.randn(min(n, r0 + (1 << 18)) - r0, d, generator=g, device=device)
        out[r0 : r0 + blk.shape[0]] = torch.nn.functional.normalize(blk, dim=1).to(dtype)
    return out


def _torch_search(q, db, k, chunk=1 << 17):
    qn = torch.nn.functional.normalize(q.float(), dim=1).to(db.dtype)
    best_s = torch.full((q.shape[0], 0), float("-inf"), device=q.device)
    best_i = torch.full((q.shape[0], 0), -1, dtype=torch.int64, device=q.device)
    for n0 in range(0, db.shape[0], chunk):
        x = db[n0 : n0 + chunk]
        xn = x / x.float().norm(dim=1, keepdim=True).clamp_min(1e-30).to(x.dtype)
        s = (qn @ xn.t()).float()
        v, j = torch.topk(s, min(k, s.shape[1]), dim=1)
        best_s, pos = torch.topk(torch.cat([best_s, v], 1), min(k, best_s.shape[1] + v.shape[1]), dim=1)
        best_i = torch.gather(torch.cat([best_i, j + n0], 1), 1, pos)
    return best_s, best_i


def bench_search(case, dbs, queries, repeat, peaks):
    from semlens_fast.ops import cosine_topk

    Q, k, dtype = case
    db = dbs[dtype]
    q = queries[:Q]
    t_ours = timeit(lambda: cosine_topk(q, db, k), repeat)
    t_torch = timeit(lambda: _torch_search(q, db, k), repeat)
    row = dict(suite="search", case=f"Q={Q} k={k} {str(dtype)[6:]} storage, N={db.shape[0]} d={db.shape[1]}",
               ours_s=t_ours, torch_s=t_torch, ratio_torch=t_torch / t_ours)
    t_faiss = _faiss_time(q, db, k, repeat)
    if t_faiss is not None:
        row.update(faiss_s=t_faiss, ratio_faiss=t_faiss / t_ours)
    nbytes, flops = search_cost(Q, db.shape[0], db.shape[1], dtype)
    gbs, tflops = peak_for(peaks, dtype)
    row.update(bytes=nbytes, flops=flops, achieved_tflops=flops / t_ours / 1e12,
               of_peak_flops=(flops / t_ours / 1e12 / tflops) if tflops else None)
    roof = roofline_s(nbytes, flops, gbs, tflops)
    row["of_roofline"] = roof / t_ours if roof else None
    return row


_faiss_index = {}


def _faiss_time(q, db, k, repeat):
    try:
        import faiss
    except ImportError:
        return None
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return None
    key = (db.dtype, db.shape)
    if key not in _faiss_index:
        res = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        cfg.useFloat16 = db.dtype != torch.float32
        index = faiss.GpuIndexFlatIP(res, db.shape[1], cfg)
        index.add(torch.nn.functional.normalize(db.float(), dim=1).cpu().numpy())
        _faiss_index[key] = (res, index)
    index = _faiss_index[key][1]
    qn = torch.nn.functional.normalize(q.float(), dim=1).cpu().numpy()
    index.search(qn, k)
    t0 = time.perf_counter()
    for _ in range(repeat):
        index.search(qn, k)
    return (time.perf_counter() - t0) / repeat


# --------------------------------------------------------------------------- main

def plan(args, peaks) -> list[dict]:
    rows = []
    gbs, tflops = peaks
    if args.suite in ("tracking", "all"):
        for label, shape, layout, dtype, pool, k in TRACKING:
            nbytes = tracking_bytes(shape, dtype)
            roof = nbytes / (gbs * 1e9) if gbs else None
            rows.append(dict(suite="tracking", case=label, bytes=nbytes, roofline_s=roof))
    if args.suite in ("search", "all"):
        for Q, k, dtype in SEARCH:
            nbytes, flops = search_cost(Q, N_ROWS, DIM, dtype)
            rows.append(dict(suite="search", case=f"Q={Q} k={k} {str(dtype)[6:]} storage", bytes=nbytes, flops=flops,
                             roofline_s=roofline_s(nbytes, flops, *peak_for(peaks, dtype))))
    return rows


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def print_rows(rows):
    for r in rows:
        if "ours_s" not in r:
            extra = f", {r['flops'] / 1e12:.3f} TFLOP" if "flops" in r else ""
            roof = f"{r['roofline_s'] * 1e3:.3f} ms" if r.get("roofline_s") else "? (unknown peaks)"
            print(f"[{r['suite']}] {r['case']}: {r['bytes'] / 1e9:.3f} GB{extra} per call; roofline {roof}")
            continue
        if r["suite"] == "tracking":
            print(f"[tracking] {r['case']}: ours {r['ours_s'] * 1e3:.3f} ms, torch.cat+topk {r['peer_s'] * 1e3:.3f} ms "
                  f"({r['ratio_torch']:.2f}x); {r['achieved_gbs']:.0f} GB/s = {_fmt(r['of_peak_bw'], '.0%')} of peak")
        else:
            faiss = f", faiss-gpu {r['faiss_s'] * 1e3:.3f} ms ({r['ratio_faiss']:.2f}x)" if "faiss_s" in r else ", faiss-gpu n/a"
            print(f"[search] {r['case']}: ours {r['ours_s'] * 1e3:.3f} ms, torch.mm+topk {r['torch_s'] * 1e3:.3f} ms "
                  f"({r['ratio_torch']:.2f}x){faiss}; {r['achieved_tflops']:.1f} TFLOP/s = "
                  f"{_fmt(r['of_peak_flops'], '.0%')} of peak, {_fmt(r['of_roofline'], '.0%')} of roofline")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("tracking", "search", "all"), default="all")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--repeat", type=int, default=10, help="timed calls per case (median reported)")
    p.add_argument("--quick", action="store_true", help="tracking batches / 4, search N = 10^5")
    p.add_argument("--peak-gbs", type=float, help="DRAM bandwidth of the device (default: table of known GPUs)")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 tensor-core TFLOP/s (default: table)")
    p.add_argument("--dry-run", action="store_true", help="print the cases, bytes, flops and roofline; run nothing")
    p.add_argument("--json", help="also write the rows to this file")
    a = p.parse_args(argv)
    if a.repeat < 1:
        p.error(f"--repeat must be >= 1, got {a.repeat}")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    name = ""
    if not args.dry_run:
        if not torch.cuda.is_available():
            print("benchmarks/gpu.py needs a CUDA device (torch.cuda.is_available() is False); "
                  "use --dry-run to print the plan and the roofline without one", file=sys.stderr)
            return 2
        name = torch.cuda.get_device_name(torch.device(args.device))
    peaks = device_peaks(name, args.peak_gbs, args.peak_tflops)
    print(f"device: {name or '(dry run)'}; peaks: {_fmt(peaks[0], '.0f')} GB/s, {_fmt(peaks[1], '.0f')} bf16 TFLOP/s")
    if args.dry_run:
        rows = plan(args, peaks)
    else:
        device = torch.device(args.device)
        rows = []
        if args.suite in ("tracking", "all"):
            for case in TRACKING:
                rows.append(bench_tracking(case, device, args.repeat, args.quick, peaks))
                print_rows(rows[-1:])
        if args.suite in ("search", "all"):
            n = N_ROWS // 10 if args.quick else N_ROWS
            dbs = {dt: _unit_rows(n, DIM, dt, 0, device) for dt in {c[2] for c in SEARCH}}
            queries = _unit_rows(max(c[0] for c in SEARCH), DIM, torch.float32, 1, device)
            for case in SEARCH:
                rows.append(bench_search(case, dbs, queries, args.repeat, peaks))
                print_rows(rows[-1:])
    if args.dry_run:
        print_rows(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, peaks=peaks, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
