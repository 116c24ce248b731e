"""The one path every door (DICOM SCP, watch folder, `wasla ingest`) takes from bytes on disk to a committed row."""
from __future__ import annotations

import errno
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from edge.config import StorageConfig
from sync.core.errors import BadInputError, NoPixelDataError, NotFoundError, OutOfResourcesError
from sync.wire import dicom_scan
from sync.wire.limits import check_header, is_non_image
from edge.store import InstanceMeta, Store

log = logging.getLogger(__name__)

STORED, DUPLICATE, QUARANTINED = "stored", "duplicate", "quarantined"

_PREAMBLE_BYTES = 128
_MAGIC = b"DICM"
_COPY_CHUNK = 1 << 20
# A raw data set (no preamble) nearly always starts with group 0002 (meta) or 0008 (identifying) little endian.
_RAW_DATASET_GROUPS = (b"\x02\x00", b"\x08\x00")
_DEFAULT_LIMITS = StorageConfig()


@dataclass(frozen=True)
class IngestOutcome:
    """What happened to one input; plain values only so the CLI can print it as JSON."""

    status: str
    """"stored", "duplicate" or "quarantined"."""
    instance_id: int
    """Row id in `instances` (for a duplicate: the row already holding that SOP Instance UID)."""
    reason: str | None = None
    """Quarantine reason, for a person to read."""
    sop_instance_uid: str | None = None
    error: str | None = None
    """Name of the BadInputError subclass behind a quarantine (the SCP maps it to a DICOM status)."""


def limits_from_config(cfg) -> dict[str, int]:
    """The keyword arguments `ingest_file` / `ingest_paths` need, from the config (MB = 10^6 bytes, as the store)."""
    return {"max_pixels": cfg.storage.max_pixels, "max_file_bytes": cfg.storage.max_file_mb * 1_000_000}


# PS3.5 9.1: components of digits, no leading zero but "0" itself, dot-separated, at most 64 characters.
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_MAX_INT = 2 ** 31 - 1  # anything a header can claim beyond this is no real image size, and SQLite stops at 2**63


def valid_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and _UID_RE.fullmatch(value) is not None


def _uid(ds, keyword: str) -> str:
    """A UID element as text ('' when absent); BadInputError when present but not a DICOM UID. Such values would
    otherwise reach SQLite, file names and protocol ids (a space or NUL in a Study UID stopped every upload)."""
    value = _text(ds, keyword).rstrip("\x00 ")
    if value and not valid_uid(value):
        raise BadInputError(f"{keyword} is not a valid DICOM UID ({len(value)} characters)")
    return value


def meta_from_dataset(ds) -> InstanceMeta:
    """Header facts for the store row; raises BadInputError when the UIDs that identify the instance are missing
    or malformed, or when any header element cannot be read (unknown VR, odd length...)."""
    try:
        return _meta(ds)
    except BadInputError:
        raise
    except Exception as err:  # noqa: BLE001 - pydicom raises anything from KeyError to OverflowError on bad headers
        # Only the type: a library's message may quote an element value, and quarantine reasons are logged.
        raise BadInputError(f"header cannot be read ({type(err).__name__})") from err


def _meta(ds) -> InstanceMeta:
    sop = _uid(ds, "SOPInstanceUID")
    study = _uid(ds, "StudyInstanceUID")
    if not sop:
        raise BadInputError("dataset has no SOP Instance UID")
    if not study:
        raise BadInputError("dataset has no Study Instance UID")
    file_meta = getattr(ds, "file_meta", None)
    ts = file_meta.get("TransferSyntaxUID", "") if file_meta is not None else ""
    return InstanceMeta(
        sop_instance_uid=sop,
        study_uid=study,
        series_uid=_uid(ds, "SeriesInstanceUID"),
        sop_class_uid=_text(ds, "SOPClassUID") or (_text(file_meta, "MediaStorageSOPClassUID") if file_meta else ""),
        modality=_text(ds, "Modality"),
        body_part=_text(ds, "BodyPartExamined"),
        view_position=_text(ds, "ViewPosition"),
        transfer_syntax=str(ts or ""),
        rows=_int(ds, "Rows", 0),
        columns=_int(ds, "Columns", 0),
        frames=max(_int(ds, "NumberOfFrames", 1), 1),
    )


def _text(ds, keyword: str, limit: int = 256) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)[:limit]
    return str(value).strip()[:limit]


def _int(ds, keyword: str, default: int) -> int:
    """An integer attribute within 0..2**31-1; `default` when absent, malformed or absurd."""
    try:
        value = ds.get(keyword, default)
        number = int(value) if value not in (None, "") else default
    except (TypeError, ValueError, OverflowError):
        return default
    return number if 0 <= number <= _MAX_INT else default


# --- reading and judging one written file ----------------------------------------------------------------------

def _check_part10(path: Path, size: int) -> None:
    # Strict on purpose: without the 'DICM' marker pydicom can only guess (force=True), and a guess turns any file
    # into a "dataset" of garbage elements. Every spool file must open without force for the decoder and the
    # re-encoder downstream, so a bare data set is refused with a reason that tells the technician what to do.
    if size == 0:
        raise BadInputError("empty file (0 bytes)")
    with open(path, "rb") as fh:
        head = fh.read(_PREAMBLE_BYTES + len(_MAGIC))
    if head[_PREAMBLE_BYTES:] == _MAGIC:
        return
    if head[:2] in _RAW_DATASET_GROUPS and len(head) >= 8:
        raise BadInputError("DICOM data set without the Part 10 file header ('DICM' preamble); re-export it as a "
                            "DICOM file")
    if size < _PREAMBLE_BYTES + len(_MAGIC):
        raise BadInputError(f"not a DICOM file (only {size} bytes, shorter than the DICOM preamble)")
    raise BadInputError("not a DICOM file (no 'DICM' marker at byte 128)")


def _judge(path: Path, max_pixels: int, max_file_bytes: int, *,
           strict: bool = False) -> tuple[InstanceMeta | None, BadInputError | None]:
    """Meta of a written file and, when it must be quarantined, why. Meta is kept when known so the study sees it.

    `strict` (the fuzzer's) lets an unexpected exception escape instead of quarantining it under a catch-all reason.
    """
    meta = None
    try:
        size = path.stat().st_size
        _check_part10(path, size)
        if size > max_file_bytes:
            raise BadInputError(f"file too large: {size / 1e6:.0f} MB exceeds the limit of {max_file_bytes / 1e6:.0f} MB")
        # One bounded walk of the structure, before pydicom parses anything: it inflates deflate once with a cap,
        # refuses absurd nesting and item counts, finds truncation, and keeps the small top-level values, so no
        # sequence is ever parsed here (a 100k-item private sequence took 31 s through pydicom).
        scan = dicom_scan.scan_file(path)
        header = scan.header
        try:
            meta = meta_from_dataset(header)  # early, so even a cut file's quarantine row names its study
        except BadInputError as err:
            missing_uid = err
        else:
            missing_uid = None
        if scan.error is not None:  # structure before content: a cut file is reported as cut, not by what it lost
            raise scan.error
        if missing_uid is not None:
            raise missing_uid
        if is_non_image(header.get("SOPClassUID")):
            return meta, None  # a dose report or key object: kept with its study, never triaged
        try:
            check_header(header, max_pixels)
        except NoPixelDataError:
            # Expected: the scan's header never holds pixel data; its presence is the scan's `has_pixels`.
            if "Rows" not in header and "Columns" not in header:
                raise
        if not scan.has_pixels:
            raise NoPixelDataError("dataset has no Pixel Data element")
    except BadInputError as err:
        return meta, err
    except Exception as err:  # noqa: BLE001 - one file must never stop a scan, an association or `wasla ingest`
        if strict:
            raise
        # No file name or message in the log: either may carry what the modality put in the header.
        log.error("checking a received file failed unexpectedly (%s)", type(err).__name__)
        return meta, BadInputError(dicom_scan.reason(err, "file"))
    return meta, None


def ingest_tmp(store: Store, tmp_path: Path, *, source: str, max_pixels: int, max_file_bytes: int,
               calling_ae: str | None = None, original_name: str | None = None,
               started: float | None = None) -> IngestOutcome:
    """Judge a file already written (and fsynced) to a store temp path, then store or quarantine it.

    The row is committed when this returns. Bad input never raises; store failures (disk, SQLite) do.
    """
    meta, bad = _judge(tmp_path, max_pixels, max_file_bytes)
    if bad is not None:
        reason = str(bad) or type(bad).__name__
        iid = store.add_quarantined(tmp_path, reason, source=source, original_name=original_name, meta=meta,
                                    calling_ae=calling_ae)
        return IngestOutcome(QUARANTINED, iid, reason, meta.sop_instance_uid if meta else None, type(bad).__name__)
    try:
        added = store.add_instance(tmp_path, meta, source=source, calling_ae=calling_ae, started=started)
    finally:
        tmp_path.unlink(missing_ok=True)  # only left behind when add_instance failed before its rename
    if added.duplicate:
        return IngestOutcome(DUPLICATE, added.id, None, meta.sop_instance_uid)
    log.info("stored instance %s as #%s from %s", meta.sop_instance_uid, added.id, source)
    return IngestOutcome(STORED, added.id, None, meta.sop_instance_uid)


def write_fsynced(dest: Path, chunks: Iterable[bytes]) -> int:
    """Write `chunks` to `dest` and fsync it: a file we acknowledge must survive a power cut."""
    n = 0
    with open(dest, "wb") as out:
        for chunk in chunks:
            out.write(chunk)
            n += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return n


def _copy_chunks(src) -> Iterable[bytes]:
    return iter(lambda: src.read(_COPY_CHUNK), b"")


def ingest_file(store: Store, path: Path | str, *, source: str, max_pixels: int, max_file_bytes: int,
                calling_ae: str | None = None, follow_symlinks: bool = True) -> IngestOutcome:
    """Copy one file into the store's temp area, judge the copy, then store or quarantine it.

    The original is only read, never moved: the caller (watch folder) deletes it once this has returned.
    Raises NotFoundError when `path` vanished, OutOfResourcesError when the disk is too full; never for bad input.
    `follow_symlinks=False` (the watch folder): a file swapped for a symlink after it was listed is refused, not read.
    """
    started = time.perf_counter()
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError as err:
        raise NotFoundError(f"{path} does not exist") from err
    store.check_space(size)
    tmp = store.new_tmp_path()
    try:
        # O_NONBLOCK: a FIFO swapped in after the listing must not block the reading thread (refused just below).
        flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW)
        with os.fdopen(os.open(path, flags), "rb") as src:
            if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
                raise OSError(errno.EINVAL, "not a regular file", str(path))
            write_fsynced(tmp, _copy_chunks(src))
    except FileNotFoundError as err:
        tmp.unlink(missing_ok=True)
        raise NotFoundError(f"{path} disappeared while being read") from err
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:  # the reserve check raced another writer
            raise OutOfResourcesError(f"disk full while copying {path.name}") from err
        if err.filename == str(path):
            reason = f"cannot read file: {err.strerror or err}"
            iid = store.add_quarantined(None, reason, source=source, original_name=path.name, calling_ae=calling_ae)
            return IngestOutcome(QUARANTINED, iid, reason, None, "BadInputError")
        raise
    return ingest_tmp(store, tmp, source=source, max_pixels=max_pixels, max_file_bytes=max_file_bytes,
                      calling_ae=calling_ae, original_name=path.name, started=started)


def _hidden(name: str) -> bool:
    return name.startswith(".")


def expand_paths(paths: Iterable[Path | str]) -> list[Path]:
    """Files and folders (recursive, sorted) to the files to ingest; dotfiles and dot-folders are skipped."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not _hidden(d))
                files.extend(Path(root) / n for n in sorted(names) if not _hidden(n))
        elif p.exists():
            files.append(p)
        else:
            raise NotFoundError(f"{p} does not exist")
    return files


def ingest_paths(store: Store, paths: Iterable[Path | str], *, source: str = "cli", max_pixels: int,
                 max_file_bytes: int, progress: Callable[[int, int], None] | None = None) -> list[IngestOutcome]:
    """Ingest files and folders; `progress(done, total)` after each file. A full disk stops the batch (raised)."""
    files = expand_paths(paths)
    outcomes = []
    for i, f in enumerate(files, 1):
        outcomes.append(ingest_file(store, f, source=source, max_pixels=max_pixels, max_file_bytes=max_file_bytes))
        if progress is not None:
            progress(i, len(files))
    return outcomes


def adopt_orphans(store: Store, *, max_pixels: int = _DEFAULT_LIMITS.max_pixels,
                  max_file_bytes: int = _DEFAULT_LIMITS.max_file_mb * 1_000_000) -> int:
    """At start: register spool files whose row never committed (crash between rename and commit); drop *.part.

    A *.part was never acknowledged to anyone, so its sender still has it and will resend. Returns how many spool
    files were re-registered (stored or quarantined); duplicates of a committed row are removed.
    """
    removed = 0
    for part in store.tmp_dir.glob("*.part"):
        part.unlink(missing_ok=True)
        removed += 1
    if removed:
        log.info("removed %d unacknowledged partial file(s) from %s", removed, store.tmp_dir)
    known = store.known_paths()
    adopted = 0
    for spool_file in list(store.iter_spool_files()):
        if str(spool_file.relative_to(store.spool_dir)) in known:
            continue
        # Back to a temp name so the one ingest path applies: add_instance renames it to the same content address.
        tmp = store.new_tmp_path()
        os.replace(spool_file, tmp)
        outcome = ingest_tmp(store, tmp, source="recovered", max_pixels=max_pixels, max_file_bytes=max_file_bytes,
                             original_name=spool_file.name)
        if outcome.status != DUPLICATE:
            adopted += 1
        log.info("orphan spool file %s: %s as #%s", spool_file.name, outcome.status, outcome.instance_id)
    return adopted
