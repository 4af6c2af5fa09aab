"""Whole chunks of a local store's array decoded into memory reused from chunk to chunk.

A streamed epoch decodes tens of gigabytes a chunk at a time (``avr.fuse.residency``). Through
zarr each chunk is decoded into a new buffer and copied out of it into a new array: on this
project's 2-core machine the pages of those fresh buffers cost more than the decompression
(blosc zstd into a reused buffer 1.77 GB/s, into a fresh one 0.97 GB/s; a zarr read of the same
chunks 0.71 GB/s). ``ChunkDecoder`` reads a chunk's file into a reused buffer, checks its crc32c
and decompresses it with blosc (numcodecs) into a reused array, the same steps as zarr's codec
pipeline for the codecs avr writes (``schema._compressors``: bytes, then blosc or nothing, then
crc32c). It decodes nothing it is not sure of: an array with other codecs (sharding, a
transpose, gzip), a store at a URL, a chunk whose file is absent or fails its checksum or its
decompression: ``decode`` says so (None) and the caller reads those rows through zarr
(``integrity.read_rows``), which names the damage or reads the fill value as zarr does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np


class ChunkDecoder:
    """Decodes whole row chunks of one array of a local store, each into the caller's memory or
    into one array the decoder reuses (valid until the next call); the file's bytes go through
    one buffer it reuses. Not shared between threads."""

    def __init__(self, array):
        self.folder, self.blosc, self.checksum = _plan(array)
        self.array = array
        self.out: np.ndarray | None = None
        self.raw = bytearray()

    @property
    def supported(self) -> bool:
        return self.folder is not None

    def decode(self, chunk: int, into: np.ndarray | None = None) -> np.ndarray | None:
        """Chunk ``chunk`` (its full ``chunks`` shape, rows past the array's end included) in
        ``into`` (C-contiguous, that shape) or else in the array this decoder reuses; None when
        it is not one this decoder can vouch for (module docstring)."""
        if self.folder is None:
            return None
        array = self.array
        if into is None:
            if self.out is None:
                self.out = np.empty((array.chunks[0], *array.shape[1:]), dtype=array.dtype)
            into = self.out
        key = array.metadata.encode_chunk_key((chunk,) + (0,) * (array.ndim - 1))
        try:
            with open(self.folder / key, "rb", buffering=0) as handle:
                size = os.fstat(handle.fileno()).st_size
                if len(self.raw) < size:
                    self.raw = bytearray(size)
                view = memoryview(self.raw)[:size]
                if handle.readinto(view) != size:
                    return None
        except OSError:
            return None
        if self.checksum:
            import google_crc32c

            stored = int.from_bytes(view[-4:], "little") if size >= 4 else None
            if stored is None or google_crc32c.value(np.frombuffer(view[:-4], np.uint8)) != stored:
                return None
            view = view[:-4]
        target = into.reshape(-1).view(np.uint8)
        if self.blosc:
            from numcodecs import blosc

            try:
                # blosc's header: bytes 4-8 hold the decompressed size (little-endian)
                if len(view) < 16 or int.from_bytes(view[4:8], "little") != target.nbytes:
                    return None
                blosc.decompress(view, target)
            except Exception:  # a damaged chunk: zarr's read names it
                return None
        elif len(view) == target.nbytes:
            target[:] = np.frombuffer(view, dtype=np.uint8)
        else:
            return None
        return into


def _plan(array) -> tuple[Path | None, bool, bool]:
    """(the array's folder, blosc-compressed, checksummed) when its chunks can be decoded here;
    folder None when not."""
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec

    store = array.store_path.store
    codecs = list(getattr(array.metadata, "codecs", ()))
    if not hasattr(store, "root") or np.dtype(array.dtype).kind not in "biuf" or not codecs:
        return None, False, False
    first = codecs.pop(0)
    endian = getattr(getattr(first, "endian", None), "value", None)
    if not isinstance(first, BytesCodec) or (np.dtype(array.dtype).itemsize > 1
                                             and endian != sys.byteorder):
        return None, False, False
    blosc = bool(codecs) and isinstance(codecs[0], BloscCodec)
    if blosc:
        codecs.pop(0)
    checksum = bool(codecs) and isinstance(codecs[0], Crc32cCodec)
    if checksum:
        codecs.pop(0)
    if codecs:
        return None, False, False
    return Path(store.root) / array.store_path.path, blosc, checksum
