"""What the technician CLI's commands share: the config loaded once per run, the stores, tables and times."""
from __future__ import annotations

import datetime as dt

import typer

from edge import config as config_mod
from sync.core.cliout import local_time, print_json, table
from sync.core.i18n import _, echo, ltr

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


_print_json, _table, _ts = print_json, table, local_time


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


