"""`loupe serve`: serve an index over HTTP (JSON API + web page) with waitress."""

from __future__ import annotations

import logging
import signal
import sys

DESCRIPTION = """Serve an index over HTTP: the web page at /, the JSON API under /api, /healthz and
/metrics (Prometheus). Runs the waitress production WSGI server, bound to 127.0.0.1 unless --host
says otherwise; SIGTERM / Ctrl-C stop it gracefully (in-flight requests finish). Uploads are limited
to 20 MB (--max-upload-mb). The server never fetches URLs for clients."""

EPILOG = """examples:
  loupe serve ~/loupe-index                      # http://127.0.0.1:8080
  loupe serve ~/loupe-index --host 0.0.0.0 --port 9000 --threads 16
"""

log = logging.getLogger("loupe.serve")


def add_arguments(p) -> None:
    p.add_argument("dir", metavar="DIR", help="index directory (built by `loupe index`)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--threads", type=int, default=8, help="worker threads (default 8)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda (default auto)")
    p.add_argument("--max-upload-mb", type=int, default=20, help="largest accepted image upload (default 20)")
    p.add_argument("--no-preload", action="store_true",
                   help="load encoders (and the classifier's text database) on first use, not at start-up")


def serve_app(app, host: str, port: int, threads: int = 8, *, ready=None) -> None:
    """Run ``app`` with waitress until SIGTERM/SIGINT, then stop gracefully."""
    from waitress import create_server

    server = create_server(app, host=host, port=port, threads=threads, channel_timeout=60,
                           ident="loupe", clear_untrusted_proxy_headers=True)
    stopping = {"flag": False}

    def _stop(signum, _frame):
        if not stopping["flag"]:
            stopping["flag"] = True
            log.warning("received %s: shutting down", signal.Signals(signum).name)
        raise KeyboardInterrupt

    old = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
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
    import faiss

    from server.app import create_app

    # One request = one query vector: concurrency comes from the server's threads, and OpenMP teams
    # per query only contend with each other (measured: 10-20x slower on a busy 2-core machine).
    faiss.omp_set_num_threads(1)

    logging.getLogger("loupe").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app({"INDEX_DIR": args.dir, "DEVICE": args.device,
                      "MAX_UPLOAD_BYTES": args.max_upload_mb * 1024 * 1024,
                      "PRELOAD_ENCODERS": not args.no_preload, "WARM_CLASSIFIER": not args.no_preload})
    serve_app(app, args.host, args.port, args.threads)
    return 0
