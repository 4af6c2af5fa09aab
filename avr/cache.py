"""Reading a store as a whole: its summary (`avr cache info`), an HDF5 export
(`avr cache export --format h5`) and dask arrays for out-of-core work. A store, and the HDF5
file, is a local path or a URL (``s3://``, ``gs://``, ``file://``).

The summary lists the chunks under done rows that are absent (a listing, no chunk read: `avr
cache verify` reads them all); the export fails on damage with the array, chunk and rows, as
every read of rows does (``avr.integrity``); dask arrays are checked for absent chunks when
opened, and a chunk that fails its checksum fails the computation that reads it. Arrays a store
leaves unwritten on purpose (`avr bench store --arrays/--heads`) are listed as such by the
summary and left out of the export and of the dask arrays."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from avr import integrity, schema
from avr.integrity import read_rows


def cache_info(path: str | Path) -> dict[str, Any]:
    """Rows, arrays (shape, dtype, chunks, compression, stored bytes), backbones, splits and
    failures."""
    path = schema.store_location(path)
    group, spec = schema.open_store(path)
    video_done = read_rows(group[schema.VIDEO_DONE])
    caption_done = read_rows(group[schema.CAPTION_DONE])
    splits = read_rows(group[schema.VIDEO_SPLIT])
    split_names = list(group.attrs.get(schema.ATTR_SPLITS, schema.SPLITS))
    arrays = {}
    for name in sorted(schema.array_layout(spec, 0, 0)):
        array = group[name]
        arrays[name] = {"shape": list(array.shape), "dtype": str(array.dtype),
                        "chunks": list(array.chunks),
                        "compression": schema.compression_of(array),
                        "stored_bytes": stored_bytes(schema.store_member(path, name)),
                        "unwritten": schema.unwritten_by(array) is not None}
    failures = list(group.attrs.get(schema.ATTR_FAILURES, []))
    return {
        "path": str(path),
        "dataset": spec.dataset,
        "schema_version": group.attrs.get(schema.ATTR_SCHEMA_VERSION),
        "created": group.attrs.get(schema.ATTR_CREATED),
        "fingerprint": spec.fingerprint(),
        "videos": {"rows": int(video_done.size), "done": int(video_done.sum()),
                   "failed": len(failures),
                   "per_split": {s: int((splits == i).sum()) for i, s in enumerate(split_names)}},
        "captions": {"rows": int(caption_done.size), "done": int(caption_done.sum())},
        "arrays": arrays,
        "bytes": sum(a["stored_bytes"] for a in arrays.values()),
        "backbones": {role: vars(info) for role, info in spec.backbones.items()},
        "preprocessing": {"num_frames": spec.num_frames, "image_size": spec.image_size,
                          "frame_sampling": spec.frame_sampling, "audio": vars(spec.audio),
                          "dtype": spec.dtype},
        "failures": failures,
        "unwritten": dict(group.attrs.get(schema.ATTR_UNWRITTEN, {})),
        "absent_chunks": [d.to_json() for d in integrity.absent_under_done_rows(group, spec)],
    }


def stored_bytes(location: str | Path) -> int:
    """Bytes of every file under ``location`` (a local path or a URL)."""
    fs, root = schema.store_filesystem(location)
    return int(fs.du(root, total=True))


def export_h5(path: str | Path, out: str | Path, *, rows_per_block: int = 1024) -> str | Path:
    """Write every array of the store to one HDF5 file under the same names, attrs as JSON.
    ``out`` is a local path or a URL; HDF5 needs a seekable file, so a URL's file is written
    to a local temporary file first (under TMPDIR) and then uploaded. Returns where it went.
    Damage under done rows fails the export (nothing is written to ``out``)."""
    group, spec = schema.open_store(path)
    destination = schema.store_location(out)
    if isinstance(destination, Path):
        tmp = destination.with_name(destination.name + ".tmp")
        try:
            _write_h5(group, spec, tmp, rows_per_block)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(destination)
        return destination
    fs, remote = schema.store_filesystem(destination)
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder) / "export.h5"
        _write_h5(group, spec, local, rows_per_block)
        fs.put_file(str(local), remote)
    return destination


def _write_h5(group, spec: schema.CacheSpec, out: Path, rows_per_block: int) -> None:
    import json

    import h5py

    done = integrity.done_rows(group)
    with h5py.File(out, "w") as h5:
        for name in schema.array_layout(spec, 0, 0):
            array = group[name]
            if schema.unwritten_by(array) is not None:
                continue
            counting = integrity.rows_that_count(name, array, done)
            if array.dtype.kind in "OTU":  # variable-length strings
                values = [str(v) for v in integrity.read_region(array, 0, array.shape[0],
                                                                counting)]
                h5.create_dataset(name, data=np.asarray(values, dtype=object),
                                  dtype=h5py.string_dtype())
                continue
            dataset = h5.create_dataset(name, shape=array.shape, dtype=array.dtype,
                                        chunks=(max(1, min(array.chunks[0], array.shape[0])),
                                                *array.shape[1:]) if array.shape[0] else None,
                                        compression="gzip", compression_opts=1)
            for start in range(0, array.shape[0], rows_per_block):
                stop = min(start + rows_per_block, array.shape[0])
                dataset[start:stop] = integrity.read_region(
                    array, start, stop, counting[(counting >= start) & (counting < stop)])
        for key, value in group.attrs.asdict().items():
            h5.attrs[key] = json.dumps(value)


def open_dask(path: str | Path) -> dict[str, Any]:
    """Every array of a store as a lazy dask array (chunks = the store's chunks); an absent
    chunk under done rows fails here, naming it."""
    import dask.array as da
    import zarr

    group, spec = schema.open_store(path)
    done = integrity.done_rows(group)
    arrays = {}
    for name in schema.array_layout(spec, 0, 0):
        if schema.unwritten_by(group[name]) is not None:
            continue
        integrity.require_stored(group[name], integrity.rows_that_count(name, group[name], done))
        array = zarr.open_array(str(schema.store_member(path, name)), mode="r")
        arrays[name] = da.from_zarr(array)
    return arrays
