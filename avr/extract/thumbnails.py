"""Thumbnail strips: a few of the frames extract already decodes, side by side in one JPEG, and
`avr cache thumbnails`, which adds them (and the clips' paths) to a store written without them.

- A strip holds ``schema.THUMBNAIL_FRAMES`` frames spread evenly over a clip's valid sampled
  frames (``strip_frames``), each scaled to ``schema.THUMBNAIL_HEIGHT`` pixels (frames decoded
  smaller, as the tiny backbones' 32 px, stay as decoded). JPEG through Pillow; the quality
  steps down until the strip fits ``schema.THUMBNAIL_BYTES``.
- `avr cache thumbnails STORE --root DIR` finds each video's file under DIR as extract does,
  decodes only its frames, and writes both media arrays a chunk at a time under the store's
  lock: a rerun redoes the chunks it had not reached. Videos without a file keep no thumbnail.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avr.errors import AvrError
from avr.store import schema

QUALITIES = (85, 70, 50, 30)


def strip_frames(valid: int, count: int = schema.THUMBNAIL_FRAMES) -> np.ndarray:
    """Indices of the frames a strip shows among ``valid`` sampled frames, evenly spread."""
    return np.unique(np.linspace(0, max(valid - 1, 0), count).round().astype(int))


def thumbnail_strip(frames: np.ndarray, frame_mask: np.ndarray) -> bytes:
    """One JPEG of the strip_frames of ``frames`` (uint8 [F, S, S, 3]) among the valid ones
    (``frame_mask``), side by side, at most THUMBNAIL_HEIGHT pixels high."""
    from PIL import Image

    valid = np.flatnonzero(frame_mask) if frame_mask.any() else np.arange(len(frames))
    chosen = frames[valid[strip_frames(len(valid))]]
    strip = Image.fromarray(np.concatenate(list(chosen), axis=1))  # [H, count * W, 3]
    if strip.height > schema.THUMBNAIL_HEIGHT:
        width = round(strip.width * schema.THUMBNAIL_HEIGHT / strip.height)
        strip = strip.resize((width, schema.THUMBNAIL_HEIGHT), Image.Resampling.LANCZOS)
    for quality in QUALITIES:
        out = io.BytesIO()
        strip.save(out, format="JPEG", quality=quality)
        if out.tell() <= schema.THUMBNAIL_BYTES:
            return out.getvalue()
    raise AvrError(f"a thumbnail strip of {strip.width} x {strip.height} pixels does not fit "
                   f"{schema.THUMBNAIL_BYTES} bytes even at JPEG quality {QUALITIES[-1]}")


def strip_tiles(jpeg: bytes, count: int) -> list[np.ndarray]:
    """The ``count`` frames of a strip as uint8 [H, W, 3] arrays (for plots)."""
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    width = image.shape[1] // max(count, 1)
    return [image[:, i * width:(i + 1) * width] for i in range(count)]


def relative_path(path: str | Path, root: str | Path) -> str:
    """``path`` relative to the dataset ``root`` in POSIX form (as the store records it); the
    absolute path when it lies elsewhere."""
    path, root = Path(path).absolute(), Path(root).absolute()
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


# ---- avr cache thumbnails ------------------------------------------------------------------

@dataclass
class ThumbnailSummary:
    store: str
    videos: int
    with_file: int
    written: int
    failed: list[tuple[str, str]]  # (video id, why its frames could not be read)
    seconds: float


def add_thumbnails(store: str | Path, root: Path, *, videos_dir: str | Path | None = None,
                   console=None) -> ThumbnailSummary:
    """Record every video's path under ``root`` and its thumbnail strip (module docstring)."""
    from avr.progress import Meter
    from avr.store.group import open_store
    from avr.store.location import reachable_location
    from avr.store.lock import StoreLock
    from avr.store.media import ensure_media_arrays, write_media
    from avr.store.read import read_rows

    started = time.perf_counter()
    root = Path(root)
    location = reachable_location(store)
    with StoreLock(location).acquire() as lock:
        group, spec = open_store(location, mode="r+")
        ids = [str(v) for v in read_rows(group[schema.VIDEO_ID])]
        paths, missing = video_paths(spec.dataset, root, ids, videos_dir)
        missing_ids = set(missing)
        ensure_media_arrays(group)
        group.attrs[schema.ATTR_MEDIA_ROOT] = str(root.absolute())
        chunk = group[schema.VIDEO_DONE].chunks[0]
        failed: list[tuple[str, str]] = []
        written = 0
        meter = Meter(console)
        with meter:
            task = meter.add("thumbnails", len(ids) - len(missing_ids), "clips")
            for start in range(0, len(ids), chunk):
                rows = [r for r in range(start, min(start + chunk, len(ids)))
                        if ids[r] not in missing_ids]
                strips = [_strip_of(paths[r], spec, ids[r], failed) for r in rows]
                lock.check()
                write_media(group, start, min(start + chunk, len(ids)), np.asarray(rows),
                            [relative_path(paths[r], root) for r in rows], strips)
                written += sum(s is not None for s in strips)
                meter.advance(task, len(rows), failed=len(failed))
    return ThumbnailSummary(str(location), len(ids), len(ids) - len(missing_ids), written,
                            failed, time.perf_counter() - started)


def video_paths(dataset: str, root: Path, ids: list[str], videos_dir: str | Path | None = None
                ) -> tuple[list[Path], list[str]]:
    """Each id's file under ``root`` as `avr extract --dataset DATASET` finds it (the dataset's
    video folders, then the root; ``videos_dir`` alone when given), and the ids without one."""
    from avr.extract.datasets import ADAPTERS, VIDEO_DIR, video_files
    from avr.extract.datasets._common import match_videos, video_folder_candidates
    from avr.extract.datasets.activitynet import without_prefix
    from avr.extract.datasets.vatex import youtube_alias

    adapter = ADAPTERS.get(dataset)
    folders = video_folder_candidates(root, adapter.video_folders if adapter else (VIDEO_DIR,),
                                      videos_dir)
    alias = (youtube_alias(ids) if dataset == "vatex"
             else without_prefix if dataset == "activitynet" else None)
    for folder in folders:
        if folder.is_dir():
            paths, missing = match_videos(video_files(folder), folder, ids, alias)
            if len(missing) < len(ids):
                return paths, missing
    raise AvrError(f"--root {root}: none of the store's {len(ids):,} videos has a file under "
                   f"{', '.join(str(folder) for folder in folders)}; give the dataset root the "
                   f"store was extracted from (its videos/ folder), or --videos-dir")


def _strip_of(path: Path, spec: schema.CacheSpec, video_id: str,
              failed: list[tuple[str, str]]) -> bytes | None:
    from avr.errors import DecodeError
    from avr.extract.decode import decode_frames

    try:
        frames, mask = decode_frames(path, spec.num_frames, spec.image_size)
    except DecodeError as error:
        failed.append((video_id, str(error)))
        return None
    return thumbnail_strip(frames, mask)
