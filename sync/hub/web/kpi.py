"""Pilot evidence from the hub's index: per box, region and ISO week, the times from flag to hub, to read and back to
the clinic, the share of studies per band, the radiologist's disposition against the AI band, backlog and link."""
from __future__ import annotations

import csv
import datetime
import io
import math
import time

BANDS = ("urgent", "review", "normal")
DISPOSITIONS = ("urgent-referral", "abnormal", "repeat-image", "normal")
# A disposition that means "this child needed a doctor": an AI "normal" with one of these is a false normal.
ABNORMAL_READS = ("urgent-referral", "abnormal")


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _week(t: float | None) -> str:
    if not t:
        return "-"
    iso = datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isocalendar()
    return f"{iso[0]}-W{iso[1]:02d}"


def study_facts(store) -> list[dict]:
    """One row per study: box, region, week, band, first flag at the hub, first read, its delivery."""
    rows = store.query(
        "SELECT s.study_uid, s.device, s.label, s.flagged_at, s.first_seen, i.region, "
        "(SELECT MIN(f.received_at) FROM flags f WHERE f.study_uid = s.study_uid) AS flag_at_hub, "
        "(SELECT MIN(r.at) FROM reads r WHERE r.study_uid = s.study_uid) AS read_at "
        "FROM studies s LEFT JOIN box_info i ON i.device = s.device")
    reads = store.query("SELECT study_uid, disposition, at, delivered_at FROM reads ORDER BY at")
    first_read: dict[str, dict] = {}
    for r in reads:
        first_read.setdefault(r["study_uid"], r)
    for r in rows:
        fr = first_read.get(r["study_uid"])
        r["disposition"] = fr["disposition"] if fr else None
        r["delivered_at"] = fr["delivered_at"] if fr else None
        r["week"] = _week(r["flagged_at"] or r["first_seen"])
        r["flag_to_hub_s"] = (r["flag_at_hub"] - r["flagged_at"]) if r["flag_at_hub"] and r["flagged_at"] else None
        r["flag_to_read_s"] = (r["read_at"] - r["flag_at_hub"]) if r["read_at"] and r["flag_at_hub"] else None
        r["read_to_clinic_s"] = (r["delivered_at"] - r["read_at"]) if r["delivered_at"] and r["read_at"] else None
    return rows


def summarise(facts: list[dict]) -> dict:
    n = len(facts)
    bands = {b: sum(1 for f in facts if f["label"] == b) for b in BANDS}
    out = {"studies": n, "bands": bands,
           "band_share": {b: (bands[b] / n if n else None) for b in BANDS},
           # The seeds' promise: triage cuts what a radiologist must read (the normal band can wait or be sampled).
           "must_read_share": ((bands["urgent"] + bands["review"]) / n) if n else None,
           "read": sum(1 for f in facts if f["disposition"])}
    for key in ("flag_to_hub_s", "flag_to_read_s", "read_to_clinic_s"):
        values = [f[key] for f in facts if f[key] is not None and f[key] >= 0]
        out[key] = {"n": len(values), "median": _quantile(values, 0.5), "p90": _quantile(values, 0.9)}
    urgent = [f["flag_to_read_s"] for f in facts if f["label"] == "urgent" and f["flag_to_read_s"] is not None]
    out["urgent_flag_to_read_s"] = {"n": len(urgent), "median": _quantile(urgent, 0.5), "p90": _quantile(urgent, 0.9)}
    return out


def confusion(facts: list[dict]) -> dict:
    """AI band x radiologist disposition over read studies; false normals (AI normal, read abnormal) counted first."""
    table = {b: {d: 0 for d in DISPOSITIONS} for b in BANDS}
    for f in facts:
        if f["label"] in table and f["disposition"] in DISPOSITIONS:
            table[f["label"]][f["disposition"]] += 1
    false_normal = sum(table["normal"][d] for d in ABNORMAL_READS)
    read_normal = sum(table["normal"].values())
    return {"table": table, "false_normal": false_normal, "read_ai_normal": read_normal}


def pilot_figures(store) -> dict:
    facts = study_facts(store)
    groups: dict[str, dict[str, list[dict]]] = {"box": {}, "region": {}, "week": {}}
    for f in facts:
        groups["box"].setdefault(f["device"], []).append(f)
        groups["region"].setdefault(f["region"] or "-", []).append(f)
        groups["week"].setdefault(f["week"], []).append(f)
    boxes = store.query("SELECT device, queue_depth, oldest_unsent_at, online, last_seen FROM boxes ORDER BY device")
    return {"generated_at": time.time(), "overall": summarise(facts), "confusion": confusion(facts),
            "by": {kind: {k: summarise(v) for k, v in sorted(g.items())} for kind, g in groups.items()},
            "backlog": boxes}


CSV_FIELDS = ("group", "key", "studies", "urgent", "review", "normal", "must_read_share", "read",
              "flag_to_hub_median_s", "flag_to_read_median_s", "flag_to_read_p90_s", "urgent_flag_to_read_median_s",
              "read_to_clinic_median_s")


def to_csv(fig: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_FIELDS)
    for kind, groups in [("overall", {"all": fig["overall"]}), *[(k, v) for k, v in fig["by"].items()]]:
        for key, s in groups.items():
            w.writerow([kind, key, s["studies"], s["bands"]["urgent"], s["bands"]["review"], s["bands"]["normal"],
                        _r(s["must_read_share"]), s["read"], _r(s["flag_to_hub_s"]["median"]),
                        _r(s["flag_to_read_s"]["median"]), _r(s["flag_to_read_s"]["p90"]),
                        _r(s["urgent_flag_to_read_s"]["median"]), _r(s["read_to_clinic_s"]["median"])])
    return buf.getvalue()


def _r(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"
