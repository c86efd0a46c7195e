"""Manifests read with pyarrow (issue 16): column types kept (a CSV `year` is a number, so a range filter
finds it), rows streamed, and a CLI filter on a field no image has is an error naming it."""

from __future__ import annotations

import csv
import json
import types

import pyarrow as pa
import pyarrow.parquet as pq

from indexer.sources import _manifest_rows, enumerate_sources


def _csv(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        for r in rows:
            w.writerow(r)


def test_csv_columns_keep_their_types(tmp_path):
    _csv(tmp_path / "m.csv", [["path", "caption", "year", "score", "label"],
                              ["a.jpg", "one", "1999", "0.5", "cat"], ["b.jpg", "", "2004", "1.25", "dog"]])
    rows = _manifest_rows(tmp_path / "m.csv")
    assert isinstance(rows, types.GeneratorType)          # streamed, not read whole into a list first
    rows = list(rows)
    assert [r["year"] for r in rows] == [1999, 2004] and [r["score"] for r in rows] == [0.5, 1.25]
    assert rows[1]["caption"] == "" and rows[0]["label"] == "cat"
    items = enumerate_sources([tmp_path / "m.csv"]).items
    assert items[0].extra == {"year": 1999, "score": 0.5, "label": "cat"} and items[1].caption is None


def test_parquet_types_and_dates_become_json(tmp_path):
    import datetime

    pq.write_table(pa.table({"path": ["a.jpg"], "year": pa.array([2001], pa.int16()),
                             "taken": [datetime.date(2020, 5, 1)]}), tmp_path / "m.parquet")
    (item,) = enumerate_sources([tmp_path / "m.parquet"]).items
    assert item.extra == {"year": 2001, "taken": "2020-05-01"}
    json.dumps(item.extra)


def test_manifest_without_path_column_names_its_columns(tmp_path):
    import pytest

    from retrieval.errors import LoupeError

    _csv(tmp_path / "m.csv", [["file", "year"], ["a.jpg", "2000"]])
    with pytest.raises(LoupeError, match="needs a 'path' or 'url' column.*file, year"):
        enumerate_sources([tmp_path / "m.csv"])


def test_year_filter_finds_csv_rows_and_unknown_field_is_an_error(tmp_path, photos, tiny_clip, capsys):
    from loupe.cli.main import main

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    years = {"astronaut": 1969, "coffee": 2004, "rocket": 2015}
    for n in years:
        photos[n].save(imgs / f"{n}.jpg")
    _csv(tmp_path / "list.csv", [["path", "year"]] + [[f"imgs/{n}.jpg", str(y)] for n, y in years.items()])
    out = tmp_path / "idx"
    assert main(["index", str(tmp_path / "list.csv"), "--out", str(out), "--encoder", tiny_clip,
                 "--device", "cpu", "--workers", "0"]) == 0
    capsys.readouterr()
    assert main(["search", str(out), "--text", "a photo", "-k", "5", "--json", "--device", "cpu",
                 "--filter", '{"year": {"gte": 2000}}']) == 0
    found = {r["path"].rsplit("/", 1)[-1] for r in json.loads(capsys.readouterr().out)["results"]}
    assert found == {"coffee.jpg", "rocket.jpg"}
    # nothing passes: exit 1 (scripts can test it)
    assert main(["search", str(out), "--text", "a photo", "--json", "--device", "cpu",
                 "--filter", '{"year": {"gt": 3000}}']) == 1
    capsys.readouterr()
    # a field no image has: a clear error naming it and the closest one, exit 2
    assert main(["search", str(out), "--text", "a photo", "--device", "cpu",
                 "--filter", '{"yeer": {"gte": 2000}}']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'yeer'" in err[0] and "did you mean 'year'" in err[0]
