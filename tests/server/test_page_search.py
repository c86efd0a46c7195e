"""The search view in a real headless browser: the state in the URL (Back / Forward restore it, a shared
link reproduces the result set), "Load more" (the next page of the same ranking, as the API gives it),
filters (caption, size, colour facet), a result's own view (metadata, copy link, "more like this"),
scores that are not cosines, the error box in dark mode and reduced motion.

``LOUPE_SCREENSHOTS=docs/screenshots`` keeps screenshots (checked by eye)."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlparse

import pytest
from _page_site import served_site, shot

pytestmark = [pytest.mark.browser, pytest.mark.slow]
QUERY = "a cup of coffee"


@pytest.fixture(scope="module")
def site(tmp_path_factory, photos):
    for url, app, _engine, paths in served_site(tmp_path_factory, photos):
        yield url, app.test_client(), paths


def _api_ids(client, **body) -> list[str]:
    r = client.post("/api/search", json=body)
    assert r.status_code == 200, r.get_json()
    return [x["id"] for x in r.get_json()["results"]]


def _ids(page) -> list[str]:
    return page.eval_on_selector_all("#results .result", "els => els.map(e => e.dataset.id)")


def _settled(page, n=None):
    cond = "!document.body.classList.contains('loading') && document.querySelectorAll('#results .result').length"
    if n is not None:
        cond += f" === {n}"
    page.wait_for_function(f"() => {cond}", timeout=60000)


def _params(page) -> dict:
    return {k: v if len(v) > 1 else v[0] for k, v in parse_qs(urlparse(page.url).query).items()}


def _new_page(browser, **kw):
    page = browser.new_page(viewport={"width": 1100, "height": 760}, **kw)
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return page, errors


def test_url_state_back_forward_and_result_view(browser, site):
    url, client, paths = site
    n = len(paths)
    page, errors = _new_page(browser)
    try:
        page.goto(url + "/")
        page.fill("#q", QUERY)
        _settled(page, n)
        assert _params(page) == {"q": QUERY}
        assert _ids(page) == _api_ids(client, text=QUERY, k=40)
        # a filter: results change to those matching, and the URL carries it
        page.click("#filters summary")
        page.fill("#f-caption", "copy")
        _settled(page, 2)
        assert _params(page) == {"q": QUERY, "caption": "copy"}
        filtered = _ids(page)
        assert filtered == _api_ids(client, text=QUERY, k=40, filter={"caption": {"contains": "copy"}})
        captions = page.locator("#results .caption").all_text_contents()
        assert all("copy" in c for c in captions), captions
        # a click opens the result's own view (not "more like this"); its id joins the URL
        first = page.locator("#results .result").first
        rid = first.get_attribute("data-id")
        first.locator("button.card").click()
        page.wait_for_selector("#result[open]")
        assert _params(page).get("open") == rid
        meta = page.text_content("#result-meta")
        assert "Path" in meta and ".jpg" in meta and "Size" in meta
        assert page.get_attribute("#result-original", "href").endswith(f"/api/images/{rid}")
        title = page.text_content("#result-title")
        shot(page, "page-result-view.png")
        page.click("#result-copy")
        link = page.input_value("#result-link")
        assert parse_qs(urlparse(link).query) == {"q": [QUERY], "caption": ["copy"], "open": [rid]}
        # "more like this" is a button of that view: a new history entry with the image id
        page.click("#result-more")
        page.wait_for_function(f"() => document.querySelector('#results .result')?.dataset.id === '{rid}'",
                               timeout=60000)
        _settled(page)
        assert _params(page) == {"id": rid, "caption": "copy"}
        assert page.is_visible("#image-query") and page.text_content("#iq-label") == "More like this"
        more_ids = _ids(page)
        assert more_ids == _api_ids(client, image_id=rid, k=40, filter={"caption": {"contains": "copy"}})
        # Back: the text query with its filter, its inputs and its results
        page.go_back()
        page.wait_for_function("() => document.querySelector('#q').value === " + json.dumps(QUERY))
        _settled(page, 2)
        assert _params(page) == {"q": QUERY, "caption": "copy"}
        assert page.input_value("#f-caption") == "copy" and page.is_hidden("#image-query")
        assert _ids(page) == filtered
        # Back again: before the filter; Forward twice: the "more like this" again
        page.go_back()
        _settled(page, n)
        assert _params(page) == {"q": QUERY} and page.input_value("#f-caption") == ""
        page.go_forward()
        _settled(page, 2)
        page.go_forward()
        page.wait_for_function(f"() => document.querySelector('#results .result')?.dataset.id === '{rid}'",
                               timeout=60000)
        assert page.is_visible("#image-query")
        # the copied link, opened elsewhere: the same result set, with that result open
        other, other_errors = _new_page(browser)
        try:
            other.goto(link)
            other.wait_for_selector("#result[open]", timeout=60000)
            _settled(other, 2)
            assert _ids(other) == filtered
            assert other.text_content("#result-title") == title
            assert other.input_value("#f-caption") == "copy" and other.input_value("#q") == QUERY
            other.keyboard.press("Escape")
            other.wait_for_function("() => !document.querySelector('#result').open")
            # the dialog's "close" event (it rewrites the URL) is a task queued after the attribute goes
            other.wait_for_function("() => !new URLSearchParams(location.search).has('open')")
            assert "open" not in _params(other)
            assert not other_errors, other_errors
        finally:
            other.close()
        assert not errors, errors
    finally:
        page.close()


def test_load_more_appends_the_next_page_of_the_ranking(browser, site):
    url, client, paths = site
    n = len(paths)
    page, errors = _new_page(browser)
    try:
        page.goto(url + "/?q=a+rocket&per=5")
        _settled(page, 5)
        whole = _api_ids(client, text="a rocket", k=40)
        assert _ids(page) == whole[:5] and page.is_visible("#more")
        with page.expect_response(lambda r: r.url.endswith("/api/search")) as resp:
            page.click("#more")
        sent = resp.value.request.post_data_buffer.decode("latin-1")
        assert 'name="offset"\r\n\r\n5' in sent and 'name="k"\r\n\r\n5' in sent     # the next page, not all again
        _settled(page, 10)
        assert _ids(page) == whole[:10]
        assert _params(page)["page"] == "2"
        page.locator("#more").scroll_into_view_if_needed()
        shot(page, "page-load-more.png")
        # the link to two pages reproduces them (one request of k = 10)
        page.reload()
        _settled(page, 10)
        assert _ids(page) == whole[:10]
        page.click("#more")
        _settled(page, n)
        assert _ids(page) == whole and page.is_hidden("#more")
        assert not errors, errors
    finally:
        page.close()


def test_size_and_colour_filters(browser, site):
    url, client, paths = site
    n = len(paths)
    page, errors = _new_page(browser)
    try:
        page.goto(url + "/?q=a+photo&minw=200")
        _settled(page)
        assert page.evaluate("document.querySelector('#filters').open")
        flt = {"width": {"gte": 200}}
        assert _ids(page) == _api_ids(client, text="a photo", k=40, filter=flt)
        assert 0 < len(_ids(page)) < n
        page.check("#f-colours input[value='red']")
        page.wait_for_function("() => new URLSearchParams(location.search).get('colour') === 'red'")
        _settled(page)
        flt["colour-names"] = "red"
        want = _api_ids(client, text="a photo", k=40, filter=flt)
        page.wait_for_function(f"() => JSON.stringify([...document.querySelectorAll('#results .result')]"
                               f".map(e => e.dataset.id)) === {json.dumps(json.dumps(want, separators=(',', ':')))}",
                               timeout=60000)    # JSON.stringify writes no spaces
        assert page.text_content("#filter-count") == "2"
        shot(page, "page-filters.png")
        page.click("#f-clear")
        page.wait_for_function("() => location.search === '?q=a+photo'")
        _settled(page, n)
        assert not errors, errors
    finally:
        page.close()


def test_fused_scores_are_not_cosine_bars(browser, site):
    url, _, paths = site
    n = len(paths)
    page, errors = _new_page(browser)

    def fused(route):
        resp = route.fetch()
        body = resp.json()
        for r in body["results"]:
            r["score_kind"] = "fused"
        route.fulfill(response=resp, json=body)

    try:
        page.route("**/api/search", fused)
        page.goto(url + "/?q=a+cat")
        _settled(page, n)
        assert page.locator("#results .scorebar").count() == 0
        assert page.locator("#results .score .kind").first.text_content() == "fused"
        page.unroute("**/api/search")
        page.fill("#q", "a dog")
        page.wait_for_function(f"() => document.querySelectorAll('#results .scorebar').length === {n}", timeout=60000)
        assert not errors, errors
    finally:
        page.close()


def _luminance(rgb: str) -> float:
    vals = [int(float(v)) / 255 for v in rgb[rgb.index("(") + 1:rgb.index(")")].split(",")[:3]]
    lin = [v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4 for v in vals]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def test_error_box_readable_in_dark_mode_and_reduced_motion(browser, site):
    url, _, paths = site
    n = len(paths)
    page, errors = _new_page(browser, color_scheme="dark", reduced_motion="reduce")
    try:
        page.goto(url + "/")
        page.fill("#q", "x" * 1001)                          # too long: a 400 with a message
        page.wait_for_selector("#error:not([hidden])", timeout=30000)
        assert "too long" in page.text_content("#error")
        fg, bg = page.evaluate("() => { const s = getComputedStyle(document.querySelector('#error'));"
                               " return [s.color, s.backgroundColor]; }")
        hi, lo = sorted((_luminance(fg), _luminance(bg)), reverse=True)
        assert (hi + 0.05) / (lo + 0.05) >= 4.5, (fg, bg)       # WCAG AA contrast
        assert _luminance(bg) < 0.1                              # a dark box on the dark page
        shot(page, "page-error-dark.png")
        page.fill("#q", "a cat")
        _settled(page, n)
        assert page.is_hidden("#error")
        assert page.evaluate("getComputedStyle(document.querySelector('#results .card')).transitionDuration") == "0s"
        assert not errors, errors
    finally:
        page.close()
