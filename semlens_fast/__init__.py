"""semlens_fast: a fast engine for SemanticLens-style explanations of neural networks."""
from __future__ import annotations

import logging

from ._version import __version__

logging.getLogger("semlens_fast").addHandler(logging.NullHandler())

__all__ = ["__version__"]
