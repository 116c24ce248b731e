"""`wasla-hub`: the regional hub's command line (receiver, worklist, boxes, reads back to the clinic)."""
from __future__ import annotations

import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from edge.errors import WaslaError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Wasla regional hub: receive, list and read studies.")
_state: dict = {}


@app.callback()
def _root(config: Optional[Path] = typer.Option(None, "--config", "-c", envvar="WASLA_HUB_CONFIG",
                                                help="Hub config file (TOML).")) -> None:
    """Wasla hub. Example: wasla-hub --config /etc/wasla/hub.toml worklist"""
    _state["config_path"] = config


def _cfg():
    from sync import hub_config

    if "cfg" not in _state:
        _state["cfg"] = hub_config.load(_state.get("config_path"), env={})
    return _state["cfg"]


def _store():
    from sync.hub_store import HubStore

    return HubStore.from_config(_cfg())


def _ts(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _table(rows: list[dict], cols: list[tuple[str, str]]) -> None:
    if not rows:
        typer.echo("(none)")
        return
    cells = [[str(r.get(k)) if r.get(k) is not None else "" for k, _h in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_k, h) in enumerate(cols)]
    typer.echo("  ".join(h.ljust(w) for (_k, h), w in zip(cols, widths)))
    for c in cells:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def _json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


@app.command()
def run() -> None:
    """Receive flags and studies from the boxes until stopped. Example: wasla-hub run"""
    from sync.receiver import run as run_receiver

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
    _table(rows, [("label", "label"), ("study_uid", "study"), ("device", "box"), ("modality", "modality"),
                  ("images", "images"), ("ratio", "ratio"), ("waiting", "since"), ("read_disposition", "read")])


@app.command()
def boxes(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Each box: last seen, online, backlog and link quality. Example: wasla-hub boxes"""
    rows = _store().boxes()
    if as_json:
        _json(rows)
        return
    for r in rows:
        r["seen"] = _ts(r["last_seen"])
        r["state"] = "online" if r["online"] else "offline"
        r["backlog"] = r["queue_depth"]
        r["oldest"] = _ts(r["oldest_unsent_at"])
        link = r["link"]
        r["rtt"] = link.get("puback_rtt_ms")
        r["cuts"] = link.get("disconnects")
        r["resent"] = link.get("chunks_resent")
    _table(rows, [("device", "box"), ("state", "state"), ("seen", "last seen"), ("backlog", "backlog"),
                  ("oldest", "oldest unsent"), ("rtt", "ack ms"), ("cuts", "cuts"), ("resent", "resent"),
                  ("dup_ratio", "dup"), ("bad_messages", "bad msgs")])


@app.command()
def show(study: str = typer.Argument(..., help="Study Instance UID (or a unique prefix)."),
         as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """One study: box, label, images stored, read. Example: wasla-hub show 1.2.840"""
    s = _store().study(study)
    if as_json:
        _json(s)
        return
    typer.echo(f"Study: {s['study_uid']} from {s['device']}, {s['label'] or 'not flagged'}")
    for i in s["instances"]:
        typer.echo(f"- {i['sop_instance_uid']} {i['codec']} {i['size']} bytes ({i['path']})")
    if s["read_disposition"]:
        typer.echo(f"Read: {s['read_disposition']} — {s['read_note'] or ''} ({s['read_by'] or ''}, {_ts(s['read_at'])})")


@app.command()
def read(study: str = typer.Argument(..., help="Study Instance UID (or a unique prefix)."),
         disposition: str = typer.Option(..., help="The read, e.g. normal, abnormal, urgent-referral, repeat-image."),
         note: str = typer.Option("", help="Free-text note for the clinic."),
         by: str = typer.Option("", help="Who read it."),
         timeout: float = typer.Option(10.0, help="Seconds to wait for the broker to take the read.")) -> None:
    """Record the radiologist's read and send it to the box. Example: wasla-hub read 1.2.840 --disposition normal --note 'clear lungs'"""
    from sync import protocol
    from sync.receiver import read_payload

    if not disposition.strip() or len(disposition) > 64:
        raise typer.BadParameter("1-64 characters", param_hint="--disposition")
    store = _store()
    r = store.add_read(study, disposition.strip(), note or None, by or None)
    cfg = _cfg()
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
        typer.echo(f"broker unreachable ({err}); the receiver sends the read when the box is next online", err=True)
    finally:
        client.disconnect()
        client.loop_stop()
    if sent:
        store.read_published(r["read_id"])
    typer.echo(f"read {r['read_id']} for study {r['study_uid']} on {r['device']}: " + ("sent" if sent else "stored"))


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
    _table(rows, [("when", "when"), ("device", "box"), ("topic", "topic"), ("reason", "reason")])


def main(argv: list[str] | None = None) -> int:
    try:
        rv = app(args=argv, standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except WaslaError as err:
        typer.echo(f"error: {err}", err=True)
        return err.exit_code
    except typer.Exit as ex:
        return ex.exit_code
    except Exception as err:  # click's usage errors and aborts
        import click

        if isinstance(err, click.ClickException):
            err.show()
            return err.exit_code
        if isinstance(err, click.exceptions.Abort):
            return 130
        raise


if __name__ == "__main__":
    sys.exit(main())
