"""Thumbnail strips and source paths in the store: written by extract and `avr bench store`,
added later by `avr cache thumbnails`, absent from older stores without harm."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from avr.extract.demo_data import generate_demo
from avr.extract.pipeline import extract
from avr.extract.thumbnails import strip_tiles
from avr.store import schema
from avr.store.group import open_store
from avr.store.media import has_media, media_root, read_thumbnails, read_video_paths
from support.console import assert_one_line_error, ok, run_avr
from support.paths import FIXTURES
from support.store_checks import demo_extract_config


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> tuple[Path, Path]:
    root = generate_demo(tmp_path_factory.mktemp("thumbs") / "data", seed=0, num_looks=2)
    out = root.parent / "cache"
    extract(demo_extract_config(root, out, 4))
    return root, out


def test_extract_records_each_clips_path_under_the_root(extracted):
    root, out = extracted
    group, _ = open_store(out)
    ids = [str(v) for v in group[schema.VIDEO_ID][:]]
    paths = read_video_paths(group, np.arange(len(ids)))
    assert media_root(group) == str(root.absolute())
    for video_id, path in zip(ids, paths):
        assert Path(path).stem == video_id and not Path(path).is_absolute()
        assert (root / path).is_file()


def test_extract_stores_a_jpeg_strip_of_the_decoded_frames(extracted):
    _, out = extracted
    group, spec = open_store(out)
    strips = read_thumbnails(group, np.arange(group[schema.VIDEO_ID].shape[0]))
    assert all(s is not None and s[:2] == b"\xff\xd8" and s[-2:] == b"\xff\xd9" for s in strips)
    tiles = strip_tiles(strips[0], schema.THUMBNAIL_FRAMES)
    assert len(tiles) == schema.THUMBNAIL_FRAMES
    assert tiles[0].shape == (spec.image_size, spec.image_size, 3)  # 32 px frames stay 32 px
    assert any(tile.std() > 10 for tile in tiles)  # a drawn shape, not a flat fill


def test_cache_thumbnails_adds_what_extract_would_have_written(extracted, tmp_path):
    root, out = extracted
    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    for name in schema.MEDIA_ARRAYS:
        shutil.rmtree(bare / name)
    assert not has_media(open_store(bare)[0])
    done = ok(run_avr("cache", "thumbnails", bare, "--root", root))
    assert "thumbnails of" in done.stdout
    before, after = open_store(out)[0], open_store(bare)[0]
    rows = np.arange(before[schema.VIDEO_ID].shape[0])
    assert read_thumbnails(after, rows) == read_thumbnails(before, rows)
    assert read_video_paths(after, rows) == read_video_paths(before, rows)


def test_cache_thumbnails_without_a_videos_folder_is_one_error_line(extracted, tmp_path):
    _, out = extracted
    assert_one_line_error(run_avr("cache", "thumbnails", out, "--root", tmp_path),
                          str(tmp_path), "videos/")


def test_a_store_written_before_thumbnails_reads_as_having_none(tmp_path):
    old = tmp_path / "store"
    shutil.copytree(FIXTURES / "d2e6057" / "store", old)
    group, _ = open_store(old)
    rows = np.arange(group[schema.VIDEO_ID].shape[0])
    assert not has_media(group)
    assert read_thumbnails(group, rows) == [None] * len(rows)
    assert read_video_paths(group, rows) == [""] * len(rows)


def test_generated_stores_draw_a_thumbnail_for_every_video(tmp_path):
    ok(run_avr("bench", "store", "--videos", "40", "--shapes", "tiny", "--out", tmp_path / "g"))
    group, _ = open_store(tmp_path / "g")
    strips = read_thumbnails(group, np.arange(40))
    assert all(s is not None for s in strips)
    assert len({s for s in strips}) > 1
