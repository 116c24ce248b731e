"""Wire protocol v1, the bandwidth budget and the sync config keys: pure logic, no broker."""
from __future__ import annotations

import datetime as dt
import json

import pytest

from edge import config
from sync.core.errors import ConfigError, ProtocolError
from sync.wire import protocol
from edge.uplink.budget import BULK, FLAG, Budget, in_windows, parse_window


def _dec(topic, payload, **kw):
    return protocol.decode(topic, payload, direction="up", max_bytes=kw.pop("max_bytes", 1 << 20), **kw)


def test_every_message_kind_round_trips_through_its_topic():
    flag = protocol.encode("flag", "box-1", flag_id="urgent-1.2.3", study_uid="1.2.3", label="urgent", at=1.0)
    assert _dec(protocol.up_topic("box-1", "flag"), flag)["label"] == "urgent"
    data = bytes(range(256)) * 3
    chunk = protocol.encode_chunk_json("box-1", transfer="t1", index=1, count=2, size=1000 + len(data), chunk_size=1000,
                                  sha256="0" * 64, study_uid="1.2.3", label="normal", data=data)
    msg = _dec("wasla/v1/box-1/up/chunk", chunk)
    assert msg.data == data and msg["index"] == 1
    ack = protocol.encode("ack", "box-1", transfer="t1", status="partial", have=[[0, 3], [7, 7]], count=9)
    got = protocol.decode(protocol.down_topic("box-1", "ack"), ack, direction="down", max_bytes=4096,
                          expect_device="box-1")
    assert protocol.from_ranges(got["have"]) == {0, 1, 2, 3, 7}
    assert protocol.hub_filter() == "$share/hub/wasla/v1/+/up/+"


def _matches(filt: str, topic: str) -> bool:
    import paho.mqtt.client as mqtt

    return mqtt.topic_matches_sub(filt.split("/", 2)[2] if filt.startswith("$share/") else filt, topic)


def test_a_box_topic_matches_exactly_one_hub_subscription_its_own_partition():
    for device in ("box-1", "box-2", "clinic-tamanrasset-07", "x"):
        topic = protocol.up_topic(device, "chunk")
        assert topic.startswith(f"wasla/v1/{device}/up/chunk/")
        filters = [protocol.hub_filter("g")] + [protocol.partition_filter("g", p) for p in range(protocol.PARTITIONS)]
        hits = [f for f in filters if _matches(f, topic)]
        assert hits == [protocol.partition_filter("g", protocol.partition_of(device))]
        assert protocol.parse_topic(topic, "up") == (device, "chunk")
        assert protocol.topic_kind(topic) == "chunk"
        # A box from before partitions: its 5-level topic matches the catch-all only, and still parses.
        legacy = f"wasla/v1/{device}/up/flag"
        assert [f for f in filters if _matches(f, legacy)] == [protocol.hub_filter("g")]
        assert protocol.parse_topic(legacy, "up") == (device, "flag")


def test_partitions_spread_boxes_and_a_wrong_partition_is_refused():
    counts = [0] * protocol.PARTITIONS
    for i in range(1600):
        counts[protocol.partition_of(f"box-{i:04d}")] += 1
    assert min(counts) > 60 and max(counts) < 140, counts  # about 100 each
    device = "box-1"
    wrong = (protocol.partition_of(device) + 1) % protocol.PARTITIONS
    with pytest.raises(ProtocolError, match="partition"):
        protocol.parse_topic(f"wasla/v1/{device}/up/flag/{wrong}", "up")
    with pytest.raises(ProtocolError):
        protocol.parse_topic(f"wasla/v1/{device}/down/ack/{protocol.partition_of(device)}", "down")


@pytest.mark.parametrize("topic, payload, reason", [
    ("wasla/v1/box-1/up/flag", b"{not json", "not JSON"),
    ("wasla/v1/box-1/up/flag", b"x" * 2000, "exceeds"),
    ("wasla/v2/box-1/up/flag", b"{}", "version"),
    ("wasla/v1/box-1/up/bogus", b"{}", "unknown message kind"),
    ("wasla/v1/box-1/up/status", json.dumps({"v": 9, "type": "status", "device": "box-1", "online": True,
                                             "at": 1}).encode(), "unknown protocol version"),
    ("wasla/v1/box-1/up/status", json.dumps({"v": 1, "type": "status", "device": "box-2", "online": True,
                                             "at": 1}).encode(), "differs from topic device"),
    ("wasla/v1/box-1/up/status", json.dumps({"v": 1, "type": "status", "device": "box-1", "online": "yes",
                                             "at": 1}).encode(), "wrong type"),
    ("wasla/v1/box-1/up/status", json.dumps({"v": 1, "type": "status", "device": "box-1", "online": True}).encode(),
     "missing field 'at'"),
    ("wasla/v1/box-1/up/heartbeat", json.dumps({"v": 1, "type": "heartbeat", "device": "box-1", "at": 1,
                                                "queue_depth": True}).encode(), "'queue_depth' has the wrong type"),
    ("wasla/v1/box-1/up/heartbeat", json.dumps({"v": 1, "type": "heartbeat", "device": "box-1", "at": 1,
                                                "queue_depth": -3}).encode(), "'queue_depth' is out of range"),
    ("wasla/v1/box-1/up/status", b'{"v": 1, "type": "status", "device": "box-1", "online": true, "at": 1e400}',
     "'at' is out of range"),
    ("wasla/v1/box-1/up/chunk", b"XXXX\0\0\0\x02{}", "magic"),
    ("wasla/v1/box-1/up/flag", b"[" * 1000, "nested too deeply"),
])
def test_malformed_oversized_unknown_version_and_wrong_device_messages_are_refused(topic, payload, reason):
    with pytest.raises(ProtocolError, match=reason):
        _dec(topic, payload, max_bytes=1024)


def test_a_corrupted_chunk_is_refused_by_its_own_sha256():
    chunk = bytearray(protocol.encode_chunk_json("b", transfer="t", index=0, count=1, size=100, chunk_size=100,
                                            sha256="a" * 64, study_uid="1.2", label=None, data=b"\1" * 100))
    chunk[-1] ^= 0xFF
    with pytest.raises(ProtocolError, match="sha256 mismatch"):
        _dec("wasla/v1/b/up/chunk", bytes(chunk))


def test_compact_chunk_frame_round_trips_in_under_80_bytes_of_header():
    data = bytes(range(256)) * 64
    frame = protocol.encode_chunk("01HZX4K2T9W8Q5M3N7P6R2S1AB", 41, data)
    assert len(frame) - len(data) < 80
    msg = _dec("wasla/v1/box-1/up/chunk", frame)
    assert (msg.device, msg["transfer"], msg["index"], msg.data, msg.get("compact")) == \
        ("box-1", "01HZX4K2T9W8Q5M3N7P6R2S1AB", 41, data, True)


@pytest.mark.parametrize("mangle, reason", [
    (lambda f: f[:-1] + bytes([f[-1] ^ 1]), "sha256 mismatch"),
    (lambda f: f[:40], "too short"),
    (lambda f: f[:4] + b"\0" + f[5:], "too short|bad transfer id"),
    (lambda f: f[:5] + b"\xff" + f[6:], "bad transfer id"),
])
def test_a_damaged_compact_chunk_is_refused_with_its_reason(mangle, reason):
    frame = protocol.encode_chunk("t-1", 0, b"\7" * 500)
    with pytest.raises(ProtocolError, match=reason):
        _dec("wasla/v1/b/up/chunk", mangle(frame))


def test_a_box_reading_another_boxes_down_topic_refuses_it():
    ack = protocol.encode("ack", "box-2", flag_id="f", status="complete")
    with pytest.raises(ProtocolError, match="on a connection of"):
        protocol.decode("wasla/v1/box-2/down/ack", ack, direction="down", max_bytes=4096, expect_device="box-1")


def test_ranges_compress_chunk_sets():
    assert protocol.to_ranges([5, 0, 1, 2, 9, 6]) == [[0, 2], [5, 6], [9, 9]]
    assert protocol.from_ranges([[0, 2], [9, 9]]) == {0, 1, 2, 9}


def test_priorities_put_urgent_flags_first_and_telemetry_last():
    order = [protocol.flag_priority("urgent"), protocol.flag_priority("normal"), protocol.study_priority("urgent"),
             protocol.study_priority("review"), protocol.study_priority("normal"), protocol.PRIO_TELEMETRY]
    assert order == sorted(order) and len(set(order)) == 6


def test_bulk_windows_wrap_past_midnight():
    night = [parse_window("22:00-06:00")]
    assert in_windows(night, dt.datetime(2026, 1, 1, 23, 30))
    assert in_windows(night, dt.datetime(2026, 1, 1, 5, 59))
    assert not in_windows(night, dt.datetime(2026, 1, 1, 12, 0))
    assert in_windows([], dt.datetime(2026, 1, 1, 12, 0))


def test_quota_stops_bulk_but_flags_and_urgent_pass_and_are_counted():
    saved = []
    b = Budget(daily_quota_mb=0.001, load_usage=lambda day: {"bulk": 900},
               save_usage=lambda day, kind, n: saved.append((kind, n)))
    assert b.allow_bulk() == (True, "")
    b.charge(BULK, 200)
    assert b.allow_bulk() == (False, "daily quota spent")
    assert b.allow_bulk(urgent=True)[0]
    b.charge(FLAG, 300)
    assert b.usage()[FLAG] == 300 and ("flag", 300) in saved


def test_outside_the_bulk_window_only_urgent_studies_go():
    b = Budget(windows=["01:00-02:00"], clock=lambda: dt.datetime(2026, 1, 1, 12, 0).timestamp())
    assert b.allow_bulk() == (False, "outside bulk window")
    assert b.allow_bulk(urgent=True)[0]


def test_rate_cap_paces_bulk_after_a_flag_spent_the_tokens():
    b = Budget(max_rate_kbps=80)  # 10 kB/s, 10 kB burst
    assert b.delay(4000) == 0
    b.charge(FLAG, 14000)
    assert 0.7 < b.delay(4000) <= 0.8


def test_sync_config_keys_are_documented_and_validated():
    docs = {k: doc for k, _d, doc in config.describe() if k.startswith("sync.")}
    assert len(docs) >= 24 and all(docs.values())
    cfg = config.parse('[sync]\nbulk_windows = ["22:00-06:00"]\nchunk_bytes = 32768\nmax_inflight_bytes = 65536\n')
    assert cfg.sync.chunk_bytes == 32768
    for bad in ('chunk_bytes = 10', 'bulk_windows = ["25:00-01:00"]', 'max_inflight_bytes = 1024',
                'tls_cert_file = "a.pem"', 'max_rate_kbps = -1', 'bogus = 1'):
        with pytest.raises(ConfigError):
            config.parse(f"[sync]\n{bad}\n")


def test_hub_config_is_strict():
    from sync.hub import config as hub_config

    with pytest.raises(ConfigError, match="unknown key 'broker.hots'"):
        hub_config.parse("[broker]\nhots = 'x'\n")
    with pytest.raises(ConfigError, match="share_group"):
        hub_config.parse("[broker]\nshare_group = 'a/b'\n")
