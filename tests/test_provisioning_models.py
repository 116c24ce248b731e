"""Model packages signed with the fleet's key (`wasla-fleet sign-model`); a box trusts only the key in its bundle."""
from __future__ import annotations

import shutil
from dataclasses import replace

import pytest

from edge import config as config_mod, modelpkg
from sync.core.errors import ModelIntegrityError
from modelfactory import make_tiny_package
from provisioning.cli import main as fleet_main
from provisioning.fleet import Fleet, FleetSettings


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("models") / "fleet")
    f.init(FleetSettings(name="t", hub_host="localhost"))
    f.enroll("box-a", data_dir="/nonexistent")
    return f


@pytest.fixture
def box_cfg(fleet, tmp_path, monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    cfg = config_mod.load(fleet.bundles_dir / "box-a" / "box.toml", env={})
    assert cfg.models.trusted_keys == [fleet.bundles_dir / "box-a" / "model-signing.pub"]
    return replace(cfg, box=replace(cfg.box, data_dir=tmp_path / "box"),
                   models=replace(cfg.models, dir=tmp_path / "installed"))


def _trusted(cfg):
    return modelpkg.load_trusted_keys(cfg.models.trusted_keys)


def fleet_signed(fleet, tmp_path):
    """A package built (and signed) elsewhere, then re-signed by the fleet tool, as a ministry would approve it."""
    folder, _foreign_pub = make_tiny_package(tmp_path / "src", key_dir=tmp_path / "vendor-key")
    assert fleet_main(["--fleet", str(fleet.root), "sign-model", str(folder)]) == 0
    return folder


def test_fleet_signed_package_installs_and_activates_on_the_box(fleet, box_cfg, tmp_path):
    folder = fleet_signed(fleet, tmp_path)
    pkg = modelpkg.install(folder, box_cfg.models.dir, _trusted(box_cfg))
    modelpkg.activate(box_cfg.models.dir, pkg.name, pkg.version)
    assert modelpkg.active_version(box_cfg.models.dir, pkg.name) == "1.0.0"
    from edge.engine import check_models

    ok, bad = check_models(box_cfg)
    assert bad == [] and ok[0]["name"] == "tiny-cxr"


def test_unsigned_package_is_refused(fleet, box_cfg, tmp_path):
    folder = fleet_signed(fleet, tmp_path)
    (folder / "manifest.sig").unlink()
    with pytest.raises(ModelIntegrityError, match="unsigned"):
        modelpkg.install(folder, box_cfg.models.dir, _trusted(box_cfg))
    assert not (box_cfg.models.dir / "tiny-cxr").exists()


def test_package_signed_by_a_foreign_key_is_refused(fleet, box_cfg, tmp_path):
    folder, _pub = make_tiny_package(tmp_path / "src", key_dir=tmp_path / "vendor-key")
    with pytest.raises(ModelIntegrityError, match="does not verify"):
        modelpkg.install(folder, box_cfg.models.dir, _trusted(box_cfg))


@pytest.mark.parametrize("victim", ["manifest.json", "manifest.sig", "model.onnx", "MODEL_CARD.md",
                                    "evaluation.json"])
def test_one_byte_changed_in_any_file_is_refused(fleet, box_cfg, tmp_path, victim):
    folder = fleet_signed(fleet, tmp_path)
    path = folder / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError):
        modelpkg.install(folder, box_cfg.models.dir, _trusted(box_cfg))
    assert not (box_cfg.models.dir / "tiny-cxr").exists()


def test_file_added_after_signing_is_refused(fleet, box_cfg, tmp_path):
    folder = fleet_signed(fleet, tmp_path)
    (folder / "extra.py").write_text("print('hello')\n")
    with pytest.raises(ModelIntegrityError, match="not listed"):
        modelpkg.install(folder, box_cfg.models.dir, _trusted(box_cfg))


def test_box_cli_installs_a_fleet_signed_tarball_with_the_bundle_config(fleet, tmp_path, monkeypatch):
    import tarfile

    from edge.cli import main as box_main

    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    folder = fleet_signed(fleet, tmp_path)
    tar = tmp_path / "tiny.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        t.add(folder, arcname="tiny-cxr")
    conf = tmp_path / "box.toml"
    text = (fleet.bundles_dir / "box-a" / "box.toml").read_text()
    text = text.replace('data_dir = "/nonexistent"', f'data_dir = "{tmp_path / "box"}"')
    text = text.replace('dir = "/nonexistent/models"', f'dir = "{tmp_path / "models"}"')
    conf.write_text(text)
    shutil.copy(fleet.bundles_dir / "box-a" / "model-signing.pub", tmp_path / "model-signing.pub")
    assert box_main(["--config", str(conf), "models", "install", str(tar)]) == 0
    assert modelpkg.active_version(tmp_path / "models", "tiny-cxr") == "1.0.0"


# --- the model floor ----------------------------------------------------------------------------------------------
def _box_toml(tmp_path, fleet):
    from pathlib import Path

    cfg = Path(tmp_path) / "box.toml"
    cfg.write_text(f'[box]\nid = "box-a"\ndata_dir = "{tmp_path / "box"}"\n[models]\ndir = "{tmp_path / "installed"}"\n'
                   f'trusted_keys = ["{fleet.bundles_dir / "box-a" / "model-signing.pub"}"]\n[dicom]\nenabled = false\n')
    return cfg


def _fleet_package(fleet, tmp_path, version):
    folder, _pub = make_tiny_package(tmp_path / "src", version=version, key_dir=tmp_path / "vendor-key")
    assert fleet_main(["--fleet", str(fleet.root), "sign-model", str(folder)]) == 0
    return folder


def _wasla(cfg_path, *args):
    from edge.cli import main as box_main

    return box_main(["--config", str(cfg_path), "--lang", "en", *args])


def test_the_fleets_floor_and_revocations_refuse_older_and_revoked_models_everywhere(fleet, tmp_path, capsys):
    from edge import modelpolicy
    from edge.engine import Engine

    cfg_path = _box_toml(tmp_path, fleet)
    cfg = config_mod.load(cfg_path, env={})
    for v in ("1.0.0", "1.1.0", "1.2.0"):
        assert _wasla(cfg_path, "models", "install", str(_fleet_package(fleet, tmp_path, v)), "--no-activate") == 0
    assert _wasla(cfg_path, "models", "activate", "tiny-cxr", "1.1.0") == 0
    policy_dir = fleet.root / "model-policy"
    shutil.rmtree(policy_dir, ignore_errors=True)
    assert fleet_main(["--fleet", str(fleet.root), "model-policy", "--floor", "tiny-cxr=1.1.0"]) == 0
    shutil.copytree(policy_dir, tmp_path / "usb-1")  # what the technician carries: serial 1
    assert _wasla(cfg_path, "models", "policy", str(tmp_path / "usb-1" / "policy.json")) == 0

    capsys.readouterr()
    assert _wasla(cfg_path, "models", "activate", "tiny-cxr", "1.0.0") == 5
    assert "below the fleet's minimum version 1.1.0" in capsys.readouterr().err
    # A rollback is no way around it either (1.1.0 was activated over the highest-by-default 1.2.0 ...).
    assert _wasla(cfg_path, "models", "activate", "tiny-cxr", "1.2.0") == 0
    assert _wasla(cfg_path, "models", "activate", "tiny-cxr", "1.1.0") == 0
    assert modelpkg.previous_version(cfg.models.dir, "tiny-cxr") == "1.2.0"

    # Serial 2 revokes the active 1.1.0: the daemon's engine falls back to the newest version still allowed.
    assert fleet_main(["--fleet", str(fleet.root), "model-policy", "--revoke", "tiny-cxr=1.1.0:misses lobar"]) == 0
    assert _wasla(cfg_path, "models", "policy", str(policy_dir / "policy.json")) == 0
    engine = Engine.load(cfg)
    assert [(m.package.name, m.package.version) for m in engine.models] == [("tiny-cxr", "1.2.0")]
    assert any("revoked by the fleet: misses lobar" in e for e in engine.load_errors)
    capsys.readouterr()
    assert _wasla(cfg_path, "models", "install", str(_fleet_package(fleet, tmp_path, "1.1.0"))) == 5
    assert "revoked" in capsys.readouterr().err

    # The older policy (serial 1) cannot be replayed to lift the revocation.
    capsys.readouterr()
    assert _wasla(cfg_path, "models", "policy", str(tmp_path / "usb-1" / "policy.json")) == 5
    assert "older than the installed 2" in capsys.readouterr().err
    assert modelpolicy.load(cfg.models.dir, _trusted(cfg)).serial == 2


def test_a_tampered_model_policy_fails_closed_no_model_is_loaded(fleet, tmp_path):
    from edge.engine import Engine

    cfg_path = _box_toml(tmp_path, fleet)
    cfg = config_mod.load(cfg_path, env={})
    assert _wasla(cfg_path, "models", "install", str(_fleet_package(fleet, tmp_path, "1.0.0"))) == 0
    shutil.rmtree(fleet.root / "model-policy", ignore_errors=True)
    assert fleet_main(["--fleet", str(fleet.root), "model-policy", "--floor", "tiny-cxr=1.0.0"]) == 0
    assert _wasla(cfg_path, "models", "policy", str(fleet.root / "model-policy" / "policy.json")) == 0
    installed = cfg.models.dir / "policy.json"
    installed.write_text(installed.read_text().replace('"1.0.0"', '"0.0.1"'))  # lower the floor by hand
    engine = Engine.load(cfg)
    assert engine.models == [] and "model policy" in engine.load_errors[0]
