// The map page: GET /v1/map -> a density heat map with thumbnails on a canvas; drag to pan, wheel or
// the buttons to zoom; a click on a thumbnail -> POST /v1/search {id} -> its neighbours at the side.
"use strict";
const canvas = $("map"), ctx = canvas.getContext("2d"), results = $("results");

const TILE = 16;          // thumbnail side in CSS px at zoom 1; grows with the zoom, up to MAX_TILE
const MAX_TILE = 128;
const LOADS = 8;          // thumbnails fetched at once
const state = { points: [], density: null, view: { zoom: 1, x: 0, y: 0 }, picked: null, near: new Set(),
                queue: [], loading: 0, ready: false, frame: 0 };


// world (0..1 square) <-> canvas CSS pixels: the square fits the canvas at zoom 1, centred
function base() {
  return Math.min(canvas.clientWidth, canvas.clientHeight);
}
function toScreen(x, y) {
  const b = base() * state.view.zoom;
  return [canvas.clientWidth / 2 + (x - 0.5 - state.view.x) * b, canvas.clientHeight / 2 + (y - 0.5 - state.view.y) * b];
}
function toWorld(sx, sy) {
  const b = base() * state.view.zoom;
  return [(sx - canvas.clientWidth / 2) / b + 0.5 + state.view.x, (sy - canvas.clientHeight / 2) / b + 0.5 + state.view.y];
}
function tile() {
  return Math.min(MAX_TILE, TILE * Math.pow(state.view.zoom, 0.8));
}

function draw() {
  state.frame = 0;
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  drawDensity();
  const t = tile();
  const visible = [];
  for (const p of state.points) {
    const [sx, sy] = toScreen(p.x, p.y);
    if (sx < -t || sy < -t || sx > w + t || sy > h + t) continue;
    visible.push(p);
    if (p.img && p.img.complete && p.img.naturalWidth > 0) {
      ctx.drawImage(p.img, sx - t / 2, sy - t / 2, t, t);
    } else {
      ctx.fillStyle = "rgba(200, 210, 230, 0.55)";
      ctx.fillRect(sx - t / 4, sy - t / 4, t / 2, t / 2);
      if (!p.img) state.queue.push(p);
    }
  }
  for (const p of visible) {  // outlines on top of every tile
    const mark = p.id === state.picked ? "#ffb020" : state.near.has(p.id) ? "#3b9cff" : null;
    if (!mark) continue;
    const [sx, sy] = toScreen(p.x, p.y);
    ctx.lineWidth = p.id === state.picked ? 3 : 2;
    ctx.strokeStyle = mark;
    ctx.strokeRect(sx - t / 2 - 1, sy - t / 2 - 1, t + 2, t + 2);
  }
  pump();
}

function drawDensity() {
  const d = state.density;
  if (!d) return;
  const n = d.grid, cells = d.cells;
  let max = 0;
  for (const row of cells) for (const c of row) max = Math.max(max, c);
  if (max <= 0) return;
  const [x0, y0] = toScreen(0, 0), [x1] = toScreen(1, 1);
  const step = (x1 - x0) / n;
  for (let r = 0; r < n; r++) {
    for (let c = 0; c < n; c++) {
      const v = cells[r][c];
      if (v <= 0) continue;
      const a = Math.log1p(v) / Math.log1p(max);  // log: a few dense clusters must not hide the rest
      ctx.fillStyle = `rgba(80, 140, 255, ${(0.08 + 0.6 * a).toFixed(3)})`;
      ctx.fillRect(x0 + c * step, y0 + r * step, step + 0.5, step + 0.5);
    }
  }
}

function pump() {  // fetch visible thumbnails a few at a time, nearest the centre first
  if (!state.queue.length) return;
  const [cx, cy] = toWorld(canvas.clientWidth / 2, canvas.clientHeight / 2);
  state.queue.sort((a, b) => ((b.x - cx) ** 2 + (b.y - cy) ** 2) - ((a.x - cx) ** 2 + (a.y - cy) ** 2));
  while (state.loading < LOADS && state.queue.length) {
    const p = state.queue.pop();
    if (p.img) continue;
    p.img = new Image();
    state.loading++;
    p.img.onload = p.img.onerror = () => { state.loading--; redraw(); };
    p.img.src = p.thumbnail_url;
  }
  state.queue = [];
}

function redraw() {
  if (!state.frame) state.frame = requestAnimationFrame(draw);
}

function hitTest(sx, sy) {
  const t = tile();
  for (let i = state.points.length - 1; i >= 0; i--) {  // the last drawn is on top
    const p = state.points[i];
    const [px, py] = toScreen(p.x, p.y);
    if (Math.abs(px - sx) <= t / 2 && Math.abs(py - sy) <= t / 2) return p;
  }
  return null;
}

function zoomAt(factor, sx, sy) {
  const [wx, wy] = toWorld(sx, sy);
  state.view.zoom = Math.min(200, Math.max(0.5, state.view.zoom * factor));
  const [nx, ny] = toWorld(sx, sy);  // keep the world point under the cursor where it was
  state.view.x += wx - nx;
  state.view.y += wy - ny;
  redraw();
}

function card(hit) {
  const div = itemCard("hit", hit, [el("div", "score", hit.score === undefined ? "query" : hit.score.toFixed(4)),
                                    nameLine(hit)]);
  if (state.points.some((p) => p.id === hit.id)) {
    div.classList.add("on-map");
    div.title = "show on the map and search by it";
    div.addEventListener("click", () => { centreOn(hit.id); search(hit.id); });
  }
  return div;
}

function centreOn(id) {
  const p = state.points.find((q) => q.id === id);
  if (!p) return;
  state.view.x = p.x - 0.5;
  state.view.y = p.y - 0.5;
  redraw();
}

async function search(id) {
  state.picked = id;
  state.near = new Set();
  redraw();
  say("searching…");
  const k = Math.max(1, Math.min(100, parseInt($("k").value, 10) || 12));
  const t0 = performance.now();
  try {
    const [r, item] = await Promise.all([
      fetch("/v1/search", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ id, k }) }),
      fetch(`/v1/items/${id}`).then((x) => (x.ok ? x.json() : null)),
    ]);
    const body = await r.json();
    if (!r.ok) {
      results.replaceChildren();
      say(body.detail || `error ${r.status}`, true);
      return;
    }
    $("picked").replaceChildren(...(item ? [card(item)] : []));
    results.replaceChildren(...body.neighbours.map(card));
    results.dataset.query = id;
    results.dataset.count = body.neighbours.length;
    state.near = new Set(body.neighbours.map((n) => n.id));
    say(`${body.neighbours.length} neighbours of item ${id} in ${Math.round(performance.now() - t0)} ms`);
    redraw();
  } catch (e) {
    say(`request failed: ${e}`, true);
  }
}

async function load(refresh = false) {
  $("status").textContent = "computing the map…";
  const url = `/v1/map?limit=2000&method=${encodeURIComponent($("method").value)}${refresh ? "&wait=30" : ""}`;
  try {
    for (;;) {
      const r = await fetch(url);
      const body = await r.json();
      if (r.status === 202) {  // still computing
        await new Promise((ok) => setTimeout(ok, 1500));
        continue;
      }
      if (!r.ok) {
        $("status").textContent = body.detail || `error ${r.status}`;
        return;
      }
      state.points = body.points;
      state.density = body.density;
      if (body.methods.length !== $("method").options.length) {
        $("method").replaceChildren(...body.methods.map((m) => new Option(m, m, false, m === body.method)));
      }
      state.ready = true;
      const shown = body.points.length < body.count ? `${body.points.length} of ${body.count} items shown` : `${body.count} items`;
      $("status").textContent = `${shown} · ${body.method}${body.stale ? " · updating" : ""} · commit ${body.generation}`;
      canvas.dataset.points = body.points.length;
      redraw();
      if (body.stale) setTimeout(() => load(), 3000);
      return;
    }
  } catch (e) {
    $("status").textContent = `server unreachable: ${e}`;
  }
}

let drag = null;
canvas.addEventListener("pointerdown", (e) => {
  drag = { x: e.offsetX, y: e.offsetY, moved: 0 };
  canvas.setPointerCapture(e.pointerId);
});
canvas.addEventListener("pointermove", (e) => {
  if (!drag) return;
  const dx = e.offsetX - drag.x, dy = e.offsetY - drag.y;
  drag.moved += Math.abs(dx) + Math.abs(dy);
  if (drag.moved > 4) {
    canvas.classList.add("dragging");
    const b = base() * state.view.zoom;
    state.view.x -= dx / b;
    state.view.y -= dy / b;
    drag.x = e.offsetX;
    drag.y = e.offsetY;
    redraw();
  }
});
canvas.addEventListener("pointerup", (e) => {
  const wasClick = drag && drag.moved <= 4;
  drag = null;
  canvas.classList.remove("dragging");
  if (!wasClick) return;
  const p = hitTest(e.offsetX, e.offsetY);
  if (p) search(p.id);
});
canvas.addEventListener("wheel", (e) => {
  e.preventDefault();
  zoomAt(Math.exp(-e.deltaY * 0.0015), e.offsetX, e.offsetY);
}, { passive: false });
canvas.addEventListener("keydown", (e) => {
  const step = 0.1 / state.view.zoom;
  const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
  if (moves[e.key]) { state.view.x += moves[e.key][0]; state.view.y += moves[e.key][1]; redraw(); e.preventDefault(); }
  if (e.key === "+" || e.key === "=") zoomAt(1.25, canvas.clientWidth / 2, canvas.clientHeight / 2);
  if (e.key === "-") zoomAt(0.8, canvas.clientWidth / 2, canvas.clientHeight / 2);
});
$("zoom-in").addEventListener("click", () => zoomAt(1.5, canvas.clientWidth / 2, canvas.clientHeight / 2));
$("zoom-out").addEventListener("click", () => zoomAt(1 / 1.5, canvas.clientWidth / 2, canvas.clientHeight / 2));
$("zoom-reset").addEventListener("click", () => { state.view = { zoom: 1, x: 0, y: 0 }; redraw(); });
$("reload").addEventListener("click", () => load(true));
$("method").addEventListener("change", () => { state.points = []; state.picked = null; state.near = new Set(); load(); });
window.addEventListener("resize", redraw);

// for scripts and tests: where an item is drawn (CSS px from the canvas's top left), or null
window.simsearchMap = {
  get ready() { return state.ready; },
  get points() { return state.points; },
  screenPosition(id) {
    const p = state.points.find((q) => q.id === id);
    return p ? toScreen(p.x, p.y) : null;
  },
  topmostAt(sx, sy) { const p = hitTest(sx, sy); return p ? p.id : null; },
  search,
};
load();
