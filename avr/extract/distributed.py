"""`avr extract` on dask.distributed: one task per store chunk, run by the workers.

The parent process (where ``avr extract --scheduler ...`` runs) does what a single-process
extract does before and after the chunks: it takes the store's lock first and holds it to the
end (one writer per store, as in ``pipeline.extract``), loads the dataset index, builds the
backbones on the CPU only to know the store's spec, creates or opens and checks the store
(``pipeline.open_extract_store``: schema check, refusal, ``--overwrite``), and at the end it
alone writes the failure record (store attrs and ``failures.jsonl``) and the summary.

In between it submits one task per caption chunk and per video chunk not yet done. A task
runs on a worker: it opens the store, reads the chunk's done mask, decodes the chunk's clips
in the worker process, encodes them with the worker's backbones and commits the chunk
(``pipeline.commit_video_chunk``: every array as whole chunks, then ``video_done``). It
returns the chunk's failures; it never touches the attrs, so the store has a single writer of
its metadata. Chunks are disjoint row ranges, so no two tasks write the same zarr chunk.
Workers write under the parent's lock: a task carries the lock's token and, just before it
writes, checks that the lock still carries it (``lock.WriterToken``), so a task left running
by a killed parent whose lock another run has since taken writes nothing.

Backbones are built once per worker process and kept in ``_BACKBONES`` (keyed by kind,
names, seed and device); ``device="auto"`` is resolved on the worker, so a worker uses its GPU
when it has one (one worker per GPU: ``CUDA_VISIBLE_DEVICES`` per worker, or dask-cuda).

The workers need no access to the dataset: the parent reads each chunk's video files and
hands them to the worker that runs the chunk (``client.scatter``), which decodes them from a
temporary folder of its own; a few chunks per worker are in flight at a time, so the parent
holds only those in memory. A file the parent cannot read is left to the worker, which records
why it fails exactly as one process does.

A worker that dies loses only the chunk it was writing: its rows are not marked done and the
parent submits the chunk again (its files with it) up to TASK_RETRIES times, as it does for a
task that raised; whatever still failed is redone by the next run (the done mask), which then
ends with the same store as an uninterrupted run.

The store is a location that the parent and every worker reach under the same name: a
local path for a local cluster, a shared filesystem or an object store URL (``s3://``,
``gs://``; each worker needs s3fs or gcsfs and the credentials) across machines. A
``memory://`` store lives in one process and so cannot be shared with worker processes.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from avr.errors import AvrError
from avr.extract import pipeline
from avr.extract.backbones import Backbones, load_backbones
from avr.extract.pipeline import ChunkResult, ExtractConfig, ExtractSummary
from avr.extras import require
from avr.progress import Meter
from avr.store import schema
from avr.store.group import open_store
from avr.store.location import location_text
from avr.store.lock import WriterToken
from avr.store.read import read_region, read_rows
from avr.store.schema import CacheSpec

TASK_RETRIES = 2  # a task that fails is run again this many times before it counts as failed
CHUNKS_PER_WORKER = 2  # video chunks in flight per worker (their files held by the parent)


# ---- on the workers ----------------------------------------------------------------------------

_BACKBONES: dict[tuple, Backbones] = {}


def worker_backbones(config: ExtractConfig) -> Backbones:
    """This process's backbones for ``config``, built on first use and kept for every later
    task (``device="auto"`` resolves to this worker's GPU when it has one)."""
    device = pipeline.resolve_device(config.device)
    key = (config.weights, config.names, config.seed, str(device))
    if key not in _BACKBONES:
        _BACKBONES[key] = load_backbones(config.weights, config.names, device=device,
                                         seed=config.seed)
    return _BACKBONES[key]


@dataclass(frozen=True)
class CaptionChunkTask:
    store: str  # the store's path or URL, the same on every worker
    lock_token: str  # the parent's lock: the task writes only while the lock carries it
    start: int
    stop: int
    layout: dict[str, schema.ArraySpec]
    config: ExtractConfig


@dataclass(frozen=True)
class VideoChunkTask:
    store: str
    lock_token: str
    start: int
    stop: int
    video_ids: list[str]  # rows [start, stop)
    video_paths: list[str]
    spec: CacheSpec
    layout: dict[str, schema.ArraySpec]
    config: ExtractConfig


def _open_group(store: str):
    return open_store(store, mode="r+")[0]


def run_caption_chunk(task: CaptionChunkTask) -> tuple[int, int]:
    """Encode and commit one caption chunk on a worker."""
    writer = WriterToken(task.store, task.lock_token)
    writer.check()  # before the work, and again before the writes
    group = _open_group(task.store)
    pipeline.commit_caption_chunk(group, task.layout, worker_backbones(task.config), task.config,
                                  task.start, task.stop, writer)
    return task.start, task.stop


def run_video_chunk(task: VideoChunkTask, media: list[bytes | None]) -> ChunkResult:
    """Decode, encode and commit the rows of one video chunk not yet done, on a worker;
    ``media``: the chunk's video files as the parent read them (None: not readable there).

    The done mask is read here, not in the parent, so a retried task skips rows that an
    earlier attempt already committed."""
    writer = WriterToken(task.store, task.lock_token)
    writer.check()  # before the work, and again before the writes
    group = _open_group(task.store)
    done_region = read_region(group[schema.VIDEO_DONE], task.start, task.stop)
    rows = np.flatnonzero(~done_region) + task.start
    decoded = decode_shipped(task, rows, media)
    return pipeline.commit_video_chunk(group, task.layout, worker_backbones(task.config),
                                       task.config, task.start, task.stop, done_region, decoded,
                                       writer)


def read_media(task: VideoChunkTask) -> list[bytes | None]:
    """The chunk's video files, read in the parent (None where it cannot: the worker then
    tries the path and records the failure as one process would)."""
    media = []
    for path in task.video_paths:
        try:
            media.append(Path(path).read_bytes())
        except OSError:
            media.append(None)
    return media


def decode_shipped(task: VideoChunkTask, rows: np.ndarray, media: list[bytes | None]
                   ) -> list:
    """Decode ``rows`` of the chunk from the shipped files, written to a temporary folder of
    this worker (its dask local directory); each clip and failure names the dataset's path, not
    that copy."""
    ids = dict(zip(range(task.start, task.stop), task.video_ids))
    paths = dict(zip(range(task.start, task.stop), task.video_paths))
    with tempfile.TemporaryDirectory(prefix="avr-chunk-", dir=_local_directory()) as folder:
        copies = dict(paths)
        for row in rows.tolist():
            data = media[row - task.start]
            if data is not None:
                copies[row] = str(Path(folder) / f"{row}{Path(paths[row]).suffix}")
                Path(copies[row]).write_bytes(data)
        decoded = pipeline.decode_rows(rows, ids, copies, task.spec, task.config.read_audio)
    for item in decoded:
        item.path = paths[item.row]  # the store records the dataset's file, not the copy
        if item.failure is not None and copies[item.row] != paths[item.row]:
            item.failure = replace(item.failure, path=paths[item.row],
                                   message=item.failure.message.replace(copies[item.row],
                                                                        paths[item.row]))
    return decoded


def _local_directory() -> str | None:
    """This dask worker's own working folder (None outside a worker: the system's)."""
    try:
        from distributed import get_worker

        return get_worker().local_directory
    except (ImportError, ValueError):
        return None


# ---- in the parent -----------------------------------------------------------------------------

@contextmanager
def dask_client(scheduler: str | None = None, local_workers: int | None = None
                ) -> Iterator:
    """A client of the scheduler at ``scheduler`` (``tcp://HOST:PORT``), or of a local cluster
    of ``local_workers`` worker processes with one thread each, on loopback."""
    Client = require("distributed", "avr extract --scheduler/--dask-workers").Client
    if (scheduler is None) == (local_workers is None):
        raise AvrError("give either --scheduler tcp://HOST:PORT or --dask-workers N")
    if scheduler is not None:
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as error:
            raise AvrError(f"cannot reach the dask scheduler at {scheduler} ({error}); start it "
                           f"with `dask scheduler` and its workers with `dask worker "
                           f"{scheduler}`") from None
        with client:
            yield client
        return
    if local_workers < 1:
        raise AvrError(f"--dask-workers {local_workers}: need at least one worker")
    with local_cluster(local_workers) as cluster, Client(cluster) as client:
        yield client


def local_cluster(workers: int):
    """A dask cluster of ``workers`` processes with one thread each, on the loopback, with no
    dashboard. The scheduler still serves its health and metrics endpoints over HTTP; they get
    a free port rather than the dashboard's 8787, which another cluster may hold."""
    LocalCluster = require("distributed", "avr extract --dask-workers").LocalCluster
    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                        host="127.0.0.1", dashboard_address=None,
                        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})


def extract_on_dask(config: ExtractConfig, client, *, console=None,
                    on_chunk: Callable[[int, int], None] | None = None) -> ExtractSummary:
    """Run (or resume) one extract with the chunks done by ``client``'s workers; the same
    store, resume, failure record and refusal as ``pipeline.extract``. ``on_chunk(start,
    stop)`` is called in this process as each video chunk's result arrives."""
    started = time.perf_counter()
    with pipeline.hold_store_lock(config, console) as lock, pipeline.disk_full_stops(config.out):
        index = pipeline.list_dataset(config, console)
        config = pipeline.with_dataset_defaults(config, index)
        spec_backbones = load_backbones(config.weights, config.names, device="cpu",
                                        seed=config.seed)
        out, group, spec, layout = pipeline.open_extract_store(config, index, spec_backbones)
        del spec_backbones
        store = location_text(out)

        caption_tasks = [CaptionChunkTask(store, lock.token, start, stop, layout, config)
                         for start, stop in pipeline.pending_caption_chunks(group)]
        done = read_rows(group[schema.VIDEO_DONE])
        pending = pipeline.pending_video_chunks(done, layout[schema.VIDEO_DONE].chunk_rows)
        video_tasks = [VideoChunkTask(store, lock.token, start, stop,
                                      index.video_ids[start:stop],
                                      [str(p) for p in index.video_paths[start:stop]], spec,
                                      layout, config) for start, stop, _ in pending]

        failures = pipeline.read_failures(group)
        progress = Meter(console)
        with progress:
            totals, errors = _run_tasks(client, caption_tasks, video_tasks, pending,
                                        index.video_ids, out, group, failures, progress,
                                        on_chunk, lock)
        pipeline.write_failures_file_once(out, group, failures)
    if errors:
        raise AvrError(f"{len(errors)} chunk task(s) failed on the workers (first: "
                       f"{errors[0]!r}); the other chunks are written; run the same command "
                       f"again to redo the rest")
    devices = ", ".join(sorted(totals["devices"])) or "-"
    return pipeline.summarize(out, group, len(index.captions), totals["done_now"], failures,
                              time.perf_counter() - started, totals["decode_s"],
                              totals["encode_s"], f"dask workers ({devices})")


def _run_tasks(client, caption_tasks, video_tasks, pending, video_ids, out, group, failures,
               progress, on_chunk, lock) -> tuple[dict, list[BaseException]]:
    """Submit the caption tasks and the first video tasks, then take results as they complete:
    progress, failure record, the callback, the next video task; a failed task (it raised, or
    its worker died) is submitted again up to TASK_RETRIES times. Returns the summed numbers
    and the errors of tasks that failed for good. Stops (cancelling what is left) as soon as
    the parent's lock is lost."""
    distributed = require("distributed", "avr extract --scheduler/--dask-workers")

    totals = {"done_now": 0, "decode_s": 0.0, "encode_s": 0.0, "devices": set()}
    errors: list[BaseException] = []
    caption_bar = progress.add("captions", sum(t.stop - t.start for t in caption_tasks),
                               "captions") if caption_tasks else None
    video_bar = progress.add("videos", sum(len(rows) for _, _, rows in pending),
                             "clips") if video_tasks else None
    attempts: dict = {}  # future -> (task, attempts so far)

    def submit(task, attempt: int = 0):
        if isinstance(task, CaptionChunkTask):
            future = client.submit(run_caption_chunk, task, pure=False)
        else:
            [media] = client.scatter([read_media(task)], hash=False)
            future = client.submit(run_video_chunk, task, media, pure=False)
        attempts[future] = (task, attempt + 1)
        return future

    queue = iter(video_tasks)
    workers = max(1, len(client.scheduler_info().get("workers", {})))
    first = [submit(task) for task in caption_tasks]
    first += [submit(task) for _, task in zip(range(CHUNKS_PER_WORKER * workers), queue)]
    completed = distributed.as_completed(first)
    try:
        for future in completed:
            lock.check()
            task, attempt = attempts.pop(future)
            try:
                result = future.result()
            except Exception as error:  # the task raised, or its worker died with it
                if attempt <= TASK_RETRIES:
                    completed.add(submit(task, attempt))
                else:
                    errors.append(error)
                continue
            if isinstance(task, CaptionChunkTask):
                progress.advance(caption_bar, result[1] - result[0])
                continue
            following = next(queue, None)
            if following is not None:
                completed.add(submit(following))
            totals["done_now"] += len(result.done_rows)
            totals["decode_s"] += result.decode_seconds
            totals["encode_s"] += result.encode_seconds
            totals["devices"].add(result.device)
            if pipeline.merge_failures(failures, video_ids, result):
                pipeline.write_failures(out, group, failures)
            progress.advance(video_bar, len(result.attempted), failed=len(failures))
            if on_chunk is not None:
                on_chunk(result.start, result.stop)
    finally:
        client.cancel(list(attempts))
    return totals, errors
