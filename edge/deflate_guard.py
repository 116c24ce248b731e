"""A bounded, streaming inflate of Deflated Explicit VR data sets, before pydicom inflates them whole."""
from __future__ import annotations

import logging
import zlib
from typing import BinaryIO

from edge.errors import BadInputError
from edge.imaging import MAX_DECODED_BYTES

log = logging.getLogger(__name__)

DEFLATED = "1.2.840.10008.1.2.1.99"
# What a deflated data set may inflate to: the pixel budget of one instance plus room for its other elements.
MAX_INFLATED_BYTES = MAX_DECODED_BYTES + 64 * 2**20
_STEP = 1 << 20


def inflated_size(fh: BinaryIO, limit: int = MAX_INFLATED_BYTES) -> int | None:
    """Bytes the data set of the Part 10 file in `fh` inflates to; None when it is not deflated (or has no readable
    file meta, which the caller's own read then reports).

    Inflated in 1 MiB steps and thrown away: a 600 KB file that inflates to gigabytes is refused with memory to
    spare (pydicom would inflate it in one call, on every read). Element offsets of such a file count in the
    inflated stream, so the result is also what truncation checks compare against.
    """
    from pydicom.filereader import _read_file_meta_info, read_preamble

    try:
        read_preamble(fh, False)
        meta = _read_file_meta_info(fh)
    except Exception as err:  # noqa: BLE001 - untrusted header: judged again, with a reason, by the real read
        log.debug("file meta unreadable (%s: %s); no deflate check", type(err).__name__, err)
        return None
    if str(meta.get("TransferSyntaxUID", "")) != DEFLATED:
        return None
    inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    try:
        while chunk := fh.read(_STEP):
            data = inflater.decompress(chunk, _STEP)
            while True:
                total += len(data)
                if total > limit:
                    raise BadInputError(f"deflated data set inflates past {limit / 2**20:.0f} MiB: refused as a "
                                        "decompression bomb")
                if not inflater.unconsumed_tail:
                    break
                data = inflater.decompress(inflater.unconsumed_tail, _STEP)
        total += len(inflater.flush())
    except zlib.error as err:
        raise BadInputError(f"corrupt deflated data set: {err}") from err
    return total
