"""The hub receiver's typed, strict configuration (TOML), built with the box config's machinery."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from sync.core.config import LogConfig, MetricsConfig, doc, load_toml, parse_toml
from sync.core.errors import ConfigError
from sync.wire.transcode import ORTHANC_RENDERS, TARGETS

DEFAULT_PATHS = (Path("/etc/wasla/hub.toml"),)
ENV_VAR = "WASLA_HUB_CONFIG"


@dataclass(frozen=True)
class HubSection:
    id: Annotated[str, doc(
        "This receiver's name; its MQTT client id is \"wasla-hub-<id>\". Give each receiver beside another its "
        "own.", pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "hub-1"
    data_dir: Annotated[Path, doc(
        "Root of the study files, the partial transfers and (unless database_url is set) the index database.")] = Path("/var/lib/wasla-hub")
    database_url: Annotated[str, doc(
        "Where the index lives: empty = SQLite file hub.db under data_dir; \"postgresql://user@host:5432/dbname\""
        " = that PostgreSQL database, which several receivers may share (pip extra \"postgres\"). Study files and"
        " partial transfers stay under data_dir either way. Keep the password out of this file: use a libpq "
        "passfile (?passfile=...).")] = ""


@dataclass(frozen=True)
class HubBrokerConfig:
    host: Annotated[str, doc("MQTT broker host.")] = "127.0.0.1"
    port: Annotated[int, doc("MQTT broker port (8883 with TLS).", ge=1, le=65535)] = 1883
    tls_ca_file: Annotated[Path | None, doc(
        "CA certificate (PEM) the broker's certificate must chain to; setting it turns TLS on.")] = None
    tls_cert_file: Annotated[Path | None, doc("The hub's client certificate (PEM).")] = None
    tls_key_file: Annotated[Path | None, doc("Private key of tls_cert_file (PEM; a systemd credential).")] = None
    username: Annotated[str, doc("MQTT username; empty = none.")] = ""
    password_file: Annotated[Path | None, doc("File holding the MQTT password.")] = None
    keepalive_seconds: Annotated[int, doc("MQTT keepalive (10-3600 s).", ge=10, le=3600)] = 60
    session_expiry_hours: Annotated[float, doc(
        "How long the broker queues box messages for this receiver while it is down.", gt=0, le=8760)] = 168.0
    share_group: Annotated[str, doc(
        "Shared-subscription group: receivers in one group split the boxes' messages between them.", pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "hub"


@dataclass(frozen=True)
class HubReceiverConfig:
    max_message_bytes: Annotated[int, doc(
        "Largest message accepted (a chunk plus its header); bigger ones go to the dead-letter table.", ge=4096, le=64 * 1024 * 1024)] = 2 * 1024 * 1024
    read_resend_seconds: Annotated[float, doc(
        "A read the box has not confirmed (in its heartbeat) this long after publishing is published again.", gt=0)] = 300.0
    max_instance_mb: Annotated[int, doc(
        "Largest instance a transfer may declare; bigger ones are refused (keep it inside the unit's "
        "MemoryMax).", ge=1)] = 1024
    partial_quota_mb: Annotated[int, doc(
        "Unfinished transfers one box may hold at the hub; past it, new ones wait (unanswered) until some "
        "finish.", ge=1)] = 4096
    partial_expiry_days: Annotated[float, doc(
        "Unfinished transfers untouched this long are dropped (the box starts them again when it comes back).", gt=0)] = 14.0
    min_free_mb: Annotated[int, doc(
        "Below this much free disk the receiver pauses (messages wait at the broker) and resumes when space "
        "returns.", ge=0)] = 1024


@dataclass(frozen=True)
class HubPacsConfig:
    host: Annotated[str, doc(
        "The PACS every verified instance (images, the box's SR and SC) is forwarded to by C-STORE; empty = "
        "none.")] = ""
    port: Annotated[int, doc("Its DICOM port (Orthanc's default 4242).", ge=1, le=65535)] = 4242
    ae_title: Annotated[str, doc("Its AE title (the called AE).")] = "ORTHANC"
    calling_ae_title: Annotated[str, doc(
        "The hub's AE title towards the PACS (the PACS must know it if it checks callers).")] = "WASLA_HUB"
    accept_syntaxes: Annotated[list[str], doc(
        "Transfer syntaxes the PACS stores and shows; anything else (JPEG XL, JPEG 2000) is transcoded first.")] = field(default_factory=lambda: list(ORTHANC_RENDERS))
    transcode_to: Annotated[str, doc(
        "What a transcoded copy is: \"jpegls\" (lossless, if accepted) or \"explicit\" (explicit VR little endian).")] = "jpegls"
    retry_seconds: Annotated[float, doc(
        "First wait after a failed forward; doubled per failure up to 10 minutes.", ge=0.1, le=3600)] = 10.0
    max_refusals: Annotated[int, doc(
        "A PACS that refuses an instance this many times (a DICOM failure status) puts it in the dead letter. "
        "An unreachable PACS is not a refusal: those instances wait for it however long it is down.", ge=1)] = 5
    timeout_seconds: Annotated[float, doc("Association and DIMSE timeout.", ge=1, le=600)] = 30.0
    web_url: Annotated[str, doc(
        "The PACS' web address as reading-room PCs reach it (Orthanc: its HTTP root); the worklist then links "
        "each study to Orthanc Explorer there. Empty: no link.")] = ""


@dataclass(frozen=True)
class HubWebConfig:
    bind: Annotated[str, doc(
        "Address the radiologists' worklist listens on (`wasla-hub web`); put it behind the hospital's TLS "
        "proxy, or bind the LAN address only on a trusted network.")] = "127.0.0.1"
    port: Annotated[int, doc("Its HTTP port.", ge=1, le=65535)] = 8042
    secure_cookies: Annotated[bool, doc(
        "Mark cookies Secure (set true whenever the worklist is reached over HTTPS).")] = False
    session_hours: Annotated[float, doc("A login lasts at most this long (one shift).", ge=0.1, le=168)] = 10.0
    idle_minutes: Annotated[float, doc("A session unused this long ends (a shared reading-room PC).", ge=1, le=1440)] = 60.0
    max_failures: Annotated[int, doc("Failed logins in a row that lock an account.", ge=1, le=100)] = 5
    lockout_minutes: Annotated[float, doc(
        "How long a locked account stays locked (`wasla-hub user unlock` ends it sooner).", ge=1, le=1440)] = 15.0
    threads: Annotated[int, doc("Worker threads of the web server.", ge=1, le=64)] = 8


@dataclass(frozen=True)
class HubConfig:
    hub: HubSection = field(default_factory=HubSection)
    broker: HubBrokerConfig = field(default_factory=HubBrokerConfig)
    receiver: HubReceiverConfig = field(default_factory=HubReceiverConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: Annotated[MetricsConfig, doc(
        "[metrics] enabled / bind / port: the hub's Prometheus endpoint, same keys as the box's.")] = field(default_factory=MetricsConfig)
    pacs: HubPacsConfig = field(default_factory=HubPacsConfig)
    web: HubWebConfig = field(default_factory=HubWebConfig)
    source: Path | None = None

    @property
    def db_path(self) -> Path:
        return self.hub.data_dir / "hub.db"

    @property
    def studies_dir(self) -> Path:
        return self.hub.data_dir / "studies"

    @property
    def partial_dir(self) -> Path:
        return self.hub.data_dir / "partial"


def _validate(cfg: HubConfig) -> None:
    """What one field's declaration cannot say (types and ranges are checked while the file is read)."""
    _validate_database_url(cfg.hub.database_url)
    if (cfg.broker.tls_cert_file is None) != (cfg.broker.tls_key_file is None):
        raise ConfigError("broker.tls_cert_file and broker.tls_key_file go together")
    p = cfg.pacs
    for key in ("ae_title", "calling_ae_title"):
        value = getattr(p, key)
        if not 1 <= len(value) <= 16 or not value.isascii() or "\\" in value or not value.strip():
            raise ConfigError(f"pacs.{key}: {value!r} is not a DICOM AE title (1-16 ASCII characters)")
    if p.transcode_to not in TARGETS:
        raise ConfigError(f"pacs.transcode_to: must be one of {', '.join(TARGETS)}, not {p.transcode_to!r}")
    for syntax in p.accept_syntaxes:
        if not re.fullmatch(r"[0-9]+(\.[0-9]+)+", syntax):
            raise ConfigError(f"pacs.accept_syntaxes: {syntax!r} is not a transfer syntax UID")
    if p.web_url and not re.fullmatch(r"https?://[^\s\"'<>]+", p.web_url):
        raise ConfigError("pacs.web_url: must be an http(s):// address")


def _validate_database_url(url: str) -> None:
    # The messages never repeat the URL: it may carry a password.
    if not url:
        return
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError("hub.database_url: must be empty (SQLite under hub.data_dir) or "
                          "postgresql://user@host:port/dbname")
    try:
        if "," not in parts.netloc:  # libpq's multi-host form (h1:5432,h2:5432) is not one port
            parts.port
    except ValueError:
        raise ConfigError("hub.database_url: the port is not a TCP port") from None
    if not parts.path.strip("/"):
        raise ConfigError("hub.database_url: names no database (postgresql://user@host:port/DBNAME)")


def parse(text: str, base: Path | None = None, source: Path | None = None) -> HubConfig:
    return parse_toml(HubConfig, text, _validate, base, source, what="hub config")


def load(path: Path | str | None = None, env: dict[str, str] | None = None) -> HubConfig:
    """Load from `path`, else $WASLA_HUB_CONFIG, else /etc/wasla/hub.toml, else the built-in defaults."""
    return load_toml(HubConfig, _validate, path, env, ENV_VAR, DEFAULT_PATHS, what="hub config")
