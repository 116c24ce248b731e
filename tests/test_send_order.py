"""The box's sending order within a band: fewest bytes left first, old rows not starved, flags before their images."""
from __future__ import annotations

import json
import os
import threading
import time
from types import SimpleNamespace

import pytest

import pydicom

from edge.uplink import outbox as ob
from edge.uplink.packer import lower_own_priority
from harness import wait_until
from test_sync_support import Box, assert_hub_holds_exactly, hub_view, make_cr, start_hub, triage


def _queue(box, tmp_path, name, side, label="normal", seed=0):
    """Triage one CR and put it in the outbox as the packer would (its wire copy = the file itself)."""
    f = make_cr(tmp_path / "in" / f"{name}.dcm", side=side, seed=seed)
    iid = triage(box.store, f, label)
    inst = box.store.query("SELECT * FROM instances WHERE id = ?", [iid])[0]
    data = f.read_bytes()
    enc = SimpleNamespace(data=data, codec="original", transfer_syntax_uid="1.2.840.10008.1.2.1",
                          original_size=len(data), ratio=1.0)
    outbox = ob.Outbox(box.store, tmp_path / "wire", "box-a")
    return outbox, outbox.add_transfer(inst, enc, label, 4096), f


def test_within_a_band_the_transfer_with_fewest_bytes_left_goes_first_and_an_aged_one_is_not_starved(tmp_path):
    box = Box(tmp_path, 1)
    outbox, big, _ = _queue(box, tmp_path, "big", 200, seed=1)
    _, small, _ = _queue(box, tmp_path, "small", 60, seed=2)
    _, urgent, _ = _queue(box, tmp_path, "urgent", 300, label="urgent", seed=3)
    order = [r["transfer_id"] for r in outbox.active()]
    assert order == [urgent, small, big], "urgent band first, then the smaller normal"
    # Most of the big one is already at the hub: now fewer of its bytes remain than of the small one.
    row = outbox.get(big)
    outbox.record_have(big, set(range(row["count"] - 1)))
    assert [r["transfer_id"] for r in outbox.active()] == [urgent, big, small]
    assert ob.remaining_bytes(outbox.get(big)) == row["size"] - (row["count"] - 1) * 4096
    # A fresh big one waits behind small ones, but not for ever: past FAIR_AFTER_S it goes in arrival order.
    _, big2, _ = _queue(box, tmp_path, "big2", 220, seed=4)
    _, small2, _ = _queue(box, tmp_path, "small2", 50, seed=5)
    fresh = [r["transfer_id"] for r in outbox.active() if r["label"] == "normal"]
    assert fresh.index(small2) < fresh.index(big2)
    later = [r["transfer_id"] for r in outbox.active(now=time.time() + ob.FAIR_AFTER_S + 1) if r["label"] == "normal"]
    assert later == [big, small, big2, small2], "aged rows go oldest first"


def test_small_studies_overtake_a_large_one_of_their_band_and_no_image_reaches_the_hub_before_its_flag(
        tmp_path, broker, parts):
    hub = start_hub(tmp_path, broker.port)
    parts.append(hub)
    box = Box(tmp_path, broker.port, max_rate_kbps=1200).start()
    parts.append(box)
    large = make_cr(tmp_path / "in" / "large.dcm", side=640, seed=7)  # ~0.8 MB: ~6 s at 1.2 Mbit/s
    triage(box.store, large, "normal")
    wait_until(lambda: any(json.loads(r["have"]) for r in box.store.query(
        "SELECT have FROM outbox WHERE kind = 'transfer'")), timeout=30, what="large study under way")
    smalls = [make_cr(tmp_path / "in" / f"s{i}.dcm", side=96, seed=10 + i) for i in range(3)]
    for f in smalls:
        triage(box.store, f, "normal")
    wait_until(lambda: box.states()["acknowledged"] == 4, timeout=90, what="all acknowledged")
    view = hub_view(tmp_path)
    done = {r["study_uid"]: r["t"] for r in view.query(
        "SELECT study_uid, MAX(completed_at) AS t FROM transfers GROUP BY study_uid")}
    uid = {f: str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in [large, *smalls]}
    for f in smalls:
        assert done[uid[f]] < done[uid[large]], "a small normal study waited behind the large one"
    # Every study's flag was committed at the hub before its manifest (and so before any of its chunks) arrived.
    for f, study in uid.items():
        flag = view.query("SELECT MIN(received_at) AS t FROM flags WHERE study_uid = ?", [study])[0]["t"]
        first = view.query("SELECT MIN(created_at) AS t FROM transfers WHERE study_uid = ?", [study])[0]["t"]
        assert flag is not None and first is not None and flag <= first, f"{f.name}: image before its flag"
    assert_hub_holds_exactly(tmp_path, [large, *smalls])
    # The box measured its link (the 1.2 Mbit/s cap) from broker acks while it was busy, for its codec choice; the
    # cap's one-second token burst at the start of a run reads high on a transfer this short.
    meter = box.uploader.meter
    assert meter.measured and 0.5 * 150_000 < meter.rate() < 1.7 * 150_000, meter.rate()


def test_the_pack_thread_runs_nicer_than_the_daemon_so_triage_keeps_the_cpu():
    got = {}

    def body():
        got["nice"] = lower_own_priority()
        got["after"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    t = threading.Thread(target=body)
    t.start()
    t.join()
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert got["nice"] == got["after"] == min(19, base + 10)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base, "only the pack thread is reniced"


def test_link_meter_measures_only_while_the_sender_is_busy_and_keeps_its_prior_until_then():
    from edge.uplink.linkmeter import LinkMeter

    t = [0.0]
    meter = LinkMeter(32_000, clock=lambda: t[0])
    for i in range(3):  # an idle sender's occasional acks say nothing about the link
        t[0] += 5.0
        meter.acked(65536)
        meter.idle()
    assert meter.rate() == 32_000 and not meter.measured
    for i in range(12):  # a busy link: 64 KiB every 0.1 s
        t[0] += 0.1
        meter.acked(65536)
    assert meter.measured and meter.rate() == pytest.approx(655_360, rel=0.01)
    meter.idle()
    t[0] += 60.0  # a gap between two runs (an outage, an empty queue) is not a slow link
    meter.acked(65536)
    assert meter.rate() == pytest.approx(655_360, rel=0.01)
