"""The box uploader inside `wasla run`: packs triaged studies into the outbox and drains it over MQTT by priority."""
from __future__ import annotations

import json
import logging
import shutil
import threading
import time

import paho.mqtt.client as mqtt

from sync.core.diskguard import is_disk_full
from sync.core.errors import ProtocolError
from sync.core.liveness import Beat, paho_thread
from sync.wire import protocol
from edge.uplink import connection
from edge.uplink.budget import BULK, FLAG as FLAG_BYTES, TELEMETRY, Budget
from edge.uplink.linkmeter import LinkMeter
from edge.uplink.packer import Packer
from edge.uplink.scheduler import LinkState, pick
from edge.uplink.window import InflightWindow
from edge.uplink.outbox import Outbox

log = logging.getLogger(__name__)

# After a reconnect or restart, how long a transfer that was under way waits for the hub's "what I have" before it
# resends from what the box last knew: long enough for one GEO round trip plus a busy hub, short enough not to stall.
RESUME_WAIT_S = 8.0
MAX_DOWN_BYTES = 64 * 1024


class Uploader:
    """Two threads: `pack` (flags first, then wire-encoding) and `send` (one chunk at a time, best priority first).

    Preemption happens between chunks: before every chunk the send thread re-reads the outbox in priority order, and
    bulk bytes not yet confirmed by the broker are capped (`max_inflight_bytes`). Flags go over their own connection
    (`sync.flag_lane`), so they wait behind what sits in the link's queue, not behind that window too.
    """

    def __init__(self, cfg, store, engine=None):
        self.cfg = cfg
        self.sc = cfg.sync
        self.device = cfg.box.id
        self.outbox = Outbox(store, cfg.box.data_dir / "outbox", self.device)
        self.budget = Budget.from_config(self.sc, self.outbox.load_usage, self.outbox.add_usage)
        self.models = [{"name": m.package.name, "version": m.package.version} for m in getattr(engine, "models", [])]
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.pack_wake = threading.Event()
        self._lock = threading.Lock()
        self.connected = False
        self.conn_no = 0
        self.window = InflightWindow()  # guarded by _lock
        self._pending: dict[str, dict[int, float]] = {}   # transfer -> chunk -> when published (monotonic)
        self._have: dict[str, set[int]] = {}              # transfer -> chunks the hub confirmed
        self._manifest_conn: dict[str, int] = {}          # transfer -> connection its manifest went out on
        self._resume_wait: dict[str, float] = {}          # transfer -> deadline for the hub's resume answer
        self._queried: dict[str, float] = {}              # confirmed transfer -> last "are you done?" query
        self._flag_sent: dict[str, float] = {}
        self._ever_sent: dict[str, set[int]] = {}
        self._next_heartbeat = 0.0
        self.blocked = ""
        self.stats = {"connects": 0, "disconnects": 0, "puback_rtt_ms": None, "chunks_sent": 0, "chunks_resent": 0,
                      "bytes_sent": 0, "flags_sent": 0, "flags_via_lane": 0, "connected_since": None}
        self.client = self._make_client()
        self.lane = self._make_lane() if self.sc.flag_lane else None
        self.lane_connected = False
        self._threads: list[threading.Thread] = []
        self._mqtt_threads: dict[str, threading.Thread | None] = {}
        prior = self.sc.link_kbps if not self.sc.max_rate_kbps else min(self.sc.link_kbps, self.sc.max_rate_kbps)
        self.meter = LinkMeter(prior * 1000 / 8)
        self.packer = Packer(self.outbox, self.sc, self.models, on_queued=self.wake.set, link_rate=self.meter.rate)
        # Send and pack loops wake at least every 0.5 s; a message handler is busy for milliseconds.
        self.beats = {"sync-pack": Beat("upload packing", max_silence=600.0),
                      "sync-send": Beat("upload sending", max_silence=300.0),
                      "mqtt": Beat("upload messages", max_busy=300.0)}

    # --- MQTT plumbing --------------------------------------------------------------------------------------------
    def _make_client(self):
        return connection.box_client(self.sc, self.device, on_connect=self._on_connect,
                                     on_disconnect=self._on_disconnect, on_publish=self._on_publish,
                                     on_message=self._on_message)

    def _make_lane(self):
        return connection.flag_lane(self.sc, self.device, self._lane_state)

    def _lane_state(self, up: bool) -> None:
        self.lane_connected = up
        if up:
            self.wake.set()

    def _on_connect(self, client, _userdata, flags, reason_code, _props) -> None:
        try:
            if reason_code.is_failure:
                log.warning("broker refused the connection: %s", reason_code)
                return
            with self._lock:
                self.connected = True
                self.conn_no += 1
                # Whatever was out before the cut is unknown now: the hub's resume answer tells what arrived.
                self.window.clear()
                self._pending.clear()
                self._flag_sent.clear()
                self._queried.clear()
            self.stats["connects"] += 1
            self.stats["connected_since"] = time.time()
            client.subscribe(protocol.down_filter(self.device), qos=1)
            client.publish(protocol.up_topic(self.device, "status"),
                           protocol.encode("status", self.device, online=True, at=time.time()), qos=1)
            self._next_heartbeat = 0.0
            log.info("connected to broker %s:%s (session present: %s)", self.sc.broker_host, self.sc.broker_port,
                     flags.session_present)
            self.wake.set()
        except Exception:  # noqa: BLE001 - an exception here would kill paho's network thread
            log.exception("on_connect failed")

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _props) -> None:
        try:
            if self.connected:
                self.stats["disconnects"] += 1
                log.warning("disconnected from broker: %s", reason_code)
            self.connected = False
            self.stats["connected_since"] = None
            self.meter.idle()
        except Exception:  # noqa: BLE001 - an exception here would kill paho's network thread
            log.exception("on_disconnect failed")

    def _on_publish(self, _client, _userdata, mid, _reason_code, _props) -> None:
        try:
            with self._lock:
                entry = self.window.acked(mid)
                if entry is None:
                    return
                if entry[0]:
                    self.meter.acked(entry[0])
                rtt = entry[1] * 1000
                prev = self.stats["puback_rtt_ms"]
                self.stats["puback_rtt_ms"] = round(rtt if prev is None else 0.8 * prev + 0.2 * rtt, 1)
            self.wake.set()
        except Exception:  # noqa: BLE001 - as above
            log.exception("on_publish failed")

    def _publish(self, kind: str, payload: bytes, *, bulk: bool = False) -> bool:
        """QoS 1 publish, only while connected; bulk bytes count against the in-flight cap until the broker's PUBACK."""
        if not self.connected:
            return False
        info = self.client.publish(protocol.up_topic(self.device, kind), payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        with self._lock:
            self.window.published(info.mid, len(payload) if bulk else 0)
        self.stats["bytes_sent"] += len(payload)
        return True

    # --- messages from the hub ------------------------------------------------------------------------------------
    def _on_message(self, _client, _userdata, message) -> None:
        with self.beats["mqtt"].busy():
            self._on_message_inner(message)

    def _on_message_inner(self, message) -> None:
        try:
            msg = protocol.decode(message.topic, message.payload, direction="down", max_bytes=MAX_DOWN_BYTES,
                                  expect_device=self.device)
        except Exception as err:  # noqa: BLE001 - paho's network thread must outlive any message
            reason = str(err) if isinstance(err, ProtocolError) else f"decode error: {type(err).__name__}: {err}"
            try:
                self.outbox.dead_letter(message.topic, reason, bytes(message.payload))
            except Exception:  # noqa: BLE001 - a full disk must not kill the thread either
                log.exception("could not record a dead letter for %s", message.topic)
            return
        try:
            if msg.kind == "ack":
                self._handle_ack(msg)
            elif msg.kind == "read":
                if self.outbox.apply_read(msg["study_uid"], msg["read_id"], msg["disposition"], msg.get("note"),
                                          msg.get("by"), msg["at"]):
                    self._next_heartbeat = 0.0  # the receipt rides on the next heartbeat, sent now
            elif msg.kind == "command":
                log.info("command from hub: %s", msg["command"])
                self._next_heartbeat = 0.0
                if msg["command"] == "resume":
                    with self._lock:
                        self._manifest_conn.clear()
            self.wake.set()
        except Exception as err:  # noqa: BLE001 - one bad message must not stop the link
            if is_disk_full(err, self.outbox.store.spool_dir):
                # Nothing was recorded; the hub's answer comes again (the box asks again, the hub re-acks).
                log.warning("hub message %s not recorded: disk full", message.topic)
                return
            log.exception("handling %s failed", message.topic)
            try:
                self.outbox.dead_letter(message.topic, f"handler error: {type(err).__name__}", bytes(message.payload))
            except Exception:  # noqa: BLE001 - a full disk must not kill paho's thread either
                log.exception("could not record a dead letter for %s", message.topic)

    def _handle_ack(self, msg: protocol.Message) -> None:
        if msg.get("flag_id"):
            if msg["status"] == "failed":
                # Refused for good (a UID another clinic's box already sent): shown by `wasla sync`, not resent.
                if self.outbox.flag_failed(msg["flag_id"], msg.get("reason") or "refused by the hub"):
                    log.error("hub refused flag %s: %s", msg["flag_id"], msg.get("reason"))
            elif self.outbox.flag_done(msg["flag_id"]):
                log.info("hub confirmed flag %s", msg["flag_id"])
            return
        tid, status = msg["transfer"], msg["status"]
        with self._lock:
            self._resume_wait.pop(tid, None)
        if status == "complete":
            if self.outbox.acknowledged(tid):
                log.info("transfer %s acknowledged by the hub (verified and stored)", tid)
            self._forget(tid)
        elif status == "partial":
            merged = self.outbox.record_have(tid, protocol.from_ranges(msg.get("have", [])))
            if merged is None:
                return
            with self._lock:
                self._have[tid] = merged
                pend = self._pending.get(tid, {})
                for i in merged & set(pend):
                    del pend[i]
        elif status == "retry":
            log.warning("hub discarded transfer %s (%s): sending it again", tid, msg.get("reason"))
            row = self.outbox.get(tid)
            if row is not None and not self.outbox.wire_intact(row):
                self.outbox.repack(tid, "wire file on the box is corrupt")
                self.pack_wake.set()
            else:
                self.outbox.reset_have(tid)
            self._forget(tid)
        elif status == "failed":
            self.outbox.failed(tid, msg.get("reason") or "refused by the hub")
            self._forget(tid)
        elif status == "unknown":
            # The hub holds nothing of it (a chunk overtook its manifest, or the hub lost its state): manifest
            # again, then whatever its answer says is missing.
            log.warning("hub does not know transfer %s: sending its manifest again", tid)
            self.outbox.reset_have(tid)
            self._forget(tid)

    def _forget(self, tid: str) -> None:
        with self._lock:
            for d in (self._pending, self._have, self._manifest_conn, self._resume_wait, self._queried):
                d.pop(tid, None)

    # --- the send loop --------------------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        while not self.stop_event.is_set():
            self.beats["sync-send"].tick()
            try:
                busy = self.step()
            except Exception as err:  # noqa: BLE001 - keep the link alive; the outbox is intact in SQLite
                if is_disk_full(err, self.outbox.store.spool_dir):
                    log.warning("send step: disk full (%s); retrying", type(err).__name__)
                    self.stop_event.wait(5.0)
                else:
                    log.exception("send step failed")
                busy = False
            if not busy:
                self.wake.wait(0.5)
                self.wake.clear()

    def step(self) -> bool:
        """Send the single most important thing that may go now (edge.uplink.scheduler); False when nothing can."""
        if not self.connected:
            return False
        now = time.monotonic()
        if now >= self._next_heartbeat:
            self._send_heartbeat()
            return True
        self._expire(now)
        state = LinkState(self.conn_no, self._flag_sent, self._queried, self._manifest_conn, self._resume_wait,
                          self.sc.ack_timeout_seconds)
        choice = pick(self.outbox.active(), now, state, next_index=self._next_index,
                      allow_bulk=lambda urgent: self.budget.allow_bulk(urgent=urgent),
                      window_full=self._window_full, pace=self.budget.delay)
        self.blocked = choice.blocked
        for tid in choice.resumed:
            self._resume_wait.pop(tid, None)
        row = choice.row
        if choice.action == "flag":
            return self._send_flag(row)
        if choice.action == "query":
            self._queried[row["transfer_id"]] = now
            return self._send_manifest(row)
        if choice.action == "manifest":
            started = row["attempts"] > 0
            if self._send_manifest(row) and started:
                self._resume_wait[row["transfer_id"]] = now + min(RESUME_WAIT_S, self.sc.ack_timeout_seconds)
            return True
        if choice.action == "pace":
            # Wait in slices so a flag queued meanwhile is picked first when we look again.
            self.stop_event.wait(min(choice.wait, 0.25))
            return True
        if choice.action == "chunk":
            return self._send_chunk(row, choice.index)
        if choice.action == "idle":
            self.meter.idle()  # nothing may go: the link is no longer saturated by us
        return False

    def _window_full(self, length: int) -> bool:
        with self._lock:
            return self.window.would_exceed(length, self.sc.max_inflight_bytes)

    def _next_index(self, row: dict) -> int | None:
        tid = row["transfer_id"]
        with self._lock:
            have = self._have.get(tid)
            if have is None:
                have = self._have[tid] = protocol.from_ranges(json.loads(row["have"] or "[]"))
            pend = self._pending.setdefault(tid, {})
            for i in range(row["count"]):
                if i not in have and i not in pend:
                    return i
        return None

    def _expire(self, now: float) -> None:
        """Chunks the broker took but the hub never confirmed: ask the hub, then send what it lacks again."""
        timeout = self.sc.ack_timeout_seconds
        with self._lock:
            for tid, pend in self._pending.items():
                old = [i for i, t in pend.items() if now - t > timeout]
                if old:
                    log.warning("transfer %s: %d chunk(s) unconfirmed after %.0f s; asking the hub", tid, len(old), timeout)
                    for i in old:
                        del pend[i]
                    self._manifest_conn.pop(tid, None)

    def _send_flag(self, row: dict) -> bool:
        try:
            payload = json.loads(row["payload"])
            data = protocol.encode("flag", self.device, flag_id=row["flag_id"], **payload)
        except (ProtocolError, ValueError, TypeError) as err:
            # A row that can never be encoded must not block every flag and study queued behind it.
            self.outbox.row_failed(row["id"], f"cannot encode flag: {err}")
            return True
        if self._publish_flag(data):
            self._flag_sent[row["flag_id"]] = time.monotonic()
            self.budget.charge(FLAG_BYTES, len(data))
            self.stats["flags_sent"] += 1
            log.info("flag %s sent (%d bytes)", row["flag_id"], len(data))
            return True
        return False

    def _publish_flag(self, data: bytes) -> bool:
        if self.lane is not None and self.lane_connected:
            info = self.lane.publish(protocol.up_topic(self.device, "flag"), data, qos=1)
            if info.rc == mqtt.MQTT_ERR_SUCCESS:
                self.stats["bytes_sent"] += len(data)
                self.stats["flags_via_lane"] += 1
                return True
        return self._publish("flag", data)  # no lane (or it is down): the main connection still works

    def _send_manifest(self, row: dict) -> bool:
        data = protocol.encode(
            "manifest", self.device, transfer=row["transfer_id"], study_uid=row["study_uid"],
            sop_instance_uid=self._sop(row), label=row["label"], size=row["size"], sha256=row["sha256"],
            chunk_size=row["chunk_size"], count=row["count"], codec=row["codec"] or "original",
            transfer_syntax=row["transfer_syntax"] or "", original_size=row["original_size"] or row["size"],
            ratio=row["ratio"] or 1.0, resume=True)
        if not self._publish("manifest", data):
            return False
        self._manifest_conn[row["transfer_id"]] = self.conn_no
        self.outbox.bump_attempts(row["id"])
        self.budget.charge(BULK, len(data))
        return True

    def _sop(self, row: dict) -> str:
        got = self.outbox.store.query("SELECT sop_instance_uid FROM instances WHERE id = ?", [row["instance_id"]])
        return got[0]["sop_instance_uid"] if got else ""

    def _send_chunk(self, row: dict, index: int) -> bool:
        tid = row["transfer_id"]
        try:
            data = self.outbox.read_chunk(row, index)
        except OSError as err:
            # One lost wire file (power cut before its folder was synced, a hand clean-up) must not block every
            # transfer behind it: this one fails (visible in `wasla sync`), its instance is packed again from the
            # spool, and the others go on meanwhile.
            self.outbox.repack(tid, f"wire file unreadable: {err.strerror or err}")
            self._forget(tid)
            self.pack_wake.set()
            return True
        payload = protocol.encode_chunk(tid, index, data)
        if not self._publish("chunk", payload, bulk=True):
            return False
        with self._lock:
            self._pending.setdefault(tid, {})[index] = time.monotonic()
        ever = self._ever_sent.setdefault(tid, set())
        if index in ever:
            self.stats["chunks_resent"] += 1
        ever.add(index)
        self.stats["chunks_sent"] += 1
        self.budget.charge(BULK, len(payload))
        return True

    def _send_heartbeat(self) -> None:
        self._next_heartbeat = time.monotonic() + self.sc.heartbeat_seconds
        summary = self.outbox.summary()
        try:
            free = shutil.disk_usage(self.cfg.box.data_dir).free / 1e6
        except OSError:
            free = 0.0
        link = {k: v for k, v in self.stats.items()}
        link["usage_today"] = self.budget.usage()
        link["rate_kbps"] = round(self.meter.rate() * 8 / 1000, 1)
        link["rate_measured"] = self.meter.measured
        link["blocked"] = self.blocked or None
        data = protocol.encode("heartbeat", self.device, at=time.time(), queue_depth=summary["queue_depth"],
                               oldest_unsent_at=summary["oldest_unsent_at"], disk_free_mb=round(free),
                               models=self.models, link=link, reads_applied=self.outbox.recent_reads())
        if self._publish("heartbeat", data):
            self.budget.charge(TELEMETRY, len(data))

    def nudge(self) -> dict:
        """`wasla sync --now` (edge/control.py): a heartbeat now, and every open transfer asked about again."""
        log.info("nudged: heartbeat now, re-asking the hub about every open transfer")
        self._next_heartbeat = 0.0
        with self._lock:
            self._manifest_conn.clear()
            self._flag_sent.clear()
            self._queried.clear()
        self.pack_wake.set()
        return {"connected": bool(self.client is not None and self.client.is_connected()),
                "queue_depth": self.outbox.summary()["queue_depth"]}

    # --- the pack loop (edge/uplink/packer.py) ---------------------------------------------------------------------
    def _pack_loop(self) -> None:
        self.packer.loop(self.stop_event, self.pack_wake, self.beats["sync-pack"])

    def pack_once(self) -> bool:
        return self.packer.pack_once()

    # --- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        props = protocol.connect_properties(int(self.sc.session_expiry_hours * 3600))
        self.client.connect_async(self.sc.broker_host, self.sc.broker_port, keepalive=self.sc.keepalive_seconds,
                                  clean_start=False, properties=props)
        self.client.loop_start()
        self._mqtt_threads = {"mqtt": paho_thread(self.client)}
        if self.lane is not None:
            self.lane.connect_async(self.sc.broker_host, self.sc.broker_port, keepalive=self.sc.keepalive_seconds,
                                    clean_start=True)
            self.lane.loop_start()
            self._mqtt_threads["lane"] = paho_thread(self.lane)
        for name, target in (("sync-pack", self._pack_loop), ("sync-send", self._send_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("uploader started for box %s -> %s:%s", self.device, self.sc.broker_host, self.sc.broker_port)

    def problems(self) -> list[str]:
        threads = {t.name: t for t in self._threads}
        found = [self.beats[name].problem(threads.get(name)) for name in ("sync-pack", "sync-send")]
        found.append(self.beats["mqtt"].problem(self._mqtt_threads.get("mqtt"), idle_ok=True))
        if self._mqtt_threads.get("lane") is not None:
            found.append(Beat("flag lane").problem(self._mqtt_threads["lane"], idle_ok=True))
        return [p for p in found if p]

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        self.wake.set()
        self.pack_wake.set()
        for t in self._threads:
            t.join(timeout)
        if self.connected:
            try:
                info = self.client.publish(protocol.up_topic(self.device, "status"),
                                           protocol.encode("status", self.device, online=False, at=time.time()),
                                           qos=1)
                info.wait_for_publish(2.0)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()
        if self.lane is not None:
            self.lane.disconnect()
            self.lane.loop_stop()
