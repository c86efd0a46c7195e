"""`loupe search --box / --regions` and `loupe index --regions` end to end (in-process CLI)."""

from __future__ import annotations

import json

from regions_data import PLANTED, poster

from loupe.cli.main import main as loupe_main


def test_cli_box_and_regions(region_index, photos, tmp_path, capsys):
    out, summary = region_index
    assert set(summary["regions"]) == {"images", "regions", "seconds", "bytes"}
    query = tmp_path / "poster.jpg"
    poster(photos).save(query, quality=90)
    box = ",".join(map(str, PLANTED))
    assert loupe_main(["search", str(out), "--image", str(query), "--box", box, "-k", "3", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["box"] == list(PLANTED) and len(body["results"]) == 3
    assert loupe_main(["search", str(out), "--image", str(query), "--regions", "-k", "2", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["regions"] and all(len(r["results"]) == 2 and len(r["box"]) == 4 for r in body["regions"])
    assert loupe_main(["search", str(out), "--image", str(query), "--regions", "-k", "2"]) == 0
    assert "region 1 (" in capsys.readouterr().out
    assert loupe_main(["search", str(out), "--image", str(query), "--box", "0,0,900,10"]) == 2
    assert "outside the query image (600x400 pixels)" in capsys.readouterr().err
    assert loupe_main(["search", str(out), "--text", "a cat", "--box", box]) == 2
    assert "needs an image" in capsys.readouterr().err


def test_index_regions_again_adds_nothing(region_index, capsys):
    out, _ = region_index
    folder = out.parent / "pictures"
    assert loupe_main(["index", str(folder), "--out", str(out), "--regions", "--workers", "0"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["indexed"] == 0 and again["regions"]["images"] == 0 and again["regions"]["regions"] == 0
