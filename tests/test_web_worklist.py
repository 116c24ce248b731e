"""The radiologists' web worklist: login, lock-out, CSRF, order by urgency then age, filters, the viewer's pixels and
the read form — over Flask's test client on a real hub index, then end to end in a real headless Chromium with a
real `wasla-hub web` process, a real broker, receiver and box: the read typed in Arabic reaches the box."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

import harness
import samples
from boxproc import REPO
from harness import wait_until
from sync.hub import config as hub_config
from sync.hub.store import HubStore
from sync.hub.web.app import create_app
from sync.hub.web.auth import Accounts
from sync.wire import codecs

PASSWORD = "correct horse battery"


def cfg_for(tmp_path: Path, broker_port: int = 1, web_port: int = 8042, **web) -> hub_config.HubConfig:
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in web.items())
    (tmp_path / "hub.toml").write_text(f'[hub]\nid = "hub-1"\ndata_dir = "{tmp_path / "hub"}"\n[broker]\n'
                                       f'port = {broker_port}\nkeepalive_seconds = 10\n[receiver]\nmin_free_mb = 0\n'
                                       f'[web]\nport = {web_port}\n{extra}')
    return hub_config.load(tmp_path / "hub.toml")


def flag(store: HubStore, device: str, label: str, at: float, score: float = 0.5) -> str:
    study = generate_uid()
    store.record_flag(device, {"flag_id": generate_uid()[-16:], "study_uid": study, "label": label, "at": at,
                               "modality": "CR", "n_instances": 1,
                               "reasons": [{"code": "score_above_review", "score": score, "threshold": 0.3}]}, None)
    return study


def file_instance(store: HubStore, device: str, data: bytes) -> str:
    ds = codecs.decode_wire(data)
    t = {"device": device, "transfer_id": generate_uid()[-20:], "sha256": hashlib.sha256(data).hexdigest(),
         "size": len(data), "codec": "x", "label": "urgent"}
    store.commit_instance(t, str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), data)
    return str(ds.SOPInstanceUID)


@pytest.fixture
def site(tmp_path):
    cfg = cfg_for(tmp_path, max_failures=3)
    store = HubStore.from_config(cfg)
    Accounts(store).add_user("benali", PASSWORD, full_name="Dr A. Benali", lang="fr")
    app = create_app(cfg, store)
    app.testing = True
    yield app, store
    store.close()


def log_in(client, user="benali", password=PASSWORD):
    page = client.get("/login")
    pre = re.search(r'name="pre" value="([^"]+)"', page.get_data(as_text=True)).group(1)
    return client.post("/login", data={"username": user, "password": password, "pre": pre, "next": "/"})


def csrf_of(client) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', client.get("/").get_data(as_text=True)).group(1)


def test_pages_need_a_login_and_the_session_cookie_is_httponly_and_samesite_strict(site):
    app, _store = site
    c = app.test_client()
    assert c.get("/").status_code == 302 and "/login" in c.get("/").headers["Location"]
    assert c.get("/api/instance/1.2.3/frame/0").status_code == 401
    rsp = log_in(c)
    assert rsp.status_code == 302
    cookie = next(h for h in rsp.headers.getlist("Set-Cookie") if h.startswith("wasla_session="))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    page = c.get("/")
    assert page.status_code == 200 and "Content-Security-Policy" in page.headers
    assert page.headers["Cache-Control"] == "no-store"


def test_a_login_form_posted_without_its_own_cookie_is_refused(site):
    app, _store = site
    c = app.test_client()
    assert c.post("/login", data={"username": "benali", "password": PASSWORD, "pre": "forged"}).status_code == 403


def test_repeated_wrong_passwords_lock_the_account_even_against_the_right_one_and_unlock_ends_it(site):
    app, store = site
    c = app.test_client()
    for _ in range(3):
        assert log_in(c, password="wrong password!").status_code == 401
    rsp = log_in(c)
    assert rsp.status_code == 401 and "bloqué" in rsp.get_data(as_text=True)
    actions = [r["action"] for r in Accounts(store).audit_log()]
    assert actions.count("login_failed") == 3 and "login_refused" in actions
    Accounts(store).unlock("benali")
    assert log_in(c).status_code == 302


def test_unknown_users_and_stored_hashes_give_nothing_away(site):
    _app, store = site
    row = store.query("SELECT pw_hash FROM web_users WHERE username = 'benali'")[0]
    assert row["pw_hash"].startswith("scrypt$32768$8$1$") and PASSWORD not in row["pw_hash"]
    t0 = time.monotonic()
    assert Accounts(store).login("nobody", PASSWORD) == (None, "bad")
    assert time.monotonic() - t0 > 0.02, "an unknown user must cost a hash check too"


def test_worklist_is_urgent_first_then_oldest_first_and_filters_by_box_region_band_and_unread(site):
    app, store = site
    now = time.time()
    n_old = flag(store, "box-a", "normal", now - 900)
    u_new = flag(store, "box-a", "urgent", now - 60)
    r_old = flag(store, "box-b", "review", now - 3000)
    u_old = flag(store, "box-b", "urgent", now - 600)
    with store.tx() as db:
        db.execute("INSERT INTO box_info (device, region, name) VALUES ('box-b', 'Tamanrasset', 'EPSP In Salah')")
    store.add_read(u_old, "urgent-referral", None, "dr")
    c = app.test_client()
    log_in(c)

    def order(query=""):
        return re.findall(r'data-study="([0-9.]+)"', c.get("/" + query).get_data(as_text=True))

    assert order() == [u_old, u_new, r_old, n_old]
    assert order("?box=box-a") == [u_new, n_old]
    assert order("?region=Tamanrasset") == [u_old, r_old]
    assert order("?band=urgent") == [u_old, u_new]
    assert order("?unread=1") == [u_new, r_old, n_old]
    assert "EPSP In Salah" in c.get("/").get_data(as_text=True)


def test_arabic_pages_are_right_to_left_and_translated(site):
    app, store = site
    flag(store, "box-a", "urgent", time.time())
    c = app.test_client()
    log_in(c)
    page = c.get("/?lang=ar").get_data(as_text=True)
    assert '<html lang="ar" dir="rtl">' in page and "قائمة العمل" in page and "عاجل" in page
    assert '<html lang="ar" dir="rtl">' in c.get("/").get_data(as_text=True), "the choice is remembered"


def test_a_read_without_the_session_csrf_token_is_refused_and_audited(site):
    app, store = site
    study = flag(store, "box-a", "urgent", time.time())
    c = app.test_client()
    log_in(c)
    assert c.post(f"/study/{study}/read", data={"disposition": "normal"}).status_code == 403
    assert c.post(f"/study/{study}/read", data={"disposition": "normal", "csrf": "x" * 43}).status_code == 403
    assert store.query("SELECT COUNT(*) AS n FROM reads")[0]["n"] == 0
    assert "csrf_refused" in [r["action"] for r in Accounts(store).audit_log()]


def test_a_read_is_stored_with_its_coded_findings_audited_and_handed_to_the_publisher(tmp_path):
    cfg = cfg_for(tmp_path)
    store = HubStore.from_config(cfg)
    Accounts(store).add_user("benali", PASSWORD, full_name="Dr A. Benali")
    sent = []
    app = create_app(cfg, store, publish=lambda r: sent.append(r) or True)
    study = flag(store, "box-a", "urgent", time.time())
    c = app.test_client()
    log_in(c)
    rsp = c.post(f"/study/{study}/read", data={"csrf": csrf_of(c), "disposition": "urgent-referral",
                                               "finding": ["233604007", "60046008", "bogus"],
                                               "note": "évacuer vers Tamanrasset"})
    assert rsp.status_code == 302
    r = store.query("SELECT * FROM reads")[0]
    assert r["disposition"] == "urgent-referral" and r["by"] == "Dr A. Benali" and r["published_at"]
    assert json.loads(r["findings"]) == ["233604007", "60046008"]
    assert r["note"].startswith("Pneumonie; Épanchement pleural")  # the reader's language (fr)
    assert "Tamanrasset" in r["note"]
    assert sent and sent[0]["read_id"] == r["read_id"]
    audit = [a for a in Accounts(store).audit_log() if a["action"] == "read"]
    assert audit[0]["username"] == "benali" and audit[0]["study_uid"] == study
    store.close()


@pytest.mark.parametrize("codec", ["jpegxl:2", "jpegls", "original"])
def test_the_viewer_gets_the_stored_pixels_whatever_the_wire_codec(site, tmp_path, codec):
    app, store = site
    src = samples.fresh_copy(samples.sample_path("US1_UNCR.dcm" if codec == "jpegxl:2" else "CT_small.dcm"),
                             tmp_path / "x.dcm")
    data = src.read_bytes() if codec == "original" else codecs.encode_for_wire(src, codecs=[codec]).data
    sop = file_instance(store, "box-a", data)
    c = app.test_client()
    log_in(c)
    rsp = c.get(f"/api/instance/{sop}/frame/0")
    assert rsp.status_code == 200
    meta = json.loads(rsp.headers["X-Wasla-Frame"])
    original = codecs.decode_frames(codecs.read_dataset(src.read_bytes())[0])[0]
    got = np.frombuffer(rsp.data, dtype=np.dtype(meta["dtype"]).newbyteorder("<")).reshape(original.shape)
    assert np.array_equal(got, original) and meta["window_width"] > 0
    assert "view_image" in [a["action"] for a in Accounts(store).audit_log()]


# --- in a real browser ------------------------------------------------------------------------------------------

def chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not browser or not Path(driver).exists():
        return None
    try:
        import selenium  # noqa: F401
    except ImportError:
        return None
    return browser, driver


@pytest.mark.skipif(chromium() is None, reason="needs Debian's chromium + chromium-driver and selenium (scripts/setup.sh)")
def _three_studies_at_the_hub(tmp_path, broker, parts):
    from test_sync_support import Box, make_cr, start_hub, triage

    hub = start_hub(tmp_path, broker.port)
    parts.append(hub)
    box = Box(tmp_path, broker.port, heartbeat_seconds=5.0).start()
    parts.append(box)
    files = [make_cr(tmp_path / "in" / f"{i}.dcm", seed=i, side=96) for i in range(3)]
    for f, label in zip(files, ["normal", "urgent", "review"]):
        triage(box.store, f, label)
    wait_until(lambda: hub.store.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 3, timeout=60,
               what="studies at the hub")
    return hub, box


def _headless_chrome(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'chrome'}"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver_path), options=opts)


def _wasla_show_in_arabic(tmp_path, box, study: str) -> subprocess.CompletedProcess:
    """What the clinic's technician sees: `wasla show` on the box."""
    box_toml = tmp_path / "box.toml"
    box_toml.write_text(f'[box]\nid = "box-a"\ndata_dir = "{box.cfg.box.data_dir}"\n[models]\n'
                        f'dir = "{tmp_path}"\ntrusted_keys = []\n[storage]\nmin_free_mb = 0\n')
    return subprocess.run([sys.executable, "-m", "edge.cli", "--config", str(box_toml), "--lang", "ar",
                           "show", study], capture_output=True, text=True, cwd=REPO, timeout=60)


def _french_pages_and_pilot_figures(driver, base: str, shots: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.get(base + "/?lang=fr")
    assert driver.find_element(By.TAG_NAME, "html").get_attribute("dir") == "ltr"
    driver.save_screenshot(str(shots / "worklist-fr.png"))
    driver.find_element(By.CSS_SELECTOR, "#worklist tbody tr a.band").click()
    wait_until(lambda: driver.find_element(By.ID, "canvas").get_attribute("data-loaded"), timeout=15,
               what="the image in the viewer")
    driver.save_screenshot(str(shots / "study-fr.png"))
    for lang in ("fr", "ar"):
        driver.get(f"{base}/kpi?lang={lang}")
        assert driver.find_element(By.ID, "kpi-studies").text == "3"
        driver.save_screenshot(str(shots / f"kpi-{lang}.png"))


def test_radiologist_logs_in_opens_the_urgent_study_and_an_arabic_read_reaches_the_box(tmp_path, broker, parts):
    from selenium.webdriver.common.by import By

    hub, box = _three_studies_at_the_hub(tmp_path, broker, parts)
    web_port = harness.free_port()
    cfg_for(tmp_path, broker_port=broker.port, web_port=web_port)
    (tmp_path / "pw").write_text(PASSWORD)
    hub_cli = [sys.executable, "-m", "sync.hub.cli", "--config", str(tmp_path / "hub.toml")]
    subprocess.run([*hub_cli, "user", "add", "benali", "--name", "د. بن علي", "--lang", "ar", "--password-file",
                    str(tmp_path / "pw")], check=True, cwd=REPO, timeout=60, capture_output=True)
    log = open(tmp_path / "web.log", "ab")
    web = subprocess.Popen([*hub_cli, "web"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        harness.wait_for_port(web_port, proc=web, timeout=60)
        driver = _headless_chrome(tmp_path)
        try:
            base = f"http://127.0.0.1:{web_port}"
            driver.get(base + "/")
            driver.find_element(By.ID, "username").send_keys("benali")
            driver.find_element(By.ID, "password").send_keys(PASSWORD)
            driver.find_element(By.ID, "login").click()
            wait_until(lambda: driver.find_elements(By.ID, "worklist"), timeout=10, what="the worklist")
            assert driver.find_element(By.TAG_NAME, "html").get_attribute("dir") == "rtl"
            rows = driver.find_elements(By.CSS_SELECTOR, "#worklist tbody tr")
            assert [r.get_attribute("class") for r in rows] == ["band-urgent", "band-review", "band-normal"]
            shots = Path(os.environ.get("WASLA_SCREENSHOTS") or tmp_path)  # docs/ screenshots come from here
            driver.save_screenshot(str(shots / "worklist-ar.png"))
            rows[0].find_element(By.CSS_SELECTOR, "a.band").click()
            wait_until(lambda: driver.find_element(By.ID, "canvas").get_attribute("data-loaded"), timeout=15,
                       what="the image in the viewer")
            # The canvas holds the image: some pixels are not black.
            lit = driver.execute_script(
                "const c=document.getElementById('canvas');const d=c.getContext('2d').getImageData(0,0,c.width,"
                "c.height).data;let n=0;for(let i=0;i<d.length;i+=4){if(d[i]>0)n++;}return n;")
            assert lit > 100
            driver.find_element(By.CSS_SELECTOR, "input[name=disposition][value=urgent-referral]").click()
            driver.find_element(By.CSS_SELECTOR, "input[name=finding][value='233604007']").click()
            note = "التهاب رئوي في الفص السفلي الأيمن، يُحال إلى المستشفى"
            driver.find_element(By.ID, "note").send_keys(note)
            driver.save_screenshot(str(shots / "study-ar.png"))
            submitted = time.monotonic()
            driver.find_element(By.ID, "submit-read").click()
            study = hub.store.query("SELECT study_uid FROM studies WHERE label = 'urgent'")[0]["study_uid"]
            wait_until(lambda: box.store.study(study)["read_disposition"] == "urgent-referral", timeout=10,
                       what="the read at the box")
            at_box = time.monotonic() - submitted
            assert note in box.store.study(study)["read_note"]
            shown = _wasla_show_in_arabic(tmp_path, box, study)
            assert shown.returncode == 0 and note in shown.stdout and "د. بن علي" in shown.stdout
            # The page shows the clinic has it, without a reload (the box's receipt rides its next heartbeat).
            wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, "td.delivery[data-delivered='1']"),
                       timeout=15, what="delivery shown on the page")
            assert at_box < 10
            _french_pages_and_pilot_figures(driver, base, shots)
        finally:
            driver.quit()
    finally:
        harness.stop_process(web)
        log.close()


def test_pilot_figures_count_bands_times_and_false_normals_and_export_them(site):
    app, store = site
    base = time.time() - 7200
    studies = {}
    for i, (label, disposition, read_after, delivered_after) in enumerate([
            ("urgent", "urgent-referral", 600, 20), ("urgent", "abnormal", 1800, 40), ("review", "normal", 3600, None),
            ("normal", "abnormal", 5000, 10), ("normal", None, None, None)]):
        uid = flag(store, "box-a", label, base + i)
        with store.tx() as db:  # the flag reached the hub 3 s after the box triaged it
            db.execute("UPDATE flags SET received_at = ? WHERE study_uid = ?", [base + i + 3, uid])
        if disposition:
            r = store.add_read(uid, disposition, None, "dr")
            with store.tx() as db:
                db.execute("UPDATE reads SET at = ?, delivered_at = ? WHERE read_id = ?",
                           [base + i + 3 + read_after,
                            None if delivered_after is None else base + i + 3 + read_after + delivered_after,
                            r["read_id"]])
        studies[uid] = label
    from sync.hub.web.kpi import pilot_figures

    fig = pilot_figures(store)
    o = fig["overall"]
    assert o["studies"] == 5 and o["bands"] == {"urgent": 2, "review": 1, "normal": 2} and o["read"] == 4
    assert o["must_read_share"] == pytest.approx(0.6)
    assert o["flag_to_hub_s"]["median"] == pytest.approx(3, abs=0.01)
    assert o["flag_to_read_s"]["median"] == pytest.approx((1800 + 3600) / 2, abs=0.01)
    assert o["urgent_flag_to_read_s"]["median"] == pytest.approx(1200, abs=0.01)
    assert o["read_to_clinic_s"]["median"] == pytest.approx(20, abs=0.01)
    c = fig["confusion"]
    assert c["false_normal"] == 1 and c["read_ai_normal"] == 1 and c["table"]["urgent"]["urgent-referral"] == 1
    c_ = app.test_client()
    log_in(c_)
    page = c_.get("/kpi").get_data(as_text=True)
    assert re.search(r'id="kpi-false-normal">1<', page) and re.search(r'id="kpi-must-read">60 %<', page)
    csv_text = c_.get("/kpi.csv").get_data(as_text=True)
    assert csv_text.splitlines()[1].startswith("overall,all,5,2,1,2,0.600,4,3.000")
    assert c_.get("/kpi.json").get_json()["overall"]["studies"] == 5
