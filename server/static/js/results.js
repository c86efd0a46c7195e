// Result cards: thumbnail, caption, score. A cosine score gets a bar (0..1); another kind of score
// ("fused", ranks pooled from two lists) is shown as a number with its kind, never as a cosine bar.
// A hit found through a region of its picture (the region index) shows that region on its thumbnail.
import { el, thumbUrl } from "./util.js";
import { hitBox } from "./regions.js";

export function scoreKind(r) { return r.score_kind || "cosine"; }

export function scoreView(r) {
  const kind = scoreKind(r);
  const score = el("div", { className: "score" });
  const num = el("span", { className: "num", text: Number(r.score).toFixed(3) });
  if (kind === "cosine") {
    const bar = el("span", { className: "scorebar" });
    const fill = el("span");
    fill.style.width = `${Math.max(0, Math.min(1, r.score)) * 100}%`;
    bar.append(fill);
    score.append(num, bar);
  } else {
    score.classList.add("score-other");
    score.title = `${kind} score: not a cosine similarity; it orders these results only`;
    score.append(el("span", { className: "kind", text: kind }), num);
  }
  return score;
}

export function resultCard(r, i, { onOpen, onWhy }) {
  const li = el("li", { className: "result", dataset: { id: r.id } });
  const label = r.caption || (r.path ? r.path.split("/").pop() : r.id);
  const card = el("button", { type: "button", className: "card", title: `Open: ${label}` });
  card.setAttribute("aria-label", `Result ${i + 1}: ${label}, score ${Number(r.score).toFixed(3)}. Open`);
  const thumb = el("div", { className: "thumb" });
  const img = el("img", { loading: "lazy", decoding: "async", alt: r.caption || "" });
  img.src = r.thumbnail_url || thumbUrl(r.id);
  thumb.append(img);
  const where = hitBox(r);
  if (where) thumb.append(where);
  const meta = el("div", { className: "meta" }, el("div", { className: "caption", text: label }), scoreView(r));
  card.append(thumb, meta);
  card.addEventListener("click", () => onOpen(r));
  li.append(card);
  if (onWhy) {   // outside the card: a button cannot hold a button
    const why = el("button", { type: "button", className: "why-btn", text: "Why?",
                               title: "Why did this match? The query and this result side by side, with their maps" });
    why.setAttribute("aria-label", `Why did result ${i + 1} match?`);
    why.addEventListener("click", () => onWhy(r));
    li.append(why);
  }
  return li;
}
