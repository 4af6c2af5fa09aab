"""Readers of the annotation files releases ship: JSON, headed CSV, id lists (text or HGR's
``.npy``).

Every text file goes through ``avr.files.read_text``, so a file that is not UTF-8 names its
line and the fix. A malformed file raises ``DatasetError`` naming the file, the line or entry,
and what is wrong.
"""

from __future__ import annotations

import csv
import io
import json
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


def caption_strings(value, where: str) -> list[str]:
    """A JSON value that must be a non-empty list of caption strings, stripped."""
    if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
        raise DatasetError(f"{where}: expected a non-empty list of caption strings, found "
                           f"{json.dumps(value, ensure_ascii=False)[:80]}")
    return [c.strip() for c in value]
