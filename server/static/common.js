// Shared by the pages (loaded before each page's own script): element helpers, the status line
// and the image card that the search, map and duplicates pages all show.
"use strict";
const $ = (id) => document.getElementById(id);

function say(text, isError = false) {
  const message = $("message");
  message.textContent = text;
  message.classList.toggle("error", isError);
}

function el(tag, className = "", text = null) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== null) node.textContent = text;
  return node;
}

// an item's card: its thumbnail, then a .meta block holding the lines given
function itemCard(className, item, lines) {
  const div = el("div", className);
  div.dataset.id = item.id;
  const img = el("img");
  img.src = item.thumbnail_url;
  img.alt = item.path;
  img.loading = "lazy";
  const meta = el("div", "meta");
  meta.append(...lines);
  div.append(img, meta);
  return div;
}

function nameLine(item) {
  const name = el("div", "name", (item.metadata && item.metadata.filename) || item.path.split("/").pop());
  name.title = item.path;
  return name;
}

function pathLine(item) {
  // LRM: keeps the leading "/" in place under direction: rtl
  const path = el("div", "path", "\u200e" + item.path);
  path.title = item.path;
  return path;
}
