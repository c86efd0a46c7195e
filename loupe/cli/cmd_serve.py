"""`loupe serve`: serve an index over HTTP (JSON API + web page) with waitress.

Resource bounds (``ServeLimits``): waitress reads request bodies itself (spilling to a temporary file
past ``inbuf_overflow``) before the app sees them, so its ``max_request_body_size`` is the app's
``MAX_CONTENT_LENGTH``: a larger body is refused as soon as its ``Content-Length`` header arrives (or,
chunked, as soon as that many bytes came), with the same JSON 413 ``payload_too_large`` the app gives,
and the connection is closed. Waitress's own errors (malformed requests, headers over 256 KB) are JSON
too. Slow clients hold no worker thread (waitress buffers a request until it is complete), only a
connection: up to ``connection_limit`` are kept (``poll``, not ``select``, so past 1,024 descriptors),
a connection idle for ``channel_timeout`` seconds is closed, and so is one still sending its request
line and headers after ``head_timeout`` seconds or its whole request after ``request_timeout`` seconds
(checked every ``cleanup_interval`` seconds), so clients that trickle bytes cannot keep connections forever.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import signal
import sys
import threading
from dataclasses import dataclass

DESCRIPTION = """Serve an index over HTTP: the web page at /, the JSON API under /api, /healthz and
/metrics (Prometheus). Runs the waitress production WSGI server, bound to 127.0.0.1 unless --host
says otherwise; SIGTERM / Ctrl-C stop it gracefully (in-flight requests finish). Uploads are limited
to 20 MB (--max-upload-mb); larger bodies are refused before they are read. Only requests whose Host
is the bind address, localhost, 127.0.0.1 or [::1] (any port) are answered, others get 403 (a guard
against DNS rebinding): name the others with --allowed-host. The server never fetches URLs for clients."""

EPILOG = """examples:
  loupe serve ~/loupe-index                      # http://127.0.0.1:8080
  loupe serve ~/loupe-index --host 0.0.0.0 --port 9000 --threads 16 --allowed-host photos.example.org
  loupe serve ~/loupe-index --hide-paths         # results show 2023/cat.jpg, not /home/me/photos/2023/cat.jpg
"""

log = logging.getLogger("loupe.serve")


@dataclass
class ServeLimits:
    """How many connections waitress keeps, and for how long (see the module docstring)."""

    connection_limit: int = 1000     # open connections; more wait in the listen backlog
    channel_timeout: int = 30        # seconds a connection may stay idle
    head_timeout: int = 20           # seconds to send the request line and headers
    request_timeout: int = 300       # seconds to send a whole request (a 27 MB body at 100 KB/s: 280 s)
    cleanup_interval: int = 5        # seconds between checks of the above
    inbuf_overflow: int = 256 * 1024  # a body past this many bytes is buffered in a temporary file


def add_arguments(p) -> None:
    p.add_argument("dir", metavar="DIR", help="index directory (built by `loupe index`)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--threads", type=int, default=8, help="worker threads (default 8)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda (default auto)")
    p.add_argument("--max-upload-mb", type=int, default=20, help="largest accepted image upload (default 20)")
    p.add_argument("--no-preload", action="store_true",
                   help="load encoders (and the classifier's text database) on first use, not at start-up")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host is NAME (any port); repeatable. By default only the "
                        "bind address, localhost, 127.0.0.1 and [::1] are answered (with --host 0.0.0.0 also "
                        "this machine's name and IP addresses); '*' answers any name")
    p.add_argument("--hide-paths", action="store_true",
                   help="show results' paths (path, metadata source and aliases) relative to the deepest folder "
                        "holding every indexed file, never the server's absolute paths; search filters on "
                        "path/source then compare those relative paths (every operator, contains too)")
    p.add_argument("--max-connections", type=int, default=ServeLimits.connection_limit, metavar="N",
                   help=f"open connections kept at once (default {ServeLimits.connection_limit}); idle or "
                        "slow ones are closed after a timeout")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="serve with Ray Serve: searcher deployments per partition of the shards and a batched "
                        "query encoder, behind this same API (no ADDRESS: a local Ray cluster; "
                        "docs/distributed.md)")
    p.add_argument("--ray-partitions", type=int, default=2, metavar="N",
                   help="--ray: searcher deployments, each holding a group of shards (default 2)")
    p.add_argument("--ray-replicas", type=int, default=1, metavar="N",
                   help="--ray: num_replicas of each searcher deployment (default 1)")


def _raise_fd_limit(wanted: int) -> int:
    """Raise the soft open-files limit towards ``wanted`` (within the hard limit); the resulting soft limit."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return wanted if soft == resource.RLIM_INFINITY else soft


def _json_error_task(upload_limit_mb: int):
    """A waitress ``ErrorTask`` whose answer is Loupe's JSON error (waitress's own is text/plain)."""
    from waitress.task import ErrorTask

    codes = {400: "bad_request", 408: "request_timeout", 413: "payload_too_large",
             431: "request_header_fields_too_large", 500: "internal_error", 501: "not_implemented"}

    class JsonErrorTask(ErrorTask):
        def execute(self):
            e = self.request.error
            if e.code == 413:
                message = f"request too large: uploads are limited to {upload_limit_mb} MB"
            elif e.code >= 500:
                message = "internal server error (details are in the server log)"
            else:
                message = f"{e.reason}: {e.body}"
            body = json.dumps({"error": {"code": codes.get(e.code, "bad_request"), "message": message}}).encode()
            self.status = f"{e.code} {e.reason}"
            self.response_headers.append(("Content-Type", "application/json"))
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    return JsonErrorTask


def _bound_slow_requests(server, limits: ServeLimits) -> None:
    """Wrap ``server.maintenance`` (run every ``cleanup_interval`` s on the event loop): also close
    connections whose request is still arriving after ``head_timeout`` (headers) or ``request_timeout``."""
    idle_check = server.maintenance

    def maintenance(now: float) -> None:
        idle_check(now)
        for channel in list(server.active_channels.values()):
            parser = channel.request
            if parser is None or channel.requests:
                continue
            started = parser.__dict__.setdefault("_loupe_started", now)
            age = now - started
            if age > limits.request_timeout or (age > limits.head_timeout and not parser.headers_finished):
                log.info("closing a connection from %s: its request is still arriving after %.0f s",
                         channel.addr[0] if channel.addr else "?", age)
                channel.will_close = True

    server.maintenance = maintenance


def create_wsgi_server(app, host: str, port: int, threads: int = 8, limits: ServeLimits | None = None):
    """A waitress server for ``app`` with Loupe's bounds (not started: call ``run()``)."""
    from waitress import create_server
    from waitress.channel import HTTPChannel
    from waitress.server import BaseWSGIServer

    limits = limits or ServeLimits()
    connection_limit = max(1, min(limits.connection_limit, (_raise_fd_limit(limits.connection_limit * 2 + 256)
                                                           - 256) // 2))
    if connection_limit < limits.connection_limit:
        log.warning("the open-files limit allows %d connections, not %d", connection_limit, limits.connection_limit)
    max_body = int(app.config.get("MAX_CONTENT_LENGTH") or 0)
    upload_mb = int(app.config.get("MAX_UPLOAD_BYTES", 0)) // (1024 * 1024)
    kw = {"max_request_body_size": max_body + 1} if max_body else {}   # waitress refuses >= its limit
    socket_map: dict = {}
    server = create_server(app, map=socket_map, host=host, port=port, threads=threads, ident="loupe",
                           clear_untrusted_proxy_headers=True, connection_limit=connection_limit,
                           channel_timeout=limits.channel_timeout, cleanup_interval=limits.cleanup_interval,
                           inbuf_overflow=limits.inbuf_overflow, asyncore_use_poll=True, **kw)

    class Channel(HTTPChannel):
        error_task_class = _json_error_task(upload_mb)

    for listener in [d for d in socket_map.values() if isinstance(d, BaseWSGIServer)]:
        listener.channel_class = Channel
        _bound_slow_requests(listener, limits)
    server.loupe_map = socket_map
    return server


def stop_server(server) -> None:
    """Ask a running ``serve_app`` (e.g. in another thread) to stop: its event loop closes the listening
    sockets and connections, so ``server.run()`` returns. Safe to call from any thread."""
    from waitress import wasyncore
    from waitress.server import BaseWSGIServer

    socket_map = server.loupe_map
    listener = next(d for d in list(socket_map.values()) if isinstance(d, BaseWSGIServer))
    listener.trigger.pull_trigger(lambda: wasyncore.close_all(socket_map, ignore_all=True))


def serve_app(app, host: str, port: int, threads: int = 8, *, ready=None, limits: ServeLimits | None = None,
              allowed_hosts: list[str] | None = None) -> None:
    """Run ``app`` with waitress until SIGTERM/SIGINT (or :func:`stop_server`), then stop gracefully.

    Unless the app was given ``ALLOWED_HOSTS``, it answers the hosts of
    ``server.security.default_allowed_hosts(host, allowed_hosts)``."""
    from server.security import default_allowed_hosts

    if app.config.get("ALLOWED_HOSTS") is None:
        app.config["ALLOWED_HOSTS"] = default_allowed_hosts(host, allowed_hosts or ())
    server = create_wsgi_server(app, host, port, threads, limits)
    stopping = {"flag": False}

    def _stop(signum, _frame):
        if not stopping["flag"]:
            stopping["flag"] = True
            log.warning("received %s: shutting down", signal.Signals(signum).name)
        raise KeyboardInterrupt

    in_main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)} if in_main else {}
    url_host = f"[{host}]" if ":" in host else host
    print(f"Loupe is serving on http://{url_host}:{server.effective_port}/ (Ctrl-C to stop)", file=sys.stderr,
          flush=True)
    if ready is not None:
        ready(server)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        try:
            server.task_dispatcher.shutdown(cancel_pending=False, timeout=10)
        except TypeError:  # older waitress
            server.task_dispatcher.shutdown()
        for s, handler in old.items():
            signal.signal(s, handler)
        print("Loupe stopped.", file=sys.stderr, flush=True)


def run(args) -> int:
    from retrieval.device import one_query_per_thread
    from server.app import create_app
    from server.security import default_allowed_hosts

    # One request = one query vector: concurrency comes from the server's threads, and OpenMP teams
    # per query only contend with each other (measured: 10-20x slower on a busy 2-core machine); idle
    # BLAS threads spin on the encoder's cores (a plain image query 40-52 ms -> 25 ms on 2 cores).
    one_query_per_thread()
    # A fatal signal (SIGBUS from a memory-mapped file truncated in place, SIGSEGV) prints the thread
    # stacks to stderr instead of killing the server without a word.
    try:
        faulthandler.enable()
    except (OSError, ValueError, AttributeError):    # a stderr without a file descriptor (embedded, tests)
        pass

    logging.getLogger("loupe").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "ray", None):
        return _run_ray(args, {"DEVICE": args.device, "MAX_UPLOAD_BYTES": args.max_upload_mb * 1024 * 1024,
                               "ALLOWED_HOSTS": default_allowed_hosts(args.host, args.allowed_host),
                               "HIDE_PATHS": args.hide_paths},
                        ServeLimits(connection_limit=max(1, args.max_connections)))
    app = create_app({"INDEX_DIR": args.dir, "DEVICE": args.device,
                      "MAX_UPLOAD_BYTES": args.max_upload_mb * 1024 * 1024,
                      "PRELOAD_ENCODERS": not args.no_preload, "WARM_CLASSIFIER": not args.no_preload,
                      "ALLOWED_HOSTS": default_allowed_hosts(args.host, args.allowed_host),
                      "HIDE_PATHS": args.hide_paths})
    limits = ServeLimits(connection_limit=max(1, args.max_connections))
    serve_app(app, args.host, args.port, args.threads, limits=limits)
    return 0


def _run_ray(args, config: dict, limits: ServeLimits) -> int:
    """``--ray``: deploy the Serve applications, serve the Flask ingress here, delete them on exit."""
    from server.ray_serve import RayServeConfig, create_ray_app, deploy

    deployment = deploy(args.dir, RayServeConfig(address=args.ray, partitions=max(1, args.ray_partitions),
                                                 replicas=max(1, args.ray_replicas), device=args.device,
                                                 encoder_gpus=1.0 if args.device.startswith("cuda") else 0.0))
    try:
        serve_app(create_ray_app(deployment, config), args.host, args.port, args.threads, limits=limits)
    finally:
        deployment.shutdown()
    return 0
