"""`avr bench store`: a generated store in the real schema, valid input for every command, with a
learnable structure, and arrays left unwritten on purpose that runs refuse by name.

Most tests write stores with the hidden ``--shapes tiny`` (the tiny backbones' widths) so that
heads train in seconds; one writes VATEX's real per-row shapes for a handful of videos."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from typer.testing import CliRunner

from avr.cli import _options as cli_options
from avr.cli import app
from avr.errors import CacheMismatchError
from avr.extract.generated import GeneratedEncoder, GeneratorSettings, write_generated_store
from avr.store import schema
from avr.store.group import open_store
from avr.store.info import cache_info
from avr.store.read import read_rows
from support.console import assert_one_line_error, ok, run_avr

TINY = ("--shapes", "tiny")
TRAIN = ("--epochs", "5", "--batch-size", "32", "--lr", "3e-3", "--temperature", "0.05",
         "--device", "cpu")



@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("generated") / "store"
    ok(run_avr("bench", "store", "--videos", "100", "--out", path, "--val-videos", "20",
               "--test-videos", "20", *TINY))
    return path


@pytest.fixture(scope="module")
def runs(store, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("runs")
    out = {}
    for head in ("tefal", "xpool"):
        ok(run_avr("train", "--cache", store, "--head", head, *TRAIN, "--run-dir",
                   folder / head))
        out[head] = folder / head
    return out


def eval_json(run: Path, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{run.name}.json"
    ok(run_avr("eval", "--run", run, "--device", "cpu", "--json", out, *args))
    return json.loads(out.read_text())


def test_the_store_has_the_real_schema_and_splits(store):
    group, spec = open_store(store)
    assert spec.dataset == "generated"
    splits = read_rows(group[schema.VIDEO_SPLIT])
    assert [int((splits == schema.split_code(s)).sum()) for s in schema.SPLITS] == [60, 20, 20]
    assert read_rows(group[schema.VIDEO_DONE]).all() and read_rows(group[schema.CAPTION_DONE]).all()
    assert group[schema.CAPTION_TEXT].shape == (1000,)
    tags = set(read_rows(group[schema.CAPTION_TAG]).tolist())
    assert tags == {"", "visual", "audio_only"}
    # twins: the same frames, different audio
    twin_captions = np.flatnonzero(read_rows(group[schema.CAPTION_TAG]) == "audio_only")
    twin_rows = np.unique(read_rows(group[schema.CAPTION_VIDEO])[twin_captions])
    first, second = twin_rows[0], twin_rows[1]
    frames = read_rows(group[schema.FRAME_EMBEDDINGS], np.array([first, second]))
    audio = read_rows(group[schema.AUDIO_PATCH_TOKENS], np.array([first, second]))
    assert np.array_equal(frames[0], frames[1]) and not np.array_equal(audio[0], audio[1])
    done = ok(run_avr("cache", "verify", store))
    assert "clean" in done.stdout and "unwritten" not in done.stdout


def test_captions_hold_what_the_generator_encodes_from_their_text(store):
    group, spec = open_store(store)
    rows = np.arange(5)
    texts = [str(t) for t in read_rows(group[schema.CAPTION_TEXT], rows)]
    encoded = GeneratedEncoder(spec, 0).encode_text(texts)
    for name in schema.CAPTION_FEATURES:
        stored = read_rows(group[name], rows)
        assert np.array_equal(stored, encoded[name].numpy().astype(stored.dtype)), name


def test_a_trained_head_beats_chance_widely_and_audio_decides_the_twins(runs, tmp_path):
    tefal, xpool = (eval_json(runs[h], tmp_path) for h in ("tefal", "xpool"))
    chance = 100 / tefal["num_videos"]  # 5.0 on 20 test videos
    for result in (tefal, xpool):
        assert result["t2v"]["R1"] > 8 * chance, result["t2v"]
    # twins show identical frames: X-Pool can only tie them; TEFAL hears the difference
    assert tefal["tags"]["audio_only"]["t2v"]["R1"] >= xpool["tags"]["audio_only"]["t2v"]["R1"] + 25


def in_process(*args) -> str:
    """The command run by typer's test runner in this process (no start-up cost)."""
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def test_sweep_index_and_search_run_on_the_store(store, runs):
    out = in_process("sweep", "--cache", store, "--head", "meanp", "--epochs", "1",
                     "--batch-size", "32", "--device", "cpu", "--grid", "lr=1e-3,3e-3")
    assert "lr=0.001" in out and "val R@1" in out
    ok(run_avr("index", "build", store))
    group, _ = open_store(store)
    test_rows = np.flatnonzero(read_rows(group[schema.VIDEO_SPLIT]) == schema.split_code("test"))
    caption_video = read_rows(group[schema.CAPTION_VIDEO])
    caption = int(np.flatnonzero(np.isin(caption_video, test_rows)
                                 & (read_rows(group[schema.CAPTION_TAG]) == ""))[0])
    query = str(read_rows(group[schema.CAPTION_TEXT], np.array([caption]))[0])
    done = ok(run_avr("search", query, "--run", runs["xpool"], "--device", "cpu", "--k", "3",
                      "--json"))
    hits = json.loads(done.stdout)
    video_id = str(read_rows(group[schema.VIDEO_ID], np.array([caption_video[caption]]))[0])
    assert video_id in [hit["video_id"] for hit in hits]
    assert "R@1" in in_process("eval", "--run", runs["xpool"], "--device", "cpu", "--rerank-k", "5")


def test_heads_leave_other_arrays_unwritten_and_runs_needing_them_are_refused(tmp_path):
    store = tmp_path / "xpool-only"
    ok(run_avr("bench", "store", "--videos", "30", "--out", store, "--heads", "xpool",
               "--val-videos", "5", "--test-videos", "5", *TINY))
    info = cache_info(store)
    assert set(info["unwritten"]) == {
        schema.AUDIO_PATCH_TOKENS, schema.AUDIO_GLOBAL_TOKENS, schema.AUDIO_TIME_TOKENS,
        schema.AUDIO_POOLED_TOKEN, schema.swin_level(0), schema.swin_level(1), schema.swin_level(2),
        schema.TEXT_TOKEN_STATES, schema.TEXT_TOKEN_MASK, schema.ROBERTA_STATES,
        schema.ROBERTA_MASK}
    assert "--heads xpool" in info["unwritten"][schema.AUDIO_PATCH_TOKENS]
    assert not info["absent_chunks"]
    assert info["arrays"][schema.AUDIO_PATCH_TOKENS]["unwritten"]
    assert not list((store / schema.AUDIO_PATCH_TOKENS).rglob("c/*"))  # no chunk at all
    verify = ok(run_avr("cache", "verify", store))
    assert "clean" in verify.stdout and "left unwritten on purpose" in verify.stdout
    in_process("cache", "export", store, tmp_path / "export.h5")
    with h5py.File(tmp_path / "export.h5") as h5:
        assert schema.FRAME_EMBEDDINGS in h5 and schema.AUDIO_PATCH_TOKENS not in h5
    refused = run_avr("train", "--cache", store, "--head", "tefal", "--device", "cpu",
                      "--run-dir", tmp_path / "run")
    assert_one_line_error(refused, str(store), "array audio_patch_tokens",
                          "left unwritten on purpose", "--heads")
    assert refused.stdout == "" and not (tmp_path / "run").exists()
    ok(run_avr("train", "--cache", store, "--head", "xpool", *TRAIN, "--epochs", "1",
               "--run-dir", tmp_path / "xpool"))
    ok(run_avr("eval", "--run", tmp_path / "xpool", "--device", "cpu"))
    sweep = CliRunner().invoke(app, ["sweep", "--cache", str(store), "--head", "gais",
                                     "--grid", "lr=1e-3"])
    assert "array audio_time_tokens" in str(sweep.exception)


def test_real_shapes(tmp_path):
    store = tmp_path / "vatex-shaped"
    done = ok(run_avr("bench", "store", "--videos", "6", "--captions-per-video", "2", "--out",
                      store, "--val-videos", "1", "--test-videos", "1"))
    assert "MB/s" in done.stdout and "GB on disk" in done.stdout
    info = cache_info(store)
    shapes = {name: tuple(a["shape"]) for name, a in info["arrays"].items()}
    assert shapes[schema.FRAME_EMBEDDINGS] == (6, 32, 512)
    assert shapes[schema.AUDIO_PATCH_TOKENS] == (6, 1212, 768)
    assert shapes[schema.AUDIO_TIME_TOKENS] == (6, 101, 768)
    assert shapes[schema.AUDIO_GLOBAL_TOKENS] == (6, 2, 768)
    assert [shapes[schema.swin_level(k)] for k in range(3)] == [
        (6, 32, 16, 192), (6, 32, 4, 384), (6, 32, 1, 768)]
    assert shapes[schema.TEXT_TOKEN_STATES] == (12, 32, 512)
    assert shapes[schema.ROBERTA_STATES] == (12, 32, 768)
    assert all(info["arrays"][n]["dtype"] == "float16" for n in
               (schema.FRAME_EMBEDDINGS, schema.AUDIO_PATCH_TOKENS, schema.ROBERTA_STATES))
    codecs = zarr.open_array(str(store / schema.AUDIO_PATCH_TOKENS)).metadata.codecs
    assert any(type(c).__name__ == "Crc32cCodec" for c in codecs)


@pytest.mark.parametrize("compression", ["lz4", "none"])
def test_compression_changes_the_codecs_not_the_values(store, tmp_path, compression):
    """The same generated store written with another --compression holds the same values,
    keeps its crc32c checksums (a damaged chunk is still found), and says how it is stored."""
    other = tmp_path / compression
    ok(run_avr("bench", "store", "--videos", "100", "--out", other, "--val-videos", "20",
               "--test-videos", "20", *TINY, "--compression", compression))
    info = json.loads(ok(run_avr("cache", "info", other, "--json")).stdout)
    assert {a["compression"] for a in info["arrays"].values()} == {compression}
    assert cli_options.COMPRESSIONS == schema.COMPRESSIONS  # the command line's copy of the choices
    assert cache_info(store)["arrays"][schema.AUDIO_PATCH_TOKENS]["compression"] == "zstd"
    assert "compression" in ok(run_avr("cache", "info", other)).stdout
    for name in (schema.AUDIO_PATCH_TOKENS, schema.FRAME_EMBEDDINGS, schema.TEXT_EMBEDDINGS):
        np.testing.assert_array_equal(read_rows(zarr.open_array(str(other / name))),
                                      read_rows(zarr.open_array(str(store / name))))
    chunk = other / schema.AUDIO_PATCH_TOKENS / "c" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-8] + bytes(8))
    verify = run_avr("cache", "verify", other)
    assert verify.returncode == 1 and "audio_patch_tokens" in verify.stdout + verify.stderr


def test_a_killed_write_resumes_and_other_settings_are_refused(tmp_path):
    settings = GeneratorSettings(videos=24, captions_per_video=2, val_videos=4, test_videos=4,
                                 shapes="tiny")
    whole = tmp_path / "whole"
    write_generated_store(whole, settings, chunk_rows=4)

    class Killed(Exception):
        pass

    def kill(start, stop):
        if start > 0:
            raise Killed

    resumed = tmp_path / "resumed"
    with pytest.raises(Killed):  # after the second of six video chunks
        write_generated_store(resumed, settings, chunk_rows=4, on_chunk=kill)
    group, _ = open_store(resumed)
    done = read_rows(group[schema.VIDEO_DONE])
    assert done.sum() == 8
    write_generated_store(resumed, settings)
    for name in (schema.FRAME_EMBEDDINGS, schema.AUDIO_PATCH_TOKENS, schema.TEXT_EMBEDDINGS):
        assert np.array_equal(zarr.open_array(str(whole / name))[:],
                              zarr.open_array(str(resumed / name))[:]), name
    with pytest.raises(CacheMismatchError, match="--overwrite"):
        write_generated_store(resumed, GeneratorSettings(videos=24, seed=1, shapes="tiny",
                                                         val_videos=4, test_videos=4))


@pytest.mark.parametrize("dataset", ["vatex", "msrvtt", "lsmdc", "charades", "didemo", "msvd",
                                     "activitynet"])
def test_like_a_dataset_takes_its_split_sizes_captions_frames_and_text_lengths(dataset):
    from avr.extract.datasets import facts_of
    from avr.extract.generated import generated_spec

    facts = facts_of(dataset)
    settings = GeneratorSettings.like_dataset(dataset, shapes="tiny")
    assert settings.split_sizes() == facts.videos
    assert settings.videos == sum(facts.videos.values())
    assert [settings.captions_for(split) for split in schema.SPLITS] == \
        [facts.captions_per_video[split] for split in schema.SPLITS]
    spec = generated_spec(0, "vatex", like=dataset)
    assert (spec.num_frames, spec.clip_text_len, spec.roberta_len) == \
        (facts.frames, facts.text_tokens.clip, facts.text_tokens.roberta)
    assert GeneratorSettings.like_dataset(dataset).command("s").startswith(
        f"avr bench store --like {dataset} --out s")


def test_like_a_dataset_with_videos_scales_its_splits_and_keeps_its_name():
    from avr.extract.generated import generated_spec

    settings = GeneratorSettings.like_dataset("msrvtt", 800, shapes="tiny")
    assert settings.split_sizes() == {"train": 680, "val": 40, "test": 80}  # 8,500 / 500 / 1,000
    assert settings.captions_for("train") == 20 and settings.captions_for("test") == 1
    assert settings.command("s") == "avr bench store --like msrvtt --out s --videos 800 " \
                                    "--shapes tiny"
    assert generated_spec(0, "tiny", like="msrvtt").dataset == "msrvtt"


def test_like_a_paragraph_dataset_writes_one_paragraph_per_video():
    from avr.extract.generated import PARAGRAPH_JOIN, make_plan

    plan = make_plan(GeneratorSettings.like_dataset("didemo", shapes="tiny"))
    assert len(plan.caption_text) == len(plan.video_ids) == 8_392 + 1_065 + 1_004
    assert np.array_equal(plan.caption_video, np.arange(len(plan.video_ids)))
    assert all(text.count(PARAGRAPH_JOIN) == 2 for text in plan.caption_text[:50])


def test_a_store_like_msvd_has_its_real_row_counts_and_no_audio(tmp_path):
    path = tmp_path / "msvd-like"
    done = ok(run_avr("bench", "store", "--like", "msvd", "--out", path, "--heads", "xpool",
                      *TINY, timeout=300))
    assert "1,970 videos, 78,800 captions" in done.stdout
    group, _ = open_store(path)
    splits = read_rows(group[schema.VIDEO_SPLIT])
    assert [int((splits == schema.split_code(s)).sum()) for s in schema.SPLITS] == \
        [1_200, 100, 670]
    assert np.array_equal(np.bincount(read_rows(group[schema.CAPTION_VIDEO])),
                          np.full(1_970, 40))
    assert not read_rows(group[schema.HAS_AUDIO]).any()
    assert set(read_rows(group[schema.CAPTION_TAG]).tolist()) == {"visual"}  # nothing to hear
    assert group.attrs[schema.ATTR_CAPTION_PROTOCOL] == "sentences"


def test_bench_store_like_takes_given_val_and_test_sizes(tmp_path):
    """--val-videos and --test-videos replace --like's scaled split sizes; train takes the
    rest, and the store is still the dataset's (its captions per split, its name)."""
    path = tmp_path / "s"
    done = ok(run_avr("bench", "store", "--like", "vatex", "--videos", "120", "--val-videos",
                      "30", "--test-videos", "5", "--heads", "meanp", "--out", path, *TINY))
    assert "120 videos, 1,200 captions" in done.stdout, done.stdout
    group, _ = open_store(path)
    splits = read_rows(group[schema.VIDEO_SPLIT])
    assert [int((splits == schema.split_code(s)).sum()) for s in schema.SPLITS] == [85, 30, 5]
    assert cache_info(path)["dataset"] == "vatex"
    fails = run_avr("bench", "store", "--like", "vatex", "--videos", "20", "--val-videos", "15",
                    "--test-videos", "5", "--out", tmp_path / "t", *TINY)
    assert_one_line_error(fails, "leaves no train videos beside 15 val and 5 test")


@pytest.mark.parametrize("args, expected", [
    (["--like", "lsmdc", "--captions-per-video", "2"], "--like lsmdc sets the captions of each "
                                                       "split; leave out --captions-per-video"),
    (["--like", "generic"], "'generic' is not one of vatex, msrvtt"),
    (["--captions-per-video", "2"], "give --videos N or --like DATASET"),
    (["--arrays", "frame_embeddings,bogus"], "bogus is not a feature array"),
    (["--heads", "xpool,clip4clip"], "unknown head 'clip4clip'"),
    (["--heads", "xpool", "--arrays", "frame_mask"], "give --arrays or --heads, not both"),
    (["--videos", "0"], "Invalid value for '--videos'"),
])
def test_bench_store_checks_its_options(tmp_path, args, expected):
    base = ["bench", "store", "--out", str(tmp_path / "s")]
    if not {"--videos", "--like", "--captions-per-video"} & set(args):
        base += ["--videos", "10"]
    result = CliRunner().invoke(app, base + args, env={"COLUMNS": "200"})
    assert result.exit_code == 2 and expected in result.stderr, result.output
    assert not (tmp_path / "s").exists()


def trained_pairs(text: str) -> int:
    return int(re.search(r"train tefal: (\d+) pairs", text).group(1))


def figure_names(stdout: str) -> list[str]:
    return [line.split("  ")[0] for line in stdout.splitlines()[1:]]


def test_bench_train_on_a_store_streams_under_a_budget(tmp_path):
    path = tmp_path / "store"
    written = json.loads(ok(run_avr("bench", "store", "--videos", "120", "--out", path,
                                    "--val-videos", "8", "--test-videos", "8", "--chunk-rows",
                                    "8", *TINY, "--json")).stdout)  # --json: the summary alone
    assert (written["videos"], written["out"]) == (120, str(path))
    train = ("bench", "train", "--cache", path, "--head", "tefal", "--device", "cpu",
             "--batch-size", "8")
    streamed = ok(run_avr(*train, "--memory-budget", "0.0013", "--steps", "4")).stdout
    names = figure_names(streamed)  # every caption of a chunk's videos: val streams beside it
    assert names[0].startswith("plan: train streamed, val ")
    assert names[1:3] == ["load (plan, row index, resident arrays)",
                          "stream read alone (no training)"]
    assert "raw sequential read of the same chunk files" in streamed
    assert 0 < trained_pairs(streamed) <= 32  # --steps 4 batches of at most 8
    assert "peak resident memory (RSS) of this process" in streamed
    for what in ("the first step", "each of the 3 steps after it"):  # from getrusage
        assert f"minor page faults, {what}" in streamed
        assert f"CPU time, {what}: system" in streamed
    resident = json.loads(ok(run_avr(*train, "--resident", "int8", "--json")).stdout)
    assert resident["figures"][0]["name"] == "plan: train device, val device"
    text = json.dumps(resident)
    assert "tokens int8" in text and "stream read" not in text
    # the whole epoch: every caption of the 104 train videos (a batch takes one of a video's)
    assert 900 < trained_pairs(text) <= 1040


@pytest.mark.parametrize("args, expected", [
    (("--memory-budget", "1"), "--memory-budget and --resident apply to a store: give --cache"),
    (("--cache", "nowhere"), "nowhere"),
])
def test_bench_train_checks_its_options(tmp_path, args, expected):
    done = run_avr("bench", "train", "--device", "cpu", *args, cwd=tmp_path)
    assert_one_line_error(done, expected)
