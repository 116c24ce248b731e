"""DICOM pseudonymisation (PS3.15 Basic Application Level Confidentiality Profile) with stable keyed pseudonyms.

Pseudonyms are HMAC-SHA256 under the fleet's key: the same patient (or UID) gets the same pseudonym on every box of
the fleet, so the hub can still link a patient's studies; without the key they cannot be reversed or recomputed
from a guessed identifier. Options applied (PS3.15 Table E.1-1): Retain Longitudinal Temporal Information with Full
Dates (the hub's worklist needs the study times), and, for the sync path, Retain UIDs (see `pseudonymise`).
Burned-in text in the pixels is not touched: such images are flagged in the log, never silently passed as clean.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
from io import BytesIO
from pathlib import Path

from edge.errors import ConfigError

log = logging.getLogger(__name__)

DICOM_UID_ROOT = "1.2.840.10008."  # SOP classes, transfer syntaxes, coding schemes: not instance identifiers
MIN_KEY_BYTES = 32

# Replaced by a keyed pseudonym (the hub keeps linkage across studies of one patient).
PSEUDONYMISED = ("PatientID", "PatientName", "AccessionNumber", "StudyID")
# Emptied (type 2 attributes: present but zero length).
EMPTIED = ("PatientBirthDate", "PatientSex", "ReferringPhysicianName", "ContentCreatorName")
# Removed (PS3.15 "X" actions of the basic profile for the attributes a CR/DX/US/CT/MR header carries).
REMOVED = (
    "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName",
    "PatientAddress", "PatientTelephoneNumbers", "PatientAge", "PatientSize", "PatientWeight", "PatientBirthTime",
    "PatientComments", "AdditionalPatientHistory", "Occupation", "MilitaryRank", "BranchOfService",
    "MedicalRecordLocator", "EthnicGroup", "PatientReligiousPreference", "PregnancyStatus", "SmokingStatus",
    "LastMenstrualDate", "PatientInsurancePlanCodeSequence", "CountryOfResidence", "RegionOfResidence",
    "InsurancePlanIdentification", "ResponsiblePerson", "ResponsibleOrganization", "PatientState",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "InstitutionCodeSequence",
    "StationName", "DeviceSerialNumber", "PlateID", "DetectorID", "CassetteID", "GantryID",
    "PerformingPhysicianName", "PerformingPhysicianIdentificationSequence", "OperatorsName",
    "OperatorIdentificationSequence", "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence",
    "NameOfPhysiciansReadingStudy", "PhysiciansReadingStudyIdentificationSequence", "RequestingPhysician",
    "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers", "ReferringPhysicianIdentificationSequence",
    "RequestingService", "RequestAttributesSequence", "ScheduledPerformingPhysicianName",
    "PerformedProcedureStepID", "PerformedProcedureStepDescription", "ScheduledProcedureStepID",
    "RequestedProcedureID", "AdmissionID", "AdmittingDiagnosesDescription", "IssuerOfAdmissionID",
    "IssuerOfPatientID", "ImageComments", "StudyComments", "InterpretationAuthor", "TextComments",
    "DerivationDescription", "FrameComments", "ProtocolName", "SeriesDescription",
    "StudyDescription", "AcquisitionComments", "ContrastBolusAgent", "DeviceUID", "MAC", "DigitalSignaturesSequence",
    "OriginalAttributesSequence", "ModifiedAttributesSequence", "ReferencedPatientSequence",
    "ReferencedPatientPhotoSequence", "PersonName", "VerifyingObserverName", "VerifyingObserverSequence",
    "AuthorObserverSequence", "ParticipantSequence", "CustodialOrganizationSequence",
)
# PS3.16 CID 7050 codes recorded in DeidentificationMethodCodeSequence.
CODE_BASIC, CODE_RETAIN_DATES, CODE_RETAIN_UIDS = "113100", "113106", "113110"


def load_key(path: Path) -> bytes:
    """The fleet HMAC key: a hex file (a systemd credential on the box)."""
    try:
        key = bytes.fromhex(Path(path).read_text().strip())
    except (OSError, ValueError) as err:
        raise ConfigError(f"sync.pseudonym_key_file {path}: cannot read a hex key: {err}") from err
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"sync.pseudonym_key_file {path}: {len(key)} bytes, need at least {MIN_KEY_BYTES}")
    return key


def _mac(key: bytes, kind: str, value: str) -> bytes:
    # The kind is mixed in, so a patient ID equal to some accession number still maps to unrelated pseudonyms.
    return hmac.new(key, f"{kind}\0{value}".encode("utf-8"), hashlib.sha256).digest()


def pseudo_uid(key: bytes, uid: str) -> str:
    """A valid UID under the 2.25 (UUID-derived) root: 2.25.<128-bit integer>, at most 44 characters."""
    return "2.25." + str(int.from_bytes(_mac(key, "uid", uid)[:16], "big"))


def pseudo_id(key: bytes, kind: str, value: str) -> str:
    """16 upper-case hex digits (fits LO, SH and PN; no character a DICOM string forbids)."""
    return _mac(key, kind, value).hex()[:16].upper()


def pseudonymise(ds, key: bytes, *, retain_uids: bool = False) -> None:
    """Apply the profile to `ds` in place (nested sequences and file meta included)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    def visit(d: Dataset) -> None:
        for elem in list(d):
            tag, kw = elem.tag, elem.keyword
            if tag.is_private:
                del d[tag]
            elif kw in REMOVED or (0x6000 <= tag.group <= 0x601E and tag.element == 0x3000):  # overlay data
                del d[tag]
            elif kw in EMPTIED:
                elem.value = ""
            elif kw in PSEUDONYMISED:
                if elem.value not in (None, ""):
                    elem.value = pseudo_id(key, kw, str(elem.value))
            elif elem.VR == "UI" and not retain_uids and elem.value:
                elem.value = _map_uids(elem.value, key)
            elif elem.VR == "SQ":
                for item in elem.value or Sequence([]):
                    visit(item)

    if ds.get("BurnedInAnnotation", "") == "YES":
        log.warning("instance %s has burned-in annotation: its pixels may still show identifying text",
                    ds.get("SOPInstanceUID", "?"))
    visit(ds)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta and "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientIdentityRemoved = "YES"
    options = [CODE_BASIC, CODE_RETAIN_DATES] + ([CODE_RETAIN_UIDS] if retain_uids else [])
    ds.DeidentificationMethod = "PS3.15 Basic Profile, keyed HMAC-SHA256 pseudonyms"
    ds.DeidentificationMethodCodeSequence = Sequence([_code(c) for c in options])


def _map_uids(value, key: bytes):
    def one(uid: str) -> str:
        uid = str(uid)
        return uid if uid.startswith(DICOM_UID_ROOT) else pseudo_uid(key, uid)

    if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") and not isinstance(value, str):
        return [one(u) for u in value]
    return one(value)


def _code(value: str):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator = value, "DCM"
    item.CodeMeaning = {CODE_BASIC: "Basic Application Confidentiality Profile",
                        CODE_RETAIN_DATES: "Retain Longitudinal Temporal Information Full Dates Option",
                        CODE_RETAIN_UIDS: "Retain UIDs Option"}[value]
    return item


def pseudonymise_file(path: Path, key: bytes, *, retain_uids: bool = True) -> bytes:
    """The Part-10 bytes of `path` pseudonymised, in the file's own transfer syntax (pixel data untouched).

    The sync path retains UIDs: the wire protocol names studies and instances by them (flags, manifests, the hub's
    check of each instance against its manifest, reads coming back), and they carry no patient identity."""
    import pydicom

    ds = pydicom.dcmread(str(path))
    pseudonymise(ds, key, retain_uids=retain_uids)
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
