"""Where a store lives: a local path or an fsspec URL (``s3://``, ``gs://``, ``memory://``).
The one set of helpers every command uses to name, reach and record a store or a file in it.

- ``store_location``: a path or URL as given -> a ``Path`` (local, ``file://`` included) or a
  URL string; ``store_filesystem``: the fsspec filesystem and the path within it, failing with
  the package to install when a protocol is missing;
- ``location_text``: how runs and indexes record a location (an absolute path or the URL);
- ``store_member``: a file or array inside a store;
- ``remote_options``: connect and read timeouts and a bounded retry with backoff for stores at
  ``s3://`` URLs (``AVR_REMOTE_TIMEOUT`` seconds, ``AVR_REMOTE_ATTEMPTS`` tries per request);
  ``remote_failure``: a failure of such a store (credentials, endpoint, timeout) as one
  ``RemoteStoreError`` naming the URL and the cause.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from avr.errors import AvrError, RemoteStoreError

TIMEOUT_ENV, ATTEMPTS_ENV = "AVR_REMOTE_TIMEOUT", "AVR_REMOTE_ATTEMPTS"
DEFAULT_TIMEOUT_S, DEFAULT_ATTEMPTS = 20.0, 3
_reached: list[str] = []  # URLs of stores this process reached, the latest last


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
        options = remote_options(location)
        fs, path = fsspec.core.url_to_fs(str(location), **options)
        if options:
            bounded(fs)
        return fs, path
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


def remote_options(location: str | Path) -> dict:
    """fsspec storage options bounding every request to the store at ``location``: for
    ``s3://`` connect and read timeouts of ``AVR_REMOTE_TIMEOUT`` seconds and at most
    ``AVR_REMOTE_ATTEMPTS`` tries with exponential backoff (botocore's standard retry mode; the
    filesystem made with them is ``bounded``). Empty for local paths and other protocols."""
    location = store_location(location)
    if isinstance(location, Path):
        return {}
    protocol = location.split("://", 1)[0]
    if protocol not in ("s3", "s3a"):
        return {}
    if location not in _reached:
        _reached.append(location)
    timeout, attempts = remote_limits()
    return {"config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout,
                              "retries": {"max_attempts": attempts, "mode": "standard"},
                              "http_session_cls": _session_without_expect()}}


_SESSION_CLASS: list = []


def _session_without_expect():
    """aiobotocore's HTTP session, sending uploads without ``Expect: 100-continue``: aiohttp
    waits for the ``100 Continue`` with no timeout, so an endpoint that never answers would
    hold an upload forever; without it, the read timeout bounds the wait for the answer."""
    if not _SESSION_CLASS:
        from aiobotocore.httpsession import AIOHTTPSession

        class SessionWithoutExpect(AIOHTTPSession):
            async def send(self, request):
                if "Expect" in request.headers:
                    del request.headers["Expect"]
                return await super().send(request)

        _SESSION_CLASS.append(SessionWithoutExpect)
    return _SESSION_CLASS[0]


def bounded(fs) -> None:
    """Leave the tries of a filesystem made with ``remote_options`` to botocore: s3fs would
    otherwise try each failed request up to 5 times more, each with botocore's own tries."""
    if hasattr(fs, "retries"):
        fs.retries = 1


def remote_limits() -> tuple[float, int]:
    """(seconds per connect or read, tries per request) from the environment."""
    def number(name: str, default, kind):
        text = os.environ.get(name)
        if text is None:
            return default
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or value == float("inf"):
            raise AvrError(f"{name}={text}: expected a positive finite {kind.__name__}")
        return value

    return number(TIMEOUT_ENV, DEFAULT_TIMEOUT_S, float), number(ATTEMPTS_ENV, DEFAULT_ATTEMPTS,
                                                                 int)


_REMOTE_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "urllib3")


def remote_failure(error: BaseException) -> RemoteStoreError | None:
    """``error`` as one line naming the remote store this process last reached and the cause,
    when it is a failure of the remote filesystem (botocore, aiohttp, s3fs or an OSError raised
    while a store at a URL was in use); None otherwise."""
    if not _reached or isinstance(error, AvrError):
        return None
    modules = [kind.__module__ for kind in type(error).__mro__]
    if not (isinstance(error, (OSError, TimeoutError))
            or any(module.startswith(_REMOTE_MODULES) for module in modules)):
        return None
    cause = " ".join(str(error).split()) or type(error).__name__
    timeout, attempts = remote_limits()
    return RemoteStoreError(f"{_reached[-1]}: {type(error).__name__}: {cause} (each request "
                            f"tried {attempts} times, {timeout:g} s timeouts: "
                            f"{TIMEOUT_ENV}, {ATTEMPTS_ENV})")
