"""zarr behind one door: the configured module, the codecs avr writes, and the few places avr
reads below zarr's public API (chunk keys, the store under an array, its listing). Nothing else
in avr imports zarr's internals; an upgrade of zarr that moves them breaks here alone."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np

from avr.errors import AvrError
from avr.store.schema import COMPRESSIONS


def zarr():
    """zarr, set up the way avr writes: every chunk stored, even one equal to the fill value
    (zarr skips those by default), so that an absent chunk always means damage."""
    import zarr as module

    if not module.config.get("array.write_empty_chunks"):
        module.config.set({"array.write_empty_chunks": True})
    return module


def compressors(compression: str = "zstd") -> tuple:
    """Compression, then a crc32c checksum of the stored bytes (checked on every read).
    ``zstd`` (the default; blosc, bit shuffle, level 3) stores the least; ``lz4`` (blosc, byte
    shuffle) decodes faster; ``none`` keeps only the checksum, the cheapest to stream
    (BENCHMARKS.md, *Memory budgets and streaming*)."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    if compression not in COMPRESSIONS:
        raise AvrError(f"unknown compression {compression!r}; choose one of "
                       f"{', '.join(COMPRESSIONS)}")
    return {"zstd": (BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"), Crc32cCodec()),
            "lz4": (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()),
            "none": (Crc32cCodec(),)}[compression]


def compression_of(array) -> str:
    """How ``array``'s chunks are compressed: the blosc compressor's name, or "none"."""
    from zarr.codecs import BloscCodec

    for codec in array.metadata.codecs:
        if isinstance(codec, BloscCodec):
            return getattr(codec.cname, "value", str(codec.cname))
    return "none"


def has_checksum(array) -> bool:
    from zarr.codecs import Crc32cCodec

    return any(isinstance(codec, Crc32cCodec) for codec in array.metadata.codecs)


def store_of(location: str | Path, *, read_only: bool) -> str | object:
    """What zarr opens for ``location``: a local path or a URL without avr's remote options
    as it is, a ``s3://`` URL as zarr's FsspecStore with the timeouts and tries of
    ``location.remote_options``."""
    from avr.store.location import bounded, remote_options, store_location

    location = store_location(location)
    options = remote_options(location)
    if not options:
        return str(location)
    from zarr.storage import FsspecStore

    store = FsspecStore.from_url(location, storage_options=options, read_only=read_only)
    bounded(store.fs)
    return store


def arrays_of(group) -> dict:
    """Every array of ``group`` by name, their metadata read together. The entries beside them
    that are not zarr nodes (the lock, ``failures.jsonl``, the index folder) are skipped without
    zarr's warning about each."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not recognized as a component")
        return dict(group.arrays())


def chunk_key(array, chunk: int) -> str:
    """The key of row-chunk ``chunk`` within ``array`` (e.g. "c/3/0/0")."""
    return array.metadata.encode_chunk_key((chunk,) + (0,) * (array.ndim - 1))


def stored_keys(array) -> set[str]:
    """The keys of every chunk of ``array`` in its store: one listing, no read."""
    from zarr.core.sync import sync

    prefix = array.store_path.path

    async def keys() -> set[str]:
        return {key[len(prefix) + 1:]
                async for key in array.store_path.store.list_prefix(prefix)}

    return sync(keys())


def keys_exist(array, keys: list[str]) -> list[bool]:
    """Whether each of ``keys`` of ``array`` is in its store: one lookup each, made together."""
    from zarr.core.sync import sync

    store, prefix = array.store_path.store, array.store_path.path

    async def lookups() -> list[bool]:
        return await asyncio.gather(*(store.exists(f"{prefix}/{key}") for key in keys))

    return list(sync(lookups()))


def local_folder(array) -> Path | None:
    """The folder of a local store's array (its chunk files live under it), None at a URL."""
    store = array.store_path.store
    return Path(store.root) / array.store_path.path if hasattr(store, "root") else None


def array_store_text(array) -> str:
    """The store holding ``array``, as a path or URL for messages."""
    store = array.store_path.store
    if hasattr(store, "root"):  # a local directory
        return str(store.root)
    return store.fs.unstrip_protocol(store.path) if hasattr(store.fs, "unstrip_protocol") \
        else f"{store.fs.protocol}://{store.path}"


def decodable_codecs(array) -> tuple[bool, bool] | None:
    """(blosc-compressed, checksummed) when ``array``'s codecs are exactly the ones avr writes
    (bytes in this machine's byte order, then blosc or nothing, then crc32c or nothing) on a
    numeric dtype, so that ``avr.store.chunks.ChunkDecoder`` may decode its chunks; else None."""
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec

    codecs = list(getattr(array.metadata, "codecs", ()))
    if np.dtype(array.dtype).kind not in "biuf" or not codecs:
        return None
    first = codecs.pop(0)
    endian = getattr(getattr(first, "endian", None), "value", None)
    if not isinstance(first, BytesCodec) or (np.dtype(array.dtype).itemsize > 1
                                             and endian != sys.byteorder):
        return None
    blosc = bool(codecs) and isinstance(codecs[0], BloscCodec)
    if blosc:
        codecs.pop(0)
    checksum = bool(codecs) and isinstance(codecs[0], Crc32cCodec)
    if checksum:
        codecs.pop(0)
    return None if codecs else (blosc, checksum)
