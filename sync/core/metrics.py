"""The Prometheus endpoint box and hub share: `GET /metrics` in the text exposition format (0.0.4).

A small http.server thread rather than prometheus_client: the numbers are read from the SQLite store when scraped
(they survive restarts and need no second bookkeeping), the only in-process series is the triage latency histogram,
and the format is a dozen lines — not worth a dependency on an appliance that installs offline.
"""
from __future__ import annotations

import logging
import math
import threading
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
