"""Query regions for re-ranking: region windows, vectors and scores against a reference, a pasted
object found by its region, and the query-crop windows with their pixel boxes (``encoder_view``)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from retrieval.rerank.regions import (
    crop_windows,
    encoder_view,
    grid_box_to_pixels,
    region_scores,
    region_vectors,
    region_windows,
)
from tests._rerank_helpers import FakeSpec, unit


# -- multi-region query descriptors --------------------------------------------------------------
def test_region_windows_vectors_and_scores_equal_reference():
    grid = (4, 5)
    wins = region_windows(grid, sizes=(2, 3), stride=2)
    expected = set()
    for s in (2, 3):
        for r in sorted(set(range(0, 4 - s + 1, 2)) | {4 - s}):
            for c in sorted(set(range(0, 5 - s + 1, 2)) | {5 - s}):
                expected.add((r, c, r + s, c + s))
    assert set(map(tuple, wins.tolist())) == expected and len(wins) == len(expected)
    assert region_windows((7, 7), (3, 4, 5), 1).shape == (25 + 16 + 9, 4)
    rng = np.random.default_rng(7)
    tokens = rng.normal(size=(20, 6)).astype(np.float32)
    regions = region_vectors(tokens, grid, wins)
    t = tokens.reshape(4, 5, 6)
    for (r0, c0, r1, c1), got in zip(wins, regions):
        m = t[r0:r1, c0:c1].reshape(-1, 6).mean(axis=0)
        np.testing.assert_allclose(got, m / np.linalg.norm(m), atol=1e-5)
    vecs = unit(rng.normal(size=(9, 6)))
    ref = [max(float(np.dot(v, r)) for r in regions) for v in vecs]
    np.testing.assert_allclose(region_scores(regions, vecs), ref, atol=1e-6)


def test_region_score_finds_a_pasted_object():
    """A query = an object (a block of tokens) pasted into clutter: its region matches the object's image."""
    rng = np.random.default_rng(8)
    obj = unit(rng.normal(size=(1, 32)) + 0.0)[0]
    tokens = unit(rng.normal(size=(49, 32)))
    grid = tokens.reshape(7, 7, 32)
    grid[1:4, 2:5] = unit(obj + 0.3 * rng.normal(size=(3, 3, 32)))
    regions = region_vectors(grid.reshape(49, 32), (7, 7), region_windows((7, 7), (3,), 1))
    whole = unit(tokens.mean(axis=0, keepdims=True))[0]
    others = unit(rng.normal(size=(20, 32)))
    scores = region_scores(regions, np.concatenate([others, obj[None]]))
    assert int(np.argmax(scores)) == 20 and scores[20] > 0.8 and float(obj @ whole) < 0.6


# -- query-crop windows and their pixel boxes --------------------------------------------------
def test_encoder_view_and_grid_box_to_pixels_hand_computed():
    # effnet-style centre crop (crop_pct 0.875) of a 448² image: a 392-pixel square from (28, 28), 56-pixel cells
    view = encoder_view(FakeSpec("effnet", crop_pct=0.875), (448, 448))
    assert view == pytest.approx((28, 28, 420, 420))
    assert grid_box_to_pixels((1, 2, 4, 5), (7, 7), (448, 448), view) == (140, 84, 308, 252)
    assert grid_box_to_pixels((1, 2, 4, 5), (7, 7), (448, 448), view, margin=0.5) == (112, 56, 336, 280)
    # landscape 640×480: square of 420 from (110, 30), 60-pixel cells; the margin is clipped to the image
    view = encoder_view(FakeSpec("effnet", crop_pct=0.875), (640, 480))
    assert view == pytest.approx((110, 30, 530, 450))
    assert grid_box_to_pixels((0, 0, 2, 2), (7, 7), (640, 480), view, margin=1.0) == (50, 0, 290, 210)
    assert grid_box_to_pixels((5, 5, 7, 7), (7, 7), (640, 480), view, margin=1.0) == (350, 270, 590, 480)
    # CLIP: the whole shorter side; DINOv2: image_size / resize of it; SSCD / PDQ: the whole (squashed) image
    assert encoder_view(FakeSpec("clip"), (300, 200)) == pytest.approx((50, 0, 250, 200))
    assert encoder_view(FakeSpec("dinov2", resize=256), (256, 256)) == pytest.approx((16, 16, 240, 240))
    assert encoder_view(FakeSpec("sscd"), (300, 200)) == (0, 0, 300, 200)
    assert grid_box_to_pixels((0, 0, 1, 1), (4, 4), (300, 200)) == (0, 0, 75, 50)


def test_encoder_view_matches_the_effnet_transform(effnet):
    """The box encoder_view reports is the part of the image the encoder's preprocessing keeps: red inside
    it, blue outside, and the preprocessed input is red up to its (interpolated) outermost pixel."""
    img = Image.new("RGB", (640, 480), (0, 0, 255))
    x0, y0, x1, y1 = (int(round(v)) for v in encoder_view(effnet.spec, img.size))
    assert (x0, y0, x1, y1) == (110, 30, 530, 450)
    img.paste((255, 0, 0), (x0, y0, x1, y1))
    x = effnet.preprocess(img).numpy()                  # [3, 224, 224], normalised
    red = x[0] > x[2]
    assert red[1:-1, 1:-1].all()
    # a view 4 % too small would leave blue inside the input
    img2 = Image.new("RGB", (640, 480), (0, 0, 255))
    img2.paste((255, 0, 0), (x0 + 17, y0 + 17, x1 - 17, y1 - 17))
    x2 = effnet.preprocess(img2).numpy()
    assert not (x2[0] > x2[2])[1:-1, 1:-1].all()


def test_crop_windows_gain_match_novel_and_overlap():
    windows = np.array([[0, 0, 2, 2], [0, 1, 2, 3], [3, 3, 5, 5], [2, 0, 4, 2]])
    e = np.eye(4, dtype=np.float32)
    regions = e                                        # window i's vector = axis i
    # candidate 0 = the indexed background (axis 0; the global vector already finds it, g = 0.9),
    # candidate 1 = the object's original (axis 2, g = 0.1)
    vecs = np.stack([e[0], unit(0.8 * e[2] + 0.6 * e[3])])
    g = np.array([0.9, 0.1])
    assert list(crop_windows(windows, regions, vecs, g, select="match")) == [0]
    assert list(crop_windows(windows, regions, vecs, g, select="gain")) == [2]
    # two windows: the second best by gain that does not overlap the first by more than half
    assert list(crop_windows(windows, regions, vecs, g, count=2, select="gain")) == [2, 3]
    # "match" scores the windows 1, 0, 0.8, 0.6: window 1 (IoU 1/3 with window 0) comes last, kept under
    # max_overlap 0.5 and skipped under 0.3 ...
    assert list(crop_windows(windows, regions, vecs, g, count=2, select="match")) == [0, 2]
    assert list(crop_windows(windows, regions, vecs, g, count=4, select="match")) == [0, 2, 3, 1]
    assert list(crop_windows(windows, regions, vecs, g, count=4, select="match", max_overlap=0.3)) == [0, 2, 3]
    # ... and, second best for a candidate that matches windows 0 and 1, it is chosen second or skipped
    both = unit(e[0] + 0.9 * e[1])[None]
    assert list(crop_windows(windows, regions, both, g[:1], count=2, select="match")) == [0, 1]
    assert list(crop_windows(windows, regions, both, g[:1], count=2, select="match", max_overlap=0.3)) == [0, 2]
    # ... and "novel" takes the window least like the query vector
    q = unit(np.array([1.0, 0.9, -0.5, 0.2]))
    assert list(crop_windows(windows, regions, vecs, g, q, select="novel")) == [2]
    with pytest.raises(ValueError):
        crop_windows(windows, regions, vecs, g, select="nope")
