"""Readers of the annotation files releases ship: JSON, headed CSV, tab-separated lines, id
lists (text or HGR's ``.npy``) and pickles of plain data.

Every text file goes through ``avr.files.read_text``, so a file that is not UTF-8 names its
line and the fix. A malformed file raises ``DatasetError`` naming the file, the line or entry,
and what is wrong. A pickle is never unpickled the usual way: ``read_plain_pickle`` builds only
dicts, lists and strings and refuses, before anything runs, every reference to a class or
function (the way a pickle runs code).
"""

from __future__ import annotations

import csv
import io
import json
import pickle
from pathlib import Path

import numpy as np

from avr.errors import DatasetError
from avr.files import read_text


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


def read_tab_rows(path: Path, fields: tuple[str, ...]) -> list[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank line of a headerless tab-separated file whose
    lines hold exactly ``fields`` (no quoting: a sentence may hold quotes and commas)."""
    rows = []
    for line, text in enumerate(read_text(path).splitlines(), start=1):
        if not text.strip():
            continue
        values = text.split("\t")
        if len(values) != len(fields):
            raise DatasetError(f"{path}:{line}: {len(values)} tab-separated field(s), expected "
                               f"{len(fields)} ({', '.join(fields)})")
        rows.append((line, [value.strip() for value in values]))
    return rows


def read_lines(path: Path) -> list[str]:
    """The non-blank lines of a text file, stripped."""
    return [line.strip() for line in read_text(path).splitlines() if line.strip()]


def read_id_list(path: Path) -> list[str]:
    """Video ids from a text list (one per line) or an HGR ``.npy`` array of names."""
    if path.suffix == ".npy":
        return read_npy_names(path)
    return read_lines(path)


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


def read_json_id_list(path: Path) -> list[str]:
    """A JSON list of video id strings (ActivityNet's ``train_ids.json``)."""
    ids = read_json(path)
    if not isinstance(ids, list):
        raise DatasetError(f"{path}: expected a JSON list of video ids, found "
                           f"{type(ids).__name__}")
    for i, video_id in enumerate(ids):
        if not isinstance(video_id, str) or not video_id.strip():
            raise DatasetError(f"{path}: entry {i} is not a video id: "
                               f"{json.dumps(video_id, ensure_ascii=False)[:80]}")
    return [video_id.strip() for video_id in ids]


def caption_strings(value, where: str) -> list[str]:
    """A JSON value that must be a non-empty list of caption strings, stripped."""
    if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
        raise DatasetError(f"{where}: expected a non-empty list of caption strings, found "
                           f"{json.dumps(value, ensure_ascii=False)[:80]}")
    return [c.strip() for c in value]


# ---- pickles of plain data -----------------------------------------------------------------

PLAIN_TYPES = (dict, list, str)
MAX_DEPTH = 8  # deeper than any caption file nests; also ends a list that holds itself


class _PlainDataUnpickler(pickle.Unpickler):
    """Runs pickle's own opcodes, which build containers, strings and numbers, and nothing
    else: a pickle runs code only by naming a callable (a global, or a persistent id), and
    every such name is refused here before it is looked up."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it names {module}.{name}, which unpickling would import "
                                     f"and may call")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it names a persistent object")


def read_plain_pickle(path: Path):
    """The dicts, lists and strings pickled in ``path``, built without running any code.
    Python 2 byte strings are read as UTF-8. Anything else (a class, a function, numbers,
    bytes, tuples) is refused naming the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise DatasetError(f"{path}: cannot be read ({error.strerror})") from None
    try:
        value = _PlainDataUnpickler(io.BytesIO(data), encoding="utf-8").load()
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: a string in it is not UTF-8 ({error.reason} at byte "
                           f"{error.start})") from None
    except Exception as error:  # any malformed or hostile pickle: refused, never run
        raise DatasetError(f"{path}: refused: not a pickle of plain dicts, lists and strings "
                           f"({error}); avr reads pickles without running code") from None
    check_plain(value, path)
    return value


def check_plain(value, path: Path, where: str = "", depth: int = 0) -> None:
    """Refuses, naming the file and the place, anything but dicts of strings, lists and
    strings."""
    if depth > MAX_DEPTH:
        raise DatasetError(f"{path}: refused: nested deeper than {MAX_DEPTH} at {where or 'top'}")
    if not isinstance(value, PLAIN_TYPES):
        raise DatasetError(f"{path}: refused: {where or 'the top level'} holds a "
                           f"{type(value).__name__}; only dicts, lists and strings are accepted")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise DatasetError(f"{path}: refused: a key of {where or 'the top level'} is a "
                                   f"{type(key).__name__}; only string keys are accepted")
            check_plain(item, path, f"{where}[{key!r}]", depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_plain(item, path, f"{where}[{i}]", depth + 1)
