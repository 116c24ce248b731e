"""Message translation for the CLIs (gettext domain "wasla"); catalogues live in edge/locale."""
from __future__ import annotations

import gettext
import os
from pathlib import Path

LOCALE_DIR = Path(__file__).parent / "locale"
LANGUAGES = ("en", "fr", "ar")
_current: gettext.NullTranslations = gettext.NullTranslations()


def pick_language(explicit: str | None = None, env: dict | None = None) -> str:
    """--lang wins; otherwise the first of LANGUAGE / LC_ALL / LC_MESSAGES / LANG we have a catalogue for."""
    if explicit:
        return explicit
    env = os.environ if env is None else env
    for var in ("LANGUAGE", "LC_ALL", "LC_MESSAGES", "LANG"):
        for part in (env.get(var) or "").split(":"):
            code = part.split(".")[0].split("_")[0].lower()
            if code in LANGUAGES:
                return code
    return "en"


def set_language(lang: str) -> None:
    global _current
    _current = gettext.translation("wasla", LOCALE_DIR, languages=[lang], fallback=True)


def _(message: str) -> str:
    return _current.gettext(message)
