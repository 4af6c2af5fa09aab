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

A worker that dies loses only the chunk it was writing: its rows are not marked done, the
scheduler reschedules the task on another worker (up to dask's ``allowed-failures``), a task
that raises is retried twice, and whatever still failed is redone by the next run (the done
mask), which then ends with the same store as an uninterrupted run.

The store is a location that the parent and every worker reach under the same name: a
local path for a local cluster, a shared filesystem or an object store URL (``s3://``,
``gs://``; each worker needs s3fs or gcsfs and the credentials) across machines. A
``memory://`` store lives in one process and so cannot be shared with worker processes. The
dataset's video files must be reachable at the same paths too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from avr.errors import AvrError
from avr.extract import pipeline
from avr.extract.backbones import Backbones, load_backbones
from avr.extract.pipeline import ChunkResult, ExtractConfig, ExtractSummary
from avr.progress import Meter
from avr.store import schema
from avr.store.group import open_store
from avr.store.location import location_text
from avr.store.lock import WriterToken
from avr.store.read import read_region, read_rows
from avr.store.schema import CacheSpec

TASK_RETRIES = 2  # a task that raises is run again this many times before it counts as failed


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


def run_video_chunk(task: VideoChunkTask) -> ChunkResult:
    """Decode, encode and commit the rows of one video chunk not yet done, on a worker.

    The done mask is read here, not in the parent, so a rescheduled or retried task skips
    rows that an earlier attempt already committed."""
    writer = WriterToken(task.store, task.lock_token)
    writer.check()  # before the work, and again before the writes
    group = _open_group(task.store)
    done_region = read_region(group[schema.VIDEO_DONE], task.start, task.stop)
    rows = np.flatnonzero(~done_region) + task.start
    ids = dict(zip(range(task.start, task.stop), task.video_ids))
    paths = dict(zip(range(task.start, task.stop), task.video_paths))
    decoded = pipeline.decode_rows(rows, ids, paths, task.spec, task.config.read_audio)
    return pipeline.commit_video_chunk(group, task.layout, worker_backbones(task.config),
                                       task.config, task.start, task.stop, done_region, decoded,
                                       writer)


# ---- in the parent -----------------------------------------------------------------------------

@contextmanager
def dask_client(scheduler: str | None = None, local_workers: int | None = None
                ) -> Iterator:
    """A client of the scheduler at ``scheduler`` (``tcp://HOST:PORT``), or of a local cluster
    of ``local_workers`` worker processes with one thread each, on loopback."""
    try:
        from distributed import Client
    except ImportError:
        raise AvrError("dask extraction needs the distributed package: "
                       "pip install distributed") from None
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
    from distributed import LocalCluster

    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                        host="127.0.0.1", dashboard_address=None,
                        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})


def extract_on_dask(config: ExtractConfig, client, *, console=None,
                    on_chunk: Callable[[int, int], None] | None = None) -> ExtractSummary:
    """Run (or resume) one extract with the chunks done by ``client``'s workers; the same
    store, resume, failure record and refusal as ``pipeline.extract``. ``on_chunk(start,
    stop)`` is called in this process as each video chunk's result arrives."""
    started = time.perf_counter()
    with pipeline.hold_store_lock(config, console) as lock:
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
    """Submit every task, then take results as they complete: progress, failure record, the
    callback. Returns the summed numbers and the errors of tasks that failed for good. Stops
    (cancelling what is left) as soon as the parent's lock is lost."""
    from distributed import as_completed

    totals = {"done_now": 0, "decode_s": 0.0, "encode_s": 0.0, "devices": set()}
    errors: list[BaseException] = []
    caption_bar = progress.add("captions", sum(t.stop - t.start for t in caption_tasks),
                               "captions") if caption_tasks else None
    video_bar = progress.add("videos", sum(len(rows) for _, _, rows in pending),
                             "clips") if video_tasks else None
    futures = (client.map(run_caption_chunk, caption_tasks, retries=TASK_RETRIES, pure=False)
               + client.map(run_video_chunk, video_tasks, retries=TASK_RETRIES, pure=False))
    try:
        for future in as_completed(futures):
            lock.check()
            try:
                result = future.result()
            except Exception as error:  # the task failed on every attempt, or its workers died
                errors.append(error)
                continue
            if isinstance(result, tuple):  # a caption chunk
                progress.advance(caption_bar, result[1] - result[0])
                continue
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
        client.cancel([f for f in futures if not f.done()])
    return totals, errors
