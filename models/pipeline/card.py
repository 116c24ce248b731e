"""MODEL_CARD.md text built from the job, the checkpoint metadata and the evaluation reports."""
from __future__ import annotations

from models.pipeline.job import Job


def _pct(x) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.1f} %"


def _ci(pair) -> str:
    return "n/a" if not pair or None in pair else f"{100 * pair[0]:.1f}–{100 * pair[1]:.1f} %"


def _metrics_table(m: dict) -> str:
    rows = [("AUC (abnormal vs rest)", f"{m['auc']:.4f}", f"{m['auc_ci95'][0]:.4f}–{m['auc_ci95'][1]:.4f}")]
    for key, name in (("sensitivity_at_review", "Sensitivity at review threshold"),
                      ("specificity_at_review", "Specificity at review threshold"),
                      ("sensitivity_at_urgent", "Sensitivity at urgent threshold"),
                      ("specificity_at_urgent", "Specificity at urgent threshold")):
        rows.append((name, _pct(m[key]), _ci(m[key + "_ci95"])))
    lines = ["| metric | value | 95 % CI |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def model_card(job: Job, meta: dict, thresholds: dict, evaluation: dict, parity: dict, headline: dict,
               before: dict | None = None, note: str | None = None) -> str:
    bands = evaluation["abnormal_vs_rest"]["bands"]
    data = job.training_data
    kermany = data.get("doi") == "10.17632/rscbjbr9sj.2"
    lines = [
        f"# {job.name} {job.version}",
        "",
        "**NOT FOR CLINICAL USE.** Research and demonstration model; it has not been cleared by any regulator and "
        "must not be used to make or exclude a diagnosis.",
        "",
        "## Intended use",
        job.description,
        "",
        f"Triage aid for Wasla boxes: orders the reading queue into *urgent*, *review* and *normal* bands so that "
        f"a clinician sees likely {', '.join(job.abnormal_labels)} images first. Every image is still read by a "
        "person. The model never replaces a radiologist's or clinician's reading.",
        "",
        f"- Task: {job.task}; labels (output order): {', '.join(job.labels)}; abnormal: "
        f"{', '.join(job.abnormal_labels)}.",
        "- Score: sum of the softmax probabilities of the abnormal labels. Bands: score >= urgent -> urgent; "
        ">= review -> review; else normal.",
        f"- Thresholds (chosen on the validation split only): review = {thresholds['review']:.6f} "
        f"({thresholds['rule']['review']}), urgent = {thresholds['urgent']:.6f} ({thresholds['rule']['urgent']})"
        + ("; the same rule on each shipped model's own validation scores gives " + ", ".join(
            f"{k} review {v['review']:.6f} / urgent {v['urgent']:.6f}" for k, v in thresholds["by_backend"].items())
           + " (the box applies the one of the backend it runs)" if thresholds.get("by_backend") else "") + ".",
        f"- Input: greyscale replicated to 3 channels, squash-resized to {meta['image_size']}x{meta['image_size']} "
        f"(OpenCV INTER_AREA), scaled to [0, 1], then (x - {meta['mean'][0]}) / {meta['std'][0]}.",
        f"- Architecture: {meta['arch']} fine-tuned from ImageNet weights; INT8 for ONNX Runtime (static QDQ, "
        "u8 activations / s8 per-channel weights) and OpenVINO (NNCF).",
        "",
        "## Data",
    ]
    if kermany:
        lines += [
            f"Trained on {data['name']}: {data['attribution']}. DOI: [doi:{data['doi']}](https://doi.org/"
            f"{data['doi']}). Licence: {data['licence']} (attribution above; images not redistributed here).",
            "",
        ]
    else:
        lines += [f"Training data: {data.get('name', 'unspecified')}. Licence: {data.get('licence', 'unspecified')}. "
                  f"{data.get('attribution', '')}", ""]
    if job.parent:
        lines += [f"Adapted from {job.parent['name']} {job.parent['version']} on a local folder-per-class dataset "
                  f"({job.parent.get('local_images', '?')} images; kept on the box, not distributed)"
                  + (f"; starting weights: {job.parent['init']}" if job.parent.get("init") else "") + ".", ""]
    lines += [
        f"Validation: patient-wise, class-stratified split carved from the training folder (seed {job.seed}); "
        "exact duplicate files removed by sha256 so no copy sits on both sides. "
        + (note or "The test set was used once, for the figures below."),
        "",
        f"## Metrics (held-out {evaluation['split']} set, ONNX Runtime INT8, n = {headline['n']}: "
        f"{headline['n_abnormal']} abnormal, {headline['n_normal']} normal)",
        _metrics_table(headline),
        "",
        f"95 % CIs: AUC by percentile bootstrap, {evaluation['bootstrap']['resamples']} resamples stratified by "
        f"class, seed {evaluation['bootstrap']['seed']}; sensitivity and specificity by the Wilson score interval.",
        "",
        "Band counts (abnormal / normal): " + "; ".join(f"{k} {v['abnormal']} / {v['normal']}"
                                                           for k, v in bands.items()) + ".",
        "",
        "AUC by backend: " + ", ".join(f"{k} {v:.4f}" for k, v in evaluation["auc_by_backend"].items()) + ".",
        f"Validation parity: ORT INT8 vs OpenVINO INT8 band agreement "
        f"{_pct(parity['band_agreement_ort_vs_openvino_int8'])}; INT8 AUC drop vs FP32 "
        f"{parity['auc_drop_ort_int8_vs_fp32']:+.4f} (ORT), {parity['auc_drop_openvino_int8_vs_fp32']:+.4f} (OpenVINO).",
    ]
    if "band_agreement_ort_vs_openvino_int8" in evaluation:
        drop = evaluation.get("auc_drop_int8_vs_fp32", {})
        lines.append(f"Held-out parity: ORT INT8 vs OpenVINO INT8 band agreement "
                     f"{_pct(evaluation['band_agreement_ort_vs_openvino_int8'])} "
                     f"({evaluation['band_disagreements']} of {evaluation['n']} images differ)"
                     + (", INT8 AUC drop vs FP32 " + ", ".join(f"{drop[k]:+.4f} ({k})" for k in drop) if drop else "")
                     + ".")
    lines += [
        "",
    ]
    if before is not None:
        lines += ["## Before adaptation (same local held-out split, parent model and thresholds)",
                  _metrics_table(before) if before.get("auc") is not None else before.get("note", "n/a"), ""]
    if "multiclass" in evaluation:
        mc = evaluation["multiclass"]
        lines += [f"Multiclass accuracy {_pct(mc['accuracy'])}; recall per class: " +
                  ", ".join(f"{k} {_pct(v['recall'])}" for k, v in mc["per_class"].items()) + ".", ""]
    lines += ["## Limitations"]
    if kermany:
        lines += [
            "- Paediatric patients only (1–5 years, one centre in Guangzhou); adult chest X-rays are out of scope "
            "and performance on them is unknown.",
            "- Trained on 224x224 JPEG copies whose aspect ratio was squashed; full-resolution DICOM from other "
            "equipment, windowing and lossy compression differ from the training data.",
            "- Single source, single centre: no external validation; the test split comes from the same source.",
            "- Labels are normal vs pneumonia only (bacterial and viral pooled); other findings (effusion, TB, "
            "tubes and lines, fractures) are not recognised and may be scored either way.",
            "- Anterior-posterior views; lateral views are not handled.",
        ]
    by_backend = evaluation["auc_by_backend"]
    if "fp32" in by_backend and abs(by_backend["ort_int8"] - by_backend["fp32"]) > 0.005:
        lines.append(f"- On the held-out set the INT8 ONNX Runtime model does not track FP32 "
                     f"(AUC {by_backend['ort_int8']:.4f} vs {by_backend['fp32']:.4f}; OpenVINO INT8 "
                     f"{by_backend.get('openvino_int8', float('nan')):.4f}) although they match on validation: "
                     "quantisation error grows on images unlike the training data, in either direction.")
    if thresholds["rule"].get("urgent_raised_to_review"):
        lines.append("- On validation the specificity-based urgent threshold fell below the sensitivity-based review "
                     "threshold, so urgent was set equal to review and the review band is empty: every flagged "
                     "image is urgent.")
    lines += [
        "- Small local or validation sets give wide confidence intervals; thresholds carry that uncertainty.",
        "- Thresholds were set on validation scores; scores near a threshold can fall on either side with another "
        "backend, decoder or DICOM windowing (see band agreement).",
        "",
    ]
    return "\n".join(lines)
