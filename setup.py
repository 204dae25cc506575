"""Build of semlens_fast and its C++ extension semlens_fast._C.

The extension is plain C++17 + pybind11 + OpenMP (it does not link against libtorch:
the Python wrappers pass raw pointers of validated tensors). It is compiled for
generic x86-64; the AVX2 and AVX-512 kernels are compiled into the same binary under
``#pragma GCC target`` and chosen at run time, so one build runs on any x86-64.
Set SEMLENS_NO_EXT=1 to skip the extension (everything then runs on the torch
reference, with one warning).
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ext_modules = []
if os.environ.get("SEMLENS_NO_EXT", "") != "1":
    from pybind11.setup_helpers import Pybind11Extension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    compile_args = ["-O3", "-fopenmp", "-fvisibility=hidden", "-fno-math-errno"]
    link_args = ["-fopenmp"]
    if sys.platform == "darwin":  # pragma: no cover
        compile_args = ["-O3", "-Xpreprocessor", "-fopenmp"]
        link_args = ["-lomp"]
    ext_modules.append(
        Pybind11Extension(
            "semlens_fast._C",
            sources,
            include_dirs=["csrc"],
            depends=sorted(glob.glob(os.path.join("csrc", "*.h"))),  # header edits trigger a rebuild
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            cxx_std=17,
        )
    )

setup(ext_modules=ext_modules)
