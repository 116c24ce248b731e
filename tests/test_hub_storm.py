"""A reconnect storm at the hub: a backlog queued while it was down is absorbed urgent flags first, exactly once."""
from __future__ import annotations

import queue
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from harness import Mosquitto, wait_until
from sync.hub.inbox import PRIO_FLAG, PRIO_TELEMETRY, PRIO_TRANSFER, PRIO_URGENT_FLAG, PriorityInbox, priority
from sync.wire import protocol
from test_sync_support import hub_view, start_hub


def test_inbox_hands_out_urgent_flags_then_flags_transfers_telemetry_in_arrival_order_within_each():
    box = PriorityInbox(100, 10_000)
    items = [("wasla/v1/b/up/heartbeat", b"{}"), ("wasla/v1/b/up/manifest", b"{}"), ("wasla/v1/b/up/chunk", b"x"),
             ("wasla/v1/b/up/flag", b'{"label":"normal"}'), ("wasla/v1/b/up/flag", b'{"label":"urgent"}'),
             ("wasla/v1/b/up/status", b"{}"), ("wasla/v1/b/up/chunk", b"y")]
    for n, (topic, payload) in enumerate(items):
        box.put((n, topic), priority(topic, payload), len(payload))
    got = [box.get_nowait()[0] for _ in items]
    assert got == [4, 3, 1, 2, 6, 0, 5]
    assert [priority(t, p) for t, p in items[:5]] == [PRIO_TELEMETRY, PRIO_TRANSFER, PRIO_TRANSFER, PRIO_FLAG,
                                                      PRIO_URGENT_FLAG]
    with pytest.raises(queue.Empty):
        box.get(timeout=0.05)


def test_a_full_inbox_blocks_the_producer_by_bytes_and_one_oversized_message_still_gets_in():
    box = PriorityInbox(100, 1000)
    box.put("a", 2, 600)
    done = threading.Event()
    t = threading.Thread(target=lambda: (box.put("b", 2, 600), done.set()))
    t.start()
    assert not done.wait(0.3), "over the byte bound: the producer (paho's thread) must wait"
    assert box.get(1) == "a"
    assert done.wait(2) and box.get(1) == "b"
    box.put("huge", 2, 5000)  # alone in the inbox: never blocks for ever
    assert box.nbytes() == 5000 and box.get(1) == "huge"


def test_boxes_returning_at_once_get_their_urgent_flags_filed_before_the_normals_and_each_once(tmp_path):
    broker = Mosquitto(tmp_path / "mqtt", extra_conf="max_inflight_messages 1000\n").start()
    try:
        hub = start_hub(tmp_path, broker.port)
        hub.stop()  # its persistent session stays: the broker queues the backlog for it
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="storm", protocol=mqtt.MQTTv5)
        pub.max_inflight_messages_set(1000)
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        boxes, per_box, urgent = [f"box-{i:02d}" for i in range(40)], 15, set()
        infos = []
        for b in boxes:
            infos.append(pub.publish(protocol.up_topic(b, "status"),
                                     protocol.encode("status", b, online=True, at=time.time()), qos=1))
            infos.append(pub.publish(protocol.up_topic(b, "heartbeat"),
                                     protocol.encode("heartbeat", b, at=time.time(), queue_depth=per_box), qos=1))
        for j in range(per_box):
            for b in boxes:
                label = "urgent" if j % 5 == 4 else "normal"  # the urgent ones arrive late in the backlog
                fid = f"{label}-{b}-{j}"
                if label == "urgent":
                    urgent.add(fid)
                infos.append(pub.publish(protocol.up_topic(b, "flag"), protocol.encode(
                    "flag", b, flag_id=fid, study_uid=f"1.2.826.0.1.3680043.10.{len(infos)}", label=label,
                    at=time.time()), qos=1))
        for i in infos:
            i.wait_for_publish(10)
        pub.loop_stop()
        hub = start_hub(tmp_path, broker.port)
        total = len(boxes) * per_box
        view = hub_view(tmp_path)
        wait_until(lambda: view.query("SELECT COUNT(*) AS n FROM flags")[0]["n"] == total, timeout=60,
                   what="the whole backlog filed")
        hub.stop()
        rows = view.query("SELECT flag_id, received_at, times FROM flags")
        assert len(rows) == total and all(r["times"] == 1 for r in rows)
        last_urgent = max(r["received_at"] for r in rows if r["flag_id"] in urgent)
        normals = sorted(r["received_at"] for r in rows if r["flag_id"] not in urgent)
        assert last_urgent <= normals[len(normals) // 2], "urgent flags waited behind the normal backlog"
        assert view.query("SELECT COUNT(*) AS n FROM boxes WHERE online = 1")[0]["n"] == len(boxes)
    finally:
        broker.stop()
