"""A real Mosquitto running the configuration wasla-fleet generates: TLS identities, CRL, per-box ACL, real sync."""
from __future__ import annotations

import datetime as dt
import signal
import ssl
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edge import config as box_config_mod
from harness import free_port, mosquitto_binary, stop_process, wait_for_port, wait_until
from provisioning import ca
from provisioning.fleet import Fleet, FleetSettings
from sync.hub import config as hub_config
from test_sync_support import FAST_SYNC, make_cr, triage

# The broker drops to this user after start; in the tests it keeps root so it can read files in tmp folders.
TEST_BROKER_USER = "root"


class Broker:
    """Mosquitto started with exactly the generated broker/mosquitto.conf."""

    def __init__(self, fleet: Fleet):
        self.fleet = fleet
        self.conf = fleet.broker_dir / "mosquitto.conf"
        self.port = fleet.settings.broker_port
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Broker":
        self.log = open(self.fleet.root / "mosquitto.log", "ab")
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf), "-v"], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        wait_for_port(self.port, proc=self.proc, timeout=15)
        return self

    def reload(self) -> None:
        """What `systemctl reload mosquitto` does: SIGHUP, config, ACL and CRL read again."""
        before = self.log_text().count("Reloading config")
        self.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: self.log_text().count("Reloading config") > before, timeout=10, what="broker reload")

    def log_text(self) -> str:
        return (self.fleet.root / "mosquitto.log").read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)


def make_fleet(root: Path) -> Fleet:
    fleet = Fleet(root / "fleet")
    fleet.init(FleetSettings(name="test", hub_host="localhost", broker_names=("127.0.0.1",), broker_port=free_port(),
                             broker_bind="127.0.0.1", broker_user=TEST_BROKER_USER))
    return fleet


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    f = make_fleet(tmp_path_factory.mktemp("prov"))
    for box in ("box-a", "box-b"):
        f.enroll(box, data_dir="/nonexistent")
    return f


@pytest.fixture(scope="module")
def broker(fleet):
    b = Broker(fleet).start()
    yield b
    b.stop()


def identity(fleet: Fleet, who: str) -> tuple[Path, Path]:
    """(cert, key) of a box bundle or the hub."""
    folder = fleet.hub_dir / "hub-1" if who == "hub" else fleet.bundles_dir / who
    return folder / "credentials" / f"{'hub' if who == 'hub' else 'box'}.crt", \
        folder / "credentials" / f"{'hub' if who == 'hub' else 'box'}.key"


class Client:
    """A real paho v5 client with an outcome: connected, or refused with the reason it saw."""

    def __init__(self, port: int, ca_file: Path | None, cert: Path | None = None, key: Path | None = None,
                 client_id: str = "", tls: bool = True):
        self.port = port
        self.connected = threading.Event()
        self.refused = threading.Event()
        self.reason = ""
        self.messages: list[tuple[str, bytes]] = []
        self.acks: dict[int, object] = {}
        self.suback: list = []
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if tls:
            self.c.tls_set(ca_certs=str(ca_file) if ca_file else None, certfile=str(cert) if cert else None,
                           keyfile=str(key) if key else None)
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_message = lambda _c, _u, m: self.messages.append((m.topic, bytes(m.payload)))
        self.c.on_publish = lambda _c, _u, mid, rc, _p: self.acks.__setitem__(mid, rc)
        self.c.on_subscribe = lambda _c, _u, mid, rcs, _p: self.suback.append(rcs)

    def _on_connect(self, _c, _u, _f, rc, _p):
        if rc.is_failure:
            self.reason = str(rc)
            self.refused.set()
        else:
            self.connected.set()

    def _on_disconnect(self, _c, _u, _f, rc, _p):
        if not self.connected.is_set():
            self.reason = self.reason or f"disconnected: {rc}"
            self.refused.set()

    def connect(self, timeout: float = 10.0) -> bool:
        try:
            self.c.connect("localhost", self.port, keepalive=10)
        except (ssl.SSLError, OSError) as err:
            self.reason = f"{type(err).__name__}: {err}"
            return False
        self.c.loop_start()
        wait_until(lambda: self.connected.is_set() or self.refused.is_set(), timeout=timeout, what="CONNACK or refusal")
        if self.refused.is_set():
            self.c.loop_stop()
        return self.connected.is_set()

    def subscribe(self, topic: str) -> None:
        n = len(self.suback)
        self.c.subscribe(topic, qos=1)
        wait_until(lambda: len(self.suback) > n, timeout=10, what=f"SUBACK for {topic}")

    def publish(self, topic: str, payload: bytes) -> bool:
        """QoS 1 publish; True if the broker's PUBACK accepted it (v5 says 0x87 'not authorized' otherwise)."""
        info = self.c.publish(topic, payload, qos=1)
        wait_until(lambda: info.mid in self.acks, timeout=10, what=f"PUBACK for {topic}")
        return not self.acks[info.mid].is_failure

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def clients():
    made = []
    yield made
    for c in made:
        try:
            c.close()
        except Exception:  # noqa: BLE001 - a refused client has nothing to close
            pass


def connect_as(clients, fleet, who: str, **kw) -> Client:
    cert, key = identity(fleet, who)
    c = Client(fleet.settings.broker_port, fleet.ca_cert, cert, key, **kw)
    clients.append(c)
    return c


# --- who may connect -------------------------------------------------------------------------------------------

def test_enrolled_box_and_hub_connect_with_their_bundle_certificates(fleet, broker, clients):
    assert connect_as(clients, fleet, "box-a").connect()
    assert connect_as(clients, fleet, "hub").connect()
    assert "as box-a (p5" in broker.log_text() and "u'box-a'" in broker.log_text()


def test_connection_without_client_certificate_is_refused(fleet, broker, clients):
    c = Client(fleet.settings.broker_port, fleet.ca_cert)
    clients.append(c)
    assert not c.connect(), "a TLS client without a certificate got in"
    plain = Client(fleet.settings.broker_port, None, tls=False)
    clients.append(plain)
    assert not plain.connect(), "a plain-TCP client got in"


def test_certificate_from_another_ca_is_refused_even_with_an_enrolled_box_id(fleet, broker, clients, tmp_path):
    rogue_key, rogue_ca = ca.make_ca("rogue", 30)
    key = ca.new_key()
    cert = ca.issue(rogue_key, rogue_ca, "box-a", key.public_key())
    ca.write_private_key(tmp_path / "k.pem", key)
    ca.write_cert(tmp_path / "c.pem", cert)
    c = Client(fleet.settings.broker_port, fleet.ca_cert, tmp_path / "c.pem", tmp_path / "k.pem")
    clients.append(c)
    assert not c.connect(), "a foreign-CA certificate with CN box-a got in"


def test_expired_certificate_of_the_fleet_ca_is_refused(fleet, broker, clients, tmp_path):
    ca_key, ca_cert = ca.load_key(fleet.ca_key), ca.load_cert(fleet.ca_cert)
    key = ca.new_key()
    past = ca.now() - dt.timedelta(days=30)
    cert = ca.issue(ca_key, ca_cert, "box-a", key.public_key(), not_before=past, not_after=past + dt.timedelta(days=29))
    assert cert.not_valid_after_utc < ca.now()
    ca.write_private_key(tmp_path / "k.pem", key)
    ca.write_cert(tmp_path / "c.pem", cert)
    c = Client(fleet.settings.broker_port, fleet.ca_cert, tmp_path / "c.pem", tmp_path / "k.pem")
    clients.append(c)
    assert not c.connect(), "an expired certificate got in"


def test_revoked_box_is_refused_after_broker_reload_and_loses_its_topics(fleet, broker, clients):
    folder = fleet.enroll("box-stolen", data_dir="/nonexistent")
    cert, key = folder / "credentials" / "box.crt", folder / "credentials" / "box.key"
    kept = [cert.read_bytes(), key.read_bytes()]
    broker.reload()
    live = Client(fleet.settings.broker_port, fleet.ca_cert, cert, key)
    clients.append(live)
    assert live.connect(), live.reason
    assert live.publish("wasla/v1/box-stolen/up/heartbeat", b"{}")  # allowed before revocation

    fleet.revoke("box-stolen", reason="stolen")
    assert not folder.exists(), "the revoked box's bundle (its private key) was left in the fleet folder"
    assert "box-stolen" not in (fleet.broker_dir / "acl").read_text()
    broker.reload()
    # The session still open when the box was cut off has lost every right at once (ACL), ...
    assert not live.publish("wasla/v1/box-stolen/up/heartbeat", b"{}")
    # ... and the thief cannot come back with the key and certificate the box held (CRL).
    (fleet.root / "stolen.crt").write_bytes(kept[0])
    (fleet.root / "stolen.key").write_bytes(kept[1])
    again = Client(fleet.settings.broker_port, fleet.ca_cert, fleet.root / "stolen.crt", fleet.root / "stolen.key")
    clients.append(again)
    assert not again.connect(), "a revoked certificate got in"
    row = next(r for r in fleet.list() if r["box"] == "box-stolen")
    assert row["status"] == "revoked"


def test_rotated_box_connects_with_the_new_certificate_and_old_one_revoked_on_request(fleet, broker, clients):
    fleet.enroll("box-rot", data_dir="/nonexistent")
    old_cert = (fleet.bundles_dir / "box-rot" / "credentials" / "box.crt").read_bytes()
    old_key = (fleet.bundles_dir / "box-rot" / "credentials" / "box.key").read_bytes()
    fleet.rotate("box-rot", revoke_old=True)
    broker.reload()
    assert connect_as(clients, fleet, "box-rot").connect()
    (fleet.root / "old.crt").write_bytes(old_cert)
    (fleet.root / "old.key").write_bytes(old_key)
    old = Client(fleet.settings.broker_port, fleet.ca_cert, fleet.root / "old.crt", fleet.root / "old.key")
    clients.append(old)
    assert not old.connect(), "the superseded certificate still got in"


# --- who may read and write what -------------------------------------------------------------------------------

def test_box_cannot_publish_under_another_box_up_topics_and_the_message_never_arrives(fleet, broker, clients):
    hub = connect_as(clients, fleet, "hub")
    assert hub.connect()
    hub.subscribe("wasla/v1/+/up/#")
    a = connect_as(clients, fleet, "box-a")
    assert a.connect()
    spoof_ok = a.publish("wasla/v1/box-b/up/flag", b"spoofed by box-a")
    other_ok = a.publish("elsewhere/box-b/up/flag", b"outside the protocol")
    # A marker on box-a's own topic, published after: the broker keeps one publisher's order, so once the hub
    # holds the marker, anything the broker had forwarded before it would be there too.
    assert a.publish("wasla/v1/box-a/up/flag", b"marker")
    wait_until(lambda: ("wasla/v1/box-a/up/flag", b"marker") in hub.messages, timeout=10, what="marker at the hub")
    assert all(t.split("/")[2] == "box-a" for t, _ in hub.messages), hub.messages
    assert not any(p == b"spoofed by box-a" for _t, p in hub.messages)
    assert not spoof_ok and not other_ok, "MQTT v5 PUBACK should say 'not authorized'"
    # box-a cannot forge the hub's side either: a read or command into box-b's down/
    b = connect_as(clients, fleet, "box-b")
    assert b.connect()
    b.subscribe("wasla/v1/box-b/down/+")
    assert not a.publish("wasla/v1/box-b/down/read", b"forged read")
    assert hub.publish("wasla/v1/box-b/down/command", b"from hub")
    wait_until(lambda: ("wasla/v1/box-b/down/command", b"from hub") in b.messages, timeout=10, what="hub -> box-b")
    assert [p for _t, p in b.messages] == [b"from hub"]


def test_box_cannot_read_another_box_down_or_up_topics(fleet, broker, clients):
    hub = connect_as(clients, fleet, "hub")
    assert hub.connect()
    a = connect_as(clients, fleet, "box-a")
    assert a.connect()
    for topic in ("wasla/v1/box-b/down/#", "wasla/v1/+/down/#", "wasla/v1/box-b/up/#", "#"):
        a.subscribe(topic)
    a.subscribe("wasla/v1/box-a/down/+")
    b = connect_as(clients, fleet, "box-b")
    assert b.connect()
    b.subscribe("wasla/v1/box-b/down/+")
    assert hub.publish("wasla/v1/box-b/down/read", b"for box-b only")
    assert b.publish("wasla/v1/box-b/up/flag", b"box-b flag")
    wait_until(lambda: b.messages, timeout=10, what="box-b receives its own read")
    # Marker to box-a after box-b's messages: one publisher (the hub), one subscriber session, order kept.
    assert hub.publish("wasla/v1/box-a/down/read", b"marker for a")
    wait_until(lambda: any(p == b"marker for a" for _t, p in a.messages), timeout=10, what="marker at box-a")
    assert [t for t, _p in a.messages if "box-b" in t] == [], a.messages
    assert not any(p in (b"for box-b only", b"box-b flag") for _t, p in a.messages)


def test_a_box_can_neither_announce_itself_as_a_receiver_nor_hear_the_receivers(fleet, broker, clients):
    """The members topic decides which receiver takes which boxes: a box posing as a receiver could take partitions
    from the real ones (their boxes' messages would then wait for it), so only hub identities reach it."""
    from sync.hub.partitions import members_topic

    group = _hub_group(fleet)
    hub = connect_as(clients, fleet, "hub")
    assert hub.connect()
    hub.subscribe(members_topic(group, "+"))
    rogue = connect_as(clients, fleet, "box-a")
    assert rogue.connect()
    rogue.subscribe(members_topic(group, "+"))
    assert not rogue.publish(members_topic(group, "hub-evil"), b'{"member": "hub-evil", "partitions": []}')
    assert hub.publish(members_topic(group, "hub-1"), b'{"member": "hub-1", "partitions": [0]}')
    wait_until(lambda: hub.messages, timeout=10, what="the hub hears its own group")
    time.sleep(0.3)
    assert [t for t, _p in hub.messages] == [members_topic(group, "hub-1")]
    assert rogue.messages == []


def test_client_id_is_the_certificate_identity_so_a_box_cannot_take_over_another_session(fleet, broker, clients):
    b = connect_as(clients, fleet, "box-b", client_id="box-b")
    assert b.connect()
    a = connect_as(clients, fleet, "box-a", client_id="box-b")  # tries to kick box-b and take its session
    assert a.connect()
    time.sleep(0.5)  # a takeover would disconnect box-b within a round trip; give it that chance
    assert b.c.is_connected(), "box-a took over box-b's client id and session"


# --- the real uploader and receiver, configured from the bundle and hub.toml ----------------------------------

def test_enrolled_box_syncs_a_study_to_the_hub_over_the_generated_tls_listener(fleet, broker, tmp_path, monkeypatch):
    from edge.store import Store
    from sync.hub.receiver import Receiver
    from edge.uplink.uploader import Uploader

    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    box_cfg = box_config_mod.load(fleet.bundles_dir / "box-a" / "box.toml", env={})
    assert box_cfg.sync.tls_key_file == fleet.bundles_dir / "box-a" / "credentials" / "box.key"
    box_cfg = replace(box_cfg, box=replace(box_cfg.box, data_dir=tmp_path / "box"),
                      sync=replace(box_cfg.sync, **FAST_SYNC))
    hub_cfg = hub_config.load(fleet.hub_dir / "hub-1" / "hub.toml", env={})
    hub_cfg = replace(hub_cfg, hub=replace(hub_cfg.hub, data_dir=tmp_path / "hub"),
                      broker=replace(hub_cfg.broker, keepalive_seconds=10))
    hub = Receiver(hub_cfg).start()
    store = Store.from_config(box_cfg)
    up = Uploader(box_cfg, store)
    try:
        wait_until(hub.connected.is_set, timeout=15, what="hub receiver connected over TLS")
        up.start()
        study = make_cr(tmp_path / "in" / "a.dcm", seed=3)
        triage(store, study, "urgent")
        wait_until(lambda: store.counts()["acknowledged"] == 1, timeout=60, what="study acknowledged by the hub")
        rows = hub.store.query("SELECT device FROM transfers")
        assert [r["device"] for r in rows] == ["box-a"]
        assert fleet.list(hub_db=hub_cfg.db_path)[0]["last_seen"] is not None
    finally:
        up.stop()
        hub.stop()
        store.close()


# --- broker limits and the hubs' private share group -------------------------------------------------------------
def _hub_group(fleet) -> str:
    return hub_config.load(fleet.hub_dir / "hub-1" / "hub.toml", env={}).broker.share_group


def test_a_box_joining_the_hub_share_group_cannot_take_other_boxes_messages(fleet, broker, clients):
    group = _hub_group(fleet)
    assert group.startswith("hub-") and len(group) > 16  # a fleet secret, not the guessable default
    hub = connect_as(clients, fleet, "hub")
    assert hub.connect()
    hub.subscribe(f"$share/{group}/wasla/v1/+/up/#")
    rogue = connect_as(clients, fleet, "box-a")
    assert rogue.connect()
    # Mosquitto grants these whatever the ACL says; what matters is that the hub still gets every message.
    for guess in ("$share/hub/wasla/v1/+/up/#", "$share/wasla/wasla/v1/+/up/#", "wasla/v1/+/up/#"):
        rogue.subscribe(guess)
    b = connect_as(clients, fleet, "box-b")
    assert b.connect()
    for i in range(10):
        assert b.publish("wasla/v1/box-b/up/flag", b"m%d" % i)
    wait_until(lambda: len(hub.messages) == 10, timeout=10, what="all ten at the hub")
    assert not [m for m in rogue.messages if b"m" in m[1]]


def test_oversized_and_retained_messages_from_a_box_are_refused_by_the_broker(fleet, broker, clients):
    from provisioning.broker import MAX_PACKET_BYTES

    group = _hub_group(fleet)
    hub = connect_as(clients, fleet, "hub")
    assert hub.connect()
    hub.subscribe(f"$share/{group}/wasla/v1/+/up/#")
    big = connect_as(clients, fleet, "box-a")
    assert big.connect()
    big.c.publish("wasla/v1/box-a/up/chunk", b"\0" * (MAX_PACKET_BYTES + 1), qos=1)
    wait_until(lambda: not big.c.is_connected(), timeout=10, what="the broker dropping the oversized sender")
    keeper = connect_as(clients, fleet, "box-b")
    assert keeper.connect()
    keeper.c.publish("wasla/v1/box-b/up/status", b"parked", qos=1, retain=True)
    wait_until(lambda: not keeper.c.is_connected(), timeout=10, what="the broker refusing a retained message")
    marker = connect_as(clients, fleet, "box-b")
    assert marker.connect()
    assert marker.publish("wasla/v1/box-b/up/flag", b"marker")
    wait_until(lambda: any(p == b"marker" for _t, p in hub.messages), timeout=10, what="marker at the hub")
    assert not [p for _t, p in hub.messages if p != b"marker"]
    late = connect_as(clients, fleet, "hub")
    assert late.connect()
    late.subscribe("wasla/v1/+/up/#")
    time.sleep(0.5)
    assert not late.messages  # nothing retained for a later reader


def test_the_broker_refuses_cbc_and_sha1_suites_on_tls_1_2(fleet, broker):
    cert, key = identity(fleet, "box-a")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(fleet.ca_cert))
    ctx.load_cert_chain(str(cert), str(key))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA")
    import socket

    with socket.create_connection(("localhost", fleet.settings.broker_port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            ctx.wrap_socket(raw, server_hostname="localhost").do_handshake()
    ctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
    with socket.create_connection(("localhost", fleet.settings.broker_port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.version() == "TLSv1.2"


def test_the_broker_queue_is_bounded_in_bytes_sized_from_the_fleet_and_its_window_fits_a_batch():
    from pathlib import Path

    from provisioning import broker

    def conf(boxes):
        text = broker.conf_text(port=8883, bind="0.0.0.0", conf_dir=Path("/etc/x"), persistence_dir=Path("/var/x"),
                                boxes=boxes)
        return dict(line.split(" ", 1) for line in text.splitlines() if line.startswith("max_"))

    assert int(conf(5)["max_queued_bytes"]) == broker.MIN_QUEUED_BYTES
    assert int(conf(1000)["max_queued_bytes"]) == 1000 * broker.PER_BOX_QUEUED_BYTES
    assert int(conf(100_000)["max_queued_bytes"]) == broker.MAX_QUEUED_BYTES
    assert int(conf(10)["max_inflight_messages"]) >= 256  # a whole batch of flags acknowledged after one commit
