"""A bounded, streaming inflate of Deflated Explicit VR data sets, before pydicom inflates them whole."""
from __future__ import annotations

import logging
import zlib
from typing import BinaryIO

from sync.core.errors import BadInputError
from sync.wire.limits import MAX_DECODED_BYTES

log = logging.getLogger(__name__)

DEFLATED = "1.2.840.10008.1.2.1.99"
# What a deflated data set may inflate to: the pixel budget of one instance plus room for its other elements.
MAX_INFLATED_BYTES = MAX_DECODED_BYTES + 64 * 2**20
_STEP = 1 << 20


class InflatingReader:
    """The inflated data set as a forward-only stream, inflated in 1 MiB steps and never held whole.

    A 600 KB file that inflates to gigabytes is refused with memory to spare (pydicom inflates in one call, on
    every read). `pos` counts inflated bytes, the offsets a deflated file's elements are at.
    """

    def __init__(self, fh: BinaryIO, limit: int = MAX_INFLATED_BYTES):
        self._fh, self._limit = fh, limit
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buf, self._off = b"", 0
        self._done = False
        self.pos = 0
        self.produced = 0

    def _more(self) -> bool:
        """One more step inflated into the buffer; False at the end of the stream."""
        if self._done:
            return False
        try:
            if self._z.unconsumed_tail:
                data = self._z.decompress(self._z.unconsumed_tail, _STEP)
            else:
                chunk = self._fh.read(_STEP)
                if not chunk:
                    data = self._z.flush()
                    self._done = True
                    if not self._z.eof:
                        raise BadInputError("truncated DICOM: the deflated data set ends early")
                else:
                    data = self._z.decompress(chunk, _STEP)
        except zlib.error as err:
            raise BadInputError(f"corrupt deflated data set ({type(err).__name__})") from err
        if self._z.eof:
            self._done = True  # bytes after the end of the stream are not part of the data set (pydicom agrees)
        self.produced += len(data)
        if self.produced > self._limit:
            raise BadInputError(f"deflated data set inflates past {self._limit / 2**20:.0f} MiB: refused as a "
                                "decompression bomb")
        self._buf = self._buf[self._off:] + data
        self._off = 0
        return True

    def _fill(self, n: int) -> None:
        while len(self._buf) - self._off < n and self._more():
            pass

    def read(self, n: int) -> bytes:
        self._fill(n)
        out = self._buf[self._off:self._off + n]
        self._off += len(out)
        self.pos += len(out)
        return out

    def peek(self, n: int) -> bytes:
        self._fill(n)
        return self._buf[self._off:self._off + n]

    def skip(self, n: int) -> int:
        """Bytes skipped: fewer than `n` only at the end of the stream."""
        done = 0
        while done < n:
            if self._off >= len(self._buf) and not self._more():
                break
            step = min(n - done, len(self._buf) - self._off)
            self._off += step
            done += step
        self.pos += done
        return done

    def find(self, pattern: bytes) -> bool:
        """Skip past the next occurrence of `pattern`; False (at the end of the stream) when there is none."""
        while True:
            i = self._buf.find(pattern, self._off)
            if i >= 0:
                self.pos += i + len(pattern) - self._off
                self._off = i + len(pattern)
                return True
            keep = max(len(self._buf) - len(pattern) + 1, self._off)
            self.pos += keep - self._off
            self._off = keep
            if not self._more():
                self.pos += len(self._buf) - self._off
                self._off = len(self._buf)
                return False

    seekable = False
