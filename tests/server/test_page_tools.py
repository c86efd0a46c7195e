"""The page's collection views in a real headless browser: the duplicates (contact sheets of the library's
groups with keep / remove marks, paged, pages in the URL), "Is this a copy?" (an uploaded copy lists the
picture it was copied from, with calibrated scores) and "Name this" (names and colours of an image).

``LOUPE_SCREENSHOTS=docs/screenshots`` keeps screenshots (checked by eye)."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

import pytest
from _page_site import resized_jpeg, served_site, shot
from PIL import Image

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def site(tmp_path_factory, photos):
    for url, _app, engine, paths in served_site(tmp_path_factory, photos):
        yield url, engine, paths


def _new_page(browser, **kw):
    page = browser.new_page(viewport={"width": 1100, "height": 760}, **kw)
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return page, errors


@pytest.mark.timeout(900)
def test_duplicates_view_shows_the_librarys_groups_paged(browser, site):
    from retrieval.copydetect.collection import dedup_index, describe_files

    url, engine, paths = site
    ref = dedup_index(engine)
    describe_files(engine, ref)
    want = [[ref.ids[r] for r in g] for g in ref.groups]
    keep = [ref.ids[ref.keeper(g)] for g in ref.groups]
    assert len(want) >= 2
    page, errors = _new_page(browser)
    try:
        page.goto(url + "/")
        page.click(".tab[data-view='duplicates']")
        page.wait_for_selector("#dups .dup-group", timeout=600000)     # computed once, in the background
        assert parse_qs(urlparse(page.url).query) == {"view": ["duplicates"]}
        got = page.eval_on_selector_all("#dups .dup-group", "gs => gs.map(g => [...g.querySelectorAll('.dup')]"
                                        ".map(d => d.dataset.id))")
        assert got == want
        kept = page.eval_on_selector_all("#dups .dup-group", "gs => gs.map(g => g.querySelector('.dup.keep')"
                                         ".dataset.id)")
        assert kept == keep
        assert page.locator("#dups .dup.keep").count() == len(want)
        assert page.locator("#dups .dup.remove").count() == sum(len(g) - 1 for g in want)
        # the copies (smaller) are the ones marked "remove"
        removed = page.locator("#dups .dup.remove .dup-name").all_text_contents()
        assert removed and all(name.startswith("copy_") for name in removed), removed
        assert f"{len(want)} groups" in page.text_content("#dups-status")
        shot(page, "page-duplicates.png")
        # one group a page: Next / Previous, the page in the URL, Back restores it
        page.goto(url + "/?view=duplicates&per=1")
        page.wait_for_selector("#dups .dup-group")
        assert page.locator("#dups .dup-group").count() == 1 and page.is_hidden("#dups-prev")
        page.click("#dups-next")
        page.wait_for_function(f"() => document.querySelector('#dups .dup')?.dataset.id === '{want[1][0]}'")
        assert parse_qs(urlparse(page.url).query)["dpage"] == ["2"]
        assert page.text_content("#dups-page") == f"page 2 of {len(want)}"
        page.go_back()
        page.wait_for_function(f"() => document.querySelector('#dups .dup')?.dataset.id === '{want[0][0]}'")
        # a picture of a group opens its own view
        page.locator("#dups .dup-card").first.click()
        page.wait_for_selector("#result[open]")
        assert want[0][0] in page.text_content("#result-meta")
        assert not errors, errors
    finally:
        page.close()


def test_is_this_a_copy_lists_the_original(browser, site, tmp_path):
    url, engine, paths = site
    coffee = next(r for r in _rows(engine) if r["path"].endswith("/coffee.png"))
    query = tmp_path / "my-coffee.jpg"
    resized_jpeg(Image.open(paths["coffee"]).convert("RGB"), scale=0.6, quality=50).save(query, quality=90)
    page, errors = _new_page(browser)
    try:
        page.goto(url + "/?view=copy")
        page.wait_for_selector("#view-copy", state="visible")     # the page's modules switch the view after load
        assert page.is_visible("#view-copy") and page.is_hidden("#view-search")
        page.set_input_files("#copy-file", str(query))
        page.wait_for_selector("#copy-matches .match", timeout=120000)
        ids = page.eval_on_selector_all("#copy-matches .match", "els => els.map(e => e.dataset.id)")
        assert coffee["id"] in ids
        assert ids == [m["id"] for m in _api_matches(engine, query)]
        text = page.text_content("#copy-matches")
        assert "copy score" in text and "similarity" in text
        assert "copies found" in page.text_content("#copy-status")
        assert page.evaluate("document.querySelector('#copy-img').naturalWidth") > 0
        shot(page, "page-copy.png")
        # a match on part of the query: that region is outlined on the query image (the API's regions are
        # tested in tests/copydetect; here the page draws what it is given)
        def with_region(route):
            resp = route.fetch()
            body = resp.json()
            seen.append(body)             # an upload's file does not survive interception: image_id only
            if body.get("matches"):
                body["matches"][0]["region"] = [10, 20, 110, 90]
            route.fulfill(response=resp, json=body)

        seen = []

        page.route("**/api/duplicates", with_region)
        page.goto(url + f"/?view=copy&id={coffee['id']}")       # an indexed picture (no upload to intercept)
        page.wait_for_selector("#copy-boxes rect", state="attached", timeout=120000)
        rect = page.eval_on_selector("#copy-boxes rect",
                                     "r => ['x', 'y', 'width', 'height'].map(a => r.getAttribute(a))")
        assert rect == ["10", "20", "100", "70"]
        assert "matched region 10, 20, 110, 90" in page.text_content("#copy-matches")
        assert seen and "this picture itself" in page.text_content("#copy-matches")
        page.unroute("**/api/duplicates")
        # a picture with no copy in the collection
        other = tmp_path / "noise.png"
        import numpy as np

        Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(other)
        page.set_input_files("#copy-file", str(other))
        page.wait_for_function("() => document.querySelector('#copy-status').textContent.startsWith('No copy')",
                               timeout=120000)
        assert page.locator("#copy-matches .match").count() == 0
        assert not errors, errors
    finally:
        page.close()


def test_name_this_shows_names_and_colours(browser, site):
    url, engine, paths = site
    coffee = next(r for r in _rows(engine) if r["path"].endswith("/coffee.png"))
    page, errors = _new_page(browser)
    try:
        page.goto(url + f"/?view=name&id={coffee['id']}&vocab=captions")
        page.wait_for_selector("#name-labels .label", timeout=300000)
        names = page.locator("#name-labels .label-name").all_text_contents()
        from server.app import create_app

        api = create_app(engine=engine).test_client().post(
            "/api/classify", json={"image_id": coffee["id"], "vocabulary": "captions", "k": 5}).get_json()
        assert names == [lab["label"] for lab in api["labels"]] and len(names) == 5
        assert "coffee" in names[:2]
        colours = page.locator("#name-colours .chip").all_text_contents()
        assert colours and [c.split()[0] for c in colours] == [c["colour"] for c in api["colours"]]
        assert "captions" in page.text_content("#name-status")
        shot(page, "page-name-this.png")
        # an upload: the same picture as a file names the same
        page.set_input_files("#name-file", str(paths["coffee"]))
        page.wait_for_function("() => document.querySelector('#name-img').src.startsWith('blob:')")
        page.wait_for_selector("#name-labels .label")
        assert "coffee" in page.locator("#name-labels .label-name").all_text_contents()[:2]
        assert parse_qs(urlparse(page.url).query) == {"view": ["name"], "upload": ["1"], "vocab": ["captions"]}
        assert not errors, errors
    finally:
        page.close()


def _rows(engine) -> list[dict]:
    return [row for t in engine.records.tables for row in t.select(["id", "path"]).to_pylist()]


def _api_matches(engine, path) -> list[dict]:
    import base64

    from server.app import create_app

    body = {"image": base64.b64encode(path.read_bytes()).decode()}
    r = create_app(engine=engine).test_client().post("/api/duplicates", json=body)
    assert r.status_code == 200, r.get_json()
    return r.get_json()["matches"]
