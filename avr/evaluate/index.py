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

On disk (default ``<cache>/index/``, a folder zarr does not read): ``index.json`` (the store's
path and spec fingerprint, its row count and done-mask digest, and per split the kind, params
and file names), ``<split>.faiss`` and ``<split>.rows.npy`` (the store row of each index id).
An index refuses a store with another fingerprint, and a store whose done rows changed since
the build (a resumed extract), so a stale index is never searched silently. The index folder,
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
               m: int = DEFAULT_M, seed: int = 0):
    """A faiss inner-product index over ``vectors`` [N, D] float32 and its search params."""
    import faiss

    if kind not in KINDS:
        raise AvrError(f"index kind {kind!r}: expected one of {', '.join(KINDS)}")
    n, dim = vectors.shape
    if kind == "auto":
        kind = "flat" if n <= FLAT_MAX_VIDEOS else "ivf"
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
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
        index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = EF_CONSTRUCTION
        params = {"m": m, "ef_construction": EF_CONSTRUCTION, "ef_search": DEFAULT_EF_SEARCH}
    for start in range(0, n, 65536):
        index.add(vectors[start:start + 65536])
    return index, kind, params


def build_index(cache_path: str | Path, out: str | Path | None = None, kind: str = "auto", *,
                nlist: int | None = None, m: int = DEFAULT_M, seed: int = 0) -> str | Path:
    """Build the first-stage index of every split of the store at ``cache_path`` into ``out``
    (default ``<cache>/index/``; paths or URLs), replacing an index already there.
    ``index.json`` is written last: a folder without it is no index. Returns ``out``."""
    import faiss

    group, spec = open_store(cache_path)
    out = store_location(out) if out is not None else default_index_path(cache_path)
    by_split = read_pooled_by_split(group)
    if not by_split:
        raise AvrError(f"{cache_path}: no extracted videos to index; run `avr extract` first")
    fs, folder = store_filesystem(out)
    clear_index_folder(fs, folder, out)
    fs.makedirs(folder, exist_ok=True)
    splits: dict[str, Any] = {}
    for split, (rows, vectors) in by_split.items():
        started = time.perf_counter()
        index, chosen, params = make_index(vectors, kind, nlist=nlist, m=m, seed=seed)
        fs.pipe_file(f"{folder}/{split}.faiss", faiss.serialize_index(index).tobytes())
        fs.pipe_file(f"{folder}/{split}.rows.npy", _npy_bytes(rows))
        splits[split] = {"kind": chosen, "params": params, "videos": int(rows.size),
                         "index_file": f"{split}.faiss", "rows_file": f"{split}.rows.npy",
                         "build_seconds": round(time.perf_counter() - started, 3)}
    meta = {"store": location_text(cache_path), "fingerprint": spec.fingerprint(),
            **store_state(group), "dim": spec.clip_dim, "metric": "inner_product",
            "vectors": POOLING,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "splits": splits}
    fs.pipe_file(f"{folder}/{META_FILE}", json.dumps(meta, indent=2).encode())
    return out


def clear_index_folder(fs, folder: str, location: str | Path) -> None:
    """Remove the index at ``folder``, its index.json first, so that a replacement cut short
    never looks complete. Refuses a folder holding anything but index files (a mistaken
    ``--out`` must not delete a store)."""
    if not fs.exists(folder):
        return
    names = [path.rsplit("/", 1)[-1] for path in fs.find(folder)]
    others = [name for name in names if name != META_FILE
              and not name.endswith((".faiss", ".rows.npy"))]
    if others:
        raise AvrError(f"{location} holds files that are not an avr index ({others[0]} ...); "
                       f"give --out a folder of its own")
    if META_FILE in names:
        fs.rm_file(f"{folder}/{META_FILE}")
    fs.rm(folder, recursive=True)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


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
    """One split's faiss index; id i of the index is store row ``rows[i]``."""

    split: str
    kind: str
    params: dict[str, Any]
    index: Any  # faiss.Index
    rows: np.ndarray  # int64 [n]


@dataclass
class VideoIndex:
    path: str | Path
    meta: dict[str, Any]
    _loaded: dict[str, SplitIndex] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def split(self, name: str) -> SplitIndex | None:
        """The index of split ``name`` (read on first use); None when it has no videos."""
        import faiss

        entry = self.meta["splits"].get(name)
        if entry is None:
            return None
        if name not in self._loaded:
            fs, folder = store_filesystem(self.path)
            index_bytes = np.frombuffer(fs.cat_file(f"{folder}/{entry['index_file']}"), np.uint8)
            rows = np.load(io.BytesIO(fs.cat_file(f"{folder}/{entry['rows_file']}")))
            self._loaded[name] = SplitIndex(name, entry["kind"], entry["params"],
                                            faiss.deserialize_index(index_bytes), rows)
        return self._loaded[name]


def load_index(path: str | Path, expect_fingerprint: str) -> VideoIndex:
    """Open the index at ``path``, refusing one built from a store with another spec."""
    path = store_location(path)
    meta = read_meta(path)
    if meta.get("vectors") != POOLING:
        raise CacheMismatchError(
            f"{path} pools frames as {meta.get('vectors')!r}, not as this avr does ({POOLING}): "
            f"rebuild it with `avr index build CACHE`")
    if meta["fingerprint"] != expect_fingerprint:
        raise CacheMismatchError(
            f"{path} was built from the store {meta['store']} (fingerprint "
            f"{meta['fingerprint']}), not from this store (fingerprint {expect_fingerprint}); "
            f"rebuild it with `avr index build CACHE`")
    return VideoIndex(path, meta)


def find_index(cache_path: str | Path, path: str | Path | None = None) -> VideoIndex | None:
    """The index of the store at ``cache_path``: ``path`` when given (it must exist), else
    ``<cache>/index/`` when one was built (None otherwise). Refuses an index whose store has
    another fingerprint or other done rows than when it was built."""
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
    return index


def search(split_index: SplitIndex, queries: np.ndarray, k: int, *, nprobe: int | None = None,
           ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` videos of each query [Q, D] (normalised float32): scores [Q, k] and store rows
    [Q, k] (-1 where IVF's probed lists held fewer than k videos). ``nprobe`` (IVF) and
    ``ef_search`` (HNSW) default to the values recorded at build time."""
    import faiss

    k = min(k, split_index.index.ntotal)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    params = None
    if split_index.kind == "ivf":
        params = faiss.SearchParametersIVF(nprobe=nprobe or split_index.params["nprobe"])
    elif split_index.kind == "hnsw":
        ef = max(ef_search or split_index.params["ef_search"], k)
        params = faiss.SearchParametersHNSW(efSearch=ef)
    scores, ids = split_index.index.search(queries, k, params=params)
    rows = np.where(ids >= 0, split_index.rows[np.maximum(ids, 0)], -1)
    return scores, rows
