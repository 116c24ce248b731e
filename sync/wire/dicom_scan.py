"""The strict, bounded first read of untrusted DICOM, before pydicom parses it: structure, limits, header facts."""
from __future__ import annotations

import io
import logging
import re
import struct
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sync.core.errors import BadInputError

# Bounds on what one file may make the box do before a single value is converted. pydicom parses every
# undefined-length sequence eagerly, ~27 us per item: a 3.2 MB file of 100k private items cost 31 s at ingest and
# 11 s at triage (issue 12, row 10). 50,000 items hold an enhanced multi-frame object of ~7,000 frames (7 items a
# frame); depth 32 is well past the deepest real nesting (SR content trees) and far from Python's recursion limit.
MAX_ITEMS = 50_000
MAX_DEPTH = 32
MAX_ELEMENTS = 500_000  # every element, item and pixel fragment, at any depth
# The per-file time budget. Every step a file can make the box take is bounded rather than timed out: this walk
# (the only loop whose length the file sets before pydicom) checks the clock every 2,048 steps; pydicom then parses
# at most MAX_ITEMS / MAX_ELEMENTS; decoding is bounded by the pixel budget (sync.wire.limits.check_dimensions) and by
# each codestream being complete and no larger than the header says (sync.wire.limits.check_codestream), which is what
# made CharLS spend seconds per frame. A killable decode process would bound the codecs too, but would cost a
# process (or a pickled frame) per file on a two-core box and change the triage worker's shape; scripts/fuzz.py
# runs every case under a wall-clock limit to show nothing still runs long.
TIME_BUDGET_S = 10.0
# Top-level values up to this size are kept for the header; larger ones (pixel data, private blobs) stay on disk.
HEADER_VALUE_BYTES = 64 * 1024

_ITEM, _ITEM_END, _SEQ_END, _PIXEL_DATA = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD, 0x7FE00010
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # Pixel Data, Float and Double Float Pixel Data
_UNDEFINED = 0xFFFFFFFF
_VRS = frozenset({"AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF", "OL",
                  "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US",
                  "UT", "UV"})
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"})
# pydicom raises BytesLengthException on these when the length is not a whole number of values.
_VALUE_SIZE = {"AT": 4, "FD": 8, "FL": 4, "SL": 4, "SS": 2, "SV": 8, "UL": 4, "US": 2, "UV": 8}
_IMPLICIT_LE, _EXPLICIT_BE, DEFLATED = "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"
_dictionary_cache: dict[int, str | None] = {}


def _dictionary_vr(tag: int) -> str | None:
    """The data dictionary's VR for `tag` ('US or SS' for ambiguous ones), None when it has none (private)."""
    try:
        return _dictionary_cache[tag]
    except KeyError:
        pass
    from pydicom.datadict import dictionary_VR

    try:
        vr = str(dictionary_VR(tag))
    except KeyError:
        vr = None
    if len(_dictionary_cache) < 65536:
        _dictionary_cache[tag] = vr
    return vr


@dataclass
class Scan:
    """What the walk found. `header` holds the top-level elements with small values (no sequences, no pixel data),
    raw, so a value is converted only when asked for; `error` is the structural fault, if any, found after it."""

    header: object            # pydicom Dataset, with .file_meta
    transfer_syntax: str
    has_pixels: bool
    error: BadInputError | None
    elements: int
    items: int
    data_set_bytes: int


def _malformed(text: str) -> BadInputError:
    return BadInputError(f"malformed DICOM: {text}")


class _Plain:
    """A file object of known size as the walk's stream (the inflating reader has the same five methods)."""

    seekable = True

    def __init__(self, fh: BinaryIO, size: int):
        self._fh, self.size, self.pos = fh, size, fh.tell()

    def read(self, n: int) -> bytes:
        data = self._fh.read(n)
        self.pos += len(data)
        return data

    def peek(self, n: int) -> bytes:
        data = self._fh.read(n)
        self._fh.seek(self.pos)
        return data

    def skip(self, n: int) -> int:
        n = max(min(n, self.size - self.pos), 0)
        self.pos += n
        self._fh.seek(self.pos)
        return n

    def seek(self, pos: int) -> None:
        self.pos = pos
        self._fh.seek(pos)

    def find(self, pattern: bytes) -> bool:
        while True:
            chunk = self._fh.read(1 << 16)
            i = chunk.find(pattern)
            if i >= 0:
                self.seek(self.pos + i + len(pattern))
                return True
            if len(chunk) < len(pattern):
                self.seek(self.size)
                return False
            self.seek(self.pos + len(chunk) - len(pattern) + 1)


class _Walk:
    """pydicom's parsing rules, mirrored so both agree where every element starts and ends, but bounded and strict:
    every deviation pydicom would paper over (a value past the end, a stray delimiter, an unknown VR) is a reason."""

    def __init__(self, src, little: bool, deadline: float):
        self.src, self.e, self.deadline = src, "<" if little else ">", deadline
        self.little = little
        self.elements = self.items = 0
        self.top: dict = {}
        self.has_pixels = False
        self._tag_struct = struct.Struct(self.e + "HHI")
        self._short = struct.Struct(self.e + "HH2sH")
        self._long = struct.Struct(self.e + "I")

    def _tick(self) -> None:
        self.elements += 1
        if self.elements > MAX_ELEMENTS:
            raise _malformed(f"more than {MAX_ELEMENTS} data elements: refused (limit per file)")
        if not self.elements & 2047 and time.monotonic() > self.deadline:
            raise _malformed(f"the file's structure could not be checked within {TIME_BUDGET_S:.0f} s: refused")

    def _need(self, data: bytes, n: int, what: str) -> bytes:
        if len(data) < n:
            raise BadInputError(f"truncated DICOM: the file ends inside {what}")
        return data

    def _value_fits(self, tag: int, length: int) -> None:
        size = getattr(self.src, "size", None)
        if size is not None and self.src.pos + length > size:
            raise BadInputError(f"truncated DICOM: element ({tag >> 16:04X},{tag & 0xFFFF:04X}) needs "
                                f"{self.src.pos + length - size} bytes beyond the end of the file")

    def dataset(self, end: int | None, depth: int, implicit: bool, top: bool) -> None:
        """Elements up to `end` (a defined-length item), to an item delimiter (end == -1) or to EOF (end None)."""
        src = self.src
        first = src.peek(6)
        if len(first) == 6:
            # pydicom's own check at the start of each data set: VR bytes that are not two capitals mean implicit.
            found_implicit = not (0x40 < first[4] < 0x5B and 0x40 < first[5] < 0x5B)
            implicit = found_implicit if top else implicit or found_implicit
        while True:
            if end is not None and end >= 0:
                if src.pos == end:
                    return
                if src.pos > end:
                    raise _malformed("an element runs past the end of its sequence item")
            head = src.read(8)
            if not head and end is None:
                return
            self._need(head, 8, "an element header" if end is None else "a sequence item")
            group, elem, length = self._tag_struct.unpack(head)
            tag = group << 16 | elem
            if tag == _ITEM_END:
                if end == -1:
                    return
                raise _malformed("an item delimiter outside a sequence item")
            if group == 0xFFFE:
                raise _malformed(f"a sequence item or delimiter ({group:04X},{elem:04X}) outside a sequence")
            self._tick()
            vr = None
            if not implicit:
                _, _, code, short_length = self._short.unpack(head)
                if 0x40 < code[0] < 0x5B and 0x40 < code[1] < 0x5B:
                    vr = code.decode("ascii")
                    if vr not in _VRS:
                        raise _malformed(f"element ({group:04X},{elem:04X}) has an unknown VR")
                    if vr in _LONG_VRS:
                        length = self._long.unpack(self._need(src.read(4), 4, "an element header"))[0]
                    else:
                        length = short_length
                # else: pydicom reads this one element as implicit VR (writers that switch inside sequences)
            self._element(tag, vr, implicit, length, depth, top)

    def _element(self, tag: int, vr: str | None, implicit: bool, length: int, depth: int, top: bool) -> None:
        src = self.src
        known = vr or _dictionary_vr(tag)
        value_tell = src.pos
        if tag in _PIXEL_TAGS and top:
            self.has_pixels = True
        if length == _UNDEFINED:
            if known in ("SQ", "UN") or (known is None and src.peek(4) == struct.pack(self.e + "HH", 0xFFFE, 0xE000)):
                self.sequence(-1, depth + 1, implicit)
            else:
                self.undefined_value(tag)
            return
        if known == "SQ":
            self._value_fits(tag, length)
            self.sequence(src.pos + length, depth + 1, implicit)
            return
        size = _VALUE_SIZE.get(known or "")
        if size and length % size:
            raise _malformed(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) of VR {known} has a length that is "
                             f"not a multiple of {size}")
        self._value_fits(tag, length)
        if top and length <= HEADER_VALUE_BYTES and tag not in _PIXEL_TAGS:
            from pydicom.dataelem import RawDataElement, empty_value_for_VR
            from pydicom.tag import BaseTag

            value = self._need(src.read(length), length, "an element value") if length else (
                empty_value_for_VR(vr, raw=True) if vr else b"")
            self.top[BaseTag(tag)] = RawDataElement(BaseTag(tag), vr, length, value,  # type: ignore[arg-type]
                                                    value_tell, implicit, self.little)
        elif src.skip(length) < length:
            raise BadInputError(f"truncated DICOM: element ({tag >> 16:04X},{tag & 0xFFFF:04X}) ends beyond the "
                                "end of the file")

    def sequence(self, end: int, depth: int, implicit: bool) -> None:
        if depth > MAX_DEPTH:
            raise _malformed(f"sequences nested deeper than {MAX_DEPTH} levels: refused")
        src = self.src
        while True:
            if end >= 0:
                if src.pos == end:
                    return
                if src.pos > end:
                    raise _malformed("a sequence item runs past the end of its sequence")
            head = self._need(src.read(8), 8, "a sequence")
            group, elem, length = self._tag_struct.unpack(head)
            tag = group << 16 | elem
            if tag == _SEQ_END and end == -1:
                return
            if tag != _ITEM:
                raise _malformed("a sequence holds something other than items")
            self.items += 1
            if self.items > MAX_ITEMS:
                raise _malformed(f"more than {MAX_ITEMS} sequence items: refused (limit per file)")
            self._tick()
            if length == _UNDEFINED:
                self.dataset(-1, depth, implicit, False)
            else:
                self._value_fits(tag, length)
                self.dataset(src.pos + length, depth, implicit, False)

    def undefined_value(self, tag: int) -> None:
        """Encapsulated pixel data (fragments to a sequence delimiter) or, as pydicom falls back to, any value up to
        the next sequence delimiter."""
        src = self.src
        start = src.pos
        while True:
            head = src.read(8)
            if len(head) < 8:
                raise BadInputError("truncated DICOM: the file ends inside encapsulated pixel data")
            group, elem, length = self._tag_struct.unpack(head)
            if (group << 16 | elem) == _SEQ_END:
                return
            if (group << 16 | elem) != _ITEM or length == _UNDEFINED:
                break
            self._tick()
            if src.skip(length) < length:
                raise BadInputError("truncated DICOM: the file ends inside encapsulated pixel data")
        if not src.seekable:
            raise _malformed(f"undefined-length element ({tag >> 16:04X},{tag & 0xFFFF:04X}) is not encapsulated "
                             "data")
        src.seek(start)
        if not src.find(struct.pack(self.e + "HH", 0xFFFE, 0xE0DD)) or len(src.read(4)) < 4:
            raise BadInputError(f"truncated DICOM: undefined-length element ({tag >> 16:04X},{tag & 0xFFFF:04X}) "
                                "has no delimiter before the end of the file")


def _read_meta(src, deadline: float) -> dict:
    """The group 0002 elements (explicit VR little endian, as pydicom reads them), raw."""
    walk = _Walk(src, True, deadline)
    while True:
        peek = src.peek(6)
        if len(peek) < 6 or struct.unpack("<H", peek[:2])[0] != 0x0002:
            return walk.top
        head = walk._need(src.read(8), 8, "the file meta information")
        group, elem, length = walk._tag_struct.unpack(head)
        _, _, code, short_length = walk._short.unpack(head)
        implicit = not (0x40 < code[0] < 0x5B and 0x40 < code[1] < 0x5B)
        vr = None if implicit else code.decode("ascii")
        if vr is not None and vr not in _VRS:
            raise _malformed(f"file meta element (0002,{elem:04X}) has an unknown VR")
        if vr in _LONG_VRS:
            length = struct.unpack("<I", walk._need(src.read(4), 4, "the file meta information"))[0]
        elif vr is not None:
            length = short_length
        if length == _UNDEFINED or length > HEADER_VALUE_BYTES:
            raise _malformed(f"file meta element (0002,{elem:04X}) has an impossible length")
        walk._tick()
        walk._element(group << 16 | elem, vr, implicit, length, 0, True)


def _syntax(meta: dict) -> str | None:
    from pydicom.tag import BaseTag

    raw = meta.get(BaseTag(0x00020010))
    if raw is None or raw.value is None:
        return None
    return bytes(raw.value).decode("latin-1").rstrip("\0 ")


def scan(fh: BinaryIO, size: int, *, budget_s: float = TIME_BUDGET_S) -> Scan:
    """Walk the Part 10 file in `fh` (positioned at its start); BadInputError when not even its file meta is
    readable. A structural fault after that is returned in `Scan.error`, with the header read up to it."""
    from pydicom.dataset import Dataset, FileMetaDataset

    from sync.wire import deflate_guard

    deadline = time.monotonic() + budget_s
    head = fh.read(132)
    if head[128:132] != b"DICM":
        raise BadInputError("not a DICOM file (no 'DICM' marker at byte 128)")
    plain = _Plain(fh, size)
    meta_raw = _read_meta(plain, deadline)
    try:
        file_meta = FileMetaDataset(meta_raw)
    except Exception as err:  # noqa: BLE001 - pydicom validates the meta's tags; any refusal is the file's fault
        raise BadInputError(f"file meta information is malformed ({type(err).__name__})") from err
    syntax = _syntax(meta_raw)
    little, implicit = True, syntax == _IMPLICIT_LE
    if syntax == _EXPLICIT_BE:
        little = False
    elif syntax is None:  # pydicom guesses from the first element; so do we (a VR after the tag means explicit)
        first = plain.peek(6)
        implicit = not (len(first) == 6 and first[4:6].decode("latin-1") in _VRS)
        little = implicit or len(first) < 2 or struct.unpack("<H", first[:2])[0] < 1024
    src = deflate_guard.InflatingReader(fh) if syntax == DEFLATED else plain
    walk = _Walk(src, little, deadline)
    error = None
    start = src.pos
    try:
        if not src.peek(1):
            raise BadInputError("truncated DICOM: no data set after the file meta information")
        walk.dataset(None, 0, implicit, True)
    except BadInputError as err:
        error = err
    except (struct.error, zlib.error, OverflowError, ValueError) as err:  # a length field beyond any sense
        error = BadInputError(f"malformed DICOM structure ({type(err).__name__})")
    header = Dataset(walk.top)
    header.file_meta = file_meta
    return Scan(header, syntax or "", walk.has_pixels, error, walk.elements, walk.items, src.pos - start)


def scan_file(path: Path | str, **kwargs) -> Scan:
    path = Path(path)
    with open(path, "rb") as fh:
        return scan(fh, path.stat().st_size, **kwargs)


def scan_bytes(data: bytes, **kwargs) -> Scan:
    return scan(io.BytesIO(data), len(data), **kwargs)


# --- pydicom's own words, without the values it quotes ----------------------------------------------------------
# pydicom validates values as it converts them and logs (and warns) "Invalid value for VR PN: '<the value>'": a
# patient's name in the box's journal. The redaction keeps what pydicom says and drops what it quotes.
_QUOTED = re.compile(r"(['\"]).*\1", re.DOTALL)


def redact(text: str) -> str:
    """`text` with whatever it quotes withheld: library messages quote header values ("... value 'DOE^JOHN'")."""
    return _QUOTED.sub("'(value withheld)'", text)


class _RedactQuoted(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot format carries no value either
            return True
        record.msg, record.args = redact(message), None
        return True


def _quiet_pydicom() -> None:
    logger = logging.getLogger("pydicom")
    if not any(isinstance(f, _RedactQuoted) for f in logger.filters):
        logger.addFilter(_RedactQuoted())
    # The same messages as warnings (stderr, so the journal), which cannot be rewritten, only left out.
    warnings.filterwarnings("ignore", message=r"(?s).*Invalid value for VR", category=UserWarning)


_quiet_pydicom()


# --- pydicom's failure modes, named --------------------------------------------------------------------------------
# Every error class pydicom (and the codecs under it) can raise on a malformed file, mapped to words a technician
# can act on. The reason names the exception type, never its message: messages may quote header values (names).

def _reasons() -> tuple[tuple[type[BaseException], str], ...]:
    from pydicom.errors import BytesLengthException, InvalidDicomError

    return (
        (InvalidDicomError, "not a valid DICOM file"),
        (BytesLengthException, "an element's length does not fit its VR"),
        (EOFError, "truncated DICOM: the file ends early"),
        (struct.error, "truncated DICOM: an element header ends early"),
        (zlib.error, "corrupt deflated data set"),
        (RecursionError, "sequences nested too deeply"),
        (MemoryError, "an element too large to read"),
        (UnicodeError, "text that cannot be decoded in its character set"),
        (NotImplementedError, "an encoding that cannot be read"),
        (OverflowError, "a numeric value out of range"),
        (LookupError, "an element that cannot be resolved"),
        (ValueError, "a malformed element value"),
        (TypeError, "a malformed element value"),
        (AttributeError, "a malformed element value"),
        (OSError, "the file could not be read"),
    )


def reason(err: BaseException, context: str = "header") -> str:
    """A quarantine reason for any exception met while reading an untrusted file's `context`."""
    for cls, words in _reasons():
        if isinstance(err, cls):
            return f"{context} cannot be read: {words} ({type(err).__name__})"
    return f"{context} cannot be read ({type(err).__name__})"
