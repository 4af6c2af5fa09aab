"""Whole chunks of a local store's array decoded into memory reused from chunk to chunk.

A streamed epoch decodes tens of gigabytes a chunk at a time. Through zarr each chunk is
decoded into a new buffer and copied out of it into a new array; on a few cores the pages of
those fresh buffers cost more than the decompression (BENCHMARKS.md, *Memory budgets and
streaming*). ``ChunkDecoder`` reads a chunk's file into a reused buffer, checks its crc32c
and decompresses it with blosc (numcodecs) into a reused array, the same steps as zarr's codec
pipeline for the codecs avr writes (``_zarr.compressors``: bytes, then blosc or nothing, then
crc32c). It decodes nothing it is not sure of: an array with other codecs (sharding, a
transpose, gzip), a store at a URL, a chunk whose file is absent or fails its checksum or its
decompression: ``decode`` says so (None) and the caller reads those rows through zarr
(``avr.store.read.read_rows``), which names the damage or reads the fill value as zarr does.
"""

from __future__ import annotations

import os

import numpy as np

from avr.store import _zarr


class ChunkDecoder:
    """Decodes whole row chunks of one array of a local store, each into the caller's memory or
    into one array the decoder reuses (valid until the next call); the file's bytes go through
    one buffer it reuses. Not shared between threads."""

    def __init__(self, array):
        codecs = _zarr.decodable_codecs(array)
        self.folder = _zarr.local_folder(array) if codecs is not None else None
        self.blosc, self.checksum = codecs or (False, False)
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
        key = _zarr.chunk_key(array, chunk)
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
