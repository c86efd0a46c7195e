// The two one-image tools: "Is this a copy?" (POST /api/duplicates: matches with calibrated scores and
// the region of the query that matched) and "Name this" (POST /api/classify: names and colours).
// Each takes an upload (drop / paste / pick) or an indexed image (?id=, from a result's view).
import { $, el, fetchJSON, showError, clearError, thumbUrl, isImage, imagePicker, drawBoxes } from "./util.js";
import { page, writeUrl } from "./state.js";
import { openResultById } from "./result-view.js";
import { COLOURS } from "./search.js";

function preview(box, img, s) {
  if (img.dataset.url) { URL.revokeObjectURL(img.dataset.url); delete img.dataset.url; }
  if (s.upload) { img.dataset.url = URL.createObjectURL(s.upload); img.src = img.dataset.url; }
  else img.src = `/api/images/${encodeURIComponent(s.id)}`;
  box.hidden = false;
}

function imageForm(s) {
  const fd = new FormData();
  if (s.upload) fd.append("image", s.upload, s.upload.name || "image.png");
  else fd.append("image_id", s.id);
  return fd;
}

function takeImage(view, run) {
  return (blob) => {
    if (!isImage(blob)) { showError("That is not an image file."); return; }
    Object.assign(page.state, { view, upload: blob, id: "", open: "" });
    writeUrl(page.state, { push: true });
    run(page.state);
  };
}

// -- is this a copy? --------------------------------------------------------------------------------
let copySeq = 0;
export async function checkCopy(s) {
  const status = $("#copy-status"), list = $("#copy-matches"), img = $("#copy-img"), svg = $("#copy-boxes");
  list.replaceChildren(); svg.replaceChildren();
  if (!s.upload && !s.id) { $("#copy-query").hidden = true; status.textContent = ""; return; }
  preview($("#copy-query"), img, s);
  const mine = ++copySeq;
  status.textContent = "Comparing with the collection…";
  try {
    const { body } = await fetchJSON("/api/duplicates", { method: "POST", body: imageForm(s) });
    if (mine !== copySeq) return;
    clearError();
    const matches = body.matches || [];
    status.textContent = matches.length
      ? `${matches.length} cop${matches.length === 1 ? "y" : "ies"} found (${body.encoder}): a calibrated score ≥ ` +
        `${Number(body.threshold).toFixed(2)} is a copy, and so is a pair confirmed from the pixels`
      : "No copy of this picture in the collection.";
    const metas = await Promise.all(matches.map((m) =>
      fetchJSON(`/api/images/${encodeURIComponent(m.id)}/meta`).then((r) => r.body).catch(() => ({}))));
    if (mine !== copySeq) return;
    const draw = (boxes) => (img.complete ? drawBoxes(svg, img, boxes) : img.addEventListener("load", () => drawBoxes(svg, img, boxes), { once: true }));
    draw(matches.filter((m) => m.region).map((m) => m.region));
    matches.forEach((m, i) => {
      const meta = metas[i] || {};
      const name = meta.caption || (meta.path ? meta.path.split("/").pop() : m.id);
      const li = el("li", { className: "match", dataset: { id: m.id } });
      const btn = el("button", { type: "button", className: "match-card" });
      btn.setAttribute("aria-label", `${name}, copy score ${m.score.toFixed(3)}. Open`);
      const facts = [`similarity ${m.similarity.toFixed(3)}`];
      if (m.check) facts.push(`confirmed from the pixels (${m.check})`);
      if (m.region) facts.push(`matched region ${m.region.join(", ")}`);
      if (m.id === s.id) facts.push("this picture itself");
      btn.append(el("img", { src: thumbUrl(m.id, 128), alt: "", loading: "lazy" }),
                 el("span", { className: "match-text" }, el("strong", { text: name }),
                    el("span", { className: "match-score", text: `copy score ${m.score.toFixed(3)}` }),
                    el("span", { className: "muted", text: facts.join(" · ") })));
      btn.addEventListener("click", () => openResultById(m.id));
      btn.addEventListener("mouseenter", () => draw(m.region ? [m.region] : []));
      btn.addEventListener("focus", () => draw(m.region ? [m.region] : []));
      li.append(btn);
      list.append(li);
    });
  } catch (err) {
    if (mine === copySeq) { status.textContent = ""; showError(err.message); }
  }
}

// -- name this ------------------------------------------------------------------------------------
let nameSeq = 0;
export async function nameImage(s, attempt = 0) {
  const status = $("#name-status"), labels = $("#name-labels"), colours = $("#name-colours");
  $("#name-vocab").value = s.vocab || "";
  if (!attempt) { labels.replaceChildren(); colours.replaceChildren(); }
  if (!s.upload && !s.id) { $("#name-query").hidden = true; status.textContent = ""; return; }
  if (!attempt) preview($("#name-query"), $("#name-img"), s);
  const mine = attempt ? nameSeq : ++nameSeq;
  status.textContent = "Naming…";
  const fd = imageForm(s);
  fd.append("k", "5");
  if (s.vocab) fd.append("vocabulary", s.vocab);
  try {
    const { body } = await fetchJSON("/api/classify", { method: "POST", body: fd });
    if (mine !== nameSeq) return;
    clearError();
    status.textContent = `Names from ${body.vocabulary === "captions" ? "this collection's captions" : "ImageNet-21k"} ` +
      `(${body.encoder})`;
    const top = Math.max(...body.labels.map((l) => l.score), 1e-9);
    labels.replaceChildren(...body.labels.map((l) => {
      const fill = el("span");
      fill.style.width = `${Math.max(2, (l.score / top) * 100)}%`;
      return el("li", { className: "label" }, el("span", { className: "label-name", text: l.label }),
                el("span", { className: "scorebar" }, fill), el("span", { className: "num", text: l.score.toFixed(3) }));
    }));
    colours.replaceChildren(...(body.colours || []).map((c) => {
      const sw = el("span", { className: "chip-sw" });
      sw.style.background = COLOURS[c.colour] || "transparent";
      return el("li", { className: "chip" }, sw, el("span", { text: `${c.colour} ${Math.round(c.score * 100)} %` }));
    }));
  } catch (err) {
    if (mine !== nameSeq) return;
    if (err.code === "warming_up" && attempt < 60) {
      status.textContent = "The names are still being prepared (the first time takes a while)…";
      setTimeout(() => { if (mine === nameSeq) nameImage(s, attempt + 1); }, 2000);
      return;
    }
    status.textContent = ""; showError(err.message);
  }
}

export function initTools() {
  const active = (view) => () => page.state.view === view;
  imagePicker($("#copy-pick"), $("#copy-file"), takeImage("copy", checkCopy), active("copy"));
  imagePicker($("#name-pick"), $("#name-file"), takeImage("name", nameImage), active("name"));
  $("#name-vocab").addEventListener("change", () => {
    page.state.vocab = $("#name-vocab").value;
    writeUrl(page.state);
    nameImage(page.state);
  });
}
