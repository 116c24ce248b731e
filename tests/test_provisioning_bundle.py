"""Offline install: the wheelhouse bundle installs into a fresh venv with no index, and the installed `wasla doctor`
passes on a box enrolment bundle (taken from its tarball, as from a USB stick) against the generated broker."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import free_port
from modelfactory import make_tiny_package
from provisioning import bundle
from provisioning.fleet import Fleet, FleetSettings, sign_model
from test_provisioning_broker import TEST_BROKER_USER, Broker

REPO = Path(__file__).resolve().parent.parent


def _clean_env() -> dict:
    # No pip configuration of this machine may reach the install: it must work from the bundle alone.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "CREDENTIALS_DIRECTORY"}
    env["PIP_CONFIG_FILE"] = "/dev/null"
    return env


@pytest.fixture(scope="session")
def fleet_key(tmp_path_factory) -> tuple[Path, Path]:
    """(private, public) model-signing key of a fleet: it signs the bundle's SHA256SUMS."""
    from edge import signing

    d = tmp_path_factory.mktemp("fleetkey")
    signing.generate_keypair(d / "model-signing.key", d / "model-signing.pub")
    return d / "model-signing.key", d / "model-signing.pub"


@pytest.fixture(scope="session")
def offline_bundle(tmp_path_factory, fleet_key) -> Path:
    """Built once per session (~20 s: wheels come from pip's cache or the local mirrors), signed by the fleet."""
    out = tmp_path_factory.mktemp("offline") / "wasla-offline"
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_offline_bundle.py"), "--out", str(out),
                    "--sign-key", str(fleet_key[0])], check=True, capture_output=True, text=True, timeout=600)
    return out


def _install(bundle_dir: Path, prefix: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(bundle_dir / "install.sh"), "--prefix", str(prefix), "--no-system", *args],
                          env=env or _clean_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def installed(offline_bundle, tmp_path_factory, fleet_key) -> Path:
    prefix = tmp_path_factory.mktemp("opt") / "wasla"
    proc = _install(offline_bundle, prefix, "--fleet-key", str(fleet_key[1]))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return prefix / ".venv"


def test_offline_bundle_holds_every_runtime_wheel_and_no_training_stack(offline_bundle):
    names = json.loads((offline_bundle / "BUNDLE.json").read_text())["wheels"]
    lowered = [n.lower() for n in names]
    for needed in ("wasla-", "onnxruntime-", "openvino-", "pydicom-", "pynetdicom-", "paho_mqtt-", "cryptography-"):
        assert any(n.startswith(needed) for n in lowered), needed
    assert not any(n.startswith(("torch", "nncf")) for n in lowered)
    assert all(n.endswith(".whl") for n in names)
    assert (offline_bundle / "install.sh").stat().st_mode & 0o111
    assert sorted(p.name for p in (offline_bundle / "systemd").iterdir()) == ["60-wasla-link.conf", "wasla-box.service",
                                                                         "wasla-hub-web.service", "wasla-hub.service"]


def test_install_refuses_a_bundle_with_a_corrupted_wheel(offline_bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(offline_bundle, copy)
    wheel = next((copy / "wheels").glob("wasla-*.whl"))
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0xFF
    wheel.write_bytes(bytes(data))
    proc = _install(copy, tmp_path / "opt", "--unsigned")
    assert proc.returncode != 0
    assert not (tmp_path / "opt" / ".venv").exists()


def _tampered_copy(offline_bundle, tmp_path) -> Path:
    """A wheel swapped and SHA256SUMS recomputed to match: what someone with the USB stick could do."""
    import hashlib
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(offline_bundle, copy)
    wheel = next((copy / "wheels").glob("wasla-*.whl"))
    wheel.write_bytes(wheel.read_bytes() + b"\0")
    lines = []
    for line in (copy / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        if name == f"wheels/{wheel.name}":
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        lines.append(f"{digest}  {name}")
    (copy / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return copy


def test_install_refuses_a_bundle_whose_checksums_were_rewritten_or_that_is_unsigned(offline_bundle, tmp_path,
                                                                                    fleet_key):
    copy = _tampered_copy(offline_bundle, tmp_path)
    proc = _install(copy, tmp_path / "opt", "--fleet-key", str(fleet_key[1]))
    assert proc.returncode != 0 and "not signed by the fleet key" in proc.stderr
    assert not (tmp_path / "opt" / ".venv").exists()
    (copy / "SHA256SUMS.sig").unlink()
    proc = _install(copy, tmp_path / "opt", "--fleet-key", str(fleet_key[1]))
    assert proc.returncode != 0 and "no SHA256SUMS.sig" in proc.stderr
    # Even told to skip the signature, pip's pinned hashes refuse the swapped wheel.
    proc = _install(copy, tmp_path / "opt", "--unsigned")
    assert proc.returncode != 0 and "hash" in (proc.stdout + proc.stderr).lower()


def test_a_box_bundle_with_a_symlink_is_refused_and_its_keys_never_outlive_the_install(offline_bundle, tmp_path,
                                                                                      fleet_key):
    import tarfile

    secret = tmp_path / "root-only.txt"
    secret.write_text("not for the box")
    box = tmp_path / "evil" / "clinic-09"
    (box / "credentials").mkdir(parents=True)
    (box / "credentials" / "box.key").write_text("PRIVATE KEY")
    (box / "box.toml").symlink_to(secret)
    (box / "ca.crt").write_text("x")
    (box / "model-signing.pub").write_text(fleet_key[1].read_text())
    archive = tmp_path / "clinic-09.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(box, arcname="clinic-09")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    etc = tmp_path / "etc-wasla"
    proc = _install(offline_bundle, tmp_path / "opt", "--box", str(archive), "--etc", str(etc),
                    env={**_clean_env(), "TMPDIR": str(scratch)})
    assert proc.returncode != 0 and "not a plain file: box.toml" in proc.stderr
    assert not etc.exists()
    assert list(scratch.iterdir()) == []  # the unpacked key went away with the failed install


def test_installed_doctor_passes_on_an_enrolled_box_bundle(installed, tmp_path):
    fleet = Fleet(tmp_path / "fleet")
    fleet.init(FleetSettings(name="t", hub_host="localhost", broker_names=("127.0.0.1",), broker_port=free_port(),
                             broker_bind="127.0.0.1", broker_user=TEST_BROKER_USER))
    fleet.enroll("clinic-01", data_dir=str(tmp_path / "box-data"), models_dir=str(tmp_path / "box-models"),
                 dicom_port=free_port())
    usb = bundle.extract(fleet.bundles_dir / "clinic-01.tar.gz", tmp_path / "usb")
    assert (usb / "credentials" / "box.key").stat().st_mode & 0o777 == 0o600
    pkg, _ = make_tiny_package(tmp_path / "pkg", key_dir=tmp_path / "vendor")
    sign_model(pkg, fleet.model_key)
    broker = Broker(fleet).start()
    try:
        env = _clean_env()
        wasla = str(installed / "bin" / "wasla")
        conf = str(usb / "box.toml")
        proc = subprocess.run([wasla, "--config", conf, "models", "install", str(pkg)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        proc = subprocess.run([wasla, "--config", conf, "doctor", "--json"], env=env, capture_output=True,
                              text=True, timeout=300)
        checks = json.loads(proc.stdout)
        failed = [c for c in checks if not c["ok"]]
        assert proc.returncode == 0 and not failed, failed
        print("\n".join(f"{c['check']:12} {c['detail']}" for c in checks))
        audit = [json.loads(line) for line in (tmp_path / "box-data" / "audit.log").read_text().splitlines()]
        assert [a["command"] for a in audit] == ["models install", "doctor"]
        assert str(pkg) not in json.dumps(audit)  # argument values (paths, UIDs) never reach the audit log
    finally:
        broker.stop()
