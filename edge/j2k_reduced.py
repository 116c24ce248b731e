"""Reduced-resolution JPEG 2000 / HTJ2K decoding through OpenJPEG's C API (ctypes), for large images a small model needs."""
from __future__ import annotations

import ctypes
import functools
import logging

import numpy as np

log = logging.getLogger(__name__)

# Reduced-resolution JPEG 2000 decoding
#
# pylibjpeg-openjpeg (2.6) exposes no reduce option, but its extension module links OpenJPEG statically and exports
# the C API, so the decoder pydicom already uses can be driven through ctypes with opj_set_decoded_resolution_factor.
# Skipping the finest wavelet levels skips most of the entropy decoding: on RG1_J2KR (1955x1841, 15-bit) a reduce=2
# decode took ~42 ms against ~620 ms for the full image (OpenJPEG alone, shared 2-core dev box); HTJ2K
# (lossless, 5 levels) ~9 ms against ~130 ms.


class _OpjImageComp(ctypes.Structure):
    # opj_image_comp_t of OpenJPEG 2.5 (openjpeg.h); `bpp` is deprecated but still occupies its slot.
    _fields_ = [
        *((name, ctypes.c_uint32) for name in ("dx", "dy", "w", "h", "x0", "y0", "prec", "bpp", "sgnd")),
        ("resno_decoded", ctypes.c_uint32),
        ("factor", ctypes.c_uint32),
        ("data", ctypes.POINTER(ctypes.c_int32)),
        ("alpha", ctypes.c_uint16),
    ]


class _OpjImage(ctypes.Structure):
    # opj_image_t of OpenJPEG 2.5.
    _fields_ = [
        *((name, ctypes.c_uint32) for name in ("x0", "y0", "x1", "y1", "numcomps")),
        ("color_space", ctypes.c_int),
        ("comps", ctypes.POINTER(_OpjImageComp)),
        ("icc_profile_buf", ctypes.c_void_p),
        ("icc_profile_len", ctypes.c_uint32),
    ]


_READ_FN = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_SKIP_FN = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)
_SEEK_FN = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p)
_MSG_FN = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_void_p)
_OPJ_CODEC_J2K = 0
_OPJ_STREAM_CHUNK = 1 << 20
# opj_dparameters_t is ~8.3 KB in OpenJPEG 2.5; a larger zeroed block keeps us independent of its exact layout.
_OPJ_DPARAMS_BYTES = 64 * 1024


@functools.cache
def _openjpeg_lib() -> ctypes.CDLL | None:
    """The OpenJPEG C API inside pylibjpeg-openjpeg's extension, loaded once; None where it cannot be used."""
    try:
        import _openjpeg  # pylibjpeg-openjpeg installs its extension as a top-level module

        lib = ctypes.CDLL(_openjpeg.__file__)
        vp, c_int = ctypes.c_void_p, ctypes.c_int
        signatures = {
            "opj_stream_create": ([ctypes.c_size_t, c_int], vp),
            "opj_stream_set_read_function": ([vp, _READ_FN], None),
            "opj_stream_set_skip_function": ([vp, _SKIP_FN], None),
            "opj_stream_set_seek_function": ([vp, _SEEK_FN], None),
            "opj_stream_set_user_data": ([vp, vp, vp], None),
            "opj_stream_set_user_data_length": ([vp, ctypes.c_uint64], None),
            "opj_stream_destroy": ([vp], None),
            "opj_create_decompress": ([c_int], vp),
            "opj_destroy_codec": ([vp], None),
            "opj_set_error_handler": ([vp, _MSG_FN, vp], c_int),
            "opj_set_default_decoder_parameters": ([vp], None),
            "opj_setup_decoder": ([vp, vp], c_int),
            "opj_read_header": ([vp, vp, ctypes.POINTER(ctypes.POINTER(_OpjImage))], c_int),
            "opj_set_decoded_resolution_factor": ([vp, ctypes.c_uint32], c_int),
            "opj_decode": ([vp, vp, ctypes.POINTER(_OpjImage)], c_int),
            "opj_end_decompress": ([vp, vp], c_int),
            "opj_image_destroy": ([ctypes.POINTER(_OpjImage)], None),
        }
        for name, (argtypes, restype) in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, restype
        return lib
    except (ImportError, OSError, AttributeError) as err:
        log.info("reduced-resolution JPEG 2000 decoding unavailable (%s); decoding at full size", err)
        return None


def decomposition_levels(codestream: bytes) -> int | None:
    """Smallest number of wavelet levels in the main header (COD and any COC), or None if not a raw codestream."""
    if codestream[:4] != b"\xff\x4f\xff\x51":
        return None
    pos, levels, n_comps = 2, None, 1
    while pos + 4 <= len(codestream):
        marker = int.from_bytes(codestream[pos : pos + 2], "big")
        length = int.from_bytes(codestream[pos + 2 : pos + 4], "big")
        body = codestream[pos + 4 : pos + 2 + length]
        if marker == 0xFF51 and len(body) >= 36:
            n_comps = int.from_bytes(body[34:36], "big")
        elif marker == 0xFF52 and len(body) >= 6:
            levels = body[5] if levels is None else min(levels, body[5])
        elif marker == 0xFF53:
            offset = 2 if n_comps >= 257 else 1
            if len(body) > offset + 1:
                level = body[offset + 1]
                levels = level if levels is None else min(levels, level)
        elif marker == 0xFF90 or length < 2:
            break
        pos += 2 + length
    return levels


def decode_reduced(codestream: bytes, factor: int) -> list[np.ndarray]:
    """Decode a raw JPEG 2000 / HTJ2K codestream at 1/2**factor of its size; one int32 array per component."""
    lib = _openjpeg_lib()
    if lib is None:
        raise RuntimeError("OpenJPEG C API not available")
    src = (ctypes.c_char * len(codestream)).from_buffer_copy(codestream)
    base, size, pos = ctypes.addressof(src), len(codestream), [0]
    errors: list[str] = []

    def _read(buf, n, _user):
        if pos[0] >= size:
            return ctypes.c_size_t(-1).value
        k = min(n, size - pos[0])
        ctypes.memmove(buf, base + pos[0], k)
        pos[0] += k
        return k

    def _skip(n, _user):
        new = min(max(pos[0] + n, 0), size)
        skipped, pos[0] = new - pos[0], new
        return skipped

    def _seek(n, _user):
        if not 0 <= n <= size:
            return 0
        pos[0] = n
        return 1

    # The CFUNCTYPE objects must outlive every C call that may invoke them, hence the locals.
    read_cb, skip_cb, seek_cb = _READ_FN(_read), _SKIP_FN(_skip), _SEEK_FN(_seek)
    error_cb = _MSG_FN(lambda msg, _user: errors.append(msg.decode(errors="replace").strip()))
    stream = lib.opj_stream_create(_OPJ_STREAM_CHUNK, 1)
    codec = lib.opj_create_decompress(_OPJ_CODEC_J2K)
    image = ctypes.POINTER(_OpjImage)()
    try:
        lib.opj_stream_set_read_function(stream, read_cb)
        lib.opj_stream_set_skip_function(stream, skip_cb)
        lib.opj_stream_set_seek_function(stream, seek_cb)
        lib.opj_stream_set_user_data(stream, None, None)
        lib.opj_stream_set_user_data_length(stream, size)
        lib.opj_set_error_handler(codec, error_cb, None)
        params = ctypes.create_string_buffer(_OPJ_DPARAMS_BYTES)
        lib.opj_set_default_decoder_parameters(params)
        ok = (
            lib.opj_setup_decoder(codec, params)
            and lib.opj_read_header(stream, codec, ctypes.byref(image))
            and lib.opj_set_decoded_resolution_factor(codec, factor)
            and lib.opj_decode(codec, stream, image)
            and lib.opj_end_decompress(codec, stream)
        )
        if not ok:
            raise RuntimeError("; ".join(errors) or "OpenJPEG refused the codestream")
        img = image.contents
        planes = []
        for i in range(img.numcomps):
            comp = img.comps[i]
            if comp.factor != factor or not comp.data:
                raise RuntimeError("OpenJPEG did not decode at the requested resolution")
            plane = np.ctypeslib.as_array(comp.data, shape=(comp.h, comp.w)).copy()
            planes.append((plane, comp.prec, bool(comp.sgnd)))
        return planes
    finally:
        if image:
            lib.opj_image_destroy(image)
        lib.opj_destroy_codec(codec)
        lib.opj_stream_destroy(stream)


