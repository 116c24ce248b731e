"""`wasla report`: the one-page printable triage report (HTML with an inline thumbnail and print CSS) in en/fr/ar.

The patient reference (name, Patient ID, Accession Number: two identifiers, as a report needs) is read from the stored DICOM file when the report is made:
the store never holds it, and it goes only into the clinic's own printed page — never into a log line.

The words are kept here, per language, rather than in the gettext catalogue: the report is a document whose
language is chosen per call (one process renders all three in scripts/render_report.py), it must print in French
or Arabic on a box where no compiled catalogue is installed, and its reason sentences take parameters
(score, threshold) whose order differs between languages.
"""
from __future__ import annotations

import base64
import datetime as dt
import html
import logging
from collections.abc import Mapping
from pathlib import Path

import cv2
import pydicom

from edge import imaging
from sync.core.errors import BadInputError, NotFoundError, WaslaError
from sync.core.i18n import N_, translator
from edge.results_dicom import is_derived, key_instance, result_score, triaged_sources
from edge.store import QUARANTINED, Store

log = logging.getLogger(__name__)

LANGUAGES = ("en", "fr", "ar")
RTL = {"ar"}
_THUMB_SIDE = 560

# The page's words: key -> English text, the msgid; French and Arabic come from the CLIs' gettext catalogues
# (sync/core/locale), so a translator edits one place.
_SOURCE: dict[str, str] = {
    "title": N_("Triage report"),
    "not_clinical": N_("NOT FOR CLINICAL USE"),
    "disclaimer": N_("Automated triage: it orders the reading list, it is not a diagnosis. A radiologist reads every study."),
    "patient_name": N_("Patient name"),
    "patient_id": N_("Patient ID"),
    "accession": N_("Accession number"),
    "study_date": N_("Study date"),
    "modality": N_("Modality"),
    "description": N_("Description"),
    "images": N_("Images"),
    "received": N_("Received"),
    "result": N_("Triage result"),
    "reasons": N_("Reasons"),
    "model": N_("Model"),
    "version": N_("Version"),
    "backend": N_("Runtime"),
    "score": N_("Score"),
    "thresholds": N_("Thresholds (review / urgent)"),
    "image": N_("Image"),
    "read": N_("Radiologist's read"),
    "awaiting": N_("Not read yet: the study is waiting at the hub."),
    "by": N_("by"),
    "note": N_("Note"),
    "generated": N_("Generated"),
    "box": N_("Box"),
    "study": N_("Study"),
    "key_image": N_("Key image"),
    "no_image": N_("No image could be shown"),
    "unreadable": N_("Images the box could not read"),
    "urgent": N_("URGENT"),
    "review": N_("REVIEW"),
    "normal": N_("NORMAL"),
    "pending": N_("PENDING"),
    "score_above_urgent": N_("Score {score} is at or above the urgent threshold {threshold}."),
    "score_above_review": N_("Score {score} is at or above the review threshold {threshold}."),
    "score_below_review": N_("Score {score} is below the review threshold {threshold}."),
    "low_confidence": N_("Low confidence: the most likely finding ({label}) is at {confidence}, below {threshold}."),
    "no_model": N_("No installed model reads this kind of image: a person must look at it."),
    "no_matching_model": N_("No installed model reads this kind of image ({modality}): a person must look at it."),
    "instance_quarantined": N_("An image could not be read by the box: a person must look at it."),
    "disp_normal": N_("Normal"),
    "disp_abnormal": N_("Abnormal"),
    "disp_urgent-referral": N_("Urgent referral"),
    "disp_repeat-image": N_("Repeat the image"),
}


class _Texts(Mapping):
    """TEXT[lang]: every key of the page in that language (the English text where a translation is missing)."""

    def __init__(self) -> None:
        self._cache: dict[str, dict[str, str]] = {}

    def __getitem__(self, lang: str) -> dict[str, str]:
        if lang not in LANGUAGES:
            raise KeyError(lang)
        if lang not in self._cache:
            tr = translator(lang)
            self._cache[lang] = {key: tr(text) for key, text in _SOURCE.items()}
        return self._cache[lang]

    def __iter__(self):
        return iter(LANGUAGES)

    def __len__(self) -> int:
        return len(LANGUAGES)


TEXT = _Texts()


def reason_sentence(reason: dict, lang: str) -> str:
    t = TEXT[lang]
    code = str(reason.get("code", ""))
    if code not in t:
        return code  # a code newer than this table: shown as is rather than dropped
    params = {k: _ltr(html.escape(str(v))) for k, v in reason.items() if k != "code"}
    try:
        return html.escape(t[code]).format(**params)
    except (KeyError, IndexError):  # a reason without the parameters its sentence names
        return html.escape(code)


def person_name(value) -> str:
    """A DICOM PN as a person reads it: its alphabetic group, components ("Family^Given^Middle") as words."""
    if not value:
        return ""
    alphabetic = str(value).split("=")[0]
    return " ".join(part for part in alphabetic.split("^") if part).strip()


def _ltr(text: str) -> str:
    # Numbers, UIDs and model names stay left-to-right inside Arabic sentences.
    return f'<bdi dir="ltr">{text}</bdi>'


def _date(value: str) -> str:
    v = (value or "").strip()
    return f"{v[:4]}-{v[4:6]}-{v[6:8]}" if len(v) == 8 and v.isdigit() else v


def _ts(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M") if t else ""


def _thumbnail_png(path: Path, max_pixels: int) -> str | None:
    try:
        ds = pydicom.dcmread(path)
        frame = imaging.render(ds, min_side=_THUMB_SIDE // 2, max_pixels=max_pixels)[0]
    except (WaslaError, OSError, ValueError, AttributeError) as err:
        log.warning("report: no thumbnail from %s: %s", path.name, type(err).__name__)
        return None
    img = imaging.thumbnail(frame, _THUMB_SIDE)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", img)
    return base64.b64encode(buf.tobytes()).decode() if ok else None


def gather(store: Store, study_uid: str, *, box_id: str, max_pixels: int = 100_000_000) -> dict:
    """Everything the page shows. The patient reference comes from the stored DICOM file, now."""
    study = store.study(study_uid)
    sources = triaged_sources(study)
    own = [i for i in study["instances"] if not is_derived(i)]
    readable = sources or [i for i in own if i["state"] != QUARANTINED]
    if not readable:
        raise NotFoundError(f"study {study['study_uid']} has no stored image to report on")
    key = key_instance(sources) if sources else readable[0]
    try:
        header = pydicom.dcmread(store.instance_path(key), stop_before_pixels=True)
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for a file gone bad
        raise BadInputError(f"cannot read instance #{key['id']} for the report: {type(err).__name__}") from err
    models = []
    for inst in sources:
        for res in inst["results"]:
            if res["model"]:
                models.append({"image": inst["id"], "model": res["model"], "version": res["model_version"],
                               "backend": res["backend"], "score": result_score(res),
                               "thresholds": res["thresholds"] or {}, "label": res["label"]})
    reasons = list(study["reasons"] or [])
    for inst in sources:
        for res in inst["results"]:
            reasons += [r for r in res["reasons"] or [] if r not in reasons]
    return {
        "box": box_id, "study_uid": study["study_uid"], "label": study["label"], "reasons": reasons,
        "patient_name": person_name(header.get("PatientName")),
        "patient_id": str(header.get("PatientID", "") or ""),
        "accession": str(header.get("AccessionNumber", "") or ""),
        "study_date": _date(str(header.get("StudyDate", "") or "")),
        "description": str(header.get("StudyDescription", "") or ""),
        "modality": study["modality"] or str(header.get("Modality", "") or ""),
        "images": len(own), "unreadable": sum(1 for i in own if i["state"] == QUARANTINED),
        "received": _ts(study["first_received_at"]), "models": models,
        "thumbnail_png_b64": _thumbnail_png(store.instance_path(key), max_pixels),
        "read": {k: study.get(f"read_{k}") for k in ("disposition", "note", "by", "at")},
        "generated": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
    }


_CSS = """
@page { size: A4; margin: 12mm; }
* { box-sizing: border-box; }
body { font-family: "Noto Sans", "Noto Sans Arabic", "Noto Naskh Arabic", "DejaVu Sans", Arial, sans-serif;
       color: #111; margin: 0 auto; max-width: 186mm; font-size: 10.5pt; line-height: 1.35; background: #fff; }
header { display: flex; justify-content: space-between; align-items: baseline; border-bottom: 2px solid #111;
         padding: 4mm 0 2mm; }
h1 { font-size: 18pt; margin: 0; }
.meta { color: #444; font-size: 9pt; text-align: end; }
.banner { background: #fff3b0; border: 2px solid #b58900; font-weight: bold; padding: 2mm 3mm; margin: 3mm 0;
          font-size: 10pt; }
.banner span { font-weight: normal; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: start; padding: 1.2mm 2mm; border-bottom: 1px solid #ddd; vertical-align: top; }
th { color: #444; font-weight: normal; width: 38%; }
.ids td { font-size: 12pt; font-weight: bold; }
.result { display: flex; gap: 5mm; align-items: center; margin: 4mm 0; }
.label { font-size: 22pt; font-weight: bold; color: #fff; padding: 2mm 6mm; border-radius: 2mm; white-space: nowrap; }
.label-urgent { background: #c81e1e; } .label-review { background: #d78c00; } .label-normal { background: #1e823c; }
.label-pending { background: #777; }
ul { margin: 0; padding-inline-start: 5mm; }
.grid { display: grid; grid-template-columns: 88mm minmax(0, 1fr); gap: 5mm; align-items: start; }
figure { margin: 0; text-align: center; }
figure img { max-width: 88mm; max-height: 100mm; border: 1px solid #999; background: #000; }
figcaption { font-size: 8.5pt; color: #555; }
h2 { font-size: 11.5pt; margin: 4mm 0 1.5mm; border-bottom: 1px solid #999; }
.models { margin-top: 3mm; } .models td, .models th { font-size: 9pt; width: auto; overflow-wrap: anywhere; }
.read { border: 1px solid #999; padding: 0 3mm 2mm; }
footer { margin-top: 4mm; font-size: 8pt; color: #555; border-top: 1px solid #999; padding-top: 1.5mm; }
bdi { unicode-bidi: isolate; } .nowrap { white-space: nowrap; }
@media print { body { max-width: none; } .banner { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  .label { -webkit-print-color-adjust: exact; print-color-adjust: exact; } section, .grid { break-inside: avoid; } }
"""


def render_html(data: dict, lang: str = "en") -> str:
    if lang not in TEXT:
        raise WaslaError(f"report language {lang!r} is not one of {', '.join(LANGUAGES)}")
    t = TEXT[lang]
    e = html.escape
    label = data["label"] or "pending"
    # A name may be Arabic or Latin: its own direction (<bdi>), where identifiers and dates are kept left-to-right.
    name = f"<bdi>{e(data.get('patient_name') or '')}</bdi>" if data.get("patient_name") else "—"
    rows = [("patient_id", data["patient_id"]), ("accession", data["accession"]), ("study_date", data["study_date"]),
            ("modality", data["modality"]), ("description", data["description"]), ("images", str(data["images"])),
            ("received", data["received"])]
    ids = f"<tr><th>{e(t['patient_name'])}</th><td class=\"patient-name\">{name}</td></tr>"
    ids += "".join(f"<tr><th>{e(t[k])}</th><td>{_ltr(e(v)) if v else '—'}</td></tr>" for k, v in rows if v or k in
                   ("patient_id", "accession"))
    if data["unreadable"]:
        ids += f"<tr><th>{e(t['unreadable'])}</th><td>{data['unreadable']}</td></tr>"
    reasons = "".join(f"<li>{reason_sentence(r, lang)}</li>" for r in data["reasons"])
    models = ""
    for m in data["models"]:
        score = f"{m['score']:.3f}" if m["score"] is not None else "—"
        th = f"{m['thresholds'].get('review', '—')} / {m['thresholds'].get('urgent', '—')}"
        cells = [_ltr(f"#{m['image']}"), _ltr(e(m["model"])), _ltr(e(m["version"] or "")),
                 _ltr(e(m["backend"] or "")), _ltr(score), _ltr(e(th)), e(t.get(m["label"] or "pending", ""))]
        models += "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
    models_table = (
        f"<table class=models><tr><th>{e(t['image'])}</th><th>{e(t['model'])}</th><th>{e(t['version'])}</th>"
        f"<th>{e(t['backend'])}</th><th>{e(t['score'])}</th><th>{e(t['thresholds'])}</th><th>{e(t['result'])}</th>"
        f"</tr>{models}</table>") if models else ""
    thumb = (f'<img alt="{e(t["key_image"])}" src="data:image/png;base64,{data["thumbnail_png_b64"]}">'
             if data["thumbnail_png_b64"] else f"<p>{e(t['no_image'])}</p>")
    read = data["read"]
    if read.get("disposition"):
        disp = t.get(f"disp_{read['disposition']}", read["disposition"])
        # Free text from the hub keeps its own direction (an English note inside an Arabic page).
        who = f" — {e(t['by'])} <bdi>{e(read['by'])}</bdi>" if read.get("by") else ""
        when = f' <span class="nowrap">({_ltr(_ts(read["at"]))})</span>' if read.get("at") else ""
        note = f"<p>{e(t['note'])}: <bdi>{e(read['note'])}</bdi></p>" if read.get("note") else ""
        read_html = f"<p><b><bdi>{e(disp)}</bdi></b>{who}{when}</p>{note}"
    else:
        read_html = f"<p>{e(t['awaiting'])}</p>"
    direction = "rtl" if lang in RTL else "ltr"
    return f"""<!doctype html>
<html lang="{lang}" dir="{direction}">
<head><meta charset="utf-8"><title>{e(t['title'])} — {e(data['study_uid'])}</title>
<style>{_CSS}</style></head>
<body>
<header><h1>Wasla — {e(t['title'])}</h1>
<div class="meta">{e(t['box'])} {_ltr(e(data['box']))}<br>{e(t['generated'])} {_ltr(e(data['generated']))}</div></header>
<div class="banner">{e(t['not_clinical'])}. <span>{e(t['disclaimer'])}</span></div>
<section><table class="ids">{ids}</table></section>
<section class="result"><div class="label label-{e(label)}">{e(t[label])}</div>
<div><h2>{e(t['reasons'])}</h2><ul>{reasons}</ul></div></section>
<div class="grid"><figure>{thumb}<figcaption>{e(t['key_image'])}</figcaption></figure>
<section class="read"><h2>{e(t['read'])}</h2>{read_html}</section></div>
{models_table}
<footer>{e(t['study'])}: {_ltr(e(data['study_uid']))} · {e(t['not_clinical'])}</footer>
</body></html>
"""


def write_report(store: Store, study_uid: str, out: Path, *, lang: str, box_id: str,
                 max_pixels: int = 100_000_000) -> Path:
    """Write the page to `out` (an .html file); the study UID is logged, nothing about the patient."""
    data = gather(store, study_uid, box_id=box_id, max_pixels=max_pixels)
    page = render_html(data, lang)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    log.info("report for study %s written (%s, %d bytes)", data["study_uid"], lang, len(page))
    return out
