"""Files and folders at a location (a local path or an fsspec URL such as ``s3://bucket/runs``),
copied to and from this machine: how a sweep trial trained here reaches shared storage, how a
run kept there is read back, and the few edits a sweep makes there.

- Every function takes a local path as well as a URL (fsspec's local filesystem), so callers
  need not tell them apart.
- A failure of the filesystem (credentials, a refused endpoint, a missing bucket) is one
  AvrError naming the location and the cause.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from avr.errors import AvrError
from avr.store.location import location_text, store_filesystem, store_location


def is_url(location: str | Path) -> bool:
    return isinstance(store_location(location), str)


def join(location: str | Path, *names: str) -> str | Path:
    """``location`` / ``names``, a Path for a local location, a URL otherwise."""
    location = store_location(location)
    if isinstance(location, Path):
        return location.joinpath(*names)
    return "/".join((location, *names))


@contextlib.contextmanager
def _reaching(location: str | Path):
    try:
        yield
    except AvrError:
        raise
    except Exception as error:  # fsspec's backends raise their own kinds (botocore, aiohttp)
        raise AvrError(f"{location_text(location)}: {type(error).__name__}: {error}") from error


def upload(folder: Path, location: str | Path) -> None:
    """Copy every file under the local ``folder`` to ``location`` (same relative paths)."""
    with _reaching(location):
        fs, root = store_filesystem(location)
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            fs.put_file(str(path), f"{root}/{path.relative_to(folder).as_posix()}")


def upload_file(path: Path, location: str | Path) -> None:
    with _reaching(location):
        fs, target = store_filesystem(location)
        fs.put_file(str(path), target)


def download(location: str | Path, folder: Path) -> Path:
    """Copy every file under ``location`` into the local ``folder``; ``folder``."""
    with _reaching(location):
        fs, root = store_filesystem(location)
        found = fs.find(root)
        if not found:
            raise AvrError(f"{location_text(location)}: nothing there")
        for remote in found:
            target = folder / remote[len(root):].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(target))
    return folder


def mirror(location: str | Path, root: Path) -> Path:
    """A fresh local copy of the folder at the URL ``location``, under ``root`` at the URL's
    own path (``s3://bucket/runs/x`` -> ``root/s3/bucket/runs/x``)."""
    import shutil

    scheme, _, path = str(store_location(location)).partition("://")
    folder = root / scheme / path
    shutil.rmtree(folder, ignore_errors=True)  # nothing left over from an older copy
    return download(location, folder)


def files(location: str | Path, pattern: str) -> list[str]:
    """The files directly in ``location`` whose names match ``pattern``, as fsspec paths."""
    with _reaching(location):
        fs, root = store_filesystem(location)
        return sorted(fs.glob(f"{root}/{pattern}"))


def remove(location: str | Path, paths: list[str]) -> None:
    """Remove ``paths`` (as ``files`` returns them) from ``location``'s filesystem."""
    with _reaching(location):
        fs, _ = store_filesystem(location)
        for path in paths:
            fs.rm_file(path)


def write_text(location: str | Path, text: str) -> None:
    with _reaching(location):
        fs, path = store_filesystem(location)
        fs.pipe_file(path, text.encode())
