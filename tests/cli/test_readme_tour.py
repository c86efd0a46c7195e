"""The README's commands run as written (issue 16).

* ``test_readme_tour_runs_as_written``: the fenced ``bash`` block under the README's tour heading is
  run line by line, as written, in an empty folder: ``python -m loupe.cli.demo ...`` writes the real
  sample photos, every ``loupe ...`` line goes through the ``loupe`` entry point (``loupe.cli.main.main``
  with the line's own words, in this process so that models load once), ``loupe serve`` is opened as the
  app it would serve. Each command's exit status and output are checked; a tour line this test does not
  know fails it, so the tour and the test change together. The README's Python example then runs on the
  index the tour built.
* ``test_every_documented_command_parses``: every ``loupe ...`` line of a ``bash`` block in README.md
  and docs/*.md is accepted by the real argument parser (a misspelt flag in the docs fails it).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from loupe.cli.main import build_parser
from loupe.cli.main import main as loupe_main

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
TOUR_HEADING = "## A five-minute tour"
SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "<", "&", "2>", "2>&1"}


# -- reading the docs ----------------------------------------------------------------------------------
def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(language, line number of the fence, lines) of every fenced block, continuation lines joined."""
    blocks, lang, start, lines = [], None, 0, []
    for no, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, start, lines = line[3:].strip() or "text", no, []
            else:
                blocks.append((lang, start, _join_continuations(lines)))
                lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


def _join_continuations(lines: list[str]) -> list[str]:
    out, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return [line for line in out if line.strip()]


def tour_lines(text: str) -> list[str]:
    """The lines of the first ``bash`` block under the tour heading."""
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines, 1) if line.strip() == TOUR_HEADING)
    nxt = next((i for i, line in enumerate(lines, 1) if i > head and line.startswith("## ")), len(lines) + 1)
    for lang, start, block in fenced_blocks(text):
        if head < start < nxt and lang == "bash":
            return block
    raise AssertionError(f"no ```bash block under {TOUR_HEADING!r} in README.md")


def command_words(line: str) -> list[str]:
    """A shell line's words, as the shell would pass them, up to the first operator (pipe, redirect)."""
    words = shlex.split(line, comments=True)
    for i, word in enumerate(words):
        if word in SHELL_OPERATORS:
            return words[:i]
    return words


def shell_words(line: str) -> list[str]:
    """``command_words``, with ``$(...)`` substitutions expanded by bash (run in the current folder)."""
    if "$(" not in line:
        return command_words(line)
    proc = subprocess.run(["bash", "-c", "printf '%s\\0' " + line], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (line, proc.stderr)
    return proc.stdout.split("\0")[:-1]


def documented_loupe_lines() -> list[tuple[str, str]]:
    """(where, line) of every ``loupe ...`` line in a bash block of README.md and docs/*.md."""
    out = []
    for path in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for lang, start, block in fenced_blocks(path.read_text(encoding="utf-8")):
            if lang not in ("bash", "sh", "shell", "console"):
                continue
            for line in block:
                words = command_words(line.lstrip("$ "))
                if words and words[0] == "loupe":
                    out.append((f"{path.relative_to(ROOT)}:{start}", line))
    return out


def parse_error(words: list[str]) -> str | None:
    """None when ``loupe WORDS`` is accepted by the real argument parser, else argparse's message."""
    parser = build_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(words)
    except SystemExit as exc:
        return err.getvalue().strip().splitlines()[-1] if exc.code else None
    return None


# -- the documented commands parse -------------------------------------------------------------------
def test_every_documented_command_parses():
    lines = documented_loupe_lines()
    readme = [line for where, line in lines if where.startswith("README.md")]
    assert len(readme) >= 9, readme                 # the tour alone has more: the extraction works
    assert any(where.startswith("docs/") for where, _ in lines)
    bad = [f"{where}: {line.strip()}\n    -> {err}" for where, line in lines
           if (err := parse_error(command_words(line)[1:]))]
    assert not bad, "documented commands the parser refuses:\n" + "\n".join(bad)


def test_parse_check_catches_a_misspelt_flag():
    line = next(line for line in tour_lines(README.read_text()) if line.startswith("loupe index "))
    words = command_words(line)[1:]
    assert parse_error(words) is None
    typo = [("--encodr" if w == "--encoder" else w) for w in words]
    assert "unrecognized arguments: --encodr" in (parse_error(typo) or "")
    assert "invalid choice: 'idnex'" in (parse_error(["idnex", *words[1:]]) or "")


def test_entry_point_runs():
    """The installed ``loupe`` script and ``python -m loupe`` (what the tour's lines start with)."""
    script = Path(sys.executable).with_name("loupe")
    runs = [[sys.executable, "-m", "loupe", "--version"]] + ([[str(script), "--version"]] if script.exists() else [])
    for argv in runs:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.startswith("loupe "), (argv, proc.stderr)


# -- the tour runs as written ------------------------------------------------------------------------
def _run_loupe(words: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            rc = loupe_main(words)
        except SystemExit as exc:        # argparse
            rc = exc.code if isinstance(exc.code, int) else 2
    return rc, out.getvalue()


def _paths(text: str) -> list[str]:
    return re.findall(r"\S+\.png", text)


@pytest.fixture
def keep_logging():
    levels = {name: logging.getLogger(name).level for name in ("loupe", "loupe.progress", "")}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.slow
def test_readme_tour_runs_as_written(tmp_path, monkeypatch, keep_logging):
    from loupe.cli import demo

    monkeypatch.chdir(tmp_path)
    text = README.read_text(encoding="utf-8")
    lines = tour_lines(text)
    seen: list[str] = []
    index_dir = None
    for line in lines:
        words = shell_words(line)
        if not words:
            continue
        key = " ".join(words[:2]) if words[0] == "loupe" else " ".join(words[:3])
        seen.append(key)
        if words[:2] == ["source", ".venv/bin/activate"]:
            continue                                 # this process already runs in the venv
        if words[:3] == ["python", "-m", "loupe.cli.demo"]:
            assert demo.main(words[3:]) == 0, line
            photos = sorted(Path(".demo/photos").glob("*.png"))
            assert len(photos) >= 10 and all(p.with_suffix(".txt").is_file() for p in photos), photos
            continue
        assert words[0] == "loupe", f"tour line this test does not know how to run: {line}"
        if words[1] == "serve":                      # blocks: open the app it serves instead
            from server.app import create_app

            args = build_parser().parse_args(words[1:])
            client = create_app({"INDEX_DIR": args.dir, "DEVICE": "cpu", "PRELOAD_ENCODERS": False}).test_client()
            health = client.get("/healthz")
            assert health.status_code == 200 and health.get_json()["images"] == len(photos), health.get_json()
            continue
        rc, out = _run_loupe(words[1:])
        check_tour_output(words[1:], rc, out, photos)
        if words[1] == "index":
            index_dir = words[words.index("--out") + 1]
    for needed in ("python -m loupe.cli.demo", "loupe encoders", "loupe index", "loupe search", "loupe classify",
                   "loupe explain", "loupe match", "loupe dedup", "loupe serve"):
        assert needed in seen, f"the tour lost `{needed}`"

    # the README's Python example, on the index the tour built
    python = [block for lang, _, block in fenced_blocks(text) if lang == "python"]
    assert python and index_dir, "README's Python example"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile("\n".join(python[0]), "README.md", "exec"), {})
    first = out.getvalue().splitlines()[0].split()
    assert float(first[0]) > 0 and first[1].endswith("chelsea.png"), out.getvalue()


def check_tour_output(words: list[str], rc: int, out: str, photos: list[Path]) -> None:
    """What each tour command must print and how it must exit (README says so beside each line)."""
    line = "loupe " + " ".join(words)
    command = words[0]
    if command == "encoders":
        assert rc == 0 and "effnet-lite0" in out and "conse-effnet-lite0" in out, out
    elif command == "index":
        summary = json.loads(out.strip().splitlines()[-1])
        assert rc == 0 and summary["indexed"] == len(photos) and summary["failed"] == [], summary
    elif command == "search" and "--json" in words:
        results = json.loads(out)["results"]
        want = json.loads(words[words.index("--filter") + 1])["caption"]["contains"]
        assert rc == 0 and results and all(want in r["caption"].lower() for r in results), out
    elif command == "search" and "--text" in words:
        assert rc == 0 and _paths(out)[0].endswith("chelsea.png"), out     # "Chelsea the cat comes first"
    elif command == "search" and "--image" in words:
        query = words[words.index("--image") + 1]
        assert rc == 0 and _paths(out)[0].endswith(Path(query).name), out   # the photo itself first
        assert len(_paths(out)) == int(words[words.index("-k") + 1]), out
    elif command == "classify":
        labels = [ln.split(maxsplit=1)[1] for ln in out.splitlines()[1:] if re.match(r"\s+\d\.\d+\s", ln)]
        assert rc == 0 and "cat" in labels[:2], out
    elif command == "match":
        query = words[-1]
        rows = [ln.split("\t") for ln in out.splitlines() if ln.strip()]
        assert rc == 0 and rows and rows[0][0] == query and rows[0][1].endswith(Path(query).name), out
    elif command == "explain":
        from PIL import Image

        wanted = words[words.index("--result") + 1]
        result = next(p for p in photos if hashlib.sha256(p.read_bytes()).hexdigest()[:15] == wanted)
        out_png = Path(words[words.index("--out") + 1])
        with Image.open(out_png) as overlay, Image.open(result) as original:
            assert rc == 0 and overlay.format == "PNG" and overlay.size == original.size, (out, overlay.size)
    elif command == "dedup":
        assert rc == 1 and out.strip() == "", out                          # "none here, exit status 1"
    else:
        raise AssertionError(f"tour line this test does not check: {line}")


# -- links between the docs ---------------------------------------------------------------------------
def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


def test_doc_links_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists (and a heading it has)."""
    broken, checked = [], 0
    for path in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue                                   # http:, https:, mailto:
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            checked += 1
            if not dest.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert checked >= 20
    assert not broken, "\n".join(broken)
