"""Exit codes and --json across the CLI (issue 16): 0 done, 1 nothing found (search, match, dedup:
documented in --help), 2 usage or runtime error; `loupe --version`; `loupe explain --json` prints one
JSON object on stdout like every other --json."""

from __future__ import annotations

import json

import pytest

from loupe.cli.main import build_parser, main


def test_version(capsys):
    from loupe import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"loupe {__version__}"


def test_help_documents_exit_status():
    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("search", "match", "dedup"):
        epilog = subs[name].epilog or ""
        assert "exit status" in epilog and "1 " in epilog and "2 usage" in epilog, name
    assert "exit status" in parser.epilog


def test_usage_error_is_two(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["search"])                           # argparse: DIR and a query are required
    assert exc.value.code == 2


def test_explain_json_prints_one_object(tmp_path, photos, capsys):
    from tests._engine_helpers import build_photo_index

    src = tmp_path / "src"
    src.mkdir()
    for name in ("chelsea", "coffee"):
        photos[name].save(src / f"{name}.png")
    idx = build_photo_index(tmp_path / "idx", sorted(src.iterdir()), ["effnet-lite0"])
    hits = json.loads(_run(capsys, "search", str(idx), "--image", str(src / "chelsea.png"), "-k", "1", "--json",
                           "--device", "cpu"))["results"]
    out = _run(capsys, "explain", str(idx), "--image", str(src / "chelsea.png"), "--result", hits[0]["id"],
               "--out", str(tmp_path / "why.png"), "--method", "cam", "--device", "cpu", "--json")
    body = json.loads(out)                         # exactly one JSON object on stdout
    assert body["out"] == str(tmp_path / "why.png") and body["method"] == "cam"
    assert len(body["heatmap"]) == body["height"] and len(body["heatmap"][0]) == body["width"]


def _run(capsys, *argv) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_abbreviated_flags_are_refused(capsys):
    """A prefix of a flag (``--local-feature`` for ``--local-features``) is a typo, not a shorthand: argparse
    would silently accept it, so a misspelt flag in the docs or a script would pass unnoticed."""
    with pytest.raises(SystemExit) as exc:
        main(["index", "photos", "--out", "idx", "--local-feature"])
    assert exc.value.code == 2 and "unrecognized arguments: --local-feature" in capsys.readouterr().err
    args = build_parser().parse_args(["index", "photos", "--out", "idx", "--local-features"])
    assert args.local_features is True
