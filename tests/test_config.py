"""Config: strict TOML, documented defaults, errors that name the key."""

import pytest

from edge import config
from sync.core.errors import ConfigError


def test_defaults_work_without_any_file():
    cfg = config.load(None, env={})
    assert cfg.dicom.port == 11112 and cfg.inference.backend == "auto"
    assert cfg.db_path == cfg.box.data_dir / "wasla.db"


def test_file_from_environment_variable_is_used(tmp_path):
    f = tmp_path / "box.toml"
    f.write_text('[box]\nid = "in-salah-02"\ndata_dir = "data"\n')
    cfg = config.load(None, env={"WASLA_CONFIG": str(f)})
    assert cfg.box.id == "in-salah-02"
    # relative paths are relative to the config file, so a USB bundle can be moved as one folder
    assert cfg.box.data_dir == tmp_path / "data"


@pytest.mark.parametrize("text, key", [
    ('[dicom]\nprot = 104\n', "dicom.prot"),
    ('[dicom]\nport = "104"\n', "dicom.port"),
    ('[dicom]\nport = 70000\n', "dicom.port"),
    ('[inference]\nbackend = "tensorflow"\n', "inference.backend"),
    ('[box]\nid = "has space"\n', "box.id"),
    ('[watch]\nenabled = "yes"\n', "watch.enabled"),
    ('[mystery]\nx = 1\n', "mystery"),
    ('[dicom]\nallowed_calling_aes = "CR1"\n', "dicom.allowed_calling_aes"),
])
def test_bad_value_or_unknown_key_is_an_error_naming_the_key(text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.parse(text)


def test_invalid_toml_is_a_config_error(tmp_path):
    f = tmp_path / "box.toml"
    f.write_text("[dicom\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(f)


def test_missing_file_is_a_config_error_not_a_traceback(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        config.load(tmp_path / "absent.toml")


def test_every_key_is_documented():
    rows = config.describe()
    assert len(rows) > 20
    undocumented = [key for key, _default, doc in rows if not doc]
    assert undocumented == []


def test_ranges_are_declared_once_and_shown_in_the_reference():
    rows = {key: doc for key, _default, doc in config.describe()}
    assert "[1024-1048576]" in rows["sync.chunk_bytes"] and "[0-65535]" in rows["dicom.port"]
    for text, key in (('[sync]\nchunk_bytes = 512\n', "sync.chunk_bytes"), ('[inference]\nthreads = 0\n',
                      "inference.threads"), ('[sync]\nlink_kbps = 1\n', "sync.link_kbps"),
                      ('[storage]\nkeep_days = -1\n', "storage.keep_days"), ('[log]\nlevel = "LOUD"\n', "log.level")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            config.parse(text)


def test_hub_and_fleet_settings_are_as_strict_as_the_box_s(tmp_path):
    import json

    from provisioning.fleet import Fleet, FleetSettings
    from sync.hub import config as hub_config

    with pytest.raises(ConfigError, match=r"web\.threads"):
        hub_config.parse("[web]\nthreads = 500\n")
    with pytest.raises(ConfigError, match=r"broker\.share_group"):
        hub_config.parse('[broker]\nshare_group = "a/b"\n')
    fleet = Fleet(tmp_path / "fleet")
    fleet.init(FleetSettings(name="t", hub_host="localhost"))
    settings = json.loads((tmp_path / "fleet" / "fleet.json").read_text())
    assert FleetSettings.from_json(settings) == fleet.settings
    (tmp_path / "fleet" / "fleet.json").write_text(json.dumps({**settings, "broker_prot": 8883}))
    with pytest.raises(ConfigError, match="unknown key 'broker_prot'"):
        fleet.settings
    (tmp_path / "fleet" / "fleet.json").write_text(json.dumps({**settings, "cert_days": "825"}))
    with pytest.raises(ConfigError, match="cert_days"):
        fleet.settings
