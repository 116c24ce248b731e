"""The work folder of one model build: its settings (config.json) and where each step's output lives."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sync.core.errors import ConfigError, NotFoundError

KERMANY = {
    "name": "Paediatric chest X-ray images (normal / pneumonia), Kermany et al.",
    "licence": "CC BY 4.0",
    "attribution": ("Kermany, Daniel; Zhang, Kang; Goldbaum, Michael (2018), \"Labeled Optical Coherence "
                    "Tomography (OCT) and Chest X-Ray Images for Classification\", Mendeley Data, v2"),
    "doi": "10.17632/rscbjbr9sj.2",
}


@dataclass
class Job:
    name: str
    version: str
    labels: list[str]
    abnormal_labels: list[str]
    train_dir: str
    test_dir: str | None = None
    task: str = "binary"
    description: str = ""
    image_size: int = 224
    arch: str = "efficientnet-lite0"
    seed: int = 0
    val_fraction: float = 0.12
    routing: list[dict] = field(default_factory=lambda: [{"Modality": ["CR", "DX"], "BodyPartExamined": ["CHEST", ""]}])
    training_data: dict = field(default_factory=lambda: dict(KERMANY))
    review_sensitivity: float = 0.98
    urgent_specificity: float = 0.95
    review_if_confidence_below: float | None = None
    parent: dict | None = None  # for adapted models: the package it was adapted from
    # The manifest's input.preprocess block (edge.preprocess.Preprocess); None: the 1.0/1.1 behaviour.
    preprocess: dict | None = None
    # Train on device-like renderings (models.pipeline.devicesim) and calibrate on a device-like validation set.
    device_like: bool = False
    # OpenVINO's INT8 model: "qdq" converts the ONNX Runtime QDQ graph (one quantised network for both backends),
    # "nncf" quantises the FP32 model separately (1.0/1.1).
    openvino_int8: str = "nncf"
    # "empirical": the highest threshold with validation sensitivity >= target (1.0/1.1); "lower_bound": the
    # highest whose 95 % Wilson lower bound is >= target (models.pipeline.metrics.review_threshold_lower_bound).
    review_rule: str = "empirical"
    # Move each threshold to the middle of the gap between the validation scores around it (metrics.mid_gap).
    mid_gap: bool = False
    # How ONNX Runtime quantises (models.pipeline.quantise.quantise_ort): None is the 1.0-1.2 recipe (MinMax, every
    # node). {"float_nodes": [...], "calibration": "percentile", "percentile": 99.999} keeps the named nodes in
    # float and calibrates activation ranges on a percentile.
    quantisation: dict | None = None
    # Share of the test folder's patients set aside (patient-wise, stratified) to calibrate thresholds on images of
    # the held-out population; the rest is the reported test set. 0: the whole test folder is reported (1.0-1.2).
    calibration_fraction: float = 0.0
    # Urgent threshold on that calibration part: the lowest with its specificity >= this.
    calibration_urgent_specificity: float = 0.90
    # Move each threshold (review down, urgent up, at most 0.25 logit) to where the fewest non-test images sit
    # within their ORT/OpenVINO score gap (metrics.quiet_threshold): fewer studies whose band depends on the backend.
    quiet_thresholds: bool = False
    # A package whose INT8 weights (dequantised, models.pipeline.qdq) replace training: {"name", "version",
    # "onnx_sha256"}. None: the weights come from this job's own training.
    weights_from: dict | None = None

    def pre(self):
        from edge.preprocess import Preprocess

        return Preprocess.from_manifest(self.preprocess)

    def validate(self) -> None:
        if self.task not in ("binary", "multiclass"):
            raise ConfigError(f"task must be 'binary' or 'multiclass', not {self.task!r}")
        if self.task == "binary" and len(self.labels) != 2:
            raise ConfigError(f"a binary task needs exactly 2 labels, got {self.labels}")
        unknown = set(self.abnormal_labels) - set(self.labels)
        if unknown or not self.abnormal_labels:
            raise ConfigError(f"abnormal_labels {self.abnormal_labels} must be a non-empty subset of {self.labels}")
        if set(self.abnormal_labels) == set(self.labels):
            raise ConfigError("at least one label must be non-abnormal")
        if self.review_rule not in ("empirical", "lower_bound"):
            raise ConfigError(f"review_rule must be 'empirical' or 'lower_bound', not {self.review_rule!r}")
        if not 0.0 <= self.calibration_fraction < 1.0:
            raise ConfigError(f"calibration_fraction must be in [0, 1), not {self.calibration_fraction}")
        if self.openvino_int8 not in ("qdq", "nncf"):
            raise ConfigError(f"openvino_int8 must be 'qdq' or 'nncf', not {self.openvino_int8!r}")


class Work:
    """Paths inside a work folder; every step reads and writes here, never in the dataset."""

    def __init__(self, root: Path):
        self.root = Path(root)

    config = property(lambda self: self.root / "config.json")
    split = property(lambda self: self.root / "split.json")
    checkpoint = property(lambda self: self.root / "checkpoint.pt")
    fp32 = property(lambda self: self.root / "model.fp32.onnx")
    ort_int8 = property(lambda self: self.root / "model.int8.onnx")
    ov_int8 = property(lambda self: self.root / "openvino" / "model.xml")
    thresholds = property(lambda self: self.root / "thresholds.json")
    parity = property(lambda self: self.root / "parity.json")
    evaluation = property(lambda self: self.root / "evaluation.json")

    def save_job(self, job: Job) -> None:
        job.validate()
        self.root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(json.dumps(asdict(job), indent=2, sort_keys=True) + "\n")

    def job(self) -> Job:
        if not self.config.is_file():
            raise NotFoundError(f"{self.config} does not exist: run the split step first")
        job = Job(**json.loads(self.config.read_text()))
        job.validate()
        return job

    def read(self, path: Path, step: str) -> dict:
        if not path.is_file():
            raise NotFoundError(f"{path} does not exist: run the {step} step first")
        return json.loads(path.read_text())


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
