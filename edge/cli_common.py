"""What the technician CLI's commands share: the config loaded once per run, the stores, tables and times."""
from __future__ import annotations

import datetime as dt
import json

import typer

from edge import config as config_mod
from sync.core.i18n import _, echo, is_rtl, ltr

_state: dict = {}


def _cfg() -> config_mod.Config:
    if "cfg" not in _state:
        _state["cfg"] = config_mod.load(_state.get("config_path"), env={})
    return _state["cfg"]


def _store():
    from edge.store import Store

    return Store.from_config(_cfg())


def _reader():
    """The store for commands that only look: read-only, no migration (edge.store.Store.reader)."""
    from edge.store import Store

    return Store.reader(_cfg())


_echo = echo


def _print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str, ensure_ascii=False))


def _table(rows: list[dict], cols: list[tuple[str, str]]) -> None:
    if not rows:
        _echo(_("(none)"))
        return
    from rich.cells import cell_len  # screen width: Arabic letters, isolates and wide glyphs are not len()

    def pad(text: str, width: int) -> str:
        return text + " " * (width - cell_len(text))

    cells = [[str(r.get(k, "") if r.get(k) is not None else "") for k, _h in cols] for r in rows]
    widths = [max(cell_len(h), *(cell_len(c[i]) for c in cells)) for i, (_k, h) in enumerate(cols)]
    # Arabic lines are mirrored as a whole by the terminal: keep them all the same width so columns line up.
    end = (lambda line: line) if is_rtl() else str.rstrip
    _echo(end("  ".join(pad(h, w) for (_k, h), w in zip(cols, widths))))
    for c in cells:
        _echo(end("  ".join(pad(v, w) for v, w in zip(c, widths))))


def _ts(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _when(t: float | None) -> str:
    """_ts for display: kept left-to-right inside Arabic text (never used for --json)."""
    return ltr(_ts(t))


def _parse_when(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value).timestamp()
    except ValueError as err:
        raise typer.BadParameter(
            _("{value}: expected YYYY-MM-DD or YYYY-MM-DDTHH:MM").format(value=repr(value))) from err


