"""Dataset adapters: a data root on disk -> one ``DatasetIndex`` (video ids, splits, captions).

``avr extract --dataset NAME --root R`` reads R (default ``data/NAME``). Each adapter accepts the
layouts below (``avr extract --dataset NAME --show-layout`` prints them); a missing annotation
or split file raises ``DatasetError`` at once, naming the exact paths; a file that is not
UTF-8, or not valid JSON or CSV, or holds a value of the wrong type, names the file and the
line (or the JSON entry) and what to do.

Videos are found anywhere under ``R/videos/`` (nested folders such as MSR-VTT's
``videos/all/``; one walk, symbolic links followed) as ``<video id>.<ext>`` with ext in mp4,
webm, mkv, avi, mov, m4v (case-insensitive; mp4 first when several exist). A VATEX clip may
also be named by its bare 11-character YouTube id, unless two listed clips share it. The index
reports how many listed videos have a file; when none has, loading fails with the paths it
expected; a listed video without a file is recorded as missing_file by the extract.

vatex (32 frames)
    Captions, from the first source present:
      R/vatex_training_v1.0.json + R/vatex_validation_v1.0.json   the official annotations,
          lists of ``{"videoID": "ytid_000010_000020", "enCap": [10 captions], "chCap": ...}``
      vatex_data.json (R/ or R/vatex_data/)   CLIP2Video's ``{videoID: {"enCap": [...]}}``
      ref_captions.json (R/, R/vatex_data/ or R/annotation/RET/)   HGR's and TS2-Net's
          ``{videoID: [captions]}``
    Only English captions are read. The HGR split (25,991 train / 1,500 val / 1,500 test, val
    and test drawn from the official validation set) as id lists, in the first form present:
      R/splits/{train,val,test}.txt                   one videoID per line
      R/{train,val,test}_list.txt                     CLIP4Clip-family repos (TS2-Net, DRL)
      R/vatex_data/{train,val,test}_list.txt          CLIP2Video's ``data/vatex_data/``
      R/public_split/{trn,val,tst}_names.npy          HGR's release (arrays of videoIDs)
    A release with only train and test lists gets val from the end of train (option
    ``val_size``, default 1,500, as msrvtt does): avr never selects on test.

msrvtt (12 frames)
    In R/ or R/msrvtt_data/ (CLIP4Clip's msrvtt_data.zip): MSRVTT_data.json (``{"videos":
    [...], "sentences": [{"video_id", "caption", "sen_id"}]}``), MSRVTT_train.9k.csv or
    MSRVTT_train.7k.csv (column ``video_id``; option ``train="9k"|"7k"``),
    MSRVTT_JSFUSION_test.csv (columns key, vid_key, video_id, sentence): the 1k-A test set with
    its one JSFUSION sentence per video, as CLIP4Clip and X-Pool evaluate. Train videos keep
    all their MSRVTT_data.json sentences. There is no official val set: X-Pool and CLIP4Clip
    select on test, avr never does; val is the last ``val_size`` (default 500) train ids in
    natural order (video0 < video2 < video10) and train keeps the rest, so val never touches
    test.

generic (12 frames)
    R/videos/<video_id>.<ext> and R/captions.csv (header: video_id, caption[, split][, tag])
    or R/captions.jsonl (one object per line, same keys, text values). Without a split column
    each video is assigned seeded (option ``seed``, default 0) to train/val/test 80/10/10, at
    least one val and one test video once there are three videos. A bad row (missing field,
    empty caption, unknown split, a video listed under two splits, more fields than the
    header) names the file and line.

demo (12 frames)
    The generic layout. When R holds no captions.csv, the synthetic demo set is generated
    there first (``avr.extract.demo_data.generate_demo``, option ``seed``, default 0).

Order: train videos, then val, then test; captions grouped by video in that order.
``load_dataset`` accepts ``seed`` for every dataset (the one extraction seed); vatex and
msrvtt ignore it because their splits are fixed by files.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from avr.errors import DatasetError
from avr.files import read_text
from avr.store.schema import SPLITS

DATASETS = ("vatex", "msrvtt", "generic", "demo")
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov", "m4v")
VIDEO_DIR = "videos"
MISSING_WARNING_FRACTION = 0.10  # warn when more of the listed videos than this have no file


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
    missing_videos: list[str] = field(default_factory=list)  # listed ids with no video file
    sources: list[str] = field(default_factory=list)  # which files were read, for the report

    def listing_report(self) -> str:
        """One line: videos listed per split, how many have a file, the files read."""
        per_split = ", ".join(f"{split} {count:,}" for split, count in
                              Counter(self.video_splits).items())
        found = len(self.video_ids) - len(self.missing_videos)
        line = (f"{self.name}: {len(self.video_ids):,} videos listed ({per_split}), {found:,} "
                f"with a file under {self.root / VIDEO_DIR}")
        if self.missing_videos:
            line += f", {len(self.missing_videos):,} without (e.g. {self.missing_videos[0]})"
        return line + "".join(f"; {source}" for source in self.sources)

    def missing_warning(self) -> str | None:
        """A warning when more than MISSING_WARNING_FRACTION of the listed videos have no file."""
        fraction = len(self.missing_videos) / max(len(self.video_ids), 1)
        if fraction <= MISSING_WARNING_FRACTION:
            return None
        row = self.video_ids.index(self.missing_videos[0])
        return (f"{fraction:.0%} of the listed {self.name} videos have no file (e.g. "
                f"{self.video_paths[row]}); they will be recorded as missing_file. Check --root "
                f"and `avr extract --dataset {self.name} --show-layout`")


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
    """The documented file layouts of dataset ``name`` (for --show-layout)."""
    if name not in ADAPTERS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return ADAPTERS[name][2]


# ---- layouts ---------------------------------------------------------------------------

VIDEOS_LAYOUT = """\
<root>/videos/**/<{id}>.mp4 (or .webm .mkv .avi .mov .m4v), in any folder under videos/"""

VATEX_LAYOUT = """\
captions, the first of:
  <root>/vatex_training_v1.0.json + vatex_validation_v1.0.json   official ([{"videoID", "enCap"}])
  <root>/vatex_data.json or <root>/vatex_data/vatex_data.json     {videoID: {"enCap": [...]}}
  <root>/ref_captions.json, <root>/vatex_data/ or <root>/annotation/RET/   {videoID: [...]}
split lists (HGR split), the first form present:
  <root>/splits/train.txt, val.txt, test.txt          one videoID per line
  <root>/train_list.txt, val_list.txt, test_list.txt
  <root>/vatex_data/train_list.txt, val_list.txt, test_list.txt
  <root>/public_split/trn_names.npy, val_names.npy, tst_names.npy
  without a val list, val is the last val_size (--option val_size=1500) of the sorted train list
""" + VIDEOS_LAYOUT.format(id="videoID") + """
   or named by the bare 11-character YouTube id (the id before _<start>_<end>): the clip itself,
   not the whole YouTube video"""

MSRVTT_LAYOUT = """\
in <root>/ or <root>/msrvtt_data/:
  MSRVTT_data.json              {"videos": [...], "sentences": [{"video_id", "caption"}]}
  MSRVTT_train.9k.csv           column video_id (or MSRVTT_train.7k.csv with --option train=7k)
  MSRVTT_JSFUSION_test.csv      columns key, vid_key, video_id, sentence (1k-A test)
  val is the last val_size (--option val_size=500) of the naturally sorted train list
""" + VIDEOS_LAYOUT.format(id="video_id") + """
   e.g. <root>/videos/all/video0.mp4"""

GENERIC_LAYOUT = """\
<root>/captions.csv                  header video_id, caption[, split][, tag] (UTF-8)
   (or <root>/captions.jsonl: one {"video_id", "caption"[, "split"][, "tag"]} per line)
""" + VIDEOS_LAYOUT.format(id="video_id") + """
without a split column videos are split 80/10/10 train/val/test, seeded"""

DEMO_LAYOUT = GENERIC_LAYOUT + "\n(generated here when <root>/captions.csv is absent)"


# ---- shared helpers --------------------------------------------------------------------

def missing_files_error(name: str, root: Path, paths: list[Path], layout: str,
                        any_of: list[Path] = ()) -> DatasetError:
    """Names every missing file, and ``any_of``: files of which one would do."""
    listed = "".join(f"  {p}\n" for p in paths)
    if any_of:
        listed += "  one of:\n" + "".join(f"    {p}\n" for p in any_of)
    return DatasetError(f"{name}: expected file(s) not found:\n{listed}"
                        f"Expected layout under {root}:\n{layout}")


def require_files(name: str, root: Path, paths: list[Path], layout: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise missing_files_error(name, root, missing, layout)


def first_present(candidates: list[Path]) -> Path | None:
    return next((path for path in candidates if path.is_file()), None)


def video_files(video_dir: Path) -> dict[str, Path]:
    """File stem -> path of every video file anywhere under ``video_dir`` (one walk; links
    followed, each real folder once). Per stem, the extension first in VIDEO_EXTENSIONS wins,
    then the first path in sorted order."""
    rank = {ext: i for i, ext in enumerate(VIDEO_EXTENSIONS)}
    found: dict[str, tuple[int, Path]] = {}
    seen_folders: set[str] = set()
    for folder, subfolders, files in os.walk(video_dir, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen_folders:  # a link back up the tree
            subfolders.clear()
            continue
        seen_folders.add(real)
        subfolders.sort()
        for name in sorted(files):
            stem, dot, ext = name.rpartition(".")
            ext = ext.lower()
            if dot and ext in rank and (stem not in found or rank[ext] < found[stem][0]):
                found[stem] = (rank[ext], Path(folder) / name)
    return {stem: path for stem, (_, path) in found.items()}


def find_videos(root: Path, video_ids: list[str],
                alias: Callable[[str], str | None] | None = None
                ) -> tuple[list[Path], list[str]]:
    """The file of each id under ``root/videos`` (or of its ``alias``, another name the file
    may have), or the expected ``.mp4`` path if none; and the ids without a file."""
    video_dir = root / VIDEO_DIR
    found = video_files(video_dir)
    paths, missing = [], []
    for video_id in video_ids:
        other = alias(video_id) if alias is not None else None
        path = found.get(video_id) or (found.get(other) if other else None)
        if path is None:
            missing.append(video_id)
            path = video_dir / f"{video_id}.mp4"
        paths.append(path)
    return paths, missing


def assemble(name: str, root: Path, split_ids: dict[str, list[str]],
             captions_by_video: dict[str, list[Caption]], default_frames: int, layout: str, *,
             alias: Callable[[str], str | None] | None = None,
             sources: list[str] | None = None) -> DatasetIndex:
    """Order videos train, val, test, group their captions in the same order and find their
    files. Fails, naming the paths it expected, when no listed video has a file."""
    video_ids = [v for split in SPLITS for v in split_ids.get(split, [])]
    video_splits = [split for split in SPLITS for _ in split_ids.get(split, [])]
    captions = [c for v in video_ids for c in captions_by_video[v]]
    video_paths, missing = find_videos(root, video_ids, alias)
    if video_ids and len(missing) == len(video_ids):
        expected = "\n".join(f"  {path}" for path in video_paths[:3])
        raise DatasetError(f"{name}: none of the {len(video_ids):,} listed videos has a file "
                           f"under {root / VIDEO_DIR}; expected, e.g.:\n{expected}\n  ...\n"
                           f"Expected layout under {root}:\n{layout}")
    return DatasetIndex(name=name, root=root, video_ids=video_ids, video_paths=video_paths,
                        video_splits=video_splits, captions=captions,
                        default_frames=default_frames, layout=layout, missing_videos=missing,
                        sources=sources or [])


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
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})"
                           ) from None


def read_csv_rows(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) for each data row of a headed CSV that has the ``required`` columns.
    Quotes are read strictly (an unclosed quote is an error, not a caption that swallows the
    rest of the file); a row with more fields than the header (an unquoted comma) is an error."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""), strict=True)
    rows = []
    while True:
        line = reader.line_num + 1  # where the next row (or the header) starts
        try:
            header = reader.fieldnames or []
            row = next(reader, None)
        except csv.Error as error:
            raise DatasetError(f"{path}:{line}: not valid CSV ({error}); check the quotes of "
                               f"this row") from None
        absent = [c for c in required if c not in header]
        if absent:
            raise DatasetError(f"{path}:1: missing column(s) {', '.join(absent)} "
                               f"(header has: {', '.join(header) or 'nothing'})")
        if row is None:
            return rows
        if None in row:
            raise DatasetError(f"{path}:{reader.line_num}: {len(header) + len(row[None])} "
                               f"fields for a header of {len(header)}; quote a field that "
                               f"holds a comma (\"a dog, barking\")")
        rows.append((reader.line_num, row))


def list_missing_ids(ids: list[str], known, what: str, source: Path) -> None:
    missing = [v for v in ids if v not in known]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DatasetError(f"{len(missing)} video id(s) in {source} have no {what}: {shown}")


def whole_number(value, name: str, option: str) -> int:
    """An option that may arrive as text (``--option val_size=500``) as an int."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DatasetError(f"{name}: {option} must be a whole number, not {value!r}") from None


def natural_key(video_id: str) -> tuple:
    """Sort key under which video2 < video10."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", video_id))


def carve_val(name: str, train_ids: list[str], val_size: int, source: Path
              ) -> tuple[list[str], list[str]]:
    """(train, val): val is the last ``val_size`` ids of the naturally sorted train list, so
    it never touches test and does not depend on the order of the file."""
    ordered = sorted(train_ids, key=natural_key)
    if not 0 <= val_size < len(ordered):
        raise DatasetError(f"{name}: val_size must be in [0, {len(ordered)}) for "
                           f"{source.name}, not {val_size}")
    cut = len(ordered) - val_size
    return ordered[:cut], ordered[cut:]


def caption_strings(value, where: str) -> list[str]:
    """A JSON value that must be a non-empty list of caption strings, stripped."""
    if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
        raise DatasetError(f"{where}: expected a non-empty list of caption strings, found "
                           f"{json.dumps(value, ensure_ascii=False)[:80]}")
    return [c.strip() for c in value]


# ---- vatex -----------------------------------------------------------------------------

VATEX_ANNOTATIONS = ("vatex_training_v1.0.json", "vatex_validation_v1.0.json")
VATEX_DATA_JSON = ("vatex_data.json", "vatex_data/vatex_data.json")
VATEX_REF_CAPTIONS = ("ref_captions.json", "vatex_data/ref_captions.json",
                      "annotation/RET/ref_captions.json")
# split-list forms (split -> path under root); the first form with any file present is used
VATEX_SPLIT_FORMS = (
    {"train": "splits/train.txt", "val": "splits/val.txt", "test": "splits/test.txt"},
    {"train": "train_list.txt", "val": "val_list.txt", "test": "test_list.txt"},
    {"train": "vatex_data/train_list.txt", "val": "vatex_data/val_list.txt",
     "test": "vatex_data/test_list.txt"},
    {"train": "public_split/trn_names.npy", "val": "public_split/val_names.npy",
     "test": "public_split/tst_names.npy"},
)
VATEX_VAL_SIZE = 1500  # the HGR val split's size, when a release has no val list
# A VATEX videoID is <YouTube id>_<start>_<end>, start and end in seconds, six digits each.
# YouTube ids are 11 characters of [A-Za-z0-9_-]: they may hold '_' themselves, so the id is
# matched whole, never split at '_'.
VATEX_VIDEO_ID = re.compile(r"(?P<youtube>[A-Za-z0-9_-]{11})_(?P<start>\d{6})_(?P<end>\d{6})")


def youtube_id(video_id: str) -> str | None:
    """The YouTube id of a VATEX videoID (``Ptf_2VRj-V0_000122_000132`` -> ``Ptf_2VRj-V0``),
    None when the id is not of that form."""
    match = VATEX_VIDEO_ID.fullmatch(video_id)
    return match["youtube"] if match else None


def read_id_list(path: Path) -> list[str]:
    """VideoIDs from a text list (one per line) or an HGR ``.npy`` array of names."""
    if path.suffix == ".npy":
        return read_npy_names(path)
    return [line.strip() for line in read_text(path).splitlines() if line.strip()]


def read_npy_names(path: Path) -> list[str]:
    try:
        names = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise DatasetError(f"{path}: not a numpy array of strings saved without pickle "
                           f"({error}); convert it to a text list, one videoID per line") \
            from None
    if names.dtype.kind == "S":
        names = np.char.decode(names, "utf-8")
    if names.dtype.kind != "U":
        raise DatasetError(f"{path}: holds {names.dtype} values, not videoID strings")
    return [str(n).strip() for n in names.reshape(-1)]


def vatex_split_files(root: Path) -> dict[str, Path]:
    """The split lists of the first form with any file present (the first form if none)."""
    for form in VATEX_SPLIT_FORMS:
        paths = {split: root / rel for split, rel in form.items()}
        if any(p.is_file() for p in paths.values()):
            return paths
    return {split: root / rel for split, rel in VATEX_SPLIT_FORMS[0].items()}


def vatex_english_captions(path: Path) -> dict[str, list[str]]:
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


def vatex_keyed_captions(path: Path, english_key: str | None) -> dict[str, list[str]]:
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


def vatex_caption_files(root: Path) -> list[Path]:
    """The files of the first caption source present: both official annotation files (when
    either is there), or vatex_data.json, or ref_captions.json; [] when none is."""
    official = [root / name for name in VATEX_ANNOTATIONS]
    if any(path.is_file() for path in official):
        return official
    for names in (VATEX_DATA_JSON, VATEX_REF_CAPTIONS):
        path = first_present([root / name for name in names])
        if path is not None:
            return [path]
    return []


def vatex_captions(root: Path, files: list[Path]) -> dict[str, list[str]]:
    """English captions of every videoID in the caption source ``files``."""
    if files[0].name in VATEX_ANNOTATIONS:
        english: dict[str, list[str]] = {}
        for path in files:
            english.update(vatex_english_captions(path))
        return english
    return vatex_keyed_captions(files[0], "enCap" if files[0].name == "vatex_data.json" else None)


def vatex_alias(video_ids: list[str]) -> Callable[[str], str | None]:
    """A clip's file may be named by its bare YouTube id, unless another listed clip shares
    that YouTube video (the file could then be either clip)."""
    shared = Counter(youtube_id(v) for v in video_ids)

    def alias(video_id: str) -> str | None:
        youtube = youtube_id(video_id)
        return youtube if youtube is not None and shared[youtube] == 1 else None

    return alias


def load_vatex(root: Path, val_size: int | str | None = None) -> DatasetIndex:
    split_files = vatex_split_files(root)
    caption_files = vatex_caption_files(root)
    missing = [path for path in [*caption_files, split_files["train"], split_files["test"]]
               if not path.is_file()]
    if missing or not caption_files:
        caption_choices = [root / name for name in (*VATEX_ANNOTATIONS, *VATEX_DATA_JSON,
                                                    *VATEX_REF_CAPTIONS)]
        raise missing_files_error("vatex", root, missing, VATEX_LAYOUT,
                                  any_of=[] if caption_files else caption_choices)
    english = vatex_captions(root, caption_files)
    split_ids = {split: read_id_list(path) for split, path in split_files.items()
                 if path.is_file()}
    sources = {**split_files}
    notes = [f"captions from {' + '.join(str(p.relative_to(root)) for p in caption_files)}",
             "split lists " + ", ".join(str(p.relative_to(root)) for p in split_files.values()
                                        if p.is_file())]
    if "val" in split_ids:
        if val_size is not None:
            raise DatasetError(f"vatex: val_size applies only to a release without a val list; "
                               f"{split_files['val']} is the val split")
    else:
        size = VATEX_VAL_SIZE if val_size is None else whole_number(val_size, "vatex",
                                                                    "val_size")
        split_ids["train"], split_ids["val"] = carve_val("vatex", split_ids["train"], size,
                                                         split_files["train"])
        sources["val"] = split_files["train"]
        notes.append(f"val: the last {size:,} of the sorted train list "
                     f"({split_files['val'].name} absent)")
    check_disjoint(split_ids, sources)
    for split, ids in split_ids.items():
        list_missing_ids(ids, english, "captions in " + " or ".join(
            p.name for p in caption_files), sources[split])
    captions = {v: [Caption(v, text) for text in english[v]]
                for ids in split_ids.values() for v in ids}
    video_ids = [v for ids in split_ids.values() for v in ids]
    return assemble("vatex", root, split_ids, captions, 32, VATEX_LAYOUT,
                    alias=vatex_alias(video_ids), sources=notes)


# ---- msrvtt ----------------------------------------------------------------------------

MSRVTT_FOLDERS = ("", "msrvtt_data")  # the root, or CLIP4Clip's msrvtt_data.zip unpacked in it


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


def msrvtt_folder(root: Path) -> Path:
    """The folder of the annotation files: the first of ``MSRVTT_FOLDERS`` holding
    MSRVTT_data.json (the root when none does, so errors name the root's paths)."""
    return next((root / folder for folder in MSRVTT_FOLDERS
                 if (root / folder / "MSRVTT_data.json").is_file()), root)


def load_msrvtt(root: Path, train: str = "9k", val_size: int | str = 500) -> DatasetIndex:
    if train not in ("9k", "7k"):
        raise DatasetError(f"msrvtt: train must be \"9k\" or \"7k\", not {train!r}")
    val_size = whole_number(val_size, "msrvtt", "val_size")
    folder = msrvtt_folder(root)
    data_path = folder / "MSRVTT_data.json"
    train_path = folder / f"MSRVTT_train.{train}.csv"
    test_path = folder / "MSRVTT_JSFUSION_test.csv"
    require_files("msrvtt", root, [data_path, train_path, test_path], MSRVTT_LAYOUT)

    train_list = read_video_id_column(train_path)
    test_sentences = read_jsfusion_test(test_path)
    train_ids, val_ids = carve_val("msrvtt", train_list, val_size, train_path)
    split_ids = {"train": train_ids, "val": val_ids, "test": list(test_sentences)}
    check_disjoint(split_ids, {"train": train_path, "val": train_path, "test": test_path})

    sentences = msrvtt_sentences(data_path)
    list_missing_ids(train_list, sentences, f"sentence in {data_path.name}", train_path)
    captions = {v: [Caption(v, text) for text in sentences[v]] for v in train_list}
    captions.update({v: [Caption(v, text)] for v, text in test_sentences.items()})
    where = folder.relative_to(root)
    notes = [f"annotations in {where}/" if str(where) != "." else "annotations in the root",
             f"val: the last {val_size:,} of the sorted {train_path.name}"]
    return assemble("msrvtt", root, split_ids, captions, 12, MSRVTT_LAYOUT, sources=notes)


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
    return assemble(name, root, split_ids, captions, 12, layout, sources=sources)


def load_demo(root: Path, seed: int = 0) -> DatasetIndex:
    if not (root / "captions.csv").is_file():
        from avr.extract.demo_data import generate_demo  # the generator pulls in media encoders

        generate_demo(root, seed=seed)
    return load_generic(root, seed, name="demo", layout=DEMO_LAYOUT)


# name -> (loader, its options, layout)
ADAPTERS = {
    "vatex": (load_vatex, ("val_size",), VATEX_LAYOUT),
    "msrvtt": (load_msrvtt, ("train", "val_size"), MSRVTT_LAYOUT),
    "generic": (load_generic, ("seed",), GENERIC_LAYOUT),
    "demo": (load_demo, ("seed",), DEMO_LAYOUT),
}
