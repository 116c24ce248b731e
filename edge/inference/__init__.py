"""The backend registry (derived from the plugin files in this package) and backend selection, "auto" included."""
from __future__ import annotations

import importlib
import logging
import pkgutil
import statistics
import time

from edge.errors import ConfigError, ModelError
from edge.inference.base import Backend, ramp_tensor
from edge.modelpkg import ModelPackage

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
        if info.name != "base":
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
    log.info("auto backend for %s: %s (median ms: %s)", package.id, choice,
             ", ".join(f"{k} {v:.2f}" for k, v in medians.items()))
    return loaded[choice]


def choose_auto(medians: dict[str, float]) -> str:
    """PREFERRED when it runs, unless another backend is CLEARLY_FASTER; else the fastest."""
    fastest = min(medians, key=medians.__getitem__)
    if PREFERRED in medians and medians[fastest] * CLEARLY_FASTER > medians[PREFERRED]:
        return PREFERRED
    return fastest


__all__ = ["AUTO", "BACKENDS", "Backend", "choose_auto", "create_backend"]
