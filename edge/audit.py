"""Append-only audit log of CLI actions (who ran which command, when, with what outcome) — no patient identifiers.

One JSON object per line in `<data_dir>/audit.log`. Only the command path and the *names* of the options given
are kept, never argument values: a path or a study UID typed by a technician can carry a patient's name.
"""
from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

FILE_NAME = "audit.log"


def append(path: Path, entry: dict) -> None:
    """One line, written with O_APPEND in a single write and fsynced; never rewrites what is there."""
    line = (json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def describe_invocation(ctx, argv: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(command path, option names) of the invocation whose root group context is `ctx`, values left out.

    By the time the root callback runs, click has consumed the arguments, so they are read again from the process's
    argv; if that argv is not this invocation's (the CLI called in-process), only the first command is known."""
    first = getattr(ctx, "invoked_subcommand", None)
    if not first:
        return [], []
    argv = sys.argv[1:] if argv is None else argv
    command: list[str] = []
    options: list[str] = []
    group = ctx.command
    takes_value = {o for p in getattr(group, "params", []) if not getattr(p, "is_flag", False) for o in p.opts}
    tokens = iter(argv)
    for token in tokens:
        if token == "--":
            break
        if token.startswith("-"):
            name = token.split("=", 1)[0]
            options.append(name)
            if not command and name in takes_value and "=" not in token:
                next(tokens, None)  # a root option's value (e.g. the config path) is not an option name
            continue
        sub = getattr(group, "commands", None) or {}
        if token in sub:
            command.append(token)
            group = sub[token]
    if not command or command[0] != first:
        return [first], []
    return command, sorted(set(options))


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - a uid without a passwd entry (containers)
        return str(os.getuid())


def attach(ctx, data_dir_of) -> None:
    """Register one audit line, written when the command finishes. `data_dir_of()` returns the box Config (the line
    goes to its data_dir) or a folder. If that or the write fails the command has still run — an audit problem is
    logged, never a reason to refuse work."""
    command, options = describe_invocation(ctx)
    if not command:
        return
    started = time.monotonic()

    def _write() -> None:
        exc = sys.exc_info()[1]
        outcome = "ok" if exc is None or (getattr(exc, "exit_code", 1) == 0) else type(exc).__name__
        try:
            target = data_dir_of()
            if hasattr(target, "box"):  # a box Config: its data folder, made when a config file names it
                data_dir = Path(target.box.data_dir)
                if target.source is not None:
                    data_dir.mkdir(parents=True, exist_ok=True)
            else:
                data_dir = Path(target)
            if not data_dir.is_dir():
                return  # built-in defaults on a laptop (`config --defaults`): not a box, nothing to audit into
            append(data_dir / FILE_NAME, {
                "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "user": _user(),
                "uid": os.getuid(), "pid": os.getpid(), "command": " ".join(command), "options": options,
                "outcome": outcome, "seconds": round(time.monotonic() - started, 3)})
        except Exception as err:  # noqa: BLE001
            log.warning("could not write the audit log: %s", err)

    ctx.call_on_close(_write)
