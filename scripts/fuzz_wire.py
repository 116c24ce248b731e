"""Seeds and mutations for fuzzing the MQTT wire decoder: field types and values, depth, size, frames, topics."""
from __future__ import annotations

import json
import random
import struct


def wire_seeds() -> list[tuple[str, str, bytes]]:
    """(name, topic, payload): one valid message of every kind, both directions, both chunk frames."""
    import hashlib

    from sync.wire import protocol as p

    dev, sha = "box-a", hashlib.sha256(b"x" * 100).hexdigest()
    data = b"x" * 100
    up = {
        "flag": p.encode("flag", dev, flag_id="urgent-1.2.3", study_uid="1.2.3", label="urgent",
                         reasons=[{"code": "x"}], modality="CR", n_instances=1, at=1.7e9, models=[],
                         preview_jpeg_b64=None),
        "manifest": p.encode("manifest", dev, transfer="t-1", study_uid="1.2.3", sop_instance_uid="1.2.3.4",
                             label="review", size=100, sha256=sha, chunk_size=40, count=3, codec="jpegls",
                             transfer_syntax="1.2.840.10008.1.2.4.80", original_size=200, ratio=2.0, resume=False),
        "heartbeat": p.encode("heartbeat", dev, at=1.7e9, queue_depth=3, oldest_unsent_at=None, disk_free_mb=900.5,
                              models=[{"name": "cxr", "version": "1.2.0"}], link={"rtt_ms": 600},
                              reads_applied=["r-1"]),
        "status": p.encode("status", dev, online=True, at=1.7e9),
    }
    out = [(f"up-{k}", p.up_topic(dev, k), v) for k, v in up.items()]
    out.append(("up-chunk-wsc2", p.up_topic(dev, "chunk"), p.encode_chunk("t-1", 0, data[:40])))
    out.append(("up-chunk-wsc1", p.up_topic(dev, "chunk"), p.encode_chunk_json(
        dev, transfer="t-1", index=2, count=3, size=100, chunk_size=40, sha256=sha, study_uid="1.2.3", label=None,
        data=data[80:])))
    down = {
        "ack": p.encode("ack", dev, transfer="t-1", status="partial", have=[[0, 1]], count=3),
        "ack-flag": p.encode("ack", dev, flag_id="urgent-1.2.3", status="complete"),
        "read": p.encode("read", dev, read_id="r-1", study_uid="1.2.3", disposition="normal", note="ok", by="dr",
                         at=1.7e9),
        "command": p.encode("command", dev, command="resume", args={}),
    }
    out += [(f"down-{k}", p.down_topic(dev, k.split("-")[0]), v) for k, v in down.items()]
    return out


_JSON_VALUES = (None, True, False, 0, -1, 1, 2 ** 31, 2 ** 63, 10 ** 30, -(10 ** 30), 1.5, 1e308, "", "x",
                "a" * 300, "\u0000", "\ud800", "../../etc/passwd", "1.2.3 4", "urgent", "complete", "partial",
                [], {}, [[0, 1]], [[0, 2 ** 40]], [[0, 10 ** 12]], [[5, 1]], [["a", "b"]], [[True, False]],
                [[0, 1]] * 1000, [1, 2, 3], {"a": {"b": {"c": []}}}, "0" * 64, "g" * 64)


class WireMutator:
    """Mutates (topic, payload): field types and values, nesting depth, size, encoding, frame headers, topics."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def mutate(self, topic: str, payload: bytes) -> tuple[str, str, bytes]:
        names = []
        for _ in range(self.rng.choice((1, 1, 2, 3))):
            op = self.rng.choices(self._OPS, weights=self._WEIGHTS)[0]
            try:
                topic, payload = getattr(self, op)(topic, payload)
            except Exception:  # noqa: BLE001 - not applicable to this payload
                continue
            names.append(op)
        return "+".join(names) or "none", topic, payload

    _OPS = ("field_value", "drop_field", "add_field", "deep_json", "huge_json", "text", "flip", "truncate",
            "topic", "chunk_frame", "number_literal", "encoding")
    _WEIGHTS = (20, 6, 4, 4, 2, 5, 6, 4, 4, 8, 4, 3)

    def _obj(self, payload: bytes):
        return json.loads(payload)

    def field_value(self, topic, payload):
        obj = self._obj(payload)
        key = self.rng.choice(list(obj))
        value = self.rng.choice(_JSON_VALUES)
        if self.rng.random() < 0.1:
            value = float(self.rng.choice(("nan", "inf", "-inf")))
        obj[key] = value
        return topic, json.dumps(obj).encode()

    def drop_field(self, topic, payload):
        obj = self._obj(payload)
        del obj[self.rng.choice(list(obj))]
        return topic, json.dumps(obj).encode()

    def add_field(self, topic, payload):
        obj = self._obj(payload)
        key = self.rng.choice(("sha256", "chunk_sha256", "transfer", "flag_id", "read_id", "label", "have", "status",
                               "size", "chunk_size", "count", "index", "command", "extra"))
        obj[key] = self.rng.choice(_JSON_VALUES)
        return topic, json.dumps(obj).encode()

    def deep_json(self, topic, payload):
        n = self.rng.choice((100, 1000, 2048, 100_000))
        if self.rng.random() < 0.5:
            return topic, b"[" * n
        obj = self._obj(payload)
        key = self.rng.choice(list(obj))
        return topic, json.dumps(obj).encode().replace(json.dumps(key).encode() + b":",
                                                      json.dumps(key).encode() + b":" + b"[" * n, 1)

    def huge_json(self, topic, payload):
        obj = self._obj(payload)
        obj["pad"] = "x" * self.rng.choice((200_000, 300_000))
        return topic, json.dumps(obj).encode()

    def number_literal(self, topic, payload):
        obj = self._obj(payload)
        key = self.rng.choice(list(obj))
        lit = self.rng.choice((b"1" * 5000, b"1e999", b"-1e999", b"NaN", b"Infinity", b"-0", b"0.0000000001",
                               b"123456789012345678901234567890"))
        text = json.dumps({**obj, key: "@@"}).encode()
        return topic, text.replace(b'"@@"', lit, 1)

    def text(self, topic, payload):
        return topic, self.rng.choice((b"", b"null", b"[]", b"{}", b"1", b'"x"', b"\xef\xbb\xbf" + payload,
                                       payload + b"garbage", payload.replace(b"{", b'{"v":1,', 1),
                                       b'{"v":1,"v":2}' + payload))

    def encoding(self, topic, payload):
        return topic, self.rng.choice((payload.decode("latin-1").encode("utf-16"), b"\xff\xfe" + payload,
                                       payload.replace(b'"', b"\xc3", 1), payload + b"\x80"))

    def flip(self, topic, payload):
        buf = bytearray(payload)
        for _ in range(self.rng.randint(1, 8)):
            buf[self.rng.randrange(len(buf))] = self.rng.randrange(256)
        return topic, bytes(buf)

    def truncate(self, topic, payload):
        return topic, payload[: self.rng.randrange(len(payload) + 1)]

    def topic(self, topic, payload):
        parts = topic.split("/")
        i = self.rng.randrange(len(parts))
        parts[i] = self.rng.choice(("", "+", "#", "v2", "up", "down", "x" * 65, "box-b", "bad id", "ack", "chunk",
                                    "flag", "read", "heartbeat", "\u00e9", "wasla"))
        if self.rng.random() < 0.2:
            parts.append("extra")
        return "/".join(parts), payload

    def chunk_frame(self, topic, payload):
        from sync.wire import protocol as p

        if not topic.endswith("/chunk"):
            return topic, payload
        buf = bytearray(payload)
        if payload[:4] == p.COMPACT_MAGIC:
            op = self.rng.randrange(4)
            if op == 0:
                buf[4] = self.rng.choice((0, 1, 255, buf[4] + 1))
            elif op == 1:
                buf[5 + buf[4]:9 + buf[4]] = struct.pack(">I", self.rng.choice((0, 2 ** 32 - 1, 2 ** 31, 5)))
            elif op == 2:
                buf = buf[: 9 + buf[4] + 32]
            else:
                buf[5:5 + buf[4]] = bytes(self.rng.randrange(256) for _ in range(buf[4]))
            return topic, bytes(buf)
        if payload[:4] == p.CHUNK_MAGIC:
            op = self.rng.randrange(3)
            if op == 0:
                struct.pack_into(">I", buf, 4, self.rng.choice((0, 1, 4096, 4097, 2 ** 32 - 1, len(buf))))
            elif op == 1:
                hlen = struct.unpack_from(">I", buf, 4)[0]
                head = json.loads(bytes(buf[8:8 + hlen]))
                head[self.rng.choice(list(head))] = self.rng.choice(_JSON_VALUES)
                raw = json.dumps(head).encode()
                buf = bytearray(p._HEAD.pack(p.CHUNK_MAGIC, len(raw)) + raw + bytes(buf[8 + hlen:]))
            else:
                buf[:4] = b"WSC3"
            return topic, bytes(buf)
        return topic, payload
