"""What a hub reports at /metrics: transfers, bytes and goodput, studies read or not, per-box freshness."""
from __future__ import annotations

import time
from collections.abc import Callable

from sync.core.metrics import GOODPUT_WINDOW_S, Metric


def hub_collector(store, *, hub_id: str, receiver=None) -> Callable[[], list[Metric]]:
    """What a hub reports: per-box queue depth and freshness, goodput, bytes received per class, failures."""

    def collect() -> list[Metric]:
        now = time.time()
        out = [Metric("wasla_hub_info", "gauge", "Constant 1, labelled with the hub id.").add(1, hub=hub_id)]
        if receiver is not None:
            out.append(Metric("wasla_hub_messages_handled_total", "counter", "Messages handled by this receiver.")
                       .add(receiver.handled))
            if receiver.partitions is not None:
                out += [Metric("wasla_hub_partitions_owned", "gauge",
                               "Box partitions this receiver takes (of sync.wire.protocol.PARTITIONS).")
                        .add(len(receiver.partitions.owned)),
                        Metric("wasla_hub_receivers_alive", "gauge", "Receivers of this hub's group this one hears.")
                        .add(len(receiver.partitions.members()))]
        transfers = Metric("wasla_hub_transfers", "gauge", "Transfers by state.")
        for r in store.query("SELECT state, COUNT(*) AS n FROM transfers GROUP BY state"):
            transfers.add(r["n"], state=r["state"])
        received = Metric("wasla_hub_received_bytes_total", "counter",
                          "Wire bytes of verified and stored transfers, by study label.")
        for r in store.query("SELECT COALESCE(label, 'none') AS label, COALESCE(SUM(size), 0) AS bytes "
                             "FROM transfers WHERE state = 'complete' GROUP BY label"):
            received.add(r["bytes"], label=r["label"])
        recent = store.query("SELECT COALESCE(SUM(size), 0) AS bytes FROM transfers WHERE state = 'complete' "
                             "AND completed_at >= ?", [now - GOODPUT_WINDOW_S])[0]["bytes"]
        studies = Metric("wasla_hub_studies", "gauge", "Studies at the hub by label and whether they were read.")
        for r in store.query("SELECT COALESCE(label, 'none') AS label, read_disposition IS NOT NULL AS is_read, "
                             "COUNT(*) AS n FROM studies GROUP BY 1, 2"):
            studies.add(r["n"], label=r["label"], read="yes" if r["is_read"] else "no")
        dead = store.query("SELECT COUNT(*) AS n FROM dead_letters")[0]["n"]
        out += [transfers, received, studies,
                Metric("wasla_hub_goodput_bytes_per_second", "gauge",
                       f"Bytes verified and stored over the last {GOODPUT_WINDOW_S:.0f} s, per second.")
                .add(recent / GOODPUT_WINDOW_S),
                Metric("wasla_hub_dead_letters_total", "counter", "Messages refused (quarantined) by the receiver.")
                .add(dead)]
        depth = Metric("wasla_hub_box_queue_depth", "gauge", "Outbox depth each box reported in its last heartbeat.")
        seen = Metric("wasla_hub_box_last_seen_age_seconds", "gauge", "Seconds since each box was last heard.")
        online = Metric("wasla_hub_box_online", "gauge", "1 if the box's last status said online.")
        chunks = Metric("wasla_hub_box_chunks_total", "counter", "Chunks received from each box, duplicates included.")
        dups = Metric("wasla_hub_box_duplicate_chunks_total", "counter", "Chunks received twice (resends).")
        for b in store.query("SELECT device, queue_depth, last_seen, online, chunks, dup_chunks FROM boxes"):
            dev = b["device"]
            depth.add(b["queue_depth"] or 0, box=dev)
            seen.add(now - b["last_seen"] if b["last_seen"] else -1, box=dev)
            online.add(int(bool(b["online"])), box=dev)
            chunks.add(b["chunks"], box=dev)
            dups.add(b["dup_chunks"], box=dev)
        out += [depth, seen, online, chunks, dups]
        return out

    return collect
