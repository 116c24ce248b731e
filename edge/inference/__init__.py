"""The backend registry (derived from the plugin files in this package) and backend selection, "auto" included."""
from __future__ import annotations

import importlib
import json
import logging
import pkgutil
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

from sync.core.errors import ConfigError, ModelError
from edge.inference.base import Backend, ramp_tensor
from edge.modelmanifest import ModelPackage
from sync.core.fsutil import atomic_write

log = logging.getLogger(__name__)

AUTO = "auto"
_TIMED_RUNS = 10
# "auto" keeps this backend unless another is clearly faster: on a box where the two are within noise of each
# other, picking the faster of the day would switch models (and thresholds) from one restart to the next.
PREFERRED = "onnxruntime"
CLEARLY_FASTER = 1.2


def _load_plugins() -> dict[str, type[Backend]]:
    # A new backend is a new file in this package, nothing else: import them all, then collect the subclasses.
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    registry: dict[str, type[Backend]] = {}
    for cls in Backend.__subclasses__():
        if cls.TYPE_KEY in registry:
            raise RuntimeError(f"two inference backends claim TYPE_KEY {cls.TYPE_KEY!r}")
        registry[cls.TYPE_KEY] = cls
    return dict(sorted(registry.items()))


BACKENDS: dict[str, type[Backend]] = _load_plugins()


def create_backend(package: ModelPackage, kind: str, threads: int, providers: list[str], warmup: int = 3) -> Backend:
    """A loaded, warmed-up backend for `package`. `kind` is a TYPE_KEY or "auto" (see choose_auto)."""
    if kind == AUTO:
        return _fastest(package, threads, providers, warmup)
    cls = BACKENDS.get(kind)
    if cls is None:
        raise ConfigError(f"unknown inference backend {kind!r}; known: {', '.join([AUTO, *BACKENDS])}")
    if not cls.available():
        raise ConfigError(f"inference backend {kind!r} is not installed on this box")
    backend = cls(package, threads, providers)
    backend.load()
    backend.warmup(warmup)
    return backend


def create_recorded(package: ModelPackage, kind: str, threads: int, providers: list[str], warmup: int,
                    record: Path | None, trusted_keys: list[Path] | None = None) -> Backend:
    """Like create_backend, but "auto" is decided once per package version and kept in `record` (a JSON file):
    a restart loads the recorded backend without timing anything, so the thresholds in force never change
    between reboots. A recorded backend that no longer loads (runtime removed) is chosen afresh, loudly.
    Given the `trusted_keys` the package verified with, the timing runs in a child process (edge.inference._choose)
    and this process loads only the winner."""
    if kind != AUTO or record is None:
        backend = create_backend(package, kind, threads, providers, warmup)
        backend.choice = "configured" if kind != AUTO else "auto (not recorded)"
        return backend
    choices = read_choices(record)
    entry = choices.get(package.id)
    if isinstance(entry, dict) and entry.get("backend") in BACKENDS:
        try:
            backend = create_backend(package, entry["backend"], threads, providers, warmup)
            backend.choice = f"auto, recorded {entry.get('chosen_at', '?')}"
            return backend
        except (ConfigError, ModelError) as err:
            log.error("recorded backend %s for %s cannot run (%s): choosing again", entry["backend"], package.id, err)
    backend = _chosen_in_child(package, threads, providers, warmup, trusted_keys) if trusted_keys is not None \
        else None
    if backend is None:
        backend = _fastest(package, threads, providers, warmup)
    choices[package.id] = {"backend": backend.TYPE_KEY, "precision": backend.precision,
                           "chosen_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                           "median_ms": getattr(backend, "auto_medians", {})}
    try:
        _write_choices(record, choices)
    except OSError as err:
        log.error("cannot record the backend chosen for %s in %s: %s", package.id, record, err)
    backend.choice = f"auto, chosen {choices[package.id]['chosen_at']}"
    return backend


def _chosen_in_child(package: ModelPackage, threads: int, providers: list[str], warmup: int,
                     trusted_keys: list[Path]) -> Backend | None:
    """Time the backends in a child; load the winner here. None (time them here instead) if the child fails."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "edge.inference._choose", "--folder", str(package.folder), "--threads",
           str(threads), "--providers", json.dumps(list(providers)), "--warmup", str(warmup)]
    for key in trusted_keys:
        cmd += ["--key", str(key)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
        verdict = json.loads(out.stdout.strip().splitlines()[-1])
        backend = create_backend(package, verdict["backend"], threads, providers, warmup)
    except (subprocess.SubprocessError, OSError, ValueError, IndexError, KeyError, ConfigError, ModelError) as err:
        log.warning("timing the backends for %s in a child process failed (%s); timing them here",
                    package.id, type(err).__name__)
        return None
    backend.auto_medians = verdict.get("median_ms", {})
    log.info("auto backend for %s: %s (median ms: %s; timed in a child process)", package.id, backend.TYPE_KEY,
             backend.auto_medians)
    return backend


def read_choices(record: Path) -> dict:
    """The recorded backend choices ({package id: {...}}); an unreadable record counts as empty."""
    try:
        data = json.loads(Path(record).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        log.error("backend choice record %s unreadable (%s): choosing again", record, err)
        return {}
    return data if isinstance(data, dict) else {}


def _write_choices(record: Path, choices: dict) -> None:
    record = Path(record)
    record.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(record, json.dumps(choices, indent=2, sort_keys=True).encode(), tmp=record.with_name(record.name + ".tmp"))


def _fastest(package: ModelPackage, threads: int, providers: list[str], warmup: int = 3) -> Backend:
    candidates = [cls for key, cls in BACKENDS.items() if key in package.backend_files and cls.available()]
    if not candidates:
        raise ModelError(f"no installed inference backend can run {package.id} "
                         f"(package has {sorted(package.backend_files)}, installed: "
                         f"{[k for k, c in BACKENDS.items() if c.available()]})")
    tensor = ramp_tensor(tuple(package.input_spec["shape"]))
    medians: dict[str, float] = {}
    loaded: dict[str, Backend] = {}
    first_error: ModelError | None = None
    for cls in candidates:
        backend = cls(package, threads, providers)
        try:
            backend.load()
            backend.warmup(warmup)
            runs = []
            for _ in range(_TIMED_RUNS):
                start = time.perf_counter()
                backend.predict(tensor)
                runs.append((time.perf_counter() - start) * 1000)
        except ModelError as err:
            log.warning("%s unusable, not a candidate for auto: %s", backend.name, err)
            first_error = first_error or err
            backend.close()
            continue
        medians[cls.TYPE_KEY] = statistics.median(runs)
        loaded[cls.TYPE_KEY] = backend
    if not loaded:
        assert first_error is not None
        raise type(first_error)(f"no backend can run {package.id}: {first_error}") from first_error
    choice = choose_auto(medians)
    for key, backend in loaded.items():
        if key != choice:
            backend.close()
    loaded[choice].auto_medians = {k: round(v, 3) for k, v in medians.items()}
    log.info("auto backend for %s: %s (median ms: %s)", package.id, choice,
             ", ".join(f"{k} {v:.2f}" for k, v in medians.items()))
    return loaded[choice]


def choose_auto(medians: dict[str, float]) -> str:
    """PREFERRED when it runs, unless another backend is CLEARLY_FASTER; else the fastest."""
    fastest = min(medians, key=medians.__getitem__)
    if PREFERRED in medians and medians[fastest] * CLEARLY_FASTER > medians[PREFERRED]:
        return PREFERRED
    return fastest


__all__ = ["AUTO", "BACKENDS", "Backend", "choose_auto", "create_backend", "create_recorded", "read_choices"]
