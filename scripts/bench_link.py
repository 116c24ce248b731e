#!/usr/bin/env python3
"""Wasla sync over the emulated link, end to end, against the issue's goals.

    sudo .venv/bin/python scripts/bench_link.py                 # full run on GEO (~15 min)
    sudo .venv/bin/python scripts/bench_link.py --quick         # smaller studies (~5 min)
    sudo .venv/bin/python scripts/bench_link.py --set max_inflight_bytes=65536 --set socket_sndbuf_bytes=0
    sudo .venv/bin/python scripts/bench_link.py --no-link-sysctl  # without the box's TCP tuning (BBR, no timestamps)

What runs where (scripts/linkemu_lib.py makes the two namespaces and the link between them):
  hub namespace (10.77.0.2): Mosquitto (set_tcp_nodelay), `wasla-hub run`, and dcmtk storescp for the comparison;
  box namespace (10.77.0.1): `wasla run` with sync on (broker 10.77.0.2), `wasla ingest`, dcmtk storescu.

Phases, all over the same link in the same run:
  1. backlog: several studies queued at once -> goodput (study wire bytes delivered / first chunk..last ack) vs the
     link rate, and wire overhead (IP bytes the box put on the uplink / study wire bytes). While the first (big)
     study saturates the link, small bright DX "probe" studies are ingested one by one; a signed brightness test
     model (tests/modelfactory.py, routed to DX only) labels them urgent. Flag latency = hub flags.received_at -
     box instances.triaged_at (same machine, same clock).
  2. cut: the comparison study (RG1 chest CR) is sent alone and the link is cut for --cut-seconds once ~30 % of
     its chunks are at the hub; counts what was sent again and checks the transfer resumed, not restarted.
  3. C-STORE: the same study's original file by storescu -> storescp over the same link, without and with a cut.
  4. order / files (scripts/bench_link_files.py): small studies behind a large one of their band; each sample alone,
     C-STORE vs Wasla ingest -> ack; and, over the whole run, every study's flag before its first image.
Profiles: geo, geo-cuts, leo (5 Mbit/s, 40 ms), leo-handovers (0.4 s stall every 15 s), starlink, clean.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "scripts", REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import linkemu_lib as le  # noqa: E402
import bench_link_files  # noqa: E402
import bench_link_report  # noqa: E402
from bench_link_report import pct  # noqa: E402

from bench_link_lib import (BROKER_PORT, CSTORE_PORT, DEVICE, DICOM_PORT, PY, Sampler, log,  # noqa: E402,F401
                            probe_file, q, wait_until)


# --- the bench ---------------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="wasla-benchlink-"))
        self.link = le.LinkEmulator(args.profile, prefix=f"wb{os.getpid() % 100000}", seed=args.seed)
        self.box_db = self.work / "box" / "data" / "wasla.db"
        self.hub_db = self.work / "hub" / "hub.db"
        self.results: dict = {}
        self.sampler: Sampler | None = None
        self.box_proc = None

    # --- setup ---------------------------------------------------------------------------------------------------
    def ns_wait_port(self, side: str, host: str, port: int, timeout: float = 60) -> None:
        code = ("import socket,sys,time\nd=time.time()+%f\nwhile time.time()<d:\n try:\n"
                "  socket.create_connection((%r,%d),timeout=1).close(); sys.exit(0)\n except OSError: time.sleep(0.2)\n"
                "sys.exit(1)" % (timeout, host, port))
        rc = self.link.run_in(side, [PY, "-c", code], timeout=timeout + 10).returncode
        if rc != 0:
            raise RuntimeError(f"{host}:{port} in the {side} namespace did not open within {timeout:.0f} s")

    def sync_overrides(self) -> str:
        lines = []
        keys = set()
        for kv in self.args.set or []:
            k, _, v = kv.partition("=")
            lines.append(f"{k.strip()} = {v.strip()}")
            keys.add(k.strip())
        if "link_kbps" not in keys and self.link.profile.up.rate_bps:
            # What the installer states for the terminal (a GEO VSAT or a LEO dish); the box measures it from there.
            lines.append(f"link_kbps = {self.link.profile.up.rate_bps / 1000:g}")
        return "\n".join(lines)

    def start(self) -> None:
        from modelfactory import make_tiny_package

        self.link.start()
        log(f"link {self.link.prefix} up: {self.link.profile.describe()}")
        # The box as installed: install.sh puts systemd/60-wasla-link.conf in /etc/sysctl.d. Its per-namespace keys
        # apply to the box namespace (net.core.* is host-wide and is left alone); --box-sysctl comes after them.
        shipped = [] if self.args.no_link_sysctl else [
            line.replace(" ", "") for line in (REPO / "systemd" / "60-wasla-link.conf").read_text().splitlines()
            if line.strip() and not line.startswith("#") and not line.startswith("net.core.")]
        for kv in shipped + (self.args.box_sysctl or []):
            self.link.run_in("box", ["sysctl", "-q", "-w", kv], check=True, timeout=10)
        # What the box's TCP runs with: the congestion control decides how it reacts to the link's random loss.
        self.tcp_settings = {
            key: self.link.run_in("box", ["sysctl", "-n", f"net.ipv4.{key}"], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
            for key in ("tcp_congestion_control", "tcp_timestamps", "tcp_sack")}
        self.sampler = Sampler(self.link)
        self.sampler.start()
        # Broker on the hub side of the link.
        mq = self.work / "mqtt"
        mq.mkdir()
        (mq / "mosquitto.conf").write_text(
            f"listener {BROKER_PORT} {le.HUB_IP}\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n"
            "max_queued_messages 10000\nlog_dest stdout\nlog_type all\n")
        from harness import mosquitto_binary

        self.link.popen_in("hub", [mosquitto_binary(), "-c", str(mq / "mosquitto.conf")],
                           stdout=open(mq / "mosquitto.log", "ab"), stderr=subprocess.STDOUT)
        self.ns_wait_port("hub", le.HUB_IP, BROKER_PORT, 20)
        # Hub receiver.
        hub_toml = self.hub_toml = self.work / "hub.toml"
        hub_toml.write_text(f'[hub]\nid = "bench-hub"\ndata_dir = "{self.work / "hub"}"\n'
                            f'[broker]\nhost = "{le.HUB_IP}"\nport = {BROKER_PORT}\nkeepalive_seconds = 30\n')
        self.link.popen_in("hub", [PY, "-m", "sync.hub.cli", "--config", str(hub_toml), "run"], cwd=REPO,
                           stdout=open(self.work / "hub.log", "ab"), stderr=subprocess.STDOUT)
        # Box: a signed brightness test model routed to DX only (urgent probes); the real studies (CR, US) get no
        # model, so they are all 'review' (no_model) and drain in arrival order.
        models = self.work / "models"
        _folder, pub = make_tiny_package(models, key_dir=self.work / "keys",
                                         routing=[{"Modality": ["DX"], "BodyPartExamined": ["CHEST"]}])
        self.box_toml = self.work / "box.toml"
        self.box_toml.write_text(f"""
[box]
id = "{DEVICE}"
data_dir = "{self.work / 'box' / 'data'}"
[dicom]
bind = "127.0.0.1"
port = {DICOM_PORT}
[models]
dir = "{models}"
trusted_keys = ["{pub}"]
[inference]
backend = "onnxruntime"
threads = 1
warmup = 1
[storage]
min_free_mb = 16
[sync]
enabled = true
broker_host = "{le.HUB_IP}"
broker_port = {BROKER_PORT}
{self.sync_overrides()}
""")
        self.box_proc = self.link.popen_in("box", [PY, "-m", "edge.cli", "--config", str(self.box_toml), "run"],
                                           cwd=REPO, stdout=open(self.work / "box.log", "ab"),
                                           stderr=subprocess.STDOUT)
        self.ns_wait_port("box", "127.0.0.1", DICOM_PORT, 120)
        wait_until(lambda: q(self.hub_db, "SELECT 1 FROM boxes WHERE device = ? AND online = 1", [DEVICE]),
                   60, "the box to come online at the hub")
        self.sync_cfg = self.effective_sync()
        log(f"box online at the hub; sync: chunk_bytes={self.sync_cfg.chunk_bytes} "
            f"max_inflight_bytes={self.sync_cfg.max_inflight_bytes} socket_sndbuf_bytes={self.sync_cfg.socket_sndbuf_bytes}")
        time.sleep(3)  # let the connect-time status/heartbeat/acks settle before anything is measured

    def effective_sync(self):
        from edge import config

        return config.load(self.box_toml, env={}).sync

    def stop(self) -> None:
        if self.sampler:
            self.sampler.stop_ev.set()
        if self.box_proc and self.box_proc.poll() is None:
            self.box_proc.send_signal(signal.SIGTERM)
            try:
                self.box_proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        self.link.stop()
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            log(f"work folder kept: {self.work}")

    # --- box operations ----------------------------------------------------------------------------------------
    def ingest(self, files: list[Path]) -> float:
        t = time.time()
        out = self.link.run_in("box", [PY, "-m", "edge.cli", "--config", str(self.box_toml), "ingest", *map(str, files)],
                               cwd=REPO, capture_output=True, text=True, timeout=180)
        if out.returncode != 0 or "stored %d" % len(files) not in out.stdout:
            raise RuntimeError(f"wasla ingest failed ({out.returncode}): {out.stdout} {out.stderr}")
        return t

    def sample(self, name: str, dest: Path) -> Path:
        from samples import fresh_copy, sample_path

        return fresh_copy(sample_path(name), dest)

    def study_of(self, f: Path) -> tuple[str, str]:
        import pydicom

        ds = pydicom.dcmread(f, stop_before_pixels=True)
        return str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)

    def acked(self, sops: list[str]) -> bool:
        marks = ",".join("?" * len(sops))
        n = q(self.box_db, f"SELECT COUNT(*) AS n FROM instances WHERE state = 'acknowledged' AND sop_instance_uid IN ({marks})",
              sops)
        return bool(n) and n[0]["n"] == len(sops)

    def outbox_idle(self) -> bool:
        rows = q(self.box_db, "SELECT COUNT(*) AS n FROM outbox WHERE state IN ('pending', 'confirmed')")
        return bool(rows) and rows[0]["n"] == 0

    def phase_transfers(self, since: float) -> list[dict]:
        return q(self.box_db, "SELECT * FROM outbox WHERE kind = 'transfer' AND created_at >= ? ORDER BY id", [since])

    def at_hub_bytes(self, rows: list[dict]) -> int:
        total = 0
        for r in rows:
            h = q(self.hub_db, "SELECT state FROM transfers WHERE transfer_id = ?", [r["transfer_id"]])
            if h and h[0]["state"] == "complete":
                total += r["size"]
            else:
                total += min(r["size"], self.hub_chunks(r["transfer_id"]) * r["chunk_size"])
        return total

    def transfer_row(self, sop: str) -> dict | None:
        rows = q(self.box_db, "SELECT o.* FROM outbox o JOIN instances i ON i.id = o.instance_id "
                              "WHERE o.kind = 'transfer' AND i.sop_instance_uid = ?", [sop])
        return rows[0] if rows else None

    def hub_chunks(self, tid: str) -> int:
        rows = q(self.hub_db, "SELECT COUNT(*) AS n FROM chunks WHERE transfer_id = ?", [tid])
        return rows[0]["n"] if rows else 0

    def tcp_snmp(self, side: str = "box") -> dict:
        out = self.link.run_in(side, ["cat", "/proc/net/snmp"], capture_output=True, text=True, timeout=10).stdout
        tcp = [line.split() for line in out.splitlines() if line.startswith("Tcp:")]
        return dict(zip(tcp[0][1:], map(int, tcp[1][1:]))) if len(tcp) >= 2 else {}

    def log_count(self, text: str) -> int:
        return (self.work / "box.log").read_text(errors="replace").count(text)

    # --- phase 1: backlog goodput, overhead and urgent-flag latency -----------------------------------------------
    def phase_backlog(self) -> None:
        a = self.args
        names = ["RG3_UNCR.dcm", "US1_UNCR.dcm", "RG3_UNCR.dcm"] if a.quick else ["RG1_UNCR.dcm", "RG3_UNCR.dcm", "US1_UNCR.dcm"]
        files = [self.sample(n, self.work / "in" / "backlog" / f"{i}_{n}") for i, n in enumerate(names)]
        sops = [self.study_of(f)[1] for f in files]
        log(f"phase 1: backlog of {len(files)} studies ({', '.join(names)}) + {a.probes} urgent probes")
        retrans0 = self.tcp_snmp()
        t_ingest = self.ingest(files)
        # Wait for the first study's transfer to be under way (the link saturated) before probing.
        first = wait_until(lambda: self.transfer_row(sops[0]), 120, "the first study to be queued")
        wait_until(lambda: self.hub_chunks(first["transfer_id"]) >= 2, 120, "the first chunks at the hub")
        probes = []
        for i in range(a.probes):
            t0 = time.monotonic()
            f = probe_file(self.work / "in" / "probes" / f"p{i}.dcm")
            self.ingest([f])
            probes.append(self.study_of(f))
            time.sleep(max(0.0, a.probe_every - (time.monotonic() - t0)))
        still_big = not self.acked(sops[:1])
        all_sops = sops + [s for _u, s in probes]
        big = sum(f.stat().st_size for f in files)
        wait_until(lambda: self.acked(all_sops) and self.outbox_idle(), big * 8 / 256_000 * 2 + 300,
                   "the backlog to be acknowledged", 0.5)
        retrans1 = self.tcp_snmp()
        mine = [self.transfer_row(s) for s in all_sops]
        # Every transfer this phase queued counts: the box also sends derived objects (results SR/SC) per study.
        rows = mine[:len(sops)] + [r for r in self.phase_transfers(t_ingest) if r["transfer_id"] not in
                                   {m["transfer_id"] for m in mine[:len(sops)]}]
        tids = [r["transfer_id"] for r in rows]
        marks = ",".join("?" * len(tids))
        hub_t = q(self.hub_db, f"SELECT transfer_id, created_at, completed_at, dup_chunks, retries FROM transfers "
                               f"WHERE transfer_id IN ({marks})", tids)
        # The window: first message of the phase at the hub .. last ack of the phase (the outbox drained).
        t_first = min(h["created_at"] for h in hub_t)
        t_last = max(r["done_at"] for r in rows)
        in_window = rows
        payload = sum(r["size"] for r in in_window)
        original = sum(r["original_size"] or r["size"] for r in in_window)
        chunks = sum(r["count"] for r in in_window)
        elapsed = t_last - t_first
        wire = self.sampler.between(t_first - 1.0, t_last)
        rate = self.link.profile.up.rate_bps
        goodput_bps = payload * 8 / elapsed
        # Flags: probe triaged (box) -> urgent flag received (hub).
        lat, labels = [], []
        for study, _sop in probes:
            tri = q(self.box_db, "SELECT triaged_at, label FROM instances WHERE study_uid = ?", [study])
            fl = q(self.hub_db, "SELECT received_at FROM flags WHERE study_uid = ? AND label = 'urgent'", [study])
            labels.append(tri[0]["label"] if tri else None)
            if tri and fl:
                lat.append(fl[0]["received_at"] - tri[0]["triaged_at"])
        big_row = rows[0]
        derived = [r for r in rows if r["transfer_id"] not in {m["transfer_id"] for m in mine}]
        self.results["backlog"] = dict(
            names=names, n_studies=len(files), n_probes=len(probes), payload=payload, original=original, chunks=chunks,
            elapsed=elapsed, goodput_bps=goodput_bps, ratio=goodput_bps / rate, wire_up=wire["up_in"],
            wire_up_delivered=wire["up_out"], up_pkts=wire["up_pkts"], wire_down=wire["down_in"],
            overhead=wire["up_in"] / payload - 1, latencies=lat, probe_labels=labels, probes_while_big=still_big,
            dup_chunks=sum(h["dup_chunks"] for h in hub_t), retries=sum(h["retries"] for h in hub_t),
            tcp_out=retrans1.get("OutSegs", 0) - retrans0.get("OutSegs", 0),
            tcp_retrans=retrans1.get("RetransSegs", 0) - retrans0.get("RetransSegs", 0),
            n_derived=len(derived), derived_bytes=sum(r["size"] for r in derived), big_name=names[0], big_queued_to_ack=big_row["done_at"] - big_row["created_at"],
            big_ingest_to_ack=big_row["done_at"] - t_ingest, big_size=big_row["size"],
            big_original=big_row["original_size"])
        r = self.results["backlog"]
        log(f"phase 1 done: goodput {goodput_bps / 1000:.1f} kbit/s ({r['ratio']:.2f} of link), overhead "
            f"{r['overhead'] * 100:.1f} %, flags p50 {pct(lat, 50):.2f} s p95 {pct(lat, 95):.2f} s")

    # --- phase 2: the comparison study across a cut ---------------------------------------------------------------
    def phase_cut(self) -> None:
        a = self.args
        name = "RG3_UNCR.dcm" if a.quick else "RG1_UNCR.dcm"
        f = self.sample(name, self.work / "in" / "cut" / name)
        _study, sop = self.study_of(f)
        log(f"phase 2: {name} with a {a.cut_seconds:g} s cut at ~30 % of its chunks")
        snmp0 = self.tcp_snmp()
        conn0, disc0 = self.log_count("connected to broker"), self.log_count("disconnected from broker")
        t_ingest = self.ingest([f])
        row = wait_until(lambda: self.transfer_row(sop), 120, "the study to be queued")
        tid, count, cs = row["transfer_id"], row["count"], row["chunk_size"]
        at_cut = wait_until(lambda: (lambda n: n if n >= max(1, int(count * 0.3)) else 0)(self.hub_chunks(tid)), 600,
                            "30 % of the chunks at the hub", 0.1)
        t_cut = time.time()
        self.link.set_down(True)
        time.sleep(a.cut_seconds)
        self.link.set_down(False)
        t_restore = time.time()
        at_restore = self.hub_chunks(tid)
        before_rows = self.phase_transfers(t_ingest)
        hub_bytes_at_restore = self.at_hub_bytes(before_rows)
        wait_until(lambda: self.acked([sop]) and self.outbox_idle(), row["size"] * 8 / 256_000 * 3 + 300,
                   "the cut transfer to be acknowledged", 0.5)
        snmp1 = self.tcp_snmp()
        row = self.transfer_row(sop)
        hub = q(self.hub_db, "SELECT dup_chunks, retries, created_at FROM transfers WHERE transfer_id = ?", [tid])[0]
        phase_rows = self.phase_transfers(t_ingest)
        marks = ",".join("?" * len(phase_rows))
        dups_all = q(self.hub_db, f"SELECT COALESCE(SUM(dup_chunks), 0) AS n FROM transfers WHERE transfer_id IN ({marks})",
                     [r["transfer_id"] for r in phase_rows])[0]["n"]
        after = self.sampler.between(t_restore, max(r["done_at"] for r in phase_rows))
        # Everything of this phase (the study and its derived objects) the hub did not hold at restore.
        remaining = sum(r["size"] for r in phase_rows) - hub_bytes_at_restore
        b = self.results.get("backlog")
        factor = (b["wire_up"] / b["payload"]) if b else 1.0
        self.results["cut"] = dict(
            name=name, size=row["size"], count=count, chunk_size=cs, at_cut=at_cut, at_restore=at_restore,
            cut_s=a.cut_seconds, queued_to_ack=row["done_at"] - row["created_at"], ingest_to_ack=row["done_at"] - t_ingest,
            dup_chunks=max(hub["dup_chunks"], dups_all), retries=hub["retries"], attempts=row["attempts"],
            wire_after=after["up_in"], remaining=remaining, expected_after=remaining * factor,
            excess_after=after["up_in"] - remaining * factor,
            tcp_retrans=snmp1.get("RetransSegs", 0) - snmp0.get("RetransSegs", 0),
            tcp_out=snmp1.get("OutSegs", 0) - snmp0.get("OutSegs", 0),
            reconnects=self.log_count("connected to broker") - conn0,
            disconnects=self.log_count("disconnected from broker") - disc0,
            stored=bool(q(self.hub_db, "SELECT 1 FROM instances WHERE sop_instance_uid = ?", [sop])),
            cut_at_s=t_cut - t_ingest)
        c = self.results["cut"]
        log(f"phase 2 done: {c['queued_to_ack']:.1f} s queued->ack, hub dup chunks {c['dup_chunks']}, "
            f"reconnects {c['reconnects']}, excess wire after restore {c['excess_after'] / 1024:.1f} KiB")

    # --- phase 3: DICOM C-STORE over the same link ----------------------------------------------------------------
    def phase_read(self) -> None:
        """Radiologists' reads back to the clinic: `wasla-hub read` in the hub namespace (what the web worklist's
        submit does: store, then publish at once) until the box has applied it, and until its receipt is back."""
        log("phase read: reads from the hub to the box over the link")
        studies = [r["study_uid"] for r in q(self.hub_db, "SELECT study_uid FROM studies ORDER BY first_seen")]
        if len(studies) < self.args.reads:
            files = [probe_file(self.work / "read-in" / f"r{i}.dcm") for i in range(self.args.reads - len(studies))]
            self.ingest(files)
            sops = [self.study_of(f)[1] for f in files]
            wait_until(lambda: self.acked(sops), 300, "the read phase's studies at the hub")
            studies = [r["study_uid"] for r in q(self.hub_db, "SELECT study_uid FROM studies ORDER BY first_seen")]
        to_box, receipts = [], []
        for uid in studies[: self.args.reads]:
            t0 = time.time()
            out = self.link.run_in("hub", [PY, "-m", "sync.hub.cli", "--config", str(self.hub_toml), "read", uid,
                                           "--disposition", "urgent-referral", "--note", "bench read", "--by",
                                           "bench"], cwd=REPO, capture_output=True, text=True, timeout=120)
            if out.returncode != 0:
                raise RuntimeError(f"wasla-hub read failed: {out.stderr[-300:]}")
            wait_until(lambda: (q(self.box_db, "SELECT read_disposition FROM studies WHERE study_uid = ?", [uid])
                                or [{}])[0].get("read_disposition"), 120, "the read at the box", interval=0.05)
            to_box.append(time.time() - t0)
            wait_until(lambda: (q(self.hub_db, "SELECT delivered_at FROM reads WHERE study_uid = ? ORDER BY at DESC",
                                  [uid]) or [{}])[0].get("delivered_at"), 120, "the box's receipt", interval=0.05)
            receipts.append(time.time() - t0)
        self.results["read"] = {"to_box": to_box, "receipt": receipts}

    def storescu(self, f: Path) -> list[str]:
        import pydicom

        from harness import STORESCU_PROPOSE

        ts = str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        return ["storescu", "-aet", "BOX", "-aec", "HUB", *STORESCU_PROPOSE.get(ts, []), le.HUB_IP, str(CSTORE_PORT),
                str(f)]

    def phase_cstore(self) -> None:
        a = self.args
        name = "US1_UNCR.dcm" if a.quick else "RG1_UNCR.dcm"
        out = self.work / "storescp"
        out.mkdir()
        scp = self.link.popen_in("hub", ["storescp", "-aet", "HUB", "+xa", "-od", str(out), str(CSTORE_PORT)],
                                 stdout=open(self.work / "storescp.log", "ab"), stderr=subprocess.STDOUT)
        self.ns_wait_port("hub", le.HUB_IP, CSTORE_PORT, 20)
        res = {}
        for mode in ("plain", "cut"):
            f = self.sample(name, self.work / "in" / f"cstore-{mode}" / name)
            _study, sop = self.study_of(f)
            log(f"phase 3: C-STORE {name} ({f.stat().st_size} bytes) {mode}")
            t0 = time.time()
            p = self.link.popen_in("box", self.storescu(f), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            cut_at = None
            if mode == "cut":
                plain = res["plain"]["seconds"]
                delay = 0.3 * plain
                time.sleep(delay)
                if p.poll() is None:
                    cut_at = time.time() - t0
                    self.link.set_down(True)
                    time.sleep(a.cut_seconds)
                    self.link.set_down(False)
            limit = 3 * res["plain"]["seconds"] + 300 if mode == "cut" else f.stat().st_size * 8 / 100_000 + 300
            try:
                text, _ = p.communicate(timeout=max(1.0, limit - (time.time() - t0)))
            except subprocess.TimeoutExpired:
                p.kill()
                text, _ = p.communicate()
            secs = time.time() - t0
            got = [x for x in out.rglob("*") if x.is_file() and sop in x.name]
            ok = p.returncode == 0 and bool(got) and got[0].stat().st_size >= f.stat().st_size * 0.99
            res[mode] = dict(seconds=secs, rc=p.returncode, ok=ok, size=f.stat().st_size, cut_at=cut_at,
                             tail=(text or "").strip().splitlines()[-2:])
            log(f"C-STORE {mode}: rc {p.returncode}, {'stored' if ok else 'NOT stored'} in {secs:.1f} s")
        scp.terminate()
        self.results["cstore"] = dict(name=name, **res)
        # The same study through Wasla without a cut, if phase 1 did not send it (quick mode: US1 was in the backlog).
        self.results["cstore"]["wasla_plain"] = None
        b = self.results.get("backlog")
        if b and b["big_name"] == name:
            self.results["cstore"]["wasla_plain"] = b["big_queued_to_ack"]
        else:
            f = self.sample(name, self.work / "in" / "wasla-plain" / name)
            _study, sop = self.study_of(f)
            self.ingest([f])
            wait_until(lambda: self.acked([sop]), f.stat().st_size * 8 / 100_000 + 300, "the Wasla copy", 0.5)
            r = self.transfer_row(sop)
            self.results["cstore"]["wasla_plain"] = r["done_at"] - r["created_at"]

    # --- report ----------------------------------------------------------------------------------------------------
    def report(self, started: float) -> int:
        return bench_link_report.report(self, started)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="geo", choices=list(le.PROFILES), help="link profile (default geo)")
    ap.add_argument("--quick", action="store_true", help="smaller studies (RG3/US1 instead of RG1): ~5 min")
    ap.add_argument("--phases", default="backlog,read,cut,cstore,order,files",
                    help="comma list of backlog, read, cut, cstore, order, files (scripts/bench_link_files.py)")
    ap.add_argument("--files", default="RG1_UNCR.dcm,RG3_UNCR.dcm,US1_UNCR.dcm",
                    help="samples the files phase sends alone, by C-STORE and by Wasla")
    ap.add_argument("--reads", type=int, default=5, help="reads sent back in the read phase")
    ap.add_argument("--set", action="append", metavar="KEY=TOML",
                    help="a [sync] override in the box config, e.g. --set max_inflight_bytes=65536 (repeatable)")
    ap.add_argument("--no-link-sysctl", action="store_true",
                    help="do not apply systemd/60-wasla-link.conf (BBR, no timestamps) to the box namespace")
    ap.add_argument("--box-sysctl", action="append", metavar="KEY=VAL",
                    help="a sysctl for the box namespace, e.g. net.ipv4.tcp_congestion_control=cubic (repeatable)")
    ap.add_argument("--probes", type=int, default=12, help="urgent probe studies in phase 1 (>= 10 for a p95)")
    ap.add_argument("--probe-every", type=float, default=6.0, help="seconds between probes")
    ap.add_argument("--cut-seconds", type=float, default=30.0, help="length of the cut in phases 2 and 3")
    ap.add_argument("--seed", type=int, default=1, help="seed of the emulator's loss")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, databases)")
    a = ap.parse_args(argv)
    if a.quick and a.probe_every == 6.0:
        a.probe_every = 3.0
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    started = time.time()
    bench_link_files.attach(Bench)
    bench = Bench(a)
    phases = [p.strip() for p in a.phases.split(",") if p.strip()]
    try:
        bench.start()
        for p in phases:
            getattr(bench, f"phase_{p}")()
        return bench.report(started)
    except BaseException:
        a.keep = True
        raise
    finally:
        bench.stop()


if __name__ == "__main__":
    sys.exit(main())
