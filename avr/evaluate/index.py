"""`avr index build`: the first stage of two-stage retrieval as a faiss index built once.

The first stage is zero-shot CLIP4Clip meanP: each video is the masked mean of its L2-normalised
CLIP frame embeddings, L2-normalised, and a query is its normalised CLIP sentence embedding; the score is
their inner product. ``build_index`` reads only ``frame_embeddings`` and ``frame_mask`` of the
done video rows, in chunk-aligned blocks (never a whole array), and writes one faiss index per
split, because eval re-ranks within one split and an index per split keeps every search exact
about the split (a filter over one shared index would make IVF and HNSW return fewer than k
hits for a small split inside a large store).

Kinds: ``flat`` (exact, IndexFlatIP), ``ivf`` (IndexIVFFlat, spherical k-means centroids,
``nlist`` ~ 4 sqrt(N), searched with ``nprobe`` lists), ``hnsw`` (IndexHNSWFlat with ``m``
links per node, searched with ``ef_search``). ``auto`` is flat up to FLAT_MAX_VIDEOS videos
and IVF above: on a million clustered 512-d vectors (benchmarks/search_million.py) IVF finds
the exact top 10 with a few probed lists, where HNSW (M = 32) needs ef_search = 256 to reach
0.95 recall@10, though its graph builds in half IVF's time on a CPU.

With ``embeddings="run:RUN"`` the index holds a trained head's own video vectors instead, for
heads whose videos are vectors that do not depend on the query (``RetrievalHead.dual_encoder``:
meanP); queries are then the head's text vectors, so `avr search --run RUN` searches the head
itself. Such an index serves that run only: eval's ``--rerank-k`` (CLIP's first stage) and
other runs refuse it.

On disk (default ``<cache>/index/``, a folder zarr does not read): ``index.json`` (the store's
path and spec fingerprint, its row count and done-mask digest, what the vectors are, and per
split the kind, params and file names), ``<split>.faiss`` whose int64 ids are store rows, and
``video_ids.json`` mapping each id to its video id, so a user of ``faiss.read_index`` maps hits
to videos. Indexes written before ids were store rows (positions, with ``<split>.rows.npy``
beside) are still read. An index refuses a store with another fingerprint, and a store whose
done rows changed since the build (a resumed extract), so a stale index is never searched
silently. The index folder,
like the store, is a local path or a URL: its files are written and read through fsspec
(faiss serialises an index to bytes), so a store at ``s3://bucket/cache`` keeps its index at
``s3://bucket/cache/index``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from avr.errors import AvrError, CacheMismatchError
from avr.fuse.blocks import masked_mean
from avr.store import schema
from avr.store.group import open_store
from avr.store.location import location_text, store_filesystem, store_location, store_member
from avr.store.read import read_rows

INDEX_DIR = schema.INDEX_DIR
META_FILE = "index.json"
ID_MAP_FILE = "video_ids.json"
RUN_PREFIX = "run:"
KINDS = ("auto", "flat", "ivf", "hnsw")
FLAT_MAX_VIDEOS = 50_000  # auto: exact search up to here (one query ~ 25 MFLOP), IVF above
MIN_POINTS_PER_LIST = 39  # faiss's k-means wants at least 39 training points per centroid
TRAIN_POINTS_PER_LIST = 64  # k-means sample: enough for stable centroids, bounded cost
DEFAULT_NPROBE = 32
DEFAULT_M = 32
DEFAULT_EF_SEARCH = 128
EF_CONSTRUCTION = 64
BLOCK_BYTES = 64 << 20  # frame embeddings read per block


# How the indexed vectors pool frames; an index recording another pooling is refused.
POOLING = "meanP: each frame L2-normalised, masked mean, L2-normalised"


def _faiss():
    from avr.extras import require

    return require("faiss", "a faiss index (avr index build, --index, --rerank-k)")


def pooled_frames(frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CLIP4Clip's meanP (``modules/modeling.py``:392-394): each frame L2-normalised, masked mean
    over frames, L2-normalised: [V, F, D] and [V, F] -> [V, D] float32."""
    return F.normalize(masked_mean(F.normalize(frames.float(), dim=-1), mask), dim=-1)


def normalised_queries(text_embeddings: torch.Tensor) -> np.ndarray:
    """CLIP sentence embeddings [Q, D] as first-stage queries: float32, L2-normalised."""
    return F.normalize(text_embeddings.float(), dim=-1).numpy().astype(np.float32)


def default_index_path(cache_path: str | Path) -> str | Path:
    return store_member(cache_path, INDEX_DIR)


def default_nlist(n: int) -> int:
    """~4 sqrt(N) inverted lists, at most one per MIN_POINTS_PER_LIST vectors."""
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_LIST))


def store_state(group) -> dict[str, Any]:
    """What an index must agree with: row count and a digest of the done mask."""
    done = read_rows(group[schema.VIDEO_DONE]).astype(bool)
    digest = hashlib.sha256(np.packbits(done).tobytes()).hexdigest()[:16]
    return {"video_rows": int(done.size), "done_videos": int(done.sum()), "done_digest": digest}


# ---- building ---------------------------------------------------------------------------------

def read_pooled_by_split(group) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Store rows and pooled first-stage vectors of the done videos, per split, read in
    chunk-aligned blocks of ``frame_embeddings`` and ``frame_mask`` only (damage under done
    rows fails the build, naming the chunk)."""
    frames, masks = group[schema.FRAME_EMBEDDINGS], group[schema.FRAME_MASK]
    done = read_rows(group[schema.VIDEO_DONE]).astype(bool)
    split_of = read_rows(group[schema.VIDEO_SPLIT])
    row_bytes = int(np.prod(frames.shape[1:])) * frames.dtype.itemsize
    chunk = frames.chunks[0]
    block = max(chunk, BLOCK_BYTES // max(row_bytes, 1) // chunk * chunk)
    rows: dict[int, list[np.ndarray]] = {}
    vectors: dict[int, list[np.ndarray]] = {}
    for start in range(0, done.size, block):
        stop = min(start + block, done.size)
        keep = np.flatnonzero(done[start:stop])
        if keep.size == 0:
            continue
        pooled = pooled_frames(*(torch.from_numpy(read_rows(array, start + keep))
                                 for array in (frames, masks))).numpy()
        for code in np.unique(split_of[start + keep]):
            in_split = split_of[start + keep] == code
            rows.setdefault(int(code), []).append(start + keep[in_split])
            vectors.setdefault(int(code), []).append(pooled[in_split])
    return {schema.SPLITS[code]: (np.concatenate(rows[code]).astype(np.int64),
                                  np.ascontiguousarray(np.concatenate(vectors[code]),
                                                       dtype=np.float32))
            for code in sorted(rows)}


def make_index(vectors: np.ndarray, kind: str = "auto", *, nlist: int | None = None,
               m: int = DEFAULT_M, seed: int = 0, ids: np.ndarray | None = None):
    """A faiss inner-product index over ``vectors`` [N, D] float32, the int64 ``ids`` of its
    vectors (default 0..N-1), and its search params."""
    faiss = _faiss()

    if kind not in KINDS:
        raise AvrError(f"index kind {kind!r}: expected one of {', '.join(KINDS)}")
    n, dim = vectors.shape
    if kind == "auto":
        kind = "flat" if n <= FLAT_MAX_VIDEOS else "ivf"
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        params: dict[str, Any] = {}
    elif kind == "ivf":
        lists = min(nlist or default_nlist(n), max(1, n // MIN_POINTS_PER_LIST))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.spherical = True  # centroids on the unit sphere, like the vectors
        index.cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST
        index.cp.seed = seed
        index.train(vectors)
        params = {"nlist": lists, "nprobe": min(DEFAULT_NPROBE, lists)}
    else:
        graph = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = EF_CONSTRUCTION
        index = faiss.IndexIDMap2(graph)
        params = {"m": m, "ef_construction": EF_CONSTRUCTION, "ef_search": DEFAULT_EF_SEARCH}
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    for start in range(0, n, 65536):
        index.add_with_ids(vectors[start:start + 65536], ids[start:start + 65536])
    return index, kind, params


def build_index(cache_path: str | Path | None = None, out: str | Path | None = None,
                kind: str = "auto", *, nlist: int | None = None, m: int = DEFAULT_M,
                seed: int = 0, embeddings: str = "clip", device: str = "cpu") -> str | Path:
    """Build the first-stage index of every split of the store at ``cache_path`` into ``out``
    (default ``<cache>/index/``; paths or URLs), replacing an index already there.
    ``embeddings``: "clip" (mean-pooled CLIP frames) or "run:RUN" (that run's video vectors;
    ``cache_path`` defaults to the run's store). ``index.json`` is written last: a folder
    without it is no index. Returns ``out``."""
    faiss = _faiss()

    vectors_of, described, run = _vector_source(embeddings, cache_path, device)
    cache_path = cache_path if cache_path is not None else run["cache"]
    group, spec = open_store(cache_path)
    out = store_location(out) if out is not None else default_index_path(cache_path)
    by_split = vectors_of(group)
    if not by_split:
        raise AvrError(f"{cache_path}: no extracted videos to index; run `avr extract` first")
    fs, folder = store_filesystem(out)
    clear_index_folder(fs, folder, out)
    fs.makedirs(folder, exist_ok=True)
    splits: dict[str, Any] = {}
    for split, (rows, vectors) in by_split.items():
        started = time.perf_counter()
        index, chosen, params = make_index(vectors, kind, nlist=nlist, m=m, seed=seed, ids=rows)
        fs.pipe_file(f"{folder}/{split}.faiss", faiss.serialize_index(index).tobytes())
        splits[split] = {"kind": chosen, "params": params, "videos": int(rows.size),
                         "index_file": f"{split}.faiss",
                         "build_seconds": round(time.perf_counter() - started, 3)}
    indexed = np.sort(np.concatenate([rows for rows, _ in by_split.values()]))
    video_ids = read_rows(group[schema.VIDEO_ID], indexed)
    fs.pipe_file(f"{folder}/{ID_MAP_FILE}", json.dumps(
        {str(row): str(video_id) for row, video_id in zip(indexed.tolist(), video_ids)}
    ).encode())
    dim = next(iter(by_split.values()))[1].shape[1]
    meta = {"store": location_text(cache_path), "fingerprint": spec.fingerprint(),
            **store_state(group), "dim": dim, "metric": "inner_product", "vectors": described,
            "embeddings": {"run": run["dir"], "head": run["head"]} if run else "clip",
            "ids": f"store row of each video; {ID_MAP_FILE} maps it to the video id",
            "id_map": ID_MAP_FILE,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "splits": splits}
    fs.pipe_file(f"{folder}/{META_FILE}", json.dumps(meta, indent=2).encode())
    return out


def _vector_source(embeddings: str, cache_path, device: str):
    """(``group -> {split: (rows, vectors)}``, their description, the run or None)."""
    if embeddings == "clip":
        return read_pooled_by_split, POOLING, None
    if not embeddings.startswith(RUN_PREFIX) or len(embeddings) == len(RUN_PREFIX):
        raise AvrError(f"--embeddings {embeddings}: give clip or run:RUN (a run folder)")
    from avr.device import resolve_device
    from avr.evaluate.evaluator import open_run

    run_dir = Path(embeddings[len(RUN_PREFIX):])
    head, config, run_cache = open_run(run_dir, cache_path, resolve_device(device))
    if not getattr(head, "dual_encoder", False):
        raise AvrError(f"--embeddings {embeddings}: head {head.name!r} scores each video "
                       f"against each query (its video state depends on the query), so its "
                       f"videos are no vectors to index; heads with one vector per video: "
                       f"meanp")
    run = {"dir": location_text(run_dir), "head": head.name, "cache": run_cache}
    return (lambda group: _head_vectors_by_split(head, group),
            f"video vectors of run {run['dir']} (head {head.name})", run)


@torch.no_grad()
def _head_vectors_by_split(head, group) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Store rows and the head's L2-normalised video vectors of the done videos, per split."""
    device = next(head.parameters()).device
    done = read_rows(group[schema.VIDEO_DONE]).astype(bool)
    split_of = read_rows(group[schema.VIDEO_SPLIT])
    out = {}
    for code, split in enumerate(schema.SPLITS):
        rows = np.flatnonzero(done & (split_of == code))
        if rows.size == 0:
            continue
        vectors = []
        for start in range(0, rows.size, 1024):
            block = rows[start:start + 1024]
            inputs = {name: torch.from_numpy(read_rows(group[name], block)).to(device)
                      for name in head.video_inputs}
            state = head.encode_videos(inputs)["video"]
            vectors.append(F.normalize(state.float(), dim=-1).cpu().numpy())
        out[split] = (rows.astype(np.int64), np.ascontiguousarray(np.concatenate(vectors),
                                                                  dtype=np.float32))
    return out


def query_vectors(index: VideoIndex, head, caption_rows: dict[str, torch.Tensor]) -> np.ndarray:
    """The queries ``index`` is searched with for these encoded captions: their CLIP sentence
    embeddings, or the head's text vectors for an index of that head's video vectors."""
    if index.run is None:
        return normalised_queries(caption_rows[schema.TEXT_EMBEDDINGS])
    device = next(head.parameters()).device
    with torch.no_grad():
        text = head.encode_texts({name: caption_rows[name].to(device)
                                  for name in head.caption_inputs})["text"]
    return F.normalize(text.float(), dim=-1).cpu().numpy()


def clear_index_folder(fs, folder: str, location: str | Path) -> None:
    """Remove the index at ``folder``, its index.json first, so that a replacement cut short
    never looks complete. Refuses a folder holding anything but index files (a mistaken
    ``--out`` must not delete a store)."""
    if not fs.exists(folder):
        return
    names = [path.rsplit("/", 1)[-1] for path in fs.find(folder)]
    others = [name for name in names if name not in (META_FILE, ID_MAP_FILE)
              and not name.endswith((".faiss", ".rows.npy"))]
    if others:
        raise AvrError(f"{location} holds files that are not an avr index ({others[0]} ...); "
                       f"give --out a folder of its own")
    if META_FILE in names:
        fs.rm_file(f"{folder}/{META_FILE}")
    fs.rm(folder, recursive=True)


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``index.json`` of the index folder at ``path`` (a path or a URL)."""
    fs, folder = store_filesystem(path)
    meta_file = f"{folder}/{META_FILE}"
    if not fs.exists(meta_file):
        raise AvrError(f"{path}: no avr index here ({META_FILE} not found); build one with "
                       f"`avr index build CACHE --out {path}`")
    return json.loads(fs.cat_file(meta_file))


# ---- loading and searching --------------------------------------------------------------------

@dataclass
class SplitIndex:
    """One split's faiss index; its ids are store rows (an index written before: id i is store
    row ``rows[i]``)."""

    split: str
    kind: str
    params: dict[str, Any]
    index: Any  # faiss.Index
    rows: np.ndarray | None = None  # int64 [n], only for indexes whose ids are positions


@dataclass
class VideoIndex:
    path: str | Path
    meta: dict[str, Any]
    _loaded: dict[str, SplitIndex] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def run(self) -> str | None:
        """The run whose video vectors the index holds; None for CLIP's."""
        embeddings = self.meta.get("embeddings", "clip")
        return embeddings["run"] if isinstance(embeddings, dict) else None

    def split(self, name: str) -> SplitIndex | None:
        """The index of split ``name`` (read on first use); None when it has no videos."""
        faiss = _faiss()

        entry = self.meta["splits"].get(name)
        if entry is None:
            return None
        if name not in self._loaded:
            fs, folder = store_filesystem(self.path)
            index_bytes = np.frombuffer(fs.cat_file(f"{folder}/{entry['index_file']}"), np.uint8)
            rows = (np.load(io.BytesIO(fs.cat_file(f"{folder}/{entry['rows_file']}")))
                    if "rows_file" in entry else None)
            self._loaded[name] = SplitIndex(name, entry["kind"], entry["params"],
                                            faiss.deserialize_index(index_bytes), rows)
        return self._loaded[name]


def load_index(path: str | Path, expect_fingerprint: str) -> VideoIndex:
    """Open the index at ``path``, refusing one built from a store with another spec."""
    path = store_location(path)
    meta = read_meta(path)
    if meta.get("embeddings", "clip") == "clip" and meta.get("vectors") != POOLING:
        raise CacheMismatchError(
            f"{path} pools frames as {meta.get('vectors')!r}, not as this avr does ({POOLING}): "
            f"rebuild it with `avr index build CACHE`")
    if meta["fingerprint"] != expect_fingerprint:
        raise CacheMismatchError(
            f"{path} was built from the store {meta['store']} (fingerprint "
            f"{meta['fingerprint']}), not from this store (fingerprint {expect_fingerprint}); "
            f"rebuild it with `avr index build CACHE`")
    return VideoIndex(path, meta)


def find_index(cache_path: str | Path, path: str | Path | None = None, *,
               run: str | Path | None = None) -> VideoIndex | None:
    """The index of the store at ``cache_path``: ``path`` when given (it must exist), else
    ``<cache>/index/`` when one was built (None otherwise). Refuses an index whose store has
    another fingerprint or other done rows than when it was built, and an index of a run's
    video vectors unless it is searched for that ``run``."""
    index_path = store_location(path) if path is not None else \
        default_index_path(cache_path)
    if path is None:
        fs, folder = store_filesystem(index_path)
        if not fs.exists(f"{folder}/{META_FILE}"):
            return None
    group, spec = open_store(cache_path)
    index = load_index(index_path, spec.fingerprint())
    state = store_state(group)
    built = {key: index.meta.get(key) for key in state}
    if built != state:
        raise CacheMismatchError(
            f"{index_path} is stale: built when {cache_path} had {built['done_videos']} of "
            f"{built['video_rows']} videos done, it now has {state['done_videos']} of "
            f"{state['video_rows']}; rebuild it with `avr index build {cache_path}`")
    if index.run is not None and (run is None or location_text(run) != index.run):
        use = "CLIP's first stage" if run is None else f"run {location_text(run)}"
        raise CacheMismatchError(
            f"{index_path} holds the video vectors of run {index.run}, which only that run's "
            f"search uses; this needs {use}: give another --index, or build one with "
            f"`avr index build {cache_path} --out DIR`")
    return index


def search(split_index: SplitIndex, queries: np.ndarray, k: int, *, nprobe: int | None = None,
           ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` videos of each query [Q, D] (normalised float32): scores [Q, k] and store rows
    [Q, k] (-1 where IVF's probed lists held fewer than k videos). ``nprobe`` (IVF) and
    ``ef_search`` (HNSW) default to the values recorded at build time."""
    faiss = _faiss()

    k = min(k, split_index.index.ntotal)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    params = None
    if split_index.kind == "ivf":
        params = faiss.SearchParametersIVF(nprobe=nprobe or split_index.params["nprobe"])
    elif split_index.kind == "hnsw":
        ef = max(ef_search or split_index.params["ef_search"], k)
        params = faiss.SearchParametersHNSW(efSearch=ef)
    scores, ids = split_index.index.search(queries, k, params=params)
    if split_index.rows is None:
        return scores, ids
    return scores, np.where(ids >= 0, split_index.rows[np.maximum(ids, 0)], -1)
