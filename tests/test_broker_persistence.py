"""The test broker really persists, even when the tests run as root: its autosave works and a retained message
survives kill -9 (queued messages of offline sessions: tests/test_sync_transfer.py's broker restarts)."""
from __future__ import annotations

import time

import paho.mqtt.client as mqtt

from harness import Mosquitto, wait_until


def _client(port: int, client_id: str, clean: bool) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.received = []
    c.on_message = lambda _c, _u, m: c.received.append((m.topic, bytes(m.payload), m.retain))
    props = mqtt.Properties(mqtt.PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    c.connect("127.0.0.1", port, clean_start=clean, properties=props)
    c.loop_start()
    return c


def test_retained_message_survives_a_broker_kill_and_restart_with_autosave_working(tmp_path):
    broker = Mosquitto(tmp_path / "mqtt").start()
    try:
        pub = _client(broker.port, "pub", clean=True)
        pub.publish("t/retained", b"kept", qos=1, retain=True).wait_for_publish(5)
        pub.disconnect()
        pub.loop_stop()
        time.sleep(2.5)  # autosave_interval 1: the broker has written its state by now
        broker.kill()
        log = (broker.workdir / "mosquitto.log").read_text(errors="replace")
        assert "Permission denied" not in log and "Error saving" not in log, log[-2000:]
        broker.start()
        back = _client(broker.port, "reader", clean=True)
        back.subscribe("t/retained", qos=1)
        wait_until(lambda: (("t/retained", b"kept", True) in back.received), timeout=10, what="retained message")
        back.disconnect()
        back.loop_stop()
    finally:
        broker.stop()
