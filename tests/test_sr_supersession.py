"""One SR per study state at the hub: a later SR (an image arrived after the first) supersedes the earlier one."""
from __future__ import annotations

import sys

import pytest
from pydicom.uid import generate_uid

from edge import results_dicom
from harness import wait_until
from sync.hub import cli as hub_cli
from test_sync_support import Box, hub_cfg, make_cr, start_hub, triage

pytestmark = pytest.mark.timeout(120)


def _acked(box, n: int) -> bool:
    return box.states().get("acknowledged", 0) == n


def test_an_image_arriving_after_the_sr_gives_a_new_sr_that_supersedes_the_first_at_the_hub(
        tmp_path, broker, parts, capsys, monkeypatch):
    hub = start_hub(tmp_path, broker.port)
    parts.append(hub)
    box = Box(tmp_path, broker.port).start()
    parts.append(box)
    study = generate_uid()
    triage(box.store, make_cr(tmp_path / "in" / "1.dcm", study_uid=study, seed=1), "review")
    first, = results_dicom.ensure_results(box.store, study, box_id="box-a")
    wait_until(lambda: _acked(box, 2), timeout=60, what="image and first SR at the hub")

    # The modality sends one more image of the same study after the SR left the box.
    triage(box.store, make_cr(tmp_path / "in" / "2.dcm", study_uid=study, seed=2), "urgent")
    second, = results_dicom.ensure_results(box.store, study, box_id="box-a")
    assert second["sop_instance_uid"] != first["sop_instance_uid"]
    wait_until(lambda: _acked(box, 4), timeout=60, what="second image and SR at the hub")

    s = hub.store.study(study)
    by_sop = {i["sop_instance_uid"]: i for i in s["instances"]}
    assert by_sop[first["sop_instance_uid"]]["superseded_by"] == second["sop_instance_uid"]
    assert by_sop[second["sop_instance_uid"]]["superseded_by"] is None
    assert s["n_instances"] == 2  # result documents are not images

    cfg_path = tmp_path / "hub.toml"
    cfg_path.write_text(f'[hub]\nid = "hub-1"\ndata_dir = "{tmp_path / "hub"}"\n')
    monkeypatch.setattr(sys, "argv", ["wasla-hub"])
    assert hub_cli.main(["--config", str(cfg_path), "--lang", "en", "show", study]) == 0
    out = capsys.readouterr().out
    assert second["sop_instance_uid"] in out and first["sop_instance_uid"] not in out
    assert "1 earlier result document(s) superseded" in out


def test_an_older_sr_arriving_after_its_successor_is_hidden_too(tmp_path):
    from sync.hub.store import HubStore

    store = HubStore.from_config(hub_cfg(tmp_path, 1))
    try:
        study = generate_uid()

        def t(tid):
            return {"device": "box-a", "transfer_id": tid, "sha256": "0" * 64, "size": 3, "label": "urgent"}

        store.commit_instance(t("t2"), "1.2.3.2", study, b"new", counts_as_image=False, supersedes=("1.2.3.1",))
        store.commit_instance(t("t1"), "1.2.3.1", study, b"old", counts_as_image=False)
        rows = {i["sop_instance_uid"]: i["superseded_by"] for i in store.study(study)["instances"]}
        assert rows == {"1.2.3.1": "1.2.3.2", "1.2.3.2": None}
    finally:
        store.close()
