"""Search by region on the web page (issue 17), in a real headless browser: a box dragged on the shown
(scaled) query picture is sent in the picture's own pixels and answers what the API's box search answers;
the box is in the URL (Back / Forward restore it); "Find objects" draws the response's regions on the query
and a click on one shows that region's results; a region-index hit shows its box on its thumbnail; the
uploaded picture is sent once (``POST /api/uploads``) and the search, the overlays and the pair view send its
token, not the picture.

``LOUPE_SCREENSHOTS=DIR`` keeps screenshots (checked by eye)."""

from __future__ import annotations

import io
import json
import re
from urllib.parse import parse_qs, urlparse

import pytest
from _page_site import served_site, shot
from PIL import Image

pytestmark = [pytest.mark.browser, pytest.mark.slow]
W, H = 640, 440          # the uploaded query: shown at most 360 x 260 CSS pixels, so scaled down


@pytest.fixture(scope="module")
def site(tmp_path_factory, photos):
    for url, app, _engine, paths in served_site(tmp_path_factory, photos):
        yield url, app.test_client(), paths


@pytest.fixture(scope="module")
def query(photos) -> bytes:
    """A picture in which the coffee cup is a small part: the grass, with the coffee pasted on the right."""
    back = photos["grass"].convert("RGB").resize((W, H))
    cup = photos["coffee"].convert("RGB").resize((220, 160))
    back.paste(cup, (380, 220))
    buf = io.BytesIO()
    back.save(buf, "JPEG", quality=92)
    return buf.getvalue()


def _file(data: bytes) -> dict:
    return {"name": "query.jpg", "mimeType": "image/jpeg", "buffer": data}


def _api(client, data: bytes, **fields) -> dict:
    form = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()}
    r = client.post("/api/search", data={**form, "image": (io.BytesIO(data), "q.jpg")},
                    content_type="multipart/form-data")
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def _ids(page) -> list[str]:
    return page.eval_on_selector_all("#results .result", "els => els.map(e => e.dataset.id)")


def _settled(page):
    page.wait_for_function("() => !document.body.classList.contains('loading') && "
                           "document.querySelectorAll('#results .result').length > 0", timeout=120000)


def _wait_ids(page, want: list[str], timeout=60000):
    """Wait until the grid shows ``want`` (in order); on a timeout, say what it shows and the error box."""
    text = json.dumps(json.dumps(want, separators=(",", ":")))        # as JSON.stringify writes it
    try:
        page.wait_for_function(f"() => JSON.stringify([...document.querySelectorAll('#results .result')]"
                               f".map(e => e.dataset.id)) === {text}", timeout=timeout)
    except Exception as exc:
        raise AssertionError(f"{_ids(page)} != {want}; error box: {page.text_content('#error')!r}; "
                             f"status: {page.text_content('#status')!r}") from exc


def _params(page) -> dict:
    return {k: v[0] for k, v in parse_qs(urlparse(page.url).query).items()}


def _form(request) -> dict[str, str]:
    """The text fields of a multipart request (and ``image`` = its byte count when a file was sent)."""
    raw = request.post_data_buffer or b""
    out = {}
    for m in re.finditer(rb'name="([^"]+)"(?:; filename="[^"]*")?(?:\r\nContent-Type: [^\r]*)?\r\n\r\n(.*?)\r\n--',
                         raw, re.S):
        name, value = m.group(1).decode(), m.group(2)
        out[name] = str(len(value)) if name == "image" else value.decode("utf-8", "replace")
    return out


def _new_page(browser, **kw):
    page = browser.new_page(viewport={"width": 1100, "height": 800}, **kw)
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return page, errors


def _drag(page, rect, a, b):
    """Drag from a to b, given as fractions of the shown query picture."""
    page.mouse.move(rect["x"] + a[0] * rect["width"], rect["y"] + a[1] * rect["height"])
    page.mouse.down()
    for t in (0.3, 0.7, 1.0):
        page.mouse.move(rect["x"] + (a[0] + (b[0] - a[0]) * t) * rect["width"],
                        rect["y"] + (a[1] + (b[1] - a[1]) * t) * rect["height"])
    page.mouse.up()


def test_drawing_a_box_searches_that_part_in_the_pictures_pixels(browser, site, query):
    url, client, _ = site
    page, errors = _new_page(browser)
    searches = []
    page.on("request", lambda r: searches.append(_form(r)) if r.url.endswith("/api/search") else None)
    try:
        page.goto(url + "/")
        page.wait_for_function("() => document.querySelector('#hint').textContent.includes('images')")
        page.set_input_files("#file", files=[_file(query)])
        _settled(page)
        whole = _api(client, query, k=40)
        assert _ids(page) == [r["id"] for r in whole["results"]]
        assert "image" not in searches[-1] and searches[-1].get("upload")        # the token, not the picture
        rect = page.locator("#query-thumb").bounding_box()
        assert rect["width"] < W * 0.7                                           # shown scaled down
        # drag over the pasted cup (CSS pixels of the shown picture) -> pixels of the uploaded picture
        a, b = (380 / W, 220 / H), (600 / W, 380 / H)
        _drag(page, rect, a, b)
        page.wait_for_function("() => new URLSearchParams(location.search).has('box')")
        _settled(page)
        sent = [float(v) for v in searches[-1]["box"].split(",")]
        want = [a[0] * W, a[1] * H, b[0] * W, b[1] * H]
        assert max(abs(s - w) for s, w in zip(sent, want)) <= 2, (sent, want)
        assert _params(page)["box"] == searches[-1]["box"]
        boxed = _api(client, query, k=40, box=searches[-1]["box"])
        assert boxed["box"] == [int(round(v)) for v in sent]
        assert _ids(page) == [r["id"] for r in boxed["results"]] != [r["id"] for r in whole["results"]]
        assert page.is_visible("#query-boxes .user-box") and page.is_visible("#clear-box")
        ub = page.locator("#query-boxes .user-box").bounding_box()              # drawn where it was dragged
        assert abs(ub["x"] - (rect["x"] + a[0] * rect["width"])) <= 3
        assert abs(ub["width"] - (b[0] - a[0]) * rect["width"]) <= 4
        shot(page, "page-region-box.png")
        # Back: the whole picture; Forward: the box again, drawn, with its results
        page.go_back()
        page.wait_for_function("() => !new URLSearchParams(location.search).has('box')")
        _settled(page)
        _wait_ids(page, [r["id"] for r in whole["results"]])
        assert page.locator("#query-boxes .user-box").count() == 0 and page.is_hidden("#clear-box")
        page.go_forward()
        page.wait_for_function("() => new URLSearchParams(location.search).has('box')")
        _settled(page)
        page.wait_for_selector("#query-boxes .user-box")
        assert _ids(page) == [r["id"] for r in boxed["results"]]
        assert searches[-1]["box"] == _params(page)["box"] and "image" not in searches[-1]
        # the clear button (and Escape) drop the box, keeping the picture
        page.click("#clear-box")
        page.wait_for_function("() => !new URLSearchParams(location.search).has('box')")
        _settled(page)
        assert page.is_visible("#image-query") and page.locator("#query-boxes .user-box").count() == 0
        _drag(page, rect, (0.1, 0.1), (0.5, 0.6))
        page.wait_for_function("() => new URLSearchParams(location.search).has('box')")
        page.keyboard.press("Escape")
        page.wait_for_function("() => !new URLSearchParams(location.search).has('box')")
        assert page.is_visible("#image-query")
        assert not errors, errors
    finally:
        page.close()


def test_a_box_drawn_by_touch(browser, site, query):
    """A finger drag (real touch events, turned into pointer events by the browser) draws a box too."""
    url, client, _ = site
    context = browser.new_context(viewport={"width": 800, "height": 900}, has_touch=True, is_mobile=True)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(url + "/")
        page.wait_for_function("() => document.querySelector('#hint').textContent.includes('images')")
        page.set_input_files("#file", files=[_file(query)])
        _settled(page)
        rect = page.locator("#query-thumb").bounding_box()
        cdp = context.new_cdp_session(page)
        a, b = (0.55, 0.45), (0.95, 0.9)
        points = [(a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t) for t in (0, 0.3, 0.6, 1.0)]
        for i, (fx, fy) in enumerate(points):
            kind = "touchStart" if i == 0 else "touchMove"
            cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": [
                {"x": rect["x"] + fx * rect["width"], "y": rect["y"] + fy * rect["height"]}]})
        with page.expect_request(lambda r: r.url.endswith("/api/search")) as req:
            cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
        box = _form(req.value)["box"]
        sent = [float(v) for v in box.split(",")]
        want = [a[0] * W, a[1] * H, b[0] * W, b[1] * H]
        assert max(abs(s - w) for s, w in zip(sent, want)) <= 2, (sent, want)
        _settled(page)
        _wait_ids(page, [r["id"] for r in _api(client, query, k=40, box=box)["results"]])
        assert not errors, errors
    finally:
        context.close()


def test_a_box_on_an_indexed_picture_uses_its_original_pixels(browser, site):
    url, client, paths = site
    rid = next(r["id"] for r in client.post("/api/search", json={"text": "a rocket", "k": 1}).get_json()["results"])
    meta = client.get(f"/api/images/{rid}/meta").get_json()["metadata"]
    page, errors = _new_page(browser)
    try:
        page.goto(f"{url}/?id={rid}")
        _settled(page)
        page.wait_for_function("() => document.querySelector('#query-thumb').complete")
        rect = page.locator("#query-thumb").bounding_box()
        with page.expect_request(lambda r: r.url.endswith("/api/search")) as req:
            _drag(page, rect, (0.25, 0.2), (0.75, 0.9))
        sent = [float(v) for v in _form(req.value)["box"].split(",")]
        want = [0.25 * meta["width"], 0.2 * meta["height"], 0.75 * meta["width"], 0.9 * meta["height"]]
        assert max(abs(s - w) for s, w in zip(sent, want)) <= 2, (sent, want)
        _settled(page)
        api = client.post("/api/search", json={"image_id": rid, "box": sent, "k": 40}).get_json()
        _wait_ids(page, [r['id'] for r in api['results']], timeout=60000)
        assert not errors, errors
    finally:
        page.close()


def test_find_objects_draws_the_regions_and_shows_each_ones_results(browser, site, query):
    url, client, _ = site
    api = _api(client, query, k=40, regions=True)
    regions = api["regions"]
    assert len(regions) >= 2
    page, errors = _new_page(browser)
    try:
        page.goto(url + "/")
        page.wait_for_function("() => document.querySelector('#hint').textContent.includes('images')")
        page.set_input_files("#file", files=[_file(query)])
        _settled(page)
        with page.expect_request(lambda r: r.url.endswith("/api/search")) as req:
            page.check("#regions")
        assert _form(req.value)["regions"] == "true"
        page.wait_for_function(f"() => document.querySelectorAll('#query-boxes .region-box').length === {len(regions)}",
                               timeout=120000)
        _settled(page)
        assert _params(page)["regions"] == "1"
        assert _ids(page) == [r["id"] for r in api["results"]]                  # the fused list
        # each box where the API put it (pixels of query_size, scaled to the shown picture)
        rect = page.locator("#query-thumb").bounding_box()
        qw, qh = api["query_size"]
        for i, reg in enumerate(regions):
            bb = page.locator(f"#query-boxes .region-box[data-region='{i}']").bounding_box()
            assert abs(bb["x"] - (rect["x"] + reg["box"][0] / qw * rect["width"])) <= 2
            assert abs(bb["width"] - (reg["box"][2] - reg["box"][0]) / qw * rect["width"]) <= 3
        pick = len(regions) - 1
        page.click(f"#query-boxes .region-box[data-region='{pick}']")
        want = [r["id"] for r in regions[pick]["results"]]
        _wait_ids(page, want, timeout=30000)
        assert page.locator("#query-boxes .region-box.selected").get_attribute("data-region") == str(pick)
        assert _params(page)["region"] == str(pick) and page.is_hidden("#more")
        assert page.text_content("#status").startswith(f"Object {pick + 1} of {len(regions)}")
        shot(page, "page-regions.png")
        # the chips do the same from the keyboard; "All" returns to the fused list
        page.click("#region-list .region-chip[data-region='0']")
        want0 = [r["id"] for r in regions[0]["results"]]
        _wait_ids(page, want0, timeout=30000)
        page.click("#region-list .region-chip[data-region='-1']")
        _wait_ids(page, [r['id'] for r in api['results']], timeout=30000)
        assert page.locator("#query-boxes .region-box.selected").count() == 0 and "region" not in _params(page)
        assert not errors, errors
    finally:
        page.close()


def test_a_region_index_hit_shows_where_on_its_thumbnail(browser, site):
    url, client, _ = site
    page, errors = _new_page(browser)
    found = {}

    def with_box(route):              # as an index with --regions answers: the hit's box, pixels of its picture
        resp = route.fetch()
        body = resp.json()
        r = body["results"][0]
        w, h = r["metadata"]["width"], r["metadata"]["height"]
        r["box"] = [w // 4, h // 5, w // 2, h // 2]
        found.update(id=r["id"], box=r["box"], w=w, h=h)
        route.fulfill(response=resp, json=body)

    try:
        page.route("**/api/search", with_box)
        page.goto(url + "/?q=a+rocket")
        _settled(page)
        card = page.locator(f"#results .result[data-id='{found['id']}'] .thumb")
        assert page.locator("#results .hit-box").count() == 1
        img = card.locator("img").first.bounding_box()       # the picture shown whole in the square
        scale = min(img["width"] / found["w"], img["height"] / found["h"])
        x0 = img["x"] + (img["width"] - found["w"] * scale) / 2 + found["box"][0] * scale
        hb = card.locator(".hit-box").bounding_box()
        assert abs(hb["x"] - x0) <= 2 and abs(hb["width"] - (found["box"][2] - found["box"][0]) * scale) <= 3
        assert not errors, errors
    finally:
        page.close()


def _session_bytes(browser, url, data: bytes, *, uploads: bool) -> tuple[int, list[dict]]:
    """Request bytes a page session sends for an image query with 8 "Why?" overlays and one pair view (the
    attribution answers are stubbed: only what the page sends is measured). ``uploads=False``: a server
    without /api/uploads (the page sends the picture with each request, as before the token)."""
    page, errors = _new_page(browser)
    sent: list[dict] = []
    png = io.BytesIO()
    Image.new("RGBA", (8, 8)).save(png, "PNG")

    def stub(route):
        route.fulfill(status=200, body=png.getvalue(), headers={"Content-Type": "image/png",
                                                                 "X-Attribution-Method": "stub"})

    def health(route):
        resp = route.fetch()
        body = resp.json()
        body["features"] = [f for f in body["features"] if uploads or f != "uploads"]
        route.fulfill(response=resp, json=body)

    def record(r):
        if r.method == "POST":
            sent.append({"path": urlparse(r.url).path, "bytes": len(r.post_data_buffer or b""), **_form(r)})

    try:
        page.route("**/api/attribution", stub)
        page.route("**/api/attribution/pair", stub)
        page.route("**/healthz", health)
        page.on("request", record)
        page.goto(url + "/?per=8")
        page.wait_for_function("() => document.querySelector('#hint').textContent.includes('images')")
        page.set_input_files("#file", files=[_file(data)])
        _settled(page)
        page.check("#attr")
        page.wait_for_function("() => document.querySelectorAll('#results .overlay').length === 8", timeout=60000)
        page.locator("#results .result").first.locator(".why-btn").click()
        page.wait_for_function("() => !document.querySelector('#why-img').hidden", timeout=30000)
        assert not errors, errors
    finally:
        page.close()
    return sum(s["bytes"] for s in sent), sent


def test_overlays_and_pair_view_send_the_token_not_the_picture(browser, site, query):
    url, _, _ = site
    total, sent = _session_bytes(browser, url, query, uploads=True)
    overlays = [s for s in sent if s["path"] == "/api/attribution"]
    pair = [s for s in sent if s["path"] == "/api/attribution/pair"]
    assert len(overlays) == 8 and len(pair) == 1
    token = next(s for s in sent if s["path"] == "/api/search")["upload"]
    for s in overlays + pair:
        assert "image" not in s and s["upload"] == token and s["bytes"] < 2000, s
    uploads = [s for s in sent if "image" in s]
    assert [s["path"] for s in uploads] == ["/api/uploads"]                    # the picture went once
    before, sent_before = _session_bytes(browser, url, query, uploads=False)
    assert sum(1 for s in sent_before if "image" in s) == 10                    # search + 8 overlays + pair
    assert total < before / 5, (total, before)
    print(f"\nrequest bytes of a page session (image query, 8 overlays, 1 pair view; query {len(query)} bytes): "
          f"with the token {total}, picture in every request {before} ({before / total:.2f}x)")
