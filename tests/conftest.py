"""Shared fixtures: a box config rooted in tmp_path, a real Store on it, sample DICOM files (never downloaded), and
for the sync tests a private broker and the parts a test started."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pydicom
import pytest

from edge.config import BoxConfig, Config, DicomConfig, StorageConfig, WatchConfig
from harness import Mosquitto
from edge.store import Store


def make_config(root: Path, **sections) -> Config:
    """A config for tests: everything under `root`, the SCP on an ephemeral loopback port, no disk reserve."""
    cfg = Config(
        box=BoxConfig(data_dir=root / "box"),
        dicom=DicomConfig(bind="127.0.0.1", port=0, acse_timeout=10, dimse_timeout=20, network_timeout=20),
        watch=WatchConfig(enabled=True, dir=root / "watch", poll_seconds=0.05, settle_seconds=2.0),
        storage=StorageConfig(min_free_mb=0),
    )
    return replace(cfg, **{name: replace(getattr(cfg, name), **values) for name, values in sections.items()})


@pytest.fixture
def cfg(tmp_path) -> Config:
    return make_config(tmp_path)


@pytest.fixture
def store(cfg):
    s = Store.from_config(cfg)
    yield s
    s.close()


def sample_path(name: str) -> Path:
    """A sample from pydicom-data (data_store) or pydicom's own test files, by file name; never downloads."""
    import data_store

    local = Path(data_store.__file__).parent / "data" / name
    if local.is_file():
        return local
    # get_testdata_file looks locally first; only a missing name would reach for the network.
    found = pydicom.data.get_testdata_file(name, download=False)
    if found is None:
        pytest.skip(f"sample {name} is not installed")
    return Path(found)


@pytest.fixture
def sample():
    """sample("RG1_UNCR.dcm") -> path of an installed sample file."""
    return sample_path


@pytest.fixture
def make_cfg(tmp_path):
    """make_cfg(dicom={"allowed_calling_aes": ["CR1"]}) -> a config like `cfg` with some sections overridden."""
    return lambda **sections: make_config(tmp_path, **sections)


@pytest.fixture
def broker(tmp_path):
    """A private Mosquitto on a free port, for one test."""
    m = Mosquitto(tmp_path / "mqtt").start()
    yield m
    m.stop()


@pytest.fixture
def parts():
    """Hubs, boxes and brokers a test started, stopped in reverse order even when the test fails."""
    started = []
    yield started
    for p in reversed(started):
        try:
            p.stop()
        except Exception:  # noqa: BLE001 - teardown of a part a test already stopped
            pass
