"""``POST /api/uploads`` (issue 17): a query image uploaded once and named by a token afterwards. A request
with the token answers exactly what the same request with the image file answers (search, a box search,
attribution, the pair view); an unknown or expired token is a 404 ``upload_not_found`` that says what to do;
the kept uploads are bounded in count and in bytes (least recently used out) and shown in ``/metrics``."""

from __future__ import annotations

import io

import pytest
from _engine_helpers import build_photo_index, save_photos
from PIL import Image

from server.uploads import UploadCache, UploadNotFoundError


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_clip, photos):
    from retrieval.engine.engine import Engine

    folder = tmp_path_factory.mktemp("upload-photos")
    paths = save_photos(folder, photos, ("astronaut", "coffee", "rocket", "camera", "chelsea", "horse"))
    return Engine(build_photo_index(tmp_path_factory.mktemp("upload-index"), paths, [tiny_clip]), device="cpu")


def _client(engine, **config):
    from server.app import create_app

    return create_app(config, engine=engine).test_client()


@pytest.fixture
def client(engine):
    return _client(engine)


def _jpeg(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def _upload(client, data: bytes, name: str = "q.jpg"):
    return client.post("/api/uploads", data={"image": (io.BytesIO(data), name)}, content_type="multipart/form-data")


def _search(client, *, image: bytes | None = None, **fields):
    if image is None:
        return client.post("/api/search", json=fields)
    form = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()}
    return client.post("/api/search", data={**form, "image": (io.BytesIO(image), "q.jpg")},
                       content_type="multipart/form-data")


def _hits(resp) -> list[tuple[str, float]]:
    assert resp.status_code == 200, resp.get_json()
    return [(r["id"], r["score"]) for r in resp.get_json()["results"]]


def test_upload_answers_a_token_and_the_picture_size(client, photos):
    data = _jpeg(photos["chelsea"])
    resp = _upload(client, data)
    body = resp.get_json()
    assert resp.status_code == 200, body
    assert set(body) == {"upload", "width", "height", "expires_in"}
    assert [body["width"], body["height"]] == list(photos["chelsea"].size)
    assert len(body["upload"]) >= 32 and body["expires_in"] == 1800
    assert _upload(client, data).get_json()["upload"] != body["upload"]       # random, not a content hash
    # an EXIF-rotated JPEG: the upright size (the frame of a box)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _upload(client, _jpeg(photos["coffee"], exif=exif.tobytes())).get_json()
    assert [rotated["width"], rotated["height"]] == [photos["coffee"].height, photos["coffee"].width]
    # JSON with base64 works too
    import base64

    resp = client.post("/api/uploads", json={"image": base64.b64encode(data).decode()})
    assert resp.status_code == 200 and resp.get_json()["width"] == photos["chelsea"].width


def test_a_token_answers_what_the_file_answers(client, photos):
    data = _jpeg(photos["astronaut"].resize((300, 300)))
    token = _upload(client, data).get_json()["upload"]
    plain = _hits(_search(client, image=data, k=5))
    assert _hits(_search(client, upload=token, k=5)) == plain
    # multipart with the token (what the page sends)
    resp = client.post("/api/search", data={"upload": token, "k": "5"}, content_type="multipart/form-data")
    assert _hits(resp) == plain
    # a box (pixels of the uploaded picture) and the next page
    box = [40, 30, 220, 260]
    with_file = _search(client, image=data, k=4, box="40,30,220,260")
    with_token = _search(client, upload=token, k=4, box=box)
    assert _hits(with_token) == _hits(with_file) and with_token.get_json()["box"] == box
    assert _hits(_search(client, upload=token, k=3, offset=2)) == _hits(_search(client, image=data, k=3, offset=2))
    # attribution and the pair view: the same bytes
    rid = plain[1][0]
    png_file = client.post("/api/attribution", data={"image": (io.BytesIO(data), "q.jpg"), "result_id": rid},
                           content_type="multipart/form-data")
    png_token = client.post("/api/attribution", json={"upload": token, "result_id": rid})
    assert png_file.status_code == png_token.status_code == 200 and png_file.mimetype == "image/png"
    assert png_token.data == png_file.data
    pair_file = client.post("/api/attribution/pair", data={"image": (io.BytesIO(data), "q.jpg"), "result_id": rid,
                                                           "format": "json", "max_side": "12"},
                            content_type="multipart/form-data").get_json()
    pair_token = client.post("/api/attribution/pair", json={"upload": token, "result_id": rid, "format": "json",
                                                            "max_side": 12}).get_json()
    assert pair_token == pair_file and pair_token["query"] is not None


@pytest.mark.parametrize("token", ["no-such-token", "x" * 500, 42])
def test_unknown_token_is_a_404_that_says_what_to_do(client, token):
    resp = client.post("/api/search", json={"upload": token, "k": 3})
    body = resp.get_json()
    if not isinstance(token, str):
        assert resp.status_code == 400 and body["error"]["code"] == "bad_request"
        return
    assert resp.status_code == 404 and body["error"]["code"] == "upload_not_found"
    assert "upload the image again" in body["error"]["message"]


def test_expired_token_is_a_404(engine, photos, monkeypatch):
    monkeypatch.setenv("LOUPE_UPLOAD_TTL", "60")
    client = _client(engine)
    token = _upload(client, _jpeg(photos["rocket"])).get_json()["upload"]
    cache = client.application.extensions["loupe"]["uploads"]
    now = [cache.clock()]
    cache.clock = lambda: now[0]
    now[0] += 50
    assert _search(client, upload=token, k=2).status_code == 200       # used: its life starts again
    now[0] += 50
    assert _search(client, upload=token, k=2).status_code == 200
    now[0] += 61
    resp = _search(client, upload=token, k=2)
    assert resp.status_code == 404 and resp.get_json()["error"]["code"] == "upload_not_found"


def test_bad_uploads_are_4xx_json(engine, client, photos, monkeypatch):
    data = _jpeg(photos["rocket"])
    token = _upload(client, data).get_json()["upload"]
    both = client.post("/api/search", data={"upload": token, "image": (io.BytesIO(data), "q.jpg")},
                       content_type="multipart/form-data")
    assert both.status_code == 400 and "not both" in both.get_json()["error"]["message"]
    cases = [
        (_upload(client, b"not an image at all"), 400, "invalid_image"),
        (_upload(client, data[: len(data) // 3]), 400, "invalid_image"),
        (client.post("/api/uploads", data={"k": "3"}, content_type="multipart/form-data"), 400, "bad_request"),
        (client.post("/api/uploads", data={}, content_type="multipart/form-data"), 400, "invalid_query"),
        (client.post("/api/uploads", data="x", content_type="text/plain"), 415, "unsupported_media_type"),
        (_upload(_client(engine, MAX_UPLOAD_BYTES=len(data) - 1), data), 413, "image_too_large"),
    ]
    for resp, status, code in cases:
        body = resp.get_json()
        assert resp.status_code == status and body["error"]["code"] == code, (status, code, body)
    monkeypatch.setenv("LOUPE_MAX_PIXELS", "1000")
    resp = _upload(client, data)
    assert resp.status_code == 413 and resp.get_json()["error"]["code"] == "image_too_large"


def test_the_cache_is_bounded_by_count_and_bytes_lru_first():
    now = [0.0]
    cache = UploadCache(max_count=3, max_bytes=100, ttl=10, clock=lambda: now[0])
    a, b, c = (cache.put(bytes([i]) * 20, 1, 1) for i in range(3))
    cache.get(a)                                   # a is used: b is now the least recently used
    d = cache.put(b"d" * 20, 1, 1)                 # the count bound: b goes
    with pytest.raises(UploadNotFoundError):
        cache.get(b)
    assert [cache.get(t).data[:1] for t in (a, c, d)] == [b"\x00", b"\x02", b"d"]
    assert cache.stats() == (3, 60)
    e = cache.put(b"e" * 70, 1, 1)                 # the byte bound: a and c go (60 + 70 > 100 until 2 are out)
    assert cache.stats() == (2, 90)
    for gone in (a, c):
        with pytest.raises(UploadNotFoundError):
            cache.get(gone)
    assert cache.get(d).data == b"d" * 20 and cache.get(e).data == b"e" * 70
    with pytest.raises(Exception) as too_big:
        cache.put(b"f" * 101, 1, 1)                # larger than the whole cache: refused, nothing evicted
    assert getattr(too_big.value, "http_status", None) == 413 and cache.stats() == (2, 90)
    now[0] += 11                                   # expired entries drop from the count and the bytes
    assert cache.stats() == (0, 0)


def test_the_app_evicts_and_reports_the_cache_in_metrics(engine, photos, monkeypatch):
    monkeypatch.setenv("LOUPE_UPLOADS", "2")
    client = _client(engine)
    datas = [_jpeg(photos[n]) for n in ("astronaut", "coffee", "camera")]
    tokens = [_upload(client, d).get_json()["upload"] for d in datas]
    assert _search(client, upload=tokens[0], k=1).status_code == 404            # the oldest went
    assert all(_search(client, upload=t, k=1).status_code == 200 for t in tokens[1:])
    text = client.get("/metrics").get_data(as_text=True)
    assert "loupe_upload_cache_images 2.0" in text
    assert f"loupe_upload_cache_bytes {float(len(datas[1]) + len(datas[2]))}" in text
    monkeypatch.setenv("LOUPE_UPLOADS", "64")
    monkeypatch.setenv("LOUPE_UPLOADS_MB", str(len(datas[0]) * 1.5 / (1 << 20)))
    client = _client(engine)                       # the byte bound: one picture at a time
    first, second = (_upload(client, datas[0]).get_json()["upload"] for _ in range(2))
    assert _search(client, upload=first, k=1).status_code == 404
    assert _search(client, upload=second, k=1).status_code == 200


def test_a_box_query_is_explained_on_its_crop(client, photos):
    """The overlays of a box search explain what was searched (the box's crop), not the whole picture."""
    img = photos["astronaut"].convert("RGB").resize((240, 240))
    crop = img.crop((30, 20, 150, 200))

    def png(image):
        buf = io.BytesIO()
        image.save(buf, "PNG")
        return buf.getvalue()

    token = _upload(client, png(img)).get_json()["upload"]
    rid = _hits(_search(client, upload=token, k=2, box=[30, 20, 150, 200]))[1][0]

    def heat(**fields):
        resp = client.post("/api/attribution", json={"result_id": rid, "format": "json", "max_side": 12, **fields})
        assert resp.status_code == 200, resp.get_json()
        return resp.get_json()["heatmap"]

    import base64

    boxed = heat(upload=token, box=[30, 20, 150, 200])
    assert boxed == heat(image=base64.b64encode(png(crop)).decode())
    assert boxed != heat(upload=token)
