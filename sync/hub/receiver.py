"""The hub receiver (`wasla-hub run`): validates box messages, stores chunks, verifies and files studies, acks back."""
from __future__ import annotations

import base64
import binascii
import collections
import logging
import os
import queue
import uuid
import threading
import time

import paho.mqtt.client as mqtt

from sync.core.errors import BadInputError, ConflictError, ProtocolError, StoreError, UidCollisionError
from sync.core.diskguard import Pause, is_disk_full
from sync.core.liveness import Beat, paho_thread
from sync.wire import protocol
from sync.hub.inbox import PriorityInbox, priority as inbox_priority
from sync.hub.partitions import Partitions
from sync.hub.store import HubStore, SqliteIndex
from sync.hub.verify import verify_and_file

log = logging.getLogger(__name__)


class TransferRefused(Exception):
    """A transfer the hub will never take (declared too large): refused with a final answer."""


# Small messages (flags, heartbeats, status) are handled in batches of up to MAX_BATCH in one durable transaction:
# one fsync for the lot instead of two per flag. Chunks and manifests keep one transaction each (a chunk may finish
# a study, whose verification takes seconds and must not hold the index's write lock for a whole batch).
BATCHABLE = frozenset({"flag", "heartbeat", "status"})
MAX_BATCH = 256
CONFLICT_RETRIES = 3  # a message that met another receiver's transaction (PostgreSQL) is tried this many more times
UNKNOWN_RECHECKS = 10  # x 0.1 s: how long a chunk waits for its manifest to appear in a shared index
# The inbox holds a reconnect storm's whole backlog of small messages (1,000 boxes x 20 flags + telemetry), so the
# worker can take the urgent flags out of it first; its byte bound keeps a burst of chunks from taking the memory.
INBOX_MAX = 100_000
INBOX_MAX_BYTES = 64 * 1024 * 1024
# Replies (acks) in flight to the broker: unlimited. With paho's default of 20, the rest of a 256-flag batch's acks
# waited inside this process while the batch's PUBACKs went out at once: a receiver killed then had acknowledged
# messages whose replies never left, and those boxes waited ack_timeout_seconds to resend. Unlimited, every reply is
# queued on the socket before the PUBACKs that follow it, and TCP keeps that order: a broker that has a PUBACK has
# the reply too. (Waiting for the replies' own PUBACKs instead deadlocks once paho's thread is blocked on a full
# inbox and cannot read them.)
REPLY_WINDOW = 0


class Receiver:
    """`handle(topic, payload)` is the whole receiving logic; MQTT only feeds it. It never raises: what it cannot
    use goes to the dead-letter table with its reason."""

    def __init__(self, cfg, store: HubStore | None = None):
        self.cfg = cfg
        self.store = store or HubStore.from_config(cfg)
        self.connected = threading.Event()
        self.client = None
        self.forwarder = None  # sync.hub.forward.Forwarder when a PACS is configured: woken by each new instance
        self.handled = 0
        self.by_device: collections.Counter[str] = collections.Counter()  # messages handled, per box
        self._mqtt_thread = None
        # A message is handled in milliseconds (a study's verification in seconds): five minutes in one is a hang.
        self.beat = Beat("hub receiver", max_busy=300.0)
        # paho's thread only queues what arrives (and so keeps reading, writing acks and pinging); one worker
        # handles the queue in order and PUBACKs each message once what it carried is committed.
        self._inbox = PriorityInbox(INBOX_MAX, INBOX_MAX_BYTES)
        self._carry = None
        self._tls = threading.local()
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        self.worker_beat = Beat("hub message worker", max_busy=300.0)
        self.disk = Pause("receiving", cfg.studies_dir, cfg.receiver.min_free_mb * 1_000_000)
        self._disk_paused = False
        self.partitions: Partitions | None = None
        self._warned_sqlite = False
        # Who holds a verification claim: this run of this receiver (its next start gives back what this run held).
        self.claimant = f"{cfg.hub.id}:{os.getpid()}:{uuid.uuid4().hex[:12]}"

    # --- MQTT -------------------------------------------------------------------------------------------------
    def _make_client(self):
        b = self.cfg.broker
        client = protocol.mqtt_client(f"wasla-hub-{self.cfg.hub.id}", tls_ca_file=b.tls_ca_file,
                                      tls_cert_file=b.tls_cert_file, tls_key_file=b.tls_key_file,
                                      username=b.username, password_file=b.password_file)
        client.on_connect = self._on_connect
        client.on_disconnect = lambda *_a: self.connected.clear()
        # Manual acks: the PUBACK goes once the worker has committed what the message carried, so a receiver killed
        # mid-message (or mid-batch) gets it again from the broker.
        client.manual_ack_set(True)
        client.max_inflight_messages_set(REPLY_WINDOW)
        client.on_message = self._on_message
        # "connected" once the receiver holds its partitions, which it takes after hearing the other receivers.
        self.partitions = Partitions(client, self.cfg.broker.share_group, self.cfg.hub.id,
                                     on_change=self._partitions_changed, on_settled=self.connected.set)
        return client

    def _partitions_changed(self, _mine: set[int], alive: set[str]) -> None:
        if len(alive) > 1 and isinstance(self.store.index, SqliteIndex) and not self._warned_sqlite:
            # Receivers beside each other take turns on SQLite's one write lock: correct, but no faster than one.
            self._warned_sqlite = True
            log.warning("%d receivers share a SQLite index: run one receiver, or use PostgreSQL (hub.database_url) "
                        "to spread the boxes over several", len(alive))

    def _on_connect(self, client, _userdata, flags, reason_code, _props) -> None:
        try:
            if reason_code.is_failure:
                log.warning("broker refused the connection: %s", reason_code)
                return
            client.subscribe(protocol.hub_filter(self.cfg.broker.share_group), qos=1)
            self.partitions.on_connect()
            log.info("hub receiver %s connected (session present: %s)", self.cfg.hub.id, flags.session_present)
        except Exception:  # noqa: BLE001 - an exception here would kill paho's network thread
            log.exception("on_connect failed")

    def _on_message(self, _client, _userdata, message) -> None:
        with self.beat.busy():
            try:
                # Blocks only while the inbox is full: then the broker holds the rest (back-pressure).
                payload = bytes(message.payload)
                self._inbox.put((message.mid, message.qos, message.topic, payload),
                                inbox_priority(message.topic, payload), len(payload))
            except Exception:  # noqa: BLE001 - paho's thread must outlive anything; unacked, it comes back
                log.exception("could not queue %s", message.topic)

    def problems(self) -> list[str]:
        if self._disk_paused:
            return []  # paused on purpose; `run` reports it in the status line
        found = [self.beat.problem(self._mqtt_thread, idle_ok=True)]
        if self._worker is not None:
            found.append(self.worker_beat.problem(self._worker, idle_ok=True))
        return [p for p in found if p]

    # --- the worker ---------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stopping.is_set():
            self.worker_beat.tick()
            first, self._carry = self._carry, None
            if first is None:
                try:
                    first = self._inbox.get(timeout=1.0)
                except queue.Empty:
                    continue
            batch = [first]
            if protocol.topic_kind(first[2]) in BATCHABLE:
                while len(batch) < MAX_BATCH:
                    try:
                        item = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    if protocol.topic_kind(item[2]) not in BATCHABLE:
                        self._carry = item  # next round, after this batch is committed and acknowledged
                        break
                    batch.append(item)
            with self.worker_beat.busy():
                try:
                    self.process(batch)
                except Exception:  # noqa: BLE001 - the worker must outlive anything; unacked, they come back
                    log.exception("handling a batch of %d message(s) failed", len(batch))

    def process(self, batch: list[tuple]) -> None:
        """Handle (mid, qos, topic, payload) items, then publish the replies and PUBACK them: a batch of small ones
        in one transaction, anything else one by one. Nothing is acknowledged while the disk is full."""
        if len(batch) > 1:
            self._tls.deferred, self._tls.in_batch = [], True
            try:
                with self.store.batch():
                    for _mid, _qos, topic, payload in batch:
                        self.handle(topic, payload)
            except Exception as err:  # noqa: BLE001 - the COMMIT failed: nothing of the batch is stored
                self._tls.deferred = None
                self._tls.in_batch = False
                if is_disk_full(err, self.cfg.studies_dir):
                    self.disk.hit()
                    self.pause_for_disk()
                    return
                log.warning("a batch of %d messages did not commit (%s); handling them one by one", len(batch),
                            type(err).__name__)
                for item in batch:
                    self.process([item])
                return
            replies, self._tls.deferred = self._tls.deferred, None
            self._tls.in_batch = False
        else:
            mid, qos, topic, payload = batch[0]
            self._tls.deferred = []
            try:
                self.handle(topic, payload)
            finally:
                replies, self._tls.deferred = self._tls.deferred, None
        if self._disk_paused:
            return  # disconnected: unacknowledged, every message of it comes again after the pause
        self._publish_replies(replies)
        for mid, qos, _topic, _payload in batch:
            if qos > 0 and self.client is not None:
                try:
                    self.client.ack(mid, qos)
                except Exception:  # noqa: BLE001 - a lost connection: the broker resends it, handled idempotently
                    log.debug("ack of message %s not sent", mid)

    def _publish_replies(self, replies: list[tuple[str, bytes]]) -> None:
        """Queue the replies on the socket ahead of the PUBACKs of the messages that caused them (see REPLY_WINDOW)."""
        for topic, data in replies:
            self.client.publish(topic, data, qos=1)

    def start(self) -> "Receiver":
        back = self.store.release_claims(self.cfg.hub.id, keep=self.claimant)
        if back:
            log.info("%d verification(s) interrupted by the last stop taken up again", back)
        b = self.cfg.broker
        self.client = self._make_client()
        self.client.connect_async(b.host, b.port, keepalive=b.keepalive_seconds, clean_start=False,
                                  properties=protocol.connect_properties(int(b.session_expiry_hours * 3600)))
        self.client.loop_start()
        self._mqtt_thread = paho_thread(self.client)
        self.partitions.start()
        self._worker = threading.Thread(target=self._work, name="hub-worker", daemon=True)
        self._worker.start()
        return self

    def stop(self) -> None:
        if self.client is not None:
            if self.partitions is not None:
                self.partitions.leave()
            self.client.disconnect()
            self.client.loop_stop()
        self._stopping.set()
        if self._worker is not None:
            self._worker.join(timeout=30)  # what is still queued was never acknowledged: the broker keeps it
        self.store.close()

    def _reply(self, device: str, kind: str, **fields) -> None:
        if self.client is None:
            return
        topic, data = protocol.down_topic(device, kind), protocol.encode(kind, device, **fields)
        deferred = getattr(self._tls, "deferred", None)
        if deferred is not None:
            deferred.append((topic, data))  # inside a batch: an ack may only leave once the batch is committed
            return
        self.client.publish(topic, data, qos=1)

    # --- the logic --------------------------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes) -> None:
        device = None
        try:
            try:
                device = protocol.parse_topic(topic, "up")[0]
            except ProtocolError:
                pass
            msg = protocol.decode(topic, payload, direction="up", max_bytes=self.cfg.receiver.max_message_bytes)
        except ProtocolError as err:
            self._dead(topic, device, str(err), payload)
            return
        except Exception as err:  # noqa: BLE001 - returning lets paho PUBACK it: a poison message never comes back
            log.exception("decoding %s failed", topic)
            self._dead(topic, device, f"decode error: {type(err).__name__}: {str(err)[:200]}", payload)
            return
        try:
            self._dispatch(msg)
        except UidCollisionError as err:
            self._collision(topic, msg, err, payload)
        except TransferRefused as err:
            self._refuse(topic, msg, str(err), payload)
        except ConflictError as err:
            if getattr(self._tls, "in_batch", False):
                raise  # the batch is rolled back and its messages taken one at a time, where a conflict is retried
            self._dead(topic, device, str(err), payload)
        except (ProtocolError, StoreError, BadInputError) as err:
            self._dead(topic, device, str(err), payload)
        except Exception as err:  # noqa: BLE001 - the receiver must outlive any message
            if is_disk_full(err, self.cfg.studies_dir):
                # Not the message's fault, and a dead letter would not fit either: stop taking messages (they wait
                # at the broker, and the box resends whatever was not confirmed) until space returns.
                self.disk.hit()
                self.pause_for_disk()
                return
            log.exception("handling %s failed", topic)
            self._dead(topic, device, f"handler error: {type(err).__name__}", payload)

    def _dispatch(self, msg: protocol.Message) -> None:
        """Handle one decoded message; a conflict with another receiver's transaction is tried again, not
        dead-lettered (inside a batch it ends the batch, which process() then takes one message at a time)."""
        for attempt in range(CONFLICT_RETRIES + 1):
            try:
                getattr(self, f"_on_{msg.kind}")(msg)
                self.handled += 1
                self.by_device[msg.device] += 1
                return
            except ConflictError:
                if getattr(self._tls, "in_batch", False) or attempt == CONFLICT_RETRIES:
                    raise
                log.info("%s from %s met another writer; trying again", msg.kind, msg.device)
                time.sleep(0.05 * (attempt + 1))

    # --- a full disk ----------------------------------------------------------------------------------------------
    def pause_for_disk(self) -> None:
        """Disconnect from the broker (our persistent session keeps queueing); tend_disk() reconnects."""
        if self._disk_paused or self.client is None:
            return
        self._disk_paused = True
        if self.partitions is not None:
            self.partitions.leave(stop=False)  # the other receivers take this one's boxes while it waits
        self.client.disconnect()

    def tend_disk(self) -> str | None:
        """Called every few seconds by `run`: pause while the disk is full, resume when space returns; the status."""
        room = self.disk.room()
        if not room and not self._disk_paused:
            self.pause_for_disk()
        elif room and self._disk_paused and self.client is not None:
            self.client.loop_stop()  # paho's thread ended with the disconnect
            self.client.reconnect()
            self.client.loop_start()
            self._mqtt_thread = paho_thread(self.client)
            self._disk_paused = False
        return "disk full: receiving paused until space returns" if self._disk_paused else None

    def _collision(self, topic: str, msg: protocol.Message, err: UidCollisionError, payload: bytes) -> None:
        """Kept for the operator (`wasla-hub collisions`), dead-lettered, and a final refusal to the claimant box,
        so it stops resending and its technician sees why; the owner's data is untouched."""
        self.store.record_collision(err)
        self._refuse(topic, msg, f"{err}: ask the clinic's technician to check the modality's UID settings", payload)

    def _refuse(self, topic: str, msg: protocol.Message, reason: str, payload: bytes) -> None:
        """Dead letter plus a final "failed" answer: the box stops resending what the hub will never take."""
        self._dead(topic, msg.device, reason, payload)
        if msg.kind == "flag":
            self._reply(msg.device, "ack", flag_id=msg["flag_id"], status="failed", reason=reason)
        elif msg.get("transfer"):
            t = self.store.transfer(msg["transfer"])
            if t is not None and t["device"] == msg.device:
                self.store.fail_transfer(t["transfer_id"], reason)
            extra = {"count": t["count"]} if t else {}
            self._reply(msg.device, "ack", transfer=msg["transfer"], status="failed", reason=reason, **extra)

    def _dead(self, topic: str, device: str | None, reason: str, payload: bytes) -> None:
        try:
            self.store.dead_letter(topic, device, reason, payload)
            if device:
                self.store.seen(device, bad=True)
        except Exception:  # noqa: BLE001
            log.exception("could not record a dead letter for %s", topic)

    def _on_status(self, msg: protocol.Message) -> None:
        self.store.record_status(msg.device, msg["online"], msg["at"], count_message=True)
        log.info("box %s is %s", msg.device, "online" if msg["online"] else "offline")
        if msg["online"]:
            self.publish_pending_reads(msg.device, force=True)

    def _on_heartbeat(self, msg: protocol.Message) -> None:
        self.store.record_heartbeat(msg.device, msg.fields, count_message=True)
        self.publish_pending_reads(msg.device)

    def _on_flag(self, msg: protocol.Message) -> None:
        preview = None
        if msg.get("preview_jpeg_b64"):
            try:
                preview = base64.b64decode(msg["preview_jpeg_b64"], validate=True)
            except (binascii.Error, ValueError):
                log.warning("flag %s from %s: preview is not base64; ignored", msg["flag_id"], msg.device)
        self.store.record_flag(msg.device, msg.fields, preview, count_message=True)
        log.info("flag %s from %s: study %s %s", msg["flag_id"], msg.device, msg["study_uid"], msg["label"])
        self._reply(msg.device, "ack", flag_id=msg["flag_id"], status="complete")

    def _admit(self, msg: protocol.Message) -> bool:
        """A transfer is bounded before it takes any disk: its declared size by the instance limit (else refused),
        a new one by the box's quota of unfinished bytes (else left unanswered: the box asks again later)."""
        r = self.cfg.receiver
        if msg["size"] > r.max_instance_mb * 1_000_000:
            raise TransferRefused(f"transfer declares {msg['size']} bytes, over the hub's limit of "
                                  f"{r.max_instance_mb} MB per instance")
        if self.store.transfer(msg["transfer"]) is not None:
            return True
        held = self.store.partial_bytes(msg.device)
        if held + msg["size"] > r.partial_quota_mb * 1_000_000:
            log.warning("box %s holds %d MB of unfinished transfers (quota %d MB): transfer %s waits", msg.device,
                        held // 1_000_000, r.partial_quota_mb, msg["transfer"])
            self.store.seen(msg.device, bad=True)
            return False
        return True

    def expire_partials(self) -> int:
        n = self.store.expire_partials(time.time() - self.cfg.receiver.partial_expiry_days * 86400)
        if n:
            log.info("%d unfinished transfer(s) expired", n)
        return n

    def _on_manifest(self, msg: protocol.Message) -> None:
        self.store.seen(msg.device)
        if not self._admit(msg):
            return
        # Another box's study or instance is never "already stored" for this one: it is refused as a collision.
        self.store.check_owner(msg.device, msg["study_uid"], msg["sop_instance_uid"])
        t = self.store.upsert_transfer(msg.device, msg.fields)
        copy = self.store.stored_copy(msg["sop_instance_uid"])
        if t["state"] != "complete" and copy is not None:
            # Same instance already filed (another transfer id, e.g. a re-encode after a box crash): keep one copy.
            log.info("transfer %s: %s is already stored; acknowledged without storing again", t["transfer_id"],
                     msg["sop_instance_uid"])
            self._ack_complete(msg.device, t["transfer_id"], t["count"])
            return
        self._ack_state(msg.device, t)

    def _on_chunk(self, msg: protocol.Message) -> None:
        if msg.get("compact"):
            t = self._compact_transfer(msg)
            if t is None:
                return
        else:
            if not self._admit(msg):
                return
            t = self.store.upsert_transfer(msg.device, msg.fields)
        if t["state"] in ("complete", "failed"):
            self.store.seen(msg.device, chunk=True, dup=True)
            self._ack_state(msg.device, t)  # a replay after the end: say again how it ended
            return
        # The chunk's row and the box's counters in one durable transaction: one WAL fsync per chunk, not two.
        with self.store.batch():
            new = self.store.put_chunk(t["transfer_id"], msg["index"], msg["index"] * t["chunk_size"], msg.data)
            self.store.seen(msg.device, chunk=True, dup=not new)
        have = self.store.have(t["transfer_id"])
        if len(have) == t["count"] and self.store.claim_for_verify(t["transfer_id"], self.claimant):
            self._finish(msg.device, t["transfer_id"])
            return
        self._reply(msg.device, "ack", transfer=t["transfer_id"], status="partial", have=protocol.to_ranges(have),
                    count=t["count"])

    def _compact_transfer(self, msg: protocol.Message) -> dict | None:
        """The transfer a compact chunk belongs to, its length checked against the manifest; None if unknown."""
        tid, index = msg["transfer"], msg["index"]
        t = self.store.transfer(tid)
        # Receivers sharing the boxes' messages: the manifest may be in another receiver's hands, committing in
        # the shared index at this moment. A short look again saves the box a reset and a resend of everything.
        for _ in range(UNKNOWN_RECHECKS if t is None else 0):
            time.sleep(0.1)
            t = self.store.transfer(tid)
            if t is not None:
                break
        if t is None:
            self.store.seen(msg.device, chunk=True, dup=True)
            log.info("chunk %d of unknown transfer %s from %s: asking for its manifest", index, tid, msg.device)
            self._reply(msg.device, "ack", transfer=tid, status="unknown", reason="no manifest for this transfer")
            return None
        if t["device"] != msg.device:
            raise ProtocolError(f"chunk for transfer {tid}, which belongs to another device")
        if not 0 <= index < t["count"]:
            raise ProtocolError(f"chunk {index} outside 0..{t['count'] - 1} of transfer {tid}")
        expected = min(t["chunk_size"], t["size"] - index * t["chunk_size"])
        if len(msg.data) != expected:
            raise ProtocolError(f"chunk {index} of {tid}: {len(msg.data)} bytes, the manifest says {expected}")
        return t

    def _finish(self, device: str, tid: str) -> None:
        """Verify and file the assembled study (sync.hub.verify); only then the final ack."""
        t = self.store.transfer(tid)
        verdict = verify_and_file(self.store, t, device)
        if verdict.status == "retry":
            self._reply(device, "ack", transfer=tid, status="retry", have=[], count=t["count"], reason=verdict.reason)
        elif verdict.status == "failed":
            self._reply(device, "ack", transfer=tid, status="failed", count=t["count"], reason=verdict.reason)
        else:
            self._ack_complete(device, tid, t["count"])
            if verdict.new and self.forwarder is not None:
                self.forwarder.wake.set()

    def _ack_complete(self, device: str, tid: str, count: int) -> None:
        self._reply(device, "ack", transfer=tid, status="complete", have=[[0, count - 1]], count=count)

    def _ack_state(self, device: str, t: dict) -> None:
        tid = t["transfer_id"]
        if t["state"] == "complete":
            self._ack_complete(device, tid, t["count"])
        elif t["state"] == "failed":
            self._reply(device, "ack", transfer=tid, status="failed", count=t["count"], reason=(t["reason"] or "")[:300])
        else:
            have = self.store.have(tid)
            if len(have) == t["count"] and self.store.claim_for_verify(tid, self.claimant):
                self._finish(device, tid)  # a receiver died between the last chunk and its verdict
                return
            self._reply(device, "ack", transfer=tid, status="partial", have=protocol.to_ranges(have), count=t["count"])

    def publish_pending_reads(self, device: str, force: bool = False) -> int:
        """Reads the box has not confirmed: (re)publish them. The box ignores a read id it has applied already."""
        if self.client is None:
            return 0
        cutoff = time.time() if force else time.time() - self.cfg.receiver.read_resend_seconds
        n = 0
        for r in self.store.reads_to_publish(device, cutoff):
            info = self.client.publish(protocol.down_topic(device, "read"), read_payload(r), qos=1)
            if info.rc == mqtt.MQTT_ERR_SUCCESS:
                self.store.read_published(r["read_id"])
                n += 1
        return n


def read_payload(r: dict) -> bytes:
    return protocol.encode("read", r["device"], read_id=r["read_id"], study_uid=r["study_uid"],
                           disposition=r["disposition"], note=r.get("note"), by=r.get("by"), at=r["at"])
