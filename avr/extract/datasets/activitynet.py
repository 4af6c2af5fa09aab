"""ActivityNet Captions (Krishna et al., ICCV 2017) as CLIP4Clip reads it: paragraph-to-video
retrieval on val_1, 64 frames (CLIP4Clip's max_frames).

Layout: ``train_ids.json`` and ``val_ids.json`` (JSON lists of video ids such as
``v_QOlSCBRmfWY``) and the dense-captioning annotations ``train.json`` and ``val_1.json``
(``{id: {"duration", "timestamps", "sentences": [...]}}``). A video's file is named by its id,
with or without the ``v_`` prefix (``v_QOlSCBRmfWY.mp4`` or ``QOlSCBRmfWY.mp4``), in
``videos/``, CLIP4Clip's ``Activity_Videos/`` or X-Pool's ``vids/``.

Split: 10,009 train videos, and val_1's 4,917 as test, as CLIP4Clip and collaborative-experts
evaluate (val_2 shares val_1's videos with other captions, so it cannot be a val set). val is
the last ``val_size`` (default 500) train ids in natural order, never test.

Captions: one paragraph per video, its sentences joined in order (``avr eval`` then reports the
1:1 video-paragraph metrics). An id listed twice is kept once and an id without sentences is
left out (warnings count them).
"""

from __future__ import annotations

from pathlib import Path

from avr.errors import DatasetError
from avr.extract.datasets._common import (PARAGRAPHS, VIDEO_DIR, Adapter, Caption, DatasetFacts,
                                          Listing, carve_val, check_disjoint, drop_uncaptioned,
                                          require_files, unique_ids, videos_layout,
                                          whole_number)
from avr.extract.datasets._readers import read_json, read_json_id_list

FILES = {"train": ("train_ids.json", "train.json"), "test": ("val_ids.json", "val_1.json")}
ID_PREFIX = "v_"
VIDEO_FOLDERS = (VIDEO_DIR, "Activity_Videos", "vids")

LAYOUT = """\
<root>/train_ids.json, val_ids.json     JSON lists of video ids (v_QOlSCBRmfWY)
<root>/train.json, val_1.json           {id: {"duration", "timestamps", "sentences": [...]}}
  train: train_ids.json (10,009 videos); test: val_ids.json with val_1.json (4,917 videos)
  paragraph-to-video: a video's sentences joined in order are its one caption
  val is the last val_size (--option val_size=500) of the naturally sorted train list
""" + videos_layout("id", VIDEO_FOLDERS) + """
   named with or without the v_ prefix (v_QOlSCBRmfWY.mp4 or QOlSCBRmfWY.mp4)"""

FACTS = DatasetFacts(frames=64, protocol=PARAGRAPHS,
                     videos={"train": 9_509, "val": 500, "test": 4_917},
                     captions_per_video={"train": 1, "val": 1, "test": 1},
                     reported_by=("CLIP4Clip",))


def read_paragraphs(path: Path) -> dict[str, str]:
    """Video id -> its sentences joined in order (ids whose sentences are all empty left
    out)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object {{id: {{\"sentences\": [...]}}}}")
    paragraphs = {}
    for video_id, entry in data.items():
        sentences = entry.get("sentences") if isinstance(entry, dict) else None
        if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            raise DatasetError(f"{path}: {video_id}: expected {{\"sentences\": [strings]}}")
        text = " ".join(s.strip() for s in sentences if s.strip())
        if text:
            paragraphs[video_id.strip()] = text
    return paragraphs


def without_prefix(video_id: str) -> str | None:
    """The id without ``v_`` (``v_QOlSCBRmfWY`` -> ``QOlSCBRmfWY``), the name CLIP4Clip's
    loader gives the files."""
    return video_id[len(ID_PREFIX):] if video_id.startswith(ID_PREFIX) else None


def read(root: Path, val_size: int | str = 500) -> Listing:
    val_size = whole_number(val_size, "activitynet", "val_size")
    lists = {split: root / ids for split, (ids, _) in FILES.items()}
    annotations = {split: root / sentences for split, (_, sentences) in FILES.items()}
    require_files("activitynet", root, [*lists.values(), *annotations.values()], LAYOUT)
    warnings: list[str] = []
    split_ids, paragraphs = {}, {}
    for split in FILES:
        texts = read_paragraphs(annotations[split])
        ids = unique_ids(read_json_id_list(lists[split]), lists[split], warnings)
        split_ids[split] = drop_uncaptioned(ids, texts, f"sentences in "
                                            f"{annotations[split].name}", lists[split], warnings)
        paragraphs.update({v: texts[v] for v in split_ids[split]})
    split_ids["train"], split_ids["val"] = carve_val("activitynet", split_ids["train"],
                                                     val_size, lists["train"])
    check_disjoint(split_ids, {"train": lists["train"], "val": lists["train"],
                               "test": lists["test"]})
    captions = {v: [Caption(v, paragraphs[v])] for ids in split_ids.values() for v in ids}
    notes = ["train: train_ids.json + train.json, test: val_ids.json + val_1.json",
             "one paragraph per video", f"val: the last {val_size:,} of the sorted train ids"]
    return Listing(split_ids, captions, notes, warnings, alias=without_prefix)


ADAPTER = Adapter("activitynet", read, ("val_size",), LAYOUT, FACTS, VIDEO_FOLDERS)
