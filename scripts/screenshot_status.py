#!/usr/bin/env python3
"""Renders `wasla status --watch` in a real terminal (tmux) for Arabic and French and saves docs/status-<lang>.png.

    .venv/bin/python scripts/screenshot_status.py [--langs ar,fr] [--out docs]

What it does: builds a small box data folder through the library (studies triaged urgent/review/normal, a
quarantined image, flags and transfers in the outbox), listens on a local TCP port that stands in for the hub's
broker (dropped for a few seconds so the link history shows a cut), advances the current transfer chunk by chunk
while the screen runs (so the rate and ETA are measured, not made up), runs
`wasla --lang <lang> status --watch` inside a detached tmux pane, captures it with `tmux capture-pane -e -p`
(ANSI text, exactly what the terminal got), lays those cells out as SVG text on the terminal's grid and rasterises
it with `rsvg-convert`, whose Pango text layout does the Arabic shaping and bidi, as GNOME's VTE does.

Needs tmux, rsvg-convert and a font with Arabic glyphs: on Debian `apt-get install tmux librsvg2-bin
fonts-dejavu-core` (DejaVu Sans Mono covers Arabic). Not needed by the tests or the box.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COLS, ROWS = 120, 44
CHUNK = 64 * 1024


class FakeBroker:
    """A listening socket on a free port: `wasla status` only checks that the hub's broker accepts TCP."""

    def __init__(self):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.sock: socket.socket | None = None
        self.up()

    def up(self):
        if self.sock is None:
            self.sock = socket.socket()
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(("127.0.0.1", self.port))
            self.sock.listen(64)

    def down(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def populate(root: Path, port: int):
    """A box with a morning's work; returns (config path, store, outbox, transfer id under way)."""
    from edge import config as config_mod
    from edge.store import InstanceMeta, Store
    from edge.uplink.outbox import Outbox

    cfg_path = root / "box.toml"
    cfg_path.write_text(
        f'[box]\nid = "ouarzazate-01"\ndata_dir = "{root / "data"}"\n[models]\ndir = "{root / "models"}"\n'
        f'trusted_keys = []\n[storage]\nmin_free_mb = 2048\n[dicom]\nenabled = false\n'
        f'[sync]\nenabled = true\nbroker_host = "127.0.0.1"\nbroker_port = {port}\n')
    cfg = config_mod.load(cfg_path, env={})
    store = Store.from_config(cfg)
    outbox = Outbox(store, cfg.box.data_dir / "outbox", cfg.box.id)
    plan = [  # study suffix, modality, images, label, score
        ("4471.20261123.0912", "CR", 2, "urgent", 0.93), ("4471.20261123.0847", "DX", 1, "urgent", 0.88),
        ("4471.20261123.0830", "CR", 1, "review", 0.61), ("4471.20261123.0805", "DX", 2, "normal", 0.08),
        ("4471.20261123.0751", "CR", 1, "normal", 0.12), ("4471.20261123.0733", "CR", 1, "normal", 0.05),
    ]
    n = 0
    ids: dict[str, list[int]] = {}
    for suffix, modality, images, label, score in plan:
        study = f"1.2.840.113619.2.55.3.{suffix}"
        for k in range(images):
            n += 1
            tmp = store.new_tmp_path()
            tmp.write_bytes(os.urandom(2048) + n.to_bytes(4, "big"))
            meta = InstanceMeta(sop_instance_uid=f"{study}.{k + 1}", study_uid=study, modality=modality)
            res = store.add_instance(tmp, meta, source="scp")
            row = store.claim_next()
            assert row["id"] == res.id
            code = "score_above_urgent" if label == "urgent" else (
                "score_above_review" if label == "review" else "score_below_review")
            reason = {"code": code, "score": score, "threshold": 0.8 if label == "urgent" else 0.4}
            store.record_triage(res.id, label, [reason], [{"model": "cxr-triage", "model_version": "1.1.0",
                                                           "backend": "openvino", "scores": {"abnormal": score},
                                                           "label": label, "reasons": [reason]}])
            ids.setdefault(study, []).append(res.id)
    # Two images still waiting for triage, one that could not be read.
    for k in range(2):
        tmp = store.new_tmp_path()
        tmp.write_bytes(os.urandom(1024))
        store.add_instance(tmp, InstanceMeta(sop_instance_uid=f"1.2.840.113619.2.55.3.4471.20261123.0930.{k}",
                                             study_uid="1.2.840.113619.2.55.3.4471.20261123.0930",
                                             modality="CR"), source="watch")
    bad = store.new_tmp_path()
    bad.write_bytes(b"not dicom")
    store.add_quarantined(bad, "not a DICOM file (no DICM preamble)", source="usb", original_name="IMG_0007.JPG")

    for s in outbox.studies_needing_flags():
        fid = outbox.add_flag(s["study_uid"], s["label"], {"study_uid": s["study_uid"], "label": s["label"]})
        if s["study_uid"].endswith("0847"):
            outbox.flag_done(fid)
    current = None
    for inst in outbox.instances_to_pack():
        size = {"urgent": 4_400_000, "review": 2_600_000}.get(inst["study_label"], 1_900_000)
        enc = SimpleNamespace(data=os.urandom(size), codec="jpegls-lossless",
                              transfer_syntax_uid="1.2.840.10008.1.2.4.80", original_size=int(size * 2.6), ratio=2.6)
        tid = outbox.add_transfer(inst, enc, inst["study_label"], CHUNK)
        if inst["study_uid"].endswith("0847"):
            outbox.record_have(tid, set(range(-(-size // CHUNK))))
            outbox.acknowledged(tid)
        elif current is None and inst["study_label"] == "urgent":
            current = tid
            outbox.record_have(tid, set(range(23)))
    return cfg_path, store, outbox, current


def uplink(outbox, transfer: str, broker: FakeBroker, stop: threading.Event) -> None:
    """Confirms about one chunk a second on the current transfer (~64 kB/s, a rural link), and cuts it once."""
    t0 = time.monotonic()
    while not stop.wait(1.0):
        elapsed = time.monotonic() - t0
        if 4 <= elapsed < 8:
            broker.down()
            continue
        broker.up()
        row = outbox.get(transfer)
        have = set()
        for a, b in json.loads(row["have"] or "[]"):
            have |= set(range(a, b + 1))
        nxt = max(have) + 1 if have else 0
        outbox.record_have(transfer, set(range(nxt, min(row["count"] - 1, nxt + 1))))


def capture(lang: str, cfg_path: Path, seconds: float) -> str:
    session = f"wasla-shot-{lang}-{os.getpid()}"
    env = {**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TERM": "xterm-256color", "COLORTERM": "truecolor"}
    cmd = (f"cd {ROOT} && exec {sys.executable} -m edge.cli --lang {lang} --config {cfg_path} "
           "status --watch --interval 1")
    subprocess.run(["tmux", "-u", "new-session", "-d", "-s", session, "-x", str(COLS), "-y", str(ROWS), cmd],
                   check=True, env=env)
    try:
        time.sleep(seconds)
        out = subprocess.run(["tmux", "capture-pane", "-e", "-p", "-t", session], check=True, capture_output=True)
        return out.stdout.decode("utf-8")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)


CELL_W, CELL_H, FONT_PX = 12.2, 24.4, 20.27
BG, FG = "#1e1e1e", "#d0d0d0"


def _arabic_between(buf: str, text: str, i: int) -> bool:
    """A space inside a run of Arabic words: keep the words in one run, as a terminal's bidi would."""
    return bool(buf) and _is_arabic(buf[-1]) and i + 1 < len(text) and _is_arabic(text[i + 1])


def _is_arabic(ch: str) -> bool:
    return "\u0600" <= ch <= "\u06ff" or "\u0750" <= ch <= "\u077f" or "\ufb50" <= ch <= "\ufeff"


def _chunks(text: str):
    """Split a line into runs: each top-level bidi isolate (U+2066..U+2069) alone, the rest by spaces."""
    out, buf, depth = [], "", 0
    for i, ch in enumerate(text):
        if ch in "\u2066\u2067\u2068":
            if depth == 0 and buf:
                out.append(buf)
                buf = ""
            depth += 1
            buf += ch
        elif ch == "\u2069" and depth:
            depth -= 1
            buf += ch
            if depth == 0:
                out.append(buf)
                buf = ""
        elif ch == " " and depth == 0 and not _arabic_between(buf, text, i):
            if buf:
                out.append(buf)
            out.append(" ")
            buf = ""
        else:
            buf += ch
    if buf:
        out.append(buf)
    return out


def to_png(ansi: str, title: str, png: Path) -> None:
    """ANSI capture -> SVG -> PNG. Every isolate and word sits at its own cell column (as in the terminal grid),
    so a font whose Arabic glyphs are wider or narrower than a cell cannot shift the rest of the line; inside a
    run Pango shapes the Arabic and lays it out right-to-left, with a left-to-right line like the terminal."""
    from html import escape

    from rich.cells import cell_len
    from rich.console import Console
    from rich.terminal_theme import MONOKAI
    from rich.text import Text

    console = Console(width=COLS, file=io.StringIO(), force_terminal=True, color_system="truecolor")
    # tmux stores a zero-width character with the cell before it, so an isolate opener can come out ahead of the
    # colour change of the text it opens: put it back after the escape sequence, where the program wrote it.
    ansi = re.sub("([\u2066-\u2068]+)((?:\x1b\\[[0-9;]*m)+)", r"\2\1", ansi)
    lines = ansi.rstrip("\n").split("\n")
    top = 40
    body = []
    for row, line in enumerate(lines):
        col = 0
        y = top + (row + 1) * CELL_H - 6
        for seg in Text.from_ansi(line).render(console):
            style = seg.style
            color = FG
            if style and style.color and not style.color.is_default:
                r, g, b = style.color.get_truecolor(MONOKAI)
                color = f"#{r:02x}{g:02x}{b:02x}"
            attrs = ' font-weight="bold"' if style and style.bold else ""
            attrs += ' opacity="0.55"' if style and style.dim else ""
            for run in _chunks(seg.text):
                width = cell_len(run)
                if run.strip():
                    body.append(f'<text x="{col * CELL_W:.1f}" y="{y:.1f}" fill="{color}"{attrs}>'
                                f"&#8206;{escape(run)}</text>")
                col += width
    height = top + (len(lines) + 1) * CELL_H
    width = COLS * CELL_W + 20
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" xml:space="preserve" width="{width:.0f}" height="{height:.0f}">'
           f'<rect width="100%" height="100%" rx="8" fill="{BG}"/>'
           f'<text x="{width / 2:.0f}" y="26" fill="#9a9a9a" text-anchor="middle" font-family="DejaVu Sans" '
           f'font-size="16">{escape(title)}</text>'
           f'<g transform="translate(10 0)" font-family="DejaVu Sans Mono" font-size="{FONT_PX}">'
           + "".join(body) + "</g></svg>")
    with tempfile.NamedTemporaryFile("w", suffix=".svg", delete=False, encoding="utf-8") as fh:
        fh.write(svg)
    try:
        subprocess.run(["rsvg-convert", "--zoom", "1.25", "--format", "png", "--output", str(png), fh.name], check=True)
    finally:
        os.unlink(fh.name)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--langs", default="ar,fr")
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    ap.add_argument("--seconds", type=float, default=14.0, help="how long the screen runs before the capture")
    args = ap.parse_args(argv)
    for tool in ("tmux", "rsvg-convert"):
        if not shutil.which(tool):
            print(f"{tool} not found: apt-get install tmux librsvg2-bin fonts-dejavu-core", file=sys.stderr)
            return 1
    titles = {"ar": "wasla --lang ar status --watch", "fr": "wasla --lang fr status --watch"}
    for lang in args.langs.split(","):
        broker = FakeBroker()
        with tempfile.TemporaryDirectory(prefix="wasla-shot-") as tmp:
            cfg_path, store, outbox, current = populate(Path(tmp), broker.port)
            stop = threading.Event()
            mover = threading.Thread(target=uplink, args=(outbox, current, broker, stop), daemon=True)
            mover.start()
            try:
                ansi = capture(lang, cfg_path, args.seconds)
            finally:
                stop.set()
                mover.join()
                broker.down()
                store.close()
        args.out.mkdir(parents=True, exist_ok=True)
        png = args.out / f"status-{lang}.png"
        to_png(ansi, titles.get(lang, lang), png)
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
