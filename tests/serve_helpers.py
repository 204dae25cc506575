"""One small, real run folder shared by the serve tests: the planted-stamp demo on scikit-learn's
digits (1,437 training images, a short training), built once per test session (~15 s)."""
from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path
from unittest import mock

_CACHE: dict[str, Path] = {}


def digits_run(tmp_path_factory) -> Path:
    """The digits demo run (labels, audit, relevance for class 6, findings, report)."""
    if "run" not in _CACHE:
        import semlens_fast.data as D
        from semlens_fast.demo import DemoConfig, run_demo

        root = tmp_path_factory.getbasetemp() / "serve-digits-run"
        with mock.patch.object(D, "_fashion_root", lambda root=None: None), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "falling back to digits"
            run_demo(root, report=True, progress=False, say=lambda s: None, cfg=DemoConfig(steps=150, relevance_samples=64))
        # the demo's audit ranks every class, so it computes relevance for all of them; these tests need classes
        # without relevance (read-only servers must refuse to compute it): keep class 6's only
        from semlens_fast._io import read_json, write_json

        man = read_json(root / "run.json")
        for k in range(10):
            if k != 6:
                (root / "relevance" / f"class{k}.safetensors").unlink(missing_ok=True)
                man["stages"].pop(f"relevance:{k}", None)
        write_json(root / "run.json", man)
        _CACHE["run"] = root
    return _CACHE["run"]


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a run folder (for tests that change or damage it)."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


def tree_state(root: Path) -> dict[str, tuple[int, int, str]]:
    """(size, mtime_ns, sha256) of every file under ``root``: shows whether anything was written."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out
