"""DiDeMo (Hendricks et al., ICCV 2017) as CLIP4Clip reads it: paragraph-to-video retrieval,
64 frames (CLIP4Clip's max_frames).

Layout: the split lists ``{train,val,test}_list.txt`` (collaborative-experts' lists, one video
name per line) and LocalizingMoments' annotations ``{train,val,test}_data.json`` (a list of
moments ``{"video", "description", "times", ...}``). A video name keeps its Flickr file's
extension (``10015567@N08_3655084291_d8b58466fa.mov``); the file may be that original or a
converted copy named with or without the original extension (``...fa.mp4``, ``...fa.mov.mp4``),
in ``videos/``, CLIP4Clip's ``DiDeMo_Videos/`` or X-Pool's ``vids/``.

Split: the lists, 8,392 train / 1,065 val / 1,004 test videos (DiDeMo's paper counts 8,395
train; three are missing from the lists).

Captions: paragraph-to-video by default, as CLIP4Clip, GAIS and the CLIP-based papers report
it: a video's descriptions, joined in the order of its split's json, are its one caption
(``avr eval`` then reports the 1:1 video-paragraph metrics). Option ``captions=moments`` keeps
each description as a caption of its own. A listed video with no description in its json is
left out (a warning counts them). Frames are sampled over the whole video; CLIP4Clip samples
only the first 31 s, the span the moments were annotated in.
"""

from __future__ import annotations

import json
from pathlib import Path

from avr.errors import DatasetError
from avr.extract.datasets._common import (PARAGRAPHS, SENTENCES, VIDEO_DIR, VIDEO_EXTENSIONS,
                                          Adapter, Caption, DatasetFacts, Listing,
                                          check_disjoint, drop_uncaptioned, one_of,
                                          require_files, unique_ids, videos_layout)
from avr.extract.datasets._readers import read_json, read_lines
from avr.store.schema import SPLITS

CAPTION_CHOICES = ("paragraphs", "moments")
VIDEO_FOLDERS = (VIDEO_DIR, "DiDeMo_Videos", "vids")

LAYOUT = """\
<root>/train_list.txt, val_list.txt, test_list.txt      one video name per line
<root>/train_data.json, val_data.json, test_data.json   [{"video", "description", "times", ...}]
  the split: the lists (8,392 / 1,065 / 1,004 videos)
  paragraph-to-video: a video's descriptions joined in file order are its one caption
  (--option captions=moments keeps each description as its own caption)
""" + videos_layout("video name", VIDEO_FOLDERS) + """
   the name keeps the Flickr extension (x.mov): the file x.mov, x.mp4 or x.mov.mp4 is read"""

FACTS = DatasetFacts(frames=64, protocol=PARAGRAPHS,
                     videos={"train": 8_392, "val": 1_065, "test": 1_004},
                     captions_per_video={"train": 1, "val": 1, "test": 1},
                     reported_by=("GAIS", "CLIP4Clip"))


def read_descriptions(path: Path) -> dict[str, list[str]]:
    """Video name -> its moments' descriptions, in file order (empty ones skipped)."""
    moments = read_json(path)
    if not isinstance(moments, list):
        raise DatasetError(f"{path}: expected a JSON list of {{\"video\", \"description\"}} "
                           f"objects")
    descriptions: dict[str, list[str]] = {}
    for i, moment in enumerate(moments):
        if not isinstance(moment, dict) or not isinstance(moment.get("video"), str) \
                or not isinstance(moment.get("description"), str):
            raise DatasetError(f"{path}: entry {i} lacks a \"video\" or \"description\" string: "
                               f"{json.dumps(moment, ensure_ascii=False)[:80]}")
        text = moment["description"].strip()
        if text:
            descriptions.setdefault(moment["video"].strip(), []).append(text)
    return descriptions


def without_extension(video_name: str) -> str | None:
    """The name without its video extension (``x.mov`` -> ``x``): a converted file's stem."""
    stem, dot, ext = video_name.rpartition(".")
    return stem if dot and ext.lower() in VIDEO_EXTENSIONS else None


def read(root: Path, captions: str = "paragraphs") -> Listing:
    one_of(captions, CAPTION_CHOICES, "didemo", "captions")
    lists = {split: root / f"{split}_list.txt" for split in SPLITS}
    data = {split: root / f"{split}_data.json" for split in SPLITS}
    require_files("didemo", root, [*lists.values(), *data.values()], LAYOUT)
    split_ids: dict[str, list[str]] = {}
    by_video: dict[str, list[Caption]] = {}
    warnings: list[str] = []
    for split in SPLITS:
        descriptions = read_descriptions(data[split])
        ids = unique_ids(read_lines(lists[split]), lists[split], warnings)
        split_ids[split] = drop_uncaptioned(ids, descriptions,
                                            f"description in {data[split].name}",
                                            lists[split], warnings)
        for video in split_ids[split]:
            texts = descriptions[video]
            kept = [" ".join(texts)] if captions == "paragraphs" else texts
            by_video[video] = [Caption(video, text) for text in kept]
    check_disjoint(split_ids, lists)
    notes = ["split lists {train,val,test}_list.txt, descriptions {train,val,test}_data.json",
             "one paragraph per video" if captions == "paragraphs"
             else "every description a caption"]
    return Listing(split_ids, by_video, notes, warnings, alias=without_extension,
                   protocol=PARAGRAPHS if captions == "paragraphs" else SENTENCES)


ADAPTER = Adapter("didemo", read, ("captions",), LAYOUT, FACTS, VIDEO_FOLDERS)
