"""Charades (Sigurdsson et al., ECCV 2016), the official annotation csvs, as TEFAL and AVIGATE
use it for retrieval (ECLIPSE's setup), 32 frames.

Layout: ``Charades_v1_train.csv`` and ``Charades_v1_test.csv`` (columns id, subject, scene,
quality, relevance, verified, script, objects, descriptions, actions, length), in the root or
in ``Charades/`` (the annotation zip unpacked in it). Videos are ``<id>.mp4`` in ``videos/``,
the official ``Charades_v1_480/`` (or ``Charades_v1/``) or X-Pool's ``vids/``.

Split: the official one, 7,985 train and 1,863 test videos (TEFAL's 9,848, one description per
video). There is no val set: val is the last ``val_size`` (default 500) train ids in natural
order, so avr never selects on test.

Captions: one per video, the ``descriptions`` column whole: what an annotator wrote watching the
video (several annotators' descriptions, when present, stay joined by ';'). The ``script``
column, the text the actors were given before filming, is not read. A video whose descriptions
are empty is left out (a warning counts them).
"""

from __future__ import annotations

from pathlib import Path

from avr.errors import DatasetError
from avr.extract.datasets._common import (VIDEO_DIR, Adapter, Caption, DatasetFacts, Listing,
                                          carve_val, check_disjoint, drop_uncaptioned,
                                          require_files, unique_ids, videos_layout,
                                          whole_number)
from avr.extract.datasets._readers import read_csv_rows

FILES = {"train": "Charades_v1_train.csv", "test": "Charades_v1_test.csv"}
ANNOTATION_FOLDERS = ("", "Charades")
CAPTION_COLUMN = "descriptions"
VIDEO_FOLDERS = (VIDEO_DIR, "Charades_v1_480", "Charades_v1", "vids")

LAYOUT = """\
in <root>/ or <root>/Charades/ (the official annotation files):
  Charades_v1_train.csv     train (7,985 videos)
  Charades_v1_test.csv      test (1,863 videos)
  columns id, subject, scene, quality, relevance, verified, script, objects, descriptions,
  actions, length; the caption is the descriptions column, whole: one per video (TEFAL's
  9,848 videos, one description each); the script column is not read
  val is the last val_size (--option val_size=500) of the naturally sorted train list
""" + videos_layout("id", VIDEO_FOLDERS) + """
   e.g. <root>/Charades_v1_480/46GP8.mp4"""

FACTS = DatasetFacts(frames=32, videos={"train": 7_485, "val": 500, "test": 1_863},
                     captions_per_video={"train": 1, "val": 1, "test": 1},
                     reported_by=("TEFAL", "AVIGATE"))


def annotation_folder(root: Path) -> Path:
    """The first of ``ANNOTATION_FOLDERS`` holding the train csv (the root when none does)."""
    return next((root / folder for folder in ANNOTATION_FOLDERS
                 if (root / folder / FILES["train"]).is_file()), root)


def read_descriptions(path: Path, warnings: list[str]) -> tuple[list[str], dict[str, str]]:
    """(ids in file order, id -> its non-empty descriptions)."""
    ids, descriptions = [], {}
    for line, row in read_csv_rows(path, ("id", CAPTION_COLUMN)):
        video_id = (row["id"] or "").strip()
        if not video_id:
            raise DatasetError(f"{path}:{line}: empty id")
        ids.append(video_id)
        text = (row[CAPTION_COLUMN] or "").strip()
        if text:
            descriptions.setdefault(video_id, text)
    ids = unique_ids(ids, path, warnings)
    return drop_uncaptioned(ids, descriptions, "descriptions", path, warnings), descriptions


def read(root: Path, val_size: int | str = 500) -> Listing:
    val_size = whole_number(val_size, "charades", "val_size")
    folder = annotation_folder(root)
    paths = {split: folder / name for split, name in FILES.items()}
    require_files("charades", root, list(paths.values()), LAYOUT)
    warnings: list[str] = []
    train_ids, train_text = read_descriptions(paths["train"], warnings)
    test_ids, test_text = read_descriptions(paths["test"], warnings)
    train_ids, val_ids = carve_val("charades", train_ids, val_size, paths["train"])
    split_ids = {"train": train_ids, "val": val_ids, "test": test_ids}
    check_disjoint(split_ids, {"train": paths["train"], "val": paths["train"],
                               "test": paths["test"]})
    text = {**train_text, **test_text}
    captions = {v: [Caption(v, text[v])] for ids in split_ids.values() for v in ids}
    where = folder.relative_to(root)
    notes = [f"annotations in {where}/" if str(where) != "." else "annotations in the root",
             f"captions: the {CAPTION_COLUMN} column, one per video",
             f"val: the last {val_size:,} of the sorted {FILES['train']}"]
    return Listing(split_ids, captions, notes, warnings)


ADAPTER = Adapter("charades", read, ("val_size",), LAYOUT, FACTS, VIDEO_FOLDERS)
