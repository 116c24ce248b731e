"""Dataset listing, patient-wise splitting and the box-identical image preprocessing."""
from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from sync.core.errors import BadInputError, NotFoundError
from edge.imaging import InputSpec, model_picture, to_tensor
from edge.preprocess import Preprocess, to_u8, u8_to_frame
from edge.preprocess import normalise as preprocess_normalise

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff"}
# Kermany names: person123_bacteria_45.jpeg, IM-0115-0001.jpeg, NORMAL2-IM-1427-0001.jpeg
_PATIENT_PATTERNS = (re.compile(r"^(person\d+)[_-]", re.I), re.compile(r"^((?:NORMAL\d*-)?IM-\d+)-", re.I))


@dataclass(frozen=True)
class Sample:
    path: str  # absolute path
    label: int


def patient_id(filename: str) -> str:
    """Patient key from a file name; files with no recognisable patient are their own patient."""
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(filename)
        if match:
            return match.group(1).upper()
    return Path(filename).stem


def list_classes(folder: Path) -> list[str]:
    """Class folder names (sorted, case kept) under `folder`."""
    if not folder.is_dir():
        raise NotFoundError(f"dataset folder {folder} does not exist")
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(names) < 2:
        raise BadInputError(f"{folder} needs at least two class folders, found {names}")
    return names


def label_names(class_folders: list[str]) -> list[str]:
    return [name.lower() for name in class_folders]


def list_samples(folder: Path, labels: list[str]) -> list[Sample]:
    """Every image under folder/<class>/ whose lower-cased class name is in `labels`."""
    samples = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        name = class_dir.name.lower()
        if name not in labels:
            raise BadInputError(f"class folder {class_dir} is not one of the labels {labels}")
        for path in sorted(class_dir.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                samples.append(Sample(str(path.resolve()), labels.index(name)))
    if not samples:
        raise NotFoundError(f"no images under {folder}")
    return samples


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _components(samples: list[Sample], hashes: list[str]) -> list[list[int]]:
    """Groups of sample indices linked by patient id or identical content (union-find)."""
    parent = list(range(len(samples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_by_key: dict[str, int] = {}
    for i, sample in enumerate(samples):
        for key in ("p:" + patient_id(Path(sample.path).name), "h:" + hashes[i]):
            if key in first_by_key:
                parent[find(i)] = find(first_by_key[key])
            else:
                first_by_key[key] = i
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(samples)):
        groups[find(i)].append(i)
    return list(groups.values())


def dedupe(samples: list[Sample], hashes: list[str]) -> tuple[list[int], dict]:
    """Keep one file per content hash; drop every copy of content that carries conflicting labels."""
    labels_by_hash: dict[str, set[int]] = defaultdict(set)
    for sample, digest in zip(samples, hashes):
        labels_by_hash[digest].add(sample.label)
    keep, seen = [], set()
    dropped_dupes = dropped_conflicts = 0
    for i, digest in enumerate(hashes):
        if len(labels_by_hash[digest]) > 1:
            dropped_conflicts += 1
        elif digest in seen:
            dropped_dupes += 1
        else:
            seen.add(digest)
            keep.append(i)
    return keep, {"duplicate_copies_dropped": dropped_dupes, "conflicting_label_files_dropped": dropped_conflicts}


def split_groups(samples: list[Sample], val_fraction: float, seed: int, min_val_per_class: int = 1,
                 hashes: list[str] | None = None) -> tuple[list[int], list[int]]:
    """Stratified split of sample indices into (train, val) with whole patient/duplicate groups per side."""
    hashes = hashes or [sha256_file(s.path) for s in samples]
    groups = _components(samples, hashes)
    by_class: dict[int, list[list[int]]] = defaultdict(list)
    for group in groups:
        majority = np.bincount([samples[i].label for i in group]).argmax()
        by_class[int(majority)].append(sorted(group))
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_class):
        class_groups = sorted(by_class[label])
        rng.shuffle(class_groups)
        total = sum(len(g) for g in class_groups)
        target = max(min_val_per_class, round(total * val_fraction))
        taken = 0
        for group in class_groups:
            # keep at least one group of every class for training
            if taken < target and group is not class_groups[-1]:
                val.extend(group)
                taken += len(group)
            else:
                train.extend(group)
    return sorted(train), sorted(val)


def make_split(train_dir: Path, out: Path, labels: list[str], val_fraction: float, seed: int) -> dict:
    """Write split.json: patient-wise, stratified, de-duplicated train/val lists carved from train_dir."""
    samples = list_samples(train_dir, labels)
    hashes = [sha256_file(s.path) for s in samples]
    keep, dedupe_report = dedupe(samples, hashes)
    samples = [samples[i] for i in keep]
    hashes = [hashes[i] for i in keep]
    train_idx, val_idx = split_groups(samples, val_fraction, seed, hashes=hashes)
    train_hashes = {hashes[i] for i in train_idx}
    assert not train_hashes & {hashes[i] for i in val_idx}, "duplicate content leaked across the split"
    train_patients = {patient_id(Path(samples[i].path).name) for i in train_idx}
    assert not train_patients & {patient_id(Path(samples[i].path).name) for i in val_idx}, "patient leaked"
    split = {
        "labels": labels,
        "seed": seed,
        "val_fraction": val_fraction,
        "source": str(train_dir.resolve()),
        "dedupe": dedupe_report,
        "train": [[samples[i].path, samples[i].label] for i in train_idx],
        "val": [[samples[i].path, samples[i].label] for i in val_idx],
        "counts": {
            "train": np.bincount([samples[i].label for i in train_idx], minlength=len(labels)).tolist(),
            "val": np.bincount([samples[i].label for i in val_idx], minlength=len(labels)).tolist(),
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(split, indent=2) + "\n")
    log.info("split: train %s, val %s, %s", split["counts"]["train"], split["counts"]["val"], dedupe_report)
    return split


def split_test(split_path: Path, test_dir: Path, labels: list[str], fraction: float, seed: int) -> dict:
    """Add to split.json a calibration part of the test folder (`fraction` of its patients, stratified, whole
    patients and duplicates per side) and the rest as the reported test set."""
    split = load_split(split_path)
    samples = list_samples(test_dir, labels)
    hashes = [sha256_file(s.path) for s in samples]
    keep, _ = dedupe(samples, hashes)
    samples, hashes = [samples[i] for i in keep], [hashes[i] for i in keep]
    report_idx, cal_idx = split_groups(samples, fraction, seed + 1, hashes=hashes)
    assert not {patient_id(Path(samples[i].path).name) for i in report_idx} & {
        patient_id(Path(samples[i].path).name) for i in cal_idx}, "patient leaked"
    split["calibration"] = [[samples[i].path, samples[i].label] for i in cal_idx]
    split["test_report"] = [[samples[i].path, samples[i].label] for i in report_idx]
    split["calibration_fraction"] = fraction
    for key, idx in (("calibration", cal_idx), ("test_report", report_idx)):
        split["counts"][key] = np.bincount([samples[i].label for i in idx], minlength=len(labels)).tolist()
    split_path.write_text(json.dumps(split, indent=2) + "\n")
    log.info("test folder: calibration %s, reported %s", split["counts"]["calibration"], split["counts"]["test_report"])
    return split


def load_split(path: Path) -> dict:
    if not path.is_file():
        raise NotFoundError(f"split file {path} does not exist: run the split step first")
    return json.loads(path.read_text())


def read_grey(path: str) -> np.ndarray:
    """Decode an image file to 8-bit greyscale (colour files are converted the way OpenCV does it)."""
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise BadInputError(f"cannot decode image {path}")
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    if image.dtype != np.uint8:
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    return image


def spec_for(size: int, mean: list[float] | None = None, std: list[float] | None = None,
             pre: Preprocess | None = None) -> InputSpec:
    """The box's InputSpec of a package built with these settings (what the manifest's input block says)."""
    kwargs = {"shape": (1, 3, size, size), "preprocess": pre or Preprocess()}
    if mean is not None:
        kwargs.update(mean=tuple(mean), std=tuple(std))
    return InputSpec(**kwargs)


def picture(grey_u8: np.ndarray, size: int, pre: Preprocess | None = None) -> np.ndarray:
    """An 8-bit training picture through the box's own preprocessing (edge.preprocess), up to normalisation."""
    out = model_picture(u8_to_frame(grey_u8), spec_for(size, pre=pre))
    # A 1.0/1.1 package keeps float pictures; from an 8-bit picture at model size those are exactly k / 255.
    return out if out.dtype == np.uint8 else to_u8(out)


def normalise(grey_u8: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """(H, W) uint8 -> (3, H, W) float32, the box's normalisation (edge.preprocess.normalise)."""
    return preprocess_normalise(grey_u8, mean, std)[0]


def box_input(path: str, size: int, mean: list[float], std: list[float], pre: Preprocess | None = None) -> np.ndarray:
    """The (1, 3, size, size) float32 tensor the box feeds its models for this training image."""
    return to_tensor(u8_to_frame(read_grey(path)), spec_for(size, mean, std, pre))


def load_images(paths: list[str], size: int, pre: Preprocess | None = None) -> np.ndarray:
    """All images as one (N, size, size) uint8 array, preprocessed up to (not including) normalisation."""
    out = np.empty((len(paths), size, size), np.uint8)
    for i, path in enumerate(paths):
        out[i] = picture(read_grey(path), size, pre)
    return out
