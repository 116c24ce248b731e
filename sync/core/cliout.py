"""What both command lines print: tables whose columns line up in Arabic too, JSON, and local times."""
from __future__ import annotations

import datetime as dt
import json

import typer

from sync.core.i18n import _, echo, is_rtl, ltr


def table(rows: list[dict], cols: list[tuple[str, str]], ltr_cols: tuple[str, ...] = ()) -> None:
    """Plain columns (key, heading); values in `ltr_cols` (UIDs, box ids, numbers) stay left-to-right in Arabic."""
    if not rows:
        echo(_("(none)"))
        return
    from rich.cells import cell_len  # screen width: Arabic letters, isolates and wide glyphs are not len()

    def pad(text: str, width: int) -> str:
        return text + " " * (width - cell_len(text))

    cells = [[(ltr(r.get(k)) if k in ltr_cols else str(r.get(k))) if r.get(k) is not None else "" for k, _h in cols]
             for r in rows]
    widths = [max(cell_len(h), *(cell_len(c[i]) for c in cells)) for i, (_k, h) in enumerate(cols)]
    # Arabic lines are mirrored as a whole by the terminal: keep them all the same width so columns line up.
    end = (lambda line: line) if is_rtl() else str.rstrip
    echo(end("  ".join(pad(h, w) for (_k, h), w in zip(cols, widths))))
    for c in cells:
        echo(end("  ".join(pad(v, w) for v, w in zip(c, widths))))


def print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str, ensure_ascii=False))


def local_time(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"
