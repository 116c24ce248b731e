"""What a box reports at /metrics: queue by state, triage latency, uploads, quarantines, disk (read at scrape)."""
from __future__ import annotations

import shutil
import time
from collections.abc import Callable

from sync.core.metrics import GOODPUT_WINDOW_S, Histogram, Metric, start  # noqa: F401 - start: the daemon's entry


def box_collector(store, *, box_id: str, data_dir, latency: Histogram, worker=None,
                  uploader_ref: Callable[[], object] | None = None) -> Callable[[], list[Metric]]:
    """What a box reports: queue depth, triage latency, link goodput, bytes sent per class, quarantines."""

    def collect() -> list[Metric]:
        now = time.time()
        out = [Metric("wasla_box_info", "gauge", "Constant 1, labelled with the box id.").add(1, box=box_id)]
        states = Metric("wasla_instances", "gauge", "Instances on the box by state.")
        for state, n in store.counts().items():
            states.add(n, state=state)
        labels = Metric("wasla_studies", "gauge", "Studies on the box by triage label (pending = not decided).")
        for label, n in store.label_counts().items():
            labels.add(n, label=label)
        quarantines = store.query("SELECT COUNT(*) AS n FROM events WHERE kind = 'quarantine'")[0]["n"]
        out += [states, labels,
                Metric("wasla_quarantines_total", "counter", "Inputs quarantined since the store was created.")
                .add(quarantines),
                Metric("wasla_triage_queue_depth", "gauge", "Instances waiting for triage (received + processing).")
                .add(sum(n for s, n in store.counts().items() if s in ("received", "processing"))),
                latency.metric()]
        if worker is not None:
            out.append(Metric("wasla_triaged_total", "counter", "Instances triaged by this process.")
                       .add(worker.processed))
        ob = store.query("SELECT COUNT(*) AS n, COALESCE(SUM(size), 0) AS bytes, MIN(created_at) AS oldest "
                         "FROM outbox WHERE state IN ('pending', 'confirmed')")[0]
        out += [Metric("wasla_sync_queue_depth", "gauge", "Flags and transfers in the outbox not yet done.")
                .add(ob["n"]),
                Metric("wasla_sync_queued_bytes", "gauge", "Wire bytes of transfers not yet done.").add(ob["bytes"]),
                Metric("wasla_sync_oldest_unsent_age_seconds", "gauge", "Age of the oldest outbox entry not done.")
                .add(now - ob["oldest"] if ob["oldest"] else 0)]
        by_class = store.query("SELECT COALESCE(SUM(flag), 0) AS flag, COALESCE(SUM(bulk), 0) AS bulk, "
                               "COALESCE(SUM(telemetry), 0) AS telemetry FROM sync_usage")[0]
        sent = Metric("wasla_sync_sent_bytes_total", "counter",
                      "Bytes published to the broker by class (flag, bulk = studies, telemetry), resends included.")
        for cls in ("flag", "bulk", "telemetry"):
            sent.add(by_class[cls], **{"class": cls})
        delivered = Metric("wasla_sync_delivered_bytes_total", "counter",
                           "Wire bytes of transfers the hub verified and stored, by study label; rate() is goodput.")
        for r in store.query("SELECT COALESCE(label, 'none') AS label, COALESCE(SUM(size), 0) AS bytes FROM outbox "
                             "WHERE kind = 'transfer' AND state = 'done' GROUP BY label"):
            delivered.add(r["bytes"], label=r["label"])
        recent = store.query("SELECT COALESCE(SUM(size), 0) AS bytes FROM outbox WHERE kind = 'transfer' "
                             "AND state = 'done' AND done_at >= ?", [now - GOODPUT_WINDOW_S])[0]["bytes"]
        out += [sent, delivered,
                Metric("wasla_sync_goodput_bytes_per_second", "gauge",
                       f"Bytes the hub confirmed over the last {GOODPUT_WINDOW_S:.0f} s, per second.")
                .add(recent / GOODPUT_WINDOW_S)]
        up = uploader_ref() if uploader_ref else None
        if up is not None:
            out += [Metric("wasla_sync_connected", "gauge", "1 while connected to the broker.").add(int(up.connected)),
                    Metric("wasla_sync_chunks_sent_total", "counter", "Chunks published by this process.")
                    .add(up.stats.get("chunks_sent", 0)),
                    Metric("wasla_sync_chunks_resent_total", "counter", "Chunks published again (lost or unconfirmed).")
                    .add(up.stats.get("chunks_resent", 0))]
        try:
            free = shutil.disk_usage(data_dir).free
        except OSError:
            free = 0
        out.append(Metric("wasla_disk_free_bytes", "gauge", "Free bytes on the data disk.").add(free))
        return out

    return collect
