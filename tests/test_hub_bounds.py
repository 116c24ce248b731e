"""The hub bounds what one box can make it hold: declared instance size, unfinished bytes per box, partials that
expire; and a receiver restarted mid-verification takes its own claims up again at once."""
from __future__ import annotations

import hashlib
import time
from dataclasses import replace

import pytest
from pydicom.uid import generate_uid

from harness import wait_until
from sync.wire import protocol
from sync.hub.receiver import Receiver
from test_sync_support import RawBox, hub_cfg, make_cr

pytestmark = pytest.mark.timeout(120)


def _hub(tmp_path, port, **receiver):
    cfg = hub_cfg(tmp_path, port)
    cfg = replace(cfg, receiver=replace(cfg.receiver, **receiver))
    r = Receiver(cfg).start()
    wait_until(r.connected.is_set, timeout=10, what="hub connected")
    return r


def _manifest(tid, data, chunk=None):
    """A manifest naming the instance's own UIDs (the hub checks them against the decoded file)."""
    import io

    import pydicom

    chunk = chunk or len(data)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        study, sop = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
    except Exception:  # noqa: BLE001 - not a DICOM file: any UIDs will do
        study, sop = generate_uid(), generate_uid()
    return dict(transfer=tid, study_uid=study, sop_instance_uid=sop, label="normal",
                size=len(data), sha256=hashlib.sha256(data).hexdigest(), chunk_size=chunk,
                count=-(-len(data) // chunk))


def test_a_manifest_declaring_a_terabyte_is_refused_with_a_final_answer_and_takes_no_disk(tmp_path, broker, parts):
    hub = _hub(tmp_path, broker.port)
    parts.append(hub)
    box = RawBox(broker.port, device="box-a")
    m = _manifest("huge", b"x")
    m.update(size=2**40, count=2**40 // 2**20, chunk_size=2**20)
    box.pub("manifest", protocol.encode("manifest", "box-a", **m))
    wait_until(lambda: box.last("huge") is not None, timeout=10, what="an answer")
    assert box.last("huge")["status"] == "failed" and "over the hub's limit" in box.last("huge")["reason"]
    assert hub.store.transfer("huge") is None
    assert not list(hub.store.partial_dir.iterdir())
    # A self-describing chunk of it, sent anyway, is refused the same way; nothing is written at its offset.
    box.pub("chunk", protocol.encode_chunk_json("box-a", transfer="huge", index=10**6, count=m["count"],
                                                size=m["size"], chunk_size=2**20, sha256=m["sha256"],
                                                study_uid=m["study_uid"], label=None, data=b"y" * 2**20))
    wait_until(lambda: len([d for d in hub.store.dead_letters(10) if "over the hub's limit" in d["reason"]]) == 2,
               timeout=10, what="the chunk refused too")
    assert not list(hub.store.partial_dir.iterdir())


def test_a_box_over_its_quota_of_unfinished_bytes_waits_and_goes_on_once_one_finishes(tmp_path, broker, parts):
    hub = _hub(tmp_path, broker.port, partial_quota_mb=1)
    parts.append(hub)
    box = RawBox(broker.port, device="box-a")
    first = make_cr(tmp_path / "1.dcm", seed=1, side=600).read_bytes()  # ~720 KB
    second = make_cr(tmp_path / "2.dcm", seed=2, side=600).read_bytes()
    m1, m2 = _manifest("t1", first, chunk=65536), _manifest("t2", second, chunk=65536)
    box.pub("manifest", protocol.encode("manifest", "box-a", **m1))
    wait_until(lambda: box.last("t1") is not None, timeout=10, what="first manifest answered")
    box.pub("manifest", protocol.encode("manifest", "box-a", **m2))
    time.sleep(1.0)
    assert box.last("t2") is None and hub.store.transfer("t2") is None  # waits: no answer, nothing held
    for i in range(m1["count"]):
        part = first[i * 65536:(i + 1) * 65536]
        box.pub("chunk", protocol.encode_chunk("t1", i, part))
    wait_until(lambda: (box.last("t1") or {}).get("status") == "complete", timeout=20, what="first complete")
    box.pub("manifest", protocol.encode("manifest", "box-a", **m2))
    wait_until(lambda: box.last("t2") is not None, timeout=10, what="second admitted once the first finished")
    assert box.last("t2")["status"] == "partial"


def test_unfinished_transfers_expire_and_a_returning_box_starts_them_afresh(tmp_path, broker, parts):
    hub = _hub(tmp_path, broker.port)
    parts.append(hub)
    box = RawBox(broker.port, device="box-a")
    data = make_cr(tmp_path / "1.dcm", seed=3, side=300).read_bytes()
    m = _manifest("old", data, chunk=4096)
    box.pub("manifest", protocol.encode("manifest", "box-a", **m))
    box.pub("chunk", protocol.encode_chunk("old", 0, data[:4096]))
    wait_until(lambda: hub.store.have("old") == {0}, timeout=10, what="one chunk held")
    assert hub.expire_partials() == 0  # fresh: kept
    with hub.store.tx() as db:
        db.execute("UPDATE transfers SET updated_at = ? WHERE transfer_id = 'old'", [time.time() - 30 * 86400])
    assert hub.expire_partials() == 1
    assert hub.store.transfer("old") is None and not hub.store.part_path("old").exists()
    box.pub("manifest", protocol.encode("manifest", "box-a", **m))
    wait_until(lambda: hub.store.transfer("old") is not None, timeout=10, what="started afresh")
    assert hub.store.have("old") == set()


def test_a_receiver_restarted_mid_verification_takes_its_claim_up_at_once(tmp_path, broker, parts):
    data = make_cr(tmp_path / "1.dcm", seed=4, side=100).read_bytes()
    m = _manifest("t", data)
    first = _hub(tmp_path, broker.port)
    box = RawBox(broker.port, device="box-a")
    box.pub("manifest", protocol.encode("manifest", "box-a", **m))
    wait_until(lambda: box.last("t") is not None, timeout=10, what="manifest answered")
    # As if the receiver died between its claim and its verdict: all chunks held, the claim is its own.
    first.store.put_chunk("t", 0, 0, data)
    assert first.store.claim_for_verify("t", first.claimant)
    first.stop()
    again = _hub(tmp_path, broker.port)
    parts.append(again)
    box.pub("manifest", protocol.encode("manifest", "box-a", **m))
    wait_until(lambda: (box.last("t") or {}).get("status") == "complete", timeout=10,
               what="complete without waiting out the stale-claim timeout")
