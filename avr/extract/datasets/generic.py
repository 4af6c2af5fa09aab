"""Any folder of videos with a caption file (``generic``), and the built-in synthetic set
(``demo``), 12 frames.

Layout: ``captions.csv`` (header: video_id, caption[, split][, tag]) or ``captions.jsonl`` (one
object per line, same keys, text values), and the videos named by video_id.

Split: the split column when there is one; without it each video is assigned seeded (option
``seed``, default 0) to train/val/test 80/10/10, at least one val and one test video once there
are three videos. A bad row (missing field, empty caption, unknown split, a video listed under
two splits, more fields than the header) names the file and line.

Captions: every row is a caption of its video and a query; ``tag`` marks captions reported in
their own columns by ``avr eval`` (the demo tags those only sound can match ``audio_only``).

demo: the generic layout; when the root holds no captions.csv, the synthetic demo set is
generated there first (``avr.extract.demo_data.generate_demo``, option ``seed``).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from avr.errors import DatasetError
from avr.extract.datasets._common import (Adapter, Caption, DatasetFacts, Listing,
                                          missing_files_error, videos_layout)
from avr.extract.datasets._readers import read_csv_rows
from avr.files import read_text
from avr.store.schema import SPLITS

LAYOUT = """\
<root>/captions.csv                  header video_id, caption[, split][, tag] (UTF-8)
   (or <root>/captions.jsonl: one {"video_id", "caption"[, "split"][, "tag"]} per line)
""" + videos_layout("video_id") + """
without a split column videos are split 80/10/10 train/val/test, seeded"""

DEMO_LAYOUT = LAYOUT + "\n(generated here when <root>/captions.csv is absent)"

FACTS = DatasetFacts(frames=12)


@dataclass(frozen=True)
class CaptionRow:
    line: int
    video_id: str
    caption: str
    split: str | None  # None when the file has no split column
    tag: str


def csv_caption_rows(path: Path) -> list[CaptionRow]:
    rows = []
    for line, row in read_csv_rows(path, ("video_id", "caption")):
        rows.append(caption_row(path, line, row, has_split="split" in row))
    return rows


def jsonl_caption_rows(path: Path) -> list[CaptionRow]:
    rows = []
    for line, text in enumerate(read_text(path).splitlines(), start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{line}: not valid JSON ({e.msg} at column {e.colno})"
                               ) from None
        if not isinstance(record, dict):
            raise DatasetError(f"{path}:{line}: expected a JSON object")
        for key in ("video_id", "caption"):
            if key not in record:
                raise DatasetError(f"{path}:{line}: missing key {key!r}")
        rows.append(caption_row(path, line, record, has_split="split" in record))
    if len({row.split is None for row in rows}) > 1:
        first = next(row for row in rows if (row.split is None) != (rows[0].split is None))
        raise DatasetError(f"{path}:{first.line}: \"split\" must be given on every line or none")
    return rows


def caption_row(path: Path, line: int, record: dict, has_split: bool) -> CaptionRow:
    for key in ("video_id", "caption", "split", "tag"):
        value = record.get(key)
        if value is not None and not isinstance(value, str):
            raise DatasetError(f"{path}:{line}: {key} must be text, not "
                               f"{json.dumps(value, ensure_ascii=False)[:80]} (quote it)")
    video_id = (record.get("video_id") or "").strip()
    caption = (record.get("caption") or "").strip()
    if not video_id:
        raise DatasetError(f"{path}:{line}: empty video_id")
    if "/" in video_id or "\\" in video_id:
        raise DatasetError(f"{path}:{line}: video_id {video_id!r} must be a file name stem, "
                           "without folders (a video is found by name anywhere under videos/)")
    if not caption:
        raise DatasetError(f"{path}:{line}: empty caption")
    split = None
    if has_split:
        split = str(record.get("split") or "").strip()
        if split not in SPLITS:
            raise DatasetError(f"{path}:{line}: unknown split {split!r}; "
                               f"use one of {', '.join(SPLITS)}")
    return CaptionRow(line, video_id, caption, split, (record.get("tag") or "").strip())


def seeded_splits(video_ids: list[str], seed: int) -> dict[str, str]:
    """Assign videos 80/10/10 to train/val/test, seeded; >= 1 val and test from 3 videos up."""
    shuffled = sorted(video_ids)
    random.Random(seed).shuffle(shuffled)
    n = len(shuffled)
    n_eval = max(1, round(0.1 * n)) if n >= 3 else 0
    assignment = {v: "val" for v in shuffled[:n_eval]}
    assignment.update({v: "test" for v in shuffled[n_eval:2 * n_eval]})
    assignment.update({v: "train" for v in shuffled[2 * n_eval:]})
    return assignment


def captions_file(name: str, root: Path, layout: str) -> Path:
    csv_path, jsonl_path = root / "captions.csv", root / "captions.jsonl"
    if csv_path.is_file() and jsonl_path.is_file():
        raise DatasetError(f"{name}: both {csv_path} and {jsonl_path} exist; keep one")
    if csv_path.is_file():
        return csv_path
    if jsonl_path.is_file():
        return jsonl_path
    raise missing_files_error(name, root, [csv_path, jsonl_path], layout)


def read_captions_file(root: Path, seed: int, name: str, layout: str) -> Listing:
    """The listing of ``root``'s captions.csv or captions.jsonl (errors say ``name``)."""
    path = captions_file(name, root, layout)
    rows = csv_caption_rows(path) if path.suffix == ".csv" else jsonl_caption_rows(path)
    if not rows:
        raise DatasetError(f"{path}: no captions")

    order = list(dict.fromkeys(row.video_id for row in rows))  # first appearance
    sources = [f"captions from {path.name}"]
    if rows[0].split is None:
        split_of = seeded_splits(order, seed)
        sources.append(f"splits 80/10/10 with seed {seed}")
    else:
        split_of = {}
        for row in rows:
            if split_of.setdefault(row.video_id, row.split) != row.split:
                raise DatasetError(f"{path}:{row.line}: video {row.video_id!r} is in split "
                                   f"{row.split!r} here but {split_of[row.video_id]!r} earlier")
    split_ids = {split: [v for v in order if split_of[v] == split] for split in SPLITS}
    captions: dict[str, list[Caption]] = {v: [] for v in order}
    for row in rows:
        captions[row.video_id].append(Caption(row.video_id, row.caption, row.tag))
    return Listing(split_ids, captions, sources)


def read(root: Path, seed: int = 0) -> Listing:
    return read_captions_file(root, seed, "generic", LAYOUT)


def read_demo(root: Path, seed: int = 0) -> Listing:
    if not (root / "captions.csv").is_file():
        from avr.extract.demo_data import generate_demo  # the generator pulls in media encoders

        generate_demo(root, seed=seed)
    return read_captions_file(root, seed, "demo", DEMO_LAYOUT)


ADAPTER = Adapter("generic", read, ("seed",), LAYOUT, FACTS)
DEMO_ADAPTER = Adapter("demo", read_demo, ("seed",), DEMO_LAYOUT, FACTS)
