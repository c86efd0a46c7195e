"""The HTTP API through ``create_app(...).test_client()``: search, uploads, images, errors, metrics."""

from __future__ import annotations

import base64
import io
import json
import threading

import numpy as np
import pytest
from _engine_helpers import build_photo_index, png_bytes
from PIL import Image

from retrieval.engine.engine import Engine
from server.app import create_app


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, tiny_clip, photos):
    folder = tmp_path_factory.mktemp("server-photos")
    paths = []
    for i, (name, img) in enumerate(photos.items()):
        p = folder / (f"{name}.png" if i % 2 == 0 else f"{name}.jpg")
        img.save(p)
        paths.append(p)
    return build_photo_index(tmp_path_factory.mktemp("server-index"), paths, [tiny_clip], shard_sizes=None)


@pytest.fixture(scope="module")
def engine(index_dir):
    return Engine(index_dir, device="cpu")


@pytest.fixture(scope="module")
def app(engine):
    return create_app({"TESTING": False}, engine=engine)


@pytest.fixture
def client(app):
    return app.test_client()


def _id_of(engine, caption):
    for ids, table in zip(engine.records.shard_ids, engine.records.tables):
        for i, cap in zip(ids, table.column("caption").to_pylist()):
            if cap == caption:
                return i
    raise KeyError(caption)


def _assert_error(resp, status, code=None):
    assert resp.status_code == status, resp.get_data(as_text=True)
    body = resp.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["message"] and "Traceback" not in resp.get_data(as_text=True)
    if code:
        assert body["error"]["code"] == code
    return body


# -- happy paths -----------------------------------------------------------------------------------
def test_healthz(client, engine):
    body = client.get("/healthz").get_json()
    assert body["status"] == "ok" and body["images"] == engine.count
    assert "search" in body["features"] and "text" in body["features"]
    assert body["text_encoder"] == "test-clip-tiny"


def test_search_text_json(client, engine):
    resp = client.post("/api/search", json={"text": "a cat", "k": 5})
    assert resp.status_code == 200
    body = resp.get_json()
    assert len(body["results"]) == 5 and body["encoder"] == "test-clip-tiny" and body["took_ms"] >= 0
    r = body["results"][0]
    assert {"id", "score", "path", "caption", "metadata", "image_url", "attribution_url"} <= set(r)
    assert r["image_url"] == f"/api/images/{r['id']}"
    ref = engine.search(text="a cat", k=5)
    assert [x["id"] for x in body["results"]] == ref.ids


def test_search_weighted_terms_filter_and_dedup(client, engine):
    terms = ["+a cat", "-a dog", "0.5:snow"]
    body = client.post("/api/search", json={"text": terms, "k": 3}).get_json()
    assert [r["id"] for r in body["results"]] == engine.search(text=terms, k=3).ids
    form = client.post("/api/search", data={"text": terms, "k": "3"}, content_type="multipart/form-data").get_json()
    assert [r["id"] for r in form["results"]] == [r["id"] for r in body["results"]]
    body = client.post("/api/search", json={"text": "a photo", "filter": {"caption": {"contains": "co"}},
                                            "dedup": True}).get_json()
    assert body["results"] and all("co" in r["caption"] for r in body["results"])


def test_search_image_json_base64_and_multipart(client, engine, photos):
    data = png_bytes(photos["astronaut"])
    target = _id_of(engine, "astronaut")
    for payload in ({"image": base64.b64encode(data).decode()},
                    {"image": "data:image/png;base64," + base64.b64encode(data).decode()}):
        body = client.post("/api/search", json={**payload, "k": 3}).get_json()
        assert body["results"][0]["id"] == target
    resp = client.post("/api/search", data={"image": (io.BytesIO(data), "q.png"), "k": "4", "rerank": "false"},
                       content_type="multipart/form-data")
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["results"][0]["id"] == target and len(body["results"]) == 4
    # instruction next to an image, and more-like-this by id
    body = client.post("/api/search", data={"image": (io.BytesIO(data), "q.png"), "instruction": "at night",
                                            "text": ""}, content_type="multipart/form-data").get_json()
    assert body["results"]
    body = client.post("/api/search", json={"image_id": target, "k": 2}).get_json()
    assert body["results"][0]["id"] == target


def _variants(photos):
    base = photos["astronaut"]
    out = {}
    rgba = base.convert("RGBA")
    rgba.putalpha(255)
    out["RGBA"] = png_bytes(rgba)
    out["P"] = png_bytes(base.convert("P"))
    out["L"] = png_bytes(base.convert("L"))
    arr = np.asarray(base.convert("L"), dtype=np.uint16) * 257
    i16 = Image.new("I;16", base.size)
    i16.frombytes(arr.astype("<u2").tobytes())
    assert i16.mode == "I;16"
    out["I;16"] = png_bytes(i16)
    out["CMYK"] = png_bytes(base.convert("CMYK"), "JPEG", quality=95)
    rotated = base.transpose(Image.Transpose.ROTATE_90)       # stored sideways ...
    exif = Image.Exif()
    exif[0x0112] = 6                                         # ... with "rotate 90° CW to display"
    out["EXIF"] = png_bytes(rotated, "JPEG", quality=95, exif=exif.tobytes())
    out["GIF"] = png_bytes(base.convert("P"), "GIF")
    out["WEBP"] = png_bytes(base, "WEBP")
    return out


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "I;16", "CMYK", "EXIF", "GIF", "WEBP"])
def test_upload_every_image_mode(client, engine, photos, mode):
    data = _variants(photos)[mode]
    resp = client.post("/api/search", data={"image": (io.BytesIO(data), "q.img")}, content_type="multipart/form-data")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    results = resp.get_json()["results"]
    assert results
    if mode in ("RGBA", "EXIF", "CMYK", "WEBP"):   # same picture, upright and in colour
        assert results[0]["id"] == _id_of(engine, "astronaut")


def test_images_and_thumbnails(client, engine, app):
    iid = _id_of(engine, "coffee")
    resp = client.get(f"/api/images/{iid}")
    assert resp.status_code == 200 and resp.mimetype in ("image/png", "image/jpeg")
    assert Image.open(io.BytesIO(resp.data)).size == (engine.metadata(iid)["width"], engine.metadata(iid)["height"])
    cache = app.extensions["loupe"]["thumbnails"]
    hits = cache.hits
    for _ in range(2):
        resp = client.get(f"/api/images/{iid}?size=64")
        assert resp.status_code == 200 and resp.mimetype == "image/jpeg"
        assert max(Image.open(io.BytesIO(resp.data)).size) == 64
    assert cache.hits == hits + 1 and "immutable" in resp.headers["Cache-Control"]
    _assert_error(client.get("/api/images/0123456789abcde"), 404, "not_found")
    _assert_error(client.get("/api/images/..%2F..%2Fetc%2Fpasswd"), 404)
    _assert_error(client.get("/api/images/notanid"), 404)
    for bad in ("0", "abc", "99999", "-5"):
        _assert_error(client.get(f"/api/images/{iid}?size={bad}"), 400)


def test_metrics(client, engine):
    client.post("/api/search", json={"text": "a cat"})
    client.post("/api/search", json={"k": 3})
    text = client.get("/metrics").get_data(as_text=True)
    assert 'loupe_http_requests_total{endpoint="/api/search",method="POST",status="200"}' in text
    assert 'loupe_http_requests_total{endpoint="/api/search",method="POST",status="400"}' in text
    assert "loupe_http_request_duration_seconds_bucket" in text
    assert f"loupe_index_images {float(engine.count)}" in text
    assert "loupe_index_shards 1.0" in text and "loupe_index_bytes" in text
    assert 'loupe_search_stage_seconds_count{stage="embed"}' in text


def test_index_page(client):
    resp = client.get("/")
    assert resp.status_code == 200 and b"<title>Loupe" in resp.data
    assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200


# -- errors ----------------------------------------------------------------------------------------
BAD_JSON = [
    ("{", "invalid_json"),
    ("[1, 2]", "invalid_json"),
    ('"text"', "invalid_json"),
    ("", "invalid_json"),
    ("{}", "invalid_query"),
    ('{"k": 5}', "invalid_query"),
    ('{"text": 5}', "bad_request"),
    ('{"text": ["a", 3]}', "bad_request"),
    ('{"text": []}', "bad_request"),
    ('{"text": "x", "k": 0}', "invalid_query"),
    ('{"text": "x", "k": 1001}', "invalid_query"),
    ('{"text": "x", "k": "ten"}', "bad_request"),
    ('{"text": "x", "k": true}', "bad_request"),
    ('{"text": "x", "k": 2.5}', "bad_request"),
    ('{"text": "x", "rerank": "yes"}', "bad_request"),
    ('{"text": "x", "filter": [1]}', "bad_request"),
    ('{"text": "x", "filter": {"width": {"near": 3}}}', "invalid_query"),
    ('{"text": "x", "encoder": 5}', "bad_request"),
    ('{"text": "x", "weight": "heavy"}', "bad_request"),
    ('{"image": 123}', "bad_request"),
    ('{"image": "***not base64***"}', "invalid_image"),
    ('{"image": "aGVsbG8gd29ybGQ="}', "invalid_image"),
    ('{"image": "http://169.254.169.254/latest/meta-data"}', "bad_request"),
    ('{"image_url": "http://example.com/a.jpg"}', "bad_request"),
    ('{"text": "x", "instruction": 7}', "bad_request"),
    ('{"vector": [1, "a"]}', "bad_request"),
    ('{"vector": [1, 2]}', "invalid_query"),
    ('{"text": "   "}', "invalid_query"),
    ('{"instruction": "at night"}', "invalid_query"),
]


@pytest.mark.parametrize("body,code", BAD_JSON)
def test_bad_json_requests_are_4xx_json(client, body, code):
    resp = client.post("/api/search", data=body, content_type="application/json")
    _assert_error(resp, 400, code)


def test_unknown_ids_and_encoders(client):
    _assert_error(client.post("/api/search", json={"image_id": "0123456789abcde"}), 404, "not_found")
    _assert_error(client.post("/api/search", json={"image_id": "nope"}), 404, "not_found")
    _assert_error(client.post("/api/search", json={"text": "x", "encoder": "clip-vit-l-14"}), 400, "unknown_encoder")


def test_non_image_and_oversized_uploads(engine):
    app = create_app({"MAX_UPLOAD_BYTES": 2000}, engine=engine)
    client = app.test_client()
    resp = client.post("/api/search", data={"image": (io.BytesIO(b"just some text, not an image"), "x.txt")},
                       content_type="multipart/form-data")
    _assert_error(resp, 400, "invalid_image")
    resp = client.post("/api/search", data={"image": (io.BytesIO(b""), "empty.png")},
                       content_type="multipart/form-data")
    _assert_error(resp, 400, "invalid_image")
    big = b"\x89PNG" + bytes(5000)
    resp = client.post("/api/search", data={"image": (io.BytesIO(big), "big.png")}, content_type="multipart/form-data")
    assert resp.status_code == 413 and resp.get_json()["error"]["code"] in ("payload_too_large", "image_too_large")
    resp = client.post("/api/search", json={"image": base64.b64encode(bytes(2500)).decode()})
    assert resp.status_code == 413
    resp = client.post("/api/search", data=json.dumps({"image": base64.b64encode(bytes(2_000_000)).decode()}),
                       content_type="application/json")
    _assert_error(resp, 413, "payload_too_large")


def test_default_upload_limit_is_20_mb(client, app):
    assert app.config["MAX_UPLOAD_BYTES"] == 20 * 1024 * 1024


def test_truncated_image_and_bad_multipart_fields(client, photos):
    data = png_bytes(photos["coffee"])[:500]
    _assert_error(client.post("/api/search", data={"image": (io.BytesIO(data), "t.png")},
                              content_type="multipart/form-data"), 400, "invalid_image")
    good = png_bytes(photos["coffee"])
    for field, value in (("k", "abc"), ("k", "0"), ("rerank", "maybe"), ("filter", "{bad"), ("weight", "2")):
        resp = client.post("/api/search", data={"image": (io.BytesIO(good), "q.png"), field: value},
                           content_type="multipart/form-data")
        _assert_error(resp, 400)


def test_methods_and_unknown_routes(client):
    _assert_error(client.get("/api/search"), 405, "method_not_allowed")
    _assert_error(client.get("/api/nothing-here"), 404, "not_found")
    _assert_error(client.put("/healthz"), 405)


def test_garbage_never_gives_500(client):
    rng = np.random.default_rng(0)
    types = ["application/json", "multipart/form-data", "multipart/form-data; boundary=xyz",
             "application/x-www-form-urlencoded", "text/plain", "image/png", None]
    for i in range(60):
        body = rng.integers(0, 256, int(rng.integers(0, 400))).astype(np.uint8).tobytes()
        if i % 3 == 0:
            body = b'{"text": ' + body + b"}"
        ctype = types[i % len(types)]
        resp = client.post("/api/search", data=body, content_type=ctype) if ctype else \
            client.post("/api/search", data=body)
        assert 400 <= resp.status_code < 500, (ctype, body[:40], resp.status_code)
        assert resp.is_json and "error" in resp.get_json()
    for path in ("/api/images/%00", "/api/images/" + "f" * 300, "/api/search?k=-1"):
        assert client.get(path).status_code < 500


def test_unexpected_errors_are_json_500_without_traceback(engine):
    app = create_app(engine=engine)

    @app.get("/boom")
    def boom():
        raise RuntimeError("secret internal detail")

    resp = app.test_client().get("/boom")
    body = _assert_error(resp, 500, "internal_error")
    assert "secret" not in body["error"]["message"]


def test_concurrent_requests_share_one_model(app, engine):
    errors, codes = [], []

    def worker(i):
        try:
            c = app.test_client()
            for j in range(5):
                r = c.post("/api/search", json={"text": f"query {i} {j}", "k": 3})
                codes.append(r.status_code)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and codes == [200] * 40
    assert len(engine.embedder.encoders) == 1


def test_no_index_is_503_json():
    client = create_app().test_client()
    assert client.get("/healthz").status_code == 503
    _assert_error(client.post("/api/search", json={"text": "x"}), 503, "no_index")


def test_server_picks_up_a_reindexed_directory(tmp_path):
    import time as _time

    from _engine_helpers import build_index, unit

    from retrieval.index import store, vector_files

    vecs = unit(np.random.default_rng(0).standard_normal((20, 8)))
    out = build_index(tmp_path / "idx", {"e": vecs[:10]})
    app = create_app({"RELOAD_INTERVAL": 0.01}, engine=Engine(out))
    client = app.test_client()
    assert client.get("/healthz").get_json()["images"] == 10
    # a second indexing run adds a shard and replaces the manifest
    rows = [{"id": store.int_to_id(1000 + i), "source": f"new{i}"} for i in range(10)]
    import faiss

    ix = faiss.IndexFlatIP(8)
    ix.add(vecs[10:])
    store.write_metadata(out, store.shard_name(1), rows)
    vector_files.write_vectors(out, "e", store.shard_name(1), ix)
    m = store.read_manifest(out)
    m.shards.append(store.ShardEntry(store.shard_name(1), 10))
    _time.sleep(0.05)
    store.write_manifest(out, m)
    _time.sleep(0.05)
    client.get("/healthz")             # triggers the check
    assert client.get("/healthz").get_json()["images"] == 20
    body = client.post("/api/search", json={"vector": vecs[15].tolist(), "k": 1}).get_json()
    assert body["results"][0]["id"] == store.int_to_id(1005)
    assert "loupe_index_images 20.0" in client.get("/metrics").get_data(as_text=True)


def test_attribution_url_when_feature_present(client, app):
    body = client.post("/api/search", json={"text": "a cat", "k": 1}).get_json()
    url = body["results"][0]["attribution_url"]
    if "attribution" not in app.extensions["loupe"]["features"]:
        assert url is None
        return
    assert url == "/api/attribution"          # POST the query + result_id there
