"""Colour names: what colour an image is, in the words people use, and what colour a phrase asks for.

Why this exists: "the same, but red" needs a model that sees colour. CLIP does; the offline
``conse-effnet-lite0`` encoder does not (its image vectors are mixtures of ImageNet class names, so a
red and a blue sandal get the same vector), and no image-only encoder can read the word "red". Colour
is also the attribute users change most in composed queries. So Loupe names colours explicitly, the
way colour-naming work in vision does it (Berlin & Kay's eleven basic colour terms; van de Weijer et
al., "Learning Color Names for Real-World Applications", 2009, whose 32×32×32 RGB → P(term) lookup
table this mirrors), with the term memberships learned from people's own naming: the XKCD colour
survey (``data/xkcd_colours.tsv``, CC0; 949 names with the sRGB value most people gave them).

* **Naming a colour** (:func:`lookup_table`): every XKCD name whose head word is a basic term
  ("dark olive green" → green, "bluegrey" → grey; a few unambiguous others: navy → blue, lilac →
  purple, ...) is a prototype of that term in CIELAB. ``P(term | colour)`` is a Gaussian-kernel vote
  of the prototypes (bandwidth :data:`KERNEL_DELTA_E` ΔE units), tabulated once for the 32³ RGB cells.
* **Naming an image** (:func:`colour_names`): the pixels of a 64×64 thumbnail, weighted towards the
  object (colour contrast with the image's border — the background of product shots and cut-outs —
  times a mild centre prior), each named through the table; the weighted mean is the image's colour
  distribution ``p`` over the eleven terms. The vector stored in the index is ``sqrt(p)`` (unit
  length), so the inner product of two images is the Bhattacharyya coefficient of their colour
  distributions, and with a phrase's vector ``sqrt(q)`` it is the same coefficient (for a single term,
  ``sqrt(p[term])``).
* **Naming a phrase** (:func:`phrase_distribution`): basic terms are one-hot ("red"); any other XKCD
  name ("navy blue", "teal", "mustard") is the term distribution of its surveyed colour; several
  colour words are averaged; phrases with no colour word raise :class:`InvalidQueryError`.

The ``colour-names`` encoder (``retrieval/encoders/colour.py``) wraps this for the indexer and the
engine; instruction queries use it to score "in red" (``retrieval.compose``).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import torch

from retrieval.errors import InvalidQueryError

#: Berlin & Kay's eleven basic colour terms (the dimensions of a colour-names vector, in this order)
BASIC_TERMS = ("black", "blue", "brown", "grey", "green", "orange", "pink", "purple", "red", "white", "yellow")
#: colour words that are not basic terms but name one unambiguously (used for prototypes and phrases)
TERM_SYNONYMS = {"gray": "grey", "navy": "blue", "azure": "blue", "cobalt": "blue", "violet": "purple",
                 "lilac": "purple", "lavender": "purple", "lavendar": "purple", "mauve": "purple",
                 "indigo": "purple", "crimson": "red", "scarlet": "red", "maroon": "red", "burgundy": "red",
                 "olive": "green", "lime": "green", "emerald": "green", "tan": "brown", "chocolate": "brown",
                 "coffee": "brown", "golden": "yellow", "lemon": "yellow", "magenta": "pink", "fuchsia": "pink",
                 "rose": "pink", "salmon": "pink", "ivory": "white", "snow": "white", "charcoal": "grey",
                 "silver": "grey", "ebony": "black", "jet": "black"}
KERNEL_DELTA_E = 8.0       # bandwidth of the prototype vote, in CIELAB ΔE (1 ≈ a just-noticeable difference)
BINS = 32                  # lookup-table cells per RGB channel (8 levels each), as van de Weijer et al.
THUMB = 64                 # images are named from a THUMB×THUMB thumbnail
BACKGROUND_DELTA_E = 12.0  # contrast with the border colour at which a pixel counts ~40 % as "object"
CENTRE_SIGMA = 0.6         # the centre prior's width, in half-image units
_DATA = Path(__file__).with_name("data") / "xkcd_colours.tsv"
_WORD = re.compile(r"[a-z]+")


# -- colour science --------------------------------------------------------------------------------
def srgb_to_lab(rgb) -> np.ndarray:
    """sRGB in [0, 1] (``[..., 3]``) → CIELAB (D65 white), the standard formulas."""
    rgb = np.asarray(rgb, dtype=np.float64)
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def _hex_rgb(text: str) -> np.ndarray:
    text = text.strip().lstrip("#")
    return np.array([int(text[i:i + 2], 16) for i in (0, 2, 4)], dtype=np.float64) / 255.0


@functools.lru_cache(maxsize=1)
def survey() -> dict[str, np.ndarray]:
    """The XKCD colour survey: name → sRGB in [0, 1]."""
    out: dict[str, np.ndarray] = {}
    for line in _DATA.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            name, value = line.split("\t")
            out[name.strip().lower()] = _hex_rgb(value)
    return out


def head_term(name: str) -> str | None:
    """The basic term a colour name belongs to: its last word ("dark olive green" → green), a compound's
    ending ("bluegrey" → grey) or a synonym ("navy" → blue); None if it names no basic colour."""
    words = _WORD.findall(name.lower())
    if not words:
        return None
    last = words[-1]
    if last in BASIC_TERMS:
        return last
    if last in TERM_SYNONYMS:
        return TERM_SYNONYMS[last]
    for term in sorted(BASIC_TERMS + ("gray",), key=len, reverse=True):
        if last.endswith(term) and len(last) > len(term):
            return TERM_SYNONYMS.get(term, term)
    return None


@functools.lru_cache(maxsize=1)
def prototypes() -> tuple[np.ndarray, np.ndarray]:
    """``(lab [n, 3], term index [n])``: the survey's colours that name a basic term, plus the ends of
    the grey axis (pure black and white, which the survey barely names)."""
    labs, terms = [], []
    for name, rgb in survey().items():
        term = head_term(name)
        if term is not None:
            labs.append(srgb_to_lab(rgb))
            terms.append(BASIC_TERMS.index(term))
    for rgb, term in (((0, 0, 0), "black"), ((1, 1, 1), "white"), ((0.97, 0.97, 0.97), "white")):
        labs.append(srgb_to_lab(np.array(rgb, np.float64)))
        terms.append(BASIC_TERMS.index(term))
    return np.stack(labs), np.array(terms)


def name_colours(lab: np.ndarray, bandwidth: float = KERNEL_DELTA_E) -> np.ndarray:
    """``P(term | colour)`` for CIELAB colours ``[n, 3]`` → ``[n, 11]``: a Gaussian-kernel vote of the
    survey prototypes, each for its own term."""
    protos, terms = prototypes()
    lab = np.asarray(lab, np.float64).reshape(-1, 3)
    out = np.empty((len(lab), len(BASIC_TERMS)), np.float64)
    onehot = np.eye(len(BASIC_TERMS))[terms]
    for s in range(0, len(lab), 4096):
        part = lab[s:s + 4096]   # squared distances through one matrix product (BLAS), not a [n, p, 3] array
        d2 = np.maximum((part ** 2).sum(1)[:, None] + (protos ** 2).sum(1)[None] - 2 * part @ protos.T, 0.0)
        logits = -(d2 - d2.min(axis=1, keepdims=True)) / (2 * bandwidth ** 2)
        w = np.exp(logits)
        out[s:s + 4096] = (w @ onehot) / w.sum(axis=1, keepdims=True)
    return out


@functools.lru_cache(maxsize=1)
def lookup_table() -> np.ndarray:
    """``[32**3, 11]`` float32: ``P(term | RGB cell)`` for cell ``(r // 8) * 1024 + (g // 8) * 32 + b // 8``
    (8-bit channels), named at each cell's centre."""
    centres = (np.arange(BINS) * (256 // BINS) + (256 // BINS) / 2 - 0.5) / 255.0
    r, g, b = np.meshgrid(centres, centres, centres, indexing="ij")
    rgb = np.stack([r, g, b], axis=-1).reshape(-1, 3)
    return name_colours(srgb_to_lab(rgb)).astype(np.float32)


# -- images ----------------------------------------------------------------------------------------
def _lab_torch(rgb: torch.Tensor) -> torch.Tensor:
    """``[..., 3]`` sRGB in [0, 1] → CIELAB, in torch (batched on the encoder's device)."""
    lin = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = torch.tensor([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                      [0.0193339, 0.1191920, 0.9503041]], dtype=rgb.dtype, device=rgb.device)
    xyz = lin @ m.T / torch.tensor([0.95047, 1.0, 1.08883], dtype=rgb.dtype, device=rgb.device)
    eps, kappa = 216 / 24389, 24389 / 27
    f = torch.where(xyz > eps, xyz.clamp_min(1e-12) ** (1 / 3), (kappa * xyz + 16) / 116)
    return torch.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def object_weights(lab: torch.Tensor) -> torch.Tensor:
    """``[n, h, w]`` weights of each pixel being the object rather than the background: colour contrast
    with the median colour of the border pixels (ΔE; saturates at a few times
    :data:`BACKGROUND_DELTA_E`), times a centre prior, plus a small floor so a borderless photo still
    counts everywhere."""
    n, h, w, _ = lab.shape
    border = torch.cat([lab[:, 0], lab[:, -1], lab[:, 1:-1, 0], lab[:, 1:-1, -1]], dim=1)   # [n, p, 3]
    bg = border.median(dim=1).values                                                        # [n, 3]
    d2 = ((lab - bg[:, None, None, :]) ** 2).sum(-1)
    contrast = 1.0 - torch.exp(-d2 / (2 * BACKGROUND_DELTA_E ** 2))
    ys = torch.linspace(-1, 1, h, device=lab.device, dtype=lab.dtype)
    xs = torch.linspace(-1, 1, w, device=lab.device, dtype=lab.dtype)
    centre = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * CENTRE_SIGMA ** 2))
    return (contrast + 0.02) * centre


_TABLES: dict[str, torch.Tensor] = {}


def _device_table(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _TABLES:
        _TABLES[key] = torch.from_numpy(lookup_table()).to(device)
    return _TABLES[key]


def _named_pixels(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P(term | pixel) [n, h, w, 11], object weights [n, h, w])`` of a THUMB×THUMB view of the batch."""
    x = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float().clamp(0, 1)
    if x.shape[-2:] != (THUMB, THUMB):
        x = torch.nn.functional.interpolate(x, size=(THUMB, THUMB), mode="area")
    q = (x * 255.0).round().clamp(0, 255).long() // (256 // BINS)                 # [n, 3, h, w]
    cells = (q[:, 0] * BINS + q[:, 1]) * BINS + q[:, 2]                           # [n, h, w]
    return _device_table(x.device)[cells], object_weights(_lab_torch(x.permute(0, 2, 3, 1)))


def colour_names(batch: torch.Tensor) -> np.ndarray:
    """Colour distributions of images: ``batch`` ``[n, 3, H, W]`` uint8 (or float in [0, 1]) →
    ``[n, 11]`` float32 rows summing to 1 over :data:`BASIC_TERMS`, object pixels weighted up."""
    names, weights = _named_pixels(batch)
    p = (names * weights[..., None]).sum(dim=(1, 2)) / weights.sum(dim=(1, 2))[:, None].clamp_min(1e-12)
    return p.cpu().numpy().astype(np.float32)


def pixel_contributions(batch: torch.Tensor, query: np.ndarray) -> np.ndarray:
    """Which pixels make an image match a colour query: ``[h, w]`` (the THUMB grid over the whole image).

    The score is the Bhattacharyya coefficient ``BC = Σ_t sqrt(p_t q_t)`` of the image's distribution
    ``p`` (a weighted mean over pixels) and the query's ``q`` (``query`` is a colour-names vector,
    ``sqrt(q)``). Each pixel's share is its weight times its term memberships, each term valued at
    ``∂BC/∂p_t = ½ sqrt(q_t / p_t)``: an exact first-order split, the shares sum to ``BC / 2``. A red
    query lights up the red pixels, more so the more object-like they are."""
    names, weights = _named_pixels(batch[:1])
    names, weights = names[0].double(), weights[0].double()
    w = weights / weights.sum().clamp_min(1e-12)
    p = (names * w[..., None]).sum(dim=(0, 1))
    q = torch.as_tensor(np.clip(np.asarray(query, np.float64).reshape(-1), 0, None) ** 2, device=p.device)
    q = q / q.sum().clamp_min(1e-12)
    grad = 0.5 * torch.sqrt(q / p.clamp_min(1e-12))
    return (w * (names @ grad)).cpu().numpy().astype(np.float32)


def colour_vectors(dist: np.ndarray) -> np.ndarray:
    """Distributions ``[n, 11]`` → unit vectors ``sqrt(p)``: inner products are Bhattacharyya
    coefficients."""
    p = np.clip(np.asarray(dist, np.float64), 0, None)
    p = p / np.maximum(p.sum(axis=-1, keepdims=True), 1e-12)
    return np.sqrt(p).astype(np.float32)


# -- phrases ---------------------------------------------------------------------------------------
def _normalise_phrase(text: str) -> str:
    words = _WORD.findall(str(text or "").lower().replace("-colored", "").replace("-coloured", ""))
    return " ".join("grey" if w == "gray" else w for w in words if w not in ("colour", "color", "colored",
                                                                           "coloured", "in", "a", "an", "the"))


def phrase_distribution(text: str) -> np.ndarray | None:
    """The colour a phrase names as a distribution over :data:`BASIC_TERMS`, or None when it names none.
    The whole phrase first when it is a survey name ("navy blue", "light pink"), else each colour word
    (basic terms one-hot, other survey names by their surveyed colour), averaged."""
    phrase = _normalise_phrase(text)
    if not phrase:
        return None
    names = survey()
    if phrase in BASIC_TERMS:
        return np.eye(len(BASIC_TERMS))[BASIC_TERMS.index(phrase)]
    if phrase in names:
        return name_colours(srgb_to_lab(names[phrase]))[0]
    parts = []
    for word in phrase.split():
        if word in BASIC_TERMS:
            parts.append(np.eye(len(BASIC_TERMS))[BASIC_TERMS.index(word)])
        elif word in TERM_SYNONYMS and word not in names:
            parts.append(np.eye(len(BASIC_TERMS))[BASIC_TERMS.index(TERM_SYNONYMS[word])])
        elif word in names:
            parts.append(name_colours(srgb_to_lab(names[word]))[0])
    return np.mean(parts, axis=0) if parts else None


def is_colour_phrase(text: str) -> bool:
    return phrase_distribution(text) is not None


def phrase_vectors(texts) -> np.ndarray:
    """Unit colour vectors of phrases (``sqrt`` of :func:`phrase_distribution`); a phrase naming no colour
    raises :class:`InvalidQueryError`."""
    out = []
    for text in texts:
        dist = phrase_distribution(text)
        if dist is None:
            raise InvalidQueryError(f"{text!r} names no colour; the colour-names encoder understands colour "
                                    f"words such as {', '.join(BASIC_TERMS)}, navy blue, teal or mustard")
        out.append(dist)
    return colour_vectors(np.stack(out)) if out else np.zeros((0, len(BASIC_TERMS)), np.float32)


def top_colours(dist, *, top: int = 3, min_share: float = 0.1) -> list[dict[str, float]]:
    """The main colours of a distribution: up to ``top`` terms holding at least ``min_share`` of it (the
    first always), as ``[{"colour": "red", "score": 0.62}, ...]``."""
    p = np.asarray(dist, np.float64).reshape(-1)
    order = np.argsort(-p, kind="stable")[:max(1, int(top))]
    return [{"colour": BASIC_TERMS[i], "score": round(float(p[i]), 4)} for n, i in enumerate(order)
            if n == 0 or p[i] >= min_share]


def describe_colours(images) -> list[list[dict[str, float]]]:
    """:func:`top_colours` of each image (PIL images, paths or bytes), with the ``colour-names`` encoder."""
    from retrieval.encoders import create_encoder

    enc = create_encoder("colour-names", device="cpu")
    return [top_colours(row) for row in enc.distributions(list(images))] if len(images) else []


#: the filter field that asks for a colour: ``{"colour-names": "red"}`` (named after the encoder, so it cannot
#: clash with a manifest column such as ``colour``)
FILTER_FIELD = "colour-names"
#: a colour filter keeps images where the colour holds at least this share of the object's pixels
FILTER_MIN_SHARE = 0.25


def colour_filter_mask(vectors: np.ndarray, phrases, min_share: float = FILTER_MIN_SHARE) -> np.ndarray:
    """Rows of colour-names ``vectors`` (``sqrt`` of distributions) that show any of ``phrases``: the share
    ``BC(p, q)²`` (for one basic term, ``p[term]``) is at least ``min_share``."""
    q = phrase_vectors(list(phrases))                                          # [m, 11]
    share = (np.clip(np.asarray(vectors, np.float32), 0, None) @ q.T) ** 2    # [n, m]
    return (share >= float(min_share)).any(axis=1) if len(q) else np.zeros(len(vectors), bool)

