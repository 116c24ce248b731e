"""Box uploader -> private Mosquitto -> hub receiver, in process: priorities, faults, exactly-once, reads back."""
from __future__ import annotations

import hashlib
import json
import time

import pydicom
import pytest
from pydicom.uid import generate_uid

from harness import Mosquitto, wait_until
from sync.wire import codecs, protocol
from test_sync_support import (Box, RawBox, assert_hub_holds_exactly, hub_view, make_cr, start_hub, stored_sops,
                               triage)


def _acked(box, n):
    return box.states()["acknowledged"] == n


def _box_progress(box):
    rows = box.store.query("SELECT have FROM outbox WHERE kind = 'transfer'")
    return sum(b - a + 1 for r in rows for a, b in json.loads(r["have"]))


def test_urgent_flag_and_study_overtake_a_normal_study_already_on_the_wire(tmp_path, broker, parts):
    hub = start_hub(tmp_path, broker.port)
    parts.append(hub)
    box = Box(tmp_path, broker.port, max_rate_kbps=200).start()
    parts.append(box)
    normal = generate_uid()
    normals = [make_cr(tmp_path / "in" / f"n{i}.dcm", study_uid=normal, seed=i) for i in range(3)]
    for f in normals:
        triage(box.store, f, "normal")
    wait_until(lambda: _box_progress(box) >= 2, timeout=20, what="normal study under way")
    t0 = time.time()
    urgent = make_cr(tmp_path / "in" / "u.dcm", seed=99)
    triage(box.store, urgent, "urgent")
    uid = str(pydicom.dcmread(urgent, stop_before_pixels=True).StudyInstanceUID)
    view = hub_view(tmp_path)
    flag = wait_until(lambda: view.query("SELECT received_at FROM flags WHERE study_uid = ?", [uid]), timeout=10,
                      what="urgent flag at the hub")
    flag_latency = flag[0]["received_at"] - t0
    wait_until(lambda: _acked(box, 4), timeout=60, what="all acknowledged")
    done = {r["study_uid"]: r["t"] for r in view.query(
        "SELECT study_uid, MAX(completed_at) AS t FROM transfers GROUP BY study_uid")}
    assert done[uid] < done[normal], "the urgent study finished after the normal one that was already sending"
    assert flag_latency < 2.0
    assert box.uploader.stats["flags_via_lane"] >= 1, "flags go over their own connection"
    assert_hub_holds_exactly(tmp_path, normals + [urgent])
    print(f"urgent flag latency behind bulk at 200 kbit/s: {flag_latency * 1000:.0f} ms")


def test_study_resumes_after_broker_restart(tmp_path, broker, parts):
    hub = start_hub(tmp_path, broker.port)
    parts.append(hub)
    box = Box(tmp_path, broker.port, max_rate_kbps=200).start()
    parts.append(box)
    files = [make_cr(tmp_path / "in" / f"{i}.dcm", seed=i) for i in range(3)]
    for f in files:
        triage(box.store, f, "review")
    wait_until(lambda: _box_progress(box) >= 3, timeout=20, what="transfer under way")
    assert box.states()["acknowledged"] < 3
    broker.kill()
    wait_until(lambda: not box.uploader.connected, timeout=10, what="box notices the cut")
    restarted = Mosquitto(broker.workdir, broker.port).start()
    parts.append(restarted)
    wait_until(lambda: _acked(box, 3), timeout=60, what="all acknowledged after the restart")
    assert_hub_holds_exactly(tmp_path, files)
    assert box.uploader.stats["connects"] >= 2


def test_hub_restart_mid_transfer_keeps_its_chunks_and_resumes(tmp_path, broker, parts):
    hub = start_hub(tmp_path, broker.port)
    box = Box(tmp_path, broker.port, max_rate_kbps=200).start()
    parts.append(box)
    files = [make_cr(tmp_path / "in" / f"{i}.dcm", seed=i, side=200) for i in range(2)]
    for f in files:
        triage(box.store, f, "normal")
    view = hub_view(tmp_path)
    wait_until(lambda: view.query("SELECT COUNT(*) AS n FROM chunks")[0]["n"] >= 3, timeout=20,
               what="hub holding chunks")
    hub.client.loop_stop()  # as if the process died: no DISCONNECT, the broker keeps its session
    hub.client._sock_close()
    hub.store.close()
    kept = view.query("SELECT COUNT(*) AS n FROM chunks")[0]["n"]
    assert kept >= 3
    hub2 = start_hub(tmp_path, broker.port)
    parts.append(hub2)
    wait_until(lambda: _acked(box, 2), timeout=60, what="all acknowledged after the hub restart")
    assert_hub_holds_exactly(tmp_path, files)


def test_hub_that_lost_its_store_mid_transfer_gets_the_study_again_from_the_manifest(tmp_path, broker, parts):
    """A hub rebuilt on an empty disk: compact chunks of a transfer it never heard of are answered "unknown", and
    the box starts that transfer over with its manifest instead of waiting for acks that cannot come."""
    import shutil

    hub = start_hub(tmp_path, broker.port)
    box = Box(tmp_path, broker.port, max_rate_kbps=200).start()
    parts.append(box)
    f = make_cr(tmp_path / "in" / "a.dcm", seed=3, side=200)
    triage(box.store, f, "review")
    view = hub_view(tmp_path)
    wait_until(lambda: view.query("SELECT COUNT(*) AS n FROM chunks")[0]["n"] >= 3, timeout=20,
               what="hub holding chunks")
    hub.client.loop_stop()
    hub.client._sock_close()
    hub.store.close()
    shutil.rmtree(tmp_path / "hub")
    hub2 = start_hub(tmp_path, broker.port)
    parts.append(hub2)
    wait_until(lambda: _acked(box, 1), timeout=60, what="acknowledged by the rebuilt hub")
    assert_hub_holds_exactly(tmp_path, [f])
    assert box.uploader.stats["chunks_resent"] >= 3


@pytest.mark.parametrize("damage", ["unlink", "truncate"])
def test_a_lost_wire_file_on_the_box_is_packed_again_and_the_study_still_arrives(tmp_path, broker, parts, caplog,
                                                                                damage):
    hub = start_hub(tmp_path, broker.port)
    parts.append(hub)
    box = Box(tmp_path, broker.port, max_rate_kbps=100).start()
    parts.append(box)
    files = [make_cr(tmp_path / "in" / f"{i}.dcm", seed=20 + i, side=200) for i in range(2)]
    for f in files:
        triage(box.store, f, "review")
    wire = wait_until(lambda: sorted(box.uploader.outbox.wire_dir.glob("*.dcm")), timeout=20, what="wire files")
    if damage == "unlink":
        wire[-1].unlink()  # a hand clean-up, or a power cut before the wire folder was synced
    else:
        with open(wire[-1], "r+b") as fh:  # a power cut that kept the name but not all the bytes
            fh.truncate(100)
    wait_until(lambda: _acked(box, 2), timeout=90, what="both acknowledged")
    assert_hub_holds_exactly(tmp_path, files)
    assert not box.store.query("SELECT 1 FROM outbox WHERE state = 'failed'"), "the failed transfer was replaced"
    assert "the instance is packed again" in caplog.text


def test_corrupted_partial_file_at_the_hub_fails_sha_and_the_box_resends(tmp_path, broker, parts):
    hub = start_hub(tmp_path, broker.port)
    parts.append(hub)
    box = Box(tmp_path, broker.port, max_rate_kbps=200).start()
    parts.append(box)
    f = make_cr(tmp_path / "in" / "a.dcm", seed=5, side=200)
    triage(box.store, f, "urgent")
    part = wait_until(lambda: next(iter((tmp_path / "hub" / "partial").glob("*.part")), None), timeout=20,
                      what="partial file")
    with open(part, "r+b") as fh:  # a bit flip on the hub's disk, after chunk 0 was verified and written
        wait_until(lambda: part.stat().st_size > 100, timeout=10, what="chunk 0 written")
        b = fh.read(1)
        fh.seek(0)
        fh.write(bytes([b[0] ^ 0xFF]))
    wait_until(lambda: _acked(box, 1), timeout=60, what="acknowledged after the resend")
    view = hub_view(tmp_path)
    assert view.query("SELECT retries FROM transfers")[0]["retries"] == 1
    assert_hub_holds_exactly(tmp_path, [f])


def _chunks(data, size):
    return [data[i:i + size] for i in range(0, len(data), size)]


def test_duplicated_replayed_out_of_order_and_corrupted_chunks_end_in_one_exact_copy(tmp_path, broker, parts):
    hub = start_hub(tmp_path, broker.port)
    parts.append(hub)
    raw = RawBox(broker.port)
    src = make_cr(tmp_path / "in" / "x.dcm", seed=7)
    data = codecs.encode_for_wire(src, codecs=["jpegls"]).data
    sha, cs = hashlib.sha256(data).hexdigest(), 4096
    parts_ = _chunks(data, cs)
    study = str(pydicom.dcmread(src, stop_before_pixels=True).StudyInstanceUID)

    def chunk(tid, i, body=None, whole=sha):
        return protocol.encode_chunk_json(raw.device, transfer=tid, index=i, count=len(parts_), size=len(data),
                                     chunk_size=cs, sha256=whole, study_uid=study, label="review",
                                     data=parts_[i] if body is None else body)

    order = list(reversed(range(len(parts_))))
    corrupt = bytearray(chunk("t1", order[0]))
    corrupt[-5] ^= 0x55
    raw.pub("chunk", bytes(corrupt))                  # corrupted: refused, not recorded
    for i in order[1:]:
        raw.pub("chunk", chunk("t1", i))              # out of order
        raw.pub("chunk", chunk("t1", i))              # duplicated
    wait_until(lambda: raw.last("t1") and raw.last("t1")["status"] == "partial"
               and protocol.from_ranges(raw.last("t1")["have"]) == set(order[1:]), timeout=10, what="partial ack")
    raw.pub("chunk", chunk("t1", order[0]))           # the box resends what the ack shows missing
    wait_until(lambda: raw.last("t1")["status"] == "complete", timeout=10, what="complete")
    raw.pub("chunk", chunk("t1", 0))                  # replay after completion
    wait_until(lambda: sum(a.get("transfer") == "t1" and a["status"] == "complete" for a in raw.acks) >= 2,
               timeout=10, what="replay answered")
    # The same instance again under another transfer id (a re-encode after a crash): still one copy.
    manifest = protocol.encode("manifest", raw.device, transfer="t2", study_uid=study,
                               sop_instance_uid=str(pydicom.dcmread(src).SOPInstanceUID), size=len(data),
                               sha256=sha, chunk_size=cs, count=len(parts_), resume=True)
    raw.pub("manifest", manifest)
    wait_until(lambda: raw.last("t2") and raw.last("t2")["status"] == "complete", timeout=10, what="dup complete")
    # A transfer whose chunks are each fine but whose whole differs from its manifest: discarded, asked again.
    wrong = hashlib.sha256(b"other").hexdigest()
    for i in range(len(parts_)):
        raw.pub("chunk", chunk("t3", i, whole=wrong))
    wait_until(lambda: raw.last("t3") and raw.last("t3")["status"] == "retry", timeout=10, what="retry")
    assert stored_sops(tmp_path) == [str(pydicom.dcmread(src).SOPInstanceUID)]
    assert_hub_holds_exactly(tmp_path, [src])
    view = hub_view(tmp_path)
    assert any("sha256 mismatch" in r["reason"] for r in view.dead_letters())
    assert view.query("SELECT dup_chunks FROM boxes")[0]["dup_chunks"] >= len(parts_) - 1
    raw.c.loop_stop()


def test_compact_chunks_need_their_manifest_and_are_checked_against_it(tmp_path, broker, parts):
    hub = start_hub(tmp_path, broker.port)
    parts.append(hub)
    raw, other = RawBox(broker.port), RawBox(broker.port, device="box-other")
    src = make_cr(tmp_path / "in" / "x.dcm", seed=11)
    data = codecs.encode_for_wire(src, codecs=["jpegls"]).data
    cs = 4096
    parts_ = _chunks(data, cs)
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    raw.pub("chunk", protocol.encode_chunk("c1", 0, parts_[0]))        # before its manifest: the hub asks for it
    wait_until(lambda: raw.last("c1") and raw.last("c1")["status"] == "unknown", timeout=10, what="unknown ack")
    raw.pub("manifest", protocol.encode("manifest", raw.device, transfer="c1", study_uid=str(ds.StudyInstanceUID),
                                        sop_instance_uid=str(ds.SOPInstanceUID), size=len(data),
                                        sha256=hashlib.sha256(data).hexdigest(), chunk_size=cs, count=len(parts_)))
    other.pub("chunk", protocol.encode_chunk("c1", 1, parts_[1]))      # another box cannot write into it
    raw.pub("chunk", protocol.encode_chunk("c1", 1, parts_[1][:-1]))   # shorter than the manifest says
    raw.pub("chunk", protocol.encode_chunk("c1", len(parts_), b"x"))   # past the last chunk
    for i in [*reversed(range(len(parts_))), 0]:                        # out of order, one duplicate
        raw.pub("chunk", protocol.encode_chunk("c1", i, parts_[i]))
    wait_until(lambda: raw.last("c1")["status"] == "complete", timeout=10, what="complete")
    assert_hub_holds_exactly(tmp_path, [src])
    reasons = " | ".join(r["reason"] for r in hub_view(tmp_path).dead_letters())
    assert "belongs to another device" in reasons and "the manifest says" in reasons and "outside" in reasons
    assert not any(a.get("transfer") == "c1" for a in other.acks)
    raw.c.loop_stop()
    other.c.loop_stop()


def test_malformed_messages_go_to_dead_letters_and_the_receiver_keeps_going(tmp_path, broker, parts):
    hub = start_hub(tmp_path, broker.port)
    parts.append(hub)
    raw = RawBox(broker.port, device="box-x")
    bad = [
        ("flag", b"{broken"),
        ("flag", json.dumps({"v": 2, "type": "flag", "device": "box-x"}).encode()),
        ("flag", json.dumps({"v": 1, "type": "flag", "device": "box-y", "flag_id": "f", "study_uid": "1",
                             "label": "urgent", "at": 1}).encode()),
        ("status", json.dumps({"v": 1, "type": "status", "device": "box-x"}).encode()),
        ("chunk", b"\0" * 20),
        ("chunk", b"WSC1" + (3_000_000).to_bytes(4, "big") + b"{}"),
        ("heartbeat", b"x" * (3 * 1024 * 1024)),
        ("flag", b"[" * 2048),  # once killed paho's network thread with RecursionError; never PUBACKed, so forever
    ]
    for kind, payload in bad:
        raw.pub(kind, payload)
    raw.c.publish("wasla/v1/box-x/up/bogus", b"{}", qos=1).wait_for_publish(5)
    raw.pub("flag", protocol.encode("flag", "box-x", flag_id="urgent-1.2.3", study_uid="1.2.3", label="urgent",
                                    at=time.time()))
    view = hub_view(tmp_path)
    wait_until(lambda: any(a.get("flag_id") == "urgent-1.2.3" for a in raw.acks), timeout=10, what="flag ack")
    wait_until(lambda: len(view.dead_letters()) == len(bad) + 1, timeout=10, what="dead letters")
    reasons = " | ".join(r["reason"] for r in view.dead_letters())
    for part in ("not JSON", "unknown protocol version", "differs from topic device", "missing field",
                 "frame magic", "bad header length", "exceeds", "unknown message kind", "nested too deeply"):
        assert part in reasons
    assert view.worklist()[0]["study_uid"] == "1.2.3"
    raw.c.loop_stop()


def test_worklist_boxes_and_a_read_sent_back_to_the_box(tmp_path, broker, parts, capsys):
    from edge import cli as box_cli
    from sync.hub import cli as hub_cli

    hub = start_hub(tmp_path, broker.port)
    parts.append(hub)
    box = Box(tmp_path, broker.port, heartbeat_seconds=1.0).start()
    parts.append(box)
    labels = ["normal", "urgent", "review", "urgent"]
    files = [make_cr(tmp_path / "in" / f"{i}.dcm", seed=i, side=64) for i in range(4)]
    for f, label in zip(files, labels):
        triage(box.store, f, label)
    wait_until(lambda: _acked(box, 4), timeout=30, what="all acknowledged")
    hub_toml = tmp_path / "hub.toml"
    hub_toml.write_text(f'[hub]\ndata_dir = "{tmp_path / "hub"}"\n[broker]\nport = {broker.port}\n')
    capsys.readouterr()
    assert hub_cli.main(["--config", str(hub_toml), "worklist", "--json"]) == 0
    wl = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in wl] == ["urgent", "urgent", "review", "normal"]
    assert wl[0]["since"] <= wl[1]["since"]
    assert hub_cli.main(["--config", str(hub_toml), "boxes", "--json"]) == 0
    boxes = json.loads(capsys.readouterr().out)
    wait_until(lambda: hub_view(tmp_path).boxes()[0]["queue_depth"] == 0, timeout=10, what="heartbeat")
    assert boxes[0]["device"] == "box-a" and boxes[0]["online"] == 1
    # The box's own measure of its uplink rides on its heartbeat (the prior until it has measured: 256 kbit/s).
    link = hub_view(tmp_path).boxes()[0]["link"]
    assert link["rate_kbps"] > 0 and isinstance(link["rate_measured"], bool)
    assert hub_cli.main(["--config", str(hub_toml), "boxes"]) == 0
    table = capsys.readouterr().out
    assert "uplink kbit/s" in table and f"{link['rate_kbps']:g}" in table
    study = wl[0]["study_uid"]
    assert hub_cli.main(["--config", str(hub_toml), "read", study, "--disposition", "abnormal",
                         "--note", "consolidation right lower lobe", "--by", "dr-a"]) == 0
    assert "sent" in capsys.readouterr().out
    wait_until(lambda: box.store.study(study)["read_disposition"] == "abnormal", timeout=10, what="read at the box")
    assert box.store.study(study)["read_by"] == "dr-a"
    wait_until(lambda: hub_view(tmp_path).query("SELECT delivered_at FROM reads")[0]["delivered_at"], timeout=10,
               what="receipt in the heartbeat")
    box_toml = tmp_path / "box.toml"
    box_toml.write_text(f'[box]\nid = "box-a"\ndata_dir = "{box.cfg.box.data_dir}"\n[models]\ndir = "{tmp_path}"\n'
                        f'trusted_keys = []\n[storage]\nmin_free_mb = 0\n[sync]\nbroker_port = {broker.port}\n')
    assert box_cli.main(["--config", str(box_toml), "show", study]) == 0
    out = capsys.readouterr().out
    assert "abnormal" in out and "consolidation right lower lobe" in out and "dr-a" in out
    assert box_cli.main(["--config", str(box_toml), "sync", "--json", "--now"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["queue_depth"] == 0 and info["counts"]["transfer_done"] == 4 and info["wire_ratio"] > 1.0


def _deflated_with_corrupt_stream(src, tmp_path) -> bytes:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(src)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    data = bytearray(path.read_bytes())
    assert data[132:136] == b"\x02\x00\x00\x00"  # (0002,0000) file meta group length comes first
    body = 132 + 12 + int.from_bytes(data[140:144], "little")
    for i in range(body + 2, body + 66):  # the deflate stream itself: zlib.error, no pydicom error class
        data[i] ^= 0x5A
    return bytes(data)


def test_instances_that_fail_to_decode_in_any_way_get_a_final_failed_ack_and_the_next_one_completes(
        tmp_path, broker, parts):
    hub = start_hub(tmp_path, broker.port)
    parts.append(hub)
    raw = RawBox(broker.port)
    good_src = make_cr(tmp_path / "in" / "good.dcm", seed=31)
    base = codecs.encode_for_wire(good_src, codecs=["jpegls"]).data
    flipped = bytearray(base)
    for i in range(len(flipped) - 400, len(flipped) - 40):  # the JPEG-LS scan data
        flipped[i] ^= 0xFF
    bad = {"b-deflate": _deflated_with_corrupt_stream(make_cr(tmp_path / "in" / "d.dcm", seed=32), tmp_path),
           "b-jpegls": bytes(flipped),
           "b-garbage": b"\0" * 128 + b"DICM" + bytes(range(256)) * 8}
    cs = 4096

    def send(tid, data, study):
        pieces = _chunks(data, cs)
        raw.pub("manifest", protocol.encode("manifest", raw.device, transfer=tid, study_uid=study,
                                            sop_instance_uid="1.2.3", size=len(data),
                                            sha256=hashlib.sha256(data).hexdigest(), chunk_size=cs,
                                            count=len(pieces)))
        for i, piece in enumerate(pieces):
            raw.pub("chunk", protocol.encode_chunk(tid, i, piece))

    for tid, data in bad.items():
        send(tid, data, "")
    good = pydicom.dcmread(good_src, stop_before_pixels=True)
    send("g-1", codecs.encode_for_wire(good_src, codecs=["jpegls"]).data, str(good.StudyInstanceUID))
    wait_until(lambda: raw.last("g-1") and raw.last("g-1")["status"] == "complete", timeout=15, what="good one")
    wait_until(lambda: all(raw.last(t) and raw.last(t)["status"] == "failed" for t in bad), timeout=15,
               what="a final 'failed' ack for every bad transfer")
    assert all("not a usable DICOM instance" in raw.last(t)["reason"] for t in bad)
    assert stored_sops(tmp_path) == [str(good.SOPInstanceUID)]
    raw.c.loop_stop()


def test_spool_files_damaged_on_disk_are_quarantined_not_sent_and_the_rest_still_goes(tmp_path, broker, parts):
    from test_sync_support import triage

    hub = start_hub(tmp_path, broker.port)
    parts.append(hub)
    box = Box(tmp_path, broker.port)
    files = [make_cr(tmp_path / "in" / f"{i}.dcm", seed=40 + i, side=120) for i in range(3)]
    for f in files:
        triage(box.store, f, "review")
    rows = box.store.query("SELECT * FROM instances ORDER BY id")
    flipped, cut = (box.store.instance_path(r) for r in rows[:2])
    data = bytearray(flipped.read_bytes())
    data[-10] ^= 0xFF  # one pixel byte: same size, other bytes
    flipped.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[:-100])
    box.start()
    parts.append(box)
    wait_until(lambda: box.states().get("acknowledged", 0) == 1, timeout=30, what="the intact one acknowledged")
    wait_until(lambda: box.states().get("quarantined", 0) == 2, timeout=10, what="both damaged ones quarantined")
    reasons = {r["id"]: r["reason"] for r in box.store.query("SELECT id, reason FROM instances")}
    assert "sha256 differs" in reasons[rows[0]["id"]] and "bytes" in reasons[rows[1]["id"]]
    assert stored_sops(tmp_path) == [rows[2]["sop_instance_uid"]]


def test_a_burst_of_flags_is_committed_in_batches_where_one_bad_flag_spoils_none_of_the_others(tmp_path, broker,
                                                                                                  parts):
    burst_with_a_poison_and_a_collision(tmp_path, broker, parts)


def burst_with_a_poison_and_a_collision(tmp_path, broker, parts, database_url: str = "") -> None:
    """Also run on PostgreSQL (tests/test_hub_store_pg.py)."""
    hub = start_hub(tmp_path, broker.port, database_url=database_url)
    parts.append(hub)
    owner, other = RawBox(broker.port, device="box-a"), RawBox(broker.port, device="box-b")
    owner.pub("flag", protocol.encode("flag", "box-a", flag_id="own-1", study_uid="1.2.9", label="normal",
                                      at=time.time()))
    wait_until(lambda: any(a.get("flag_id") == "own-1" for a in owner.acks), timeout=10, what="the owner's flag")
    # Published without waiting, so the worker finds them queued together: a batch with a poison message and a
    # collision (box-b claims box-a's study) inside it.
    for i in range(150):
        other.c.publish("wasla/v1/box-b/up/flag", protocol.encode(
            "flag", "box-b", flag_id=f"b-{i}", study_uid=f"1.2.10.{i}", label="urgent", at=time.time()), qos=1)
        if i == 40:
            other.c.publish("wasla/v1/box-b/up/flag", b"{broken", qos=1)
        if i == 80:
            other.c.publish("wasla/v1/box-b/up/flag", protocol.encode(
                "flag", "box-b", flag_id="steal", study_uid="1.2.9", label="urgent", at=time.time()), qos=1)
    wait_until(lambda: len({a["flag_id"] for a in other.acks if a.get("flag_id")}) == 151, timeout=30,
               what="an answer to every flag")
    status = {a["flag_id"]: a["status"] for a in other.acks if a.get("flag_id")}
    assert all(status[f"b-{i}"] == "complete" for i in range(150)) and status["steal"] == "failed"
    view = hub_view(tmp_path, database_url)
    assert view.query("SELECT COUNT(*) AS n FROM flags WHERE device = 'box-b'")[0]["n"] == 150
    assert view.query("SELECT device FROM studies WHERE study_uid = '1.2.9'")[0]["device"] == "box-a"
    assert any("not JSON" in r["reason"] for r in view.dead_letters())
    for raw in (owner, other):
        raw.c.loop_stop()


def test_a_hub_killed_before_its_batch_commits_gets_every_flag_again_and_files_each_once(tmp_path, broker):
    from boxproc import HubProcess

    hub = HubProcess(tmp_path, tmp_path / "hub", broker.port).start()
    raw = RawBox(broker.port, device="box-k")
    try:
        wait_until(lambda: (tmp_path / "hub" / "hub.db").exists(), timeout=60, what="the hub's index")
        time.sleep(1.5)
        for i in range(300):
            raw.c.publish("wasla/v1/box-k/up/flag", protocol.encode(
                "flag", "box-k", flag_id=f"k-{i}", study_uid=f"1.2.11.{i}", label="review", at=time.time()), qos=1)
        time.sleep(0.05)
        hub.proc.kill()  # mid-burst: some batches committed, some not, some never read
        hub.proc.wait(10)
        hub = HubProcess(tmp_path, tmp_path / "hub", broker.port).start()
        wait_until(lambda: len({a["flag_id"] for a in raw.acks if a.get("flag_id")}) == 300, timeout=60,
                   what="every flag acknowledged after the restart")
        view = hub_view(tmp_path)
        rows = view.query("SELECT COUNT(*) AS n FROM flags WHERE device = 'box-k'")[0]["n"]
        assert rows == 300
    finally:
        hub.stop()
        raw.c.loop_stop()
