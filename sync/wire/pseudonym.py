"""DICOM pseudonymisation (PS3.15 Basic Application Level Confidentiality Profile) with stable keyed pseudonyms.

Pseudonyms are HMAC-SHA256 under the fleet's key: the same patient (or UID) gets the same pseudonym on every box of
the fleet, so the hub can still link a patient's studies; without the key they cannot be reversed or recomputed
from a guessed identifier. Options applied (PS3.15 Table E.1-1): Retain Longitudinal Temporal Information with Full
Dates (the hub's worklist needs the study times), and, for the sync path, Retain UIDs (see `pseudonymise`).
Burned-in text in the pixels is not touched: such images are flagged in the log, never silently passed as clean.
Every attribute is handled by its action in the standard's Table E.1-1 (as data from dicom-anonymizer, see
`_table`), plus a safety net for the Patient group; tests/test_pseudonym_table.py checks the whole table.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
from io import BytesIO
from pathlib import Path

from sync.core.errors import ConfigError

log = logging.getLogger(__name__)

DICOM_UID_ROOT = "1.2.840.10008."  # SOP classes, transfer syntaxes, coding schemes: not instance identifiers
MIN_KEY_BYTES = 32

# Replaced by a keyed pseudonym (the hub keeps linkage across studies of one patient).
PSEUDONYMISED = ("PatientID", "PatientName", "AccessionNumber", "StudyID")
# Our own result objects (SR/SC) keep what makes them recognisable and readable at the hub; their patient module
# is treated like any other header. Their content is ours (label, scores, reasons), never the patient's.
OURS_KEPT = ("SeriesDescription", "ContentSequence")
# Retain Longitudinal Temporal Information with Full Dates: every date and time stays (the hub's worklist and the
# radiologist's timeline need them).
TEMPORAL_VRS = ("DA", "DT", "TM")
# ... but not the patient's own: a birth date identifies, it is no timeline.
IDENTIFYING_DATES = ("PatientBirthDate", "PatientBirthTime", "PatientDeathDateInAlternativeCalendar",
                     "PatientBirthDateInAlternativeCalendar", "LastMenstrualDate")


def _table():
    """PS3.15 Table E.1-1 (Basic Application Level Confidentiality Profile), as the dicom-anonymizer project
    transcribes it from the standard (2026c edition): tag -> action. Actions with a choice (X/Z, X/D, X/Z/D,
    Z/D, X/Z/U*) take the strictest one this profile can keep valid: remove, except UIDs (mapped) and the keyed
    identity attributes (pseudonymised)."""
    from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as t

    exact: dict[tuple[int, int], str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for action, tags in (("D", t.D_TAGS), ("Z", t.Z_TAGS), ("X", t.X_TAGS), ("U", t.U_TAGS), ("Z/D", t.Z_D_TAGS),
                         ("X/Z", t.X_Z_TAGS), ("X/D", t.X_D_TAGS), ("X/Z/D", t.X_Z_D_TAGS),
                         ("X/Z/U*", t.X_Z_U_STAR_TAGS)):
        for tag in tags:
            if len(tag) == 4:
                masked.append((*tag, action))
            else:
                exact[(tag[0], tag[1])] = action
    return exact, masked


_TABLE = None


def action_for(tag) -> str | None:
    """The table's action for a (non-private) tag, None when the standard keeps it."""
    global _TABLE
    if _TABLE is None:
        _TABLE = _table()
    exact, masked = _TABLE
    key = (tag.group, tag.element)
    if key in exact:
        return exact[key]
    for group, element, gmask, emask, action in masked:
        if tag.group & gmask == group and tag.element & emask == element:
            return action
    return None


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

    ours = _is_ours(ds)

    def visit(d: Dataset) -> None:
        for elem in list(d):
            tag, kw = elem.tag, elem.keyword
            if tag.is_private:
                del d[tag]
                continue
            action = action_for(tag)
            if action is None and tag.group == 0x0010:
                # Safety net: a Patient-group attribute the table does not name (the transcription lacks e.g.
                # Responsible Person Role and the alternative-calendar dates; the standard grows) is removed too.
                action = "X"
            if kw in PSEUDONYMISED:
                if elem.value not in (None, ""):
                    elem.value = pseudo_id(key, kw, str(elem.value))
            elif elem.VR == "UI":
                if elem.value and not retain_uids:
                    elem.value = _map_uids(elem.value, key)
            elif (elem.VR in TEMPORAL_VRS and kw not in IDENTIFYING_DATES) or (ours and kw in OURS_KEPT):
                pass
            elif action is None or action == "U":
                if elem.VR == "SQ":
                    for item in elem.value or Sequence([]):
                        visit(item)
            elif action == "Z" or (action == "Z/D" and elem.VR != "SQ"):
                elem.value = Sequence([]) if elem.VR == "SQ" else ""
            elif action == "X/Z/U*" and elem.VR == "SQ":
                for item in elem.value or Sequence([]):  # references: kept, their UIDs mapped like any UID
                    visit(item)
            else:  # X and every choice that includes X; D (a dummy would carry nothing the hub needs)
                del d[tag]

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


def _is_ours(ds) -> bool:
    from sync.wire.results import is_wasla_result

    try:
        return is_wasla_result(ds)
    except Exception:  # noqa: BLE001 - a malformed header is never "ours"
        return False


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
