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
