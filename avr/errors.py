"""Every exception avr raises for a user: a message they can act on, printed by the CLI as one
``error:`` line without a traceback (``avr --debug`` shows it). One module, so that a caller can
catch any of them and a reader finds them all in one place."""

from __future__ import annotations

from pathlib import Path


class AvrError(Exception):
    """Base class: the message names the file or setting and the problem."""


class DatasetError(AvrError):
    """A dataset's files are missing or malformed."""


class DecodeError(AvrError):
    """A media file could not be decoded (unreadable, truncated, empty, no video stream)."""


class CacheMismatchError(AvrError):
    """A store does not match what the run expects (schema, backbones or parameters)."""


class RunError(AvrError):
    """A run directory or checkpoint cannot be used as asked."""


class MissingExtraError(AvrError):
    """An optional dependency (an extra of the install) is not installed."""


class InputFileError(AvrError):
    """A user's file cannot be read as written (encoding, syntax, a value of the wrong type)."""


class OutputFileError(AvrError):
    """A file avr was asked to write cannot be written there (no such folder, not writable)."""


# ---- decoding ---------------------------------------------------------------------------------

# Why a clip could not be decoded, as extract records it in the store's failures.
DECODE_REASONS = ("missing_file", "zero_byte", "unreadable", "no_video_stream", "truncated",
                  "no_frames")


class ClipDecodeError(DecodeError):
    """A media file that cannot be decoded: ``path``, ``reason`` (one of DECODE_REASONS),
    ``detail``."""

    def __init__(self, path: str | Path, reason: str, detail: str):
        if reason not in DECODE_REASONS:
            raise ValueError(f"unknown decode failure reason {reason!r}")
        self.path = Path(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{path}: {detail} [{reason}]")

    def __reduce__(self):
        # Decoding runs in worker processes; the error must survive pickling intact.
        return type(self), (str(self.path), self.reason, self.detail)


# ---- stores -----------------------------------------------------------------------------------

class DamagedStoreError(AvrError):
    """Chunks under rows that count are absent or fail their checksum (``damage``: the
    ``avr.store.read.ChunkDamage`` of each)."""

    def __init__(self, store: str, damage: list):
        self.damage = damage
        shown = [d.describe() for d in damage[:10]]
        if len(damage) > 10:
            shown.append(f"... {len(damage) - 10} more")
        super().__init__(
            f"{store} is damaged:\n  " + "\n  ".join(shown) + f"\n`avr cache verify {store}` "
            f"lists all damage; `avr cache verify {store} --repair` marks the rows for "
            f"recomputation by the next `avr extract`")


class UnwrittenArrayError(AvrError):
    """A read of an array that the store leaves unwritten on purpose."""

    def __init__(self, store: str, array: str, command: str):
        self.array = array
        super().__init__(
            f"{store}: array {array} was left unwritten on purpose by `{command}`; write a store "
            f"that has it: the same command with {array} in --arrays, or with --heads naming "
            f"every head you will run")


class StoreMetadataError(CacheMismatchError):
    """A store's array metadata disagrees with the schema (``differences``: one line each)."""

    def __init__(self, store, differences: list[str]):
        self.differences = differences
        shown = differences[:5] + ([f"... {len(differences) - 5} more"]
                                   if len(differences) > 5 else [])
        super().__init__(f"{store}: the arrays' metadata disagrees with the schema ("
                         + "; ".join(shown) + "); the store's zarr.json files were edited or "
                         "damaged: re-extract it with --overwrite")


class RemoteStoreError(AvrError):
    """A store at a URL could not be reached or read (credentials, endpoint, timeouts)."""


class StoreFullError(AvrError):
    """The disk under a store ran out of space while it was written."""


class StoreLockedError(AvrError):
    """Another live process holds the store's lock."""


class LockLostError(AvrError):
    """This process no longer holds the lock it took (taken over, removed or not refreshed)."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a training run; the message says what is saved and how to resume. A
    KeyboardInterrupt, so that nothing that handles avr's errors (a sweep's trial) swallows
    it."""


# ---- sweeps -----------------------------------------------------------------------------------

class StudyLockedError(AvrError):
    """Another worker has held a sweep study's lock for longer than this worker waits."""


class StudyStorageError(AvrError):
    """A sweep's study database cannot be opened or stopped answering."""


class SweepFailedError(AvrError):
    """Every trial of a sweep failed; ``result`` holds them (their reasons in ``rows``)."""

    def __init__(self, message: str, result):
        self.result = result
        super().__init__(message)
