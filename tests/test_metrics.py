"""Prometheus endpoint on box and hub: text format, what each reports, config, and a real daemon scraped."""
from __future__ import annotations

import re
import shutil
import urllib.error
import urllib.request

import pytest
from pydicom.uid import generate_uid

from boxproc import BoxProcess, tiny_models, write_box_config
import harness
import samples
from edge.metrics import box_collector
from sync.core import metrics
from sync.hub.metrics import hub_collector
from edge.config import parse
from sync.core.errors import ConfigError
from test_results_dicom import add_image, triage_next


def scrape(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as rsp:
            return rsp.status, rsp.headers["Content-Type"], rsp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def samples_of(text: str) -> dict[str, float]:
    """'name{labels}' -> value for every sample line (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_histogram_is_cumulative_and_labels_are_escaped():
    h = metrics.Histogram("t_seconds", "test", buckets=(0.1, 1.0))
    for v in (0.05, 0.5, 0.7, 3.0):
        h.observe(v)
    m = metrics.Metric("t_info", "gauge", "info").add(1, note='say "hi"\\ok\n')
    text = metrics.exposition([h.metric(), m])
    got = samples_of(text)
    assert got['t_seconds_bucket{le="0.1"}'] == 1 and got['t_seconds_bucket{le="1"}'] == 3
    assert got['t_seconds_bucket{le="+Inf"}'] == 4 and got["t_seconds_count"] == 4
    assert got["t_seconds_sum"] == pytest.approx(4.25)
    assert "# TYPE t_seconds histogram" in text
    assert 't_info{note="say \\"hi\\"\\\\ok\\n"} 1' in text


def test_box_endpoint_reports_queue_latency_goodput_bytes_per_class_and_quarantines(store, tmp_path):
    from edge.uplink.outbox import Outbox

    uid = generate_uid()
    add_image(store, tmp_path, uid)
    bad = add_image(store, tmp_path, uid)
    add_image(store, tmp_path, generate_uid())  # still waiting for triage
    triage_next(store, "urgent", 0.9)
    store.claim_next()
    store.quarantine(bad["id"], "pixel data does not decode")
    box = Outbox(store, tmp_path / "outbox", "box-m")
    box.add_flag(uid, "urgent", {"study_uid": uid, "label": "urgent"})
    box.add_usage("2026-11-01", "bulk", 5000)
    box.add_usage("2026-11-02", "bulk", 1000)
    box.add_usage("2026-11-02", "flag", 300)
    latency = metrics.Histogram("wasla_triage_latency_seconds", "latency")
    latency.observe(0.4)
    server = metrics.MetricsServer("127.0.0.1", 0, box_collector(
        store, box_id="box-m", data_dir=tmp_path, latency=latency)).start()
    try:
        code, ctype, text = scrape(server.port)
        assert code == 200 and ctype.startswith("text/plain; version=0.0.4")
        got = samples_of(text)
        assert got['wasla_box_info{box="box-m"}'] == 1
        assert got['wasla_instances{state="triaged"}'] == 1 and got['wasla_instances{state="quarantined"}'] == 1
        assert got["wasla_triage_queue_depth"] == 1
        assert got["wasla_quarantines_total"] == 1
        assert got['wasla_studies{label="urgent"}'] == 1
        assert got["wasla_sync_queue_depth"] == 1  # the urgent flag
        assert got['wasla_sync_sent_bytes_total{class="bulk"}'] == 6000
        assert got['wasla_sync_sent_bytes_total{class="flag"}'] == 300
        assert got["wasla_sync_goodput_bytes_per_second"] == 0
        assert got['wasla_triage_latency_seconds_bucket{le="0.5"}'] == 1
        assert got["wasla_disk_free_bytes"] > 0
        assert scrape(server.port, "/")[0] == 404
    finally:
        server.stop()


def test_hub_endpoint_reports_each_box_queue_depth_freshness_and_dead_letters(tmp_path):
    from sync.hub.store import HubStore

    hub = HubStore(tmp_path / "hub.db", tmp_path / "studies", tmp_path / "partial")
    hub.seen("box-1", chunk=True)
    hub.seen("box-1", chunk=True, dup=True)
    hub.record_heartbeat("box-1", {"queue_depth": 7, "oldest_unsent_at": None})
    hub.dead_letter("wasla/v1/up/box-1/chunk", "box-1", "bad crc", b"xx")
    server = metrics.MetricsServer("127.0.0.1", 0, hub_collector(hub, hub_id="hub-t")).start()
    try:
        got = samples_of(scrape(server.port)[2])
    finally:
        server.stop()
        hub.close()
    assert got['wasla_hub_box_queue_depth{box="box-1"}'] == 7
    assert 0 <= got['wasla_hub_box_last_seen_age_seconds{box="box-1"}'] < 60
    assert got['wasla_hub_box_duplicate_chunks_total{box="box-1"}'] == 1
    assert got["wasla_hub_dead_letters_total"] == 1
    assert got["wasla_hub_goodput_bytes_per_second"] == 0


def test_metrics_are_off_by_default_and_the_section_is_strict_on_box_and_hub():
    from sync.hub import config as hub_config

    cfg = parse("")
    assert cfg.metrics.enabled is False and cfg.metrics.bind == "127.0.0.1" and cfg.metrics.port == 9464
    assert metrics.start(cfg.metrics, lambda: []) is None
    with pytest.raises(ConfigError, match=r"metrics\.port"):
        parse("[metrics]\nport = 70000\n")
    with pytest.raises(ConfigError, match=r"metrics\.bind"):
        parse('[metrics]\nbind = " "\n')
    with pytest.raises(ConfigError, match=r"metrics\.path"):
        parse('[metrics]\npath = "/m"\n')
    assert hub_config.parse("[metrics]\nenabled = true\nport = 9500\n").metrics.port == 9500
    with pytest.raises(ConfigError, match=r"metrics\.port"):
        hub_config.parse("[metrics]\nport = -1\n")


@pytest.mark.skipif(not shutil.which("storescu"), reason="dcmtk storescu not installed")
def test_a_running_box_serves_metrics_with_its_triage_latency(tmp_path):
    models_dir, pub = tiny_models(tmp_path)
    port = harness.free_port()
    box = BoxProcess(write_box_config(tmp_path, models_dir=models_dir, trusted=pub,
                                      extra=f"[metrics]\nenabled = true\nport = {port}\n")).start()
    try:
        f = samples.fresh_copy(samples.sample_path("RG1_UNCR.dcm"), tmp_path / "in" / "a.dcm")
        assert harness.storescu(box.port, [f]).returncode == 0
        harness.wait_for_port(port, proc=box.proc, timeout=30)
        got = harness.wait_until(
            lambda: (lambda s: s if s.get("wasla_triage_latency_seconds_count") == 1 else None)(
                samples_of(scrape(port)[2])), timeout=120, what="a triage in the metrics")
        assert got["wasla_triaged_total"] == 1
        assert got['wasla_triage_latency_seconds_bucket{le="+Inf"}'] == 1
        assert re.search(r"wasla_box_info\{box=\"test-box\"\}", scrape(port)[2])
    finally:
        box.terminate()
