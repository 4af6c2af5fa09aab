"""What a run records of the store it trained on, and how a resumed run knows the store it is
given is that store: the spec (backbones, preprocessing: ``schema.cache_identity``) and a digest
of the content (video ids and splits, caption texts and the video of each), which two stores
made with one spec from different videos do not share.

- ``store_identity``: the identity a run writes into its config.json;
- ``identity_differences``: what differs between a recorded identity and a store's, in words.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from avr.store import schema
from avr.store.read import read_rows
from avr.store.schema import CacheSpec


def content_identity(group) -> dict[str, Any]:
    """Rows and a digest of the index arrays: ids, splits, caption texts and their videos."""
    digest = hashlib.sha256()
    for name in (schema.VIDEO_ID, schema.CAPTION_TEXT):
        for value in read_rows(group[name]):
            digest.update(str(value).encode())
            digest.update(b"\0")
    for name in (schema.VIDEO_SPLIT, schema.CAPTION_VIDEO):
        digest.update(np.ascontiguousarray(read_rows(group[name])).tobytes())
    return {"videos": int(group[schema.VIDEO_ID].shape[0]),
            "captions": int(group[schema.CAPTION_TEXT].shape[0]),
            "digest": digest.hexdigest()[:16]}


def store_identity(group, spec: CacheSpec) -> dict[str, Any]:
    return {**schema.cache_identity(spec), "content": content_identity(group)}


def identity_differences(recorded: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """What differs between the identity a run recorded and a store's (empty when they agree);
    a run recorded before content digests is checked on its spec alone."""
    diffs = schema.spec_differences(CacheSpec.from_attrs(found["spec"]),
                                    CacheSpec.from_attrs(recorded["spec"]), ignore_versions=True)
    before, now = recorded.get("content"), found.get("content")
    if before is not None and now is not None and before != now:
        diffs.append(f"content: the run's store had {before['videos']} videos and "
                     f"{before['captions']} captions (digest {before['digest']}), this one has "
                     f"{now['videos']} and {now['captions']} (digest {now['digest']}): other "
                     f"videos, splits or captions")
    return diffs
