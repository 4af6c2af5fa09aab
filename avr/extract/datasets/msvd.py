"""MSVD (Chen and Dolan, ACL 2011) as CLIP4Clip and X-Pool read it, 12 frames, no audio.

Layout: the split lists ``{train,val,test}_list.txt`` (one clip name per line, e.g.
``-4wsuPCjDBc_5_15``) and the captions: collaborative-experts' ``raw-captions.pkl`` (CLIP4Clip's
``msvd_data.zip``: clip name -> list of token lists) or X-Pool's ``captions_msvd.json`` (clip
name -> list of caption strings), the first present, in the root or in ``msvd_data/``. Clips are
``<name>.avi`` in ``videos/``, the official ``YouTubeClips/``, CLIP4Clip's ``MSVD_Videos/`` or
X-Pool's ``vids/``.

The pickle is read without running anything (``_readers.read_plain_pickle``): only dicts, lists
and strings are built, and a pickle that names any class or function is refused, naming the
file.

Split: 1,200 train / 100 val / 670 test clips. X-Pool ships no val list: val is then the last
``val_size`` (default 100) train clips in natural order, never test.

Captions: every caption of a clip is a query (about 40 per clip); a token list is joined with
spaces, as CLIP4Clip does. A listed clip without captions is left out (a warning counts them).

Audio: MSVD is published without audio; every clip is recorded as without a track (a zero
fbank, ``has_audio`` false) whatever its file holds, and the audio heads train and evaluate on
frames alone.
"""

from __future__ import annotations

from pathlib import Path

from avr.errors import DatasetError
from avr.extract.datasets._common import (VIDEO_DIR, Adapter, Caption, DatasetFacts, Listing,
                                          check_disjoint, drop_uncaptioned,
                                          first_present, missing_files_error, unique_ids,
                                          val_from_list_or_train, videos_layout)
from avr.extract.datasets._readers import (caption_strings, read_json, read_lines,
                                           read_plain_pickle)

ANNOTATION_FOLDERS = ("", "msvd_data")
CAPTION_FILES = ("raw-captions.pkl", "captions_msvd.json")  # the first present is read
VAL_SIZE = 100  # the val list's size, when a release has none
VIDEO_FOLDERS = (VIDEO_DIR, "YouTubeClips", "MSVD_Videos", "vids")

LAYOUT = """\
in <root>/ or <root>/msvd_data/:
  train_list.txt, val_list.txt, test_list.txt   one clip name per line (1,200 / 100 / 670)
  raw-captions.pkl      {name: [[tokens], ...]} (CLIP4Clip, collaborative-experts), read
                        without running code: only dicts, lists and strings are accepted
  or captions_msvd.json {name: [captions]} (X-Pool)
  every caption is a query (about 40 per clip); without val_list.txt, val is the last
  val_size (--option val_size=100) of the sorted train list
  no audio: every clip is recorded without an audio track
""" + videos_layout("name", VIDEO_FOLDERS, "avi") + """
   e.g. <root>/YouTubeClips/-4wsuPCjDBc_5_15.avi"""

FACTS = DatasetFacts(frames=12, audio=False, videos={"train": 1_200, "val": 100, "test": 670},
                     captions_per_video={"train": 40, "val": 40, "test": 40},
                     reported_by=("X-Pool", "CLIP4Clip"))


def annotation_folder(root: Path) -> Path:
    """The first of ``ANNOTATION_FOLDERS`` holding train_list.txt (the root when none does)."""
    return next((root / folder for folder in ANNOTATION_FOLDERS
                 if (root / folder / "train_list.txt").is_file()), root)


def pickled_captions(path: Path) -> dict[str, list[str]]:
    """``raw-captions.pkl``: clip name -> captions, each a token list joined by spaces (or a
    string)."""
    data = read_plain_pickle(path)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a dict of clip name -> captions, found a "
                           f"{type(data).__name__}")
    captions = {}
    for name, value in data.items():
        if not isinstance(value, list) or not value:
            raise DatasetError(f"{path}: [{name!r}] must be a non-empty list of captions")
        texts = [" ".join(c) if isinstance(c, list) else c for c in value]
        if not all(isinstance(t, str) for t in texts):
            raise DatasetError(f"{path}: [{name!r}] holds a caption that is neither a string "
                               f"nor a list of token strings")
        kept = [" ".join(t.split()) for t in texts if t.strip()]
        if kept:
            captions[name.strip()] = kept
    return captions


def json_captions(path: Path) -> dict[str, list[str]]:
    """``captions_msvd.json``: clip name -> caption strings."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object {{\"clip name\": [captions]}}")
    return {name.strip(): caption_strings(value, f"{path}: {name}")
            for name, value in data.items()}


def read(root: Path, val_size: int | str | None = None) -> Listing:
    folder = annotation_folder(root)
    lists = {split: folder / f"{split}_list.txt" for split in ("train", "val", "test")}
    captions_path = first_present([folder / name for name in CAPTION_FILES])
    missing = [path for split, path in lists.items() if split != "val" and not path.is_file()]
    if missing or captions_path is None:
        raise missing_files_error("msvd", root, missing, LAYOUT, any_of=[] if captions_path
                                  else [folder / name for name in CAPTION_FILES])
    texts = (pickled_captions(captions_path) if captions_path.suffix == ".pkl"
             else json_captions(captions_path))
    warnings: list[str] = []
    split_ids = {split: drop_uncaptioned(unique_ids(read_lines(path), path, warnings), texts,
                                         f"captions in {captions_path.name}", path, warnings)
                 for split, path in lists.items() if path.is_file()}
    sources = dict(lists)
    notes = [f"captions from {captions_path.relative_to(root)}"]
    carved = val_from_list_or_train("msvd", split_ids, sources, lists, val_size, VAL_SIZE)
    notes += [carved] if carved else []
    check_disjoint(split_ids, sources)
    captions = {v: [Caption(v, text) for text in texts[v]]
                for ids in split_ids.values() for v in ids}
    notes.append("no audio: clips recorded without a track")
    return Listing(split_ids, captions, notes, warnings)


ADAPTER = Adapter("msvd", read, ("val_size",), LAYOUT, FACTS, VIDEO_FOLDERS)

