"""Axiomatic validation of mechanistic interpretations (Palumbo et al., "Validating Mechanistic
Interpretations: An Axiomatic Approach"): axioms A1-A4 per stage, each reported as an exact
Clopper-Pearson bound epsilon, plus a SemanticLens adapter for concept-level claims.

See ``docs/validate.md``.
"""
from __future__ import annotations

from .concepts import ConceptValidation, concept_stage, layer_means, resolve_labels, validate_concepts
from .core import AXIOMS, INPUT, OUTPUT, AxiomResult, Interpretation, Stage, ValidationResult, validate, validate_many
from .equivalence import (
    AllClose,
    Argmax,
    Downstream,
    Equivalence,
    Exact,
    Hamming,
    Rounded,
    Unordered,
    allclose,
    argmax,
    as_equivalence,
    downstream,
    exact,
    hamming,
    rounded,
    unordered,
)
from .stats import clopper_pearson_lower, epsilon_bound

__all__ = [
    "validate",
    "validate_many",
    "Stage",
    "Interpretation",
    "AxiomResult",
    "ValidationResult",
    "INPUT",
    "OUTPUT",
    "AXIOMS",
    "validate_concepts",
    "ConceptValidation",
    "concept_stage",
    "layer_means",
    "resolve_labels",
    "Equivalence",
    "Exact",
    "Rounded",
    "Hamming",
    "Unordered",
    "Downstream",
    "Argmax",
    "AllClose",
    "exact",
    "rounded",
    "hamming",
    "unordered",
    "downstream",
    "argmax",
    "allclose",
    "as_equivalence",
    "clopper_pearson_lower",
    "epsilon_bound",
]
