"""Reading the text files users hand to avr: captions, annotations, split lists, run configs.

Every reader goes through ``read_text``, so a file that is not UTF-8 (a caption list saved as
Latin-1 or Windows-1252 by a spreadsheet) fails the same way everywhere: one line naming the
file, the line and column of the first bad byte, the line as it reads, and how to convert it.
"""

from __future__ import annotations

from pathlib import Path

from avr.errors import InputFileError


def read_text(path: Path) -> str:
    """The file decoded as UTF-8 (a leading byte order mark is dropped, as Excel writes one)."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise InputFileError(f"{path}: cannot be read ({error.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise not_utf8_error(Path(path), data, error.start) from None


def not_utf8_error(path: Path, data: bytes, offset: int) -> InputFileError:
    line_start = data.rfind(b"\n", 0, offset) + 1
    line_end = data.find(b"\n", offset)
    line_text = data[line_start:line_end if line_end >= 0 else len(data)].decode(
        "utf-8", errors="replace").strip()
    if len(line_text) > 80:
        line_text = line_text[:77] + "..."
    line = data.count(b"\n", 0, offset) + 1
    return InputFileError(
        f"{path}:{line}: not UTF-8 (byte 0x{data[offset]:02x} at column {offset - line_start + 1}"
        f" in {line_text!r}); save the file as UTF-8, e.g. from Latin-1: "
        f"iconv -f latin1 -t utf-8 {path} > {path}.utf8 && mv {path}.utf8 {path}")
