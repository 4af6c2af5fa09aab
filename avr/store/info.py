"""A store's summary (`avr cache info`): rows, arrays, bytes, backbones, failures, and the chunks
under done rows that are absent (a listing, no chunk read: `avr cache verify` reads them all).
Arrays a store leaves unwritten on purpose are listed as such."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from avr.store import _zarr, integrity, schema
from avr.store.group import open_store, unwritten_by
from avr.store.location import store_filesystem, store_location, store_member
from avr.store.read import read_rows


def cache_info(path: str | Path) -> dict[str, Any]:
    """Rows, arrays (shape, dtype, chunks, compression, stored bytes), backbones, splits and
    failures."""
    path = store_location(path)
    group, spec = open_store(path)
    video_done = read_rows(group[schema.VIDEO_DONE])
    caption_done = read_rows(group[schema.CAPTION_DONE])
    splits = read_rows(group[schema.VIDEO_SPLIT])
    split_names = list(group.attrs.get(schema.ATTR_SPLITS, schema.SPLITS))
    arrays = {}
    for name in sorted(schema.array_layout(spec, 0, 0)):
        array = group[name]
        arrays[name] = {"shape": list(array.shape), "dtype": str(array.dtype),
                        "chunks": list(array.chunks),
                        "compression": _zarr.compression_of(array),
                        "stored_bytes": stored_bytes(store_member(path, name)),
                        "unwritten": unwritten_by(array) is not None}
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
    fs, root = store_filesystem(location)
    return int(fs.du(root, total=True))
