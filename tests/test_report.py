"""The printable triage report: one HTML page per study, in en/fr/ar, with the clinic's patient reference (never logged)."""
from __future__ import annotations

import base64
import logging
import re
import subprocess
import sys
import time

import pytest
from pydicom.uid import generate_uid

from edge import report
from test_results_dicom import add_image, triage_next

PATIENT_ID, ACCESSION = "CLINIC-PT-0042", "ACC-2026-117"
PATIENT_NAME = "بن علي^فاطمة"


@pytest.fixture
def urgent_study(store, tmp_path):
    uid = generate_uid()
    add_image(store, tmp_path, uid, PatientID=PATIENT_ID, AccessionNumber=ACCESSION, PatientName=PATIENT_NAME,
              SpecificCharacterSet="ISO_IR 192")
    triage_next(store, "urgent", 0.93)
    return uid


def page(store, uid, lang, tmp_path) -> str:
    return report.write_report(store, uid, tmp_path / f"r-{lang}.html", lang=lang, box_id="box-7").read_text()


def test_english_page_has_patient_reference_label_reasons_model_and_thumbnail(store, urgent_study, tmp_path):
    html = page(store, urgent_study, "en", tmp_path)
    assert PATIENT_ID in html and ACCESSION in html
    assert ">URGENT<" in html and "NOT FOR CLINICAL USE" in html
    assert "Score <bdi dir=\"ltr\">0.93</bdi> is at or above the urgent threshold" in html
    assert "tiny-cxr" in html and "1.0.0" in html and "0.930" in html
    png = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert png and base64.b64decode(png.group(1)).startswith(b"\x89PNG")
    assert "Not read yet" in html
    assert "@page" in html and "@media print" in html  # prints as one A4 page


def test_arabic_page_is_right_to_left_and_french_page_is_french(store, urgent_study, tmp_path):
    ar = page(store, urgent_study, "ar", tmp_path)
    assert '<html lang="ar" dir="rtl">' in ar and "عاجل" in ar and "ليس للاستخدام السريري" in ar
    assert f'<bdi dir="ltr">{PATIENT_ID}</bdi>' in ar  # identifiers keep their order inside Arabic text
    # Two identifiers on the page: the name, in its own direction (an Arabic name reads right to left anywhere).
    assert '<td class="patient-name"><bdi>بن علي فاطمة</bdi></td>' in ar and "اسم المريض" in ar
    fr = page(store, urgent_study, "fr", tmp_path)
    assert '<html lang="fr" dir="ltr">' in fr and "Rapport de triage" in fr and "seuil d&#x27;urgence" in fr


def test_the_radiologists_read_is_shown_once_it_is_back(store, urgent_study, tmp_path):
    from edge.uplink.outbox import Outbox

    Outbox(store, tmp_path / "outbox", "box-7").apply_read(urgent_study, "r-1", "urgent-referral",
                                                           "Refer <today>", "Dr A", time.time())
    html = page(store, urgent_study, "fr", tmp_path)
    assert "Transfert urgent" in html and "Dr A" in html
    assert "Refer &lt;today&gt;" in html and "<today>" not in html  # hub text is escaped, never markup


def test_patient_reference_is_never_logged(store, urgent_study, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    page(store, urgent_study, "en", tmp_path)
    assert urgent_study in caplog.text  # the study UID is how a log line names it
    assert PATIENT_ID not in caplog.text and ACCESSION not in caplog.text and "فاطمة" not in caplog.text


def test_a_pending_study_reports_its_images_without_a_label(store, tmp_path):
    uid = generate_uid()
    add_image(store, tmp_path, uid)
    html = page(store, uid, "en", tmp_path)
    assert "PENDING" in html


def test_cli_writes_the_report_in_the_chosen_language(tmp_path, urgent_study, cfg):
    conf = tmp_path / "box.toml"
    conf.write_text(f'[box]\ndata_dir = "{cfg.box.data_dir}"\n[models]\ndir = "{tmp_path / "m"}"\ntrusted_keys = []\n')
    out_file = tmp_path / "usb" / "report.html"
    out = subprocess.run([sys.executable, "-m", "edge.cli", "--config", str(conf), "--lang", "ar", "report",
                          urgent_study[:24], "--out", str(out_file)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'dir="rtl"' in out_file.read_text() and str(out_file) in out.stdout
    assert PATIENT_ID not in out.stdout + out.stderr
    missing = subprocess.run([sys.executable, "-m", "edge.cli", "--config", str(conf), "report", "1.2.3.4.5"],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 3 and missing.stderr.strip().count("\n") == 0


def test_every_reason_code_and_label_has_a_sentence_in_every_language():
    from edge import triage

    codes = {"score_above_urgent", "score_above_review", "score_below_review", "low_confidence", "no_model",
             "no_matching_model",
             "instance_quarantined"}
    for lang in report.LANGUAGES:
        assert set(report.TEXT[lang]) == set(report.TEXT["en"]), lang
        assert codes | set(triage.LABELS) <= set(report.TEXT[lang])
        sentence = report.reason_sentence({"code": "low_confidence", "label": "pneumonia", "confidence": 0.41,
                                           "threshold": 0.5}, lang)
        assert "0.41" in sentence and "pneumonia" in sentence and "{" not in sentence
