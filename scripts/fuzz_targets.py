"""Fuzz targets (box reader, hub decoder, wire decoder), the worker process that runs them under a time and memory
limit, and the loop that feeds it mutated cases and keeps the crashes."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGETS = ("dicom", "hub", "wire")
MEMORY_LIMIT = 1536 * 2**20
CASE_SECONDS = 10.0
# A case slower than this is reported (not a crash): the box must not spend seconds on one file's header.
SLOW_SECONDS = 3.0
_FRAME = struct.Struct(">I")


# --- targets: run inside the worker ------------------------------------------------------------------------------
# Each returns an outcome string on the documented paths (stored, quarantined with a reason, refused as a protocol
# error); anything else it lets escape is a crash.

class Crash(Exception):
    """A documented outcome that still breaks a rule (a reason quoting a patient identifier, an unbounded result)."""


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        try:
            self.lines.append(record.getMessage())
        except Exception:  # noqa: BLE001 - a record that cannot format is no evidence either way
            pass


_CAPTURE = _Capture()


def _check_secrets(texts, secrets) -> None:
    for text in texts:
        for secret in secrets:
            if secret and secret in str(text):
                raise Crash(f"a patient identifier appears in a reason or log line: {str(text)[:120]!r}")


def _box(data: bytes, tmp: Path, secrets) -> str:
    """What the box does with a file from the watch folder or a C-STORE: ingest's judgement, then the triage
    worker's read/route/render/tensor, then the uploader's re-encode, then the hub's decode of what it sent."""
    import pydicom

    from edge import imaging, ingest, routing
    from edge.config import StorageConfig
    from sync.core.errors import BadInputError, WaslaError
    from sync.wire import codecs
    from sync.wire import limits as wire_limits

    limits = StorageConfig()
    path = tmp / "case.dcm"
    path.write_bytes(data)
    meta, bad = ingest._judge(path, limits.max_pixels, limits.max_file_mb * 1_000_000, strict=True)
    if bad is not None:
        _check_secrets([bad], secrets)
        return f"quarantined at ingest ({type(bad).__name__})"
    stage = "triage"
    try:
        # edge.engine.triage_file: any failure to read is bad input; routing and rendering must raise only ours.
        try:
            ds = pydicom.dcmread(path)
        except Exception as err:  # noqa: BLE001 - the engine maps every read failure to BadInputError
            raise BadInputError(f"cannot read DICOM: {type(err).__name__}") from err
        if not wire_limits.is_non_image(ds.get("SOPClassUID")):
            routing.instance_attrs(ds)
            wire_limits.check_header(ds, limits.max_pixels)
            spec = imaging.InputSpec(shape=(1, 3, 224, 224))
            for frame in imaging.render(ds, min_side=224, frames="middle", max_pixels=limits.max_pixels):
                imaging.to_tensor(frame, spec)
        stage = "upload"
        enc = codecs.encode_for_wire(path, frames_limit=64)
        stage = "hub"
        codecs.decode_wire(enc.data)
    except WaslaError as err:
        _check_secrets([err], secrets)
        return f"stored, refused at {stage} ({type(err).__name__})"
    return "stored and sent"


def _hub(data: bytes, secrets) -> str:
    from sync.core.errors import BadInputError
    from sync.wire import codecs

    try:
        codecs.decode_wire(data)
    except BadInputError as err:
        _check_secrets([err], secrets)
        return f"refused ({type(err).__name__})"
    return "decoded"


# Chunk indices an ack may name: from_ranges expands them into a set on the box's MQTT thread.
MAX_ACK_INDICES = 10_000_000


def _wire(topic: str, payload: bytes) -> str:
    from sync.core.errors import ProtocolError
    from sync.wire import protocol

    direction = "down" if "/down/" in topic else "up"
    try:
        msg = protocol.decode(topic, payload, direction=direction, max_bytes=8 * 2**20)
    except ProtocolError:
        return "refused"
    if msg.kind == "ack":
        # What the uploader does with a partial ack: the ranges must be bounded before they are expanded.
        ranges = msg.get("have", [])
        total = sum(b - a + 1 for a, b in ranges)
        if total > MAX_ACK_INDICES:
            raise Crash(f"ack accepted with ranges covering {total} chunk indices (memory bomb on the box)")
        protocol.from_ranges(ranges)
    return f"accepted {msg.kind}"


def _selftest(what: str) -> str:
    """Failures the harness itself must catch (tests/test_fuzz.py): a hang, a blow-up, a native crash, a stray raise."""
    if what == "hang":
        time.sleep(3600)
    elif what == "memory":
        bytearray(4 * 2**30)
    elif what == "die":
        os.abort()
    elif what == "raise":
        raise KeyError("stray")
    return "fine"


def run_case(target: str, case: dict, tmp: Path) -> dict:
    """One case, classified: ok (a documented outcome) or crash (with a signature to group it by)."""
    _CAPTURE.lines.clear()
    t0 = time.perf_counter()
    secrets = case.get("secrets", ())
    try:
        if target == "dicom":
            outcome = _box(case["data"], tmp, secrets)
        elif target == "hub":
            outcome = _hub(case["data"], secrets)
        elif target == "selftest":
            outcome = _selftest(case["data"])
        else:
            outcome = _wire(case["topic"], case["data"])
        _check_secrets(_CAPTURE.lines, secrets)
        return {"status": "ok", "outcome": outcome, "seconds": time.perf_counter() - t0}
    except BaseException as err:  # noqa: BLE001 - classifying every escape is the point
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        tb = traceback.extract_tb(err.__traceback__)
        ours = [f for f in tb if "/edge/" in f.filename or "/sync/" in f.filename] or tb[-1:]
        where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
        kind = str(err) if isinstance(err, Crash) else type(err).__name__
        return {"status": "crash", "signature": f"{target}: {kind} at {where}"[:300],
                "detail": "".join(traceback.format_exception(err))[-6000:], "seconds": time.perf_counter() - t0}


def serve() -> None:
    """The worker: limits itself, imports the targets once, then answers framed pickled cases on stdin."""
    import resource
    import warnings

    limit = int(os.environ.get("WASLA_FUZZ_MEMORY", MEMORY_LIMIT))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a library that prints must not corrupt the frames
    warnings.simplefilter("ignore")
    logging.getLogger().addHandler(_CAPTURE)
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    import importlib

    for module in ("pydicom", "edge.imaging", "edge.ingest", "edge.routing", "sync.wire.codecs", "sync.wire.protocol"):
        importlib.import_module(module)  # the worker's start-up cost, paid once, not by its first case

    tmp = Path(tempfile.mkdtemp(prefix="wasla-fuzz-"))
    _send(out, {"status": "ready"})
    inp = sys.stdin.buffer
    while True:
        head = inp.read(_FRAME.size)
        if len(head) < _FRAME.size:
            break
        target, case = pickle.loads(inp.read(_FRAME.unpack(head)[0]))
        _send(out, run_case(target, case, tmp))


def _send(out, obj) -> None:
    raw = pickle.dumps(obj)
    out.write(_FRAME.pack(len(raw)) + raw)
    out.flush()


# --- the parent side ---------------------------------------------------------------------------------------------

class Worker:
    """A worker process; a case past its time limit kills it (and the next case gets a fresh one)."""

    def __init__(self, memory: int = MEMORY_LIMIT):
        self.memory = memory
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        env = {**os.environ, "WASLA_FUZZ_MEMORY": str(self.memory), "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2",
               "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "scripts"), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, "-c", "import fuzz_targets; fuzz_targets.serve()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     cwd=REPO, env=env, start_new_session=True)
        self.starts += 1
        ready = self._receive(120.0)
        if not ready or ready.get("status") != "ready":
            raise RuntimeError("fuzz worker did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only the worker and what it started
            self.proc.wait()
        self.proc = None

    def _receive(self, timeout: float) -> dict | None:
        fd, buf, need, deadline = self.proc.stdout.fileno(), b"", _FRAME.size, time.monotonic() + timeout
        size = None
        while len(buf) < need:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, max(need - len(buf), 1 << 16))
            if not chunk:
                raise EOFError
            buf += chunk
            if size is None and len(buf) >= _FRAME.size:
                size = _FRAME.unpack(buf[:_FRAME.size])[0]
                need = _FRAME.size + size
        return pickle.loads(buf[_FRAME.size:need])

    def run(self, target: str, case: dict, timeout: float) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        raw = pickle.dumps((target, case))
        t0 = time.perf_counter()
        try:
            self.proc.stdin.write(_FRAME.pack(len(raw)) + raw)
            self.proc.stdin.flush()
            result = self._receive(timeout)
        except (EOFError, BrokenPipeError):
            code = self.proc.wait()
            self.proc = None
            why = f"signal {-code}" if code < 0 else f"exit {code}"
            return {"status": "crash", "signature": f"{target}: worker died ({why}; memory limit or native crash)",
                    "detail": "", "seconds": time.perf_counter() - t0}
        if result is None:
            self.stop()
            return {"status": "crash", "signature": f"{target}: hang (over {timeout:.0f} s)", "detail": "",
                    "seconds": time.perf_counter() - t0}
        return result


@dataclass
class Report:
    cases: Counter = field(default_factory=Counter)
    outcomes: dict = field(default_factory=dict)
    crashes: dict = field(default_factory=dict)  # signature -> {"count", "reproducer", "detail", "mutation"}
    slow: list = field(default_factory=list)
    seconds: Counter = field(default_factory=Counter)
    worker_starts: int = 0

    def summary(self) -> str:
        lines = []
        for target in TARGETS:
            if self.cases[target]:
                top = Counter(self.outcomes.get(target, {})).most_common(6)
                lines.append(f"{target:6} {self.cases[target]:7d} cases in {self.seconds[target]:6.1f} s; "
                             + ", ".join(f"{k}: {v}" for k, v in top))
        lines.append(f"crashes: {len(self.crashes)} distinct, {sum(c['count'] for c in self.crashes.values())} cases")
        for sig, c in sorted(self.crashes.items()):
            lines.append(f"  {c['count']:5d}x {sig}  [{c['mutation']}] -> {c.get('reproducer') or '-'}")
        if self.slow:
            lines.append(f"slow cases (> {SLOW_SECONDS:.0f} s, not crashes): {len(self.slow)}; slowest "
                         + ", ".join(f"{t} {s:.1f} s [{m}]" for s, t, m in sorted(self.slow, reverse=True)[:5]))
        return "\n".join(lines)


def _save(out_dir: Path | None, target: str, case: dict, result: dict, mutation: str) -> str | None:
    if out_dir is None:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha1(result["signature"].encode()).hexdigest()[:12]
    stem = out_dir / f"{target}-{key}"
    stem.with_suffix(".bin").write_bytes(case["data"])
    stem.with_suffix(".json").write_text(json.dumps({
        "target": target, "topic": case.get("topic"), "secrets": list(case.get("secrets", ())),
        "mutation": mutation, "signature": result["signature"], "detail": result.get("detail", "")}, indent=1))
    return str(stem.with_suffix(".bin"))


def fuzz(seconds: float, seed: int, *, targets=TARGETS, out_dir: Path | None = None, timeout: float = CASE_SECONDS,
         memory: int = MEMORY_LIMIT, progress=None, max_cases: int | None = None) -> Report:
    """Mutate seeds for `seconds`, sharing the time equally between `targets`; every crash is kept once per
    signature (reproducer under `out_dir`). Deterministic for a seed, up to how many cases fit in the time."""
    import fuzz_seeds
    import fuzz_wire
    import fuzzlib

    import warnings

    warnings.simplefilter("ignore")  # the mutators parse broken files with pydicom, which warns on each
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    rng = random.Random(seed)
    dicom_seeds = fuzz_seeds.dicom_seeds()
    hub_seeds = dicom_seeds + fuzz_seeds.wire_encoded(dicom_seeds)
    wire_seeds = fuzz_wire.wire_seeds()
    dmut, wmut = fuzzlib.DicomMutator(rng), fuzz_wire.WireMutator(rng)
    report, worker = Report(), Worker(memory)
    deadline = time.monotonic() + seconds
    # Every seed once, unmutated, first: the corpus itself must pass.
    queue = [("dicom", {"data": s.data, "secrets": s.secrets}, f"seed {s.name}") for s in dicom_seeds]
    queue += [("wire", {"topic": t, "data": p}, f"seed {n}") for n, t, p in wire_seeds]
    last = time.monotonic()
    try:
        while time.monotonic() < deadline and (max_cases is None or sum(report.cases.values()) < max_cases):
            t0 = time.monotonic()
            if queue:
                target, case, mutation = queue.pop(0)
            else:
                target = min(targets, key=lambda t: report.seconds[t])
                if target == "wire":
                    name, topic, payload = rng.choice(wire_seeds)
                    mutation, topic, payload = wmut.mutate(topic, payload)
                    case = {"topic": topic, "data": payload}
                else:
                    s = rng.choice(dicom_seeds if target == "dicom" else hub_seeds)
                    mutation, data = dmut.mutate(s.data)
                    case = {"data": data, "secrets": s.secrets}
                    mutation = f"{s.name}: {mutation}"
            if target not in targets:
                continue
            result = worker.run(target, case, timeout)
            report.cases[target] += 1
            report.seconds[target] += time.monotonic() - t0  # wall time: mutation, the case, worker restarts
            if result["status"] == "ok":
                outcomes = report.outcomes.setdefault(target, Counter())
                outcomes[result["outcome"]] += 1
                if result["seconds"] > SLOW_SECONDS:
                    report.slow.append((result["seconds"], target, mutation))
            else:
                entry = report.crashes.setdefault(result["signature"], {"count": 0, "mutation": mutation,
                                                                        "detail": result.get("detail", "")})
                entry["count"] += 1
                if entry["count"] == 1:
                    entry["reproducer"] = _save(out_dir, target, case, result, mutation)
            if progress is not None and time.monotonic() - last > 10:
                last = time.monotonic()
                progress(report)
    finally:
        worker.stop()
        report.worker_starts = worker.starts
    return report


def replay(path: Path, timeout: float = CASE_SECONDS) -> dict:
    """Run one saved reproducer (the .bin next to its .json) in a fresh worker."""
    info = json.loads(path.with_suffix(".json").read_text())
    case = {"data": path.with_suffix(".bin").read_bytes(), "topic": info.get("topic"),
            "secrets": tuple(info.get("secrets", ()))}
    worker = Worker()
    try:
        return worker.run(info["target"], case, timeout)
    finally:
        worker.stop()
