// The duplicates page: GET /v1/duplicates -> one card per group; pick the item to keep (the
// proposed keeper is marked), then "delete the others" (a second click confirms) sends
// DELETE /v1/items/{id} for each of them with the API key when one is given.
"use strict";
const groupsEl = $("groups"), more = $("more");
let nextOffset = null;

// the key lives in this tab only (sessionStorage), never in the page's URL or in localStorage
const keyInput = $("apikey");
keyInput.value = sessionStorage.getItem("simsearch-api-key") || "";
keyInput.addEventListener("change", () => sessionStorage.setItem("simsearch-api-key", keyInput.value));

function query(offset) {
  const p = new URLSearchParams({ offset: String(offset), limit: "20" });
  const t = $("threshold").value.trim();
  if (t) p.set("threshold", t); else p.set("level", $("level").value);
  return "/v1/duplicates?" + p;
}

function memberCard(item, group, card) {
  const size = `${item.width}×${item.height} · ${(item.size / 1024).toFixed(1)} KB`;
  const div = itemCard("member" + (item.id === group.keeper ? " keep" : ""), item,
                       [el("div", "role"), el("div", "", size), pathLine(item)]);
  div.title = "keep this one";
  div.addEventListener("click", () => {
    card.querySelectorAll(".member").forEach((m) => m.classList.toggle("keep", m === div));
    label(card);
  });
  div._item = item;
  return div;
}

// each badge: "keep", "same bytes", or the cosine similarity to the proposed keeper (the group is built around it)
function label(card) {
  card.querySelectorAll(".member").forEach((m) => {
    const it = m._item;
    m.querySelector(".role").textContent = m.classList.contains("keep") ? "keep"
      : it.exact ? "same bytes" : it.score.toFixed(4);
  });
  const button = card.querySelector(".delete");
  button.classList.remove("armed");
  button.textContent = `delete the other ${card.querySelectorAll(".member").length - 1}`;
}

function groupCard(group) {
  const card = document.createElement("article");
  card.className = "group";
  card.dataset.keeper = group.keeper;
  const head = document.createElement("div");
  head.className = "group-head";
  const kind = document.createElement("span");
  kind.className = "kind " + group.kind;
  kind.textContent = group.kind;
  const info = document.createElement("span");
  info.className = "muted";
  info.textContent = `${group.size} items · lowest similarity ${group.min_score.toFixed(4)}`;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "delete";
  button.addEventListener("click", () => deleteOthers(card, button));
  head.append(kind, info, button);
  const members = document.createElement("div");
  members.className = "members";
  members.append(...group.items.map((it) => memberCard(it, group, card)));
  card.append(head, members);
  label(card);
  return card;
}

async function deleteOthers(card, button) {
  if (!button.classList.contains("armed")) {  // the first click arms, the second deletes
    button.classList.add("armed");
    button.textContent = "click again to delete";
    return;
  }
  const doomed = [...card.querySelectorAll(".member:not(.keep)")];
  const headers = keyInput.value ? { "X-API-Key": keyInput.value } : {};
  button.disabled = true;
  let deleted = 0;
  for (const m of doomed) {
    const r = await fetch(`/v1/items/${m.dataset.id}`, { method: "DELETE", headers });
    if (r.status === 401) {
      say("deleting needs the server's API key: enter it above", true);
      keyInput.focus();
      button.disabled = false;
      label(card);
      return;
    }
    if (r.ok || r.status === 404) {  // 404: someone deleted it already
      m.remove();
      deleted += 1;
    } else {
      const body = await r.json().catch(() => ({}));
      say(body.detail || `error ${r.status} deleting item ${m.dataset.id}`, true);
      button.disabled = false;
      label(card);
      return;
    }
  }
  card.classList.add("resolved");
  button.textContent = `deleted ${deleted}`;
  say(`deleted ${deleted} item${deleted === 1 ? "" : "s"}; kept ${card.querySelector(".member.keep").dataset.id}`);
}

async function load(offset) {
  say("looking for duplicates…");
  try {
    const r = await fetch(query(offset));
    const body = await r.json();
    if (!r.ok) {
      say(body.detail || `error ${r.status}`, true);
      return;
    }
    if (offset === 0) groupsEl.replaceChildren();
    groupsEl.append(...body.groups.map(groupCard));
    groupsEl.dataset.count = groupsEl.children.length;
    nextOffset = body.next_offset;
    more.hidden = nextOffset === null;
    $("summary").textContent = `${body.groups_total} groups · ${body.items_in_groups} of ${body.count} items · `
      + `cosine ≥ ${body.threshold} (duplicate ${body.thresholds.duplicate}, similar ${body.thresholds.similar})`;
    say(body.groups_total ? (body.caution ? `note: ${body.caution}` : "") : "no duplicates at this threshold");
  } catch (e) {
    say(`request failed: ${e}`, true);
  }
}

$("reload").addEventListener("click", () => load(0));
$("level").addEventListener("change", () => { $("threshold").value = ""; load(0); });
more.addEventListener("click", () => load(nextOffset));
load(0);
