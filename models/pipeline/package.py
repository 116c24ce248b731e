"""Writing, signing and verifying model packages exactly as docs/model-package.md specifies."""
from __future__ import annotations

import json
import logging
import math
import shutil
from datetime import datetime, timezone
from pathlib import Path

from edge import signing
from sync.core.errors import ModelError, ModelIntegrityError, NotFoundError
from models.pipeline.data import sha256_file
from models.pipeline.job import Job

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 8 * 1024 * 1024
DEFAULT_KEY = Path(".keys/model-signing.key")
DEFAULT_PUBLIC_KEY = Path("models/keys/wasla-dev.pub")


def ensure_signing_key(private: Path, public: Path, create: bool) -> None:
    """Create the development key pair when asked to and it is missing; the public half goes next to the code."""
    if private.is_file():
        return
    if not create:
        raise NotFoundError(f"signing key {private} does not exist")
    if public.exists():
        # Overwriting it would make every package the old key signed unverifiable on the boxes.
        raise ModelError(f"signing key {private} is missing but {public} exists: pass --public-key NEW.pub "
                         "for a new key pair, or restore the private key")
    kid = signing.generate_keypair(private, public)
    log.warning("generated a new signing key %s (id %s); public key in %s", private, kid, public)


def _clean(value):
    """JSON-safe copy: NaN/inf become null (strict JSON parsers reject them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(_clean(manifest), indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
            + "\n").encode("utf-8")


def headline_metrics(report: dict) -> dict:
    """The manifest's metric summary of one evaluation report (abnormal-vs-rest), with CIs."""
    binary = report["abnormal_vs_rest"]
    keys = ("auc", "sensitivity_at_review", "specificity_at_review", "sensitivity_at_urgent", "specificity_at_urgent")
    out = {"n": binary["n"], "n_abnormal": binary["n_abnormal"], "n_normal": binary["n_normal"]}
    for key in keys:
        out[key] = binary[key]
        out[key + "_ci95"] = binary[key + "_ci95"]
    if "multiclass" in report:
        out["accuracy"] = report["multiclass"]["accuracy"]
    return out


def manifest_thresholds(thresholds: dict) -> dict:
    out = {"review": thresholds["review"], "urgent": thresholds["urgent"]}
    if thresholds.get("by_backend"):
        out["by_backend"] = thresholds["by_backend"]
    return out


def write_package(job: Job, out_root: Path, *, ort_int8: Path, ov_xml: Path, thresholds: dict, meta: dict,
                  evaluation: dict, metrics: dict, model_card: str, signing_key: Path,
                  created: str | None = None) -> Path:
    """Write models/<name>/<version>/ with every file hashed into manifest.json and manifest.sig."""
    folder = Path(out_root) / job.name / job.version
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "openvino").mkdir(parents=True)
    shutil.copyfile(ort_int8, folder / "model.int8.onnx")
    shutil.copyfile(ov_xml, folder / "openvino" / "model.xml")
    shutil.copyfile(ov_xml.with_suffix(".bin"), folder / "openvino" / "model.bin")
    (folder / "MODEL_CARD.md").write_text(model_card, encoding="utf-8")
    (folder / "evaluation.json").write_text(
        json.dumps(_clean(evaluation), indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")

    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ModelError(f"{rel} is {path.stat().st_size} bytes, over the {MAX_FILE_BYTES}-byte limit")
        files[rel] = sha256_file(path)

    key = signing.load_private(signing_key)
    size = meta["image_size"]
    manifest = {
        "format": 1,
        "name": job.name,
        "version": job.version,
        "task": job.task,
        "description": job.description,
        "labels": job.labels,
        "abnormal_labels": job.abnormal_labels,
        "thresholds": manifest_thresholds(thresholds),
        "review_if_confidence_below": job.review_if_confidence_below if job.task == "multiclass" else None,
        "input": {"name": "input", "shape": [1, 3, size, size], "colour": "grey3", "resize": "squash",
                  "mean": meta["mean"], "std": meta["std"], "frames": "middle",
                  **({"preprocess": job.pre().to_manifest()} if job.preprocess else {})},
        "output": {"name": "logits", "activation": "softmax"},
        "architecture": meta.get("arch", "efficientnet-lite0"),
        "routing": job.routing,
        "backends": {"onnxruntime": "model.int8.onnx", "openvino": "openvino/model.xml"},
        "files": files,
        "training_data": job.training_data,
        "metrics": metrics,
        "created": created or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "signing_key_id": signing.public_key_id(key),
    }
    data = manifest_bytes(manifest)
    (folder / "manifest.json").write_bytes(data)
    (folder / "manifest.sig").write_bytes(signing.sign(data, key))
    log.info("package %s@%s written to %s (key %s)", job.name, job.version, folder, manifest["signing_key_id"])
    return folder


def verify_package(folder: Path, public_keys: list[Path]) -> dict:
    """Check the signature against the given public keys and every listed file's sha256; return the manifest."""
    folder = Path(folder)
    trusted = dict(signing.load_public(p) for p in public_keys)
    data = (folder / "manifest.json").read_bytes()
    kid = signing.verify(data, (folder / "manifest.sig").read_bytes(), trusted)
    manifest = json.loads(data)
    if manifest.get("signing_key_id") != kid:
        raise ModelIntegrityError(f"{folder}: signing_key_id does not name the key that signed it")
    listed = set(manifest["files"]) | {"manifest.json", "manifest.sig"}
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    if present != listed:
        raise ModelIntegrityError(f"{folder}: files on disk {sorted(present ^ listed)} differ from the manifest")
    for rel, digest in manifest["files"].items():
        if sha256_file(folder / rel) != digest:
            raise ModelIntegrityError(f"{folder}: sha256 of {rel} does not match the manifest")
    return manifest
