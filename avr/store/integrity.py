"""A store's damage found, listed and repaired: `avr cache verify [--repair]` and the summaries
that `avr cache info` and the exports check.

- ``verify_store`` reads every chunk under rows that count (done rows; every row of the index
  arrays) in every array, checking that it is stored and that it decodes (its checksum holds);
- ``repair_store`` marks the rows under damage not done, so the next `avr extract` recomputes
  exactly those; damage to the index arrays cannot be recomputed and is reported;
- ``absent_under_done_rows`` lists absent chunks by listings alone (no chunk read).

The damage model (which absent chunk is damage) is ``avr.store.read``'s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from avr.progress import BYTES_UNIT, Meter
from avr.store import _zarr, schema
from avr.store.group import metadata_differences, open_store, unwritten_by
from avr.store.location import store_location
from avr.store.lock import lock_holder
from avr.store.read import (ChunkDamage, absent_chunks, chunk_count, chunk_rows, chunk_span,
                            chunks_of, read_rows, stored_chunks, undecodable_chunks)

VERIFY_BLOCK_BYTES = 64 << 20  # decoded bytes verify reads at once (zarr decodes in parallel)


def absent_under_done_rows(group, spec: schema.CacheSpec) -> list[ChunkDamage]:
    """Every absent chunk under rows that count, in every array: listings only, no chunk
    read (`avr cache info` reports it)."""
    done = done_rows(group)
    damage: list[ChunkDamage] = []
    for name in schema.array_layout(spec, 0, 0):
        array = group[name]  # an array left unwritten on purpose has no chunk to miss
        damage += absent_chunks(array, rows_that_count(name, array, done))
    return damage


def done_rows(group) -> dict[str, np.ndarray]:
    """The done rows of each kind ("video", "caption")."""
    return {kind: np.flatnonzero(read_rows(group[name])) for kind, name in
            schema.DONE_MASKS.items()}


def rows_that_count(name: str, array, done: dict[str, np.ndarray]) -> np.ndarray:
    """The rows of array ``name`` whose chunks must be whole: every row of an index array,
    the done rows of a feature array (``done``: ``done_rows``)."""
    if name in schema.INDEX_ARRAYS:
        return np.arange(array.shape[0])
    return done[schema.rows_of(name)]


# ---- verify and repair -----------------------------------------------------------------------

@dataclass
class VerifyReport:
    store: str
    damage: list[ChunkDamage] = field(default_factory=list)
    missing_arrays: list[str] = field(default_factory=list)
    metadata: list[str] = field(default_factory=list)  # where array metadata breaks the schema
    unwritten: dict[str, str] = field(default_factory=dict)  # name -> command that left it out
    arrays: int = 0
    chunks: int = 0  # chunks checked
    bytes: int = 0  # decoded bytes checked
    seconds: float = 0.0
    without_checksum: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)  # kind -> rows
    done: dict[str, np.ndarray] = field(default_factory=dict)  # kind -> done rows (as read)
    video_ids: list[str] = field(default_factory=list)
    writer: str | None = None  # a live writer holding the store's lock while it was checked
    repaired: dict[str, Any] | None = None

    @property
    def clean(self) -> bool:
        return not self.damage and not self.missing_arrays and not self.metadata

    @property
    def unrepairable(self) -> list[ChunkDamage]:
        return [d for d in self.damage if d.array in schema.INDEX_ARRAYS]

    def damaged_rows(self) -> dict[str, list[int]]:
        """Per kind, the rows to recompute: the done rows under damaged feature chunks, and
        every row of a damaged done-mask chunk (whether those were done is lost)."""
        out: dict[str, set[int]] = {kind: set() for kind in schema.DONE_MASKS}
        for d in self.damage:
            if d.array in schema.INDEX_ARRAYS:
                continue
            span = np.arange(*d.rows)
            if d.array not in schema.DONE_MASKS.values():
                span = span[np.isin(span, self.done[d.kind])]
            out[d.kind].update(span.tolist())
        return {kind: sorted(rows) for kind, rows in out.items()}

    def damaged_video_ids(self) -> list[str]:
        return [self.video_ids[row] for row in self.damaged_rows()["video"]
                if row < len(self.video_ids)]

    def to_json(self) -> dict[str, Any]:
        return {
            "store": self.store, "clean": self.clean, "seconds": round(self.seconds, 3),
            "checked": {"arrays": self.arrays, "chunks": self.chunks, "bytes": self.bytes},
            **{f"{kind}s": {"rows": self.rows.get(kind, 0), "done": len(self.done.get(kind, []))}
               for kind in schema.DONE_MASKS},
            "without_checksum": self.without_checksum,
            "damage": [d.to_json() for d in self.damage],
            "missing_arrays": self.missing_arrays,
            "metadata": self.metadata,
            "unwritten": self.unwritten,
            "damaged_rows": self.damaged_rows(),
            "damaged_videos": self.damaged_video_ids(),
            "unrepairable": [d.to_json() for d in self.unrepairable],
            "writer": self.writer,
            "repaired": self.repaired,
        }


def verify_store(location: str | Path, *, console=None) -> VerifyReport:
    """Read every chunk under rows that count, in every array of the store, checking that it is
    stored and that it decodes (its checksum holds). A rich progress bar with throughput is
    shown on ``console``."""
    started = time.perf_counter()
    group, spec = open_store(location, check_metadata=False)
    holder = lock_holder(location)
    report = VerifyReport(str(store_location(location)),
                          writer=holder.describe() if holder is not None else None)
    report.metadata = [d for d in metadata_differences(group, spec) if "missing (" not in d]
    if report.metadata:  # chunks read through wrong metadata would mislead: fix it first
        report.seconds = time.perf_counter() - started
        return report
    arrays = {}
    for name in schema.array_layout(spec, 0, 0):
        try:
            array = group[name]
        except KeyError:  # its zarr.json is gone
            report.missing_arrays.append(name)
            continue
        if unwritten_by(array) is not None:  # nothing stored, nothing to check
            report.unwritten[name] = unwritten_by(array)
        else:
            arrays[name] = array
    report.arrays = len(arrays)
    report.without_checksum = [name for name, array in arrays.items()
                               if not _zarr.has_checksum(array)]
    _verify_done_masks(arrays, report)
    plan = {name: rows_that_count(name, array, report.done) for name, array in arrays.items()
            if name not in schema.DONE_MASKS.values()}
    total = sum(len(chunks_of(arrays[name], rows)) for name, rows in plan.items())
    with Meter(console) as meter:
        task = meter.add("verify chunks", total, BYTES_UNIT)
        for name, rows in plan.items():
            _verify_array(arrays[name], rows, report, partial(meter.advance, task))
    if schema.VIDEO_ID in arrays and not any(d.array == schema.VIDEO_ID for d in report.damage):
        report.video_ids = [str(v) for v in arrays[schema.VIDEO_ID][:]]
    report.seconds = time.perf_counter() - started
    return report


def _verify_done_masks(arrays: dict, report: VerifyReport) -> None:
    """Read each done mask; a chunk that fails to decode is damage and its rows count as not
    done."""
    for kind, name in schema.DONE_MASKS.items():
        if name not in arrays:
            report.done[kind] = np.zeros(0, dtype=np.int64)
            continue
        array = arrays[name]
        try:
            mask = np.asarray(array[:]).astype(bool)
        except Exception:  # narrowed down to its chunks; a damaged chunk's rows count as not done
            damage = undecodable_chunks(array, range(chunk_count(array)))
            mask = np.zeros(array.shape[0], dtype=bool)
            for chunk in set(range(chunk_count(array))) - {d.chunk for d in damage}:
                start, stop = chunk_span(array, chunk)
                mask[start:stop] = np.asarray(array[start:stop]).astype(bool)
            report.damage += damage
        report.rows[kind] = array.shape[0]
        report.done[kind] = np.flatnonzero(mask)
        report.chunks += chunk_count(array)
        report.bytes += array.nbytes


def _verify_array(array, rows: np.ndarray, report: VerifyReport, advance) -> None:
    """Check the chunks under ``rows``; ``advance(chunks, nbytes=...)`` reports progress."""
    chunks = chunks_of(array, rows)
    stored = stored_chunks(array)
    absent = absent_chunks(array, rows, stored)
    report.damage += absent
    report.chunks += len(chunks)
    readable = [int(c) for c in chunks if c in stored]
    advance(len(chunks) - len(readable))  # absent: damage, or allowed (old stores)
    row_bytes = max(1, array.nbytes // max(1, array.shape[0]))
    per_block = max(1, VERIFY_BLOCK_BYTES // (row_bytes * chunk_rows(array)))
    for block in _runs(readable, per_block):
        start, stop = chunk_span(array, block[0])[0], chunk_span(array, block[-1])[1]
        try:
            array[start:stop]
        except Exception:  # narrowed down to its chunks
            report.damage += undecodable_chunks(array, block)
        report.bytes += (stop - start) * row_bytes
        advance(len(block), nbytes=(stop - start) * row_bytes)


def _runs(chunks: list[int], most: int) -> list[list[int]]:
    """Consecutive chunk indices grouped into runs of at most ``most``."""
    runs: list[list[int]] = []
    for chunk in chunks:
        if runs and chunk == runs[-1][-1] + 1 and len(runs[-1]) < most:
            runs[-1].append(chunk)
        else:
            runs.append([chunk])
    return runs


def repair_store(location: str | Path, report: VerifyReport, lock) -> dict[str, Any]:
    """Mark the rows under ``report``'s damage not done, so the next `avr extract` recomputes
    exactly those: video rows under damaged video chunks, caption rows under damaged caption
    chunks, every row of a damaged done-mask chunk. Chunks that fail to decode are rewritten
    with the fill value (their rows are no longer done, and the extract reads them back when
    it completes a chunk). Damage to the index arrays (ids, splits, captions) cannot be
    recomputed from rows: it is left and reported. The caller holds the store's lock."""
    group, _ = open_store(location, mode="r+")
    rows = report.damaged_rows()
    lock.check()
    # Done masks first: until then a kill leaves the damage as it was, found by the next verify.
    for d in report.damage:
        if d.array in schema.DONE_MASKS.values():
            _rewrite_with_fill(group[d.array], d)
    for kind, name in schema.DONE_MASKS.items():
        mask = group[name]
        for start, stop in _row_runs(rows[kind]):
            mask[start:stop] = False
    rewritten = [d for d in report.damage if d.problem != "absent"
                 and d.array not in schema.INDEX_ARRAYS
                 and d.array not in schema.DONE_MASKS.values()]
    for d in rewritten:
        _rewrite_with_fill(group[d.array], d)
    repaired = {"video_rows": rows["video"], "caption_rows": rows["caption"],
                "rewritten_chunks": [d.to_json() for d in rewritten],
                "unrepairable": [d.to_json() for d in report.unrepairable]}
    report.repaired = repaired
    return repaired


def _rewrite_with_fill(array, damage: ChunkDamage) -> None:
    """Write a whole chunk of the fill value (a whole-chunk write reads nothing back)."""
    start, stop = damage.rows
    array[start:stop] = np.full((stop - start, *array.shape[1:]), array.fill_value,
                                dtype=array.dtype)


def _row_runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted rows as [start, stop) runs of consecutive rows."""
    runs: list[tuple[int, int]] = []
    for row in rows:
        if runs and row == runs[-1][1]:
            runs[-1] = (runs[-1][0], row + 1)
        else:
            runs.append((row, row + 1))
    return runs
