// The search view: text / image / "more like this" queries with an instruction, filters, pages of
// results ("Load more" asks the API for the next `offset`), the query image and colour swatches, and
// search by region (a box dragged on the query picture, "Find objects": js/regions.js). An uploaded
// picture is sent once (POST /api/uploads); the search, "Load more" and the overlays send its token.
import { $, el, fetchJSON, showError, clearError, thumbUrl, isImage, scrollBehavior } from "./util.js";
import { page, writeUrl, apiFilter, FILTER_KEYS } from "./state.js";
import { initRegions, setFrame, drawQuery, regionBoxes } from "./regions.js";
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
let fused = null;                // the last answer with regions: {query, results, regions: [{box, results}]}

export function hasQuery(s) { return !!(s.upload || s.id || s.q.trim()); }

// the query's fields, built once per search and reused by "Load more", overlays and "Why?"
function queryFields(s) {
  const fields = [];
  if (s.upload && s.token) fields.push(["upload", s.token]);
  else if (s.upload) fields.push(["image", s.upload, s.upload.name || "query.png"]);
  else if (s.id) fields.push(["image_id", s.id]);
  if (s.upload || s.id) {
    if (s.instr.trim()) fields.push(["instruction", s.instr.trim()]);
    if (s.box) fields.push(["box", s.box.join(",")]);
    if (s.regions) fields.push(["regions", "true"]);
  } else if (s.q.trim()) fields.push(["text", s.q.trim()]);
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

// an uploaded picture goes to the server once: its token stands for it afterwards (and its size is the
// frame of a box); a server without /api/uploads gets the picture with each request instead
async function ensureUpload(s, signal) {
  if (!s.upload || s.token || !page.features.includes("uploads")) return;
  const fd = new FormData();
  fd.append("image", s.upload, s.upload.name || "query.png");
  const { body } = await fetchJSON("/api/uploads", { method: "POST", body: fd, signal });
  s.token = body.upload;
  s.usize = [body.width, body.height];
  setFrame(s.usize);
  writeUrl(s);                     // the token rides in this history entry, with the picture
}

export async function runSearch({ append = false, retried = false } = {}) {
  const s = page.state;
  if (!hasQuery(s)) {
    if (controller) controller.abort();
    seq++;
    document.body.classList.remove("loading");
    results = []; lastQuery = null; fused = null; resultsEl.replaceChildren(); status.textContent = ""; more.hidden = true;
    drawQuery();
    clearError();
    return;
  }
  if (controller) controller.abort();
  controller = new AbortController();
  const mine = ++seq;
  document.body.classList.add("loading");
  more.disabled = true;
  try {
    await ensureUpload(s, controller.signal);
    if (mine !== seq) return;
    const fields = append && lastQuery ? fused ? fused.query.fields : lastQuery.fields : queryFields(s);
    const offset = append ? results.length : 0;
    const per = s.per || PAGE;
    const k = Math.min(append ? per : per * s.page, MAX_RESULTS - offset);
    const { body } = await fetchJSON("/api/search", { method: "POST", body: formOf(fields, { k, offset }),
                                                      signal: controller.signal });
    if (mine !== seq) return;
    clearError();
    const items = body.results || [];
    if (append) {
      results = results.concat(items); resultsEl.append(cards(items, offset));
      if (fused) fused.results = results;
    }
    else {
      results = items;
      lastQuery = { fields, text: s.q.trim(), image: !!(s.upload || s.id) };
      fused = body.regions ? { query: lastQuery, results: items, took: body, boxes: regionBoxes(body),
                               regions: body.regions } : null;
      if (fused && s.region >= 0 && s.region < fused.regions.length) { showRegion(s.region, { write: false }); }
      else {
        if (s.region >= 0) { s.region = -1; writeUrl(s); }
        resultsEl.replaceChildren(cards(items, 0));
        drawQuery({ box: s.box, regions: fused ? fused.boxes : [] });
      }
    }
    more.hidden = items.length < k || results.length >= MAX_RESULTS || (fused !== null && s.region >= 0);
    if (!fused || s.region < 0) renderStatus(body);
    if (append) { s.page = Math.ceil(results.length / per); writeUrl(s); }
    if ($("#attr").checked) loadOverlays(resultsEl);
    if (s.open && !$("#result").open) {
      const r = results.find((x) => x.id === s.open);
      if (r) openResult(r); else openResultById(s.open);
    }
  } catch (err) {
    if (err.name === "AbortError") return;
    if (err.code === "upload_not_found" && s.token && !retried && mine === seq) {   // expired: upload again
      s.token = "";
      return runSearch({ append, retried: true });
    }
    if (mine === seq) showError(err.message);
  } finally {
    if (mine === seq) { document.body.classList.remove("loading"); more.disabled = false; }
  }
}

// a region's own results (i >= 0) or the fused list (-1), from the last answer: no new request. The
// overlays of a region's results explain that region (its box as the query's box).
export function showRegion(i, { write = true } = {}) {
  if (!fused) return;
  const s = page.state;
  s.region = i >= 0 && i < fused.regions.length ? i : -1;
  if (write) writeUrl(s);
  clearOverlays(resultsEl);
  if (s.region < 0) {
    results = fused.results;
    lastQuery = fused.query;
    renderStatus(fused.took);
  } else {
    const b = fused.boxes[s.region].map((v) => Math.round(v));
    results = fused.regions[s.region].results;
    const fields = fused.query.fields.filter(([k]) => k !== "regions" && k !== "box");
    lastQuery = { ...fused.query, fields: [...fields, ["box", b.join(",")]] };
    status.textContent = `Object ${s.region + 1} of ${fused.regions.length}: ${results.length} result` +
      `${results.length === 1 ? "" : "s"} for the part of the picture outlined · “All” shows every object's best`;
  }
  resultsEl.replaceChildren(cards(results, 0));
  more.hidden = s.region >= 0;
  drawQuery({ box: s.box, regions: fused.boxes, selected: s.region });
  if ($("#attr").checked) loadOverlays(resultsEl);
}

// -- the query image ----------------------------------------------------------------------------
let shownQuery = null;           // the Blob or id the query image shows (not reloaded when only the box changes)
let metaSeq = 0;
function showImageQuery(s) {
  $("#clear-box").hidden = !s.box;
  $("#regions").checked = !!s.regions;
  if (!s.upload && !s.id) { iq.hidden = true; shownQuery = null; drawQuery(); return; }
  iqLabel.textContent = s.box ? "Searching with the part outlined" : s.upload ? "Searching with this image"
    : "More like this";
  iq.hidden = false;
  if (shownQuery === (s.upload || s.id)) { drawQuery({ box: s.box }); return; }
  shownQuery = s.upload || s.id;
  if (iqThumb.dataset.url) { URL.revokeObjectURL(iqThumb.dataset.url); delete iqThumb.dataset.url; }
  setFrame(s.upload ? s.usize : null);
  if (s.upload) { iqThumb.dataset.url = URL.createObjectURL(s.upload); iqThumb.src = iqThumb.dataset.url; }
  else {
    iqThumb.src = thumbUrl(s.id, 512);
    const mine = ++metaSeq;          // an indexed picture: its size (the box's frame) from its metadata
    fetchJSON(`/api/images/${encodeURIComponent(s.id)}/meta`).then(({ body }) => {
      const m = body.metadata || {};
      if (mine === metaSeq && m.width && m.height) { setFrame([m.width, m.height]); drawQuery({ box: s.box }); }
    }).catch(() => {});
  }
  drawQuery({ box: s.box });
}

// a new search: a new history entry, then the first page
function newSearch(changes, { push = true } = {}) {
  const s = Object.assign(page.state, changes, { page: 1, open: "", region: -1 });
  writeUrl(s, { push });
  showImageQuery(s);
  clearTimeout(debounce);
  return runSearch();
}

export function moreLikeThis(r) {
  q.value = "";
  instruction.value = "";
  window.scrollTo({ top: 0, behavior: scrollBehavior() });
  return newSearch({ view: "search", upload: null, id: r.id, q: "", instr: "", box: null, token: "", usize: null });
}

export function setImage(blob) {
  if (!isImage(blob)) { showError("That is not an image file."); return; }
  q.value = "";
  return newSearch({ upload: blob, id: "", q: "", instr: instruction.value.trim(), box: null, token: "", usize: null });
}

function clearImage() {
  instruction.value = ""; file.value = "";
  newSearch({ upload: null, id: "", instr: "", box: null, token: "", usize: null, regions: false });
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
      s.box = null; s.token = ""; s.usize = null; s.regions = false; s.region = -1; shownQuery = null;
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
  $("#clear-box").addEventListener("click", clearBox);
  $("#regions").addEventListener("change", () => newSearch({ regions: $("#regions").checked }));
  initRegions({ onBox: (box) => newSearch({ box }), onSelect: (i) => showRegion(i) });
  $("#attr").addEventListener("change", () => {
    if ($("#attr").checked) loadOverlays(resultsEl); else clearOverlays(resultsEl);
  });
}

export function clearBox() { if (page.state.box) newSearch({ box: null }); }

// Escape: a box first, then the image query
export function clearImageQuery() { if (page.state.box) clearBox(); else clearImage(); }
