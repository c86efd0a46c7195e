"""Progress of long work (issue 16): a bar on a terminal, log lines when stderr is not a terminal.

Checked for ``loupe.cli.progress.Progress`` itself, ``loupe match --build-background`` (a real ``loupe``
process whose stderr is a pipe), ``make demo``'s indexing (``loupe.cli.demo.build``) and model loading.
"""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loupe.cli.progress import Progress

ROOT = Path(__file__).resolve().parents[2]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "loupe.progress"]


def test_not_a_terminal_logs_lines_at_intervals(caplog):
    stream = io.StringIO()                       # not a tty
    with Progress("embedding", total=10, unit="img", interval=0.0, stream=stream) as bar:
        for _ in range(5):
            bar.update(2)
    lines = _progress_lines(caplog)
    assert lines[0] == "embedding: 0/10 img"
    assert [ln.split(":")[1].split()[0] for ln in lines[1:6]] == ["2/10", "4/10", "6/10", "8/10", "10/10"]
    assert "(40 %)" in lines[2] and "img/s" in lines[2] and "left" in lines[2]
    assert re.fullmatch(r"embedding: 10/10 img in \d+\.\d s \(\d+\.\d img/s\)", lines[-1]), lines[-1]
    assert stream.getvalue() == ""               # nothing drawn: no bar, no carriage returns


def test_not_a_terminal_respects_the_interval(caplog):
    with Progress("embedding", total=1000, unit="img", interval=3600.0, stream=io.StringIO()) as bar:
        for _ in range(1000):
            bar.update()
    assert len(_progress_lines(caplog)) == 2     # the start and the end, nothing in between


def test_terminal_draws_a_bar_and_logs_nothing(caplog):
    stream = FakeTerminal()
    with Progress("embedding", total=10, unit="img", interval=0.0, stream=stream) as bar:
        bar.update(10)
    assert "\r" in stream.getvalue() and "10/10" in stream.getvalue()
    assert _progress_lines(caplog) == []


def test_progress_lines_show_under_the_cli_default_level():
    """`loupe` configures WARNING; progress lines are INFO on their own logger and must still show."""
    code = ("import logging, io; logging.basicConfig(level=logging.WARNING);"
            "from loupe.cli.progress import Progress;"
            "p = Progress('work', total=2, unit='img', interval=0.0, stream=io.StringIO()); p.update(2); p.close()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "INFO:loupe.progress:work: 0/2 img" in proc.stderr and "work: 2/2 img in" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_match_build_background_logs_progress_when_stderr_is_a_pipe(tmp_path, photos):
    from tests._engine_helpers import build_photo_index

    src, background = tmp_path / "src", tmp_path / "background"
    src.mkdir()
    background.mkdir()
    names = sorted(photos)
    for name in names[:3]:
        photos[name].save(src / f"{name}.png")
    for name in names[3:8]:
        photos[name].save(background / f"{name}.jpg")
    idx = build_photo_index(tmp_path / "idx", sorted(src.iterdir()), ["effnet-lite0"])
    proc = subprocess.run([sys.executable, "-m", "loupe", "match", str(idx), "--build-background", str(background),
                           "--device", "cpu"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "loupe.progress" in ln]
    assert any(ln.endswith("embedding the background (effnet-lite0): 0/5 img") for ln in lines), proc.stderr
    assert any("embedding the background (effnet-lite0): 5/5 img in" in ln for ln in lines), proc.stderr
    assert "\r" not in proc.stderr                                     # no tqdm bar redrawn in a log
    stored = np.load(idx / "effnet-lite0" / "background.npy")
    assert stored.shape == (5, 1280)


@pytest.mark.slow
def test_demo_indexing_logs_progress(tmp_path, monkeypatch, caplog, capfd):
    from loupe.cli import demo

    monkeypatch.setattr(demo, "SKIMAGE_PHOTOS", {"chelsea": "a cat", "coffee": "a cup", "rocket": "a rocket"})
    caplog.set_level(logging.INFO, logger="loupe.encoders")
    index_dir = demo.build(tmp_path / "demo", max_stamps=0, device="cpu")
    assert (index_dir / "manifest.json").is_file()
    lines = _progress_lines(caplog)
    assert lines[0] == "indexing the demo images: 0/3 img", lines
    assert lines[-1].startswith("indexing the demo images: 3/3 img in "), lines
    assert "\r" not in capfd.readouterr().err


def test_model_loading_is_logged(caplog):
    from retrieval.encoders import create_encoder

    caplog.set_level(logging.INFO, logger="loupe.encoders")
    create_encoder("colour-names", device="cpu", cache=False)
    messages = [r.getMessage() for r in caplog.records if r.name == "loupe.encoders"]
    assert messages[0] == "loading encoder colour-names on cpu ..."
    assert re.fullmatch(r"loaded encoder colour-names in \d+\.\d s", messages[1]), messages
