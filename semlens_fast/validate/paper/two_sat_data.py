"""Random 2-SAT formulas as token sequences, as in Palumbo et al.'s 2-SAT case study.

A formula has ``n_clauses`` clauses of two literals over two *distinct* variables drawn
uniformly from ``n_vars`` (each literal positive or negated with probability 1/2); clauses may
repeat inside a formula; the two literals of a clause are written lower variable first.
Tokens (``n_vars = 5``): ``x0..x4`` = 0..4, ``Not(x0)..Not(x4)`` = 5..9, ``(`` = 10, ``)`` = 11,
``:`` = 12, ``s`` = 13 (SAT), ``u`` = 14 (UNSAT), ``#`` = 15 (padding, unused here). A sample is
``( l r ) ( l r ) ... : label``: 41 input tokens, the label is predicted at the ``:`` position.

Satisfiability is decided exactly by the truth table over all ``2 ** n_vars`` assignments
(the paper used Z3; the answer is the same). Assignment ``a`` sets ``x_v`` to bit
``n_vars - 1 - v`` of ``a`` (so ``a = 0b10000`` is ``x0 = T``, the rest false: the paper's
feature ``phi[TFFFF]``).
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "N_VARS",
    "N_CLAUSES",
    "TOK",
    "random_literals",
    "truth_tables",
    "encode",
    "balanced_formulas",
    "assignment_names",
]

N_VARS = 5
N_CLAUSES = 10
TOK = {"(": 2 * N_VARS, ")": 2 * N_VARS + 1, ":": 2 * N_VARS + 2, "s": 2 * N_VARS + 3, "u": 2 * N_VARS + 4,
       "#": 2 * N_VARS + 5}
D_VOCAB = 2 * N_VARS + 6
SEQ_LEN = 4 * N_CLAUSES + 1


def random_literals(n: int, rng: np.random.Generator, n_vars: int = N_VARS, n_clauses: int = N_CLAUSES) -> np.ndarray:
    """``[n, n_clauses, 2]`` literal ids (``v`` for ``x_v``, ``n_vars + v`` for ``Not(x_v)``),
    two distinct variables per clause, lower variable first."""
    a = rng.integers(0, n_vars, (n, n_clauses))
    b = (a + rng.integers(1, n_vars, (n, n_clauses))) % n_vars  # a different variable, uniform
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    neg = rng.integers(0, 2, (n, n_clauses, 2))
    return np.stack([lo, hi], -1) + n_vars * neg


def truth_tables(literals: np.ndarray, n_vars: int = N_VARS) -> np.ndarray:
    """``[n, 2 ** n_vars]`` bool: does assignment ``a`` satisfy the formula (every clause)."""
    lit = np.asarray(literals)
    var, neg = lit % n_vars, lit >= n_vars  # [n, c, 2]
    assign = (np.arange(2**n_vars)[:, None] >> (n_vars - 1 - np.arange(n_vars))) & 1  # [A, V]
    out = np.ones((lit.shape[0], 2**n_vars), dtype=bool)
    for c in range(lit.shape[1]):  # per clause: [n, A]
        t0 = assign[:, var[:, c, 0]].T.astype(bool) != neg[:, c, 0:1]
        t1 = assign[:, var[:, c, 1]].T.astype(bool) != neg[:, c, 1:2]
        out &= t0 | t1
    return out


def assignment_names(n_vars: int = N_VARS) -> list[str]:
    """``phi[TFFFF]``-style names of the truth-table columns."""
    return ["phi[" + "".join("T" if (a >> (n_vars - 1 - v)) & 1 else "F" for v in range(n_vars)) + "]"
            for a in range(2**n_vars)]


def encode(literals: np.ndarray, sat: np.ndarray) -> np.ndarray:
    """``[n, 42]`` int64 tokens: ``( l r )`` per clause, ``:``, then ``s``/``u``."""
    lit = np.asarray(literals)
    n, c, _ = lit.shape
    toks = np.empty((n, c, 4), dtype=np.int64)
    toks[:, :, 0], toks[:, :, 3] = TOK["("], TOK[")"]
    toks[:, :, 1:3] = lit
    label = np.where(np.asarray(sat), TOK["s"], TOK["u"])
    return np.concatenate([toks.reshape(n, 4 * c), np.full((n, 1), TOK[":"]), label[:, None]], axis=1)


def balanced_formulas(n: int, seed: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens [n, 42], literals [n, 10, 2])``: ``ceil(n / 2)`` SAT and ``floor(n / 2)`` UNSAT
    random formulas without syntactic duplicates (and none of the formulas in ``exclude``, token
    rows with or without the label),
    in generation order (SAT and UNSAT interleaved as drawn)."""
    rng = np.random.default_rng(seed)
    want = {True: (n + 1) // 2, False: n // 2}
    seen: set[bytes] = set()
    if exclude is not None:  # rows of tokens, with or without the label: compared on the formula
        seen = {np.ascontiguousarray(r[:SEQ_LEN]).tobytes() for r in np.asarray(exclude, dtype=np.int64)}
    got_t: list[np.ndarray] = []
    got_l: list[np.ndarray] = []
    have = {True: 0, False: 0}
    while have[True] < want[True] or have[False] < want[False]:
        lit = random_literals(max(4096, 2 * n), rng)
        sat = truth_tables(lit).any(1)
        toks = encode(lit, sat)
        keep = np.zeros(len(sat), dtype=bool)
        for i in range(len(sat)):
            s = bool(sat[i])
            if have[s] >= want[s]:
                continue
            key = toks[i, :-1].tobytes()
            if key in seen:
                continue
            seen.add(key)
            keep[i] = True
            have[s] += 1
        got_t.append(toks[keep])
        got_l.append(lit[keep])
    return np.concatenate(got_t), np.concatenate(got_l)
