// The page's state in the URL: a shared link reproduces the view and its result set; Back / Forward
// restore it. An uploaded image cannot travel in a link; it rides in history.state (structured clone
// keeps Blobs) so Back / Forward still restore it within the tab.
export const VIEWS = ["search", "duplicates", "copy", "name"];
export const FILTER_KEYS = ["caption", "path", "minw", "minh"];

export function emptyState() {
  return { view: "search", q: "", id: "", instr: "", filters: {}, colours: [], page: 1, dpage: 1, vocab: "",
           open: "", upload: null, per: 0 };
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
  if (histState && histState.upload instanceof Blob && p.get("upload") === "1") s.upload = histState.upload;
  return s;
}

export function toUrl(s) {
  const p = new URLSearchParams();
  if (s.view && s.view !== "search") p.set("view", s.view);
  if (s.q) p.set("q", s.q);
  if (s.id) p.set("id", s.id);
  if (s.upload) p.set("upload", "1");
  if (s.instr) p.set("instr", s.instr);
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
  const hist = s.upload ? { upload: s.upload } : {};
  if (push && url !== location.pathname + location.search) history.pushState(hist, "", url);
  else history.replaceState(hist, "", url);
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
