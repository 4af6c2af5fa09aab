"""LSMDC (Rohrbach et al., IJCV 2017), the LSMDC 2016 retrieval files as MPII ships them and
X-Pool and CLIP4Clip read them, 12 frames.

Layout: three tab-separated files without a header, one line per sentence with 6 fields (clip
id, start aligned, end aligned, start extracted, end extracted, sentence):
``LSMDC16_annos_training.csv``, ``LSMDC16_annos_val.csv`` and the 1,000 test clips of
``LSMDC16_challenge_1000_publictect.csv`` (the release's spelling). Clips are ``.avi`` files
named by clip id, nested in one folder per movie (``0001_American_Beauty/0001_American_Beauty_
00.00.51.926-00.00.54.129.avi``), found anywhere under ``videos/``, CLIP4Clip's
``LSMDC_Videos/`` or X-Pool's ``vids/``.

Split: X-Pool's, one per file: 101,079 train / 7,408 val / 1,000 test clips (TEFAL reports
test and, as a larger test, val).

Captions: one per clip. A clip id may carry several sentences in the train and val files; it
keeps its last, as X-Pool does (a warning counts them); option ``captions=all`` keeps every
sentence as a caption of its clip, as CLIP4Clip does.
"""

from __future__ import annotations

from pathlib import Path

from avr.errors import DatasetError
from avr.extract.datasets._common import (VIDEO_DIR, Adapter, Caption, DatasetFacts, Listing,
                                          check_disjoint, one_of, require_files, videos_layout)
from avr.extract.datasets._readers import read_tab_rows

FILES = {"train": "LSMDC16_annos_training.csv", "val": "LSMDC16_annos_val.csv",
         "test": "LSMDC16_challenge_1000_publictect.csv"}
FIELDS = ("clip id", "start aligned", "end aligned", "start extracted", "end extracted",
          "sentence")
CAPTION_CHOICES = ("last", "all")
VIDEO_FOLDERS = (VIDEO_DIR, "LSMDC_Videos", "vids")

LAYOUT = """\
<root>/LSMDC16_annos_training.csv            train (101,079 clips)
<root>/LSMDC16_annos_val.csv                 val (7,408 clips)
<root>/LSMDC16_challenge_1000_publictect.csv test (1,000 clips)
  tab-separated, no header: clip id, 4 times, sentence (X-Pool's split, one file per split)
  one caption per clip: a clip id with several sentences keeps its last, as X-Pool does
  (--option captions=all keeps every sentence, as CLIP4Clip does)
""" + videos_layout("clip id", VIDEO_FOLDERS, "avi") + """
   e.g. <root>/videos/0001_American_Beauty/0001_American_Beauty_00.00.51.926-00.00.54.129.avi"""

FACTS = DatasetFacts(frames=12, videos={"train": 101_079, "val": 7_408, "test": 1_000},
                     captions_per_video={"train": 1, "val": 1, "test": 1},
                     reported_by=("TEFAL", "GAIS", "X-Pool", "CLIP4Clip"))


def read_sentences(path: Path) -> dict[str, list[str]]:
    """Clip id -> its sentences, in file order (clips in order of first appearance)."""
    sentences: dict[str, list[str]] = {}
    for line, fields in read_tab_rows(path, FIELDS):
        clip_id, sentence = fields[0], fields[-1]
        if not clip_id or not sentence:
            raise DatasetError(f"{path}:{line}: empty clip id or sentence")
        sentences.setdefault(clip_id, []).append(sentence)
    return sentences


def read(root: Path, captions: str = "last") -> Listing:
    one_of(captions, CAPTION_CHOICES, "lsmdc", "captions")
    paths = {split: root / name for split, name in FILES.items()}
    require_files("lsmdc", root, list(paths.values()), LAYOUT)
    split_ids: dict[str, list[str]] = {}
    by_clip: dict[str, list[Caption]] = {}
    warnings = []
    for split, path in paths.items():
        sentences = read_sentences(path)
        split_ids[split] = list(sentences)
        repeated = [clip for clip, texts in sentences.items() if len(texts) > 1]
        if repeated and captions == "last":
            warnings.append(f"{len(repeated):,} clip id(s) of {path} have several sentences "
                            f"(e.g. {repeated[0]}); each keeps its last, as X-Pool does "
                            f"(--option captions=all keeps them all)")
        for clip, texts in sentences.items():
            kept = texts[-1:] if captions == "last" else texts
            by_clip[clip] = [Caption(clip, text) for text in kept]
    check_disjoint(split_ids, paths)
    notes = [f"sentences from {', '.join(FILES.values())}",
             "every sentence a caption" if captions == "all" else "one sentence per clip"]
    return Listing(split_ids, by_clip, notes, warnings)


ADAPTER = Adapter("lsmdc", read, ("captions",), LAYOUT, FACTS, VIDEO_FOLDERS)
