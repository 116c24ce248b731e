"""The inference backend interface and the output checks every backend shares."""
from __future__ import annotations

import importlib
import logging
import statistics
import time
from abc import ABC, abstractmethod
from collections import deque
from typing import ClassVar

import numpy as np

from sync.core.errors import ConfigError, InferenceError, ModelError
from edge.modelmanifest import ModelPackage

log = logging.getLogger(__name__)

# Probabilities from a model are float32; allow that much slack before calling them malformed.
_PROB_TOL = 1e-3


class Backend(ABC):
    """One runtime running one model package: `load`, `warmup`, `predict`.

    `predict` returns checked probabilities in label order or raises InferenceError; it never returns zeros.
    """

    TYPE_KEY: ClassVar[str]
    RUNTIME_MODULE: ClassVar[str]

    def __init__(self, package: ModelPackage, threads: int, providers: list[str]):
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ConfigError(f"inference threads must be an integer >= 1, got {threads!r}")
        if self.TYPE_KEY not in package.backend_files:
            raise ModelError(f"model package {package.id} has no file for backend {self.TYPE_KEY!r} "
                             f"(it has {sorted(package.backend_files)})")
        self.package = package
        self.threads = threads
        self.providers = list(providers)
        self.input_shape = tuple(package.input_spec["shape"])
        self.input_name = package.input_spec["name"]
        self.load_ms: float | None = None
        # Precision of the float layers as compiled (set by _load): the same on every CPU, or scores move.
        self.precision: str | None = None
        self.choice = "configured"  # how this backend was picked (create_recorded says)
        self._latencies: deque[float] = deque(maxlen=100)
        self._loaded = False

    @classmethod
    def available(cls) -> bool:
        """Whether the runtime imports here; a broken install (missing shared library) counts as absent."""
        try:
            importlib.import_module(cls.RUNTIME_MODULE)
        except (ImportError, OSError):
            return False
        return True

    @property
    def name(self) -> str:
        return f"{self.TYPE_KEY}:{self.package.id}"

    @property
    def timings(self) -> dict[str, float | None]:
        lat = list(self._latencies)
        return {"load_ms": self.load_ms, "last_ms": lat[-1] if lat else None,
                "median_ms": statistics.median(lat) if lat else None}

    def load(self) -> None:
        start = time.perf_counter()
        self._load()
        self._loaded = True
        self.load_ms = (time.perf_counter() - start) * 1000
        log.info("%s loaded in %.0f ms", self.name, self.load_ms)

    def warmup(self, n: int = 3) -> None:
        """Run `n` predictions on a synthetic image; a model whose output fails the checks fails here."""
        tensor = ramp_tensor(self.input_shape)
        for _ in range(n):
            self.predict(tensor)

    def predict(self, tensor: np.ndarray) -> np.ndarray:
        """Probabilities, shape (n_labels,), float64, in manifest label order."""
        if not self._loaded:
            raise InferenceError(f"{self.name}: predict before load")
        if not isinstance(tensor, np.ndarray) or tensor.dtype != np.float32 or tensor.shape != self.input_shape:
            got = (getattr(tensor, "shape", None), getattr(tensor, "dtype", type(tensor).__name__))
            raise InferenceError(f"{self.name}: input must be float32 {self.input_shape}, got {got}")
        if not np.isfinite(tensor).all():
            raise InferenceError(f"{self.name}: input tensor holds NaN or infinity")
        start = time.perf_counter()
        try:
            raw = self._run(np.ascontiguousarray(tensor))
        except InferenceError:
            raise
        except Exception as err:  # runtimes raise their own (pybind) types; they all mean the same to us
            raise InferenceError(f"{self.name}: runtime failed: {err}") from err
        self._latencies.append((time.perf_counter() - start) * 1000)
        return self._postprocess(raw)

    def close(self) -> None:
        """Drop the runtime's session; the backend must be loaded again before use."""
        self._loaded = False
        self._close()

    def _postprocess(self, raw: np.ndarray) -> np.ndarray:
        n = len(self.package.labels)
        out = np.asarray(raw, dtype=np.float64)
        if out.size != n or out.shape not in ((n,), (1, n)):
            raise InferenceError(f"{self.name}: output shape {out.shape} does not match {n} labels")
        out = out.reshape(n)
        if not np.isfinite(out).all():
            raise InferenceError(f"{self.name}: output holds NaN or infinity: {out.tolist()}")
        if self.package.activation == "softmax":
            exp = np.exp(out - out.max())
            return exp / exp.sum()
        if out.min() < -_PROB_TOL or out.max() > 1 + _PROB_TOL or abs(out.sum() - 1) > 10 * _PROB_TOL:
            raise InferenceError(f"{self.name}: output is declared probabilities but is not: {out.tolist()}")
        return np.clip(out, 0.0, 1.0)

    @abstractmethod
    def _load(self) -> None:
        """Create the runtime session; raise ModelError if the model cannot be used."""

    @abstractmethod
    def _run(self, tensor: np.ndarray) -> np.ndarray:
        """Run one input through the model and return the raw output named in the manifest."""

    def _close(self) -> None:
        pass


def ramp_tensor(shape: tuple[int, ...]) -> np.ndarray:
    """A deterministic gradient in [-1, 1]: closer to a real normalised image than zeros, same every time."""
    return np.linspace(-1.0, 1.0, num=int(np.prod(shape)), dtype=np.float32).reshape(shape)
