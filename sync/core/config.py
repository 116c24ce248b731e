"""The one configuration mechanism of box and hub: TOML tables into frozen dataclasses, strictly (unknown keys and
wrong types are errors naming the key), with `credential:` paths and the reference read from attribute docs."""
from __future__ import annotations

import os
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path

from sync.core.errors import ConfigError


@dataclass(frozen=True)
class LogConfig:
    level: str = "INFO"
    """DEBUG, INFO, WARNING or ERROR."""


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = False
    """Serve Prometheus metrics at http://<bind>:<port>/metrics (queue depth, triage latency, goodput, bytes, quarantines)."""
    bind: str = "127.0.0.1"
    """Address the metrics endpoint listens on; loopback by default (the numbers are not secret, but not public)."""
    port: int = 9464
    """TCP port of the metrics endpoint (1-65535; 0 = any free port, for tests)."""


def _convert(value, tp, key: str, base: Path | None):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(value, args[0], key, base)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]", base) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a path string, got {value!r}")
        if value.startswith(CREDENTIAL_PREFIX):
            return _credential_path(value[len(CREDENTIAL_PREFIX):], key, base)
        p = Path(value).expanduser()
        # Relative paths are relative to the config file, so a bundle folder can be moved as a whole.
        return p if p.is_absolute() or base is None else (base / p)
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - programming error


CREDENTIAL_PREFIX = "credential:"


def _credential_path(name: str, key: str, base: Path | None) -> Path:
    # "credential:box.key" is a secret systemd hands over (LoadCredential=): under the unit it is read from
    # $CREDENTIALS_DIRECTORY, which only the service can read; outside it (doctor, a bundle on a USB stick) from
    # credentials/ beside the config file. Read when the config is loaded, never at import.
    if not name or "/" in name or name in (".", ".."):
        raise ConfigError(f"{key}: credential:{name} must name one file (no '/')")
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds:
        return Path(creds) / name
    return (base or Path.cwd()) / "credentials" / name


def build(cls, data: dict, prefix: str, base: Path | None):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.name != "source"}
    for k in data:
        if k not in known:
            raise ConfigError(f"unknown key '{prefix}{k}' (known: {', '.join(sorted(known))})")
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if is_dataclass(tp):
            if not isinstance(data[f.name], dict):
                raise ConfigError(f"{key}: expected a table [{key}]")
            kwargs[f.name] = build(tp, data[f.name], key + ".", base)
        else:
            kwargs[f.name] = _convert(data[f.name], tp, key, base)
    return cls(**kwargs)


def validate_metrics(m: MetricsConfig, prefix: str = "metrics") -> None:
    """Shared by the box and hub configs."""
    if not 0 <= m.port <= 65535:
        raise ConfigError(f"{prefix}.port: {m.port} is not a TCP port")
    if not m.bind.strip():
        raise ConfigError(f"{prefix}.bind: must be an address, e.g. 127.0.0.1 or 0.0.0.0")


def field_docs(cls) -> dict[str, str]:
    # Attribute docstrings are not kept by Python; read them from the source once, for the reference table.
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    first = tree.body[0]
    assert isinstance(first, ast.ClassDef)
    body = first.body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)
    return docs
