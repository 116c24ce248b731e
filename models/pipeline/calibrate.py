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


def with_calibration_part(chosen: dict, validation_y: np.ndarray, validation_score: np.ndarray,
                          y_abnormal: np.ndarray, score: np.ndarray,
                          review_sensitivity: float, urgent_specificity: float, mid_gap: bool = False) -> dict:
    """Widen validation thresholds with a calibration part drawn from the held-out population.

    Validation carved from the training folder is saturated (every normal scores far below every pneumonia), so
    its urgent threshold sits just above its highest normal and the review band holds a few per cent. Images of
    the test folder's own patients are not: review becomes the lower (more sensitive) of the two rules, urgent the
    higher (more specific), and the band between them holds the cases the model is unsure of."""
    review_cal = metrics.review_threshold(y_abnormal, score, review_sensitivity)
    urgent_cal = metrics.urgent_threshold(y_abnormal, score, urgent_specificity)
    if mid_gap:
        review_cal, urgent_cal = metrics.mid_gap(review_cal, score), metrics.mid_gap(urgent_cal, score)
    review, urgent = min(chosen["review"], review_cal), max(chosen["urgent"], urgent_cal)
    urgent = max(urgent, review)
    sens_r, spec_r = metrics.sens_spec(y_abnormal, score, review)
    sens_u, spec_u = metrics.sens_spec(y_abnormal, score, urgent)
    rule = dict(chosen["rule"])
    val_sens_r, val_spec_r = metrics.sens_spec(validation_y, validation_score, review)
    val_sens_u, val_spec_u = metrics.sens_spec(validation_y, validation_score, urgent)
    validation = dict(chosen["validation"], sensitivity_at_review=val_sens_r, specificity_at_review=val_spec_r,
                      sensitivity_at_urgent=val_sens_u, specificity_at_urgent=val_spec_u)
    rule["review"] = (f"the lower of: {rule['review']}; the highest threshold with calibration-part sensitivity >= "
                      f"{review_sensitivity}")
    rule["urgent"] = (f"the higher of: {rule['urgent']}; the lowest threshold with calibration-part specificity >= "
                      f"{urgent_specificity}")
    rule["review_from"] = "calibration part" if review_cal < chosen["review"] else "validation"
    rule["urgent_from"] = "calibration part" if urgent_cal > chosen["urgent"] else "validation"
    return dict(chosen, review=review, urgent=urgent, rule=rule, validation=validation, calibration={
        "n": int(len(score)), "n_abnormal": int(np.sum(y_abnormal)), "auc": metrics.auc(y_abnormal, score),
        "review": review_cal, "urgent": urgent_cal,
        "sensitivity_at_review": sens_r, "specificity_at_review": spec_r,
        "sensitivity_at_urgent": sens_u, "specificity_at_urgent": spec_u,
        "band_shares": {name: float(np.mean(metrics.bands(score, review, urgent) == k))
                        for k, name in enumerate(("normal", "review", "urgent"))}},
        validation_band_shares={name: float(np.mean(metrics.bands(validation_score, review, urgent) == k))
                                for k, name in enumerate(("normal", "review", "urgent"))})
