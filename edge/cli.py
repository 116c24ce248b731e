"""`wasla`: the technician's thin command line over the box library; errors become one line and an exit code."""
from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
import sys
from pathlib import Path
from typing import Optional

import typer

from edge import config as config_mod
from sync.core.i18n import (_, describe_reason, echo, is_rtl, label_name, ltr, normalize, pick_language, run_cli,
                       set_language, state_name)

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Wasla clinic box: offline DICOM triage.")
models_app = typer.Typer(no_args_is_help=True, help="List, install, activate or roll back model packages.")
app.add_typer(models_app, name="models")

_state: dict = {}


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


def _cfg() -> config_mod.Config:
    if "cfg" not in _state:
        _state["cfg"] = config_mod.load(_state.get("config_path"), env={})
    return _state["cfg"]


def _store():
    from edge.store import Store

    return Store.from_config(_cfg())


def _reader():
    """The store for commands that only look: read-only, no migration (edge.store.Store.reader)."""
    from edge.store import Store

    return Store.reader(_cfg())


_echo = echo


def _print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str, ensure_ascii=False))


def _table(rows: list[dict], cols: list[tuple[str, str]]) -> None:
    if not rows:
        _echo(_("(none)"))
        return
    from rich.cells import cell_len  # screen width: Arabic letters, isolates and wide glyphs are not len()

    def pad(text: str, width: int) -> str:
        return text + " " * (width - cell_len(text))

    cells = [[str(r.get(k, "") if r.get(k) is not None else "") for k, _h in cols] for r in rows]
    widths = [max(cell_len(h), *(cell_len(c[i]) for c in cells)) for i, (_k, h) in enumerate(cols)]
    # Arabic lines are mirrored as a whole by the terminal: keep them all the same width so columns line up.
    end = (lambda line: line) if is_rtl() else str.rstrip
    _echo(end("  ".join(pad(h, w) for (_k, h), w in zip(cols, widths))))
    for c in cells:
        _echo(end("  ".join(pad(v, w) for v, w in zip(c, widths))))


def _ts(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _when(t: float | None) -> str:
    """_ts for display: kept left-to-right inside Arabic text (never used for --json)."""
    return ltr(_ts(t))


def _parse_when(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value).timestamp()
    except ValueError as err:
        raise typer.BadParameter(
            _("{value}: expected YYYY-MM-DD or YYYY-MM-DDTHH:MM").format(value=repr(value))) from err


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


@models_app.command("show")
def models_show(name: str, version: Optional[str] = typer.Argument(None, help="Default: the active version."),
                as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """What a model does, its thresholds and its held-out test figures (verified first). Example: wasla models show cxr-triage"""
    from edge import modelpkg

    from sync.core.errors import NotFoundError

    cfg = _cfg()
    version = version or modelpkg.active_version(cfg.models.dir, name)
    if version is None:
        raise NotFoundError(_("no installed model named {name}").format(name=ltr(name)))
    package = modelpkg.load_package(modelpkg.package_folder(cfg.models.dir, name, version),
                                    modelpkg.load_trusted_keys(cfg.models.trusted_keys))
    info = modelpkg.describe(package, cfg.models.dir)
    if as_json:
        _print_json(info)
        return
    _echo(f"{ltr(info['name'] + ' ' + info['version'])}" + (f" ({_('active')})" if info["active"] else ""))
    _echo(_("Not for clinical use: triage support only; a clinician reads every study."))
    _echo(f"{_('description')}: {ltr(info['description'])}")
    _echo(f"{_('labels')}: {ltr(', '.join(info['labels']))}  ({_('abnormal')}: {ltr(', '.join(info['abnormal_labels']))})")
    for backend, t in info["thresholds"].items():
        _echo(f"{_('thresholds')} {ltr(backend) if backend != 'default' else _('default')}: {label_name('review')} ≥ {t['review']:.4f}, "
              f"{label_name('urgent')} ≥ {t['urgent']:.4f}")
    test = info["test"]
    if test and test.get("auc") is not None:
        def ci(key: str) -> str:
            low_high = test.get(key + "_ci95")
            return f" [{low_high[0]:.3f}–{low_high[1]:.3f}]" if low_high else ""
        heading = (_("Held-out test, {model} ({n} images, {k} abnormal):") if info["test_split"] == "test" else
                   _("Site's held-out part, {model} ({n} images, {k} abnormal):"))
        _echo(heading.format(model=ltr(info["test_model"]), n=test.get("n", "?"), k=test.get("n_abnormal", "?"))
              + f" AUC {test['auc']:.3f}{ci('auc')}, " + _("sensitivity") + f" {test['sensitivity_at_review']:.3f}"
              + ci("sensitivity_at_review") + ", " + _("specificity") + f" {test['specificity_at_review']:.3f}"
              + ci("specificity_at_review"))
    else:
        _echo(_("No held-out test figures in this package."))
    data = info["training_data"]
    if data:
        _echo(f"{_('training data')}: " + ltr(f"{data.get('name', '?')} ({data.get('licence', '?')}). "
                                              f"{data.get('attribution', '')}"))
    _echo(f"{_('signed by key')} {info['signed_by']}, {info['created']}; {_('model card')}: {ltr(info['card'] or '-')}")


@models_app.command("install")
def models_install(source: Path = typer.Argument(..., help="Package folder or .tar.gz."),
                   activate: bool = typer.Option(True, help="Make it the active version.")) -> None:
    """Verify and install a signed model package. Example: wasla models install /media/usb/cxr-triage-1.1.0.tar.gz"""
    from edge import modelpkg

    from edge.statusview import progress_bar

    cfg = _cfg()
    with progress_bar(_("Verifying and installing {source}").format(source=ltr(source)), None):
        pkg = modelpkg.install(source, cfg.models.dir, modelpkg.load_trusted_keys(cfg.models.trusted_keys))
    if activate:
        _policy(cfg).check(pkg.name, pkg.version)
        modelpkg.activate(cfg.models.dir, pkg.name, pkg.version)
    _echo(f"{_('installed')} {ltr(pkg.name + ' ' + pkg.version)}"
               + (f" ({_('active')})" if activate else ""))


@models_app.command("activate")
def models_activate(name: str, version: str) -> None:
    """Switch a model to an installed version (restart the daemon to load it). Example: wasla models activate cxr-triage 1.0.0"""
    from edge import modelpkg

    cfg = _cfg()
    modelpkg.load_package(modelpkg.package_folder(cfg.models.dir, name, version),
                          modelpkg.load_trusted_keys(cfg.models.trusted_keys))
    _policy(cfg).check(name, version)
    modelpkg.activate(cfg.models.dir, name, version)
    _echo(f"{ltr(name + ' ' + version)} {_('active')}")


def _policy(cfg):
    from edge import modelpkg, modelpolicy

    return modelpolicy.load(cfg.models.dir, modelpkg.load_trusted_keys(cfg.models.trusted_keys))


@models_app.command("policy")
def models_policy(source: Path = typer.Argument(..., help="policy.json signed by the fleet (policy.sig beside it).")
                  ) -> None:
    """Install the fleet's model policy (minimum versions, revoked packages). Example: wasla models policy /media/usb/policy.json"""
    from edge import modelpkg, modelpolicy

    cfg = _cfg()
    pol = modelpolicy.install(source, cfg.models.dir, modelpkg.load_trusted_keys(cfg.models.trusted_keys))
    _echo(_("model policy {serial} installed: {floors} minimum version(s), {revoked} revoked package(s)").format(
        serial=ltr(pol.serial), floors=ltr(len(pol.floors)), revoked=ltr(len(pol.revoked))))


@models_app.command("rollback")
def models_rollback(name: str) -> None:
    """Return a model to the previously active version. Example: wasla models rollback cxr-triage"""
    from edge import modelpkg

    cfg = _cfg()
    previous = modelpkg.previous_version(cfg.models.dir, name)
    if previous is not None:
        _policy(cfg).check(name, previous)  # a rollback is no way around the fleet's floor
    version = modelpkg.rollback(cfg.models.dir, name)
    _echo(f"{ltr(name + ' ' + version)} {_('active')}")


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
