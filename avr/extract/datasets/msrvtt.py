"""MSR-VTT (Xu et al., CVPR 2016) as CLIP4Clip and X-Pool read it: the 9k (or 7k) train list
and the 1k-A test set, 12 frames.

Layout: CLIP4Clip's ``msrvtt_data.zip``, in the root or unpacked as ``msrvtt_data/``:
``MSRVTT_data.json`` (``{"videos": [...], "sentences": [{"video_id", "caption", "sen_id"}]}``),
``MSRVTT_train.9k.csv`` or ``MSRVTT_train.7k.csv`` (column ``video_id``; option
``train="9k"|"7k"``) and ``MSRVTT_JSFUSION_test.csv`` (columns key, vid_key, video_id,
sentence). Videos in ``videos/`` (the official zip's ``videos/all/``), CLIP4Clip's
``MSRVTT_Videos/`` or X-Pool's ``vids/``.

Split: the train list and the 1k-A test set. There is no official val set: X-Pool and CLIP4Clip
select on test, avr never does; val is the last ``val_size`` (default 500) train ids in natural
order (video0 < video2 < video10) and train keeps the rest.

Captions: train videos keep all their MSRVTT_data.json sentences (20 each), in sen_id order;
a test video has its one JSFUSION sentence, as CLIP4Clip and X-Pool evaluate.
"""

from __future__ import annotations

import json
from pathlib import Path

from avr.errors import DatasetError
from avr.extract.datasets._common import (VIDEO_DIR, Adapter, Caption, DatasetFacts, Listing,
                                          carve_val, check_disjoint, list_missing_ids,
                                          require_files, videos_layout, whole_number)
from avr.extract.datasets._readers import read_csv_rows, read_json

ANNOTATION_FOLDERS = ("", "msrvtt_data")  # the root, or CLIP4Clip's msrvtt_data.zip in it
VIDEO_FOLDERS = (VIDEO_DIR, "MSRVTT_Videos", "vids")

LAYOUT = """\
in <root>/ or <root>/msrvtt_data/:
  MSRVTT_data.json              {"videos": [...], "sentences": [{"video_id", "caption"}]}
  MSRVTT_train.9k.csv           column video_id (or MSRVTT_train.7k.csv with --option train=7k)
  MSRVTT_JSFUSION_test.csv      columns key, vid_key, video_id, sentence (1k-A test)
  val is the last val_size (--option val_size=500) of the naturally sorted train list
  train videos keep their 20 sentences each; a test video has its one JSFUSION sentence
""" + videos_layout("video_id", VIDEO_FOLDERS) + """
   e.g. <root>/videos/all/video0.mp4 or <root>/MSRVTT_Videos/video0.mp4"""

FACTS = DatasetFacts(frames=12, videos={"train": 8_500, "val": 500, "test": 1_000},
                     captions_per_video={"train": 20, "val": 20, "test": 1},
                     reported_by=("TEFAL", "AVIGATE", "GAIS", "X-Pool", "CLIP4Clip"))


def read_video_id_column(path: Path) -> list[str]:
    ids = []
    for line, row in read_csv_rows(path, ("video_id",)):
        video_id = (row["video_id"] or "").strip()
        if not video_id:
            raise DatasetError(f"{path}:{line}: empty video_id")
        ids.append(video_id)
    return ids


def read_jsfusion_test(path: Path) -> dict[str, str]:
    """video_id -> its one JSFUSION sentence, in file order."""
    sentences: dict[str, str] = {}
    for line, row in read_csv_rows(path, ("video_id", "sentence")):
        video_id, sentence = (row["video_id"] or "").strip(), (row["sentence"] or "").strip()
        if not video_id or not sentence:
            raise DatasetError(f"{path}:{line}: empty video_id or sentence")
        if video_id in sentences:
            raise DatasetError(f"{path}:{line}: video {video_id!r} is listed twice")
        sentences[video_id] = sentence
    return sentences


def read_sentences(path: Path) -> dict[str, list[str]]:
    """video_id -> its MSRVTT_data.json captions, in sen_id order."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("sentences"), list):
        raise DatasetError(f"{path}: expected an object with a \"sentences\" list")
    rows = []
    for i, sentence in enumerate(data["sentences"]):
        if not isinstance(sentence, dict) or not isinstance(sentence.get("video_id"), str) \
                or not isinstance(sentence.get("caption"), str):
            raise DatasetError(f"{path}: sentences[{i}] lacks a \"video_id\" or \"caption\" "
                               f"string: {json.dumps(sentence, ensure_ascii=False)[:80]}")
        sen_id = sentence.get("sen_id", i)
        if not isinstance(sen_id, int):
            raise DatasetError(f"{path}: sentences[{i}] \"sen_id\" must be a whole number, "
                               f"not {sen_id!r}")
        rows.append((sen_id, sentence["video_id"], sentence["caption"]))
    by_video: dict[str, list[str]] = {}
    for _, video_id, caption in sorted(rows, key=lambda r: r[0]):
        by_video.setdefault(video_id, []).append(caption.strip())
    return by_video


def annotation_folder(root: Path) -> Path:
    """The folder of the annotation files: the first of ``ANNOTATION_FOLDERS`` holding
    MSRVTT_data.json (the root when none does, so errors name the root's paths)."""
    return next((root / folder for folder in ANNOTATION_FOLDERS
                 if (root / folder / "MSRVTT_data.json").is_file()), root)


def read(root: Path, train: str = "9k", val_size: int | str = 500) -> Listing:
    if train not in ("9k", "7k"):
        raise DatasetError(f"msrvtt: train must be \"9k\" or \"7k\", not {train!r}")
    val_size = whole_number(val_size, "msrvtt", "val_size")
    folder = annotation_folder(root)
    data_path = folder / "MSRVTT_data.json"
    train_path = folder / f"MSRVTT_train.{train}.csv"
    test_path = folder / "MSRVTT_JSFUSION_test.csv"
    require_files("msrvtt", root, [data_path, train_path, test_path], LAYOUT)

    train_list = read_video_id_column(train_path)
    test_sentences = read_jsfusion_test(test_path)
    train_ids, val_ids = carve_val("msrvtt", train_list, val_size, train_path)
    split_ids = {"train": train_ids, "val": val_ids, "test": list(test_sentences)}
    check_disjoint(split_ids, {"train": train_path, "val": train_path, "test": test_path})

    sentences = read_sentences(data_path)
    list_missing_ids(train_list, sentences, f"sentence in {data_path.name}", train_path)
    captions = {v: [Caption(v, text) for text in sentences[v]] for v in train_list}
    captions.update({v: [Caption(v, text)] for v, text in test_sentences.items()})
    where = folder.relative_to(root)
    notes = [f"annotations in {where}/" if str(where) != "." else "annotations in the root",
             f"val: the last {val_size:,} of the sorted {train_path.name}"]
    return Listing(split_ids, captions, notes)


ADAPTER = Adapter("msrvtt", read, ("train", "val_size"), LAYOUT, FACTS, VIDEO_FOLDERS)
