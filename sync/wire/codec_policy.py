"""Which lossless codecs are worth trying for one instance, given the link it will travel over: shortest delivery wins.

The smallest file is not always the fastest delivery. JPEG-XL effort 7 saves another 5-15 % on smooth CR but runs
at ~3 MB/s on one core: on a 256 kbit/s GEO link with a backlog it is free (the link is busy with the studies ahead
of this one) and saves seconds; on an idle 5 Mbit/s LEO link it holds a 6 MB radiograph back for 2 s to save 0.1 s.
So every candidate after the first is tried only when the link time it is expected to save exceeds the time it
would keep the link waiting (its encode time minus the backlog already queued ahead), and a quarter of its CPU time
(the box's two cores also run triage).

Encode speeds are learnt on this box from the encodes it does (an EWMA per codec), starting from the figures of
`scripts/bench_codecs.py`; the link rate and backlog come from the uploader (`edge.uplink.linkmeter`).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

# Pixel bytes per second per core (encode plus the bit-exact verification decode), from scripts/bench_codecs.py on
# the samples (AMD EPYC AVX2 and Intel Xeon AMX both within 30 % of these): the priors until the box has measured.
PRIOR_SPEED = {"jpegls": 60e6, "jpegxl:2": 35e6, "jpegxl:7": 3e6, "htj2k": 30e6, "j2k": 12e6}
DEFAULT_SPEED = 10e6
# Expected saving of a candidate over the best found so far, as a share of that size (bench_codecs.py): effort 7
# wins 15-50 % on small 8-bit/palette images, 5-15 % on smooth CR (ratio >= 3), under 1 % on noisy CR.
SMALL_IMAGE_BYTES = 2 * 1024 * 1024
COMPRESSIBLE_RATIO = 3.0
CPU_WEIGHT = 0.25


def expected_gain(spec: str, pixel_bytes: int, best_ratio: float) -> float:
    if spec.startswith("jpegxl"):
        effort = int(spec.partition(":")[2] or 7)
        if effort >= 5:
            if pixel_bytes <= SMALL_IMAGE_BYTES:
                return 0.15
            return 0.08 if best_ratio >= COMPRESSIBLE_RATIO else 0.005
        return 0.05 if best_ratio < 1.5 else 0.02  # effort 2 vs JPEG-LS: far better on 8-bit RGB, ~2 % on grey
    return 0.02


@dataclass(frozen=True)
class Link:
    """What the uploader knows when a study is packed: the uplink's rate and the bytes already queued ahead."""

    bytes_per_s: float
    backlog_bytes: int = 0

    @property
    def backlog_s(self) -> float:
        return self.backlog_bytes / self.bytes_per_s if self.bytes_per_s > 0 else 0.0


class SpeedBook:
    """Encode speed per codec on this box (EWMA of pixel bytes / wall second); thread-safe."""

    def __init__(self, prior: dict[str, float] | None = None, alpha: float = 0.3):
        self._speed = dict(PRIOR_SPEED if prior is None else prior)
        self._alpha = alpha
        self._lock = threading.Lock()

    def speed(self, spec: str) -> float:
        with self._lock:
            return self._speed.get(spec, DEFAULT_SPEED)

    def record(self, spec: str, pixel_bytes: int, seconds: float) -> None:
        if pixel_bytes < 64 * 1024 or seconds <= 0:
            return  # tiny images are dominated by fixed costs and would skew the estimate
        measured = pixel_bytes / seconds
        with self._lock:
            old = self._speed.get(spec)
            self._speed[spec] = measured if old is None else (1 - self._alpha) * old + self._alpha * measured


SPEEDS = SpeedBook()


@dataclass(frozen=True)
class Verdict:
    try_it: bool
    saving_s: float
    cost_s: float

    def __str__(self) -> str:
        return f"{'try' if self.try_it else 'skip'}: saves ~{self.saving_s:.2f} s, costs ~{self.cost_s:.2f} s"


def worth_trying(spec: str, *, pixel_bytes: int, best_bytes: int, best_ratio: float, link: Link,
                 speeds: SpeedBook = SPEEDS) -> Verdict:
    """Whether encoding `pixel_bytes` with `spec` should shorten this instance's delivery over `link`."""
    encode_s = pixel_bytes / max(speeds.speed(spec), 1.0)
    saving_s = best_bytes * expected_gain(spec, pixel_bytes, best_ratio) / max(link.bytes_per_s, 1.0)
    cost_s = max(max(0.0, encode_s - link.backlog_s), CPU_WEIGHT * encode_s)
    return Verdict(saving_s > cost_s, saving_s, cost_s)
