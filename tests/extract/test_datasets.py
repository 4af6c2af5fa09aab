"""Dataset adapters: tiny on-disk fixtures in each documented layout -> DatasetIndex."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from avr.errors import AvrError, DatasetError
from avr.extract import datasets
from avr.extract.datasets import (DATASETS, Caption, default_root, layout_of, load_dataset)


def touch_videos(root: Path, names: list[str]) -> None:
    """An empty file per name (which may hold folders) under ``root/videos``."""
    (root / "videos").mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / "videos" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "videos" / name).write_bytes(b"")


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def run_avr(*args) -> subprocess.CompletedProcess:
    """The installed `avr` console script, as a user runs it."""
    script = Path(sys.executable).with_name("avr")
    return subprocess.run([str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(Path.cwd()),
                                            "COLUMNS": "200"})


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


# ---- vatex -----------------------------------------------------------------------------

VATEX_TRAIN = ["ytA_000000_000010", "ytB_000005_000015", "ytC_000001_000011"]
VATEX_VAL = ["ytD_000000_000010"]
VATEX_TEST = ["ytE_000000_000010", "ytF_000002_000012"]


def vatex_entry(video_id: str) -> dict:
    return {"videoID": video_id, "enCap": [f"{video_id} english {k}" for k in range(10)],
            "chCap": [f"{video_id} 中文 {k}" for k in range(10)]}


def make_vatex(root: Path, split_form: str = "splits", videos: bool = True) -> Path:
    """The official annotations, the split lists in ``split_form`` and, with ``videos``, an
    (empty) file per listed video."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "vatex_training_v1.0.json").write_text(
        json.dumps([vatex_entry(v) for v in VATEX_TRAIN]))
    (root / "vatex_validation_v1.0.json").write_text(
        json.dumps([vatex_entry(v) for v in VATEX_VAL + VATEX_TEST]))
    lists = {"train": VATEX_TRAIN, "val": VATEX_VAL, "test": VATEX_TEST}
    for split, ids in lists.items():
        if split_form == "splits":
            write_lines(root / "splits" / f"{split}.txt", ids)
        elif split_form == "list":
            write_lines(root / f"{split}_list.txt", ids)
        else:
            hgr = {"train": "trn", "val": "val", "test": "tst"}[split]
            (root / "public_split").mkdir(exist_ok=True)
            np.save(root / "public_split" / f"{hgr}_names.npy", np.array(ids))
    if videos:
        touch_videos(root, [f"{v}.mp4" for v in VATEX_TRAIN + VATEX_VAL + VATEX_TEST])
    return root


def test_vatex_orders_videos_train_val_test_with_ten_english_captions_each(tmp_path):
    index = load_dataset("vatex", make_vatex(tmp_path / "vatex"))
    assert index.video_ids == VATEX_TRAIN + VATEX_VAL + VATEX_TEST
    assert index.video_splits == ["train"] * 3 + ["val"] + ["test"] * 2
    assert len(index.captions) == 10 * 6
    assert [c.video_id for c in index.captions] == [v for v in index.video_ids for _ in range(10)]
    assert index.captions[0] == Caption(VATEX_TRAIN[0], f"{VATEX_TRAIN[0]} english 0", "")
    assert all("中文" not in c.text for c in index.captions)
    assert index.default_frames == 32


@pytest.mark.parametrize("split_form", ["list", "npy"])
def test_vatex_reads_clip4clip_and_hgr_split_forms(tmp_path, split_form):
    index = load_dataset("vatex", make_vatex(tmp_path / "vatex", split_form))
    assert index.video_ids == VATEX_TRAIN + VATEX_VAL + VATEX_TEST
    assert Counter(index.video_splits) == {"train": 3, "val": 1, "test": 2}


def test_vatex_missing_annotation_names_exact_path(tmp_path):
    root = make_vatex(tmp_path / "vatex")
    (root / "vatex_validation_v1.0.json").unlink()
    with pytest.raises(DatasetError, match="vatex_validation_v1.0.json") as error:
        load_dataset("vatex", root)
    assert str(root / "vatex_validation_v1.0.json") in str(error.value)
    assert str(root / "vatex_training_v1.0.json") not in str(error.value)


def test_vatex_empty_root_names_the_split_lists_and_every_caption_source(tmp_path):
    root = tmp_path / "vatex"
    root.mkdir()
    with pytest.raises(DatasetError) as error:
        load_dataset("vatex", root)
    message = str(error.value)
    for name in ("splits/train.txt", "splits/test.txt", "vatex_training_v1.0.json",
                 "vatex_data.json", "vatex_data/vatex_data.json", "ref_captions.json",
                 "annotation/RET/ref_captions.json"):
        assert str(root / name) in message
    assert "one of" in message


def test_vatex_incomplete_split_form_names_the_missing_list(tmp_path):
    root = make_vatex(tmp_path / "vatex", "list")
    (root / "test_list.txt").unlink()
    with pytest.raises(DatasetError, match="test_list.txt") as error:
        load_dataset("vatex", root)
    assert str(root / "train_list.txt") not in str(error.value)


def test_vatex_split_id_without_annotation_is_an_error(tmp_path):
    root = make_vatex(tmp_path / "vatex")
    write_lines(root / "splits" / "test.txt", VATEX_TEST + ["ytZ_000000_000010"])
    with pytest.raises(DatasetError, match="ytZ_000000_000010"):
        load_dataset("vatex", root)


def test_vatex_video_in_two_splits_is_an_error(tmp_path):
    root = make_vatex(tmp_path / "vatex")
    write_lines(root / "splits" / "val.txt", VATEX_VAL + [VATEX_TEST[0]])
    with pytest.raises(DatasetError, match=VATEX_TEST[0]):
        load_dataset("vatex", root)


# ---- video lookup ----------------------------------------------------------------------

def test_video_lookup_finds_any_supported_extension_and_defaults_to_mp4(tmp_path):
    root = make_vatex(tmp_path / "vatex", videos=False)
    touch_videos(root, [f"{VATEX_TRAIN[0]}.webm", f"{VATEX_TRAIN[1]}.MKV",
                        f"{VATEX_VAL[0]}.mov", f"{VATEX_TEST[0]}.txt"])
    index = load_dataset("vatex", root)
    paths = dict(zip(index.video_ids, index.video_paths))
    videos = root / "videos"
    assert paths[VATEX_TRAIN[0]] == videos / f"{VATEX_TRAIN[0]}.webm"
    assert paths[VATEX_TRAIN[1]] == videos / f"{VATEX_TRAIN[1]}.MKV"
    assert paths[VATEX_VAL[0]] == videos / f"{VATEX_VAL[0]}.mov"
    assert paths[VATEX_TEST[0]] == videos / f"{VATEX_TEST[0]}.mp4"  # .txt is not a video
    assert paths[VATEX_TRAIN[2]] == videos / f"{VATEX_TRAIN[2]}.mp4"


def test_video_lookup_prefers_mp4_when_several_extensions_exist(tmp_path):
    root = make_vatex(tmp_path / "vatex", videos=False)
    touch_videos(root, [f"{VATEX_TRAIN[0]}.avi", f"{VATEX_TRAIN[0]}.mp4"])
    index = load_dataset("vatex", root)
    assert index.video_paths[0] == root / "videos" / f"{VATEX_TRAIN[0]}.mp4"


def test_no_video_file_at_all_fails_with_the_expected_paths(tmp_path):
    root = make_vatex(tmp_path / "vatex", videos=False)
    with pytest.raises(DatasetError, match="none of the 6 listed videos has a file") as error:
        load_dataset("vatex", root)
    assert str(root / "videos" / f"{VATEX_TRAIN[0]}.mp4") in str(error.value)
    assert "Expected layout" in str(error.value)


# ---- msrvtt ----------------------------------------------------------------------------

MSRVTT_TRAIN_7K = [f"video{i}" for i in (3, 10, 2, 0, 7, 11)]
MSRVTT_TRAIN_9K = MSRVTT_TRAIN_7K + ["video12", "video1"]
MSRVTT_TEST = ["video9000", "video8000", "video9999"]


def make_msrvtt(dataset_root: Path, folder: str = "", video_folder: str = "") -> Path:
    """CLIP4Clip's msrvtt_data files in ``dataset_root/folder`` and an empty file per listed
    video in ``dataset_root/videos/video_folder``; returns ``dataset_root``."""
    touch_videos(dataset_root, [str(Path(video_folder) / f"{v}.mp4")
                                for v in MSRVTT_TRAIN_9K + MSRVTT_TEST])
    root = dataset_root / folder
    root.mkdir(parents=True, exist_ok=True)
    all_ids = MSRVTT_TRAIN_9K + MSRVTT_TEST
    sentences = []
    for k in range(3):  # three captions per video, interleaved the way the json stores them
        for v in all_ids:
            sentences.append({"video_id": v, "caption": f"{v} caption {k}",
                              "sen_id": len(sentences)})
    (root / "MSRVTT_data.json").write_text(json.dumps(
        {"videos": [{"video_id": v, "split": "train"} for v in all_ids],
         "sentences": sentences}))
    write_csv(root / "MSRVTT_train.9k.csv", ["video_id"], [[v] for v in MSRVTT_TRAIN_9K])
    write_csv(root / "MSRVTT_train.7k.csv", ["video_id"], [[v] for v in MSRVTT_TRAIN_7K])
    write_csv(root / "MSRVTT_JSFUSION_test.csv", ["key", "vid_key", "video_id", "sentence"],
              [[f"ret{i}", f"msr{v[5:]}", v, f"{v} jsfusion sentence"]
               for i, v in enumerate(MSRVTT_TEST)])
    return dataset_root


def test_msrvtt_carves_val_from_the_end_of_the_naturally_sorted_train_list(tmp_path):
    index = load_dataset("msrvtt", make_msrvtt(tmp_path / "msrvtt"), val_size=2)
    train = [v for v, s in zip(index.video_ids, index.video_splits) if s == "train"]
    val = [v for v, s in zip(index.video_ids, index.video_splits) if s == "val"]
    assert train == ["video0", "video1", "video2", "video3", "video7", "video10"]
    assert val == ["video11", "video12"]
    assert index.video_ids[-3:] == MSRVTT_TEST
    assert index.video_splits[-3:] == ["test"] * 3


def test_msrvtt_test_has_one_jsfusion_sentence_per_video(tmp_path):
    index = load_dataset("msrvtt", make_msrvtt(tmp_path / "msrvtt"), val_size=2)
    test_captions = [c for c in index.captions if c.video_id in MSRVTT_TEST]
    assert test_captions == [Caption(v, f"{v} jsfusion sentence") for v in MSRVTT_TEST]


def test_msrvtt_train_videos_keep_all_their_sentences_in_sen_id_order(tmp_path):
    index = load_dataset("msrvtt", make_msrvtt(tmp_path / "msrvtt"), val_size=2)
    assert len(index.captions) == 3 * len(MSRVTT_TRAIN_9K) + len(MSRVTT_TEST)
    assert [c.text for c in index.captions[:3]] == [f"video0 caption {k}" for k in range(3)]
    assert [c.video_id for c in index.captions] == \
        [v for v in index.video_ids for _ in range(1 if v in MSRVTT_TEST else 3)]
    assert index.default_frames == 12


def test_msrvtt_7k_option_reads_the_7k_train_list(tmp_path):
    root = make_msrvtt(tmp_path / "msrvtt")
    nine = load_dataset("msrvtt", root, val_size=1)
    seven = load_dataset("msrvtt", root, train="7k", val_size=1)
    assert Counter(nine.video_splits) == {"train": 7, "val": 1, "test": 3}
    assert Counter(seven.video_splits) == {"train": 5, "val": 1, "test": 3}
    assert set(seven.video_ids) == set(MSRVTT_TRAIN_7K + MSRVTT_TEST)


def test_msrvtt_val_size_changes_only_train_and_val(tmp_path):
    root = make_msrvtt(tmp_path / "msrvtt")
    small, large = (load_dataset("msrvtt", root, val_size=n) for n in (1, 4))
    for index in (small, large):
        assert [v for v, s in zip(index.video_ids, index.video_splits) if s == "test"] == \
            MSRVTT_TEST
        assert not set(MSRVTT_TEST) & {v for v, s in zip(index.video_ids, index.video_splits)
                                       if s == "val"}
    assert Counter(large.video_splits)["val"] == 4


def test_msrvtt_val_size_as_large_as_train_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="val_size"):
        load_dataset("msrvtt", make_msrvtt(tmp_path / "msrvtt"), train="7k", val_size=6)


def test_msrvtt_unknown_train_list_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="7k"):
        load_dataset("msrvtt", make_msrvtt(tmp_path / "msrvtt"), train="8k")


def test_msrvtt_missing_train_list_names_exact_path(tmp_path):
    root = make_msrvtt(tmp_path / "msrvtt")
    (root / "MSRVTT_train.7k.csv").unlink()
    load_dataset("msrvtt", root, val_size=1)  # the 9k list is still there
    with pytest.raises(DatasetError) as error:
        load_dataset("msrvtt", root, train="7k")
    assert str(root / "MSRVTT_train.7k.csv") in str(error.value)


def test_msrvtt_empty_root_names_all_three_files(tmp_path):
    root = tmp_path / "msrvtt"
    with pytest.raises(DatasetError) as error:
        load_dataset("msrvtt", root)
    for name in ("MSRVTT_data.json", "MSRVTT_train.9k.csv", "MSRVTT_JSFUSION_test.csv"):
        assert str(root / name) in str(error.value)


def test_msrvtt_test_csv_without_sentence_column_names_the_file(tmp_path):
    root = make_msrvtt(tmp_path / "msrvtt")
    write_csv(root / "MSRVTT_JSFUSION_test.csv", ["key", "video_id"], [["ret0", "video9000"]])
    with pytest.raises(DatasetError, match=r"MSRVTT_JSFUSION_test.csv:1: .*sentence"):
        load_dataset("msrvtt", root, val_size=1)


def test_msrvtt_test_video_in_train_list_is_an_error(tmp_path):
    root = make_msrvtt(tmp_path / "msrvtt")
    write_csv(root / "MSRVTT_train.9k.csv", ["video_id"],
              [[v] for v in MSRVTT_TRAIN_9K + ["video9000"]])
    with pytest.raises(DatasetError, match="video9000"):
        load_dataset("msrvtt", root, val_size=1)


# ---- generic ---------------------------------------------------------------------------

def generic_rows() -> list[dict]:
    return [
        {"video_id": "clip_b", "caption": "a dog barks", "split": "train", "tag": "audio"},
        {"video_id": "clip_t", "caption": "rain on a roof", "split": "test", "tag": ""},
        {"video_id": "clip_a", "caption": "a man talks", "split": "train", "tag": ""},
        {"video_id": "clip_v", "caption": "a car drives by", "split": "val", "tag": ""},
        {"video_id": "clip_b", "caption": "a puppy on grass", "split": "train", "tag": ""},
    ]


def write_generic_csv(root: Path, rows: list[dict], columns: list[str], videos: bool = True
                      ) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_csv(root / "captions.csv", columns, [[row[c] for c in columns] for row in rows])
    if videos:
        touch_videos(root, [f"{row['video_id']}.mp4" for row in rows])
    return root


def write_generic_jsonl(root: Path, rows: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    touch_videos(root, [f"{row['video_id']}.mp4" for row in rows])
    return root


def test_generic_csv_groups_captions_by_video_in_split_order(tmp_path):
    root = write_generic_csv(tmp_path / "g", generic_rows(),
                             ["video_id", "caption", "split", "tag"], videos=False)
    touch_videos(root, ["clip_b.mp4", "clip_a.webm"])
    index = load_dataset("generic", root)
    assert index.video_ids == ["clip_b", "clip_a", "clip_v", "clip_t"]
    assert index.video_splits == ["train", "train", "val", "test"]
    assert index.captions == [Caption("clip_b", "a dog barks", "audio"),
                              Caption("clip_b", "a puppy on grass"),
                              Caption("clip_a", "a man talks"),
                              Caption("clip_v", "a car drives by"),
                              Caption("clip_t", "rain on a roof")]
    assert index.video_paths[1] == root / "videos" / "clip_a.webm"
    assert index.default_frames == 12


def test_generic_jsonl_matches_csv(tmp_path):
    from_csv = load_dataset("generic", write_generic_csv(
        tmp_path / "c", generic_rows(), ["video_id", "caption", "split", "tag"]))
    from_jsonl = load_dataset("generic", write_generic_jsonl(tmp_path / "j", generic_rows()))
    assert from_jsonl.video_ids == from_csv.video_ids
    assert from_jsonl.video_splits == from_csv.video_splits
    assert from_jsonl.captions == from_csv.captions


def test_generic_without_split_column_splits_80_10_10_by_video_with_seed(tmp_path):
    rows = [{"video_id": f"v{i:02d}", "caption": f"caption {i} {k}"}
            for i in range(20) for k in range(2)]
    root = write_generic_csv(tmp_path / "g", rows, ["video_id", "caption"])
    index = load_dataset("generic", root)
    assert Counter(index.video_splits) == {"train": 16, "val": 2, "test": 2}
    assert len(index.captions) == 40
    assert load_dataset("generic", root).video_ids == index.video_ids
    assert load_dataset("generic", root, seed=1).video_ids != index.video_ids
    for video_id in index.video_ids:  # every caption follows its video
        assert [c.video_id for c in index.captions].count(video_id) == 2


def test_generic_seeded_split_keeps_one_val_and_one_test_video_when_tiny(tmp_path):
    rows = [{"video_id": f"v{i}", "caption": f"caption {i}"} for i in range(3)]
    index = load_dataset("generic", write_generic_jsonl(tmp_path / "g", rows))
    assert sorted(index.video_splits) == ["test", "train", "val"]


def test_generic_missing_captions_file_names_both_accepted_paths(tmp_path):
    root = tmp_path / "g"
    with pytest.raises(DatasetError) as error:
        load_dataset("generic", root)
    assert str(root / "captions.csv") in str(error.value)
    assert str(root / "captions.jsonl") in str(error.value)


@pytest.mark.parametrize("bad, message", [
    ({"caption": "   "}, "empty caption"),
    ({"split": "holdout"}, "unknown split 'holdout'"),
    ({"video_id": ""}, "empty video_id"),
    ({"split": "test"}, "is in split 'test' here but 'train' earlier"),
])
def test_generic_csv_bad_row_names_file_and_line(tmp_path, bad, message):
    rows = generic_rows()
    rows[4] = {**rows[4], **bad}  # data row 5 = line 6 of the file
    root = write_generic_csv(tmp_path / "g", rows, ["video_id", "caption", "split", "tag"])
    with pytest.raises(DatasetError, match=message) as error:
        load_dataset("generic", root)
    assert f"{root / 'captions.csv'}:6:" in str(error.value)


def test_generic_csv_missing_caption_column_names_file(tmp_path):
    root = write_generic_csv(tmp_path / "g", generic_rows(), ["video_id", "split"])
    with pytest.raises(DatasetError, match="missing column.*caption") as error:
        load_dataset("generic", root)
    assert f"{root / 'captions.csv'}:1:" in str(error.value)


@pytest.mark.parametrize("line_text, message", [
    ('{"video_id": "clip_x", "split": "train"}', "missing key 'caption'"),
    ('{"video_id": "clip_x", "caption": "x", ', "not valid JSON"),
    ('{"video_id": "clip_x", "caption": "x"}', "split.*every line or none"),
])
def test_generic_jsonl_bad_line_names_file_and_line(tmp_path, line_text, message):
    root = write_generic_jsonl(tmp_path / "g", generic_rows()[:2])
    with open(root / "captions.jsonl", "a") as f:
        f.write("\n" + line_text + "\n")  # a blank line 3 is skipped; the bad one is line 4
    with pytest.raises(DatasetError, match=message) as error:
        load_dataset("generic", root)
    assert f"{root / 'captions.jsonl'}:4:" in str(error.value)


def test_generic_with_both_csv_and_jsonl_is_ambiguous(tmp_path):
    root = write_generic_jsonl(tmp_path / "g", generic_rows())
    write_generic_csv(root, generic_rows(), ["video_id", "caption"])
    with pytest.raises(DatasetError, match="keep one"):
        load_dataset("generic", root)


# ---- demo ------------------------------------------------------------------------------

@pytest.fixture
def fake_demo_generator(monkeypatch):
    """Stand-in for avr.extract.demo_data: writes a tagged captions.csv and records calls."""
    calls = []

    def generate_demo(root, seed=0):
        calls.append((Path(root), seed))
        rows = [{"video_id": f"demo{i}", "caption": f"scene {i}",
                 "split": ("train", "train", "val", "test")[i], "tag": "audio" if i else ""}
                for i in range(4)]
        write_generic_csv(Path(root), rows, ["video_id", "caption", "split", "tag"])
        touch_videos(Path(root), [f"demo{i}.mp4" for i in range(4)])

    module = types.ModuleType("avr.extract.demo_data")
    module.generate_demo = generate_demo
    monkeypatch.setitem(sys.modules, "avr.extract.demo_data", module)
    return calls


def test_demo_generates_when_absent_and_keeps_tags(tmp_path, fake_demo_generator):
    root = tmp_path / "demo"
    index = load_dataset("demo", root, seed=3)
    assert fake_demo_generator == [(root, 3)]
    assert index.name == "demo"
    assert index.video_splits == ["train", "train", "val", "test"]
    assert [c.tag for c in index.captions] == ["", "audio", "audio", "audio"]
    assert index.video_paths == [root / "videos" / f"demo{i}.mp4" for i in range(4)]


def test_demo_reuses_existing_captions(tmp_path, fake_demo_generator):
    root = tmp_path / "demo"
    first = load_dataset("demo", root)
    second = load_dataset("demo", root)
    assert len(fake_demo_generator) == 1
    assert second.video_ids == first.video_ids


# ---- registry --------------------------------------------------------------------------

def test_unknown_dataset_lists_choices(tmp_path):
    with pytest.raises(DatasetError, match="vatex, msrvtt, generic, demo"):
        load_dataset("kinetics", tmp_path)


def test_unknown_option_names_the_accepted_ones(tmp_path):
    with pytest.raises(DatasetError, match="val_size"):
        load_dataset("msrvtt", make_msrvtt(tmp_path / "msrvtt"), frames=8)


def test_seed_is_accepted_by_datasets_with_fixed_splits(tmp_path):
    root = make_msrvtt(tmp_path / "msrvtt")
    assert load_dataset("msrvtt", root, seed=5, val_size=1).video_ids == \
        load_dataset("msrvtt", root, val_size=1).video_ids


def test_msrvtt_val_size_given_as_text_is_read_as_a_number(tmp_path):
    index = load_dataset("msrvtt", make_msrvtt(tmp_path / "msrvtt"), val_size="3")
    assert Counter(index.video_splits)["val"] == 3


def test_default_root_is_data_slash_name():
    assert [default_root(name) for name in DATASETS] == \
        [Path("data") / name for name in DATASETS]


def test_every_layout_names_the_video_folder():
    for name in DATASETS:
        assert "<root>/videos/" in layout_of(name)


def test_missing_file_error_shows_layout(tmp_path):
    with pytest.raises(DatasetError, match="Expected layout") as error:
        load_dataset("msrvtt", tmp_path / "nothing")
    assert "MSRVTT_JSFUSION_test.csv" in str(error.value)


# ---- the layouts the CLIP4Clip family ships --------------------------------------------

def split_of(index, split: str) -> list[str]:
    return [v for v, s in zip(index.video_ids, index.video_splits) if s == split]


def test_vatex_reads_clip2video_lists_and_vatex_data_json_under_vatex_data(tmp_path):
    root = tmp_path / "vatex"
    for split, ids in {"train": VATEX_TRAIN, "val": VATEX_VAL, "test": VATEX_TEST}.items():
        write_lines(root / "vatex_data" / f"{split}_list.txt", ids)
    (root / "vatex_data" / "vatex_data.json").write_text(json.dumps(
        {v: {"enCap": [f"{v} english {k}" for k in range(10)], "chCap": ["中文"] * 10}
         for v in VATEX_TRAIN + VATEX_VAL + VATEX_TEST}))
    touch_videos(root, [f"{v}.mp4" for v in VATEX_TRAIN + VATEX_VAL + VATEX_TEST])
    index = load_dataset("vatex", root)
    assert index.video_ids == VATEX_TRAIN + VATEX_VAL + VATEX_TEST
    assert index.captions[0] == Caption(VATEX_TRAIN[0], f"{VATEX_TRAIN[0]} english 0")
    assert len(index.captions) == 60 and all("中文" not in c.text for c in index.captions)
    assert "captions from vatex_data/vatex_data.json" in index.listing_report()


@pytest.mark.parametrize("captions_at", ["ref_captions.json", "annotation/RET/ref_captions.json"])
def test_vatex_with_only_train_and_test_lists_carves_val_from_the_end_of_train(tmp_path,
                                                                               captions_at):
    root = tmp_path / "vatex"
    write_lines(root / "train_list.txt", VATEX_TRAIN)
    write_lines(root / "test_list.txt", VATEX_TEST)
    (root / captions_at).parent.mkdir(parents=True, exist_ok=True)
    (root / captions_at).write_text(json.dumps(
        {v: [f"{v} caption {k}" for k in range(2)] for v in VATEX_TRAIN + VATEX_TEST}))
    touch_videos(root, [f"{v}.mp4" for v in VATEX_TRAIN + VATEX_TEST])
    index = load_dataset("vatex", root, val_size="1")
    assert split_of(index, "val") == ["ytC_000001_000011"]  # last of the sorted train list
    assert split_of(index, "train") == ["ytA_000000_000010", "ytB_000005_000015"]
    assert split_of(index, "test") == VATEX_TEST  # never touched
    assert [c.text for c in index.captions[:2]] == [f"{VATEX_TRAIN[0]} caption {k}"
                                                   for k in range(2)]
    assert "val: the last 1 of the sorted train list" in index.listing_report()


def test_vatex_val_size_with_a_val_list_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="val_size applies only"):
        load_dataset("vatex", make_vatex(tmp_path / "vatex"), val_size=1)


def test_vatex_without_a_val_list_defaults_to_the_hgr_val_size(tmp_path):
    root = make_vatex(tmp_path / "vatex", "list")
    (root / "val_list.txt").unlink()
    with pytest.raises(DatasetError, match=r"val_size must be in \[0, 3\).*not 1500"):
        load_dataset("vatex", root)


@pytest.mark.parametrize("video_id, youtube", [
    ("Ptf_2VRj-V0_000122_000132", "Ptf_2VRj-V0"),
    ("OMK0OJ4f_TI_000000_000010", "OMK0OJ4f_TI"),
    ("_-_-_-_-_-__000001_000011", "_-_-_-_-_-_"),
    ("--abcdefghi_000010_000020", "--abcdefghi"),
    ("video0", None),
    ("short_000000_000010", None),
    ("Ptf_2VRj-V0_122_132", None),
])
def test_youtube_id_of_a_vatex_video_id_is_its_first_eleven_characters(video_id, youtube):
    assert datasets.youtube_id(video_id) == youtube


def test_vatex_videos_are_found_nested_by_full_id_or_by_bare_youtube_id(tmp_path):
    ids = ["Ptf_2VRj-V0_000122_000132", "OMK0OJ4f_TI_000000_000010",
           "sf2PPeXQrUA_000000_000010", "sf2PPeXQrUA_000020_000030", "nM_ySHgMPW0_000000_000010"]
    root = tmp_path / "vatex"
    write_lines(root / "splits" / "train.txt", ids[:3])
    write_lines(root / "splits" / "val.txt", ids[3:4])
    write_lines(root / "splits" / "test.txt", ids[4:])
    (root / "ref_captions.json").write_text(json.dumps({v: [f"{v} caption"] for v in ids}))
    touch_videos(root, ["part1/Ptf_2VRj-V0.mp4",  # bare YouTube id
                        "part2/deeper/OMK0OJ4f_TI_000000_000010.webm",  # full id, nested
                        "sf2PPeXQrUA.mp4",  # shared by two listed clips: cannot tell which
                        "nM_ySHgMPW0_000000_000010.mkv"])
    index = load_dataset("vatex", root)
    paths = dict(zip(index.video_ids, index.video_paths))
    assert paths[ids[0]] == root / "videos" / "part1" / "Ptf_2VRj-V0.mp4"
    assert paths[ids[1]] == root / "videos" / "part2" / "deeper" / f"{ids[1]}.webm"
    assert paths[ids[4]] == root / "videos" / f"{ids[4]}.mkv"
    assert index.missing_videos == [ids[2], ids[3]]
    assert paths[ids[2]] == root / "videos" / f"{ids[2]}.mp4"  # the expected path


def test_msrvtt_reads_msrvtt_data_folder_and_videos_all(tmp_path):
    root = make_msrvtt(tmp_path / "MSRVTT", folder="msrvtt_data", video_folder="all")
    index = load_dataset("msrvtt", root, val_size=2)
    assert index.missing_videos == []
    assert index.video_paths[0] == root / "videos" / "all" / "video0.mp4"
    assert split_of(index, "test") == MSRVTT_TEST
    assert "annotations in msrvtt_data/" in index.listing_report()


@pytest.mark.parametrize("folder", ["MSRVTT_Videos", "vids", ""])
def test_msrvtt_videos_are_found_in_the_folders_releases_use(tmp_path, folder):
    """CLIP4Clip's MSRVTT_Videos/, X-Pool's vids/, or the root itself, as they come."""
    root = make_msrvtt(tmp_path / "msrvtt")
    (root / folder).mkdir(exist_ok=True)
    for path in list((root / "videos").iterdir()):
        path.rename(root / folder / path.name)
    (root / "videos").rmdir()
    index = load_dataset("msrvtt", root, val_size=2)
    assert index.missing_videos == []
    assert index.video_dir == root / folder
    assert f"with a file under {index.video_dir}" in index.listing_report()


def test_no_listed_video_in_any_folder_names_every_folder_tried(tmp_path):
    root = make_msrvtt(tmp_path / "msrvtt")
    for path in (root / "videos").iterdir():
        path.rename(path.with_name(f"other_{path.name}"))
    with pytest.raises(DatasetError, match="none of the 11 listed videos") as error:
        load_dataset("msrvtt", root, val_size=2)
    message = str(error.value)
    for tried in (f"{root / 'videos'} (no listed video)", f"{root / 'MSRVTT_Videos'} (absent)",
                  f"{root / 'vids'} (absent)", f"{root} (no listed video)", "--videos-dir"):
        assert tried in message, tried


def test_videos_dir_is_relative_to_the_root_or_absolute_and_must_exist(tmp_path):
    root = make_msrvtt(tmp_path / "msrvtt")
    (root / "videos").rename(tmp_path / "clips")
    assert load_dataset("msrvtt", root, val_size=2, videos_dir=tmp_path / "clips").video_dir \
        == tmp_path / "clips"
    (tmp_path / "clips").rename(root / "my clips")
    assert not load_dataset("msrvtt", root, val_size=2, videos_dir="my clips").missing_videos
    with pytest.raises(DatasetError, match=r"--videos-dir nowhere: no such folder"):
        load_dataset("msrvtt", root, val_size=2, videos_dir="nowhere")


def test_extract_reads_videos_from_x_pools_vids_folder(tmp_path):
    """The folder name a new user has, not renamed: `avr extract` lists every video."""
    root = make_msrvtt(tmp_path / "msrvtt")
    (root / "videos").rename(root / "vids")
    done = run_avr("extract", "--dataset", "msrvtt", "--root", root, "--out", tmp_path / "c",
                   "--option", "val_size=2", "--backbones", "tiny", "--device", "cpu",
                   "--workers", "0")
    printed = " ".join(done.stdout.split())
    assert f"11 videos listed (train 6, val 2, test 3), 11 with a file under {root / 'vids'}" \
        in printed


def test_listing_reports_how_many_videos_have_a_file_and_warns_above_ten_percent(tmp_path):
    root = make_msrvtt(tmp_path / "msrvtt")
    (root / "videos" / "video12.mp4").unlink()
    index = load_dataset("msrvtt", root, val_size=2)
    report = index.listing_report()
    assert "11 videos listed (train 6, val 2, test 3), 10 with a file" in report
    assert "1 without (e.g. video12)" in report
    assert index.missing_warning() is None  # 1 of 11 is under 10%
    (root / "videos" / "video1.mp4").unlink()
    warning = load_dataset("msrvtt", root, val_size=2).missing_warning()
    assert warning is not None and "18% of the listed msrvtt videos have no file" in warning
    assert str(root / "videos" / "video1.mp4") in warning


def test_extract_of_a_missing_dataset_prints_the_expected_paths_without_a_traceback(tmp_path):
    done = run_avr("extract", "--dataset", "msrvtt", "--root", tmp_path / "empty")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert str(tmp_path / "empty" / "MSRVTT_data.json") in done.stderr


def test_show_layout_documents_every_accepted_layout():
    done = run_avr("extract", "--dataset", "vatex", "--show-layout")
    assert done.returncode == 0
    for text in ("vatex_training_v1.0.json", "vatex_data/vatex_data.json", "ref_captions.json",
                 "annotation/RET/", "vatex_data/train_list.txt", "trn_names.npy", "val_size",
                 "YouTube id", "any folder under videos/"):
        assert text in done.stdout, text
    done = run_avr("extract", "--dataset", "msrvtt", "--show-layout")
    assert "msrvtt_data/" in done.stdout and "videos/all/" in done.stdout


# ---- files that are not what they claim ------------------------------------------------

LATIN1_CAFE = "un café au bord de l'eau".encode("latin-1")


def test_a_latin1_captions_csv_names_the_file_the_line_and_the_fix(tmp_path):
    root = tmp_path / "g"
    touch_videos(root, ["a.mp4", "b.mp4"])
    (root / "captions.csv").write_bytes(b"video_id,caption\na,a dog barks\nb," + LATIN1_CAFE
                                        + b"\n")
    done = run_avr("extract", "--dataset", "generic", "--root", root, "--out", tmp_path / "c")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert f"{root / 'captions.csv'}:3: not UTF-8 (byte 0xe9 at column 9" in lines[0]
    assert "iconv -f latin1 -t utf-8" in lines[0]


@pytest.mark.parametrize("name", ["captions.jsonl", "vatex_training_v1.0.json",
                                  "splits/train.txt", "ref_captions.json"])
def test_every_text_reader_names_a_non_utf8_file_and_its_line(tmp_path, name):
    if name == "captions.jsonl":
        root = write_generic_jsonl(tmp_path / "g", generic_rows())
        dataset = "generic"
    else:
        root = make_vatex(tmp_path / "vatex")
        dataset = "vatex"
        if name == "ref_captions.json":
            for official in datasets.VATEX_ANNOTATIONS:
                (root / official).unlink()
    path = root / name
    first_line = path.read_bytes().splitlines()[0] if path.exists() else b"{}"
    path.write_bytes(first_line + b"\n" + LATIN1_CAFE + b"\n")
    with pytest.raises(AvrError, match=f"{re.escape(str(path))}:2: not UTF-8") as error:
        load_dataset(dataset, root)
    assert "iconv" in str(error.value)


def test_malformed_official_json_names_the_line(tmp_path):
    root = make_vatex(tmp_path / "vatex")
    (root / "vatex_training_v1.0.json").write_text('[\n{"videoID": "ytA_000000_000010",\n}]')
    with pytest.raises(DatasetError, match=r"vatex_training_v1.0.json:3: not valid JSON"):
        load_dataset("vatex", root)


@pytest.mark.parametrize("entry, message", [
    ({"videoID": "ytA_000000_000010", "enCap": "one caption, not a list"},
     r"entry 0 \(ytA_000000_000010\) \"enCap\": expected a non-empty list of caption strings"),
    ({"videoID": "ytA_000000_000010", "enCap": ["fine", 7]}, "list of caption strings"),
    ({"videoID": 12, "enCap": ["x"]}, "entry 0 lacks a \"videoID\" string"),
])
def test_official_json_entry_of_the_wrong_type_is_named(tmp_path, entry, message):
    root = make_vatex(tmp_path / "vatex")
    (root / "vatex_training_v1.0.json").write_text(json.dumps([entry]))
    with pytest.raises(DatasetError, match=message):
        load_dataset("vatex", root)


@pytest.mark.parametrize("name, content, message", [
    ("vatex_data.json", {"ytA_000000_000010": ["a caption"]}, r'expected \{"enCap": \[...\]\}'),
    ("vatex_data.json", ["not", "an", "object"], "expected a JSON object"),
    ("ref_captions.json", {"ytA_000000_000010": "a caption"}, "list of caption strings"),
])
def test_keyed_caption_files_of_the_wrong_shape_are_named(tmp_path, name, content, message):
    root = make_vatex(tmp_path / "vatex", "list")
    for official in datasets.VATEX_ANNOTATIONS:
        (root / official).unlink()
    (root / name).write_text(json.dumps(content))
    with pytest.raises(DatasetError, match=message) as error:
        load_dataset("vatex", root)
    assert str(root / name) in str(error.value)


@pytest.mark.parametrize("array, message", [
    (np.arange(3), "holds int64 values, not videoID strings"),
    (np.array(["ytA_000000_000010", None], dtype=object), "saved without pickle"),
])
def test_npy_split_list_of_the_wrong_kind_is_named(tmp_path, array, message):
    root = make_vatex(tmp_path / "vatex", "npy")
    np.save(root / "public_split" / "trn_names.npy", array, allow_pickle=True)
    with pytest.raises(DatasetError, match=message) as error:
        load_dataset("vatex", root)
    assert "trn_names.npy" in str(error.value)


def test_npy_split_list_of_bytes_is_read_as_text(tmp_path):
    root = make_vatex(tmp_path / "vatex", "npy")
    np.save(root / "public_split" / "trn_names.npy", np.array(VATEX_TRAIN, dtype="S"))
    assert split_of(load_dataset("vatex", root), "train") == VATEX_TRAIN


def test_csv_row_with_an_unquoted_comma_names_the_line(tmp_path):
    root = tmp_path / "g"
    touch_videos(root, ["a.mp4"])
    (root / "captions.csv").write_text("video_id,caption\na,a dog, barking\n")
    with pytest.raises(DatasetError, match=r"captions.csv:2: 3 fields for a header of 2; "
                                           r"quote a field that holds a comma"):
        load_dataset("generic", root)


@pytest.mark.parametrize("row, message", [
    ('b,"a dog barks', "unexpected end of data"),
    ('b,"a dog" barks', "',' expected after '\"'"),
])
def test_csv_row_with_a_broken_quote_names_its_line(tmp_path, row, message):
    root = tmp_path / "g"
    touch_videos(root, ["a.mp4", "b.mp4"])
    (root / "captions.csv").write_text(f"video_id,caption\na,fine\n{row}\nc,more\n")
    with pytest.raises(DatasetError, match=rf"captions.csv:3: not valid CSV \({message}\)"):
        load_dataset("generic", root)


def test_jsonl_value_of_the_wrong_type_names_the_line(tmp_path):
    root = write_generic_jsonl(tmp_path / "g", [
        {"video_id": "a", "caption": "fine"}, {"video_id": "b", "caption": ["a", "list"]}])
    with pytest.raises(DatasetError, match=r"captions.jsonl:2: caption must be text"):
        load_dataset("generic", root)


def test_msrvtt_sentence_of_the_wrong_type_is_named(tmp_path):
    root = make_msrvtt(tmp_path / "msrvtt")
    data = json.loads((root / "MSRVTT_data.json").read_text())
    data["sentences"][4]["caption"] = None
    (root / "MSRVTT_data.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"sentences\[4\] lacks a \"video_id\" or \"caption\""):
        load_dataset("msrvtt", root, val_size=1)
