"""Mutations for fuzzing the box's untrusted-DICOM reader: raw bytes, elements, claims, pixel payloads, deflate."""
from __future__ import annotations

import io
import random
import struct
import zlib
from dataclasses import dataclass

DEFLATED = "1.2.840.10008.1.2.1.99"
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"}
VRS = ("AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF", "OL", "OV", "OW",
       "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV")
SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", DEFLATED, "1.2.840.10008.1.2.5",
            "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
            "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
            "1.2.840.10008.1.2.4.110", "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.100", "1.2.3.4", "", "abc",
            "1.2.840.10008.1.2.1\x00", "1." + "9" * 70)


# --- DICOM mutations ---------------------------------------------------------------------------------------------

@dataclass
class _Layout:
    """A Part 10 file split for mutation: preamble + meta, the data set body (inflated if deflated), its encoding."""

    prefix: bytes
    body: bytes
    syntax: str
    little: bool
    implicit: bool
    deflated: bool


def _split(data: bytes) -> _Layout | None:
    import pydicom
    from pydicom.filereader import _read_file_meta_info, read_preamble

    try:
        fh = io.BytesIO(data)
        read_preamble(fh, False)
        meta = _read_file_meta_info(fh)
        syntax = str(meta.get("TransferSyntaxUID", "1.2.840.10008.1.2")).rstrip("\0 ")
        start = fh.tell()
    except Exception:  # noqa: BLE001
        return None
    body, deflated = data[start:], syntax == DEFLATED
    if deflated:
        try:
            body = zlib.decompressobj(-zlib.MAX_WBITS).decompress(body, 8 * 2**20)
        except zlib.error:
            return None
    uid = pydicom.uid.UID(syntax)
    implicit = syntax == "1.2.840.10008.1.2"
    little = not (uid.is_transfer_syntax and not uid.is_little_endian)
    return _Layout(data[:start], body, syntax, little, implicit, deflated)


def _join(lay: _Layout, body: bytes) -> bytes:
    if lay.deflated:
        deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = deflater.compress(body) + deflater.flush()
    return lay.prefix + body


@dataclass
class _Elem:
    tag: int
    vr: str | None
    start: int       # first byte of the element header
    value: int       # first byte of the value
    length: int      # as written (0xFFFFFFFF: undefined)
    end: int         # one past the value (for undefined length: past the delimiter)


def _elements(lay: _Layout) -> list[_Elem]:
    """Top-level elements of the body, from pydicom's own generator (undefined lengths measured by its reads)."""
    from pydicom.filereader import data_element_generator

    fh = io.BytesIO(lay.body)
    out: list[_Elem] = []
    try:
        gen = data_element_generator(fh, lay.implicit, lay.little, defer_size=64)
        while True:
            start = fh.tell()
            elem = next(gen, None)
            if elem is None:
                break
            vr = None if lay.implicit else elem.VR
            head = 8 if lay.implicit or vr not in _LONG_VRS else 12
            length = 0xFFFFFFFF if getattr(elem, "is_undefined_length", False) else elem.length
            value_tell = elem.value_tell if elem.value_tell is not None else start + head
            out.append(_Elem(int(elem.tag), vr, start, value_tell, length, fh.tell()))
            if len(out) > 4000:
                break
    except Exception:  # noqa: BLE001 - the elements before the break are still usable
        pass
    return out


def raw_element(tag: int, vr: str | None, value: bytes, little: bool = True, implicit: bool = False,
                length: int | None = None) -> bytes:
    """One element's bytes; `length` overrides the length field (undefined, odd, a lie)."""
    e = "<" if little else ">"
    n = len(value) if length is None else length
    head = struct.pack(e + "HH", tag >> 16, tag & 0xFFFF)
    if implicit or vr is None:
        return head + struct.pack(e + "I", n & 0xFFFFFFFF) + value
    code = vr.encode("latin-1")[:2].ljust(2, b" ")
    if vr in _LONG_VRS or n > 0xFFFF:
        return head + code + b"\0\0" + struct.pack(e + "I", n & 0xFFFFFFFF) + value
    return head + code + struct.pack(e + "H", n) + value


def nested_sequence(depth: int, little: bool = True, implicit: bool = False, tag: int = 0x00091010) -> bytes:
    """A private sequence nested `depth` levels deep, all lengths undefined: 2 KB reaches depth ~70."""
    e = "<" if little else ">"
    item = struct.pack(e + "HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack(e + "HHI", 0xFFFE, 0xE00D, 0)
    seq_end = struct.pack(e + "HHI", 0xFFFE, 0xE0DD, 0)
    open_ = raw_element(tag, "SQ", b"", little, implicit, 0xFFFFFFFF) + item
    return open_ * depth + (item_end + seq_end) * depth


def many_items(n: int, little: bool = True, implicit: bool = False, tag: int = 0x00091010) -> bytes:
    """A private sequence of `n` undefined-length items with one short element each (100k items = 3.2 MB)."""
    e = "<" if little else ">"
    item = (struct.pack(e + "HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + raw_element(0x00091001, "LO", b"abcdefgh", little,
            implicit) + struct.pack(e + "HHI", 0xFFFE, 0xE00D, 0))
    return (raw_element(tag, "SQ", b"", little, implicit, 0xFFFFFFFF) + item * n
            + struct.pack(e + "HHI", 0xFFFE, 0xE0DD, 0))


# Values a header can claim, by attribute: sizes at and past every budget, zero, negative, not numbers at all.
_INT_CLAIMS = (b"0", b"1", b"-1", b"3", b"65535", b"65536", b"100000", b"2147483647", b"2147483648",
               b"99999999999999999999999", b"1e400", b"nan", b"inf", b"", b" ", b"1\\2", b"abc", b"1.5", b"\0\0")
_FLOAT_CLAIMS = (b"0", b"-0", b"1", b"-1", b"1e-45", b"1e308", b"1e400", b"-1e400", b"nan", b"inf", b"-inf", b"",
                 b"x", b"1\\2\\3", b"0.5\\")
_US_CLAIMS = (0, 1, 2, 3, 4, 7, 8, 12, 15, 16, 17, 24, 31, 32, 33, 64, 255, 256, 32768, 65535)
_ATTRS = {  # keyword: (tag, VR)
    "Rows": (0x00280010, "US"), "Columns": (0x00280011, "US"), "NumberOfFrames": (0x00280008, "IS"),
    "SamplesPerPixel": (0x00280002, "US"), "BitsAllocated": (0x00280100, "US"), "BitsStored": (0x00280101, "US"),
    "HighBit": (0x00280102, "US"), "PixelRepresentation": (0x00280103, "US"), "PlanarConfiguration": (0x00280006, "US"),
    "PhotometricInterpretation": (0x00280004, "CS"), "WindowCenter": (0x00281050, "DS"),
    "WindowWidth": (0x00281051, "DS"), "RescaleSlope": (0x00281053, "DS"), "RescaleIntercept": (0x00281052, "DS"),
    "VOILUTFunction": (0x00281056, "CS"), "SOPClassUID": (0x00080016, "UI"), "SOPInstanceUID": (0x00080018, "UI"),
    "StudyInstanceUID": (0x0020000D, "UI"), "SeriesInstanceUID": (0x0020000E, "UI"),
    "SpecificCharacterSet": (0x00080005, "CS"), "Modality": (0x00080060, "CS"),
    "RedPaletteColorLookupTableDescriptor": (0x00281101, "US"), "RedPaletteColorLookupTableData": (0x00281201, "OW"),
    "LossyImageCompression": (0x00282110, "CS"), "ExtendedOffsetTable": (0x7FE00001, "OV"),
}
_TEXT_CLAIMS = (b"", b"MONOCHROME1", b"MONOCHROME2", b"RGB", b"PALETTE COLOR", b"YBR_FULL", b"YBR_FULL_422",
                b"YBR_ICT", b"YBR_RCT", b"HSV", b"ARGB", b"CMYK", b"SIGMOID", b"LINEAR_EXACT", b"ISO_IR 192",
                b"ISO 2022 IR 87", b"GB18030", b"nonsense_charset", b"\\ISO 2022 IR 149", b"1.2.3 4", b"1.2\x003",
                b"1." + b"2" * 200, b"\xff\xfe\xfd", b"ZZPHI^MARKER", b"1.2.840.10008.5.1.4.1.1.88.22", b"01")


class DicomMutator:
    """Mutates Part 10 files at three levels: raw bytes, elements (VR, length, value) and the claims they make."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self._layouts: dict[int, tuple[_Layout | None, list[_Elem]]] = {}
        self._bomb: bytes | None = None

    def _layout(self, data: bytes) -> tuple[_Layout | None, list[_Elem]]:
        key = hash(data)
        if key not in self._layouts:
            lay = _split(data)
            self._layouts[key] = (lay, _elements(lay) if lay else [])
            if len(self._layouts) > 512:
                self._layouts.pop(next(iter(self._layouts)))
        return self._layouts[key]

    def mutate(self, data: bytes) -> tuple[str, bytes]:
        """(what was done, the new file); one to three mutations stacked."""
        names = []
        for _ in range(self.rng.choice((1, 1, 1, 2, 2, 3))):
            op = self.rng.choices(self._OPS, weights=self._WEIGHTS)[0]
            try:
                new = getattr(self, op)(data)
            except Exception:  # noqa: BLE001 - a mutation that does not apply to this seed is just skipped
                new = None
            if new is not None and new != data:
                data = new
                names.append(op)
        return "+".join(names) or "none", data

    _OPS = ("flip_bytes", "flip_header", "truncate", "splice", "set_claim", "element_length", "element_vr",
            "element_value", "insert_element", "drop_element", "deep_sequence", "many_items", "pixel_fragment",
            "transfer_syntax", "deflate", "duplicate_element")
    _WEIGHTS = (8, 10, 6, 4, 16, 8, 6, 6, 8, 3, 2, 1, 8, 4, 3, 2)

    # -- raw bytes
    def flip_bytes(self, data: bytes) -> bytes:
        buf = bytearray(data)
        for _ in range(self.rng.randint(1, 16)):
            buf[self.rng.randrange(len(buf))] = self.rng.randrange(256)
        return bytes(buf)

    def flip_header(self, data: bytes) -> bytes:
        buf = bytearray(data)
        top = min(len(buf), 2048)
        for _ in range(self.rng.randint(1, 6)):
            i = self.rng.randrange(128, top) if top > 128 else self.rng.randrange(top)
            buf[i] = self.rng.choice((0, 0xFF, 0x7F, 0x80, self.rng.randrange(256), buf[i] ^ (1 << self.rng.randrange(8))))
        return bytes(buf)

    def truncate(self, data: bytes) -> bytes:
        return data[: self.rng.randrange(len(data))]

    def splice(self, data: bytes) -> bytes:
        i = self.rng.randrange(len(data))
        n = self.rng.choice((1, 2, 4, 8, 64, 1024))
        choice = self.rng.randrange(3)
        if choice == 0:
            return data[:i] + data[i + n:]
        if choice == 1:
            return data[:i] + data[i:i + n] * self.rng.randint(2, 8) + data[i:]
        return data[:i] + bytes(self.rng.randrange(256) for _ in range(n)) + data[i:]

    # -- elements
    def _pick(self, data: bytes, *, before_pixels: bool = True):
        lay, elems = self._layout(data)
        if lay is None or not elems:
            return None, None, None
        pool = [e for e in elems if not before_pixels or e.tag < 0x7FE00000] or elems
        return lay, elems, self.rng.choice(pool)

    def set_claim(self, data: bytes) -> bytes | None:
        lay, elems, _ = self._pick(data)
        if lay is None:
            return None
        keyword = self.rng.choice(list(_ATTRS))
        tag, vr = _ATTRS[keyword]
        e = "<" if lay.little else ">"
        if vr == "US":
            count = self.rng.choice((1, 1, 1, 2, 3))
            value = b"".join(struct.pack(e + "H", self.rng.choice(_US_CLAIMS)) for _ in range(count))
            if self.rng.random() < 0.1:
                value = value[:-1]  # an odd length for a 2-byte VR
        elif vr == "IS":
            value = self.rng.choice(_INT_CLAIMS)
        elif vr == "DS":
            value = self.rng.choice(_FLOAT_CLAIMS)
        elif vr in ("OW", "OV"):
            value = bytes(self.rng.randrange(256) for _ in range(self.rng.choice((0, 1, 3, 8, 510, 512))))
        else:
            value = self.rng.choice(_TEXT_CLAIMS)
        if self.rng.random() < 0.15:  # the right tag with the wrong VR (issue 12 row 2: SOP Class UID as FD)
            vr = self.rng.choice(VRS)
        if len(value) % 2 and vr not in ("US",):
            value += b" " if vr in ("CS", "DS", "IS", "LO", "SH", "PN") else b"\0"
        new = raw_element(tag, vr, value, lay.little, lay.implicit)
        return self._replace_or_insert(lay, elems, tag, new)

    def _replace_or_insert(self, lay: _Layout, elems: list[_Elem], tag: int, new: bytes) -> bytes:
        body = lay.body
        for el in elems:
            if el.tag == tag:
                return _join(lay, body[:el.start] + new + body[el.end:])
        at = next((el.start for el in elems if el.tag > tag), len(body))
        return _join(lay, body[:at] + new + body[at:])

    def element_length(self, data: bytes) -> bytes | None:
        lay, _, el = self._pick(data, before_pixels=self.rng.random() < 0.7)
        if lay is None:
            return None
        e = "<" if lay.little else ">"
        short = not lay.implicit and el.vr not in _LONG_VRS
        at = el.start + (6 if short else (8 if lay.implicit else 8))
        old = struct.unpack_from(e + ("H" if short else "I"), lay.body, at)[0]
        top = 0xFFFF if short else 0xFFFFFFFF
        new = self.rng.choice((0, 1, old + 1, max(old - 1, 0), old * 2, old + 8, top, top - 1, len(lay.body), 3)) & top
        body = bytearray(lay.body)
        struct.pack_into(e + ("H" if short else "I"), body, at, new)
        return _join(lay, bytes(body))

    def element_vr(self, data: bytes) -> bytes | None:
        lay, _, el = self._pick(data)
        if lay is None or lay.implicit:
            return None
        code = self.rng.choice((*VRS, "ZZ", "AA", "\x00\x00", "xx", "UN", "SQ", "OB", "FD", "US"))
        body = bytearray(lay.body)
        body[el.start + 4:el.start + 6] = code.encode("latin-1")[:2].ljust(2, b" ")
        return _join(lay, bytes(body))

    def element_value(self, data: bytes) -> bytes | None:
        lay, _, el = self._pick(data)
        if lay is None or el.length in (0, 0xFFFFFFFF):
            return None
        body = bytearray(lay.body)
        for _ in range(self.rng.randint(1, 4)):
            i = el.value + self.rng.randrange(min(el.length, el.end - el.value) or 1)
            if i < len(body):
                body[i] = self.rng.choice((0, 0x5C, 0x20, 0xFF, 0x1B, self.rng.randrange(256)))
        return _join(lay, bytes(body))

    def insert_element(self, data: bytes) -> bytes | None:
        lay, elems, el = self._pick(data)
        if lay is None:
            return None
        group = self.rng.choice((0x0008, 0x0009, 0x0010, 0x0028, 0x0029, 0x7FDF, 0xFFFE, 0x0002, 0x0000))
        tag = (group << 16) | self.rng.choice((0x0000, 0x0010, 0x1010, 0x0016, 0x0100, 0xE000, 0xE00D, 0xE0DD))
        vr = self.rng.choice((*VRS, "ZZ", "\x01\x02", "  "))
        n = self.rng.choice((0, 1, 2, 3, 7, 8, 9, 64))
        value = bytes(self.rng.randrange(256) for _ in range(n))
        length = self.rng.choice((None, None, None, 0xFFFFFFFF, n + 1, n + 1000, 0x7FFFFFFF))
        new = raw_element(tag, vr, value, lay.little, lay.implicit, length)
        return _join(lay, lay.body[:el.start] + new + lay.body[el.start:])

    def drop_element(self, data: bytes) -> bytes | None:
        lay, _, el = self._pick(data, before_pixels=False)
        if lay is None:
            return None
        return _join(lay, lay.body[:el.start] + lay.body[el.end:])

    def duplicate_element(self, data: bytes) -> bytes | None:
        lay, elems, el = self._pick(data)
        if lay is None:
            return None
        other = self.rng.choice(elems)
        return _join(lay, lay.body[:other.start] + lay.body[el.start:el.end] + lay.body[other.start:])

    def deep_sequence(self, data: bytes) -> bytes | None:
        lay, elems, el = self._pick(data)
        if lay is None:
            return None
        depth = self.rng.choice((20, 40, 70, 200, 1000, 5000))
        return _join(lay, lay.body[:el.start] + nested_sequence(depth, lay.little, lay.implicit) + lay.body[el.start:])

    def many_items(self, data: bytes) -> bytes | None:
        lay, elems, el = self._pick(data)
        if lay is None:
            return None
        n = self.rng.choice((1000, 20_000, 60_000, 110_000))
        return _join(lay, lay.body[:el.start] + many_items(n, lay.little, lay.implicit) + lay.body[el.start:])

    def pixel_fragment(self, data: bytes) -> bytes | None:
        """Mutate inside encapsulated pixel data: codestream headers, fragment lengths, offset tables, JP2 boxes."""
        lay, elems = self._layout(data)
        if lay is None:
            return None
        pix = next((el for el in elems if el.tag == 0x7FE00010), None)
        if pix is None:
            return None
        body = lay.body
        if pix.length != 0xFFFFFFFF:  # native: claim more or fewer bytes than there are
            e = "<" if lay.little else ">"
            cut = self.rng.choice((0, 1, pix.length // 2, max(pix.length - 1, 0)))
            head = raw_element(0x7FE00010, None if lay.implicit else "OW", b"", lay.little, lay.implicit, cut)
            return _join(lay, body[:pix.start] + head + body[pix.value:pix.value + cut] + body[pix.end:])
        e = "<" if lay.little else ">"
        frags, pos = [], pix.value
        while pos + 8 <= len(body) and len(frags) < 64:
            tag = struct.unpack_from(e + "I", body, pos)[0]
            tag = ((tag & 0xFFFF) << 16 | tag >> 16) if lay.little else tag
            length = struct.unpack_from(e + "I", body, pos + 4)[0]
            if tag != _ITEM:
                break
            frags.append((pos, length))
            pos += 8 + length
        if not frags:
            return None
        buf = bytearray(body)
        idx = self.rng.randrange(len(frags))
        fpos, flen = frags[idx]
        op = self.rng.randrange(7)
        if op == 0 and flen:  # codestream header bytes: markers, sizes, component counts
            for _ in range(self.rng.randint(1, 6)):
                i = fpos + 8 + self.rng.randrange(min(flen, 96))
                buf[i] = self.rng.choice((0, 0xFF, 0x01, 0x7F, self.rng.randrange(256)))
        elif op == 1:  # the fragment's length field lies
            struct.pack_into(e + "I", buf, fpos + 4, self.rng.choice((0, 1, flen + 1, flen * 4, 0xFFFFFFFF, 7)))
        elif op == 2 and flen and lay.little:  # a JP2 wrapper whose box length is 0 (issue 12 row 6), or below 8
            box = b"\x00\x00\x00\x0cjP  \r\n\x87\n" + struct.pack(">I", self.rng.choice((0, 1, 4, 7))) + b"ftyp"
            new = box + bytes(buf[fpos + 8:fpos + 8 + flen])
            new += b"\0" * (len(new) % 2)
            buf[fpos:fpos + 8 + flen] = struct.pack("<HHI", 0xFFFE, 0xE000, len(new)) + new
        elif op == 3 and idx == 0:  # the Basic Offset Table points anywhere
            table = b"".join(struct.pack(e + "I", self.rng.choice((0, 1, 0xFFFFFFF0, 12345))) for _ in range(4))
            item = struct.pack(e + "HH", 0xFFFE, 0xE000) if lay.little else struct.pack(">HH", 0xFFFE, 0xE000)
            buf[fpos:fpos + 8 + flen] = item + struct.pack(e + "I", len(table)) + table
        elif op == 4 and flen > 16:  # a codestream cut short
            cut = self.rng.randrange(2, flen)
            del buf[fpos + 8 + cut:fpos + 8 + flen]
            struct.pack_into(e + "I", buf, fpos + 4, cut + (cut % 2))
            if cut % 2:
                buf[fpos + 8 + cut:fpos + 8 + cut] = b"\0"
        elif op == 5 and flen > 16:  # the codestream's own header claims a size the DICOM header does not
            self._claim_size(buf, fpos + 8, flen)
        else:  # thousands of empty fragments
            empty = struct.pack(e + "HHI", 0xFFFE, 0xE000, 0) if lay.little else b""
            buf[fpos:fpos] = empty * self.rng.choice((100, 5000))
        return _join(lay, bytes(buf))

    def _claim_size(self, buf: bytearray, start: int, length: int) -> None:
        """Rewrite the size in a JPEG / JPEG-LS SOF, a J2K SIZ or a JPEG XL SizeHeader, in place."""
        head = bytes(buf[start:start + min(length, 400)])
        big = self.rng.choice((0, 1, 8000, 30000, 65535))
        for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc3", b"\xff\xf7"):
            i = head.find(marker)
            if i >= 0 and i + 9 <= len(head):
                struct.pack_into(">HH", buf, start + i + 5, big, self.rng.choice((big, 64, 8000)))
                return
        if head[:4] == b"\xff\x4f\xff\x51":
            struct.pack_into(">II", buf, start + 8, self.rng.choice((2**16, 60000, 2**31)), big or 2**20)
        elif head[:2] == b"\xff\x0a" and length > 12:  # small=0, rows and columns as U32 selector 3 (30 bits)
            rows, cols = self.rng.choice(((60000, 60000), (2**30, 8), (8, 2**30)))
            bits = 0 | (3 << 1) | ((rows - 1) << 3) | (0 << 33) | (3 << 36) | ((cols - 1) << 38)
            keep = int.from_bytes(head[2:11], "little") >> 68
            buf[start + 2:start + 11] = (bits | keep << 68).to_bytes(9, "little")

    def transfer_syntax(self, data: bytes) -> bytes | None:
        """The meta claims another transfer syntax than the body is in."""
        lay, _ = self._layout(data)
        if lay is None:
            return None
        return self._meta_with(lay, self.rng.choice(SYNTAXES)) + data[len(lay.prefix):]

    def deflate(self, data: bytes) -> bytes | None:
        """Deflate-specific: a valid re-deflate of an explicit LE body, a cut or flipped stream, or a bomb."""
        lay, _ = self._layout(data)
        if lay is None:
            return None
        op = self.rng.randrange(4)
        if op == 0 and lay.syntax == "1.2.840.10008.1.2.1":
            deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
            return self._meta_with(lay, DEFLATED) + deflater.compress(lay.body) + deflater.flush()
        if lay.deflated and op == 1:
            return data[: len(lay.prefix) + self.rng.randrange(max(len(data) - len(lay.prefix), 1))]
        if lay.deflated and op == 2:
            return lay.prefix + self.flip_bytes(data[len(lay.prefix):])
        if op == 3:
            if self._bomb is None:  # 64 MiB of zeros in one private OB: a 64 KB file
                deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
                size = 64 * 2**20
                parts = [deflater.compress(raw_element(0x00091000, "OB", b"", length=size))]
                zeros = b"\0" * (1 << 20)
                parts += [deflater.compress(zeros) for _ in range(size >> 20)]
                self._bomb = b"".join(parts) + deflater.flush()
            # The real header's first elements, flushed to a byte boundary, then the bomb's own stream: one stream.
            plain = lay.body if not lay.implicit and lay.little else b""
            deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
            head = deflater.compress(plain[:256]) + deflater.flush(zlib.Z_FULL_FLUSH)
            return self._meta_with(lay, DEFLATED) + head + self._bomb
        return None

    def _meta_with(self, lay: _Layout, syntax: str) -> bytes:
        from pydicom.filereader import _read_file_meta_info, read_preamble
        from pydicom.filewriter import write_file_meta_info
        from pydicom.filebase import DicomBytesIO

        fh = io.BytesIO(lay.prefix)
        preamble = read_preamble(fh, False)
        meta = _read_file_meta_info(fh)
        meta.TransferSyntaxUID = syntax
        out = DicomBytesIO()
        out.is_little_endian, out.is_implicit_VR = True, False
        write_file_meta_info(out, meta, enforce_standard=False)
        return (preamble or b"\0" * 128) + b"DICM" + out.getvalue()
