"""The box's MQTT connections to the broker: the main client (will, callbacks) and the separate flag lane."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sync.wire import protocol

log = logging.getLogger(__name__)


def box_client(sc, device: str, *, on_connect, on_disconnect, on_publish, on_message):
    """The main connection: chunks, manifests, status, and the subscription to the hub's messages."""
    client = protocol.mqtt_client(sc.client_id or f"wasla-box-{device}", tls_ca_file=sc.tls_ca_file,
                                  tls_cert_file=sc.tls_cert_file, tls_key_file=sc.tls_key_file,
                                  username=sc.username, password_file=sc.password_file,
                                  sndbuf=sc.socket_sndbuf_bytes)
    # The will tells the hub the box went offline the moment the broker notices. Not retained: the fleet's
    # broker refuses retained messages from boxes (a box must not park data in the broker), and the hub's
    # persistent session receives it anyway.
    client.will_set(protocol.up_topic(device, "status"),
                    protocol.encode("status", device, online=False, at=time.time()), qos=1)
    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_publish = on_publish
    client.on_message = on_message
    return client


def flag_lane(sc, device: str, on_state: Callable[[bool], None]):
    """The flag lane: its own TCP connection, so a flag's bytes are not behind ~max_inflight_bytes of chunks in
    one socket. Clean session and no will: flags live in the outbox until the hub acks them (on the main
    connection's subscription), so nothing needs to survive on the broker for this one. `on_state(up)` is told
    of every connect and disconnect."""
    lane = protocol.mqtt_client(f"{sc.client_id or f'wasla-box-{device}'}-lane", tls_ca_file=sc.tls_ca_file,
                                tls_cert_file=sc.tls_cert_file, tls_key_file=sc.tls_key_file,
                                username=sc.username, password_file=sc.password_file)

    def on_connect(_c, _u, _flags, reason_code, _props):
        try:
            if reason_code.is_failure:
                log.warning("broker refused the flag lane: %s", reason_code)
            on_state(not reason_code.is_failure)
        except Exception:  # noqa: BLE001 - an exception here would kill paho's network thread
            log.exception("flag lane on_connect failed")

    def on_disconnect(*_a):
        try:
            on_state(False)
        except Exception:  # noqa: BLE001 - as above
            log.exception("flag lane on_disconnect failed")

    lane.on_connect, lane.on_disconnect = on_connect, on_disconnect
    return lane
