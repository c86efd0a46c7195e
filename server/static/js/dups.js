// The duplicates view: the collection's groups of copies as contact sheets, the picture to keep and
// the ones to remove marked, GROUPS_PER_PAGE groups a page. The server computes the groups once per
// index version (in the background: it answers 202 with its progress until they are ready).
import { $, el, fetchJSON, showError, clearError } from "./util.js";
import { page, writeUrl } from "./state.js";
import { openResultById } from "./result-view.js";

export const GROUPS_PER_PAGE = 12;
const list = $("#dups"), status = $("#dups-status"), prev = $("#dups-prev"), next = $("#dups-next");
let seq = 0, timer = null;

function fmtSize(m) {
  const parts = [];
  if (m.width && m.height) parts.push(`${m.width}×${m.height}`);
  if (typeof m.size === "number") parts.push(m.size < 1048576 ? `${(m.size / 1024).toFixed(0)} KB` : `${(m.size / 1048576).toFixed(1)} MB`);
  return parts.join(" · ");
}

function groupView(g, n) {
  const li = el("li", { className: "dup-group", dataset: { keep: g.keep } });
  li.append(el("h2", { className: "dup-title",
                       text: `Group ${n} · ${g.members.length} pictures · keep 1, remove ${g.remove.length}` }));
  const sheet = el("ol", { className: "sheet-grid" });
  for (const m of g.members) {
    const name = m.path ? m.path.split("/").pop() : m.id;
    const fig = el("li", { className: `dup ${m.keep ? "keep" : "remove"}`, dataset: { id: m.id } });
    const btn = el("button", { type: "button", className: "dup-card", title: m.path || m.id });
    btn.setAttribute("aria-label", `${name}: ${m.keep ? "keep" : "remove"}. Open`);
    const thumb = el("div", { className: "thumb" }, el("img", { loading: "lazy", alt: "", src: m.thumbnail_url }));
    btn.append(thumb, el("span", { className: `tag ${m.keep ? "keep" : "remove"}`, text: m.keep ? "keep" : "remove" }),
               el("span", { className: "dup-name", text: name }), el("span", { className: "dup-size", text: fmtSize(m) }));
    btn.addEventListener("click", () => openResultById(m.id));
    fig.append(btn);
    sheet.append(fig);
  }
  li.append(sheet);
  return li;
}

export async function loadDuplicates(pageNo) {
  const mine = ++seq;
  clearTimeout(timer);
  const per = page.state.per || GROUPS_PER_PAGE;
  const offset = (pageNo - 1) * per;
  try {
    const { resp, body } = await fetchJSON(`/api/duplicates/groups?offset=${offset}&limit=${per}`);
    if (mine !== seq) return;
    clearError();
    if (resp.status === 202) {
      status.textContent = `Looking for copies… ${Math.min(body.done, body.total)} of ${body.total} pictures compared`;
      timer = setTimeout(() => loadDuplicates(pageNo), 800);
      return;
    }
    const pages = Math.max(1, Math.ceil(body.total / per));
    status.textContent = body.total
      ? `${body.total} group${body.total === 1 ? "" : "s"} of copies covering ${body.images_in_groups} of ` +
        `${body.images} pictures (${body.encoder}, ${body.seconds} s)`
      : `No copies among ${body.images} pictures.`;
    list.replaceChildren(...body.groups.map((g, i) => groupView(g, offset + i + 1)));
    $("#dups-page").textContent = body.total ? `page ${pageNo} of ${pages}` : "";
    prev.hidden = pageNo <= 1;
    next.hidden = pageNo >= pages;
  } catch (err) {
    if (mine === seq) { status.textContent = ""; showError(err.message); }
  }
}

function go(delta) {
  page.state.dpage = Math.max(1, page.state.dpage + delta);
  writeUrl(page.state, { push: true });
  window.scrollTo({ top: 0 });
  loadDuplicates(page.state.dpage);
}

export function initDuplicates() {
  prev.addEventListener("click", () => go(-1));
  next.addEventListener("click", () => go(1));
}
