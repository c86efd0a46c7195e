"""Hardening (#18): reads outside the index, and the HTTP side of bounded resources.

* ``/api/images/<id>`` (and thumbnails, and every reader of source files) serves only the bytes that were
  indexed: a file swapped for a symlink to a secret, edited, or turned into a FIFO is a 404;
* manifest.json shard / encoder names cannot point outside the index;
* the Host check (DNS rebinding), JSON bodies need a JSON (or form) Content-Type, deep JSON is a 400;
* ``--hide-paths`` and error messages without server paths;
* waitress: oversized bodies refused early (JSON 413), slow clients cannot lock others out;
* /metrics labels stay bounded whatever methods clients invent.

Network: only 127.0.0.1; every loop is bounded.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _engine_helpers import build_index, image_rows, unit
from PIL import Image

from retrieval.engine.engine import Engine
from retrieval.errors import IndexFormatError, UnknownIdError
from retrieval.index import records as records_module
from retrieval.index import store
from server.app import create_app
from server.security import default_allowed_hosts, host_allowed

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "grey": (128, 128, 128)}


def _assert_error(resp, status, code):
    assert resp.status_code == status, resp.get_data(as_text=True)[:300]
    body = resp.get_json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert "Traceback" not in resp.get_data(as_text=True)
    return body["error"]["message"]


def _photo_index(root: Path) -> tuple[Path, dict[str, Path]]:
    """PNG/JPEG files in ``root/photos/{a,b}/`` indexed with random vectors (no encoder needed)."""
    paths = {}
    for i, (name, rgb) in enumerate(COLOURS.items()):
        folder = root / "photos" / ("a" if i % 2 == 0 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.new("RGB", (48 + i, 32), rgb)
        path = folder / (f"{name}.png" if i < 2 else f"{name}.jpg")
        img.save(path)
        paths[name] = path
    rows = image_rows(sorted(paths.values()))
    vecs = unit(np.random.default_rng(0).standard_normal((len(rows), 8)))
    return build_index(root / "index", {"e": vecs}, rows=rows), paths


def _id(path: Path) -> str:
    return store.content_id(store.sha256_bytes(path.read_bytes()))


@pytest.fixture
def photo_index(tmp_path):
    out, paths = _photo_index(tmp_path)
    engine = Engine(out, device="cpu")
    return engine, {name: (_id(p), p) for name, p in paths.items()}


# -- 1. reads outside the index -----------------------------------------------------------------------
def test_indexed_file_swapped_for_a_symlink_to_a_secret_is_not_served(tmp_path, photo_index):
    engine, files = photo_index
    client = create_app(engine=engine).test_client()
    red_id, red_path = files["red"]
    ok = client.get(f"/api/images/{red_id}")
    assert ok.status_code == 200 and ok.mimetype == "image/png" and ok.data == red_path.read_bytes()

    secret = tmp_path / "shadow"
    secret.write_bytes(b"root:$6$secret-hash:19000:0:99999:7:::\n" * 20)
    red_path.unlink()
    red_path.symlink_to(secret)
    for url in (f"/api/images/{red_id}", f"/api/images/{red_id}?size=64"):
        resp = client.get(url)
        message = _assert_error(resp, 404, "not_found")
        assert b"root:" not in resp.data and "changed or is gone" in message and str(tmp_path) not in message
        assert "immutable" not in resp.headers.get("Cache-Control", "")
    for read in (engine.source_bytes, engine.source_file, engine.load_image):
        with pytest.raises(UnknownIdError):
            read(red_id)


def test_swapped_for_another_image_edited_or_a_fifo_is_a_404_and_thumbnails_follow(photo_index):
    engine, files = photo_index
    client = create_app(engine=engine).test_client()
    green_id, green_path = files["green"]
    blue_id, blue_path = files["blue"]
    grey_id, grey_path = files["grey"]
    green_path.unlink()
    green_path.symlink_to(blue_path)               # another (indexed, valid) image: still not this id's
    blue_path.write_bytes(b"\xff\xd8\xff" + b"\0" * (blue_path.stat().st_size - 3))   # same size, new bytes
    grey_path.unlink()
    os.mkfifo(grey_path)                           # must not block a worker
    for image_id in (green_id, blue_id, grey_id):
        t0 = time.perf_counter()
        _assert_error(client.get(f"/api/images/{image_id}?size=32"), 404, "not_found")
        _assert_error(client.get(f"/api/images/{image_id}"), 404, "not_found")
        assert time.perf_counter() - t0 < 5


def test_unchanged_content_is_served_moved_touched_or_behind_a_symlink(tmp_path, photo_index, monkeypatch):
    engine, files = photo_index
    client = create_app(engine=engine).test_client()
    red_id, red_path = files["red"]
    hashed = []
    real = records_module._hash_stream
    monkeypatch.setattr(records_module, "_hash_stream", lambda *a, **kw: hashed.append(1) or real(*a, **kw))
    for _ in range(3):
        assert client.get(f"/api/images/{red_id}").status_code == 200
    assert len(hashed) == 1                        # hashed once per file version, not per request
    os.utime(red_path, (1_000_000, 1_000_000))     # touched: a new version, same content
    assert client.get(f"/api/images/{red_id}").status_code == 200 and len(hashed) == 2
    moved = tmp_path / "elsewhere.png"
    shutil.move(red_path, moved)
    red_path.symlink_to(moved)                     # same bytes behind a symlink: still the indexed image
    resp = client.get(f"/api/images/{red_id}")
    assert resp.status_code == 200 and resp.data == moved.read_bytes()
    assert client.get(f"/api/images/{red_id}", headers={"If-None-Match": f'"{red_id}"'}).status_code == 304
    part = client.get(f"/api/images/{red_id}", headers={"Range": "bytes=0-9"})
    assert part.status_code == 206 and part.data == moved.read_bytes()[:10]


# -- 2. manifest names ---------------------------------------------------------------------------------
def test_manifest_shard_and_encoder_names_cannot_leave_the_index(tmp_path):
    vecs = unit(np.random.default_rng(1).standard_normal((4, 8)))
    out = build_index(tmp_path / "idx", {"e": vecs})
    # a complete shard outside the index, where "../../outside" would lead the reader
    shutil.copy(store.meta_path(out, "shard-00000"), tmp_path / "outside.parquet")
    shutil.copy(store.vectors_path(out, "e", "shard-00000"), tmp_path / "outside.faiss")
    manifest = json.loads((out / "manifest.json").read_text())
    bad = dict(manifest, shards=[{"name": "../../outside", "count": 4}])
    (out / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(IndexFormatError, match=r"shard '\.\./\.\./outside'.*shard-NNNNN"):
        Engine(out, device="cpu")
    for shards in ([{"name": "../../etc/passwd", "count": 4}], [{"name": "shard-00000\n", "count": 4}]):
        (out / "manifest.json").write_text(json.dumps(dict(manifest, shards=shards)))
        with pytest.raises(IndexFormatError):
            store.read_manifest(out)
    for name in ("../e", "a/b", "..", ".hidden"):
        enc = dict(manifest["encoders"]["e"], name=name)
        (out / "manifest.json").write_text(json.dumps(dict(manifest, encoders={name: enc})))
        with pytest.raises(IndexFormatError, match="encoder"):
            store.read_manifest(out)
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert Engine(out, device="cpu").count == 4


# -- 3. Host check -------------------------------------------------------------------------------------
def test_host_check(photo_index):
    engine, _ = photo_index
    app = create_app({"ALLOWED_HOSTS": default_allowed_hosts("127.0.0.1", ["photos.example.org"])}, engine=engine)
    client = app.test_client()
    for host in ("localhost", "localhost:8080", "127.0.0.1:9000", "[::1]:8080", "LOCALHOST.", "photos.example.org"):
        assert client.get("/healthz", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", "evil.example:8080", "127.0.0.1.evil.example", "localhost.evil.example"):
        _assert_error(client.get("/healthz", headers={"Host": host}), 403, "forbidden_host")
        _assert_error(client.post("/api/search", json={"text": "x"}, headers={"Host": host}), 403, "forbidden_host")
    # create_app without ALLOWED_HOSTS (tests, embedding) does not check
    assert create_app(engine=engine).test_client().get("/healthz", headers={"Host": "evil.example"}).status_code == 200
    # bound to every address: IP addresses and this machine's name pass, other names do not
    wildcard = default_allowed_hosts("0.0.0.0")
    assert host_allowed("192.168.1.20:8080", wildcard) and host_allowed("[fe80::1]:80", wildcard)
    assert host_allowed(socket.gethostname(), wildcard) and not host_allowed("evil.example", wildcard)


# -- 4. media types, POST-only costly endpoints, deep JSON ---------------------------------------------
def test_json_apis_need_a_json_or_form_content_type(photo_index):
    engine, _ = photo_index
    client = create_app(engine=engine).test_client()
    body = json.dumps({"vector": [1.0] * 8, "k": 2})
    assert client.post("/api/search", data=body, content_type="application/json").status_code == 200
    assert client.post("/api/search", data=body, content_type="application/json; charset=utf-8").status_code == 200
    for ctype in ("text/plain", "text/plain;charset=UTF-8", "application/octet-stream", None):
        resp = client.post("/api/search", data=body, content_type=ctype) if ctype else \
            client.post("/api/search", data=body)
        _assert_error(resp, 415, "unsupported_media_type")
    form = client.post("/api/search", data={"vector": json.dumps([1.0] * 8), "k": "2"},
                       content_type="application/x-www-form-urlencoded")
    assert form.status_code == 200, form.get_data(as_text=True)


def test_costly_endpoints_are_post_only(photo_index):
    engine, files = photo_index
    app = create_app(engine=engine)
    client = app.test_client()
    if "attribution" not in app.extensions["loupe"]["features"]:
        pytest.skip("no attribution feature in this build")
    red_id = files["red"][0]
    _assert_error(client.get(f"/api/attribution?result_id={red_id}&image_id={red_id}"), 405, "method_not_allowed")
    _assert_error(client.post("/api/attribution", data=json.dumps({"result_id": red_id, "image_id": red_id}),
                              content_type="text/plain"), 415, "unsupported_media_type")
    result = client.post("/api/search", json={"vector": [1.0] * 8, "k": 1}).get_json()["results"][0]
    assert result["attribution_url"] == "/api/attribution"
    for path in ("/api/search", "/api/duplicates", "/api/classify"):
        assert client.get(f"{path}?image_id={red_id}").status_code == 405


def test_deeply_nested_json_is_a_400_not_a_500(photo_index):
    engine, _ = photo_index
    client = create_app(engine=engine).test_client()
    deep = '{"filter": ' + "[" * 100_000 + "]" * 100_000 + "}"
    _assert_error(client.post("/api/search", data=deep, content_type="application/json"), 400, "invalid_json")
    medium = '{"vector": [1,2], "filter": ' + '{"a": ' * 60 + "1" + "}" * 60 + "}"
    _assert_error(client.post("/api/search", data=medium, content_type="application/json"), 400, "invalid_json")
    resp = client.post("/api/search", data={"vector": json.dumps([1.0] * 8), "filter": "[" * 100_000},
                       content_type="multipart/form-data")
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] in ("invalid_json", "bad_request")


# -- 5. paths --------------------------------------------------------------------------------------------
def test_hide_paths_and_no_server_paths_in_errors(tmp_path, photo_index):
    engine, files = photo_index
    q = {"vector": [1.0] * 8, "k": 4}
    shown = create_app(engine=engine).test_client().post("/api/search", json=q).get_json()["results"]
    assert all(r["path"].startswith(str(tmp_path)) for r in shown)
    app = create_app({"HIDE_PATHS": True}, engine=engine)

    @app.get("/broken-index")
    def broken():
        raise IndexFormatError(f"vector shard {tmp_path}/index/e/shard-00000.faiss is unreadable; rerun `loupe index`")

    client = app.test_client()
    hidden = client.post("/api/search", json=q).get_json()["results"]
    by_id = {iid: p for iid, p in files.values()}
    for r in hidden:
        want = by_id[r["id"]].relative_to(tmp_path / "photos").as_posix()
        assert r["path"] == want and r["metadata"]["source"] == want
        assert str(tmp_path) not in json.dumps(r)
    # filters take the paths as shown; substring / range tests on the absolute paths would be an oracle
    in_a = client.post("/api/search", json={**q, "filter": {"path": {"prefix": "a/"}}}).get_json()["results"]
    assert sorted(r["path"] for r in in_a) == ["a/blue.jpg", "a/red.png"]
    one = client.post("/api/search", json={**q, "filter": {"source": "b/grey.jpg"}}).get_json()["results"]
    assert [r["path"] for r in one] == ["b/grey.jpg"]
    probe = {"path": {"prefix": str(tmp_path)}}
    assert client.post("/api/search", json={**q, "filter": probe}).get_json()["results"] == []
    # every operator works on the paths as shown (the page's "path contains"), none on the stored ones:
    # the server's folder name is in every stored path and in no shown one
    for op in ("contains", "gte", "lte", "eq"):
        resp = client.post("/api/search", json={**q, "filter": {"path": {op: tmp_path.name}}})
        assert resp.status_code == 200, resp.get_json()
        if op != "lte":
            assert resp.get_json()["results"] == []
    for op, value, want in (("contains", "A/", ["a/blue.jpg", "a/red.png"]), ("contains", "grey", ["b/grey.jpg"]),
                            ("gte", "b/", ["b/green.png", "b/grey.jpg"])):
        got = client.post("/api/search", json={**q, "filter": {"path": {op: value}}}).get_json()["results"]
        assert sorted(r["path"] for r in got) == want, (op, value)
    # the same engine without --hide-paths filters the stored paths again
    plain = create_app(engine=engine).test_client()
    got = plain.post("/api/search", json={**q, "filter": {"path": {"contains": tmp_path.name}}}).get_json()
    assert len(got["results"]) == 4
    red_id, red_path = files["red"]
    red_path.unlink()
    message = _assert_error(client.get(f"/api/images/{red_id}"), 404, "not_found")
    assert str(tmp_path) not in message and "red.png" not in message
    message = _assert_error(client.get("/broken-index"), 503, "index_format")
    assert str(tmp_path) not in message and "shard-00000.faiss" in message and "/api/images" not in message


# -- 6. bounded resources: metrics labels, waitress ---------------------------------------------------------
def test_metrics_labels_stay_bounded_whatever_the_methods(photo_index):
    engine, _ = photo_index
    client = create_app(engine=engine).test_client()
    client.get("/healthz")
    before = len(client.get("/metrics").data)
    for i in range(300):
        client.open(f"/api/nothing-{i}", method=f"MADEUP{i}")
        client.open("/healthz", method=f"X{i}")
    text = client.get("/metrics").get_data(as_text=True)
    assert "MADEUP" not in text and 'method="X1"' not in text and "nothing-1" not in text
    assert 'method="other"' in text and len(text) < before + 4000


@contextlib.contextmanager
def _serving(app, limits=None):
    """``serve_app`` (waitress) in a thread on a free 127.0.0.1 port; stopped on exit."""
    from loupe.cli.cmd_serve import serve_app, stop_server

    started = threading.Event()
    holder = {}

    def ready(server):
        holder["server"] = server
        started.set()

    thread = threading.Thread(target=serve_app, args=(app, "127.0.0.1", 0, 4),
                              kwargs={"ready": ready, "limits": limits}, daemon=True)
    thread.start()
    assert started.wait(30), "the server did not start"
    try:
        yield holder["server"].effective_port
    finally:
        stop_server(holder["server"])
        thread.join(15)
        assert not thread.is_alive(), "the server did not stop"


def _request(port, method, path, body=None, headers=None, timeout=5.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), resp.read()
    finally:
        conn.close()


def _raw_exchange(port: int, head: bytes, body_start: bytes = b"", timeout: float = 5.0) -> tuple[bytes, bytes]:
    """Send a request head and the start of its body, then read the answer (head, body) until the server
    closes the connection or ``timeout``."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + body_start)
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            data += chunk
    answer_head, _, answer_body = data.partition(b"\r\n\r\n")
    return answer_head, answer_body


def test_waitress_refuses_oversized_bodies_early_with_json(photo_index):
    engine, _ = photo_index
    app = create_app({"MAX_UPLOAD_BYTES": 1 << 20}, engine=engine)   # MAX_CONTENT_LENGTH: 2.33 MB
    limit = app.config["MAX_CONTENT_LENGTH"]
    with _serving(app) as port:
        status, _, _ = _request(port, "GET", "/healthz")
        assert status == 200
        # 100 MB announced, or just one byte over the app's limit, a few bytes sent: answered at once with
        # the app's JSON 413, without waiting for (or storing) the body
        for length in (100 << 20, limit + 1):
            t0 = time.perf_counter()
            head, body = _raw_exchange(port, b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                             b"Content-Type: application/json\r\n"
                                             b"Content-Length: %d\r\n\r\n" % length, b'{"image": "' + b"A" * 60_000)
            assert head.startswith(b"HTTP/1.1 413") and b"application/json" in head.lower(), head
            assert json.loads(body)["error"]["code"] == "payload_too_large" and time.perf_counter() - t0 < 4
        # malformed requests are JSON errors too (waitress answers them itself)
        head, body = _raw_exchange(port, b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                         b"Content-Length: nope\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and json.loads(body)["error"]["code"] == "bad_request"
        # the Host check is on for served apps
        status, _, body = _request(port, "GET", "/healthz", headers={"Host": "evil.example"})
        assert status == 403 and json.loads(body)["error"]["code"] == "forbidden_host"


def test_slow_clients_do_not_lock_out_others(photo_index):
    from loupe.cli.cmd_serve import ServeLimits

    engine, files = photo_index
    app = create_app(engine=engine)
    n_slow = 120
    limits = ServeLimits(head_timeout=3, cleanup_interval=1)
    request_head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow-client-" + b"x" * 200
    with _serving(app, limits) as port:
        slow = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n_slow)]
        for s in slow:
            s.setblocking(False)
        closed_by_server: set[int] = set()
        latencies = []
        t_start = time.monotonic()
        try:
            for step in range(len(request_head)):          # one byte per socket per step: a slow-loris head
                if time.monotonic() - t_start > 12:
                    break
                for i, s in enumerate(slow):
                    if i in closed_by_server:
                        continue
                    try:
                        s.send(request_head[step:step + 1])
                        if s.recv(1) == b"":
                            closed_by_server.add(i)
                    except BlockingIOError:
                        pass
                    except OSError:
                        closed_by_server.add(i)
                if step % 5 == 0:                            # meanwhile, a normal client on a new connection
                    t0 = time.perf_counter()
                    status, _, body = _request(port, "GET", f"/api/images/{files['red'][0]}", timeout=10)
                    latencies.append(time.perf_counter() - t0)
                    assert status == 200
                if len(closed_by_server) == n_slow and step >= 40:
                    break
                time.sleep(0.1)
        finally:
            for s in slow:
                s.close()
    print(f"\n{n_slow} slow clients: normal requests answered in max {max(latencies) * 1e3:.0f} ms "
          f"(median {sorted(latencies)[len(latencies) // 2] * 1e3:.0f} ms, {len(latencies)} requests); "
          f"{len(closed_by_server)} slow connections closed by the server after "
          f"{time.monotonic() - t_start:.1f} s")
    assert len(latencies) >= 5 and max(latencies) < 3.0
    assert len(closed_by_server) == n_slow          # their request heads took longer than head_timeout


def test_thumbnails_still_render_and_cache(photo_index):
    """Sanity: a normal thumbnail round trip still works and is cached (JPEG, longer side = size)."""
    engine, files = photo_index
    app = create_app(engine=engine)
    client = app.test_client()
    blue_id = files["blue"][0]
    for _ in range(2):
        resp = client.get(f"/api/images/{blue_id}?size=16")
        assert resp.status_code == 200 and resp.mimetype == "image/jpeg"
        assert max(Image.open(io.BytesIO(resp.data)).size) == 16
    assert app.extensions["loupe"]["thumbnails"].hits == 1


def test_loupe_serve_always_checks_hosts_and_passes_its_flags(tmp_path, monkeypatch):
    import loupe.cli.cmd_serve as cmd_serve
    from loupe.cli.main import build_parser

    out = build_index(tmp_path / "idx", {"e": unit(np.random.default_rng(2).standard_normal((3, 8)))})
    seen = {}
    monkeypatch.setattr(cmd_serve, "serve_app", lambda app, host, port, threads, limits: seen.update(
        app=app, host=host, limits=limits))
    args = build_parser().parse_args(["serve", str(out), "--no-preload", "--allowed-host", "photos.example.org",
                                      "--allowed-host", "Other.Example.", "--hide-paths", "--max-connections", "50"])
    assert cmd_serve.run(args) == 0
    config = seen["app"].config
    assert set(config["ALLOWED_HOSTS"]) == {"127.0.0.1", "localhost", "::1", "photos.example.org", "other.example"}
    assert config["HIDE_PATHS"] is True and seen["limits"].connection_limit == 50
    client = seen["app"].test_client()
    assert client.get("/healthz", headers={"Host": "other.example:8080"}).status_code == 200
    _assert_error(client.get("/healthz", headers={"Host": "evil.example"}), 403, "forbidden_host")
