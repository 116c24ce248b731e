"""`wasla`: the technician's thin command line over the box library; errors become one line and an exit code."""
from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Optional

import typer

try:  # recent typer vendors click
    from typer._click.exceptions import ClickException as _ClickException
except ImportError:  # pragma: no cover - older typer with click installed
    from click.exceptions import ClickException as _ClickException

from edge import config as config_mod
from edge.errors import WaslaError
from edge.i18n import _, pick_language, set_language

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Wasla clinic box: offline DICOM triage.")
models_app = typer.Typer(no_args_is_help=True, help="List, install, activate or roll back model packages.")
app.add_typer(models_app, name="models")

_state: dict = {}


@app.callback()
def _root(
    config: Optional[Path] = typer.Option(None, "--config", "-c", envvar="WASLA_CONFIG", help="Config file (TOML)."),
    lang: Optional[str] = typer.Option(None, "--lang", help="Language: en, fr or ar."),
) -> None:
    """Wasla clinic box. Example: wasla --config /etc/wasla/box.toml status"""
    set_language(pick_language(lang))
    _state["config_path"] = config


def _cfg() -> config_mod.Config:
    if "cfg" not in _state:
        _state["cfg"] = config_mod.load(_state.get("config_path"), env={})
    return _state["cfg"]


def _store():
    from edge.store import Store

    return Store.from_config(_cfg())


def _print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str, ensure_ascii=False))


def _table(rows: list[dict], cols: list[tuple[str, str]]) -> None:
    if not rows:
        typer.echo(_("(none)"))
        return
    cells = [[str(r.get(k, "") if r.get(k) is not None else "") for k, _h in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_k, h) in enumerate(cols)]
    typer.echo("  ".join(h.ljust(w) for (_k, h), w in zip(cols, widths)))
    for c in cells:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def _ts(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _parse_when(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value).timestamp()
    except ValueError as err:
        raise typer.BadParameter(f"{value!r}: expected YYYY-MM-DD or YYYY-MM-DDTHH:MM") from err


def _broker_reachable(cfg) -> bool:
    try:
        with socket.create_connection((cfg.sync.broker_host, cfg.sync.broker_port), timeout=1.5):
            return True
    except OSError:
        return False


@app.command()
def run() -> None:
    """Run the box daemon (DICOM SCP, watch folder, triage, sync). Example: wasla run"""
    from edge.daemon import run as run_daemon

    raise typer.Exit(run_daemon(_cfg()))


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Queue counts, last ingest, models, disk and broker. Example: wasla status --json"""
    from edge.engine import check_models

    cfg = _cfg()
    store = _store()
    models, bad = check_models(cfg)
    disk = shutil.disk_usage(cfg.box.data_dir)
    info = {
        "box": cfg.box.id, "states": store.counts(), "labels": store.label_counts(),
        "last_ingest": _ts(store.last_ingest()), "models": models, "model_errors": bad,
        "disk_free_mb": round(disk.free / 1e6), "disk_total_mb": round(disk.total / 1e6),
        "broker": f"{cfg.sync.broker_host}:{cfg.sync.broker_port}", "broker_reachable": _broker_reachable(cfg),
    }
    if as_json:
        _print_json(info)
        return
    typer.echo(f"{_('Box')}: {info['box']}")
    typer.echo(f"{_('Queue')}: " + ", ".join(f"{_(k)} {v}" for k, v in info["states"].items() if v))
    typer.echo(f"{_('Studies')}: " + ", ".join(f"{_(k)} {v}" for k, v in info["labels"].items()))
    typer.echo(f"{_('Last ingest')}: {info['last_ingest']}")
    for m in models:
        typer.echo(f"{_('Model')}: {m['name']} {m['version']}")
    for b in bad:
        typer.echo(f"{_('Model refused')}: {b}")
    if not models:
        typer.echo(_("Model: none (every study is flagged review)"))
    typer.echo(f"{_('Disk free')}: {info['disk_free_mb']} MB / {info['disk_total_mb']} MB")
    typer.echo(f"{_('Broker')}: {info['broker']} " + (_("reachable") if info["broker_reachable"] else _("unreachable")))


@app.command()
def results(
    label: Optional[str] = typer.Option(None, help="Only studies with this label: normal, review or urgent."),
    since: Optional[str] = typer.Option(None, help="Received on or after (YYYY-MM-DD)."),
    until: Optional[str] = typer.Option(None, help="Received before (YYYY-MM-DD)."),
    quarantined: bool = typer.Option(False, "--quarantined", help="List quarantined inputs and their reasons."),
    limit: int = typer.Option(100, help="Maximum rows."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Triage results, most urgent first. Example: wasla results --label urgent --since 2026-11-01"""
    if label and label not in ("normal", "review", "urgent"):
        raise typer.BadParameter(f"{label!r} is not normal, review or urgent", param_hint="--label")
    store = _store()
    if quarantined:
        rows = store.quarantined(limit)
        if as_json:
            _print_json(rows)
            return
        for r in rows:
            r["when"] = _ts(r["received_at"])
        _table(rows, [("id", "#"), ("when", _("received")), ("source", _("source")), ("reason", _("reason"))])
        return
    rows = store.studies(label=label, since=_parse_when(since), until=_parse_when(until), limit=limit)
    if as_json:
        _print_json(rows)
        return
    for r in rows:
        r["when"] = _ts(r["first_received_at"])
        r["shown_label"] = _(r["label"]) if r["label"] else _("pending")
    _table(rows, [("shown_label", _("label")), ("study_uid", _("study")), ("modality", _("modality")),
                  ("n_instances", _("images")), ("when", _("received"))])


@app.command()
def show(study: str = typer.Argument(..., help="Study Instance UID (or a unique prefix)."),
         as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """One study: label, reasons, each image's model scores and timings, the radiologist's read. Example: wasla show 1.2.840"""
    s = _store().study(study)
    if as_json:
        _print_json(s)
        return
    typer.echo(f"{_('Study')}: {s['study_uid']}")
    typer.echo(f"{_('Label')}: {_(s['label']) if s['label'] else _('pending')}")
    for r in s["reasons"]:
        typer.echo(f"  {_('reason')}: {_(r['code'])}")
    for inst in s["instances"]:
        typer.echo(f"- {_('image')} #{inst['id']} {inst['modality'] or ''} {_(inst['state'])} "
                   f"{_(inst['label']) if inst['label'] else ''} {inst['reason'] or ''}".rstrip())
        for res in inst["results"]:
            if res["model"]:
                scores = ", ".join(f"{k} {v:.3f}" for k, v in (res["scores"] or {}).items())
                typer.echo(f"    {res['model']} {res['model_version']} ({res['backend']}): {scores}; "
                           f"{_('thresholds')} {res['thresholds']}")
            for reason in res["reasons"] or []:
                typer.echo(f"    {_('reason')}: {_(reason['code'])}")
    if s.get("read_disposition"):
        by = f"{s['read_by']}, " if s.get("read_by") else ""
        typer.echo(f"{_('Radiologist read')}: {s['read_disposition']} — {s.get('read_note') or ''} ({by}{_ts(s.get('read_at'))})")


@app.command("sync")
def sync_status(now: bool = typer.Option(False, "--now", help="Ask the running daemon to re-query the hub and send now."),
                as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Outbox to the hub: queued flags and studies, bytes, ratio, today's usage. Example: wasla sync --now"""
    import datetime as _dt

    from sync.outbox import Outbox

    cfg = _cfg()
    box = Outbox(_store(), cfg.box.data_dir / "outbox", cfg.box.id)
    if now:
        # The daemon watches this file's mtime; a nudge is harmless when no daemon runs.
        (box.wire_dir / ".nudge").touch()
    info = {**box.summary(), "enabled": cfg.sync.enabled, "broker": f"{cfg.sync.broker_host}:{cfg.sync.broker_port}",
            "usage_today": box.load_usage(_dt.date.today().isoformat()), "active": box.active_rows(), "nudged": now}
    if as_json:
        _print_json(info)
        return
    typer.echo(f"{_('Sync')}: {_('on') if cfg.sync.enabled else _('off')} -> {info['broker']}")
    typer.echo(f"{_('Queue')}: {info['queue_depth']} ({info['queued_bytes']} bytes), "
               f"{_('oldest')} {_ts(info['oldest_unsent_at'])}")
    typer.echo(f"{_('Done')}: " + ", ".join(f"{k} {v}" for k, v in sorted(info["counts"].items())))
    if info["wire_ratio"]:
        typer.echo(f"{_('Compression ratio')}: {info['wire_ratio']}")
    usage = info["usage_today"] or {}
    typer.echo(f"{_('Sent today')}: flags {usage.get('flag', 0)} B, studies {usage.get('bulk', 0)} B, "
               f"telemetry {usage.get('telemetry', 0)} B")
    for r in info["active"]:
        r["progress"] = f"{sum(b - a + 1 for a, b in json.loads(r['have'] or '[]'))}/{r['count']}" if r["count"] else ""
    _table(info["active"], [("kind", _("kind")), ("state", _("state")), ("label", _("label")),
                            ("study_uid", _("study")), ("progress", _("chunks")), ("reason", _("reason"))])
    if info["dead_letters"]:
        typer.echo(f"{_('Dead letters')}: {info['dead_letters']}")
    if now:
        typer.echo(_("Nudged the daemon."))


@app.command()
def ingest(paths: list[Path] = typer.Argument(..., help="DICOM files or folders."),
           as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Add DICOM files or folders to the queue (the daemon triages them). Example: wasla ingest /media/usb/DICOM"""
    from edge import ingest as ingest_mod

    cfg = _cfg()
    store = _store()
    files = ingest_mod.expand_paths(paths)
    outcomes = []
    with typer.progressbar(length=len(files), label=_("Ingesting"), file=sys.stderr, hidden=as_json) as bar:
        for f in files:
            outcomes.append(ingest_mod.ingest_file(store, f, source="cli", max_pixels=cfg.storage.max_pixels,
                                                   max_file_bytes=cfg.storage.max_file_mb * 1_000_000))
            bar.update(1)
    summary = {k: sum(1 for o in outcomes if o.status == k) for k in ("stored", "duplicate", "quarantined")}
    if as_json:
        _print_json({"summary": summary, "files": [{"path": str(f), **o.__dict__} for f, o in zip(files, outcomes)]})
        return
    typer.echo(f"{_('stored')} {summary['stored']}, {_('duplicate')} {summary['duplicate']}, "
               f"{_('quarantined')} {summary['quarantined']}")
    for f, o in zip(files, outcomes):
        if o.status == "quarantined":
            typer.echo(f"  {f}: {o.reason}")


@app.command()
def requeue(study: Optional[str] = typer.Argument(None, help="Study Instance UID."),
            instance: Optional[int] = typer.Option(None, help="Instance number (#) instead of a study."),
            quarantined_only: bool = typer.Option(False, "--quarantined", help="Only quarantined images."),
            as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Run a study or an image through triage again. Example: wasla requeue --instance 42"""
    if not study and instance is None:
        raise typer.BadParameter("give a study UID or --instance N")
    n = _store().requeue(study_uid=study, instance_id=instance, quarantined_only=quarantined_only)
    if as_json:
        _print_json({"requeued": n})
    else:
        typer.echo(f"{_('requeued')}: {n}")


@app.command()
def doctor(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Check config, models, disk, ports, broker and clock; exits 1 if any check fails. Example: wasla doctor"""
    from edge.doctor import run_checks

    checks = run_checks(_cfg())
    if as_json:
        _print_json(checks)
    else:
        for c in checks:
            typer.echo(f"[{_('ok') if c['ok'] else _('FAIL')}] {_(c['check'])}: {c['detail']}")
    if not all(c["ok"] for c in checks):
        raise typer.Exit(1)


@app.command("config")
def show_config(defaults: bool = typer.Option(False, "--defaults", help="Print every key with its default and meaning."),
                as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Show the effective configuration. Example: wasla config --defaults"""
    if defaults:
        rows = [{"key": k, "default": d, "doc": doc} for k, d, doc in config_mod.describe()]
        _print_json(rows) if as_json else _table(rows, [("key", "key"), ("default", "default"), ("doc", "")])
        return
    from dataclasses import asdict

    _print_json(asdict(_cfg()))


@models_app.command("list")
def models_list(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Installed packages, which version is active, and whether each verifies. Example: wasla models list"""
    from edge import modelpkg

    cfg = _cfg()
    rows = modelpkg.inventory(cfg.models.dir, modelpkg.load_trusted_keys(cfg.models.trusted_keys))
    if as_json:
        _print_json(rows)
    else:
        _table(rows, [("name", _("model")), ("version", _("version")), ("active", _("active")), ("status", _("status"))])


@models_app.command("install")
def models_install(source: Path = typer.Argument(..., help="Package folder or .tar.gz."),
                   activate: bool = typer.Option(True, help="Make it the active version.")) -> None:
    """Verify and install a signed model package. Example: wasla models install /media/usb/cxr-triage-1.1.0.tar.gz"""
    from edge import modelpkg

    cfg = _cfg()
    pkg = modelpkg.install(source, cfg.models.dir, modelpkg.load_trusted_keys(cfg.models.trusted_keys))
    if activate:
        modelpkg.activate(cfg.models.dir, pkg.name, pkg.version)
    typer.echo(f"{_('installed')} {pkg.name} {pkg.version}" + (f" ({_('active')})" if activate else ""))


@models_app.command("activate")
def models_activate(name: str, version: str) -> None:
    """Switch a model to an installed version (restart the daemon to load it). Example: wasla models activate cxr-triage 1.0.0"""
    from edge import modelpkg

    cfg = _cfg()
    modelpkg.load_package(cfg.models.dir / name / version, modelpkg.load_trusted_keys(cfg.models.trusted_keys))
    modelpkg.activate(cfg.models.dir, name, version)
    typer.echo(f"{name} {version} {_('active')}")


@models_app.command("rollback")
def models_rollback(name: str) -> None:
    """Return a model to the previously active version. Example: wasla models rollback cxr-triage"""
    from edge import modelpkg

    version = modelpkg.rollback(_cfg().models.dir, name)
    typer.echo(f"{name} {version} {_('active')}")


def main(argv: list[str] | None = None) -> int:
    try:
        rv = app(args=argv, standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except WaslaError as err:
        typer.echo(f"{_('error')}: {err}", err=True)
        return err.exit_code
    except typer.Exit as ex:
        return ex.exit_code
    except _ClickException as err:  # usage errors: click prints them the usual way
        err.show()
        return err.exit_code
    except (KeyboardInterrupt, typer.Abort):
        return 130


if __name__ == "__main__":
    sys.exit(main())
