// "Why?" overlays: one attribution map per result, several requests in flight at once (not one after
// another), each sending the query's fields built once for the search (an uploaded picture as its upload
// token, not the picture again; a region's results with that region's box);
// and a result's pair view (query and result side by side) in a dialog. A map that is approximate
// says so: the note comes as the X-Attribution-Note header (or a JSON "note" field).
import { $ } from "./util.js";
import { lastQuery, formOf } from "./search.js";

const PARALLEL = 4;   // overlay requests in flight at once (browsers allow ~6 per host)
let overlaySeq = 0, whySeq = 0;

function showLegend(resp) {
  const label = resp.headers.get("X-Attribution-Label") || resp.headers.get("X-Attribution-Method");
  if (label) $("#attr-method").textContent = `method: ${label}`;
  const note = resp.headers.get("X-Attribution-Note");
  $("#attr-note").textContent = note ? `Note: ${note}` : "";
  $("#attr-note").hidden = !note;
}

export function clearOverlays(list) {
  overlaySeq++;
  list.querySelectorAll(".overlay").forEach((o) => { URL.revokeObjectURL(o.src); o.remove(); });
  $("#attr-legend").hidden = true;
}

export async function loadOverlays(list) {
  const query = lastQuery;
  if (!query) return;
  const mine = ++overlaySeq;
  $("#attr-legend").hidden = false;
  const todo = [...list.querySelectorAll(".result")].filter((li) => !li.querySelector(".overlay") && !li.dataset.ov);
  todo.forEach((li) => { li.dataset.ov = "1"; });
  let next = 0;
  async function worker() {
    while (next < todo.length) {
      const li = todo[next++];
      if (mine !== overlaySeq || query !== lastQuery) { delete li.dataset.ov; continue; }
      try {
        const resp = await fetch("/api/attribution", { method: "POST",
                                                       body: formOf(query.fields, { result_id: li.dataset.id }) });
        if (!resp.ok) continue;
        const blob = await resp.blob();
        if (mine !== overlaySeq || query !== lastQuery) continue;
        showLegend(resp);
        const ov = document.createElement("img");
        ov.className = "overlay"; ov.alt = "";
        ov.src = URL.createObjectURL(blob);
        li.querySelector(".thumb").append(ov);
      } catch (_) { /* overlays are best effort */ } finally { delete li.dataset.ov; }
    }
  }
  await Promise.all(Array.from({ length: Math.min(PARALLEL, todo.length) }, worker));
}

export async function openWhy(r) {
  const query = lastQuery;
  if (!query) return;
  const dialog = $("#why"), status = $("#why-status"), note = $("#why-note"), img = $("#why-img");
  const mine = ++whySeq;
  $("#why-title").textContent = `Why did “${r.caption || r.id}” match?`;
  status.textContent = "Computing the attribution maps…";
  note.hidden = true; img.hidden = true;
  if ($("#result").open) $("#result").close();
  if (!dialog.open) dialog.showModal();
  try {
    const resp = await fetch("/api/attribution/pair", { method: "POST", body: formOf(query.fields, { result_id: r.id }) });
    if (mine !== whySeq) return;
    if (!resp.ok) {
      let msg = `HTTP ${resp.status}`;
      try { msg = (await resp.json()).error.message || msg; } catch (_) { /* not JSON */ }
      status.textContent = msg;
      return;
    }
    const blob = await resp.blob();
    if (mine !== whySeq) return;
    const label = resp.headers.get("X-Attribution-Label") || resp.headers.get("X-Attribution-Method") || "";
    const text = resp.headers.get("X-Attribution-Note");
    if (img.dataset.url) URL.revokeObjectURL(img.dataset.url);
    img.dataset.url = URL.createObjectURL(blob);
    img.src = img.dataset.url;
    img.alt = query.image ? `The query (left) and this result (right), each with its attribution map (${label})`
      : `This result with its attribution map (${label})`;
    img.hidden = false;
    status.textContent = query.image
      ? `Left: your query; right: this result; each with its map (${label}). Lines link regions that match locally.`
      : `This result with its map (${label}) for “${query.text}”.`;
    note.textContent = text ? `Note: ${text}` : "";
    note.hidden = !text;
  } catch (err) {
    if (mine === whySeq) status.textContent = err.message;
  }
}

export function initWhy() {
  const dialog = $("#why");
  $("#why-close").addEventListener("click", () => dialog.close());
  dialog.addEventListener("click", (e) => { if (e.target === dialog) dialog.close(); });
}
