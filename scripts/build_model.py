"""Build the default chest X-ray triage package (models/cxr-triage/1.2.0) with the repository's defaults.

The 1.2.0 recipe: device-like training renderings, the box's preprocessing (8-bit, JPEG quality 75 round trip),
thresholds on a device-like validation set, OpenVINO IR converted from the ONNX Runtime QDQ graph.

Runs `python -m models.pipeline all` on ../shared/datasets/cxr-pneumonia-kermany (relative to the repository);
skips with a message when that folder is absent. Extra arguments are passed through, e.g. `--epochs 3`.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "datasets" / "cxr-pneumonia-kermany"


def main(argv: list[str]) -> int:
    if not (DATA / "train").is_dir() or not (DATA / "test").is_dir():
        print(f"skipped: the Kermany chest X-ray dataset is not at {DATA} (needs train/ and test/)")
        return 0
    command = [sys.executable, "-m", "models.pipeline", "all", "--data", str(DATA),
               "--work", str(REPO / "work-data" / "cxr-triage-1.2.0"), "--name", "cxr-triage", "--version", "1.2.0",
               "--abnormal", "pneumonia", "--seed", "0", "--epochs", "10", "--samples-per-epoch", "2560",
               "--urgent-specificity", "0.995", "--public-key", str(REPO / "models" / "keys" / "wasla-dev-3.pub"),
               *argv]
    print("+", " ".join(command), flush=True)
    return subprocess.call(command, cwd=REPO)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
