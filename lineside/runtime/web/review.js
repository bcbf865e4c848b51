// lineside review page: the saved frames, newest first; confirm or correct each label.
"use strict";
const $ = (id) => document.getElementById(id);
let writable = false, oldest = null, shown = [], frames = 0;

function message(text) { const m = $("message"); m.textContent = text; m.hidden = !text; }

function frameUrl(item) {
  if (item.heatmap && !$("whole").checked) return `/api/frames/${item.id}.jpg?heatmap=1`;   // the part, with its map
  return `/api/frames/${item.id}.jpg` + ($("whole").checked ? "" : "?crop=roi");
}

// One card per part: the frames of a part held in front of the camera (the same `group`)
// are shown once, the newest, and a label given to the card goes to each of them.
function card(group) {
  const item = group[0];
  const div = document.createElement("div");
  div.className = "card" + (group.every((g) => g.reviewed) ? " done" : "");
  div.dataset.id = item.id;
  const img = document.createElement("img");
  img.loading = "lazy";
  img.alt = `frame ${item.frame}`;
  img.src = frameUrl(item);
  const info = document.createElement("div");
  const verdict = item.label === "unknown" ? "unknown" : (item.verdict || "");
  const title = document.createElement("strong");
  title.textContent = `${item.label} ${(100 * item.confidence).toFixed(1)}% ${item.verdict || ""}` +
    (item.capture ? ` · kept: ${item.capture.replace("_", " ")}` : "") + (item.heatmap ? " · heatmap" : "");
  if (verdict) title.className = `${verdict}-text`;
  const meta = document.createElement("div");
  meta.className = "muted";
  const frames = group.length > 1 ? `frames ${group[group.length - 1].frame}-${item.frame} (one part, ` +
    `${group.length} frames)` : `frame ${item.frame}`;
  meta.textContent = `${new Date(item.time * 1000).toLocaleString()} · ${frames}` +
    (item.part_id ? ` · part ${item.part_id}` : "") + (item.flags.length ? ` · ${item.flags.join(", ")}` : "");
  const state = document.createElement("div");
  state.className = "reviewed";
  state.textContent = item.reviewed ? `reviewed: ${item.reviewed.label}` : "";
  info.append(title, meta, state);
  div.append(img, info);
  if (writable) {
    const form = document.createElement("form");
    const input = document.createElement("input");
    input.name = "label";
    input.setAttribute("list", "labels");
    input.value = item.reviewed ? item.reviewed.label : (item.label === "unknown" ? "" : item.label);
    input.placeholder = "true label";
    const ok = document.createElement("button");
    ok.type = "submit";
    ok.textContent = group.length > 1 ? `save label (${group.length} frames)` : "save label";
    form.append(input, ok);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      for (const g of group) { if (!(await relabel(g, input.value, div, state))) return; }
    });
    div.append(form);
  }
  return div;
}

async function relabel(item, label, div, state) {
  const r = await fetch(`/api/review/${item.id}`, {
    method: "POST", headers: { "Content-Type": "application/json", "X-Lineside-Token": $("token").value },
    body: JSON.stringify({ label: label.trim() }),
  });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) { message(`not saved: ${body.error || r.status}`); return false; }
  message("");
  sessionStorage.setItem("lineside-token", $("token").value);
  item.reviewed = { label: body.label, path: body.path };
  state.textContent = `reviewed: ${body.label} (${body.path})`;
  div.classList.add("done");
  return true;
}

async function load(append) {
  const q = new URLSearchParams({ verdict: $("verdict").value, label: $("label").value, limit: 60 });
  if (append && oldest !== null) q.set("before", oldest);
  const r = await fetch(`/api/review?${q}`, { cache: "no-store" });
  const body = await r.json();
  if (!r.ok) { message(body.error || r.status); return; }
  writable = body.writable;
  $("readonly").hidden = writable;
  const list = $("labels"), filter = $("label");
  if (!list.children.length) {
    for (const l of body.labels) {
      const o = document.createElement("option"); o.value = l; list.append(o);
      const f = document.createElement("option"); f.textContent = l; filter.append(f);
    }
    if (asked.get("label") && !append && !filter.value) {
      filter.value = asked.get("label");
      if (filter.value) { load(false); return; }
    }
  }
  const groups = [];
  for (const item of body.items) {
    const last = groups[groups.length - 1];
    if (last && last[0].group === item.group) last.push(item); else groups.push([item]);
  }
  if (append && groups.length && shown.length && shown[shown.length - 1][0].group === groups[0][0].group) {
    groups.shift();      // the rest of a part whose newest frames the last page showed
  }
  shown = append ? shown.concat(groups) : groups;
  const cards = groups.map(card);
  if (append) $("items").append(...cards); else $("items").replaceChildren(...cards);
  if (body.items.length) oldest = body.items[body.items.length - 1].id;
  frames = (append ? frames : 0) + body.items.length;
  $("more").hidden = body.items.length < 60;
  $("summary").textContent = `${shown.length} part(s) in the ${frames} newest of ${body.total} saved ` +
    `frame(s); reviewed frames go to ${body.dataset}`;
}

$("token").value = sessionStorage.getItem("lineside-token") || "";
const asked = new URLSearchParams(location.search);      // /review?verdict=NG&label=scratch
if (asked.get("verdict")) $("verdict").value = asked.get("verdict");
$("verdict").addEventListener("change", () => load(false));
$("label").addEventListener("change", () => load(false));
$("more").addEventListener("click", () => load(true));
$("whole").addEventListener("change", () => load(false));

async function start() {
  // The frames kept as worth labelling (--save-when worth) come first, when there are any.
  if (!asked.get("verdict")) {
    const r = await fetch("/api/review?verdict=worth&limit=1", { cache: "no-store" });
    if (r.ok && (await r.json()).items.length) $("verdict").value = "worth";
  }
  load(false);
}
start();
