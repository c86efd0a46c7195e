"""Request guards the whole app shares: the Host check, and hiding server paths in results.

* ``ALLOWED_HOSTS`` (config; ``None``: no check, what ``create_app`` gives tests and embedders): the
  names a request's ``Host`` may carry, with any port. Another name gets a 403 ``forbidden_host``, so a
  web page whose domain was re-pointed at this machine (DNS rebinding) cannot use the API. ``"*"``
  accepts every name; ``"0.0.0.0"`` or ``"::"`` (a server bound to every address) accepts any IP-address
  host, which rebinding cannot produce. A request without a ``Host`` (HTTP/1.0) is not a browser's
  and passes. ``loupe serve`` always sets the list: :func:`default_allowed_hosts` of its bind address
  plus ``--allowed-host`` names.
* ``HIDE_PATHS`` (config, ``loupe serve --hide-paths``): results carry ``path``, ``metadata.source`` and
  ``metadata.aliases`` relative to :func:`path_root`, the deepest folder holding every indexed file, and
  search filters compare ``path`` / ``source`` as results show them (:func:`path_views`, every operator:
  ``contains`` too), never the stored absolute paths (a substring or range test on those would reveal them).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from typing import Any, Iterable

from flask import Flask, current_app, request

from server.errors import ForbiddenHostError

log = logging.getLogger("loupe.server")

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::")


def install(app: Flask) -> None:
    """Register the guards on ``app`` (called by ``create_app``)."""
    app.before_request(check_host)


# -- Host ------------------------------------------------------------------------------------------
def default_allowed_hosts(bind_host: str, extra: Iterable[str] = ()) -> list[str]:
    """The bind address, the loopback names and ``extra``; a server bound to every address (``0.0.0.0``,
    ``::``) also answers to this machine's host name and to IP addresses."""
    hosts = [bind_host, *LOOPBACK_HOSTS]
    if bind_host in WILDCARD_BINDS or not bind_host:
        hosts.append(socket.gethostname())
    hosts.extend(extra)
    return list(dict.fromkeys(h for h in (normalise_host(h) for h in hosts) if h))


def normalise_host(name: str) -> str:
    """``Name.`` / ``[::1]`` → ``name`` / ``::1`` (lower case, no brackets, no trailing dot)."""
    name = (name or "").strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    return name.rstrip(".") if name not in ("", ".") else ""


def host_name(header: str) -> str:
    """The name of a ``Host`` header without its port: ``example.com:8080`` → ``example.com``,
    ``[::1]:8080`` → ``::1``."""
    header = header.strip()
    if header.startswith("["):
        name, _, _rest = header[1:].partition("]")
        return normalise_host(name)
    if header.count(":") == 1:
        header = header.partition(":")[0]
    return normalise_host(header)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_allowed(header: str, allowed: Iterable[str]) -> bool:
    allowed = {normalise_host(h) for h in allowed}
    if "*" in allowed:
        return True
    name = host_name(header)
    if name in allowed:
        return True
    return _is_ip(name) and any(w in allowed for w in WILDCARD_BINDS)


def check_host():
    """``before_request``: refuse a ``Host`` that is not in ``ALLOWED_HOSTS``."""
    allowed = current_app.config.get("ALLOWED_HOSTS")
    if allowed is None:
        return None
    header = request.environ.get("HTTP_HOST")
    if header is None or host_allowed(header, allowed):
        return None
    name = host_name(header)[:100]
    log.warning("refused a request for host %r (allowed: %s)", name, ", ".join(allowed))
    raise ForbiddenHostError(f"this server does not answer for host {name!r}; "
                             "start it with `loupe serve --allowed-host NAME` to allow a name")


# -- paths -----------------------------------------------------------------------------------------
def _local(value: Any) -> str | None:
    """The filesystem part of a recorded source: a path, or the tar of ``/abs/shard.tar#KEY``; not URLs."""
    if not isinstance(value, str) or not value or "://" in value:
        return None
    value = value.partition("#")[0] if ".tar#" in value.lower() else value
    return value if os.path.isabs(value) else None


def path_root(engine) -> str | None:
    """The deepest folder that holds every indexed file (``None``: nothing local). Computed once per
    opened index (``engine.cache``)."""
    def _compute() -> str | None:
        folders: set[str] = set()
        for table in engine.records.tables:
            names = [c for c in ("path", "source", "aliases") if c in table.column_names]
            for column in names:
                for value in table.column(column).to_pylist():
                    values = _aliases(value) if column == "aliases" else [value]
                    for v in values:
                        local = _local(v)
                        if local is not None:
                            folders.add(os.path.dirname(os.path.normpath(local)))
        if not folders:
            return None
        try:
            return os.path.commonpath(sorted(folders))
        except ValueError:          # mixed drives (Windows)
            return None

    return engine.cache(("server.security", "path_root"), _compute)


def _aliases(raw: Any) -> list[Any]:
    import json

    if isinstance(raw, list):
        return raw
    if isinstance(raw, str) and raw.startswith("["):
        try:
            value = json.loads(raw)
        except ValueError:
            return []
        return value if isinstance(value, list) else []
    return []


def relative_path(value: Any, root: str | None) -> Any:
    """``value`` relative to ``root`` when it is a local absolute path (or a tar member) under it; its
    last name when it is elsewhere; anything else (URLs, ``None``) unchanged."""
    local = _local(value)
    if local is None:
        return value
    tail = value[len(local):]                      # "#KEY.jpg" of a tar member
    norm = os.path.normpath(local)
    if root is not None:
        rel = os.path.relpath(norm, root)
        if rel != ".." and not rel.startswith(".." + os.sep):
            return rel + tail
    return os.path.basename(norm) + tail


def hide_paths(engine, result: dict[str, Any]) -> dict[str, Any]:
    """A result (``describe_hit`` shape) with its paths relative to :func:`path_root` (in place)."""
    root = path_root(engine)
    result["path"] = relative_path(result.get("path"), root)
    meta = result.get("metadata")
    if isinstance(meta, dict):
        if "source" in meta:
            meta["source"] = relative_path(meta["source"], root)
        if isinstance(meta.get("aliases"), list):
            meta["aliases"] = [relative_path(a, root) for a in meta["aliases"]]
    return result


PATH_FIELDS = ("path", "source")


def path_views(engine) -> dict[str, Any]:
    """Filter views (``Engine.set_filter_views``) for a server that hides paths: ``path`` and ``source``
    are compared as :func:`hide_paths` shows them (relative to :func:`path_root`)."""
    root = path_root(engine)

    def shown(value: Any) -> Any:
        return relative_path(value, root)

    return {field: shown for field in PATH_FIELDS}


def apply_path_views(app: Flask, engine) -> None:
    """With ``HIDE_PATHS``, make ``engine``'s filters take the paths as results show them (without it, as
    stored: an engine served by an app that hides paths and then by one that does not)."""
    if engine is not None and hasattr(engine, "set_filter_views"):
        engine.set_filter_views(path_views(engine) if app.config.get("HIDE_PATHS") else None)
