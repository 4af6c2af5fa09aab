"""What every dataset adapter shares: the index it returns, where videos are looked for, how
split lists are checked and how val is carved from train.

An adapter reads its release's files into a ``Listing`` (video ids per split, their captions,
what it read, what it warns about); ``assemble`` orders the listing train, val, test, finds each
video's file and returns the ``DatasetIndex`` that extract writes a store from.

Videos are looked for under ``--videos-dir`` when given (relative to the root, or absolute),
else in the folder names the dataset's releases use (``videos/``, X-Pool's ``vids/``,
CLIP4Clip's ``MSRVTT_Videos/`` ...) and last in the root itself: the first of these folders in
which any listed video has a file is used, searched in every subfolder. When none has any, the
error names every folder tried.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from avr.errors import DatasetError
from avr.store.schema import PROTOCOL_PARAGRAPHS, PROTOCOL_SENTENCES, SPLITS

# Extensions a video file may have (case-insensitive), in order of preference when one id has
# several files. DiDeMo's Flickr originals come in most of them.
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov", "m4v", "mpg", "mpeg", "3gp", "wmv",
                    "flv", "ogv", "mts")
VIDEO_DIR = "videos"
ROOT_FOLDER = ""  # the root itself, the last folder searched for videos
MISSING_WARNING_FRACTION = 0.10  # warn when more of the listed videos than this have no file


@dataclass(frozen=True)
class Caption:
    video_id: str
    text: str
    tag: str = ""


@dataclass(frozen=True)
class TextLengths:
    """Tokens kept per caption by CLIP and by RoBERTa, start and end tokens included."""

    clip: int
    roberta: int


# CLIP4Clip's and X-Pool's max_words for sentences.
SENTENCE_TOKENS = TextLengths(clip=32, roberta=32)
# A paragraph gets CLIP's whole context (77 tokens: 75 word pieces between its start and end
# tokens; CLIP4Clip keeps 64) and 256 RoBERTa tokens of its 512, which hold the words CLIP cuts.
PARAGRAPH_TOKENS = TextLengths(clip=77, roberta=256)

SENTENCES, PARAGRAPHS = PROTOCOL_SENTENCES, PROTOCOL_PARAGRAPHS  # caption protocols


def text_tokens_for(protocol: str) -> TextLengths:
    """The default text lengths of captions of ``protocol``."""
    return PARAGRAPH_TOKENS if protocol == PARAGRAPHS else SENTENCE_TOKENS


@dataclass(frozen=True)
class DatasetFacts:
    """A dataset as the papers use it: what extract defaults to, what --show-layout and the
    README state, and the split sizes `avr bench store --like` generates."""

    frames: int  # frames sampled per video unless --frames says otherwise
    protocol: str = SENTENCES  # SENTENCES: every caption a query; PARAGRAPHS: one per video
    audio: bool = True  # False: every clip is recorded without an audio track
    videos: dict[str, int] = field(default_factory=dict)  # per split, as avr splits it
    captions_per_video: dict[str, int] = field(default_factory=dict)  # per split
    reported_by: tuple[str, ...] = ()

    @property
    def text_tokens(self) -> TextLengths:
        return text_tokens_for(self.protocol)

    def summary(self) -> str:
        """Frames, text lengths, audio and the papers: the closing lines of --show-layout."""
        tokens = self.text_tokens
        lines = [f"default frames: {self.frames} (--frames sets them)"]
        if self.protocol == PARAGRAPHS:
            lines += [f"text: {tokens.clip} CLIP tokens, CLIP's whole context (75 word pieces: a "
                      f"longer paragraph loses its end",
                      f"   in the CLIP embedding and token states); {tokens.roberta} RoBERTa "
                      f"tokens of its 512 keep it (HTAV reads them)",
                      "   (--clip-text-tokens, --roberta-text-tokens)"]
        else:
            lines.append(f"text: {tokens.clip} CLIP tokens, {tokens.roberta} RoBERTa tokens per "
                         f"caption (--clip-text-tokens, --roberta-text-tokens)")
        if not self.audio:
            lines.append("audio: none; every clip is recorded without an audio track")
        if self.reported_by:
            lines.append(f"reported by: {', '.join(self.reported_by)}")
        return "\n".join(lines)


@dataclass
class Listing:
    """What an adapter read: video ids per split, their captions and what to report."""

    split_ids: dict[str, list[str]]
    captions: dict[str, list[Caption]]  # video id -> its captions, in order
    sources: list[str] = field(default_factory=list)  # which files were read, for the report
    warnings: list[str] = field(default_factory=list)  # shown before any work, with counts
    alias: Callable[[str], str | None] | None = None  # another name a video's file may have
    protocol: str | None = None  # the caption protocol when an option changed the dataset's


@dataclass(frozen=True)
class Adapter:
    """One dataset: how to read it, the options it takes, its documented layout, its facts
    and the folders its releases keep videos in."""

    name: str
    read: Callable[..., Listing]  # (root, **options) -> Listing
    options: tuple[str, ...]
    layout: str
    facts: DatasetFacts
    video_folders: tuple[str, ...] = (VIDEO_DIR, "vids")

    def describe(self) -> str:
        """Its layout and facts, as --show-layout prints them."""
        return f"{self.layout}\n{self.facts.summary()}"


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
    video_dir: Path | None = None  # the folder the videos were found in
    text_tokens: TextLengths = SENTENCE_TOKENS  # default text lengths of the captions
    protocol: str = SENTENCES  # the caption protocol (PARAGRAPHS: one paragraph per video)
    audio: bool = True  # False: the dataset has no audio; clips are recorded without a track
    warnings: list[str] = field(default_factory=list)

    def listing_report(self) -> str:
        """One line: videos listed per split, how many have a file, the files read."""
        per_split = ", ".join(f"{split} {count:,}" for split, count in
                              Counter(self.video_splits).items())
        found = len(self.video_ids) - len(self.missing_videos)
        folder = self.video_dir if self.video_dir is not None else self.root / VIDEO_DIR
        line = (f"{self.name}: {len(self.video_ids):,} videos listed ({per_split}), {found:,} "
                f"with a file under {folder}")
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
                f"{self.video_paths[row]}); they will be recorded as missing_file. Check --root, "
                f"--videos-dir and `avr extract --dataset {self.name} --show-layout`")


def videos_layout(id_name: str, folders: tuple[str, ...] = (VIDEO_DIR, "vids"),
                  extension: str = "mp4") -> str:
    """The layout lines that say where the videos of a dataset are looked for."""
    first, *others = folders
    then = "".join(f"<root>/{name}/, " for name in others)
    others_ext = " .".join(e for e in VIDEO_EXTENSIONS[:6] if e != extension)
    return (f"<root>/{first}/**/<{id_name}>.{extension} (or .{others_ext} ...), in any folder "
            f"under {first}/\n"
            f"   if none of the listed videos is there: {then}then the root itself\n"
            f"   --videos-dir PATH (relative to <root> or absolute) names the folder instead")


# ---- errors ------------------------------------------------------------------------------

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


def whole_number(value, name: str, option: str) -> int:
    """An option that may arrive as text (``--option val_size=500``) as an int."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DatasetError(f"{name}: {option} must be a whole number, not {value!r}") from None


def one_of(value, choices: tuple[str, ...], name: str, option: str) -> str:
    """An option that must be one of ``choices``."""
    if value not in choices:
        raise DatasetError(f"{name}: {option} must be {' or '.join(choices)}, not {value!r}")
    return value


# ---- splits ------------------------------------------------------------------------------

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


def list_missing_ids(ids: list[str], known, what: str, source: Path) -> None:
    missing = [v for v in ids if v not in known]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DatasetError(f"{len(missing)} video id(s) in {source} have no {what}: {shown}")


def unique_ids(ids: list[str], source: Path, warnings: list[str]) -> list[str]:
    """``ids`` with each repeat dropped (the first stays); a warning counts the repeats."""
    kept = list(dict.fromkeys(ids))
    if len(kept) < len(ids):
        repeated = [v for v, n in Counter(ids).items() if n > 1]
        warnings.append(f"{len(ids) - len(kept):,} repeated id(s) in {source} (e.g. "
                        f"{repeated[0]}); each video is listed once")
    return kept


def drop_uncaptioned(ids: list[str], captions: dict, what: str, source: Path,
                     warnings: list[str]) -> list[str]:
    """The ``ids`` that have captions; a warning counts and names the others, left out."""
    kept = [v for v in ids if v in captions]
    dropped = [v for v in ids if v not in captions]
    if dropped:
        shown = ", ".join(dropped[:3]) + (" ..." if len(dropped) > 3 else "")
        warnings.append(f"{len(dropped):,} of the {len(ids):,} ids in {source} have no {what} "
                        f"and are left out: {shown}")
    return kept


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


def val_from_list_or_train(name: str, split_ids: dict[str, list[str]],
                           sources: dict[str, Path], lists: dict[str, Path],
                           val_size: int | str | None, default_size: int) -> str | None:
    """A release whose val list may be absent: with ``lists["val"]`` read into ``split_ids``,
    it is the val split and ``val_size`` is refused; without it, val is carved from the end of
    the train list (``carve_val``, ``default_size`` ids unless ``val_size`` says). Updates
    ``split_ids`` and ``sources`` in place; returns the note that says where val came from."""
    if "val" in split_ids:
        if val_size is not None:
            raise DatasetError(f"{name}: val_size applies only to a release without a val "
                               f"list; {lists['val']} is the val split")
        return None
    size = default_size if val_size is None else whole_number(val_size, name, "val_size")
    split_ids["train"], split_ids["val"] = carve_val(name, split_ids["train"], size,
                                                     lists["train"])
    sources["val"] = lists["train"]
    return f"val: the last {size:,} of the sorted train list ({lists['val'].name} absent)"


# ---- videos ------------------------------------------------------------------------------

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


def match_videos(found: dict[str, Path], video_dir: Path, video_ids: list[str],
                 alias: Callable[[str], str | None] | None = None
                 ) -> tuple[list[Path], list[str]]:
    """The file of each id among ``found`` (or of its ``alias``, another name the file may
    have), or the expected ``video_dir/<id>.mp4`` if none; and the ids without a file."""
    paths, missing = [], []
    for video_id in video_ids:
        other = alias(video_id) if alias is not None else None
        path = found.get(video_id) or (found.get(other) if other else None)
        if path is None:
            missing.append(video_id)
            path = video_dir / f"{video_id}.mp4"
        paths.append(path)
    return paths, missing


def video_folder_candidates(root: Path, folders: tuple[str, ...],
                            videos_dir: str | Path | None) -> list[Path]:
    """The folders to search, in order: ``videos_dir`` alone when given (relative to the root,
    or absolute; it must exist), else ``folders`` under the root, then the root itself."""
    if videos_dir is not None:
        folder = root / Path(videos_dir).expanduser()
        if not folder.is_dir():
            raise DatasetError(f"--videos-dir {videos_dir}: no such folder ({folder})")
        return [folder]
    return [root / name for name in (*folders, ROOT_FOLDER)]


def find_videos(name: str, root: Path, video_ids: list[str], folders: list[Path], layout: str,
                alias: Callable[[str], str | None] | None = None
                ) -> tuple[Path, list[Path], list[str]]:
    """(the folder used, each id's file or expected path, the ids without a file): the first
    of ``folders`` in which any listed video has a file. Fails, naming every folder tried and
    the paths it expected, when none has any."""
    if not video_ids:
        return folders[0], [], []
    tried = []
    for folder in folders:
        if not folder.is_dir():
            tried.append(f"{folder} (absent)")
            continue
        paths, missing = match_videos(video_files(folder), folder, video_ids, alias)
        if len(missing) < len(video_ids):
            return folder, paths, missing
        tried.append(f"{folder} (no listed video)")
    expected = "\n".join(f"  {folders[0] / f'{v}.mp4'}" for v in video_ids[:3])
    raise DatasetError(
        f"{name}: none of the {len(video_ids):,} listed videos has a file under {folders[0]}; "
        f"expected, e.g.:\n{expected}\n  ...\nfolders tried:\n"
        + "".join(f"  {line}\n" for line in tried)
        + f"give the folder with --videos-dir. Expected layout under {root}:\n{layout}")


def assemble(adapter: Adapter, root: Path, listing: Listing,
             videos_dir: str | Path | None = None) -> DatasetIndex:
    """Order videos train, val, test, group their captions in the same order and find their
    files (``video_folder_candidates``)."""
    split_ids = listing.split_ids
    video_ids = [v for split in SPLITS for v in split_ids.get(split, [])]
    video_splits = [split for split in SPLITS for _ in split_ids.get(split, [])]
    captions = [c for v in video_ids for c in listing.captions[v]]
    folders = video_folder_candidates(root, adapter.video_folders, videos_dir)
    video_dir, video_paths, missing = find_videos(adapter.name, root, video_ids, folders,
                                                  adapter.layout, listing.alias)
    facts = adapter.facts
    protocol = listing.protocol or facts.protocol
    return DatasetIndex(name=adapter.name, root=root, video_ids=video_ids,
                        video_paths=video_paths, video_splits=video_splits, captions=captions,
                        default_frames=facts.frames, layout=adapter.layout,
                        missing_videos=missing, sources=listing.sources, video_dir=video_dir,
                        text_tokens=text_tokens_for(protocol), protocol=protocol,
                        audio=facts.audio, warnings=listing.warnings)
