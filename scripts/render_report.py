#!/usr/bin/env python3
"""Renders the printable triage report of a sample study to docs/report-{en,fr,ar}.png (and checks the PDF is one page).

The study is real: a public sample chest CR (pydicom-data RG1_UNCR, given a made-up clinic Patient ID and
Accession Number), triaged by the tests' tiny signed model through the box's own engine and store, with a
radiologist's read applied as the hub would send it. Chromium (Debian package `chromium`) is used here only, to
take the screenshots; the box itself writes HTML and needs no browser.

Usage: .venv/bin/python scripts/render_report.py [--out docs] [--workdir var/render-report] [--pdf]
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import pydicom  # noqa: E402

from edge import ingest, report  # noqa: E402
import samples
from edge.config import parse  # noqa: E402
from edge.engine import Engine  # noqa: E402
from edge.store import Store  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--no-first-run",
                  "--disable-extensions"]
# A4 at 96 dpi is 794 x 1123 px; a little wider so the page's 186 mm column sits inside the margins.
WINDOW = (860, 1200)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("chromium is not installed (apt-get install chromium)")


def sample_study(work: Path) -> tuple[Store, str, str]:
    from modelfactory import make_tiny_package

    models_dir = work / "models"
    _folder, pub = make_tiny_package(models_dir, key_dir=work / "keys")
    cfg = parse(f'[box]\nid = "clinic-demo-01"\ndata_dir = "{work / "data"}"\n'
                f'[models]\ndir = "{models_dir}"\ntrusted_keys = ["{pub}"]\n'
                '[inference]\nbackend = "onnxruntime"\nthreads = 1\nwarmup = 0\n[storage]\nmin_free_mb = 0\n')
    src = samples.fresh_copy(samples.sample_path("RG1_UNCR.dcm"), work / "in" / "chest.dcm")
    ds = pydicom.dcmread(src)
    ds.PatientID, ds.AccessionNumber = "DSP-2026-00417", "ACC-117-2026"  # made up, as a clinic would number them
    ds.save_as(src)
    store = Store.from_config(cfg)
    ingest.ingest_file(store, src, source="cli", max_pixels=cfg.storage.max_pixels, max_file_bytes=10**9)
    engine = Engine.load(cfg)
    row = store.claim_next()
    outcome = engine.triage_file(store.instance_path(row))
    outcome.timings["pipeline_ms"] = 0.0
    for r in outcome.results:
        r["timings"] = dict(outcome.timings)
    store.record_triage(row["id"], outcome.label, outcome.reasons, outcome.results)
    from edge.uplink.outbox import Outbox

    Outbox(store, work / "outbox", cfg.box.id).apply_read(
        row["study_uid"], "read-demo-1", "abnormal", "Right lower lobe consolidation; treat and repeat in 2 weeks.",
        "Dr. K. Benali", time.time())
    return store, row["study_uid"], cfg.box.id


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=REPO / "docs")
    ap.add_argument("--workdir", type=Path, default=REPO / "var" / "render-report")
    ap.add_argument("--languages", default="en,fr,ar")
    ap.add_argument("--pdf", action="store_true", help="Also print each page to PDF and check it is one page.")
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    store, study_uid, box_id = sample_study(args.workdir)
    exe = chromium()
    for lang in args.languages.split(","):
        page = report.write_report(store, study_uid, args.workdir / f"report-{lang}.html", lang=lang, box_id=box_id)
        png = args.out / f"report-{lang}.png"
        subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={args.workdir / 'chromium'}",
                        f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={png}", page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
        print(f"{png}")
        if args.pdf:
            pdf = args.workdir / f"report-{lang}.pdf"
            subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={args.workdir / 'chromium'}",
                            "--no-pdf-header-footer", f"--print-to-pdf={pdf}", page.resolve().as_uri()],
                           check=True, capture_output=True, timeout=120)
            pages = len(re.findall(rb"/Type\s*/Page[^s]", pdf.read_bytes()))
            print(f"{pdf}: {pages} page(s)")
            if pages != 1:
                print(f"warning: {lang} report prints on {pages} pages", file=sys.stderr)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
