"""The `wasla` and `wasla-hub` CLIs in English, French and Arabic: help, tables, errors, live status, same JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.cells import cell_len

from edge import config as config_mod
from edge.cli import main
from sync.core.i18n import LRI, PDI, RLI, set_language
from edge.store import InstanceMeta, Store

URGENT = "1.2.840.113619.2.55.3.4471.20261123.0912"
NORMAL = "1.2.840.113619.2.55.3.4471.20261123.0805"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def english_afterwards():
    yield
    set_language("en")


@pytest.fixture
def cfg(tmp_path):
    """A box with one urgent study, one normal study and one quarantined file; sync on, broker unreachable."""
    f = tmp_path / "box.toml"
    f.write_text(f'[box]\ndata_dir = "{tmp_path / "data"}"\n[models]\ndir = "{tmp_path / "models"}"\n'
                 'trusted_keys = []\n[storage]\nmin_free_mb = 1\n[sync]\nenabled = true\nbroker_port = 1\n')
    store = Store.from_config(config_mod.load(f, env={}))
    for study, label, score in ((URGENT, "urgent", 0.93), (NORMAL, "normal", 0.07)):
        tmp = store.new_tmp_path()
        tmp.write_bytes(study.encode() * 10)
        store.add_instance(tmp, InstanceMeta(sop_instance_uid=study + ".1", study_uid=study, modality="CR"),
                           source="scp")
        row = store.claim_next()
        code = "score_above_urgent" if label == "urgent" else "score_below_review"
        reason = {"code": code, "score": score, "threshold": 0.8 if label == "urgent" else 0.4}
        store.record_triage(row["id"], label, [reason], [{"model": "cxr-triage", "model_version": "1.1.0",
                                                          "backend": "onnx", "scores": {"abnormal": score},
                                                          "label": label, "reasons": [reason]}])
    bad = store.new_tmp_path()
    bad.write_bytes(b"junk")
    store.add_quarantined(bad, "not a DICOM file", source="usb")
    store.close()
    return f


def wasla(capsys, *args):
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def plain(text: str) -> str:
    return "".join(ch for ch in text if ch not in "\u2066\u2067\u2068\u2069")


def test_status_in_french(cfg, capsys):
    rc, out, _err = wasla(capsys, "--lang", "fr", "--config", str(cfg), "status")
    assert rc == 0
    assert "Boîtier: box-001" in out and "File d'attente:" in out and "en quarantaine 1" in out
    assert "urgent 1" in out and "normal 1" in out and "injoignable" in out


def test_results_in_arabic_keep_study_uids_intact_and_left_to_right(cfg, capsys):
    rc, out, _err = wasla(capsys, "--lang", "ar", "--config", str(cfg), "results")
    assert rc == 0
    lines = out.splitlines()
    assert all(line.startswith(RLI) and line.endswith(PDI) for line in lines)
    assert f"{LRI}{URGENT}{PDI}" in out and f"{LRI}{NORMAL}{PDI}" in out
    assert "عاجل" in out and "طبيعي" in out and "الفحص" in out
    # urgent first, and the columns of the mirrored lines are equally wide
    assert URGENT in lines[1] and len({cell_len(line) for line in lines}) == 1


def test_show_in_arabic_explains_the_reason_with_its_numbers(cfg, capsys):
    rc, out, _err = wasla(capsys, "--lang", "ar", "--config", str(cfg), "show", URGENT)
    assert rc == 0
    assert "عتبة الحالة العاجلة" in out and f"{LRI}0.93{PDI}" in out and f"{LRI}{URGENT}{PDI}" in out


def test_quarantined_list_in_french(cfg, capsys):
    rc, out, _err = wasla(capsys, "--lang", "fr", "--config", str(cfg), "results", "--quarantined")
    assert rc == 0 and "motif" in out and "not a DICOM file" in out


def test_locale_picks_french_and_errors_are_translated(cfg):
    env = {**os.environ, "LANG": "fr_FR.UTF-8", "LC_ALL": "", "LANGUAGE": ""}
    out = subprocess.run([sys.executable, "-m", "edge.cli", "--config", str(cfg), "results", "--label", "fine"],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 2
    assert "Valeur invalide pour '--label'" in out.stderr and "Essayez « wasla results --help »" in out.stderr


def test_lang_option_beats_the_locale(cfg):
    env = {**os.environ, "LANG": "fr_FR.UTF-8", "LC_ALL": "", "LANGUAGE": ""}
    out = subprocess.run([sys.executable, "-m", "edge.cli", "--lang", "ar", "--config", str(cfg), "status"],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0 and "قائمة الانتظار" in out.stdout


def test_not_found_error_in_arabic_is_one_line_with_the_uid_intact(cfg, capsys):
    rc, _out, err = wasla(capsys, "--lang", "ar", "--config", str(cfg), "show", "1.2.3.4.5")
    assert rc == 3 and err.strip().count("\n") == 0
    assert "غير موجود" in err and f"{LRI}study 1.2.3.4.5 not found{PDI}" in err


def test_unknown_option_and_unknown_language_are_usage_errors_in_the_chosen_language(cfg, capsys):
    rc, _out, err = wasla(capsys, "--lang", "fr", "--bogus")
    assert rc == 2 and "Option inconnue : --bogus" in err and "Utilisation : wasla" in err
    rc, _out, err = wasla(capsys, "--lang", "xx", "--config", str(cfg), "status")
    assert rc == 2 and "'xx'" in err


def test_help_is_translated_including_typer_panels(capsys):
    rc, out, _err = wasla(capsys, "--lang", "fr", "--help")
    assert rc == 0 and "Commandes" in out and "Boîtier Wasla de la clinique" in out
    rc, out, _err = wasla(capsys, "--lang", "fr", "status", "--help")
    assert "Écran en direct" in plain(out) and "Afficher ce message et quitter." in plain(out)
    rc, out, _err = wasla(capsys, "--lang", "ar", "results", "--help")
    assert "نتائج الفرز" in plain(out) and "الخيارات" in plain(out)
    rc, out, _err = wasla(capsys, "--help")
    assert "Wasla clinic box: offline DICOM triage." in out and "Commands" in out


def test_doctor_check_names_and_details_are_translated_but_json_is_not(cfg, capsys):
    rc, out, _err = wasla(capsys, "--lang", "fr", "--config", str(cfg), "doctor")
    assert rc == 1 and "horloge" in out and "aucun paquet de modèle dans" in out
    rc, out, _err = wasla(capsys, "--lang", "ar", "--config", str(cfg), "doctor", "--json")
    checks = {c["check"]: c for c in json.loads(out)}
    assert set(checks["models"]) == {"check", "ok", "detail"} and "no model package" in checks["models"]["detail"]


@pytest.mark.parametrize("args", [("results", "--json"), ("show", URGENT, "--json"), ("sync", "--json"),
                                  ("results", "--quarantined", "--json"), ("status", "--json")])
def test_json_is_identical_in_every_language(cfg, capsys, args):
    outputs = []
    for lang in ("en", "fr", "ar"):
        rc, out, _err = wasla(capsys, "--lang", lang, "--config", str(cfg), *args)
        assert rc == 0
        data = json.loads(out)
        if isinstance(data, dict):  # free disk space moves while the tests run
            data.pop("disk_free_mb", None)
        outputs.append(data)
        assert not any(ch in out for ch in "\u2066\u2067\u2068\u2069")
    assert outputs[0] == outputs[1] == outputs[2]


@pytest.mark.parametrize("lang, words", [("fr", ["Envoi en cours", "Lien vers le hub", "Dernières alertes urgentes",
                                                 "File par état", "Disque"]),
                                         ("ar", ["الإرسال الجاري", "الاتصال بالمركز", "آخر التنبيهات العاجلة",
                                                 "قائمة الانتظار حسب الحالة", "القرص"])])
def test_status_watch_screen_in_each_language(cfg, capsys, lang, words):
    rc, out, _err = wasla(capsys, "--lang", lang, "--config", str(cfg), "status", "--watch", "--count", "2",
                          "--interval", "0.2")
    assert rc == 0
    text = plain(out)
    for w in words:
        assert w in text
    assert URGENT[-13:] in text


def test_status_watch_json_is_one_snapshot_per_line_with_english_keys(cfg, capsys):
    snaps = {}
    for lang in ("fr", "ar"):
        rc, out, _err = wasla(capsys, "--lang", lang, "--config", str(cfg), "status", "--watch", "--json",
                              "--count", "2", "--interval", "0.2")
        assert rc == 0
        lines = [json.loads(line) for line in out.splitlines()]
        assert len(lines) == 2
        snaps[lang] = lines[-1]
    assert set(snaps["fr"]) == set(snaps["ar"]) == {"at", "box", "ingest", "states", "labels", "upload", "link",
                                                     "disk", "urgent"}
    assert snaps["ar"]["urgent"][0]["study_uid"] == URGENT and snaps["ar"]["link"]["up"] is False
    assert snaps["fr"]["states"] == snaps["ar"]["states"]


def test_upload_eta_comes_from_the_measured_link_rate(cfg):
    from types import SimpleNamespace

    from edge.statusview import StatusSampler
    from edge.uplink.outbox import Outbox

    c = config_mod.load(cfg, env={})
    store = Store.from_config(c)
    outbox = Outbox(store, c.box.data_dir / "outbox", c.box.id)
    inst = outbox.instances_to_pack()[0]
    enc = SimpleNamespace(data=b"x" * 100_000, codec="raw", transfer_syntax_uid="1.2.840.10008.1.2.1",
                          original_size=100_000, ratio=1.0)
    tid = outbox.add_transfer(inst, enc, inst["study_label"], 10_000)
    now = [1000.0]
    sampler = StatusSampler(c, store, probe=lambda: True, clock=lambda: now[0])
    first = sampler.sample()["upload"]
    assert first["current"]["transfer_id"] == tid and first["current"]["eta_s"] is None
    outbox.record_have(tid, set(range(4)))
    now[0] += 10
    snap = sampler.sample()
    up = snap["upload"]
    assert up["rate_bps"] == 4000.0 and up["rate_source"] == "measured"
    assert up["current"]["sent_bytes"] == 40_000 and up["current"]["eta_s"] == 15
    assert snap["link"]["history"] == [1, 1] and snap["link"]["changes"] == 0
    store.close()


def test_hub_cli_speaks_french_and_arabic(capsys, tmp_path):
    from sync.hub.cli import main as hub_main

    rc = hub_main(["--lang", "fr", "--help"])
    out = capsys.readouterr().out
    assert rc == 0 and "Hub régional Wasla" in out and "Commandes" in out
    rc = hub_main(["--lang", "ar", "worklist", "--help"])
    assert "الفحوص حسب الاستعجال" in plain(capsys.readouterr().out)
    rc = hub_main(["--lang", "fr", "read", "1.2.3", "--disposition", ""])
    err = capsys.readouterr().err
    assert rc == 2 and "Valeur invalide pour '--disposition' : 1 à 64 caractères" in err


def test_timestamps_in_arabic_output_stay_left_to_right(cfg, capsys):
    rc, out, _err = wasla(capsys, "--lang", "ar", "--config", str(cfg), "results")
    day = time.strftime("%Y-%m-%d")
    assert f"{LRI}{day}" in out
