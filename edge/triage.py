"""Turning model probabilities into a triage label (normal/review/urgent) with machine-stable reasons."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from sync.core.errors import InferenceError
from edge.modelmanifest import ModelPackage

LABELS = ("normal", "review", "urgent")


@dataclass(frozen=True)
class Decision:
    """`reasons` are {"code": ..., **params} dicts; the UI translates them, so codes never change wording."""

    label: str
    score: float | None
    reasons: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "score": self.score, "reasons": [dict(r) for r in self.reasons]}


NO_MODEL = Decision("review", None, [{"code": "no_model"}])


def severity(label: str) -> int:
    try:
        return LABELS.index(label)
    except ValueError as err:
        raise ValueError(f"unknown triage label {label!r}; known: {LABELS}") from err


def most_severe(labels: Iterable[str]) -> str:
    """The most severe label; with nothing decided the answer is "review", because nothing is not normal."""
    labels = list(labels)
    return max(labels, key=severity) if labels else "review"


def decide(probs: np.ndarray, package: ModelPackage, backend: str | None = None) -> Decision:
    p = np.asarray(probs, dtype=np.float64)
    if p.shape != (len(package.labels),) or not np.isfinite(p).all():
        raise InferenceError(f"{package.id}: probabilities {p.tolist()} do not fit labels {package.labels}")
    # Softmax sums can land a hair above 1 in float arithmetic.
    score = float(min(1.0, max(0.0, sum(p[package.labels.index(lab)] for lab in package.abnormal_labels))))
    th = package.thresholds_for(backend)
    if score >= th.urgent:
        label, reasons = "urgent", [_reason("score_above_urgent", score, th.urgent)]
    elif score >= th.review:
        label, reasons = "review", [_reason("score_above_review", score, th.review)]
    else:
        label, reasons = "normal", [_reason("score_below_review", score, th.review)]
    floor = package.review_if_confidence_below
    if package.task == "multiclass" and floor is not None and p.max() < floor:
        label = most_severe([label, "review"])
        top = package.labels[int(p.argmax())]
        reasons.append({"code": "low_confidence", "label": top, "confidence": round(float(p.max()), 4),
                        "threshold": floor})
    return Decision(label, score, reasons)


def _reason(code: str, score: float, threshold: float) -> dict[str, Any]:
    return {"code": code, "score": round(score, 4), "threshold": threshold}
