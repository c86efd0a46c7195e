// Small helpers every view shares: DOM lookup, JSON fetches with readable errors, the error box,
// reduced motion, and an image picker (click / drop / paste) for the tool views.
export const $ = (sel) => document.querySelector(sel);

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "dataset") Object.assign(node.dataset, v);
    else if (k === "text") node.textContent = v;
    else if (k in node) node[k] = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}

export class ApiError extends Error {
  constructor(message, status, code) { super(message); this.status = status; this.code = code; }
}

// fetch + JSON; a non-2xx answer becomes an ApiError with the server's message
export async function fetchJSON(url, options = {}) {
  const resp = await fetch(url, options);
  let body = null;
  try { body = await resp.json(); } catch (_) { /* not JSON */ }
  if (!resp.ok) {
    const err = body && body.error;
    throw new ApiError((err && err.message) || `HTTP ${resp.status}`, resp.status, err && err.code);
  }
  return { resp, body };
}

const errorBox = () => $("#error");
export function showError(message) { const b = errorBox(); b.textContent = message; b.hidden = false; }
export function clearError() { const b = errorBox(); b.hidden = true; b.textContent = ""; }

export const reducedMotion = () => window.matchMedia("(prefers-reduced-motion: reduce)").matches;
export const scrollBehavior = () => (reducedMotion() ? "auto" : "smooth");

export function thumbUrl(id, size = 256) { return `/api/images/${encodeURIComponent(id)}?size=${size}`; }

export function isImage(blob) { return !!blob && (blob.type || "").startsWith("image/"); }

// A button + hidden file input that take an image by click or (while the view is shown) paste; drops go
// through the page's own drop handler (app.js)
export function imagePicker(button, input, onImage, isActive) {
  button.addEventListener("click", () => input.click());
  input.addEventListener("change", () => { if (input.files && input.files[0]) onImage(input.files[0]); });
  button.addEventListener("dragover", (e) => { e.preventDefault(); button.classList.add("over"); });
  button.addEventListener("dragleave", () => button.classList.remove("over"));
  button.addEventListener("drop", () => button.classList.remove("over"));   // the page's drop handler takes it
  document.addEventListener("paste", (e) => {
    if (!isActive()) return;
    const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((it) => it.type.startsWith("image/"));
    if (item) { e.preventDefault(); onImage(item.getAsFile()); }
  });
}

// Boxes ([left, top, right, bottom] in the image's pixels) drawn over an <img> in an <svg> layer
export function drawBoxes(svg, img, boxes) {
  svg.replaceChildren();
  const w = img.naturalWidth, h = img.naturalHeight;
  if (!w || !h) return;
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("preserveAspectRatio", "xMidYMid meet");
  for (const b of boxes) {
    const r = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    r.setAttribute("x", b[0]); r.setAttribute("y", b[1]);
    r.setAttribute("width", Math.max(1, b[2] - b[0])); r.setAttribute("height", Math.max(1, b[3] - b[1]));
    r.setAttribute("class", "box");
    svg.append(r);
  }
}
