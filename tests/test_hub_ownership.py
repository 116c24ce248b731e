"""Ownership at the hub: a box (stolen, or running tampered software) cannot replace, merge into or steal another
box's study, instance, preview, label or read by sending its UIDs. The first box keeps its data; the second is
refused with a final answer, a dead letter and a collision the hub operator sees."""
from __future__ import annotations

import base64
import json

import pydicom
import pytest
from pydicom.uid import generate_uid

from harness import wait_until
from sync.wire import protocol
from test_sync_support import Box, RawBox, make_cr, start_hub, triage

pytestmark = pytest.mark.timeout(120)


def _same_uids_other_pixels(src, dest):
    """What a rogue box would send: the victim's UIDs over its own pixels."""
    ds = pydicom.dcmread(src)
    ds.PixelData = bytes(len(ds.PixelData))
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest, enforce_file_format=True)
    return dest


def _outbox(box, kind):
    return box.store.query("SELECT state, reason FROM outbox WHERE kind = ?", [kind])


def test_a_box_that_files_another_boxs_instance_first_cannot_make_the_hub_discard_the_genuine_one(
        tmp_path, broker, parts):
    hub = start_hub(tmp_path, broker.port)
    parts.append(hub)
    genuine = make_cr(tmp_path / "b" / "x.dcm", seed=1)
    rogue_copy = _same_uids_other_pixels(genuine, tmp_path / "a" / "x.dcm")
    rogue = Box(tmp_path / "a", broker.port, "box-a").start()
    parts.append(rogue)
    triage(rogue.store, rogue_copy, "normal")
    wait_until(lambda: rogue.states().get("acknowledged") == 1, timeout=30, what="rogue copy filed")

    victim = Box(tmp_path / "b", broker.port, "box-b").start()
    parts.append(victim)
    triage(victim.store, genuine, "urgent")
    wait_until(lambda: any(r["state"] == "failed" for r in _outbox(victim, "transfer")), timeout=60,
               what="the genuine box told it was refused")
    # Told the truth ("refused: collision"), never "complete": its technician sees it, it is not silently lost.
    assert not victim.states().get("acknowledged")
    assert "UID collision" in next(r["reason"] for r in _outbox(victim, "transfer") if r["state"] == "failed")
    got = hub.store.collisions()
    assert {(c["owner"], c["claimant"]) for c in got} == {("box-a", "box-b")}
    assert any("UID collision" in d["reason"] for d in hub.store.dead_letters(50))
    # The rogue's study at the hub did not gain the victim's urgent label or count.
    study = hub.store.study(str(pydicom.dcmread(genuine, stop_before_pixels=True).StudyInstanceUID))
    assert study["device"] == "box-a" and study["label"] == "normal" and study["n_instances"] == 1


def test_a_box_flagging_another_boxs_study_changes_nothing_and_reads_go_only_to_the_owner(
        tmp_path, broker, parts):
    hub = start_hub(tmp_path, broker.port)
    parts.append(hub)
    owner = Box(tmp_path / "b", broker.port, "box-b").start()
    parts.append(owner)
    path = make_cr(tmp_path / "b" / "s.dcm", seed=2)
    study_uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    triage(owner.store, path, "review")
    wait_until(lambda: owner.states().get("acknowledged") == 1, timeout=30, what="owner's study filed")
    before = hub.store.study(study_uid)

    rogue = RawBox(broker.port, device="box-a")
    fake_preview = base64.b64encode(b"\xff\xd8\xff\xe0 not the patient").decode()
    rogue.pub("flag", protocol.encode("flag", "box-a", flag_id=f"urgent-{study_uid}", study_uid=study_uid,
                                      label="urgent", reasons=[{"code": "rogue"}], modality="CR", n_instances=9,
                                      at=1.0, preview_jpeg_b64=fake_preview))
    wait_until(lambda: any(a.get("flag_id") for a in rogue.acks), timeout=10, what="rogue flag answered")
    answer = next(a for a in rogue.acks if a.get("flag_id"))
    assert answer["status"] == "failed" and "UID collision" in answer["reason"]
    # A chunk of a new instance into the owner's study: refused as well.
    data = make_cr(tmp_path / "a" / "extra.dcm", study_uid=study_uid, seed=3).read_bytes()
    rogue.pub("manifest", protocol.encode("manifest", "box-a", transfer="rogue-t1", study_uid=study_uid,
                                          sop_instance_uid=generate_uid(), label="urgent", size=len(data),
                                          sha256=__import__("hashlib").sha256(data).hexdigest(), chunk_size=len(data),
                                          count=1))
    wait_until(lambda: rogue.last("rogue-t1") is not None, timeout=10, what="rogue manifest answered")
    assert rogue.last("rogue-t1")["status"] == "failed"

    after = hub.store.study(study_uid)
    for key in ("device", "label", "reasons", "n_instances", "n_expected", "preview_path"):
        assert after[key] == before[key], key
    if before["preview_path"]:
        assert b"not the patient" not in open(before["preview_path"], "rb").read()

    # The radiologist's read of the owner's study goes to the owner only.
    hub.store.add_read(study_uid, "abnormal", "see me", "dr-x")
    hub.publish_pending_reads("box-a", force=True)
    hub.publish_pending_reads("box-b", force=True)
    wait_until(lambda: owner.store.query("SELECT read_disposition FROM studies WHERE study_uid = ?", [study_uid])
               and owner.store.query("SELECT read_disposition FROM studies WHERE study_uid = ?",
                                     [study_uid])[0]["read_disposition"] == "abnormal",
               timeout=20, what="read delivered to its owner")
    assert not [a for a in rogue.acks if a.get("read_id")]
    assert json.dumps(rogue.acks).find("see me") < 0
