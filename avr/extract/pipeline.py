"""`avr extract`: dataset -> decoded clips -> frozen backbones -> the Zarr store.

The order of work, and what it guarantees:

1. The store is created at its final size (``create_store``) with every id, split and
   caption; nothing is ever appended or resized (zarr loses data under concurrent resizes).
2. Captions are encoded first, one caption chunk at a time; ``caption_done`` is written after
   the chunk's arrays.
3. Videos, one store chunk of rows at a time: worker processes decode the clips of the next
   chunks while the backbones encode the current one; every array of the chunk is written as
   whole chunks, and only then ``video_done``. A process killed anywhere leaves rows not marked
   done, which the next run redoes; rows marked done are never recomputed.
4. A clip that cannot be decoded (missing, zero-byte, unreadable, truncated, no video stream)
   is recorded with its id, path and reason in the store's attrs and in ``failures.jsonl``
   beside it, left not done, and retried on the next run.

The store is a local directory or an fsspec URL (``s3://``, ``gs://``, ``file://``): zarr
reads and writes the arrays, fsspec checks, deletes and measures the store and writes
``failures.jsonl``, so both kinds behave alike.

Writing into a store made with other backbones, parameters or dataset contents is refused
with the differences unless ``overwrite`` is set, which replaces only an avr store or an empty
folder (``replace_store``); an ``--out`` inside ``--root`` is refused. A full disk ends the run
with one line and the store resumes; decode workers end with their parent, even a killed one.

One writer: the run takes the store's lock (``avr.store.lock``) before anything else and holds it to
the end; a second run on the same store refuses at once, naming the holder, and a lock left by
a killed run is taken over. Creation is safe to kill: the store counts as created only once its
root attributes are written (last), and an unfinished store is created again by the next run.

The work on one chunk (``commit_caption_chunk``, ``commit_video_chunk``) is the same whether
this process runs it or a dask worker does (``avr.extract.distributed``).
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.markup import escape

from avr.batching import map_batches
from avr.device import resolve_device
from avr.errors import AvrError, CacheMismatchError, DecodeError, StoreFullError
from avr.extract.backbones import BackboneNames, Backbones, load_backbones
from avr.extract.datasets import DatasetIndex, default_root, load_dataset
from avr.extract.thumbnails import relative_path
from avr.progress import Meter
from avr.store import schema
from avr.store.group import (create_store, open_store, refuse_foreign, replace_store,
                             store_condition)
from avr.store.info import stored_bytes
from avr.store.location import reachable_location, store_filesystem, store_location
from avr.store.lock import StoreLock, WriterToken
from avr.store.media import ensure_media_arrays, media_root, write_media
from avr.store.read import read_region, read_rows
from avr.store.schema import AudioParams, CacheSpec


@dataclass
class ExtractConfig:
    dataset: str = "vatex"
    root: Path | None = None  # default data/<dataset>
    videos_dir: str | Path | None = None  # relative to root or absolute; default: the release's
    out: str | Path = Path("cache")  # a local path or an fsspec URL (s3://, gs://, file://)
    weights: str = "real"  # --backbones: "real" (pretrained weights) | "tiny" (random configs)
    names: BackboneNames = field(default_factory=BackboneNames)  # text lengths None: the dataset's
    num_frames: int | None = None  # default: the dataset's (12 MSR-VTT, 32 VATEX, 64 DiDeMo)
    device: str = "auto"
    workers: int | None = None  # decode processes; 0 decodes in this process
    chunk_rows: int | None = None  # video rows per store chunk (and per write); default auto
    compression: str = "zstd"  # schema.COMPRESSIONS; a new store's codecs (a resumed one keeps its)
    text_batch: int = 256
    frame_batch: int = 256
    audio_batch: int = 16
    overwrite: bool = False
    seed: int = 0  # seeds tiny backbones and the demo generator
    dataset_options: dict[str, Any] = field(default_factory=dict)
    read_audio: bool = True  # False: every clip recorded without a track (the dataset's, MSVD)


@dataclass
class Failure:
    video_id: str
    path: str
    reason: str
    message: str


@dataclass
class ExtractSummary:
    out: str | Path  # a local path or a URL
    videos: int
    done: int
    done_now: int
    failures: list[Failure]
    captions: int
    bytes_on_disk: int
    seconds: float
    decode_seconds: float  # summed over workers
    encode_seconds: float
    device: str

    @property
    def clips_per_s(self) -> float:
        return self.done_now / self.seconds if self.seconds > 0 else 0.0


# ---- decoding, in worker processes --------------------------------------------------------------

@dataclass
class _Decoded:
    row: int
    clip: Any | None  # DecodedClip
    failure: Failure | None
    seconds: float
    path: str = ""
    thumbnail: bytes | None = None  # the JPEG strip of a few decoded frames


def _decode_one(row: int, video_id: str, path: str, num_frames: int, image_size: int,
                audio: AudioParams, read_audio: bool = True) -> _Decoded:
    from avr.extract.decode import decode_clip
    from avr.extract.thumbnails import thumbnail_strip

    start = time.perf_counter()
    try:
        clip = decode_clip(Path(path), num_frames, image_size, audio, read_audio=read_audio)
        return _Decoded(row, clip, None, time.perf_counter() - start, path,
                        thumbnail_strip(clip.frames, clip.frame_mask))
    except DecodeError as error:
        reason = getattr(error, "reason", "unreadable")
        return _Decoded(row, None, Failure(video_id, path, reason, str(error)),
                        time.perf_counter() - start)
    except OSError as error:  # a path the system refuses (a name too long, no permission)
        return _Decoded(row, None, Failure(video_id, path, "unreadable",
                                           f"{path}: {error.strerror or error}"),
                        time.perf_counter() - start)


class _InlineExecutor(Executor):
    """Runs work at submit time: decoding in this process (``workers=0``)."""

    def submit(self, fn, /, *args, **kwargs):
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def default_workers(device: torch.device) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    # On the CPU the backbones need cores too; on a GPU every core can decode.
    return max(1, cores - 1) if device.type == "cpu" else cores


def _executor(workers: int) -> Executor:
    if workers <= 0:
        return _InlineExecutor()
    # spawn, not fork: the parent has live torch thread pools, which fork does not survive.
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_end_with_parent, initargs=(os.getpid(),))


PARENT_POLL_S = 0.5


def _end_with_parent(parent: int) -> None:
    """In a decode worker: exit as soon as the extract that started it is gone. A SIGKILLed
    parent cannot stop its pool, and a worker waiting for work would wait forever (and keep
    multiprocessing's resource tracker alive with it). A thread polls the parent pid: once the
    worker is re-parented, the parent is gone."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()


# ---- the store ----------------------------------------------------------------------------------

def prepare_store(out: str | Path, spec: CacheSpec, index: DatasetIndex, *, overwrite: bool,
                  chunk_rows: int | None, compression: str = "zstd"):
    """Open the store at ``out`` for resuming, or create it, the caller holding its lock. An
    unfinished store (creation or overwrite killed midway) is created again. Refuses a store
    that was made with another spec or for other videos/captions unless ``overwrite``, which
    replaces it. A new store records the dataset's caption protocol (``avr eval`` reports it)."""
    caption_video, caption_text, caption_tags = _caption_columns(index)
    if overwrite:
        replace_store(out)
    condition = store_condition(out)
    if condition == "complete":
        try:
            group, _ = open_store(out, mode="r+", expect=spec)
            _check_contents(out, group, index, caption_text)
        except CacheMismatchError as error:
            raise CacheMismatchError(f"{error}\npass --overwrite to replace it") from None
        return group
    if condition == "foreign":
        raise AvrError(f"{out} exists and is not an avr store; choose another --out")
    return create_store(out, spec, index.video_ids, index.video_splits, caption_video,
                               caption_text, caption_tags, video_chunk_rows=chunk_rows,
                               compression=compression,
                               attrs={schema.ATTR_CAPTION_PROTOCOL: index.protocol})


def _caption_columns(index: DatasetIndex) -> tuple[np.ndarray, list[str], list[str]]:
    row_of = {video_id: i for i, video_id in enumerate(index.video_ids)}
    caption_video = np.asarray([row_of[c.video_id] for c in index.captions], dtype=np.int32)
    return caption_video, [c.text for c in index.captions], [c.tag for c in index.captions]


def _check_contents(out: str | Path, group, index: DatasetIndex, caption_text: list[str]) -> None:
    stored_ids = list(read_rows(group[schema.VIDEO_ID]))
    if stored_ids != index.video_ids:
        added = len(set(index.video_ids) - set(stored_ids))
        removed = len(set(stored_ids) - set(index.video_ids))
        raise CacheMismatchError(
            f"{out} holds another list of videos ({len(stored_ids)} stored, "
            f"{len(index.video_ids)} in the dataset; {added} new, {removed} gone)")
    stored_captions = list(read_rows(group[schema.CAPTION_TEXT]))
    if stored_captions != caption_text:
        raise CacheMismatchError(f"{out} holds other captions ({len(stored_captions)} stored, "
                                 f"{len(caption_text)} in the dataset)")


def read_failures(group) -> dict[str, Failure]:
    return {f["video_id"]: Failure(**f) for f in group.attrs.get(schema.ATTR_FAILURES, [])}


def write_failures(out: str | Path, group, failures: dict[str, Failure]) -> None:
    """Record ``failures`` in the store's attrs and in ``failures.jsonl`` beside the arrays
    (written whole to a temporary name, then moved over the old file)."""
    records = [vars(f) for f in sorted(failures.values(), key=lambda f: f.video_id)]
    group.attrs[schema.ATTR_FAILURES] = records
    fs, root = store_filesystem(out)
    target = f"{root}/{schema.FAILURES_FILE}"
    fs.pipe_file(target + ".tmp", "".join(json.dumps(r) + "\n" for r in records).encode())
    fs.mv(target + ".tmp", target)


def _row_chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk, n)) for start in range(0, n, chunk)]


def to_numpy(tensor: torch.Tensor, dtype) -> np.ndarray:
    if dtype == np.bool_:
        return tensor.bool().cpu().numpy()
    return tensor.float().cpu().numpy().astype(dtype)


def _write_rows(group, layout: dict[str, schema.ArraySpec], start: int, stop: int,
                rows: np.ndarray, values: dict[str, np.ndarray], region_is_fresh: bool) -> None:
    """Write ``values[name]`` (one entry per row in ``rows``) into rows [start, stop) of each
    array as one whole-chunk assignment, keeping whatever other rows of the region hold."""
    for name, array_values in values.items():
        array = group[name]
        if region_is_fresh and len(rows) == stop - start:
            region = array_values
        else:
            region = read_region(array, start, stop)
            region[rows - start] = array_values
        array[start:stop] = region.astype(layout[name].dtype, copy=False)


# ---- encoding -------------------------------------------------------------------------------------

def encode_captions(backbones: Backbones, texts: list[str], batch: int) -> dict[str, torch.Tensor]:
    return map_batches(backbones.encode_text, texts, batch, out_device="cpu")


def encode_clips(backbones: Backbones, clips: list, config: ExtractConfig,
                 device: torch.device) -> dict[str, torch.Tensor]:
    """Every video array (but ids, splits and done) for decoded ``clips``, rows in order."""
    frames = torch.from_numpy(np.stack([c.frames for c in clips]))  # [n, F, S, S, 3] uint8
    n, num_frames = frames.shape[:2]
    per_frame = map_batches(lambda x: backbones.encode_frames(x.to(device)),
                            frames.flatten(0, 1), config.frame_batch, out_device="cpu")
    out = {name: value.unflatten(0, (n, num_frames)) for name, value in per_frame.items()}
    fbank = torch.from_numpy(np.stack([c.fbank for c in clips]))  # [n, 1024, 128]
    out.update(map_batches(lambda x: backbones.encode_audio(x.to(device)), fbank,
                           config.audio_batch, out_device="cpu"))
    out[schema.FRAME_MASK] = torch.from_numpy(np.stack([c.frame_mask for c in clips]))
    out[schema.HAS_AUDIO] = torch.tensor([c.has_audio for c in clips])
    return out


# ---- the run ---------------------------------------------------------------------------------------

def extract(config: ExtractConfig, *, console=None,
            on_chunk: Callable[[int, int], None] | None = None) -> ExtractSummary:
    """Run (or resume) one extract. ``on_chunk(start, stop)`` is called after each video chunk
    is committed (tests use it to interrupt a run)."""
    started = time.perf_counter()
    with hold_store_lock(config, console) as lock, disk_full_stops(config.out):
        index = list_dataset(config, console)
        config = with_dataset_defaults(config, index)
        device = resolve_device(config.device)
        backbones = load_backbones(config.weights, config.names, device=device,
                                   seed=config.seed)
        out, group, spec, layout = open_extract_store(config, index, backbones)

        progress = Meter(console)
        with progress:
            _extract_captions(group, layout, backbones, config, progress, lock)
            done_now, decode_s, encode_s, failures = _extract_videos(
                out, group, layout, spec, index, backbones, config, device, progress, on_chunk,
                lock)
    return summarize(out, group, len(index.captions), done_now, failures,
                     time.perf_counter() - started, decode_s, encode_s, str(device))


def list_dataset(config: ExtractConfig, console=None) -> DatasetIndex:
    """The dataset's index; says how many listed videos have a file, warns when many have
    none (they are recorded as missing_file) and repeats the dataset's warnings (ids listed
    twice, ids without captions: how many, which were left out)."""
    index = load_dataset(config.dataset, config.root, videos_dir=config.videos_dir,
                         seed=config.seed, **config.dataset_options)
    if console is not None:
        console.print(index.listing_report(), markup=False, highlight=False, soft_wrap=True)
        missing = index.missing_warning()
        for warning in [*index.warnings, *([missing] if missing is not None else [])]:
            console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False,
                          soft_wrap=True)
    return index


def with_dataset_defaults(config: ExtractConfig, index: DatasetIndex) -> ExtractConfig:
    """``config`` with the dataset's frames and text lengths where the user set none, and its
    audio: MSVD's clips are recorded without a track whatever their files hold."""
    names = replace(config.names,
                    clip_text_tokens=config.names.clip_text_tokens or index.text_tokens.clip,
                    roberta_text_tokens=(config.names.roberta_text_tokens
                                         or index.text_tokens.roberta))
    return replace(config, names=names, num_frames=config.num_frames or index.default_frames,
                   read_audio=config.read_audio and index.audio)


def hold_store_lock(config: ExtractConfig, console=None) -> StoreLock:
    """The lock of ``config.out``, taken first of all so that a second run refuses at once
    (``with`` it to hold it), once ``--out`` is known not to be inside the dataset, and that
    refuses a ``--out`` holding files avr did not write; says so when it replaced a lock left
    by a killed run."""
    check_out_beside_root(config)
    lock = StoreLock(reachable_location(config.out)).acquire()
    try:
        refuse_foreign(config.out, overwrite=config.overwrite)
    except BaseException:
        lock.release()
        raise
    if lock.took_over is not None and console is not None:
        console.print(f"[yellow]took over the lock of {lock.location}[/] left by "
                      f"{lock.took_over.describe()}, which is no longer running")
    return lock


def check_out_beside_root(config: ExtractConfig) -> None:
    """Refuse a local ``--out`` equal to or inside ``--root``: the store would be written among
    the dataset's files (and ``--overwrite`` would be asked to replace them)."""
    out = store_location(config.out)
    if not isinstance(out, Path):
        return
    root = (config.root if config.root is not None else default_root(config.dataset)).resolve()
    out = out.resolve()
    if out == root or root in out.parents:
        raise AvrError(f"--out {config.out} is {'--root' if out == root else 'inside --root'} "
                       f"{root}: write the store outside the dataset's folder")


@contextmanager
def disk_full_stops(out: str | Path) -> Iterator[None]:
    """A write that finds the disk under the store full ends the run with one line: rows are
    marked done only after their arrays are written (and zarr writes each chunk to a temporary
    file first), so every row done so far is kept and the same command resumes."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise StoreFullError(f"{out}: no space left on the device ({error.filename or 'a write'}"
                             f"); the videos done so far are kept: free space and run the same "
                             f"command again to resume") from None


def open_extract_store(config: ExtractConfig, index: DatasetIndex, backbones: Backbones):
    """Create, or open and check, the store of ``config.out`` for these backbones and this
    dataset. Returns ``(out, group, spec, layout)``."""
    spec = backbones.make_spec(config.dataset, config.num_frames or index.default_frames)
    out = reachable_location(config.out)
    group = prepare_store(out, spec, index, overwrite=config.overwrite,
                          chunk_rows=config.chunk_rows, compression=config.compression)
    ensure_media_arrays(group)  # a store written before them gets them for the rows to come
    if media_root(group) != str(index.root.absolute()):
        group.attrs[schema.ATTR_MEDIA_ROOT] = str(index.root.absolute())
    video_chunk = group[schema.VIDEO_DONE].chunks[0]
    layout = schema.array_layout(spec, len(index.video_ids), len(index.captions),
                                 video_chunk_rows=video_chunk)
    return out, group, spec, layout


def summarize(out: str | Path, group, n_captions: int, done_now: int, failures: dict[str, Failure],
              seconds: float, decode_s: float, encode_s: float, device: str) -> ExtractSummary:
    done = read_rows(group[schema.VIDEO_DONE])
    return ExtractSummary(out, len(done), int(np.count_nonzero(done)), done_now,
                          sorted(failures.values(), key=lambda f: f.video_id), n_captions,
                          stored_bytes(out), seconds, decode_s, encode_s, device)


def _extract_captions(group, layout, backbones: Backbones, config: ExtractConfig,
                      progress: Meter, lock: StoreLock) -> None:
    done = read_rows(group[schema.CAPTION_DONE])
    todo = int(np.count_nonzero(~done))
    if not todo:
        return
    task = progress.add("captions", todo, "captions")
    for start, stop in pending_caption_chunks(group):
        commit_caption_chunk(group, layout, backbones, config, start, stop, lock)
        progress.advance(task, stop - start)


def pending_caption_chunks(group) -> list[tuple[int, int]]:
    """The caption chunks [start, stop) with a row not marked done."""
    done = read_rows(group[schema.CAPTION_DONE])
    chunk = group[schema.CAPTION_DONE].chunks[0]
    return [(start, stop) for start, stop in _row_chunks(len(done), chunk)
            if not done[start:stop].all()]


def pending_video_chunks(done: np.ndarray, chunk: int) -> list[tuple[int, int, np.ndarray]]:
    """Each video chunk [start, stop) with a row not marked done, and those rows."""
    return [(start, stop, np.flatnonzero(~done[start:stop]) + start)
            for start, stop in _row_chunks(len(done), chunk) if not done[start:stop].all()]


def commit_caption_chunk(group, layout, backbones: Backbones, config: ExtractConfig,
                         start: int, stop: int, lock: StoreLock | WriterToken) -> None:
    """Encode captions [start, stop) (a whole caption chunk) and write them, then their done
    mask, once ``lock.check()`` confirms the store's lock is still this run's. One process or
    one dask task per chunk: both call this."""
    texts = read_rows(group[schema.CAPTION_TEXT], np.arange(start, stop))
    encoded = encode_captions(backbones, list(texts), config.text_batch)
    rows = np.arange(start, stop)
    values = {name: to_numpy(value, layout[name].dtype) for name, value in encoded.items()}
    lock.check()
    _write_rows(group, layout, start, stop, rows, values, region_is_fresh=True)
    group[schema.CAPTION_DONE][start:stop] = True  # after every array of the rows


@dataclass
class ChunkResult:
    """What the work on one video chunk reports: the rows it attempted, those it marked done,
    the failures among the attempted rows, and its decode and backbone seconds."""
    start: int
    stop: int
    attempted: list[int]
    done_rows: list[int]
    failures: list[Failure]
    decode_seconds: float
    encode_seconds: float
    device: str


def commit_video_chunk(group, layout, backbones: Backbones, config: ExtractConfig,
                       start: int, stop: int, done_region: np.ndarray,
                       decoded: list[_Decoded], lock: StoreLock | WriterToken) -> ChunkResult:
    """Encode the decoded clips of video chunk [start, stop) and write every array of the chunk
    as whole chunks, then its ``video_done`` region (``done_region``: the chunk's mask before),
    once ``lock.check()`` confirms the store's lock is still this run's.

    The one place a video chunk is committed: the single-process loop and each dask task call
    it. Rows whose clip failed to decode stay not done."""
    good = [d for d in decoded if d.clip is not None]
    done_rows: list[int] = []
    encode_s = 0.0
    if good:
        tick = time.perf_counter()
        encoded = encode_clips(backbones, [d.clip for d in good], config, backbones.device)
        good_rows = np.asarray([d.row for d in good])
        values = {name: to_numpy(value, layout[name].dtype) for name, value in encoded.items()}
        lock.check()
        _write_rows(group, layout, start, stop, good_rows, values, not done_region.any())
        write_media(group, start, stop, good_rows,
                    [relative_path(d.path, media_root(group)) for d in good],
                    [d.thumbnail for d in good])
        region = done_region.copy()
        region[good_rows - start] = True
        group[schema.VIDEO_DONE][start:stop] = region  # after every array of the rows
        encode_s = time.perf_counter() - tick
        done_rows = [int(row) for row in good_rows]
    return ChunkResult(start, stop, [d.row for d in decoded], done_rows,
                       [d.failure for d in decoded if d.failure is not None],
                       sum(d.seconds for d in decoded), encode_s, str(backbones.device))


def merge_failures(failures: dict[str, Failure], video_ids: list[str],
                   result: ChunkResult) -> bool:
    """Record the chunk's failures and forget those of its rows that now decoded; True when
    the record changed."""
    failed = {f.video_id: f for f in result.failures}
    changed = False
    for row in result.attempted:
        video_id = video_ids[row]
        if video_id in failed:
            changed |= failures.get(video_id) != failed[video_id]
            failures[video_id] = failed[video_id]
        elif video_id in failures:
            del failures[video_id]
            changed = True
    return changed


def decode_rows(rows, video_ids, video_paths, spec: CacheSpec, read_audio: bool = True
                ) -> list[_Decoded]:
    """Decode ``rows`` in this process, one after the other (``video_ids`` and ``video_paths``
    are indexed by row: lists of the whole dataset or dicts of a chunk's rows)."""
    return [_decode_one(int(row), video_ids[row], str(video_paths[row]), spec.num_frames,
                        spec.image_size, spec.audio, read_audio) for row in rows]


def _extract_videos(out: str | Path, group, layout, spec: CacheSpec, index: DatasetIndex,
                    backbones: Backbones, config: ExtractConfig, device: torch.device,
                    progress: Meter, on_chunk, lock: StoreLock
                    ) -> tuple[int, float, float, dict]:
    done = read_rows(group[schema.VIDEO_DONE])
    failures = read_failures(group)
    pending = pending_video_chunks(done, layout[schema.VIDEO_DONE].chunk_rows)
    todo = sum(len(rows) for _, _, rows in pending)
    if not todo:
        return 0, 0.0, 0.0, failures
    workers = default_workers(device) if config.workers is None else config.workers
    task = progress.add("videos", todo, "clips")
    done_now, decode_s, encode_s = 0, 0.0, 0.0
    with _executor(workers) as executor:
        for (start, stop, rows), decoded in _decode_ahead(executor, pending, index, spec,
                                                          config.read_audio, lookahead=2):
            result = commit_video_chunk(group, layout, backbones, config, start, stop,
                                        done[start:stop], decoded, lock)
            done[result.done_rows] = True
            decode_s += result.decode_seconds
            encode_s += result.encode_seconds
            done_now += len(result.done_rows)
            if merge_failures(failures, index.video_ids, result):
                write_failures(out, group, failures)
            progress.advance(task, len(rows), failed=len(failures))
            if on_chunk is not None:
                on_chunk(start, stop)
    write_failures_file_once(out, group, failures)
    return done_now, decode_s, encode_s, failures


def write_failures_file_once(out: str | Path, group, failures: dict[str, Failure]) -> None:
    """Write ``failures.jsonl`` for failures carried over from an earlier run that no chunk of
    this run changed (a resumed store whose file was removed)."""
    fs, root = store_filesystem(out)
    if failures and not fs.exists(f"{root}/{schema.FAILURES_FILE}"):
        write_failures(out, group, failures)


def _decode_ahead(executor: Executor, pending: list, index: DatasetIndex, spec: CacheSpec,
                  read_audio: bool, *, lookahead: int) -> Iterator[tuple[tuple, list[_Decoded]]]:
    """Yield each pending chunk with its decoded clips while the next ``lookahead`` chunks are
    already decoding in the workers."""
    submitted: list[tuple[tuple, list[Future]]] = []

    def submit(item):
        start, stop, rows = item
        futures = [executor.submit(_decode_one, int(row), index.video_ids[row],
                                   str(index.video_paths[row]), spec.num_frames, spec.image_size,
                                   spec.audio, read_audio) for row in rows]
        submitted.append((item, futures))

    queue = iter(pending)
    for item in queue:
        submit(item)
        if len(submitted) > lookahead:
            break
    while submitted:
        item, futures = submitted.pop(0)
        next_item = next(queue, None)
        if next_item is not None:
            submit(next_item)
        yield item, [f.result() for f in futures]
