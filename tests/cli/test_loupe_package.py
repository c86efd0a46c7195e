"""The public face: ``import loupe`` and the ``loupe`` command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_loupe_gives_the_public_names():
    import loupe
    from indexer.pipeline import build_index
    from retrieval.encoders import create_encoder
    from retrieval.engine.engine import Engine
    from retrieval.engine.request import SearchRequest
    from server.app import create_app

    assert loupe.Engine is Engine and loupe.SearchRequest is SearchRequest
    assert loupe.create_encoder is create_encoder and loupe.build_index is build_index
    assert loupe.create_app.__module__.startswith("server")
    assert loupe.create_app(engine=None).name == create_app(engine=None).name
    assert loupe.__version__.count(".") == 2
    assert set(loupe.__all__) >= {"Engine", "SearchRequest", "create_encoder", "build_index", "create_app",
                                  "__version__"}


def test_import_loupe_is_cheap():
    """``import loupe`` loads neither torch nor faiss (the names load on first use)."""
    code = "import sys, loupe; print(sorted(m for m in ('torch', 'faiss', 'retrieval') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_loupe_help_imports_no_torch():
    """Building the whole parser (every subcommand's options) imports neither torch nor faiss: `loupe --help`
    and `loupe index --help` answer at once."""
    code = ("import sys; from loupe.cli.main import build_parser; p = build_parser(); "
            "p.format_help(); print(sorted(m for m in ('torch', 'faiss', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    for argv in (["--help"], ["index", "--help"], ["explain", "--help"], ["optimize", "--help"]):
        out = subprocess.run([sys.executable, "-m", "loupe", *argv], capture_output=True, text=True, cwd=ROOT,
                             timeout=60)
        assert out.returncode == 0 and "usage: loupe" in out.stdout, out.stderr


def test_loupe_command_version_and_module():
    import loupe

    out = subprocess.run([sys.executable, "-m", "loupe", "--version"], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"loupe {loupe.__version__}", out.stderr
