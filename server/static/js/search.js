// The search view: text / image / "more like this" queries with an instruction, filters, pages of
// results ("Load more" asks the API for the next `offset`), the query image and colour swatches.
import { $, el, fetchJSON, showError, clearError, thumbUrl, isImage, scrollBehavior } from "./util.js";
import { page, writeUrl, apiFilter, FILTER_KEYS } from "./state.js";
import { resultCard } from "./results.js";
import { openResult, openResultById } from "./result-view.js";
import { loadOverlays, clearOverlays, openWhy } from "./overlays.js";

export const PAGE = 40;          // results per page
const MAX_RESULTS = 1000;        // the API's MAX_K: offset + k stays within it
// the eleven basic colour terms (retrieval/colour), drawn in their XKCD-survey colours
export const COLOURS = { black: "#000000", grey: "#929591", white: "#ffffff", red: "#e50000", orange: "#f97306",
  yellow: "#ffff14", green: "#15b01a", blue: "#0343df", purple: "#7e1e9c", pink: "#ff81c0", brown: "#653700" };

const q = $("#q"), file = $("#file"), resultsEl = $("#results"), status = $("#status"), more = $("#more");
const iq = $("#image-query"), iqThumb = $("#query-thumb"), iqLabel = $("#iq-label"), instruction = $("#instruction");
let controller = null, seq = 0, debounce = null, filterDebounce = null;
let results = [];
export let lastQuery = null;     // {fields, text, image}: what the shown results answer (overlays reuse it)

export function hasQuery(s) { return !!(s.upload || s.id || s.q.trim()); }

// the query's fields, built once per search and reused by "Load more", overlays and "Why?"
function queryFields(s) {
  const fields = [];
  if (s.upload) fields.push(["image", s.upload, s.upload.name || "query.png"]);
  else if (s.id) fields.push(["image_id", s.id]);
  if (s.upload || s.id) { if (s.instr.trim()) fields.push(["instruction", s.instr.trim()]); }
  else if (s.q.trim()) fields.push(["text", s.q.trim()]);
  const f = apiFilter(s);
  if (f) fields.push(["filter", JSON.stringify(f)]);
  return fields;
}

export function formOf(fields, extra = {}) {
  const fd = new FormData();
  for (const [k, v, name] of fields) { if (name) fd.append(k, v, name); else fd.append(k, v); }
  for (const [k, v] of Object.entries(extra)) fd.append(k, String(v));
  return fd;
}

function renderStatus(body) {
  const n = results.length;
  status.textContent = `${n} result${n === 1 ? "" : "s"} · ${body.took_ms} ms · ${body.encoder}` +
    (body.notes && body.notes.length ? ` · note: ${body.notes.join(" · ")}` : "");
}

function cards(items, start) {
  const frag = document.createDocumentFragment();
  const why = page.features.includes("attribution") ? openWhy : null;
  items.forEach((r, i) => frag.append(resultCard(r, start + i, { onOpen: openResult, onWhy: why })));
  return frag;
}

export async function runSearch({ append = false } = {}) {
  const s = page.state;
  if (!hasQuery(s)) {
    results = []; lastQuery = null; resultsEl.replaceChildren(); status.textContent = ""; more.hidden = true;
    clearError();
    return;
  }
  if (controller) controller.abort();
  controller = new AbortController();
  const mine = ++seq;
  const fields = append && lastQuery ? lastQuery.fields : queryFields(s);
  const offset = append ? results.length : 0;
  const per = s.per || PAGE;
  const k = Math.min(append ? per : per * s.page, MAX_RESULTS - offset);
  document.body.classList.add("loading");
  more.disabled = true;
  try {
    const { body } = await fetchJSON("/api/search", { method: "POST", body: formOf(fields, { k, offset }),
                                                      signal: controller.signal });
    if (mine !== seq) return;
    clearError();
    const items = body.results || [];
    if (append) { results = results.concat(items); resultsEl.append(cards(items, offset)); }
    else {
      results = items; resultsEl.replaceChildren(cards(items, 0));
      lastQuery = { fields, text: s.q.trim(), image: !!(s.upload || s.id) };
    }
    more.hidden = items.length < k || results.length >= MAX_RESULTS;
    renderStatus(body);
    if (append) { s.page = Math.ceil(results.length / per); writeUrl(s); }
    if ($("#attr").checked) loadOverlays(resultsEl);
    if (s.open && !$("#result").open) {
      const r = results.find((x) => x.id === s.open);
      if (r) openResult(r); else openResultById(s.open);
    }
  } catch (err) {
    if (err.name === "AbortError") return;
    if (mine === seq) showError(err.message);
  } finally {
    if (mine === seq) { document.body.classList.remove("loading"); more.disabled = false; }
  }
}

// -- the query image ----------------------------------------------------------------------------
function showImageQuery(s) {
  if (!s.upload && !s.id) { iq.hidden = true; return; }
  if (iqThumb.dataset.url) { URL.revokeObjectURL(iqThumb.dataset.url); delete iqThumb.dataset.url; }
  if (s.upload) { iqThumb.dataset.url = URL.createObjectURL(s.upload); iqThumb.src = iqThumb.dataset.url; }
  else iqThumb.src = thumbUrl(s.id);
  iqLabel.textContent = s.upload ? "Searching with this image" : "More like this";
  iq.hidden = false;
}

// a new search: a new history entry, then the first page
function newSearch(changes, { push = true } = {}) {
  const s = Object.assign(page.state, changes, { page: 1, open: "" });
  writeUrl(s, { push });
  showImageQuery(s);
  clearTimeout(debounce);
  return runSearch();
}

export function moreLikeThis(r) {
  q.value = "";
  instruction.value = "";
  window.scrollTo({ top: 0, behavior: scrollBehavior() });
  return newSearch({ view: "search", upload: null, id: r.id, q: "", instr: "" });
}

export function setImage(blob) {
  if (!isImage(blob)) { showError("That is not an image file."); return; }
  q.value = "";
  return newSearch({ upload: blob, id: "", q: "", instr: instruction.value.trim() });
}

function clearImage() {
  instruction.value = ""; file.value = "";
  newSearch({ upload: null, id: "", instr: "" });
  q.focus();
}

// -- filters ------------------------------------------------------------------------------------
function filterCount(s) {
  const n = FILTER_KEYS.filter((k) => s.filters[k]).length + (s.colours.length ? 1 : 0);
  const badge = $("#filter-count");
  badge.textContent = String(n);
  badge.hidden = n === 0;
}

function readFilters() {
  const filters = {};
  for (const k of FILTER_KEYS) { const v = $(`#f-${k}`).value.trim(); if (v) filters[k] = v; }
  const colours = [...document.querySelectorAll("#f-colours input:checked")].map((c) => c.value);
  return { filters, colours };
}

function filtersChanged() {
  clearTimeout(filterDebounce);
  filterDebounce = setTimeout(() => {
    const { filters, colours } = readFilters();
    page.state.filters = filters; page.state.colours = colours;
    filterCount(page.state);
    if (hasQuery(page.state)) newSearch({});
    else writeUrl(page.state);
  }, 300);
}

export function showColourFacet() {
  const box = $("#f-colours");
  for (const [name, hex] of Object.entries(COLOURS)) {
    const input = el("input", { type: "checkbox", value: name });
    input.addEventListener("change", filtersChanged);
    const sw = el("span", { className: "chip-sw" });
    sw.style.background = hex;
    box.append(el("label", { className: "chip", title: `only pictures showing ${name}` }, input, sw,
                  el("span", { text: name })));
  }
  box.hidden = false;
}

export function showSwatches() {   // one click: "the same, but red"
  const swatches = $("#swatches");
  for (const [name, hex] of Object.entries(COLOURS)) {
    const b = el("button", { type: "button", className: "swatch", title: `the same, in ${name}` });
    b.style.background = hex;
    b.dataset.colour = name;
    b.setAttribute("aria-label", `the same, in ${name}`);
    b.addEventListener("click", () => { instruction.value = `in ${name}`; newSearch({ instr: `in ${name}` }); });
    swatches.append(b);
  }
  swatches.hidden = false;
}

// -- restoring a state (first load, Back / Forward) ----------------------------------------------
export function restoreSearch(s) {
  q.value = s.upload || s.id ? "" : s.q;
  instruction.value = s.instr;
  for (const k of FILTER_KEYS) $(`#f-${k}`).value = s.filters[k] || "";
  document.querySelectorAll("#f-colours input").forEach((c) => { c.checked = s.colours.includes(c.value); });
  if (FILTER_KEYS.some((k) => s.filters[k]) || s.colours.length) $("#filters").open = true;
  filterCount(s);
  showImageQuery(s);
  return runSearch();
}

export function initSearch() {
  q.addEventListener("input", () => {
    const s = page.state;
    const wasEmpty = !hasQuery(s);
    if ((s.upload || s.id) && q.value.trim()) {   // typing starts a new text search
      s.upload = null; s.id = ""; s.instr = ""; instruction.value = ""; file.value = ""; iq.hidden = true;
    }
    s.q = q.value; s.page = 1; s.open = "";
    writeUrl(s, { push: wasEmpty && hasQuery(s) });   // typing replaces the entry; the first letter adds one
    clearTimeout(debounce);
    debounce = setTimeout(runSearch, 220);
  });
  $("#search-form").addEventListener("submit", (e) => { e.preventDefault(); newSearch({ q: q.value }); });
  instruction.addEventListener("input", () => {
    page.state.instr = instruction.value; writeUrl(page.state);
    clearTimeout(debounce); debounce = setTimeout(runSearch, 350);
  });
  instruction.addEventListener("keydown", (e) => { if (e.key === "Enter") newSearch({ instr: instruction.value }); });
  $("#pick").addEventListener("click", () => file.click());
  file.addEventListener("change", () => { if (file.files && file.files[0]) setImage(file.files[0]); });
  $("#clear-image").addEventListener("click", clearImage);
  more.addEventListener("click", () => runSearch({ append: true }));
  for (const k of FILTER_KEYS) $(`#f-${k}`).addEventListener("input", filtersChanged);
  $("#f-clear").addEventListener("click", () => {
    for (const k of FILTER_KEYS) $(`#f-${k}`).value = "";
    document.querySelectorAll("#f-colours input").forEach((c) => { c.checked = false; });
    filtersChanged();
  });
  $("#attr").addEventListener("change", () => {
    if ($("#attr").checked) loadOverlays(resultsEl); else clearOverlays(resultsEl);
  });
}

export function clearImageQuery() { clearImage(); }
