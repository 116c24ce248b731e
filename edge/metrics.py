"""Optional Prometheus endpoint for the box and the hub: `GET /metrics` in the text exposition format (0.0.4).

A small http.server thread rather than prometheus_client: the numbers are read from the SQLite store when scraped
(they survive restarts and need no second bookkeeping), the only in-process series is the triage latency histogram,
and the format is a dozen lines — not worth a dependency on an appliance that installs offline.
"""
from __future__ import annotations

import logging
import math
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Triage latency buckets (seconds): a chest CR on a small CPU takes 0.1-2 s; a long cine can take tens.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Goodput is what the far side confirmed in this window, divided by it.
GOODPUT_WINDOW_S = 300.0


@dataclass
class Metric:
    name: str
    kind: str  # gauge, counter or histogram
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> "Metric":
        self.samples.append((labels, float(value)))
        return self


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return "NaN" if math.isnan(v) else repr(float(v)) if v != int(v) else str(int(v))


def exposition(metrics: Iterable[Metric]) -> str:
    out = []
    for m in metrics:
        out.append(f"# HELP {m.name} {m.help}")
        out.append(f"# TYPE {m.name} {m.kind}")
        for labels, value in m.samples:
            labels = dict(labels)
            name = labels.pop("__name__", m.name)
            lab = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            out.append(f"{name}{{{lab}}} {_number(value)}" if lab else f"{name} {_number(value)}")
    return "\n".join(out) + "\n"


class Histogram:
    """A cumulative histogram updated by the worker thread and read by the scrape thread."""

    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help, tuple(buckets)
        self._counts = [0] * len(self.buckets)
        self._sum = 0.0
        self._count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._sum += value
            self._count += 1
            for i, le in enumerate(self.buckets):
                if value <= le:
                    self._counts[i] += 1

    def metric(self) -> Metric:
        with self._lock:
            counts, total, n = list(self._counts), self._sum, self._count
        m = Metric(self.name, "histogram", self.help)
        for le, c in zip(self.buckets, counts):
            m.add(c, __name__=f"{self.name}_bucket", le=_number(le))
        m.add(n, __name__=f"{self.name}_bucket", le="+Inf")
        m.add(total, __name__=f"{self.name}_sum")
        m.add(n, __name__=f"{self.name}_count")
        return m


class MetricsServer:
    """`GET /metrics` on bind:port; `collect()` is called per scrape. Port 0 picks a free one (see `.port`)."""

    def __init__(self, bind: str, port: int, collect: Callable[[], list[Metric]]):
        self.collect = collect
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                if self.path.split("?")[0] not in ("/metrics", "/metrics/"):
                    self.send_error(404, "only /metrics here")
                    return
                try:
                    body = exposition(server.collect()).encode()
                    code = 200
                except Exception as err:  # noqa: BLE001 - a failed scrape must say so, not kill the thread
                    log.exception("metrics collection failed")
                    body, code = f"collection failed: {type(err).__name__}\n".encode(), 500
                self.send_response(code)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):
                log.debug("metrics %s " + fmt, self.client_address[0], *args)

        self.httpd = ThreadingHTTPServer((bind, port), Handler)
        self.httpd.daemon_threads = True
        self.httpd.timeout = 5
        self.port = self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    def start(self) -> "MetricsServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        log.info("metrics on http://%s:%s/metrics", self.httpd.server_address[0], self.port)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread:
            self._thread.join(5)


def start(metrics_cfg, collect: Callable[[], list[Metric]]) -> MetricsServer | None:
    """The server when `[metrics] enabled`, else None; OSError (port taken) is the caller's to report."""
    if not metrics_cfg.enabled:
        return None
    return MetricsServer(metrics_cfg.bind, metrics_cfg.port, collect).start()


# --- the box ------------------------------------------------------------------------------------------------------

def box_collector(store, *, box_id: str, data_dir, latency: Histogram, worker=None,
                  uploader_ref: Callable[[], object] | None = None) -> Callable[[], list[Metric]]:
    """What a box reports: queue depth, triage latency, link goodput, bytes sent per class, quarantines."""

    def collect() -> list[Metric]:
        now = time.time()
        out = [Metric("wasla_box_info", "gauge", "Constant 1, labelled with the box id.").add(1, box=box_id)]
        states = Metric("wasla_instances", "gauge", "Instances on the box by state.")
        for state, n in store.counts().items():
            states.add(n, state=state)
        labels = Metric("wasla_studies", "gauge", "Studies on the box by triage label (pending = not decided).")
        for label, n in store.label_counts().items():
            labels.add(n, label=label)
        quarantines = store.query("SELECT COUNT(*) AS n FROM events WHERE kind = 'quarantine'")[0]["n"]
        out += [states, labels,
                Metric("wasla_quarantines_total", "counter", "Inputs quarantined since the store was created.")
                .add(quarantines),
                Metric("wasla_triage_queue_depth", "gauge", "Instances waiting for triage (received + processing).")
                .add(sum(n for s, n in store.counts().items() if s in ("received", "processing"))),
                latency.metric()]
        if worker is not None:
            out.append(Metric("wasla_triaged_total", "counter", "Instances triaged by this process.")
                       .add(worker.processed))
        ob = store.query("SELECT COUNT(*) AS n, COALESCE(SUM(size), 0) AS bytes, MIN(created_at) AS oldest "
                         "FROM outbox WHERE state IN ('pending', 'confirmed')")[0]
        out += [Metric("wasla_sync_queue_depth", "gauge", "Flags and transfers in the outbox not yet done.")
                .add(ob["n"]),
                Metric("wasla_sync_queued_bytes", "gauge", "Wire bytes of transfers not yet done.").add(ob["bytes"]),
                Metric("wasla_sync_oldest_unsent_age_seconds", "gauge", "Age of the oldest outbox entry not done.")
                .add(now - ob["oldest"] if ob["oldest"] else 0)]
        by_class = store.query("SELECT COALESCE(SUM(flag), 0) AS flag, COALESCE(SUM(bulk), 0) AS bulk, "
                               "COALESCE(SUM(telemetry), 0) AS telemetry FROM sync_usage")[0]
        sent = Metric("wasla_sync_sent_bytes_total", "counter",
                      "Bytes published to the broker by class (flag, bulk = studies, telemetry), resends included.")
        for cls in ("flag", "bulk", "telemetry"):
            sent.add(by_class[cls], **{"class": cls})
        delivered = Metric("wasla_sync_delivered_bytes_total", "counter",
                           "Wire bytes of transfers the hub verified and stored, by study label; rate() is goodput.")
        for r in store.query("SELECT COALESCE(label, 'none') AS label, COALESCE(SUM(size), 0) AS bytes FROM outbox "
                             "WHERE kind = 'transfer' AND state = 'done' GROUP BY label"):
            delivered.add(r["bytes"], label=r["label"])
        recent = store.query("SELECT COALESCE(SUM(size), 0) AS bytes FROM outbox WHERE kind = 'transfer' "
                             "AND state = 'done' AND done_at >= ?", [now - GOODPUT_WINDOW_S])[0]["bytes"]
        out += [sent, delivered,
                Metric("wasla_sync_goodput_bytes_per_second", "gauge",
                       f"Bytes the hub confirmed over the last {GOODPUT_WINDOW_S:.0f} s, per second.")
                .add(recent / GOODPUT_WINDOW_S)]
        up = uploader_ref() if uploader_ref else None
        if up is not None:
            out += [Metric("wasla_sync_connected", "gauge", "1 while connected to the broker.").add(int(up.connected)),
                    Metric("wasla_sync_chunks_sent_total", "counter", "Chunks published by this process.")
                    .add(up.stats.get("chunks_sent", 0)),
                    Metric("wasla_sync_chunks_resent_total", "counter", "Chunks published again (lost or unconfirmed).")
                    .add(up.stats.get("chunks_resent", 0))]
        try:
            free = shutil.disk_usage(data_dir).free
        except OSError:
            free = 0
        out.append(Metric("wasla_disk_free_bytes", "gauge", "Free bytes on the data disk.").add(free))
        return out

    return collect


# --- the hub ------------------------------------------------------------------------------------------------------

def hub_collector(store, *, hub_id: str, receiver=None) -> Callable[[], list[Metric]]:
    """What a hub reports: per-box queue depth and freshness, goodput, bytes received per class, failures."""

    def collect() -> list[Metric]:
        now = time.time()
        out = [Metric("wasla_hub_info", "gauge", "Constant 1, labelled with the hub id.").add(1, hub=hub_id)]
        if receiver is not None:
            out.append(Metric("wasla_hub_messages_handled_total", "counter", "Messages handled by this receiver.")
                       .add(receiver.handled))
        transfers = Metric("wasla_hub_transfers", "gauge", "Transfers by state.")
        for r in store.query("SELECT state, COUNT(*) AS n FROM transfers GROUP BY state"):
            transfers.add(r["n"], state=r["state"])
        received = Metric("wasla_hub_received_bytes_total", "counter",
                          "Wire bytes of verified and stored transfers, by study label.")
        for r in store.query("SELECT COALESCE(label, 'none') AS label, COALESCE(SUM(size), 0) AS bytes "
                             "FROM transfers WHERE state = 'complete' GROUP BY label"):
            received.add(r["bytes"], label=r["label"])
        recent = store.query("SELECT COALESCE(SUM(size), 0) AS bytes FROM transfers WHERE state = 'complete' "
                             "AND completed_at >= ?", [now - GOODPUT_WINDOW_S])[0]["bytes"]
        studies = Metric("wasla_hub_studies", "gauge", "Studies at the hub by label and whether they were read.")
        for r in store.query("SELECT COALESCE(label, 'none') AS label, read_disposition IS NOT NULL AS is_read, "
                             "COUNT(*) AS n FROM studies GROUP BY 1, 2"):
            studies.add(r["n"], label=r["label"], read="yes" if r["is_read"] else "no")
        dead = store.query("SELECT COUNT(*) AS n FROM dead_letters")[0]["n"]
        out += [transfers, received, studies,
                Metric("wasla_hub_goodput_bytes_per_second", "gauge",
                       f"Bytes verified and stored over the last {GOODPUT_WINDOW_S:.0f} s, per second.")
                .add(recent / GOODPUT_WINDOW_S),
                Metric("wasla_hub_dead_letters_total", "counter", "Messages refused (quarantined) by the receiver.")
                .add(dead)]
        depth = Metric("wasla_hub_box_queue_depth", "gauge", "Outbox depth each box reported in its last heartbeat.")
        seen = Metric("wasla_hub_box_last_seen_age_seconds", "gauge", "Seconds since each box was last heard.")
        online = Metric("wasla_hub_box_online", "gauge", "1 if the box's last status said online.")
        chunks = Metric("wasla_hub_box_chunks_total", "counter", "Chunks received from each box, duplicates included.")
        dups = Metric("wasla_hub_box_duplicate_chunks_total", "counter", "Chunks received twice (resends).")
        for b in store.query("SELECT device, queue_depth, last_seen, online, chunks, dup_chunks FROM boxes"):
            dev = b["device"]
            depth.add(b["queue_depth"] or 0, box=dev)
            seen.add(now - b["last_seen"] if b["last_seen"] else -1, box=dev)
            online.add(int(bool(b["online"])), box=dev)
            chunks.add(b["chunks"], box=dev)
            dups.add(b["dup_chunks"], box=dev)
        out += [depth, seen, online, chunks, dups]
        return out

    return collect
