"""What the box sends next: a pure decision over the outbox rows and the link's state at a given time (no clock, no I/O)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from edge.uplink.outbox import CONFIRMED, FLAG


@dataclass(frozen=True)
class LinkState:
    """What the uploader knows of each transfer and flag, as seen by one decision (read only here)."""

    conn_no: int  # the connection now up: a manifest sent on an earlier one must go again
    flag_sent: dict[str, float]  # flag id -> when it last went out
    queried: dict[str, float]  # confirmed transfer -> when the hub was last asked whether it is done
    manifest_conn: dict[str, int]  # transfer -> connection its manifest went out on
    resume_wait: dict[str, float]  # transfer -> until when it waits for the hub's "what I have"
    ack_timeout: float  # seconds before an unanswered flag or query is sent again


@dataclass(frozen=True)
class Pick:
    """One decision. `action`: "flag", "query" (a confirmed transfer's manifest again), "manifest", "chunk",
    "pace" (wait `wait` seconds for the rate cap, then decide again), "full" (the in-flight window is full: wait
    for a broker ack) or "idle" (nothing may go). `blocked`: why bulk is held back (budget, window), if it is."""

    action: str
    row: dict | None = None
    index: int | None = None
    wait: float = 0.0
    blocked: str = ""
    resumed: list[str] = field(default_factory=list)  # transfers whose resume wait is over (drop their deadline)


def pick(rows: list[dict], now: float, state: LinkState, *, next_index: Callable[[dict], int | None],
         allow_bulk: Callable[[bool], tuple[bool, str]], window_full: Callable[[int], bool],
         pace: Callable[[int], float]) -> Pick:
    """The single most important thing that may go at `now`, rows in the outbox's priority order.

    A study's images never reach the hub before its flag does: the radiologist's list learns of an urgent study
    from its flag, and a chunk that overtook it (a lane still reconnecting after a cut) would arrive unannounced.
    So a study's transfers wait while a flag for it is not yet confirmed by the hub: one round trip at most."""
    blocked = ""
    resumed: list[str] = []
    unflagged = {r["study_uid"] for r in rows if r["kind"] == FLAG}
    for row in rows:
        if row["kind"] == FLAG:
            sent = state.flag_sent.get(row["flag_id"])
            if sent is None or now - sent > state.ack_timeout:
                return Pick("flag", row, blocked=blocked, resumed=resumed)
            continue
        tid = row["transfer_id"]
        if row["study_uid"] in unflagged:
            continue
        if row["state"] == CONFIRMED:
            # Every chunk is at the hub; ask again only if its final ack seems lost.
            last = state.queried.get(tid)
            if last is None or now - last > state.ack_timeout:
                return Pick("query", row, blocked=blocked, resumed=resumed)
            continue
        ok, why = allow_bulk(row["label"] == "urgent")
        if not ok:
            blocked = why
            continue
        if state.manifest_conn.get(tid) != state.conn_no:
            return Pick("manifest", row, blocked=blocked, resumed=resumed)
        deadline = state.resume_wait.get(tid)
        if deadline is not None:
            if now < deadline:
                continue
            resumed.append(tid)
        index = next_index(row)
        if index is None:
            continue
        length = min(row["chunk_size"], row["size"] - index * row["chunk_size"])
        if window_full(length):
            # a PUBACK wakes the sender; meanwhile nothing below this row may overtake it either
            return Pick("full", row, index, blocked=blocked, resumed=resumed)
        wait = pace(length)
        if wait > 0:
            return Pick("pace", row, index, wait=wait, blocked=blocked, resumed=resumed)
        return Pick("chunk", row, index, blocked=blocked, resumed=resumed)
    return Pick("idle", blocked=blocked, resumed=resumed)
