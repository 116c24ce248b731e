"""The one typed, strict Wasla configuration: TOML in, frozen dataclasses out, every key documented."""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from sync.core.config import LogConfig, MetricsConfig, build, field_docs, validate_metrics
from sync.core.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PATHS = (Path("/etc/wasla/box.toml"),)
ENV_VAR = "WASLA_CONFIG"


def _default_models_dir() -> Path:
    # An editable/source install ships the packages beside the code; an installed box keeps them under /var/lib.
    here = REPO_ROOT / "models"
    return here if here.is_dir() else Path("/var/lib/wasla/models")


def _default_trusted_keys() -> list[Path]:
    # Never a folder the daemon can write (its models dir on an installed box is under its StateDirectory): a
    # compromised daemon could then trust a key of its own. Source tree: the repo's dev keys; installed: the
    # root-owned fleet key the installer put in /etc/wasla.
    here = REPO_ROOT / "models" / "keys"
    if here.is_dir():
        return sorted(here.glob("*.pub"))
    fleet = Path("/etc/wasla/model-signing.pub")
    return [fleet] if fleet.is_file() else []


@dataclass(frozen=True)
class BoxConfig:
    id: str = "box-001"
    """Device id: unique in the fleet, used in MQTT topics. Letters, digits, '-' and '_'."""
    data_dir: Path = Path("/var/lib/wasla")
    """Root of the spool, the SQLite store and the quarantine."""


@dataclass(frozen=True)
class DicomConfig:
    enabled: bool = True
    """Run the DICOM C-STORE SCP."""
    ae_title: str = "WASLA"
    """Our AE title (1-16 characters)."""
    bind: str = "0.0.0.0"
    """Address the SCP listens on."""
    port: int = 11112
    """TCP port (above 1024 so the daemon needs no privilege)."""
    allowed_calling_aes: list[str] = field(default_factory=list)
    """Calling AE titles allowed to store; empty list = any."""
    request_timeout: float = 5.0
    """Seconds a new connection may stay silent before its association request (junk or stalled peers are dropped)."""
    acse_timeout: float = 30.0
    """Seconds to wait for association messages once a peer has asked for an association (release)."""
    dimse_timeout: float = 60.0
    """Seconds to wait for DIMSE messages."""
    network_timeout: float = 60.0
    """Seconds of network silence before an association is dropped."""
    max_associations: int = 4
    """Concurrent associations accepted (exactly; a silent socket holds none)."""
    max_associations_per_peer: int = 0
    """Concurrent associations from one address; 0 = up to max_associations."""


@dataclass(frozen=True)
class WatchConfig:
    enabled: bool = False
    """Watch a folder for DICOM files dropped by the modality."""
    dir: Path | None = None
    """Folder to watch; default <data_dir>/watch."""
    poll_seconds: float = 2.0
    """How often the folder is scanned."""
    settle_seconds: float = 2.0
    """A file is taken only once its size and mtime have not changed for this long (still being copied)."""


@dataclass(frozen=True)
class InferenceConfig:
    backend: str = "auto"
    """"auto" (onnxruntime unless another installed backend is at least 1.2x faster for the model, measured at
    the first load of each package version and recorded in <data_dir>/backend-choice.json, so a restart never
    changes it), "onnxruntime" or "openvino"."""
    threads: int = 2
    """Inference threads per model."""
    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    """ONNX Runtime execution providers in preference order (e.g. TensorRT, CUDA on a Jetson); absent ones are skipped."""
    warmup: int = 3
    """Warm-up inferences per model at start."""


@dataclass(frozen=True)
class ModelsConfig:
    dir: Path = field(default_factory=_default_models_dir)
    """Folder of model packages (<name>/<version>/manifest.json)."""
    trusted_keys: list[Path] = field(default_factory=_default_trusted_keys)
    """Public keys (hex ed25519) whose signatures on model manifests are accepted."""


@dataclass(frozen=True)
class StorageConfig:
    min_free_mb: int = 512
    """New studies are refused (DICOM 'out of resources') when free disk would drop below this."""
    max_pixels: int = 100_000_000
    """Largest rows x columns x samples of one frame; bigger claims are quarantined before decoding."""
    max_file_mb: int = 1024
    """Largest single file accepted (the hub's receiver.max_instance_mb takes as much; a CR is ~10-30 MB)."""
    keep_days: float = 30.0
    """Spool files of studies the hub has acknowledged are deleted this many days later (0 = keep forever)."""


@dataclass(frozen=True)
class SyncConfig:
    enabled: bool = False
    """Upload flags and studies to the hub over MQTT."""
    broker_host: str = "127.0.0.1"
    """MQTT broker host."""
    broker_port: int = 1883
    """MQTT broker port (8883 with TLS)."""
    tls_ca_file: Path | None = None
    """CA certificate (PEM) the broker's certificate must chain to; setting it turns TLS on."""
    tls_cert_file: Path | None = None
    """This box's client certificate (PEM); the broker ACL keys topics on its identity."""
    tls_key_file: Path | None = None
    """Private key of tls_cert_file (PEM; a systemd credential, never inside this file)."""
    username: str = ""
    """MQTT username; empty = none."""
    password_file: Path | None = None
    """File holding the MQTT password (a secret stays out of the config file)."""
    client_id: str = ""
    """MQTT client id; empty = "wasla-box-<box.id>". Must stay stable: the broker keeps the session under it."""
    keepalive_seconds: int = 60
    """MQTT keepalive (10-3600 s): how fast a silent dead link is noticed."""
    session_expiry_hours: float = 168.0
    """How long the broker keeps this box's session (subscriptions, queued acks and reads) while it is offline."""
    chunk_bytes: int = 65536
    """Study chunk size (1 KiB-1 MiB). 64 KiB is two seconds at 256 kbit/s: a cut costs at most that (plus the window
    below) again, and the ~110 bytes of MQTT + chunk framing and the hub's ack per chunk stay under 0.3 % of it.
    scripts/bench_link.py on GEO: wire overhead 5.1 % at 32 KiB, 4.7 % at 64 KiB (goal 5 %)."""
    max_inflight_bytes: int = 262144
    """Bulk bytes published but not yet confirmed by the broker. A PUBACK comes one round trip after a chunk's last
    byte, so full goodput needs rate x RTT + one chunk plus slack for loss recovery: about 3-4 chunks. Flags travel
    on their own connection (flag_lane) and do not wait behind this window. scripts/bench_link.py on GEO: 64 KiB
    chunks with 128 KiB in flight 0.73 of the link, with 256 KiB 0.87 (urgent flag p95 1.3 s; goal 3 s)."""
    flag_lane: bool = True
    """Send flags over a second MQTT connection ("<client_id>-lane", clean session, same identity), so an urgent
    flag never queues behind the bulk bytes already in the study connection's TCP send buffer."""
    socket_sndbuf_bytes: int = 0
    """SO_SNDBUF of the MQTT socket (0 = kernel default). The in-flight window above already bounds what the kernel
    holds; a small buffer on top only starved the link (bench_link: 0.41 vs 0.48 of the link at 8 KiB)."""
    link_kbps: float = 256.0
    """The uplink's rate (8-10000000 kbit/s) assumed until the box has measured it from its own uploads (back-to-back
    broker acks). It steers the codec choice: a slow, tighter codec is tried only where the link time it saves beats
    the time it holds the study back (256 = a GEO VSAT; say 5000 for a LEO terminal)."""
    max_rate_kbps: float = 0.0
    """Upload rate cap in kbit/s for all traffic (0 = none). Flags are never delayed by it but are counted."""
    bulk_windows: list[str] = field(default_factory=list)
    """Local-time windows when studies may be sent, e.g. ["22:00-06:00"]; empty = any time. Flags ignore them."""
    daily_quota_mb: float = 0.0
    """Study and telemetry bytes allowed per local day (0 = unlimited). Flags ignore it but are counted."""
    urgent_ignores_budget: bool = True
    """Urgent studies may go outside bulk_windows and past daily_quota (a radiologist is waiting for them)."""
    heartbeat_seconds: float = 300.0
    """Interval of heartbeat telemetry (queue depth, oldest unsent, disk, models, link stats)."""
    ack_timeout_seconds: float = 120.0
    """Chunks the hub has not confirmed this long after the broker took them are sent again (after a resume query)."""
    preview: bool = False
    """Attach a small JPEG preview (preview_px on the long side) to each flag."""
    preview_px: int = 512
    """Long side of the flag preview in pixels (64-1024)."""
    codecs: list[str] = field(default_factory=list)
    """Lossless wire codecs to try (see sync/wire/codecs.py); empty = the built-in policy."""
    frames_limit: int = 64
    """Instances with more frames than this travel as received (re-encoding a long cine would hog the CPU)."""
    send_secondary_capture: bool = False
    """Also send the burned-in Secondary Capture to the hub (the SR always goes); off to save the satellite link."""
    pseudonymise: bool = False
    """Replace identifying DICOM attributes (PS3.15 basic profile) with keyed pseudonyms before upload. Off: the hub is
    in-country (Law 18-07) and the radiologist needs the patient; on: the hub sees stable per-fleet pseudonyms."""
    pseudonym_key_file: Path | None = None
    """Fleet HMAC-SHA256 key (hex, at least 32 bytes) behind the pseudonyms; required when pseudonymise is on."""


@dataclass(frozen=True)
class Config:
    box: BoxConfig = field(default_factory=BoxConfig)
    dicom: DicomConfig = field(default_factory=DicomConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    source: Path | None = None

    @property
    def db_path(self) -> Path:
        return self.box.data_dir / "wasla.db"

    @property
    def spool_dir(self) -> Path:
        return self.box.data_dir / "spool"

    @property
    def quarantine_dir(self) -> Path:
        return self.box.data_dir / "quarantine"

    @property
    def backend_choice_path(self) -> Path:
        """Where "auto" records the backend it chose for each package version, so a restart keeps it."""
        return self.box.data_dir / "backend-choice.json"

    @property
    def watch_dir(self) -> Path:
        return self.watch.dir or self.box.data_dir / "watch"


def _validate(cfg: Config) -> None:
    import re

    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", cfg.box.id):
        raise ConfigError(f"box.id: {cfg.box.id!r} must be 1-64 letters, digits, '-' or '_'")
    if not (1 <= len(cfg.dicom.ae_title) <= 16) or not cfg.dicom.ae_title.isascii():
        raise ConfigError(f"dicom.ae_title: {cfg.dicom.ae_title!r} must be 1-16 ASCII characters")
    if not 0 <= cfg.dicom.port <= 65535:
        raise ConfigError(f"dicom.port: {cfg.dicom.port} is not a TCP port")
    if not 0 < cfg.sync.broker_port <= 65535:
        raise ConfigError(f"sync.broker_port: {cfg.sync.broker_port} is not a TCP port")
    _validate_sync(cfg.sync)
    for key, val in (("dicom.request_timeout", cfg.dicom.request_timeout), ("dicom.acse_timeout", cfg.dicom.acse_timeout), ("dicom.dimse_timeout", cfg.dicom.dimse_timeout),
                     ("dicom.network_timeout", cfg.dicom.network_timeout), ("watch.poll_seconds", cfg.watch.poll_seconds)):
        if val <= 0:
            raise ConfigError(f"{key}: must be > 0, got {val}")
    if cfg.watch.settle_seconds < 0:
        raise ConfigError(f"watch.settle_seconds: must be >= 0, got {cfg.watch.settle_seconds}")
    if cfg.dicom.max_associations < 1:
        raise ConfigError(f"dicom.max_associations: must be >= 1, got {cfg.dicom.max_associations}")
    if not 0 <= cfg.dicom.max_associations_per_peer <= cfg.dicom.max_associations:
        raise ConfigError(f"dicom.max_associations_per_peer: must be 0-{cfg.dicom.max_associations}, "
                          f"got {cfg.dicom.max_associations_per_peer}")
    if cfg.inference.backend not in ("auto", "onnxruntime", "openvino"):
        raise ConfigError(f"inference.backend: {cfg.inference.backend!r} is not one of auto, onnxruntime, openvino")
    if not 1 <= cfg.inference.threads <= 64:
        raise ConfigError(f"inference.threads: must be 1-64, got {cfg.inference.threads}")
    if cfg.inference.warmup < 0:
        raise ConfigError(f"inference.warmup: must be >= 0, got {cfg.inference.warmup}")
    if cfg.storage.keep_days < 0:
        raise ConfigError(f"storage.keep_days: must be >= 0, got {cfg.storage.keep_days}")
    if cfg.storage.min_free_mb < 0 or cfg.storage.max_pixels < 1 or cfg.storage.max_file_mb < 1:
        raise ConfigError("storage: min_free_mb must be >= 0, max_pixels and max_file_mb >= 1")
    if cfg.log.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"log.level: {cfg.log.level!r} is not DEBUG, INFO, WARNING or ERROR")
    validate_metrics(cfg.metrics)


def _validate_sync(s: SyncConfig) -> None:
    import re

    if s.client_id and not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", s.client_id):
        raise ConfigError(f"sync.client_id: {s.client_id!r} must be 1-128 letters, digits, '.', '-' or '_'")
    if not 10 <= s.keepalive_seconds <= 3600:
        raise ConfigError(f"sync.keepalive_seconds: must be 10-3600, got {s.keepalive_seconds}")
    if not 0 < s.session_expiry_hours <= 24 * 365:
        raise ConfigError(f"sync.session_expiry_hours: must be > 0 and <= 8760, got {s.session_expiry_hours}")
    if not 1024 <= s.chunk_bytes <= 1024 * 1024:
        raise ConfigError(f"sync.chunk_bytes: must be 1024-1048576, got {s.chunk_bytes}")
    if s.max_inflight_bytes < s.chunk_bytes:
        raise ConfigError(f"sync.max_inflight_bytes: must be >= sync.chunk_bytes ({s.chunk_bytes}), got {s.max_inflight_bytes}")
    if not 0 <= s.socket_sndbuf_bytes <= 16 * 1024 * 1024:
        raise ConfigError(f"sync.socket_sndbuf_bytes: must be 0-16777216, got {s.socket_sndbuf_bytes}")
    if not 8 <= s.link_kbps <= 10_000_000:
        raise ConfigError(f"sync.link_kbps: must be 8-10000000, got {s.link_kbps}")
    for key, val in (("max_rate_kbps", s.max_rate_kbps), ("daily_quota_mb", s.daily_quota_mb)):
        if val < 0:
            raise ConfigError(f"sync.{key}: must be >= 0, got {val}")
    for key, val in (("heartbeat_seconds", s.heartbeat_seconds), ("ack_timeout_seconds", s.ack_timeout_seconds)):
        if val <= 0:
            raise ConfigError(f"sync.{key}: must be > 0, got {val}")
    if not 64 <= s.preview_px <= 1024:
        raise ConfigError(f"sync.preview_px: must be 64-1024, got {s.preview_px}")
    if s.frames_limit < 1:
        raise ConfigError(f"sync.frames_limit: must be >= 1, got {s.frames_limit}")
    for w in s.bulk_windows:
        if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-4]):[0-5]\d", w):
            raise ConfigError(f"sync.bulk_windows: {w!r} is not HH:MM-HH:MM")
    if (s.tls_cert_file is None) != (s.tls_key_file is None):
        raise ConfigError("sync.tls_cert_file and sync.tls_key_file go together")
    if s.pseudonymise and s.pseudonym_key_file is None:
        raise ConfigError("sync.pseudonymise is on but sync.pseudonym_key_file is not set")


def parse(text: str, base: Path | None = None, source: Path | None = None) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source or 'config'}: not valid TOML: {err}") from err
    cfg = build(Config, data, "", base)
    cfg = replace(cfg, source=source)
    _validate(cfg)
    return cfg


def load(path: Path | str | None = None, env: dict[str, str] | None = None) -> Config:
    """Load the config from `path`, else $WASLA_CONFIG, else /etc/wasla/box.toml, else the built-in defaults."""
    env = os.environ if env is None else env
    if path is None and env.get(ENV_VAR):
        path = env[ENV_VAR]
    if path is None:
        path = next((p for p in DEFAULT_PATHS if p.is_file()), None)
    if path is None:
        cfg = Config()
        _validate(cfg)
        return cfg
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from err
    return parse(text, base=path.resolve().parent, source=path)


def describe() -> list[tuple[str, str, str]]:
    """(key, default, doc) for every setting — the reference printed by `wasla config --defaults` and the README."""
    rows = []
    defaults = Config()
    for section in fields(Config):
        if section.name == "source":
            continue
        cls = type(getattr(defaults, section.name))
        docs = field_docs(cls)
        for f in fields(cls):
            rows.append((f"{section.name}.{f.name}", repr(getattr(getattr(defaults, section.name), f.name)), docs.get(f.name, "")))
    return rows


