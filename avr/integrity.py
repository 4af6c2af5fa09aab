"""Damage in a store: found by every read of rows, listed by `avr cache verify`, repaired by
marking the damaged rows not done so that the next `avr extract` recomputes them.

Damage is a chunk under rows that count (done rows; every row of the index arrays, which are
written when the store is created) that is absent, fails its crc32c checksum, or cannot be
decoded (a truncated file). A read that fails to decode is narrowed down chunk by chunk so that
the error names the array, the chunk and its rows (``DamagedStoreError``). Zarr reads an absent
chunk as the fill value, so after a read the chunks whose rows all read back as the fill value
(judged on the first values of each row) are looked up in the store: one lookup each, or one
listing of the array's chunk keys when there are many. A chunk of features never reads as all
zeros, so a healthy store costs no lookup there; listing the keys before every read would cost
a walk over every chunk file (``benchmarks/store_integrity.py``). ``require_stored`` (a
listing, no read) checks rows that are not read: `avr cache info`, dask arrays, verify.

An array a store leaves unwritten on purpose (``schema.ATTR_UNWRITTEN``: `avr bench store
--arrays/--heads`) holds no chunk and is no damage: reading it fails with that reason
(``UnwrittenArrayError``), info and verify list it apart.

Which absent chunks are damage: avr stores every chunk it writes (``schema._zarr``), so in an
array written with checksums an absent chunk under done rows is damage. Stores written before
checksums skipped chunks equal to the fill value (a chunk of ``has_audio = False`` rows, of
train rows in ``video_split``); there only the float arrays (features, never all zero) are held
to every chunk. In a done mask an absent chunk means "nothing done here".
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from avr import schema
from avr.chunks import ChunkDecoder
from avr.errors import AvrError

VERIFY_BLOCK_BYTES = 64 << 20  # decoded bytes verify reads at once (zarr decodes in parallel)
FILL_PROBE = 16  # values per row compared with the fill value to suspect an absent chunk
LOOKUPS_MAX = 64  # more suspected chunks than this: one listing instead of one lookup each


@dataclass(frozen=True)
class ChunkDamage:
    array: str
    chunk: int  # index along rows
    key: str  # the chunk's key within the array, e.g. "c/3/0/0"
    rows: tuple[int, int]  # [start, stop)
    problem: str

    @property
    def kind(self) -> str:
        return schema.rows_of(self.array)

    def describe(self) -> str:
        start, stop = self.rows
        return (f"{self.array} chunk {self.key} ({self.kind} rows {start}-{stop - 1}): "
                f"{self.problem}")

    def to_json(self) -> dict[str, Any]:
        return {"array": self.array, "chunk": self.chunk, "key": self.key,
                "rows": list(self.rows), "problem": self.problem}


class DamagedStoreError(AvrError):
    """Chunks under rows that count are absent or fail their checksum."""

    def __init__(self, store: str, damage: list[ChunkDamage]):
        self.damage = damage
        shown = [d.describe() for d in damage[:10]]
        if len(damage) > 10:
            shown.append(f"... {len(damage) - 10} more")
        super().__init__(
            f"{store} is damaged:\n  " + "\n  ".join(shown) + f"\n`avr cache verify {store}` "
            f"lists all damage; `avr cache verify {store} --repair` marks the rows for "
            f"recomputation by the next `avr extract`")


class UnwrittenArrayError(AvrError):
    """A read of an array that the store leaves unwritten on purpose."""

    def __init__(self, store: str, array: str, command: str):
        self.array = array
        super().__init__(
            f"{store}: array {array} was left unwritten on purpose by `{command}`; write a store "
            f"that has it: the same command with {array} in --arrays, or with --heads naming "
            f"every head you will run")


def require_written(array) -> None:
    """Raise UnwrittenArrayError when ``array`` is left unwritten on purpose."""
    command = schema.unwritten_by(array)
    if command is not None:
        raise UnwrittenArrayError(store_text(array), array.basename, command)


def require_arrays_written(location: str | Path, names) -> None:
    """Raise UnwrittenArrayError for the first of arrays ``names`` that the store at
    ``location`` leaves unwritten on purpose (a run checks this before it starts)."""
    group, _ = schema.open_store(location)
    for name in names:
        require_written(group[name])


# ---- chunks of one array ---------------------------------------------------------------------

def chunk_rows(array) -> int:
    return array.chunks[0]


def chunk_count(array) -> int:
    return -(-array.shape[0] // chunk_rows(array))


def chunk_span(array, chunk: int) -> tuple[int, int]:
    start = int(chunk) * chunk_rows(array)
    return start, min(start + chunk_rows(array), array.shape[0])


def chunk_key(array, chunk: int) -> str:
    return array.metadata.encode_chunk_key((chunk,) + (0,) * (array.ndim - 1))


def chunks_of(array, rows: np.ndarray) -> np.ndarray:
    return np.unique(np.asarray(rows, dtype=np.int64) // chunk_rows(array))


def chunk_runs(array, rows: np.ndarray) -> list[tuple[int, int, int]]:
    """``rows`` (ascending) cut where the chunk changes: (first, last, chunk) for each run,
    ``rows[first:last]`` all in row-chunk ``chunk``."""
    if not len(rows):
        return []
    chunk_of = np.asarray(rows, dtype=np.int64) // chunk_rows(array)
    edges = np.flatnonzero(np.r_[True, chunk_of[1:] != chunk_of[:-1], True]).tolist()
    return [(first, last, int(chunk_of[first])) for first, last in zip(edges[:-1], edges[1:])]


def has_checksum(array) -> bool:
    from zarr.codecs import Crc32cCodec

    return any(isinstance(codec, Crc32cCodec) for codec in array.metadata.codecs)


def every_chunk_is_stored(array) -> bool:
    """Whether an absent chunk of ``array`` under rows that count is damage (module
    docstring)."""
    if array.basename in schema.DONE_MASKS.values() or schema.unwritten_by(array) is not None:
        return False
    return has_checksum(array) or array.dtype.kind == "f"


def stored_chunks(array) -> set[int]:
    """Row-chunk indices of ``array`` whose chunk is in the store: one listing, no read."""
    from zarr.core.sync import sync

    async def keys() -> set[str]:
        prefix = array.store_path.path
        return {key[len(prefix) + 1:]
                async for key in array.store_path.store.list_prefix(prefix)}

    present = sync(keys())
    return {chunk for chunk in range(chunk_count(array)) if chunk_key(array, chunk) in present}


def will_read(array, rows: np.ndarray) -> None:
    """Tell the kernel that the chunk files under ``rows`` of a local array are read next
    (``POSIX_FADV_WILLNEED``): it reads them into the page cache in the background, so that a
    streamed epoch's disk reads overlap its decoding instead of waiting for each file in turn.
    Nothing for a store at a URL, an absent chunk, or a system without ``posix_fadvise``."""
    store = array.store_path.store
    if not hasattr(store, "root") or not hasattr(os, "posix_fadvise"):
        return
    folder = Path(store.root) / array.store_path.path
    for chunk in chunks_of(array, rows).tolist():
        try:
            handle = os.open(folder / chunk_key(array, chunk), os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(handle, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(handle)


def store_text(array) -> str:
    """The store holding ``array``, as a path or URL for messages."""
    store = array.store_path.store
    if hasattr(store, "root"):  # a local directory
        return str(store.root)
    return store.fs.unstrip_protocol(store.path) if hasattr(store.fs, "unstrip_protocol") \
        else f"{store.fs.protocol}://{store.path}"


def _damage(array, chunk: int, problem: str) -> ChunkDamage:
    return ChunkDamage(array.basename, int(chunk), chunk_key(array, chunk),
                       chunk_span(array, chunk), problem)


def _problem(error: BaseException) -> str:
    text = str(error)
    if "checksum" in text.lower():
        return "fails its crc32c checksum"
    return f"cannot be decoded ({type(error).__name__}: {text})"


def absent_chunks(array, rows: np.ndarray, stored: set[int] | None = None) -> list[ChunkDamage]:
    """The chunks under ``rows`` that should be stored and are not."""
    if len(rows) == 0 or not every_chunk_is_stored(array):
        return []
    stored = stored_chunks(array) if stored is None else stored
    return [_damage(array, chunk, "absent") for chunk in chunks_of(array, rows)
            if chunk not in stored]


def require_stored(array, rows: np.ndarray) -> None:
    """Raise DamagedStoreError when a chunk under ``rows`` should be stored and is not."""
    missing = absent_chunks(array, rows)
    if missing:
        raise DamagedStoreError(store_text(array), missing)


def undecodable_chunks(array, chunks) -> list[ChunkDamage]:
    """The ``chunks`` that fail to read, each read alone."""
    damage = []
    for chunk in chunks:
        start, stop = chunk_span(array, chunk)
        try:
            array[start:stop]
        except Exception as error:  # zarr raises whatever the failing codec raises
            damage.append(_damage(array, chunk, _problem(error)))
    return damage


# ---- reading rows ----------------------------------------------------------------------------

def read_rows(array, rows: np.ndarray | None = None, *,
              must_be_stored: np.ndarray | None = None) -> np.ndarray:
    """Rows ``rows`` (ascending store rows; None: every row) of ``array``. Raises
    DamagedStoreError when a chunk read fails its checksum or to decode, or when a chunk under
    ``must_be_stored`` (rows among ``rows``; default: all of them) is absent, and
    UnwrittenArrayError when the store leaves the array unwritten on purpose."""
    require_written(array)
    rows = np.arange(array.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
    try:
        values = _read(array, rows)
    except Exception as error:
        damage = undecodable_chunks(array, chunks_of(array, rows))
        if not damage:  # not the store's data (e.g. a network error): as it came
            raise
        raise DamagedStoreError(store_text(array), damage) from error
    must = rows if must_be_stored is None else np.asarray(must_be_stored, dtype=np.int64)
    if len(must) and every_chunk_is_stored(array):
        head = values.reshape(len(values), -1)[:, :FILL_PROBE]  # a view: no copy of the rows
        if must_be_stored is not None:
            head = head[np.searchsorted(rows, must)]
        suspects = _fill_looking_chunks(array, head, must)
        stored = (stored_chunks(array) if len(suspects) > LOOKUPS_MAX
                  else _stored_among(array, suspects))
        missing = [_damage(array, chunk, "absent") for chunk in suspects if chunk not in stored]
        if missing:
            raise DamagedStoreError(store_text(array), missing)
    return values


def _fill_looking_chunks(array, head: np.ndarray, rows: np.ndarray) -> list[int]:
    """The chunks of ``rows`` whose every row reads back as the fill value, judged on its first
    values (``head``, one row each): an absent chunk reads that way, a stored chunk of features
    never does."""
    looks_fill = np.asarray(head == array.fill_value).all(axis=1)
    chunk_of = rows // chunk_rows(array)
    return sorted(set(chunk_of[looks_fill].tolist()) - set(chunk_of[~looks_fill].tolist()))


def _stored_among(array, chunks: list[int]) -> set[int]:
    """Which of ``chunks`` the store holds: one lookup each, made together."""
    import asyncio

    from zarr.core.sync import sync

    if not chunks:
        return set()
    store, prefix = array.store_path.store, array.store_path.path

    async def lookups() -> list[bool]:
        return await asyncio.gather(*(store.exists(f"{prefix}/{chunk_key(array, chunk)}")
                                      for chunk in chunks))

    return {chunk for chunk, found in zip(chunks, sync(lookups())) if found}


def read_region(array, start: int, stop: int,
                must_be_stored: np.ndarray | None = None) -> np.ndarray:
    """Rows [start, stop); an absent chunk reads as the fill value (rows not written yet)
    unless it is under ``must_be_stored``. A chunk that fails to decode raises
    DamagedStoreError."""
    must = np.empty(0, dtype=np.int64) if must_be_stored is None else must_be_stored
    return read_rows(array, np.arange(start, stop), must_be_stored=must)


SPAN_BYTES = 64 * 2**20  # at most this much of an array decoded per store call of ``_read``


def _read(array, rows: np.ndarray, block: int = 4096) -> np.ndarray:
    """Rows ``rows`` (ascending) of ``array``. A local array with the codecs avr writes is read
    chunk by chunk by ``avr.chunks.ChunkDecoder`` (``_decode_rows``). Otherwise contiguous rows
    are one slice; scattered rows of a
    numeric array are read as slices over runs of the chunks they touch (each call at most
    ``SPAN_BYTES``) and picked from those: zarr decodes the same whole chunks either way, and a
    slice copies each chunk out once where an orthogonal selection copies it row by row (3x
    slower on a streamed epoch's reads). Strings go by orthogonal selection in blocks."""
    if len(rows) == 0:
        return np.zeros((0, *array.shape[1:]), dtype=array.dtype)
    decoder = ChunkDecoder(array)
    if decoder.supported:
        return _decode_rows(array, rows, decoder)
    if _is_run(rows):
        return np.asarray(array[int(rows[0]):int(rows[-1]) + 1])
    dtype = np.dtype(array.dtype)
    if dtype.kind not in "biuf":
        return np.concatenate([np.asarray(array.get_orthogonal_selection(rows[i:i + block]))
                               for i in range(0, len(rows), block)])
    out = np.empty((len(rows), *array.shape[1:]), dtype=dtype)
    for first, last, start, stop in _spans(array, rows):
        part = rows[first:last]
        if _is_run(part) and last - first == stop - start:  # every row: straight into place
            out[first:last] = array[start:stop]
        else:
            out[first:last] = np.asarray(array[start:stop])[part - start]
    return out


def _is_run(rows: np.ndarray) -> bool:
    """Whether ascending ``rows`` are consecutive, each once."""
    return bool(np.all(np.diff(rows) == 1))


def _decode_rows(array, rows: np.ndarray, decoder: ChunkDecoder) -> np.ndarray:
    """Rows ``rows`` (ascending) of a local array, chunk by chunk through ``decoder``: a chunk
    whose every row is asked for is decoded straight into its place in the result, and a chunk
    the decoder cannot vouch for is read through zarr (which raises on damage or reads an
    absent chunk as the fill value, as ever). On a VATEX-sized store this reads the index arrays
    15-20x and token arrays 1.6x faster than zarr, which decodes each chunk into a fresh buffer
    and copies it out (``avr.chunks``)."""
    out = np.empty((len(rows), *array.shape[1:]), dtype=array.dtype)
    per_chunk = chunk_rows(array)
    for first, last, chunk in chunk_runs(array, rows):
        start, stop = chunk_span(array, chunk)
        offsets = rows[first:last] - start
        if len(offsets) == per_chunk and _is_run(offsets):  # the whole chunk: in place
            if decoder.decode(chunk, into=out[first:last]) is not None:
                continue
            block = None
        else:
            block = decoder.decode(chunk)
        if block is None:
            block = np.asarray(array[start:stop])
        out[first:last] = block[offsets]
    return out


def _spans(array, rows: np.ndarray) -> list[tuple[int, int, int, int]]:
    """``rows`` (ascending) cut into spans of consecutive chunks, each at most ``SPAN_BYTES``
    of rows (whole chunks, at least one): (first, last) positions in ``rows`` and the
    [start, stop) store rows of the span that covers them, trimmed to those rows."""
    per_chunk = chunk_rows(array)
    row_bytes = max(1, int(np.prod(array.shape[1:], dtype=np.int64)) * array.dtype.itemsize)
    span_chunks = max(1, SPAN_BYTES // (row_bytes * per_chunk))
    chunk = rows // per_chunk
    breaks = np.flatnonzero(np.diff(chunk) > 1) + 1  # a chunk skipped: a new span
    spans = []
    for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
        first_chunk = chunk[lo]
        cut = lo + np.flatnonzero(np.diff((chunk[lo:hi] - first_chunk) // span_chunks)) + 1
        for a, b in zip(np.r_[lo, cut], np.r_[cut, hi]):
            spans.append((int(a), int(b), int(rows[a]), int(rows[b - 1]) + 1))
    return spans


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
        return not self.damage and not self.missing_arrays

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
    from avr.lock import lock_holder

    started = time.perf_counter()
    group, spec = schema.open_store(location)
    holder = lock_holder(location)
    report = VerifyReport(str(schema.store_location(location)),
                          writer=holder.describe() if holder is not None else None)
    arrays = {}
    for name in schema.array_layout(spec, 0, 0):
        try:
            array = group[name]
        except KeyError:  # its zarr.json is gone
            report.missing_arrays.append(name)
            continue
        if schema.unwritten_by(array) is not None:  # nothing stored, nothing to check
            report.unwritten[name] = schema.unwritten_by(array)
        else:
            arrays[name] = array
    report.arrays = len(arrays)
    report.without_checksum = [name for name, array in arrays.items() if not has_checksum(array)]
    _verify_done_masks(arrays, report)
    plan = {name: rows_that_count(name, array, report.done) for name, array in arrays.items()
            if name not in schema.DONE_MASKS.values()}
    total = sum(len(chunks_of(arrays[name], rows)) for name, rows in plan.items())
    with _VerifyProgress(console, total) as progress:
        for name, rows in plan.items():
            _verify_array(arrays[name], rows, report, progress)
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


def _verify_array(array, rows: np.ndarray, report: VerifyReport, progress: _VerifyProgress
                  ) -> None:
    chunks = chunks_of(array, rows)
    stored = stored_chunks(array)
    absent = absent_chunks(array, rows, stored)
    report.damage += absent
    report.chunks += len(chunks)
    readable = [int(c) for c in chunks if c in stored]
    progress.advance(len(chunks) - len(readable), 0)  # absent: damage, or allowed (old stores)
    row_bytes = max(1, array.nbytes // max(1, array.shape[0]))
    per_block = max(1, VERIFY_BLOCK_BYTES // (row_bytes * chunk_rows(array)))
    for block in _runs(readable, per_block):
        start, stop = chunk_span(array, block[0])[0], chunk_span(array, block[-1])[1]
        try:
            array[start:stop]
        except Exception:  # narrowed down to its chunks
            report.damage += undecodable_chunks(array, block)
        report.bytes += (stop - start) * row_bytes
        progress.advance(len(block), (stop - start) * row_bytes)


def _runs(chunks: list[int], most: int) -> list[list[int]]:
    """Consecutive chunk indices grouped into runs of at most ``most``."""
    runs: list[list[int]] = []
    for chunk in chunks:
        if runs and chunk == runs[-1][-1] + 1 and len(runs[-1]) < most:
            runs[-1].append(chunk)
        else:
            runs.append([chunk])
    return runs


class _VerifyProgress:
    """The verify bar: chunks checked of the total, decoded MB/s and ETA (silent without a
    console)."""

    def __init__(self, console, total: int):
        self.bar = None
        self.total = total
        if console is not None:
            from avr.progress import progress_bar

            self.bar = progress_bar(console)
        self.bytes = 0
        self.started = time.perf_counter()

    def __enter__(self) -> _VerifyProgress:
        if self.bar is not None:
            self.bar.__enter__()
            self.task = self.bar.add_task("verify chunks", total=self.total, rate="")
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def advance(self, chunks: int, nbytes: int) -> None:
        if self.bar is None:
            return
        from avr.progress import rate_text

        self.bytes += nbytes
        rate = rate_text(self.bytes / 1e6, time.perf_counter() - self.started, "MB")
        self.bar.update(self.task, advance=chunks, rate=rate)


def repair_store(location: str | Path, report: VerifyReport, lock) -> dict[str, Any]:
    """Mark the rows under ``report``'s damage not done, so the next `avr extract` recomputes
    exactly those: video rows under damaged video chunks, caption rows under damaged caption
    chunks, every row of a damaged done-mask chunk. Chunks that fail to decode are rewritten
    with the fill value (their rows are no longer done, and the extract reads them back when
    it completes a chunk). Damage to the index arrays (ids, splits, captions) cannot be
    recomputed from rows: it is left and reported. The caller holds the store's lock."""
    group, _ = schema.open_store(location, mode="r+")
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
