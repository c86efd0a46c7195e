"""Loupe's HTTP server: a Flask app factory (``server.app.create_app``) with blueprints."""

from __future__ import annotations


def create_app(config=None, *, engine=None):
    from server.app import create_app as _create_app

    return _create_app(config, engine=engine)


__all__ = ["create_app"]
