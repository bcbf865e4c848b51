// lineside live page: polls /api/status once a second and fills the page in.
"use strict";
const $ = (id) => document.getElementById(id);
const set = (id, text) => { const e = $(id); if (e) e.textContent = text; };
const when = (t) => t ? new Date(t * 1000).toLocaleTimeString() : "-";
let lastFrame = null;

function ago(t, now) {
  const s = Math.max(0, Math.round(now - t));
  return s < 90 ? `${s} s` : s < 5400 ? `${Math.round(s / 60)} min` : `${(s / 3600).toFixed(1)} h`;
}

function render(s) {
  set("station", s.station);
  document.title = `lineside: ${s.station}`;
  set("clock", `${s.host} · ${when(s.time)} · up ${ago(s.started, s.time)}`);
  set("source", s.source.text);
  const st = $("source-state");
  st.textContent = s.source.state;
  st.className = `state-${s.source.state}`;
  set("source-since", `since ${when(s.source.since)}`);
  const m = s.model;
  const sig = m.signature || {};
  const signed = sig.state === "verified" ? `signed (key ${sig.key_id})` : (sig.state || "unsigned");
  set("model", `${m.name} · ${m.precision} · sha256 ${String(m.sha256).slice(0, 12)} · ${signed}`);
  set("model-labels", (m.labels || []).join(", "));
  set("frames", s.frames);
  set("fps", s.fps.toFixed(1));
  const ms = (v) => (v === undefined || v === null) ? "-" : v.toFixed(1);
  set("p50", ms(s.capture_to_decision_ms.p50));
  set("p99", ms(s.capture_to_decision_ms.p99));
  set("dropped", s.dropped_frames);
  set("last-error", s.last_error || "none");
  for (const [key, id] of [["OK", "OK"], ["NG", "NG"], ["unknown", "unknown"], ["no verdict", "none"]]) {
    set(`count-${id}`, s.counts.since_start[key] || 0);
    set(`hour-${id}`, s.counts.last_hour[key] || 0);
  }
  const last = s.last;
  if (last) {
    const verdict = last.label === "unknown" ? "unknown" : (last.verdict || "");
    set("last-label", last.label);
    $("last-label").className = verdict ? `${verdict}-text` : "";
    set("last-confidence", `${(100 * last.confidence).toFixed(1)}%`);
    set("last-verdict", last.verdict || "");
    $("last-verdict").className = verdict ? `${verdict}-text` : "";
    set("last-frame-number", last.frame);
    set("last-time", when(last.time));
    set("last-part", last.part_id ? `· part ${last.part_id}` : "");
    set("last-flags", last.flags && last.flags.length ? `· ${last.flags.join(", ")}` : "");
    $("frame").className = `frame ${verdict}`;
    if (last.frame !== lastFrame) {
      lastFrame = last.frame;
      // an anomaly model's NG frame: its heatmap, where the part differs from the good ones
      const heat = s.model && s.model.task === "anomaly" && last.verdict === "NG";
      $("last-frame").src = `/frame/last.jpg?frame=${last.frame}` + (heat ? "&heatmap=1" : "");
      $("last-frame").onerror = heat ? () => { $("last-frame").src = `/frame/last.jpg?frame=${last.frame}`; } : null;
    }
  }
  const rows = s.events.map((e) => {
    const tr = document.createElement("tr");
    for (const text of [when(e.time), e.kind, e.detail]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.appendChild(td);
    }
    return tr;
  });
  if (rows.length) $("events").replaceChildren(...rows);
  $("review-link").hidden = !(s.review && s.review.available);
}

async function poll() {
  try {
    const r = await fetch("/api/status", { cache: "no-store" });
    if (!r.ok) throw new Error(r.status);
    render(await r.json());
    $("offline").hidden = true;
  } catch (e) {
    $("offline").hidden = false;
  }
  setTimeout(poll, 1000);
}
poll();
