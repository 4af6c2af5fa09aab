"""A store written in other forms: one HDF5 file (`avr cache export --format h5`) and lazy dask
arrays for out-of-core work. A store, and the exported file, is a local path or a URL.

The export fails on damage under done rows with the array, chunk and rows, as every read of rows
does (``avr.store.read``); dask arrays are checked for absent chunks when opened, and a chunk
that fails its checksum fails the computation that reads it. Arrays a store leaves unwritten on
purpose are left out of both."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from avr.store import integrity, schema
from avr.store.group import open_store, unwritten_by
from avr.store.location import store_filesystem, store_location, store_member
from avr.store.read import read_region, require_stored


def export_h5(path: str | Path, out: str | Path, *, rows_per_block: int = 1024) -> str | Path:
    """Write every array of the store to one HDF5 file under the same names, attrs as JSON.
    ``out`` is a local path or a URL; HDF5 needs a seekable file, so a URL's file is written
    to a local temporary file first (under TMPDIR) and then uploaded. Returns where it went.
    Damage under done rows fails the export (nothing is written to ``out``)."""
    group, spec = open_store(path)
    destination = store_location(out)
    if isinstance(destination, Path):
        tmp = destination.with_name(destination.name + ".tmp")
        try:
            _write_h5(group, spec, tmp, rows_per_block)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(destination)
        return destination
    fs, remote = store_filesystem(destination)
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
        media = [name for name in schema.MEDIA_ARRAYS if name in group]
        for name in [*schema.array_layout(spec, 0, 0), *media]:
            array = group[name]
            if unwritten_by(array) is not None:
                continue
            # the media arrays are optional: an absent chunk of them holds nothing, no damage
            counting = (np.zeros(0, dtype=np.int64) if name in media
                        else integrity.rows_that_count(name, array, done))
            if array.dtype.kind in "OTU":  # variable-length strings
                values = [str(v) for v in read_region(array, 0, array.shape[0],
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
                dataset[start:stop] = read_region(
                    array, start, stop, counting[(counting >= start) & (counting < stop)])
        for key, value in group.attrs.asdict().items():
            h5.attrs[key] = json.dumps(value)


def open_dask(path: str | Path) -> dict[str, Any]:
    """Every array of a store as a lazy dask array (chunks = the store's chunks); an absent
    chunk under done rows fails here, naming it."""
    import dask.array as da
    import zarr

    group, spec = open_store(path)
    done = integrity.done_rows(group)
    arrays = {}
    for name in schema.array_layout(spec, 0, 0):
        if unwritten_by(group[name]) is not None:
            continue
        require_stored(group[name], integrity.rows_that_count(name, group[name], done))
        array = zarr.open_array(str(store_member(path, name)), mode="r")
        arrays[name] = da.from_zarr(array)
    return arrays
