#!/usr/bin/env python3
"""Regenerates sync/core/locale/wasla.pot from the sources, merges it into the .po files, compiles the .mo files.

    python scripts/i18n_extract.py           # update .pot, .po (new msgids get an empty msgstr) and .mo
    python scripts/i18n_extract.py --check   # change nothing; exit 1 listing what is stale or untranslated

Msgids come from two places: every literal `_("...")` / `N_("...")` in edge/, sync/core/ and sync/hub/ (Babel's
Python extractor), and every help text of the `wasla` and `wasla-hub` command trees (typer docstrings and help=,
which are translated when the CLI builds its click commands, see sync/core/i18n.py). Babel reads and writes the
catalogues and compiles the .mo files (the format GNU msgfmt writes), so neither the box nor CI needs the gettext
tools; the compiled files are committed and the box reads them with the standard library's gettext.
"""
from __future__ import annotations

import ast
import datetime as dt
import io
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from babel.messages.catalog import Catalog, Message
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po as babel_read_po, write_po

ROOT = Path(__file__).resolve().parent.parent
LOCALE_DIR = ROOT / "sync" / "core" / "locale"
POT = LOCALE_DIR / "wasla.pot"
LANGUAGES = ("en", "fr", "ar")
# English may stay identity (empty msgstr); the others must translate everything.
MUST_TRANSLATE = ("fr", "ar")
PLURAL_FORMS = {"en": "nplurals=2; plural=(n != 1);", "fr": "nplurals=2; plural=(n > 1);",
                "ar": "nplurals=6; plural=(n==0 ? 0 : n==1 ? 1 : n==2 ? 2 : n%100>=3 && n%100<=10 ? 3 : "
                      "n%100>=11 ? 4 : 5);"}
MARKERS = ("_", "N_")
PLACEHOLDER = re.compile(r"(?<!\{)\{([a-zA-Z_][a-zA-Z0-9_]*)?(?:[:!][^{}]*)?\}(?!\})")


def source_files() -> list[Path]:
    return sorted([*(ROOT / "edge").rglob("*.py"), *(ROOT / "sync" / "core").rglob("*.py"),
                   *(ROOT / "sync" / "hub").rglob("*.py")])


def ast_msgids(paths: list[Path] | None = None) -> dict[str, list[str]]:
    """msgid -> ["edge/cli.py", ...] for every literal argument of _() and N_().

    Found with the AST, not Babel's extractor: that one tokenises, and on Python 3.11 an f-string is one token, so
    the `_('Broker')` inside f"{_('Broker')}: ..." would be missed. File names only, no line numbers: an
    unrelated edit that shifts lines must not make the catalogues stale."""
    found: dict[str, list[str]] = {}
    for path in paths or source_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in MARKERS
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                    and node.args[0].value):
                where = found.setdefault(node.args[0].value, [])
                if str(path.relative_to(ROOT)) not in where:
                    where.append(str(path.relative_to(ROOT)))
    return found


# Jinja templates of the hub's worklist call _("...") with a literal, as the Python sources do.
TEMPLATE_CALL = re.compile(r"""\b_\(\s*"((?:[^"\\]|\\.)*)"\s*\)""")


def template_msgids() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "sync" / "hub" / "web" / "templates").glob("*.html")):
        for m in TEMPLATE_CALL.finditer(path.read_text(encoding="utf-8")):
            msgid = m.group(1).encode().decode("unicode_escape") if "\\" in m.group(1) else m.group(1)
            where = found.setdefault(msgid, [])
            if str(path.relative_to(ROOT)) not in where:
                where.append(str(path.relative_to(ROOT)))
    return found


def help_msgids() -> dict[str, list[str]]:
    """msgid -> ["help: wasla status", ...] for every help text of both CLIs."""
    import typer.main

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from edge import cli
    from sync.core.i18n import help_texts
    from sync.hub import cli as hub_cli

    found: dict[str, list[str]] = {}
    for prog, app in (("wasla", cli.app), ("wasla-hub", hub_cli.app)):
        root = typer.main.get_command(app)
        stack = [((prog,), root)]
        while stack:
            path, cmd = stack.pop()
            for sub_name, sub in getattr(cmd, "commands", {}).items():
                stack.append((path + (sub_name,), sub))
            for text in help_texts(_only(cmd)):
                found.setdefault(text, []).append("help: " + " ".join(path))
    return found


class _only:
    """One command without its subcommands (help_texts walks trees)."""

    def __init__(self, cmd):
        self.help, self.short_help, self.epilog, self.params = cmd.help, cmd.short_help, cmd.epilog, cmd.params
        self.commands: dict = {}


def all_msgids() -> dict[str, list[str]]:
    found = ast_msgids()
    for msgid, where in template_msgids().items():
        found.setdefault(msgid, []).extend(w for w in where if w not in found.get(msgid, []))
    for msgid, where in help_msgids().items():
        found.setdefault(msgid, []).extend(where)
    return dict(sorted(found.items(), key=lambda kv: _order(kv[1][0])))


# --- .po reading and writing (Babel) ---------------------------------------------------------------------------

@dataclass
class Entry:
    msgid: str
    msgstr: str = ""
    where: list[str] = field(default_factory=list)
    fuzzy: bool = False
    comments: list[str] = field(default_factory=list)


class Entries(dict):
    """msgid -> Entry, with the file's header text (compiled into the .mo as it is)."""

    header: str | None = None


# Fixed dates: a catalogue that did not change must come out byte for byte the same.
EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _catalog(lang: str | None) -> Catalog:
    catalog = Catalog(locale=lang, domain="wasla", project="wasla", version="1", creation_date=EPOCH,
                      revision_date=EPOCH, charset="UTF-8", fuzzy=False, msgid_bugs_address="",
                      last_translator="Wasla", language_team="Wasla",
                      header_comment=f"# Wasla CLI messages ({lang or 'template'}). Edit msgstr only; regenerate "
                                     "with: python scripts/i18n_extract.py")
    if lang:
        catalog._num_plurals, catalog._plural_expr = _plural(lang)
    return catalog


def _plural(lang: str) -> tuple[int, str]:
    n, expr = PLURAL_FORMS[lang].split(";", 1)
    return int(n.split("=")[1]), expr.strip().removeprefix("plural=").rstrip(";")


def read_po(path: Path) -> Entries:
    with open(path, "rb") as fh:
        catalog = babel_read_po(fh, charset="utf-8")
    entries = Entries()
    for m in catalog:
        if not m.id:
            continue
        entries[m.id] = Entry(m.id, m.string or "", where=[loc for loc, _n in m.locations] + list(m.auto_comments),
                              fuzzy=m.fuzzy, comments=list(m.user_comments))
    entries.header = _raw_header(path)
    return entries


def _raw_header(path: Path) -> str:
    """The msgstr of the empty msgid, exactly as the file has it."""
    text = path.read_text(encoding="utf-8")
    block = re.search(r'^msgid ""\nmsgstr ((?:"(?:[^"\\]|\\.)*"\n?)+)', text, flags=re.M)
    if not block:
        return ""
    parts = re.findall(r'"((?:[^"\\]|\\.)*)"', block.group(1))
    return "".join(parts).replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")


def render_po(msgids: dict[str, list[str]], lang: str | None, old: dict[str, Entry] | None = None) -> str:
    old = old or {}
    catalog = _catalog(lang)
    for msgid, where in msgids.items():
        prev = old.get(msgid)
        flags = (["fuzzy"] if prev and prev.fuzzy else []) + (["python-brace-format"] if PLACEHOLDER.search(msgid)
                                                              else [])
        # help texts are no file: they go in as extracted comments ("#. help: wasla status")
        catalog.add(msgid, prev.msgstr if prev and lang else "", flags=flags,
                    locations=[(w, None) for w in where if not w.startswith("help:")],
                    auto_comments=[w for w in where if w.startswith("help:")],
                    user_comments=prev.comments if prev else [])
    out = io.BytesIO()
    write_po(out, catalog, width=0, sort_output=False, include_lineno=False)
    # Which Babel wrote it is no part of the catalogue: another release must not make it stale.
    return re.sub(r'^"Generated-By: [^"]*"\n', "", out.getvalue().decode("utf-8"), flags=re.M)


class _Verbatim(Catalog):
    """A catalogue whose header is the .po file's own text: Babel would rebuild it (and name its own version)."""

    def __init__(self, header: str, messages: list[Message]):
        super().__init__(charset="UTF-8")
        self._header_text, self._messages = header, messages

    def __iter__(self):
        yield Message("", self._header_text)
        yield from self._messages


def compile_mo(entries: dict[str, Entry]) -> bytes:
    header = getattr(entries, "header", None)
    if header is None:
        header = _header(_catalog(None))
    # GNU msgfmt leaves POT-Creation-Date out of what it compiles; so do we (tests compare with it)
    header = re.sub(r"^POT-Creation-Date: [^\n]*\n", "", header, flags=re.M)
    messages = [Message(e.msgid, e.msgstr, flags=["fuzzy"] if e.fuzzy else []) for e in entries.values()]
    out = io.BytesIO()
    write_mo(out, _Verbatim(header, messages), use_fuzzy=False)
    return out.getvalue()


def _header(catalog: Catalog) -> str:
    return "".join(f"{k}: {v}\n" for k, v in catalog.mime_headers if k != "Generated-By")


def po_path(lang: str) -> Path:
    return LOCALE_DIR / lang / "LC_MESSAGES" / "wasla.po"


def problems(msgids: dict[str, list[str]]) -> list[str]:
    """Everything that would make a language incomplete or a compiled catalogue differ from its .po."""
    out = []
    if not POT.exists() or POT.read_text(encoding="utf-8") != render_po(msgids, None):
        out.append(f"{POT.relative_to(ROOT)} is stale")
    for lang in LANGUAGES:
        po = po_path(lang)
        if not po.exists():
            out.append(f"{po.relative_to(ROOT)} is missing")
            continue
        entries = read_po(po)
        for msgid, where in msgids.items():
            e = entries.get(msgid)
            if lang in MUST_TRANSLATE and (e is None or not e.msgstr.strip() or e.fuzzy):
                out.append(f"{lang}: no translation for {msgid!r} ({where[0]})")
            elif e is not None and e.msgstr and _fields(e.msgstr) != _fields(msgid):
                out.append(f"{lang}: placeholders of {msgid!r} differ: {sorted(_fields(e.msgstr))}")
        mo = po.with_suffix(".mo")
        if not mo.exists() or mo.read_bytes() != compile_mo(entries):
            out.append(f"{mo.relative_to(ROOT)} does not match its .po")
    return out


def _order(where: str) -> tuple:
    """Source order: files by name, lines by number, help texts after the code."""
    name, _sep, line = where.rpartition(":")
    return (where.startswith("help:"), name, int(line)) if line.isdigit() else (True, where, 0)


def _fields(text: str) -> set[str]:
    return {m.group(0) for m in PLACEHOLDER.finditer(text)}


def main(argv: list[str]) -> int:
    msgids = all_msgids()
    if "--check" in argv:
        found = problems(msgids)
        for p in found:
            print(p)
        return 1 if found else 0
    POT.parent.mkdir(parents=True, exist_ok=True)
    POT.write_text(render_po(msgids, None), encoding="utf-8")
    for lang in LANGUAGES:
        po = po_path(lang)
        po.parent.mkdir(parents=True, exist_ok=True)
        old = read_po(po) if po.exists() else {}
        po.write_text(render_po(msgids, lang, old), encoding="utf-8")
        po.with_suffix(".mo").write_bytes(compile_mo(read_po(po)))
    left = problems(msgids)
    for p in left:
        print(p)
    print(f"{len(msgids)} msgids; {len(left)} problem(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
