"""``Embedder``: turns a ``SearchRequest`` into one unit query vector (a ``QueryContext``).

* Encoders load once, on first use (``encoder(name)``), and are safe to call from many threads.
* Text goes to the index's first text-capable encoder (or the one named, if it embeds text); image
  queries to the encoder named in the request (default: the index's default encoder).
* Weighted terms follow rclip: ``"+a cat"`` adds, ``"-a dog"`` subtracts, ``"0.5:snow"`` adds with weight
  0.5; the query vector is the normalised weighted sum of the normalised term vectors.
* Text vectors are cached (LRU of ``TEXT_CACHE_SIZE``), so repeated queries skip the text model.
* An instruction composes with the image through ``retrieval.compose.compose_query``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from retrieval.engine.query import QueryContext
from retrieval.engine.request import MAX_TEXT_CHARS, SearchRequest
from retrieval.errors import IndexFormatError, InvalidQueryError, UnsupportedModalityError
from retrieval.index import store

log = logging.getLogger("loupe.engine")

TEXT_CACHE_SIZE = 2048
#: an uploaded query image is decoded reduced (``load_image(min_side=...)``) to no less than
#: ``REDUCING_GAP`` (4) × this, or the encoder's input side if larger, on its shorter side: 1024 px and up,
#: enough for the encoder and for what the request does next with the picture (copy-detection regions,
#: attribution overlays of the query, a second encoder for fusion)
UPLOAD_MIN_SIDE = 256
MAX_TERMS = 16
_WEIGHTED = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*:\s*(.*)$", re.S)


class Embedder:
    """The encoders of one index and the caches in front of them.

    ``stored_vector(encoder, image_id)`` and ``load_image(image_id)`` give an indexed image's vector and
    pixels (an ``image_id`` query); ``composer`` (optional) builds the keyword arguments that instruction
    composition needs beyond the vectors (``retrieval.compose.compose_query``)."""

    def __init__(self, manifest: store.Manifest, *, device: str = "auto", index_dir: Path | None = None,
                 stored_vector: Callable[[str, str], np.ndarray] | None = None,
                 load_image: Callable[[str], Image.Image] | None = None,
                 composer: Callable[[], dict[str, Any]] | None = None):
        self.manifest, self.device, self.index_dir = manifest, device, index_dir
        self._stored_vector, self._load_image, self._composer = stored_vector, load_image, composer
        self.encoders: dict[str, Any] = {}
        self.text_cache: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def adopt(self, other: "Embedder") -> None:
        """Share ``other``'s loaded encoders (same names and dims) and text cache (a reopened index)."""
        for name, enc in other.encoders.items():
            if name in self.manifest.encoders and self.manifest.encoders[name].dim == enc.dim:
                self.encoders[name] = enc
        self.text_cache = other.text_cache

    def encoder(self, name: str | None = None):
        """The encoder ``name`` of this index (``None`` = default), loaded once and cached."""
        entry = self.manifest.entry(name)
        enc = self.encoders.get(entry.name)
        if enc is None:
            with self._lock:
                enc = self.encoders.get(entry.name)
                if enc is None:
                    from retrieval.encoders import create_encoder

                    t0 = time.perf_counter()
                    enc = create_encoder(entry.name, device=self.device)
                    if enc.dim != entry.dim:
                        raise IndexFormatError(
                            f"encoder {entry.name} gives {enc.dim}-d vectors but the index holds {entry.dim}-d")
                    log.info("loaded encoder %s in %.1f s", entry.name, time.perf_counter() - t0)
                    self.encoders[entry.name] = enc
        return enc

    def embed_texts(self, encoder: str, texts: Sequence[str]) -> np.ndarray:
        """Text vectors (cached: repeated queries skip the text model)."""
        enc = self.encoder(encoder)
        out: list[np.ndarray | None] = []
        missing = []
        with self._lock:
            for t in texts:
                v = self.text_cache.get((enc.name, t))
                if v is not None:
                    self.text_cache.move_to_end((enc.name, t))
                else:
                    missing.append(t)
                out.append(v)
        if missing:
            fresh = dict(zip(dict.fromkeys(missing), enc.encode_texts(list(dict.fromkeys(missing)))))
            with self._lock:
                for t, v in fresh.items():
                    self.text_cache[(enc.name, t)] = v
                while len(self.text_cache) > TEXT_CACHE_SIZE:
                    self.text_cache.popitem(last=False)
            out = [v if v is not None else fresh[t] for v, t in zip(out, texts)]
        return np.stack(out).astype(np.float32)

    def route(self, req: SearchRequest) -> store.EncoderEntry:
        """The encoder that answers ``req``: text → the text encoder (or the one named, if it embeds
        text; colour-names answers colour phrases when named); images → the one named, else the default."""
        if req.text is None and req.instruction is None:
            return self.manifest.entry(req.encoder)
        if req.encoder is not None:
            named = self.manifest.entry(req.encoder)
            if not named.supports_text and not ("colour" in named.modalities and req.text is not None
                                                and req.instruction is None):
                text_encoder = self.manifest.text_encoder
                raise UnsupportedModalityError(
                    f"encoder {req.encoder!r} embeds images only; text goes to {text_encoder!r}"
                    if text_encoder else f"encoder {req.encoder!r} embeds images only")
            return named
        if self.manifest.text_encoder is None:
            raise UnsupportedModalityError(
                "this index has no text-capable encoder; index with e.g. --encoder conse-effnet-lite0 "
                "or clip-vit-b-32 to search by text")
        return self.manifest.entry(self.manifest.text_encoder)

    def embed(self, req: SearchRequest, *, keep_local: bool = False) -> QueryContext:
        """Embed a query into one unit vector; ``keep_local``: keep the query image's local features from
        the same forward pass (re-ranking)."""
        entry = self.route(req)
        ctx = QueryContext(vector=np.zeros(entry.dim, np.float32), encoder=entry.name, image_id=req.image_id,
                           instruction=req.instruction)
        if req.vector is not None:
            ctx.vector = as_query_vector(req.vector, entry.dim)
            return ctx
        if req.text is not None:
            ctx.terms = parse_terms(req.text)
            ctx.text = req.text if isinstance(req.text, str) else " ".join(req.text)
            ctx.vector = combine(self.embed_texts(entry.name, [t for _, t in ctx.terms]), [w for w, _ in ctx.terms])
            return ctx
        img_vec = self._image_vector(req, entry, ctx, keep_local)
        unit = (img_vec / max(float(np.linalg.norm(img_vec)), 1e-12)).astype(np.float32)
        if req.instruction is None:
            ctx.vector = unit
        else:
            ctx.image_vector, ctx.vector = unit, self._compose(req, entry, ctx, img_vec)
        return ctx

    def _image_vector(self, req: SearchRequest, entry: store.EncoderEntry, ctx: QueryContext,
                      keep_local: bool) -> np.ndarray:
        """The query image's vector: uploaded bytes / PIL embedded now, an indexed image's stored vector."""
        if req.image is None:
            ctx._image_loader = lambda iid=req.image_id: self._load_image(iid)
            return self._stored_vector(entry.name, req.image_id)
        from retrieval.images import load_image

        pil = load_image(req.image, min_side=upload_side(entry.name))
        ctx.image = pil
        if isinstance(req.image, (bytes, bytearray)):
            ctx.upload_id = store.content_id(store.sha256_bytes(bytes(req.image)))
        enc = self.encoder(entry.name)
        if keep_local and (entry.local_features or {}).get("layer") == "fine" and "fine" in enc.local_layers:
            # one forward pass: the global vector, the final map (regions) and the fine map (matching)
            vecs, tokens, grid, ftok, fgrid = enc.encode_images_and_fine([pil])
            ctx.local, ctx.local_fine = (tokens[0], grid), (ftok[0], fgrid)
            return vecs[0]
        if keep_local and enc.has_local_features and not enc.binary:
            vecs, tokens, grid = enc.encode_images_and_local([pil])   # the global vector and the tokens
            ctx.local = (tokens[0], grid)
            return vecs[0]
        return enc.encode_images([pil])[0]

    def _compose(self, req: SearchRequest, entry: store.EncoderEntry, ctx: QueryContext,
                 img_vec: np.ndarray) -> np.ndarray:
        from retrieval.compose.compose import compose_query

        instruction = req.instruction
        ctx.terms = parse_terms(instruction) if instruction.lstrip()[:1] in "+-" else [(1.0, instruction.strip())]
        txt = combine(self.embed_texts(entry.name, [t for _, t in ctx.terms]), [w for w, _ in ctx.terms])
        method = req.composition
        kwargs: dict[str, Any] = {"method": method}
        if method != "sum":   # arithmetic / caption / fused need the encoder and the words
            kwargs.update(encoder=self.encoder(entry.name), instruction=instruction, index_dir=self.index_dir,
                          **(self._composer() if self._composer else {}))
        if req.weight is not None:
            kwargs["weight"] = req.weight
        return np.asarray(compose_query(img_vec, txt, **kwargs), dtype=np.float32).reshape(-1)


def upload_side(encoder: str) -> int:
    """The ``min_side`` an uploaded image for ``encoder`` is decoded with (``UPLOAD_MIN_SIDE`` or more)."""
    from retrieval.encoders import get_spec
    from retrieval.errors import LoupeError

    try:
        return max(UPLOAD_MIN_SIDE, get_spec(encoder).input_side)
    except LoupeError:      # an encoder only the index knows: the generous default
        return 2 * UPLOAD_MIN_SIDE


# -- weighted text terms (rclip style) --------------------------------------------------------------
def parse_term(term: str) -> tuple[float, str]:
    """``"+a cat"`` → (1, "a cat"); ``"-a dog"`` → (-1, "a dog"); ``"0.5:snow"`` → (0.5, "snow")."""
    if not isinstance(term, str):
        raise InvalidQueryError(f"text terms must be strings, got {type(term).__name__}")
    raw = term.strip()
    weight = 1.0
    m = _WEIGHTED.match(raw)
    if m:
        weight, raw = float(m.group(1)), m.group(2).strip()
    elif raw[:1] in "+-" and raw[:1]:
        weight, raw = (1.0 if raw[0] == "+" else -1.0), raw[1:].strip()
    if not raw:
        raise InvalidQueryError(f"empty text term {term!r}")
    if len(raw) > MAX_TEXT_CHARS:
        raise InvalidQueryError(f"text term is {len(raw)} characters, over the limit of {MAX_TEXT_CHARS}")
    if not np.isfinite(weight):
        raise InvalidQueryError(f"bad weight in {term!r}")
    return weight, raw


def parse_terms(text: str | Sequence[str]) -> list[tuple[float, str]]:
    """A text query (one string, or a list of weighted terms) → [(weight, text), ...]."""
    if isinstance(text, str):
        items = [text]
    elif isinstance(text, (list, tuple)):
        items = list(text)
    else:
        raise InvalidQueryError("text must be a string or a list of strings")
    if not items:
        raise InvalidQueryError("empty text query")
    if len(items) > MAX_TERMS:
        raise InvalidQueryError(f"at most {MAX_TERMS} text terms per query, got {len(items)}")
    return [parse_term(t) for t in items]


def combine(vectors: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Normalised weighted sum of normalised rows; raises if the terms cancel out."""
    v = np.asarray(vectors, dtype=np.float32)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    out = (np.asarray(weights, dtype=np.float32)[:, None] * v).sum(axis=0)
    norm = float(np.linalg.norm(out))
    if not np.isfinite(norm) or norm < 1e-6:
        raise InvalidQueryError("the weighted query terms cancel out (zero vector); change the weights")
    return (out / norm).astype(np.float32)


def as_query_vector(vector: Any, dim: int) -> np.ndarray:
    """Validate a raw query embedding (list or array of ``dim`` finite numbers) → unit float32."""
    try:
        arr = np.asarray(vector, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise InvalidQueryError(f"vector must be a list of {dim} numbers") from exc
    if arr.shape[0] != dim:
        raise InvalidQueryError(f"vector has {arr.shape[0]} dimensions; this encoder needs {dim}")
    norm = float(np.linalg.norm(arr))
    if not np.isfinite(norm) or norm < 1e-12:
        raise InvalidQueryError("vector must be finite and non-zero")
    return (arr / norm).astype(np.float32)
