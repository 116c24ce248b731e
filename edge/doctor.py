"""`wasla doctor`: the checks a field technician runs after install or when something looks wrong.

Each check answers (ok, message, params): `message` is an English template marked for translation and `detail`
is it filled in, so `--json` stays the same in every language while the CLI shows `_(message)`."""
from __future__ import annotations

import functools
import os
import shutil
import socket
import time

from edge.config import Config
from sync.core.errors import WaslaError
from sync.core.i18n import N_

# A box that boots without an RTC battery often comes up in 1970 or 2000; triage times would then be nonsense.
MIN_PLAUSIBLE_YEAR = 2025
# A detail that is only a value (a path, a list of names, an error text): nothing in it to translate.
RAW = "{value}"


def _check(name: str, fn) -> dict:
    try:
        ok, message, params = fn()
    except WaslaError as err:
        ok, message, params = False, RAW, {"value": str(err)}
    except Exception as err:  # noqa: BLE001 - doctor reports, never crashes
        ok, message, params = False, RAW, {"value": f"{type(err).__name__}: {err}"}
    return {"check": name, "ok": bool(ok), "detail": message.format(**params), "message": message, "params": params}


def _config_ok(cfg: Config):
    if cfg.source:
        return True, RAW, {"value": str(cfg.source)}
    return True, N_("built-in defaults"), {}


def _data_dir(cfg: Config):
    d = cfg.box.data_dir
    d.mkdir(parents=True, exist_ok=True)
    probe = d / f".doctor-{os.getpid()}"
    probe.write_bytes(b"x")
    probe.unlink()
    return True, N_("{path} writable"), {"path": str(d)}


def _store(cfg: Config):
    from edge.store import Store

    s = Store.reader(cfg)
    try:
        row = s.query("PRAGMA integrity_check")[0]
        val = list(row.values())[0]
        return val == "ok", N_("{path}: integrity {result}"), {"path": str(cfg.db_path), "result": val}
    finally:
        s.close()


def _spool(cfg: Config):
    from edge.store import ACKNOWLEDGED, PURGED, QUARANTINED, Store

    s = Store.reader(cfg)
    try:
        rows = s.query("SELECT * FROM instances WHERE state NOT IN (?, ?, ?) AND path != ''",
                       [QUARANTINED, ACKNOWLEDGED, PURGED])
        bad = [f"#{r['id']}" for r in rows if s.spool_damage(r)]
    finally:
        s.close()
    if bad:
        return False, N_("{bad} of {checked} spool files damaged ({ids}): ask the modality to resend them"), \
            {"bad": len(bad), "checked": len(rows), "ids": ", ".join(bad[:10])}
    return True, N_("{checked} spool files match what was received"), {"checked": len(rows)}


def _refused(cfg: Config):
    from edge.store import Store

    s = Store.reader(cfg)
    try:
        tables = {r["name"] for r in s.query("SELECT name FROM sqlite_master WHERE type = 'table'")}
        rows = s.query("SELECT kind, reason FROM outbox WHERE state = 'failed'") if "outbox" in tables else []
    finally:
        s.close()
    if rows:
        return False, N_("{n} upload(s) refused by the hub for good (`wasla sync` shows why), e.g.: {reason}"), \
            {"n": len(rows), "reason": (rows[0]["reason"] or "")[:120]}
    return True, N_("no upload refused by the hub"), {}


def _disk(cfg: Config):
    free = shutil.disk_usage(cfg.box.data_dir).free / 1e6
    return free >= cfg.storage.min_free_mb, N_("{free} MB free (reserve {reserve} MB)"), \
        {"free": f"{free:.0f}", "reserve": cfg.storage.min_free_mb}


def _models(cfg: Config):
    from edge.engine import check_models

    ok, bad = check_models(cfg)
    if bad:
        return False, N_("refused: {errors}"), {"errors": "; ".join(bad)}
    if not ok:
        return False, N_("no model package in {path}"), {"path": str(cfg.models.dir)}
    return True, RAW, {"value": ", ".join(f"{m['name']} {m['version']}" for m in ok)}


def _runtimes(cfg: Config):
    from edge.inference import BACKENDS

    avail = [k for k, cls in BACKENDS.items() if cls.available()]
    if not avail:
        return False, N_("no inference runtime installed"), {}
    return True, RAW, {"value": ", ".join(avail)}


def _dicom_port(cfg: Config):
    if not cfg.dicom.enabled:
        return True, N_("DICOM SCP disabled"), {}
    with socket.socket() as s:
        s.settimeout(1)
        in_use = s.connect_ex(("127.0.0.1" if cfg.dicom.bind in ("0.0.0.0", "") else cfg.dicom.bind, cfg.dicom.port)) == 0
    if in_use:
        return True, N_("port {port} in use (the daemon is probably running)"), {"port": cfg.dicom.port}
    return True, N_("port {port} free"), {"port": cfg.dicom.port}


def _broker(cfg: Config):
    if not cfg.sync.enabled:
        return True, N_("sync disabled"), {}
    try:
        with socket.create_connection((cfg.sync.broker_host, cfg.sync.broker_port), timeout=2):
            return True, N_("{broker} reachable"), {"broker": f"{cfg.sync.broker_host}:{cfg.sync.broker_port}"}
    except OSError as err:
        return False, N_("{broker} unreachable ({error})"), \
            {"broker": f"{cfg.sync.broker_host}:{cfg.sync.broker_port}", "error": str(err.strerror or err)}


def _clock(cfg: Config):
    year = time.gmtime().tm_year
    return year >= MIN_PLAUSIBLE_YEAR, RAW, \
        {"value": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def run_checks(cfg: Config) -> list[dict]:
    """Every check, in the order the technician reads them."""
    return [_check(n, functools.partial(f, cfg)) for n, f in (
        (N_("config"), _config_ok), (N_("data folder"), _data_dir), (N_("store"), _store), (N_("spool"), _spool),
        (N_("uploads"), _refused), (N_("disk"), _disk),
        (N_("models"), _models), (N_("runtimes"), _runtimes), (N_("DICOM port"), _dicom_port), (N_("broker"), _broker),
        (N_("clock"), _clock))]


__all__ = ["run_checks"]
