"""``avr.store.chunks.ChunkDecoder``: whole chunks of a local array decoded into reused memory equal
zarr's reads for every compression avr writes, and anything it cannot vouch for (another codec,
a store at a URL, strings, an absent, truncated or altered chunk file) is left to zarr."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import GzipCodec

from avr.store import schema
from avr.store import _zarr
from avr.store.chunks import ChunkDecoder
from avr.store.read import chunk_key

ROWS, CHUNK = 103, 4  # the last chunk holds 3 rows


def local_array(path: Path, values: np.ndarray, **options):
    return zarr.create_array(zarr.storage.LocalStore(path), shape=values.shape,
                             chunks=(CHUNK, *values.shape[1:]), dtype=values.dtype,
                             fill_value=0, **options)


def chunk_path(path: Path, array, chunk: int) -> Path:
    return path / chunk_key(array, chunk)


@pytest.fixture()
def tokens() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((ROWS, 6, 8)).astype(np.float16)


@pytest.mark.parametrize("compression", schema.COMPRESSIONS)
@pytest.mark.parametrize("dtype", ["float16", "float32", "int32", "bool"])
def test_every_chunk_decodes_to_zarrs_rows(tmp_path, tokens, compression, dtype):
    values = (tokens > 0) if dtype == "bool" else (tokens * 100).astype(dtype)
    array = local_array(tmp_path, values, compressors=_zarr.compressors(compression))
    array[:] = values
    decoder = ChunkDecoder(array)
    assert decoder.supported
    first = None
    for chunk in range(-(-ROWS // CHUNK)):
        rows = values[chunk * CHUNK:(chunk + 1) * CHUNK]
        block = decoder.decode(chunk)
        assert block.shape == (CHUNK, *values.shape[1:]) and block.dtype == values.dtype
        np.testing.assert_array_equal(block[:len(rows)], rows)
        first = block if first is None else first
        assert block is first  # one array, reused


def test_a_damaged_or_absent_chunk_is_left_to_zarr(tmp_path, tokens):
    array = local_array(tmp_path, tokens, compressors=_zarr.compressors("zstd"))
    array[:] = tokens
    decoder = ChunkDecoder(array)
    chunk_path(tmp_path, array, 0).unlink()
    truncated = chunk_path(tmp_path, array, 1)
    truncated.write_bytes(truncated.read_bytes()[:100])
    altered = chunk_path(tmp_path, array, 2)
    data = bytearray(altered.read_bytes())
    data[len(data) // 2] ^= 0xFF
    altered.write_bytes(bytes(data))
    assert [decoder.decode(c) for c in (0, 1, 2)] == [None, None, None]
    np.testing.assert_array_equal(decoder.decode(3), tokens[12:16])


def test_a_chunk_without_a_checksum_whose_size_is_wrong_is_left_to_zarr(tmp_path, tokens):
    array = local_array(tmp_path, tokens, compressors=())
    array[:] = tokens
    decoder = ChunkDecoder(array)
    assert decoder.supported and not decoder.checksum and not decoder.blosc
    np.testing.assert_array_equal(decoder.decode(1), tokens[4:8])
    path = chunk_path(tmp_path, array, 1)
    path.write_bytes(path.read_bytes()[:-2])
    assert decoder.decode(1) is None


def test_what_it_cannot_vouch_for_is_not_decoded(tmp_path, tokens):
    cases = {
        "gzip": local_array(tmp_path / "gzip", tokens, compressors=(GzipCodec(),)),
        "sharded": local_array(tmp_path / "sharded", tokens, shards=(8, 6, 8)),
        "memory": zarr.create_array(zarr.storage.MemoryStore(), shape=tokens.shape,
                                    chunks=(CHUNK, 6, 8), dtype=tokens.dtype),
        "strings": zarr.create_array(zarr.storage.LocalStore(tmp_path / "words"),
                                     shape=(ROWS,), chunks=(CHUNK,), dtype=str),
    }
    for name, array in cases.items():
        array[:] = tokens if name != "strings" else np.asarray(["w"] * ROWS, dtype=object)
        decoder = ChunkDecoder(array)
        assert not decoder.supported, name
        assert decoder.decode(0) is None, name
