"""The wire protocol, version 1: topics, message schemas, chunk framing, validation and the MQTT client both ends use."""
from __future__ import annotations

import hashlib
import json
import re
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import msgspec

from sync.core.errors import ProtocolError
from sync.wire.schemas import MAX_NUMBER, SCHEMAS, schema_error as _schema_error  # noqa: F401 - MAX_NUMBER re-exported

VERSION = 1
ROOT = "wasla"
UP_KINDS = ("flag", "manifest", "chunk", "heartbeat", "status")
DOWN_KINDS = ("ack", "read", "command")
DEVICE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Control messages are small JSON; only chunks are big. A bound before json.loads keeps a hostile or broken
# publisher from making the receiver parse megabytes.
MAX_CONTROL_BYTES = 256 * 1024
# Chunks carry raw bytes, not base64: a third more on a 256 kbit/s uplink is a third longer wait for the radiologist.
# Two frames, both accepted by the hub:
#   WSC2 (what boxes send): magic, transfer-id length, transfer id, chunk index, the chunk's sha256 (32 raw bytes),
#        data. ~75 bytes per chunk; size, whole-file sha256, chunk size and study come from the manifest, which the
#        box always sends on a connection before that transfer's chunks.
#   WSC1 (the first frame): magic, header length, a self-describing JSON header (~400 bytes), data. On GEO those
#        extra ~330 bytes per 16 KiB chunk were 2 % of the uplink.
CHUNK_MAGIC = b"WSC1"
_HEAD = struct.Struct(">4sI")
MAX_CHUNK_HEADER = 4096
COMPACT_MAGIC = b"WSC2"
_COMPACT = struct.Struct(">4sB")
_INDEX = struct.Struct(">I")

LABELS = ("urgent", "review", "normal")
# Lower drains first (ARCHITECTURE.md): urgent flag, other flags and acks, urgent/review/normal study, telemetry.
PRIO_URGENT_FLAG, PRIO_FLAG, PRIO_URGENT_STUDY, PRIO_REVIEW_STUDY, PRIO_NORMAL_STUDY, PRIO_TELEMETRY = range(6)
STUDY_PRIORITY = {"urgent": PRIO_URGENT_STUDY, "review": PRIO_REVIEW_STUDY, "normal": PRIO_NORMAL_STUDY}
# "unknown": the hub has no manifest for a compact chunk's transfer (it raced ahead, or the hub lost its state):
# the box sends the manifest again, then the chunks.
ACK_STATUSES = ("partial", "complete", "retry", "failed", "unknown")
COMMANDS = ("heartbeat", "resume")


def flag_priority(label: str | None) -> int:
    return PRIO_URGENT_FLAG if label == "urgent" else PRIO_FLAG


def study_priority(label: str | None) -> int:
    # An unlabelled study has not been triaged yet; a human should see it before the normals.
    return STUDY_PRIORITY.get(label or "review", PRIO_REVIEW_STUDY)


# --- topics ------------------------------------------------------------------------------------------------------

def check_device(device: str) -> str:
    if not isinstance(device, str) or not DEVICE_RE.fullmatch(device):
        raise ProtocolError(f"bad device id {device!r}")
    return device


# A box's traffic always lands on one receiver: its up topics end in its partition (a hash of its id), and each
# receiver subscribes to the partitions it owns (sync/hub/partitions.py). The number is part of the protocol: box and
# hub compute the same partition without asking each other. 5-level topics (boxes before partitions) stay valid.
PARTITIONS = 16


def partition_of(device: str) -> int:
    return zlib.crc32(check_device(device).encode()) % PARTITIONS


def up_topic(device: str, kind: str) -> str:
    assert kind in UP_KINDS, kind
    return f"{ROOT}/v{VERSION}/{check_device(device)}/up/{kind}/{partition_of(device)}"


def topic_kind(topic: str) -> str:
    """The message kind a topic names, without validating it (the inbox's cheap look); "" when it names none."""
    parts = topic.split("/", 5)
    return parts[4] if len(parts) > 4 else ""


def down_topic(device: str, kind: str) -> str:
    assert kind in DOWN_KINDS, kind
    return f"{ROOT}/v{VERSION}/{check_device(device)}/down/{kind}"


def down_filter(device: str) -> str:
    return f"{ROOT}/v{VERSION}/{check_device(device)}/down/+"


def hub_filter(group: str = "hub") -> str:
    """Unpartitioned up topics (boxes from before partitions), one level short of the partition filters, so no
    message matches both. A shared subscription: the broker hands each message to one receiver of the group."""
    return f"$share/{group}/{ROOT}/v{VERSION}/+/up/+"


def partition_filter(group: str, partition: int) -> str:
    # Shared too: while receivers hand a partition over, both may hold it for a moment, and each message still goes
    # to one of them.
    assert 0 <= partition < PARTITIONS, partition
    return f"$share/{group}/{ROOT}/v{VERSION}/+/up/+/{partition}"


def parse_topic(topic: str, direction: str) -> tuple[str, str]:
    """(device, kind) of a topic in this protocol version; ProtocolError for anything else."""
    parts = topic.split("/")
    if direction == "up" and len(parts) == 6:
        part = parts.pop()
        if not DEVICE_RE.fullmatch(parts[2]) or part != str(partition_of(parts[2])):
            raise ProtocolError(f"topic {topic!r}: {part!r} is not the device's partition")
    if len(parts) != 5 or parts[0] != ROOT or parts[2] == "" or parts[3] != direction:
        raise ProtocolError(f"topic {topic!r} is not {ROOT}/v{VERSION}/<device>/{direction}/<kind>")
    if parts[1] != f"v{VERSION}":
        raise ProtocolError(f"unknown protocol version in topic {topic!r}")
    kinds = UP_KINDS if direction == "up" else DOWN_KINDS
    if parts[4] not in kinds:
        raise ProtocolError(f"unknown message kind {parts[4]!r}")
    return check_device(parts[2]), parts[4]


_SHA_RE = re.compile(r"[0-9a-f]{64}")
# Chunks of one transfer: a 2 GB instance (storage.max_file_mb) in 1 KiB chunks needs ~2M; an ack can name no more.
MAX_CHUNKS = 4_000_000
# Nesting of a control message's values (lists in lists): real ones go 3 deep; json.dumps and every walk recurse.
MAX_JSON_DEPTH = 32
_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")


def valid_id(value: str) -> bool:
    """Whether `value` may travel as a transfer, flag or read id."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


@dataclass
class Message:
    """A validated message: its kind, the device from the topic, its JSON fields and (chunks only) its bytes."""

    kind: str
    device: str
    fields: dict = field(default_factory=dict)
    data: bytes = b""

    def __getitem__(self, key: str):
        return self.fields[key]

    def get(self, key: str, default=None):
        return self.fields.get(key, default)


def _check_fields(kind: str, obj: dict) -> None:
    try:
        msgspec.convert(obj, SCHEMAS[kind], strict=True)
    except msgspec.ValidationError as err:
        raise _schema_error(kind, err) from None
    # These fields are checked wherever they appear, also in a kind whose schema does not name them.
    for name in ("sha256", "chunk_sha256"):
        if name in obj and not (isinstance(obj[name], str) and _SHA_RE.fullmatch(obj[name])):
            raise ProtocolError(f"{kind}: {name} is not a sha256 hex digest")
    for name in ("transfer", "flag_id", "read_id"):
        if obj.get(name) is not None and not (isinstance(obj[name], str) and _ID_RE.fullmatch(obj[name])):
            raise ProtocolError(f"{kind}: bad {name}")
    if "label" in obj and obj["label"] is not None and obj["label"] not in LABELS:
        raise ProtocolError(f"{kind}: unknown label {obj['label']!r}")
    if kind in ("manifest", "chunk"):
        size, cs, count = obj["size"], obj["chunk_size"], obj["count"]
        if size < 1 or cs < 1 or count != -(-size // cs):
            raise ProtocolError(f"{kind}: size {size}, chunk_size {cs} and count {count} disagree")
        if count > MAX_CHUNKS:
            raise ProtocolError(f"{kind}: {count} chunks exceed the limit of {MAX_CHUNKS}")
    if kind == "chunk" and not 0 <= obj["index"] < obj["count"]:
        raise ProtocolError(f"chunk: index {obj['index']} outside 0..{obj['count'] - 1}")
    if kind == "ack":
        if obj["status"] not in ACK_STATUSES:
            raise ProtocolError(f"ack: unknown status {obj['status']!r}")
        if (obj.get("transfer") is None) == (obj.get("flag_id") is None):
            raise ProtocolError("ack: exactly one of transfer and flag_id")
        ranges_from_wire(obj.get("have", []), obj.get("count"))
    if kind == "command" and obj["command"] not in COMMANDS:
        raise ProtocolError(f"command: unknown command {obj['command']!r}")


def encode(kind: str, device: str, **fields_: Any) -> bytes:
    """A control message as bytes; validated on the way out too, so a bug shows up on the sender."""
    obj = {"v": VERSION, "type": kind, "device": check_device(device), **fields_}
    _check_fields(kind, obj)
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def encode_chunk(transfer: str, index: int, data: bytes) -> bytes:
    """A compact (WSC2) chunk frame: the device is the topic's, everything else about the transfer is the manifest's."""
    tid = transfer.encode("ascii")
    if not _ID_RE.fullmatch(transfer) or not 0 <= index < 2 ** 32 or not data:
        raise ProtocolError(f"chunk {index} of {transfer!r}: bad transfer id, index or empty data")
    return _COMPACT.pack(COMPACT_MAGIC, len(tid)) + tid + _INDEX.pack(index) + hashlib.sha256(data).digest() + data


def encode_chunk_json(device: str, *, transfer: str, index: int, count: int, size: int, chunk_size: int,
                      sha256: str, study_uid: str, label: str | None, data: bytes) -> bytes:
    """The self-describing WSC1 frame (kept: hubs accept it, and it can open a transfer without a manifest)."""
    head = {"v": VERSION, "type": "chunk", "device": check_device(device), "transfer": transfer, "index": index,
            "count": count, "size": size, "chunk_size": chunk_size, "sha256": sha256,
            "chunk_sha256": hashlib.sha256(data).hexdigest(), "study_uid": study_uid, "label": label}
    _check_fields("chunk", head)
    raw = json.dumps(head, separators=(",", ":")).encode()
    return _HEAD.pack(CHUNK_MAGIC, len(raw)) + raw + data


def decode(topic: str, payload: bytes, *, direction: str, max_bytes: int, expect_device: str | None = None) -> Message:
    """Validate one received message; ProtocolError (with a reason fit for the dead-letter table) if it is not ours."""
    device, kind = parse_topic(topic, direction)
    if expect_device is not None and device != expect_device:
        raise ProtocolError(f"message for device {device!r} on a connection of {expect_device!r}")
    if len(payload) > max_bytes:
        raise ProtocolError(f"{kind}: {len(payload)} bytes exceeds the limit of {max_bytes}")
    data = b""
    if kind == "chunk" and payload[:4] == COMPACT_MAGIC:
        return _decode_compact(device, payload)
    if kind == "chunk":
        if len(payload) < _HEAD.size:
            raise ProtocolError("chunk: shorter than its frame header")
        magic, hlen = _HEAD.unpack_from(payload)
        if magic != CHUNK_MAGIC:
            raise ProtocolError("chunk: bad frame magic")
        if hlen > MAX_CHUNK_HEADER or _HEAD.size + hlen > len(payload):
            raise ProtocolError("chunk: bad header length")
        head_raw, data = payload[_HEAD.size:_HEAD.size + hlen], payload[_HEAD.size + hlen:]
    else:
        if len(payload) > MAX_CONTROL_BYTES:
            raise ProtocolError(f"{kind}: control message of {len(payload)} bytes")
        head_raw = payload
    try:
        obj = json.loads(head_raw, parse_constant=_no_constant)
    except RecursionError as err:  # 2 KB of "[" nests deeper than the interpreter allows
        raise ProtocolError(f"{kind}: JSON nested too deeply") from err
    except (ValueError, UnicodeDecodeError) as err:
        raise ProtocolError(f"{kind}: not JSON ({type(err).__name__})") from err
    if not isinstance(obj, dict):
        raise ProtocolError(f"{kind}: not a JSON object")
    _check_values(kind, obj)
    if type(obj.get("v")) is not int or obj.get("v") != VERSION:
        raise ProtocolError(f"{kind}: unknown protocol version {obj.get('v')!r}")
    if obj.get("type") != kind:
        raise ProtocolError(f"{kind}: payload type {obj.get('type')!r} does not match the topic")
    if obj.get("device") != device:
        # A box may only speak for itself: the topic (which the broker ACL ties to its certificate) must agree.
        raise ProtocolError(f"{kind}: payload device {obj.get('device')!r} differs from topic device {device!r}")
    _check_fields(kind, obj)
    if kind == "chunk":
        expected = min(obj["chunk_size"], obj["size"] - obj["index"] * obj["chunk_size"])
        if len(data) != expected:
            raise ProtocolError(f"chunk {obj['index']}: {len(data)} bytes, expected {expected}")
        if hashlib.sha256(data).hexdigest() != obj["chunk_sha256"]:
            raise ProtocolError(f"chunk {obj['index']} of {obj['transfer']}: sha256 mismatch (corrupted)")
    return Message(kind, device, obj, bytes(data))


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # json.loads would otherwise turn NaN / Infinity into floats


def _check_values(kind: str, obj: dict) -> None:
    """Every value of a decoded message: nested at most MAX_JSON_DEPTH, every string encodable as UTF-8 (a lone
    surrogate such as "\\ud800" decodes from JSON but fails in SQLite, logs and on the way out)."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ProtocolError(f"{kind}: JSON nested too deeply")
        if isinstance(value, dict):
            for key, item in value.items():
                stack.append((key, depth))
                stack.append((item, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ProtocolError(f"{kind}: a string that is not valid UTF-8 text") from err


def _decode_compact(device: str, payload: bytes) -> Message:
    if len(payload) < _COMPACT.size:
        raise ProtocolError("chunk: shorter than its frame header")
    _magic, tlen = _COMPACT.unpack_from(payload)
    start = _COMPACT.size + tlen + _INDEX.size + 32
    if tlen == 0 or len(payload) <= start:
        raise ProtocolError("chunk: compact frame too short for its header")
    try:
        tid = payload[_COMPACT.size:_COMPACT.size + tlen].decode("ascii")
    except UnicodeDecodeError as err:
        raise ProtocolError("chunk: bad transfer id") from err
    if not _ID_RE.fullmatch(tid):
        raise ProtocolError("chunk: bad transfer id")
    (index,) = _INDEX.unpack_from(payload, _COMPACT.size + tlen)
    digest, data = payload[start - 32:start], payload[start:]
    if hashlib.sha256(data).digest() != digest:
        raise ProtocolError(f"chunk {index} of {tid}: sha256 mismatch (corrupted)")
    return Message("chunk", device, {"transfer": tid, "index": index, "compact": True}, bytes(data))


# --- chunk sets as ranges: an ack carries every chunk the hub holds in a few numbers ------------------------------

def to_ranges(indices) -> list[list[int]]:
    """[0,1,2,5,6,9] -> [[0,2],[5,6],[9,9]] (inclusive)."""
    out: list[list[int]] = []
    for i in sorted(set(indices)):
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


def from_ranges(ranges) -> set[int]:
    return {i for a, b in ranges for i in range(a, b + 1)}


def ranges_from_wire(ranges, count: int | None = None) -> list[list[int]]:
    """Validated [first, last] chunk ranges. The box expands them into a set on its MQTT thread, so they may name
    no chunk at or past `count` (when the ack gives it) and at most MAX_CHUNKS in all: [[0, 10**12]] was a
    memory bomb."""
    if not isinstance(ranges, list) or len(ranges) > 100_000:
        raise ProtocolError("ranges: not a list")
    top = MAX_CHUNKS if count is None else min(count, MAX_CHUNKS)
    total = 0
    for r in ranges:
        if (not isinstance(r, list) or len(r) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in r)
                or r[0] < 0 or r[1] < r[0]):
            raise ProtocolError(f"ranges: bad range {str(r)[:40]}")
        if r[1] >= top:
            raise ProtocolError(f"ranges: chunk {r[1]} is beyond the transfer's {top} chunks")
        total += r[1] - r[0] + 1
        if total > MAX_CHUNKS:
            raise ProtocolError(f"ranges: more than {MAX_CHUNKS} chunks")
    return ranges


def now() -> float:
    return time.time()


# --- the MQTT client both ends use: v5, persistent session, TLS and password from files, small socket buffers ----

def mqtt_client(client_id: str, *, tls_ca_file=None, tls_cert_file=None, tls_key_file=None, username: str = "",
                password_file=None, sndbuf: int = 0):
    """A paho v5 client configured but not connected. The caller sets callbacks and calls `connect_async`."""
    import socket

    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if tls_ca_file:
        client.tls_set(ca_certs=str(tls_ca_file), certfile=str(tls_cert_file) if tls_cert_file else None,
                       keyfile=str(tls_key_file) if tls_key_file else None)
    if username:
        from pathlib import Path

        password = Path(password_file).read_text().strip() if password_file else None
        client.username_pw_set(username, password)

    def _on_socket_open(_client, _userdata, sock) -> None:
        # paho leaves Nagle on: a small QoS 1 message then waits a round trip for the previous ACK (1.2 s instead
        # of 0.6 s on GEO). A small send buffer keeps bulk queued in our outbox, where an urgent flag can pass it.
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if sndbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        except (OSError, AttributeError):
            pass  # a TLS or proxy socket wrapper without setsockopt: the link still works, only slower

    client.on_socket_open = _on_socket_open
    client.reconnect_delay_set(1, 60)
    return client


def connect_properties(session_expiry_s: int):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = int(session_expiry_s)
    return props
