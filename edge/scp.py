"""The DICOM C-STORE / C-ECHO service: a pynetdicom server whose handlers hand every instance to edge.ingest."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from pydicom.dataset import Dataset
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from edge.config import Config
from sync.core.diskguard import is_disk_full
from sync.core.errors import NoPixelDataError, OutOfResourcesError, WaslaError
from edge.ingest import DUPLICATE, QUARANTINED, STORED, ingest_tmp, limits_from_config, write_fsynced
from edge.scp_slots import BoundedServer, Slots
from edge.store import Store

log = logging.getLogger(__name__)

# --- every status this service answers with (PS3.4 Annex B.2.3, Storage Service Class) ------------------------
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
"""Refused: out of resources. Disk below its reserve: the modality keeps the image and retries later."""
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
"""Error: the data set lacks what its SOP class requires (an image storage without pixel data)."""
CANNOT_UNDERSTAND = 0xC000
"""Error: unreadable, truncated, too large, or an encoding we refuse. Kept in quarantine with the reason."""
PROCESSING_FAILURE = 0xC001
"""Error (0xC000 range, "cannot understand"): an unexpected failure on our side, logged with a traceback."""

# The Error Comment element is LO: 64 characters at most.
_ERROR_COMMENT_MAX = 64

# Both lists, so that anything pydicom or pynetdicom can name is accepted: we keep what we cannot decode
# (quarantined with its reason) rather than make the modality fall back or give up. Uncompressed first.
TRANSFER_SYNTAXES: list[str] = list(dict.fromkeys([*ALL_TRANSFER_SYNTAXES, *AllTransferSyntaxes]))


def _status(code: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:_ERROR_COMMENT_MAX]
    return ds


def _status_for_quarantine(error: str | None) -> int:
    return DATASET_DOES_NOT_MATCH_SOP_CLASS if error == NoPixelDataError.__name__ else CANNOT_UNDERSTAND


def handle_store(event, store: Store, cfg: Config, on_stored: Callable[[], None] | None = None) -> Dataset:
    """EVT_C_STORE: answer Success only once the file is fsynced in the spool and its row committed."""
    sop_uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "?")
    calling_ae = event.assoc.requestor.ae_title
    started = time.perf_counter()  # the data set is in memory: receive_ms = write + fsync + judge + commit
    try:
        # Preamble + file meta + the data set exactly as sent: no decode/re-encode that could alter it.
        data = event.encoded_dataset()
        store.check_space(len(data))
        tmp = store.new_tmp_path()
        try:
            write_fsynced(tmp, [data])
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        del data
        outcome = ingest_tmp(store, tmp, source="dicom", calling_ae=calling_ae,
                             **limits_from_config(cfg), original_name=f"{sop_uid}.dcm", started=started)
    except OutOfResourcesError as err:
        log.warning("C-STORE %s from %s refused: %s", sop_uid, calling_ae, err)
        return _status(OUT_OF_RESOURCES, "disk full on the triage box")
    except Exception as err:  # noqa: BLE001 - one bad instance must never take the server down
        if is_disk_full(err, store.spool_dir):  # the disk filled between our check and the write (file or SQLite)
            log.warning("C-STORE %s from %s refused: disk full", sop_uid, calling_ae)
            return _status(OUT_OF_RESOURCES, "disk full on the triage box")
        if isinstance(err, OSError):
            log.exception("C-STORE %s from %s failed", sop_uid, calling_ae)
            return _status(PROCESSING_FAILURE, "storage error on the triage box")
        log.exception("C-STORE %s from %s failed", sop_uid, calling_ae)
        return _status(PROCESSING_FAILURE, "internal error on the triage box")
    if outcome.status == QUARANTINED:
        log.warning("C-STORE %s from %s quarantined as #%s", sop_uid, calling_ae, outcome.instance_id)
        return _status(_status_for_quarantine(outcome.error), outcome.reason)
    if outcome.status == DUPLICATE:
        log.warning("C-STORE %s from %s: duplicate of #%s, acknowledged", sop_uid, calling_ae, outcome.instance_id)
    elif outcome.status == STORED and on_stored is not None:
        on_stored()
    return _status(SUCCESS)


def handle_echo(event) -> int:
    """EVT_C_ECHO: the modality's "test connection" button."""
    log.info("C-ECHO from %s", event.assoc.requestor.ae_title)
    return SUCCESS


def _handle_rejected(event) -> None:
    # pynetdicom rejects a disallowed calling AE itself; say so in our log, where the technician looks.
    log.warning("association from %s (%s) rejected", event.assoc.requestor.ae_title, event.assoc.requestor.address)


class StoreSCP:
    """The box's DICOM listener: all storage SOP classes, every transfer syntax, calling AEs from the allowlist."""

    def __init__(self, cfg: Config, store: Store, *, on_stored: Callable[[], None] | None = None):
        self.cfg = cfg
        self.store = store
        self.on_stored = on_stored
        self._ae: AE | None = None
        self._server = None
        self._thread: threading.Thread | None = None
        d = cfg.dicom
        self.slots = Slots(d.max_associations, d.max_associations_per_peer or d.max_associations)

    def _make_ae(self) -> AE:
        d = self.cfg.dicom
        ae = AE(ae_title=d.ae_title)
        # Until a peer has sent its association request it gets the short timeout (Slots restores the normal one).
        ae.acse_timeout = min(d.request_timeout, d.acse_timeout)
        ae.dimse_timeout = d.dimse_timeout
        ae.network_timeout = d.network_timeout
        # Slots enforces the real limit; pynetdicom's own count includes threads still winding down, so it only
        # backs ours up.
        ae.maximum_associations = d.max_associations * 4 + 16
        # Empty list = any calling AE (pynetdicom's own convention, same as our config's).
        ae.require_calling_aet = list(d.allowed_calling_aes)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, TRANSFER_SYNTAXES)
        return ae

    def start(self) -> None:
        """Listen in background threads; returns once the socket is bound."""
        if self._server is not None:
            return
        self._ae = self._make_ae()
        d = self.cfg.dicom
        handlers = [
            *self.slots.handlers(min(d.request_timeout, d.acse_timeout), d.acse_timeout),
            (evt.EVT_C_STORE, handle_store, [self.store, self.cfg, self.on_stored]),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_REJECTED, _handle_rejected),
        ]
        try:
            # start_server(block=False) without its fixed server class: ours bounds connections per address.
            self._server = self._ae.make_server((d.bind, d.port), evt_handlers=handlers, server_class=BoundedServer)
            self._ae._servers.append(self._server)  # as start_server does: its shutdown() removes it from there
            self._thread = threading.Thread(target=self._server.serve_forever, name="dicom-acceptor", daemon=True)
            self._thread.start()
        except OSError as err:  # typically: the daemon is already running on this port
            raise WaslaError(f"cannot listen for DICOM on {self.cfg.dicom.bind}:{self.cfg.dicom.port}: "
                             f"{err.strerror or err} (is another wasla run active?)") from err

    @property
    def port(self) -> int:
        """The bound port (the real one when the config asked for 0, an ephemeral port)."""
        if self._server is None:
            return self.cfg.dicom.port
        return self._server.server_address[1]

    def problems(self) -> list[str]:
        if self._thread is not None and not self._thread.is_alive():
            return ["DICOM listener: thread has stopped"]
        return []

    def stop(self) -> None:
        """Stop listening and close open associations."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._ae is not None:
            self._ae.shutdown()
            self._ae = None
