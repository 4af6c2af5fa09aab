"""`avr extract`: the store it writes, resuming, failures, refusal, export."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from avr.extract import pipeline
from avr.extract.demo_data import generate_demo
from avr.extract.pipeline import ExtractConfig, extract
from avr.store import schema
from avr.store.export import export_h5, open_dask
from avr.store.group import open_store
from avr.store.info import cache_info
from support import media
from support.store_checks import assert_same_store, demo_extract_config, read_store

CHUNK = 4


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("demo") / "data", seed=0, num_looks=2)


def config_for(root: Path, out: Path, **overrides) -> ExtractConfig:
    return demo_extract_config(root, out, overrides.pop("chunk_rows", CHUNK), **overrides)


@pytest.fixture(scope="module")
def straight(demo_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "cache"
    extract(config_for(demo_root, out))
    return out


def test_demo_store_holds_every_array_with_its_shape(straight):
    info = cache_info(straight)
    group, spec = open_store(straight)
    n, m = info["videos"]["rows"], info["captions"]["rows"]
    assert info["videos"]["done"] == n and info["captions"]["done"] == m
    expected = schema.array_layout(spec, n, m)
    assert set(info["arrays"]) == set(expected)
    for name, array in info["arrays"].items():
        assert tuple(array["shape"]) == expected[name].shape, name
    assert info["arrays"][schema.AUDIO_PATCH_TOKENS]["shape"][1] == 1212
    assert info["arrays"][schema.AUDIO_TIME_TOKENS]["shape"][1] == 101
    assert {role: b["weights"] for role, b in info["backbones"].items()} == {
        "clip": "random:0", "swin": "random:0", "ast": "random:0", "roberta": "random:0"}
    assert info["arrays"][schema.FRAME_EMBEDDINGS]["dtype"] == "float16"


def test_clips_without_an_audio_track_are_flagged(straight, demo_root):
    group, _ = open_store(straight)
    ids = list(group[schema.VIDEO_ID][:])
    has_audio = np.asarray(group[schema.HAS_AUDIO][:])
    from avr.extract.decode import decode_audio

    for video_id, flag in zip(ids, has_audio):
        track = decode_audio(demo_root / "videos" / f"{video_id}.mp4")
        assert flag == (track is not None), video_id
    assert not has_audio.all()


def test_rerun_recomputes_nothing(straight, demo_root, monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "encode_clips", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(pipeline, "encode_captions", lambda *a, **k: calls.append(1))
    summary = extract(config_for(demo_root, straight))
    assert calls == [] and summary.done_now == 0


class Interrupted(Exception):
    pass


def test_interrupted_extract_resumes_to_an_identical_store(straight, demo_root, tmp_path):
    out = tmp_path / "cache"

    def stop_after_first_chunk(start, stop):
        raise Interrupted

    with pytest.raises(Interrupted):
        extract(config_for(demo_root, out), on_chunk=stop_after_first_chunk)
    done = open_store(out)[0][schema.VIDEO_DONE][:]
    assert 0 < done.sum() < len(done)
    summary = extract(config_for(demo_root, out))
    assert summary.done_now == len(done) - done.sum()
    assert_same_store(straight, out)


def test_a_chunk_written_but_not_marked_done_is_redone(straight, demo_root, tmp_path,
                                                       monkeypatch):
    """Killed between a chunk's arrays and its done mask: the rows are not counted done."""
    out = tmp_path / "cache"
    real_write = pipeline._write_rows
    writes = []

    def write_then_die(group, layout, start, stop, rows, values, *args, **kwargs):
        real_write(group, layout, start, stop, rows, values, *args, **kwargs)
        if schema.FRAME_EMBEDDINGS in values:
            writes.append(start)
            if start == CHUNK:  # the second video chunk dies before its done mask
                raise Interrupted

    monkeypatch.setattr(pipeline, "_write_rows", write_then_die)
    with pytest.raises(Interrupted):
        extract(config_for(demo_root, out))
    done = open_store(out)[0][schema.VIDEO_DONE][:]
    assert done[:CHUNK].all() and not done[CHUNK:].any()
    monkeypatch.setattr(pipeline, "_write_rows", real_write)
    extract(config_for(demo_root, out))
    assert_same_store(straight, out)


def test_a_killed_process_resumes_to_an_identical_store(straight, demo_root, tmp_path):
    out = tmp_path / "cache"
    command = [sys.executable, "-m", "avr", "extract", "--dataset", "demo", "--root",
               str(demo_root), "--out", str(out), "--backbones", "tiny", "--workers", "0",
               "--chunk-rows", "1", "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    deadline = time.time() + 120
    done_rows = 0
    while time.time() < deadline and process.poll() is None:
        try:
            done_rows = int(open_store(out)[0][schema.VIDEO_DONE][:].sum())
        except Exception:  # store not created yet, or being created
            done_rows = 0
        if done_rows >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert done_rows >= 2
    # The kill landed wherever it landed; the rerun (with the same chunking) must finish it.
    subprocess.run([*command], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    killed = read_store(out)
    reference = tmp_path / "reference"
    extract(config_for(demo_root, reference, chunk_rows=1))
    assert_same_store(reference, out)
    assert killed[schema.VIDEO_DONE].all()


@pytest.fixture()
def broken_root(tmp_path) -> Path:
    root = tmp_path / "generic"
    videos = root / "videos"
    videos.mkdir(parents=True)
    media.write_clip(videos / "good1.mp4", seconds=1.0)
    media.write_clip(videos / "good2.mp4", seconds=1.0, audio="none")
    media.write_zero_byte(videos / "empty.mp4")
    media.write_garbage(videos / "garbage.mp4")
    media.write_truncated(videos / "truncated.mp4")
    media.write_audio_only(videos / "soundonly.mp4")
    ids = ["good1", "good2", "empty", "garbage", "truncated", "soundonly", "absent"]
    with (root / "captions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video_id", "caption", "split"])
        for i, video_id in enumerate(ids):
            writer.writerow([video_id, f"a caption of {video_id}", ["train", "val", "test"][i % 3]])
    return root


def test_bad_files_are_recorded_and_skipped(broken_root, tmp_path):
    out = tmp_path / "cache"
    summary = extract(config_for(broken_root, out, dataset="generic", chunk_rows=2))
    reasons = {f.video_id: f.reason for f in summary.failures}
    assert reasons == {"empty": "zero_byte", "garbage": "unreadable", "truncated": "truncated",
                       "soundonly": "no_video_stream", "absent": "missing_file"}
    group, _ = open_store(out)
    ids = list(group[schema.VIDEO_ID][:])
    done = dict(zip(ids, group[schema.VIDEO_DONE][:]))
    assert done["good1"] and done["good2"] and not any(done[v] for v in reasons)
    recorded = [json.loads(line) for line in (out / schema.FAILURES_FILE).read_text().splitlines()]
    assert {r["video_id"]: r["reason"] for r in recorded} == reasons
    assert all(r["path"] and r["message"] for r in recorded)
    assert {f["video_id"] for f in group.attrs[schema.ATTR_FAILURES]} == set(reasons)
    assert cache_info(out)["videos"]["failed"] == len(reasons)


def test_extract_reports_the_listed_videos_with_a_file_and_warns_when_many_have_none(
        broken_root, tmp_path):
    done = subprocess.run(
        [str(Path(sys.executable).with_name("avr")), "extract", "--dataset", "generic", "--root",
         str(broken_root), "--out", str(tmp_path / "cache"), "--backbones", "tiny", "--device",
         "cpu", "--workers", "0"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path.cwd()), "COLUMNS": "300"})
    assert done.returncode == 0, done.stderr
    out = " ".join(done.stdout.split())
    assert "generic: 7 videos listed (train 3, val 2, test 2), 6 with a file" in out
    assert "1 without (e.g. absent)" in out
    assert "warning: 14% of the listed generic videos have no file" in out
    assert out.index("videos listed") < out.index("videos done")


def test_extract_json_prints_the_summary_alone(broken_root, tmp_path):
    done = subprocess.run(
        [str(Path(sys.executable).with_name("avr")), "extract", "--dataset", "generic", "--root",
         str(broken_root), "--cache", str(tmp_path / "cache"), "--backbones", "tiny", "--device",
         "cpu", "--workers", "0", "--json"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)  # nothing else on stdout: no progress, no table
    assert (summary["videos"], summary["done"]) == (7, 2)
    assert summary["out"] == str(tmp_path / "cache") and (tmp_path / "cache").is_dir()
    assert {f["video_id"]: f["reason"] for f in summary["failures"]}["absent"] == "missing_file"


def test_a_fixed_file_is_picked_up_by_the_next_run(broken_root, tmp_path):
    out = tmp_path / "cache"
    extract(config_for(broken_root, out, dataset="generic", chunk_rows=2))
    media.write_clip(broken_root / "videos" / "absent.mp4", seconds=1.0)
    summary = extract(config_for(broken_root, out, dataset="generic", chunk_rows=2))
    assert summary.done_now == 1
    assert "absent" not in {f.video_id for f in summary.failures}


def test_hdf5_export_round_trips(straight, tmp_path):
    import h5py

    out = export_h5(straight, tmp_path / "cache.h5")
    arrays = read_store(straight)
    with h5py.File(out) as h5:
        assert set(h5) == set(arrays)
        for name, values in arrays.items():
            exported = h5[name][:]
            if values.dtype.kind in "OTU":
                exported = [v.decode() for v in exported]
                values = [str(v) for v in values]
            np.testing.assert_array_equal(np.asarray(exported), np.asarray(values), err_msg=name)
        spec = json.loads(h5.attrs[schema.ATTR_SPEC])
    assert spec == open_store(straight)[1].to_attrs()


def test_dask_arrays_read_the_same_values(straight):
    arrays = open_dask(straight)
    np.testing.assert_array_equal(arrays[schema.AUDIO_TIME_TOKENS].compute(),
                                  read_store(straight)[schema.AUDIO_TIME_TOKENS])
