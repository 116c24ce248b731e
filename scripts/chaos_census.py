"""What scripts/chaos.py counts once the dust settles: every study on box and hub, every read, and the verdict."""
from __future__ import annotations

import collections
import hashlib
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # chaos.py imports this module: its classes appear here as annotations only
    from chaos import Item, Rig, Sender

DERIVED_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.7")  # the box's own SR / SC
ROUTES = ("scp", "cli", "watch")


def _query(db: Path, sql: str, params=()) -> list[dict]:
    """A read-only look at a daemon's SQLite file; [] while it does not exist yet or is busy."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as c:
            c.row_factory = sqlite3.Row
            return [dict(r) for r in c.execute(sql, params).fetchall()]
    except sqlite3.Error:
        return []



def census(rig: Rig, items: list[Item]) -> dict:
    """Every count the run reports, from the hub's files and index, the box's store and the box's log."""
    import pydicom

    from sync.wire import codecs

    acked = [i for i in items if i.acked]
    hub_rows = {r["sop_instance_uid"]: r for r in _query(rig.hub_data / "hub.db", "SELECT * FROM instances")}
    files_per_sop = collections.Counter()
    for f in (rig.hub_data / "studies").rglob("*.dcm"):
        try:
            files_per_sop[str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)] += 1
        except Exception:  # noqa: BLE001 - an unreadable hub file counts as corrupted below if it is ours
            files_per_sop[f"unreadable:{f.name}"] += 1
    box_rows = {r["sop_instance_uid"]: r for r in _query(rig.box_db, "SELECT * FROM instances")}
    lost, corrupted, box_corrupted = [], [], []
    for it in acked:
        row = hub_rows.get(it.sop)
        if row is None:
            lost.append(it.sop)
            continue
        path = rig.hub_data / "studies" / row["path"]
        try:
            ok = path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == row["sha256"]
            got, src = pydicom.dcmread(path), pydicom.dcmread(it.path)
            ok = ok and str(got.StudyInstanceUID) == it.study and codecs.pixels_equal(got, src)
        except Exception:  # noqa: BLE001 - unreadable is corrupted
            ok = False
        if not ok:
            corrupted.append(it.sop)
        brow = box_rows.get(it.sop)
        spool = rig.box_data / "spool" / brow["path"] if brow and brow.get("path") else None
        if brow and spool and spool.is_file():
            try:
                same = hashlib.sha256(spool.read_bytes()).hexdigest() == brow["sha256"]
                same = same and codecs.pixels_equal(pydicom.dcmread(spool), pydicom.dcmread(it.path))
            except Exception:  # noqa: BLE001
                same = False
            if not same:
                box_corrupted.append(it.sop)
    wanted = {i.sop for i in items}
    extra = [s for s, r in hub_rows.items() if s not in wanted and not _derived(rig, r)]
    stuck_images = [r["sop_instance_uid"] for r in box_rows.values()
                    if r["state"] != "acknowledged" and (r.get("source") or "") != "wasla"]
    stuck_results = [r["sop_instance_uid"] for r in box_rows.values()
                     if r["state"] != "acknowledged" and (r.get("source") or "") == "wasla"]
    return {"sent": len(items), "acked": len(acked), "lost": lost,
            "duplicated": [s for s, n in files_per_sop.items() if n > 1],
            "corrupted": corrupted, "box_corrupted": box_corrupted, "extra": extra,
            "stuck": stuck_images, "stuck_results": stuck_results,
            "not_accepted": [i.sop for i in items if not i.acked],
            "box_states": collections.Counter(r["state"] for r in box_rows.values())}


def _derived(rig: Rig, row: dict) -> bool:
    import pydicom

    try:
        ds = pydicom.dcmread(rig.hub_data / "studies" / row["path"], stop_before_pixels=True)
        return str(ds.SOPClassUID).startswith(DERIVED_CLASSES)
    except Exception:  # noqa: BLE001
        return False


def read_census(rig: Rig) -> dict:
    reads = _query(rig.hub_data / "hub.db", "SELECT read_id, study_uid, delivered_at FROM reads WHERE by = 'chaos'")
    box_log = rig.box.log_since(0)
    box_reads = collections.Counter(r["read_id"] for r in _query(rig.box_db, "SELECT read_id FROM sync_reads"))
    on_box = {r["study_uid"]: r["read_disposition"] for r in _query(rig.box_db,
                                                                   "SELECT study_uid, read_disposition FROM studies")}
    missing, twice = [], []
    for r in reads:
        applied = box_log.count(f"read {r['read_id']} applied")
        if box_reads[r["read_id"]] == 0 or applied == 0 or on_box.get(r["study_uid"]) != "abnormal":
            missing.append(r["read_id"])
        elif applied > 1 or box_reads[r["read_id"]] > 1:
            twice.append(r["read_id"])
    return {"reads": len(reads), "missing": missing, "twice": twice,
            "undelivered_at_hub": [r["read_id"] for r in reads if r["delivered_at"] is None]}


def settled(rig: Rig, sender: Sender, n_reads: int) -> bool:
    if sender.pending():
        return False
    rows = _query(rig.box_db, "SELECT state FROM instances")
    if not rows or any(r["state"] != "acknowledged" for r in rows):
        return False
    reads = read_census(rig)
    return reads["reads"] >= n_reads and not reads["missing"]


def wait_settled(rig: Rig, sender: Sender, n_reads: int, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        rig.ensure_up()
        if settled(rig, sender, n_reads):
            return time.monotonic() - t0
        time.sleep(1.0)
    return -1.0


def broker_persistence(rig: Rig) -> str:
    if not rig.broker.persistence:
        return "off (--no-persistence)"
    log = (rig.broker.workdir / "mosquitto.log").read_text(errors="replace")
    errors = sum(log.count(s) for s in ("Error saving", "Permission denied"))
    db = rig.broker.workdir / "mosquitto.db"
    size = f"mosquitto.db {db.stat().st_size} bytes" if db.exists() else "NO mosquitto.db written"
    return f"on ({size}, {errors} save errors)"


# --- reporting --------------------------------------------------------------------------------------------------

def failures(c: dict, reads: dict | None = None) -> dict[str, int]:
    out = {"lost (acknowledged to sender, not at hub)": len(c["lost"]),
           "duplicated (hub holds twice)": len(c["duplicated"]),
           "corrupted at hub (sha256 / pixels)": len(c["corrupted"]),
           "corrupted on box spool": len(c["box_corrupted"]),
           "stuck images (not acknowledged on box)": len(c["stuck"]),
           "stuck box results (SR/SC)": len(c["stuck_results"]),
           "never accepted by the box": len(c["not_accepted"]),
           "unexpected instances at hub": len(c["extra"])}
    if reads is not None:
        out["reads not delivered"] = len(reads["missing"])
        out["reads delivered twice"] = len(reads["twice"])
    return out


def print_table(title: str, rows: dict[str, int | str]) -> None:
    width = max(len(k) for k in rows) + 2
    print(f"\n{title}\n" + "-" * (width + 10))
    for k, v in rows.items():
        print(f"{k:<{width}}{v:>8}")
    print("-" * (width + 10))


def _route_counts(items: list[Item]) -> str:
    c = collections.Counter(i.route for i in items)
    return ", ".join(f"{r} {c[r]}" for r in ROUTES)


