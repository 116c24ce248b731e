"""An assembled transfer's verdict: whole-file sha256, a full DICOM parse and pixel decode, then filed exactly once."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from sync.core.errors import BadInputError
from sync.wire import protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    status: str  # "complete" (filed, or filed before), "retry" (the bytes are wrong: send again), "failed" (final)
    reason: str = ""
    new: bool = False  # complete, and stored by this call (not a duplicate)


def verify_and_file(store, t: dict, device: str) -> Verdict:
    """`t` is the transfer row; its chunks are all in. Only a "complete" verdict may be acked as such."""
    from sync.wire.codecs import decode_wire
    from sync.wire.results import is_wasla_result, predecessor_uids

    tid = t["transfer_id"]
    data = store.part_path(tid).read_bytes()
    digest = hashlib.sha256(data[: t["size"]]).hexdigest()
    if len(data) < t["size"] or digest != t["sha256"]:
        reason = f"assembled file sha256 {digest[:12]} != manifest {t['sha256'][:12]}"
        log.warning("transfer %s from %s: %s; asking for it again", tid, device, reason)
        store.discard_chunks(tid, reason)
        return Verdict("retry", reason)
    data = data[: t["size"]]
    try:
        ds = decode_wire(data)
        sop, study = str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)
    except Exception as err:  # noqa: BLE001 - any decode failure is this transfer's, never the receiver's
        # Our own errors say what is wrong without quoting values; a library's message may quote one.
        detail = str(err)[:300] if isinstance(err, BadInputError) else type(err).__name__
        reason = f"not a usable DICOM instance: {detail}"
        store.fail_transfer(tid, reason)
        store.dead_letter(protocol.up_topic(device, "chunk"), device, f"transfer {tid}: {reason}", b"")
        return Verdict("failed", reason[:300])
    if t["study_uid"] and study != t["study_uid"]:
        reason = f"instance says study {study}, the transfer said {t['study_uid']}"
        store.fail_transfer(tid, reason)
        return Verdict("failed", reason)
    # The box's own result objects (SR/SC) travel with the study but are not images the radiologist waits for.
    ours = is_wasla_result(ds)
    t["sop_class_uid"] = str(ds.get("SOPClassUID", "") or "")[:64] or None
    new = store.commit_instance(t, sop, study, data, counts_as_image=not ours,
                                supersedes=predecessor_uids(ds) if ours else ())
    log.info("transfer %s from %s complete: %s of study %s %s (%d bytes, %s)", tid, device, sop, study,
             "stored" if new else "already stored", t["size"], t["codec"] or "?")
    return Verdict("complete", new=new)
