"""Our axiom results beside the paper's: rows, the paper's reference values, and the notes on
where and why the two differ."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ..core import ValidationResult
from ..stats import epsilon_bound

__all__ = ["Row", "CaseStudyReport", "paper_failures", "rows_from", "PAPER_CONFIDENCE"]

PAPER_CONFIDENCE = 0.95  # the paper's epsilons are one-sided Clopper-Pearson bounds at 95%


def paper_failures(epsilon: float, n: int, confidence: float = 0.95) -> Optional[int]:
    """The number of failures out of ``n`` whose one-sided Clopper-Pearson bound is ``epsilon``
    (the paper reports epsilon only; this inverts it). ``None`` if no count matches to 1e-6
    relative."""
    if epsilon >= 1.0:
        return n
    lo, hi = 0, n
    while lo < hi:  # epsilon_bound(n - k, n) increases with k: the smallest k reaching epsilon
        mid = (lo + hi) // 2
        if epsilon_bound(n - mid, n, confidence) < epsilon * (1 - 1e-9):
            lo = mid + 1
        else:
            hi = mid
    cands = [k for k in (lo - 1, lo, lo + 1) if 0 <= k <= n]
    best = min(cands, key=lambda k: abs(epsilon_bound(n - k, n, confidence) - epsilon))
    return best if math.isclose(epsilon_bound(n - best, n, confidence), epsilon, rel_tol=1e-6) else None


@dataclass
class Row:
    """One (component, axiom, equivalence) line of a case-study table."""

    component: str
    axiom: str
    equivalence: str
    n: int
    failures: int
    epsilon: float
    epsilon_paper: Optional[float]
    n_paper: Optional[int] = None
    failures_paper: Optional[int] = None
    note: str = ""

    @property
    def agrees(self) -> Optional[bool]:
        """Same qualitative outcome as the paper: both without failure, or failure rates within
        a factor 2 of each other (or both above 50%). ``None`` without a paper value."""
        if self.epsilon_paper is None or self.n_paper is None:
            return None
        fp = self.failures_paper
        if fp is None:
            return math.isclose(self.epsilon, self.epsilon_paper, rel_tol=0.5)
        if self.failures == 0 or fp == 0:
            return self.failures == 0 and fp == 0
        ro, rp = self.failures / self.n, fp / self.n_paper
        return (ro > 0.5 and rp > 0.5) or 0.5 <= ro / rp <= 2.0


@dataclass
class CaseStudyReport:
    """A case study's table (ours beside the paper's), details of the run, and notes."""

    name: str
    title: str
    rows: list[Row]
    details: dict[str, Any] = field(default_factory=dict)
    construction: list[str] = field(default_factory=list)
    results: dict[str, ValidationResult] = field(default_factory=dict)
    confidence: float = PAPER_CONFIDENCE
    notes: dict[str, str] = field(default_factory=dict)

    def to_records(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.rows]

    def row(self, component: str, axiom: str, equivalence: Optional[str] = None) -> Row:
        for r in self.rows:
            if r.component == component and r.axiom == axiom and (equivalence is None or r.equivalence == equivalence):
                return r
        have = sorted({(r.component, r.axiom, r.equivalence) for r in self.rows})
        raise KeyError(f"no row ({component!r}, {axiom!r}, {equivalence!r}); have {have}")

    def differences(self) -> list[str]:
        """Where our outcome differs from the paper's, and why (from the counts and the case
        study's notes, keyed by component)."""
        out, n_only = [], []
        for r in self.rows:
            ok = r.agrees
            if ok is None:
                continue
            if ok:
                if r.failures == 0 and r.n != r.n_paper:
                    n_only.append(r)
                continue
            fp = r.failures_paper
            theirs = f"{100 * fp / r.n_paper:.3g}%" if fp is not None and r.n_paper else "?"
            why = self.notes.get(r.component, "")
            out.append(f"{r.component} {r.axiom} ({r.equivalence}): {100 * r.failures / r.n:.3g}% of ours fail, "
                       f"{theirs} of the paper's" + (f"; {why}" if why else ""))
        if n_only:
            ns = sorted({r.n for r in n_only})
            out.insert(0, f"{len(n_only)} rows have no failure in either, and epsilon differs only through n (ours "
                          f"{', '.join(f'{n:,}' for n in ns)}; the paper's {n_only[0].n_paper:,}): with no failure it "
                          f"is 1 - (1 - c)^(1/n)")
        return out

    def __str__(self) -> str:
        head = ["component", "axiom", "equivalence", "n", "fail", "eps ours", "n paper", "fail paper", "eps paper", ""]
        body = []
        for r in self.rows:
            mark = {True: "", False: "differs", None: ""}[r.agrees]
            body.append([r.component, r.axiom, r.equivalence, f"{r.n:,}", f"{r.failures:,}", f"{r.epsilon:.4g}",
                         "-" if r.n_paper is None else f"{r.n_paper:,}",
                         "-" if r.failures_paper is None else f"{r.failures_paper:,}",
                         "-" if r.epsilon_paper is None else f"{r.epsilon_paper:.4g}", mark])
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        right = {3, 4, 5, 6, 7, 8}

        def fmt(cells):
            return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        lines = [self.title, "", fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]
        if self.details:
            lines += ["", "run:"] + [f"  {k}: {v}" for k, v in self.details.items()]
        if self.construction:
            lines += ["", "how our construction differs from the paper's:"] + [f"  * {c}" for c in self.construction]
        if self.confidence != PAPER_CONFIDENCE:
            lines += ["", f"note: our epsilons are at {self.confidence:.0%}, the paper's at {PAPER_CONFIDENCE:.0%}; compare the "
                      f"failure counts"]
        diffs = self.differences()
        lines += ["", "where our numbers differ from the paper's:" if diffs else "our numbers agree with the paper's on every row."]
        lines += [f"  * {d}" for d in diffs]
        return "\n".join(lines)


def rows_from(result: ValidationResult, component_names: dict[int, str], equivalence: dict[tuple[int, str], str],
              paper: dict[tuple[str, str, str], float], n_paper: int, notes: Optional[dict[tuple[str, str], str]] = None,
              only: Optional[set[tuple[int, str]]] = None) -> list[Row]:
    """Rows for the (stage, axiom) results of ``result`` (``only``: a subset), named by
    ``component_names[stage_index]`` and ``equivalence[(stage_index, axiom)]``, with the paper's
    epsilon ``paper[(component, axiom, equivalence)]`` when it has one."""
    rows = []
    for r in result.results:
        if only is not None and (r.stage_index, r.axiom) not in only:
            continue
        comp = component_names[r.stage_index]
        eq = equivalence[(r.stage_index, r.axiom)]
        ep = paper.get((comp, r.axiom, eq))
        rows.append(Row(comp, r.axiom, eq, r.n, r.failures, r.epsilon, ep, n_paper if ep is not None else None,
                        paper_failures(ep, n_paper, PAPER_CONFIDENCE) if ep is not None else None,
                        (notes or {}).get((comp, r.axiom), "")))
    return rows
