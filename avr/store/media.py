"""The media arrays of a store: each video's source path and a strip of thumbnails
(``schema.MEDIA_ARRAYS``), what reports and `avr serve` show a person.

- They are optional: a store written before them opens and trains as before; ``has_media`` says
  whether they are there, and readers show placeholders where a row has none.
- ``ensure_media_arrays`` creates them in an existing store (the caller holds its lock); new
  stores get them at creation (``avr.store.group.create_store``).
- An absent chunk reads as "none recorded" (empty path, no thumbnail), never as damage: rows are
  filled when extract commits their chunk, or later by `avr cache thumbnails`. A chunk that is
  stored and fails its checksum is still damage (``read_rows`` names it).
"""

from __future__ import annotations

import numpy as np

from avr.store import _zarr, schema
from avr.store.group import create_arrays
from avr.store.read import read_region, read_rows

NO_ROWS = np.zeros(0, dtype=np.int64)


def has_media(group) -> bool:
    return all(name in group for name in schema.MEDIA_ARRAYS)


def ensure_media_arrays(group, compression: str | None = None) -> None:
    """Create the media arrays that ``group`` lacks, chunked like its video arrays and
    compressed like them (or as ``compression`` says)."""
    done = group[schema.VIDEO_DONE]
    layout = schema.media_layout(done.shape[0], done.chunks[0])
    compressors = _zarr.compressors(compression or _zarr.compression_of(
        group[schema.FRAME_EMBEDDINGS]))
    create_arrays(group, {name: spec for name, spec in layout.items() if name not in group},
                  compressors)


def read_video_paths(group, rows: np.ndarray) -> list[str]:
    """The recorded path of each of store video ``rows`` (ascending; "" when none)."""
    if schema.VIDEO_PATH not in group:
        return [""] * len(rows)
    return [str(p) for p in read_rows(group[schema.VIDEO_PATH], rows, must_be_stored=NO_ROWS)]


def read_thumbnails(group, rows: np.ndarray) -> list[bytes | None]:
    """The thumbnail strip (JPEG bytes) of each of store video ``rows`` (ascending), None where
    a row has none."""
    if schema.THUMBNAILS not in group:
        return [None] * len(rows)
    padded = read_rows(group[schema.THUMBNAILS], rows, must_be_stored=NO_ROWS)
    return [jpeg_of(row) for row in padded]


def jpeg_of(padded: np.ndarray) -> bytes | None:
    """A thumbnail row's JPEG without its zero padding; None for an empty row."""
    data = padded.tobytes().rstrip(b"\0")
    return data or None


def padded_row(jpeg: bytes) -> np.ndarray:
    """``jpeg`` as a thumbnail row: its bytes, then zeros up to THUMBNAIL_BYTES."""
    if len(jpeg) > schema.THUMBNAIL_BYTES:
        raise ValueError(f"a thumbnail strip of {len(jpeg)} bytes exceeds "
                         f"{schema.THUMBNAIL_BYTES}")
    row = np.zeros(schema.THUMBNAIL_BYTES, dtype=np.uint8)
    row[:len(jpeg)] = np.frombuffer(jpeg, dtype=np.uint8)
    return row


def write_media(group, start: int, stop: int, rows: np.ndarray, paths: list[str],
                thumbnails: list[bytes | None]) -> None:
    """Record ``paths`` and ``thumbnails`` for store video ``rows`` (all within the chunk-aligned
    range [start, stop)) as one whole-chunk write per array, keeping the range's other rows."""
    rows = np.asarray(rows, dtype=np.int64)
    path_array, thumb_array = group[schema.VIDEO_PATH], group[schema.THUMBNAILS]
    region = np.asarray(read_region(path_array, start, stop), dtype=object)
    region[rows - start] = paths
    path_array[start:stop] = region
    strips = read_region(thumb_array, start, stop)
    strips[rows - start] = [padded_row(t) if t else np.zeros(schema.THUMBNAIL_BYTES, np.uint8)
                            for t in thumbnails]
    thumb_array[start:stop] = strips


def media_root(group) -> str | None:
    return group.attrs.get(schema.ATTR_MEDIA_ROOT)
