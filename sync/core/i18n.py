"""Message translation for the CLIs (gettext domain "wasla", catalogues in sync/core/locale) and right-to-left output.

How the pieces fit:

* Catalogues are standard gettext: ``sync/core/locale/<lang>/LC_MESSAGES/wasla.po`` is the source a translator edits,
  the compiled ``wasla.mo`` next to it is committed and is what runs. ``python scripts/i18n_extract.py``
  regenerates ``wasla.pot`` from the sources, merges it into the .po files and compiles the .mo files with Babel
  (a dev dependency), so neither the box nor CI needs the gettext tools and the box needs only the standard
  library's gettext; tests/test_i18n.py fails when a .mo is stale or a user-facing string lacks a translation.
* Help texts: typer reads docstrings and ``help=`` at import time, before ``--lang`` is known. The sources keep
  the English text where it belongs; ``localized_command`` builds the click command tree and replaces every help
  text by its translation, after ``main()`` has picked the language from ``--lang`` or the environment. The help
  msgids are therefore the exact English help strings (scripts/i18n_extract.py collects them from the same tree).
* Right-to-left: Arabic is written in logical order and shaped/reordered by the terminal's bidi algorithm (GNOME
  VTE, Konsole, mlterm, Windows Terminal). Left alone, that algorithm works on whole lines: neutral characters
  between two Arabic phrases (table rules, spaces, box borders) take the Arabic direction and whole stretches of a
  line get mirrored, differently per terminal (VTE defaults to a left-to-right paragraph, Konsole guesses per
  line). So in Arabic every piece of output is a Unicode isolate: each translated message is wrapped in FSI ...
  PDI by ``_()`` (so it reads right-to-left inside its own cells), and what must stay left-to-right and intact —
  study UIDs, paths, numbers, times, host:port — is wrapped by ``ltr()`` in LRI ... PDI. With no strong character
  outside an isolate, every bidi terminal keeps the cell layout rich computed; the status screen then mirrors its
  own layout for Arabic (labels on the right, panels right-aligned), and the plain commands print each line as one
  RLI ... PDI isolate (``rtl_line``), so "label: value" and table columns read from the right. Isolates are
  zero-width for rich and wcwidth, so tables stay aligned. We do not pre-reorder into visual order (python-bidi):
  that is wrong on every bidi-capable terminal and in logs and pipes; a terminal without bidi shows the Arabic
  letters unjoined in logical order, the known limitation. ``--json`` output never passes through ``_()`` or
  ``ltr()``.
"""
from __future__ import annotations

import gettext
import importlib
import os
import re
from pathlib import Path
from typing import Any, Iterator

LOCALE_DIR = Path(__file__).parent / "locale"
DOMAIN = "wasla"
LANGUAGES = ("en", "fr", "ar")
RTL_LANGUAGES = frozenset({"ar"})
LRI, RLI, FSI, PDI = "\u2066", "\u2067", "\u2068", "\u2069"

_current: gettext.NullTranslations = gettext.NullTranslations()
_lang = "en"


def N_(message: str) -> str:
    """Marks a msgid for extraction where it is translated later (dictionaries, check names)."""
    return message


def normalize(code: str | None) -> str | None:
    """"fr_FR.UTF-8", "ar-MA", "FR" -> "fr"; None when we have no catalogue for it."""
    if not code:
        return None
    base = re.split(r"[._@-]", code.strip())[0].lower()
    return base if base in LANGUAGES else None


def pick_language(explicit: str | None = None, env: dict | None = None) -> str:
    """--lang wins; otherwise the first of LANGUAGE / LC_ALL / LC_MESSAGES / LANG we have a catalogue for."""
    chosen = normalize(explicit) if explicit else None
    if chosen:
        return chosen
    environ = os.environ if env is None else env
    for var in ("LANGUAGE", "LC_ALL", "LC_MESSAGES", "LANG"):
        for part in (environ.get(var) or "").split(":"):
            code = normalize(part)
            if code:
                return code
    return "en"


def lang_from_argv(argv: list[str]) -> str | None:
    """--lang must be known before click parses anything: help texts and usage errors are already translated."""
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--lang" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--lang="):
            return arg.split("=", 1)[1]
    return None


def set_language(lang: str) -> None:
    global _current, _lang
    _lang = normalize(lang) or "en"
    _current = gettext.translation(DOMAIN, LOCALE_DIR, languages=[_lang], fallback=True)
    _localize_framework_strings()


def translator(lang: str):
    """gettext for one language, whatever the process's current one (a report printed in French from an Arabic
    shell); English and unknown codes translate to the msgid itself."""
    return gettext.translation(DOMAIN, LOCALE_DIR, languages=[normalize(lang) or "en"], fallback=True).gettext


def current_language() -> str:
    return _lang


def is_rtl() -> bool:
    return _lang in RTL_LANGUAGES


def _(message: str) -> str:
    if not message:
        return message
    text = _current.gettext(message)
    # In RTL every message is an isolate too (FSI: its own direction, English if untranslated), so no line of
    # output has a strong character outside an isolate: every bidi terminal then lays the line out the same way.
    return f"{FSI}{text}{PDI}" if _lang in RTL_LANGUAGES else text


def rtl_line(line: str) -> str:
    """A whole output line as a right-to-left isolate in RTL languages, so "label: value" reads from the right."""
    return f"{RLI}{line}{PDI}" if line and is_rtl() else line


def ltr(value: Any) -> str:
    """An identifier, path or number that must read left-to-right and stay intact inside Arabic text."""
    text = "" if value is None else str(value)
    return f"{LRI}{text}{PDI}" if text and is_rtl() else text


# --- names of machine values (labels, states, reasons): codes stay stable in JSON, only the display translates --

LABEL_NAMES = {"normal": N_("normal"), "review": N_("review"), "urgent": N_("urgent"), "pending": N_("pending")}
STATE_NAMES = {
    "received": N_("received"), "processing": N_("processing"), "triaged": N_("triaged"), "queued": N_("queued"),
    "sent": N_("sent"), "acknowledged": N_("acknowledged"), "purged": N_("purged"),
    "quarantined": N_("quarantined"),
    # outbox rows (edge/uplink/outbox.py) and ingest outcomes (edge/ingest.py)
    "pending": N_("pending"), "confirmed": N_("confirmed"), "done": N_("done"), "failed": N_("failed"),
    "stored": N_("stored"), "duplicate": N_("duplicate"), "flag": N_("flag"), "transfer": N_("transfer"),
}
REASON_TEXTS = {
    "score_above_urgent": N_("score {score} at or above the urgent threshold {threshold}"),
    "score_above_review": N_("score {score} at or above the review threshold {threshold}"),
    "score_below_review": N_("score {score} below the review threshold {threshold}"),
    "low_confidence": N_("low confidence: most likely {label} at {confidence}, below {threshold}"),
    "no_model": N_("no model installed: every study goes to review"),
    "no_matching_model": N_("no installed model reads this kind of image ({modality}): a person must look"),
    "instance_quarantined": N_("an image could not be read (quarantined): a person must look"),
    "not_an_image": N_("not an image (a report or key object): kept and forwarded, not triaged"),
}


def label_name(label: str | None) -> str:
    return _(LABEL_NAMES.get(label or "pending", label or ""))


def state_name(state: str | None) -> str:
    return _(STATE_NAMES.get(state or "", state or ""))


def describe_reason(reason: dict) -> str:
    """A triage reason ({"code": ..., **params}) as a sentence; numbers and labels stay readable in Arabic."""
    code = reason.get("code", "")
    text = REASON_TEXTS.get(code)
    # Thresholds come from calibration with full float precision; four decimals, like scores, is what a person reads.
    params = {k: ltr(round(v, 4) if k == "threshold" and isinstance(v, float) else v)
              for k, v in reason.items() if k != "code"}
    if text is None:
        return " ".join([code, *(f"{k}={v}" for k, v in params.items())])

    class _Missing(dict):
        def __missing__(self, key):
            return "?"

    return _(text).format_map(_Missing(params))


# The library's error messages are English sentences built around identifiers (UIDs, paths, config keys); the
# CLI puts a translated headline for the error class in front, so the technician knows what kind of trouble it is.
ERROR_KINDS = (
    ("ModelIntegrityError", N_("model package refused")), ("InferenceError", N_("model failed")),
    ("ModelError", N_("model problem")), ("ConfigError", N_("configuration error")),
    ("NotFoundError", N_("not found")), ("OutOfResourcesError", N_("disk full")),
    ("StateError", N_("not allowed now")), ("StoreError", N_("storage problem")),
    ("BadInputError", N_("input refused")), ("ProtocolError", N_("protocol error")), ("SyncError", N_("sync problem")),
)


def error_line(err: BaseException) -> str:
    """One line for a WaslaError: "error (not found): study 1.2.3 not found", the headline translated."""
    names = {c.__name__ for c in type(err).__mro__}
    kind = next((text for name, text in ERROR_KINDS if name in names), None)
    head = _("error") if kind is None else _("error ({kind})").format(kind=_(kind))
    return f"{head}: {ltr(err) if is_rtl() else err}"


# --- click/typer: translated help, usage and errors ---------------------------------------------------------

def _click():
    try:  # recent typer vendors click
        return importlib.import_module("typer._click")
    except ImportError:  # pragma: no cover - older typer on top of click
        return importlib.import_module("click")


def iter_commands(cmd) -> Iterator:
    yield cmd
    for sub in getattr(cmd, "commands", {}).values():
        yield from iter_commands(sub)


def help_texts(cmd) -> Iterator[str]:
    """Every help text of a click command tree, as written in the source (the msgids of the help)."""
    for c in iter_commands(cmd):
        for text in (c.help, c.short_help, c.epilog):
            if text:
                yield text
        for p in c.params:
            if getattr(p, "help", None):
                yield p.help


def localized_command(app):
    """The click command for a typer app with every help text translated into the current language."""
    import typer.main

    cmd = typer.main.get_command(app)
    ctx_cls = _click().Context
    for c in iter_commands(cmd):
        c.help, c.short_help, c.epilog = _(c.help), _(c.short_help), _(c.epilog)
        for p in c.params:
            if getattr(p, "help", None):
                p.help = _(p.help)
        # The --help option is made on demand and cached; make it now so its text can be translated too.
        opt = c.get_help_option(ctx_cls(c, info_name=c.name))
        if opt is not None:
            opt.help = _("Show this message and exit.")
    return cmd


def _localize_framework_strings() -> None:
    """typer's help panels and click's usage line read module-level English strings: point them at ours."""
    ru: Any = None
    try:
        from typer import rich_utils as ru
    except ImportError:  # pragma: no cover - typer without rich
        pass
    if ru is not None:
        ru.DEPRECATED_STRING = _("(deprecated) ")
        ru.DEFAULT_STRING = _("[default: {}]")
        ru.ENVVAR_STRING = _("[env var: {}]")
        ru.REQUIRED_LONG_STRING = _("[required]")
        ru.ARGUMENTS_PANEL_TITLE = _("Arguments")
        ru.OPTIONS_PANEL_TITLE = _("Options")
        ru.COMMANDS_PANEL_TITLE = _("Commands")
        ru.ERRORS_PANEL_TITLE = _("Error")
        ru.ABORTED_TEXT = _("Aborted.")
    formatting = importlib.import_module(_click().__name__ + ".formatting")
    orig = formatting.HelpFormatter.write_usage
    if not getattr(orig, "_wasla", False):
        def write_usage(self, prog, args="", prefix=None):
            return orig(self, prog, args, _("Usage: ") if prefix is None else prefix)

        write_usage._wasla = True  # type: ignore[attr-defined]
        formatting.HelpFormatter.write_usage = write_usage


def click_error_lines(err) -> list[str]:
    """A click usage/parameter error as translated lines (what click's `show()` prints in English)."""
    click = _click()
    exc = click.exceptions
    lines: list[str] = []
    ctx = getattr(err, "ctx", None)
    if ctx is not None:
        lines.append(ctx.get_usage())
        if ctx.command.get_help_option(ctx) is not None:
            lines.append(_("Try '{command} {option}' for help.").format(command=ctx.command_path,
                                                                       option=ctx.help_option_names[0]))
    if isinstance(err, exc.NoSuchOption):
        msg = _("No such option: {option}").format(option=err.option_name)
        if err.possibilities:
            msg += " " + _("(possible options: {options})").format(options=", ".join(sorted(err.possibilities)))
    elif isinstance(err, exc.MissingParameter):
        hint = _param_hint(err)
        kind = err.param_type or (err.param.param_type_name if err.param is not None else "parameter")
        msg = {"argument": _("Missing argument {name}."), "option": _("Missing option {name}.")}.get(
            kind, _("Missing parameter {name}.")).format(name=hint)
    elif isinstance(err, exc.BadParameter):
        msg = _("Invalid value for {param}: {message}").format(param=_param_hint(err), message=err.message)
    else:
        msg = err.format_message()
    lines.append(_("Error: {message}").format(message=msg))
    return lines


def _param_hint(err) -> str:
    hint = err.param_hint
    if hint is None and err.param is not None:
        try:
            hint = err.param.get_error_hint()
        except TypeError:  # pragma: no cover - upstream click takes the context
            hint = err.param.get_error_hint(err.ctx)
    if isinstance(hint, (list, tuple)):
        hint = " / ".join(f"'{h}'" for h in hint)
    elif hint and not hint.startswith("'"):
        hint = f"'{hint}'"
    return ltr(hint or "")


__all__ = ["LANGUAGES", "LOCALE_DIR", "N_", "_", "click_error_lines", "current_language", "describe_reason",
           "error_line", "lang_from_argv", "rtl_line",
           "help_texts", "is_rtl", "label_name", "localized_command", "ltr", "pick_language", "set_language",
           "state_name"]


def echo(text: str, err: bool = False) -> None:
    """Human output: in Arabic each line is a right-to-left isolate; JSON never goes through here."""
    import typer

    typer.echo("\n".join(rtl_line(line) for line in str(text).split("\n")), err=err)


def run_cli(app, argv: list[str] | None, prog_name: str) -> int:
    """Run a typer app in the language of --lang / the locale; library errors and usage errors become translated
    lines and exit codes (the one place both CLIs translate the error hierarchy)."""
    import sys

    import typer

    from sync.core.errors import WaslaError

    argv = sys.argv[1:] if argv is None else list(argv)
    set_language(pick_language(lang_from_argv(argv)))
    try:
        rv = localized_command(app).main(args=argv, prog_name=prog_name, standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except WaslaError as err:
        echo(error_line(err), err=True)
        return err.exit_code
    except typer.Exit as ex:
        return ex.exit_code
    except (KeyboardInterrupt, typer.Abort):
        return 130
    except Exception as err:  # click's usage errors (typer vendors click, so match the base class by name)
        if any(c.__name__ == "ClickException" for c in type(err).__mro__):
            click_err: Any = err  # a click.ClickException, whichever click the typer in use vendors
            if type(err).__name__ == "NoArgsIsHelpError":
                click_err.show()
            else:
                echo("\n".join(click_error_lines(err)), err=True)
            return click_err.exit_code
        raise
