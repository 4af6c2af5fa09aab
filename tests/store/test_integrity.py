"""A damaged store is detected, never read as zeros: checksums on every array, absent and
truncated chunks named at read time by every reader, `avr cache verify` and `--repair`
followed by `avr extract` ending with the undamaged store; stores written before checksums."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest
import zarr

from avr.errors import DamagedStoreError
from avr.evaluate.evaluator import evaluate_run
from avr.evaluate.index import build_index
from avr.evaluate.search import search
from avr.extract import pipeline
from avr.extract.demo_data import generate_demo
from avr.extract.pipeline import extract
from avr.fuse import residency, trainer
from avr.fuse.trainer import TrainConfig
from avr.store import _zarr, integrity, read, schema
from avr.store.chunks import ChunkDecoder
from avr.store.export import export_h5, open_dask
from avr.store.group import create_store, open_store
from avr.store.info import cache_info
from avr.store.lock import StoreLock
from avr.store.splits import load_split
from support.specs import make_tiny_spec
from support.store_checks import assert_same_store, avr_env, demo_extract_config, read_store
from support.stores import make_learnable_store

VIDEO_CHUNK = 4  # learnable stores: 72 videos in 18 chunks (train 0-11, val 12-14, test 15-17)
DEMO_CHUNK = 2


def chunk_file(store: Path, name: str, chunk: int) -> Path:
    group, _ = open_store(store)
    return store / name / read.chunk_key(group[name], chunk)


def delete_chunk(store: Path, name: str, chunk: int) -> None:
    chunk_file(store, name, chunk).unlink()


def truncate_chunk(store: Path, name: str, chunk: int) -> None:
    path = chunk_file(store, name, chunk)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])



def avr_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "avr", *map(str, args)], capture_output=True,
                          text=True, env=avr_env())


@pytest.fixture(scope="module")
def learnable(tmp_path_factory) -> Path:
    return make_learnable_store(tmp_path_factory.mktemp("learnable") / "cache", make_tiny_spec(),
                                video_chunk_rows=VIDEO_CHUNK)


@pytest.fixture()
def store(learnable, tmp_path) -> Path:
    """A fresh copy of the learnable store, to damage."""
    return Path(shutil.copytree(learnable, tmp_path / "cache"))


def load_train(store, *names):
    return load_split(store, "train", names or (schema.FRAME_EMBEDDINGS,),
                      (schema.TEXT_EMBEDDINGS,))


# ---- checksums, and every chunk stored -------------------------------------------------------

def test_every_array_of_a_new_store_carries_a_crc32c_checksum(learnable):
    group, spec = open_store(learnable)
    for name in schema.array_layout(spec, 0, 0):
        assert read.has_checksum(group[name]), name


def test_a_chunk_equal_to_the_fill_value_is_stored(tmp_path, tiny_spec):
    group = create_store(tmp_path / "cache", tiny_spec, ["a", "b"], ["train", "train"],
                                [0, 1], ["x", "y"], video_chunk_rows=1)
    group[schema.HAS_AUDIO][:] = False  # clips without audio: all fill value
    assert read.stored_chunks(group[schema.HAS_AUDIO]) == {0, 1}
    assert read.stored_chunks(group[schema.VIDEO_SPLIT]) == {0, 1}  # train = 0


# ---- damage found at read time ---------------------------------------------------------------

def test_a_deleted_chunk_fails_the_read_naming_array_chunk_and_rows(store):
    delete_chunk(store, schema.FRAME_EMBEDDINGS, 1)
    with pytest.raises(DamagedStoreError) as failed:
        load_train(store)
    message = str(failed.value)
    assert "frame_embeddings chunk c/1/0/0 (video rows 4-7): absent" in message
    assert "avr cache verify" in message and "--repair" in message
    assert [d.chunk for d in failed.value.damage] == [1]


@pytest.mark.parametrize("where,span_bytes", [("memory", 1), ("memory", 700),
                                              ("memory", 1 << 20), ("local", 1 << 20)])
def test_scattered_rows_read_as_spans_equal_the_rows(where, span_bytes, monkeypatch, tmp_path):
    """Rows of many chunks come back as the rows asked for, numbers and strings alike: read as
    slices over runs of chunks at most SPAN_BYTES each (down to one chunk a call) from a store at
    a URL, decoded chunk by chunk (whole chunks in place) from a local one."""
    monkeypatch.setattr(read, "SPAN_BYTES", span_bytes)
    store = (zarr.storage.MemoryStore() if where == "memory"
             else zarr.storage.LocalStore(tmp_path / "store"))
    group = zarr.open_group(store, mode="w")
    values = np.random.default_rng(0).standard_normal((103, 3, 5)).astype(np.float16)
    array = group.create_array("values", shape=values.shape, chunks=(4, 3, 5), dtype=values.dtype,
                               compressors=_zarr.compressors("zstd"))
    array[:] = values
    words = group.create_array("words", shape=(103,), chunks=(4,), dtype=str)
    words[:] = np.asarray([f"w{i}" for i in range(103)], dtype=object)
    assert ChunkDecoder(array).supported == (where == "local")
    rng = np.random.default_rng(1)
    for _ in range(40):
        rows = np.sort(rng.choice(103, size=int(rng.integers(1, 103)), replace=False))
        np.testing.assert_array_equal(read.read_rows(array, rows), values[rows])
        assert list(read.read_rows(words, rows)) == [f"w{i}" for i in rows]
    for rows in ([0, 1, 1, 3], [4, 5, 6, 7, 8], list(range(103)), [100, 101, 102]):
        np.testing.assert_array_equal(read.read_rows(array, np.asarray(rows)),
                                      values[rows])


def test_a_truncated_chunk_fails_its_checksum_at_read(store):
    truncate_chunk(store, schema.TEXT_EMBEDDINGS, 0)
    with pytest.raises(DamagedStoreError, match="text_embeddings chunk c/0/0 "
                                                r"\(caption rows 0-143\): fails its crc32c"):
        load_train(store)


def alter_chunk(store: Path, name: str, chunk: int) -> None:
    """One byte of the chunk's file flipped: its size and compressed stream look whole."""
    path = chunk_file(store, name, chunk)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,problem", [(delete_chunk, "absent"),
                                            (truncate_chunk, "fails its crc32c"),
                                            (alter_chunk, "fails its crc32c")])
def test_a_streamed_epoch_names_the_damaged_chunk(store, damage, problem):
    """Streamed reads decode chunks themselves (``avr.store.chunks``) and leave a damaged one to
    zarr's read, which names it; the error reaches the epoch's thread from the reader's."""
    damage(store, schema.AUDIO_PATCH_TOKENS, 2)
    stream = residency.StreamSettings(VIDEO_CHUNK, 0, 2, buffer_pairs=4, held_bytes=0)
    split = residency.StreamedSplit(store, (schema.FRAME_EMBEDDINGS, schema.AUDIO_PATCH_TOKENS),
                                    (schema.TEXT_EMBEDDINGS,), "fp16", stream)
    config = TrainConfig(batch_size=4)
    with pytest.raises(DamagedStoreError, match=r"audio_patch_tokens chunk c/2/0/0 "
                                                rf"\(video rows 8-11\): {problem}"):
        for _ in split.batches(config, 0):
            pass


def test_damage_under_rows_a_read_does_not_touch_is_not_in_its_way(store):
    delete_chunk(store, schema.FRAME_EMBEDDINGS, 16)  # test rows
    assert load_train(store).num_videos == 48
    with pytest.raises(DamagedStoreError, match="video rows 64-67"):
        load_split(store, "test", (schema.FRAME_EMBEDDINGS,), ())


@pytest.mark.parametrize("lookups_max", [64, 0])  # one lookup per suspect, or one listing
def test_an_absent_chunk_of_zeros_is_told_from_a_stored_one(store, monkeypatch, lookups_max):
    """Train rows have split code 0, the fill value: their chunks read as fill either way."""
    monkeypatch.setattr(read, "LOOKUPS_MAX", lookups_max)
    assert load_train(store).num_videos == 48
    delete_chunk(store, schema.VIDEO_SPLIT, 0)
    with pytest.raises(DamagedStoreError, match="video_split chunk c/0 "):
        load_train(store)


def test_a_damaged_done_mask_fails_the_read(store):
    truncate_chunk(store, schema.VIDEO_DONE, 0)
    with pytest.raises(DamagedStoreError, match="video_done chunk c/0"):
        load_train(store)


def test_index_build_export_and_dask_refuse_a_damaged_store(store, tmp_path):
    delete_chunk(store, schema.FRAME_MASK, 2)
    with pytest.raises(DamagedStoreError, match="frame_mask chunk c/2/0"):
        build_index(store, tmp_path / "index")
    with pytest.raises(DamagedStoreError, match="frame_mask chunk c/2/0"):
        export_h5(store, tmp_path / "cache.h5")
    assert not list(tmp_path.glob("cache.h5*"))
    with pytest.raises(DamagedStoreError, match="frame_mask chunk c/2/0"):
        open_dask(store)


def test_eval_and_search_refuse_a_damaged_store(store, tmp_path):
    run = tmp_path / "run"
    trainer.train(store, TrainConfig(head="meanp", epochs=1, batch_size=16, device="cpu"), run)
    truncate_chunk(store, schema.FRAME_EMBEDDINGS, 16)
    with pytest.raises(DamagedStoreError, match="frame_embeddings chunk c/16/0/0"):
        evaluate_run(run)
    with pytest.raises(DamagedStoreError, match="frame_embeddings chunk c/16/0/0"):
        search("caption 3 of video 1", run, device="cpu")


def test_train_on_a_damaged_store_prints_the_damage_without_a_traceback(store):
    delete_chunk(store, schema.FRAME_EMBEDDINGS, 1)
    result = avr_cli("train", "--cache", store, "--head", "meanp", "--epochs", "1",
                     "--device", "cpu", "--run-dir", store.parent / "run")
    assert result.returncode == 2
    assert "frame_embeddings chunk c/1/0/0" in result.stderr and "Traceback" not in result.stderr


def test_cache_info_reports_absent_chunks(store):
    delete_chunk(store, schema.AUDIO_PATCH_TOKENS, 3)
    absent = cache_info(store)["absent_chunks"]
    assert [(d["array"], d["rows"]) for d in absent] == [(schema.AUDIO_PATCH_TOKENS, [12, 16])]
    assert "avr cache verify" in " ".join(avr_cli("cache", "info", store).stdout.split())


def test_a_store_at_a_memory_url_is_checked_too():
    url = "memory://avr-integrity/cache"
    memory = fsspec.filesystem("memory")
    try:
        make_learnable_store(url, make_tiny_spec(), video_chunk_rows=VIDEO_CHUNK)
        memory.rm_file(f"/avr-integrity/cache/{schema.FRAME_EMBEDDINGS}/c/2/0/0")
        with pytest.raises(DamagedStoreError, match="video rows 8-11"):
            load_train(url)
        assert [d.chunk for d in integrity.verify_store(url).damage] == [2]
    finally:
        memory.rm("/avr-integrity", recursive=True)


# ---- avr cache verify ------------------------------------------------------------------------

def test_verify_a_clean_store_exits_0_with_a_summary(learnable):
    result = avr_cli("cache", "verify", learnable)
    assert result.returncode == 0, result.stderr
    out = " ".join(result.stdout.split())
    assert "clean" in out and "videos 72/72 done" in out and "MB/s" in out


def test_verify_lists_deleted_and_truncated_chunks_and_exits_1(store):
    delete_chunk(store, schema.FRAME_EMBEDDINGS, 1)
    truncate_chunk(store, schema.AUDIO_PATCH_TOKENS, 5)
    result = avr_cli("cache", "verify", store, "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert not report["clean"]
    assert [(d["array"], d["key"], d["rows"], d["problem"]) for d in report["damage"]] == [
        (schema.FRAME_EMBEDDINGS, "c/1/0/0", [4, 8], "absent"),
        (schema.AUDIO_PATCH_TOKENS, "c/5/0/0", [20, 24], "fails its crc32c checksum")]
    assert report["damaged_rows"] == {"video": [4, 5, 6, 7, 20, 21, 22, 23], "caption": []}
    assert report["damaged_videos"][0] == "video0004"
    table = " ".join(avr_cli("cache", "verify", store).stdout.split())
    assert "frame_embeddings" in table and "video 4-7" in table and "--repair" in table


def test_damage_to_the_row_index_is_not_repairable(store):
    delete_chunk(store, schema.VIDEO_ID, 0)
    result = avr_cli("cache", "verify", store, "--repair", "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert [d["array"] for d in report["unrepairable"]] == [schema.VIDEO_ID]
    assert report["repaired"]["video_rows"] == []


def test_repair_is_refused_while_a_writer_holds_the_lock(store):
    with StoreLock(store):
        result = avr_cli("cache", "verify", store, "--repair")
    assert result.returncode == 2 and "is locked by another avr process" in result.stderr


# ---- repair, then extract --------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("demo") / "data", seed=0, num_looks=1)


@pytest.fixture(scope="module")
def straight(demo_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "cache"
    extract(demo_extract_config(demo_root, out, DEMO_CHUNK))
    return out


def test_repair_then_extract_recomputes_exactly_the_damaged_rows(demo_root, straight, tmp_path,
                                                                 monkeypatch):
    out = Path(shutil.copytree(straight, tmp_path / "cache"))
    delete_chunk(out, schema.FRAME_EMBEDDINGS, 0)
    truncate_chunk(out, schema.AUDIO_TIME_TOKENS, 2)
    truncate_chunk(out, schema.ROBERTA_STATES, 0)
    truncate_chunk(out, schema.VIDEO_DONE, 1)
    result = avr_cli("cache", "verify", out, "--repair")
    assert result.returncode == 1, result.stderr
    assert "marked not done" in " ".join(result.stdout.split())
    stored = read_store(out)
    assert np.flatnonzero(~stored[schema.VIDEO_DONE]).tolist() == [0, 1, 2, 3, 4, 5]
    assert not stored[schema.CAPTION_DONE].any()

    encoded_videos = []
    real_encode = pipeline.encode_clips
    monkeypatch.setattr(pipeline, "encode_clips", lambda backbones, clips, *rest:
                        encoded_videos.append(len(clips)) or real_encode(backbones, clips, *rest))
    summary = extract(demo_extract_config(demo_root, out, DEMO_CHUNK))
    assert summary.done_now == 6 and sum(encoded_videos) == 6
    assert_same_store(straight, out)
    assert avr_cli("cache", "verify", out).returncode == 0


def test_repair_of_one_chunk_leaves_the_others_done(demo_root, straight, tmp_path):
    out = Path(shutil.copytree(straight, tmp_path / "cache"))
    truncate_chunk(out, schema.swin_level(0), 1)
    assert avr_cli("cache", "verify", out, "--repair").returncode == 1
    done = read_store(out)[schema.VIDEO_DONE]
    assert np.flatnonzero(~done).tolist() == [2, 3]
    assert extract(demo_extract_config(demo_root, out, DEMO_CHUNK)).done_now == 2
    assert_same_store(straight, out)



def test_extract_names_damage_to_the_row_index_it_checks(demo_root, straight, tmp_path):
    out = Path(shutil.copytree(straight, tmp_path / "cache"))
    delete_chunk(out, schema.VIDEO_ID, 0)
    with pytest.raises(DamagedStoreError, match="video_id chunk c/0"):
        extract(demo_extract_config(demo_root, out, DEMO_CHUNK))

# ---- stores written before checksums ---------------------------------------------------------

@pytest.fixture()
def old_store(tmp_path, monkeypatch) -> Path:
    """A store as avr wrote them before checksums: no crc32c, chunks equal to the fill value
    skipped (has_audio False everywhere)."""
    import zarr
    from zarr.codecs import BloscCodec

    monkeypatch.setattr(_zarr, "compressors", lambda compression="zstd": (
        BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),))
    with zarr.config.set({"array.write_empty_chunks": False}):
        monkeypatch.setattr(_zarr, "zarr", lambda: zarr)
        path = make_learnable_store(tmp_path / "old", make_tiny_spec(),
                                    video_chunk_rows=VIDEO_CHUNK)
        group, _ = open_store(path, mode="r+")
        group[schema.HAS_AUDIO][:] = False
    return path


def test_a_store_written_before_checksums_stays_readable(old_store):
    group, _ = open_store(old_store)
    assert not read.has_checksum(group[schema.FRAME_EMBEDDINGS])
    assert not read.stored_chunks(group[schema.HAS_AUDIO])  # skipped: all fill value
    data = load_split(old_store, "train", (schema.FRAME_EMBEDDINGS, schema.HAS_AUDIO), ())
    assert data.num_videos == 48 and not data.videos[schema.HAS_AUDIO].any()
    report = integrity.verify_store(old_store)
    assert report.clean and len(report.without_checksum) == report.arrays


def test_damage_to_a_store_written_before_checksums_is_found(old_store):
    delete_chunk(old_store, schema.FRAME_EMBEDDINGS, 1)
    truncate_chunk(old_store, schema.AUDIO_PATCH_TOKENS, 2)
    with pytest.raises(DamagedStoreError, match="frame_embeddings chunk c/1/0/0"):
        load_train(old_store)
    problems = {d.array: d.problem for d in integrity.verify_store(old_store).damage}
    assert problems[schema.FRAME_EMBEDDINGS] == "absent"
    assert problems[schema.AUDIO_PATCH_TOKENS].startswith("cannot be decoded")
