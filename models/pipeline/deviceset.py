"""Device-like image sets: each validation or test image sent as a full-resolution DICOM instance through the box.

Every image gets its own recipe (chain, transfer syntax, size, look-up table), seeded by the image's file name, so
the set is the same on every run and every machine. The instance is encoded, read back with pydicom and rendered
by the box's own `imaging.render` and `imaging.model_picture`: what the model sees is what a box would feed it.
The pictures (uint8, model size) are cached in the work folder with their recipes.
"""
from __future__ import annotations

import json
import logging
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

from edge.imaging import model_picture, render
from models.pipeline.data import read_grey, spec_for
from models.pipeline.devicesim import device_dataset
from models.pipeline.job import Job, Work

log = logging.getLogger(__name__)


def cache_path(work: Work, name: str) -> Path:
    return work.root / f"deviceset-{name}.npz"


def image_seed(seed: int, path: str) -> list[int]:
    return [seed, zlib.crc32(Path(path).name.encode())]


def render_one(path: str, job: Job, seed: int) -> tuple[np.ndarray, dict]:
    rng = np.random.default_rng(image_seed(seed, path))
    ds, recipe = device_dataset(read_grey(path), rng)
    frame = render(ds, min_side=job.image_size)[0]
    return model_picture(frame, spec_for(job.image_size, pre=job.pre())), recipe


def build(work: Work, name: str, samples: list[list], job: Job, seed: int | None = None) -> dict:
    """{"images": (N, S, S) uint8, "y": (N,), "recipes": [...]} for `samples`, from the cache when it matches."""
    seed = job.seed + 1000 if seed is None else seed
    paths = [p for p, _ in samples]
    key = {"paths_crc": zlib.crc32("\n".join(paths).encode()), "seed": seed, "preprocess": job.preprocess,
           "size": job.image_size, "version": 1}
    path = cache_path(work, name)
    if path.is_file():
        with np.load(path, allow_pickle=False) as blob:
            if json.loads(str(blob["key"])) == key:
                return {"images": blob["images"], "y": blob["y"], "recipes": json.loads(str(blob["recipes"]))}
    t0 = time.monotonic()
    images = np.empty((len(samples), job.image_size, job.image_size), np.uint8)
    recipes = []
    for i, (image_path, _) in enumerate(samples):
        images[i], recipe = render_one(image_path, job, seed)
        recipes.append(recipe)
        if (i + 1) % 100 == 0:
            log.info("device-like %s: %d/%d (%.0fs)", name, i + 1, len(samples), time.monotonic() - t0)
    y = np.array([label for _, label in samples])
    np.savez_compressed(path, images=images, y=y, recipes=json.dumps(recipes), key=json.dumps(key))
    log.info("device-like %s set: %d images in %.0fs; chains %s; syntaxes %s", name, len(samples),
             time.monotonic() - t0, dict(Counter(r["chain"] for r in recipes)),
             dict(Counter(r["syntax"] for r in recipes)))
    return {"images": images, "y": y, "recipes": recipes}


def describe(recipes: list[dict]) -> dict:
    """What the set holds: chains, transfer syntaxes and the range of image sizes."""
    rows = [r["rows"] for r in recipes]
    cols = [r["columns"] for r in recipes]
    return {"n": len(recipes), "chains": dict(sorted(Counter(r["chain"] for r in recipes).items())),
            "syntaxes": dict(sorted(Counter(r["syntax"] for r in recipes).items())),
            "rows": [int(min(rows)), int(max(rows))] if rows else None,
            "columns": [int(min(cols)), int(max(cols))] if cols else None}
