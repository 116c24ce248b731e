"""How a result object the box wrote (its SR and SC) is told apart on the wire and at the hub, and what it replaces."""
from __future__ import annotations

from pydicom.dataset import Dataset

MANUFACTURER = "Wasla"
SERIES_PREFIX = "Wasla AI triage"


def is_wasla_result(ds: Dataset) -> bool:
    """A dataset this software wrote (SR or SC), recognised at the hub by its manufacturer and series."""
    return ds.get("Manufacturer") == MANUFACTURER and str(ds.get("SeriesDescription", "")).startswith(SERIES_PREFIX)


def predecessor_uids(ds: Dataset) -> tuple[str, ...]:
    """SOP Instance UIDs an SR names as its predecessors (the versions it replaces); () when none or malformed."""
    out = []
    try:
        for st in ds.get("PredecessorDocumentsSequence", []) or []:
            for se in st.get("ReferencedSeriesSequence", []) or []:
                for ref in se.get("ReferencedSOPSequence", []) or []:
                    uid = str(ref.get("ReferencedSOPInstanceUID", "") or "")
                    if uid:
                        out.append(uid)
    except Exception:  # noqa: BLE001 - arrived from a box: a malformed sequence hides nothing
        return ()
    return tuple(dict.fromkeys(out))[:64]
