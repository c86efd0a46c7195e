"""``SearchRequest``: one request type, validated once, built the same way by the server and the CLI."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from _engine_helpers import build_index, unit
from flask import Flask

from loupe.cli import cmd_search
from retrieval.engine import MAX_K, Engine, SearchRequest
from retrieval.errors import InvalidFieldError, InvalidQueryError
from server.requests import AttributionRequest, ClassifyRequest, DuplicatesRequest, search_request


def _server_request(parse, **kwargs):
    app = Flask(__name__)
    app.config["MAX_UPLOAD_BYTES"] = 1 << 20
    with app.test_request_context("/api/x", method="POST", **kwargs):
        return parse()


def test_unknown_field_is_an_error_that_names_it():
    with pytest.raises(InvalidFieldError, match="'txet'"):
        SearchRequest.from_fields({"txet": "a cat"})
    with pytest.raises(InvalidFieldError, match="'colour_weight'"):
        _server_request(search_request, json={"text": "a cat", "colour_weight": 2})
    with pytest.raises(InvalidFieldError, match="'threshold'"):
        _server_request(search_request, json={"text": "a cat", "threshold": 0.5})   # a /api/duplicates field
    with pytest.raises(InvalidFieldError, match="'rerank'"):
        _server_request(DuplicatesRequest.parse, json={"image_id": "0" * 15, "rerank": True})
    with pytest.raises(InvalidFieldError, match="'bogus'"):
        _server_request(AttributionRequest.parse, json={"text": "x", "result_id": "0" * 15, "bogus": 1})


def test_one_k_limit_everywhere():
    assert SearchRequest(text="x", k=MAX_K).k == MAX_K
    for bad in (0, MAX_K + 1):
        with pytest.raises(InvalidQueryError, match=f"1..{MAX_K}"):
            SearchRequest(text="x", k=bad)
    with pytest.raises(InvalidFieldError):
        SearchRequest(text="x", k=2.5)
    with pytest.raises(InvalidFieldError):
        SearchRequest(text="x", k=True)


def test_form_strings_are_converted_json_types_are_not():
    req = SearchRequest.from_fields({"text": "a cat", "k": "5", "rerank": "true", "filter": '{"width": {"gte": 2}}'},
                                    form=True)
    assert (req.k, req.rerank, req.filter) == (5, True, {"width": {"gte": 2}})
    with pytest.raises(InvalidFieldError):
        SearchRequest.from_fields({"text": "a cat", "k": "5"})          # JSON: a string is not a number
    with pytest.raises(InvalidFieldError):
        SearchRequest.from_fields({"text": "a cat", "rerank": "maybe"}, form=True)


def test_query_rules():
    with pytest.raises(InvalidQueryError, match="missing query"):
        SearchRequest(k=3)
    with pytest.raises(InvalidQueryError, match="not both"):
        SearchRequest(image=b"x", image_id="0" * 15)
    with pytest.raises(InvalidQueryError, match="raw vector"):
        SearchRequest(vector=[1.0, 2.0], text="x")
    with pytest.raises(InvalidQueryError, match="needs an image"):
        SearchRequest(instruction="at night", vector=[1.0])
    with pytest.raises(InvalidQueryError, match="composition method"):
        SearchRequest(image_id="0" * 15, instruction="in red", method="magic")
    with pytest.raises(InvalidQueryError):
        SearchRequest(text="x", filter={"width": {"near": 3}})     # filter syntax, before any embedding
    req = SearchRequest(image_id="0" * 15, text="but at night")   # text with an image is the instruction
    assert (req.text, req.instruction) == (None, "but at night")
    assert SearchRequest(image_id="0" * 15, instruction="x", weight=0.3).composition == "sum"
    assert SearchRequest(text="x", dedup=True).dedup_threshold == 0.98
    assert SearchRequest(text="x").dedup_threshold is None


def test_cli_flags_and_http_json_build_the_same_request():
    parser = argparse.ArgumentParser()
    cmd_search.add_arguments(parser)
    args = parser.parse_args(["DIR", "--text", "a red car", "-k", "7", "--rerank", "--filter",
                              '{"width": {"gte": 10}}', "--dedup", "--no-colour"])
    from_cli = cmd_search.search_request(args)
    from_http = _server_request(search_request, json={"text": "a red car", "k": 7, "rerank": True,
                                                      "filter": {"width": {"gte": 10}}, "dedup": True,
                                                      "colour": False, "method": "auto"})
    assert from_cli == from_http


def test_endpoint_defaults_come_from_their_request_types():
    assert _server_request(ClassifyRequest.parse, json={"image_id": "0" * 15}).k == 5
    assert _server_request(DuplicatesRequest.parse, json={"image_id": "0" * 15}).k == 10
    assert _server_request(DuplicatesRequest.parse, json={"image_id": "0" * 15, "k": 500}).k == 100
    assert _server_request(search_request, json={"text": "x"}).k == 20
    with pytest.raises(InvalidFieldError):
        _server_request(ClassifyRequest.parse, json={"image_id": "0" * 15, "vocabulary": "wordnet"})


def test_the_engine_receives_the_request_unchanged(tmp_path, monkeypatch):
    vecs = unit(np.random.default_rng(0).standard_normal((40, 16)))
    engine = Engine(build_index(tmp_path / "idx", {"e": vecs}, shard_sizes=[15, 25]))
    seen = []
    real = engine.embedder.embed
    monkeypatch.setattr(engine.embedder, "embed", lambda req, **kw: seen.append(req) or real(req, **kw))
    req = SearchRequest(vector=vecs[3].tolist(), k=4)
    resp = engine.search(req)
    assert seen == [req] and seen[0] is req
    assert resp.ids[0] == engine.records.shard_ids[0][3]
    assert engine.search(vector=vecs[3].tolist(), k=4).ids == resp.ids      # fields build the same request
