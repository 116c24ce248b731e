"""The pipeline steps, each reading and writing one work folder; `run_all` chains them."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from sync.core.errors import ConfigError
from models.pipeline.data import load_images, load_split, make_split, sha256_file
from models.pipeline.job import Job, Work, write_json

log = logging.getLogger(__name__)

BACKENDS = ("fp32", "ort_int8", "openvino_int8")


def model_paths(work: Work) -> dict[str, Path]:
    return {"fp32": work.fp32, "ort_int8": work.ort_int8, "openvino_int8": work.ov_int8}


def meta_path(work: Work) -> Path:
    return work.root / "model_meta.json"


def split(work: Work, job: Job) -> dict:
    work.save_job(job)
    result = make_split(Path(job.train_dir), work.split, job.labels, job.val_fraction, job.seed)
    if job.calibration_fraction and job.test_dir:
        from models.pipeline.data import split_test

        result = split_test(work.split, Path(job.test_dir), job.labels, job.calibration_fraction, job.seed)
    return result


def weights_from_package(work: Work, package_dir: Path, trusted_keys: list[Path]) -> Path:
    """Start from a signed package's weights instead of training: its INT8 graph dequantised into a checkpoint
    (checked to score like that graph), so a new quantisation or new thresholds keep the weights already shipped."""
    from models.pipeline.adapt import checkpoint_from_package
    from models.pipeline.package import verify_package

    job = work.job()
    manifest = verify_package(package_dir, trusted_keys)
    probes = [p for p, _ in load_split(work.split)["train"][:8]]
    recovered = checkpoint_from_package(package_dir, manifest, work, probes)
    recovered.replace(work.checkpoint)
    job.weights_from = {"name": manifest["name"], "version": manifest["version"],
                        "onnx_sha256": sha256_file(package_dir / manifest["backends"]["onnxruntime"])}
    work.save_job(job)
    log.info("weights of %s %s recovered into %s", manifest["name"], manifest["version"], work.checkpoint)
    return work.checkpoint


def train(work: Work, **options) -> dict:
    from models.pipeline import train as training

    job = work.job()
    meta = training.train(work.split, work.checkpoint, abnormal_labels=job.abnormal_labels,
                          image_size=job.image_size, seed=job.seed, pre=job.pre(), device_like=job.device_like,
                          arch=job.arch,
                          **options)
    return meta


def export(work: Work) -> dict:
    """FP32 ONNX from the checkpoint, plus model_meta.json so later steps need no torch."""
    import torch

    from models.pipeline.model import export_onnx, load_checkpoint

    model, meta = load_checkpoint(work.checkpoint)
    export_onnx(model, meta["image_size"], work.fp32)
    # the exported graph must reproduce torch on a real validation image
    val = load_split(work.split)["val"][:4]
    from models.pipeline.infer import OrtRunner, logits_for
    from models.pipeline.train import to_tensor

    images = load_images([p for p, _ in val], meta["image_size"], work.job().pre())
    with torch.inference_mode():
        expected = model(to_tensor(images, meta["mean"], meta["std"])).numpy()
    got = logits_for(OrtRunner(work.fp32), images, meta["mean"], meta["std"])
    if not np.allclose(expected, got, atol=1e-3):
        raise ConfigError(f"ONNX export differs from torch by {np.abs(expected - got).max():.2e}")
    meta = dict(meta, checkpoint_sha256=sha256_file(work.checkpoint), fp32_sha256=sha256_file(work.fp32))
    write_json(meta_path(work), meta)
    log.info("exported %s (max |torch - onnx| %.1e)", work.fp32, np.abs(expected - got).max())
    return meta


def quantise(work: Work, calibration_images: int = 200) -> None:
    from models.pipeline import quantise as q

    job, meta = work.job(), work.read(meta_path(work), "export")
    images = q.calibration_images(load_split(work.split)["train"], calibration_images, meta["image_size"], job.seed,
                                  job.pre())
    q.quantise_ort(work.fp32, work.ort_int8, images, meta["mean"], meta["std"], job.quantisation)
    if job.openvino_int8 == "qdq":
        q.openvino_from_qdq(work.ort_int8, work.ov_int8)
    else:
        q.quantise_openvino(work.fp32, work.ov_int8, images, meta["mean"], meta["std"])


# The runner each shipped backend uses, and the manifest key the box knows it by.
SHIPPED = {"ort_int8": "onnxruntime", "openvino_int8": "openvino"}


def calibrate(work: Work, backend: str = "ort_int8") -> dict:
    """Thresholds from validation scores: the primary ones from `backend` (default: the ORT INT8 model the box runs
    by default), and each shipped INT8 model's own, chosen by the same rule on its own validation scores."""
    from models.pipeline.calibrate import choose_thresholds
    from models.pipeline.evaluate import is_abnormal, runners, scores

    job, meta = work.job(), work.read(meta_path(work), "export")
    split_data = load_split(work.split)
    val = split_data["val"]
    if job.device_like:
        from models.pipeline import deviceset

        # The clean validation split is saturated (AUC ~0.9998): every threshold rule lands in the same gap and
        # the review band comes out empty. Its device-like rendering is what a box sees, and is not saturated.
        images = deviceset.build(work, "validation", val, job)["images"]
    else:
        images = load_images([p for p, _ in val], meta["image_size"], job.pre())
    y = np.array([label for _, label in val])
    paths = model_paths(work)
    chosen, val_scores = {}, {}
    for name in dict.fromkeys([backend, *SHIPPED]):
        _, score = scores(runners({name: paths[name]})[name], images, job, meta["mean"], meta["std"])
        val_scores[name] = score
        chosen[name] = choose_thresholds(is_abnormal(y, job), score, job.review_sensitivity, job.urgent_specificity,
                                         job.review_rule, job.mid_gap)
        chosen[name]["urgent"] = min(chosen[name]["urgent"], 1.0)
    cal_y, cal_scores = None, {}
    if "calibration" in split_data:
        cal = split_data["calibration"]
        cal_y, cal_scores = _calibration_scores(work, job, meta, cal, [*chosen, *SHIPPED])
        for name in chosen:
            chosen[name] = _with_calibration_part(job, chosen[name], is_abnormal(y, job), val_scores[name], cal_y,
                                                  cal_scores[name], len(cal))
    result = dict(chosen[backend])
    result["scored_with"] = backend
    result["validation_set"] = "device-like validation (models.pipeline.deviceset)" if job.device_like \
        else "validation"
    if job.openvino_int8 == "qdq" and job.quiet_thresholds:
        result = _quiet(result, val_scores, cal_scores)
    if job.openvino_int8 == "qdq":
        # One quantised network on both runtimes: scores differ by rounding only (mean 0.006 on device-like
        # validation), while thresholds chosen per backend hinge on single extreme cases and differed by up to 0.09;
        # shared thresholds kept every clean validation image in the same band on both (per-backend: 98.7 %).
        result["by_backend"] = {key: {"review": result["review"], "urgent": result["urgent"]}
                                for key in SHIPPED.values()}
        result["rule"] = dict(result["rule"], shared="the same thresholds for every backend (one QDQ network)")
        result["own_by_backend"] = {key: {"review": chosen[name]["review"], "urgent": chosen[name]["urgent"]}
                                    for name, key in SHIPPED.items()}
    else:
        result["by_backend"] = {key: {"review": chosen[name]["review"], "urgent": chosen[name]["urgent"]}
                                for name, key in SHIPPED.items()}
    write_json(work.thresholds, result)
    log.info("thresholds: review %.6f urgent %.6f (validation AUC %.4f); per backend %s", result["review"],
             result["urgent"], result["validation"]["auc"], result["by_backend"])
    return result


def _calibration_scores(work: Work, job: Job, meta: dict, cal: list[list],
                        names: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The calibration part's clean and device-like images (pooled), decoded once and scored once per model."""
    from models.pipeline.evaluate import is_abnormal, runners, scores

    images = [load_images([p for p, _ in cal], meta["image_size"], job.pre())]
    if job.device_like:
        from models.pipeline import deviceset

        images.append(deviceset.build(work, "calibration", cal, job)["images"])
    y = is_abnormal(np.concatenate([np.array([label for _, label in cal])] * len(images)), job)
    paths = model_paths(work)
    out = {}
    for name in dict.fromkeys(names):
        runner = runners({name: paths[name]})[name]
        out[name] = np.concatenate([scores(runner, batch, job, meta["mean"], meta["std"])[1] for batch in images])
    return y, out


def _quiet(result: dict, val_scores: dict, cal_scores: dict) -> dict:
    """Both thresholds moved (review down, urgent up, at most 0.25 logit) off the spots where the non-test images
    crowd, scored by both shipped backends: fewer studies there whose band depends on the backend."""
    from models.pipeline.metrics import bands, quiet_threshold

    a = np.concatenate([val_scores["ort_int8"], *([cal_scores["ort_int8"]] if cal_scores else [])])
    b = np.concatenate([val_scores["openvino_int8"], *([cal_scores["openvino_int8"]] if cal_scores else [])])
    before = {"review": result["review"], "urgent": result["urgent"],
              "band_disagreements": int(np.sum(bands(a, result["review"], result["urgent"])
                                               != bands(b, result["review"], result["urgent"])))}
    review = quiet_threshold(result["review"], a, b, -1)
    urgent = max(quiet_threshold(result["urgent"], a, b, +1), review)
    after = int(np.sum(bands(a, review, urgent) != bands(b, review, urgent)))
    log.info("quiet placement: review %.4f -> %.4f, urgent %.4f -> %.4f; non-test ORT/OpenVINO band "
             "disagreements %d -> %d of %d", result["review"], review, result["urgent"], urgent,
             before["band_disagreements"], after, len(a))
    rule = dict(result["rule"], quiet=("then each moved (review down, urgent up, at most 0.25 logit) to where the "
                                       "fewest non-test images sit within their ORT/OpenVINO score gap"))
    return dict(result, review=review, urgent=urgent, rule=rule,
                quiet={"before": before, "band_disagreements": after, "n": int(len(a))})


def _with_calibration_part(job: Job, chosen: dict, val_y: np.ndarray, val_score: np.ndarray, cal_y: np.ndarray,
                           cal_score: np.ndarray, n_images: int) -> dict:
    """The thresholds widened on the test folder's calibration part, its clean and device-like images pooled."""
    from models.pipeline.calibrate import with_calibration_part

    result = with_calibration_part(chosen, val_y, val_score, cal_y, cal_score, job.review_sensitivity,
                                   job.calibration_urgent_specificity, job.mid_gap)
    result["calibration"]["set"] = (f"calibration part of the test folder ({n_images} images of "
                                    f"{job.calibration_fraction:.0%} of its patients), clean"
                                    + (" and device-like" if job.device_like else ""))
    log.info("calibration part: review %.4f urgent %.4f -> review %.4f urgent %.4f; shares %s",
             result["calibration"]["review"], result["calibration"]["urgent"], result["review"], result["urgent"],
             result["calibration"]["band_shares"])
    return result


def parity(work: Work) -> dict:
    from models.pipeline.evaluate import parity as check

    job, meta = work.job(), work.read(meta_path(work), "export")
    thresholds = work.read(work.thresholds, "calibrate")
    val = load_split(work.split)["val"]
    result = check(job, val, model_paths(work), thresholds, meta["mean"], meta["std"])
    if job.device_like:
        from models.pipeline import deviceset

        images = deviceset.build(work, "validation", val, job)["images"]
        result["device_like"] = check(job, val, model_paths(work), thresholds, meta["mean"], meta["std"],
                                      images=images, split_name="device-like validation")
    write_json(work.parity, result)
    log.info("parity: AUC %s, ORT/OpenVINO band agreement %.4f", result["auc"],
             result["band_agreement_ort_vs_openvino_int8"])
    return result


def evaluate(work: Work, resamples: int = 2000) -> dict:
    from models.pipeline.evaluate import evaluate as run, test_samples

    job, meta = work.job(), work.read(meta_path(work), "export")
    thresholds = work.read(work.thresholds, "calibrate")
    if work.evaluation.exists():
        log.warning("%s exists: the test set is being scored again (thresholds must not be re-tuned on it)",
                    work.evaluation)
    test, name = test_samples(job, load_split(work.split))
    # Every scoring of the held-out set is counted, and the count goes into the card.
    ledger = work.root / "scored.json"
    scored = json.loads(ledger.read_text()) if ledger.is_file() else {"count": 0}
    scored["count"] += 1
    write_json(ledger, scored)
    report = run(job, test, model_paths(work), thresholds, meta["mean"], meta["std"], resamples, name)
    if job.device_like:
        from models.pipeline import deviceset

        device = deviceset.build(work, name, test, job)
        report["device_like"] = run(job, test, model_paths(work), thresholds, meta["mean"], meta["std"], resamples,
                                    f"{name} (device-like)", images=device["images"], recipes=device["recipes"])
        report["device_like"]["set"] = deviceset.describe(device["recipes"])
    report["scored"] = scored
    write_json(work.evaluation, report)
    return report


def package(work: Work, out_root: Path, signing_key: Path, public_key: Path, create_key: bool = False,
            created: str | None = None, before: dict | None = None, note: str | None = None) -> Path:
    from models.pipeline.card import model_card
    from models.pipeline.package import ensure_signing_key, headline_metrics, write_package

    job, meta = work.job(), work.read(meta_path(work), "export")
    thresholds = work.read(work.thresholds, "calibrate")
    parity_report = work.read(work.parity, "parity")
    evaluation = work.read(work.evaluation, "evaluate")
    headline = headline_metrics(evaluation)
    metrics = {evaluation["split"]: headline,
               "validation": thresholds["validation"],
               "int8_vs_fp32_validation_auc": parity_report["auc"],
               "band_agreement_ort_vs_openvino_int8": parity_report["band_agreement_ort_vs_openvino_int8"]}
    if before is not None:
        metrics[evaluation["split"] + "_before"] = before
    report = {
        "evaluation": evaluation,
        "thresholds": thresholds,
        "parity": parity_report,
        "training": {k: meta.get(k) for k in ("arch", "epoch", "val_auc", "val_accuracy", "history", "seed",
                                              "train_seconds", "pretrained", "image_size", "mean", "std")},
        "split": {k: v for k, v in load_split(work.split).items() if k in ("counts", "dedupe", "seed", "val_fraction")},
        "provenance": {"checkpoint_sha256": meta["checkpoint_sha256"], "fp32_onnx_sha256": meta["fp32_sha256"],
                       "parent": job.parent},
    }
    if before is not None:
        report["before_adaptation"] = before
    ensure_signing_key(signing_key, public_key, create_key)
    card = model_card(job, meta, thresholds, evaluation, parity_report, headline, before, note)
    return write_package(job, out_root, ort_int8=work.ort_int8, ov_xml=work.ov_int8, thresholds=thresholds,
                         meta=meta, evaluation=report, metrics=metrics, model_card=card,
                         signing_key=signing_key, created=created)


def run_all(work: Work, job: Job, *, out_root: Path, signing_key: Path, public_key: Path, create_key: bool,
            train_options: dict, calibration_images: int = 200, resamples: int = 2000,
            created: str | None = None, note: str | None = None) -> Path:
    split(work, job)
    train(work, **train_options)
    export(work)
    quantise(work, calibration_images)
    calibrate(work)
    parity(work)
    evaluate(work, resamples)
    return package(work, out_root, signing_key, public_key, create_key, created, note=note)
