"""Triage thresholds chosen on the validation split only."""
from __future__ import annotations

import logging

import numpy as np

from models.pipeline import metrics

log = logging.getLogger(__name__)


def choose_thresholds(y_abnormal: np.ndarray, score: np.ndarray, review_sensitivity: float,
                      urgent_specificity: float, review_rule: str = "empirical", mid_gap: bool = False) -> dict:
    """review: highest threshold keeping abnormal sensitivity >= target; urgent: lowest keeping specificity >= target.

    When the two cross (a weak model), urgent is raised to review so that the bands stay ordered. When there are too
    few abnormal cases to resolve the sensitivity target (a site's local validation part), review is the lower of
    the empirical threshold and one extrapolated from the abnormal scores' spread.
    """
    if review_rule == "lower_bound":
        review = metrics.review_threshold_lower_bound(y_abnormal, score, review_sensitivity)
    else:
        review = metrics.review_threshold(y_abnormal, score, review_sensitivity)
    n_abnormal = int(np.sum(y_abnormal))
    extrapolated = not metrics.resolvable(n_abnormal, review_sensitivity)
    if extrapolated:
        empirical = review
        review = min(review, metrics.extrapolated_review_threshold(y_abnormal, score, review_sensitivity))
        log.warning("only %d abnormal validation cases: sensitivity %.2f cannot be resolved; review threshold "
                    "%.4f extrapolated from their spread (empirical %.4f)", n_abnormal, review_sensitivity,
                    review, empirical)
    urgent = metrics.urgent_threshold(y_abnormal, score, urgent_specificity)
    crossed = urgent < review
    if crossed:
        log.warning("urgent threshold %.4f fell below review %.4f; urgent set to review", urgent, review)
        urgent = review
    if mid_gap:
        review, urgent = metrics.mid_gap(review, score), metrics.mid_gap(urgent, score)
    sens_r, spec_r = metrics.sens_spec(y_abnormal, score, review)
    sens_u, spec_u = metrics.sens_spec(y_abnormal, score, urgent)
    return {
        "review": review, "urgent": urgent,
        "rule": {"review": (f"highest threshold whose validation sensitivity has a 95 % Wilson lower bound >= "
                            f"{review_sensitivity}" if review_rule == "lower_bound" else
                            f"highest threshold with validation sensitivity >= {review_sensitivity}") + (
                    f"; only {n_abnormal} abnormal validation cases, too few to show that, so lowered to a "
                    "prediction bound from their score spread" if extrapolated else ""),
                 "urgent": f"lowest threshold with validation specificity >= {urgent_specificity}",
                 "urgent_raised_to_review": crossed, "review_extrapolated": extrapolated,
                 "placement": "middle of the gap between validation scores (logit)" if mid_gap
                 else "at the deciding case's score"},
        "validation_band_shares": {name: float(np.mean(metrics.bands(score, review, urgent) == k))
                                   for k, name in enumerate(("normal", "review", "urgent"))},
        "validation": {"n": int(len(score)), "n_abnormal": int(np.sum(y_abnormal)), "auc": metrics.auc(y_abnormal, score),
                       "sensitivity_at_review": sens_r, "specificity_at_review": spec_r,
                       "sensitivity_at_urgent": sens_u, "specificity_at_urgent": spec_u},
    }
