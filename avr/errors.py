"""Exceptions whose message a user can act on; the CLI prints them without a traceback."""

from __future__ import annotations


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
