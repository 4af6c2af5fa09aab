"""VATEX (Wang et al., ICCV 2019): English captions, the HGR split, 32 frames.

Layout: the official ``vatex_training_v1.0.json`` + ``vatex_validation_v1.0.json`` (lists of
``{"videoID": "ytid_000010_000020", "enCap": [10 captions], "chCap": ...}``), or CLIP2Video's
``vatex_data.json`` (``{videoID: {"enCap": [...]}}``), or HGR's and TS2-Net's
``ref_captions.json`` (``{videoID: [captions]}``), the first present. Only English captions are
read. Videos are named by videoID, or by the bare 11-character YouTube id unless two listed
clips share it.

Split: the HGR split (25,991 train / 1,500 val / 1,500 test, val and test drawn from the
official validation set) as id lists, in the first form present: ``splits/{train,val,test}.txt``,
the CLIP4Clip family's ``{train,val,test}_list.txt`` (TS2-Net, DRL), CLIP2Video's
``vatex_data/{train,val,test}_list.txt`` or HGR's ``public_split/{trn,val,tst}_names.npy``. A
release with only train and test lists gets val from the end of train (option ``val_size``,
default 1,500): avr never selects on test.

Captions: every English caption of a video is a query (10 per video).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from avr.errors import DatasetError
from avr.extract.datasets._common import (Adapter, Caption, DatasetFacts, Listing,
                                          check_disjoint, first_present, list_missing_ids,
                                          missing_files_error, val_from_list_or_train,
                                          videos_layout)
from avr.extract.datasets._readers import caption_strings, read_id_list, read_json

ANNOTATIONS = ("vatex_training_v1.0.json", "vatex_validation_v1.0.json")
DATA_JSON = ("vatex_data.json", "vatex_data/vatex_data.json")
REF_CAPTIONS = ("ref_captions.json", "vatex_data/ref_captions.json",
                "annotation/RET/ref_captions.json")
# split-list forms (split -> path under root); the first form with any file present is used
SPLIT_FORMS = (
    {"train": "splits/train.txt", "val": "splits/val.txt", "test": "splits/test.txt"},
    {"train": "train_list.txt", "val": "val_list.txt", "test": "test_list.txt"},
    {"train": "vatex_data/train_list.txt", "val": "vatex_data/val_list.txt",
     "test": "vatex_data/test_list.txt"},
    {"train": "public_split/trn_names.npy", "val": "public_split/val_names.npy",
     "test": "public_split/tst_names.npy"},
)
VAL_SIZE = 1500  # the HGR val split's size, when a release has no val list
# A VATEX videoID is <YouTube id>_<start>_<end>, start and end in seconds, six digits each.
# YouTube ids are 11 characters of [A-Za-z0-9_-]: they may hold '_' themselves, so the id is
# matched whole, never split at '_'.
VIDEO_ID = re.compile(r"(?P<youtube>[A-Za-z0-9_-]{11})_(?P<start>\d{6})_(?P<end>\d{6})")

LAYOUT = """\
captions, the first of:
  <root>/vatex_training_v1.0.json + vatex_validation_v1.0.json   official ([{"videoID", "enCap"}])
  <root>/vatex_data.json or <root>/vatex_data/vatex_data.json     {videoID: {"enCap": [...]}}
  <root>/ref_captions.json, <root>/vatex_data/ or <root>/annotation/RET/   {videoID: [...]}
  every English caption is a query (10 per video)
split lists (HGR split: 25,991 / 1,500 / 1,500), the first form present:
  <root>/splits/train.txt, val.txt, test.txt          one videoID per line
  <root>/train_list.txt, val_list.txt, test_list.txt
  <root>/vatex_data/train_list.txt, val_list.txt, test_list.txt
  <root>/public_split/trn_names.npy, val_names.npy, tst_names.npy
  without a val list, val is the last val_size (--option val_size=1500) of the sorted train list
""" + videos_layout("videoID") + """
   or named by the bare 11-character YouTube id (the id before _<start>_<end>): the clip itself,
   not the whole YouTube video"""

FACTS = DatasetFacts(frames=32, videos={"train": 25_991, "val": 1_500, "test": 1_500},
                     captions_per_video={"train": 10, "val": 10, "test": 10},
                     reported_by=("TEFAL", "AVIGATE", "GAIS"))


def youtube_id(video_id: str) -> str | None:
    """The YouTube id of a VATEX videoID (``Ptf_2VRj-V0_000122_000132`` -> ``Ptf_2VRj-V0``),
    None when the id is not of that form."""
    match = VIDEO_ID.fullmatch(video_id)
    return match["youtube"] if match else None


def split_files(root: Path) -> dict[str, Path]:
    """The split lists of the first form with any file present (the first form if none)."""
    for form in SPLIT_FORMS:
        paths = {split: root / rel for split, rel in form.items()}
        if any(p.is_file() for p in paths.values()):
            return paths
    return {split: root / rel for split, rel in SPLIT_FORMS[0].items()}


def english_captions(path: Path) -> dict[str, list[str]]:
    """The official annotations: a list of ``{"videoID", "enCap", "chCap"}``."""
    entries = read_json(path)
    if not isinstance(entries, list):
        raise DatasetError(f"{path}: expected a JSON list of {{\"videoID\", \"enCap\"}} objects")
    captions: dict[str, list[str]] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("videoID"), str):
            raise DatasetError(f"{path}: entry {i} lacks a \"videoID\" string")
        captions[entry["videoID"]] = caption_strings(
            entry.get("enCap"), f"{path}: entry {i} ({entry['videoID']}) \"enCap\"")
    return captions


def keyed_captions(path: Path, english_key: str | None) -> dict[str, list[str]]:
    """``{videoID: {"enCap": [...]}}`` (vatex_data.json, ``english_key="enCap"``) or
    ``{videoID: [...]}`` (ref_captions.json, ``english_key=None``)."""
    data = read_json(path)
    if not isinstance(data, dict):
        shape = '{"videoID": {"enCap": [...]}}' if english_key else '{"videoID": [...]}'
        raise DatasetError(f"{path}: expected a JSON object {shape}")
    captions = {}
    for video_id, value in data.items():
        if english_key is not None:
            if not isinstance(value, dict):
                raise DatasetError(f"{path}: {video_id}: expected {{\"{english_key}\": [...]}}")
            value = value.get(english_key)
        captions[video_id] = caption_strings(value, f"{path}: {video_id}")
    return captions


def caption_files(root: Path) -> list[Path]:
    """The files of the first caption source present: both official annotation files (when
    either is there), or vatex_data.json, or ref_captions.json; [] when none is."""
    official = [root / name for name in ANNOTATIONS]
    if any(path.is_file() for path in official):
        return official
    for names in (DATA_JSON, REF_CAPTIONS):
        path = first_present([root / name for name in names])
        if path is not None:
            return [path]
    return []


def read_captions(files: list[Path]) -> dict[str, list[str]]:
    """English captions of every videoID in the caption source ``files``."""
    if files[0].name in ANNOTATIONS:
        english: dict[str, list[str]] = {}
        for path in files:
            english.update(english_captions(path))
        return english
    return keyed_captions(files[0], "enCap" if files[0].name == "vatex_data.json" else None)


def youtube_alias(video_ids: list[str]) -> Callable[[str], str | None]:
    """A clip's file may be named by its bare YouTube id, unless another listed clip shares
    that YouTube video (the file could then be either clip)."""
    shared = Counter(youtube_id(v) for v in video_ids)

    def alias(video_id: str) -> str | None:
        youtube = youtube_id(video_id)
        return youtube if youtube is not None and shared[youtube] == 1 else None

    return alias


def read(root: Path, val_size: int | str | None = None) -> Listing:
    lists = split_files(root)
    captions_from = caption_files(root)
    missing = [path for path in [*captions_from, lists["train"], lists["test"]]
               if not path.is_file()]
    if missing or not captions_from:
        choices = [root / name for name in (*ANNOTATIONS, *DATA_JSON, *REF_CAPTIONS)]
        raise missing_files_error("vatex", root, missing, LAYOUT,
                                  any_of=[] if captions_from else choices)
    english = read_captions(captions_from)
    split_ids = {split: read_id_list(path) for split, path in lists.items() if path.is_file()}
    sources = {**lists}
    notes = [f"captions from {' + '.join(str(p.relative_to(root)) for p in captions_from)}",
             "split lists " + ", ".join(str(p.relative_to(root)) for p in lists.values()
                                        if p.is_file())]
    carved = val_from_list_or_train("vatex", split_ids, sources, lists, val_size, VAL_SIZE)
    notes += [carved] if carved else []
    check_disjoint(split_ids, sources)
    for split, ids in split_ids.items():
        list_missing_ids(ids, english, "captions in " + " or ".join(
            p.name for p in captions_from), sources[split])
    captions = {v: [Caption(v, text) for text in english[v]]
                for ids in split_ids.values() for v in ids}
    video_ids = [v for ids in split_ids.values() for v in ids]
    return Listing(split_ids, captions, notes, alias=youtube_alias(video_ids))


ADAPTER = Adapter("vatex", read, ("val_size",), LAYOUT, FACTS)
