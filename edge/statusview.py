"""Live terminal displays: the `wasla status --watch` screen (data gathering + rich rendering) and progress bars."""
from __future__ import annotations

import json
import shutil
import socket
import time
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeRemainingColumn
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from sync.core.i18n import N_, _, is_rtl, label_name, ltr, state_name
from edge.store import STATES, Store

# Rate from the last refreshes, smoothed: a GEO link's throughput swings a lot from one chunk to the next.
RATE_SMOOTHING = 0.3
# Before two refreshes have seen bytes move, estimate the rate from transfers finished in this window.
RECENT_WINDOW_S = 900
LINK_HISTORY = 60
LABEL_STYLE = {"urgent": "bold red", "review": "yellow", "normal": "green", "pending": "dim"}


def broker_probe(host: str, port: int, timeout: float = 0.5) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return True
        except OSError:
            return False

    return probe


class StatusSampler:
    """Takes snapshots of the box (plain, JSON-ready dicts with stable English keys) and remembers what the
    rate and the link history need between them. Only reads the store: the daemon owns the writes."""

    def __init__(self, cfg, store: Store, *, probe: Callable[[], bool] | None = None,
                 clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self.store = store
        self.clock = clock
        self.probe = probe or broker_probe(cfg.sync.broker_host, cfg.sync.broker_port)
        self.link: deque[tuple[float, bool]] = deque(maxlen=LINK_HISTORY)
        self._last_bytes: tuple[float, int] | None = None
        self._rate: float | None = None

    def sample(self) -> dict[str, Any]:
        now = self.clock()
        up = bool(self.probe())
        self.link.append((now, up))
        upload = self._upload(now)
        disk = shutil.disk_usage(self.cfg.box.data_dir)
        return {
            "at": now, "box": self.cfg.box.id,
            "ingest": self._ingest(now),
            "states": self.store.counts(), "labels": self.store.label_counts(),
            "upload": upload,
            "link": self._link(now),
            "disk": {"free_mb": round(disk.free / 1e6), "total_mb": round(disk.total / 1e6),
                     "reserve_mb": self.cfg.storage.min_free_mb},
            "urgent": self._urgent(),
        }

    def _ingest(self, now: float) -> dict[str, Any]:
        row = self.store.query(
            "SELECT SUM(received_at >= ?) AS m1, SUM(received_at >= ?) AS m10, MAX(received_at) AS last "
            "FROM instances", [now - 60, now - 600])[0]
        m10 = row["m10"] or 0
        return {"last_minute": row["m1"] or 0, "last_10_min": m10, "per_minute": round(m10 / 10, 1),
                "last_at": row["last"]}

    def _outbox_rows(self, sql: str, params: list) -> list[dict]:
        try:
            return self.store.query(sql, params)
        except Exception:  # noqa: BLE001 - a store from before the sync migration has no outbox yet
            return []

    def _upload(self, now: float) -> dict[str, Any]:
        active = self._outbox_rows(
            "SELECT kind, state, study_uid, label, transfer_id, size, chunk_size, count, have, attempts, updated_at "
            "FROM outbox WHERE kind = 'transfer' AND state IN ('pending', 'confirmed') ORDER BY priority, id", [])
        done = self._outbox_rows(
            "SELECT COALESCE(SUM(size), 0) AS b FROM outbox WHERE kind = 'transfer' AND state = 'done'", [])
        confirmed = (done[0]["b"] if done else 0) + sum(_have_bytes(r) for r in active)
        if self._last_bytes is not None and now > self._last_bytes[0]:
            delta = confirmed - self._last_bytes[1]
            if delta > 0:
                rate = delta / (now - self._last_bytes[0])
                self._rate = rate if self._rate is None else (1 - RATE_SMOOTHING) * self._rate + RATE_SMOOTHING * rate
        self._last_bytes = (now, confirmed)
        rate, source = self._rate, "measured"
        if rate is None:
            recent = self._outbox_rows(
                "SELECT COALESCE(SUM(size), 0) AS b FROM outbox WHERE kind = 'transfer' AND state = 'done' "
                "AND done_at >= ?", [now - RECENT_WINDOW_S])
            b = recent[0]["b"] if recent else 0
            rate, source = (b / RECENT_WINDOW_S, "recent") if b else (None, None)
        current = None
        # The transfer under way is the best-priority one that has started; otherwise the next one to go.
        started = [r for r in active if r["state"] == "pending" and (_have_bytes(r) or r["attempts"])]
        row = (started or [r for r in active if r["state"] == "pending"] or [None])[0]
        if row is not None:
            sent = _have_bytes(row)
            remaining = max(0, (row["size"] or 0) - sent)
            current = {"study_uid": row["study_uid"], "label": row["label"], "transfer_id": row["transfer_id"],
                       "size": row["size"] or 0, "sent_bytes": sent, "count": row["count"],
                       "eta_s": round(remaining / rate) if rate else None}
        queued = self._outbox_rows("SELECT COUNT(*) AS n, COALESCE(SUM(size), 0) AS b FROM outbox "
                                   "WHERE state IN ('pending', 'confirmed')", [])
        return {"enabled": self.cfg.sync.enabled, "current": current,
                "queue_depth": queued[0]["n"] if queued else 0, "queued_bytes": queued[0]["b"] if queued else 0,
                "rate_bps": round(rate, 1) if rate else None, "rate_source": source}

    def _link(self, now: float) -> dict[str, Any]:
        samples = list(self.link)
        up = samples[-1][1]
        since = samples[-1][0]
        for t, u in reversed(samples):
            if u != up:
                break
            since = t
        changes = sum(1 for a, b in zip(samples, samples[1:]) if a[1] != b[1])
        return {"up": up, "broker": f"{self.cfg.sync.broker_host}:{self.cfg.sync.broker_port}",
                "since": since, "changes": changes, "history": [int(u) for _t, u in samples]}

    def _urgent(self, limit: int = 5) -> list[dict]:
        rows = self.store.query(
            "SELECT study_uid, modality, n_instances, COALESCE(triaged_at, first_received_at) AS at FROM studies "
            "WHERE label = 'urgent' ORDER BY at DESC LIMIT ?", [limit])
        for r in rows:
            flag = self._outbox_rows("SELECT state FROM outbox WHERE kind = 'flag' AND flag_id = ?",
                                     ["urgent-" + r["study_uid"]])
            r["flag"] = flag[0]["state"] if flag else None
        return rows


def _have_bytes(row: dict) -> int:
    ranges = json.loads(row.get("have") or "[]")
    chunks = sum(b - a + 1 for a, b in ranges)
    return min(row.get("size") or 0, chunks * (row.get("chunk_size") or 0))


# --- formatting --------------------------------------------------------------------------------------------------

def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    # Number and unit in one message, so Arabic reads "<number> <unit>" from the right like any other phrase.
    for unit, scale in ((N_("{n} GB"), 1e9), (N_("{n} MB"), 1e6), (N_("{n} kB"), 1e3)):
        if n >= scale:
            return _(unit).format(n=ltr(f"{n / scale:.1f}"))
    return _("{n} B").format(n=ltr(int(n)))


def human_rate(bps: float | None) -> str:
    return _("measuring…") if not bps else _("{size}/s").format(size=human_bytes(bps))


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s >= 3600:
        return _("{hours} h {minutes} min").format(hours=ltr(s // 3600), minutes=ltr(s % 3600 // 60))
    if s >= 60:
        return _("{minutes} min {seconds} s").format(minutes=ltr(s // 60), seconds=ltr(s % 60))
    return _("{seconds} s").format(seconds=ltr(s))


def clock_time(t: float | None) -> str:
    return ltr(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))) if t else "-"


def short_uid(uid: str | None, keep: int = 28) -> str:
    """Long UIDs keep their tail (where studies differ); the ellipsis sits inside the isolate."""
    uid = uid or ""
    return ltr(uid if len(uid) <= keep else "…" + uid[-(keep - 1):])


# --- rendering ---------------------------------------------------------------------------------------------------

# In Arabic the screen is mirrored here (labels right of their values, panels titled on the right, the first
# column of panels on the right); the terminal does not reorder anything because every piece is an isolate
# (see sync/core/i18n.py).

def _stack(*rows: Any) -> Table:
    """Renderables one under the other (a Group would put a ProgressBar and the next text on the same line)."""
    t = Table.grid()
    t.add_column(justify="right" if is_rtl() else "left")
    for r in rows:
        t.add_row(r)
    return t


def _kv(rows: list[tuple[Any, Any]]) -> Table:
    """Label/value rows; in RTL the value comes first (left) and everything hugs the right edge."""
    rtl = is_rtl()
    t = Table.grid(padding=(0, 2), expand=rtl)
    t.add_column(style="" if rtl else "bold", justify="right" if rtl else "left", ratio=1 if rtl else None)
    t.add_column(style="bold" if rtl else "", justify="right" if rtl else "left")
    for k, v in rows:
        t.add_row(*((v, k) if rtl else (k, v)))
    return t


def _row(*cells: Any) -> list[Any]:
    return list(reversed(cells)) if is_rtl() else list(cells)


def _panel(body: Any, title: str, **kw) -> Panel:
    return Panel(body, title=title, title_align="right" if is_rtl() else "left", **kw)


def _head(snap: dict[str, Any], rtl: bool) -> Any:
    """The title line: box, time of the snapshot."""
    if rtl:
        head = Text.assemble(clock_time(snap["at"]), " :", _("Updated"), "   ", (ltr(snap["box"]), "bold"), " :",
                             _("Box"), "   ", ("Wasla", "bold cyan"), justify="right")
    else:
        head = Text.assemble(("Wasla", "bold cyan"), "   ", _("Box"), ": ", (ltr(snap["box"]), "bold"), "   ",
                             _("Updated"), ": ", clock_time(snap["at"]))
    return head


def _queue_view(snap: dict[str, Any], rtl: bool) -> Any:
    """Instances by state beside studies by label."""
    queue = Table(box=None, padding=(0, 1), show_header=False)
    labels = Table(box=None, padding=(0, 1), show_header=False)
    for t in (queue, labels):
        t.add_column(justify="right" if rtl else "left")
        t.add_column(justify="right")
    for state in STATES:
        n = snap["states"].get(state, 0)
        queue.add_row(*_row(state_name(state), Text(ltr(n), style="bold" if n else "dim")))
    for label in ("urgent", "review", "normal", "pending"):
        labels.add_row(*_row(Text(label_name(label), style=LABEL_STYLE[label]), ltr(snap["labels"].get(label, 0))))
    queue_grid = Table.grid(padding=(0, 4), expand=rtl)
    if rtl:
        queue_grid.add_column(ratio=1, justify="right")
        queue_grid.add_column(justify="right")
    queue_grid.add_row(*_row(queue, labels))
    return queue_grid


def _disk_view(snap: dict[str, Any]) -> Any:
    """Disk use against the reserve."""
    disk = snap["disk"]
    used = max(0, disk["total_mb"] - disk["free_mb"])
    low = disk["free_mb"] < disk["reserve_mb"] * 2
    disk_view = _stack(
        ProgressBar(total=max(1, disk["total_mb"]), completed=used, width=30,
                    complete_style="red" if low else "green"),
        _kv([(_("Free"), human_bytes(disk["free_mb"] * 1e6)), (_("Total"), human_bytes(disk["total_mb"] * 1e6)),
             (_("Kept in reserve"), human_bytes(disk["reserve_mb"] * 1e6))]))
    return disk_view


def _upload_view(snap: dict[str, Any]) -> Any:
    """The study being sent, its progress and the queue behind it."""
    up = snap["upload"]
    if not up["enabled"]:
        upload_view: Any = Text(_("Sync is off in the configuration."), style="dim")
    else:
        rows: list[tuple[Any, Any]] = [(_("Link rate"), human_rate(up["rate_bps"])),
                                       (_("Waiting to send"), _("{n} items, {size}").format(
                                           n=ltr(up["queue_depth"]), size=human_bytes(up["queued_bytes"])))]
        cur = up["current"]
        if cur:
            rows[:0] = [(_("Study"), Text(short_uid(cur["study_uid"]), style=LABEL_STYLE.get(cur["label"], ""))),
                        (_("Progress"), _stack(
                            ProgressBar(total=max(1, cur["size"]), completed=cur["sent_bytes"], width=30),
                            _("{sent} of {total}").format(sent=human_bytes(cur["sent_bytes"]),
                                                          total=human_bytes(cur["size"])))),
                        (_("Time left"), human_duration(cur["eta_s"]) if cur["eta_s"] is not None
                         else _("unknown until the link rate is measured"))]
        else:
            rows.insert(0, (_("Study"), Text(_("nothing to send"), style="dim")))
        upload_view = _kv(rows)
    return upload_view


def _link_view(snap: dict[str, Any]) -> Any:
    """The hub link now and its recent history."""
    link = snap["link"]
    strip = Text()
    for u in link["history"]:
        strip.append("█" if u else "▁", style="green" if u else "red")
    state = Text(_("up") if link["up"] else _("down"), style="bold green" if link["up"] else "bold red")
    link_view = _kv([(_("Hub broker"), ltr(link["broker"])),
                     (_("Now"), Text.assemble(state, " ", _("since {time}").format(time=clock_time(link["since"])))),
                     (_("History"), strip),
                     (_("Changes"), ltr(link["changes"]))])
    return link_view


def _urgent_view(snap: dict[str, Any], rtl: bool) -> Any:
    """The last urgent studies and whether their flags reached the hub."""
    urgent = Table(box=None, padding=(0, 1), header_style="bold", expand=rtl)
    # UIDs and times never wrap (a folded UID is unreadable and cannot be copied); the hub column gives way.
    for title, justify, keep in _row((_("study"), None, 24), (_("modality"), None, 0), (_("images"), "right", 0),
                                     (_("when"), None, 19), (_("hub"), None, 0)):
        urgent.add_column(title, justify="right" if rtl else (justify or "left"), no_wrap=bool(keep),
                          min_width=keep or None)
    for r in snap["urgent"]:
        flag = {"done": Text(_("flag received"), style="green"), "pending": Text(_("flag waiting"), style="yellow"),
                None: Text(_("not flagged yet"), style="dim")}.get(r["flag"], Text(state_name(r["flag"])))
        urgent.add_row(*_row(Text(short_uid(r["study_uid"], 24), style="bold red"), ltr(r["modality"] or ""),
                             ltr(r["n_instances"]), clock_time(r["at"]), flag))
    urgent_view: Any = urgent if snap["urgent"] else Text(_("no urgent study"), style="dim",
                                                          justify="right" if rtl else "left")
    return urgent_view


def render(snap: dict[str, Any]) -> Group:
    """The status screen for one snapshot, in the current language."""
    rtl = is_rtl()
    head = _head(snap, rtl)
    ing = snap["ingest"]
    ingest = _kv([(_("Per minute (last 10 min)"), ltr(ing["per_minute"])),
                  (_("Last minute"), ltr(ing["last_minute"])),
                  (_("Last ingest"), clock_time(ing["last_at"]))])

    queue_grid = _queue_view(snap, rtl)
    disk_view, upload_view, link_view = _disk_view(snap), _upload_view(snap), _link_view(snap)
    urgent_view = _urgent_view(snap, rtl)

    first = Group(_panel(ingest, _("Ingest")), _panel(queue_grid, _("Queue by state")), _panel(disk_view, _("Disk")))
    second = Group(_panel(upload_view, _("Current upload")), _panel(link_view, _("Link to the hub")))
    body = Table.grid(expand=True, padding=(0, 1))
    body.add_column(ratio=1)
    body.add_column(ratio=1)
    body.add_row(*_row(first, second))
    return Group(head, body, _panel(urgent_view, _("Last urgent flags"), border_style="red"),
                 Text(_("Ctrl-C to leave"), style="dim", justify="right" if rtl else "left"))


def watch(sampler: StatusSampler, console: Console, *, interval: float = 2.0, count: int = 0,
          as_json: bool = False, sleep: Callable[[float], None] = time.sleep) -> int:
    """Refresh until Ctrl-C (or `count` refreshes). JSON mode prints one snapshot per line instead of a screen."""
    n = 0
    try:
        if as_json:
            while True:
                console.file.write(json.dumps(sampler.sample(), default=str, ensure_ascii=False) + "\n")
                console.file.flush()
                n += 1
                if count and n >= count:
                    return 0
                sleep(interval)
        with Live(render(sampler.sample()), console=console, auto_refresh=False, screen=False) as live:
            n = 1
            while not count or n < count:
                sleep(interval)
                live.update(render(sampler.sample()), refresh=True)
                n += 1
    except KeyboardInterrupt:
        pass
    return 0


@contextmanager
def progress_bar(label: str, total: int | None, *, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr (stdout stays clean for --json); `total=None` shows a spinner. Yields advance(n)."""
    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield lambda _n=1: None
        return
    columns = [SpinnerColumn(), TextColumn("{task.description}")]
    if total is not None:
        columns += [BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n=1: progress.advance(task, n)


__all__ = ["StatusSampler", "human_bytes", "human_duration", "progress_bar", "render", "watch"]
