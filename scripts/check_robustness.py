"""How far the shipped model's score moves when a modality changes compression, photometric or windowing.

    python scripts/check_robustness.py [--package models/cxr-triage/1.2.0] [--image RG1_UNCR.dcm]

Takes a real chest CR from pydicom-data and sends variants of it through the box's own decode, preprocessing and
both backends: uncompressed, JPEG 2000 lossless, lossy JPEG 2000 at several PSNRs, JPEG-LS, MONOCHROME1 with and
without a window, no window at all, 8-bit display copy, a VOI LUT. Prints each variant's score and band per
backend, the spread, the CPU and the compiled precision.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _roundtrip(ds):
    import pydicom

    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def variants(ds):
    """(name, dataset) pairs derived from one uncompressed MONOCHROME grey instance."""
    from pydicom.dataset import Dataset
    from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGLSLossless

    base = ds.pixel_array.astype(np.uint16)
    bits = int(ds.BitsStored)
    top = 2 ** bits - 1
    out = [("uncompressed", ds)]

    def copy(**changes):
        new = _roundtrip(ds)
        for key, value in changes.items():
            if value is None:
                if key in new:
                    delattr(new, key)
            else:
                setattr(new, key, value)
        return new

    for name, syntax, kwargs in (("JPEG 2000 lossless", JPEG2000Lossless, {}), ("JPEG-LS lossless", JPEGLSLossless, {}),
                                 ("JPEG 2000 lossy PSNR 45", JPEG2000, {"j2k_psnr": [45.0]}),
                                 ("JPEG 2000 lossy PSNR 38", JPEG2000, {"j2k_psnr": [38.0]}),
                                 ("JPEG 2000 lossy PSNR 31", JPEG2000, {"j2k_psnr": [31.0]})):
        new = copy()
        new.compress(syntax, base, **kwargs)
        out.append((name, _roundtrip(new)))
    inverted = (top - base).astype(np.uint16)
    mono1 = copy(PhotometricInterpretation="MONOCHROME1")
    mono1.PixelData = inverted.tobytes()
    if "WindowCenter" in ds:
        mono1.WindowCenter = top - float(ds.WindowCenter[0] if ds["WindowCenter"].VM > 1 else ds.WindowCenter)
    out.append(("MONOCHROME1 with window", _roundtrip(mono1)))
    mono1_nw = copy(PhotometricInterpretation="MONOCHROME1", WindowCenter=None, WindowWidth=None)
    mono1_nw.PixelData = inverted.tobytes()
    out.append(("MONOCHROME1 without window", _roundtrip(mono1_nw)))
    out.append(("MONOCHROME2 without window", copy(WindowCenter=None, WindowWidth=None)))
    lut = Dataset()
    gamma = np.clip(np.arange(top + 1) / top, 0, 1) ** 0.8 * top
    lut.LUTDescriptor = [top + 1, 0, bits]
    lut.LUTData = np.round(gamma).astype("<u2").tobytes()
    voi = copy(WindowCenter=None, WindowWidth=None)
    voi.VOILUTSequence = [lut]
    out.append(("VOI LUT (gamma 0.8)", _roundtrip(voi)))
    return out


def main() -> int:
    from pydicom.data import get_testdata_file

    from edge import cpuinfo, modelpkg, triage
    from edge.imaging import InputSpec, render, to_tensor
    from edge.inference import create_backend

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = REPO / "models" / "cxr-triage" / str(modelpkg.active_version(REPO / "models", "cxr-triage"))
    parser.add_argument("--package", type=Path, default=default)
    parser.add_argument("--image", default="RG1_UNCR.dcm", help="a pydicom-data grey CR (default %(default)s)")
    args = parser.parse_args()
    import pydicom

    path = get_testdata_file(args.image, download=False)
    if path is None:
        print(f"{args.image} not found: pip install pydicom-data")
        return 1
    keys = modelpkg.load_trusted_keys(sorted((REPO / "models" / "keys").glob("*.pub")))
    pkg = modelpkg.load_package(args.package, keys)
    spec = InputSpec.from_manifest(pkg.input_spec)
    backends = {kind: create_backend(pkg, kind, 2, ["CPUExecutionProvider"]) for kind in ("onnxruntime", "openvino")}
    print(f"CPU: {cpuinfo.describe()}; package {pkg.id}; precision "
          + ", ".join(f"{k} {b.precision}" for k, b in backends.items()))
    print(f"{'variant':30} " + " ".join(f"{k:>22}" for k in backends))
    scores = {k: [] for k in backends}
    for name, ds in variants(pydicom.dcmread(path)):
        tensor = to_tensor(render(ds, min_side=spec.shape[2])[0], spec)
        cells = []
        for kind, backend in backends.items():
            decision = triage.decide(backend.predict(tensor), pkg, kind)
            scores[kind].append(decision.score)
            cells.append(f"{decision.score:8.3f} {decision.label:>12}")
        print(f"{name:30} " + " ".join(f"{c:>22}" for c in cells))
    for kind, values in scores.items():
        print(f"{kind}: score range {min(values):.3f}–{max(values):.3f} (spread {max(values) - min(values):.3f}); "
              f"thresholds review {pkg.thresholds_for(kind).review:.3f} urgent {pkg.thresholds_for(kind).urgent:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
