"""Catalogues: every user-facing string translated into French and Arabic, .mo files current, RTL isolation."""
from __future__ import annotations

import ast
import gettext
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from sync.core import i18n
from sync.core.i18n import LRI, PDI, describe_reason, ltr, pick_language, set_language

ROOT = Path(__file__).resolve().parent.parent


def _extract():
    spec = importlib.util.spec_from_file_location("i18n_extract", ROOT / "scripts" / "i18n_extract.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["i18n_extract"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def extract():
    return _extract()


@pytest.fixture(scope="module")
def msgids(extract):
    return extract.all_msgids()


@pytest.fixture(autouse=True)
def english_afterwards():
    yield
    set_language("en")


def test_every_user_facing_string_has_a_french_and_arabic_translation(extract, msgids):
    """Scans _()/N_() literals in edge/, sync/core/ and sync/hub/ and every help text of both CLIs (new ones included)."""
    missing = [p for p in extract.problems(msgids) if "no translation" in p or "placeholders" in p]
    assert missing == [], "run `python scripts/i18n_extract.py`, then translate:\n" + "\n".join(missing)


def test_pot_and_compiled_catalogues_are_current(extract, msgids):
    stale = [p for p in extract.problems(msgids) if "stale" in p or "does not match" in p or "missing" in p]
    assert stale == [], "run `python scripts/i18n_extract.py`:\n" + "\n".join(stale)


def test_help_texts_and_table_words_are_in_the_catalogue(msgids):
    from edge import cli
    from sync.hub import cli as hub_cli

    for app in (cli.app, hub_cli.app):
        for text in i18n.help_texts(typer.main.get_command(app)):
            assert text in msgids
    for word in ("urgent", "review", "normal", "quarantined", "Usage: ", "Options", "clock", "DICOM port"):
        assert word in msgids


def test_every_reason_code_the_library_emits_has_a_sentence():
    codes = set()
    for name in ("triage.py", "store.py", "engine.py"):
        tree = ast.parse((ROOT / "edge" / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values):
                    if isinstance(k, ast.Constant) and k.value == "code" and isinstance(v, ast.Constant):
                        codes.add(v.value)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_reason":
                codes.add(node.args[0].value)
    assert {"score_above_urgent", "score_above_review", "score_below_review", "low_confidence", "no_model",
            "no_matching_model", "instance_quarantined"} <= codes
    assert codes <= set(i18n.REASON_TEXTS)


def test_every_state_and_label_has_a_display_name():
    from edge.store import STATES
    from edge.triage import LABELS

    assert set(STATES) <= set(i18n.STATE_NAMES) and set(LABELS) <= set(i18n.LABEL_NAMES)
    set_language("fr")
    assert [i18n.label_name(x) for x in ("urgent", "review", "normal", None)] == ["urgent", "à revoir", "normal",
                                                                                   "en attente"]
    assert i18n.state_name("quarantined") == "en quarantaine"
    set_language("ar")
    assert i18n.label_name("urgent").strip("\u2068\u2069") == "عاجل"
    assert i18n.state_name("quarantined").strip("\u2068\u2069") == "معزول"


def test_reason_sentences_carry_their_numbers_in_every_language():
    reason = {"code": "score_above_urgent", "score": 0.9312, "threshold": 0.8}
    assert describe_reason(reason) == "score 0.9312 at or above the urgent threshold 0.8"
    set_language("fr")
    assert describe_reason(reason) == "score 0.9312 supérieur ou égal au seuil d'urgence 0.8"
    set_language("ar")
    text = describe_reason(reason)
    assert f"{LRI}0.9312{PDI}" in text and f"{LRI}0.8{PDI}" in text and "عتبة" in text
    assert describe_reason({"code": "new_code", "x": 1}) == "new_code x=\u20661\u2069"


@pytest.mark.parametrize("env, expected", [
    ({"LANG": "fr_FR.UTF-8"}, "fr"), ({"LC_ALL": "ar_MA.UTF-8", "LANG": "fr_FR.UTF-8"}, "ar"),
    ({"LANGUAGE": "de:ar", "LANG": "en_US.UTF-8"}, "ar"), ({"LANG": "C.UTF-8"}, "en"), ({}, "en"),
])
def test_language_comes_from_the_locale_when_no_lang_option(env, expected):
    assert pick_language(None, env) == expected


def test_lang_option_wins_over_the_locale():
    assert pick_language("ar", {"LANG": "fr_FR.UTF-8"}) == "ar"
    assert pick_language("FR_fr", {}) == "fr"
    assert i18n.lang_from_argv(["--config", "x.toml", "--lang=ar", "status"]) == "ar"
    assert i18n.lang_from_argv(["show", "--", "--lang", "fr"]) is None


def test_identifiers_are_isolated_left_to_right_only_in_arabic():
    uid, path = "1.2.840.113619.2.55.3.4471", "/var/lib/wasla/spool/ab/cd.dcm"
    set_language("fr")
    assert ltr(uid) == uid and i18n.rtl_line("x") == "x"
    set_language("ar")
    assert ltr(uid) == f"{LRI}{uid}{PDI}" and ltr(path) == f"{LRI}{path}{PDI}"
    assert i18n._("Box") == "\u2068الجهاز\u2069"
    assert ltr("") == "" and ltr(None) == ""


def test_isolates_take_no_cell_so_tables_stay_aligned():
    from rich.cells import cell_len

    set_language("ar")
    assert cell_len(ltr("1.2.840")) == len("1.2.840")
    assert cell_len(i18n._("Box")) == len("الجهاز")


def test_catalogues_load_through_stock_gettext():
    for lang, word in (("fr", "File d'attente"), ("ar", "قائمة الانتظار")):
        t = gettext.translation("wasla", i18n.LOCALE_DIR, languages=[lang])
        assert t.gettext("Queue") == word
        assert t.info()["content-type"] == "text/plain; charset=UTF-8"


@pytest.mark.skipif(not shutil.which("msgfmt"), reason="GNU gettext not installed (it is not needed at run time)")
def test_pure_python_compiler_agrees_with_gnu_msgfmt(extract, tmp_path):
    for lang in ("fr", "ar"):
        po = extract.po_path(lang)
        subprocess.run(["msgfmt", "--check-format", "-o", str(tmp_path / f"{lang}.mo"), str(po)], check=True)
        with open(tmp_path / f"{lang}.mo", "rb") as a, open(po.with_suffix(".mo"), "rb") as b:
            assert gettext.GNUTranslations(a)._catalog == gettext.GNUTranslations(b)._catalog


def test_po_reader_and_writer_round_trip_tricky_text(extract, tmp_path):
    msgids = {'say "hi"\\n': ["x:1"], "two\nlines": ["x:2"], "tab\there": ["x:3"]}
    po = tmp_path / "t.po"
    old = {k: extract.Entry(k, k.upper()) for k in msgids}
    po.write_text(extract.render_po(msgids, "fr", old), encoding="utf-8")
    back = extract.read_po(po)
    assert {k: back[k].msgstr for k in msgids} == {k: k.upper() for k in msgids}
    (tmp_path / "t.mo").write_bytes(extract.compile_mo(back))
    with open(tmp_path / "t.mo", "rb") as fh:
        assert gettext.GNUTranslations(fh).gettext("two\nlines") == "TWO\nLINES"
