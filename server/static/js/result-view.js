// A result's own view: the original picture, its path and metadata, a link to copy, and actions
// ("More like this", "Why?", "Name this", "Copies of this"). Its id rides in the URL (?open=ID), so a
// copied link opens the same result over the same result set.
import { $, el, fetchJSON, showError } from "./util.js";
import { page, writeUrl, toUrl } from "./state.js";
import { scoreKind } from "./results.js";
import { moreLikeThis, lastQuery } from "./search.js";
import { openWhy } from "./overlays.js";

const dialog = $("#result");
let current = null;
let onNavigate = () => {};

function fmtBytes(n) {
  if (typeof n !== "number") return null;
  return n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} KB` : `${(n / 1048576).toFixed(1)} MB`;
}

function metaRows(r) {
  const m = r.metadata || {};
  const rows = [["Caption", r.caption], ["Path", r.path || m.source], ["Id", r.id]];
  if (m.width && m.height) rows.push(["Size", `${m.width} × ${m.height} px`]);
  if (m.size != null) rows.push(["File", fmtBytes(m.size)]);
  if (m.mtime) rows.push(["Modified", new Date(m.mtime * 1000).toLocaleString()]);
  const skip = new Set(["source", "width", "height", "size", "mtime", "sha256", "aliases", "caption", "path"]);
  for (const [k, v] of Object.entries(m)) {
    if (!skip.has(k) && v != null && v !== "") rows.push([k, typeof v === "object" ? JSON.stringify(v) : String(v)]);
  }
  return rows.filter(([, v]) => v != null && v !== "");
}

// the link that reopens this result: the current search (or, for an uploaded query, "more like this" of it)
export function resultLink(r) {
  const s = page.state;
  const linkable = s.upload ? { ...s, view: "search", upload: null, id: r.id, q: "", instr: "", page: 1 } : s;
  return location.origin + toUrl({ ...linkable, open: r.id });
}

export function openResult(r) {
  current = r;
  $("#result-title").textContent = r.caption || (r.path ? r.path.split("/").pop() : r.id);
  const img = $("#result-img");
  img.src = r.image_url || `/api/images/${r.id}`;
  img.alt = r.caption || "the original picture";
  $("#result-open").href = img.src;
  $("#result-original").href = img.src;
  $("#result-score").textContent = typeof r.score === "number"
    ? `${scoreKind(r) === "cosine" ? "Similarity" : `Score (${scoreKind(r)})`}: ${r.score.toFixed(3)}` : "";
  const dl = $("#result-meta");
  dl.replaceChildren();
  for (const [k, v] of metaRows(r)) dl.append(el("dt", { text: k }), el("dd", { text: v }));
  $("#result-why").hidden = !(page.features.includes("attribution") && lastQuery && typeof r.score === "number");
  $("#result-name").hidden = !page.features.includes("classify") || !page.textEncoder;
  $("#result-dup").hidden = !page.features.includes("duplicates");
  $("#result-link").value = resultLink(r);
  $("#result-copied").textContent = "";
  if (!dialog.open) dialog.showModal();
  if (page.state.open !== r.id) { page.state.open = r.id; writeUrl(page.state); }
}

export async function openResultById(id) {
  try {
    const { body } = await fetchJSON(`/api/images/${encodeURIComponent(id)}/meta`);
    openResult(body);
  } catch (err) {
    page.state.open = ""; writeUrl(page.state);
    showError(err.message);
  }
}

async function copyLink() {
  const field = $("#result-link");
  field.value = resultLink(current);
  let ok = false;
  try { await navigator.clipboard.writeText(field.value); ok = true; } catch (_) { /* no clipboard: select it */ }
  if (!ok) { field.focus(); field.select(); }
  $("#result-copied").textContent = ok ? "Link copied." : "Select and copy the link above.";
}

// going elsewhere from the view: the entry left behind is the result set without the view open
function leave() {
  const r = current;
  page.state.open = "";
  writeUrl(page.state);
  dialog.close();
  return r;
}

export function initResultView(navigate) {
  onNavigate = navigate;
  $("#result-close").addEventListener("click", () => dialog.close());
  dialog.addEventListener("click", (e) => { if (e.target === dialog) dialog.close(); });
  dialog.addEventListener("close", () => {
    if (page.state.open) { page.state.open = ""; writeUrl(page.state); }
  });
  $("#result-more").addEventListener("click", () => { const r = leave(); moreLikeThis(r); });
  $("#result-why").addEventListener("click", () => openWhy(current));
  $("#result-copy").addEventListener("click", copyLink);
  $("#result-name").addEventListener("click", () => onNavigate("name", leave().id));
  $("#result-dup").addEventListener("click", () => onNavigate("copy", leave().id));
}
