// The search page: pick or drop an image -> POST /v1/search -> a grid of neighbours.
"use strict";
const drop = $("drop"), input = $("file"), preview = $("preview"), results = $("results");

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
  return itemCard("hit", hit, [el("div", "score", hit.score.toFixed(4)), nameLine(hit), pathLine(hit)]);
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
