"""The shipped model gives the same bands on every CPU: OpenVINO pinned to f32, oneDNN capped at lower ISAs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = r"""
import json, sys
import numpy as np
from pathlib import Path
from edge import modelpkg, triage
from edge.inference import create_backend
from edge.imaging import InputSpec, render, to_tensor
import pydicom
folder = Path(sys.argv[1])
pkg = modelpkg.load_package(folder, modelpkg.load_trusted_keys(sorted((folder.parents[1] / "keys").glob("*.pub"))))
spec = InputSpec.from_manifest(pkg.input_spec)
tensors = [to_tensor(render(pydicom.dcmread(p), min_side=spec.shape[2])[0], spec) for p in sys.argv[2:]]
out = {}
for kind in ("onnxruntime", "openvino"):
    backend = create_backend(pkg, kind, 2, ["CPUExecutionProvider"])
    scores = [float(triage.decide(backend.predict(t), pkg, kind).score) for t in tensors]
    th = pkg.thresholds_for(kind)
    out[kind] = {"precision": backend.precision, "scores": scores,
                 "bands": [2 if s >= th.urgent else 1 if s >= th.review else 0 for s in scores]}
print(json.dumps(out))
"""


def _inputs(tmp_path: Path) -> list[str]:
    """Chest-like CR instances: the pydicom-data radiographs plus device-like renderings of Kermany test images."""
    from pydicom.data import get_testdata_file

    paths = [get_testdata_file(name, download=False) for name in ("RG1_UNCR.dcm", "RG3_UNCR.dcm", "RG1_J2KR.dcm")]
    kermany = REPO.parent / "shared" / "datasets" / "cxr-pneumonia-kermany" / "test"
    if kermany.is_dir():
        from models.pipeline.data import read_grey
        from models.pipeline.devicesim import device_dataset

        rng = np.random.default_rng(0)
        for i, src in enumerate(sorted(kermany.glob("*/*.jpeg"))[::12]):
            ds, _ = device_dataset(read_grey(str(src)), rng, syntax="explicit")
            ds.save_as(tmp_path / f"k{i}.dcm", enforce_file_format=True)
            paths.append(str(tmp_path / f"k{i}.dcm"))
    return [p for p in paths if p]


def _probe(package: Path, inputs: list[str], isa: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    out = subprocess.run([sys.executable, "-c", PROBE, str(package), *inputs], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _shipped_default() -> Path:
    from edge import modelpkg

    return REPO / "models" / "cxr-triage" / modelpkg.active_version(REPO / "models", "cxr-triage")


@pytest.mark.timeout(600)
def test_shipped_model_bands_are_the_same_with_onednn_capped_at_avx2_and_avx512(tmp_path):
    package = _shipped_default()
    inputs = _inputs(tmp_path)
    native = _probe(package, inputs, None)
    for isa in ("AVX2", "AVX512_CORE"):
        capped = _probe(package, inputs, isa)
        for kind in ("onnxruntime", "openvino"):
            assert native[kind]["precision"] == capped[kind]["precision"] == "f32"
            assert capped[kind]["bands"] == native[kind]["bands"], (isa, kind)
            np.testing.assert_allclose(capped[kind]["scores"], native[kind]["scores"], atol=0.02)
    agree = np.mean(np.array(native["onnxruntime"]["bands"]) == np.array(native["openvino"]["bands"]))
    assert agree >= 0.9, native


def test_every_shipped_package_verifies_and_loads_on_both_backends():
    from edge import modelpkg
    from edge.imaging import InputSpec, to_tensor
    from edge.inference import create_backend

    keys = modelpkg.load_trusted_keys(sorted((REPO / "models" / "keys").glob("*.pub")))
    versions = modelpkg.versions(REPO / "models", "cxr-triage")
    assert {"1.0.0", "1.1.0", "1.2.0", "1.3.0"} <= set(versions)
    frame = np.linspace(0.0, 1.0, 300 * 260, dtype=np.float32).reshape(300, 260)
    for version in versions:
        pkg = modelpkg.load_package(REPO / "models" / "cxr-triage" / version, keys)
        tensor = to_tensor(frame, InputSpec.from_manifest(pkg.input_spec))
        for kind in ("onnxruntime", "openvino"):
            probs = create_backend(pkg, kind, 1, ["CPUExecutionProvider"]).predict(tensor)
            assert probs.shape == (2,) and np.isclose(probs.sum(), 1.0)
    assert modelpkg.active_version(REPO / "models", "cxr-triage") == "1.3.0"
