"""Results as DICOM: the SR and SC reference the source images, travel with the study, and never move its label."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage, generate_uid

from edge import ingest, results_dicom
from edge.results_writer import ResultsWriter
import samples
from edge.engine import Outcome
from sync.core.errors import NotFoundError, StateError
from edge.store import QUEUED, TRIAGED
from edge.worker import Worker


def result(label: str, score: float, *, model: str = "tiny-cxr", version: str = "1.0.0") -> dict:
    code = {"urgent": "score_above_urgent", "review": "score_above_review", "normal": "score_below_review"}[label]
    threshold = {"urgent": 0.8, "review": 0.3, "normal": 0.3}[label]
    return {"model": model, "model_version": version, "backend": "onnxruntime:cpu",
            "scores": {"normal": round(1 - score, 4), "pneumonia": score}, "thresholds": {"review": 0.3, "urgent": 0.8},
            "label": label, "reasons": [{"code": code, "score": score, "threshold": threshold}], "timings": {}}


def add_image(store, tmp_path: Path, study_uid: str, name: str = "RG1_UNCR.dcm", **attrs) -> dict:
    src = samples.fresh_copy(samples.sample_path(name), tmp_path / "in" / f"{generate_uid()}.dcm", study_uid=study_uid)
    if attrs:
        ds = pydicom.dcmread(src)
        for k, v in attrs.items():
            setattr(ds, k, v)
        ds.save_as(src)
    out = ingest.ingest_file(store, src, source="cli", max_pixels=10**8, max_file_bytes=10**9)
    assert out.status == "stored", out
    return store.query("SELECT * FROM instances WHERE id = ?", [out.instance_id])[0]


def triage_next(store, label: str, score: float, **kw) -> dict:
    row = store.claim_next()
    r = result(label, score, **kw)
    store.record_triage(row["id"], label, r["reasons"], [r])
    return row


@pytest.fixture
def study(store, tmp_path):
    """A triaged two-image study: one normal, one urgent (the key image)."""
    uid = generate_uid()
    add_image(store, tmp_path, uid)
    add_image(store, tmp_path, uid)
    first = triage_next(store, "normal", 0.12)
    second = triage_next(store, "urgent", 0.91)
    return {"uid": uid, "normal": first, "urgent": second}


def derived(store, study_uid: str) -> list[dict]:
    return [i for i in store.study(study_uid)["instances"] if i["source"] == results_dicom.SOURCE]


def content_texts(item) -> list[str]:
    out = []
    for child in item.get("ContentSequence", []):
        name = child.ConceptNameCodeSequence[0].CodeMeaning
        if child.ValueType == "TEXT":
            out.append(f"{name}={child.TextValue}")
        elif child.ValueType == "CODE":
            out.append(f"{name}={child.ConceptCodeSequence[0].CodeValue}")
        elif child.ValueType == "NUM":
            out.append(f"{name}={float(child.MeasuredValueSequence[0].NumericValue):.4f}")
        elif child.ValueType == "IMAGE":
            out.append(f"{name}={child.ReferencedSOPSequence[0].ReferencedSOPInstanceUID}")
        out += content_texts(child)
    return out


def test_sr_carries_label_score_thresholds_model_reasons_and_references_every_source_image(store, study):
    sr_row, = results_dicom.ensure_results(store, study["uid"], box_id="box-a")
    ds = pydicom.dcmread(store.instance_path(sr_row))
    src = pydicom.dcmread(store.instance_path(study["urgent"]), stop_before_pixels=True)
    assert ds.SOPClassUID == ComprehensiveSRStorage and ds.Modality == "SR"
    assert ds.StudyInstanceUID == study["uid"] and ds.SeriesInstanceUID not in (src.SeriesInstanceUID,)
    assert ds.PatientID == src.PatientID and ds.AccessionNumber == src.get("AccessionNumber", "")
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == study["uid"]
    refs = {r.ReferencedSOPInstanceUID: r.ReferencedSOPClassUID
            for se in evidence.ReferencedSeriesSequence for r in se.ReferencedSOPSequence}
    assert refs == {study["normal"]["sop_instance_uid"]: study["normal"]["sop_class_uid"],
                    study["urgent"]["sop_instance_uid"]: study["urgent"]["sop_class_uid"]}
    texts = content_texts(ds)
    # TID 1500: the study's own group first, its band as a SNOMED CT finding and as the triage category.
    assert texts.index("Tracking Identifier=study") < texts.index("AI triage category=URGENT") < \
        texts.index("Tracking Identifier=image 1")
    assert "Finding=263654008" in texts and "Finding=17621005" in texts and "AI triage category=NORMAL" in texts
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert ds.ContentDescription.startswith("NOT FOR CLINICAL USE")
    assert {"Algorithm Name=tiny-cxr", "Algorithm Version=1.0.0", "Abnormality score=0.9100",
            "Algorithm Parameters=review threshold 0.3000", "Algorithm Parameters=urgent threshold 0.8000",
            "Abnormality score=0.1200"} <= set(texts)
    assert any(t.startswith("Algorithm Parameters=score_above_urgent") for t in texts)
    assert f"Source of Measurement={study['urgent']['sop_instance_uid']}" in texts
    assert ds.VerificationFlag == "UNVERIFIED" and ds.CompletionFlag == "COMPLETE"


@pytest.mark.skipif(not shutil.which("dciodvfy"), reason="dicom3tools dciodvfy not installed (scripts/setup.sh)")
def test_dciodvfy_finds_no_error_in_the_sr_or_the_sc(store, study):
    for row in results_dicom.ensure_results(store, study["uid"], box_id="box-a",
                                            kinds=(results_dicom.SR, results_dicom.SC)):
        out = subprocess.run(["dciodvfy", "-new", str(store.instance_path(row))], capture_output=True, text=True,
                             timeout=60)
        errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], row["sop_class_uid"]


@pytest.mark.skipif(not shutil.which("dsrdump"), reason="dcmtk dsrdump not installed")
def test_dcmtk_reads_the_sr_as_a_valid_comprehensive_sr(store, study):
    sr_row, = results_dicom.ensure_results(store, study["uid"], box_id="box-a")
    out = subprocess.run(["dsrdump", str(store.instance_path(sr_row))], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Comprehensive SR Document" in out.stdout and "tiny-cxr" in out.stdout
    errors = [line for line in out.stderr.splitlines() if line.startswith(("E:", "F:"))]
    assert errors == []


def test_sc_burns_the_result_into_the_key_image_and_references_it(store, study):
    rows = results_dicom.ensure_results(store, study["uid"], box_id="box-a", kinds=(results_dicom.SR, results_dicom.SC))
    sc = pydicom.dcmread(store.instance_path(rows[1]))
    assert sc.SOPClassUID == SecondaryCaptureImageStorage and sc.StudyInstanceUID == study["uid"]
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == study["urgent"]["sop_instance_uid"]
    assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB"
    px = sc.pixel_array
    assert px.shape == (sc.Rows, sc.Columns, 3) and max(px.shape[:2]) <= 800
    # The top band is the urgent red with white text on it; the bottom line is the yellow disclaimer.
    band = px[:60].reshape(-1, 3)
    assert (np.all(band == (200, 30, 30), axis=1).mean() > 0.5) and (band.min(axis=1) > 200).any()
    assert (np.all(px[-30:].reshape(-1, 3) == (255, 230, 0), axis=1)).any()
    assert sc.SeriesInstanceUID != pydicom.dcmread(store.instance_path(rows[0])).SeriesInstanceUID


def test_results_do_not_change_the_study_label_or_image_count(store, study):
    before = store.study(study["uid"])
    results_dicom.ensure_results(store, study["uid"], box_id="box-a", kinds=(results_dicom.SR, results_dicom.SC))
    after = store.study(study["uid"])
    assert after["label"] == before["label"] == "urgent"
    assert after["n_instances"] == before["n_instances"] == 2
    assert [i["state"] for i in derived(store, study["uid"])] == [TRIAGED, TRIAGED]
    assert all(i["label"] is None for i in derived(store, study["uid"]))


def test_a_normal_study_stays_normal_after_its_sr_is_stored_and_the_study_requeued(store, tmp_path):
    """The SR has no pixels and no model routes it: triaged, it would turn the study 'review'. The worker skips it."""
    uid = generate_uid()
    add_image(store, tmp_path, uid)
    triage_next(store, "normal", 0.05)
    results_dicom.ensure_results(store, uid, box_id="box-a")
    assert store.requeue(study_uid=uid) == 1  # the image only: the box's own SR is rewritten, never re-triaged
    # Belt and braces: an SR row back in `received` anyway (e.g. left by an older version) is skipped by the worker.
    store.db.execute("UPDATE instances SET state = 'received' WHERE source = 'wasla'")

    class Engine:
        seen: list[Path] = []

        def triage_file(self, path):
            self.seen.append(path)
            r = result("normal", 0.05)
            return Outcome("normal", r["reasons"], [r], {})

    engine = Engine()
    worker = Worker(store, engine)
    while worker.process_one():
        pass
    assert all(results_dicom.DERIVED_DIR not in str(p) for p in engine.seen) and len(engine.seen) == 1
    s = store.study(uid)
    assert s["label"] == "normal" and s["reasons"] == []
    assert [(i["state"], i["label"]) for i in derived(store, uid)] == [(TRIAGED, None)]


def test_writing_the_same_results_twice_is_a_no_op(store, study):
    first = results_dicom.ensure_results(store, study["uid"], box_id="box-a")
    second = results_dicom.ensure_results(store, study["uid"], box_id="box-a")
    assert first[0]["id"] == second[0]["id"] and len(derived(store, study["uid"])) == 1


def test_new_results_replace_an_sr_still_on_the_box_and_name_one_that_left_as_predecessor(store, study):
    old, = results_dicom.ensure_results(store, study["uid"], box_id="box-a")
    store.requeue(instance_id=study["normal"]["id"])
    triage_next(store, "review", 0.4)  # a new model version says "review" for the first image
    replacing, = results_dicom.ensure_results(store, study["uid"], box_id="box-a")
    assert replacing["sop_instance_uid"] != old["sop_instance_uid"]
    assert [i["id"] for i in derived(store, study["uid"])] == [replacing["id"]]
    assert not store.instance_path(old).exists()
    # It goes to the hub; then the results change again: the sent one stays and is named as predecessor.
    with store.transaction() as db:
        store.transition(db, replacing["id"], QUEUED)
    store.requeue(instance_id=study["normal"]["id"])
    triage_next(store, "normal", 0.1)
    newest, = results_dicom.ensure_results(store, study["uid"], box_id="box-a")
    ds = pydicom.dcmread(store.instance_path(newest))
    pred = ds.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert pred.ReferencedSOPInstanceUID == replacing["sop_instance_uid"] and ds.InstanceNumber == 2
    assert {i["id"] for i in derived(store, study["uid"])} == {replacing["id"], newest["id"]}


def test_results_wait_for_images_still_being_triaged(store, tmp_path):
    uid = generate_uid()
    add_image(store, tmp_path, uid)
    add_image(store, tmp_path, uid)
    triage_next(store, "urgent", 0.95)
    with pytest.raises(StateError, match="still being triaged"):
        results_dicom.ensure_results(store, uid, box_id="box-a")


def test_a_study_with_only_unreadable_images_has_no_results_document(store, tmp_path):
    uid = generate_uid()
    row = add_image(store, tmp_path, uid)
    store.claim_next()
    store.quarantine(row["id"], "bad pixels")
    with pytest.raises(NotFoundError, match="no triaged image"):
        results_dicom.ensure_results(store, uid, box_id="box-a")


def test_results_travel_to_the_hub_with_the_study(store, study, tmp_path):
    """The uploader packs triaged rows of labelled studies: the SR and SC are among them, with the study's label."""
    from edge.uplink.outbox import Outbox

    rows = results_dicom.ensure_results(store, study["uid"], box_id="box-a", kinds=(results_dicom.SR, results_dicom.SC))
    to_pack = Outbox(store, tmp_path / "outbox", "box-a").instances_to_pack(limit=10)
    packed = {r["id"]: r["study_label"] for r in to_pack}
    assert packed == {study["normal"]["id"]: "urgent", study["urgent"]["id"]: "urgent",
                      rows[0]["id"]: "urgent", rows[1]["id"]: "urgent"}


def test_results_writer_waits_for_the_study_to_settle_then_writes_sr_and_sc(store, study):
    writer = ResultsWriter(store, box_id="box-a", with_sc=True, settle_seconds=5.0)
    writer.notify(study["uid"])
    assert writer.run_once() == 0 and derived(store, study["uid"]) == []  # not quiet long enough yet
    assert writer.run_once(now=time.monotonic() + 5.0) == 1
    assert sorted(i["modality"] for i in derived(store, study["uid"])) == ["OT", "SR"]


def test_a_box_stopped_between_triage_and_results_writes_them_on_the_next_start(store, study):
    writer = ResultsWriter(store, box_id="box-a", settle_seconds=0.0)
    assert writer.catch_up() == 1  # the notify was lost with the old process
    assert writer.run_once() == 1 and [i["modality"] for i in derived(store, study["uid"])] == ["SR"]
    assert writer.catch_up() == 0


def test_uncommitted_results_files_are_removed_and_never_adopted_as_images(store, study):
    row, = results_dicom.ensure_results(store, study["uid"], box_id="box-a")
    stray = store.spool_dir / results_dicom.DERIVED_DIR / ("0" * 64 + ".dcm")
    shutil.copy(store.instance_path(row), stray)
    assert ingest.adopt_orphans(store) == 0  # the image door never takes our own files
    assert results_dicom.remove_orphans(store) == 1
    assert not stray.exists() and store.instance_path(row).exists()


# --- sending (edge/send.py) -----------------------------------------------------------------------------------------

OUT_OF_RESOURCES = 0xA700  # PS3.4 B.2.3 "Refused: Out of Resources"


@pytest.mark.parametrize("text, expected", [
    ("PACS@10.0.0.5:104", ("PACS", "10.0.0.5", 104)),
    ("ORTHANC@pacs.clinic.local:4242", ("ORTHANC", "pacs.clinic.local", 4242)),
    ("CR_ROOM1@[fd00::5]:11112", ("CR_ROOM1", "fd00::5", 11112)),
])
def test_destination_is_ae_at_host_colon_port(text, expected):
    from edge.send import parse_destination

    d = parse_destination(text)
    assert (d.ae_title, d.host, d.port) == expected


@pytest.mark.parametrize("text", ["10.0.0.5:104", "PACS@10.0.0.5", "A_TITLE_LONGER_THAN_16@h:104", "PACS@h:99999",
                                  "PACS@h:10x"])
def test_a_bad_destination_is_a_named_error(text):
    from edge.send import DestinationError, parse_destination

    with pytest.raises(DestinationError):
        parse_destination(text)


def test_a_refusing_peer_is_a_named_error_with_the_standard_status_name(store, study):
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import ComprehensiveSRStorage as SRClass

    import harness
    from edge.send import Destination, StoreRefusedError, send_files

    scp = AE(ae_title="FULLPACS")
    scp.add_supported_context(SRClass)
    port = harness.free_port()
    server = scp.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, lambda event: OUT_OF_RESOURCES)])
    try:
        sr_row, = results_dicom.ensure_results(store, study["uid"], box_id="box-a")
        with pytest.raises(StoreRefusedError, match="Out of Resources") as err:
            send_files([store.instance_path(sr_row)], Destination("FULLPACS", "127.0.0.1", port), acse_timeout=5,
                       dimse_timeout=5, network_timeout=5)
        assert sr_row["sop_instance_uid"] in str(err.value)
    finally:
        server.shutdown()


def test_nobody_listening_is_an_association_error_within_the_timeout(store, study):
    import harness
    from edge.send import AssociationError, Destination, send_files

    sr_row, = results_dicom.ensure_results(store, study["uid"], box_id="box-a")
    t0 = time.monotonic()
    with pytest.raises(AssociationError, match="no association"):
        send_files([store.instance_path(sr_row)], Destination("PACS", "127.0.0.1", harness.free_port()),
                   connection_timeout=3, acse_timeout=3)
    assert time.monotonic() - t0 < 10
