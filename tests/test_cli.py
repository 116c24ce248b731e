"""The technician CLI: help with examples everywhere, JSON output, one-line errors with exit codes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer.main

from edge.cli import app, main


def _commands(group=None, prefix=()):
    group = group or typer.main.get_command(app)
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,), cmd


def test_every_command_has_help_with_an_example():
    missing = [" ".join(path) for path, cmd in _commands() if "Example: wasla" not in (cmd.help or "")]
    assert missing == []


@pytest.fixture
def cfg(tmp_path):
    f = tmp_path / "box.toml"
    f.write_text(f'[box]\ndata_dir = "{tmp_path / "data"}"\n[models]\ndir = "{tmp_path / "models"}"\ntrusted_keys = []\n'
                 '[storage]\nmin_free_mb = 1\n[sync]\nbroker_port = 1\n')
    return f


def run(cfg, *args):
    return subprocess.run([sys.executable, "-m", "edge.cli", "--config", str(cfg), *args], capture_output=True, text=True)


def test_status_json_is_machine_readable_on_an_empty_box(cfg):
    out = run(cfg, "status", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["states"]["received"] == 0 and info["broker_reachable"] is False and info["models"] == []


def test_show_unknown_study_is_one_line_and_exit_code_3(cfg):
    out = run(cfg, "show", "1.2.3.4.5")
    assert out.returncode == 3
    assert out.stderr.strip().count("\n") == 0 and "not found" in out.stderr


def test_bad_config_value_is_one_line_naming_the_key_and_exit_code_2(tmp_path):
    f = tmp_path / "box.toml"
    f.write_text("[dicom]\nport = -4\n")
    out = run(f, "status")
    assert out.returncode == 2 and "dicom.port" in out.stderr and "Traceback" not in out.stderr


def test_results_rejects_an_unknown_label(cfg):
    assert main(["--config", str(cfg), "results", "--label", "fine"]) == 2


def test_doctor_fails_without_a_model_and_says_why(cfg):
    out = run(cfg, "doctor", "--json")
    assert out.returncode == 1
    checks = {c["check"]: c for c in json.loads(out.stdout)}
    assert checks["models"]["ok"] is False and "no model package" in checks["models"]["detail"]
    assert checks["store"]["ok"] and checks["clock"]["ok"]


def test_ingest_reports_stored_and_quarantined_files(cfg, tmp_path):
    import samples

    good = samples.fresh_copy(samples.sample_path("US1_UNCR.dcm"), tmp_path / "in" / "us.dcm")
    (tmp_path / "in" / "junk.dcm").write_bytes(b"junk")
    out = run(cfg, "ingest", str(tmp_path / "in"), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["summary"] == {"stored": 1, "duplicate": 0, "quarantined": 1}
    again = json.loads(run(cfg, "ingest", str(good), "--json").stdout)
    assert again["summary"]["duplicate"] == 1


def test_models_list_shows_active_version_and_refuses_a_tampered_one(tmp_path):
    from modelfactory import make_tiny_package

    models = tmp_path / "models"
    folder, pub = make_tiny_package(models, key_dir=tmp_path / "keys")
    bad, _ = make_tiny_package(models, version="1.1.0", key_dir=tmp_path / "keys")
    (bad / "model.onnx").write_bytes(b"tampered")
    f = tmp_path / "box.toml"
    f.write_text(f'[box]\ndata_dir = "{tmp_path / "data"}"\n[models]\ndir = "{models}"\ntrusted_keys = ["{pub}"]\n')
    rows = {r["version"]: r for r in json.loads(run(f, "models", "list", "--json").stdout)}
    assert rows["1.0.0"]["status"] == "ok"
    assert rows["1.1.0"]["status"].startswith("refused") and rows["1.1.0"]["active"] is True


def test_models_show_gives_test_figures_and_not_for_clinical_use_and_refuses_a_tampered_package(tmp_path):
    import shutil
    from pathlib import Path

    models = tmp_path / "models"
    shipped = Path(__file__).resolve().parent.parent / "models"
    shutil.copytree(shipped / "cxr-triage" / "1.1.0", models / "cxr-triage" / "1.1.0")
    keys = sorted(str(p) for p in (shipped / "keys").glob("*.pub"))
    f = tmp_path / "box.toml"
    f.write_text(f'[box]\ndata_dir = "{tmp_path / "data"}"\n[models]\ndir = "{models}"\ntrusted_keys = {json.dumps(keys)}\n')
    info = json.loads(run(f, "models", "show", "cxr-triage", "--json").stdout)
    manifest = json.loads((models / "cxr-triage" / "1.1.0" / "manifest.json").read_text())
    assert info["version"] == "1.1.0" and info["active"] is True
    assert info["test"]["auc"] == manifest["metrics"]["test"]["auc"] and info["test"]["n"] == 360
    assert info["thresholds"]["openvino"]["review"] == manifest["thresholds"]["by_backend"]["openvino"]["review"]
    assert info["training_data"]["licence"] == "CC BY 4.0"
    text = run(f, "--lang", "fr", "models", "show", "cxr-triage").stdout
    assert "Pas pour un usage clinique" in text and "AUC 0.973 [0.952–0.988]" in text
    assert "ليس للاستخدام السريري" in run(f, "--lang", "ar", "models", "show", "cxr-triage").stdout
    assert run(f, "models", "show", "no-such-model").returncode == 3
    assert run(f, "models", "show", "cxr-triage", "../../../etc").returncode == 4  # a name and version, not a path
    card = models / "cxr-triage" / "1.1.0" / "MODEL_CARD.md"
    card.write_text(card.read_text().replace("Not for clinical use", "Cleared for clinical use"))
    refused = run(f, "models", "show", "cxr-triage")
    assert refused.returncode != 0 and "MODEL_CARD.md" in refused.stdout + refused.stderr


def test_doctor_finds_a_spool_file_damaged_on_disk_and_names_the_instance(cfg, tmp_path):
    import samples
    from edge.config import load
    from edge.store import Store

    for i in range(2):
        samples.fresh_copy(samples.sample_path("US1_UNCR.dcm"), tmp_path / "in" / f"us{i}.dcm")
    assert run(cfg, "ingest", str(tmp_path / "in")).returncode == 0
    checks = {c["check"]: c for c in json.loads(run(cfg, "doctor", "--json").stdout)}
    assert checks["spool"]["ok"] and checks["spool"]["detail"].startswith("2 spool files"), checks["spool"]
    store = Store.from_config(load(cfg))
    row = store.query("SELECT * FROM instances ORDER BY id")[1]
    path = store.instance_path(row)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    store.close()
    checks = {c["check"]: c for c in json.loads(run(cfg, "doctor", "--json").stdout)}
    assert checks["spool"]["ok"] is False and f"#{row['id']}" in checks["spool"]["detail"]
