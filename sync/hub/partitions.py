"""Which receiver takes which boxes: live receivers found through retained MQTT messages, partitions by rendezvous hash.

A box's up topics end in its partition (sync.wire.protocol.partition_of). Each receiver announces itself every few
seconds on a members topic (its will says it is gone; the generated broker allows no retained messages, so a newcomer
says hello and the others answer), hears the others, and subscribes to exactly the partitions that rendezvous hashing
gives it among the live ones. So a box's manifest and chunks reach one receiver, which has its transfer in
hand; when a receiver stops or dies, its partitions move to the others within seconds (a clean stop) or within the
broker's keepalive timeout (a crash); when it returns, they move back. Nothing is lost in a hand-over: both receivers
briefly hold the same shared subscription, the broker gives each message to one of them, and a box resends whatever
was not confirmed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable

from sync.wire import protocol

log = logging.getLogger(__name__)

MEMBERS_ROOT = "wasla/hub/v1/members"
BEAT_S = 10.0  # a live receiver re-announces itself this often ...
EXPIRE_S = 35.0  # ... and one not heard for this long is taken for dead, even if the broker never sent its will
SETTLE_S = 1.0  # after connecting, how long a receiver listens for the others' answers before it takes partitions
TICK_S = 0.5


def members_topic(group: str, member: str) -> str:
    return f"{MEMBERS_ROOT}/{group}/{member}"


def _weight(member: str, partition: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{member}/{partition}".encode()).digest()[:8], "big")


def owners(members: Iterable[str]) -> dict[int, str]:
    """partition -> the member that takes it. Rendezvous hashing: when a member joins or leaves, only the partitions
    it gains or loses move, and every receiver computes the same answer from the same member list."""
    alive = sorted(set(members))
    if not alive:
        return {}
    return {p: max(alive, key=lambda m: (_weight(m, p), m)) for p in range(protocol.PARTITIONS)}


class Partitions:
    """Keeps one receiver's MQTT client subscribed to the partitions it owns. Called from paho's thread (on_connect,
    the members callback) and from its own ticker; never raises into either."""

    def __init__(self, client, group: str, me: str, *, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[set[int], set[str]], None] | None = None,
                 on_settled: Callable[[], None] | None = None):
        self.client, self.group, self.me = client, group, me
        self.clock = clock
        self.on_change = on_change
        self.on_settled = on_settled  # called once a (re)connected receiver holds its partitions
        self._heard: dict[str, float] = {}
        self._claims: dict[str, set[int]] = {}  # the partitions each other receiver last said it holds
        self.owned: set[int] = set()
        self._lock = threading.Lock()
        self._last_beat = float("-inf")
        self._settle_at: float | None = None  # set while a new connection waits for the others' answers
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        client.will_set(members_topic(group, me), b"", qos=1)
        client.message_callback_add(members_topic(group, "+"), self._on_member)

    # --- membership -----------------------------------------------------------------------------------------
    def members(self) -> set[str]:
        now = self.clock()
        with self._lock:
            return {self.me} | {m for m, t in self._heard.items() if now - t <= EXPIRE_S}

    def _on_member(self, client, _userdata, message) -> None:
        try:
            if message.qos:
                client.ack(message.mid, message.qos)  # the receiver's client acknowledges by hand
            member = message.topic.rsplit("/", 1)[-1]
            if member == self.me:
                return
            with self._lock:
                answer = False
                if message.payload:
                    answer = member not in self._heard
                    self._heard[member] = self.clock()
                    try:
                        said = json.loads(message.payload)
                        self._claims[member] = {int(p) for p in said["partitions"]}
                        answer = answer or said.get("hello") is True
                    except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
                        self._claims[member] = set()
                else:
                    self._heard.pop(member, None)  # its will, or a clean leave
                    self._claims.pop(member, None)
            if answer:
                self._announce()  # a newcomer's hello: it learns of this receiver at once, not at the next beat
            self.rebalance()
        except Exception:  # noqa: BLE001 - paho's thread must outlive anything
            log.exception("membership message on %s not handled", message.topic)

    def _announce(self, hello: bool = False) -> None:
        with self._lock:
            said = {"member": self.me, "partitions": sorted(self.owned), **({"hello": True} if hello else {})}
        data = json.dumps(said).encode()
        self.client.publish(members_topic(self.group, self.me), data, qos=1)
        self._last_beat = self.clock()

    # --- subscriptions --------------------------------------------------------------------------------------
    def on_connect(self) -> None:
        """A new connection: say hello, and SETTLE_S later (the ticker) take the partitions this receiver owns among
        those that answered. The session may hold partitions it owned before it went away: only those it owns then
        stay, whatever the session says."""
        try:
            self.client.subscribe(members_topic(self.group, "+"), qos=1)
            with self._lock:
                self._settle_at = self.clock() + SETTLE_S
                self.owned = set()  # whatever the session holds, this receiver claims nothing until it has settled
            self._announce(hello=True)
        except Exception:  # noqa: BLE001
            log.exception("partition subscriptions not set up")

    def rebalance(self, fresh: bool = False) -> None:
        if self._settle_at is not None and not fresh:
            return  # still listening after a (re)connect: the ticker takes the partitions when it has heard
        alive = self.members()
        mine = {p for p, owner in owners(alive).items() if owner == self.me}
        with self._lock:
            held = set() if fresh else set(self.owned)
            take = sorted(mine - held)
            drop = sorted(set(range(protocol.PARTITIONS)) - mine) if fresh else sorted(held - mine)
            self.owned = mine
        # Take first, then drop: for a moment both receivers hold a partition, never neither.
        if take:
            self.client.subscribe([(protocol.partition_filter(self.group, p), 1) for p in take])
        if drop:
            self.client.unsubscribe([protocol.partition_filter(self.group, p) for p in drop])
        if (take or drop) and not fresh:
            self._announce()  # after the SUBSCRIBE on the same socket: a receiver handing over waits for this
            log.info("partitions rebalanced among %d receiver(s): %d owned here (+%d -%d)", len(alive), len(mine),
                     len(take), len(drop))
        if (take or drop) and self.on_change is not None:
            self.on_change(mine, alive)

    def tick(self) -> None:
        """Re-announce, forget receivers not heard for EXPIRE_S (clearing their retained record), rebalance."""
        now = self.clock()
        with self._lock:
            gone = [m for m, t in self._heard.items() if now - t > EXPIRE_S]
            for m in gone:
                del self._heard[m]
                self._claims.pop(m, None)
        for m in gone:
            log.warning("receiver %s not heard for %.0f s: its partitions are taken over", m, EXPIRE_S)
        if self._settle_at is not None and now >= self._settle_at:
            self.rebalance(fresh=True)
            self._settle_at = None
            self._announce()
            if self.on_settled is not None:
                self.on_settled()
        elif now - self._last_beat >= BEAT_S:
            self._announce()
        self.rebalance()

    def start(self) -> "Partitions":
        def loop() -> None:
            while not self._stop.wait(TICK_S):
                try:
                    if self.client.is_connected():
                        self.tick()
                except Exception:  # noqa: BLE001 - the ticker must outlive anything
                    log.exception("partition tick failed")

        self._thread = threading.Thread(target=loop, name="hub-partitions", daemon=True)
        self._thread.start()
        return self

    def leave(self, timeout: float = 5.0, stop: bool = True) -> None:
        """A clean stop (or a pause). Alone, this receiver keeps its subscriptions, so its persistent session queues
        the boxes' messages until it is back. With others, it says it is leaving, waits until they announce they
        hold its partitions, and only then unsubscribes: at no moment is a partition held by no one."""
        if stop:
            self._stop.set()
        try:
            others = self.members() - {self.me}
            info = self.client.publish(members_topic(self.group, self.me), b"", qos=1)
            info.wait_for_publish(timeout)
            if not others:
                return
            with self._lock:
                held = sorted(self.owned)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not self._covered(held):
                time.sleep(0.05)
            with self._lock:
                self.owned = set()
            if held:
                self.client.unsubscribe([protocol.partition_filter(self.group, p) for p in held])
        except Exception:  # noqa: BLE001 - stopping must finish; the will does the same
            log.debug("leaving the receiver group did not complete", exc_info=True)

    def _covered(self, partitions: list[int]) -> bool:
        with self._lock:
            claimed = set().union(*self._claims.values()) if self._claims else set()
        return set(partitions) <= claimed
