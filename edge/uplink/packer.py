"""The uploader's packer: flags for labelled studies, then each triaged instance wire-encoded into the outbox.

An instance that cannot be packed (it cannot be pseudonymised, its file will not re-encode) gets a `pack` row in
the outbox in state `failed` with the reason: `wasla sync` and `wasla doctor` show it, the packer does not try it
again on every turn, and `wasla requeue` clears it. A full disk is no instance's fault: packing pauses instead.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from collections.abc import Callable

from edge.uplink.outbox import Outbox
from sync.core.diskguard import Pause, is_disk_full
from sync.core.liveness import Beat

log = logging.getLogger(__name__)

# Wire-encoding is background work (it only has to stay ahead of a satellite link); triage of the next image is what
# a waiting urgent flag depends on. The pack thread (and the codec threads it starts, which inherit it) runs this
# much nicer than the daemon, so on a two-core box the encoder takes only the CPU triage leaves.
PACK_NICE = 10


def lower_own_priority(step: int = PACK_NICE) -> int | None:
    """Renice the calling thread (Linux: nice is per thread); returns the new nice value, None where unsupported."""
    try:
        tid = threading.get_native_id()
        now = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, now + step))
        return os.getpriority(os.PRIO_PROCESS, tid)
    except (AttributeError, OSError) as err:
        log.info("pack thread keeps its priority: %s", err)
        return None


class Packer:
    def __init__(self, outbox: Outbox, sc, models: list[dict], *, on_queued: Callable[[], None],
                 link_rate: Callable[[], float] | None = None):
        self.outbox = outbox
        self.link_rate = link_rate
        self.sc = sc
        self.models = models
        self.on_queued = on_queued
        store = outbox.store
        self.disk = Pause("upload packing", store.spool_dir, store.own_reserve_bytes)
        self.nice: int | None = None

    def loop(self, stop: threading.Event, wake: threading.Event, beat: Beat) -> None:
        self.nice = lower_own_priority()
        while not stop.is_set():
            beat.tick()
            try:
                busy = self.pack_once()
            except Exception:  # noqa: BLE001 - a bad instance must not stop packing the others
                log.exception("pack step failed")
                busy = False
            if not busy:
                # The worker wakes us after each triage (daemon wiring); the poll is the fallback for other writers.
                wake.wait(0.25)
                wake.clear()

    def pack_once(self) -> bool:
        """Flags for newly labelled (or escalated) studies first, then one instance wire-encoded into the outbox."""
        for s in self.outbox.studies_needing_flags():
            payload = {"study_uid": s["study_uid"], "label": s["label"], "reasons": json.loads(s["reasons"] or "[]"),
                       "modality": s["modality"], "n_instances": s["n_instances"] or 0, "at": time.time(),
                       "models": self.models}
            if self.sc.preview:
                payload["preview_jpeg_b64"] = self.preview(s["study_uid"])
            self.outbox.add_flag(s["study_uid"], s["label"], payload)
            log.info("flag queued for study %s (%s)", s["study_uid"], s["label"])
            self.on_queued()
        if not self.disk.room():
            return False  # wire copies wait for space; flags (rows only) went out above
        for inst in self.outbox.instances_to_pack(limit=1):
            return self._pack(inst)
        return False

    def _pack(self, inst: dict) -> bool:
        from sync.wire import codecs

        store = self.outbox.store
        try:
            source = store.instance_path(inst)
            damage = store.spool_damage(inst)
            if damage:
                # What left the modality is not what is on disk (bit rot, a cut copy): never send it as if it were;
                # the technician sees why in the quarantine and can ask the modality to send it again.
                store.quarantine(inst["id"], damage)
                return True
            if self.sc.pseudonymise:  # fails closed: an instance that cannot be pseudonymised is not sent
                from sync.wire import pseudonym

                source = pseudonym.pseudonymise_file(source, pseudonym.load_key(self.sc.pseudonym_key_file))
            enc = codecs.encode_for_wire(source, codecs=self.sc.codecs or None, frames_limit=self.sc.frames_limit,
                                         link=self._link())
        except Exception as err:  # noqa: BLE001 - the spool file vanished, a codec refused it, no pseudonym key...
            if is_disk_full(err, store.spool_dir):
                self.disk.hit()  # not the instance's fault: packed again once space returns
                return False
            # Our own errors say what is wrong; a library's message may quote a header value.
            reason = f"cannot be prepared for the hub: {err}" if _ours(err) else \
                f"cannot be prepared for the hub ({type(err).__name__})"
            self.outbox.pack_failed(inst, reason)
            return True
        try:
            self.outbox.add_transfer(inst, enc, inst["study_label"], self.sc.chunk_bytes)
        except Exception as err:
            if is_disk_full(err, store.spool_dir):
                self.disk.hit()
                return False
            raise  # e.g. the instance moved on meanwhile: logged by the loop, tried again from the outbox's state
        self.on_queued()
        return True

    def _link(self):
        """The link this instance will travel over: measured rate and the bytes queued ahead of it."""
        if self.link_rate is None or self.sc.codecs:
            return None
        from sync.wire.codec_policy import Link

        return Link(self.link_rate(), self.outbox.backlog_bytes())

    def preview(self, study_uid: str) -> str | None:
        try:
            import cv2
            import pydicom

            from edge import imaging

            rows = self.outbox.store.query("SELECT path FROM instances WHERE study_uid = ? AND state != 'quarantined' "
                                           "ORDER BY id LIMIT 1", [study_uid])
            if not rows:
                return None
            ds = pydicom.dcmread(self.outbox.store.spool_dir / rows[0]["path"])
            frame = imaging.render(ds, min_side=self.sc.preview_px // 2)[0]
            img = imaging.thumbnail(frame, self.sc.preview_px)
            if img.ndim == 3:
                img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 70])
            return base64.b64encode(buf.tobytes()).decode() if ok else None
        except Exception as err:  # noqa: BLE001 - a flag without a preview is still a flag
            log.warning("no preview for study %s: %s", study_uid, type(err).__name__)
            return None


def _ours(err: BaseException) -> bool:
    from sync.core.errors import WaslaError

    return isinstance(err, WaslaError)
