#!/usr/bin/env python3
"""Chaos run: kill -9 box, broker and hub at random while studies flow, then count what was lost, doubled or changed.

A real Mosquitto (persistence on unless --no-persistence), `wasla-hub run` and `wasla run` as subprocesses. Studies
(small synthetic CRs) go in by dcmtk storescu, `wasla ingest` and the watch folder; each sender retries until the
box acknowledges, as a modality would. A chaos thread SIGKILLs one or two of the three processes at random and
restarts them; a few radiologist reads go back with `wasla-hub read` meanwhile. After a settle time it counts:
lost (acknowledged to the sender, not at the hub), duplicated (two hub files for one SOP instance), corrupted (hub
file not the sha256 its row records, or pixels not bit-exact with what was sent; box spool file likewise), stuck
(not `acknowledged` on the box) and reads not delivered exactly once. Then a disk-full phase puts box and hub data on
small tmpfs mounts and fills each while studies flow, holds, frees it and checks that everything recovers.

    sudo .venv/bin/python scripts/chaos.py                  # ~3-4 min: 40 studies, 90 s of chaos, disk-full phase
    .venv/bin/python scripts/chaos.py --studies 10 --seconds 30 --no-disk-full

Exit status 0 only when every count is 0.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DISK_SIGNS = re.compile(r"disk full|no space left|database or disk is full|disk i/o error|Traceback", re.I)


sys.path.insert(0, str(Path(__file__).resolve().parent))
from chaos_census import (ROUTES, _query, _route_counts, broker_persistence, census,  # noqa: E402,F401 - beside this
                          failures, print_table, read_census, wait_settled)


def _helpers():
    """The repo and its tests/ helpers on sys.path, imported only when a run starts (importing this has no effect)."""
    for p in (str(REPO), str(REPO / "tests")):
        if p not in sys.path:
            sys.path.insert(0, p)
    import boxproc
    import test_sync_support

    return boxproc, test_sync_support


# --- processes --------------------------------------------------------------------------------------------------

class Daemon:
    """One `wasla run` or `wasla-hub run` subprocess that may be SIGKILLed and started again on the same config."""

    def __init__(self, name: str, argv: list[str], log_path: Path, ready):
        self.name, self.argv, self.log_path, self._ready = name, argv, log_path, ready
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.mark = self.log_path.stat().st_size
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        log.close()
        self.starts += 1
        self._ready(self)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, like harness.Mosquitto.kill()."""
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        from harness import stop_process

        stop_process(self.proc, timeout=30)

    def log_since(self, offset: int = 0) -> str:
        with open(self.log_path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", "replace")


def _hub_ready(d: Daemon) -> None:
    from harness import wait_until

    # The hub has no port of its own: it is up once it logged its start (connected or not: the broker may be down).
    wait_until(lambda: not d.alive() or "hub receiver" in d.log_since(d.mark), timeout=60, interval=0.1,
               what="hub start")
    if not d.alive():
        raise RuntimeError(f"hub exited with {d.proc.returncode} at start")


def _hub_reserve() -> str:
    """The hub's disk reserve as small as the box's (16 MB): its default (1 GiB) exceeds the disk-full phase's
    tmpfs, and the hub would pause receiving from its first message on. Only where this hub has the key."""
    from dataclasses import fields

    from sync.hub.config import HubReceiverConfig

    return "min_free_mb = 16\n" if "min_free_mb" in {f.name for f in fields(HubReceiverConfig)} else ""


def _broker_class():
    import harness

    class Broker(harness.Mosquitto):
        """harness.Mosquitto (which persists, as root too), or the same broker with persistence off."""

        def __init__(self, workdir: Path, persistence: bool):
            super().__init__(workdir)
            self.persistence = persistence

        def write_conf(self) -> Path:
            conf = super().write_conf()
            if not self.persistence:
                conf.write_text(conf.read_text().replace("persistence true", "persistence false"))
            return conf

        def alive(self) -> bool:
            return self.proc is not None and self.proc.poll() is None

    return Broker


class Rig:
    """Broker, hub and box on their own ports and folders under `root`; box data in root/data, hub data in root/hub."""

    def __init__(self, root: Path, *, persistence: bool = True):
        boxproc, _ = _helpers()
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.broker = _broker_class()(root / "mqtt", persistence)
        self.hub_data, self.box_data, self.watch_dir = root / "hub", root / "data", root / "watch"
        for d in (self.hub_data, self.box_data, self.watch_dir):
            d.mkdir(exist_ok=True)
        self.hub_cfg = root / "hub.toml"
        self.hub_cfg.write_text(f'[hub]\nid = "chaos-hub"\ndata_dir = "{self.hub_data}"\n[broker]\n'
                                f'port = {self.broker.port}\nkeepalive_seconds = 10\n'
                                # A read the broker dropped (killed before its autosave) goes out again soon.
                                '[receiver]\nread_resend_seconds = 10\n' + _hub_reserve())
        models_dir, pub = boxproc.tiny_models(root)
        extra = ('enabled = true\nchunk_bytes = 16384\nmax_inflight_bytes = 65536\nack_timeout_seconds = 5.0\n'
                 'heartbeat_seconds = 5.0\nkeepalive_seconds = 10\ncodecs = ["jpegls"]\n'
                 f'[watch]\nenabled = true\ndir = "{self.watch_dir}"\npoll_seconds = 0.5\nsettle_seconds = 1.0\n')
        self.box_cfg = boxproc.write_box_config(root, models_dir=models_dir, trusted=pub,
                                                broker_port=self.broker.port, extra=extra)
        self.dicom_port = next(int(l.split("=")[1]) for l in self.box_cfg.read_text().splitlines()
                               if l.startswith("port"))
        self.box_db = self.box_data / "wasla.db"
        py = sys.executable
        self.hub = Daemon("hub", [py, "-m", "sync.hub.cli", "--config", str(self.hub_cfg), "run"], root / "hub.log",
                          _hub_ready)
        self.box = Daemon("box", [py, "-m", "edge.cli", "--config", str(self.box_cfg), "run"], root / "box.log",
                          self._box_ready)

    def _box_ready(self, d: Daemon) -> None:
        from harness import wait_for_port

        wait_for_port(self.dicom_port, proc=d.proc, timeout=90)

    def start(self) -> "Rig":
        self.broker.start()
        self.hub.start()
        self.box.start()
        return self

    def stop(self) -> None:
        for part in (self.box, self.hub, self.broker):
            try:
                part.stop()
            except Exception as err:  # noqa: BLE001 - stop the others anyway
                print(f"[chaos] stopping {part}: {err}", file=sys.stderr)

    def ensure_up(self) -> list[str]:
        """Start whatever is down; names of the parts that were found dead."""
        dead = []
        if not self.broker.alive():
            dead.append("broker")
            self.broker.start()
        for d in (self.hub, self.box):
            if not d.alive():
                dead.append(f"{d.name} (exit {d.proc.returncode if d.proc else '?'})")
                d.start()
        return dead

    def wasla(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edge.cli", "--lang", "en", "--config", str(self.box_cfg), *args],
                              capture_output=True, text=True, cwd=REPO, timeout=timeout)

    def wasla_hub(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "sync.hub.cli", "--lang", "en", "--config", str(self.hub_cfg),
                               *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)


# --- studies and senders ----------------------------------------------------------------------------------------

@dataclass
class Item:
    path: Path
    sop: str
    study: str
    route: str
    acked: bool = False
    dropped: bool = False
    next_try: float = 0.0
    outcomes: collections.Counter = field(default_factory=collections.Counter)


def make_studies(folder: Path, n: int, seed: int, rng: random.Random, offset: int = 0) -> list[list[Item]]:
    _, support = _helpers()
    import pydicom

    studies = []
    for s in range(n):
        route = ROUTES[(s + offset) % len(ROUTES)]
        study_uid = pydicom.uid.generate_uid()
        items = []
        for i in range(rng.randint(1, 3)):
            path = support.make_cr(folder / f"s{s + offset:03d}-{i}.dcm", study_uid=study_uid,
                                   seed=seed * 100_000 + (s + offset) * 10 + i, side=rng.choice((96, 128, 160)))
            sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            items.append(Item(path, sop, study_uid, route))
        studies.append(items)
    return studies


_STORE_RESPONSE = re.compile(r"Received Store Response \(([^)]*)\)")


class Sender:
    """Sends items when released and retries every one not yet acknowledged by the box, until told to stop."""

    def __init__(self, rig: Rig):
        self.rig = rig
        self.items: list[Item] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="sender", daemon=True)
        self.window: collections.Counter | None = None  # outcomes recorded while set (the disk-full hold)

    def release(self, items: list[Item]) -> None:
        with self.lock:
            self.items.extend(items)

    def pending(self) -> list[Item]:
        with self.lock:
            return [i for i in self.items if not i.acked]

    def _note(self, item: Item, outcome: str) -> None:
        item.outcomes[outcome] += 1
        if self.window is not None:
            self.window[f"{item.route}: {outcome}"] += 1

    def _loop(self) -> None:
        while not self.stop.is_set():
            now = time.monotonic()
            for item in self.pending():
                if self.stop.is_set():
                    return
                if item.next_try > now:
                    continue
                try:
                    self._try(item)
                except Exception as err:  # noqa: BLE001 - a sender error is an outcome, never the end of the run
                    self._note(item, f"sender error {type(err).__name__}")
                item.next_try = time.monotonic() + (0.3 if item.route == "watch" else 1.0)
            self.stop.wait(0.2)

    def _try(self, item: Item) -> None:
        if item.route == "scp":
            out = subprocess.run(["storescu", "-v", "-aet", "MODALITY", "-aec", "WASLA", "127.0.0.1",
                                  str(self.rig.dicom_port), str(item.path)], capture_output=True, text=True, timeout=60)
            found = _STORE_RESPONSE.findall(out.stdout + out.stderr)
            status = found[-1] if found else ("no association" if out.returncode else "no response")
            item.acked = status == "Success"
            self._note(item, status)
        elif item.route == "cli":
            out = self.rig.wasla("ingest", "--json", str(item.path))
            try:
                status = json.loads(out.stdout)["files"][0]["status"]
            except (ValueError, KeyError, IndexError):
                last = (out.stderr.strip().splitlines() or ["?"])[-1][:80]
                status = f"exit {out.returncode}: {last}"
            item.acked = status in ("stored", "duplicate")
            self._note(item, status)
        else:
            dest = self.rig.watch_dir / f"{item.sop}.dcm"
            if not item.dropped:
                tmp = self.rig.watch_dir / f".{item.sop}.tmp"  # dot files are skipped until the rename
                shutil.copyfile(item.path, tmp)
                os.replace(tmp, dest)
                item.dropped = True
                self._note(item, "dropped")
            elif not dest.exists():
                item.acked = True  # the box deletes a dropped file only once its row is committed
                self._note(item, "taken")


# --- chaos ------------------------------------------------------------------------------------------------------

class Chaos:
    """SIGKILLs one, sometimes two, of box, broker and hub every few seconds and starts them again."""

    def __init__(self, rig: Rig, rng: random.Random, until: float):
        self.rig, self.rng, self.until = rig, rng, until
        self.kills = collections.Counter()
        self.doubles = 0
        self.restart_errors: list[str] = []
        self.thread = threading.Thread(target=self._loop, name="chaos", daemon=True)

    def _loop(self) -> None:
        parts = {"box": self.rig.box, "broker": self.rig.broker, "hub": self.rig.hub}
        while time.monotonic() < self.until:
            time.sleep(self.rng.uniform(1.5, 6.0))
            if time.monotonic() >= self.until:
                break
            names = self.rng.sample(sorted(parts), 2) if self.rng.random() < 0.2 else [self.rng.choice(sorted(parts))]
            self.doubles += len(names) == 2
            for n in names:
                parts[n].kill()
                self.kills[n] += 1
            time.sleep(self.rng.uniform(0.2, 3.0))
            for n in names:
                for attempt in range(3):
                    try:
                        parts[n].start()
                        break
                    except Exception as err:  # noqa: BLE001 - reported, and tried again
                        self.restart_errors.append(f"{n}: {err}")
                        time.sleep(2)


def _send_reads(rig: Rig, rng: random.Random, n: int, until: float, done: list[str]) -> None:
    """`wasla-hub read` for up to n studies the hub holds, at random moments of the chaos window."""
    while len(done) < n and time.monotonic() < until:
        time.sleep(rng.uniform(2.0, 6.0))
        rows = _query(rig.hub_data / "hub.db", "SELECT study_uid FROM studies WHERE n_instances > 0 "
                                               "AND read_disposition IS NULL")
        if not rows:
            continue
        study = rng.choice(rows)["study_uid"]
        out = rig.wasla_hub("read", study, "--disposition", "abnormal", "--note", f"chaos read {len(done)}",
                            "--by", "chaos", "--timeout", "5")
        if out.returncode == 0:
            done.append(study)


# --- the census -------------------------------------------------------------------------------------------------

def chaos_run(args, work: Path, rng: random.Random) -> bool:
    rig = Rig(work / "chaos", persistence=not args.no_persistence)
    studies = make_studies(work / "chaos" / "in", args.studies, args.seed, rng)
    items = [i for s in studies for i in s]
    print(f"[chaos] {len(studies)} studies / {len(items)} instances ({_route_counts(items)}); work {rig.root}")
    rig.start()
    sender = Sender(rig)
    try:
        t0 = time.monotonic()
        until = t0 + args.seconds
        chaos = Chaos(rig, rng, until)
        reads: list[str] = []
        reader = threading.Thread(target=_send_reads, args=(rig, rng, args.reads, until, reads), daemon=True)
        sender.thread.start()
        chaos.thread.start()
        reader.start()
        # Studies are released over the first 70 % of the window, so kills land during ingest and sync alike.
        for n, study in enumerate(studies):
            sender.release(study)
            time.sleep(max(0.0, t0 + (n + 1) * 0.7 * args.seconds / len(studies) - time.monotonic()))
        chaos.thread.join()
        reader.join()
        dead = rig.ensure_up()
        print(f"[chaos] chaos over after {time.monotonic() - t0:.0f} s: kills {dict(chaos.kills)} "
              f"({chaos.doubles} times two at once); reads sent {len(reads)}; found dead at the end: {dead or 'none'}")
        # Fewer reads than asked for when few studies reached the hub during chaos: top up now.
        _send_reads(rig, rng, args.reads, time.monotonic() + 30, reads)
        took = wait_settled(rig, sender, len(reads), args.settle)
        print(f"[chaos] settled in {took:.0f} s" if took >= 0 else f"[chaos] NOT settled after {args.settle:.0f} s")
    finally:
        sender.stop.set()
        rig.stop()
    c, r = census(rig, items), read_census(rig)
    fails = failures(c, r)
    rows: dict[str, int | str] = {
        "studies / instances sent": f"{len(studies)}/{len(items)}",
        "acknowledged to sender": c["acked"],
        "SIGKILLs box / broker / hub": f"{chaos.kills['box']}/{chaos.kills['broker']}/{chaos.kills['hub']}",
        "  of them two at once": chaos.doubles,
        "restart errors": len(chaos.restart_errors),
        "radiologist reads sent": r["reads"], **fails}
    print_table(f"Chaos: {args.seconds:.0f} s, seed {args.seed}, broker persistence {broker_persistence(rig)}", rows)
    print(f"box states: {dict(c['box_states'])}")
    for err in chaos.restart_errors[:5]:
        print(f"  restart error: {err}")
    for k in ("lost", "duplicated", "corrupted", "stuck", "not_accepted"):
        if c[k]:
            print(f"  {k}: {c[k][:5]}{' ...' if len(c[k]) > 5 else ''}")
    return not any(fails.values()) and not chaos.restart_errors


# --- the disk-full phase ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=40, help="Studies to send during chaos (1-3 instances each).")
    ap.add_argument("--seconds", type=float, default=90, help="Length of the chaos window.")
    ap.add_argument("--seed", type=int, default=1, help="Seed of the kills, the studies and their routes.")
    ap.add_argument("--work", type=Path, help="Working folder (kept); default a temporary one, removed if all is 0.")
    ap.add_argument("--no-persistence", action="store_true", help="Run Mosquitto with persistence false.")
    ap.add_argument("--reads", type=int, default=5, help="Radiologist reads sent with wasla-hub read during chaos.")
    ap.add_argument("--settle", type=float, default=150, help="Seconds allowed to settle after chaos / a full disk.")
    ap.add_argument("--disk-full", dest="disk_full", action=argparse.BooleanOptionalAction, default=True,
                    help="Run the disk-full phase after the chaos run (needs root for tmpfs mounts).")
    ap.add_argument("--no-chaos", action="store_true", help="Skip the kill -9 run (only the disk-full phase).")
    ap.add_argument("--tmpfs-mb", type=int, default=96, help="Size of each tmpfs of the disk-full phase.")
    ap.add_argument("--hold", type=float, default=20, help="Seconds each disk stays full.")
    ap.add_argument("--recover", type=float, default=60, help="Seconds allowed to recover once a full disk is freed.")
    ap.add_argument("--full-studies", type=int, default=5, help="Studies sent around each full disk.")
    args = ap.parse_args(argv)
    _helpers()
    from edge import cpuinfo

    work = args.work or Path(tempfile.mkdtemp(prefix="wasla-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    print(f"[chaos] CPU {cpuinfo.describe()}; work folder {work}")
    t0 = time.monotonic()
    ok = True
    if not args.no_chaos:
        ok = chaos_run(args, work, rng) and ok
    if args.disk_full:
        from chaos_disk import disk_full_run

        ok = disk_full_run(args, work, rng) and ok
    print(f"\n[chaos] {'PASS: every count is 0' if ok else 'FAIL'} ({time.monotonic() - t0:.0f} s in all)")
    if ok and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    elif not ok:
        print(f"[chaos] logs kept in {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
