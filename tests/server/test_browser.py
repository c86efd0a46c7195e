"""The web page in a real headless browser (Debian chromium driven by Python playwright).

A real HTTP server thread on 127.0.0.1 (random port) serves a small photo index. Type a query →
results appear; upload an image → it comes back first; open a result → its "more like this".
Skipped cleanly when chromium or playwright is missing.
"""

from __future__ import annotations

import threading

import pytest
from _engine_helpers import build_photo_index

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_clip, photos):
    from werkzeug.serving import make_server

    from retrieval.engine.engine import Engine
    from server.app import create_app

    folder = tmp_path_factory.mktemp("browser-photos")
    paths = []
    for name in ("astronaut", "coffee", "rocket", "camera", "chelsea", "horse", "motorcycle_left"):
        if name in photos:
            p = folder / f"{name}.png"
            photos[name].save(p)
            paths.append(p)
    index = build_photo_index(tmp_path_factory.mktemp("browser-index"), paths, [tiny_clip, "colour-names"])
    app = create_app(engine=Engine(index, device="cpu"))
    app.config["SEEN_INSTRUCTIONS"] = seen = []

    @app.before_request
    def record_instruction():      # what the page sent (multipart bodies are not visible to playwright)
        from flask import request

        if request.path == "/api/search":
            seen.append(request.form.get("instruction"))

    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", {p.stem: p for p in paths}, seen
    httpd.shutdown()
    thread.join(5)


def test_type_query_then_upload_image_then_more_like_this(browser, server):
    url, paths, seen = server
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(url + "/")
        assert page.title().startswith("Loupe")
        # attribution toggle stays hidden unless /healthz lists "attribution"
        page.wait_for_function("document.querySelector('#hint').textContent.includes('images')")
        features = page.evaluate("fetch('/healthz').then(r => r.json()).then(h => h.features)")
        assert page.is_hidden("#attr-toggle") == ("attribution" not in features)

        page.fill("#q", "a rocket")
        page.wait_for_selector("#results .result", timeout=20000)
        assert page.locator("#results .result").count() == len(paths)
        assert "results" in page.text_content("#status")
        first_caption = page.text_content("#results .result .caption")
        assert first_caption in paths

        with page.expect_response(lambda r: r.url.endswith("/api/search") and r.request.method == "POST") as resp:
            page.set_input_files("#file", str(paths["coffee"]))
        assert resp.value.ok and "multipart/form-data" in resp.value.request.headers["content-type"]
        page.wait_for_function(
            "() => { const r = document.querySelector('#results .result .caption');"
            " return r && r.textContent === 'coffee' && !document.body.classList.contains('loading'); }",
            timeout=20000)
        assert page.is_visible("#image-query")
        score = float(page.text_content("#results .result .score span"))
        assert score > 0.99

        # the index names colours: one click on a swatch asks for "the same, but red"
        assert page.locator("#swatches .swatch").count() == 11
        with page.expect_response(lambda r: r.url.endswith("/api/search") and r.request.method == "POST") as resp:
            page.click("#swatches .swatch[data-colour='red']")
        assert resp.value.ok and seen[-1] == "in red"
        assert page.input_value("#instruction") == "in red"
        page.wait_for_function("() => !document.body.classList.contains('loading')", timeout=20000)
        # every other image (the uploaded file is itself indexed, and an instruction asks for a change)
        assert page.locator("#results .result").count() == len(paths) - 1
        captions = page.locator("#results .result .caption").all_text_contents()
        assert "coffee" not in captions
        page.fill("#instruction", "")
        page.wait_for_function(
            "() => { const r = document.querySelector('#results .result .caption');"
            " return r && r.textContent === 'coffee' && !document.body.classList.contains('loading'); }",
            timeout=20000)

        # click the third result: more like this → it comes first
        third = page.locator("#results .result").nth(2)
        third_id = third.get_attribute("data-id")
        third.locator("button.card").click()        # opens the result's own view; "More like this" is its button
        page.click("#result-more")
        page.wait_for_function(
            f"() => document.querySelector('#results .result').dataset.id === '{third_id}'", timeout=20000)
        assert page.text_content("#iq-label") == "More like this"

        # keyboard: Escape clears the image query, / focuses the search box
        page.keyboard.press("Escape")
        assert page.is_hidden("#image-query")
        page.locator("body").click()
        page.keyboard.press("/")
        assert page.evaluate("document.activeElement.id") == "q"
        assert not errors, errors
    finally:
        page.close()
