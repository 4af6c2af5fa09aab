"""Creating and opening a store (a Zarr v3 group at a path or URL, ``avr.store.location``).

- ``create_store`` pre-allocates every array of ``schema.array_layout``, writes the ids, splits
  and captions, and commits by writing the root attributes last: a kill before that leaves an
  "unfinished" store, never one a reader takes for complete;
- ``open_store`` checks the schema version (and a spec, when given) before returning the group;
- ``store_condition`` tells a complete store, an empty folder, an unfinished creation and
  anything else ("foreign") apart, so that writers never delete what they did not write;
  ``replace_store`` (``--overwrite``) clears only an avr store or an empty folder;
- ``metadata_differences``: where an array's metadata (dtype, shape per row, chunking, rows)
  disagrees with the schema; ``open_store`` refuses such a store before any row is read.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from avr.errors import AvrError, CacheMismatchError, StoreMetadataError
from avr.store import _zarr
from avr.store.location import store_filesystem, store_location
from avr.store.schema import (ATTR_CREATED, ATTR_FAILURES, ATTR_SCHEMA_VERSION, ATTR_SPEC,
                              ATTR_SPLITS, ATTR_UNWRITTEN, CAPTION_ARRAYS, CAPTION_TAG,
                              CAPTION_TEXT, CAPTION_VIDEO, FAILURES_FILE, INDEX_DIR, LOCK_FILE,
                              MEDIA_ARRAYS, SCHEMA_VERSION, SPLITS, VIDEO_DONE, VIDEO_FEATURES,
                              VIDEO_ID, VIDEO_SPLIT, ArraySpec, CacheSpec, array_layout,
                              media_layout, spec_differences)


def _is_lock_file(name: str) -> bool:
    return name.startswith(LOCK_FILE)


def _written_by_avr(name: str) -> bool:
    """Whether a root entry is one avr writes: arrays, metadata, the failure record, the lock,
    the first-stage index, and the temporaries of atomic writes (zarr's ``*.partial``, avr's
    ``*.tmp``)."""
    is_array = (name in (VIDEO_ID, VIDEO_SPLIT, VIDEO_DONE, *VIDEO_FEATURES, *CAPTION_ARRAYS,
                         *MEDIA_ARRAYS)
                or re.fullmatch(r"swin_stage\d+", name) is not None)
    return (is_array or name in ("zarr.json", FAILURES_FILE, INDEX_DIR) or _is_lock_file(name)
            or name.endswith((".partial", ".tmp")))


def store_condition(location: str | Path) -> str:
    """What is at ``location``: "complete" (an avr store: root ``zarr.json`` with a schema
    version), "empty" (nothing but a lock), "unfinished" (what an interrupted creation or
    overwrite leaves: only entries avr writes, no complete root) or "foreign" (anything else)."""
    fs, root = store_filesystem(location)
    if _root_attrs(fs, root).get(ATTR_SCHEMA_VERSION) is not None:
        return "complete"
    try:
        names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return "empty"
    names = [name for name in names if not _is_lock_file(name)]
    if not names:
        return "empty"
    return "unfinished" if all(_written_by_avr(name) for name in names) else "foreign"


def foreign_entries(location: str | Path) -> list[str]:
    """The root entries of ``location`` that avr did not write (empty for an avr store, an
    unfinished one, an empty folder or nothing at all)."""
    fs, root = store_filesystem(location)
    try:
        names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(root, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return [] if not fs.exists(root) else [root.rsplit("/", 1)[-1]]
    complete = _root_attrs(fs, root).get(ATTR_SCHEMA_VERSION) is not None
    # In an avr store, a zarr node at the root is one of its arrays (one a newer avr added).
    return [name for name in names if not _written_by_avr(name)
            and not (complete and fs.exists(f"{root}/{name}/zarr.json"))]


def replace_store(location: str | Path) -> None:
    """``--overwrite``: clear the store at ``location`` for a new one. Only an avr store
    (recognised by its own metadata), an unfinished one or an empty folder is replaced; anything
    else is refused naming what is there, so that a mistaken ``--out`` deletes nothing."""
    refuse_foreign(location, overwrite=True)
    clear_store(location)


def refuse_foreign(location: str | Path, *, overwrite: bool) -> None:
    """Refuse a location a writer must not touch, before any work: one holding files avr did
    not write (with ``overwrite``: named, since it would replace them)."""
    if not overwrite:
        if store_condition(location) == "foreign":
            raise AvrError(f"{location} exists and is not an avr store; choose another --out")
        return
    others = sorted(foreign_entries(location))
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise AvrError(f"{location} holds files avr did not write ({shown}); --overwrite "
                       f"replaces only an avr store or an empty folder: choose another --out")


def _root_attrs(fs, root: str) -> dict[str, Any]:
    try:
        metadata = json.loads(fs.cat_file(f"{root}/zarr.json"))
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return {}
    return metadata.get("attributes") or {}


def clear_store(location: str | Path) -> None:
    """Delete everything at ``location`` but the lock: the root ``zarr.json`` first, so that a
    kill midway leaves an unfinished store, never a complete-looking one with arrays gone."""
    fs, root = store_filesystem(location)
    if not fs.exists(root):
        return
    if fs.exists(f"{root}/zarr.json"):
        fs.rm_file(f"{root}/zarr.json")
    for entry in fs.ls(root, detail=False):
        if not _is_lock_file(entry.rstrip("/").rsplit("/", 1)[-1]):
            fs.rm(entry, recursive=True)


def create_store(path: str | Path, spec: CacheSpec, video_ids: list[str], video_splits: list[str],
                 caption_video: list[int] | np.ndarray, caption_text: list[str],
                 caption_tags: list[str] | None = None, *, video_chunk_rows: int | None = None,
                 unwritten: dict[str, str] | None = None, attrs: dict[str, Any] | None = None,
                 compression: str = "zstd"):
    """Create a new store at ``path`` (a local path or a URL, see ``store_location``) in place
    of whatever is there but its lock. Every array is pre-allocated at its final size (zarr
    forbids safe concurrent resizes; writers fill row ranges) and the ids, splits and captions
    are written. The root's attributes, the schema version among them, are written last: until
    then the store is unfinished and a kill leaves nothing a reader takes for a store.
    ``unwritten`` maps the feature arrays the writer leaves out on purpose to the command that
    left them out (ATTR_UNWRITTEN); ``attrs`` are further root attributes; ``compression`` is
    one of ``schema.COMPRESSIONS`` (``_zarr.compressors``). Returns the zarr group."""
    zarr = _zarr.zarr()
    compressors = _zarr.compressors(compression)
    clear_store(path)
    n_videos, n_captions = len(video_ids), len(caption_text)
    group = zarr.create_group(_zarr.store_of(path, read_only=False), zarr_format=3)
    layout = array_layout(spec, n_videos, n_captions, video_chunk_rows=video_chunk_rows)
    layout.update(media_layout(n_videos, layout[VIDEO_DONE].chunk_rows))
    unwritten = dict(unwritten or {})
    create_arrays(group, layout, compressors, unwritten)
    split_index = {s: i for i, s in enumerate(SPLITS)}
    group[VIDEO_ID][:] = np.asarray(video_ids, dtype=object)
    group[VIDEO_SPLIT][:] = np.asarray([split_index[s] for s in video_splits], dtype=np.int8)
    group[CAPTION_VIDEO][:] = np.asarray(caption_video, dtype=np.int32)
    group[CAPTION_TEXT][:] = np.asarray(caption_text, dtype=object)
    group[CAPTION_TAG][:] = np.asarray(caption_tags or [""] * n_captions, dtype=object)
    # One write of the root metadata, all attributes at once: the commit.
    return group.update_attributes({
        ATTR_SCHEMA_VERSION: SCHEMA_VERSION,
        ATTR_SPEC: spec.to_attrs(),
        ATTR_SPLITS: list(SPLITS),
        ATTR_CREATED: time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        ATTR_FAILURES: [],
        **({ATTR_UNWRITTEN: unwritten} if unwritten else {}),
        **(attrs or {}),
    })


def create_arrays(group, layout: dict[str, ArraySpec], compressors: tuple,
                  unwritten: dict[str, str] | None = None) -> None:
    """Create the arrays of ``layout`` in ``group``, empty (numbers filled with 0, strings with
    ""), each marked with the command that leaves it out when ``unwritten`` names it."""
    for name, arr in layout.items():
        chunks = (arr.chunk_rows, *arr.shape[1:])
        marks = {ATTR_UNWRITTEN: unwritten[name]} if unwritten and name in unwritten else None
        if arr.dtype is str:
            group.create_array(name, shape=arr.shape, chunks=chunks, dtype=str,
                               compressors=compressors, attributes=marks)
        else:
            group.create_array(name, shape=arr.shape, chunks=chunks, dtype=arr.dtype,
                               compressors=compressors, fill_value=0, attributes=marks)


def open_store(path: str | Path, *, mode: str = "r", expect: CacheSpec | None = None,
               ignore_versions: bool = False, check_metadata: bool = True):
    """Open an existing store (a local path or a URL, see ``store_location``), checking its
    schema version, every array's metadata against the schema (``metadata_differences``; off
    only for `avr cache verify`, which reports them) and its spec, when ``expect`` is given.

    Returns ``(group, spec)``. Raises CacheMismatchError naming the store and each difference.
    """
    zarr = _zarr.zarr()
    path = store_location(path)
    fs, root = store_filesystem(path)
    if fs.isfile(root):
        raise CacheMismatchError(f"{path} is a file, not a store: give the store's folder or "
                                 f"URL (the --out of `avr extract`)")
    condition = store_condition(path)
    if condition == "unfinished":
        raise CacheMismatchError(f"{path}: the store's creation did not finish (an `avr extract` "
                                 f"was stopped while creating it, or is creating it now); run "
                                 f"the same `avr extract` again to create it")
    if not fs.exists(f"{root}/zarr.json"):
        raise CacheMismatchError(f"{path}: no avr cache here (zarr.json not found); "
                                 f"run `avr extract ... --out {path}` first")
    group = zarr.open_group(_zarr.store_of(path, read_only=mode == "r"), mode=mode,
                            zarr_format=3)
    version = group.attrs.get(ATTR_SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise CacheMismatchError(f"{path}: schema version {version}, this avr reads version "
                                 f"{SCHEMA_VERSION}; re-extract with --overwrite")
    spec = CacheSpec.from_attrs(group.attrs[ATTR_SPEC])
    if check_metadata:
        differences = metadata_differences(group, spec)
        if differences:
            raise StoreMetadataError(path, differences)
    if expect is not None:
        diffs = spec_differences(spec, expect, ignore_versions=ignore_versions)
        if diffs:
            raise CacheMismatchError(f"{path} does not match:\n  " + "\n  ".join(diffs))
    return group, spec


def unwritten_by(array) -> str | None:
    """The command that left ``array`` unwritten on purpose, or None for a written array."""
    return array.attrs.get(ATTR_UNWRITTEN)


def metadata_differences(group, spec: CacheSpec) -> list[str]:
    """Where the store's arrays disagree with the schema for ``spec``: an array missing, a
    dtype, a shape per row, a chunk that spans more than rows, video (caption) arrays chunked
    by different row counts, or a row count other than ``video_id``'s (``caption_video``'s).
    Readers rely on each of these; an edited or damaged ``zarr.json`` breaks one."""
    arrays = _zarr.arrays_of(group)
    rows = {kind: arrays[name].shape[0] if name in arrays else 0
            for kind, name in (("video", VIDEO_ID), ("caption", CAPTION_VIDEO))}
    differences = []
    chunk_rows: dict[str, dict[int, list[str]]] = {"video": {}, "caption": {}}
    for name, expected in array_layout(spec, rows["video"], rows["caption"]).items():
        array = arrays.get(name)
        if array is None:
            differences.append(f"{name}: missing (no {name}/zarr.json)")
            continue
        differences += _array_differences(name, array, expected)
        if len(array.chunks) == len(array.shape):
            chunk_rows[expected.rows].setdefault(array.chunks[0], []).append(name)
    for kind, counts in chunk_rows.items():
        if len(counts) > 1:
            shown = "; ".join(f"{count} rows: {', '.join(names[:3])}"
                              for count, names in sorted(counts.items()))
            differences.append(f"{kind} arrays are chunked by different row counts ({shown}), "
                               f"the schema chunks them alike")
    return differences


def _array_differences(name: str, array, expected) -> list[str]:
    found = []
    dtype = np.dtype(array.dtype)
    if expected.dtype is str:
        if dtype.kind not in "OTU":
            found.append(f"{name}: dtype {dtype}, the schema says strings")
    elif dtype != np.dtype(expected.dtype):
        found.append(f"{name}: dtype {dtype}, the schema says {np.dtype(expected.dtype)}")
    shape, want = tuple(array.shape), expected.shape
    if shape[1:] != want[1:]:
        found.append(f"{name}: shape per row {shape[1:]}, the schema says {want[1:]}")
    if shape[:1] != want[:1]:
        index = VIDEO_ID if expected.rows == "video" else CAPTION_VIDEO
        found.append(f"{name}: {shape[0] if shape else 0} rows, {index} has {want[0]}")
    if tuple(array.chunks[1:]) != shape[1:]:
        found.append(f"{name}: chunks {tuple(array.chunks)} span more than rows, the schema "
                     f"chunks along rows only")
    return found
