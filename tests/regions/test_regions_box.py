"""A query box: validated (400s naming the problem), and searching it equals searching the cropped picture."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from regions_data import PLANTED, png_bytes, poster

from retrieval.engine import SearchRequest
from retrieval.errors import InvalidQueryError
from retrieval.regions.box import check_box_in_image, crop_to_box, parse_box


@pytest.mark.parametrize("box, words", [
    ([1, 2, 3], "four numbers"), ("1,2,x,4", "four numbers"), ([0, 0, float("inf"), 5], "finite"),
    ([-1, 0, 5, 5], "negative"), ([5, 0, 5, 9], "no area"), ([0, 9, 5, 3], "no area"), ([0, 0, True, 4], "finite")])
def test_box_syntax_is_checked_by_the_request(box, words):
    with pytest.raises(InvalidQueryError, match=words):
        SearchRequest(image=b"\x89PNG", box=box)


def test_box_needs_an_image_and_parses_strings():
    with pytest.raises(InvalidQueryError, match="box needs an image"):
        SearchRequest(text="a cat", box=[0, 0, 4, 4])
    with pytest.raises(InvalidQueryError, match="regions needs an image"):
        SearchRequest(text="a cat", regions=True)
    assert parse_box("10, 20,30,40") == (10, 20, 30, 40) == parse_box("[10,20,30,40]")
    assert check_box_in_image((0, 0, 600, 400), (600, 400)) == (0, 0, 600, 400)
    with pytest.raises(InvalidQueryError, match=r"outside the query image \(600x400 pixels\)"):
        check_box_in_image((0, 0, 601, 400), (600, 400))


def test_api_box_errors_are_400s_naming_the_problem(region_engine, photos):
    from server.app import create_app

    client = create_app({"TESTING": False}, engine=region_engine).test_client()
    image = base64.b64encode(png_bytes(poster(photos))).decode()
    cases = [([0, 0, 700, 100], "outside the query image (600x400 pixels)"), ([1, 2, 3], "four numbers"),
             ([10, 10, 10, 50], "no area"), ("a,b,c,d", "four numbers"), ([-5, 0, 10, 10], "negative")]
    for box, words in cases:
        resp = client.post("/api/search", json={"image": image, "box": box, "k": 3})
        assert resp.status_code == 400, (box, resp.get_json())
        assert words in resp.get_json()["error"]["message"]
    resp = client.post("/api/search", json={"text": "a cat", "box": [0, 0, 5, 5]})
    assert resp.status_code == 400 and "needs an image" in resp.get_json()["error"]["message"]
    ok = client.post("/api/search", json={"image": image, "box": list(PLANTED), "k": 3})
    assert ok.status_code == 200 and ok.get_json()["box"] == list(PLANTED)
    # a multipart form sends the box as a string
    form = client.post("/api/search", data={"image": (__import__("io").BytesIO(png_bytes(poster(photos))), "q.png"),
                                            "box": "330,120,480,240", "k": "3"}, content_type="multipart/form-data")
    assert form.status_code == 200 and form.get_json()["box"] == list(PLANTED)


def test_box_search_equals_searching_the_cropped_picture(region_engine, photos):
    picture = poster(photos)
    for box in (PLANTED, (0, 0, 300, 400), (12.5, 40, 599, 399.5)):
        got = region_engine.search(image=png_bytes(picture), box=list(box), k=5)
        want = region_engine.search(image=png_bytes(crop_to_box(picture, box)), k=5)
        assert got.ids == want.ids
        assert np.allclose([h.score for h in got.hits], [h.score for h in want.hits], atol=1e-5)
        assert np.allclose(got.query.vector, want.query.vector, atol=1e-6)
        whole = region_engine.search(image=png_bytes(picture), k=5)
        assert not np.allclose(got.query.vector, whole.query.vector, atol=1e-3)   # not the whole picture


def test_box_of_an_indexed_image_id(region_engine, photos):
    target = region_engine.search(image=png_bytes(photos["astronaut"]), k=1).hits[0].id
    got = region_engine.search(image_id=target, box=[0, 0, 256, 256], k=3)
    want = region_engine.search(image=png_bytes(photos["astronaut"].crop((0, 0, 256, 256))), k=3)
    assert got.ids == want.ids and got.box == (0, 0, 256, 256)
    with pytest.raises(InvalidQueryError, match="outside"):
        region_engine.search(image_id=target, box=[0, 0, 513, 10])


def test_box_of_a_reduced_upload_is_in_original_pixels(region_engine, photos):
    """A large upload is decoded reduced; the box still counts the original's pixels."""
    big = photos["coffee"].resize((2400, 1600), __import__("PIL").Image.BICUBIC)
    buf = __import__("io").BytesIO()
    big.save(buf, format="JPEG", quality=95)
    box = (1200, 400, 2200, 1400)
    got = region_engine.search(image=buf.getvalue(), box=list(box), k=3)
    assert got.box == box
    want = region_engine.search(image=png_bytes(big.crop(box)), k=3)
    assert got.ids == want.ids
    assert float(got.query.vector @ want.query.vector) > 0.97
    with pytest.raises(InvalidQueryError, match="2400x1600"):
        region_engine.search(image=buf.getvalue(), box=[0, 0, 2401, 10])
