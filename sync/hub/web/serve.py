"""`wasla-hub web`: the worklist's process: the index, an MQTT connection for sending reads at once, and waitress."""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)


class ReadPublisher:
    """One persistent MQTT connection (client id wasla-hub-<id>-web) that publishes a read the moment it is saved."""

    def __init__(self, cfg):
        from sync.wire import protocol

        b = cfg.broker
        self.client = protocol.mqtt_client(f"wasla-hub-{cfg.hub.id}-web", tls_ca_file=b.tls_ca_file,
                                           tls_cert_file=b.tls_cert_file, tls_key_file=b.tls_key_file,
                                           username=b.username, password_file=b.password_file)
        self.client.connect_async(b.host, b.port, keepalive=b.keepalive_seconds)
        self.client.loop_start()

    def __call__(self, read: dict) -> bool:
        from sync.hub.receiver import read_payload
        from sync.wire import protocol

        info = self.client.publish(protocol.down_topic(read["device"], "read"), read_payload(read), qos=1)
        info.wait_for_publish(5.0)  # RuntimeError when not connected: the receiver re-sends it later
        return info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _watchdog(cfg, port: int, stop: threading.Event) -> None:
    """Feeds systemd's watchdog only while the server answers its own /healthz (which also reads the index)."""
    import urllib.request

    from sync.core.service import sd_notify

    host = "127.0.0.1" if cfg.web.bind in ("0.0.0.0", "::", "") else cfg.web.bind
    url = f"http://{host}:{port}/healthz"
    while not stop.wait(10.0):
        try:
            with urllib.request.urlopen(url, timeout=5) as rsp:
                if rsp.status == 200:
                    sd_notify("WATCHDOG=1")
        except Exception as err:  # noqa: BLE001 - a missed beat is the signal; the loop itself must go on
            log.warning("worklist self-check failed: %s", type(err).__name__)


def run_web(cfg) -> int:
    from waitress.server import create_server

    from sync.core.service import sd_notify, setup_logging
    from sync.hub.store import HubStore
    from sync.hub.web.app import create_app

    setup_logging(cfg.log.level)
    store = HubStore.from_config(cfg)
    publisher = ReadPublisher(cfg)
    app = create_app(cfg, store, publish=publisher)
    server = create_server(app, host=cfg.web.bind, port=cfg.web.port, threads=cfg.web.threads,
                           ident="wasla-hub", clear_untrusted_proxy_headers=True)
    stop = threading.Event()

    def _stop(*_a):
        stop.set()
        server.close()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    log.info("worklist at http://%s:%s/", cfg.web.bind, server.effective_port)
    sd_notify("READY=1\nSTATUS=serving the worklist")
    threading.Thread(target=_watchdog, args=(cfg, server.effective_port, stop), name="web-watchdog",
                     daemon=True).start()
    try:
        server.run()
    except OSError:
        if not stop.is_set():
            raise
    finally:
        publisher.close()
        store.close()
    log.info("stopped")
    return 0
