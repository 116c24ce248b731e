"""The Prometheus endpoint box and hub share: `GET /metrics` in the text exposition format (0.0.4).

The numbers are read from the store when scraped (they survive restarts and need no second bookkeeping), so box and
hub describe them as `Metric`s from a collect function; prometheus_client's custom-collector interface renders them
(text format, escaping, counter naming) and serves them from a WSGI app that answers /metrics only.
"""
from __future__ import annotations

import logging
import math
import socketserver
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric as _Family
from prometheus_client.registry import Collector, CollectorRegistry

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


def _number(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return "NaN" if math.isnan(v) else repr(float(v)) if v != int(v) else str(int(v))


class _Adapter(Collector):
    """Our Metrics as prometheus_client families, collected afresh at each scrape."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]):
        self._collect = collect

    def collect(self):
        for m in self._collect():
            # prometheus_client names a counter family without its _total; the samples keep their full names.
            base = m.name[:-len("_total")] if m.kind == "counter" and m.name.endswith("_total") else m.name
            family = _Family(base, m.help, m.kind)
            for labels, value in m.samples:
                labels = dict(labels)
                family.add_sample(labels.pop("__name__", m.name), labels, value)
            yield family


def exposition(metrics: Iterable[Metric]) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Adapter(lambda: list(metrics)))
    return generate_latest(registry).decode()


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


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - wsgiref's signature
        log.debug("metrics %s " + format, self.client_address[0], *args)


class MetricsServer:
    """`GET /metrics` on bind:port; `collect()` is called per scrape. Port 0 picks a free one (see `.port`)."""

    def __init__(self, bind: str, port: int, collect: Callable[[], list[Metric]]):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Adapter(collect))

        def app(environ, start_response):
            if environ.get("PATH_INFO", "") not in ("/metrics", "/metrics/"):
                start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
                return [b"only /metrics here\n"]
            try:
                body, status = generate_latest(self.registry), "200 OK"
            except Exception as err:  # noqa: BLE001 - a failed scrape must say so, not kill the thread
                log.exception("metrics collection failed")
                body, status = f"collection failed: {type(err).__name__}\n".encode(), "500 Internal Server Error"
            start_response(status, [("Content-Type", CONTENT_TYPE), ("Content-Length", str(len(body)))])
            return [body]

        self.httpd = make_server(bind, port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
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
