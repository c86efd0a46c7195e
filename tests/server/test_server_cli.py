"""`loupe serve` end to end: waitress in a subprocess on a random port, then a graceful SIGTERM."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _engine_helpers import build_index, unit

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port, path, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    if body is None:
        conn.request("GET", path)
    else:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.read(), dict(resp.getheaders())


def test_serve_answers_then_stops_gracefully_on_sigterm(tmp_path):
    vecs = unit(np.random.default_rng(0).standard_normal((30, 8)))
    out = build_index(tmp_path / "idx", {"e": vecs}, shard_sizes=[10, 20])
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "loupe", "serve", str(out), "--port", str(port), "--no-preload"],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                status, body, _ = _get(port, "/healthz")
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.time() < deadline, "server did not start"
                time.sleep(0.2)
        assert status == 200 and json.loads(body)["images"] == 30
        status, body, headers = _get(port, "/api/search", {"vector": vecs[3].tolist(), "k": 2})
        assert status == 200 and len(json.loads(body)["results"]) == 2
        assert "waitress" in headers.get("Server", "") or headers.get("Server", "").startswith("loupe")
        status, body, _ = _get(port, "/api/search", {"k": 2})
        assert status == 400 and json.loads(body)["error"]["code"] == "invalid_query"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        err = proc.stderr.read()
        assert "127.0.0.1" in err and "stopped" in err.lower() and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
