"""Receivers split the boxes between them: a box's whole traffic reaches one receiver, and a receiver that stops or
dies hands its boxes to the others (sync/hub/partitions.py), with every study still filed exactly once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from harness import wait_until
from sync.hub.partitions import owners
from sync.wire import protocol
from test_sync_support import Box, assert_hub_holds_exactly, make_cr, start_hub, triage

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


def _acked(box, n):
    return box.states()["acknowledged"] == n


def test_rendezvous_gives_every_partition_one_owner_and_moves_only_what_a_member_gains_or_loses():
    three = owners(["hub-1", "hub-2", "hub-3"])
    assert set(three) == set(range(protocol.PARTITIONS))
    assert set(three.values()) == {"hub-1", "hub-2", "hub-3"}
    two = owners(["hub-1", "hub-2"])
    # hub-3 leaves: only its partitions move, the others keep their owner.
    assert {p for p in two if two[p] != three[p]} == {p for p in three if three[p] == "hub-3"}
    assert owners(["hub-2", "hub-1"]) == two  # the same answer on every receiver, whatever order it heard them in
    assert set(owners(["hub-1"]).values()) == {"hub-1"}


def _boxes_for(owner_map: dict[int, str], wanted: list[str]) -> list[str]:
    """One box id per wanted owner, so the test covers both receivers whatever the hash gives."""
    found: dict[str, str] = {}
    for i in range(1000):
        device = f"box-{i}"
        owner = owner_map[protocol.partition_of(device)]
        if owner in wanted and owner not in found:
            found[owner] = device
    return [found[w] for w in wanted]


def _both_see_each_other(*hubs):
    names = {h.cfg.hub.id for h in hubs}
    return all(h.partitions.members() == names for h in hubs) and \
        sum(len(h.partitions.owned) for h in hubs) == protocol.PARTITIONS


def test_each_box_stays_with_one_receiver_and_a_stopped_receiver_hands_its_boxes_over(tmp_path, broker, parts):
    h1 = start_hub(tmp_path, broker.port, "hub-1")
    h2 = start_hub(tmp_path, broker.port, "hub-2")
    parts += [h1, h2]
    wait_until(lambda: _both_see_each_other(h1, h2), timeout=20, what="receivers see each other")
    assert not h1.partitions.owned & h2.partitions.owned
    from sync.hub.metrics import hub_collector

    shown = {m.name: m.samples[0][1] for m in hub_collector(h1.store, hub_id="hub-1", receiver=h1)() if m.samples}
    assert shown["wasla_hub_receivers_alive"] == 2
    assert shown["wasla_hub_partitions_owned"] == len(h1.partitions.owned) > 0
    ids = _boxes_for(owners(["hub-1", "hub-2"]), ["hub-1", "hub-2"])
    boxes = [Box(tmp_path / d, broker.port, d).start() for d in ids]
    parts += boxes
    files = {d: [make_cr(tmp_path / "in" / d / f"{i}.dcm", seed=10 * n + i, side=96) for i in range(3)]
             for n, d in enumerate(ids)}
    for box in boxes:
        for i, f in enumerate(files[box.cfg.box.id]):
            triage(box.store, f, ("urgent", "normal", "review")[i])
    wait_until(lambda: all(_acked(b, 3) for b in boxes), timeout=60, what="all acknowledged")
    # Every message of box-on-hub-1 reached hub-1 and none reached hub-2, and the other way round.
    assert set(h1.by_device) == {ids[0]} and set(h2.by_device) == {ids[1]}, (h1.by_device, h2.by_device)
    h2_box = boxes[1]
    h2.stop()
    parts.remove(h2)
    wait_until(lambda: len(h1.partitions.owned) == protocol.PARTITIONS, timeout=10, what="hub-1 takes every partition")
    more = make_cr(tmp_path / "in" / "late.dcm", seed=99, side=96)
    triage(h2_box.store, more, "urgent")
    wait_until(lambda: _acked(h2_box, 4), timeout=60, what="the moved box's new study acknowledged")
    assert ids[1] in h1.by_device
    assert_hub_holds_exactly(tmp_path, [f for fs in files.values() for f in fs] + [more])


def test_a_killed_receiver_s_boxes_move_to_the_survivor_and_nothing_is_lost(tmp_path, broker, parts):
    h1 = start_hub(tmp_path, broker.port, "hub-1")
    parts.append(h1)
    conf = tmp_path / "hub-2.toml"
    conf.write_text(f'[hub]\nid = "hub-2"\ndata_dir = "{tmp_path / "hub"}"\n[broker]\nport = {broker.port}\n'
                    'keepalive_seconds = 10\n[log]\nlevel = "info"\n')
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "sync.hub.cli", "--config", str(conf), "run"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: h1.partitions.members() == {"hub-1", "hub-2"} and
                   len(h1.partitions.owned) < protocol.PARTITIONS, timeout=30, what="hub-2 joined")
        (device,) = _boxes_for(owners(["hub-1", "hub-2"]), ["hub-2"])
        box = Box(tmp_path / device, broker.port, device).start()
        parts.append(box)
        first = make_cr(tmp_path / "in" / "a.dcm", seed=1, side=96)
        triage(box.store, first, "urgent")
        wait_until(lambda: _acked(box, 1), timeout=60, what="filed by hub-2")
        assert device not in h1.by_device
        os.kill(proc.pid, signal.SIGKILL)  # no clean leave: the broker's will and the member timeout take over
        proc.wait(10)
        t0 = time.monotonic()
        wait_until(lambda: len(h1.partitions.owned) == protocol.PARTITIONS, timeout=45,
                   what="hub-1 takes the dead receiver's partitions")
        took = time.monotonic() - t0
        later = [make_cr(tmp_path / "in" / f"b{i}.dcm", seed=2 + i, side=96) for i in range(2)]
        for f in later:
            triage(box.store, f, "normal")
        wait_until(lambda: _acked(box, 3), timeout=150, what="the orphaned box's studies acknowledged")
        assert device in h1.by_device
        assert took <= 20, f"takeover took {took:.1f} s (keepalive 10 s: the will fires within 15 s)"
        assert_hub_holds_exactly(tmp_path, [first, *later])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)



class _FakeClient:
    """Just what Partitions calls on a paho client, recorded."""

    def __init__(self):
        self.subscribed: set[str] = set()
        self.published: list[tuple[str, bytes]] = []

    def will_set(self, *_a, **_k):
        pass

    def message_callback_add(self, *_a):
        pass

    def subscribe(self, topics, qos=1):
        self.subscribed |= {t for t, _q in topics} if isinstance(topics, list) else {topics}

    def unsubscribe(self, topics):
        self.subscribed -= set(topics)

    def publish(self, topic, data, qos=1, retain=False):
        self.published.append((topic, data))

    def ack(self, *_a):
        pass


def test_garbage_on_the_members_topic_never_stops_membership_and_a_good_announcement_still_counts():
    from types import SimpleNamespace

    from sync.hub.partitions import Partitions, members_topic

    client = _FakeClient()
    p = Partitions(client, "g", "hub-1")
    p.on_connect()
    p._settle_at = 0.0
    p.tick()  # settled: alone, it holds every partition
    assert len(p.owned) == protocol.PARTITIONS
    for payload in (b"\xff\xfe", b"[1, 2]", b'{"partitions": "all"}', b'{"partitions": [1e999]}',
                    b'{"partitions": [' + b"9," * 100_000 + b"9]}", b'{"hello": "yes"}', b"{" * 5000):
        p._on_member(client, None, SimpleNamespace(topic=members_topic("g", "hub-x"), payload=payload, qos=0, mid=0))
    # Each of those was still a live receiver that said something: hub-x is a member, and its garbage claims none.
    assert p.members() == {"hub-1", "hub-x"}
    assert p._claims["hub-x"] <= set(range(protocol.PARTITIONS)) | {9}
    p._on_member(client, None, SimpleNamespace(topic=members_topic("g", "hub-x"), payload=b"", qos=0, mid=0))
    assert p.members() == {"hub-1"} and len(p.owned) == protocol.PARTITIONS
