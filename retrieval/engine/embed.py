"""Query embedding and routing: the part of :class:`retrieval.engine.Engine` that turns a request
(text, weighted terms, image bytes, an indexed image, a raw vector, an instruction) into one unit query
vector (``QueryContext``).

* Text goes to the index's first text-capable encoder (or the one named, if it embeds text); image
  queries to the encoder chosen per request (default: the index's default encoder).
* Text vectors are cached (LRU of ``TEXT_CACHE_SIZE``), so repeated queries skip the text model.
* An instruction composes with the image through ``retrieval.compose.compose_query``
  (:func:`instruction_method` picks the method).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image

from retrieval.engine.query import QueryContext, as_query_vector, combine, parse_terms
from retrieval.errors import InvalidQueryError, UnsupportedModalityError
from retrieval.index import store

TEXT_CACHE_SIZE = 2048


class EngineQueries:
    """Engine methods that embed queries. Uses ``Engine._entry``, ``Engine.encoder``, ``_text_cache``
    and ``_lock``, and the id/vector methods of :class:`retrieval.engine_records.EngineRecords`."""

    def embed_texts(self, encoder: str, texts: Sequence[str]) -> np.ndarray:
        """Text vectors (cached: repeated queries skip the text model)."""
        enc = self.encoder(encoder)
        out: list[np.ndarray | None] = []
        missing = []
        with self._lock:
            for t in texts:
                v = self._text_cache.get((enc.name, t))
                if v is not None:
                    self._text_cache.move_to_end((enc.name, t))
                else:
                    missing.append(t)
                out.append(v)
        if missing:
            new = enc.encode_texts(list(dict.fromkeys(missing)))
            fresh = dict(zip(dict.fromkeys(missing), new))
            with self._lock:
                for t, v in fresh.items():
                    self._text_cache[(enc.name, t)] = v
                while len(self._text_cache) > TEXT_CACHE_SIZE:
                    self._text_cache.popitem(last=False)
            out = [v if v is not None else fresh[t] for v, t in zip(out, texts)]
        return np.stack(out).astype(np.float32)

    def embed(self, *, text: str | Sequence[str] | None = None, image: bytes | Image.Image | None = None,
              image_id: str | None = None, vector: Any = None, instruction: str | None = None,
              encoder: str | None = None, weight: float | None = None, method: str = "auto",
              keep_local: bool = False, **opts: Any) -> QueryContext:
        """Embed a query into one unit vector (see ``search`` for the meaning of each field)."""
        from retrieval.images import load_image

        given = [n for n, v in (("text", text), ("image", image), ("image_id", image_id), ("vector", vector))
                 if v is not None]
        if not given:
            raise InvalidQueryError("missing query: give text, image, image_id or vector")
        if image is not None and image_id is not None:
            raise InvalidQueryError("give either image or image_id, not both")
        if vector is not None and len(given) > 1:
            raise InvalidQueryError("a raw vector query cannot be combined with text or images")
        if instruction is not None and (not isinstance(instruction, str) or not instruction.strip()):
            raise InvalidQueryError("instruction must be a non-empty string")
        has_image = image is not None or image_id is not None
        if instruction is not None and not has_image:
            if text is None:
                raise InvalidQueryError("an instruction needs an image (image or image_id) to apply to")
        if text is not None and has_image and instruction is None:
            # "this image, but ..." – the text acts as the instruction
            if not isinstance(text, str):
                raise InvalidQueryError("with an image, text must be one string (it acts as the instruction)")
            instruction, text = text, None

        # routing
        if text is not None or instruction is not None:
            named = self._entry(encoder) if encoder is not None else None
            if named is not None and not named.supports_text and not (
                    "colour" in named.modalities and text is not None and instruction is None):
                # (colour-names answers colour phrases when named: encoder="colour-names", text="red")
                raise UnsupportedModalityError(
                    f"encoder {encoder!r} embeds images only; text goes to {self.text_encoder!r}"
                    if self.text_encoder else f"encoder {encoder!r} embeds images only")
            name = encoder or self.text_encoder
            if name is None:
                raise UnsupportedModalityError(
                    "this index has no text-capable encoder; index with e.g. --encoder conse-effnet-lite0 "
                    "or clip-vit-b-32 to search by text")
        else:
            name = encoder or self.default_encoder
        entry = self._entry(name)

        ctx = QueryContext(vector=np.zeros(entry.dim, np.float32), encoder=entry.name, image_id=image_id,
                           instruction=instruction)
        if vector is not None:
            ctx.vector = as_query_vector(vector, entry.dim)
            return ctx
        if text is not None:
            terms = parse_terms(text)
            ctx.terms = terms
            ctx.text = text if isinstance(text, str) else " ".join(text)
            vecs = self.embed_texts(entry.name, [t for _, t in terms])
            ctx.vector = combine(vecs, [w for w, _ in terms])
            return ctx
        # image (bytes / PIL) or indexed image
        if image is not None:
            pil = load_image(image)
            ctx.image = pil
            if isinstance(image, (bytes, bytearray)):
                ctx.upload_id = store.content_id(store.sha256_bytes(bytes(image)))
            enc = self.encoder(entry.name)
            fine = (entry.local_features or {}).get("layer") == "fine" and "fine" in enc.local_layers
            if keep_local and fine:
                # one forward pass: the global vector, the final map (regions) and the fine map (matching)
                vecs, tokens, grid, ftok, fgrid = enc.encode_images_and_fine([pil])
                img_vec, ctx.local, ctx.local_fine = vecs[0], (tokens[0], grid), (ftok[0], fgrid)
            elif keep_local and enc.has_local_features and not enc.binary:
                # one forward pass gives the global vector and the tokens re-ranking needs
                vecs, tokens, grid = enc.encode_images_and_local([pil])
                img_vec, ctx.local = vecs[0], (tokens[0], grid)
            else:
                img_vec = enc.encode_images([pil])[0]
        else:
            shard, row = self.locate(image_id)
            img_vec = self._reconstruct(entry.name, shard, row)
            ctx._image_loader = lambda iid=image_id: self.load_image(iid)
        if instruction is not None:
            from retrieval.compose.compose import compose_query

            ctx.terms = parse_terms(instruction) if instruction.lstrip()[:1] in "+-" else [(1.0, instruction.strip())]
            txt = combine(self.embed_texts(entry.name, [t for _, t in ctx.terms]), [w for w, _ in ctx.terms])
            method = instruction_method(method, weight)
            kwargs: dict[str, Any] = {"method": method}
            if method and method != "sum":   # arithmetic / caption / fused need the encoder and the words
                kwargs.update(encoder=self.encoder(entry.name), instruction=instruction, index_dir=self.index_dir)
            if weight is not None:
                if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0.0 <= weight <= 1.0:
                    raise InvalidQueryError("weight must be a number in [0, 1]")
                kwargs["weight"] = float(weight)
            ctx.vector = np.asarray(compose_query(img_vec, txt, **kwargs), dtype=np.float32).reshape(-1)
            ctx.image_vector = (img_vec / max(float(np.linalg.norm(img_vec)), 1e-12)).astype(np.float32)
        else:
            norm = float(np.linalg.norm(img_vec))
            ctx.vector = (img_vec / max(norm, 1e-12)).astype(np.float32)
        return ctx


def instruction_method(method: str | None, weight: float | None) -> str:
    """The composition method a query gets: ``auto`` (or none) means ``compose.DEFAULT_METHOD``, except
    that an explicit ``weight`` (the image/text mix of ``sum``) asks for ``sum``."""
    if method in (None, "", "auto") and weight is not None:
        return "sum"
    return method or "auto"


def _is_fusion(method: Any) -> bool:
    if method == "auto":
        from retrieval.compose.compose import DEFAULT_METHOD

        method = DEFAULT_METHOD
    return method == "fusion"
