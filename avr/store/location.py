"""Where a store lives: a local path or an fsspec URL (``s3://``, ``gs://``, ``memory://``).
The one set of helpers every command uses to name, reach and record a store or a file in it.

- ``store_location``: a path or URL as given -> a ``Path`` (local, ``file://`` included) or a
  URL string; ``store_filesystem``: the fsspec filesystem and the path within it, failing with
  the package to install when a protocol is missing;
- ``location_text``: how runs and indexes record a location (an absolute path or the URL);
- ``store_member``: a file or array inside a store.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from avr.errors import AvrError


def store_location(location: str | Path) -> str | Path:
    """Where a store lives: a local path, or a URL that fsspec and zarr open (``memory://``,
    ``s3://``, ``gs://`` ...). A ``file://`` URL is taken as its local path, so a local store
    behaves the same however it is named; any other URL is kept as given."""
    text = str(location)
    if "://" not in text:
        return Path(text)
    parsed = urlparse(text)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise AvrError(f"{text}: a file:// URL names a path on this machine (file:///path); "
                           f"mount the remote disk, or use its object store URL")
        return Path(url2pathname(parsed.path))
    return text.rstrip("/")


def store_filesystem(location: str | Path):
    """The fsspec filesystem holding ``location`` and the store's path within it. Raises
    AvrError naming the package to install when the URL's protocol is not available."""
    import fsspec

    location = store_location(location)
    try:
        return fsspec.core.url_to_fs(str(location))
    except ImportError as error:  # a known protocol whose package is missing (s3fs, gcsfs, ...)
        package = _protocol_package(str(location))
        raise AvrError(f"{location}: {error}" + (f"; pip install {package}" if package else "")
                       ) from None
    except ValueError as error:
        raise AvrError(f"{location}: {error}; give a local path or an fsspec URL such as "
                       f"s3://bucket/cache") from None


def reachable_location(location: str | Path) -> str | Path:
    """``store_location`` of a store about to be written, its filesystem checked first: a URL
    whose protocol is not installed fails before any work, naming the package."""
    store_filesystem(location)
    return store_location(location)


def _protocol_package(url: str) -> str:
    """The package fsspec imports for the protocol of ``url`` (s3fs for s3://, gcsfs for gs://;
    "" when the protocol is built into fsspec and only its dependencies are missing)."""
    from fsspec.registry import known_implementations

    protocol = url.split("://", 1)[0]
    module = known_implementations.get(protocol, {}).get("class", "").split(".")[0]
    return "" if module == "fsspec" else module


def location_text(location: str | Path) -> str:
    """A store or index location as runs and indexes record it: an absolute local path, or the
    URL as given."""
    location = store_location(location)
    return str(location.resolve()) if isinstance(location, Path) else location


def store_member(location: str | Path, name: str) -> str | Path:
    """The location of ``name`` (an array, ``failures.jsonl``) inside the store."""
    location = store_location(location)
    return location / name if isinstance(location, Path) else f"{location}/{name}"
