// The page's state in the URL: a shared link reproduces the view and its result set; Back / Forward
// restore it. An uploaded image cannot travel in a link. Nor can it ride in history.state: Chromium drops
// an entry's whole state when it holds a Blob. So the tab keeps its pictures in a Map, and history.state
// holds the key (with the upload token and the picture's size): Back / Forward restore it within the tab.
// Search by region: `box=x0,y0,x1,y1` (pixels of the query picture), `regions=1` ("Find objects") and
// `region=N` (the object whose results are shown).
export const VIEWS = ["search", "duplicates", "copy", "name"];
export const FILTER_KEYS = ["caption", "path", "minw", "minh"];

const pictures = new Map();    // key -> the Blob of an uploaded picture, for this tab's history entries
let pictureCount = 0;
function pictureKey(blob) {
  for (const [key, b] of pictures) if (b === blob) return key;
  const key = `p${++pictureCount}`;
  pictures.set(key, blob);
  return key;
}

export function emptyState() {
  return { view: "search", q: "", id: "", instr: "", filters: {}, colours: [], page: 1, dpage: 1, vocab: "",
           open: "", upload: null, per: 0, token: "", usize: null, box: null, regions: false, region: -1 };
}

export function parseUrl(search, histState) {
  const p = new URLSearchParams(search);
  const s = emptyState();
  const view = p.get("view");
  s.view = VIEWS.includes(view) ? view : "search";
  s.q = p.get("q") || "";
  s.id = p.get("id") || "";
  s.instr = p.get("instr") || "";
  for (const k of FILTER_KEYS) if (p.get(k)) s.filters[k] = p.get(k);
  s.colours = p.getAll("colour").filter(Boolean);
  s.page = Math.max(1, Math.min(1000, parseInt(p.get("page") || "1", 10) || 1));
  s.dpage = Math.max(1, parseInt(p.get("dpage") || "1", 10) || 1);
  s.vocab = p.get("vocab") || "";
  s.per = Math.max(0, Math.min(200, parseInt(p.get("per") || "0", 10) || 0));   // page size (0: the default)
  s.open = p.get("open") || "";
  s.box = parseBox(p.get("box"));
  s.regions = p.get("regions") === "1";
  s.region = s.regions ? Math.max(-1, parseInt(p.get("region") || "-1", 10)) : -1;
  if (!Number.isFinite(s.region)) s.region = -1;
  if (histState && pictures.has(histState.picture) && p.get("upload") === "1") {
    s.upload = pictures.get(histState.picture);
    s.token = typeof histState.token === "string" ? histState.token : "";
    s.usize = Array.isArray(histState.usize) ? histState.usize : null;
  }
  return s;
}

export function toUrl(s) {
  const p = new URLSearchParams();
  if (s.view && s.view !== "search") p.set("view", s.view);
  if (s.q) p.set("q", s.q);
  if (s.id) p.set("id", s.id);
  if (s.upload) p.set("upload", "1");
  if (s.instr) p.set("instr", s.instr);
  if (s.box && (s.upload || s.id)) p.set("box", s.box.join(","));
  if (s.regions && (s.upload || s.id)) p.set("regions", "1");
  if (s.regions && s.region >= 0 && (s.upload || s.id)) p.set("region", String(s.region));
  for (const k of FILTER_KEYS) if (s.filters && s.filters[k]) p.set(k, s.filters[k]);
  for (const c of s.colours || []) p.append("colour", c);
  if (s.page > 1) p.set("page", String(s.page));
  if (s.view === "duplicates" && s.dpage > 1) p.set("dpage", String(s.dpage));
  if (s.vocab) p.set("vocab", s.vocab);
  if (s.per) p.set("per", String(s.per));
  if (s.open) p.set("open", s.open);
  const qs = p.toString();
  return qs ? `/?${qs}` : "/";
}

// write the state: push a new history entry (a new search) or replace the current one (typing, load more)
export function writeUrl(s, { push = false } = {}) {
  const url = toUrl(s);
  const hist = s.upload ? { picture: pictureKey(s.upload), token: s.token || "", usize: s.usize || null } : {};
  if (push && url !== location.pathname + location.search) history.pushState(hist, "", url);
  else history.replaceState(hist, "", url);
}

// a box from the URL: four non-negative integers with x0 < x1 and y0 < y1 (the API checks the rest)
export function parseBox(text) {
  if (!text) return null;
  const v = text.split(",").map((x) => Number(x));
  if (v.length !== 4 || !v.every((x) => Number.isFinite(x) && x >= 0) || v[2] <= v[0] || v[3] <= v[1]) return null;
  return v.map((x) => Math.round(x));
}

// the API filter object of the filter fields and the colour facet
export function apiFilter(s) {
  const f = {};
  const fl = s.filters || {};
  if (fl.caption) f.caption = { contains: fl.caption };
  if (fl.path) f.path = { contains: fl.path };
  if (fl.minw) f.width = { gte: Number(fl.minw) };
  if (fl.minh) f.height = { gte: Number(fl.minh) };
  if (s.colours && s.colours.length) f["colour-names"] = s.colours.length === 1 ? s.colours[0] : [...s.colours];
  return Object.keys(f).length ? f : null;
}

// what the whole page shares: the current state and what the server offers (from /healthz)
export const page = { state: emptyState(), features: [], colourEncoder: null, textEncoder: null, images: null,
                      lastSearch: null };
