"""C-STORE SCU: sends a study's results (and on request its images) from the box to a modality or PACS."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS, code_to_category
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from sync.core.errors import WaslaError

log = logging.getLogger(__name__)

# A PACS accepts at most 128 presentation contexts per association (PS3.8 9.3.2.2: odd ids 1-255).
MAX_CONTEXTS = 128
_NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# Warnings (coercion of elements, elements discarded) mean the peer stored the instance (PS3.4 B.2.3).
_STORED = ("Success", "Warning")


class SendError(WaslaError):
    """Sending by DICOM to another application entity failed."""

    exit_code = 8


class DestinationError(SendError):
    """The destination is not AE@host:port."""


class AssociationError(SendError):
    """No association with the peer: unreachable, refused, rejected or aborted."""


class StoreRefusedError(SendError):
    """The peer answered a C-STORE with a failure status (the instance is not stored there)."""


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Sent:
    """One C-STORE: what was sent and what the peer answered (`status_name` is the standard's wording)."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    status: int | None
    category: str
    status_name: str

    @property
    def stored(self) -> bool:
        return self.category in _STORED


_DEST = re.compile(r"(?P<ae>[^@]{1,16})@(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]+)):(?P<port>\d{1,5})")


def parse_destination(text: str) -> Destination:
    """'PACS@10.0.0.5:104' (an IPv6 host in brackets: 'PACS@[fd00::5]:104')."""
    m = _DEST.fullmatch(text.strip())
    if not m:
        raise DestinationError(f"{text!r} is not AE@host:port (e.g. PACS@10.0.0.5:104)")
    ae = m["ae"].strip()
    if not ae or not ae.isascii() or "\\" in ae:
        raise DestinationError(f"{text!r}: the AE title must be 1-16 ASCII characters")
    port = int(m["port"])
    if not 0 < port <= 65535:
        raise DestinationError(f"{text!r}: {port} is not a TCP port")
    return Destination(ae, m["v6"] or m["host"], port)


def status_name(code: int) -> str:
    """The standard's name for a C-STORE status (PS3.4 B.2.3, PS3.7 C), e.g. "Refused: Out of Resources"."""
    category, text = STORAGE_SERVICE_CLASS_STATUS.get(code) or GENERAL_STATUS.get(code) or (
        code_to_category(code), f"status 0x{code:04X}")
    return text or category


def _contexts(headers: list[tuple[Path, str, str]]) -> list[tuple[str, list[str]]]:
    """One presentation context per SOP class and encoding: native files offer both little-endian syntaxes, a
    compressed file offers its own (we never transcode: what the peer gets is what the box holds)."""
    wanted: dict[tuple[str, tuple[str, ...]], None] = {}
    for _path, sop_class, syntax in headers:
        syntaxes = tuple(_NATIVE) if UID(syntax) in _NATIVE or not syntax else (syntax,)
        wanted[(sop_class, syntaxes)] = None
    if len(wanted) > MAX_CONTEXTS:
        raise SendError(f"{len(wanted)} SOP class/encoding pairs exceed the {MAX_CONTEXTS} one association can offer")
    return [(cls, list(syn)) for cls, syn in wanted]


def send_files(paths: list[Path], dest: Destination, *, calling_ae: str = "WASLA", connection_timeout: float = 10.0,
               acse_timeout: float = 30.0, dimse_timeout: float = 60.0, network_timeout: float = 60.0) -> list[Sent]:
    """C-STORE every file over one association; StoreRefusedError (after trying them all) if any is not stored."""
    headers = []
    for p in paths:
        meta = pydicom.dcmread(p, stop_before_pixels=True)
        headers.append((Path(p), str(meta.SOPClassUID), str(meta.file_meta.TransferSyntaxUID)))
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = connection_timeout
    ae.acse_timeout = acse_timeout
    ae.dimse_timeout = dimse_timeout
    ae.network_timeout = network_timeout
    for sop_class, syntaxes in _contexts(headers):
        ae.add_requested_context(sop_class, syntaxes)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not reachable or timed out"
        raise AssociationError(f"no association with {dest}: {why}")
    sent: list[Sent] = []
    try:
        for path, sop_class, _syntax in headers:
            ds = pydicom.dcmread(path)
            uid = str(ds.SOPInstanceUID)
            try:
                rsp = assoc.send_c_store(ds)
            except (ValueError, RuntimeError) as err:
                # No accepted context fits the file (the peer refused that class or encoding).
                sent.append(Sent(path, sop_class, uid, None, "Failure", f"not accepted by the peer: {err}"))
                log.warning("C-STORE of %s to %s not attempted: %s", uid, dest, err)
                continue
            if "Status" not in rsp:
                raise AssociationError(f"{dest} did not answer the C-STORE of {uid} (timeout or abort)")
            code = int(rsp.Status)
            sent.append(Sent(path, sop_class, uid, code, code_to_category(code), status_name(code)))
            log.info("C-STORE %s to %s: %s (0x%04X)", uid, dest, sent[-1].status_name, code)
    finally:
        if assoc.is_established:
            assoc.release()
    refused = [s for s in sent if not s.stored]
    if refused:
        raise StoreRefusedError(f"{dest} did not store {len(refused)} of {len(sent)}: " + "; ".join(
            f"{s.sop_instance_uid} {s.status_name}" for s in refused))
    return sent


def send_study(store, cfg, study_uid: str, dest: Destination, *, with_sc: bool = True,
               with_images: bool = False) -> list[Sent]:
    """`wasla send`: the study's SR (and SC), made now if the daemon has not yet, then its images if asked."""
    from edge import results_dicom

    kinds = (results_dicom.SR, results_dicom.SC) if with_sc else (results_dicom.SR,)
    rows = results_dicom.ensure_results(store, study_uid, box_id=cfg.box.id, kinds=kinds,
                                        max_pixels=cfg.storage.max_pixels)
    paths = [store.instance_path(r) for r in rows]
    if with_images:
        study = store.study(rows[0]["study_uid"])
        paths += [store.instance_path(i) for i in results_dicom.triaged_sources(study)]
    d = cfg.dicom
    return send_files(paths, dest, calling_ae=d.ae_title, acse_timeout=d.acse_timeout, dimse_timeout=d.dimse_timeout,
                      network_timeout=d.network_timeout)
