"""Exact binomial bounds used to turn counts of successes into an error bound epsilon."""
from __future__ import annotations

import math

from ..errors import ArgumentError

__all__ = ["clopper_pearson_lower", "epsilon_bound"]


def _check(successes: int, n: int, confidence: float) -> None:
    for name, v in (("successes", successes), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ArgumentError(f"{name} must be an int >= 0, got {v!r}")
    if successes > n:
        raise ArgumentError(f"successes must be <= n, got successes={successes}, n={n}")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.0 < float(confidence) < 1.0:
        raise ArgumentError(f"confidence must be a float in (0, 1), got {confidence!r}")


def clopper_pearson_lower(successes: int, n: int, confidence: float = 0.95) -> float:
    """Lower one-sided exact (Clopper-Pearson) confidence bound on a binomial success probability.

    With ``k = successes`` out of ``n`` trials, returns ``p_lo`` such that
    ``Pr[Binomial(n, p_lo) >= k] = 1 - confidence``, i.e. ``beta.ppf(1 - confidence, k, n - k + 1)``
    (``0`` when ``k == 0`` or ``n == 0``). For ``k == n`` this is ``(1 - confidence) ** (1 / n)``.

    This is the lower end of the two-sided exact interval at confidence ``2 * confidence - 1``
    (e.g. the one-sided 95% bound equals the lower end of ``scipy.stats.binomtest(k, n)
    .proportion_ci(0.90, method="exact")``).
    """
    _check(successes, n, confidence)
    if successes == 0 or n == 0:
        return 0.0
    alpha = 1.0 - float(confidence)
    if successes == n:  # closed form, exact also for huge n
        return float(math.exp(math.log(alpha) / n))
    from scipy.stats import beta

    return float(beta.ppf(alpha, successes, n - successes + 1))


def epsilon_bound(successes: int, n: int, confidence: float = 0.95) -> float:
    """``1 - clopper_pearson_lower(successes, n, confidence)``: an upper bound, holding with
    probability >= ``confidence``, on the probability that the tested property fails.

    ``epsilon_bound(n, n, 0.95) == 1 - 0.05 ** (1 / n)``; ``n == 0`` gives ``1.0`` (no evidence).
    """
    return 1.0 - clopper_pearson_lower(successes, n, confidence)
