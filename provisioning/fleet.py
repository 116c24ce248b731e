"""The fleet folder and its inventory: init, enroll, revoke, rotate, list; every change regenerates CRL and broker files.

Layout of a fleet folder (it lives on the ministry's in-country hub machine, never on a box):

    fleet.json                 name, hub address, broker port, validity periods
    inventory.json             every box ever enrolled: status, certificate serials, expiry, history
    ca/ca.key ca/ca.crt        the fleet CA (key 0600)
    ca/crl.pem                 revoked serials, re-signed on every change
    model-signing/             ed25519 model-signing key (hex, 0600) and its public half
    pseudonym.key              fleet-wide HMAC key for pseudonymised sync (0600)
    hub/<id>/                  a hub receiver's hub.toml, ca.crt, credentials/hub.{key,crt} (CN "hub.<id>")
    broker/                    broker key + cert, ca.crt, crl.pem, acl, mosquitto.conf (regenerated)
    bundles/<box>/, <box>.tar.gz   what goes on the USB stick for one box
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated

from edge import signing
from sync.core.config import build, doc
from sync.core.errors import ConfigError, NotFoundError, WaslaError
from provisioning import ca

DEVICE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
HUB_PREFIX = "hub."  # a dot can never be in a box id, so a hub identity can never be mistaken for a box
FLEET_JSON = "fleet.json"
INVENTORY_JSON = "inventory.json"
ENROLLED, REVOKED = "enrolled", "revoked"


@dataclass(frozen=True)
class FleetSettings:
    name: Annotated[str, doc("The fleet's name (the CA's common name).", min_length=1)]
    hub_host: Annotated[str, doc("Host name the boxes reach the broker at.", min_length=1)]
    broker_port: Annotated[int, doc("The broker's TLS port.", ge=1, le=65535)] = 8883
    broker_bind: Annotated[str, doc("Address the broker listens on.")] = "0.0.0.0"
    broker_names: Annotated[tuple[str, ...], doc("Extra names and addresses in the broker's certificate.")] = ()
    hub_ids: Annotated[tuple[str, ...], doc("The hub receivers' ids (each gets its own identity).")] = ("hub-1",)
    cert_days: Annotated[int, doc("Validity of box and hub certificates, in days.", ge=1, le=3650)] = 825
    crl_days: Annotated[int, doc("Validity of the certificate revocation list, in days.", ge=1, le=3650)] = 365
    broker_dir: Annotated[str, doc(
        "Where the broker files live on the broker machine (paths in mosquitto.conf); empty = this fleet's "
        "broker/.")] = ""
    persistence_dir: Annotated[str, doc(
        "Mosquitto's persistence folder; empty = broker/data (or /var/lib/mosquitto when broker_dir is set).")] = ""
    broker_user: Annotated[str, doc(
        "The user Mosquitto drops to after start; it must be able to read the broker files (key: owner, "
        "0600).")] = "mosquitto"
    share_group: Annotated[str, doc(
        "The hubs' MQTT shared-subscription group, a fleet secret set at init: Mosquitto lets any client join a "
        "share group whatever its ACL (and then drops the messages it may not read), so a box that knew the name "
        "could starve the hub of other boxes' traffic. Empty (fleets made before it existed) = \"hub\".")] = ""

    def to_json(self) -> dict:
        return {"name": self.name, "hub_host": self.hub_host, "broker_port": self.broker_port,
                "broker_bind": self.broker_bind, "broker_names": list(self.broker_names), "hub_ids": list(self.hub_ids),
                "cert_days": self.cert_days, "crl_days": self.crl_days, "broker_dir": self.broker_dir,
                "persistence_dir": self.persistence_dir, "broker_user": self.broker_user,
                "share_group": self.share_group}

    @classmethod
    def from_json(cls, obj: dict, source: str = FLEET_JSON) -> "FleetSettings":
        """Strictly, like the box and hub configs: an unknown key or a bad value is an error naming it."""
        if not isinstance(obj, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        try:
            return build(cls, obj, "", None)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None


class FleetError(WaslaError):
    """A fleet operation cannot be done (not initialised, unknown or already enrolled box, bad id)."""

    exit_code = 9


def check_box_id(box: str) -> str:
    if not isinstance(box, str) or not DEVICE_RE.fullmatch(box):
        raise FleetError(f"box id {box!r} must be 1-64 letters, digits, '-' or '_' (it becomes an MQTT topic level)")
    return box


def _iso(t: dt.datetime | None) -> str | None:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if t else None


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Fleet:
    """One fleet folder. Methods that change it hold an exclusive lock, so two admins cannot interleave."""

    def __init__(self, root: Path):
        self.root = Path(root)

    # --- paths ----------------------------------------------------------------------------------------------
    ca_key = property(lambda self: self.root / "ca" / "ca.key")
    ca_cert = property(lambda self: self.root / "ca" / "ca.crt")
    crl = property(lambda self: self.root / "ca" / "crl.pem")
    model_key = property(lambda self: self.root / "model-signing" / "model-signing.key")
    model_pub = property(lambda self: self.root / "model-signing" / "model-signing.pub")
    pseudonym_key = property(lambda self: self.root / "pseudonym.key")
    hub_dir = property(lambda self: self.root / "hub")
    broker_dir = property(lambda self: self.root / "broker")
    bundles_dir = property(lambda self: self.root / "bundles")

    @property
    def settings(self) -> FleetSettings:
        path = self.root / FLEET_JSON
        if not path.is_file():
            raise FleetError(f"{self.root} is not a fleet folder (run `wasla-fleet init` first)")
        return FleetSettings.from_json(json.loads(path.read_text(encoding="utf-8")), str(path))

    def inventory(self) -> dict:
        path = self.root / INVENTORY_JSON
        if not path.is_file():
            raise FleetError(f"{self.root} is not a fleet folder (run `wasla-fleet init` first)")
        return json.loads(path.read_text(encoding="utf-8"))

    @contextlib.contextmanager
    def _locked(self):
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _ca(self):
        return ca.load_key(self.ca_key), ca.load_cert(self.ca_cert)

    # --- init -----------------------------------------------------------------------------------------------
    def init(self, settings: FleetSettings, ca_days: int = 3650) -> None:
        """Fleet CA, model-signing key, pseudonym key, broker and hub identities, empty inventory and CRL."""
        if (self.root / FLEET_JSON).exists():
            raise FleetError(f"{self.root} already holds a fleet; refusing to overwrite its CA")
        for hub_id in settings.hub_ids:
            check_box_id(hub_id)
        if not settings.share_group:
            settings = replace(settings, share_group="hub-" + secrets.token_hex(12))
        with self._locked():
            self.root.chmod(0o700)
            ca_key, ca_cert = ca.make_ca(settings.name, ca_days)
            ca.write_private_key(self.ca_key, ca_key)
            ca.write_cert(self.ca_cert, ca_cert)
            signing.generate_keypair(self.model_key, self.model_pub)
            _write_secret(self.pseudonym_key, secrets.token_hex(32) + "\n")
            names = list(dict.fromkeys([settings.hub_host, *settings.broker_names]))
            key = ca.new_key()
            ca.write_private_key(self.broker_dir / "broker.key", key)
            ca.write_cert(self.broker_dir / "broker.crt",
                          ca.issue(ca_key, ca_cert, settings.hub_host, key.public_key(), server=True, names=names,
                                   days=settings.cert_days))
            for hub_id in settings.hub_ids:
                self._issue_hub(ca_key, ca_cert, settings, hub_id)
            _write_json(self.root / FLEET_JSON, settings.to_json())
            _write_json(self.root / INVENTORY_JSON, {"boxes": {}, "created": _iso(ca.now())})
            self._regenerate()

    def _issue_hub(self, ca_key, ca_cert, settings: FleetSettings, hub_id: str) -> None:
        from provisioning import bundle

        key = ca.new_key()
        folder = self.hub_dir / hub_id
        ca.write_private_key(folder / "credentials" / "hub.key", key)
        (folder / "credentials").chmod(0o700)
        ca.write_cert(folder / "credentials" / "hub.crt", ca.issue(ca_key, ca_cert, HUB_PREFIX + hub_id, key.public_key(),
                                                  days=settings.cert_days))
        ca.write_cert(folder / "ca.crt", ca_cert)
        (folder / "hub.toml").write_text(bundle.hub_toml(settings, hub_id), encoding="utf-8")

    # --- boxes ----------------------------------------------------------------------------------------------
    def enroll(self, box: str, *, data_dir: str = "/var/lib/wasla", models_dir: str | None = None,
               pseudonymise: bool = False, days: int | None = None, dicom_port: int = 11112) -> Path:
        """Key + certificate (CN = box id) + config + CA + model key → bundles/<box>/ and bundles/<box>.tar.gz."""
        check_box_id(box)
        with self._locked():
            inv = self.inventory()
            if box in inv["boxes"]:
                state = inv["boxes"][box]["status"]
                raise FleetError(f"box {box!r} is already in the inventory ({state}); use `rotate` for a new "
                                 "certificate, or pick a new id for a replacement box")
            record = {"id": box, "status": ENROLLED, "enrolled_at": _iso(ca.now()), "serials": [],
                      "revoked_serials": [], "options": {"data_dir": data_dir, "models_dir": models_dir,
                                                         "pseudonymise": pseudonymise, "dicom_port": dicom_port}}
            folder = self._issue_box(record, days)
            inv["boxes"][box] = record
            _write_json(self.root / INVENTORY_JSON, inv)
            self._regenerate()
            return folder

    def rotate(self, box: str, *, revoke_old: bool = False, days: int | None = None) -> Path:
        """A new key and certificate for an enrolled box, in a new bundle. The old certificate stays valid until it
        expires (the box must first get the new bundle) unless `revoke_old`, e.g. after a key may have leaked."""
        check_box_id(box)
        with self._locked():
            inv = self.inventory()
            record = self._box(inv, box)
            if record["status"] != ENROLLED:
                raise FleetError(f"box {box!r} is {record['status']}; a revoked box is not rotated, enroll a new id")
            old = record["serial"]
            folder = self._issue_box(record, days)
            record["rotated_at"] = _iso(ca.now())
            if revoke_old:
                record["revoked_serials"].append(old)
            _write_json(self.root / INVENTORY_JSON, inv)
            self._regenerate()
            return folder

    def revoke(self, box: str, reason: str = "") -> None:
        """Every certificate the box ever had goes on the CRL and its ACL entries go; the id is never reused."""
        check_box_id(box)
        with self._locked():
            inv = self.inventory()
            record = self._box(inv, box)
            record["status"] = REVOKED
            record["revoked_at"] = _iso(ca.now())
            record["revoke_reason"] = reason
            record["revoked_serials"] = sorted(set(record["revoked_serials"]) | set(record["serials"]))
            _write_json(self.root / INVENTORY_JSON, inv)
            self._regenerate()
            # The bundle holds the box's private key: once the box is cut off it has no reason to exist here.
            from provisioning import bundle

            bundle.remove(self.bundles_dir, box)

    def _box(self, inv: dict, box: str) -> dict:
        if box not in inv["boxes"]:
            raise NotFoundError(f"box {box!r} is not in the inventory of {self.root}")
        return inv["boxes"][box]

    def _issue_box(self, record: dict, days: int | None) -> Path:
        from provisioning import bundle

        settings = self.settings
        ca_key, ca_cert = self._ca()
        key = ca.new_key()
        cert = ca.issue(ca_key, ca_cert, record["id"], key.public_key(), days=days or settings.cert_days)
        record["serial"] = format(cert.serial_number, "x")
        record["serials"].append(record["serial"])
        record["not_after"] = _iso(cert.not_valid_after_utc)
        opts = record["options"]
        # The box key exists only inside this bundle; the fleet keeps the certificate, never the key.
        return bundle.write(self, settings, record["id"], key, cert, ca_cert, data_dir=opts["data_dir"],
                            models_dir=opts["models_dir"], pseudonymise=opts["pseudonymise"],
                            dicom_port=opts.get("dicom_port", 11112))

    # --- listing --------------------------------------------------------------------------------------------
    def list(self, hub_db: Path | str | None = None) -> list[dict]:
        """Inventory rows with expiry, and last seen from the hub's database when given."""
        seen = _hub_last_seen(hub_db) if hub_db else {}
        now = ca.now()
        rows = []
        for box, r in sorted(self.inventory()["boxes"].items()):
            not_after = dt.datetime.strptime(r["not_after"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
            rows.append({"box": box, "status": r["status"], "serial": r["serial"], "cert_expires": r["not_after"],
                         "days_left": (not_after - now).days, "enrolled_at": r["enrolled_at"],
                         "revoked_at": r.get("revoked_at"), "rotated_at": r.get("rotated_at"),
                         "last_seen": seen.get(box)})
        return rows

    # --- derived files --------------------------------------------------------------------------------------
    def revoked_serials(self) -> list[tuple[int, dt.datetime]]:
        out = []
        for r in self.inventory()["boxes"].values():
            when = dt.datetime.strptime(r.get("revoked_at") or r.get("rotated_at") or r["enrolled_at"],
                                        "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
            out += [(int(s, 16), when) for s in r["revoked_serials"]]
        return out

    def enrolled_boxes(self) -> list[str]:
        return sorted(b for b, r in self.inventory()["boxes"].items() if r["status"] == ENROLLED)

    def _regenerate(self) -> None:
        from provisioning import broker

        ca_key, ca_cert = self._ca()
        ca.write_crl(self.crl, ca.make_crl(ca_key, ca_cert, self.revoked_serials(), self.settings.crl_days))
        broker.write(self)

    def refresh(self) -> None:
        """Re-sign the CRL (it has a next-update date) and rewrite the broker files."""
        with self._locked():
            self._regenerate()


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def _hub_last_seen(db: Path | str) -> dict[str, str]:
    """Last seen per box from the hub's index: its SQLite file, or the PostgreSQL URL of `[hub] database_url`."""
    import sqlite3

    if str(db).startswith(("postgresql://", "postgres://")):
        from sync.hub.store_pg import read_only_query

        rows = [(r["device"], r["last_seen"]) for r in read_only_query(str(db), "SELECT device, last_seen FROM boxes")]
    else:
        if not Path(db).is_file():
            raise ConfigError(f"hub database {db} does not exist")
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = con.execute("SELECT device, last_seen FROM boxes").fetchall()
        finally:
            con.close()
    return {d: _iso(dt.datetime.fromtimestamp(float(t), dt.timezone.utc)) for d, t in rows if t}


def sign_model(folder: Path, private_key: Path) -> dict:
    """Hash every file of a model package into its manifest, set signing_key_id, write manifest.sig.

    Signing is the act of approving exactly the bytes in `folder`: every file present is listed (the box refuses a
    package holding a file its manifest does not list), and the manifest is rewritten in the canonical form."""
    from edge import modelpkg

    folder = Path(folder)
    manifest_path = folder / modelpkg.MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise FleetError(f"{manifest_path}: cannot read the manifest to sign: {err}") from err
    if not isinstance(manifest, dict):
        raise FleetError(f"{manifest_path}: the manifest is not a JSON object")
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if rel in (modelpkg.MANIFEST, modelpkg.SIGNATURE) or path.is_dir():
            continue
        if path.is_symlink():
            raise FleetError(f"{folder}: {rel} is a link; a package holds plain files only")
        files[rel] = modelpkg.sha256_file(path)
    key = signing.load_private(private_key)
    manifest["files"] = files
    manifest["signing_key_id"] = signing.public_key_id(key)
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")
    manifest_path.write_bytes(data)
    (folder / modelpkg.SIGNATURE).write_bytes(signing.sign(data, key))
    return {"package": f"{manifest.get('name')}@{manifest.get('version')}", "key_id": manifest["signing_key_id"],
            "files": len(files)}
