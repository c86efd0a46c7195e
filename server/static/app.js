// Loupe web page: instant text search, image search (pick / drop / paste), "more like this",
// instruction field, optional attribution overlays. No build step, no dependencies.
(() => {
  "use strict";
  const $ = (sel) => document.querySelector(sel);
  const q = $("#q"), file = $("#file"), results = $("#results"), status = $("#status"), errorBox = $("#error");
  const iq = $("#image-query"), iqThumb = $("#query-thumb"), iqLabel = $("#iq-label"), instruction = $("#instruction");
  const attrToggle = $("#attr-toggle"), attr = $("#attr"), drop = $("#drop");
  const attrLegend = $("#attr-legend"), attrMethod = $("#attr-method"), attrNote = $("#attr-note");
  const whyDialog = $("#why"), whyTitle = $("#why-title"), whyStatus = $("#why-status"), whyNote = $("#why-note");
  const whyImg = $("#why-img");
  const K = 40;
  const OVERLAY_PARALLEL = 4;  // overlay requests in flight at once (browsers allow ~6 per host)
  let whySeq = 0;
  let imageFile = null;      // uploaded / pasted / dropped image (File or Blob)
  let imageId = null;        // "more like this" id
  let controller = null;     // aborts stale requests
  let debounce = null;
  let features = [];
  let lastQuery = null;
  let seq = 0;

  // the eleven basic colour terms (retrieval/colour.py), drawn in their XKCD-survey colours
  const SWATCHES = { black: "#000000", grey: "#929591", white: "#ffffff", red: "#e50000", orange: "#f97306",
    yellow: "#ffff14", green: "#15b01a", blue: "#0343df", purple: "#7e1e9c", pink: "#ff81c0", brown: "#653700" };
  const swatches = $("#swatches");
  function showSwatches() {
    for (const [name, hex] of Object.entries(SWATCHES)) {
      const b = document.createElement("button");
      b.type = "button"; b.className = "swatch"; b.style.background = hex; b.dataset.colour = name;
      b.title = `the same, in ${name}`; b.setAttribute("aria-label", `the same, in ${name}`);
      b.addEventListener("click", () => { instruction.value = `in ${name}`; clearTimeout(debounce); search(); });
      swatches.append(b);
    }
    swatches.hidden = false;
  }

  fetch("/healthz").then((r) => r.json()).then((h) => {
    features = h.features || [];
    if (features.includes("attribution")) attrToggle.hidden = false;
    if (h.colour_encoder) showSwatches();   // the index names colours: one-click "the same, but red"
    if (typeof h.images === "number") $("#hint").textContent =
      `${h.images.toLocaleString()} images · type to search · drop, paste or pick an image · click a result for more like it`;
  }).catch(() => {});

  function queryForm(extra) {
    const fd = new FormData();
    const text = q.value.trim();
    if (imageFile) fd.append("image", imageFile, imageFile.name || "query.png");
    else if (imageId) fd.append("image_id", imageId);
    if (imageFile || imageId) {
      const instr = instruction.value.trim();
      if (instr) fd.append("instruction", instr);
    } else if (text) fd.append("text", text);
    fd.append("k", String(K));
    for (const [key, v] of Object.entries(extra || {})) fd.append(key, v);
    return fd;
  }

  function hasQuery() { return !!(imageFile || imageId || q.value.trim()); }

  async function search() {
    if (!hasQuery()) { results.replaceChildren(); status.textContent = ""; errorBox.hidden = true; return; }
    if (controller) controller.abort();
    controller = new AbortController();
    const mine = ++seq;
    document.body.classList.add("loading");
    try {
      const resp = await fetch("/api/search", { method: "POST", body: queryForm(), signal: controller.signal });
      const body = await resp.json();
      if (mine !== seq) return;
      if (!resp.ok) throw new Error((body.error && body.error.message) || `HTTP ${resp.status}`);
      errorBox.hidden = true;
      lastQuery = { imageFile, imageId, text: q.value.trim(), instruction: instruction.value.trim() };
      render(body);
    } catch (err) {
      if (err.name === "AbortError") return;
      errorBox.textContent = err.message;
      errorBox.hidden = false;
    } finally {
      if (mine === seq) document.body.classList.remove("loading");
    }
  }

  function render(body) {
    const items = body.results || [];
    status.textContent = `${items.length} result${items.length === 1 ? "" : "s"} · ${body.took_ms} ms · ${body.encoder}` +
      (body.notes && body.notes.length ? ` · note: ${body.notes.join(" · ")}` : "");
    const frag = document.createDocumentFragment();
    items.forEach((r, i) => {
      const li = document.createElement("li");
      li.className = "result";
      li.dataset.id = r.id;
      const card = document.createElement("button");
      card.type = "button";
      card.className = "card";
      card.title = `More like this${r.caption ? ": " + r.caption : ""}`;
      card.setAttribute("aria-label", `Result ${i + 1}: ${r.caption || r.id}, score ${r.score.toFixed(3)}. More like this`);
      const thumb = document.createElement("div");
      thumb.className = "thumb";
      const img = document.createElement("img");
      img.loading = "lazy";
      img.decoding = "async";
      img.alt = r.caption || "";
      img.src = r.thumbnail_url || `/api/images/${r.id}?size=256`;
      thumb.append(img);
      const meta = document.createElement("div");
      meta.className = "meta";
      const cap = document.createElement("div");
      cap.className = "caption";
      cap.textContent = r.caption || (r.path ? r.path.split("/").pop() : r.id);
      const score = document.createElement("div");
      score.className = "score";
      const bar = document.createElement("span");
      bar.className = "scorebar";
      const fill = document.createElement("span");
      fill.style.width = `${Math.max(0, Math.min(1, r.score)) * 100}%`;
      bar.append(fill);
      const num = document.createElement("span");
      num.textContent = r.score.toFixed(3);
      score.append(num, bar);
      meta.append(cap, score);
      card.append(thumb, meta);
      card.addEventListener("click", () => moreLikeThis(r));
      li.append(card);
      if (features.includes("attribution")) {   // outside the card: a button cannot hold a button
        const why = document.createElement("button");
        why.type = "button";
        why.className = "why-btn";
        why.textContent = "Why?";
        why.title = "Why did this match? The query and this result side by side, with their attribution maps";
        why.setAttribute("aria-label", `Why did result ${i + 1} match?`);
        why.addEventListener("click", () => openWhy(r));
        li.append(why);
      }
      frag.append(li);
    });
    results.replaceChildren(frag);
    if (attr.checked) loadOverlays();
  }

  function moreLikeThis(r) {
    imageFile = null;
    imageId = r.id;
    iqThumb.src = r.thumbnail_url || `/api/images/${r.id}?size=256`;
    iqLabel.textContent = "More like this";
    iq.hidden = false;
    q.value = "";
    window.scrollTo({ top: 0, behavior: "smooth" });
    search();
  }

  function setImage(blob) {
    if (!blob || !(blob.type || "").startsWith("image/")) {
      errorBox.textContent = "That is not an image file.";
      errorBox.hidden = false;
      return;
    }
    imageFile = blob;
    imageId = null;
    if (iqThumb.dataset.url) URL.revokeObjectURL(iqThumb.dataset.url);
    iqThumb.dataset.url = URL.createObjectURL(blob);
    iqThumb.src = iqThumb.dataset.url;
    iqLabel.textContent = "Searching with this image";
    iq.hidden = false;
    q.value = "";
    search();
  }

  function clearImage() {
    imageFile = null;
    imageId = null;
    iq.hidden = true;
    instruction.value = "";
    file.value = "";
    q.focus();
    search();
  }

  function showLegend(resp) {   // the legend's words come with each overlay (method, and a caveat if any)
    const label = resp.headers.get("X-Attribution-Label") || resp.headers.get("X-Attribution-Method");
    if (label) attrMethod.textContent = `method: ${label}`;
    const note = resp.headers.get("X-Attribution-Note");
    attrNote.textContent = note ? `Note: ${note}` : "";
    attrNote.hidden = !note;
  }

  async function loadOverlays() {   // OVERLAY_PARALLEL requests at a time, not one after another
    if (!lastQuery) return;
    const mine = seq;
    attrLegend.hidden = false;
    const todo = [...results.querySelectorAll(".result")].filter((li) => !li.querySelector(".overlay"));
    let next = 0;
    async function worker() {
      while (next < todo.length) {
        const li = todo[next++];
        if (mine !== seq || !attr.checked) return;
        try {
          const resp = await fetch("/api/attribution", { method: "POST", body: queryForm({ result_id: li.dataset.id }) });
          if (!resp.ok) continue;
          const blob = await resp.blob();
          if (mine !== seq || !attr.checked) return;
          showLegend(resp);
          const ov = document.createElement("img");
          ov.className = "overlay";
          ov.alt = "";
          ov.src = URL.createObjectURL(blob);
          li.querySelector(".thumb").append(ov);
        } catch (_) { /* overlays are best effort */ }
      }
    }
    await Promise.all(Array.from({ length: Math.min(OVERLAY_PARALLEL, todo.length) }, worker));
  }

  async function openWhy(r) {   // the pair view: query and result with their maps, matched regions linked
    if (!lastQuery) return;
    const mine = ++whySeq;
    whyTitle.textContent = `Why did “${r.caption || r.id}” match?`;
    whyStatus.textContent = "Computing the attribution maps…";
    whyNote.hidden = true;
    whyImg.hidden = true;
    if (!whyDialog.open) whyDialog.showModal();
    try {
      const resp = await fetch("/api/attribution/pair", { method: "POST", body: queryForm({ result_id: r.id }) });
      if (mine !== whySeq) return;
      if (!resp.ok) {
        let msg = `HTTP ${resp.status}`;
        try { msg = (await resp.json()).error.message || msg; } catch (_) { /* not JSON */ }
        whyStatus.textContent = msg;
        return;
      }
      const blob = await resp.blob();
      if (mine !== whySeq) return;
      const label = resp.headers.get("X-Attribution-Label") || resp.headers.get("X-Attribution-Method") || "";
      const note = resp.headers.get("X-Attribution-Note");
      const image = !!(lastQuery.imageFile || lastQuery.imageId);
      if (whyImg.dataset.url) URL.revokeObjectURL(whyImg.dataset.url);
      whyImg.dataset.url = URL.createObjectURL(blob);
      whyImg.src = whyImg.dataset.url;
      whyImg.alt = image ? `The query (left) and this result (right), each with its attribution map (${label})`
        : `This result with its attribution map (${label})`;
      whyImg.hidden = false;
      whyStatus.textContent = image
        ? `Left: your query; right: this result; each with its map (${label}). Lines link regions that match locally.`
        : `This result with its map (${label}) for “${lastQuery.text}”.`;
      whyNote.textContent = note ? `Note: ${note}` : "";
      whyNote.hidden = !note;
    } catch (err) {
      if (mine === whySeq) whyStatus.textContent = err.message;
    }
  }
  $("#why-close").addEventListener("click", () => whyDialog.close());
  whyDialog.addEventListener("click", (e) => { if (e.target === whyDialog) whyDialog.close(); });

  attr.addEventListener("change", () => {
    if (attr.checked) loadOverlays();
    else {
      results.querySelectorAll(".overlay").forEach((o) => { URL.revokeObjectURL(o.src); o.remove(); });
      attrLegend.hidden = true;
    }
  });

  q.addEventListener("input", () => {
    if ((imageFile || imageId) && q.value.trim()) {   // typing starts a new text search
      imageFile = null; imageId = null; iq.hidden = true; instruction.value = ""; file.value = "";
    }
    clearTimeout(debounce);
    debounce = setTimeout(search, 220);
  });
  $("#search-form").addEventListener("submit", (e) => { e.preventDefault(); clearTimeout(debounce); search(); });
  instruction.addEventListener("input", () => { clearTimeout(debounce); debounce = setTimeout(search, 350); });
  instruction.addEventListener("keydown", (e) => { if (e.key === "Enter") { clearTimeout(debounce); search(); } });
  $("#pick").addEventListener("click", () => file.click());
  file.addEventListener("change", () => { if (file.files && file.files[0]) setImage(file.files[0]); });
  $("#clear-image").addEventListener("click", clearImage);

  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((it) => it.type.startsWith("image/"));
    if (item) { e.preventDefault(); setImage(item.getAsFile()); }
  });
  let dragDepth = 0;
  window.addEventListener("dragenter", (e) => { e.preventDefault(); dragDepth++; drop.hidden = false; });
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("dragleave", () => { if (--dragDepth <= 0) { dragDepth = 0; drop.hidden = true; } });
  window.addEventListener("drop", (e) => {
    e.preventDefault();
    dragDepth = 0;
    drop.hidden = true;
    const f = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
    if (f) setImage(f);
  });

  document.addEventListener("keydown", (e) => {
    if (whyDialog.open) return;   // the dialog handles its own keys (Escape closes it)
    const typing = ["INPUT", "TEXTAREA"].includes(document.activeElement.tagName);
    if (e.key === "/" && !typing) { e.preventDefault(); q.focus(); q.select(); }
    else if (e.key === "Escape") {
      if (imageFile || imageId) clearImage();
      else if (document.activeElement === q) { q.value = ""; search(); }
    } else if (!typing && ["ArrowRight", "ArrowLeft", "ArrowDown", "ArrowUp"].includes(e.key)) {
      const cards = [...results.querySelectorAll(".card")];
      const i = cards.indexOf(document.activeElement);
      if (!cards.length) return;
      const cols = Math.max(1, Math.round(results.clientWidth / (cards[0].offsetWidth + 14)));
      const step = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: cols, ArrowUp: -cols }[e.key];
      const next = cards[Math.max(0, Math.min(cards.length - 1, i < 0 ? 0 : i + step))];
      if (next) { e.preventDefault(); next.focus(); }
    }
  });
})();
