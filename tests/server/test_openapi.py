"""``GET /openapi.json`` and ``GET /docs`` (issue 16): the spec is valid OpenAPI 3, describes every route of the
app, takes its request bodies from the request dataclasses (a field added there is in the spec), its
constraints hold in the validators, and real responses of every endpoint — errors included — validate
against it. ``/docs`` renders it in a real browser with nothing fetched from outside."""

from __future__ import annotations

import copy
import dataclasses
import re
import threading
import time

import pytest
from _engine_helpers import build_photo_index, save_photos
from jsonschema import Draft202012Validator

from retrieval.engine.engine import Engine
from retrieval.engine.request import SearchRequest
from retrieval.errors import LoupeError
from server.app import create_app
from server.openapi import build_spec
from server.openapi.schemas import CONSTRAINTS, body_fields, request_schema
from server.requests import AttributionRequest, ClassifyRequest, DuplicatesRequest

REQUESTS = {"SearchRequest": (SearchRequest,), "AttributionRequest": (SearchRequest, AttributionRequest),
            "DuplicatesRequest": (DuplicatesRequest,), "ClassifyRequest": (ClassifyRequest,)}


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, tiny_clip, photos):
    folder = tmp_path_factory.mktemp("openapi-photos")
    paths = save_photos(folder, photos, ("astronaut", "coffee", "rocket", "camera", "chelsea"))
    return build_photo_index(tmp_path_factory.mktemp("openapi-index"), paths, [tiny_clip, "colour-names"])


@pytest.fixture(scope="module")
def engine(index_dir):
    return Engine(index_dir, device="cpu")


@pytest.fixture(scope="module")
def client(engine):
    return create_app(engine=engine).test_client()


@pytest.fixture(scope="module")
def spec(client):
    resp = client.get("/openapi.json")
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    return resp.get_json()


# -- OpenAPI 3.0 schemas as JSON Schema (for jsonschema) -----------------------------------------------
def as_json_schema(node):
    """``nullable: true`` → a null alternative; everything else is JSON Schema already."""
    if isinstance(node, list):
        return [as_json_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: as_json_schema(v) for k, v in node.items() if k not in ("nullable", "example")}
    if node.get("nullable"):
        if isinstance(out.get("type"), str) and not {"anyOf", "allOf", "oneOf"} & set(out):
            out["type"] = [out["type"], "null"]
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


def validate(spec, schema, instance) -> None:
    root = {"components": as_json_schema(spec["components"]), **as_json_schema(schema)}
    errors = sorted(Draft202012Validator(root).iter_errors(instance), key=lambda e: list(e.path))
    assert not errors, "; ".join(f"{list(e.path)}: {e.message}" for e in errors[:5])


def template(rule: str) -> str:
    return re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule)


def check(spec, resp, path: str, method: str = "get") -> dict | None:
    """``resp`` is a documented answer of ``path``: its status and media type are listed, and a JSON body
    validates against the listed schema. Returns the JSON body."""
    op = spec["paths"][path][method]
    documented = op["responses"].get(str(resp.status_code))
    assert documented is not None, f"{method.upper()} {path}: status {resp.status_code} is not in the spec " \
                                   f"({resp.get_data(as_text=True)[:300]})"
    content = documented.get("content", {})
    media = resp.mimetype
    match = media if media in content else next((m for m in content if m.endswith("/*")
                                                 and media.startswith(m[:-1])), None)
    assert match is not None, f"{method.upper()} {path} {resp.status_code}: {media} not in {list(content)}"
    if media == "application/json":
        body = resp.get_json()
        validate(spec, content[match]["schema"], body)
        return body
    return None


# -- the document ----------------------------------------------------------------------------------
def test_the_spec_is_valid_openapi_3(spec):
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(spec)
    assert spec["openapi"].startswith("3.0")


def test_every_route_of_the_app_is_described(client, spec):
    routes = set()
    for rule in client.application.url_map.iter_rules():
        if rule.rule.startswith(("/static/", "/docs/")):       # files: the page's and the docs page's assets
            continue
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            routes.add((template(rule.rule), method.lower()))
    described = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    assert routes == described


def test_request_bodies_are_the_dataclass_fields(spec):
    schemas = spec["components"]["schemas"]
    for name, classes in REQUESTS.items():
        fields = {f.name for cls in classes for f in body_fields(cls)}
        for variant in (name, f"{name}Form"):
            assert set(schemas[variant]["properties"]) == fields, variant
            assert schemas[variant]["additionalProperties"] is False     # unknown fields are a 400
    assert schemas["AttributionRequest"]["required"] == ["result_id"]
    assert "query" not in schemas["AttributionRequest"]["properties"]
    assert schemas["SearchRequest"]["properties"]["k"]["default"] == SearchRequest.__dataclass_fields__["k"].default
    assert schemas["SearchRequestForm"]["properties"]["image"]["format"] == "binary"
    assert schemas["SearchRequest"]["properties"]["image"]["format"] == "byte"


def test_a_field_added_to_a_request_dataclass_is_in_the_spec():
    grown = dataclasses.make_dataclass("GrownRequest", [("page_token", "str | None", None),
                                                        ("depth", "int", 3)], bases=(SearchRequest,))
    grown.__module__ = SearchRequest.__module__
    schema = request_schema(grown)
    assert schema["properties"]["page_token"] == {"type": "string", "nullable": True}
    assert schema["properties"]["depth"] == {"type": "integer", "default": 3}
    assert set(schema["properties"]) == {f.name for f in dataclasses.fields(grown)}


def test_constraints_name_real_fields_and_hold_in_the_validators():
    """Each bound of the spec is accepted by the dataclass and the next value beyond it refused; each choice
    is accepted and an unlisted one refused (the spec cannot drift from the validators)."""
    base = {SearchRequest: {"image_id": "0" * 15}, AttributionRequest: {"result_id": "0" * 15},
            DuplicatesRequest: {"image_id": "0" * 15}, ClassifyRequest: {"image_id": "0" * 15}}
    checked = 0
    for cls, fields in CONSTRAINTS.items():
        names = {f.name for f in body_fields(cls)}
        for name, rule in fields.items():
            assert name in names, f"{cls.__name__}.{name} is constrained in the spec but is not a field"

            def ok(value, _cls=cls, _name=name):
                kwargs = {_name: value} if _name == "vector" else {**base[_cls], _name: value}
                if _name == "offset":
                    kwargs["k"] = 1
                _cls(**kwargs)

            def refused(value, _ok=ok):
                with pytest.raises(LoupeError):
                    _ok(value)

            if "minimum" in rule and rule.get("type") != "array":
                ok(rule["minimum"])
                refused(rule["minimum"] - 1)
                checked += 1
            if "maximum" in rule:
                ok(rule["maximum"])
                refused(rule["maximum"] + 1 if isinstance(rule["maximum"], int) else rule["maximum"] + 0.01)
                checked += 1
            if "enum" in rule:
                for value in rule["enum"]:
                    ok(value)
                refused("no-such-choice")
                checked += 1
            if "maxLength" in rule:
                ok("a" * rule["maxLength"]) if name != "image_id" else None
                refused("a" * (rule["maxLength"] + 1))
                checked += 1
            if rule.get("type") == "array" and "maxItems" in rule:
                size = rule["maxItems"]
                ok([1.0, 1.0, 2.0, 2.0] if size == 4 else [0.5] * size)
                refused([1.0] * (size + 1))
                checked += 1
    assert checked >= 15


# -- real answers ------------------------------------------------------------------------------------
def _wait_ready(client, spec, path):
    deadline = time.monotonic() + 120
    while True:
        resp = client.get(path)
        body = check(spec, resp, "/api/duplicates/groups")
        if resp.status_code != 202 or time.monotonic() > deadline:
            return resp, body
        time.sleep(0.2)


def test_real_responses_of_every_endpoint_validate(client, spec, engine, photos, tmp_path, monkeypatch):
    import base64
    import io

    monkeypatch.setenv("LOUPE_CACHE_DIR", str(tmp_path / "cache"))
    first = engine.records.shard_ids[0][0]
    buf = io.BytesIO()
    photos["chelsea"].save(buf, format="JPEG")
    upload = base64.b64encode(buf.getvalue()).decode()
    schemas = spec["components"]["schemas"]
    seen: set[tuple[str, str]] = set()

    def post(path, body, valid=True, **kw):
        """POST ``body``; the spec's request schema accepts it when ``valid``, and refuses it otherwise."""
        if "data" not in kw:
            schema = schemas[{"/api/search": "SearchRequest", "/api/classify": "ClassifyRequest",
                              "/api/duplicates": "DuplicatesRequest"}.get(path, "AttributionRequest")]
            if valid:
                validate(spec, schema, body)
            else:
                with pytest.raises(AssertionError):
                    validate(spec, schema, body)
            kw["json"] = body
        resp = client.post(path, **kw)
        seen.add((path, "post"))
        return resp, check(spec, resp, path, "post")

    def get(url, path):
        resp = client.get(url)
        seen.add((path, "get"))
        return resp, check(spec, resp, path)

    resp, body = post("/api/search", {"text": "a cat", "k": 3, "filter": {"width": {"gte": 1}}})
    assert resp.status_code == 200 and body["score_kind"] == "cosine" and len(body["results"]) == 3
    resp, body = post("/api/search", {"text": "a red photo", "k": 2})            # colour-aware: fused z-scores
    assert resp.status_code == 200 and body["score_kind"] == "fused_z"
    resp, body = post("/api/search", {"image_id": first, "instruction": "in red", "k": 2, "offset": 1})
    assert resp.status_code == 200 and body["score_kind"] == "fused_z"
    resp, body = post("/api/search", {}, data={"image": (io.BytesIO(buf.getvalue()), "q.jpg"), "k": "2",
                                               "rerank": "true"}, content_type="multipart/form-data")
    assert resp.status_code == 200 and body["score_kind"] == "reranked"
    resp, body = post("/api/uploads", {}, data={"image": (io.BytesIO(buf.getvalue()), "q.jpg")},
                      content_type="multipart/form-data")
    assert resp.status_code == 200 and [body["width"], body["height"]] == list(photos["chelsea"].size)
    resp, body = post("/api/search", {"upload": body["upload"], "k": 2})
    assert resp.status_code == 200 and len(body["results"]) == 2
    resp, body = post("/api/search", {"upload": "no-such-token", "k": 2})
    assert resp.status_code == 404 and body["error"]["code"] == "upload_not_found"
    resp, body = post("/api/search", {"text": "a cat", "K": 1}, valid=False)
    assert resp.status_code == 400 and "'K'" in body["error"]["message"]
    resp, body = post("/api/search", {"text": "a cat", "filter": {"widht": {"gte": 1}}})
    assert resp.status_code == 400 and "'widht'" in body["error"]["message"] and "'width'" in body["error"]["message"]

    resp, _ = get(f"/api/images/{first}", "/api/images/{image_id}")
    assert resp.status_code == 200 and resp.mimetype.startswith("image/")
    resp, _ = get(f"/api/images/{first}?size=64", "/api/images/{image_id}")
    assert resp.mimetype == "image/jpeg"
    resp, body = get("/api/images/0123456789abcde", "/api/images/{image_id}")
    assert resp.status_code == 404
    resp, body = get(f"/api/images/{first}/meta", "/api/images/{image_id}/meta")
    assert resp.status_code == 200 and body["id"] == first

    resp, body = post("/api/attribution", {"text": "a cat", "result_id": first, "format": "json", "max_side": 16})
    assert resp.status_code == 200 and body["result_id"] == first
    resp, _ = post("/api/attribution", {"text": "a cat", "result_id": first})
    assert resp.status_code == 200 and resp.mimetype == "image/png"
    resp, body = post("/api/attribution/pair", {"image_id": first, "result_id": engine.records.shard_ids[0][1],
                                                "format": "json", "max_side": 16})
    assert resp.status_code == 200

    resp, body = post("/api/duplicates", {"image": upload, "k": 3})
    assert resp.status_code == 200 and isinstance(body["matches"], list)
    resp, body = post("/api/duplicates", {"image_id": first, "threshold": 9}, valid=False)
    assert resp.status_code == 400

    resp, body = post("/api/classify", {"image_id": first, "k": 2, "vocabulary": "captions"})
    assert resp.status_code == 200 and len(body["labels"]) == 2
    resp, body = post("/api/classify", {"image_id": first, "vocabulary": "wordnet"}, valid=False)
    assert resp.status_code == 400

    resp, body = _wait_ready(client, spec, "/api/duplicates/groups?limit=5")
    seen.add(("/api/duplicates/groups", "get"))
    assert resp.status_code == 200 and body["status"] == "ready"
    resp, body = get("/api/duplicates/groups?limit=0", "/api/duplicates/groups")
    assert resp.status_code == 400

    resp, body = get("/healthz", "/healthz")
    assert body["status"] == "ok" and "openapi" in body["features"]
    resp, _ = get("/metrics", "/metrics")
    assert b"loupe_" in resp.data
    resp, _ = get("/", "/")
    assert resp.status_code == 200
    resp, body = get("/openapi.json", "/openapi.json")
    assert body == spec
    resp, _ = get("/docs", "/docs")
    assert b"/openapi.json" in client.get("/docs/init.js").data
    assert seen == {(p, m) for p, ops in spec["paths"].items() for m in ops}


def test_healthz_without_an_index_is_documented(spec):
    client = create_app().test_client()
    resp = client.get("/healthz")
    assert resp.status_code == 503
    check(spec, resp, "/healthz")
    resp = client.post("/api/search", json={"text": "a cat"})
    assert resp.status_code == 503
    check(spec, resp, "/api/search", "post")


def test_the_spec_documents_what_a_response_may_not_leave_out(spec):
    """A response missing a required key, or carrying an undocumented one, fails validation (the check bites)."""
    search = spec["components"]["schemas"]["SearchResponse"]
    good = {"results": [], "took_ms": 1.0, "encoder": "e", "score_kind": "cosine", "timings": {}}
    validate(spec, search, good)
    for bad in ({k: v for k, v in good.items() if k != "score_kind"}, {**good, "score_kind": "z"},
                {**good, "surprise": 1}):
        with pytest.raises(AssertionError):
            validate(spec, search, bad)


# -- /docs in a browser -------------------------------------------------------------------------------
def test_docs_page_renders_the_spec_offline(browser, engine, spec):
    pytest.importorskip("swagger_ui_bundle")
    from werkzeug.serving import make_server

    httpd = make_server("127.0.0.1", 0, create_app(engine=engine), threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_port}"
    outside, errors = [], []
    page = browser.new_page()
    try:
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(base)
                   else (outside.append(route.request.url), route.abort()))
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"{base}/docs")
        page.wait_for_selector(".opblock", timeout=30_000)
        operations = sum(len(ops) for ops in spec["paths"].values())
        assert page.locator(".opblock").count() == operations
        assert page.locator(".opblock-summary-path[data-path='/api/search']").count() == 1
        page.locator("#operations-search-search .opblock-summary").click()     # expand: the request schema
        example = page.wait_for_selector("#operations-search-search .body-param__example", timeout=10_000)
        assert '"k": ' in example.inner_text() and '"filter": ' in example.inner_text()   # the generated body
        assert not outside and not errors, (outside, errors)
    finally:
        page.close()
        httpd.shutdown()
        thread.join(5)


def test_docs_page_without_swagger_ui_lists_the_operations(client, spec, monkeypatch):
    import server.openapi as openapi

    monkeypatch.setattr(openapi, "swagger_ui_dir", lambda: None)
    html = client.get("/docs").get_data(as_text=True)
    for path in spec["paths"]:
        assert f" {path}</code>" in html
    assert client.get("/docs/static/swagger-ui-bundle.js").status_code == 404


def test_docs_assets_are_an_allow_list(client):
    assert client.get("/docs/static/swagger-ui-bundle.js").status_code == 200
    for name in ("index.html", "..%2Fswagger_ui_bundle%2F__init__.py", "swagger-initializer.js"):
        assert client.get(f"/docs/static/{name}").status_code == 404


def test_spec_builds_fresh(spec):
    a = build_spec("1")
    b = copy.deepcopy(a)
    a["paths"].clear()
    assert build_spec("1") == b
