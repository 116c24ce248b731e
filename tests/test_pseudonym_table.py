"""Pseudonymisation follows PS3.15 Table E.1-1: every attribute the table names gets its action, checked one by one."""
from __future__ import annotations

import pytest
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from sync.wire import pseudonym

KEY = bytes(range(32))


def _dummy(vr: str):
    if vr == "SQ":
        inner = Dataset()
        inner.PatientName = "Doe^Jane"
        return Sequence([inner])
    if vr in ("OB", "OD", "OF", "OL", "OV", "OW", "UN"):
        return b"\x00\x01"
    if vr in ("FL", "FD"):
        return 1.5
    if vr in ("SL", "SS", "SV", "UL", "US", "UV", "AT"):
        return 1
    return {"AS": "030Y", "DA": "20260101", "DT": "20260101120000", "TM": "120000", "DS": "1.5", "IS": "7",
            "UI": "1.2.3.4.5", "PN": "Doe^Jane", "UR": "http://clinic.example/x"}.get(vr, "Tamanrasset secret")


def _table_dataset():
    exact, _masked = pseudonym._table()
    ds, named = Dataset(), {}
    for (group, element), action in exact.items():
        tag = Tag(group, element)
        try:
            vr = dictionary_VR(tag).split(" or ")[0]
        except KeyError:
            continue  # retired or not in pydicom's dictionary: nothing to build it from
        ds.add_new(tag, vr, _dummy(vr))
        named[tag] = (action, vr)
    return ds, named


def test_every_attribute_the_standards_table_names_gets_its_action():
    ds, named = _table_dataset()
    assert len(named) > 500  # the whole table, not a hand-picked list
    before = {tag: ds[tag].value for tag in named}
    pseudonym.pseudonymise(ds, KEY, retain_uids=False)
    wrong = []
    for tag, (action, vr) in named.items():
        kw = ds[tag].keyword if tag in ds else None
        present = tag in ds
        if kw in pseudonym.PSEUDONYMISED:
            ok = present and ds[tag].value != before[tag]
        elif vr == "UI":
            ok = present and str(ds[tag].value).startswith("2.25.")
        elif vr in pseudonym.TEMPORAL_VRS and not _identifying(tag):
            ok = present and ds[tag].value == before[tag]
        elif action == "Z" or (action == "Z/D" and vr != "SQ"):
            ok = present and ds[tag].value in ("", None, Sequence([])) and len(ds[tag].value or []) == 0
        elif action in ("U",) or (action == "X/Z/U*" and vr == "SQ"):
            ok = present and (vr != "SQ" or all(item.get("PatientName") != "Doe^Jane" for item in ds[tag].value))
        else:
            ok = not present
        if not ok:
            wrong.append((str(tag), action, vr))
    assert not wrong, wrong[:20]


def _identifying(tag) -> bool:
    from pydicom.datadict import keyword_for_tag

    return keyword_for_tag(tag) in pseudonym.IDENTIFYING_DATES


@pytest.mark.parametrize("keyword", ["RequestedProcedureDescription", "ReasonForTheRequestedProcedure",
                                     "MedicalAlerts", "Allergies", "CurrentPatientLocation",
                                     "ScheduledProcedureStepDescription", "PatientTelecomInformation",
                                     "ResponsiblePersonRole", "PatientBirthDateInAlternativeCalendar"])
def test_the_attributes_that_once_went_through_are_removed_or_emptied(keyword):
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    ds = Dataset()
    tag = tag_for_keyword(keyword)
    ds.add_new(tag, dictionary_VR(tag).split(" or ")[0], "Tamanrasset, bed 4, allergic to penicillin")
    pseudonym.pseudonymise(ds, KEY)
    assert tag not in ds or not ds[tag].value
    assert ds.PatientIdentityRemoved == "YES"


def test_our_own_sr_keeps_its_content_and_description_but_not_the_patient():
    from sync.wire import results as results_dicom

    ds = Dataset()
    ds.Manufacturer = results_dicom.MANUFACTURER
    ds.SeriesDescription = "Wasla AI triage result"
    ds.PatientName, ds.PatientBirthDate = "Doe^Jane", "19800101"
    item = Dataset()
    item.TextValue = "score 0.91 at or above the urgent threshold"
    ds.ContentSequence = Sequence([item])
    pseudonym.pseudonymise(ds, KEY)
    assert results_dicom.is_wasla_result(ds)
    assert ds.ContentSequence[0].TextValue.startswith("score 0.91")
    assert ds.PatientName != "Doe^Jane" and not ds.PatientBirthDate
