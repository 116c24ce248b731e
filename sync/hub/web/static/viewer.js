// The worklist's own viewer: one frame's stored values from the hub, windowed on the client (drag to change the
// window, double-click to reset, MONOCHROME1 shown inverted as the standard says), plus the read delivery poll.
"use strict";
(function () {
  const canvas = document.getElementById("canvas");
  if (!canvas) return;
  const ctx = canvas.getContext("2d");
  const wlText = document.getElementById("wl");
  const errorBox = document.getElementById("viewer-error");
  let img = null, wc = 0, ww = 1, invert = false;

  function typed(buf, dtype) {
    const map = {uint8: Uint8Array, int8: Int8Array, uint16: Uint16Array, int16: Int16Array};
    return new (map[dtype] || Uint8Array)(buf);
  }
  function draw() {
    if (!img) return;
    const m = img.meta, out = ctx.createImageData(m.columns, m.rows), d = out.data, v = img.values;
    if (m.samples === 3) {
      for (let i = 0, j = 0; i < m.rows * m.columns; i++, j += 3) {
        d[4 * i] = v[j]; d[4 * i + 1] = v[j + 1]; d[4 * i + 2] = v[j + 2]; d[4 * i + 3] = 255;
      }
    } else {
      const lo = wc - ww / 2, inv = (m.photometric === "MONOCHROME1") !== invert;
      for (let i = 0; i < v.length; i++) {
        let g = ((v[i] * m.slope + m.intercept) - lo) / ww * 255;
        g = g < 0 ? 0 : g > 255 ? 255 : g;
        if (inv) g = 255 - g;
        d[4 * i] = d[4 * i + 1] = d[4 * i + 2] = g; d[4 * i + 3] = 255;
      }
    }
    ctx.putImageData(out, 0, 0);
    wlText.textContent = "W " + Math.round(ww) + " / L " + Math.round(wc);
  }
  async function load(sop) {
    errorBox.hidden = true;
    const rsp = await fetch("/api/instance/" + encodeURIComponent(sop) + "/frame/0", {credentials: "same-origin"});
    if (!rsp.ok) {
      let msg = rsp.status + "";
      try { msg = (await rsp.json()).error || msg; } catch (e) { /* not JSON */ }
      errorBox.textContent = msg; errorBox.hidden = false; return;
    }
    const meta = JSON.parse(rsp.headers.get("X-Wasla-Frame"));
    img = {meta: meta, values: typed(await rsp.arrayBuffer(), meta.dtype)};
    canvas.width = meta.columns; canvas.height = meta.rows;
    wc = meta.window_center; ww = meta.window_width;
    canvas.dataset.loaded = sop;
    draw();
  }
  let drag = null;
  canvas.addEventListener("pointerdown", e => { drag = {x: e.clientX, y: e.clientY, wc: wc, ww: ww}; canvas.setPointerCapture(e.pointerId); });
  canvas.addEventListener("pointermove", e => {
    if (!drag || !img) return;
    const scale = Math.max(img.meta.window_width, 1) / 300;
    ww = Math.max(1, drag.ww + (e.clientX - drag.x) * scale); wc = drag.wc + (e.clientY - drag.y) * scale; draw();
  });
  canvas.addEventListener("pointerup", () => { drag = null; });
  canvas.addEventListener("dblclick", () => { if (img) { wc = img.meta.window_center; ww = img.meta.window_width; draw(); } });
  document.getElementById("invert").addEventListener("click", () => { invert = !invert; draw(); });
  const buttons = document.querySelectorAll("button.instance");
  buttons.forEach(b => b.addEventListener("click", () => load(b.dataset.sop)));
  if (buttons.length) load(buttons[0].dataset.sop);

  // Delivery of reads to the clinic: poll until every read on the page says the box has it.
  const table = document.getElementById("reads"), delivered = document.getElementById("delivered-text");
  async function poll() {
    const waiting = table.querySelectorAll("td.delivery[data-delivered='0']");
    if (!waiting.length) return;
    try {
      const rsp = await fetch(table.dataset.url, {credentials: "same-origin"});
      if (rsp.ok) {
        for (const r of await rsp.json()) {
          const cell = table.querySelector("tr[data-read='" + r.read_id + "'] td.delivery");
          if (cell && r.delivered_at && cell.dataset.delivered === "0") {
            cell.dataset.delivered = "1";
            const span = document.createElement("span");
            span.className = "ok";
            span.textContent = delivered.content.textContent + " " + new Date(r.delivered_at * 1000).toLocaleString();
            cell.replaceChildren(span);
          }
        }
      }
    } catch (e) { /* the hub is restarting: try again */ }
    setTimeout(poll, 2000);
  }
  if (table) poll();
})();
