"""The radiologist's read as a DICOM report the PACS files with the study: a Basic Text SR after TID 2000 (Basic
Diagnostic Imaging Report), verified by the reader, filed in the hub's store and forwarded like any instance."""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from sync.core.errors import NotFoundError
from sync.core.i18n import N_
from sync.wire import codecs

log = logging.getLogger(__name__)

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
SERIES_NUMBER = 9903
_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
           "ReferringPhysicianName", "StudyID", "AccessionNumber", "IssuerOfPatientID", "StudyDescription")
# The radiologist's disposition of a study, as the clinic's box shows it (codes stay stable; names translate).
READ_DISPOSITIONS = {
    "normal": N_("Normal: no further action"),
    "abnormal": N_("Abnormal: routine follow-up at the clinic"),
    "urgent-referral": N_("Urgent referral to hospital"),
    "repeat-image": N_("Repeat the image (technical quality)"),
}
# Structured findings (SNOMED CT concept ids), so the pilot can count them without parsing free text.
READ_FINDINGS = {
    "233604007": N_("Pneumonia"),
    "95436008": N_("Lung consolidation"),
    "60046008": N_("Pleural effusion"),
    "36118008": N_("Pneumothorax"),
    "8186001": N_("Cardiomegaly"),
    "46621007": N_("Atelectasis"),
    "154283005": N_("Pulmonary tuberculosis"),
}



def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _item(relationship: str, value_type: str, concept: Dataset, **values) -> Dataset:
    it = Dataset()
    it.RelationshipType, it.ValueType = relationship, value_type
    it.ConceptNameCodeSequence = Sequence([concept])
    for k, v in values.items():
        setattr(it, k, v)
    return it


def build_report(read: dict, header: Dataset, evidence: list[dict], *, hub_id: str, institution: str = "") -> Dataset:
    """`read` as stored by HubStore.add_read; `header` one stored instance of the study (patient and study
    attributes); `evidence` the study's images ({sop_class_uid, sop_instance_uid, series_uid})."""
    sop_uid = generate_uid(entropy_srcs=["wasla-read", read["read_id"]])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = BASIC_TEXT_SR, sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.preamble = meta, b"\0" * 128
    ds.SpecificCharacterSet = "ISO_IR 192"  # the note may be Arabic or French
    ds.SOPClassUID, ds.SOPInstanceUID = BASIC_TEXT_SR, sop_uid
    for kw in _COPIED:
        if kw in header or kw not in ("IssuerOfPatientID", "StudyDescription"):
            setattr(ds, kw, header.get(kw, "") or "")
    ds.StudyInstanceUID = read["study_uid"]
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["wasla-read-series", read["study_uid"]])
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "SR", SERIES_NUMBER, 1
    ds.SeriesDescription = "Radiologist read (Wasla hub)"
    ds.Manufacturer, ds.ManufacturerModelName, ds.StationName = "Wasla", "Wasla hub", hub_id[:16]
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.PerformedProcedureCodeSequence = Sequence()
    when = dt.datetime.fromtimestamp(read["at"])
    ds.ContentDate = ds.InstanceCreationDate = ds.SeriesDate = when.strftime("%Y%m%d")
    ds.ContentTime = ds.InstanceCreationTime = ds.SeriesTime = when.strftime("%H%M%S")
    if institution:
        ds.InstitutionName = institution[:64]
    reader = (read.get("by") or "unknown reader")[:64]
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "VERIFIED"
    observer = Dataset()
    observer.VerifyingObserverName = reader
    observer.VerifyingOrganization = (institution or "Wasla hub")[:64]
    observer.VerificationDateTime = when.strftime("%Y%m%d%H%M%S")
    observer.VerifyingObserverIdentificationCodeSequence = Sequence()
    ds.VerifyingObserverSequence = Sequence([observer])
    ev = Dataset()
    ev.StudyInstanceUID = read["study_uid"]
    ev.ReferencedSeriesSequence = Sequence()
    for series_uid in dict.fromkeys(e["series_uid"] for e in evidence):
        se = Dataset()
        se.SeriesInstanceUID = series_uid
        se.ReferencedSOPSequence = Sequence()
        for e in (e for e in evidence if e["series_uid"] == series_uid):
            ref = Dataset()
            ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = e["sop_class_uid"], e["sop_instance_uid"]
            se.ReferencedSOPSequence.append(ref)
        ev.ReferencedSeriesSequence.append(se)
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence([ev]) if evidence else Sequence()
    # TID 2000: observer, findings (coded and free text), impression (the disposition).
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic Imaging Report")])
    tpl = Dataset()
    tpl.MappingResource, tpl.TemplateIdentifier = "DCMR", "2000"
    ds.ContentTemplateSequence = Sequence([tpl])
    lang = _item("HAS CONCEPT MOD", "CODE", _code("121049", "DCM", "Language of Content Item and Descendants"))
    lang.ConceptCodeSequence = Sequence([_code("en", "RFC5646", "English")])
    children = [lang, _item("HAS OBS CONTEXT", "PNAME", _code("121008", "DCM", "Person Observer Name"),
                            PersonName=reader)]
    findings = []
    for code in json.loads(read.get("findings") or "[]") if isinstance(read.get("findings"), str) else (
            read.get("findings") or []):
        it = _item("CONTAINS", "CODE", _code("121071", "DCM", "Finding"))
        it.ConceptCodeSequence = Sequence([_code(code, "SCT", READ_FINDINGS.get(code, code))])
        findings.append(it)
    if read.get("note"):
        findings.append(_item("CONTAINS", "TEXT", _code("121071", "DCM", "Finding"), TextValue=read["note"][:2000]))
    section = [_item("CONTAINS", "CONTAINER", _code("121070", "DCM", "Findings"), ContinuityOfContent="SEPARATE",
                     ContentSequence=Sequence(findings))] if findings else []
    impression = _item("CONTAINS", "TEXT", _code("121073", "DCM", "Impression"),
                       TextValue=READ_DISPOSITIONS.get(read["disposition"], read["disposition"]))
    section.append(_item("CONTAINS", "CONTAINER", _code("121072", "DCM", "Impressions"), ContinuityOfContent="SEPARATE",
                         ContentSequence=Sequence([impression])))
    ds.ContentSequence = Sequence(children + section)
    return ds


def file_report(store, read: dict, *, hub_id: str) -> str:
    """Write the read's report into the hub's store (then the PACS forwarder sends it); returns its SOP UID."""
    rows = store.query("SELECT sop_instance_uid, path, sop_class_uid FROM instances WHERE study_uid = ? "
                       "ORDER BY stored_at", [read["study_uid"]])
    images = [r for r in rows if not (r.get("sop_class_uid") or "").startswith(SR_CLASS_PREFIX)]
    if not images:
        raise NotFoundError(f"study {read['study_uid']} has no stored instance yet to take patient details from")
    evidence = []
    header = None
    for r in images:
        ds, _raw = codecs.read_dataset((store.studies_dir / r["path"]).read_bytes())
        if "PixelData" not in ds and header is not None:
            continue
        header = header or ds
        evidence.append({"sop_class_uid": str(ds.SOPClassUID), "sop_instance_uid": str(ds.SOPInstanceUID),
                         "series_uid": str(ds.SeriesInstanceUID)})
    report = build_report(read, header, evidence, hub_id=hub_id, institution=str(header.get("InstitutionName", "")))
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, report, enforce_file_format=True)
    data = buf.getvalue()
    t = {"device": read["device"], "transfer_id": f"read-{read['read_id']}", "sha256": hashlib.sha256(data).hexdigest(),
         "size": len(data), "codec": "report", "transfer_syntax": ExplicitVRLittleEndian, "label": None,
         "sop_class_uid": BASIC_TEXT_SR}
    store.commit_instance(t, str(report.SOPInstanceUID), read["study_uid"], data, counts_as_image=False)
    log.info("read %s filed as report %s", read["read_id"], report.SOPInstanceUID)
    return str(report.SOPInstanceUID)
