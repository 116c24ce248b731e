"""The box's triage result as a standard DICOM SR (highdicom): a TID 1500 Measurement Report whose measurement
groups (TID 1501) carry TID 4019 algorithm identification, the band as coded qualitative evaluations and the score
as a measurement referencing its image."""
from __future__ import annotations

import datetime as dt

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from sync.core import hdtables
from sync.wire.results import MANUFACTURER, SERIES_PREFIX

hdtables.install()  # highdicom's module tables one module at a time: ~250 MB less peak memory in the daemon

SCHEME = "99WASLA"  # local scheme (PS3.16 8.2) for what DICOM, SNOMED CT and LOINC have no concept of
PROCEDURE_CHEST = Code("399208008", "SCT", "Plain chest X-ray")
PROCEDURE_IMAGING = Code("363679005", "SCT", "Imaging")
FINDING = Code("121071", "DCM", "Finding")
# The band as a finding any SR consumer can read (SNOMED CT qualifier values) ...
FINDING_OF = {"normal": Code("17621005", "SCT", "Normal"), "review": Code("419984006", "SCT", "Inconclusive"),
              "urgent": Code("263654008", "SCT", "Abnormal")}
# ... and as the triage category itself, which no standard vocabulary names.
CATEGORY = Code("TRIAGE-CATEGORY", SCHEME, "AI triage category")
CATEGORY_OF = {"normal": Code("NORMAL", SCHEME, "Likely normal"),
               "review": Code("REVIEW", SCHEME, "Requires review"),
               "urgent": Code("URGENT", SCHEME, "Urgent referral")}
SCORE = Code("ABNORMALITY-SCORE", SCHEME, "Abnormality score")
NO_UNITS = Code("1", "UCUM", "no units")
# Type 2 patient/study attributes highdicom copies from the first evidence dataset: written empty when absent.
_COPIED_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")
_COPIED_OPTIONAL = ("IssuerOfPatientID", "StudyDescription")


def _evidence(header: Dataset, sources: list[dict]) -> list[Dataset]:
    """One small dataset per referenced image: what highdicom needs to write the evidence and patient modules."""
    out = []
    for inst in sources:
        ev = Dataset()
        for kw in _COPIED_TYPE2:
            setattr(ev, kw, header.get(kw, "") or "")
        for kw in _COPIED_OPTIONAL:
            if header.get(kw):
                setattr(ev, kw, header.get(kw))
        ev.StudyInstanceUID = header.StudyInstanceUID
        ev.SeriesInstanceUID = inst["series_uid"] or header.get("SeriesInstanceUID")
        ev.SOPInstanceUID = inst["sop_instance_uid"]
        ev.SOPClassUID = inst["sop_class_uid"]
        ev.Modality = inst.get("modality") or header.get("Modality", "OT")
        out.append(ev)
    return out


def _group(label: str, identifier: str, uid: str, *, score: float | None = None, algorithm=None,
           image: dict | None = None) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    measurements = []
    source_images = None
    if image is not None:
        source_images = [hd.sr.SourceImageForMeasurementGroup(image["sop_class_uid"], image["sop_instance_uid"])]
    if score is not None:
        refs = [hd.sr.SourceImageForMeasurement(image["sop_class_uid"], image["sop_instance_uid"])] if image else None
        measurements.append(hd.sr.Measurement(name=SCORE, value=round(score, 4), unit=NO_UNITS,
                                              referenced_images=refs))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=identifier),
        algorithm_id=algorithm, source_images=source_images, measurements=measurements or None,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(FINDING, FINDING_OF[label]),
                                 hd.sr.QualitativeEvaluation(CATEGORY, CATEGORY_OF[label])])


def build_measurement_report(study: dict, sources: list[dict], header: Dataset, *, box_id: str, sop_uid: str,
                             series_uid: str, series_number: int, instance_number: int, software_version: str,
                             reason_text, disclaimer: str, predecessors: Dataset | None = None) -> Dataset:
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["wasla-box", box_id]), name=box_id[:64], manufacturer_name=MANUFACTURER,
            model_name="Wasla triage box"))
    body = str(header.get("BodyPartExamined", "") or "").upper()
    procedure = PROCEDURE_CHEST if body in ("CHEST", "") else PROCEDURE_IMAGING
    groups = []
    # The study's own verdict first: the band a worklist sorts by, and why (reasons as algorithm parameters).
    reasons = [reason_text(r) for r in study["reasons"] or []][:20] or None
    study_algo = hd.sr.AlgorithmIdentification(name="Wasla triage", version=software_version, parameters=reasons)
    groups.append(_group(study["label"], "study", generate_uid(entropy_srcs=[sop_uid, "study"]),
                         algorithm=study_algo))
    for n, inst in enumerate(sources, start=1):
        for res in inst["results"] or [None]:
            params = []
            if res and res.get("backend"):
                params.append(f"backend {res['backend']}")
            for key in ("review", "urgent"):
                value = ((res or {}).get("thresholds") or {}).get(key)
                if isinstance(value, (int, float)):
                    params.append(f"{key} threshold {float(value):.4f}")
            params += [reason_text(r) for r in ((res or {}).get("reasons") or [])][:10]
            algo = None
            if res and res.get("model"):
                algo = hd.sr.AlgorithmIdentification(name=res["model"], version=res.get("model_version") or "0",
                                                     parameters=params or None, manufacturer=MANUFACTURER)
            score = _score(res)
            groups.append(_group(inst["label"], f"image {n}", generate_uid(entropy_srcs=[sop_uid, str(n)]),
                                 score=score, algorithm=algo, image=inst))
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=device),
                                     procedure_reported=procedure, imaging_measurements=groups,
                                     title=codes.DCM.ImagingMeasurementReport)
    sr = hd.sr.ComprehensiveSR(
        evidence=_evidence(header, sources), content=report[0], series_instance_uid=series_uid,
        series_number=series_number, sop_instance_uid=sop_uid, instance_number=instance_number,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        institution_name=header.get("InstitutionName") or None)
    sr.SpecificCharacterSet = "ISO_IR 192"  # names copied from a source in any character set, without loss
    sr.SeriesDescription = f"{SERIES_PREFIX} (not for clinical use)"
    sr.ManufacturerModelName = "Wasla triage box"
    sr.StationName = box_id[:16]
    sr.SoftwareVersions = software_version
    sr.ContentDescription = disclaimer[:64]
    now = dt.datetime.now()
    sr.InstanceCreationDate, sr.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    if predecessors is not None:
        sr.PredecessorDocumentsSequence = predecessors
    return sr


def _score(res: dict | None) -> float | None:
    for reason in (res or {}).get("reasons") or []:
        if isinstance(reason, dict) and isinstance(reason.get("score"), (int, float)):
            return float(reason["score"])
    return None
