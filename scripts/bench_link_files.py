"""bench_link.py's per-file and ordering phases: C-STORE vs Wasla per sample, small studies behind a large one,
and every study's flag before its first image at the hub.

    files: each sample (RG1, RG3, US1 by default) alone on the link, first by dcmtk storescu -> storescp, then
           through Wasla from `wasla ingest` to the hub's verified ack (triage and encoding included: on a fast
           link the encode is part of the delivery). Goal: C-STORE time / Wasla time >= 1 for every file and profile;
           on GEO >= 1.5 for RG1 and >= 5 for RG3.
    order: a large study of one band starts, then small studies of the same band arrive; each small one's wait
           (ingest -> acked) and whether it finished before the large one.
    Every run also checks, for every study the hub holds, that its flag was filed before its first manifest.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import linkemu_lib as le

GEO_GOALS = {"RG1_UNCR.dcm": 1.5, "RG3_UNCR.dcm": 5.0}


def phase_files(bench) -> None:
    from bench_link_lib import CSTORE_PORT, log, wait_until

    names = bench.args.files.split(",")
    out = bench.work / "storescp-files"
    out.mkdir(exist_ok=True)
    scp = bench.link.popen_in("hub", ["storescp", "-aet", "HUB", "+xa", "-od", str(out), str(CSTORE_PORT)],
                              stdout=open(bench.work / "storescp-files.log", "ab"), stderr=subprocess.STDOUT)
    bench.ns_wait_port("hub", le.HUB_IP, CSTORE_PORT, 20)
    rows = []
    try:
        for name in names:
            f = bench.sample(name, bench.work / "in" / "files-cstore" / name)
            _study, sop = bench.study_of(f)
            t0 = time.time()
            p = bench.link.run_in("box", bench.storescu(f), capture_output=True, text=True,
                                  timeout=f.stat().st_size * 8 / 50_000 + 300)
            cstore_s = time.time() - t0
            got = [x for x in out.rglob("*") if x.is_file() and sop in x.name]
            ok = p.returncode == 0 and bool(got)
            g = bench.sample(name, bench.work / "in" / "files-wasla" / name)
            _study, wsop = bench.study_of(g)
            t_ingest = bench.ingest([g])
            wait_until(lambda: bench.acked([wsop]), g.stat().st_size * 8 / 50_000 + 300, f"{name} via Wasla", 0.2)
            r = bench.transfer_row(wsop)
            wasla_s = r["done_at"] - t_ingest
            rows.append(dict(name=name, size=f.stat().st_size, cstore_s=cstore_s, cstore_ok=ok, wasla_s=wasla_s,
                             wire=r["size"], codec=r["codec"], queued_to_ack=r["done_at"] - r["created_at"]))
            log(f"files: {name} C-STORE {cstore_s:.1f} s ({'ok' if ok else 'FAILED'}), Wasla {wasla_s:.1f} s "
                f"({r['codec']}, {r['size']:,} B)")
    finally:
        scp.terminate()
    bench.results["files"] = rows


def phase_order(bench) -> None:
    """All of one band (no model routes these samples: 'review'), a large one first, then three small ones."""
    from bench_link_lib import log, wait_until

    large = bench.sample("RG1_UNCR.dcm", bench.work / "in" / "order" / "large.dcm")
    _s, large_sop = bench.study_of(large)
    bench.ingest([large])
    row = wait_until(lambda: bench.transfer_row(large_sop), 120, "the large study to be queued")
    wait_until(lambda: bench.hub_chunks(row["transfer_id"]) >= 2, 300, "the large study under way")
    smalls = []
    for i, name in enumerate(["CT_small.dcm", "MR_small.dcm", "CT_small.dcm"]):
        f = bench.sample(name, bench.work / "in" / "order" / f"s{i}_{name}")
        smalls.append((bench.study_of(f)[1], bench.ingest([f]), f.stat().st_size))
        time.sleep(1.0)
    wait_until(lambda: bench.acked([large_sop, *[s for s, _t, _n in smalls]]), 900, "the order phase acked", 0.5)
    done_large = bench.transfer_row(large_sop)["done_at"]
    waits = []
    for sop, t_ingest, size in smalls:
        r = bench.transfer_row(sop)
        waits.append(dict(size=size, wait_s=r["done_at"] - t_ingest, before_large=r["done_at"] < done_large))
    bench.results["order"] = dict(large_s=done_large - row["created_at"], smalls=waits)
    listed = ", ".join("%.1f s" % w["wait_s"] for w in waits)
    log(f"order: small studies waited {listed}; large one took {done_large - row['created_at']:.1f} s")


def flag_order(bench) -> dict:
    """Studies at the hub whose first manifest arrived before their flag (should be none)."""
    from bench_link_lib import q

    rows = q(bench.hub_db, "SELECT t.study_uid, MIN(t.created_at) AS first, (SELECT MIN(f.received_at) FROM flags f "
                           "WHERE f.study_uid = t.study_uid) AS flag FROM transfers t GROUP BY t.study_uid")
    late = [r for r in rows if r["flag"] is None or r["flag"] > r["first"]]
    return dict(studies=len(rows), late=len(late), worst_s=max((r["first"] - (r["flag"] or r["first"])) for r in rows)
                if rows else 0.0)


def report(bench, row, goals: list) -> None:
    profile = bench.args.profile
    for r in bench.results.get("files", []):
        ratio = r["cstore_s"] / r["wasla_s"] if r["wasla_s"] > 0 else float("inf")
        row(f"{r['name']}: C-STORE / Wasla (ingest->ack)", f"{ratio:.2f}x",
            f"{r['cstore_s']:.1f} s{'' if r['cstore_ok'] else ' FAILED'} vs {r['wasla_s']:.1f} s; {r['codec']} "
            f"{r['size']:,} -> {r['wire']:,} B; queued->acked {r['queued_to_ack']:.1f} s")
        need = GEO_GOALS.get(r["name"], 1.0) if profile.startswith("geo") else 1.0
        goals.append((f"{r['name']} C-STORE/Wasla >= {need:g} on {profile}", r["cstore_ok"] and ratio >= need,
                      f"{ratio:.2f}x"))
    o = bench.results.get("order")
    if o:
        for s in o["smalls"]:
            row(f"  small study ({s['size']:,} B) ingest->acked", f"{s['wait_s']:.1f} s",
                f"{'before' if s['before_large'] else 'AFTER'} the large one (which took {o['large_s']:.1f} s)")
        listed = ", ".join("%.1f" % s["wait_s"] for s in o["smalls"])
        goals.append(("small studies do not wait behind a large one of their band",
                      all(s["before_large"] for s in o["smalls"]), f"waits {listed} s vs large {o['large_s']:.1f} s"))
    f = flag_order(bench)
    row("studies whose image reached the hub before its flag", f"{f['late']}/{f['studies']}", "goal 0")
    goals.append(("every flag before its study's first image", f["late"] == 0,
                  f"{f['late']} of {f['studies']} studies"))


def attach(bench_cls) -> None:
    bench_cls.phase_files = phase_files
    bench_cls.phase_order = phase_order


__all__ = ["attach", "report", "Path"]
