"""The hub receiver's typed, strict configuration (TOML), built with the box config's machinery."""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from sync.core.config import LogConfig, MetricsConfig, build, validate_metrics
from sync.core.errors import ConfigError
from sync.wire.transcode import ORTHANC_RENDERS, TARGETS

DEFAULT_PATHS = (Path("/etc/wasla/hub.toml"),)
ENV_VAR = "WASLA_HUB_CONFIG"


@dataclass(frozen=True)
class HubSection:
    id: str = "hub-1"
    """This receiver's name; its MQTT client id is "wasla-hub-<id>". Give each receiver beside another its own."""
    data_dir: Path = Path("/var/lib/wasla-hub")
    """Root of the study files, the partial transfers and (unless database_url is set) the index database."""
    database_url: str = ""
    """Where the index lives: empty = SQLite file hub.db under data_dir; "postgresql://user@host:5432/dbname" = that
    PostgreSQL database, which several receivers may share (pip extra "postgres"). Study files and partial transfers
    stay under data_dir either way. Keep the password out of this file: use a libpq passfile (?passfile=...)."""


@dataclass(frozen=True)
class HubBrokerConfig:
    host: str = "127.0.0.1"
    """MQTT broker host."""
    port: int = 1883
    """MQTT broker port (8883 with TLS)."""
    tls_ca_file: Path | None = None
    """CA certificate (PEM) the broker's certificate must chain to; setting it turns TLS on."""
    tls_cert_file: Path | None = None
    """The hub's client certificate (PEM)."""
    tls_key_file: Path | None = None
    """Private key of tls_cert_file (PEM; a systemd credential)."""
    username: str = ""
    """MQTT username; empty = none."""
    password_file: Path | None = None
    """File holding the MQTT password."""
    keepalive_seconds: int = 60
    """MQTT keepalive (10-3600 s)."""
    session_expiry_hours: float = 168.0
    """How long the broker queues box messages for this receiver while it is down."""
    share_group: str = "hub"
    """Shared-subscription group: receivers in one group split the boxes' messages between them."""


@dataclass(frozen=True)
class HubReceiverConfig:
    max_message_bytes: int = 2 * 1024 * 1024
    """Largest message accepted (a chunk plus its header); bigger ones go to the dead-letter table."""
    read_resend_seconds: float = 300.0
    """A read the box has not confirmed (in its heartbeat) this long after publishing is published again."""
    max_instance_mb: int = 1024
    """Largest instance a transfer may declare; bigger ones are refused (keep it inside the unit's MemoryMax)."""
    partial_quota_mb: int = 4096
    """Unfinished transfers one box may hold at the hub; past it, new ones wait (unanswered) until some finish."""
    partial_expiry_days: float = 14.0
    """Unfinished transfers untouched this long are dropped (the box starts them again when it comes back)."""
    min_free_mb: int = 1024
    """Below this much free disk the receiver pauses (messages wait at the broker) and resumes when space returns."""


@dataclass(frozen=True)
class HubPacsConfig:
    host: str = ""
    """The PACS every verified instance (images, the box's SR and SC) is forwarded to by C-STORE; empty = none."""
    port: int = 4242
    """Its DICOM port (Orthanc's default 4242)."""
    ae_title: str = "ORTHANC"
    """Its AE title (the called AE)."""
    calling_ae_title: str = "WASLA_HUB"
    """The hub's AE title towards the PACS (the PACS must know it if it checks callers)."""
    accept_syntaxes: list[str] = field(default_factory=lambda: list(ORTHANC_RENDERS))
    """Transfer syntaxes the PACS stores and shows; anything else (JPEG XL, JPEG 2000) is transcoded first."""
    transcode_to: str = "jpegls"
    """What a transcoded copy is: "jpegls" (lossless, if accepted) or "explicit" (explicit VR little endian)."""
    retry_seconds: float = 10.0
    """First wait after a failed forward; doubled per failure up to 10 minutes."""
    max_refusals: int = 5
    """A PACS that refuses an instance this many times (a DICOM failure status) puts it in the dead letter.
    An unreachable PACS is not a refusal: those instances wait for it however long it is down."""
    timeout_seconds: float = 30.0
    """Association and DIMSE timeout."""
    web_url: str = ""
    """The PACS' web address as reading-room PCs reach it (Orthanc: its HTTP root); the worklist then links each
    study to Orthanc Explorer there. Empty: no link."""


@dataclass(frozen=True)
class HubWebConfig:
    bind: str = "127.0.0.1"
    """Address the radiologists' worklist listens on (`wasla-hub web`); put it behind the hospital's TLS proxy, or
    bind the LAN address only on a trusted network."""
    port: int = 8042
    """Its HTTP port."""
    secure_cookies: bool = False
    """Mark cookies Secure (set true whenever the worklist is reached over HTTPS)."""
    session_hours: float = 10.0
    """A login lasts at most this long (one shift)."""
    idle_minutes: float = 60.0
    """A session unused this long ends (a shared reading-room PC)."""
    max_failures: int = 5
    """Failed logins in a row that lock an account."""
    lockout_minutes: float = 15.0
    """How long a locked account stays locked (`wasla-hub user unlock` ends it sooner)."""
    threads: int = 8
    """Worker threads of the web server."""


@dataclass(frozen=True)
class HubConfig:
    hub: HubSection = field(default_factory=HubSection)
    broker: HubBrokerConfig = field(default_factory=HubBrokerConfig)
    receiver: HubReceiverConfig = field(default_factory=HubReceiverConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """[metrics] enabled / bind / port: the hub's Prometheus endpoint, same keys as the box's."""
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
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", cfg.hub.id):
        raise ConfigError(f"hub.id: {cfg.hub.id!r} must be 1-64 letters, digits, '-' or '_'")
    _validate_database_url(cfg.hub.database_url)
    if not 0 < cfg.broker.port <= 65535:
        raise ConfigError(f"broker.port: {cfg.broker.port} is not a TCP port")
    if not 10 <= cfg.broker.keepalive_seconds <= 3600:
        raise ConfigError(f"broker.keepalive_seconds: must be 10-3600, got {cfg.broker.keepalive_seconds}")
    if not 0 < cfg.broker.session_expiry_hours <= 8760:
        raise ConfigError(f"broker.session_expiry_hours: must be > 0 and <= 8760, got {cfg.broker.session_expiry_hours}")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", cfg.broker.share_group):
        raise ConfigError(f"broker.share_group: {cfg.broker.share_group!r} must be letters, digits, '-' or '_'")
    if (cfg.broker.tls_cert_file is None) != (cfg.broker.tls_key_file is None):
        raise ConfigError("broker.tls_cert_file and broker.tls_key_file go together")
    if not 4096 <= cfg.receiver.max_message_bytes <= 64 * 1024 * 1024:
        raise ConfigError(f"receiver.max_message_bytes: must be 4096-67108864, got {cfg.receiver.max_message_bytes}")
    for key in ("max_instance_mb", "partial_quota_mb"):
        if getattr(cfg.receiver, key) < 1:
            raise ConfigError(f"receiver.{key}: must be >= 1, got {getattr(cfg.receiver, key)}")
    if cfg.receiver.partial_expiry_days <= 0:
        raise ConfigError(f"receiver.partial_expiry_days: must be > 0, got {cfg.receiver.partial_expiry_days}")
    if cfg.receiver.min_free_mb < 0:
        raise ConfigError(f"receiver.min_free_mb: must be >= 0, got {cfg.receiver.min_free_mb}")
    if cfg.receiver.read_resend_seconds <= 0:
        raise ConfigError(f"receiver.read_resend_seconds: must be > 0, got {cfg.receiver.read_resend_seconds}")
    if cfg.log.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"log.level: {cfg.log.level!r} is not DEBUG, INFO, WARNING or ERROR")
    validate_metrics(cfg.metrics)
    _validate_pacs(cfg.pacs)
    _validate_web(cfg.web)


def _validate_web(w: HubWebConfig) -> None:
    if not 0 < w.port <= 65535:
        raise ConfigError(f"web.port: {w.port} is not a TCP port")
    for key, lo, hi in (("session_hours", 0.1, 168), ("idle_minutes", 1, 1440), ("lockout_minutes", 1, 1440)):
        if not lo <= getattr(w, key) <= hi:
            raise ConfigError(f"web.{key}: must be {lo}-{hi}, got {getattr(w, key)}")
    if not 1 <= w.max_failures <= 100:
        raise ConfigError(f"web.max_failures: must be 1-100, got {w.max_failures}")
    if not 1 <= w.threads <= 64:
        raise ConfigError(f"web.threads: must be 1-64, got {w.threads}")


def _validate_pacs(p: HubPacsConfig) -> None:
    if not 0 < p.port <= 65535:
        raise ConfigError(f"pacs.port: {p.port} is not a TCP port")
    for key in ("ae_title", "calling_ae_title"):
        value = getattr(p, key)
        if not 1 <= len(value) <= 16 or not value.isascii() or "\\" in value or not value.strip():
            raise ConfigError(f"pacs.{key}: {value!r} is not a DICOM AE title (1-16 ASCII characters)")
    if p.transcode_to not in TARGETS:
        raise ConfigError(f"pacs.transcode_to: must be one of {', '.join(TARGETS)}, not {p.transcode_to!r}")
    for syntax in p.accept_syntaxes:
        if not re.fullmatch(r"[0-9]+(\.[0-9]+)+", syntax):
            raise ConfigError(f"pacs.accept_syntaxes: {syntax!r} is not a transfer syntax UID")
    if not 0.1 <= p.retry_seconds <= 3600:
        raise ConfigError(f"pacs.retry_seconds: must be 0.1-3600, got {p.retry_seconds}")
    if p.max_refusals < 1:
        raise ConfigError(f"pacs.max_refusals: must be >= 1, got {p.max_refusals}")
    if p.web_url and not re.fullmatch(r"https?://[^\s\"'<>]+", p.web_url):
        raise ConfigError("pacs.web_url: must be an http(s):// address")
    if not 1 <= p.timeout_seconds <= 600:
        raise ConfigError(f"pacs.timeout_seconds: must be 1-600, got {p.timeout_seconds}")


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
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source or 'hub config'}: not valid TOML: {err}") from err
    cfg = replace(build(HubConfig, data, "", base), source=source)
    _validate(cfg)
    return cfg


def load(path: Path | str | None = None, env: dict[str, str] | None = None) -> HubConfig:
    """Load from `path`, else $WASLA_HUB_CONFIG, else /etc/wasla/hub.toml, else the built-in defaults."""
    env = os.environ if env is None else env
    if path is None and env.get(ENV_VAR):
        path = env[ENV_VAR]
    if path is None:
        path = next((p for p in DEFAULT_PATHS if p.is_file()), None)
    if path is None:
        cfg = HubConfig()
        _validate(cfg)
        return cfg
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read hub config file {path}: {err.strerror or err}") from err
    return parse(text, base=path.resolve().parent, source=path)
