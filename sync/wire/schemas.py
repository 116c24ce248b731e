"""The wire's message schemas, version 1: each kind's fields and types as msgspec structs, and their errors in the
dead-letter table's words."""
from __future__ import annotations

import re
from typing import Annotated

import msgspec

from sync.core.errors import ProtocolError

# Integers and times travel as JSON numbers; anything beyond 2**53 is neither exact in a double nor a real value.
MAX_NUMBER = 2 ** 53
# A count, size, index or depth: an integer (never a bool), never negative, exact in a double.
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_NUMBER)]
# A time, ratio or amount: a finite number (an integer is one too), within the exact range of a double.
Number = Annotated[float, msgspec.Meta(ge=-MAX_NUMBER, le=MAX_NUMBER)]


class _Fields(msgspec.Struct):
    """Each message kind's fields and their types, checked by msgspec. Unknown fields are allowed (a v1 minor
    addition must not break an older hub); a field's absence is allowed where it has a default."""


class FlagFields(_Fields):
    flag_id: str
    study_uid: str
    label: str
    at: Number
    reasons: list = msgspec.field(default_factory=list)
    modality: str | None = None
    n_instances: Count = 0
    models: list = msgspec.field(default_factory=list)
    preview_jpeg_b64: str | None = None


class ManifestFields(_Fields):
    transfer: str
    study_uid: str
    sop_instance_uid: str
    size: Count
    sha256: str
    chunk_size: Count
    count: Count
    label: str | None = None
    codec: str = ""
    transfer_syntax: str = ""
    original_size: Count = 0
    ratio: Number = 1.0
    resume: bool = False


class ChunkFields(_Fields):
    transfer: str
    index: Count
    count: Count
    size: Count
    chunk_size: Count
    sha256: str
    chunk_sha256: str
    study_uid: str
    label: str | None = None


class HeartbeatFields(_Fields):
    at: Number
    queue_depth: Count = 0
    oldest_unsent_at: Number | None = None
    disk_free_mb: Number = 0.0
    models: list = msgspec.field(default_factory=list)
    link: dict = msgspec.field(default_factory=dict)
    reads_applied: list = msgspec.field(default_factory=list)


class StatusFields(_Fields):
    online: bool
    at: Number


class AckFields(_Fields):
    status: str
    transfer: str | None = None
    flag_id: str | None = None
    have: list = msgspec.field(default_factory=list)
    count: Count = 0
    reason: str | None = None


class ReadFields(_Fields):
    read_id: str
    study_uid: str
    disposition: str
    at: Number
    note: str | None = None
    by: str | None = None


class CommandFields(_Fields):
    command: str
    args: dict = msgspec.field(default_factory=dict)


SCHEMAS: dict[str, type[_Fields]] = {
    "flag": FlagFields, "manifest": ManifestFields, "chunk": ChunkFields, "heartbeat": HeartbeatFields,
    "status": StatusFields, "ack": AckFields, "read": ReadFields, "command": CommandFields,
}
_MISSING = re.compile(r"missing required field `([^`]*)`")
_AT = re.compile(r" - at `\$\.([^`\[]*)")


def schema_error(kind: str, err: msgspec.ValidationError) -> ProtocolError:
    """msgspec's finding in the words the dead-letter table has always used."""
    text = str(err)
    missing = _MISSING.search(text)
    if missing:
        return ProtocolError(f"{kind}: missing field {missing.group(1)!r}")
    at = _AT.search(text)
    name = at.group(1) if at else "?"
    if ", got `" in text:
        return ProtocolError(f"{kind}: field {name!r} has the wrong type")
    return ProtocolError(f"{kind}: field {name!r} is out of range ({text.split(' - at')[0]})")


