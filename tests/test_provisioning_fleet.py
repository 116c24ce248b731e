"""wasla-fleet without a broker: inventory, key hygiene, openssl cross-checks, config credentials, pseudonyms, audit."""
from __future__ import annotations

import json
import shutil
import sqlite3
import stat
import subprocess
import tarfile
from dataclasses import replace

import pydicom
import pytest

from edge import audit, config as config_mod
from sync.core.errors import ConfigError
from provisioning import ca
from sync.wire import pseudonym
from provisioning.cli import app, main
from test_sync_support import make_cr


def fleet_cli(root, *args) -> int:
    return main(["--fleet", str(root / "fleet"), *args])


@pytest.fixture
def fleet_root(tmp_path):
    assert fleet_cli(tmp_path, "init", "--name", "dz-test", "--hub", "hub.example", "--broker-name", "10.0.0.5") == 0
    return tmp_path


def test_every_private_key_is_0600_and_a_box_key_exists_only_in_its_bundle(fleet_root, capsys):
    assert fleet_cli(fleet_root, "enroll", "clinic-01") == 0
    fleet = fleet_root / "fleet"
    assert stat.S_IMODE(fleet.stat().st_mode) == 0o700
    keys = [p for p in fleet.rglob("*") if p.is_file() and p.suffix == ".key"]
    assert {p.name for p in keys} >= {"ca.key", "model-signing.key", "broker.key", "hub.key", "box.key",
                                      "pseudonym.key"}
    for p in keys:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert [p.relative_to(fleet).as_posix() for p in keys if p.name == "box.key"] == \
        ["bundles/clinic-01/credentials/box.key"]
    tarball = fleet / "bundles" / "clinic-01.tar.gz"
    assert stat.S_IMODE(tarball.stat().st_mode) == 0o600
    with tarfile.open(tarball) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert stat.S_IMODE(members["clinic-01/credentials/box.key"].mode) == 0o600
    assert {"clinic-01/box.toml", "clinic-01/ca.crt", "clinic-01/model-signing.pub",
            "clinic-01/credentials/box.crt"} <= set(members)
    assert not any("ca.key" in n or "model-signing.key" in n or "pseudonym" in n for n in members)


def test_box_certificate_carries_the_box_id_and_openssl_agrees_until_revocation(fleet_root):
    fleet = fleet_root / "fleet"
    assert fleet_cli(fleet_root, "enroll", "clinic-02") == 0
    cert_path = fleet / "bundles" / "clinic-02" / "credentials" / "box.crt"
    saved = fleet_root / "clinic-02.crt"
    shutil.copy(cert_path, saved)
    cert = ca.load_cert(saved)
    assert ca.common_name(cert) == "clinic-02"
    ca.verify_issued(cert, ca.load_cert(fleet / "ca" / "ca.crt"))
    ok = subprocess.run(["openssl", "verify", "-CAfile", str(fleet / "ca" / "ca.crt"), "-crl_check",
                         "-CRLfile", str(fleet / "ca" / "crl.pem"), str(saved)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broker_ok = subprocess.run(["openssl", "verify", "-CAfile", str(fleet / "ca" / "ca.crt"), "-purpose", "sslserver",
                                str(fleet / "broker" / "broker.crt")], capture_output=True, text=True)
    assert broker_ok.returncode == 0, broker_ok.stderr
    assert fleet_cli(fleet_root, "revoke", "clinic-02", "--reason", "stolen") == 0
    bad = subprocess.run(["openssl", "verify", "-CAfile", str(fleet / "ca" / "ca.crt"), "-crl_check",
                          "-CRLfile", str(fleet / "ca" / "crl.pem"), str(saved)], capture_output=True, text=True)
    assert bad.returncode != 0 and "revoked" in (bad.stdout + bad.stderr)
    assert "clinic-02" not in (fleet / "broker" / "acl").read_text()
    assert fleet_cli(fleet_root, "rotate", "clinic-02") != 0, "a revoked box must not get a new certificate"
    assert fleet_cli(fleet_root, "enroll", "clinic-02") != 0, "a revoked id must not be reused"


def test_list_shows_status_expiry_and_last_seen_from_the_hub(fleet_root, capsys):
    for box in ("clinic-03", "clinic-04"):
        assert fleet_cli(fleet_root, "enroll", box) == 0
    assert fleet_cli(fleet_root, "revoke", "clinic-04") == 0
    hub_db = fleet_root / "hub.db"
    with sqlite3.connect(hub_db) as db:
        db.execute("CREATE TABLE boxes (device TEXT PRIMARY KEY, first_seen REAL, last_seen REAL)")
        db.execute("INSERT INTO boxes VALUES ('clinic-03', 1.8e9, 1.8e9)")
    capsys.readouterr()
    assert fleet_cli(fleet_root, "list", "--hub-db", str(hub_db), "--json") == 0
    rows = {r["box"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["clinic-03"]["status"] == "enrolled" and rows["clinic-03"]["last_seen"].startswith("2027-01-15")
    assert rows["clinic-04"]["status"] == "revoked" and rows["clinic-04"]["last_seen"] is None
    assert 800 < rows["clinic-03"]["days_left"] <= 825
    assert fleet_cli(fleet_root, "list") == 0
    assert "clinic-03" in capsys.readouterr().out


def test_bad_or_duplicate_box_ids_and_a_second_init_are_refused(fleet_root, capsys):
    assert fleet_cli(fleet_root, "enroll", "bad/id") == 9
    assert fleet_cli(fleet_root, "enroll", "hub.hub-1") == 9  # a dot: could never collide with a hub identity
    assert fleet_cli(fleet_root, "enroll", "ok-1") == 0
    assert fleet_cli(fleet_root, "enroll", "ok-1") == 9
    assert fleet_cli(fleet_root, "init", "--name", "x", "--hub", "h") == 9
    assert "already" in capsys.readouterr().err


def test_every_fleet_command_has_help_with_an_example():
    for cmd in app.registered_commands:
        assert "Example:" in (cmd.callback.__doc__ or ""), cmd.callback.__name__


def test_fleet_actions_are_audited_without_argument_values(fleet_root):
    import sys

    # A real process, so the audit sees a real command line (as an administrator's shell gives it).
    subprocess.run([sys.executable, "-m", "provisioning.cli", "--fleet", str(fleet_root / "fleet"), "enroll",
                    "clinic-05", "--data-dir", "/srv/secret-name"], check=True, capture_output=True)
    lines = audit.read(fleet_root / "fleet" / "audit.log")
    assert [entry["command"] for entry in lines] == ["init", "enroll"]
    assert lines[1]["options"] == ["--data-dir", "--fleet"]
    assert "secret-name" not in json.dumps(lines)


# --- the box config: credentials and the pseudonymisation keys ----------------------------------------------------

def test_box_config_reads_keys_from_credentials_directory_under_systemd(fleet_root, monkeypatch):
    assert fleet_cli(fleet_root, "enroll", "clinic-06") == 0
    conf = fleet_root / "fleet" / "bundles" / "clinic-06" / "box.toml"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    cfg = config_mod.load(conf, env={})
    assert cfg.sync.tls_key_file == conf.parent / "credentials" / "box.key"
    assert cfg.sync.tls_ca_file == conf.parent / "ca.crt" and cfg.sync.pseudonymise is False
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/wasla-box.service")
    cfg = config_mod.load(conf, env={})
    assert str(cfg.sync.tls_key_file) == "/run/credentials/wasla-box.service/box.key"
    assert str(cfg.sync.tls_cert_file) == "/run/credentials/wasla-box.service/box.crt"
    with pytest.raises(ConfigError, match="credential"):
        config_mod.parse('[sync]\ntls_ca_file = "credential:../etc/passwd"\n')


def test_pseudonymise_needs_a_key_file_and_is_off_by_default():
    assert config_mod.Config().sync.pseudonymise is False
    with pytest.raises(ConfigError, match="pseudonym_key_file"):
        config_mod.parse("[sync]\npseudonymise = true\n")
    keys = [k for k, _d, doc in config_mod.describe() if k.startswith("sync.pseudonym")]
    assert keys == ["sync.pseudonymise", "sync.pseudonym_key_file"]


def test_enrolment_with_pseudonymise_ships_the_fleet_key_and_the_config_names_it(fleet_root, monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert fleet_cli(fleet_root, "enroll", "clinic-07", "--pseudonymise") == 0
    folder = fleet_root / "fleet" / "bundles" / "clinic-07"
    cfg = config_mod.load(folder / "box.toml", env={})
    assert cfg.sync.pseudonymise is True
    assert pseudonym.load_key(cfg.sync.pseudonym_key_file) == pseudonym.load_key(fleet_root / "fleet" / "pseudonym.key")
    assert stat.S_IMODE(cfg.sync.pseudonym_key_file.stat().st_mode) == 0o600


# --- pseudonymisation -------------------------------------------------------------------------------------------

KEY = bytes(range(32))


def test_keyed_pseudonyms_are_stable_per_key_and_differ_between_fleets(tmp_path):
    src = make_cr(tmp_path / "a.dcm", seed=1)
    ds1, ds2, ds3 = (pydicom.dcmread(src) for _ in range(3))
    pseudonym.pseudonymise(ds1, KEY)
    pseudonym.pseudonymise(ds2, KEY)
    pseudonym.pseudonymise(ds3, bytes(32))
    assert ds1.PatientID == ds2.PatientID != ds3.PatientID
    assert ds1.StudyInstanceUID == ds2.StudyInstanceUID != ds3.StudyInstanceUID
    orig = pydicom.dcmread(src)
    assert ds1.StudyInstanceUID.startswith("2.25.") and len(ds1.StudyInstanceUID) <= 64
    assert ds1.SOPInstanceUID != orig.SOPInstanceUID and ds1.file_meta.MediaStorageSOPInstanceUID == ds1.SOPInstanceUID
    assert ds1.SOPClassUID == orig.SOPClassUID  # DICOM-defined UIDs are not identifiers
    assert ds1.PixelData == orig.PixelData


def test_basic_profile_removes_identifiers_and_private_tags_and_says_so(tmp_path):
    src = make_cr(tmp_path / "a.dcm", seed=2)
    ds = pydicom.dcmread(src)
    ds.PatientBirthDate = "19800101"
    ds.InstitutionName = "Polyclinique Tamanrasset"
    ds.OperatorsName = "TECH^ONE"
    ds.AccessionNumber = "ACC123"
    ds.add_new(0x00091001, "LO", "private vendor note with a name")
    ds.save_as(src, enforce_file_format=True)
    out = pydicom.dcmread(__import__("io").BytesIO(pseudonym.pseudonymise_file(src, KEY)))
    assert out.PatientName != "TEST^SYNC" and out.PatientID != "SYNC-1" and out.AccessionNumber != "ACC123"
    assert out.PatientBirthDate == "" and "InstitutionName" not in out and "OperatorsName" not in out
    assert not any(e.tag.is_private for e in out)
    assert out.PatientIdentityRemoved == "YES"
    assert [c.CodeValue for c in out.DeidentificationMethodCodeSequence] == ["113100", "113106", "113110"]
    # The sync path keeps UIDs: the wire protocol and the hub's manifest check are keyed on them.
    assert out.StudyInstanceUID == ds.StudyInstanceUID


def test_short_pseudonym_key_is_refused(tmp_path):
    (tmp_path / "k").write_text("00" * 16)
    with pytest.raises(ConfigError, match="at least 32"):
        pseudonym.load_key(tmp_path / "k")


def test_uploader_sends_pseudonymised_instances_when_configured(tmp_path):
    from edge.store import Store
    from edge.uplink.outbox import Outbox
    from edge.uplink.uploader import Uploader
    from test_sync_support import box_config, triage

    (tmp_path / "pseudo.key").write_text(KEY.hex())
    cfg = box_config(tmp_path, 1)
    cfg = replace(cfg, sync=replace(cfg.sync, pseudonymise=True, pseudonym_key_file=tmp_path / "pseudo.key"))
    store = Store.from_config(cfg)
    try:
        triage(store, make_cr(tmp_path / "in" / "a.dcm", seed=4), "urgent")
        up = Uploader(cfg, store)  # not started: one packing step, no broker needed
        assert up.pack_once()
        row = next(r for r in up.outbox.active() if r["kind"] == "transfer")
        sent = pydicom.dcmread(up.outbox.wire_path(row))
        assert sent.PatientName == pseudonym.pseudo_id(KEY, "PatientName", "TEST^SYNC")
        assert sent.PatientIdentityRemoved == "YES"
        assert isinstance(up.outbox, Outbox)
    finally:
        store.close()


def test_an_instance_that_cannot_be_pseudonymised_is_not_sent_and_shows_as_a_pack_failure_until_requeued(tmp_path):
    from edge.doctor import run_checks
    from edge.store import Store
    from edge.uplink.uploader import Uploader
    from test_sync_support import box_config, triage

    cfg = box_config(tmp_path, 1)
    cfg = replace(cfg, sync=replace(cfg.sync, pseudonymise=True, pseudonym_key_file=tmp_path / "missing.key"))
    store = Store.from_config(cfg)
    try:
        iid = triage(store, make_cr(tmp_path / "in" / "a.dcm", seed=5), "urgent")
        up = Uploader(cfg, store)  # not started: packing steps only
        assert up.pack_once()
        assert not up.pack_once()  # recorded once; not retried on every turn
        rows = store.query("SELECT kind, state, reason FROM outbox WHERE instance_id = ?", [iid])
        assert [(r["kind"], r["state"]) for r in rows] == [("pack", "failed")]
        assert "cannot be prepared for the hub" in rows[0]["reason"] and "pseudonym_key_file" in rows[0]["reason"]
        assert not store.query("SELECT 1 FROM outbox WHERE kind = 'transfer'")  # fails closed: nothing to send
        uploads = next(c for c in run_checks(cfg) if c["check"] == "uploads")
        assert not uploads["ok"] and "cannot be prepared" in uploads["detail"]
        (tmp_path / "missing.key").write_text(KEY.hex())  # the technician installs the key, then requeues
        assert store.requeue(instance_id=iid) == 1
        assert not store.query("SELECT 1 FROM outbox WHERE kind = 'pack'")
        store.record_triage(store.claim_next()["id"], "urgent", [{"code": "test"}], [])
        assert up.pack_once() and store.query("SELECT 1 FROM outbox WHERE kind = 'transfer'")
    finally:
        store.close()
