"""Triage results as DICOM a viewer can open: a Comprehensive SR and a burned-in Secondary Capture per study.

Both are instances of the triaged study (same Study Instance UID, patient and study attributes copied from a source
image), each in a series of its own, and both reference the source images. They are stored on the box as
*derived* instances: spool files under `spool/derived/` and rows with source "wasla" that enter the state machine
directly in `triaged` with no label. So they travel to the hub like any triaged instance (the uploader packs
`triaged` rows), `wasla send` can C-STORE them, and they never move the study label: `_refresh_study_label` only
counts rows that carry a label, and the worker never triages a "wasla" row (see `skip_triage`).

UIDs are derived from the content (box, study, kind, a fingerprint of the results), so writing the same results
twice is a no-op and a re-triaged study with new results gets a new document that names the old one as its
predecessor once the old one has left the box (an old one still waiting on the box is simply replaced).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from edge import imaging, triage
from edge.store import PROCESSING, QUARANTINED, RECEIVED, TRIAGED, Store
from sync.core.errors import BadInputError, NotFoundError, StateError
from sync.core.fsutil import fsync_dir
from sync.wire.results import MANUFACTURER as _MANUFACTURER, SERIES_PREFIX

log = logging.getLogger(__name__)

SOURCE = "wasla"
DERIVED_DIR = "derived"
SR, SC = "sr", "sc"
SOP_CLASS = {SR: ComprehensiveSRStorage, SC: SecondaryCaptureImageStorage}
SERIES_NUMBER = {SR: 9901, SC: 9902}
NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"
DISCLAIMER = ("NOT FOR CLINICAL USE. Automated triage by Wasla: it orders the reading list, it is not a diagnosis. "
              "A radiologist must read this study.")
# Private coding scheme for the concepts DICOM has no code for ("99" prefix: local schemes, PS3.16 8.2).
SCHEME = "99WASLA"
# Patient and study attributes copied from a source image, so a PACS files the results under the same patient and
# study. Type 2 ones are written (empty) even when the source lacks them.
_COPIED_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")
_COPIED_OPTIONAL = ("IssuerOfPatientID", "StudyDescription", "InstitutionName")
_SC_MAX_SIDE = 640
_BAND = {"urgent": (200, 30, 30), "review": (215, 140, 0), "normal": (30, 130, 60)}


# --- what the results are -------------------------------------------------------------------------------------------

def is_derived(row: dict) -> bool:
    return row.get("source") == SOURCE


def result_score(result: dict) -> float | None:
    """The abnormal score a result was decided on (the store keeps it in the decision's reasons)."""
    for reason in result.get("reasons") or []:
        if isinstance(reason, dict) and isinstance(reason.get("score"), (int, float)):
            return float(reason["score"])
    return None


def triaged_sources(study: dict) -> list[dict]:
    """The study's own images that were triaged (in any later sync state), in arrival order."""
    return [i for i in study["instances"]
            if not is_derived(i) and i["state"] not in (RECEIVED, PROCESSING, QUARANTINED) and i["label"]]


def key_instance(sources: list[dict]) -> dict:
    """The image that decided the label: most severe, then highest score, then earliest."""
    def rank(inst: dict) -> tuple:
        scores = [s for s in (result_score(r) for r in inst["results"]) if s is not None]
        return (triage.severity(inst["label"]), max(scores, default=-1.0), -inst["id"])

    return max(sources, key=rank)


def fingerprint(study: dict, sources: list[dict]) -> str:
    facts = {
        "label": study["label"], "reasons": study["reasons"],
        "instances": [[i["sop_instance_uid"], i["label"],
                       [[r["model"], r["model_version"], r["backend"], r["scores"], r["thresholds"], r["label"],
                         r["reasons"]] for r in i["results"]]] for i in sources],
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def _uids(box_id: str, study_uid: str, kind: str, fp: str) -> tuple[str, str]:
    # One series per kind and study for every version; one instance UID per content.
    series = generate_uid(entropy_srcs=[SOURCE, box_id, study_uid, kind, "series"])
    return series, generate_uid(entropy_srcs=[SOURCE, box_id, study_uid, kind, fp])


# --- dataset building -----------------------------------------------------------------------------------------------

def _base(sop_class: str, sop_uid: str, series_uid: str, series_number: int, instance_number: int,
          header: Dataset, box_id: str, modality: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    # UTF-8, so names copied from a source in any character set are written without loss.
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    now = dt.datetime.now()
    ds.InstanceCreationDate = ds.ContentDate = ds.SeriesDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = ds.ContentTime = ds.SeriesTime = now.strftime("%H%M%S")
    for kw in _COPIED_TYPE2:
        setattr(ds, kw, header.get(kw, "") or "")
    for kw in _COPIED_OPTIONAL:
        if header.get(kw):
            setattr(ds, kw, header.get(kw))
    ds.StudyInstanceUID = header.StudyInstanceUID
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.Manufacturer = _MANUFACTURER
    ds.ManufacturerModelName = "Wasla triage box"
    ds.StationName = box_id[:16]
    ds.SoftwareVersions = _software_version()
    return ds


def _software_version() -> str:
    try:
        from importlib.metadata import version

        return version("wasla")
    except Exception:  # noqa: BLE001 - a source checkout without metadata still writes valid files
        return "0"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning[:64]
    return c


_C = {
    "root": _code("TRIAGE", SCHEME, "AI triage result"),
    "label": _code("LABEL", SCHEME, "Triage label"),
    "image": _code("IMAGE-TRIAGE", SCHEME, "Image triage"),
    "source": _code("121112", "DCM", "Source of Measurement"),
    "algorithm": _code("111001", "DCM", "Algorithm Name"),
    "version": _code("111003", "DCM", "Algorithm Version"),
    "backend": _code("BACKEND", SCHEME, "Inference backend"),
    "score": _code("SCORE", SCHEME, "Abnormality score"),
    "review": _code("REVIEW-THRESHOLD", SCHEME, "Review threshold"),
    "urgent": _code("URGENT-THRESHOLD", SCHEME, "Urgent threshold"),
    "reason": _code("REASON", SCHEME, "Triage reason"),
    "comment": _code("121106", "DCM", "Comment"),
}
_LABEL_CODES = {lab: _code(lab.upper(), SCHEME, lab.capitalize()) for lab in triage.LABELS}
_UNITLESS = _code("1", "UCUM", "no units")


def _item(relationship: str, value_type: str, concept: Dataset) -> Dataset:
    it = Dataset()
    it.RelationshipType = relationship
    it.ValueType = value_type
    it.ConceptNameCodeSequence = Sequence([concept])
    return it


def _text(concept: Dataset, text: str) -> Dataset:
    it = _item("CONTAINS", "TEXT", concept)
    it.TextValue = text
    return it


def _coded(concept: Dataset, code: Dataset) -> Dataset:
    it = _item("CONTAINS", "CODE", concept)
    it.ConceptCodeSequence = Sequence([code])
    return it


def _num(concept: Dataset, value: float) -> Dataset:
    it = _item("CONTAINS", "NUM", concept)
    mv = Dataset()
    mv.NumericValue = f"{value:.4f}"
    mv.MeasurementUnitsCodeSequence = Sequence([_UNITLESS])
    it.MeasuredValueSequence = Sequence([mv])
    return it


def _image(inst: dict) -> Dataset:
    it = _item("CONTAINS", "IMAGE", _C["source"])
    ref = Dataset()
    ref.ReferencedSOPClassUID = inst["sop_class_uid"]
    ref.ReferencedSOPInstanceUID = inst["sop_instance_uid"]
    it.ReferencedSOPSequence = Sequence([ref])
    return it


def _container(relationship: str, concept: Dataset, children: list[Dataset]) -> Dataset:
    it = _item(relationship, "CONTAINER", concept)
    it.ContinuityOfContent = "SEPARATE"
    it.ContentSequence = Sequence(children)
    return it


def reason_text(reason: dict) -> str:
    """A reason code with its parameters, in English (the SR is read by machines and English-reading viewers)."""
    params = ", ".join(f"{k} {v}" for k, v in reason.items() if k != "code")
    return f"{reason.get('code', '?')} ({params})" if params else str(reason.get("code", "?"))


def _evidence(study_uid: str, instances: list[dict]) -> Sequence:
    """Hierarchical SOP Instance Reference Macro: study -> series -> instances."""
    series: dict[str, list[dict]] = {}
    for inst in instances:
        series.setdefault(inst["series_uid"] or "", []).append(inst)
    st = Dataset()
    st.StudyInstanceUID = study_uid
    st.ReferencedSeriesSequence = Sequence()
    for series_uid, members in series.items():
        se = Dataset()
        se.SeriesInstanceUID = series_uid
        se.ReferencedSOPSequence = Sequence()
        for inst in members:
            ref = Dataset()
            ref.ReferencedSOPClassUID = inst["sop_class_uid"]
            ref.ReferencedSOPInstanceUID = inst["sop_instance_uid"]
            se.ReferencedSOPSequence.append(ref)
        st.ReferencedSeriesSequence.append(se)
    return Sequence([st])


def build_sr(study: dict, sources: list[dict], header: Dataset, *, box_id: str, sop_uid: str, series_uid: str,
             instance_number: int = 1, predecessors: list[dict] | None = None) -> Dataset:
    """The study's TID 1500 measurement report (edge/results_sr.py): its band, then per image the model, the score
    referencing that image, the thresholds and reasons. Preliminary and unverified: nobody signs a machine's output."""
    from edge.results_sr import build_measurement_report

    return build_measurement_report(
        study, sources, header, box_id=box_id, sop_uid=sop_uid, series_uid=series_uid,
        series_number=SERIES_NUMBER[SR], instance_number=instance_number, software_version=_software_version(),
        reason_text=reason_text, disclaimer=DISCLAIMER,
        predecessors=_evidence(study["study_uid"], predecessors) if predecessors else None)


def _ascii(text: str) -> str:
    # Hershey fonts draw ASCII only; a model name in another script would come out as '?'.
    return text.encode("ascii", "replace").decode()


def burn_in(image: np.ndarray, label: str, lines: list[str]) -> np.ndarray:
    """The thumbnail (uint8 grey or RGB) under a band in the label's colour with `lines`, and a disclaimer below."""
    rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image
    font, scale, thick = cv2.FONT_HERSHEY_SIMPLEX, 0.55, 1
    line_h = 24
    width = max(rgb.shape[1], 560)
    texts = [_ascii(t) for t in lines]
    widest = max(cv2.getTextSize(t, font, scale, thick)[0][0] for t in texts + [NOT_FOR_CLINICAL_USE])
    if widest + 20 > width:
        scale *= (width - 20) / widest
    top = 10 + line_h * len(texts)
    bottom = 34
    canvas = np.zeros((top + rgb.shape[0] + bottom, width, 3), np.uint8)
    canvas[:top] = _BAND.get(label, (90, 90, 90))
    left = (width - rgb.shape[1]) // 2
    canvas[top:top + rgb.shape[0], left:left + rgb.shape[1]] = rgb
    for i, t in enumerate(texts):
        cv2.putText(canvas, t, (10, 26 + i * line_h), font, scale * (1.25 if i == 0 else 1.0), (255, 255, 255),
                    thick + (1 if i == 0 else 0), cv2.LINE_AA)
    cv2.putText(canvas, NOT_FOR_CLINICAL_USE, (10, canvas.shape[0] - 11), font, scale * 1.1, (255, 230, 0), thick + 1,
                cv2.LINE_AA)
    return canvas


def sc_lines(study: dict, key: dict) -> list[str]:
    lines = [f"{study['label'].upper()}  - Wasla AI triage"]
    for res in key["results"]:
        if res["model"]:
            score = result_score(res)
            th = res["thresholds"] or {}
            lines.append(f"score {score:.2f} (review >= {th.get('review')}, urgent >= {th.get('urgent')})"
                         if score is not None else "score -")
            lines.append(f"model {res['model']} {res['model_version']}")
    if len(lines) == 1:
        lines += [reason_text(r) for r in (key["results"][0]["reasons"] if key["results"] else [])][:2]
    return lines


def build_sc(study: dict, key: dict, key_ds: Dataset, *, box_id: str, sop_uid: str, series_uid: str,
             instance_number: int = 1, max_pixels: int = 100_000_000) -> Dataset:
    """A Secondary Capture: the key image's rendered thumbnail with label, score and model burned in."""
    frame = imaging.render(key_ds, min_side=_SC_MAX_SIDE // 2, max_pixels=max_pixels)[0]
    pixels = burn_in(imaging.thumbnail(frame, _SC_MAX_SIDE), study["label"], sc_lines(study, key))
    ds = _base(SecondaryCaptureImageStorage, sop_uid, series_uid, SERIES_NUMBER[SC], instance_number, key_ds,
               box_id, "OT")
    ds.SeriesDescription = f"{SERIES_PREFIX} image (not for clinical use)"
    ds.ConversionType = "WSD"
    # Type 2C (paired body parts): the source's value, empty when it has none (dciodvfy checks it).
    ds.Laterality = key_ds.get("Laterality", "") or ""
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "YES"
    ds.PatientOrientation = ""
    ds.DerivationDescription = f"Wasla AI triage: {study['label']}; {NOT_FOR_CLINICAL_USE}"
    src = Dataset()
    src.ReferencedSOPClassUID = key["sop_class_uid"]
    src.ReferencedSOPInstanceUID = key["sop_instance_uid"]
    ds.SourceImageSequence = Sequence([src])
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


# --- on the box -----------------------------------------------------------------------------------------------------

def _read(store: Store, inst: dict, *, pixels: bool) -> Dataset:
    try:
        return pydicom.dcmread(store.instance_path(inst), stop_before_pixels=not pixels)
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for a file gone bad
        raise BadInputError(f"cannot read instance #{inst['id']}: {type(err).__name__}") from err


def _store_derived(store: Store, ds: Dataset, study_uid: str, replaced: list[dict]) -> dict:
    """Spool file first (temp, fsync, rename), then the row: `triaged`, no label, source "wasla"."""
    tmp = store.new_tmp_path()
    ds.save_as(tmp, enforce_file_format=True)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
    dest = store.spool_dir / DERIVED_DIR / f"{sha}.dcm"
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)
    now = time.time()
    gone: list[Path] = []
    with store.transaction() as db:
        existing = db.execute("SELECT id FROM instances WHERE sop_instance_uid = ?", [ds.SOPInstanceUID]).fetchone()
        if existing is None:
            iid = db["instances"].insert({
                "sop_instance_uid": ds.SOPInstanceUID, "study_uid": study_uid, "series_uid": ds.SeriesInstanceUID,
                "sop_class_uid": ds.SOPClassUID, "modality": ds.Modality, "body_part": "", "view_position": "",
                "transfer_syntax": ExplicitVRLittleEndian, "rows": int(ds.get("Rows", 0) or 0),
                "columns": int(ds.get("Columns", 0) or 0), "frames": 1,
                "path": str(dest.relative_to(store.spool_dir)), "sha256": sha, "size": dest.stat().st_size,
                "source": SOURCE, "calling_ae": None, "state": TRIAGED, "reason": None, "label": None,
                "received_at": now, "updated_at": now, "triaged_at": now,
            }).last_pk
            # An older version still on the box never left it: the new one replaces it instead of piling up.
            for old in replaced:
                cur = db.execute("DELETE FROM instances WHERE id = ? AND state IN (?, ?) AND source = ?",
                                 [old["id"], TRIAGED, RECEIVED, SOURCE])
                if cur.rowcount:
                    gone.append(store.instance_path(old))
        else:
            iid = existing[0]
            gone.append(dest)  # written by a concurrent writer of the same content: keep theirs
    for path in gone:
        path.unlink(missing_ok=True)
    return store.query("SELECT * FROM instances WHERE id = ?", [iid])[0]


def ensure_results(store: Store, study_uid: str, *, box_id: str, kinds: tuple[str, ...] = (SR,),
                   max_pixels: int = 100_000_000) -> list[dict]:
    """Make sure the study's current SR (and SC if asked) exist on the box; return their rows, SR first.

    NotFoundError when the study has no triaged image to report on; StateError while images are still waiting."""
    study = store.study(study_uid)
    if any(i["state"] in (RECEIVED, PROCESSING) for i in study["instances"] if not is_derived(i)):
        raise StateError(f"study {study['study_uid']} is still being triaged")
    sources = triaged_sources(study)
    if not sources or not study["label"]:
        raise NotFoundError(f"study {study['study_uid']} has no triaged image to report on")
    fp = fingerprint(study, sources)
    out = []
    for kind in kinds:
        series_uid, sop_uid = _uids(box_id, study["study_uid"], kind, fp)
        versions = [i for i in study["instances"] if is_derived(i) and i["sop_class_uid"] == SOP_CLASS[kind]]
        current = next((i for i in versions if i["sop_instance_uid"] == sop_uid), None)
        if current is not None:
            out.append(current)
            continue
        # Versions still on the box are replaced; those already sent stay, named as predecessors of the new one.
        replaced = [i for i in versions if i["state"] in (TRIAGED, RECEIVED)]
        kept = [i for i in versions if i not in replaced]
        if kind == SR:
            header = _read(store, sources[0], pixels=False)
            ds = build_sr(study, sources, header, box_id=box_id, sop_uid=sop_uid, series_uid=series_uid,
                          instance_number=len(kept) + 1, predecessors=kept)
        else:
            key = key_instance(sources)
            ds = build_sc(study, key, _read(store, key, pixels=True), box_id=box_id, sop_uid=sop_uid,
                          series_uid=series_uid, instance_number=len(kept) + 1, max_pixels=max_pixels)
        row = _store_derived(store, ds, study["study_uid"], replaced)
        log.info("study %s: %s %s written (%d bytes)", study["study_uid"], kind.upper(), sop_uid, row["size"])
        out.append(row)
    return out


def skip_triage(store: Store, instance_id: int) -> None:
    """A derived instance claimed by the worker (a requeue put it back): straight back to `triaged`, no label."""
    with store.transaction() as db:
        store.transition(db, instance_id, TRIAGED, label=None, reason=None, triaged_at=time.time())


def remove_orphans(store: Store) -> int:
    """Derived files whose row never committed (a crash in between): nobody can reference them, remove them."""
    folder = store.spool_dir / DERIVED_DIR
    if not folder.is_dir():
        return 0
    known = store.known_paths()
    n = 0
    for f in folder.glob("*.dcm"):
        if str(f.relative_to(store.spool_dir)) not in known:
            f.unlink(missing_ok=True)
            n += 1
    return n
