"""Local adaptation: fine-tune a signed package's model on a small folder-per-class dataset into a new version."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from sync.core.errors import ConfigError, ModelError
from models.pipeline import steps
from models.pipeline.data import dedupe, label_names, list_classes, list_samples, sha256_file, split_groups
from models.pipeline.job import Job, Work, write_json
from models.pipeline.package import headline_metrics, verify_package

log = logging.getLogger(__name__)


def bump_patch(version: str) -> str:
    major, minor, patch = (int(x) for x in version.split("."))
    return f"{major}.{minor}.{patch + 1}"


def local_split(data_dir: Path, labels: list[str], seed: int, test_fraction: float, val_fraction: float) -> dict:
    """Patient-wise, stratified train/val/test of a small local dataset, duplicates removed."""
    samples = list_samples(data_dir, labels)
    hashes = [sha256_file(s.path) for s in samples]
    keep, dedupe_report = dedupe(samples, hashes)
    samples, hashes = [samples[i] for i in keep], [hashes[i] for i in keep]
    rest, test = split_groups(samples, test_fraction, seed, hashes=hashes)
    rest_samples = [samples[i] for i in rest]
    train, val = split_groups(rest_samples, val_fraction / (1 - test_fraction), seed + 1,
                              hashes=[hashes[i] for i in rest])
    as_rows = lambda items: [[s.path, s.label] for s in items]  # noqa: E731
    parts = {"train": as_rows(rest_samples[i] for i in train), "val": as_rows(rest_samples[i] for i in val),
             "test": as_rows(samples[i] for i in test)}
    counts = {k: np.bincount([y for _, y in v], minlength=len(labels)).tolist() for k, v in parts.items()}
    for name, count in counts.items():
        if min(count) == 0:
            raise ConfigError(f"local data too small: the {name} part has no image of some class ({count}); "
                              "add images or use fewer classes")
    return dict(parts, labels=labels, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                source=str(data_dir.resolve()), dedupe=dedupe_report, counts=counts)


def adapt(package: Path, checkpoint: Path | None, data_dir: Path, work_dir: Path, *, out_root: Path, signing_key: Path,
          public_key: Path, trusted_keys: list[Path], version: str | None = None,
          abnormal_labels: list[str] | None = None, epochs: int = 8, lr: float = 3e-4, batch_size: int = 16,
          threads: int = 2, seed: int = 0, test_fraction: float = 0.25, val_fraction: float = 0.25,
          create_key: bool = False, resamples: int = 2000, created: str | None = None) -> tuple[Path, dict]:
    """Return (new package folder, {"before": ..., "after": ...}) measured on the same local held-out split.

    Without `checkpoint` (a site has only the signed package) the starting weights are recovered from the
    package's INT8 ONNX graph (see models.pipeline.qdq); with it, it must be the one the package was built from.
    """
    manifest = verify_package(package, trusted_keys)
    if checkpoint is not None:
        provenance = json.loads((package / "evaluation.json").read_text()).get("provenance", {})
        if provenance.get("checkpoint_sha256") != sha256_file(checkpoint):
            raise ModelError(f"{checkpoint} is not the checkpoint {manifest['name']} {manifest['version']} "
                             "was built from")

    labels = label_names(list_classes(data_dir))
    if set(labels) == set(manifest["labels"]):
        labels = list(manifest["labels"])
    abnormal = abnormal_labels or [name for name in manifest["abnormal_labels"] if name in labels]
    job = Job(name=manifest["name"], version=version or bump_patch(manifest["version"]), labels=labels,
              abnormal_labels=abnormal, train_dir=str(data_dir), task="binary" if len(labels) == 2 else "multiclass",
              description=manifest.get("description", ""), image_size=manifest["input"]["shape"][2], seed=seed,
              routing=manifest["routing"], training_data=manifest.get("training_data", {}),
              review_if_confidence_below=manifest.get("review_if_confidence_below"),
              preprocess=manifest["input"].get("preprocess"),
              parent={"name": manifest["name"], "version": manifest["version"],
                      "manifest_sha256": sha256_file(package / "manifest.json")})
    work = Work(work_dir)
    job.parent["init"] = "checkpoint" if checkpoint is not None else "package INT8 weights, dequantised"
    split = local_split(data_dir, labels, seed, test_fraction, val_fraction)
    if checkpoint is None:
        checkpoint = checkpoint_from_package(package, manifest, work, [p for p, _ in split["train"][:8]])
    job.parent["local_images"] = sum(len(split[k]) for k in ("train", "val", "test"))
    work.save_job(job)
    write_json(work.split, split)
    log.info("local split: %s", split["counts"])

    before = _score_parent(job, manifest, package, split["test"], resamples)
    steps.train(work, init_checkpoint=checkpoint, epochs=epochs, lr=lr, batch_size=batch_size, threads=threads,
                samples_per_epoch=max(len(split["train"]), batch_size * 4))
    steps.export(work)
    steps.quantise(work, min(200, len(split["train"])))
    steps.calibrate(work)
    steps.parity(work)
    after = steps.evaluate(work, resamples)
    folder = steps.package(work, out_root, signing_key, public_key, create_key, created, before=before)
    return folder, {"before": before, "after": headline_metrics(after)}


def checkpoint_from_package(package: Path, manifest: dict, work: Work, probes: list[str]) -> Path:
    """A starting checkpoint rebuilt from the package's ONNX Runtime INT8 graph, checked against that graph on
    `probes` (local images: noise gives every input the same score and would hide a wrong layer mapping)."""
    import torch

    from edge.preprocess import Preprocess
    from models.pipeline.data import load_images, normalise
    from models.pipeline.infer import OrtRunner, logits_for
    from models.pipeline.metrics import softmax
    from models.pipeline.model import ARCH, save_checkpoint
    from models.pipeline.qdq import torch_from_qdq

    if "onnxruntime" not in manifest.get("backends", {}):
        raise ModelError(f"{manifest['name']} {manifest['version']} has no ONNX Runtime model to recover weights "
                         "from: pass --checkpoint")
    onnx_path = package / manifest["backends"]["onnxruntime"]
    shape = manifest["input"]["shape"]
    arch = manifest.get("architecture") or ARCH  # packages before 1.3.0 do not say: they are all Lite0
    model = torch_from_qdq(onnx_path, len(manifest["labels"]), shape[2], work.root, arch=arch)
    # The recovered FP32 model must score like the INT8 graph it came from: a wrong layer mapping or a
    # graph this code does not understand shows up here, before any training.
    mean, std = manifest["input"]["mean"], manifest["input"]["std"]
    images = load_images(probes, shape[2], Preprocess.from_manifest(manifest["input"].get("preprocess")))
    with torch.inference_mode():
        ours = model(torch.from_numpy(np.stack([normalise(image, mean, std) for image in images]))).numpy()
    theirs = logits_for(OrtRunner(onnx_path), images, mean, std)
    gap = float(np.abs(softmax(ours) - softmax(theirs)).max())
    if gap > 0.1:
        raise ModelError(f"weights recovered from {onnx_path.name} score {gap:.3f} away from the INT8 graph")
    log.info("starting weights recovered from %s (max probability gap to INT8 %.4f)", onnx_path.name, gap)
    out = work.root / "init-from-package.pt"
    save_checkpoint(out, model, {"arch": arch, "labels": list(manifest["labels"]),
                                 "abnormal_labels": list(manifest["abnormal_labels"]), "image_size": shape[2],
                                 "mean": manifest["input"]["mean"], "std": manifest["input"]["std"],
                                 "bn_folded": True, "source": f"{manifest['name']} {manifest['version']} {onnx_path.name}"})
    return out


def _score_parent(job: Job, manifest: dict, package: Path, test: list[list], resamples: int) -> dict:
    """The parent package on the local held-out split, with its own thresholds (only if it knows these labels)."""
    from models.pipeline.evaluate import evaluate

    if list(manifest["labels"]) != job.labels:
        return {"note": f"parent labels {manifest['labels']} differ from local labels {job.labels}; "
                        "the parent model cannot score them", "auc": None}
    parent_job = Job(**{**job.__dict__, "abnormal_labels": list(manifest["abnormal_labels"])})
    report = evaluate(parent_job, test, {"ort_int8": package / manifest["backends"]["onnxruntime"]},
                      manifest["thresholds"], manifest["input"]["mean"], manifest["input"]["std"], resamples,
                      "local_test")
    return headline_metrics(report)
