"""Dataset adapters: a data root on disk -> one ``DatasetIndex`` (video ids, splits, captions).

``avr extract --dataset NAME --root R`` reads R (default ``data/NAME``). Each adapter expects
the layout below; a missing annotation or split file raises ``DatasetError`` at once, naming
the exact paths. Videos are looked up as ``R/videos/<video_id>.<ext>`` with ext in
mp4, webm, mkv, avi, mov, m4v (first match in that order, case-insensitive); a missing video is
not an error here: ``video_paths`` then holds the expected ``.mp4`` path and extraction
records the failure.

vatex (32 frames)
    R/vatex_training_v1.0.json, R/vatex_validation_v1.0.json: the official annotations, lists
    of ``{"videoID": "ytid_000010_000020", "enCap": [10 captions], "chCap": [...]}``; only
    ``enCap`` is read. The HGR split (25,991 train / 1,500 val / 1,500 test, val and test
    drawn from the official validation set) as id lists, in the first of these forms present:
      R/splits/{train,val,test}.txt                   one videoID per line
      R/{train,val,test}_list.txt                     the form CLIP4Clip-style repos ship
                                                      (``vatex_data/`` in CLIP2Video, DRL)
      R/public_split/{trn,val,tst}_names.npy          HGR's release (arrays of videoIDs)

msrvtt (12 frames)
    R/MSRVTT_data.json: ``{"videos": [{"video_id": "video0", ...}], "sentences":
    [{"video_id", "caption", "sen_id"}]}``. R/MSRVTT_train.9k.csv or R/MSRVTT_train.7k.csv
    (column ``video_id``; option ``train="9k"|"7k"``). R/MSRVTT_JSFUSION_test.csv (columns
    key, vid_key, video_id, sentence): the 1k-A test set with its one JSFUSION sentence per
    video, as CLIP4Clip and X-Pool evaluate. Train videos keep all their MSRVTT_data.json
    sentences. There is no official val set: X-Pool and CLIP4Clip select on test, avr never
    does; val is the last ``val_size`` (default 500) train ids in natural order (video0 <
    video2 < video10) and train keeps the rest, so val never touches test.

generic (12 frames)
    R/videos/<video_id>.<ext> and R/captions.csv (header: video_id, caption[, split][, tag])
    or R/captions.jsonl (one object per line, same keys). Without a split column each video
    is assigned seeded (option ``seed``, default 0) to train/val/test 80/10/10, at least one
    val and one test video once there are three videos. A bad row (missing field, empty
    caption, unknown split, a video listed under two splits) names the file and line.

demo (12 frames)
    The generic layout. When R holds no captions.csv, the synthetic demo set is generated
    there first (``avr.extract.demo_data.generate_demo``, option ``seed``, default 0).

Order: train videos, then val, then test; captions grouped by video in that order.
``load_dataset`` accepts ``seed`` for every dataset (the one extraction seed); vatex and
msrvtt ignore it because their splits are fixed by files.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avr.errors import DatasetError
from avr.schema import SPLITS

DATASETS = ("vatex", "msrvtt", "generic", "demo")
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov", "m4v")


@dataclass(frozen=True)
class Caption:
    video_id: str
    text: str
    tag: str = ""


@dataclass
class DatasetIndex:
    name: str
    root: Path
    video_ids: list[str]  # unique, in a stable order: train, then val, then test
    video_paths: list[Path]  # the file found for each id, or the expected .mp4 path if none
    video_splits: list[str]  # "train" | "val" | "test"
    captions: list[Caption]  # grouped by video in video order
    default_frames: int  # frames sampled per video unless the user asks otherwise
    layout: str  # the expected file layout, shown in errors and --help


def default_root(name: str) -> Path:
    return Path("data") / name


def load_dataset(name: str, root: Path | None = None, **options) -> DatasetIndex:
    """Index dataset ``name`` under ``root`` (default ``data/<name>``).

    ``seed`` (the extraction seed) is accepted for every dataset; only generic and demo use
    it, since the vatex and msrvtt splits are fixed by their files.
    """
    if name not in ADAPTERS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    load, allowed, _ = ADAPTERS[name]
    unknown = sorted(set(options) - set(allowed) - {"seed"})
    if unknown:
        raise DatasetError(f"dataset {name!r} takes no option {', '.join(unknown)}; "
                           f"its options: {', '.join(allowed) or 'none'}")
    if "seed" not in allowed:
        options.pop("seed", None)
    return load(Path(root) if root is not None else default_root(name), **options)


def layout_of(name: str) -> str:
    """The documented file layout of dataset ``name`` (for --help)."""
    if name not in ADAPTERS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return ADAPTERS[name][2]


# ---- layouts ---------------------------------------------------------------------------

VATEX_LAYOUT = """\
<root>/vatex_training_v1.0.json      official annotations ([{"videoID", "enCap", ...}])
<root>/vatex_validation_v1.0.json
<root>/splits/train.txt, val.txt, test.txt      HGR split, one videoID per line
   (or <root>/train_list.txt, val_list.txt, test_list.txt,
    or <root>/public_split/trn_names.npy, val_names.npy, tst_names.npy)
<root>/videos/<videoID>.mp4 (or .webm .mkv .avi .mov .m4v)"""

MSRVTT_LAYOUT = """\
<root>/MSRVTT_data.json              {"videos": [...], "sentences": [{"video_id", "caption"}]}
<root>/MSRVTT_train.9k.csv           column video_id (or MSRVTT_train.7k.csv with train=7k)
<root>/MSRVTT_JSFUSION_test.csv      columns key, vid_key, video_id, sentence (1k-A test)
<root>/videos/<video_id>.mp4 (or .webm .mkv .avi .mov .m4v)"""

GENERIC_LAYOUT = """\
<root>/captions.csv                  header video_id, caption[, split][, tag]
   (or <root>/captions.jsonl: one {"video_id", "caption"[, "split"][, "tag"]} per line)
<root>/videos/<video_id>.mp4 (or .webm .mkv .avi .mov .m4v)
without a split column videos are split 80/10/10 train/val/test, seeded"""

DEMO_LAYOUT = GENERIC_LAYOUT + "\n(generated here when <root>/captions.csv is absent)"


# ---- shared helpers --------------------------------------------------------------------

def missing_files_error(name: str, root: Path, paths: list[Path], layout: str) -> DatasetError:
    listed = "\n".join(f"  {p}" for p in paths)
    return DatasetError(f"{name}: expected file(s) not found:\n{listed}\n"
                        f"Expected layout under {root}:\n{layout}")


def require_files(name: str, root: Path, paths: list[Path], layout: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise missing_files_error(name, root, missing, layout)


def find_videos(root: Path, video_ids: list[str]) -> list[Path]:
    """Path of each id's video under ``root/videos``, or the expected ``.mp4`` path if none."""
    video_dir = root / "videos"
    rank = {ext: i for i, ext in enumerate(VIDEO_EXTENSIONS)}
    found: dict[str, tuple[int, Path]] = {}
    if video_dir.is_dir():  # one directory listing, not six stat calls per video
        with os.scandir(video_dir) as entries:
            for entry in entries:
                stem, dot, ext = entry.name.rpartition(".")
                ext = ext.lower()
                if dot and ext in rank and entry.is_file():
                    if stem not in found or rank[ext] < found[stem][0]:
                        found[stem] = (rank[ext], Path(entry.path))
    return [found[v][1] if v in found else video_dir / f"{v}.mp4" for v in video_ids]


def assemble(name: str, root: Path, split_ids: dict[str, list[str]],
             captions_by_video: dict[str, list[Caption]], default_frames: int,
             layout: str) -> DatasetIndex:
    """Order videos train, val, test and group their captions in the same order."""
    video_ids = [v for split in SPLITS for v in split_ids.get(split, [])]
    video_splits = [split for split in SPLITS for _ in split_ids.get(split, [])]
    captions = [c for v in video_ids for c in captions_by_video[v]]
    return DatasetIndex(name=name, root=root, video_ids=video_ids,
                        video_paths=find_videos(root, video_ids), video_splits=video_splits,
                        captions=captions, default_frames=default_frames, layout=layout)


def check_disjoint(split_ids: dict[str, list[str]], sources: dict[str, Path]) -> None:
    """Every id appears once across all split lists (a repeat would leak or double-count)."""
    seen: dict[str, str] = {}
    for split, ids in split_ids.items():
        for video_id in ids:
            if video_id in seen:
                where = sources[split] if seen[video_id] == split else \
                    f"{sources[seen[video_id]]} and {sources[split]}"
                raise DatasetError(f"video {video_id!r} is listed twice ({where}); "
                                   "each video belongs to exactly one split")
            seen[video_id] = split


def read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None


def read_csv_rows(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) for each data row of a headed CSV that has the ``required`` columns."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        absent = [c for c in required if c not in header]
        if absent:
            raise DatasetError(f"{path}:1: missing column(s) {', '.join(absent)} "
                               f"(header has: {', '.join(header) or 'nothing'})")
        return [(reader.line_num, row) for row in reader]


def list_missing_ids(ids: list[str], known, what: str, source: Path) -> None:
    missing = [v for v in ids if v not in known]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DatasetError(f"{len(missing)} video id(s) in {source} have no {what}: {shown}")


# ---- vatex -----------------------------------------------------------------------------

VATEX_ANNOTATIONS = ("vatex_training_v1.0.json", "vatex_validation_v1.0.json")
# split-list forms (split -> path under root); the first form with any file present is used
VATEX_SPLIT_FORMS = (
    {"train": "splits/train.txt", "val": "splits/val.txt", "test": "splits/test.txt"},
    {"train": "train_list.txt", "val": "val_list.txt", "test": "test_list.txt"},
    {"train": "public_split/trn_names.npy", "val": "public_split/val_names.npy",
     "test": "public_split/tst_names.npy"},
)


def read_id_list(path: Path) -> list[str]:
    """VideoIDs from a text list (one per line) or an HGR ``.npy`` array of names."""
    if path.suffix == ".npy":
        try:
            names = np.load(path, allow_pickle=False)
        except ValueError:
            raise DatasetError(f"{path}: expected a numpy array of strings (saved without "
                               "pickle); convert it to a text list, one videoID per line") \
                from None
        return [str(n).strip() for n in names.reshape(-1)]
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def vatex_split_files(root: Path) -> dict[str, Path]:
    """The split lists of the first form with any file present (the first form if none)."""
    for form in VATEX_SPLIT_FORMS:
        paths = {split: root / rel for split, rel in form.items()}
        if any(p.is_file() for p in paths.values()):
            return paths
    return {split: root / rel for split, rel in VATEX_SPLIT_FORMS[0].items()}


def vatex_english_captions(path: Path) -> dict[str, list[str]]:
    entries = read_json(path)
    if not isinstance(entries, list):
        raise DatasetError(f"{path}: expected a JSON list of {{\"videoID\", \"enCap\"}} objects")
    captions: dict[str, list[str]] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "videoID" not in entry or not entry.get("enCap"):
            raise DatasetError(f"{path}: entry {i} lacks \"videoID\" or a non-empty \"enCap\"")
        captions[entry["videoID"]] = [str(c).strip() for c in entry["enCap"]]
    return captions


def load_vatex(root: Path) -> DatasetIndex:
    annotation_paths = [root / name for name in VATEX_ANNOTATIONS]
    split_files = vatex_split_files(root)
    require_files("vatex", root, annotation_paths + list(split_files.values()), VATEX_LAYOUT)
    english: dict[str, list[str]] = {}
    for path in annotation_paths:
        english.update(vatex_english_captions(path))
    split_ids = {split: read_id_list(path) for split, path in split_files.items()}
    check_disjoint(split_ids, split_files)
    for split, ids in split_ids.items():
        list_missing_ids(ids, english, "entry in " + " or ".join(VATEX_ANNOTATIONS),
                         split_files[split])
    captions = {v: [Caption(v, text) for text in english[v]]
                for ids in split_ids.values() for v in ids}
    return assemble("vatex", root, split_ids, captions, 32, VATEX_LAYOUT)


# ---- msrvtt ----------------------------------------------------------------------------

def natural_key(video_id: str) -> tuple:
    """Sort key under which video2 < video10."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", video_id))


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


def msrvtt_sentences(path: Path) -> dict[str, list[str]]:
    """video_id -> its MSRVTT_data.json captions, in sen_id order."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("sentences"), list):
        raise DatasetError(f"{path}: expected an object with a \"sentences\" list")
    rows = []
    for i, sentence in enumerate(data["sentences"]):
        if not isinstance(sentence, dict) or "video_id" not in sentence \
                or "caption" not in sentence:
            raise DatasetError(f"{path}: sentences[{i}] lacks \"video_id\" or \"caption\"")
        rows.append((sentence.get("sen_id", i), sentence["video_id"], str(sentence["caption"])))
    by_video: dict[str, list[str]] = {}
    for _, video_id, caption in sorted(rows, key=lambda r: r[0]):
        by_video.setdefault(video_id, []).append(caption.strip())
    return by_video


def load_msrvtt(root: Path, train: str = "9k", val_size: int = 500) -> DatasetIndex:
    if train not in ("9k", "7k"):
        raise DatasetError(f"msrvtt: train must be \"9k\" or \"7k\", not {train!r}")
    try:
        val_size = int(val_size)  # --option val_size=500 may arrive as text
    except ValueError:
        raise DatasetError(f"msrvtt: val_size must be a whole number, not {val_size!r}") from None
    data_path = root / "MSRVTT_data.json"
    train_path = root / f"MSRVTT_train.{train}.csv"
    test_path = root / "MSRVTT_JSFUSION_test.csv"
    require_files("msrvtt", root, [data_path, train_path, test_path], MSRVTT_LAYOUT)

    train_list = sorted(read_video_id_column(train_path), key=natural_key)
    if not 0 <= val_size < len(train_list):
        raise DatasetError(f"msrvtt: val_size must be in [0, {len(train_list)}) for "
                           f"{train_path.name}, not {val_size}")
    cut = len(train_list) - val_size
    test_sentences = read_jsfusion_test(test_path)
    split_ids = {"train": train_list[:cut], "val": train_list[cut:],
                 "test": list(test_sentences)}
    check_disjoint(split_ids, {"train": train_path, "val": train_path, "test": test_path})

    sentences = msrvtt_sentences(data_path)
    list_missing_ids(train_list, sentences, f"sentence in {data_path.name}", train_path)
    captions = {v: [Caption(v, text) for text in sentences[v]] for v in train_list}
    captions.update({v: [Caption(v, text)] for v, text in test_sentences.items()})
    return assemble("msrvtt", root, split_ids, captions, 12, MSRVTT_LAYOUT)


# ---- generic / demo --------------------------------------------------------------------

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
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{line}: not valid JSON ({e.msg})") from None
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
    video_id = str(record.get("video_id") or "").strip()
    caption = str(record.get("caption") or "").strip()
    if not video_id:
        raise DatasetError(f"{path}:{line}: empty video_id")
    if "/" in video_id or "\\" in video_id:
        raise DatasetError(f"{path}:{line}: video_id {video_id!r} must be a file name stem "
                           "(videos live directly under videos/)")
    if not caption:
        raise DatasetError(f"{path}:{line}: empty caption")
    split = None
    if has_split:
        split = str(record.get("split") or "").strip()
        if split not in SPLITS:
            raise DatasetError(f"{path}:{line}: unknown split {split!r}; "
                               f"use one of {', '.join(SPLITS)}")
    return CaptionRow(line, video_id, caption, split, str(record.get("tag") or "").strip())


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


def generic_captions_file(name: str, root: Path, layout: str) -> Path:
    csv_path, jsonl_path = root / "captions.csv", root / "captions.jsonl"
    if csv_path.is_file() and jsonl_path.is_file():
        raise DatasetError(f"{name}: both {csv_path} and {jsonl_path} exist; keep one")
    if csv_path.is_file():
        return csv_path
    if jsonl_path.is_file():
        return jsonl_path
    raise missing_files_error(name, root, [csv_path, jsonl_path], layout)


def load_generic(root: Path, seed: int = 0, *, name: str = "generic",
                 layout: str = GENERIC_LAYOUT) -> DatasetIndex:
    path = generic_captions_file(name, root, layout)
    rows = csv_caption_rows(path) if path.suffix == ".csv" else jsonl_caption_rows(path)
    if not rows:
        raise DatasetError(f"{path}: no captions")

    order = list(dict.fromkeys(row.video_id for row in rows))  # first appearance
    if rows[0].split is None:
        split_of = seeded_splits(order, seed)
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
    return assemble(name, root, split_ids, captions, 12, layout)


def load_demo(root: Path, seed: int = 0) -> DatasetIndex:
    if not (root / "captions.csv").is_file():
        from avr.extract.demo_data import generate_demo  # the generator pulls in media encoders

        generate_demo(root, seed=seed)
    return load_generic(root, seed, name="demo", layout=DEMO_LAYOUT)


# name -> (loader, its options, layout)
ADAPTERS = {
    "vatex": (load_vatex, (), VATEX_LAYOUT),
    "msrvtt": (load_msrvtt, ("train", "val_size"), MSRVTT_LAYOUT),
    "generic": (load_generic, ("seed",), GENERIC_LAYOUT),
    "demo": (load_demo, ("seed",), DEMO_LAYOUT),
}
