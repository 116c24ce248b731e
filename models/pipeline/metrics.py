"""Scores, AUC, operating points, triage bands and bootstrap confidence intervals (numpy only)."""
from __future__ import annotations

import math

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def abnormal_score(probs: np.ndarray, abnormal_idx: list[int]) -> np.ndarray:
    """Score = sum of the softmax probabilities of the abnormal labels (the manifest's definition)."""
    return probs[:, abnormal_idx].sum(axis=1)


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC via the Mann-Whitney U statistic with midranks for ties; NaN when one class is absent."""
    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    sorted_scores = np.asarray(score)[order]
    ranks = np.empty(len(score), dtype=np.float64)
    i = 0
    while i < len(sorted_scores):
        j = i
        while j + 1 < len(sorted_scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def sens_spec(y: np.ndarray, score: np.ndarray, threshold: float) -> tuple[float, float]:
    y = np.asarray(y).astype(bool)
    flagged = np.asarray(score) >= threshold
    sens = float(flagged[y].mean()) if y.any() else float("nan")
    spec = float((~flagged[~y]).mean()) if (~y).any() else float("nan")
    return sens, spec


def review_threshold(y: np.ndarray, score: np.ndarray, min_sensitivity: float) -> float:
    """Highest threshold t with sensitivity (score >= t among abnormal) >= min_sensitivity."""
    pos = np.sort(np.asarray(score)[np.asarray(y).astype(bool)])[::-1]
    if len(pos) == 0:
        raise ValueError("no abnormal cases to choose the review threshold on")
    needed = math.ceil(min_sensitivity * len(pos) - 1e-9)
    return float(pos[max(needed, 1) - 1])


def review_threshold_lower_bound(y: np.ndarray, score: np.ndarray, min_sensitivity: float) -> float:
    """Highest threshold t whose sensitivity's 95 % Wilson lower bound is >= min_sensitivity.

    The plain rule stops at the observed rate, so half of all validation draws would overstate it; requiring
    the lower bound keeps the target for new patients with 95 % confidence (sampling error only, not shift).
    Falls back to the lowest abnormal score when even catching every case cannot show the target.
    """
    pos = np.sort(np.asarray(score)[np.asarray(y).astype(bool)])
    if len(pos) == 0:
        raise ValueError("no abnormal cases to choose the review threshold on")
    n, misses = len(pos), 0
    while misses + 1 < n and wilson_ci(n - misses - 1, n)[0] >= min_sensitivity:
        misses += 1
    return float(pos[misses])


def mid_gap(threshold: float, score: np.ndarray) -> float:
    """The threshold moved to the middle (in logit space) of the gap of validation scores it sits in.

    A rule's threshold lands on one case's score (or just above it); any value between that score and its
    neighbour gives every validation case the same band. The middle keeps the largest margin to both, so score
    noise between backends or CPUs (about 0.003 here, INT8 on ONNX Runtime vs OpenVINO) flips the fewest bands.
    """
    score = np.asarray(score, dtype=np.float64)
    below, above = score[score < threshold], score[score >= threshold]
    if len(below) == 0 or len(above) == 0:
        return float(threshold)
    lo, hi = (np.clip(v, 1e-7, 1 - 1e-7) for v in (below.max(), above.min()))
    mid = (math.log(lo / (1 - lo)) + math.log(hi / (1 - hi))) / 2
    value = 1 / (1 + math.exp(-mid))
    return float(min(max(value, np.nextafter(below.max(), np.inf)), above.min()))


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def quiet_threshold(threshold: float, a: np.ndarray, b: np.ndarray, direction: int, window: float = 0.25,
                    steps: int = 101) -> float:
    """The threshold moved up (direction +1) or down (-1) by at most `window` logits to where the fewest images
    sit near it on either backend.

    `a` and `b` are one image set's scores from two backends. An image is near a candidate when the candidate
    lies within the image's own backend gap (at least the set's median gap) of either score: those are the images
    whose band could differ between backends. Moving only away from the rule's own side keeps the rule's target
    (an urgent threshold only gets more specific, a review one only more sensitive)."""
    la, lb = _logit(a), _logit(b)
    gap = np.abs(la - lb)
    reach = np.maximum(gap, np.median(gap))
    lo, hi = np.minimum(la, lb) - reach, np.maximum(la, lb) + reach
    start = float(_logit(threshold))
    candidates = start + direction * np.linspace(0.0, window, steps)
    near = np.array([np.sum((lo < c) & (c < hi)) for c in candidates])
    best = candidates[int(np.argmin(near))]  # argmin: the first (closest to the rule's value) of equal counts
    return float(1 / (1 + math.exp(-best)))


def resolvable(n: int, rate: float) -> bool:
    """Whether n cases can show a rate of `rate` at all: below 1/(1 - rate) cases one miss already breaks it."""
    if rate >= 1.0:
        return True  # "catch every one" is the lowest case seen by definition: nothing to extrapolate
    return n >= math.ceil(1.0 / (1.0 - rate) - 1e-9)


def student_t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t without scipy: exact for 1 and 2 degrees of freedom, else the Cornish-Fisher
    expansion (Abramowitz & Stegun 26.7.5): 0.03 under the table at 3 degrees of freedom, within 0.01 from 4."""
    from statistics import NormalDist

    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def extrapolated_review_threshold(y: np.ndarray, score: np.ndarray, min_sensitivity: float) -> float:
    """A lower prediction bound for the (1 - min_sensitivity) quantile of the abnormal scores, in logit space.

    With fewer abnormal cases than `resolvable` needs (a site's tens of images), the empirical rule can only
    return the lowest abnormal score seen, an optimistic guess of where the lowest 2 % lie. Here: a normal fit to
    the abnormal scores' logits, widened as a prediction interval for a new case (Student's t with n - 1 degrees
    of freedom, spread x sqrt(1 + 1/n), never below half a logit). One case alone gives a threshold near 0:
    everything goes to review until there is more to go on.
    """
    pos = np.clip(np.asarray(score, dtype=np.float64)[np.asarray(y).astype(bool)], 1e-6, 1 - 1e-6)
    logits = np.log(pos / (1 - pos))
    n = len(logits)
    spread = max(float(np.std(logits, ddof=1)) if n > 1 else 0.0, 0.5) * math.sqrt(1 + 1 / max(n, 1))
    quantile = float(np.mean(logits)) + student_t_quantile(1 - min_sensitivity, max(n - 1, 1)) * spread
    return float(1 / (1 + math.exp(-quantile)))


def urgent_threshold(y: np.ndarray, score: np.ndarray, min_specificity: float) -> float:
    """Lowest threshold t with specificity (score < t among normal) >= min_specificity."""
    neg = np.sort(np.asarray(score)[~np.asarray(y).astype(bool)])
    if len(neg) == 0:
        raise ValueError("no normal cases to choose the urgent threshold on")
    needed = math.ceil(min_specificity * len(neg) - 1e-9)
    return float(np.nextafter(neg[max(needed, 1) - 1], np.inf))


def bands(score: np.ndarray, review: float, urgent: float) -> np.ndarray:
    """0 normal, 1 review, 2 urgent — the box's rule: >= urgent -> urgent; >= review -> review."""
    score = np.asarray(score)
    return np.where(score >= urgent, 2, np.where(score >= review, 1, 0))


def binary_report(y: np.ndarray, score: np.ndarray, thresholds: dict) -> dict:
    sens_r, spec_r = sens_spec(y, score, thresholds["review"])
    sens_u, spec_u = sens_spec(y, score, thresholds["urgent"])
    band = bands(score, thresholds["review"], thresholds["urgent"])
    y = np.asarray(y).astype(bool)
    return {
        "n": int(len(y)), "n_abnormal": int(y.sum()), "n_normal": int((~y).sum()),
        "auc": auc(y, score),
        "sensitivity_at_review": sens_r, "specificity_at_review": spec_r,
        "sensitivity_at_urgent": sens_u, "specificity_at_urgent": spec_u,
        "bands": {name: {"abnormal": int(((band == k) & y).sum()), "normal": int(((band == k) & ~y).sum())}
                  for k, name in enumerate(("normal", "review", "urgent"))},
    }


def wilson_ci(k: int, n: int, z: float = 1.959964) -> list[float]:
    """Wilson score 95 % interval of a proportion k/n: unlike a bootstrap it does not collapse to [1, 1] when every
    case was caught (223/223 -> 0.983-1.000)."""
    if n == 0:
        return [float("nan"), float("nan")]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def bootstrap_ci(y: np.ndarray, score: np.ndarray, thresholds: dict, resamples: int = 2000,
                 seed: int = 0) -> dict:
    """95 % CIs: AUC by percentile bootstrap (cases resampled with replacement, stratified by class so each draw has
    both); sensitivity and specificity by the Wilson score interval of their counts."""
    y = np.asarray(y).astype(bool)
    score = np.asarray(score)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    draws = {"auc": []}
    for _ in range(resamples):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        draws["auc"].append(auc(y[idx], score[idx]))
    out = {"auc_ci95": [float(np.percentile(draws["auc"], 2.5)), float(np.percentile(draws["auc"], 97.5))]}
    for name in ("review", "urgent"):
        flagged = score >= thresholds[name]
        out[f"sensitivity_at_{name}_ci95"] = wilson_ci(int(np.sum(flagged & y)), int(np.sum(y)))
        out[f"specificity_at_{name}_ci95"] = wilson_ci(int(np.sum(~flagged & ~y)), int(np.sum(~y)))
    return out


def multiclass_report(y: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict:
    pred = probs.argmax(axis=1)
    y = np.asarray(y)
    per_class = {}
    for k, name in enumerate(labels):
        per_class[name] = {
            "n": int((y == k).sum()),
            "recall": float((pred[y == k] == k).mean()) if (y == k).any() else float("nan"),
            "auc_one_vs_rest": auc(y == k, probs[:, k]),
        }
    confusion = np.zeros((len(labels), len(labels)), dtype=int)
    for t, p in zip(y, pred):
        confusion[t, p] += 1
    return {"accuracy": float((pred == y).mean()), "per_class": per_class, "confusion": confusion.tolist()}
