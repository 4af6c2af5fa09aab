"""A store written in the forms other tools read (`avr cache export --format ...`), and lazy
dask arrays for out-of-core work. The store and the output are local paths or URLs.

- ``h5``: one HDF5 file, every array under its store name, attrs as JSON (h5py, ``[h5]``);
- ``npy``: one ``<array>.npy`` per array (memory-mappable: ``np.load(..., mmap_mode="r")``;
  strings as fixed-width unicode), plus ``manifest.json``;
- ``parquet``: ``videos.parquet`` and ``captions.parquet`` (pyarrow, ``[parquet]``): ids, split,
  texts and the first-stage embeddings, plus the arrays named by ``arrays``;
- ``clip-retrieval``: clip-retrieval's embeddings folder, one row per (video, caption) pair:
  ``img_emb/img_emb_0.npy`` (the video's embedding), ``text_emb/text_emb_0.npy`` (the caption's),
  float16, L2-normalised as clip-retrieval writes them, and ``metadata/metadata_0.parquet``
  (``image_path`` = the video id, ``caption``, ``video_id``, ``split``, ``tag``);
- ``hf``: a Hugging Face ``datasets`` DatasetDict folder (``videos``, ``captions``) that
  ``datasets.load_from_disk`` opens (``[hf]``).

Rows: ``h5`` and ``npy`` keep every row of the chosen splits with the done masks, as the store
does (``caption_video`` counts rows of the export); the embedding forms keep the done videos of
the chosen splits and their done captions. The embeddings are CLIP's: a video's is the masked
mean of its frame embeddings, L2-normalised (the first stage of ``avr.evaluate.index``), a
caption's its sentence embedding, L2-normalised; float32 but in clip-retrieval's files.

A folder export is written beside its destination and moved into place when complete (at a URL:
written in place, ``manifest.json`` last); it replaces only an earlier avr export or an empty
folder. Damage under the rows read fails the export naming the chunk, as every read does;
arrays a store leaves unwritten on purpose are left out.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from avr.errors import AvrError
from avr.extras import require
from avr.progress import BYTES_UNIT, Meter
from avr.store import _zarr, integrity, schema
from avr.store.group import open_store, unwritten_by
from avr.store.location import location_text, store_filesystem, store_location, store_member
from avr.store.read import chunk_rows, read_rows, require_stored

FORMATS = ("h5", "npy", "parquet", "clip-retrieval", "hf")
MANIFEST = "manifest.json"
BLOCK_BYTES = 64 << 20  # rows of one array read per step
ROW_INDEX = (schema.VIDEO_ID, schema.VIDEO_SPLIT, schema.VIDEO_DONE, schema.CAPTION_VIDEO,
             schema.CAPTION_TEXT, schema.CAPTION_TAG, schema.CAPTION_DONE)


@dataclass
class Selection:
    """The store rows an export holds and the arrays it writes."""

    videos: np.ndarray  # store rows, ascending
    captions: np.ndarray  # store rows, ascending
    caption_video: np.ndarray  # per exported caption: its video's position in ``videos``
    arrays: tuple[str, ...]
    splits: tuple[str, ...]


def export_store(path: str | Path, out: str | Path, format: str = "h5", *,
                 splits: tuple[str, ...] | None = None, arrays: tuple[str, ...] | None = None,
                 console=None) -> dict[str, Any]:
    """Write the store at ``path`` to ``out`` as ``format`` (module docstring); ``splits`` and
    ``arrays`` choose what goes in (default: every split, and every array for h5 and npy, none
    but the embeddings for the others). Returns a summary: out, format, videos, captions,
    arrays, files."""
    if format not in FORMATS:
        raise AvrError(f"--format {format}: choose one of {', '.join(FORMATS)}")
    if format == "clip-retrieval" and arrays:
        raise AvrError("--arrays: clip-retrieval's layout holds embeddings and metadata only; "
                       "export other arrays as npy, parquet or hf")
    group, spec = open_store(path)
    selection = select(group, spec, splits, arrays,
                       embeddings=format in ("parquet", "clip-retrieval", "hf"))
    destination = store_location(out)
    with Meter(console) as meter:
        if format == "h5":
            files = _to_file(destination, lambda local: _write_h5(group, selection, local, meter))
        else:
            writer = {"npy": _write_npy, "parquet": _write_parquet,
                      "clip-retrieval": _write_clip_retrieval, "hf": _write_hf}[format]
            files = _to_folder(destination, lambda fs, folder: writer(
                group, selection, fs, folder, meter))
            _manifest(destination, path, spec, format, selection, files)
    return {"out": str(destination), "format": format, "videos": len(selection.videos),
            "captions": len(selection.captions), "splits": list(selection.splits),
            "arrays": list(selection.arrays), "files": files}


# ---- what goes in ------------------------------------------------------------------------------

def select(group, spec, splits, arrays, *, embeddings: bool) -> Selection:
    """The rows and arrays of an export (``Selection``); refuses unknown splits and arrays.
    ``embeddings``: done rows only, and only the arrays asked for (beside the embeddings);
    else every row of the splits, the row index and the arrays asked for (default: all)."""
    # the media arrays (thumbnails, paths) are optional: exported when the store has them
    layout = [*schema.array_layout(spec, 0, 0),
              *(name for name in schema.MEDIA_ARRAYS if name in group)]
    for split in splits or ():
        if split not in schema.SPLITS:
            raise AvrError(f"--splits {split}: choose among {', '.join(schema.SPLITS)}")
    written = [name for name in layout if unwritten_by(group[name]) is None]
    for name in arrays or ():
        if name not in layout:
            raise AvrError(f"--arrays {name}: the store has no such array; its arrays: "
                           f"{', '.join(layout)}")
        if name not in written:
            raise AvrError(f"--arrays {name}: the store left it unwritten on purpose "
                           f"(`avr cache info` lists them)")
    chosen = tuple(arrays or ()) if embeddings else \
        tuple(dict.fromkeys((*ROW_INDEX, *(arrays or written))))
    splits = tuple(splits) if splits else schema.SPLITS
    split_of = read_rows(group[schema.VIDEO_SPLIT])
    keep = np.isin(split_of, [schema.split_code(s) for s in splits])
    caption_video = read_rows(group[schema.CAPTION_VIDEO]).astype(np.int64)
    caption_keep = keep[caption_video]
    if embeddings:
        keep &= read_rows(group[schema.VIDEO_DONE]).astype(bool)
        caption_keep = keep[caption_video] & read_rows(group[schema.CAPTION_DONE]).astype(bool)
    videos, captions = np.flatnonzero(keep), np.flatnonzero(caption_keep)
    position = np.full(len(keep), -1, dtype=np.int64)
    position[videos] = np.arange(len(videos))
    return Selection(videos, captions, position[caption_video[captions]], chosen, splits)


def _rows_of(selection: Selection, name: str) -> np.ndarray:
    return selection.captions if schema.rows_of(name) == "caption" else selection.videos


def _blocks(array, rows: np.ndarray) -> Iterator[np.ndarray]:
    """``rows`` (ascending) in runs of whole chunks, about BLOCK_BYTES of the array each."""
    row_bytes = max(1, int(np.prod(array.shape[1:], dtype=np.int64)) * array.dtype.itemsize)
    per_block = max(1, BLOCK_BYTES // row_bytes // chunk_rows(array)) * chunk_rows(array)
    block_of = rows // per_block
    for start, stop in _runs_of(block_of):
        yield rows[start:stop]


def _runs_of(keys: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1], True]).tolist() if len(keys) \
        else [0]
    return list(zip(edges[:-1], edges[1:]))


def _array_blocks(group, selection: Selection, name: str, counting: np.ndarray
                  ) -> Iterator[np.ndarray]:
    """The exported rows of array ``name`` block by block; ``caption_video`` as positions in
    the export; damage under ``counting`` rows fails the read."""
    array = group[name]
    for rows in _blocks(array, _rows_of(selection, name)):
        if name == schema.CAPTION_VIDEO:
            yield selection.caption_video[np.searchsorted(selection.captions, rows)]
            continue
        must = counting[np.isin(counting, rows)]
        yield read_rows(array, rows, must_be_stored=must)


def _embedding_blocks(group, rows: np.ndarray, kind: str) -> Iterator[tuple[np.ndarray,
                                                                            np.ndarray]]:
    """(rows, float32 L2-normalised embeddings) of done ``rows`` of ``kind``, block by block."""
    import torch
    import torch.nn.functional as F

    from avr.evaluate.index import pooled_frames

    if kind == "video":
        frames, masks = group[schema.FRAME_EMBEDDINGS], group[schema.FRAME_MASK]
        for block in _blocks(frames, rows):
            yield block, pooled_frames(torch.from_numpy(read_rows(frames, block)),
                                       torch.from_numpy(read_rows(masks, block))).numpy()
        return
    texts = group[schema.TEXT_EMBEDDINGS]
    for block in _blocks(texts, rows):
        vectors = torch.from_numpy(read_rows(texts, block)).float()
        yield block, F.normalize(vectors, dim=-1).numpy()


# ---- destinations ------------------------------------------------------------------------------

def _to_file(destination: str | Path, write) -> list[str]:
    """Run ``write(local_path)``: beside a local destination then moved into place, or to a
    temporary file uploaded to a URL (HDF5 needs a seekable file)."""
    if isinstance(destination, Path):
        tmp = destination.with_name(destination.name + ".tmp")
        try:
            write(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(destination)
        return [destination.name]
    fs, remote = store_filesystem(destination)
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder) / "export.h5"
        write(local)
        fs.put_file(str(local), remote)
    return [remote.rsplit("/", 1)[-1]]


def _to_folder(destination: str | Path, write) -> list[str]:
    """Run ``write(fs, folder)`` into a folder that replaces ``destination`` when complete."""
    fs, folder = store_filesystem(destination)
    _check_replaceable(fs, folder, destination)
    if not isinstance(destination, Path):
        if fs.exists(folder):
            fs.rm(folder, recursive=True)
        fs.makedirs(folder, exist_ok=True)
        return write(fs, folder)
    partial = destination.with_name(f".{destination.name}.partial-{uuid.uuid4().hex[:8]}")
    partial.mkdir(parents=True)
    try:
        files = write(fs, str(partial))
        if destination.exists():
            shutil.rmtree(destination)
        partial.rename(destination)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return files


def _check_replaceable(fs, folder: str, destination) -> None:
    if not fs.exists(folder):
        return
    if not fs.isdir(folder):
        raise AvrError(f"--out {destination} is a file; a {destination} export is a folder")
    names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(folder, detail=False)]
    if names and MANIFEST not in names:
        raise AvrError(f"--out {destination} holds files that are not an avr export "
                       f"({', '.join(sorted(names)[:3])} ...): give a new or empty folder")


def _manifest(destination, store, spec, format: str, selection: Selection,
              files: list[str]) -> None:
    fs, folder = store_filesystem(destination)
    manifest = {"format": format, "store": location_text(store),
                "fingerprint": spec.fingerprint(), "splits": list(selection.splits),
                "videos": int(len(selection.videos)), "captions": int(len(selection.captions)),
                "arrays": list(selection.arrays), "files": files,
                "embeddings": "video: masked mean of CLIP frame embeddings, L2-normalised; "
                              "caption: CLIP sentence embedding, L2-normalised",
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    fs.pipe_file(f"{folder}/{MANIFEST}", json.dumps(manifest, indent=2).encode())


def _progress(meter: Meter, selection: Selection, names) -> Any:
    """A task counting the rows of arrays ``names`` written, its rate in MB/s."""
    return meter.add("export", sum(len(_rows_of(selection, name)) for name in names),
                     BYTES_UNIT)


def _row_bytes(array) -> int:
    return int(np.prod(array.shape[1:], dtype=np.int64)) * max(1, array.dtype.itemsize)


# ---- h5 and npy: arrays as the store holds them ----------------------------------------------

def _write_h5(group, selection: Selection, out: Path, meter: Meter) -> None:
    h5py = require("h5py", "avr cache export --format h5")
    task = _progress(meter, selection, selection.arrays)
    with h5py.File(out, "w") as h5:
        for name, values in _exported_arrays(group, selection, meter, task):
            array = group[name]
            if array.dtype.kind in "OTU":  # variable-length strings
                h5.create_dataset(name, data=np.asarray(list(values), dtype=object),
                                  dtype=h5py.string_dtype())
                continue
            rows = len(_rows_of(selection, name))
            dataset = h5.create_dataset(
                name, shape=(rows, *array.shape[1:]), dtype=array.dtype, compression="gzip",
                compression_opts=1,
                chunks=(max(1, min(array.chunks[0], rows)), *array.shape[1:]) if rows else None)
            start = 0
            for block in values:
                dataset[start:start + len(block)] = block
                start += len(block)
        for key, value in group.attrs.asdict().items():
            h5.attrs[key] = json.dumps(value)


def _write_npy(group, selection: Selection, fs, folder: str, meter: Meter) -> list[str]:
    task = _progress(meter, selection, selection.arrays)
    for name, values in _exported_arrays(group, selection, meter, task):
        array = group[name]
        if array.dtype.kind in "OTU":  # fixed-width unicode, which np.load maps too
            values = [np.asarray(list(values), dtype=str)]
        with fs.open(f"{folder}/{name}.npy", "wb") as handle:
            _write_npy_stream(handle, (len(_rows_of(selection, name)), *array.shape[1:]),
                              None if array.dtype.kind in "OTU" else array.dtype, values)
    return [f"{name}.npy" for name in selection.arrays]


def _exported_arrays(group, selection: Selection, meter: Meter, task
                     ) -> Iterator[tuple[str, Iterator[np.ndarray]]]:
    """Each array of the selection with its exported rows, block by block (strings: one value
    at a time); each block read advances ``task``."""
    done = integrity.done_rows(group)
    for name in selection.arrays:
        array = group[name]
        # an absent chunk of a media array holds nothing recorded, no damage
        counting = (np.zeros(0, dtype=np.int64) if name in schema.MEDIA_ARRAYS
                    else integrity.rows_that_count(name, array, done))

        def blocks(name=name, array=array, counting=counting) -> Iterator[np.ndarray]:
            for block in _array_blocks(group, selection, name, counting):
                meter.advance(task, len(block), nbytes=len(block) * _row_bytes(array))
                if array.dtype.kind in "OTU":
                    yield from (str(value) for value in block)
                else:
                    yield block.astype(array.dtype, copy=False)

        yield name, blocks()


def _write_npy_stream(handle, shape: tuple[int, ...], dtype, blocks) -> None:
    """An ``.npy`` file of ``shape`` written block by block (the header first: the whole
    array is never in memory); ``dtype`` None: that of the first block."""
    header_written = False
    for block in blocks:
        block = np.ascontiguousarray(block if dtype is None else block.astype(dtype, copy=False))
        if not header_written:
            np.lib.format.write_array_header_1_0(
                handle, {"descr": np.lib.format.dtype_to_descr(block.dtype),
                         "fortran_order": False, "shape": shape})
            header_written = True
        handle.write(block.tobytes())
    if not header_written:
        np.save(handle, np.zeros(shape, dtype=dtype or np.float32))


# ---- parquet, clip-retrieval and hf: embeddings with ids and texts ---------------------------

def _tables(group, selection: Selection) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
    """Per table ("videos", "captions"): its store rows and its scalar columns."""
    split_names = np.asarray(schema.SPLITS)
    video_ids = read_rows(group[schema.VIDEO_ID])
    video_split = split_names[read_rows(group[schema.VIDEO_SPLIT])]
    has_audio = read_rows(group[schema.HAS_AUDIO], selection.videos)
    caption_video = read_rows(group[schema.CAPTION_VIDEO]).astype(np.int64)[selection.captions]
    return {
        "videos": (selection.videos, {
            "video_id": [str(v) for v in video_ids[selection.videos]],
            "split": video_split[selection.videos].tolist(),
            "has_audio": has_audio.astype(bool).tolist()}),
        "captions": (selection.captions, {
            "caption_row": selection.captions.tolist(),
            "video_id": [str(v) for v in video_ids[caption_video]],
            "split": video_split[caption_video].tolist(),
            "caption": [str(t) for t in read_rows(group[schema.CAPTION_TEXT],
                                                  selection.captions)],
            "tag": [str(t) for t in read_rows(group[schema.CAPTION_TAG], selection.captions)]}),
    }


def _arrow_column(values: np.ndarray):
    """A numpy block [n, ...] as an Arrow column of (nested) fixed-size lists."""
    import pyarrow as pa

    column = pa.array(np.ascontiguousarray(values).reshape(-1))
    for size in reversed(values.shape[1:]):
        column = pa.FixedSizeListArray.from_arrays(column, size)
    return column


def _write_tables(group, selection: Selection, fs, folder: str, meter: Meter) -> list[str]:
    """``videos.parquet`` and ``captions.parquet``: scalar columns, ``embedding``, and the
    arrays of ``selection.arrays`` of each kind of row, one row group per block."""
    pa = require("pyarrow", "avr cache export --format parquet")
    import pyarrow.parquet as pq

    extra = {kind: [name for name in selection.arrays if schema.rows_of(name) == kind]
             for kind in ("video", "caption")}
    task = _progress(meter, selection, [schema.FRAME_EMBEDDINGS, schema.TEXT_EMBEDDINGS])
    files = []
    for table, (rows, columns) in _tables(group, selection).items():
        kind = table[:-1]
        position = {row: i for i, row in enumerate(rows.tolist())}
        writer = None
        with fs.open(f"{folder}/{table}.parquet", "wb") as handle:
            for block, embedding in _embedding_blocks(group, rows, kind):
                at = [position[row] for row in block.tolist()]
                batch = {name: [values[i] for i in at] for name, values in columns.items()}
                batch["embedding"] = _arrow_column(embedding)
                for name in extra[kind]:
                    batch[name] = _arrow_column(read_rows(group[name], block))
                    meter.advance(task, 0, nbytes=len(block) * _row_bytes(group[name]))
                record = pa.table(batch)
                if writer is None:
                    writer = pq.ParquetWriter(handle, record.schema)
                writer.write_table(record)
                meter.advance(task, len(block), nbytes=embedding.nbytes)
            if writer is None:  # no rows: an empty table with the scalar columns
                pq.write_table(pa.table({name: pa.array([], pa.string()) for name in columns}),
                               handle)
            else:
                writer.close()
        files.append(f"{table}.parquet")
    return files


def _write_parquet(group, selection: Selection, fs, folder: str, meter: Meter) -> list[str]:
    return _write_tables(group, selection, fs, folder, meter)


def _write_clip_retrieval(group, selection: Selection, fs, folder: str, meter: Meter
                          ) -> list[str]:
    """clip-retrieval's embeddings folder: one row per (video, caption) pair."""
    pa = require("pyarrow", "avr cache export --format clip-retrieval")
    import pyarrow.parquet as pq

    task = _progress(meter, selection, [schema.FRAME_EMBEDDINGS, schema.TEXT_EMBEDDINGS])
    videos = np.concatenate([vectors for _, vectors in
                             _embedding_blocks(group, selection.videos, "video")]) \
        if len(selection.videos) else np.zeros((0, group[schema.TEXT_EMBEDDINGS].shape[1]))
    meter.advance(task, len(selection.videos), nbytes=videos.nbytes)
    text_file = "text_emb/text_emb_0.npy"
    image_file = "img_emb/img_emb_0.npy"
    for sub in ("img_emb", "text_emb", "metadata"):
        fs.makedirs(f"{folder}/{sub}", exist_ok=True)
    dim = videos.shape[1]
    with fs.open(f"{folder}/{text_file}", "wb") as handle:
        _write_npy_stream(handle, (len(selection.captions), dim), np.float16,
                          _advancing(meter, task, _embedding_blocks(group, selection.captions,
                                                                    "caption")))
    with fs.open(f"{folder}/{image_file}", "wb") as handle:
        _write_npy_stream(handle, (len(selection.captions), dim), np.float16,
                          [videos[selection.caption_video]])
    _, columns = _tables(group, selection)["captions"]
    metadata = {"image_path": columns["video_id"], "caption": columns["caption"],
                "video_id": columns["video_id"], "split": columns["split"], "tag": columns["tag"]}
    with fs.open(f"{folder}/metadata/metadata_0.parquet", "wb") as handle:
        pq.write_table(pa.table(metadata), handle)
    return [image_file, text_file, "metadata/metadata_0.parquet"]


def _advancing(meter: Meter, task, blocks) -> Iterator[np.ndarray]:
    for _, vectors in blocks:
        meter.advance(task, len(vectors), nbytes=vectors.nbytes)
        yield vectors


def _write_hf(group, selection: Selection, fs, folder: str, meter: Meter) -> list[str]:
    """A DatasetDict (``videos``, ``captions``) saved by ``datasets`` from the parquet tables."""
    datasets = require("datasets", "avr cache export --format hf")
    with tempfile.TemporaryDirectory() as scratch:
        local = store_filesystem(scratch)[0]
        _write_tables(group, selection, local, scratch, meter)
        tables = datasets.DatasetDict({
            table: datasets.Dataset.from_parquet(f"{scratch}/{table}.parquet",
                                                 cache_dir=f"{scratch}/cache")
            for table in ("videos", "captions")})
        tables.save_to_disk(folder if "file" in fs.protocol else fs.unstrip_protocol(folder))
    return ["dataset_dict.json", "videos/", "captions/"]


# ---- dask ------------------------------------------------------------------------------------

def open_dask(path: str | Path) -> dict[str, Any]:
    """Every array of a store as a lazy dask array (chunks = the store's chunks); an absent
    chunk under done rows fails here, naming it."""
    da = require("dask.array", "open_dask")
    zarr = _zarr.zarr()

    group, spec = open_store(path)
    done = integrity.done_rows(group)
    arrays = {}
    for name in schema.array_layout(spec, 0, 0):
        if unwritten_by(group[name]) is not None:
            continue
        require_stored(group[name], integrity.rows_that_count(name, group[name], done))
        array = zarr.open_array(_zarr.store_of(store_member(path, name), read_only=True),
                                mode="r")
        arrays[name] = da.from_zarr(array)
    return arrays


def export_h5(path: str | Path, out: str | Path) -> str | Path:
    """The whole store as one HDF5 file (``export_store(..., "h5")``); returns where it went."""
    export_store(path, out, "h5")
    return store_location(out)
