"""The cache schema: every array name, shape, dtype and attribute of an avr store.

This is the one module that spells array names. The extract stage writes through it, the fuse
and eval stages read through it; nothing else names an array with a string literal.

One Zarr v3 group per dataset. Rows of the video arrays are videos (N), rows of the caption
arrays are captions (M); ``caption_video[j]`` is the video row of caption j. Every array is
chunked along rows only, so a row range is a contiguous set of chunk files.

Video arrays (N rows)
    video_id              str   [N]
    video_split           int8  [N]                 index into attrs["splits"]
    video_done            bool  [N]                 set only after every array of the row is written
    frame_embeddings      f16   [N, F, D_clip]      CLIP image embedding per frame (after projection)
    frame_mask            bool  [N, F]              False for padded frames of short videos
    swin_stage{k}         f16   [N, F, g_k*g_k, C_k] level k of the Swin pyramid: the k-th Swin
                                                    stage the store keeps (Swin's stage 1 for k = 0
                                                    with the default stages 1-3), adaptive-avg-
                                                    pooled to g_k x g_k
    audio_patch_tokens    f16   [N, 1212, D_ast]    AST patch tokens (12 freq x 101 time, freq-major)
    audio_global_tokens   f16   [N, 2, D_ast]       AST CLS and distillation tokens
    audio_time_tokens     f16   [N, 101, D_ast]     patch tokens averaged over the 12 frequency rows
    audio_pooled_token    f16   [N, D_ast]          AST's final LayerNorm of the mean of its pre-norm
                                                    CLS and distillation tokens (AVIGATE's global
                                                    audio token); in stores whose spec has
                                                    ``audio_pooled_token`` (written since it exists)
    has_audio             bool  [N]                 False: no audio track, the fbank was all zeros

Caption arrays (M rows)
    caption_video         int32 [M]
    caption_text          str   [M]
    caption_tag           str   [M]                 optional label for subset metrics ("" when none;
                                                    the demo tags captions only sound can decide)
    caption_done          bool  [M]
    text_embeddings       f16   [M, D_clip]         CLIP sentence embedding (EOT token, projected)
    text_token_states     f16   [M, L_clip, D_clip] CLIP text tokens after ln_final, projected
    text_token_mask       bool  [M, L_clip]
    roberta_states        f16   [M, L_rob, D_rob]   RoBERTa last hidden states
    roberta_mask          bool  [M, L_rob]

Media arrays (N rows; what a person sees, no head reads them; optional: stores written before
them lack them, and an absent chunk means "none recorded" for its rows, never damage)
    video_path            str   [N]                 the clip's file relative to the dataset root
                                                    (attrs["media_root"]); "" when unknown
    thumbnails            uint8 [N, THUMBNAIL_BYTES] one JPEG: a strip of THUMBNAIL_FRAMES of the
                                                    sampled frames side by side, zero-padded (a
                                                    JPEG ends in 0xFFD9, so trailing zeros are
                                                    padding); all zeros when none

Head inputs that are not stored (set on the video rows a head encodes, never written)
    audio_hidden          bool  [N]                 True: `avr eval --modalities v` hides this
                                                    clip's audio; the head leaves audio out

Attributes: ``schema_version``, ``spec`` (CacheSpec: dataset, every backbone with weights tag and
library version, every preprocessing parameter), ``splits``, ``created``, ``failures``; a store
written by `avr bench store` also has ``generator`` (its settings) and, when it leaves feature
arrays out on purpose, ``unwritten`` (on the root and on each such array, see ATTR_UNWRITTEN).

Integrity: every array is written with the Zarr v3 ``crc32c`` codec (a checksum of each stored
chunk, checked on read) and every chunk a writer writes is stored, even one equal to the fill
value, so an absent chunk under done rows is damage, never "all zeros"
(``avr.store.integrity``).
Stores written before checksums stay readable. A store is complete once its root ``zarr.json``
carries ``schema_version``: creation writes that last, so a kill during creation leaves an
unfinished store that the next extract recognises and creates again. ``avr.lock`` at the root
is the writer's lock (``avr.store.lock``). This module does no I/O: ``avr.store.group`` creates
and opens stores.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")

# ---- video arrays -------------------------------------------------------------------------
VIDEO_ID = "video_id"
VIDEO_SPLIT = "video_split"
VIDEO_DONE = "video_done"
FRAME_EMBEDDINGS = "frame_embeddings"
FRAME_MASK = "frame_mask"
AUDIO_PATCH_TOKENS = "audio_patch_tokens"
AUDIO_GLOBAL_TOKENS = "audio_global_tokens"
AUDIO_TIME_TOKENS = "audio_time_tokens"
AUDIO_POOLED_TOKEN = "audio_pooled_token"
HAS_AUDIO = "has_audio"
AUDIO_HIDDEN = "audio_hidden"  # not stored: see the module docstring

# ---- caption arrays -----------------------------------------------------------------------
CAPTION_VIDEO = "caption_video"
CAPTION_TEXT = "caption_text"
CAPTION_TAG = "caption_tag"
CAPTION_DONE = "caption_done"
TEXT_EMBEDDINGS = "text_embeddings"
TEXT_TOKEN_STATES = "text_token_states"
TEXT_TOKEN_MASK = "text_token_mask"
ROBERTA_STATES = "roberta_states"
ROBERTA_MASK = "roberta_mask"

# ---- media arrays (optional: see the module docstring) ------------------------------------
VIDEO_PATH = "video_path"
THUMBNAILS = "thumbnails"
MEDIA_ARRAYS = (VIDEO_PATH, THUMBNAILS)
THUMBNAIL_FRAMES = 4  # frames per strip, spread over the clip's sampled frames
THUMBNAIL_HEIGHT = 96  # pixels (frames decoded smaller stay as decoded)
THUMBNAIL_BYTES = 32 << 10  # room for one strip's JPEG

# ---- attributes ---------------------------------------------------------------------------
ATTR_SCHEMA_VERSION = "schema_version"
ATTR_SPEC = "spec"
ATTR_SPLITS = "splits"
ATTR_CREATED = "created"
ATTR_FAILURES = "failures"
# Arrays a store leaves unwritten on purpose (`avr bench store --arrays/--heads`): on the root,
# {name: the command that left it out}; on each such array, the same command. Zarr keeps no
# chunk for them; a read of one fails with that reason, never as damage.
ATTR_UNWRITTEN = "unwritten"
ATTR_GENERATOR = "generator"  # a generated store's settings and command (avr.extract.generated)
# The dataset's caption protocol: "sentences" (every caption a query) or "paragraphs" (one
# paragraph per video; `avr eval` reports the 1:1 video-paragraph metrics). Absent: sentences.
ATTR_CAPTION_PROTOCOL = "caption_protocol"
PROTOCOL_SENTENCES, PROTOCOL_PARAGRAPHS = "sentences", "paragraphs"
ATTR_MEDIA_ROOT = "media_root"  # the dataset root ``video_path`` is relative to (absolute)

FAILURES_FILE = "failures.jsonl"
LOCK_FILE = "avr.lock"  # the writer's lock; takeover claims and temporaries share the prefix
INDEX_DIR = "index"  # `avr index build`'s first-stage index, by default inside the store


SWIN_PREFIX = "swin_stage"


def swin_level(k: int) -> str:
    """Name of the array holding level ``k`` of the Swin pyramid: the k-th (0-based) of the Swin
    stages the store keeps, not Swin's stage k. The on-disk name says ``stage``, as every
    store written so far spells it (docs/cache.md)."""
    return f"{SWIN_PREFIX}{k}"


# Video arrays a store may lack because it was written before they existed: a head that reads
# one falls back to what such a store holds (``stored_inputs``).
OPTIONAL_VIDEO_ARRAYS = (AUDIO_POOLED_TOKEN,)


def stored_inputs(names, spec: CacheSpec) -> tuple[str, ...]:
    """``names`` without the optional arrays a store of ``spec`` does not hold."""
    held = array_layout(spec, 0, 0)
    return tuple(name for name in names if name not in OPTIONAL_VIDEO_ARRAYS or name in held)


def on_frame_axis(name: str) -> bool:
    """Whether the rows of array ``name`` have a frame axis (dim 1): the CLIP frames, their
    mask and the Swin levels."""
    return name in (FRAME_EMBEDDINGS, FRAME_MASK) or name.startswith(SWIN_PREFIX)


# Arrays a head may ask for, split by which side of the retrieval they describe.
VIDEO_FEATURES = (FRAME_EMBEDDINGS, FRAME_MASK, AUDIO_PATCH_TOKENS, AUDIO_GLOBAL_TOKENS,
                  AUDIO_TIME_TOKENS, AUDIO_POOLED_TOKEN, HAS_AUDIO)
CAPTION_FEATURES = (TEXT_EMBEDDINGS, TEXT_TOKEN_STATES, TEXT_TOKEN_MASK, ROBERTA_STATES,
                    ROBERTA_MASK)
# Written whole when the store is created: every chunk of them holds data.
INDEX_ARRAYS = (VIDEO_ID, VIDEO_SPLIT, CAPTION_VIDEO, CAPTION_TEXT, CAPTION_TAG)
# The done mask of each kind of row: a row's features count only where it is True.
DONE_MASKS = {"video": VIDEO_DONE, "caption": CAPTION_DONE}
CAPTION_ARRAYS = (CAPTION_VIDEO, CAPTION_TEXT, CAPTION_TAG, CAPTION_DONE, *CAPTION_FEATURES)


def rows_of(name: str) -> str:
    """"video" or "caption": what the rows of array ``name`` are."""
    return "caption" if name in CAPTION_ARRAYS else "video"


@dataclass(frozen=True)
class BackboneInfo:
    """What produced a family of arrays: enough to load the same model again."""

    name: str  # open_clip model name, HF model id or local path
    weights: str  # pretrained tag, revision, or "random:<seed>" for tiny random configs
    library: str  # "open_clip" or "transformers"
    version: str  # the library's version at extraction time


@dataclass(frozen=True)
class AudioParams:
    """Audio preprocessing, TEFAL/AST style (docs/methods.md G, docs/cache.md)."""

    sample_rate: int = 16_000
    num_mel_bins: int = 128
    target_length: int = 1024
    frame_length_ms: float = 25.0
    frame_shift: str = "adaptive"  # f_shift_ms = n_samples * 1000 / (sr * target_length)
    window_type: str = "hanning"
    htk_compat: bool = True
    dither: float = 0.0
    fbank_mean: float = -4.2677393  # AST AudioSet statistics
    fbank_std: float = 4.5689974
    normalization: str = "(fbank - mean) / (2 * std); a clip without audio stays all zeros"


@dataclass(frozen=True)
class CacheSpec:
    """Every parameter that decides the content of a store. Two stores with equal specs are
    interchangeable; a run refuses a store whose spec differs from the one it was trained on."""

    dataset: str
    num_frames: int
    image_size: int
    clip_dim: int
    clip_text_len: int
    swin_channels: tuple[int, ...]
    swin_grids: tuple[int, ...]
    ast_dim: int
    roberta_dim: int
    roberta_len: int
    backbones: dict[str, BackboneInfo]  # keys: clip, swin, ast, roberta
    audio: AudioParams = field(default_factory=AudioParams)
    frame_sampling: str = "uniform: centre of F equal segments of the video's duration"
    ast_freq_patches: int = 12
    ast_time_patches: int = 101
    dtype: str = "float16"
    # Whether the store holds AUDIO_POOLED_TOKEN: stores written before it existed do not (their
    # spec has no such key, and keeps its fingerprint).
    audio_pooled_token: bool = False

    @property
    def ast_patches(self) -> int:
        return self.ast_freq_patches * self.ast_time_patches

    @property
    def num_swin_stages(self) -> int:
        return len(self.swin_channels)

    def to_attrs(self) -> dict[str, Any]:
        data = asdict(self)
        data["swin_channels"] = list(self.swin_channels)
        data["swin_grids"] = list(self.swin_grids)
        if not self.audio_pooled_token:
            del data["audio_pooled_token"]  # as stores written before it record their spec
        return data

    @classmethod
    def from_attrs(cls, data: dict[str, Any]) -> CacheSpec:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["backbones"] = {k: BackboneInfo(**v) for k, v in data["backbones"].items()}
        kwargs["audio"] = AudioParams(**data.get("audio", {}))
        kwargs["swin_channels"] = tuple(data["swin_channels"])
        kwargs["swin_grids"] = tuple(data["swin_grids"])
        return cls(**kwargs)

    def fingerprint(self) -> str:
        """Stable hash of the spec (library versions included)."""
        text = json.dumps(self.to_attrs(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: Any  # numpy dtype or `str` for variable-length strings
    rows: str  # "video" or "caption"
    chunk_rows: int


def _chunk_rows(row_bytes: int, target_bytes: int = 8 << 20, cap: int = 512) -> int:
    """Rows per chunk: about ``target_bytes`` of uncompressed data, at least one row."""
    return int(max(1, min(cap, target_bytes // max(row_bytes, 1))))


def array_layout(spec: CacheSpec, n_videos: int, n_captions: int, *,
                 video_chunk_rows: int | None = None) -> dict[str, ArraySpec]:
    """Every array of a store for ``spec`` with ``n_videos`` and ``n_captions`` rows.

    ``video_chunk_rows`` overrides the automatic chunking of video rows (a chunk is also the
    unit an extract writes and resumes by)."""
    half = np.dtype(spec.dtype)
    F = spec.num_frames
    per_video: dict[str, tuple[tuple[int, ...], Any]] = {
        VIDEO_ID: ((), str),
        VIDEO_SPLIT: ((), np.int8),
        VIDEO_DONE: ((), np.bool_),
        FRAME_EMBEDDINGS: ((F, spec.clip_dim), half),
        FRAME_MASK: ((F,), np.bool_),
        AUDIO_PATCH_TOKENS: ((spec.ast_patches, spec.ast_dim), half),
        AUDIO_GLOBAL_TOKENS: ((2, spec.ast_dim), half),
        AUDIO_TIME_TOKENS: ((spec.ast_time_patches, spec.ast_dim), half),
        HAS_AUDIO: ((), np.bool_),
    }
    if spec.audio_pooled_token:
        per_video[AUDIO_POOLED_TOKEN] = ((spec.ast_dim,), half)
    for k, (channels, grid) in enumerate(zip(spec.swin_channels, spec.swin_grids)):
        per_video[swin_level(k)] = ((F, grid * grid, channels), half)
    per_caption: dict[str, tuple[tuple[int, ...], Any]] = {
        CAPTION_VIDEO: ((), np.int32),
        CAPTION_TEXT: ((), str),
        CAPTION_TAG: ((), str),
        CAPTION_DONE: ((), np.bool_),
        TEXT_EMBEDDINGS: ((spec.clip_dim,), half),
        TEXT_TOKEN_STATES: ((spec.clip_text_len, spec.clip_dim), half),
        TEXT_TOKEN_MASK: ((spec.clip_text_len,), np.bool_),
        ROBERTA_STATES: ((spec.roberta_len, spec.roberta_dim), half),
        ROBERTA_MASK: ((spec.roberta_len,), np.bool_),
    }
    # All video arrays share one chunking so that a chunk-aligned row range is written whole
    # in every array; the largest row decides it (audio tokens dominate).
    video_row_bytes = max(int(np.prod(s)) * np.dtype(d if d is not str else np.uint8).itemsize
                          for s, d in per_video.values())
    caption_row_bytes = max(int(np.prod(s)) * np.dtype(d if d is not str else np.uint8).itemsize
                            for s, d in per_caption.values())
    video_chunk = min(video_chunk_rows or _chunk_rows(video_row_bytes), max(n_videos, 1))
    caption_chunk = min(_chunk_rows(caption_row_bytes), max(n_captions, 1))
    layout = {name: ArraySpec((n_videos, *shape), dtype, "video", video_chunk)
              for name, (shape, dtype) in per_video.items()}
    layout.update({name: ArraySpec((n_captions, *shape), dtype, "caption", caption_chunk)
                   for name, (shape, dtype) in per_caption.items()})
    return layout


def media_layout(n_videos: int, video_chunk_rows: int) -> dict[str, ArraySpec]:
    """The media arrays of a store with ``n_videos`` rows, chunked like its video arrays."""
    chunk = min(video_chunk_rows, max(n_videos, 1))
    return {VIDEO_PATH: ArraySpec((n_videos,), str, "video", chunk),
            THUMBNAILS: ArraySpec((n_videos, THUMBNAIL_BYTES), np.uint8, "video", chunk)}


def spec_differences(found: CacheSpec, expected: CacheSpec, *, ignore_versions: bool = False
                     ) -> list[str]:
    """Human-readable list of what differs between two specs (empty when they match)."""
    diffs: list[str] = []
    a, b = found.to_attrs(), expected.to_attrs()
    for key in sorted(set(a) | set(b)):
        if key == "backbones":
            for role in sorted(set(a[key]) | set(b[key])):
                fa, fb = a[key].get(role), b[key].get(role)
                if fa is None or fb is None:
                    diffs.append(f"backbone {role}: {fa} != {fb}")
                    continue
                for item in ("name", "weights", "library", "version"):
                    if ignore_versions and item == "version":
                        continue
                    if fa[item] != fb[item]:
                        diffs.append(f"backbone {role} {item}: store has {fa[item]!r}, "
                                     f"expected {fb[item]!r}")
        elif a.get(key) != b.get(key):
            diffs.append(f"{key}: store has {a.get(key)!r}, expected {b.get(key)!r}")
    return diffs


def cache_identity(spec: CacheSpec) -> dict[str, Any]:
    """What a run records about the store it trained on."""
    return {"schema_version": SCHEMA_VERSION, "dataset": spec.dataset,
            "fingerprint": spec.fingerprint(), "spec": spec.to_attrs()}


COMPRESSIONS = ("zstd", "lz4", "none")  # --compression of the commands that create stores


def split_code(split: str) -> int:
    try:
        return SPLITS.index(split)
    except ValueError:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}") from None
