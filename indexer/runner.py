"""The indexing runner: reader → mapper → writer, three swappable stages, each timed (as clip-retrieval's).

* **reader**: an iterator of ``ReadBatch``: items read and decoded (``indexer.decode`` locally, Ray
  actors with ``--ray``), split by ``triage`` into records to embed (``kept`` and their metadata
  ``rows``), ``aliases`` (content already indexed, or seen earlier in this run) and ``failures``;
* **mapper**: ``ReadBatch -> (vectors, local)`` for the kept records, in order (``indexer.embed.Embedder``,
  or ``indexer.distributed.single_writer.select_embedded`` for batches Ray already embedded);
* **writer**: ``add(rows, vectors, local)``, ``add_alias(id, source)``, ``close(finish=...)``
  (``indexer.writer.BackgroundWriter``), opened once the first batch is read, so DataLoader workers
  fork before the writer's thread starts.

``run_stages`` times the main thread's calls into each stage (``IndexSummary.stages``): ``read`` is
the wait for the next batch (workers decode in parallel), ``embed`` the forward passes, ``write`` the
hand-over to the writer's thread (it blocks when writing falls behind) and the final commit.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np

from indexer.decode import Record
from indexer.sources import Failure, Item


@dataclass
class ReadBatch:
    """One batch out of the reader: every record read, and what becomes of each."""

    records: list[Record]
    data: dict[str, Any]                  # the collated batch the mapper reads (tensors, or Ray's vectors)
    kept: list[int] = field(default_factory=list)              # record indices to embed, in order
    rows: list[dict[str, Any]] = field(default_factory=list)   # their metadata rows
    aliases: list[tuple[str, str]] = field(default_factory=list)   # (id, source): not embedded again
    failures: list[Failure] = field(default_factory=list)


@dataclass
class StageTimes:
    """Seconds the run spent in each stage (see module docstring)."""

    read: float = 0.0
    embed: float = 0.0
    write: float = 0.0
    optimize: float = 0.0       # building the searchable layout at the end (only when the run did)

    @contextlib.contextmanager
    def timing(self, stage: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, stage, getattr(self, stage) + time.perf_counter() - t)

    def to_json(self) -> dict[str, float]:
        out = {"read": round(self.read, 3), "embed": round(self.embed, 3), "write": round(self.write, 3)}
        return {**out, "optimize": round(self.optimize, 3)} if self.optimize else out


@dataclass
class IndexSummary:
    indexed: int = 0
    skipped: int = 0
    failed: list[Failure] = field(default_factory=list)
    shards: int = 0
    seconds: float = 0.0
    pruned: int = 0
    stages: StageTimes = field(default_factory=StageTimes)
    optimized: dict[str, Any] | None = None    # the `loupe optimize` summary, when the run optimized

    def to_json(self) -> dict[str, Any]:
        """The summary line of ``loupe index`` (keys fixed by INTERFACE.md; ``stages`` last, after
        ``optimized`` when the run built the searchable layout)."""
        out = {"indexed": self.indexed, "skipped": self.skipped, "failed": [f.to_json() for f in self.failed],
               "shards": self.shards, "seconds": round(self.seconds, 3)}
        if self.optimized is not None:
            out["optimized"] = self.optimized
        return {**out, "stages": self.stages.to_json()}


class Writer(Protocol):
    def add(self, rows: list[dict[str, Any]], vectors: dict[str, np.ndarray], local: dict | None = None) -> None: ...

    def add_alias(self, image_id: str, source: str) -> None: ...

    def close(self, *, finish: bool = True) -> None: ...


Mapper = Callable[[ReadBatch], tuple[dict[str, np.ndarray], dict[str, Any]]]


def row_of(rec: Record, item: Item) -> dict[str, Any]:
    """The metadata row of a decoded record."""
    return {"id": rec.id, "source": item.source, "path": item.path if item.kind == "file" else None,
            "caption": item.caption, "width": rec.width, "height": rec.height, "sha256": rec.sha256,
            "size": rec.size, "mtime": item.mtime, "aliases": [], "extra": item.extra}


def triage(batches: Iterable[dict[str, Any]], items: list[Item], known_ids: Iterable[str]) -> Iterator[ReadBatch]:
    """The reader's last step: split each collated batch's records into those to embed, aliases (content
    already in the index, or seen earlier in this run) and failures."""
    seen = set(known_ids)
    for data in batches:
        batch = ReadBatch(records=data["records"], data=data)
        for rec in batch.records:
            item = items[rec.index]
            if rec.error is not None:
                batch.failures.append(Failure(item.source, rec.error))
            elif rec.duplicate or rec.id in seen:
                batch.aliases.append((rec.id, item.source))   # sent after this batch's rows
            else:
                seen.add(rec.id)
                batch.kept.append(rec.index)
                batch.rows.append(row_of(rec, item))
        yield batch


def run_stages(reader: Iterator[ReadBatch], mapper: Mapper, open_writer: Callable[[], Writer],
               summary: IndexSummary, progress: Callable[[int, int], None] | None = None) -> None:
    """Feed every batch of ``reader`` through ``mapper`` into the writer, then close it (commit).

    Counts go to ``summary`` (indexed, skipped, failed) and times to ``summary.stages``;
    ``progress(done, indexed)`` is called after every batch. On Ctrl-C what was embedded is committed;
    on any other error the writer stops without committing the shard it was filling."""
    times = summary.stages
    with times.timing("read"):
        batch = next(reader, None)
    writer = open_writer()
    finished = False
    done = 0
    try:
        while batch is not None:
            summary.failed.extend(batch.failures)
            summary.skipped += len(batch.aliases)
            if batch.rows:
                with times.timing("embed"):
                    vectors, local = mapper(batch)
                with times.timing("write"):
                    writer.add(batch.rows, vectors, local)
                summary.indexed += len(batch.rows)
            with times.timing("write"):
                for image_id, source in batch.aliases:
                    writer.add_alias(image_id, source)
            done += len(batch.records)
            if progress:
                progress(done, summary.indexed)
            with times.timing("read"):
                batch = next(reader, None)
        with times.timing("write"):
            writer.close()
        finished = True
    except KeyboardInterrupt:
        writer.close()   # commit what was embedded, then stop
        finished = True
        raise
    finally:
        if not finished:
            writer.close(finish=False)
