"""The page's "Why?" in a real headless browser (Debian chromium driven by Python playwright): overlays on
every result (fetched in parallel) with the legend, and a result's pair view in a dialog; text queries on
the offline encoder show their "approximate" note. Skipped cleanly when chromium or playwright is missing.

Set ``LOUPE_SCREENSHOTS=/some/dir`` to keep screenshots of the page with "Why?" on (checked by eye)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from _engine_helpers import build_photo_index, save_photos

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory, photos, effnet, conse):
    from werkzeug.serving import make_server

    from retrieval.engine.engine import Engine
    from server.app import create_app

    folder = tmp_path_factory.mktemp("why-photos")
    paths = save_photos(folder, photos, ("chelsea", "coffee", "rocket", "astronaut"))
    w, h = photos["chelsea"].size
    query = folder / "query.png"
    photos["chelsea"].crop((int(w * 0.2), int(h * 0.05), int(w * 0.75), int(h * 0.9))).save(query)
    index = build_photo_index(tmp_path_factory.mktemp("why-index"), paths, ["effnet-lite0", "conse-effnet-lite0"])
    app = create_app(engine=Engine(index, device="cpu"))
    app.config["ATTRIBUTION_CALLS"] = calls = []

    @app.before_request
    def count():
        from flask import request

        if request.path.startswith("/api/attribution"):
            calls.append(request.path)

    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", query, calls
    httpd.shutdown()
    thread.join(5)


def _shot(page, name: str) -> None:
    folder = os.environ.get("LOUPE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / name), full_page=False)


@pytest.mark.timeout(1500)     # attribution is CPU-heavy; a loaded 2-core box needs minutes, a quiet one seconds
def test_why_overlays_and_pair_view(browser, server):
    url, query, calls = server
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(url + "/")
        page.wait_for_selector("#attr-toggle:not([hidden])", timeout=20000)
        page.set_input_files("#file", str(query))
        page.wait_for_function("() => document.querySelectorAll('#results .result').length === 4 && "
                               "!document.body.classList.contains('loading')", timeout=60000)
        assert page.locator("#results .why-btn").count() == 4
        # the global toggle: an overlay on every result, the legend above the grid
        page.check("#attr")
        page.wait_for_function("() => document.querySelectorAll('#results .overlay').length >= 1", timeout=600000)
        assert page.is_visible("#attr-legend")
        assert page.text_content("#attr-method").startswith("method: ")   # the default encoder's default map
        assert page.is_hidden("#attr-note")
        _shot(page, "why-overlays-image-query.png")
        # a result's Why?: the pair view in a dialog
        page.locator("#results .result").first.locator(".why-btn").click()
        assert page.is_visible("#why")
        page.wait_for_function("() => { const i = document.querySelector('#why-img');"
                               " return !i.hidden && i.complete && i.naturalWidth > 0; }", timeout=600000)
        assert "Left: your query" in page.text_content("#why-status")
        assert page.evaluate("document.querySelector('#why-img').naturalWidth") > 500
        assert "/api/attribution/pair" in calls
        _shot(page, "why-pair-view.png")
        page.keyboard.press("Escape")                       # closes the dialog, keeps the image query
        page.wait_for_function("() => !document.querySelector('#why').open")
        assert page.is_visible("#image-query")
        # a text query on the offline encoder: its maps say they are approximate
        page.click("#clear-image")
        page.fill("#q", "a cup of coffee")
        page.wait_for_function("() => document.querySelectorAll('#results .overlay').length >= 1", timeout=600000)
        page.wait_for_function("() => !document.querySelector('#attr-note').hidden", timeout=60000)
        assert "approximate" in page.text_content("#attr-note")
        _shot(page, "why-overlays-text-query.png")
        page.locator("#results .result").first.locator(".why-btn").click()
        page.wait_for_function("() => !document.querySelector('#why-note').hidden", timeout=600000)
        assert "approximate" in page.text_content("#why-note")
        _shot(page, "why-text-dialog.png")
        assert not errors, errors
    finally:
        page.close()
