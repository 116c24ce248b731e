"""`wasla-fleet`: the ministry's fleet tool — CA, box enrolment bundles, revocation, broker config, model signing."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

try:  # recent typer vendors click
    from typer._click.exceptions import ClickException as _ClickException
except ImportError:  # pragma: no cover - older typer with click installed
    from click.exceptions import ClickException as _ClickException

from sync.core.errors import WaslaError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Wasla fleet provisioning: CA, box bundles, revocation, broker config, model signing.")
_state: dict = {}


@app.callback()
def _root(ctx: typer.Context,
          fleet: Path = typer.Option(Path("fleet"), "--fleet", "-f", envvar="WASLA_FLEET",
                                     help="Fleet folder (holds the CA key: keep it on the hub, 0700).")) -> None:
    """Wasla fleet tool. Example: wasla-fleet --fleet /srv/wasla-fleet list"""
    _state["fleet"] = fleet
    from edge import audit

    # Fleet actions are audited like the box's, in the fleet folder (once it exists).
    audit.attach(ctx, lambda: _state["fleet"])


def _fleet():
    from provisioning.fleet import Fleet

    return Fleet(_state["fleet"])


def _json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


@app.command()
def init(name: str = typer.Option(..., help="Fleet name, e.g. the ministry programme."),
         hub: str = typer.Option(..., help="Hub (broker) host name or IP the boxes connect to."),
         port: int = typer.Option(8883, help="Broker TLS port."),
         bind: str = typer.Option("0.0.0.0", help="Address the broker listens on."),
         broker_name: list[str] = typer.Option([], "--broker-name", help="More names/IPs for the broker certificate."),
         hub_id: list[str] = typer.Option(["hub-1"], "--hub-id", help="Hub receiver identities (one per receiver)."),
         cert_days: int = typer.Option(825, help="Validity of box, hub and broker certificates."),
         ca_days: int = typer.Option(3650, help="Validity of the fleet CA."),
         crl_days: int = typer.Option(365, help="CRL validity; `wasla-fleet refresh` re-signs it."),
         broker_dir: str = typer.Option("", help="Folder of the broker files on the broker machine "
                                             "(paths in mosquitto.conf); default this fleet's broker/."),
         persistence_dir: str = typer.Option("", help="Mosquitto persistence folder; default broker/data, or /var/lib/mosquitto with --broker-dir."),
         broker_user: str = typer.Option("mosquitto", help="User the broker runs as (must read the broker files).")) -> None:
    """Create the fleet CA, model-signing key, pseudonym key, broker and hub identities.
    Example: wasla-fleet --fleet /srv/wasla-fleet init --name dz-sante --hub hub.sante.dz"""
    from provisioning.fleet import FleetSettings

    if not 1 <= port <= 65535:
        raise typer.BadParameter(f"--port {port} is not a TCP port")
    settings = FleetSettings(name=name, hub_host=hub, broker_port=port, broker_bind=bind,
                             broker_names=tuple(broker_name), hub_ids=tuple(hub_id), cert_days=cert_days,
                             crl_days=crl_days, broker_dir=broker_dir, persistence_dir=persistence_dir,
                             broker_user=broker_user)
    f = _fleet()
    f.init(settings, ca_days=ca_days)
    typer.echo(f"fleet {name} created in {f.root}")
    typer.echo(f"  CA             {f.ca_cert}")
    typer.echo(f"  model key      {f.model_pub} (public; sign packages with `wasla-fleet sign-model`)")
    typer.echo(f"  broker config  {f.broker_dir / 'mosquitto.conf'}")
    for h in hub_id:
        typer.echo(f"  hub receiver   {f.hub_dir / h / 'hub.toml'}")


@app.command()
def enroll(box: str = typer.Argument(..., help="Box id (letters, digits, '-', '_'); becomes its certificate CN."),
           data_dir: str = typer.Option("/var/lib/wasla", help="The box's data folder."),
           models_dir: Optional[str] = typer.Option(None, help="The box's model folder; default <data-dir>/models."),
           dicom_port: int = typer.Option(11112, help="DICOM port on the box (above 1024: no privilege needed)."),
           pseudonymise: bool = typer.Option(False, help="Pseudonymise studies before sync (ships the fleet key)."),
           days: Optional[int] = typer.Option(None, help="Certificate validity; default the fleet's."),
           as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Key + certificate + config + CA + model key for one box, as a folder and a tarball for a USB stick.
    Example: wasla-fleet enroll tamanrasset-01"""
    if not 1024 < dicom_port <= 65535:
        raise typer.BadParameter(f"--dicom-port {dicom_port} must be 1025-65535")
    f = _fleet()
    folder = f.enroll(box, data_dir=data_dir, models_dir=models_dir, pseudonymise=pseudonymise, days=days,
                      dicom_port=dicom_port)
    _report_bundle(f, box, folder, as_json)


def _report_bundle(f, box: str, folder: Path, as_json: bool) -> None:
    row = next(r for r in f.list() if r["box"] == box)
    info = {"box": box, "bundle": str(folder), "tarball": str(folder.with_name(box + ".tar.gz")),
            "serial": row["serial"], "cert_expires": row["cert_expires"]}
    if as_json:
        _json(info)
        return
    typer.echo(f"box {box}: certificate {row['serial']} valid until {row['cert_expires']}")
    typer.echo(f"  bundle  {info['bundle']}\n  tarball {info['tarball']}  (holds the box's private key)")
    typer.echo("  broker files updated: copy acl and crl.pem to the broker and reload it (SIGHUP)")


@app.command()
def revoke(box: str = typer.Argument(..., help="Box id."),
           reason: str = typer.Option("", help="Why (kept in the inventory), e.g. 'stolen'.")) -> None:
    """Cut a box off: its certificates go on the CRL and its ACL entries are removed.
    Example: wasla-fleet revoke tamanrasset-01 --reason stolen"""
    _fleet().revoke(box, reason)
    typer.echo(f"box {box} revoked; copy acl and crl.pem to the broker and reload it (SIGHUP) to apply the CRL and ACL")


@app.command()
def rotate(box: str = typer.Argument(..., help="Box id."),
           revoke_old: bool = typer.Option(False, help="Revoke the old certificate now (else it runs out)."),
           days: Optional[int] = typer.Option(None, help="Certificate validity; default the fleet's."),
           as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """New key and certificate for an enrolled box, in a new bundle. Example: wasla-fleet rotate tamanrasset-01"""
    f = _fleet()
    folder = f.rotate(box, revoke_old=revoke_old, days=days)
    _report_bundle(f, box, folder, as_json)


@app.command("list")
def list_boxes(hub_db: Optional[str] = typer.Option(None, help="The hub's index for 'last seen': its hub.db, or the "
                                                              "postgresql:// URL of [hub] database_url."),
               as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Inventory: enrolled and revoked boxes, certificate expiry, last seen.
    Example: wasla-fleet list --hub-db /var/lib/wasla-hub/hub.db"""
    rows = _fleet().list(hub_db)
    if as_json:
        _json(rows)
        return
    if not rows:
        typer.echo("(no boxes)")
        return
    cols = [("box", "BOX"), ("status", "STATUS"), ("cert_expires", "CERT EXPIRES"), ("days_left", "DAYS"),
            ("last_seen", "LAST SEEN"), ("serial", "SERIAL")]
    cells = [[str(r[k]) if r[k] is not None else "-" for k, _h in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_k, h) in enumerate(cols)]
    typer.echo("  ".join(h.ljust(w) for (_k, h), w in zip(cols, widths)))
    for c in cells:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(c, widths)))


@app.command()
def refresh() -> None:
    """Re-sign the CRL and rewrite the broker files (run monthly: an expired CRL locks every box out).
    Example: wasla-fleet refresh"""
    f = _fleet()
    f.refresh()
    typer.echo(f"CRL and broker files rewritten in {f.broker_dir}")


@app.command("sign-model")
def sign_model(package: Path = typer.Argument(..., help="Model package folder (manifest.json + files)."),
               key: Optional[Path] = typer.Option(None, help="Signing key; default the fleet's model key.")) -> None:
    """Hash every file into the manifest and sign it with the fleet's model key.
    Example: wasla-fleet sign-model models/cxr-triage/1.1.0"""
    from provisioning.fleet import sign_model as do_sign

    info = do_sign(package, key or _fleet().model_key)
    typer.echo(f"signed {info['package']} ({info['files']} files) with key {info['key_id']}")


@app.command("model-policy")
def model_policy(floor: list[str] = typer.Option([], "--floor", help="NAME=VERSION: the lowest version boxes may run."),
                 revoke: list[str] = typer.Option([], "--revoke", help="NAME=VERSION[:reason]: a package boxes refuse."),
                 ) -> None:
    """Write the next signed model policy (floors and revocations add to the previous one) for `wasla models policy`.
    Example: wasla-fleet model-policy --floor cxr-triage=1.2.0 --revoke cxr-triage=1.1.1:misses-lobar"""
    import datetime as dt

    from edge import modelpolicy, signing

    f = _fleet()
    path = f.root / "model-policy" / modelpolicy.POLICY
    prev = modelpolicy.parse(path.read_bytes()) if path.exists() else modelpolicy.Policy()
    floors = dict(prev.floors)
    for item in floor:
        name, _sep, version = item.partition("=")
        floors[name] = version
    revoked = [{"name": n, "version": v, "reason": r} for (n, v), r in prev.revoked.items()]
    for item in revoke:
        name, _sep, rest = item.partition("=")
        version, _sep, reason = rest.partition(":")
        revoked.append({"name": name, "version": version, "reason": reason or "revoked by the fleet"})
    modelpolicy.write_signed(path, signing.load_private(f.model_key), serial=prev.serial + 1, floors=floors,
                             revoked=revoked, issued=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    typer.echo(f"model policy {prev.serial + 1} written to {path} (+ {path.with_suffix('.sig').name}); "
               "install on each box with `wasla models policy`")


def main(argv: list[str] | None = None) -> int:
    try:
        rv = app(args=argv, standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except WaslaError as err:
        typer.echo(f"error: {err}", err=True)
        return err.exit_code
    except typer.Exit as ex:
        return ex.exit_code
    except _ClickException as err:
        err.show()
        return err.exit_code
    except (KeyboardInterrupt, typer.Abort):
        return 130


if __name__ == "__main__":
    sys.exit(main())
