"""`wasla`: the technician's thin command line over the box library; errors become one line and an exit code."""
from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path
from typing import Optional

import typer

from edge import config as config_mod
from edge.cli_common import (_cfg, _echo, _parse_when, _print_json, _reader, _state, _store, _table, _ts,
                             _when)
from edge.cli_models import models_app
from sync.core.i18n import (_, describe_reason, label_name, ltr, normalize, pick_language, run_cli,
                       set_language, state_name)

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Wasla clinic box: offline DICOM triage.")
app.add_typer(models_app, name="models")

@app.callback()
def _root(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", "-c", envvar="WASLA_CONFIG", help="Config file (TOML)."),
    lang: Optional[str] = typer.Option(None, "--lang", help="Language: en, fr or ar."),
) -> None:
    """Wasla clinic box. Example: wasla --config /etc/wasla/box.toml status"""
    if lang and not normalize(lang):
        raise typer.BadParameter(_("{value} is not one of: en, fr, ar").format(value=repr(lang)), param_hint="--lang")
    set_language(pick_language(lang))
    _state.clear()  # main() may run several times in one process (tests, embedding): never reuse a config
    _state["config_path"] = config
    from edge import audit

    audit.attach(ctx, _cfg)


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
def status(as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
           watch: bool = typer.Option(False, "--watch", "-w", help="Live screen: ingest rate, queue, upload with "
                                      "ETA, link, disk, urgent flags."),
           interval: float = typer.Option(2.0, "--interval", min=0.2, help="Seconds between refreshes with --watch."),
           count: int = typer.Option(0, "--count", min=0,
                                     help="With --watch: stop after this many refreshes (0: until Ctrl-C).")) -> None:
    """Queue counts, last ingest, models, disk and broker. Example: wasla status --watch"""
    from edge.engine import check_models

    cfg = _cfg()
    store = _reader()
    if watch:
        from rich.console import Console

        from edge import statusview

        # --json --watch: one snapshot per line (JSON Lines), for scripts that follow the box.
        console = Console(highlight=False)
        raise typer.Exit(statusview.watch(statusview.StatusSampler(cfg, store), console, interval=interval,
                                          count=count, as_json=as_json))
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
    _echo(f"{_('Box')}: {ltr(info['box'])}")
    _echo(f"{_('Queue')}: " + (", ".join(f"{state_name(k)} {ltr(v)}" for k, v in info["states"].items() if v)
                                    or _("(none)")))
    _echo(f"{_('Studies')}: " + (", ".join(f"{label_name(k)} {ltr(v)}" for k, v in info["labels"].items())
                                      or _("(none)")))
    _echo(f"{_('Last ingest')}: {_when(store.last_ingest())}")
    for m in models:
        _echo(f"{_('Model')}: {ltr(m['name'] + ' ' + m['version'])} ({ltr(m['backend'])})")
    for b in bad:
        _echo(f"{_('Model refused')}: {ltr(b)}")
    if not models:
        _echo(_("Model: none (every study is flagged review)"))
    _echo(f"{_('Disk free')}: " + _("{free} MB of {total} MB").format(free=ltr(info["disk_free_mb"]),
                                                                       total=ltr(info["disk_total_mb"])))
    _echo(f"{_('Broker')}: {ltr(info['broker'])} "
               + (_("reachable") if info["broker_reachable"] else _("unreachable")))


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
        raise typer.BadParameter(_("{value} is not normal, review or urgent").format(value=repr(label)),
                                 param_hint="--label")
    store = _reader()
    if quarantined:
        rows = store.quarantined(limit)
        if as_json:
            _print_json(rows)
            return
        for r in rows:
            r["when"], r["no"], r["why"] = _when(r["received_at"]), ltr(r["id"]), ltr(r["reason"])
        _table(rows, [("no", "#"), ("when", _("received")), ("source", _("source")), ("why", _("reason"))])
        return
    rows = store.studies(label=label, since=_parse_when(since), until=_parse_when(until), limit=limit)
    if as_json:
        _print_json(rows)
        return
    for r in rows:
        r["when"] = _when(r["first_received_at"])
        r["shown_label"] = label_name(r["label"])
        r["uid"], r["images"], r["mod"] = ltr(r["study_uid"]), ltr(r["n_instances"]), ltr(r["modality"])
    _table(rows, [("shown_label", _("label")), ("uid", _("study")), ("mod", _("modality")),
                  ("images", _("images")), ("when", _("received"))])


@app.command()
def show(study: str = typer.Argument(..., help="Study Instance UID (or a unique prefix)."),
         as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """One study: label, reasons, each image's model scores and timings, the radiologist's read. Example: wasla show 1.2.840"""
    s = _reader().study(study)
    if as_json:
        _print_json(s)
        return
    _echo(f"{_('Study')}: {ltr(s['study_uid'])}")
    _echo(f"{_('Label')}: {label_name(s['label'])}")
    for r in s["reasons"]:
        _echo(f"  {_('reason')}: {describe_reason(r)}")
    for inst in s["instances"]:
        _echo(f"- {_('image')} {ltr('#' + str(inst['id']))} {ltr(inst['modality'] or '')} "
                   f"{state_name(inst['state'])} {label_name(inst['label']) if inst['label'] else ''} "
                   f"{ltr(inst['reason'] or '')}".rstrip())
        for res in inst["results"]:
            if res["model"]:
                scores = ", ".join(f"{k} {v:.3f}" for k, v in (res["scores"] or {}).items())
                _echo(f"    {ltr(res['model'] + ' ' + res['model_version'])} ({ltr(res['backend'])}): "
                           f"{ltr(scores)}; {_('thresholds')} "
                           f"{ltr(', '.join(f'{k} {v:.3f}' for k, v in (res['thresholds'] or {}).items()))}")
            for reason in res["reasons"] or []:
                _echo(f"    {_('reason')}: {describe_reason(reason)}")
    if s.get("read_disposition"):
        by = f"{s['read_by']}, " if s.get("read_by") else ""
        _echo(f"{_('Radiologist read')}: {s['read_disposition']} — {s.get('read_note') or ''} "
                   f"({by}{_when(s.get('read_at'))})")


@app.command("sync")
def sync_status(now: bool = typer.Option(False, "--now", help="Ask the running daemon to re-query the hub and send now."),
                as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Outbox to the hub: queued flags and studies, bytes, ratio, today's usage. Example: wasla sync --now"""
    import datetime as _dt

    from edge.uplink.outbox import Outbox

    cfg = _cfg()
    box = Outbox(_store(), cfg.box.data_dir / "outbox", cfg.box.id)
    nudged: dict | None = None
    if now:
        from edge.control import NoDaemonError, ask

        try:
            nudged = ask(cfg.box.data_dir, "sync-now")
        except NoDaemonError:
            nudged = {"ok": False, "error": "no daemon running"}
            if not as_json:
                _echo(_("No daemon is running: nothing was nudged (start it: systemctl start wasla)"))
    info = {**box.summary(), "enabled": cfg.sync.enabled, "broker": f"{cfg.sync.broker_host}:{cfg.sync.broker_port}",
            "usage_today": box.load_usage(_dt.date.today().isoformat()), "active": box.active_rows(), "nudged": nudged}
    if as_json:
        _print_json(info)
        return
    _echo(f"{_('Sync')}: {_('on') if cfg.sync.enabled else _('off')} -> {ltr(info['broker'])}")
    _echo(f"{_('Queue')}: {ltr(info['queue_depth'])} (" + _("{n} bytes").format(n=ltr(info["queued_bytes"])) + "), "
               f"{_('oldest')} {_when(info['oldest_unsent_at'])}")
    done = []
    for k, v in sorted(info["counts"].items()):  # keys are "<kind>_<state>" from the outbox
        kind, _sep, state = k.partition("_")
        done.append(f"{state_name(kind)} {state_name(state)} {ltr(v)}")
    _echo(f"{_('Done')}: " + ", ".join(done))
    if info["wire_ratio"]:
        _echo(f"{_('Compression ratio')}: {ltr(info['wire_ratio'])}")
    usage = info["usage_today"] or {}
    _echo(_("Sent today: flags {flag} B, studies {bulk} B, telemetry {telemetry} B").format(
        flag=ltr(usage.get("flag", 0)), bulk=ltr(usage.get("bulk", 0)), telemetry=ltr(usage.get("telemetry", 0))))
    for r in info["active"]:
        have = sum(b - a + 1 for a, b in json.loads(r["have"] or "[]"))
        r["progress"] = ltr(f"{have}/{r['count']}") if r["count"] else ""
        r["shown_kind"], r["shown_state"] = state_name(r["kind"]), state_name(r["state"])
        r["shown_label"], r["uid"], r["why"] = label_name(r["label"]), ltr(r["study_uid"]), ltr(r["reason"])
    _table(info["active"], [("shown_kind", _("kind")), ("shown_state", _("state")), ("shown_label", _("label")),
                            ("uid", _("study")), ("progress", _("chunks")), ("why", _("reason"))])
    if info["dead_letters"]:
        _echo(f"{_('Dead letters')}: {ltr(info['dead_letters'])}")
    if nudged and nudged.get("ok"):
        _echo(_("Nudged the daemon."))


@app.command()
def ingest(paths: list[Path] = typer.Argument(..., help="DICOM files or folders."),
           as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Add DICOM files or folders to the queue (the daemon triages them). Example: wasla ingest /media/usb/DICOM"""
    from edge import ingest as ingest_mod
    from edge.statusview import progress_bar

    cfg = _cfg()
    store = _store()
    files = ingest_mod.expand_paths(paths)
    outcomes = []
    with progress_bar(_("Ingesting"), len(files), enabled=not as_json) as advance:
        for f in files:
            outcomes.append(ingest_mod.ingest_file(store, f, source="cli", max_pixels=cfg.storage.max_pixels,
                                                   max_file_bytes=cfg.storage.max_file_mb * 1_000_000))
            advance(1)
    summary = {k: sum(1 for o in outcomes if o.status == k) for k in ("stored", "duplicate", "quarantined")}
    if as_json:
        _print_json({"summary": summary, "files": [{"path": str(f), **o.__dict__} for f, o in zip(files, outcomes)]})
        return
    _echo(", ".join(f"{state_name(k)} {ltr(v)}" for k, v in summary.items()))
    for f, o in zip(files, outcomes):
        if o.status == "quarantined":
            _echo(f"  {ltr(f)}: {ltr(o.reason)}")


@app.command()
def requeue(study: Optional[str] = typer.Argument(None, help="Study Instance UID."),
            instance: Optional[int] = typer.Option(None, help="Instance number (#) instead of a study."),
            quarantined_only: bool = typer.Option(False, "--quarantined", help="Only quarantined images."),
            as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Run a study or an image through triage again. Example: wasla requeue --instance 42"""
    if not study and instance is None:
        raise typer.BadParameter(_("give a study UID or --instance N"))
    n = _store().requeue(study_uid=study, instance_id=instance, quarantined_only=quarantined_only)
    if as_json:
        _print_json({"requeued": n})
    else:
        _echo(f"{_('requeued')}: {ltr(n)}")


@app.command()
def doctor(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Check config, models, disk, ports, broker and clock; exits 1 if any check fails. Example: wasla doctor"""
    from edge.doctor import run_checks

    checks = run_checks(_cfg())
    if as_json:
        _print_json([{k: c[k] for k in ("check", "ok", "detail")} for c in checks])
    else:
        for c in checks:
            detail = _(c["message"]).format(**{k: ltr(v) for k, v in c["params"].items()}) if c.get("message") \
                else ltr(c["detail"])
            _echo(f"[{_('ok') if c['ok'] else _('FAIL')}] {_(c['check'])}: {detail}")
    if not all(c["ok"] for c in checks):
        raise typer.Exit(1)


@app.command("config")
def show_config(defaults: bool = typer.Option(False, "--defaults", help="Print every key with its default and meaning."),
                as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Show the effective configuration. Example: wasla config --defaults"""
    if defaults:
        rows = [{"key": k, "default": d, "doc": doc} for k, d, doc in config_mod.describe()]
        cols = [("key", _("key")), ("default", _("default")), ("doc", "")]
        _print_json(rows) if as_json else _table(rows, cols)
        return
    from dataclasses import asdict

    _print_json(asdict(_cfg()))


@app.command()
def send(study: str = typer.Argument(..., help="Study Instance UID (or a unique prefix)."),
         to: str = typer.Option(..., "--to", help="Destination as AE@host:port, e.g. PACS@10.0.0.5:104."),
         images: bool = typer.Option(False, "--images", help="Also send the study's own images."),
         sc: bool = typer.Option(True, "--sc/--no-sc", help="Include the secondary capture (image with the result)."),
         as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Send a study's triage result (DICOM SR and secondary capture) to a modality or PACS by C-STORE. Example: wasla send 1.2.840 --to PACS@10.0.0.5:104"""
    from edge import send as send_mod

    sent = send_mod.send_study(_store(), _cfg(), study, send_mod.parse_destination(to), with_sc=sc,
                               with_images=images)
    if as_json:
        _print_json([{"sop_class_uid": s.sop_class_uid, "sop_instance_uid": s.sop_instance_uid, "status": s.status,
                      "status_name": s.status_name} for s in sent])
        return
    for s in sent:
        _echo(f"{ltr(s.sop_instance_uid)}: {s.status_name}")
    _echo(_("{n} sent to {destination}").format(n=len(sent), destination=ltr(to)))


@app.command()
def report(study: str = typer.Argument(..., help="Study Instance UID (or a unique prefix)."),
           out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file to write (default: "
                                              "wasla-report-<study>.html here)."),
           as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Write the one-page printable triage report (HTML; print it or save it as PDF from any browser), in the --lang language. Example: wasla --lang fr report 1.2.840 --out /media/usb/report.html"""
    from edge import report as report_mod
    from sync.core.i18n import current_language

    cfg = _cfg()
    store = _reader()
    uid = store.study(study)["study_uid"]
    path = report_mod.write_report(store, uid, out or Path(f"wasla-report-{uid}.html"), lang=current_language(),
                                   box_id=cfg.box.id, max_pixels=cfg.storage.max_pixels)
    if as_json:
        _print_json({"study_uid": uid, "path": str(path), "lang": current_language()})
        return
    _echo(_("Report written: {path}").format(path=ltr(path)))


def main(argv: list[str] | None = None) -> int:
    return run_cli(app, argv, "wasla")


if __name__ == "__main__":
    sys.exit(main())
