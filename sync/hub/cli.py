"""`wasla-hub`: the regional hub's command line (receiver, worklist, boxes, reads back to the clinic)."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer

from sync.core.cliout import local_time, print_json, table
from sync.core.i18n import _, echo, label_name, ltr, normalize, pick_language, run_cli, set_language

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Wasla regional hub: receive, list and read studies.")
_state: dict = {}


@app.callback()
def _root(config: Optional[Path] = typer.Option(None, "--config", "-c", envvar="WASLA_HUB_CONFIG",
                                                help="Hub config file (TOML)."),
          lang: Optional[str] = typer.Option(None, "--lang", help="Language: en, fr or ar.")) -> None:
    """Wasla hub. Example: wasla-hub --config /etc/wasla/hub.toml worklist"""
    if lang and not normalize(lang):
        raise typer.BadParameter(_("{value} is not one of: en, fr, ar").format(value=repr(lang)), param_hint="--lang")
    set_language(pick_language(lang))
    _state["config_path"] = config
    _state.pop("cfg", None)  # loaded once per invocation, not once per process (main() may run many times)


def _cfg():
    from sync.hub import config as hub_config

    if "cfg" not in _state:
        _state["cfg"] = hub_config.load(_state.get("config_path"), env={})
    return _state["cfg"]


def _store():
    from sync.hub.store import HubStore

    return HubStore.from_config(_cfg())


def _ts(t: float | None) -> str:
    """For display only (kept left-to-right inside Arabic text); JSON carries the raw timestamps."""
    return ltr(local_time(t)) if t else "-"


_table = table


_echo = echo


_json = print_json


@app.command()
def run() -> None:
    """Receive flags and studies from the boxes until stopped. Example: wasla-hub run"""
    from sync.hub.service import run as run_receiver

    raise typer.Exit(run_receiver(_cfg()))


@app.command()
def worklist(as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
             unread: bool = typer.Option(False, "--unread", help="Only studies without a read."),
             limit: int = typer.Option(200, help="Maximum rows.")) -> None:
    """Studies by urgency, then oldest first. Example: wasla-hub worklist --unread"""
    rows = _store().worklist(limit=limit, unread_only=unread)
    if as_json:
        _json(rows)
        return
    for r in rows:
        r["images"] = f"{r['n_instances']}/{r['n_expected'] or '?'}"
        r["waiting"] = _ts(r["since"])
        r["ratio"] = f"{r['original_bytes'] / r['wire_bytes']:.2f}" if r["wire_bytes"] else ""
        r["shown_label"] = label_name(r["label"]) if r["label"] else _("not flagged")
    _table(rows, [("shown_label", _("label")), ("study_uid", _("study")), ("device", _("box")),
                  ("modality", _("modality")), ("images", _("images")), ("ratio", _("ratio")),
                  ("waiting", _("since")), ("read_disposition", _("read"))],
           ltr_cols=("study_uid", "device", "modality", "images", "ratio", "read_disposition"))


@app.command()
def boxes(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Each box: last seen, online, backlog and link quality. Example: wasla-hub boxes"""
    rows = _store().boxes()
    if as_json:
        _json(rows)
        return
    for r in rows:
        r["seen"] = _ts(r["last_seen"])
        r["state"] = _("online") if r["online"] else _("offline")
        r["backlog"] = r["queue_depth"]
        r["oldest"] = _ts(r["oldest_unsent_at"])
        link = r["link"]
        r["rtt"] = link.get("puback_rtt_ms")
        # The rate the box measured on its own uplink (its codec choice follows it); "~" marks its configured prior.
        rate = link.get("rate_kbps")
        r["rate"] = None if rate is None else f"{rate:g}" + ("" if link.get("rate_measured") else "~")
        r["cuts"] = link.get("disconnects")
        r["resent"] = link.get("chunks_resent")
    _table(rows, [("device", _("box")), ("state", _("state")), ("seen", _("last seen")), ("backlog", _("backlog")),
                  ("oldest", _("oldest unsent")), ("rate", _("uplink kbit/s")), ("rtt", _("ack ms")), ("cuts", _("cuts")), ("resent", _("resent")),
                  ("dup_ratio", _("dup")), ("bad_messages", _("bad msgs"))],
           ltr_cols=("device", "backlog", "rate", "rtt", "cuts", "resent", "dup_ratio", "bad_messages"))


@app.command()
def show(study: str = typer.Argument(..., help="Study Instance UID (or a unique prefix)."),
         as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """One study: box, label, images stored, read. Example: wasla-hub show 1.2.840"""
    s = _store().study(study)
    if as_json:
        _json(s)
        return
    _echo(_("Study: {study} from {box}, {label}").format(
        study=ltr(s["study_uid"]), box=ltr(s["device"]),
        label=label_name(s["label"]) if s["label"] else _("not flagged")))
    # Only the latest result document: an SR written before the study's last image arrived is superseded.
    for i in s["instances"]:
        if i.get("superseded_by"):
            continue
        _echo("- " + _("{uid} {codec} {size} bytes ({path})").format(
            uid=ltr(i["sop_instance_uid"]), codec=ltr(i["codec"]), size=ltr(i["size"]), path=ltr(i["path"])))
    hidden = sum(1 for i in s["instances"] if i.get("superseded_by"))
    if hidden:
        _echo(_("({n} earlier result document(s) superseded by a later one)").format(n=hidden))
    if s["read_disposition"]:
        _echo(f"{_('Read')}: {s['read_disposition']} — {s['read_note'] or ''} "
                   f"({s['read_by'] or ''}, {_ts(s['read_at'])})")


@app.command()
def read(study: str = typer.Argument(..., help="Study Instance UID (or a unique prefix)."),
         disposition: str = typer.Option(..., help="The read, e.g. normal, abnormal, urgent-referral, repeat-image."),
         note: str = typer.Option("", help="Free-text note for the clinic."),
         by: str = typer.Option("", help="Who read it."),
         timeout: float = typer.Option(10.0, help="Seconds to wait for the broker to take the read.")) -> None:
    """Record the radiologist's read and send it to the box. Example: wasla-hub read 1.2.840 --disposition normal --note 'clear lungs'"""
    from sync.wire import protocol
    from sync.hub.receiver import read_payload

    if not disposition.strip() or len(disposition) > 64:
        raise typer.BadParameter(_("1-64 characters"), param_hint="--disposition")
    store = _store()
    r = store.add_read(study, disposition.strip(), note or None, by or None)
    cfg = _cfg()
    try:  # the read as a DICOM report filed with the study (forwarded to the PACS when one is set)
        from sync.hub.read_report import file_report

        file_report(store, r, hub_id=cfg.hub.id)
    except Exception as err:  # noqa: BLE001 - the read itself is stored and is sent regardless
        _echo(_("no DICOM report filed for this read ({error})").format(error=ltr(type(err).__name__)), err=True)
    b = cfg.broker
    client = protocol.mqtt_client(f"wasla-hub-{cfg.hub.id}-cli-{int(time.time() * 1000)}", tls_ca_file=b.tls_ca_file,
                                  tls_cert_file=b.tls_cert_file, tls_key_file=b.tls_key_file, username=b.username,
                                  password_file=b.password_file)
    sent = False
    try:
        client.connect(b.host, b.port, keepalive=30)
        client.loop_start()
        info = client.publish(protocol.down_topic(r["device"], "read"), read_payload(r), qos=1)
        info.wait_for_publish(timeout)
        sent = info.is_published()
    except (OSError, RuntimeError, ValueError) as err:
        _echo(_("broker unreachable ({error}); the receiver sends the read when the box is next online").format(
            error=ltr(err)), err=True)
    finally:
        client.disconnect()
        client.loop_stop()
    if sent:
        store.read_published(r["read_id"])
    _echo(_("read {read} for study {study} on {box}: {outcome}").format(
        read=ltr(r["read_id"]), study=ltr(r["study_uid"]), box=ltr(r["device"]),
        outcome=_("sent") if sent else _("stored")))


@app.command("dead-letters")
def dead_letters(as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
                 limit: int = typer.Option(50, help="Maximum rows.")) -> None:
    """Messages refused by the receiver, with the reason. Example: wasla-hub dead-letters"""
    rows = _store().dead_letters(limit)
    if as_json:
        _json(rows)
        return
    for r in rows:
        r["when"] = _ts(r["at"])
    _table(rows, [("when", _("when")), ("device", _("box")), ("topic", _("topic")), ("reason", _("reason"))],
           ltr_cols=("device", "topic", "reason"))


@app.command()
def collisions(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """UIDs refused because another box holds them. Example: wasla-hub collisions"""
    rows = _store().collisions()
    if as_json:
        _json(rows)
        return
    for r in rows:
        r["when"] = _ts(r["last_at"])
    _table(rows, [("when", _("when")), ("kind", _("kind")), ("uid", _("UID")), ("owner", _("held by")),
                  ("claimant", _("refused from")), ("times", _("times"))],
           ltr_cols=("uid", "owner", "claimant", "times"))


@app.command()
def forwards(state: Optional[str] = typer.Option(None, help="Only rows in this state: queued, sent or dead."),
             retry: bool = typer.Option(False, "--retry", help="Put dead-lettered forwards back in the queue."),
             uid: str = typer.Option("", help="With --retry: only this instance or study (UID prefix)."),
             as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
             limit: int = typer.Option(50, help="Maximum rows.")) -> None:
    """The forward queue to the PACS: what waits, what was refused and why. Example: wasla-hub forwards --state dead"""
    from sync.hub import forward

    if state not in (None, "queued", "sent", "dead"):
        raise typer.BadParameter(_("must be queued, sent or dead"), param_hint="--state")
    store = _store()
    if retry:
        n = forward.requeue(store, uid or None)
        _echo(_("{count} forward(s) queued again").format(count=ltr(n)))
        return
    totals, rows = forward.summary(store), forward.listing(store, state, limit)
    if as_json:
        _json({"totals": totals, "rows": rows})
        return
    if not _cfg().pacs.host:
        _echo(_("no PACS configured ([pacs] host in hub.toml): nothing is forwarded"))
    _echo(_("queued {queued}, sent {sent}, dead {dead}").format(
        queued=ltr(totals["queued"]), sent=ltr(totals["sent"]), dead=ltr(totals["dead"])))
    for r in rows:
        r["when"] = _ts(r["sent_at"] or r["queued_at"])
        r["reason"] = r["reason"] or ""
    _table(rows, [("when", _("when")), ("state", _("state")), ("sop_instance_uid", _("UID")),
                  ("attempts", _("attempts")), ("syntax", _("syntax")), ("reason", _("reason"))],
           ltr_cols=("sop_instance_uid", "attempts", "syntax", "reason"))


@app.command()
def web() -> None:
    """Serve the radiologists' web worklist ([web] bind/port in hub.toml). Example: wasla-hub web"""
    from sync.hub.web.serve import run_web

    raise typer.Exit(run_web(_cfg()))


user_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Worklist accounts: add, passwd, unlock, list.")
app.add_typer(user_app, name="user")


def _password(password_file: Optional[Path]) -> str:
    if password_file is not None:
        return password_file.read_text(encoding="utf-8").strip()
    first = typer.prompt(_("Password"), hide_input=True)
    if typer.prompt(_("Password again"), hide_input=True) != first:
        raise typer.BadParameter(_("the two passwords differ"))
    return first


def _accounts():
    from sync.hub.web.auth import Accounts

    return Accounts(_store())


@user_app.command("add")
def user_add(username: str = typer.Argument(..., help="Login name."),
             full_name: str = typer.Option("", "--name", help="Name shown on reads, e.g. 'Dr A. Benali'."),
             role: str = typer.Option("radiologist", help="radiologist or admin (admins also see the audit)."),
             lang: str = typer.Option("fr", help="Default language of the worklist: en, fr or ar."),
             password_file: Optional[Path] = typer.Option(None, help="Read the password from this file (else asked).")) -> None:
    """Create a worklist account. Example: wasla-hub user add benali --name 'Dr A. Benali' --lang ar"""
    _accounts().add_user(username, _password(password_file), full_name=full_name, role=role,
                         lang=normalize(lang) or "fr")
    _echo(_("user {name} created").format(name=ltr(username)))


@user_app.command("passwd")
def user_passwd(username: str = typer.Argument(..., help="Login name."),
                password_file: Optional[Path] = typer.Option(None, help="Read the password from this file (else asked).")) -> None:
    """Set a new password (ends the user's sessions). Example: wasla-hub user passwd benali"""
    _accounts().set_password(username, _password(password_file))
    _echo(_("password of {name} changed").format(name=ltr(username)))


@user_app.command("unlock")
def user_unlock(username: str = typer.Argument(..., help="Login name.")) -> None:
    """Unlock an account locked by failed logins. Example: wasla-hub user unlock benali"""
    _accounts().unlock(username)
    _echo(_("user {name} unlocked").format(name=ltr(username)))


@user_app.command("list")
def user_list(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Worklist accounts. Example: wasla-hub user list"""
    rows = _accounts().users()
    if as_json:
        _json(rows)
        return
    for r in rows:
        r["locked"] = _ts(r["locked_until"]) if r["locked_until"] and r["locked_until"] > time.time() else ""
        r["last"] = _ts(r["last_login"])
    _table(rows, [("username", _("user")), ("full_name", _("name")), ("role", _("role")), ("last", _("last login")),
                  ("locked", _("locked until"))], ltr_cols=("username",))


@app.command("box-info")
def box_info(box: str = typer.Argument(..., help="Box id."),
             region: str = typer.Option("", help="Region (wilaya / province) for the worklist's filter."),
             name: str = typer.Option("", help="Clinic name shown in the worklist.")) -> None:
    """Name a box and its region for the worklist. Example: wasla-hub box-info box-017 --region Tamanrasset --name 'EPSP In Salah'"""
    store = _store()
    with store.tx() as db:
        db.execute("INSERT INTO box_info (device, region, name) VALUES (?, ?, ?) ON CONFLICT(device) DO UPDATE SET "
                   "region = excluded.region, name = excluded.name", [box, region[:80] or None, name[:120] or None])
    _echo(_("box {box}: region {region}, name {name}").format(box=ltr(box), region=region or "-", name=name or "-"))


def main(argv: list[str] | None = None) -> int:
    return run_cli(app, argv, "wasla-hub")


if __name__ == "__main__":
    sys.exit(main())
