"""The one configuration mechanism of box, hub and fleet: TOML/JSON tables into frozen dataclasses through msgspec,
strictly (unknown keys, wrong types and out-of-range values are errors naming the key), ranges and documentation
declared once on each field (`doc(...)`), `credential:` paths, and the reference printed from those declarations."""
from __future__ import annotations

import os
import re
import tomllib
import typing
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Annotated

import msgspec

from sync.core.errors import ConfigError


def doc(text: str, **constraints) -> msgspec.Meta:
    """A field's documentation and its allowed range (msgspec constraints: ge, gt, le, lt, pattern, min_length...)."""
    return msgspec.Meta(description=text, **constraints)


@dataclass(frozen=True)
class LogConfig:
    level: Annotated[str, doc("DEBUG, INFO, WARNING or ERROR.", pattern=r"(?i)^(DEBUG|INFO|WARNING|ERROR)$")] = "INFO"


@dataclass(frozen=True)
class MetricsConfig:
    enabled: Annotated[bool, doc(
        "Serve Prometheus metrics at http://<bind>:<port>/metrics (queue depth, triage latency, goodput, bytes,"
        " quarantines).")] = False
    bind: Annotated[str, doc(
        "Address the metrics endpoint listens on; loopback by default (the numbers are not secret, but not "
        "public).", pattern=r"\S")] = "127.0.0.1"
    port: Annotated[int, doc("TCP port of the metrics endpoint (1-65535; 0 = any free port, for tests).",
                             ge=0, le=65535)] = 9464


CREDENTIAL_PREFIX = "credential:"


def _credential_path(name: str, base: Path | None) -> Path:
    # "credential:box.key" is a secret systemd hands over (LoadCredential=): under the unit it is read from
    # $CREDENTIALS_DIRECTORY, which only the service can read; outside it (doctor, a bundle on a USB stick) from
    # credentials/ beside the config file. Read when the config is loaded, never at import.
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"credential:{name} must name one file (no '/')")
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds:
        return Path(creds) / name
    return (base or Path.cwd()) / "credentials" / name


def _path_hook(base: Path | None):
    def hook(tp, value):
        if tp is not Path:
            raise NotImplementedError(f"unsupported config type {tp}")  # pragma: no cover - programming error
        if not isinstance(value, str) or not value:
            raise ValueError(f"expected a path string, got {value!r}")
        if value.startswith(CREDENTIAL_PREFIX):
            return _credential_path(value[len(CREDENTIAL_PREFIX):], base)
        p = Path(value).expanduser()
        # Relative paths are relative to the config file, so a bundle folder can be moved as a whole.
        return p if p.is_absolute() or base is None else (base / p)
    return hook


def _check_keys(cls, data: dict, prefix: str) -> None:
    """Unknown keys are errors (msgspec drops them for dataclasses): a typo must not silently mean the default."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.name != "source"}
    for k, v in data.items():
        if k not in known:
            raise ConfigError(f"unknown key '{prefix}{k}' (known: {', '.join(sorted(known))})")
        tp = hints[k]
        if is_dataclass(tp):
            if not isinstance(v, dict):
                raise ConfigError(f"{prefix}{k}: expected a table [{prefix}{k}]")
            _check_keys(tp, v, f"{prefix}{k}.")


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


def build(cls, data: dict, prefix: str, base: Path | None):
    """`data` (a parsed TOML or JSON table) as `cls`, every value checked against its field's type and range."""
    _check_keys(cls, data, prefix)
    try:
        return msgspec.convert(data, cls, strict=True, dec_hook=_path_hook(base))
    except msgspec.ValidationError as err:
        m = _AT.match(str(err))
        path = (m.group("path") or "").lstrip(".") if m else ""
        message = (m.group("msg") if m else str(err)).replace("`", "")
        key = prefix + path if path else prefix.rstrip(".") or "config"
        raise ConfigError(f"{key}: {message[:1].lower()}{message[1:]}") from None


def _meta(cls, name: str) -> msgspec.Meta | None:
    hint = typing.get_type_hints(cls, include_extras=True)[name]
    return next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, msgspec.Meta)), None)


def _range(meta: msgspec.Meta) -> str:
    lo = f">= {meta.ge}" if meta.ge is not None else f"> {meta.gt}" if meta.gt is not None else ""
    hi = f"<= {meta.le}" if meta.le is not None else f"< {meta.lt}" if meta.lt is not None else ""
    if meta.ge is not None and meta.le is not None:
        return f"{meta.ge}-{meta.le}"
    return ", ".join(p for p in (lo, hi) if p)


def field_docs(cls) -> dict[str, str]:
    """Field -> its declared documentation, with its allowed range where one is declared."""
    docs = {}
    for f in fields(cls):
        meta = _meta(cls, f.name)
        if meta is None:
            continue
        text, allowed = meta.description or "", _range(meta)
        docs[f.name] = f"{text} [{allowed}]" if allowed and allowed not in text else text
    return docs


def reference(cls, defaults) -> list[tuple[str, str, str]]:
    """(key, default, doc) for every setting of a config made of tables, read from the declarations."""
    rows = []
    for section in fields(cls):
        value = getattr(defaults, section.name)
        if not is_dataclass(value):
            continue
        docs = field_docs(type(value))
        for f in fields(value):
            rows.append((f"{section.name}.{f.name}", repr(getattr(value, f.name)), docs.get(f.name, "")))
    return rows


def parse_toml(cls, text: str, validate, base: Path | None = None, source: Path | None = None,
               what: str = "config"):
    """A TOML document as `cls` (a config with a `source` field), then `validate(cfg)` for cross-field rules."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source or what}: not valid TOML: {err}") from err
    cfg = replace(build(cls, data, "", base), source=source)
    validate(cfg)
    return cfg


def load_toml(cls, validate, path: Path | str | None, env: dict[str, str] | None, env_var: str,
              default_paths: tuple[Path, ...], what: str = "config"):
    """From `path`, else $`env_var`, else the first of `default_paths` that exists, else the built-in defaults."""
    environ: typing.Mapping[str, str] = os.environ if env is None else env
    if path is None and environ.get(env_var):
        path = environ[env_var]
    if path is None:
        path = next((p for p in default_paths if p.is_file()), None)
    if path is None:
        cfg = cls()
        validate(cfg)
        return cfg
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read {what} file {path}: {err.strerror or err}") from err
    return parse_toml(cls, text, validate, base=path.resolve().parent, source=path, what=what)
