"""`wasla doctor`: the checks a field technician runs after install or when something looks wrong."""
from __future__ import annotations

import os
import shutil
import socket
import time

from edge.config import Config
from edge.errors import WaslaError

# A box that boots without an RTC battery often comes up in 1970 or 2000; triage times would then be nonsense.
MIN_PLAUSIBLE_YEAR = 2025


def _check(name: str, fn) -> dict:
    try:
        ok, detail = fn()
    except WaslaError as err:
        ok, detail = False, str(err)
    except Exception as err:  # noqa: BLE001 - doctor reports, never crashes
        ok, detail = False, f"{type(err).__name__}: {err}"
    return {"check": name, "ok": bool(ok), "detail": detail}


def run_checks(cfg: Config) -> list[dict]:
    def config_ok():
        return True, str(cfg.source or "built-in defaults")

    def data_dir():
        d = cfg.box.data_dir
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".doctor-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
        return True, f"{d} writable"

    def store():
        from edge.store import Store

        s = Store.from_config(cfg)
        try:
            row = s.query("PRAGMA integrity_check")[0]
            val = list(row.values())[0]
            return val == "ok", f"{cfg.db_path}: integrity {val}"
        finally:
            s.close()

    def disk():
        free = shutil.disk_usage(cfg.box.data_dir).free / 1e6
        return free >= cfg.storage.min_free_mb, f"{free:.0f} MB free (reserve {cfg.storage.min_free_mb} MB)"

    def models():
        from edge.engine import check_models

        ok, bad = check_models(cfg)
        if bad:
            return False, "; ".join(bad)
        if not ok:
            return False, f"no model package in {cfg.models.dir}"
        return True, ", ".join(f"{m['name']} {m['version']}" for m in ok)

    def runtimes():
        from edge.inference import BACKENDS

        avail = [k for k, cls in BACKENDS.items() if cls.available()]
        return bool(avail), ", ".join(avail) or "no inference runtime installed"

    def dicom_port():
        if not cfg.dicom.enabled:
            return True, "DICOM SCP disabled"
        with socket.socket() as s:
            s.settimeout(1)
            in_use = s.connect_ex(("127.0.0.1" if cfg.dicom.bind in ("0.0.0.0", "") else cfg.dicom.bind, cfg.dicom.port)) == 0
        return True, f"port {cfg.dicom.port} " + ("in use (the daemon is probably running)" if in_use else "free")

    def broker():
        if not cfg.sync.enabled:
            return True, "sync disabled"
        try:
            with socket.create_connection((cfg.sync.broker_host, cfg.sync.broker_port), timeout=2):
                return True, f"{cfg.sync.broker_host}:{cfg.sync.broker_port} reachable"
        except OSError as err:
            return False, f"{cfg.sync.broker_host}:{cfg.sync.broker_port} unreachable ({err.strerror or err})"

    def clock():
        year = time.gmtime().tm_year
        return year >= MIN_PLAUSIBLE_YEAR, time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())

    return [_check(n, f) for n, f in (
        ("config", config_ok), ("data folder", data_dir), ("store", store), ("disk", disk), ("models", models),
        ("runtimes", runtimes), ("DICOM port", dicom_port), ("broker", broker), ("clock", clock))]


__all__ = ["run_checks"]
