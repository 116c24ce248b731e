"""The report of scripts/bench_link.py: every measurement in one table, then each goal PASS or FAIL."""
from __future__ import annotations

import json
import time
from pathlib import Path

import bench_link_files


def pct(values: list[float], p: float) -> float:
    import numpy as np

    return float(np.percentile(values, p)) if values else float("nan")


def _backlog(b: dict, rate: float, tcp_settings: dict, row) -> list:
    goals: list = []
    row("backlog: studies + urgent probes", f"{b['n_studies']} + {b['n_probes']}",
        f"{', '.join(b['names'])}; {b['chunks']} chunks")
    row("  derived objects the box added (SR/SC)", f"{b['n_derived']}", f"{b['derived_bytes']:,} B, in the payload")
    row("backlog: study wire bytes (payload)", f"{b['payload']:,}",
        f"original {b['original']:,} B, ratio {b['original'] / b['payload']:.2f}")
    row("backlog: first chunk -> last ack", f"{b['elapsed']:.1f} s", "")
    row("goodput", f"{b['goodput_bps'] / 1000:.1f} kbit/s", f"link {rate / 1000:g} kbit/s")
    row("goodput / link rate", f"{b['ratio']:.3f}", "goal >= 0.85")
    row("uplink IP bytes sent by the box", f"{b['wire_up']:,}",
        f"{b['up_pkts']:,} packets; {b['wire_up_delivered']:,} delivered; downlink {b['wire_down']:,}")
    row("wire bytes / payload bytes", f"{1 + b['overhead']:.4f}",
        f"overhead {b['overhead'] * 100:.2f} % (goal <= 5 %); counting only bytes delivered (no air "
        f"losses) {100 * (b['wire_up_delivered'] / b['payload'] - 1):.2f} %")
    row("  of which TCP segments retransmitted", f"{b['tcp_retrans']:,}",
        f"of {b['tcp_out']:,} sent ({100 * b['tcp_retrans'] / max(1, b['tcp_out']):.2f} %)")
    hdr = 40 + (12 if tcp_settings.get("tcp_timestamps") not in ("0", None) else 0)
    row(f"  of which IP+TCP headers ({hdr} B/packet)", f"{b['up_pkts'] * hdr:,}",
        f"{100 * b['up_pkts'] * hdr / b['payload']:.2f} % of payload")
    row("  chunks the hub received twice", f"{b['dup_chunks']}", f"hub whole-file retries {b['retries']}")
    lat = b["latencies"]
    row("urgent flag latency p50", f"{pct(lat, 50):.2f} s", f"{len(lat)} flags, triaged (box) -> received (hub)")
    row("urgent flag latency p95", f"{pct(lat, 95):.2f} s", f"max {max(lat) if lat else float('nan'):.2f} s; goal <= 3 s")
    row(f"{b['big_name']} via Wasla, queued -> acked", f"{b['big_queued_to_ack']:.1f} s",
        f"{b['big_size']:,} B on the wire ({b['big_original']:,} B original); ingest -> acked "
        f"{b['big_ingest_to_ack']:.1f} s; shared the link with the probes")
    goals += [("goodput >= 0.85 of link rate", b["ratio"] >= 0.85, f"{b['ratio']:.3f}"),
              ("urgent flag p95 <= 3 s", len(lat) >= 10 and pct(lat, 95) <= 3.0,
               f"p95 {pct(lat, 95):.2f} s over {len(lat)} flags (labels: "
               f"{sum(x == 'urgent' for x in b['probe_labels'])}/{len(b['probe_labels'])} urgent)"),
              ("overhead <= 5 %", b["overhead"] <= 0.05, f"{b['overhead'] * 100:.2f} %")]
    return goals


def _cut(c: dict, sc, row) -> list:
    goals: list = []
    bound = sc.chunk_bytes + sc.max_inflight_bytes
    resent_app = c["dup_chunks"] * c["chunk_size"]
    resent = max(resent_app, c["excess_after"])
    row(f"cut: {c['name']} {c['cut_s']:g} s cut", f"{c['at_cut']}/{c['count']} chunks",
        f"at the hub when cut ({c['cut_at_s']:.0f} s after ingest); {c['at_restore']} at restore")
    row("cut: MQTT disconnects / reconnects", f"{c['disconnects']} / {c['reconnects']}", "")
    row("cut: chunks the hub received twice", f"{c['dup_chunks']}", f"{resent_app:,} B; hub retries {c['retries']}")
    row("cut: uplink bytes after restore", f"{c['wire_after']:,}",
        f"payload the hub lacked at restore {c['remaining']:,} B x backlog wire factor = {c['expected_after']:,.0f} B")
    row("cut: bytes resent (excess after restore)", f"{c['excess_after']:,.0f}",
        f"bound: chunk + in-flight = {bound:,} B")
    row("cut: TCP segments retransmitted (phase)", f"{c['tcp_retrans']:,}", f"of {c['tcp_out']:,}")
    row(f"cut: {c['name']} via Wasla, queued -> acked", f"{c['queued_to_ack']:.1f} s",
        f"stored at hub: {c['stored']}")
    goals.append(("resent after a cut <= one chunk + in-flight window", resent <= bound,
                  f"{resent:,.0f} B (max of hub duplicates and wire excess) vs {bound:,} B"))
    goals.append(("Wasla delivers across a cut without starting over",
                  c["stored"] and c["retries"] == 0 and c["at_cut"] > 0 and c["dup_chunks"] <= c["at_cut"]
                  and c["wire_after"] < c["size"],
                  f"stored; {c['at_restore']} chunks kept, {c['dup_chunks']} re-received, hub retries "
                  f"{c['retries']}"))
    return goals


def _read(rd: dict, row) -> list:
    goals: list = []
    tb, rc = rd["to_box"], rd["receipt"]
    row("read submitted -> applied on the box, p50", f"{pct(tb, 50):.2f} s",
        f"{len(tb)} reads; max {max(tb):.2f} s; from the start of `wasla-hub read` (process start included)")
    row("read submitted -> receipt back at the hub, p50", f"{pct(rc, 50):.2f} s", f"max {max(rc):.2f} s")
    goals.append(("every read at the box within 10 s of submitting", max(tb) <= 10.0, f"max {max(tb):.2f} s"))
    return goals


def _cstore(cs: dict, c: dict | None, a, row) -> list:
    goals: list = []
    pl, cu = cs["plain"], cs["cut"]
    row(f"C-STORE {cs['name']} (storescu -> storescp)", f"{pl['seconds']:.1f} s",
        f"{pl['size']:,} B, rc {pl['rc']}, stored {pl['ok']}")
    row(f"C-STORE {cs['name']} across a {a.cut_seconds:g} s cut", f"{cu['seconds']:.1f} s",
        f"rc {cu['rc']}, stored {cu['ok']}, cut at {cu['cut_at'] or 0:.0f} s; {' | '.join(cu['tail'])[:80]}")
    wp = cs["wasla_plain"]
    if wp:
        ratio = pl["seconds"] / wp
        row(f"{cs['name']}: C-STORE time / Wasla time", f"{ratio:.2f}x", "goal >= 1.5x")
        goals.append((f"{cs['name']} >= 1.5x faster than C-STORE", pl["ok"] and ratio >= 1.5,
                      f"{ratio:.2f}x ({pl['seconds']:.1f} s vs {wp:.1f} s)"))
    if c and c["name"] == cs["name"]:
        row(f"{cs['name']} across the cut: C-STORE / Wasla", f"{cu['seconds'] / c['queued_to_ack']:.2f}x",
            f"{cu['seconds']:.1f} s{'' if cu['ok'] else ' (FAILED)'} vs {c['queued_to_ack']:.1f} s")
    return goals


def report(self, started: float) -> int:
    """Print the table and the goals of a finished bench (`self`: scripts/bench_link.Bench); 0 if every goal passes."""
    R, a, sc = self.results, self.args, self.sync_cfg
    prof = self.link.profile
    print()
    print(f"Wasla link bench — profile {a.profile}{' (quick)' if a.quick else ''}, seed {a.seed}")
    print(f"  link: {prof.describe()}")
    print(f"  sync: chunk_bytes={sc.chunk_bytes} max_inflight_bytes={sc.max_inflight_bytes} "
          f"socket_sndbuf_bytes={sc.socket_sndbuf_bytes} flag_lane={str(sc.flag_lane).lower()} "
          f"max_rate_kbps={sc.max_rate_kbps:g} link_kbps={sc.link_kbps:g} "
          f"(overrides: {' '.join(a.set or []) or 'none'})")
    print("  box TCP: " + " ".join(f"{k}={v}" for k, v in self.tcp_settings.items())
          + (" (systemd/60-wasla-link.conf not applied)" if a.no_link_sysctl else
             " (systemd/60-wasla-link.conf applied)") + (f" (set: {' '.join(a.box_sysctl)})" if a.box_sysctl else ""))
    print(f"  total run time {time.time() - started:.0f} s")
    rate = prof.up.rate_bps
    goals: list[tuple[str, bool | None, str]] = []
    print()
    print(f"{'measurement':<46} {'value':>16}  detail")
    print("-" * 110)

    def row(name, value, detail=""):
        print(f"{name:<46} {value:>16}  {detail}")

    if R.get("backlog"):
        goals += _backlog(R["backlog"], rate, self.tcp_settings, row)
    c = R.get("cut")
    if c:
        goals += _cut(c, sc, row)
    if R.get("read"):
        goals += _read(R["read"], row)
    if R.get("cstore"):
        goals += _cstore(R["cstore"], c, a, row)
    bench_link_files.report(self, row, goals)
    print()
    fails = 0
    for name, ok, detail in goals:
        fails += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {name:<52} {detail}")
    print(f"\n{len(goals) - fails}/{len(goals)} goals met")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "box_tcp": self.tcp_settings, "results": R}, indent=2, default=str))
    return 0 if fails == 0 else 1

