"""An index that detects corruption: checksums recorded at write time, checks on open, ``loupe verify``.

Each test damages a copy of a tiny index the way disks, tools and people do (garbage in a shard, a
shard of another encoder, a manifest that is not UTF-8, an id that is not hex, one flipped character,
garbled local features, a shard truncated while served) and checks that the damage is named — on open,
by ``loupe verify`` (exit 2, one line per file), or by the server (503 JSON) — and never answered silently.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _engine_helpers import build_index, unit
from _indexer_helpers import index as run_index

from loupe.cli.main import main as loupe_main
from retrieval.engine.engine import Engine
from retrieval.errors import IndexFormatError
from retrieval.index import store
from retrieval.index.verify import verify_index

ROOT = Path(__file__).resolve().parents[2]
N, DIM = 600, 16          # 38 KB of vectors: 4 KB of garbage lands well inside them


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(7)
    return unit(rng.standard_normal((N, DIM)))


@pytest.fixture
def flat_index(tmp_path, vectors):
    """Two flat shards written with ``store`` (checksums recorded by ``write_manifest``)."""
    return build_index(tmp_path / "flat", {"e": vectors}, shard_sizes=[N // 2, N - N // 2])


@pytest.fixture(scope="module")
def local_index_master(tmp_path_factory, tiny_clip, photos):
    """A real ``loupe index`` run (the writer) with local features over the bundled photos."""
    folder = tmp_path_factory.mktemp("integrity-photos")
    for i, (name, img) in enumerate(photos.items()):
        img.save(folder / (f"{name}.jpg" if i % 2 == 0 else f"{name}.png"))
    out = tmp_path_factory.mktemp("integrity-index") / "index"
    run_index([folder], out, [tiny_clip], shard_size=8, local_features=True, device="cpu")
    return out


@pytest.fixture
def local_index(tmp_path, local_index_master):
    return Path(shutil.copytree(local_index_master, tmp_path / "local"))


def _verify_cli(capsys, index_dir, *extra) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = loupe_main(["verify", str(index_dir), *extra])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out.strip().splitlines()


def _problem_lines(lines: list[str]) -> list[str]:
    return lines[:-1]     # the last line is the summary


def _drop_records(index_dir: Path) -> None:
    """Make the manifest look written by an older Loupe (no ``files`` map)."""
    path = index_dir / store.MANIFEST
    obj = json.loads(path.read_text())
    obj.pop("files", None)
    path.write_text(json.dumps(obj))


# -- recording and a clean verify -----------------------------------------------------------------------
def test_writer_records_every_file_and_verify_is_clean(local_index_master, capsys):
    manifest = store.read_manifest(local_index_master)
    wanted = {rel for rel, required in store.index_files(manifest) if required}
    assert wanted and wanted <= set(manifest.files)
    assert any(rel.endswith(".local.npy") for rel in wanted) and any(rel.endswith("local-pca.npz") for rel in wanted)
    for rel, rec in manifest.files.items():
        assert store.file_record(local_index_master / rel) == {"size": rec["size"], "sha256": rec["sha256"]}
    code, lines = _verify_cli(capsys, local_index_master)
    assert code == 0 and len(lines) == 1 and ": OK" in lines[0], lines
    code, lines = _verify_cli(capsys, local_index_master, "--json")
    report = json.loads(lines[0])
    assert code == 0 and report["ok"] and report["problems"] == [] and report["images"] == manifest.count
    assert report["files"] == len(manifest.files) and report["unrecorded"] == []


def test_manifest_without_records_is_still_read(flat_index, vectors, capsys):
    _drop_records(flat_index)
    engine = Engine(flat_index, device="cpu")
    hits = engine.search(vector=vectors[5].tolist(), k=1).hits
    assert hits[0].id == engine.records.shard_ids[0][5]
    code, lines = _verify_cli(capsys, flat_index)
    assert code == 0 and "no recorded checksum" in lines[-1]


def test_alias_rewrite_keeps_the_index_clean(tmp_path, tiny_clip, photo_dir):
    out = tmp_path / "idx"
    run_index([photo_dir], out, [tiny_clip], device="cpu")
    first = next(photo_dir.iterdir())
    copy_dir = tmp_path / "more"
    copy_dir.mkdir()
    shutil.copy(first, copy_dir / f"copy{first.suffix}")
    run_index([photo_dir, copy_dir], out, [tiny_clip], device="cpu")     # an alias: meta rewritten in place
    rows = [r for s in store.read_manifest(out).shards for r in store.read_metadata(out, s.name).to_pylist()]
    assert any("copy" in r["aliases"] for r in rows)
    report = verify_index(out)
    assert report.ok, report.problems
    assert not any("previous" in rec for rec in store.read_manifest(out).files.values())


def test_ivfpq_with_pruning_records_the_quantizer_and_verifies_clean(tmp_path, tiny_clip):
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(5)
    for i in range(90):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(src / f"n{i:03d}.png")
    out = tmp_path / "idx"
    run_index([src], out, [tiny_clip], index_type="ivfpq", shard_size=60, batch_size=30, device="cpu")
    for path in sorted(src.iterdir())[:5]:
        path.unlink()
    run_index([src], out, [tiny_clip], index_type="ivfpq", shard_size=60, batch_size=30, device="cpu", prune=True)
    manifest = store.read_manifest(out)
    assert manifest.count == 85 and f"{tiny_clip}/trained.faiss" in manifest.files
    report = verify_index(out)
    assert report.ok and report.files == len(manifest.files), report.problems
    Engine(out, device="cpu")


def test_a_rewrite_is_accepted_in_both_versions_until_the_manifest_follows(flat_index):
    """The writer's in-place metadata rewrite: the manifest written just before the rename accepts the old
    and the new file, so a crash on either side of the rename leaves a clean index."""
    manifest = store.read_manifest(flat_index)
    rel = "meta/shard-00000.parquet"
    old = dict(manifest.files[rel])
    rows = store.read_metadata(flat_index, "shard-00000").to_pylist()
    rows[0]["aliases"] = json.dumps(["/elsewhere/a-much-longer-alias-name.jpg"])

    def publish(record):
        manifest.files[rel] = {**record, "previous": [old]}
        store.write_manifest(flat_index, manifest)
        assert verify_index(flat_index).ok          # crash here: the old file, accepted
    store.write_metadata(flat_index, "shard-00000", rows, before_replace=publish)
    assert verify_index(flat_index).ok              # crash here: the new file, accepted
    Engine(flat_index, device="cpu")


# -- 4 KB of garbage inside a FAISS shard -----------------------------------------------------------------
@pytest.mark.parametrize("recorded", [True, False])
def test_garbage_inside_a_flat_shard_is_detected(flat_index, vectors, capsys, recorded):
    if not recorded:
        _drop_records(flat_index)       # an older index: the norms still give it away
    path = store.vectors_path(flat_index, "e", "shard-00001")
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.seek(size // 2)
        fh.write(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert path.stat().st_size == size
    with pytest.raises(IndexFormatError, match=r"shard-00001\.faiss.*norm"):
        Engine(flat_index, device="cpu")
    code, lines = _verify_cli(capsys, flat_index)
    assert code == 2 and len(_problem_lines(lines)) == 1 and lines[0].startswith("e/shard-00001.faiss: ")


# -- a FAISS file of another encoder (another dimension) ----------------------------------------------------
def _other_encoder_shard(index_dir: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    other = build_index(tmp_path / "other", {"e": unit(rng.standard_normal((N // 2, 2 * DIM)))})
    shutil.copy(store.vectors_path(other, "e", "shard-00000"), store.vectors_path(index_dir, "e", "shard-00000"))


def test_shard_of_another_encoder_fails_open_and_verify(flat_index, tmp_path, capsys):
    _other_encoder_shard(flat_index, tmp_path)
    with pytest.raises(IndexFormatError, match=r"shard-00000\.faiss"):
        Engine(flat_index, device="cpu")
    code, lines = _verify_cli(capsys, flat_index)
    assert code == 2 and len(_problem_lines(lines)) == 1 and lines[0].startswith("e/shard-00000.faiss: ")
    _drop_records(flat_index)
    with pytest.raises(IndexFormatError, match="32-d vectors but encoder e is 16-d"):
        Engine(flat_index, device="cpu")


def test_serve_on_a_damaged_index_is_one_line_and_exit_2(flat_index, tmp_path, capsys):
    _other_encoder_shard(flat_index, tmp_path)
    capsys.readouterr()
    code = loupe_main(["serve", str(flat_index), "--device", "cpu", "--no-preload", "--port", "0"])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("loupe serve: error:") and "shard-00000.faiss" in last


# -- the manifest ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b'{"format": "loupe-index", "version": 1, "caption": "\xff\xfe"}',
                                     b"\x00\x01 not json", b'["a list"]', b'{"format": "loupe-index", "version": "x"}'])
def test_unreadable_manifest_is_an_index_format_error(flat_index, capsys, content):
    (flat_index / store.MANIFEST).write_bytes(content)
    with pytest.raises(IndexFormatError, match="manifest"):
        Engine(flat_index, device="cpu")
    code, lines = _verify_cli(capsys, flat_index)
    assert code == 2 and len(_problem_lines(lines)) == 1 and lines[0].startswith("manifest.json: ")
    capsys.readouterr()
    assert loupe_main(["search", str(flat_index), "--id", "0" * 15, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


# -- metadata: a non-hex id, a flipped character -----------------------------------------------------------
def test_non_hex_id_in_parquet(flat_index, capsys):
    _drop_records(flat_index)                    # the id check itself, not the checksum
    rows = store.read_metadata(flat_index, "shard-00000").to_pylist()
    rows[3]["id"] = "not-a-hex-id!!!"
    store.write_metadata(flat_index, "shard-00000", rows)
    with pytest.raises(IndexFormatError, match="not-a-hex-id"):
        Engine(flat_index, device="cpu")
    code, lines = _verify_cli(capsys, flat_index)
    assert code == 2 and len(_problem_lines(lines)) == 1 and lines[0].startswith("meta/shard-00000.parquet: ")


def test_flipped_id_character_fails_its_checksum(flat_index, capsys):
    path = store.meta_path(flat_index, "shard-00000")
    data = bytearray(path.read_bytes())
    image_id = store.read_metadata(flat_index, "shard-00000").column("id")[7].as_py()
    at = bytes(data).find(image_id.encode())
    assert at >= 0                              # ids are stored as they are (hex does not compress)
    data[at] = ord("0") if data[at] != ord("0") else ord("1")   # still 15 hex chars, same size
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match=r"shard-00000\.parquet does not match its checksum"):
        Engine(flat_index, device="cpu")
    code, lines = _verify_cli(capsys, flat_index)
    assert code == 2 and len(_problem_lines(lines)) == 1
    assert lines[0].startswith("meta/shard-00000.parquet: ") and "SHA-256" in lines[0]


# -- garbled local features -----------------------------------------------------------------------------
def test_garbled_local_features_are_a_503_not_a_silent_rerank(local_index, capsys):
    from server.app import create_app

    engine = Engine(local_index, device="cpu")
    enc = engine.default_encoder
    shard = engine.shard_names[0]
    desc_p, _, _ = store.local_paths(local_index, enc, shard)
    query_id = engine.records.shard_ids[0][0]
    client = create_app({"RELOAD_INTERVAL": 0}, engine=engine).test_client()
    assert client.post("/api/search", json={"image_id": query_id, "k": 3, "rerank": True}).status_code == 200
    engine = Engine(local_index, device="cpu")    # a fresh engine: local features not opened yet
    size = desc_p.stat().st_size
    with open(desc_p, "r+b") as fh:
        fh.seek(size - 4096)
        fh.write(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    client = create_app({"RELOAD_INTERVAL": 0}, engine=engine).test_client()
    ids = {i for ids in engine.records.shard_ids for i in ids}
    statuses = set()
    for image_id in sorted(ids):
        resp = client.post("/api/search", json={"image_id": image_id, "k": 3, "rerank": True})
        statuses.add(resp.status_code)
        if resp.status_code != 200:
            body = resp.get_json()
            assert resp.status_code == 503 and body["error"]["code"] == "index_format"
            assert "local features" in body["error"]["message"]
    assert 503 in statuses
    code, lines = _verify_cli(capsys, local_index)
    assert code == 2 and len(_problem_lines(lines)) == 1
    assert lines[0].startswith(f"{enc}/{shard}.local.npy: ")


def test_inconsistent_local_offsets_are_named(local_index, capsys):
    _drop_records(local_index)
    manifest = store.read_manifest(local_index)
    enc, shard = next(iter(manifest.encoders)), manifest.shards[0].name
    off_p = store.local_paths(local_index, enc, shard)[2]
    off = np.load(off_p)
    off[2], off[3] = off[3], off[2]              # no longer monotonic
    np.save(off_p, off)
    with pytest.raises(IndexFormatError, match="offsets"):      # on open, or at the first re-rank
        engine = Engine(local_index, device="cpu")
        engine.local_features(enc, [engine.records.hit_for_id(engine.records.shard_ids[0][0])])
    code, lines = _verify_cli(capsys, local_index)
    assert code == 2 and lines[0].startswith(f"{enc}/{shard}.local.npy: ") and "offsets" in lines[0]


# -- a shard truncated in place while served ------------------------------------------------------------
_IN_RAM_SCRIPT = """
import os, sys
sys.path[:0] = [sys.argv[2]]
from retrieval.index import store
from retrieval.engine.engine import Engine
from retrieval.errors import IndexFormatError
engine = Engine(sys.argv[1], device="cpu")
q = engine.shards.reconstruct("e", 1, 3).tolist()
want = [(h.id, round(h.score, 5)) for h in engine.search(vector=q, k=5).hits]
for shard in ("shard-00000", "shard-00001"):
    os.truncate(store.vectors_path(sys.argv[1], "e", shard), 100)
got = [(h.id, round(h.score, 5)) for h in engine.search(vector=q, k=5).hits]
print("same", got == want)
try:
    Engine(sys.argv[1], device="cpu")
except IndexFormatError as exc:
    print("reopen-refused", "bytes but was written with" in str(exc))
engine.close()
# what is tested is printed; skip interpreter teardown, which once aborted in CI after both lines
# ("terminate called without an active exception", rc -6; not reproduced in 8 local runs)
sys.stdout.flush()
os._exit(0)
"""


def test_shard_truncated_in_place_while_served_keeps_answering(flat_index):
    """Shards are read into RAM at open: what later happens to their files does not matter (before, the
    mapped file made the next search die with SIGBUS, nothing logged). A subprocess, so a regression
    fails this test instead of killing the test run."""
    proc = subprocess.run([sys.executable, "-c", _IN_RAM_SCRIPT, str(flat_index), str(ROOT)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["same", "True", "reopen-refused", "True"], proc.stdout


_MAPPED_SCRIPT = """
import os, sys
sys.path[:0] = [sys.argv[2]]
from retrieval.index import shards, store
from retrieval.engine.engine import Engine
from retrieval.errors import IndexFormatError
shards.MMAP_MIN_BYTES = 0                      # memory-map every shard
engine = Engine(sys.argv[1], device="cpu")
assert engine.shards._mapped, "not memory-mapped"
q = engine.shards.reconstruct("e", 1, 3)
print("before", engine.search(vector=q.tolist(), k=1).hits[0].row, flush=True)
os.truncate(store.vectors_path(sys.argv[1], "e", "shard-00001"), 200)
try:
    engine.search(vector=q.tolist(), k=1)
except IndexFormatError as exc:
    print("refused", "changed size" in str(exc), flush=True)
"""


def test_memory_mapped_shard_truncated_in_place_is_refused_not_a_crash(flat_index):
    proc = subprocess.run([sys.executable, "-c", _MAPPED_SCRIPT, str(flat_index), str(ROOT)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["before", "3", "refused", "True"], proc.stdout + proc.stderr[-2000:]
