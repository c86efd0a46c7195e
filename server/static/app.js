// Loupe web page: search (text, image, "more like this", instruction, filters, pages), a result's own
// view, the collection's duplicates, "Is this a copy?" and "Name this". ES modules under js/, no build
// step, no dependencies. The state lives in the URL (js/state.js): Back / Forward and shared links work.
import { $, showError, clearError, isImage } from "./js/util.js";
import { page, parseUrl, writeUrl, emptyState, VIEWS } from "./js/state.js";
import { initSearch, restoreSearch, setImage, showSwatches, showColourFacet, clearImageQuery } from "./js/search.js";
import { initResultView } from "./js/result-view.js";
import { initWhy } from "./js/overlays.js";
import { initDuplicates, loadDuplicates } from "./js/dups.js";
import { initTools, checkCopy, nameImage } from "./js/tools.js";

// show one view and bring it up to date with page.state
function render() {
  const s = page.state;
  document.body.dataset.view = s.view;
  for (const v of VIEWS) $(`#view-${v}`).hidden = v !== s.view;
  document.querySelectorAll(".view-search").forEach((n) => { n.hidden = s.view !== "search" || (n.id === "attr-toggle" && !page.features.includes("attribution")); });
  document.querySelectorAll(".tab").forEach((t) => {
    if (t.dataset.view === s.view) t.setAttribute("aria-current", "page"); else t.removeAttribute("aria-current");
  });
  clearError();
  if ($("#result").open && !s.open) $("#result").close();
  if (s.view === "search") { page.lastSearch = s; return restoreSearch(s); }
  if (s.view === "duplicates") return loadDuplicates(s.dpage);
  if (s.view === "copy") return checkCopy(s);
  if (s.view === "name") return nameImage(s);
}

// a tab, or a result's "Name this" / "Copies of this": a new history entry
function navigate(view, id = "") {
  const base = view === "search" && page.lastSearch ? { ...page.lastSearch, open: "" } : emptyState();
  page.state = { ...base, view, id: view === "search" ? base.id : id, upload: view === "search" ? base.upload : null };
  writeUrl(page.state, { push: true });
  render();
}

async function start() {
  try {
    const h = await (await fetch("/healthz")).json();
    page.features = h.features || [];
    page.colourEncoder = h.colour_encoder || null;
    page.textEncoder = h.text_encoder || null;
    page.images = h.images;
    const show = { duplicates: page.features.includes("duplicate-groups"), copy: page.features.includes("duplicates"),
                   name: page.features.includes("classify") && !!h.text_encoder };
    document.querySelectorAll(".tab").forEach((t) => { if (t.dataset.view in show) t.hidden = !show[t.dataset.view]; });
    if (page.colourEncoder) { showSwatches(); showColourFacet(); }
    if (typeof h.images === "number") $("#hint").textContent =
      `${h.images.toLocaleString()} images · type to search · drop, paste or pick an image · click a result to open it`;
  } catch (_) { /* the page still searches */ }
  page.state = parseUrl(location.search, history.state);
  writeUrl(page.state);             // normalise the URL
  render();
}

window.addEventListener("popstate", (e) => { page.state = parseUrl(location.search, e.state); render(); });
document.querySelectorAll(".tab").forEach((t) => t.addEventListener("click", (e) => {
  if (e.metaKey || e.ctrlKey || e.shiftKey || e.button !== 0) return;   // a new tab keeps the plain link
  e.preventDefault();
  navigate(t.dataset.view);
}));

// paste and drop: into whichever view is shown (the tools take their own drops and pastes too)
document.addEventListener("paste", (e) => {
  if (page.state.view !== "search") return;
  const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((it) => it.type.startsWith("image/"));
  if (item) { e.preventDefault(); setImage(item.getAsFile()); }
});
const drop = $("#drop");
let dragDepth = 0;
window.addEventListener("dragenter", (e) => { e.preventDefault(); dragDepth++; drop.hidden = false; });
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("dragleave", () => { if (--dragDepth <= 0) { dragDepth = 0; drop.hidden = true; } });
window.addEventListener("drop", (e) => {
  e.preventDefault();
  dragDepth = 0; drop.hidden = true;
  const f = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
  if (!f) return;
  if (!isImage(f)) { showError("That is not an image file."); return; }
  const view = page.state.view;
  if (view === "copy" || view === "name") {
    Object.assign(page.state, { upload: f, id: "", open: "" });
    writeUrl(page.state, { push: true });
    (view === "copy" ? checkCopy : nameImage)(page.state);
  } else setImage(f);
});

document.addEventListener("keydown", (e) => {
  if ($("#why").open || $("#result").open) return;   // dialogs handle their own keys (Escape closes them)
  if (page.state.view !== "search") return;
  const typing = ["INPUT", "TEXTAREA", "SELECT"].includes(document.activeElement.tagName);
  const q = $("#q");
  if (e.key === "/" && !typing) { e.preventDefault(); q.focus(); q.select(); }
  else if (e.key === "Escape") {
    if (page.state.upload || page.state.id) clearImageQuery();
    else if (document.activeElement === q) { q.value = ""; q.dispatchEvent(new Event("input")); }
  } else if (!typing && ["ArrowRight", "ArrowLeft", "ArrowDown", "ArrowUp"].includes(e.key)) {
    const cards = [...document.querySelectorAll("#results .card")];
    if (!cards.length) return;
    const i = cards.indexOf(document.activeElement);
    const cols = Math.max(1, Math.round($("#results").clientWidth / (cards[0].offsetWidth + 14)));
    const step = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: cols, ArrowUp: -cols }[e.key];
    const next = cards[Math.max(0, Math.min(cards.length - 1, i < 0 ? 0 : i + step))];
    if (next) { e.preventDefault(); next.focus(); }
  }
});

initSearch();
initResultView(navigate);
initWhy();
initDuplicates();
initTools();
start();
