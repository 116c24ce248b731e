"""The one typed, strict Wasla configuration: TOML in, frozen dataclasses out, every key documented."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from sync.core.config import LogConfig, MetricsConfig, doc, load_toml, parse_toml, reference
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
    id: Annotated[str, doc(
        "Device id: unique in the fleet, used in MQTT topics. Letters, digits, '-' and '_'.", pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "box-001"
    data_dir: Annotated[Path, doc("Root of the spool, the SQLite store and the quarantine.")] = Path("/var/lib/wasla")


@dataclass(frozen=True)
class DicomConfig:
    enabled: Annotated[bool, doc("Run the DICOM C-STORE SCP.")] = True
    ae_title: Annotated[str, doc("Our AE title (1-16 characters).")] = "WASLA"
    bind: Annotated[str, doc("Address the SCP listens on.")] = "0.0.0.0"
    port: Annotated[int, doc("TCP port (above 1024 so the daemon needs no privilege).", ge=0, le=65535)] = 11112
    allowed_calling_aes: Annotated[list[str], doc(
        "Calling AE titles allowed to store; empty list = any.")] = field(default_factory=list)
    request_timeout: Annotated[float, doc(
        "Seconds a new connection may stay silent before its association request (junk or stalled peers are "
        "dropped).", gt=0)] = 5.0
    acse_timeout: Annotated[float, doc(
        "Seconds to wait for association messages once a peer has asked for an association (release).", gt=0)] = 30.0
    dimse_timeout: Annotated[float, doc("Seconds to wait for DIMSE messages.", gt=0)] = 60.0
    network_timeout: Annotated[float, doc("Seconds of network silence before an association is dropped.", gt=0)] = 60.0
    max_associations: Annotated[int, doc(
        "Concurrent associations accepted (exactly; a silent socket holds none).", ge=1)] = 4
    max_associations_per_peer: Annotated[int, doc(
        "Concurrent associations from one address; 0 = up to max_associations.", ge=0)] = 0


@dataclass(frozen=True)
class WatchConfig:
    enabled: Annotated[bool, doc("Watch a folder for DICOM files dropped by the modality.")] = False
    dir: Annotated[Path | None, doc("Folder to watch; default <data_dir>/watch.")] = None
    poll_seconds: Annotated[float, doc("How often the folder is scanned.", gt=0)] = 2.0
    settle_seconds: Annotated[float, doc(
        "A file is taken only once its size and mtime have not changed for this long (still being copied).", ge=0)] = 2.0


@dataclass(frozen=True)
class InferenceConfig:
    backend: Annotated[str, doc(
        "\"auto\" (onnxruntime unless another installed backend is at least 1.2x faster for the model, measured "
        "at the first load of each package version and recorded in <data_dir>/backend-choice.json, so a restart"
        " never changes it), \"onnxruntime\" or \"openvino\".")] = "auto"
    threads: Annotated[int, doc("Inference threads per model.", ge=1, le=64)] = 2
    providers: Annotated[list[str], doc(
        "ONNX Runtime execution providers in preference order (e.g. TensorRT, CUDA on a Jetson); absent ones "
        "are skipped.")] = field(default_factory=lambda: ["CPUExecutionProvider"])
    warmup: Annotated[int, doc("Warm-up inferences per model at start.", ge=0)] = 3


@dataclass(frozen=True)
class ModelsConfig:
    dir: Annotated[Path, doc(
        "Folder of model packages (<name>/<version>/manifest.json).")] = field(default_factory=_default_models_dir)
    trusted_keys: Annotated[list[Path], doc(
        "Public keys (hex ed25519) whose signatures on model manifests are accepted.")] = field(default_factory=_default_trusted_keys)


@dataclass(frozen=True)
class StorageConfig:
    min_free_mb: Annotated[int, doc(
        "New studies are refused (DICOM 'out of resources') when free disk would drop below this.", ge=0)] = 512
    max_pixels: Annotated[int, doc(
        "Largest rows x columns x samples of one frame; bigger claims are quarantined before decoding.", ge=1)] = 100_000_000
    max_file_mb: Annotated[int, doc(
        "Largest single file accepted (the hub's receiver.max_instance_mb takes as much; a CR is ~10-30 MB).", ge=1)] = 1024
    keep_days: Annotated[float, doc(
        "Spool files of studies the hub has acknowledged are deleted this many days later (0 = keep forever).", ge=0)] = 30.0


@dataclass(frozen=True)
class SyncConfig:
    enabled: Annotated[bool, doc("Upload flags and studies to the hub over MQTT.")] = False
    broker_host: Annotated[str, doc("MQTT broker host.")] = "127.0.0.1"
    broker_port: Annotated[int, doc("MQTT broker port (8883 with TLS).", ge=1, le=65535)] = 1883
    tls_ca_file: Annotated[Path | None, doc(
        "CA certificate (PEM) the broker's certificate must chain to; setting it turns TLS on.")] = None
    tls_cert_file: Annotated[Path | None, doc(
        "This box's client certificate (PEM); the broker ACL keys topics on its identity.")] = None
    tls_key_file: Annotated[Path | None, doc(
        "Private key of tls_cert_file (PEM; a systemd credential, never inside this file).")] = None
    username: Annotated[str, doc("MQTT username; empty = none.")] = ""
    password_file: Annotated[Path | None, doc(
        "File holding the MQTT password (a secret stays out of the config file).")] = None
    client_id: Annotated[str, doc(
        "MQTT client id; empty = \"wasla-box-<box.id>\". Must stay stable: the broker keeps the session under it.", pattern=r"^([A-Za-z0-9_.-]{1,128})?$")] = ""
    keepalive_seconds: Annotated[int, doc("MQTT keepalive (10-3600 s): how fast a silent dead link is noticed.", ge=10, le=3600)] = 60
    session_expiry_hours: Annotated[float, doc(
        "How long the broker keeps this box's session (subscriptions, queued acks and reads) while it is "
        "offline.", gt=0, le=24 * 365)] = 168.0
    chunk_bytes: Annotated[int, doc(
        "Study chunk size (1 KiB-1 MiB). 64 KiB is two seconds at 256 kbit/s: a cut costs at most that (plus "
        "the window below) again, and the ~110 bytes of MQTT + chunk framing and the hub's ack per chunk stay "
        "under 0.3 % of it. scripts/bench_link.py on GEO: wire overhead 5.1 % at 32 KiB, 4.7 % at 64 KiB (goal "
        "5 %).", ge=1024, le=1024 * 1024)] = 65536
    max_inflight_bytes: Annotated[int, doc(
        "Bulk bytes published but not yet confirmed by the broker. A PUBACK comes one round trip after a "
        "chunk's last byte, so full goodput needs rate x RTT + one chunk plus slack for loss recovery: about "
        "3-4 chunks. Flags travel on their own connection (flag_lane) and do not wait behind this window. "
        "scripts/bench_link.py on GEO: 64 KiB chunks with 128 KiB in flight 0.73 of the link, with 256 KiB 0.87"
        " (urgent flag p95 1.3 s; goal 3 s).")] = 262144
    flag_lane: Annotated[bool, doc(
        "Send flags over a second MQTT connection (\"<client_id>-lane\", clean session, same identity), so an "
        "urgent flag never queues behind the bulk bytes already in the study connection's TCP send buffer.")] = True
    socket_sndbuf_bytes: Annotated[int, doc(
        "SO_SNDBUF of the MQTT socket (0 = kernel default). The in-flight window above already bounds what the "
        "kernel holds; a small buffer on top only starved the link (bench_link: 0.41 vs 0.48 of the link at 8 "
        "KiB).", ge=0, le=16 * 1024 * 1024)] = 0
    link_kbps: Annotated[float, doc(
        "The uplink's rate (8-10000000 kbit/s) assumed until the box has measured it from its own uploads "
        "(back-to-back broker acks). It steers the codec choice: a slow, tighter codec is tried only where the "
        "link time it saves beats the time it holds the study back (256 = a GEO VSAT; say 5000 for a LEO "
        "terminal).", ge=8, le=10_000_000)] = 256.0
    max_rate_kbps: Annotated[float, doc(
        "Upload rate cap in kbit/s for all traffic (0 = none). Flags are never delayed by it but are counted.", ge=0)] = 0.0
    bulk_windows: Annotated[list[str], doc(
        "Local-time windows when studies may be sent, e.g. [\"22:00-06:00\"]; empty = any time. Flags ignore "
        "them.")] = field(default_factory=list)
    daily_quota_mb: Annotated[float, doc(
        "Study and telemetry bytes allowed per local day (0 = unlimited). Flags ignore it but are counted.", ge=0)] = 0.0
    urgent_ignores_budget: Annotated[bool, doc(
        "Urgent studies may go outside bulk_windows and past daily_quota (a radiologist is waiting for them).")] = True
    heartbeat_seconds: Annotated[float, doc(
        "Interval of heartbeat telemetry (queue depth, oldest unsent, disk, models, link stats).", gt=0)] = 300.0
    ack_timeout_seconds: Annotated[float, doc(
        "Chunks the hub has not confirmed this long after the broker took them are sent again (after a resume "
        "query).", gt=0)] = 120.0
    preview: Annotated[bool, doc("Attach a small JPEG preview (preview_px on the long side) to each flag.")] = False
    preview_px: Annotated[int, doc("Long side of the flag preview in pixels (64-1024).", ge=64, le=1024)] = 512
    codecs: Annotated[list[str], doc(
        "Lossless wire codecs to try (see sync/wire/codecs.py); empty = the built-in policy.")] = field(default_factory=list)
    frames_limit: Annotated[int, doc(
        "Instances with more frames than this travel as received (re-encoding a long cine would hog the CPU).", ge=1)] = 64
    send_secondary_capture: Annotated[bool, doc(
        "Also send the burned-in Secondary Capture to the hub (the SR always goes); off to save the satellite "
        "link.")] = False
    pseudonymise: Annotated[bool, doc(
        "Replace identifying DICOM attributes (PS3.15 basic profile) with keyed pseudonyms before upload. Off: "
        "the hub is in-country (Law 18-07) and the radiologist needs the patient; on: the hub sees stable "
        "per-fleet pseudonyms.")] = False
    pseudonym_key_file: Annotated[Path | None, doc(
        "Fleet HMAC-SHA256 key (hex, at least 32 bytes) behind the pseudonyms; required when pseudonymise is "
        "on.")] = None


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
    """What one field's declaration cannot say (types and ranges are checked while the file is read)."""
    import re

    if not (1 <= len(cfg.dicom.ae_title) <= 16) or not cfg.dicom.ae_title.isascii():
        raise ConfigError(f"dicom.ae_title: {cfg.dicom.ae_title!r} must be 1-16 ASCII characters")
    if cfg.dicom.max_associations_per_peer > cfg.dicom.max_associations:
        raise ConfigError(f"dicom.max_associations_per_peer: must be 0-{cfg.dicom.max_associations}, "
                          f"got {cfg.dicom.max_associations_per_peer}")
    if cfg.inference.backend not in ("auto", "onnxruntime", "openvino"):
        raise ConfigError(f"inference.backend: {cfg.inference.backend!r} is not one of auto, onnxruntime, openvino")
    s = cfg.sync
    if s.max_inflight_bytes < s.chunk_bytes:
        raise ConfigError(f"sync.max_inflight_bytes: must be >= sync.chunk_bytes ({s.chunk_bytes}), got {s.max_inflight_bytes}")
    for w in s.bulk_windows:
        if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-4]):[0-5]\d", w):
            raise ConfigError(f"sync.bulk_windows: {w!r} is not HH:MM-HH:MM")
    if (s.tls_cert_file is None) != (s.tls_key_file is None):
        raise ConfigError("sync.tls_cert_file and sync.tls_key_file go together")
    if s.pseudonymise and s.pseudonym_key_file is None:
        raise ConfigError("sync.pseudonymise is on but sync.pseudonym_key_file is not set")


def parse(text: str, base: Path | None = None, source: Path | None = None) -> Config:
    return parse_toml(Config, text, _validate, base, source)


def load(path: Path | str | None = None, env: dict[str, str] | None = None) -> Config:
    """Load the config from `path`, else $WASLA_CONFIG, else /etc/wasla/box.toml, else the built-in defaults."""
    return load_toml(Config, _validate, path, env, ENV_VAR, DEFAULT_PATHS)


def describe() -> list[tuple[str, str, str]]:
    """(key, default, doc) for every setting — the reference printed by `wasla config --defaults` and the README."""
    return reference(Config, Config())
