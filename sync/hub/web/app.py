"""The radiologists' web worklist served by the hub (Flask): login, the worklist by urgency then age, a study page
with a windowing viewer and the read form, reads sent down to the clinic at once and their delivery shown."""
from __future__ import annotations

import gettext
import json
import logging
import secrets
import time
from functools import lru_cache, wraps
from pathlib import Path

from flask import Flask, Response, abort, g, jsonify, redirect, render_template, request, send_file, url_for

from sync.core.errors import BadInputError, NotFoundError, WaslaError
from sync.core.i18n import DOMAIN, LABEL_NAMES, LANGUAGES, LOCALE_DIR, REASON_TEXTS, RTL_LANGUAGES, N_, normalize
from sync.hub.read_report import READ_DISPOSITIONS, READ_FINDINGS
from sync.hub.web.auth import Accounts

log = logging.getLogger(__name__)

COOKIE, PRE_COOKIE, LANG_COOKIE = "wasla_session", "wasla_login", "wasla_lang"
# The read's vocabulary (dispositions, coded findings) lives with the report that files it.
DISPOSITIONS, FINDINGS = READ_DISPOSITIONS, READ_FINDINGS
MAX_NOTE = 2000


@lru_cache(maxsize=None)
def _catalogue(lang: str) -> gettext.NullTranslations:
    return gettext.translation(DOMAIN, LOCALE_DIR, languages=[lang], fallback=True)


def translate(lang: str, message: str) -> str:
    # HTML gets plain translations: direction comes from dir="rtl" and <bdi>, not from terminal isolates.
    return _catalogue(lang).gettext(message) if message else message


def describe(reason: dict, lang: str) -> str:
    text = REASON_TEXTS.get(reason.get("code", ""))
    params = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in reason.items() if k != "code"}
    if text is None:
        return " ".join([str(reason.get("code", "")), *(f"{k}={v}" for k, v in params.items())])

    class _Missing(dict):
        def __missing__(self, key):
            return "?"

    if "label" in params:
        params["label"] = translate(lang, LABEL_NAMES.get(str(params["label"]), str(params["label"])))
    return translate(lang, text).format_map(_Missing(params))


def create_app(cfg, store, publish=None) -> Flask:
    """`publish(read) -> bool` sends a read to its box now (the web process's MQTT client); None: the receiver sends
    it on the box's next heartbeat or reconnect."""
    app = Flask(__name__, template_folder=str(Path(__file__).parent / "templates"),
                static_folder=str(Path(__file__).parent / "static"))
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024
    w = cfg.web
    accounts = Accounts(store, session_hours=w.session_hours, idle_minutes=w.idle_minutes,
                        max_failures=w.max_failures, lockout_minutes=w.lockout_minutes)
    app.extensions["wasla"] = {"accounts": accounts, "store": store}

    login_required = _login_required(accounts)
    _session_hooks(app, accounts, w)
    @app.errorhandler(NotFoundError)
    def _not_found(_err):
        return render_template("error.html", message=translate(g.lang, N_("Not found."))), 404

    @app.errorhandler(BadInputError)
    def _bad(err):
        return render_template("error.html", message=str(err)), 422

    _auth_routes(app, accounts, w, login_required)
    _study_routes(app, cfg, store, accounts, login_required)
    _read_route(app, cfg, store, accounts, login_required, publish)
    _report_routes(app, store, accounts, login_required)
    return app


def _session_hooks(app: Flask, accounts: Accounts, w) -> None:
    """Who is asking (session, language) before each request; the security headers and language cookie after."""

    def lang_of(user: dict | None) -> str:
        for code in (request.args.get("lang"), request.cookies.get(LANG_COOKIE), (user or {}).get("lang")):
            if normalize(code):
                return normalize(code)
        return request.accept_languages.best_match(LANGUAGES) or "fr"

    @app.before_request
    def _load_session():
        g.user = accounts.session(request.cookies.get(COOKIE))
        g.lang = lang_of(g.user)
        g.remote = request.remote_addr or ""

    @app.context_processor
    def _helpers():
        return {"_": lambda m: translate(g.lang, m), "lang": g.lang, "rtl": g.lang in RTL_LANGUAGES,
                "user": g.user, "csrf": g.user["csrf"] if g.user else "", "languages": LANGUAGES,
                "label_name": lambda code: translate(g.lang, LABEL_NAMES.get(code or "pending", code or "")),
                "when": _when, "dispositions": DISPOSITIONS, "findings": FINDINGS, "duration": _duration}

    @app.after_request
    def _headers(rsp: Response) -> Response:
        rsp.headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self' data: blob:; "
                                                  "frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
        rsp.headers["X-Content-Type-Options"] = "nosniff"
        rsp.headers["Referrer-Policy"] = "no-referrer"
        rsp.headers["X-Frame-Options"] = "DENY"
        if g.get("user"):
            rsp.headers["Cache-Control"] = "no-store"  # patient data stays off the shared PC's disk cache
        if request.args.get("lang") and normalize(request.args["lang"]):
            rsp.set_cookie(LANG_COOKIE, normalize(request.args["lang"]), max_age=365 * 86400, samesite="Strict",
                           secure=w.secure_cookies)
        return rsp



def _login_required(accounts: Accounts):
    """The decorator: a session for every view, and a matching CSRF token for every POST."""

    def login_required(view):
        @wraps(view)
        def wrapper(*args, **kwargs):
            if g.user is None:
                if request.path.startswith("/api/") or request.method != "GET":
                    abort(401)
                return redirect(url_for("login", next=request.full_path if request.args else request.path))
            if request.method == "POST" and not accounts.csrf_ok(g.user, request.form.get("csrf")):
                accounts.audit(g.user["username"], "csrf_refused", detail=request.path, remote=g.remote)
                abort(403)
            return view(*args, **kwargs)
        return wrapper

    return login_required


def _auth_routes(app: Flask, accounts: Accounts, w, login_required) -> None:
    """Log in (double-submit CSRF, lockout) and out."""

    # --- login ------------------------------------------------------------------------------------------------
    @app.route("/login", methods=["GET", "POST"])
    def login():
        error = None
        if request.method == "POST":
            # Login CSRF: a random value in a cookie and in the form must match (double submit).
            pre = request.cookies.get(PRE_COOKIE)
            if not pre or not secrets.compare_digest(pre, request.form.get("pre", "")):
                abort(403)
            token, outcome = accounts.login(request.form.get("username", "").strip()[:64],
                                            request.form.get("password", "")[:256], remote=g.remote)
            if token:
                target = request.form.get("next") or "/"
                if not target.startswith("/") or target.startswith("//"):
                    target = "/"  # no open redirect
                rsp = redirect(target)
                rsp.set_cookie(COOKIE, token, httponly=True, samesite="Strict", secure=w.secure_cookies,
                               max_age=int(w.session_hours * 3600))
                rsp.delete_cookie(PRE_COOKIE)
                return rsp
            error = (N_("Account locked after too many failed attempts: try again later or ask an administrator.")
                     if outcome == "locked" else N_("Wrong user name or password."))
        pre = secrets.token_urlsafe(24)
        rsp = Response(render_template("login.html", error=error, pre=pre, next=request.args.get("next", "")),
                       status=401 if error else 200)
        rsp.set_cookie(PRE_COOKIE, pre, httponly=True, samesite="Strict", secure=w.secure_cookies, max_age=3600)
        return rsp

    @app.post("/logout")
    @login_required
    def logout():
        accounts.logout(request.cookies.get(COOKIE, ""))
        accounts.audit(g.user["username"], "logout", remote=g.remote)
        rsp = redirect(url_for("login"))
        rsp.delete_cookie(COOKIE)
        return rsp



def _study_routes(app: Flask, cfg, store, accounts: Accounts, login_required) -> None:
    """The worklist, a study's page, its preview, reads and the viewer's frames."""

    # --- worklist ---------------------------------------------------------------------------------------------
    @app.get("/")
    @login_required
    def worklist():
        f = {k: request.args.get(k, "").strip() for k in ("box", "region", "band")}
        f["unread"] = request.args.get("unread") == "1"
        rows = study_rows(store, **f)
        boxes = store.query("SELECT b.device, i.region, i.name FROM boxes b LEFT JOIN box_info i ON "
                            "i.device = b.device ORDER BY b.device")
        regions = sorted({b["region"] for b in boxes if b["region"]})
        return render_template("worklist.html", rows=rows, boxes=boxes, regions=regions, f=f, now=time.time())

    @app.get("/study/<uid>")
    @login_required
    def study(uid: str):
        s = store.study(uid)
        accounts.audit(g.user["username"], "view_study", study_uid=s["study_uid"], remote=g.remote)
        s["reason_texts"] = [describe(r, g.lang) for r in json.loads(s.get("reasons") or "[]")]
        from sync.hub.read_report import SR_CLASS_PREFIX

        images = [i for i in s["instances"] if not i.get("superseded_by")
                  and not (i.get("sop_class_uid") or "").startswith(SR_CLASS_PREFIX)]
        reads = reads_of(store, s["study_uid"])
        return render_template("study.html", s=s, images=images, reads=reads, pacs_url=pacs_link(s, images))

    def pacs_link(s: dict, images: list[dict]) -> str | None:
        if not cfg.pacs.web_url or not images:
            return None
        from sync.hub.forward import orthanc_study_id
        from sync.wire.codecs import read_dataset

        try:
            ds, _raw = read_dataset((store.studies_dir / images[0]["path"]).read_bytes())
            patient_id = str(ds.get("PatientID", "") or "")
        except Exception:  # noqa: BLE001 - no link rather than no page
            return None
        return (f"{cfg.pacs.web_url.rstrip('/')}/app/explorer.html#study?uuid="
                f"{orthanc_study_id(patient_id, s['study_uid'])}")

    @app.get("/study/<uid>/preview.jpg")
    @login_required
    def preview(uid: str):
        s = store.study(uid)
        if not s.get("preview_path") or not Path(s["preview_path"]).is_file():
            abort(404)
        return send_file(s["preview_path"], mimetype="image/jpeg", max_age=0)

    @app.get("/api/study/<uid>/reads")
    @login_required
    def reads_json(uid: str):
        s = store.study(uid)
        return jsonify([{k: r[k] for k in ("read_id", "disposition", "by", "at", "published_at", "delivered_at")}
                        for r in reads_of(store, s["study_uid"])])

    @app.get("/api/instance/<sop>/frame/<int:index>")
    @login_required
    def frame(sop: str, index: int):
        from sync.hub.web.pixels import frame_for_viewer

        rows = store.query("SELECT i.path, i.study_uid FROM instances i WHERE i.sop_instance_uid = ?", [sop])
        if not rows:
            abort(404)
        accounts.audit(g.user["username"], "view_image", study_uid=rows[0]["study_uid"], detail=sop,
                       remote=g.remote)
        try:
            meta, pixels = frame_for_viewer((store.studies_dir / rows[0]["path"]).read_bytes(), index)
        except (BadInputError, WaslaError) as err:
            return jsonify({"error": str(err)}), 422
        rsp = Response(pixels, mimetype="application/octet-stream")
        rsp.headers["X-Wasla-Frame"] = json.dumps(meta)
        return rsp



def _read_route(app: Flask, cfg, store, accounts: Accounts, login_required, publish) -> None:
    """The radiologist's read: stored, audited, filed as a DICOM report, and sent to the clinic now if it can be."""

    @app.post("/study/<uid>/read")
    @login_required
    def read(uid: str):
        s = store.study(uid)
        disposition = request.form.get("disposition", "")
        if disposition not in DISPOSITIONS:
            raise BadInputError(translate(g.lang, N_("Choose a disposition.")))
        findings = [c for c in request.form.getlist("finding") if c in FINDINGS]
        note = request.form.get("note", "").strip()[:MAX_NOTE]
        # The box shows the note as the clinic's copy of the read: the findings go with it in the reader's language.
        names = [translate(g.lang, FINDINGS[c]) for c in findings]
        text = "\n".join(filter(None, ["; ".join(names), note])) or None
        by = g.user["full_name"] or g.user["username"]
        r = store.add_read(s["study_uid"], disposition, text, by, findings=findings)
        accounts.audit(g.user["username"], "read", study_uid=s["study_uid"],
                       detail=f"{disposition} {','.join(findings)}".strip(), remote=g.remote)
        try:  # the read as a DICOM report, filed with the study (and so forwarded to the PACS)
            from sync.hub.read_report import file_report

            file_report(store, r, hub_id=cfg.hub.id)
        except Exception as err:  # noqa: BLE001 - the read itself is stored and goes to the clinic regardless
            log.warning("read %s: no DICOM report filed (%s)", r["read_id"], type(err).__name__)
        if publish is not None:
            try:
                if publish(r):
                    store.read_published(r["read_id"])
            except Exception as err:  # noqa: BLE001 - the read is stored; the receiver re-sends it
                log.warning("read %s not published now (%s); the receiver sends it later", r["read_id"],
                            type(err).__name__)
        return redirect(url_for("study", uid=s["study_uid"], saved=r["read_id"]))



def _report_routes(app: Flask, store, accounts: Accounts, login_required) -> None:
    """Pilot figures (page, JSON, CSV), the audit log, and the health check."""

    @app.get("/kpi")
    @login_required
    def kpi():
        from sync.hub.web.kpi import BANDS, DISPOSITIONS as READS, pilot_figures

        return render_template("kpi.html", fig=pilot_figures(store), bands=BANDS, reads=READS)

    @app.get("/kpi.json")
    @login_required
    def kpi_json():
        from sync.hub.web.kpi import pilot_figures

        accounts.audit(g.user["username"], "export_kpi", detail="json", remote=g.remote)
        return jsonify(pilot_figures(store))

    @app.get("/kpi.csv")
    @login_required
    def kpi_csv():
        from sync.hub.web.kpi import pilot_figures, to_csv

        accounts.audit(g.user["username"], "export_kpi", detail="csv", remote=g.remote)
        return Response(to_csv(pilot_figures(store)), mimetype="text/csv",
                        headers={"Content-Disposition": "attachment; filename=wasla-pilot.csv"})

    @app.get("/audit")
    @login_required
    def audit():
        if g.user["role"] != "admin":
            abort(403)
        return render_template("audit.html", rows=accounts.audit_log(500))

    @app.get("/healthz")
    def healthz():
        store.query("SELECT 1 AS ok")  # the index answers, or this fails and the watchdog is not fed
        return jsonify({"ok": True})



def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


def study_rows(store, *, box: str = "", region: str = "", band: str = "", unread: bool = False,
               limit: int = 500) -> list[dict]:
    """The worklist: urgent, then review, then normal; oldest first within a band (the longest wait is read first)."""
    where, params = [], []
    if box:
        where.append("s.device = ?")
        params.append(box)
    if region:
        where.append("i.region = ?")
        params.append(region)
    if band in LABEL_NAMES:
        where.append("s.label = ?")
        params.append(band)
    if unread:
        where.append("s.read_disposition IS NULL")
    sql = ("SELECT s.study_uid, s.device, s.label, s.modality, s.n_instances, s.n_expected, s.reasons, "
           "s.preview_path, s.read_disposition, s.read_by, s.read_at, COALESCE(s.flagged_at, s.first_seen) AS since, "
           "i.region, i.name AS box_name FROM studies s LEFT JOIN box_info i ON i.device = s.device "
           + ("WHERE " + " AND ".join(where) if where else "")
           + " ORDER BY CASE s.label WHEN 'urgent' THEN 0 WHEN 'review' THEN 1 WHEN 'normal' THEN 2 ELSE 3 END, "
             "since ASC LIMIT ?")
    rows = store.query(sql, [*params, limit])
    for r in rows:
        reasons = json.loads(r.pop("reasons") or "[]")
        r["score"] = next((x.get("score") for x in reasons if isinstance(x, dict) and "score" in x), None)
    return rows


def reads_of(store, study_uid: str) -> list[dict]:
    rows = store.query("SELECT * FROM reads WHERE study_uid = ? ORDER BY at DESC", [study_uid])
    for r in rows:
        r["findings"] = json.loads(r.get("findings") or "[]")
    return rows
