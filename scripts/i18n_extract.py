#!/usr/bin/env python3
"""Regenerates sync/core/locale/wasla.pot from the sources, merges it into the .po files, compiles the .mo files.

    python scripts/i18n_extract.py           # update .pot, .po (new msgids get an empty msgstr) and .mo
    python scripts/i18n_extract.py --check   # change nothing; exit 1 listing what is stale or untranslated

Msgids come from two places: every literal `_("...")` / `N_("...")` in edge/, sync/core/ and sync/hub/ (found with
the AST, so no xgettext is needed), and every help text of the `wasla` and `wasla-hub` command trees (typer
docstrings and help=, which are translated when the CLI builds its click commands, see sync/core/i18n.py).
The .mo files are compiled here in pure Python (the same format as GNU msgfmt writes), so neither the box
nor CI needs the gettext tools; the compiled files are committed.
"""
from __future__ import annotations

import ast
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

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

    File names only, no line numbers: an unrelated edit that shifts lines must not make the catalogues stale."""
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


# --- .po reading and writing ---------------------------------------------------------------------------------

@dataclass
class Entry:
    msgid: str
    msgstr: str = ""
    where: list[str] = field(default_factory=list)
    fuzzy: bool = False
    comments: list[str] = field(default_factory=list)


def _unquote(s: str) -> str:
    s = s.strip()
    assert s.startswith('"') and s.endswith('"'), s
    escapes = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}
    return re.sub(r"\\(.)", lambda m: escapes.get(m.group(1), "\\" + m.group(1)), s[1:-1])


def _quote(s: str) -> str:
    esc = s.replace("\\", "\\\\").replace('"', '\\"').replace("\t", "\\t")
    if "\n" not in esc:
        return f'"{esc}"'
    parts = esc.split("\n")
    lines = [p + "\\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    return '""\n' + "\n".join(f'"{line}"' for line in lines)


def read_po(path: Path) -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    cur: Entry | None = None
    field_name = None
    pending_flags: list[str] = []
    pending_comments: list[str] = []

    def flush():
        nonlocal cur
        if cur is not None:
            entries[cur.msgid] = cur
        cur = None

    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line:
            flush()
            continue
        if line.startswith("#,"):
            pending_flags += [f.strip() for f in line[2:].split(",")]
        elif line.startswith("# ") or line == "#":
            pending_comments.append(line[2:])
        elif line.startswith("#"):
            continue
        elif line.startswith("msgid "):
            flush()
            cur = Entry(_unquote(line[6:]), fuzzy="fuzzy" in pending_flags, comments=pending_comments)
            pending_flags, pending_comments = [], []
            field_name = "msgid"
        elif line.startswith("msgstr "):
            cur.msgstr = _unquote(line[7:])
            field_name = "msgstr"
        elif line.startswith('"') and cur is not None:
            setattr(cur, field_name, getattr(cur, field_name) + _unquote(line))
    flush()
    return entries


def header(lang: str | None) -> str:
    lines = ["Project-Id-Version: wasla", "MIME-Version: 1.0", "Content-Type: text/plain; charset=UTF-8",
             "Content-Transfer-Encoding: 8bit"]
    if lang:
        lines += [f"Language: {lang}", f"Plural-Forms: {PLURAL_FORMS[lang]}"]
    return "\n".join(lines) + "\n"


def render_po(msgids: dict[str, list[str]], lang: str | None, old: dict[str, Entry] | None = None) -> str:
    old = old or {}
    title = "Wasla CLI messages" + (f" ({lang})" if lang else " (template)")
    out = [f"# {title}. Edit msgstr only; regenerate with: python scripts/i18n_extract.py",
           'msgid ""', "msgstr " + _quote(header(lang)), ""]
    for msgid, where in msgids.items():
        prev = old.get(msgid)
        for c in (prev.comments if prev else []):
            out.append(f"# {c}".rstrip())
        for w in where:
            out.append(f"#: {w}")
        if prev and prev.fuzzy:
            out.append("#, fuzzy")
        if PLACEHOLDER.search(msgid):
            out.append("#, python-brace-format")
        out.append("msgid " + _quote(msgid))
        out.append("msgstr " + _quote(prev.msgstr if prev and lang else ""))
        out.append("")
    return "\n".join(out)


# --- .mo compiling (GNU format, little-endian, no hash table) ----------------------------------------------------

def compile_mo(entries: dict[str, Entry]) -> bytes:
    catalog = {e.msgid: e.msgstr for e in entries.values() if e.msgstr and not e.fuzzy}
    if "" in entries:
        catalog[""] = entries[""].msgstr
    keys = sorted(catalog)
    ids = b""
    strs = b""
    offsets = []
    for k in keys:
        kb, vb = k.encode("utf-8"), catalog[k].encode("utf-8")
        offsets.append((len(ids), len(kb), len(strs), len(vb)))
        ids += kb + b"\0"
        strs += vb + b"\0"
    n = len(keys)
    key_start = 7 * 4 + 16 * n
    value_start = key_start + len(ids)
    koffsets, voffsets = [], []
    for o1, l1, o2, l2 in offsets:
        koffsets += [l1, o1 + key_start]
        voffsets += [l2, o2 + value_start]
    head = struct.pack("<Iiiiiii", 0x950412DE, 0, n, 7 * 4, 7 * 4 + n * 8, 0, 0)
    tables = struct.pack(f"<{len(koffsets)}i", *koffsets) + struct.pack(f"<{len(voffsets)}i", *voffsets)
    return head + tables + ids + strs


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
