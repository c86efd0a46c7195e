// Search by region on the query picture: drag a box on it (mouse, pen or touch: pointer events) to search
// that part; "Find objects" asks the API for the picture's regions (`"regions": true`), drawn as numbered
// boxes — a click on one (or on its chip) shows that region's own results, "All" the fused list. Boxes are
// kept in pixels of the query picture (the API's frame), drawn in percentages of the shown image, so they
// stay put when the page reflows. A region-index hit's `box` is drawn on its thumbnail.
import { $, el } from "./util.js";

const layer = $("#query-boxes"), thumb = $("#query-thumb");
const MIN_DRAG = 5;                 // CSS pixels: a smaller movement is a click, not a box
let size = null;                    // [width, height] of the query picture (its pixels: the box's frame)
let handlers = { onBox: () => {}, onSelect: () => {} };
let shown = { box: null, regions: [], selected: -1 };

export function setFrame(frame) { size = frame && frame[0] > 0 && frame[1] > 0 ? [frame[0], frame[1]] : null; }
// the picture's frame: given (upload token, an indexed picture's metadata), else the shown image's own pixels
export function frame() {
  if (size) return size;
  return thumb.naturalWidth ? [thumb.naturalWidth, thumb.naturalHeight] : null;
}

function pct(box, f) {
  return { left: `${(box[0] / f[0]) * 100}%`, top: `${(box[1] / f[1]) * 100}%`,
           width: `${((box[2] - box[0]) / f[0]) * 100}%`, height: `${((box[3] - box[1]) / f[1]) * 100}%` };
}

function place(node, box, f) { Object.assign(node.style, pct(box, f)); return node; }

// the response's regions as boxes in the query picture's pixels: a region box is in the frame of
// `query_size` (the picture as decoded; the box's crop when a box was searched)
export function regionBoxes(body, f = frame()) {
  const rs = body.regions || [];
  if (!rs.length) return [];
  const qs = body.query_size || f;
  const ox = body.box ? body.box[0] : 0, oy = body.box ? body.box[1] : 0;
  const sx = body.box ? (body.box[2] - body.box[0]) / qs[0] : (f ? f[0] / qs[0] : 1);
  const sy = body.box ? (body.box[3] - body.box[1]) / qs[1] : (f ? f[1] / qs[1] : 1);
  return rs.map((r) => [ox + r.box[0] * sx, oy + r.box[1] * sy, ox + r.box[2] * sx, oy + r.box[3] * sy]);
}

// draw the searched box and the regions' boxes (numbered buttons; `selected` highlighted)
export function drawQuery({ box = null, regions = [], selected = -1 } = {}) {
  shown = { box, regions, selected };
  layer.querySelectorAll(".user-box, .region-box").forEach((n) => n.remove());
  const f = frame();
  if (!f) return;
  if (box) layer.append(place(el("div", { className: "user-box", title: "the part of the picture searched" }), box, f));
  regions.forEach((b, i) => {
    const btn = el("button", { type: "button", className: "region-box" + (i === selected ? " selected" : ""),
                               dataset: { region: String(i) } }, el("span", { text: String(i + 1) }));
    btn.setAttribute("aria-label", `Object ${i + 1}: show its results`);
    btn.setAttribute("aria-pressed", String(i === selected));
    btn.addEventListener("click", (e) => { e.stopPropagation(); handlers.onSelect(i === shown.selected ? -1 : i); });
    layer.append(place(btn, b, f));
  });
  const chips = $("#region-list");
  chips.replaceChildren();
  chips.hidden = !regions.length;
  if (!regions.length) return;
  const chip = (label, i) => {
    const b = el("button", { type: "button", className: "chip region-chip" + (i === selected ? " selected" : ""),
                             text: label, dataset: { region: String(i) } });
    b.setAttribute("aria-pressed", String(i === selected));
    b.addEventListener("click", () => handlers.onSelect(i));
    return b;
  };
  chips.append(chip("All", -1), ...regions.map((_, i) => chip(`Object ${i + 1}`, i)));
}

export function redraw() { drawQuery(shown); }

// -- dragging a box ---------------------------------------------------------------------------------
function toPixels(rect, x, y, f) {
  const px = Math.max(0, Math.min(rect.width, x - rect.left)) * (f[0] / rect.width);
  const py = Math.max(0, Math.min(rect.height, y - rect.top)) * (f[1] / rect.height);
  return [px, py];
}

function initDrag() {
  let start = null, ghost = null;
  layer.addEventListener("pointerdown", (e) => {
    if (e.button !== 0 || !frame()) return;
    start = { x: e.clientX, y: e.clientY, id: e.pointerId, dragging: false };
  });
  layer.addEventListener("pointermove", (e) => {
    if (!start || e.pointerId !== start.id) return;
    const dx = e.clientX - start.x, dy = e.clientY - start.y;
    if (!start.dragging) {
      if (Math.hypot(dx, dy) < MIN_DRAG) return;
      start.dragging = true;
      layer.setPointerCapture(e.pointerId);
      ghost = el("div", { className: "user-box drawing" });
      layer.append(ghost);
    }
    const rect = thumb.getBoundingClientRect();
    const left = Math.max(rect.left, Math.min(start.x, e.clientX)), right = Math.min(rect.right, Math.max(start.x, e.clientX));
    const top = Math.max(rect.top, Math.min(start.y, e.clientY)), bottom = Math.min(rect.bottom, Math.max(start.y, e.clientY));
    Object.assign(ghost.style, { left: `${left - rect.left}px`, top: `${top - rect.top}px`,
                                 width: `${Math.max(0, right - left)}px`, height: `${Math.max(0, bottom - top)}px` });
  });
  const end = (e, cancel) => {
    if (!start || e.pointerId !== start.id) return;
    const was = start;
    start = null;
    if (ghost) { ghost.remove(); ghost = null; }
    if (!was.dragging || cancel) return;
    const f = frame(), rect = thumb.getBoundingClientRect();
    const [ax, ay] = toPixels(rect, was.x, was.y, f), [bx, by] = toPixels(rect, e.clientX, e.clientY, f);
    const box = [Math.floor(Math.min(ax, bx)), Math.floor(Math.min(ay, by)),
                 Math.ceil(Math.max(ax, bx)), Math.ceil(Math.max(ay, by))];
    box[2] = Math.min(f[0], Math.max(box[2], box[0] + 1));
    box[3] = Math.min(f[1], Math.max(box[3], box[1] + 1));
    handlers.onBox(box);
  };
  layer.addEventListener("pointerup", (e) => end(e, false));
  layer.addEventListener("pointercancel", (e) => end(e, true));
  layer.addEventListener("lostpointercapture", () => { if (ghost) { ghost.remove(); ghost = null; } start = null; });
}

export function initRegions(on) {
  handlers = { ...handlers, ...on };
  initDrag();
  thumb.addEventListener("load", redraw);
}

// -- a region-index hit: where in the picture it was found ------------------------------------------
// the box over a thumbnail that shows the picture whole (object-fit: contain in a square)
export function hitBox(r) {
  const m = r.metadata || {};
  const w = Number(m.width), h = Number(m.height);
  if (!Array.isArray(r.box) || !(w > 0 && h > 0)) return null;
  const cw = w >= h ? 100 : (w / h) * 100, ch = w >= h ? (h / w) * 100 : 100;
  const ox = (100 - cw) / 2, oy = (100 - ch) / 2, b = r.box;
  const node = el("div", { className: "hit-box", title: `found here: ${b.join(", ")}` });
  Object.assign(node.style, { left: `${ox + (b[0] / w) * cw}%`, top: `${oy + (b[1] / h) * ch}%`,
                              width: `${((b[2] - b[0]) / w) * cw}%`, height: `${((b[3] - b[1]) / h) * ch}%` });
  return node;
}
