"""`avr cache export --format h5|npy|parquet|clip-retrieval|hf`: each export read back by the
library that consumes it (numpy's memory map, pandas, clip-retrieval's embedding reader, Hugging
Face datasets, h5py), holding the store's values, ids and texts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from avr.evaluate.index import pooled_frames
from avr.store import schema
from support.console import assert_one_line_error, ok, run_avr
from support.specs import make_tiny_spec
from support.store_checks import read_store
from support.stores import make_learnable_store

FAILED = (1, 50)  # a train video and a val video left not done


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_learnable_store(tmp_path_factory.mktemp("export") / "cache", make_tiny_spec(),
                                failed=FAILED, video_chunk_rows=16)


@pytest.fixture(scope="module")
def arrays(store) -> dict[str, np.ndarray]:
    return read_store(store)


def video_embeddings(arrays, rows) -> np.ndarray:
    return pooled_frames(torch.from_numpy(arrays[schema.FRAME_EMBEDDINGS][rows]),
                         torch.from_numpy(arrays[schema.FRAME_MASK][rows])).numpy()


def caption_embeddings(arrays, rows) -> np.ndarray:
    text = arrays[schema.TEXT_EMBEDDINGS][rows].astype(np.float32)
    return text / np.linalg.norm(text, axis=1, keepdims=True)


def done_rows(arrays, split: str | None = None):
    """Done videos (of ``split``) and their captions, as the embedding exports keep them."""
    keep = arrays[schema.VIDEO_DONE].astype(bool)
    if split is not None:
        keep &= arrays[schema.VIDEO_SPLIT] == schema.SPLITS.index(split)
    videos = np.flatnonzero(keep)
    captions = np.flatnonzero(keep[arrays[schema.CAPTION_VIDEO]])
    return videos, captions


def export(store, out, *options) -> subprocess.CompletedProcess:
    return ok(run_avr("cache", "export", "--cache", store, "--out", out, *options))


def test_npy_arrays_memory_map_to_the_store_values(store, arrays, tmp_path):
    done = export(store, tmp_path / "npy", "--format", "npy")
    assert "export" in done.stdout and "MB/s" in done.stdout  # the progress bar
    for name in (schema.FRAME_EMBEDDINGS, schema.AUDIO_PATCH_TOKENS, schema.VIDEO_DONE,
                 schema.CAPTION_VIDEO):
        mapped = np.load(tmp_path / "npy" / f"{name}.npy", mmap_mode="r")
        assert isinstance(mapped, np.memmap)
        np.testing.assert_array_equal(mapped, arrays[name], err_msg=name)
    ids = np.load(tmp_path / "npy" / "video_id.npy", mmap_mode="r")
    assert ids.tolist() == [str(v) for v in arrays[schema.VIDEO_ID]]
    manifest = json.loads((tmp_path / "npy" / "manifest.json").read_text())
    assert manifest["format"] == "npy" and manifest["videos"] == 72


def test_splits_and_arrays_choose_the_rows_and_files(store, arrays, tmp_path):
    export(store, tmp_path / "npy", "--format", "npy", "--splits", "test", "--arrays",
           schema.TEXT_EMBEDDINGS)
    files = sorted(p.name for p in (tmp_path / "npy").iterdir())
    assert files == sorted(["manifest.json", f"{schema.TEXT_EMBEDDINGS}.npy",
                            *(f"{name}.npy" for name in (
                                schema.VIDEO_ID, schema.VIDEO_SPLIT, schema.VIDEO_DONE,
                                schema.CAPTION_VIDEO, schema.CAPTION_TEXT, schema.CAPTION_TAG,
                                schema.CAPTION_DONE))])
    test = np.flatnonzero(arrays[schema.VIDEO_SPLIT] == schema.SPLITS.index("test"))
    captions = np.flatnonzero(np.isin(arrays[schema.CAPTION_VIDEO], test))
    assert np.load(tmp_path / "npy" / "video_id.npy").tolist() == \
        [str(v) for v in arrays[schema.VIDEO_ID][test]]
    np.testing.assert_array_equal(np.load(tmp_path / "npy" / f"{schema.TEXT_EMBEDDINGS}.npy"),
                                  arrays[schema.TEXT_EMBEDDINGS][captions])
    exported_video = np.load(tmp_path / "npy" / "caption_video.npy")
    np.testing.assert_array_equal(test[exported_video], arrays[schema.CAPTION_VIDEO][captions])


def test_parquet_tables_hold_ids_texts_and_embeddings_of_done_rows(store, arrays, tmp_path):
    import pandas

    export(store, tmp_path / "parquet", "--format", "parquet", "--arrays",
           schema.AUDIO_GLOBAL_TOKENS)
    videos = pandas.read_parquet(tmp_path / "parquet" / "videos.parquet")
    captions = pandas.read_parquet(tmp_path / "parquet" / "captions.parquet")
    video_rows, caption_rows = done_rows(arrays)
    assert videos["video_id"].tolist() == [str(v) for v in arrays[schema.VIDEO_ID][video_rows]]
    assert not set(videos["video_id"]) & {f"video{row:04d}" for row in FAILED}
    np.testing.assert_allclose(np.stack(videos["embedding"]),
                               video_embeddings(arrays, video_rows), rtol=1e-6)
    tokens = np.stack([np.stack(row) for row in videos[schema.AUDIO_GLOBAL_TOKENS]])
    np.testing.assert_array_equal(tokens, arrays[schema.AUDIO_GLOBAL_TOKENS][video_rows])
    assert captions["caption"].tolist() == [str(t) for t in
                                            arrays[schema.CAPTION_TEXT][caption_rows]]
    assert captions["caption_row"].tolist() == caption_rows.tolist()
    np.testing.assert_allclose(np.stack(captions["embedding"]),
                               caption_embeddings(arrays, caption_rows), rtol=1e-6)


def test_clip_retrieval_reads_the_pairs_with_its_embedding_reader(store, arrays, tmp_path):
    from embedding_reader import EmbeddingReader

    out = tmp_path / "clip-retrieval"
    export(store, out, "--format", "clip-retrieval", "--splits", "val,test")
    video_rows, caption_rows = done_rows(arrays)
    keep = np.isin(arrays[schema.VIDEO_SPLIT][arrays[schema.CAPTION_VIDEO][caption_rows]],
                   [1, 2])
    caption_rows = caption_rows[keep]
    images = EmbeddingReader(str(out / "img_emb"), file_format="parquet_npy",
                             metadata_folder=str(out / "metadata"),
                             meta_columns=["image_path", "caption"])
    texts = EmbeddingReader(str(out / "text_emb"), file_format="npy")
    assert images.count == texts.count == len(caption_rows)
    (image_vectors, metadata), = images(batch_size=1000, show_progress=False)
    (text_vectors, _), = texts(batch_size=1000, show_progress=False)
    pair_videos = arrays[schema.CAPTION_VIDEO][caption_rows]
    assert metadata["image_path"].tolist() == [str(arrays[schema.VIDEO_ID][row])
                                               for row in pair_videos]
    assert metadata["caption"].tolist() == [str(arrays[schema.CAPTION_TEXT][row])
                                            for row in caption_rows]
    np.testing.assert_allclose(image_vectors, video_embeddings(arrays, pair_videos), atol=1e-3)
    np.testing.assert_allclose(text_vectors, caption_embeddings(arrays, caption_rows), atol=1e-3)


def test_hf_folder_opens_with_load_from_disk(store, arrays, tmp_path):
    import datasets

    export(store, tmp_path / "hf", "--format", "hf", "--splits", "test")
    loaded = datasets.load_from_disk(str(tmp_path / "hf"))
    video_rows, caption_rows = done_rows(arrays, "test")
    assert set(loaded) == {"videos", "captions"}
    assert loaded["videos"]["video_id"] == [str(v) for v in arrays[schema.VIDEO_ID][video_rows]]
    assert loaded["captions"]["caption"] == [str(t) for t in
                                             arrays[schema.CAPTION_TEXT][caption_rows]]
    np.testing.assert_allclose(np.asarray(loaded["captions"]["embedding"]),
                               caption_embeddings(arrays, caption_rows), rtol=1e-6)


def test_h5_keeps_the_positional_output_form(store, arrays, tmp_path):
    import h5py

    summary = json.loads(ok(run_avr("cache", "export", store, tmp_path / "cache.h5",
                                    "--json")).stdout)
    assert summary["format"] == "h5" and summary["videos"] == 72
    with h5py.File(tmp_path / "cache.h5") as h5:
        np.testing.assert_array_equal(h5[schema.FRAME_EMBEDDINGS][:],
                                      arrays[schema.FRAME_EMBEDDINGS])


def test_an_export_never_replaces_a_folder_of_other_files(store, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.csv").write_text("keep")
    done = run_avr("cache", "export", store, "--out", out, "--format", "npy")
    assert_one_line_error(done, str(out), "results.csv", "not an avr export")
    assert sorted(p.name for p in out.iterdir()) == ["results.csv"]


@pytest.mark.parametrize("option,value,expected", [
    ("--arrays", "no_such_array", "--arrays no_such_array"),
    ("--splits", "holdout", "--splits holdout")])
def test_an_unknown_array_or_split_is_refused(store, tmp_path, option, value, expected):
    done = run_avr("cache", "export", store, "--out", tmp_path / "out", "--format", "npy",
                   option, value)
    assert_one_line_error(done, expected)
    assert not (tmp_path / "out").exists()


def test_the_command_line_offers_every_export_format():
    from avr.cli.store import EXPORT_FORMATS
    from avr.store.export import FORMATS

    assert EXPORT_FORMATS == FORMATS
