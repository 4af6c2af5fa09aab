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

Head inputs that are not stored (set on the video rows a head encodes, never written)
    audio_hidden          bool  [N]                 True: `avr eval --modalities v` hides this
                                                    clip's audio; the head leaves audio out

Attributes: ``schema_version``, ``spec`` (CacheSpec: dataset, every backbone with weights tag and
library version, every preprocessing parameter), ``splits``, ``created``, ``failures``; a store
written by `avr bench store` also has ``generator`` (its settings) and, when it leaves feature
arrays out on purpose, ``unwritten`` (on the root and on each such array, see ATTR_UNWRITTEN).

Integrity: every array is written with the Zarr v3 ``crc32c`` codec (a checksum of each stored
chunk, checked on read) and every chunk a writer writes is stored, even one equal to the fill
value, so an absent chunk under done rows is damage, never "all zeros" (``avr.integrity``).
Stores written before checksums stay readable. A store is complete once its root ``zarr.json``
carries ``schema_version``: creation writes that last, so a kill during creation leaves an
unfinished store that the next extract recognises and creates again. ``avr.lock`` at the root
is the writer's lock (``avr.lock``).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np

from avr.errors import AvrError, CacheMismatchError

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

FAILURES_FILE = "failures.jsonl"
LOCK_FILE = "avr.lock"  # the writer's lock; takeover claims and temporaries share the prefix
INDEX_DIR = "index"  # `avr index build`'s first-stage index, by default inside the store


def swin_level(k: int) -> str:
    """Name of the array holding level ``k`` of the Swin pyramid: the k-th (0-based) of the Swin
    stages the store keeps, not Swin's stage k. The on-disk name says ``stage``, as every
    store written so far spells it (docs/cache.md)."""
    return f"swin_stage{k}"


# Arrays a head may ask for, split by which side of the retrieval they describe.
VIDEO_FEATURES = (FRAME_EMBEDDINGS, FRAME_MASK, AUDIO_PATCH_TOKENS, AUDIO_GLOBAL_TOKENS,
                  AUDIO_TIME_TOKENS, HAS_AUDIO)
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


# ---- store creation and opening --------------------------------------------------------------

def _zarr():
    """zarr, set up the way avr writes: every chunk stored, even one equal to the fill value
    (zarr skips those by default), so that an absent chunk always means damage."""
    import zarr

    if not zarr.config.get("array.write_empty_chunks"):
        zarr.config.set({"array.write_empty_chunks": True})
    return zarr


COMPRESSIONS = ("zstd", "lz4", "none")  # --compression of the commands that create stores


def _compressors(compression: str = "zstd") -> tuple:
    """Compression, then a crc32c checksum of the stored bytes (checked on every read).
    ``zstd`` (the default; blosc, bit shuffle, level 3) stores the least; ``lz4`` (blosc, byte
    shuffle) decodes 1.7-1.9x as fast; ``none`` keeps only the checksum, the cheapest to
    stream. fp16 tokens compress little (the generated ones to 93% with zstd, not at all with
    lz4), so a store that trains streamed on a few cores reads faster with lz4 or none
    (BENCHMARKS.md, *Memory budgets and streaming*)."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    if compression not in COMPRESSIONS:
        raise AvrError(f"unknown compression {compression!r}; choose one of "
                       f"{', '.join(COMPRESSIONS)}")
    return {"zstd": (BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"), Crc32cCodec()),
            "lz4": (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()),
            "none": (Crc32cCodec(),)}[compression]


def compression_of(array) -> str:
    """How ``array``'s chunks are compressed: the blosc compressor's name, or "none"."""
    from zarr.codecs import BloscCodec

    for codec in array.metadata.codecs:
        if isinstance(codec, BloscCodec):
            return getattr(codec.cname, "value", str(codec.cname))
    return "none"


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


def _is_lock_file(name: str) -> bool:
    return name.startswith(LOCK_FILE)


def _written_by_avr(name: str) -> bool:
    """Whether a root entry is one avr writes: arrays, metadata, the failure record, the lock,
    the first-stage index, and the temporaries of atomic writes (zarr's ``*.partial``, avr's
    ``*.tmp``)."""
    is_array = (name in (VIDEO_ID, VIDEO_SPLIT, VIDEO_DONE, *VIDEO_FEATURES, *CAPTION_ARRAYS)
                or re.fullmatch(r"swin_stage\d+", name) is not None)
    return (is_array or name in ("zarr.json", FAILURES_FILE, INDEX_DIR) or _is_lock_file(name)
            or name.endswith((".partial", ".tmp")))


def store_condition(location: str | Path) -> str:
    """What is at ``location``: "complete" (an avr store: root ``zarr.json`` with a schema
    version), "empty" (nothing but a lock), "unfinished" (what an interrupted creation or
    overwrite leaves: only entries avr writes, no complete root) or "foreign" (anything else)."""
    fs, root = store_filesystem(location)
    if _root_attrs(fs, root).get(ATTR_SCHEMA_VERSION) is not None:
        return "complete"
    try:
        names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return "empty"
    names = [name for name in names if not _is_lock_file(name)]
    if not names:
        return "empty"
    return "unfinished" if all(_written_by_avr(name) for name in names) else "foreign"


def _root_attrs(fs, root: str) -> dict[str, Any]:
    try:
        metadata = json.loads(fs.cat_file(f"{root}/zarr.json"))
    except (FileNotFoundError, ValueError):
        return {}
    return metadata.get("attributes") or {}


def clear_store(location: str | Path) -> None:
    """Delete everything at ``location`` but the lock: the root ``zarr.json`` first, so that a
    kill midway leaves an unfinished store, never a complete-looking one with arrays gone."""
    fs, root = store_filesystem(location)
    if not fs.exists(root):
        return
    if fs.exists(f"{root}/zarr.json"):
        fs.rm_file(f"{root}/zarr.json")
    for entry in fs.ls(root, detail=False):
        if not _is_lock_file(entry.rstrip("/").rsplit("/", 1)[-1]):
            fs.rm(entry, recursive=True)


def create_store(path: str | Path, spec: CacheSpec, video_ids: list[str], video_splits: list[str],
                 caption_video: list[int] | np.ndarray, caption_text: list[str],
                 caption_tags: list[str] | None = None, *, video_chunk_rows: int | None = None,
                 unwritten: dict[str, str] | None = None, attrs: dict[str, Any] | None = None,
                 compression: str = "zstd"):
    """Create a new store at ``path`` (a local path or a URL, see ``store_location``) in place
    of whatever is there but its lock. Every array is pre-allocated at its final size (zarr
    forbids safe concurrent resizes; writers fill row ranges) and the ids, splits and captions
    are written. The root's attributes, the schema version among them, are written last: until
    then the store is unfinished and a kill leaves nothing a reader takes for a store.
    ``unwritten`` maps the feature arrays the writer leaves out on purpose to the command that
    left them out (ATTR_UNWRITTEN); ``attrs`` are further root attributes; ``compression`` is
    one of COMPRESSIONS (``_compressors``). Returns the zarr group."""
    zarr = _zarr()
    compressors = _compressors(compression)
    clear_store(path)
    n_videos, n_captions = len(video_ids), len(caption_text)
    group = zarr.create_group(str(store_location(path)), zarr_format=3)
    layout = array_layout(spec, n_videos, n_captions, video_chunk_rows=video_chunk_rows)
    unwritten = dict(unwritten or {})
    for name, arr in layout.items():
        chunks = (arr.chunk_rows, *arr.shape[1:])
        marks = {ATTR_UNWRITTEN: unwritten[name]} if name in unwritten else None
        if arr.dtype is str:
            group.create_array(name, shape=arr.shape, chunks=chunks, dtype=str,
                               compressors=compressors, attributes=marks)
        else:
            group.create_array(name, shape=arr.shape, chunks=chunks, dtype=arr.dtype,
                               compressors=compressors, fill_value=0, attributes=marks)
    split_index = {s: i for i, s in enumerate(SPLITS)}
    group[VIDEO_ID][:] = np.asarray(video_ids, dtype=object)
    group[VIDEO_SPLIT][:] = np.asarray([split_index[s] for s in video_splits], dtype=np.int8)
    group[CAPTION_VIDEO][:] = np.asarray(caption_video, dtype=np.int32)
    group[CAPTION_TEXT][:] = np.asarray(caption_text, dtype=object)
    group[CAPTION_TAG][:] = np.asarray(caption_tags or [""] * n_captions, dtype=object)
    # One write of the root metadata, all attributes at once: the commit.
    return group.update_attributes({
        ATTR_SCHEMA_VERSION: SCHEMA_VERSION,
        ATTR_SPEC: spec.to_attrs(),
        ATTR_SPLITS: list(SPLITS),
        ATTR_CREATED: time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        ATTR_FAILURES: [],
        **({ATTR_UNWRITTEN: unwritten} if unwritten else {}),
        **(attrs or {}),
    })


def open_store(path: str | Path, *, mode: str = "r", expect: CacheSpec | None = None,
               ignore_versions: bool = False):
    """Open an existing store (a local path or a URL, see ``store_location``), checking its
    schema version (and spec, when ``expect`` is given).

    Returns ``(group, spec)``. Raises CacheMismatchError naming the store and each difference.
    """
    zarr = _zarr()
    path = store_location(path)
    fs, root = store_filesystem(path)
    condition = store_condition(path)
    if condition == "unfinished":
        raise CacheMismatchError(f"{path}: the store's creation did not finish (an `avr extract` "
                                 f"was stopped while creating it, or is creating it now); run "
                                 f"the same `avr extract` again to create it")
    if not fs.exists(f"{root}/zarr.json"):
        raise CacheMismatchError(f"{path}: no avr cache here (zarr.json not found); "
                                 f"run `avr extract ... --out {path}` first")
    group = zarr.open_group(str(path), mode=mode, zarr_format=3)
    version = group.attrs.get(ATTR_SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise CacheMismatchError(f"{path}: schema version {version}, this avr reads version "
                                 f"{SCHEMA_VERSION}; re-extract with --overwrite")
    spec = CacheSpec.from_attrs(group.attrs[ATTR_SPEC])
    if expect is not None:
        diffs = spec_differences(spec, expect, ignore_versions=ignore_versions)
        if diffs:
            raise CacheMismatchError(f"{path} does not match:\n  " + "\n  ".join(diffs))
    return group, spec


def unwritten_by(array) -> str | None:
    """The command that left ``array`` unwritten on purpose, or None for a written array."""
    return array.attrs.get(ATTR_UNWRITTEN)


def split_code(split: str) -> int:
    try:
        return SPLITS.index(split)
    except ValueError:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}") from None
