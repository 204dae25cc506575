"""C++ CPU backend (extension ``semlens_fast._C``)."""
from .topk import merge_topk, pool_topk_update

__all__ = ["merge_topk", "pool_topk_update"]
from . import similarity  # noqa: E402,F401
from . import sae  # noqa: E402,F401
from . import maxpool  # noqa: E402,F401
