"""The query side of re-ranking against an engine: the index's local-feature manifest entry and PCA
reducer, and the query's local descriptors (tokens kept from the embedding pass, one encoder pass on the
query image, or an indexed image's stored descriptors), plus text vectors projected into the local space.
Used by ``retrieval.rerank.rerank_hits`` (and copy detection's ``query_local_features``).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from retrieval.numeric import l2_normalize


def _reducer(engine, encoder: str):
    """The index's PCA reducer of ``encoder``'s local features (None without one), loaded with the index
    (``Engine.local_reducer``: a re-indexed DIR is a reopened engine, which loads the new one); engines
    without it (test doubles) load it once (``engine.cache``)."""
    from retrieval.index import descriptors, store

    loaded = getattr(engine, "local_reducer", None)
    if callable(loaded):
        return loaded(encoder)
    path = store.pca_path(engine.index_dir, encoder)
    if not os.path.isfile(path):
        return None
    return engine.cache(("rerank.reducer", encoder), lambda: descriptors.LocalReducer.load(path))


def local_info(engine, encoder: str) -> dict | None:
    entry = engine.manifest.encoders.get(encoder)
    return entry.local_features if entry is not None else None


def _grid_positions(grid: Sequence[int]) -> np.ndarray:
    h, w = int(grid[0]), int(grid[1])
    rr, cc = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([rr.ravel(), cc.ravel()], axis=1).astype(np.int64)


def reduce_tokens(engine, encoder: str, tokens: np.ndarray) -> np.ndarray:
    """Raw encoder tokens → the index's local descriptor space (its PCA, then unit rows)."""
    red = _reducer(engine, encoder)
    return l2_normalize(tokens) if red is None else red.transform(tokens)


def query_tokens(engine, ctx, encoder_name: str | None = None) -> tuple[np.ndarray, tuple[int, int]] | None:
    """The query image's encoder tokens ``(tokens [p, C], grid)``: ``ctx.local`` when the embedding step
    kept them (one forward pass), else one ``encode_images_and_local`` pass on ``ctx.image`` (then kept in
    ``ctx.local`` when ``encoder_name`` is the context's own encoder); None without an image in hand."""
    name = encoder_name or ctx.encoder
    local = getattr(ctx, "local", None)
    if local is not None and name == ctx.encoder:
        tokens, grid = local
        return np.asarray(tokens), (int(grid[0]), int(grid[1]))
    if getattr(ctx, "image", None) is not None:
        enc = engine.encoder(name)
        _, tokens, grid = enc.encode_images_and_local([ctx.image])
        grid = (int(grid[0]), int(grid[1]))
        if name == ctx.encoder:
            try:
                ctx.local = (tokens[0], grid)
            except AttributeError:  # pragma: no cover - a read-only context
                pass
        return np.asarray(tokens[0]), grid
    return None


def _query_fine_tokens(engine, ctx, name: str) -> tuple[np.ndarray, tuple[int, int]] | None:
    """The query image's fine-layer tokens (an index built with ``--local-layer fine``): kept from the
    embedding pass (``ctx.local_fine``), else one ``encode_images_and_fine`` pass (which also keeps the
    final map in ``ctx.local`` for the regions)."""
    fine = getattr(ctx, "local_fine", None)
    if fine is not None and name == ctx.encoder:
        return np.asarray(fine[0]), (int(fine[1][0]), int(fine[1][1]))
    image = getattr(ctx, "image", None)
    if image is None:          # an indexed image_id query: its stored descriptors are read instead
        return None
    _, tokens, grid, ftok, fgrid = engine.encoder(name).encode_images_and_fine([image])
    if name == ctx.encoder:
        try:
            ctx.local, ctx.local_fine = (tokens[0], (int(grid[0]), int(grid[1]))), (ftok[0], fgrid)
        except AttributeError:  # pragma: no cover - a read-only context
            pass
    return np.asarray(ftok[0]), (int(fgrid[0]), int(fgrid[1]))


def query_local_features(engine, ctx, encoder_name: str | None = None
                         ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]] | None:
    """The query's local descriptors in the index's space: ``(desc [p, c], pos [p, 2], grid)`` or None.

    Uses ``ctx.local = (tokens, grid)`` when the embedding step kept them (one forward pass), else runs
    the encoder's ``encode_images_and_local`` on ``ctx.image``, else reads an indexed ``ctx.image_id``'s."""
    name = encoder_name or ctx.encoder
    info = local_info(engine, name) or {}
    if info.get("layer") == "fine":
        q = _query_fine_tokens(engine, ctx, name)
    else:
        q = query_tokens(engine, ctx, name)
    if q is not None:
        tokens, grid = q
        return reduce_tokens(engine, name, tokens), _grid_positions(grid), grid
    if getattr(ctx, "image_id", None):
        hit = engine.hit_for_id(name, ctx.image_id)
        desc, pos = engine.local_features(name, [hit])[0]
        grid = tuple(info.get("grid") or (int(pos[:, 0].max()) + 1, int(pos[:, 1].max()) + 1))
        return np.asarray(desc, np.float32), np.asarray(pos), (int(grid[0]), int(grid[1]))
    return None


def text_in_patch_space(engine, name: str) -> bool:
    try:
        enc = engine.encoder(name)
    except Exception:  # noqa: BLE001 - unloadable encoder: no text re-ranking
        return False
    return bool(enc.supports_text and enc.spec.local == "patch_tokens")


def project_text(engine, name: str, text_vec: np.ndarray) -> np.ndarray:
    """A text vector into the index's local descriptor space (PCA directions, no centring)."""
    red = _reducer(engine, name)
    t = np.asarray(text_vec, np.float32).reshape(1, -1)
    if red is None:
        return l2_normalize(t)[0]
    return l2_normalize(t @ red.components.T)[0]
