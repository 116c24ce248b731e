"""Scoring the exported models: validation parity between backends and the one held-out test evaluation."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from models.pipeline import metrics
from models.pipeline.data import load_images, list_samples, sha256_file
from models.pipeline.infer import OpenVinoRunner, OrtRunner, logits_for
from models.pipeline.job import Job

log = logging.getLogger(__name__)


def scores(runner, images: np.ndarray, job: Job, mean: list[float], std: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(softmax probabilities, abnormal score) of every image."""
    probs = metrics.softmax(logits_for(runner, images, mean, std))
    abnormal_idx = [job.labels.index(name) for name in job.abnormal_labels]
    return probs, metrics.abnormal_score(probs, abnormal_idx)


def is_abnormal(y: np.ndarray, job: Job) -> np.ndarray:
    return np.isin(y, [job.labels.index(name) for name in job.abnormal_labels])


def runners(paths: dict[str, Path], threads: int = 2) -> dict:
    out = {}
    for name, path in paths.items():
        out[name] = OpenVinoRunner(path, threads) if path.suffix == ".xml" else OrtRunner(path, threads)
    return out


# Evaluation runner -> the manifest's backend key (per-backend thresholds are stored under it).
BACKEND_KEY = {"ort_int8": "onnxruntime", "openvino_int8": "openvino"}


def backend_thresholds(thresholds: dict, runner_name: str) -> tuple[float, float]:
    """(review, urgent) the box would apply with this model: its own when calibrated per backend, else the shared."""
    own = thresholds.get("by_backend", {}).get(BACKEND_KEY.get(runner_name, ""), thresholds)
    return own["review"], own["urgent"]


def band_agreement(bands: dict) -> dict:
    agree = bands["ort_int8"] == bands["openvino_int8"]
    return {"band_agreement_ort_vs_openvino_int8": float(agree.mean()), "band_disagreements": int((~agree).sum())}


def parity(job: Job, val: list[list], paths: dict[str, Path], thresholds: dict, mean, std,
           images: np.ndarray | None = None, split_name: str = "validation") -> dict:
    """INT8 vs FP32 AUC and ORT-vs-OpenVINO INT8 triage-band agreement on the validation split (or `images`)."""
    if images is None:
        images = load_images([p for p, _ in val], job.image_size, job.pre())
    y = np.array([label for _, label in val])
    abnormal = is_abnormal(y, job)
    result = {"split": split_name, "n": len(val), "auc": {}, "accuracy": {}}
    band, score_of = {}, {}
    for name, runner in runners(paths).items():
        probs, score = scores(runner, images, job, mean, std)
        score_of[name] = score
        result["auc"][name] = metrics.auc(abnormal, score)
        result["accuracy"][name] = float((probs.argmax(1) == y).mean())
        band[name] = metrics.bands(score, *backend_thresholds(thresholds, name))
        if isinstance(runner, OpenVinoRunner):
            result[f"{name}_inference_precision"] = runner.precision
    result["auc_drop_ort_int8_vs_fp32"] = result["auc"]["fp32"] - result["auc"]["ort_int8"]
    result["auc_drop_openvino_int8_vs_fp32"] = result["auc"]["fp32"] - result["auc"]["openvino_int8"]
    result.update(band_agreement(band))
    # How closely each INT8 model tracks FP32 image by image (AUC alone saturates on this validation split).
    result["score_gap_vs_fp32"] = {
        name: {"mean": float(np.mean(np.abs(score_of[name] - score_of["fp32"]))),
               "p95": float(np.percentile(np.abs(score_of[name] - score_of["fp32"]), 95))}
        for name in BACKEND_KEY if name in score_of and "fp32" in score_of}
    result["band_agreement_ort_int8_vs_fp32"] = float((band["ort_int8"] == band["fp32"]).mean())
    return result


def test_samples(job: Job, split: dict) -> tuple[list[list], str]:
    """The held-out cases and their name: a local split's own test part, else the dataset's test folder."""
    if "test" in split:
        return split["test"], "local_test"
    if "test_report" in split:  # the test folder less its calibration part
        return split["test_report"], "test"
    return [[s.path, s.label] for s in list_samples(Path(job.test_dir), job.labels)], "test"


def band_shares(score: np.ndarray, review: float, urgent: float) -> dict:
    """Share of studies in each band with its Wilson 95 % interval: the reading volume triage sorts."""
    band = metrics.bands(score, review, urgent)
    n = len(band)
    return {name: {"n": int((band == k).sum()), "share": float((band == k).mean()) if n else float("nan"),
                   "share_ci95": metrics.wilson_ci(int((band == k).sum()), n)}
            for k, name in enumerate(("normal", "review", "urgent"))}


def evaluate(job: Job, test: list[list], paths: dict[str, Path], thresholds: dict, mean, std,
             resamples: int = 2000, split_name: str = "test", images: np.ndarray | None = None,
             recipes: list[dict] | None = None) -> dict:
    """The held-out report: primary model ORT INT8 (what the box runs by default), with 95 % bootstrap CIs.

    `images` (already preprocessed pictures, e.g. a device-like set) replaces loading the files of `test`;
    `recipes` (one per image) adds sensitivity and specificity per device chain and transfer syntax."""
    if images is None:
        images = load_images([p for p, _ in test], job.image_size, job.pre())
    y = np.array([label for _, label in test])
    abnormal = is_abnormal(y, job)
    report = {"split": split_name, "n": len(test), "primary_backend": "onnxruntime",
              "thresholds": {k: thresholds[k] for k in ("review", "urgent", "by_backend") if k in thresholds},
              "bootstrap": {"resamples": resamples, "seed": job.seed, "method": "percentile, stratified by class"},
              "models": {name: {"file": path.name, "sha256": sha256_file(path)} for name, path in paths.items()},
              "auc_by_backend": {}}
    primary, band = None, {}
    report["by_backend"] = {}
    for name, runner in runners(paths).items():
        probs, score = scores(runner, images, job, mean, std)
        report["auc_by_backend"][name] = metrics.auc(abnormal, score)
        review, urgent = backend_thresholds(thresholds, name)
        band[name] = metrics.bands(score, review, urgent)
        sens, spec = metrics.sens_spec(abnormal, score, review)
        report["by_backend"][name] = {
            "auc": report["auc_by_backend"][name], "sensitivity_at_review": sens, "specificity_at_review": spec,
            "sensitivity_at_review_ci95": metrics.wilson_ci(int(np.sum((score >= review) & abnormal)),
                                                            int(abnormal.sum())),
            "band_shares": band_shares(score, review, urgent)}
        if isinstance(runner, OpenVinoRunner):
            report["by_backend"][name]["inference_precision"] = runner.precision
        if name == "ort_int8":
            primary = (probs, score)
    # The parity goals are on held-out images: INT8 vs FP32 AUC and ORT vs OpenVINO triage bands.
    report["auc_drop_int8_vs_fp32"] = {name: report["auc_by_backend"]["fp32"] - report["auc_by_backend"][name]
                                       for name in BACKEND_KEY if name in report["auc_by_backend"]} \
        if "fp32" in report["auc_by_backend"] else {}
    if {"ort_int8", "openvino_int8"} <= set(band):
        report.update(band_agreement(band))
    probs, score = primary
    binary = metrics.binary_report(abnormal, score, thresholds)
    binary.update(metrics.bootstrap_ci(abnormal, score, thresholds, resamples, job.seed))
    report["abnormal_vs_rest"] = binary
    review, urgent = backend_thresholds(thresholds, "ort_int8")
    report["band_shares"] = band_shares(score, review, urgent)
    if recipes is not None:
        report["by_recipe"] = by_recipe(abnormal, score, review, recipes)
    if job.task == "multiclass":
        report["multiclass"] = metrics.multiclass_report(y, probs, job.labels)
    log.info("test: AUC %.4f %s, sensitivity@review %.4f, specificity@review %.4f", binary["auc"],
             binary["auc_ci95"], binary["sensitivity_at_review"], binary["specificity_at_review"])
    return report


def by_recipe(abnormal: np.ndarray, score: np.ndarray, review: float, recipes: list[dict]) -> dict:
    """Sensitivity and specificity at review for each device chain and each transfer syntax of a device-like set."""
    out: dict = {}
    for field in ("chain", "syntax"):
        out[field] = {}
        for value in sorted({r[field] for r in recipes}):
            idx = np.array([r[field] == value for r in recipes])
            flagged = score[idx] >= review
            pos, neg = abnormal[idx], ~abnormal[idx]
            out[field][value] = {"n": int(idx.sum()), "n_abnormal": int(pos.sum()),
                                 "sensitivity_at_review": float(flagged[pos].mean()) if pos.any() else None,
                                 "specificity_at_review": float((~flagged[neg]).mean()) if neg.any() else None}
    return out
