"""The indexer's reader, decode part: DataLoader workers read, hash, decode and preprocess each item.

Each worker reads an item's bytes, hashes them (SHA-256 → stable id), skips content already indexed,
decodes once with ``retrieval.images.load_image`` and applies every encoder group's transform up to
the float conversion (``split_transform``): batches travel as uint8 and are normalised on the encoder's
device (``normalize``). ``iter_batches`` survives worker crashes (a C decoder's segfault) and caps the
decoded batches in flight (``prefetch_factor``: ``retrieval.settings.in_flight_bytes()``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from indexer.sources import Item, ReadConfig, read_bytes
from retrieval import settings
from retrieval.errors import LoupeError
from retrieval.images import MIN_REDUCED_SIDE, image_size, load_image
from retrieval.index import store

log = logging.getLogger(__name__)

@dataclass
class Record:
    index: int
    id: str | None = None
    sha256: str | None = None
    size: int = 0
    width: int = 0
    height: int = 0
    duplicate: bool = False     # content already in the index: not decoded
    error: str | None = None
    tensors: tuple | None = None
    raw: bytes | None = None    # --decode gpu: JPEG bytes decoded in the main process on the device


def original_size(data: bytes, decoded) -> tuple[int, int]:
    """The picture's own (width, height) after EXIF orientation, read from its header: ``decoded`` may be a
    reduced decode. (A PNG whose EXIF comes after its pixels reads as upright from the header: the
    decoded picture's orientation decides then.)"""
    w, h = image_size(data)
    if decoded.width != decoded.height and (decoded.width > decoded.height) != (w > h):
        w, h = h, w
    return w, h


class DecodeDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[Item], transforms: list[Callable], known_ids: frozenset[str],
                 read_cfg: ReadConfig, max_pixels: int | None, gpu_jpeg: bool = False, min_side: int | None = None):
        self.items = items
        self.min_side = min_side        # decode reduced to this shorter side (``indexer.embed.decode_side``)
        self.gpu_jpeg = gpu_jpeg
        self.transforms = transforms
        self.known_ids = known_ids
        self.read_cfg = read_cfg
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Record:
        item = self.items[i]
        rec = Record(index=i)
        try:
            data = read_bytes(item, self.read_cfg)
            rec.sha256 = store.sha256_bytes(data)
            rec.id = store.content_id(rec.sha256)
            rec.size = len(data)
            if rec.id in self.known_ids:
                rec.duplicate = True
                return rec
            if self.gpu_jpeg:
                from indexer.gpu_batch import gpu_decodable

                size = gpu_decodable(data, self.max_pixels)
                if size is not None:
                    rec.width, rec.height = size
                    rec.raw = data
                    return rec
            img = load_image(data, max_pixels=self.max_pixels, min_side=self.min_side)
            # a reduced decode keeps its shorter side >= MIN_REDUCED_SIDE: smaller ones are the picture's own size
            reduced = self.min_side is not None and min(img.size) >= MIN_REDUCED_SIDE
            rec.width, rec.height = original_size(data, img) if reduced else img.size
            rec.tensors = tuple(t(img) for t in self.transforms)
        except LoupeError as exc:
            rec.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad input must never stop the run
            rec.error = f"{type(exc).__name__}: {exc}"
        return rec


class Uint8Head:
    """The PIL part of a ``Compose([..., ToTensor, Normalize])`` preprocess, returning uint8 CHW.

    Workers send uint8 tensors (4x less inter-process traffic than float32) and the float conversion
    and normalisation run batched in the main process, on the encoder's device (``normalize``): the
    same arithmetic as ``ToTensor`` + ``Normalize``.
    """

    def __init__(self, steps: list):
        self.steps = steps

    def __call__(self, img):
        for step in self.steps:
            img = step(img)
        if img.mode != "RGB":
            img = img.convert("RGB")
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)

    def __repr__(self) -> str:
        return f"Uint8Head({self.steps!r})"


def split_transform(preprocess) -> tuple[Callable, tuple[torch.Tensor, torch.Tensor] | None]:
    """``(worker part, (mean, std) or None)``: split ``[..., ToTensor, Normalize]`` composes; others whole."""
    steps = list(getattr(preprocess, "transforms", None) or [])
    if len(steps) >= 2 and type(steps[-2]).__name__ in ("ToTensor", "MaybeToTensor") \
            and type(steps[-1]).__name__ == "Normalize" and not getattr(steps[-1], "inplace", False):
        mean = torch.as_tensor(steps[-1].mean, dtype=torch.float32).reshape(-1, 1, 1)
        std = torch.as_tensor(steps[-1].std, dtype=torch.float32).reshape(-1, 1, 1)
        return Uint8Head(steps[:-2]), (mean, std)
    return preprocess, None


def normalize(x: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None, device: torch.device) -> torch.Tensor:
    """uint8 batch -> normalised float32 on ``device`` (``ToTensor`` + ``Normalize`` arithmetic)."""
    x = x.to(device, non_blocking=x.is_pinned())
    if stats is None:
        return x
    mean, std = stats
    return x.float().div_(255).sub_(mean.to(device)).div_(std.to(device))


def assemble(batch: dict[str, Any], kept: list[int], decoded: dict, fallback: dict, g: int,
             stats: list, enc) -> torch.Tensor:
    """The encoder's input for the kept records, in order, on its device: rows decoded by the workers
    (normalised here), rows decoded on the GPU (``--decode gpu``) and JPEGs the GPU refused."""
    device = enc.device.device
    parts, where = [], {}
    if batch["ok"]:
        parts.append(normalize(batch["tensors"][g], stats[g], device))
        where.update({idx: pos for pos, idx in enumerate(batch["ok"])})
    if decoded:
        from indexer.gpu_decode import GpuTransformConfig

        tensor, rows = decoded[GpuTransformConfig.from_spec(enc.spec)]
        offset = sum(len(p) for p in parts)
        if tensor is not None:
            parts.append(tensor.to(device))
            where.update({idx: offset + row for idx, row in rows.items() if idx not in fallback})
    fb = [idx for idx in kept if idx in fallback]
    if fb:
        offset = sum(len(p) for p in parts)
        parts.append(normalize(torch.stack([fallback[idx][g] for idx in fb]), stats[g], device))
        where.update({idx: offset + i for i, idx in enumerate(fb)})
    if len(parts) > 1 and any(p.dtype == torch.uint8 for p in parts) and any(p.is_floating_point() for p in parts):
        # colour-names: the GPU gives [0, 1] floats, the CPU path uint8 pixels (no Normalize to apply)
        parts = [p.float().div_(255.0) if p.dtype == torch.uint8 else p for p in parts]
    x = parts[0] if len(parts) == 1 else torch.cat(parts)
    order = [where[idx] for idx in kept]
    if order != list(range(len(x))):
        x = x[torch.as_tensor(order, device=x.device)]
    return x


def collate(records: list[Record]) -> dict[str, Any]:
    """Stack the decoded images per transform (in the worker); records travel without tensors."""
    ok = [r for r in records if r.tensors is not None]
    tensors = [torch.stack([r.tensors[g] for r in ok]) for g in range(len(ok[0].tensors))] if ok else []
    for r in records:
        r.tensors = None
    return {"records": records, "ok": [r.index for r in ok], "tensors": tensors}


def _worker_init(_worker_id: int) -> None:
    """A decode worker: one thread, none of the parent's index locks, and it dies with its parent."""
    from indexer.lock import close_inherited_locks

    torch.set_num_threads(1)
    close_inherited_locks()     # done at the fork already (indexer.lock); again in case of another start method
    die_with_parent()


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux ``PR_SET_PDEATHSIG``), so
    that a forked worker does not outlive a ``kill -9`` of the indexer (torch's watchdog notices only
    every 5 s). Exits at once if the parent is already gone. False where the platform has no such call.

    The signal comes when the parent *thread* that forked this process ends: DataLoader workers are forked
    by the thread that iterates the loader, which outlives its iterator."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import multiprocessing

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(sig), 0, 0, 0) != 0:          # PR_SET_PDEATHSIG = 1
            return False
    except (OSError, AttributeError):
        return False
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid != os.getppid():  # died before the prctl: nobody will signal us
        os._exit(1)
    return True


WORKER_CRASH = "the decoder crashed on this file (its worker process died); skipped"


def _worker_died(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, EOFError)):
        # the worker died while the main process was fetching a tensor it shared by file descriptor
        return True
    text = str(exc)
    return "DataLoader worker" in text and ("exited unexpectedly" in text or "killed by signal" in text)


def prefetch_factor(batch_bytes: int, workers: int, budget: int | None = None) -> int | None:
    """Batches each DataLoader worker prepares ahead: 4 while ``workers`` × 4 batches stay within
    ``budget`` bytes, fewer (down to 1) for large batches or many workers; None without workers.

    Decoded batches waiting in the DataLoader (in shared memory, plus their pinned copies on a GPU) are
    capped this way: with 15 workers × 4 prefetched batches of 256 images at 224 px they would hold
    4.6 GB of host memory. The default budget is ``retrieval.settings.in_flight_bytes()``
    (``LOUPE_IN_FLIGHT_MB``, 1 GiB), read at each call."""
    if workers <= 0:
        return None
    if budget is None:
        budget = settings.in_flight_bytes()
    return int(max(1, min(4, budget // max(1, workers * batch_bytes))))


def batch_bytes(encoders: dict, batch_size: int, gpu_decode: bool) -> int:
    """Host bytes of one decoded batch: a uint8 tensor per transform group at each encoder's input size
    (an upper bound when encoders share a group), or the raw JPEG bytes with ``--decode gpu``."""
    if gpu_decode:
        return batch_size * 200_000                 # compressed JPEG bytes; a generous estimate
    per_image = sum(3 * int(enc.spec.image_size) ** 2 for enc in encoders.values())
    return batch_size * per_image


def iter_batches(dataset: DecodeDataset, *, batch_size: int, workers: int, pin: bool, prefetch: int = 4):
    """Collated batches over ``dataset`` in order, surviving worker crashes.

    A file that kills its worker process (a segfault in a C decoder, say) must not stop the run, nor
    every later run: after a crash, the window of items that were in flight is re-read one item at a
    time in a single worker; the item that kills that worker is reported as failed and skipped.
    """
    n = len(dataset)
    start, isolate_until = 0, 0
    window = batch_size * max(1, workers) * 4 + batch_size
    while start < n:
        isolating = start < isolate_until
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, range(start, n)), batch_size=1 if isolating else batch_size,
            shuffle=False, num_workers=1 if isolating else workers, collate_fn=collate, pin_memory=pin,
            worker_init_fn=_worker_init if workers else None,
            prefetch_factor=(1 if isolating else max(1, prefetch)) if workers else None)   # 1: blame is exact
        it = iter(loader)
        try:
            for batch in it:
                yield batch
                start += len(batch["records"])
                if isolating and start >= isolate_until:
                    break                       # past the suspects: back to full batches
            else:
                return
        except (RuntimeError, ConnectionError, EOFError) as exc:
            if not workers or not _worker_died(exc):
                raise
            if isolating:                       # one item at a time: the crash was this item
                log.warning("%s: %s", dataset.items[start].source, WORKER_CRASH)
                yield {"records": [Record(index=start, error=WORKER_CRASH)], "ok": [], "tensors": []}
                start += 1
            else:
                isolate_until = min(n, start + window)
        finally:
            del it


@contextlib.contextmanager
def worker_errors_in_iteration():
    """Make a dead DataLoader worker surface inside the batch iteration (where ``iter_batches`` handles
    it) instead of torch's SIGCHLD handler raising at a random point of the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from torch.utils.data._utils import signal_handling

    flag, previous = signal_handling._SIGCHLD_handler_set, signal.getsignal(signal.SIGCHLD)
    signal_handling._SIGCHLD_handler_set = True       # loaders created now do not install it
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, previous if previous is not None else signal.SIG_DFL)
        signal_handling._SIGCHLD_handler_set = flag
