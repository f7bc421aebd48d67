// The search page: pick or drop an image -> POST /v1/search -> a grid of neighbours.
"use strict";
const $ = (id) => document.getElementById(id);
const drop = $("drop"), input = $("file"), preview = $("preview"), results = $("results"), message = $("message");

function say(text, isError = false) {
  message.textContent = text;
  message.classList.toggle("error", isError);
}

async function refreshStatus() {
  try {
    const r = await fetch("/readyz");
    const s = await r.json();
    $("status").textContent = s.ready ? `${s.model} · ${s.items} items · ${s.backend}` : "not ready";
  } catch (e) {
    $("status").textContent = "server unreachable";
  }
}

function card(hit) {
  const div = document.createElement("div");
  div.className = "hit";
  const img = document.createElement("img");
  img.src = hit.thumbnail_url;
  img.alt = hit.path;
  img.loading = "lazy";
  const meta = document.createElement("div");
  meta.className = "meta";
  const score = document.createElement("div");
  score.className = "score";
  score.textContent = hit.score.toFixed(4);
  const name = document.createElement("div");
  name.className = "name";
  name.textContent = (hit.metadata && hit.metadata.filename) || hit.path.split("/").pop();
  const path = document.createElement("div");
  path.className = "path";
  path.title = hit.path;
  path.textContent = "\u200e" + hit.path;  // LRM: keeps the leading "/" in place under direction: rtl
  meta.append(score, name, path);
  div.append(img, meta);
  return div;
}

let lastFile = null, nextOffset = null;  // "more" asks for the next page of the same search

async function search(file, offset = 0) {
  if (!file) return;
  lastFile = file;
  if (offset === 0) {
    preview.src = URL.createObjectURL(file);
    preview.hidden = false;
    $("drop-text").textContent = file.name;
  }
  say("searching…");
  const form = new FormData();
  form.append("file", file);
  form.append("k", $("k").value || "12");
  form.append("offset", String(offset));
  if ($("min-score").value.trim()) form.append("min_score", $("min-score").value.trim());
  if ($("path-prefix").value) form.append("filter", JSON.stringify({ path_prefix: $("path-prefix").value }));
  const t0 = performance.now();
  try {
    const r = await fetch("/v1/search", { method: "POST", body: form });
    const body = await r.json();
    if (!r.ok) {
      results.replaceChildren();
      say(body.detail || `error ${r.status}`, true);
      return;
    }
    if (offset === 0) results.replaceChildren();
    results.append(...body.neighbours.map(card));
    results.dataset.count = results.children.length;
    nextOffset = body.next_offset;
    $("more-results").hidden = nextOffset === null || nextOffset === undefined;
    say(`${results.children.length} neighbours in ${Math.round(performance.now() - t0)} ms`);
  } catch (e) {
    say(`request failed: ${e}`, true);
  }
}

input.addEventListener("change", () => search(input.files[0]));
$("more-results").addEventListener("click", () => search(lastFile, nextOffset));
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  search(e.dataTransfer.files[0]);
});
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
refreshStatus();
