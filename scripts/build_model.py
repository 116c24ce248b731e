"""Build the default chest X-ray triage package (models/cxr-triage/1.3.0) with the repository's defaults.

The 1.3.0 recipe keeps the 1.2.0 weights (recovered from its signed INT8 graph, no training): the stem convolution
and the classifier stay in float, so ONNX Runtime and OpenVINO no longer round the 8-bit input picture apart;
thresholds come from the device-like validation set widened on a calibration part of the test folder (50 % of its
patients, never reported), then moved off crowded score spots. `--recipe 1.2.0` rebuilds 1.2.0 from scratch:
device-like training renderings, the box's preprocessing (8-bit, JPEG quality 75 round trip), thresholds on a
device-like validation set, OpenVINO IR converted from the ONNX Runtime QDQ graph.

Runs the pipeline on ../shared/datasets/cxr-pneumonia-kermany (relative to the repository); skips with a message
when that folder is absent. The 1.3.0 rebuild lands in work-data/rebuilt/cxr-triage/1.3.0. Extra arguments go to the split (1.3.0) or `all` (1.2.0) step, e.g. `--epochs 3`.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "datasets" / "cxr-pneumonia-kermany"
QUANTISATION = {"float_nodes": ["/_conv_stem/", "/_fc/"]}


def _run(*args: str) -> int:
    command = [sys.executable, "-m", "models.pipeline", *args]
    print("+", " ".join(command), flush=True)
    return subprocess.call(command, cwd=REPO)


def recipe_1_2_0(argv: list[str]) -> int:
    return _run("all", "--data", str(DATA), "--work", str(REPO / "work-data" / "cxr-triage-1.2.0"),
                "--name", "cxr-triage", "--version", "1.2.0", "--abnormal", "pneumonia", "--seed", "0",
                "--epochs", "10", "--samples-per-epoch", "2560", "--urgent-specificity", "0.995",
                "--public-key", str(REPO / "models" / "keys" / "wasla-dev-3.pub"), *argv)


def recipe_1_3_0(argv: list[str]) -> int:
    work = str(REPO / "work-data" / "cxr-triage-1.3.0")
    steps = [
        ("split", "--data", str(DATA), "--name", "cxr-triage", "--version", "1.3.0", "--abnormal", "pneumonia",
         "--seed", "0", "--urgent-specificity", "0.995", "--calibration-fraction", "0.5",
         "--calibration-urgent-specificity", "0.90", "--quiet-thresholds", "--quantisation", json.dumps(QUANTISATION),
         *argv),
        ("weights", "--package", str(REPO / "models" / "cxr-triage" / "1.2.0")),
        ("export",), ("quantise",), ("calibrate",), ("parity",), ("evaluate",),
        # The shipped 1.3.0 was signed with wasla-dev-5, whose private half stays with its builder: a rebuild is
        # signed by a development key of its own (created when missing) and written beside the work folder, so it
        # never replaces the shipped package; compare its card and evaluation.json with models/cxr-triage/1.3.0.
        ("package", "--out-root", str(REPO / "work-data" / "rebuilt"),
         "--public-key", str(REPO / "work-data" / "rebuilt" / "rebuilt-dev.pub")),
    ]
    for step, *args in steps:
        rc = _run(step, "--work", work, *args)
        if rc:
            return rc
    return 0


def main(argv: list[str]) -> int:
    if not (DATA / "train").is_dir() or not (DATA / "test").is_dir():
        print(f"skipped: the Kermany chest X-ray dataset is not at {DATA} (needs train/ and test/)")
        return 0
    recipe = "1.3.0"
    if argv[:1] == ["--recipe"] and len(argv) > 1:
        recipe, argv = argv[1], argv[2:]
    builders = {"1.2.0": recipe_1_2_0, "1.3.0": recipe_1_3_0}
    if recipe not in builders:
        print(f"unknown recipe {recipe!r}: one of {', '.join(builders)}")
        return 2
    return builders[recipe](argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
