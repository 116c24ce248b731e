"""Service plumbing both daemons use: systemd notify and watchdog, and logging that never leaks patient data."""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def sd_notify(message: str) -> bool:
    """Send a datagram to systemd's notify socket; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(addr)
            sock.sendall(message.encode())
        return True
    except OSError as err:
        log.warning("sd_notify failed: %s", err)
        return False


def watchdog_interval() -> float | None:
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


def setup_logging(level: str) -> None:
    # Log lines carry SOP/Study UIDs and instance ids, never patient names or IDs (the code never formats those).
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # pydicom's value-validation warnings quote the offending value, which may be a patient's name or ID: the box
    # never validates on read (it stores what the modality sent), so silence them at the source.
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    # Its decoders also log every failure with a traceback before raising; we catch, quarantine and log the
    # reason ourselves, once, without the noise.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
