#!/usr/bin/env python
"""Train the two models of the axiomatic-validation paper's case studies and write the weights
that ship in semlens_fast/validate/paper/weights/ (fixed seeds; deterministic for a given
thread count).

    python scripts/train_paper_case_studies.py modular-addition   # P = 113, 30% of the pairs
    python scripts/train_paper_case_studies.py 2sat                # 2-layer, heads 1 and 4

A run checkpoints into --work (default: .paper-train/ in the current folder) at every
evaluation and resumes from there when restarted. Wall times and the training record go into
the safetensors metadata (and are printed).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["modular-addition", "2sat"])
    ap.add_argument("--work", default=".paper-train", help="checkpoint folder (resumable)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", help="output safetensors file (default: the packaged weights file)")
    ap.add_argument("--max-steps", type=int, default=None)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.which == "modular-addition":
        from semlens_fast.validate.paper import modular_addition as ma

        kw = {} if args.max_steps is None else {"max_steps": args.max_steps}
        model, info = ma.train_modular_addition(threads=args.threads, checkpoint=work / "modular_addition.ckpt", **kw)
        out = Path(args.out) if args.out else ma.WEIGHTS
        ma.save_model(model, out, info)
    else:
        from semlens_fast.validate.paper import two_sat as ts

        kw = {} if args.max_steps is None else {"max_steps": args.max_steps}
        model, info = ts.train_two_sat(threads=args.threads, checkpoint=work / "two_sat.ckpt", **kw)
        out = Path(args.out) if args.out else ts.WEIGHTS
        ts.save_model(model, out, info)
    print(json.dumps({k: v for k, v in info.items() if k != "history"}, indent=1))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB); this invocation took {time.time() - t0:.0f} s wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
