"""Attribution heatmaps and overlays: sizes, determinism, the planted object lights up."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.encoders import create_encoder
from retrieval.errors import InvalidQueryError, UnsupportedModalityError
from retrieval.explain.attribution import attribute, eigen_cam, to_image_map, token_contributions
from retrieval.explain.cnn import conse_vector_torch
from retrieval.explain.grid import crop_box
from retrieval.explain.matching import match_maps
from retrieval.explain.overlay import blend, colormap_lut, heatmap_json, overlay_png

BOX = (250, 120, 430, 270)   # where the object is pasted on the 480x360 canvas


@pytest.fixture(scope="module")
def composite(photos):
    """The real cat photo, shrunk, pasted on a blank canvas (object, canvas, mask of the object)."""
    obj = photos["chelsea"].resize((BOX[2] - BOX[0], BOX[3] - BOX[1]))
    canvas = Image.new("RGB", (480, 360), (255, 255, 255))
    canvas.paste(obj, BOX[:2])
    mask = np.zeros((360, 480), bool)
    mask[BOX[1]:BOX[3], BOX[0]:BOX[2]] = True
    return obj, canvas, mask


def _contrast(hm, mask):
    return float(hm[mask].mean()), float(hm[~mask].mean())


@pytest.mark.parametrize("method", ["gradcam", "cam", "gradinput", "eigencam"])
def test_effnet_maps_highlight_planted_object(effnet, composite, method):
    obj, canvas, mask = composite
    q = effnet.encode_images([obj])[0]
    hm = attribute(effnet, canvas, q, method)
    assert hm.shape == (360, 480) and hm.dtype == np.float32
    assert 0.0 <= hm.min() and hm.max() == pytest.approx(1.0)
    inside, outside = _contrast(hm, mask)
    assert inside > 4 * outside, (inside, outside)
    np.testing.assert_array_equal(hm, attribute(effnet, canvas, q, method))   # deterministic


@pytest.mark.parametrize("fixture", ["tiny_clip", "tiny_dino"])
def test_vit_token_decomposition_highlights_planted_object(request, fixture, composite):
    enc = create_encoder(request.getfixturevalue(fixture), device="cpu")
    obj, canvas, mask = composite
    q = enc.encode_images([obj])[0]
    hm = attribute(enc, canvas, q, "tokens")
    assert hm.shape == (360, 480)
    inside, outside = _contrast(hm, mask)
    assert inside > 3 * outside, (inside, outside)
    np.testing.assert_array_equal(hm, attribute(enc, canvas, q))
    eig = attribute(enc, canvas, None, "eigencam")
    assert eig.shape == (360, 480) and eig.max() == pytest.approx(1.0)
    with pytest.raises(InvalidQueryError):
        attribute(enc, canvas, q, "gradcam")
    with pytest.raises(InvalidQueryError):
        attribute(enc, canvas, q, "gradinput")


def test_conse_text_query_and_differentiable_combination(conse, composite):
    obj, canvas, mask = composite
    q = conse.encode_texts(["a photo of a cat"])[0]
    hm = attribute(conse, canvas, q, "integrated")
    inside, outside = _contrast(hm, mask)
    assert inside > 4 * outside, (inside, outside)
    hm = attribute(conse, canvas, q, "cam")             # class-activation decomposition
    inside, outside = _contrast(hm, mask)
    assert inside > 4 * outside, (inside, outside)
    g = attribute(conse, canvas, q, "gradcam")          # Grad-CAM through the ConSE softmax runs
    assert g.shape == (360, 480) and np.isfinite(g).all()
    # the torch ConSE combination equals the encoder's (numpy) image vector
    model = conse.image_model
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(conse.to_batch([canvas])), pre_logits=True)
        v = conse_vector_torch(conse, model, pooled).numpy()
    np.testing.assert_allclose(v, conse.encode_images([canvas]), atol=1e-5)


def test_crop_box_and_upsampling(effnet, tiny_clip):
    clip = create_encoder(tiny_clip, device="cpu")
    assert crop_box(clip, (400, 200)) == (100.0, 0.0, 300.0, 200.0)          # CLIP: shorter side, centre
    left, top, right, bottom = crop_box(effnet, (400, 200))                 # effnet: 0.875 of it
    assert right - left == pytest.approx(175.0) and top == pytest.approx(12.5)
    g = np.zeros((4, 4), np.float32)
    g[0, 3] = 1.0                                                           # top-right cell
    hm = to_image_map(g, (400, 200), crop_box(clip, (400, 200)))
    assert hm.shape == (200, 400) and hm[:, :100].max() == 0 and hm[:, 300:].max() == 0
    y, x = np.unravel_index(np.argmax(hm), hm.shape)
    assert 250 <= x < 300 and y < 50


def test_decomposition_and_eigencam_arrays():
    t = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(token_contributions(t, [1.0, 0.0], 2.0), [0.5, 0.0, 0.5])
    np.testing.assert_allclose(token_contributions(t, [1.0, 0.0], 1.0, surgery=True), [1 / 3, 0, 1 / 3], atol=1e-9)
    a = np.outer([1.0, 2.0, 0.0], [3.0, 4.0])                               # rank one
    cam = eigen_cam(a)
    assert cam[1] > cam[0] > cam[2] == 0


def test_match_maps_for_image_query(effnet, photos):
    img = photos["astronaut"]
    w, h = img.size
    query = img.crop((int(w * 0.1), int(h * 0.1), int(w * 0.7), int(h * 0.7))).rotate(15, fillcolor=(255, 255, 255))
    qmap, rmap, info = match_maps(effnet, query, img)
    assert qmap.shape == rmap.shape == (7, 7) and info["verified"] and info["inliers"] >= 5
    # matched regions sit in the cropped part (top-left 70%) of the result
    assert rmap[:5, :5].sum() > 0.8 * rmap.sum()


def test_unsupported_encoder():
    from types import SimpleNamespace

    from retrieval.explain.attribution import default_method

    assert default_method(SimpleNamespace(spec=SimpleNamespace(family="effnet"), name="e")) == "integrated"
    assert default_method(SimpleNamespace(spec=SimpleNamespace(family="conse"), name="c")) == "occlusion"
    conse = SimpleNamespace(spec=SimpleNamespace(family="conse"), name="c")
    assert default_method(conse, image_query=True) == "integrated"
    assert default_method(SimpleNamespace(spec=SimpleNamespace(family="clip"), name="c")) == "tokens"

    fake = SimpleNamespace(spec=SimpleNamespace(family="pdq"), name="pdq")
    with pytest.raises(UnsupportedModalityError):
        default_method(fake)


# -- overlay -------------------------------------------------------------------------------------
def test_overlay_png_and_json(photos):
    img = photos["coffee"]
    hm = np.zeros((img.size[1], img.size[0]), np.float32)
    hm[100:200, 100:300] = 1.0
    png = overlay_png(img, hm)
    out = Image.open(io.BytesIO(png))
    assert out.format == "PNG" and out.size == img.size
    arr = np.asarray(out)
    assert not np.array_equal(arr[150, 150], np.asarray(img)[150, 150])     # hot area is tinted
    assert overlay_png(img, hm) == png
    small = overlay_png(img, np.ones((7, 7), np.float32))                  # grid maps are resized
    assert Image.open(io.BytesIO(small)).size == img.size
    j = heatmap_json(hm)
    assert j["width"] == img.size[0] and j["height"] == img.size[1] and len(j["heatmap"]) == img.size[1]
    assert len(j["heatmap"][0]) == img.size[0] and j["heatmap"][150][150] == 1.0
    js = heatmap_json(hm, max_side=64)
    assert max(js["width"], js["height"]) == 64 and js["image_width"] == img.size[0]
    lut = colormap_lut("turbo")
    assert lut.shape == (256, 3) and lut[50, 2] > lut[50, 0] and lut[230, 0] > lut[230, 2]   # blue → red
    assert blend(np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2)), alpha=0.0).max() == 0


# -- occlusion -------------------------------------------------------------------------------------
def test_occlusion_positions_cover_the_side():
    from retrieval.explain.occlusion import occlusion_positions

    assert occlusion_positions(224, 81, 40) == [0, 40, 80, 120, 143]
    assert occlusion_positions(10, 20, 5) == [0]
    for side, win, stride in ((224, 81, 40), (224, 112, 56), (97, 30, 15)):
        pos = occlusion_positions(side, win, stride)
        covered = np.zeros(side, bool)
        for p in pos:
            covered[p:p + win] = True
        assert covered.all() and pos[-1] + win == side


@pytest.mark.parametrize("fill", ["mean", "blur"])
def test_occlusion_highlights_planted_object(effnet, composite, fill):
    from retrieval.explain.config import AttributionConfig

    obj, canvas, mask = composite
    q = effnet.encode_images([obj])[0]
    cfg = AttributionConfig(occlusion_fill=fill)
    hm = attribute(effnet, canvas, q, "occlusion", cfg)
    assert hm.shape == (360, 480) and hm.dtype == np.float32 and hm.max() == pytest.approx(1.0)
    inside, outside = _contrast(hm, mask)
    assert inside > 4 * outside, (inside, outside)
    y, x = np.unravel_index(np.argmax(hm), hm.shape)
    assert mask[y, x]
    np.testing.assert_array_equal(hm, attribute(effnet, canvas, q, "occlusion", cfg))


def test_occlusion_map_is_the_measured_drop(effnet, photos):
    """Each grid value is the mean cosine drop of the windows covering it: check one window by hand."""
    from retrieval.explain.config import AttributionConfig
    from retrieval.explain.occlusion import occlusion_map

    img = photos["coffee"]
    q = effnet.encode_images([photos["chelsea"]])[0]
    cfg = AttributionConfig(occlusion_window=0.5, occlusion_stride=1.0)      # 4 disjoint 112-px windows
    grid = occlusion_map(effnet, img, q, cfg)
    assert grid.shape == (224, 224)
    x = effnet.to_batch([img])
    colour = tuple(int(c) for c in np.asarray(img).reshape(-1, 3).mean(axis=0).astype(np.uint8))
    fill = effnet.to_batch([Image.new("RGB", img.size, colour)])
    x2 = x.clone()
    x2[..., 112:, :112] = fill[..., 112:, :112]                             # bottom-left window
    drop = float(effnet.encode_images(x)[0] @ q - effnet.encode_images(x2)[0] @ q)
    assert grid[150, 50] == pytest.approx(max(drop, 0.0), abs=1e-4)
    assert np.unique(np.round(grid[112:, :112], 6)).size == 1


def test_conse_occlusion_text_query(conse, composite):
    obj, canvas, mask = composite
    q = conse.encode_texts(["a photo of a cat"])[0]
    hm = attribute(conse, canvas, q, "occlusion")
    inside, outside = _contrast(hm, mask)
    assert hm.shape == (360, 480) and inside > 4 * outside, (inside, outside)


def test_occlusion_rejects_unknown_fill(effnet, photos):
    from retrieval.explain.config import AttributionConfig

    with pytest.raises(InvalidQueryError):
        attribute(effnet, photos["coffee"], effnet.encode_images([photos["coffee"]])[0], "occlusion",
                  AttributionConfig(occlusion_fill="noise"))


# -- the deletion benchmark's masks ------------------------------------------------------------------
def test_deletion_benchmark_masks_have_exactly_the_area():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_attribution as ba

    rng = np.random.default_rng(0)
    shape, box = (300, 400), (68.75, 18.75, 331.25, 281.25)
    n = round(0.2 * 300 * 400)
    rnd = ba.random_mask(shape, box, rng)
    assert rnd.sum() == n and rnd[:, :68].sum() == 0 and rnd[:, 332:].sum() == 0
    heat = np.zeros(shape)
    heat[100:150, 150:250] = 1.0
    heat[150:160, 150:250] = 0.5
    top = ba.top_mask(heat, box, rng)
    assert top.sum() == n and top[100:160, 150:250].all() and top[:, :68].sum() == 0
    # the zero-heat remainder is masked in 16-px blocks, like the random baseline (not scattered pixels)
    rest = top.copy()
    rest[100:160, 150:250] = False
    ys, xs = np.nonzero(rest)
    assert len(np.unique(np.stack([(ys - 19) // 16, (xs - 69) // 16]), axis=1).T) <= rest.sum() / 200
    centre, disc = ba.discs(shape, box, rng)
    assert abs(int(centre.sum()) - n) < 0.01 * n and abs(int(disc.sum()) - n) < 0.01 * n


def test_gradinput_layers(effnet, conse, composite):
    from retrieval.explain.attribution import attribute_grid
    from retrieval.explain.config import AttributionConfig

    obj, canvas, mask = composite
    q = effnet.encode_images([obj])[0]
    fine = attribute_grid(effnet, canvas, q, "gradinput", AttributionConfig(cnn_layers=("input",)))
    coarse = attribute_grid(effnet, canvas, q, "gradinput", AttributionConfig(cnn_layers=(5,)))
    assert fine.shape == (224, 224) and coarse.shape == (7, 7) and fine.min() >= 0 and fine.max() > 0
    with pytest.raises(InvalidQueryError):
        attribute_grid(effnet, canvas, q, "gradinput", AttributionConfig(cnn_layers=(9,)))
    tq = conse.encode_texts(["a photo of a cat"])[0]
    hm = attribute(conse, canvas, tq, "gradinput")                   # through the ConSE combination
    inside, outside = _contrast(hm, mask)
    assert hm.shape == (360, 480) and inside > 4 * outside, (inside, outside)


def test_integrated_gradients_completeness_and_localisation(effnet, conse, composite):
    """Integrated gradients: the signed input attributions sum to f(image) - f(baseline) (the
    method's completeness axiom, checked against the encoder's own forward pass), the batched path
    equals a step-by-step reference, and the planted object lights up for image and text queries."""
    from retrieval.explain.attribution import attribute_grid
    from retrieval.explain.cnn import _integrated_maps
    from retrieval.explain.config import AttributionConfig, fill_image

    obj, canvas, mask = composite
    q = effnet.encode_images([obj])[0]
    x = effnet.to_batch([canvas])
    base_img = fill_image(canvas, "mean")
    base = effnet.to_batch([base_img])
    signed = _integrated_maps(effnet, effnet.model, x, base, q, ("input",), steps=48, relu=False)[0]
    gap = float(effnet.encode_images([canvas])[0] @ q - effnet.encode_images([base_img])[0] @ q)
    assert signed.shape == (224, 224) and gap > 0.1
    assert float(signed.sum()) == pytest.approx(gap, rel=0.05)
    # step-by-step reference of the midpoint rule (one gradient per path point)
    steps, total = 4, torch.zeros_like(x)
    qt = torch.as_tensor(q)
    for s in range(steps):
        xi = (base + (s + 0.5) / steps * (x - base)).requires_grad_(True)
        with torch.enable_grad():
            v = effnet.model.forward_head(effnet.model.forward_features(xi), pre_logits=True)
            (torch.nn.functional.normalize(v, dim=-1)[0] @ qt).backward()
        total += xi.grad
    ref = ((total / steps) * (x - base)).sum(dim=1)[0].numpy()
    got = _integrated_maps(effnet, effnet.model, x, base, q, ("input",), steps=steps, relu=False)[0]
    np.testing.assert_allclose(got, ref, atol=1e-6 * float(np.abs(ref).max()) + 1e-9, rtol=1e-3)
    hm = attribute(effnet, canvas, q, "integrated")
    inside, outside = _contrast(hm, mask)
    assert hm.shape == (360, 480) and inside > 4 * outside, (inside, outside)
    np.testing.assert_array_equal(hm, attribute(effnet, canvas, q, "integrated"))
    two = attribute_grid(effnet, canvas, q, "integrated", AttributionConfig(ig_layers=("input", 1), ig_steps=2))
    assert two.shape == (224, 224) and two.min() >= 0
    with pytest.raises(InvalidQueryError):
        attribute_grid(effnet, canvas, q, "integrated", AttributionConfig(ig_layers=(9,)))
    with pytest.raises(InvalidQueryError):
        attribute_grid(effnet, canvas, q, "integrated", AttributionConfig(ig_baseline="noise"))
    tq = conse.encode_texts(["a photo of a cat"])[0]
    hm = attribute(conse, canvas, tq, "integrated")                   # through the ConSE combination
    inside, outside = _contrast(hm, mask)
    assert inside > 4 * outside, (inside, outside)


def test_deletion_benchmark_seen_area_and_inpainting():
    """Issue 19's protocol options: masks sized to 20 % of the part the encoder sees, and a fill that
    inpaints the masked pixels from their border (harmonic: a linear ramp is rebuilt, the rest untouched)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_attribution as ba

    rng = np.random.default_rng(0)
    shape, box = (300, 400), (68.75, 18.75, 331.25, 281.25)
    seen = ba._inside(shape, box).sum()
    n = round(0.2 * seen)
    assert n < round(0.2 * 300 * 400)
    assert ba.random_mask(shape, box, rng, area="seen").sum() == n
    heat = np.zeros(shape)
    heat[100:150, 150:250] = 1.0
    assert ba.top_mask(heat, box, rng, area="seen").sum() == n
    centre, _ = ba.discs(shape, box, rng, area="seen")
    assert abs(int(centre.sum()) - n) < 0.01 * n
    with pytest.raises(ValueError):
        ba.mask_size(shape, box, area="crop")
    ramp = np.repeat(np.repeat(np.linspace(10, 240, 400)[None, :, None], 300, 0), 3, 2).round().astype(np.uint8)
    hole = np.zeros(shape, bool)
    hole[100:180, 120:260] = True
    out = np.asarray(ba.apply_mask(Image.fromarray(ramp), hole, "inpaint"))
    assert np.array_equal(out[~hole], ramp[~hole])
    assert np.abs(out[hole].astype(int) - ramp[hole].astype(int)).max() <= 1        # the ramp, not a flat fill
    flat = np.asarray(ba.apply_mask(Image.fromarray(ramp), hole, "mean"))
    assert np.abs(flat[hole].astype(int) - ramp[hole].astype(int)).max() > 30         # the mean fill is flat
