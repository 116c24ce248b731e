"""`wasla models ...`: list, show, install, activate, roll back packages and install the fleet's model policy."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edge.cli_common import _cfg, _echo, _print_json, _table
from sync.core.i18n import _, label_name, ltr

models_app = typer.Typer(no_args_is_help=True, help="List, install, activate or roll back model packages.")


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


