"""A small real collection for the page tests (``test_page_*.py``): scikit-image photos with captions,
two planted copies (resized + re-encoded), indexed with effnet-lite0 (copies), conse-effnet-lite0 (text)
and colour-names (the colour facet), served by a real HTTP server thread on 127.0.0.1."""

from __future__ import annotations

import contextlib
import io
import os
import threading
from pathlib import Path

from _engine_helpers import build_index, image_rows
from PIL import Image

NAMES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "horse", "motorcycle_left", "brick",
         "grass", "moon", "immunohistochemistry")
CAPTIONS = {"astronaut": "an astronaut in a space suit", "chelsea": "a tabby cat", "coffee": "a cup of coffee",
            "rocket": "a rocket on the launch pad", "camera": "a man with a camera", "cat": "a cat in the grass",
            "horse": "a horse silhouette", "motorcycle_left": "a red motorcycle", "brick": "a brick wall",
            "grass": "green grass", "moon": "the surface of the moon", "immunohistochemistry": "stained cells",
            "copy_coffee": "a copy of the coffee", "copy_rocket": "a copy of the rocket"}
ENCODERS = ("effnet-lite0", "conse-effnet-lite0", "colour-names")


def resized_jpeg(img: Image.Image, scale: float = 0.7, quality: int = 60) -> Image.Image:
    small = img.resize((max(8, int(img.width * scale)), max(8, int(img.height * scale))), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def build_site(root: Path, photos: dict[str, Image.Image]) -> tuple[Path, dict[str, Path]]:
    """(index dir, name -> file) of the collection: the photos (max side 256) and two planted copies."""
    from retrieval.encoders import create_encoder

    folder = root / "pictures"
    folder.mkdir()
    paths = {}
    for name in NAMES:
        if name not in photos:
            continue
        img = photos[name].copy()
        img.thumbnail((256, 256))
        paths[name] = folder / f"{name}.png"
        img.save(paths[name])
    for name in ("coffee", "rocket"):
        if name in paths:
            paths[f"copy_{name}"] = folder / f"copy_{name}.jpg"
            resized_jpeg(Image.open(paths[name]).convert("RGB")).save(paths[f"copy_{name}"], quality=95)
    files = sorted(paths.values())
    rows = image_rows(files, CAPTIONS)
    vectors, mods = {}, {}
    for enc_name in ENCODERS:
        enc = create_encoder(enc_name, device="cpu")
        vectors[enc_name] = enc.encode_images([str(p) for p in files])
        mods[enc_name] = list(enc.modalities)
    return build_index(root / "index", vectors, rows=rows, modalities=mods), paths


_BUILT: dict[str, tuple[Path, dict[str, Path]]] = {}


def shared_site(tmp_path_factory, photos) -> tuple[Path, dict[str, Path]]:
    """:func:`build_site` once per test session (the page test modules share it; none writes to it)."""
    if "site" not in _BUILT:
        keep = os.environ.get("LOUPE_PAGE_SITE")     # a folder to build it in once and reuse (working on the page)
        if keep and (Path(keep) / "index").is_dir():
            folder = Path(keep) / "pictures"
            _BUILT["site"] = Path(keep) / "index", {p.stem: p for p in folder.iterdir()}
        elif keep:
            Path(keep).mkdir(parents=True)
            _BUILT["site"] = build_site(Path(keep), photos)
        else:
            _BUILT["site"] = build_site(tmp_path_factory.mktemp("page-site"), photos)
    return _BUILT["site"]


@contextlib.contextmanager
def serve(app):
    """``app`` on a real HTTP server thread; yields its base URL."""
    from werkzeug.serving import make_server

    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        thread.join(5)


def served_site(tmp_path_factory, photos):
    """The shared site served over HTTP, for a module-scoped fixture to ``yield from``: yields
    ``(url, app, engine, paths)``."""
    from retrieval.engine.engine import Engine
    from server.app import create_app

    index, paths = shared_site(tmp_path_factory, photos)
    engine = Engine(index, device="cpu")
    app = create_app(engine=engine)
    with serve(app) as url:
        yield url, app, engine, paths


def shot(page, name: str) -> None:
    """With ``LOUPE_SCREENSHOTS=DIR`` (e.g. ``docs/screenshots``): a screenshot for a person to check, saved as
    a small palette PNG."""
    folder = os.environ.get("LOUPE_SCREENSHOTS")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    img = Image.open(io.BytesIO(page.screenshot(full_page=False))).convert("RGB")
    img.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(Path(folder) / name, optimize=True)
