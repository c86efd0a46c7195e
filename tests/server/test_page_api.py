"""What the page's new views need from the API: ``offset`` (a next page is ranks offset..offset+k of the
same ranking; bad values are 400s) and ``GET /api/duplicates/groups`` (the collection's copy groups, as
``loupe dedup`` finds them, computed once per index version, paged)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from _engine_helpers import build_index, unit
from _page_site import shared_site

from retrieval.engine.request import MAX_K, SearchRequest


@pytest.fixture(scope="module")
def vector_engine(tmp_path_factory):
    from retrieval.engine.engine import Engine

    rng = np.random.default_rng(7)
    vecs = unit(rng.normal(size=(300, 16)))
    idx = build_index(tmp_path_factory.mktemp("offset-index"), {"vec": vecs}, shard_sizes=[120, 100, 80])
    return Engine(idx, device="cpu"), vecs


def test_offset_pages_are_ranks_of_one_larger_query(vector_engine):
    from server.app import create_app

    engine, vecs = vector_engine
    q = unit(np.random.default_rng(1).normal(size=16)).tolist()
    whole = engine.search(vector=q, k=60).hits
    order = np.argsort(-(vecs @ np.asarray(q, np.float32)), kind="stable")     # brute force
    assert [h.score for h in whole] == pytest.approx(sorted((vecs @ np.asarray(q, np.float32))[order[:60]],
                                                            reverse=True), abs=1e-5)
    for offset in (0, 20, 40):
        page = engine.search(vector=q, k=20, offset=offset).hits
        assert [h.id for h in page] == [h.id for h in whole[offset:offset + 20]]
    # through HTTP (JSON and a form's strings), with a filter: the filtered ranking's second page
    client = create_app(engine=engine).test_client()
    flt = {"group": "even"}
    big = client.post("/api/search", json={"vector": q, "k": 30, "filter": flt}).get_json()
    page2 = client.post("/api/search", json={"vector": q, "k": 10, "offset": 10, "filter": flt}).get_json()
    assert page2["offset"] == 10
    assert [r["id"] for r in page2["results"]] == [r["id"] for r in big["results"][10:20]]
    assert all(r["metadata"]["group"] == "even" for r in page2["results"])
    # past the end: an empty page, not an error
    tail = client.post("/api/search", json={"vector": q, "k": 50, "offset": 290}).get_json()
    assert len(tail["results"]) == 10


@pytest.mark.parametrize("offset,code", [(-1, "invalid_query"), ("ten", "bad_request"), (True, "bad_request"),
                                         (2.5, "bad_request"), (MAX_K, "invalid_query"), (991, "invalid_query")])
def test_bad_offsets_are_400(vector_engine, offset, code):
    from server.app import create_app

    engine, _ = vector_engine
    client = create_app(engine=engine).test_client()
    r = client.post("/api/search", json={"vector": [0.25] * 16, "k": 10, "offset": offset})
    assert r.status_code == 400 and r.get_json()["error"]["code"] == code, r.get_json()
    assert "offset" in r.get_json()["error"]["message"]


def test_offset_from_a_form_and_in_the_request():
    assert SearchRequest.from_fields({"text": "a", "k": "5", "offset": "15"}, form=True).offset == 15
    assert SearchRequest(text="a", k=10, offset=MAX_K - 10).offset == MAX_K - 10


# -- the collection's duplicate groups --------------------------------------------------------------
@pytest.fixture(scope="module")
def site(tmp_path_factory, photos):
    return shared_site(tmp_path_factory, photos)


def _ready(client, url):
    deadline = time.monotonic() + 300
    while True:
        r = client.get(url)
        if r.status_code != 202:
            return r
        body = r.get_json()
        assert body["status"] == "computing" and body["total"] > 0
        assert time.monotonic() < deadline, "the collection's duplicates took over 5 minutes"
        time.sleep(0.2)


@pytest.mark.slow
def test_duplicate_groups_are_the_librarys_groups_paged(site):
    from retrieval.copydetect.collection import dedup_index, describe_files
    from retrieval.engine.engine import Engine
    from server.app import create_app

    index, paths = site
    engine = Engine(index, device="cpu")
    client = create_app(engine=engine).test_client()
    first = client.get("/api/duplicates/groups?limit=1")
    assert first.status_code == 202                      # computed in the background, once
    body = _ready(client, "/api/duplicates/groups?limit=1").get_json()
    assert body["status"] == "ready" and body["images"] == engine.count
    ref = dedup_index(engine)
    describe_files(engine, ref)
    assert body["total"] == len(ref.groups) >= 2
    got = []
    for offset in range(body["total"]):
        page = client.get(f"/api/duplicates/groups?offset={offset}&limit=1").get_json()
        assert len(page["groups"]) == 1 and page["offset"] == offset
        got += page["groups"]
    assert [[m["id"] for m in g["members"]] for g in got] == [[ref.ids[r] for r in g] for g in ref.groups]
    assert [g["keep"] for g in got] == [ref.ids[ref.keeper(g)] for g in ref.groups]
    # the planted copies are grouped with their originals, and the (smaller) copy is the one to remove
    by_path = {str(p.resolve()): name for name, p in paths.items()}
    groups = [{by_path[m["path"]] for m in g["members"]} for g in got]
    for name in ("coffee", "rocket"):
        assert {name, f"copy_{name}"} in groups
    for g in got:
        keep = [m for m in g["members"] if m["keep"]]
        assert len(keep) == 1 and keep[0]["id"] == g["keep"] and g["keep"] not in g["remove"]
        assert not by_path[keep[0]["path"]].startswith("copy_")
    whole = client.get("/api/duplicates/groups?limit=200").get_json()
    assert whole["groups"] == got and whole["total"] == len(got)
    assert client.get(f"/api/duplicates/groups?offset={len(got)}").get_json()["groups"] == []


@pytest.mark.parametrize("query", ["limit=0", "limit=201", "limit=x", "offset=-1", "offset=1.5", "page=2"])
def test_duplicate_groups_bad_parameters_are_400(vector_engine, query):
    from server.app import create_app

    engine, _ = vector_engine
    r = create_app(engine=engine).test_client().get(f"/api/duplicates/groups?{query}")
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "bad_request"
