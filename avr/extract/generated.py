"""`avr bench store`: a store in the real schema written straight from a generator.

For users without backbone weights or a dataset, and for scale tests: every array has the
per-row shape `avr extract` writes with its default backbones on VATEX (32 CLIP ViT-B/32 frames
of 512, Swin-T stages 1-3 pooled to 4x4, 2x2 and 1x1 (192, 384, 768 channels), 1,212 AST patch
tokens of 768 in 12 frequency x 101 time order, 2 AST global tokens, 101 AST time tokens, 32
CLIP text tokens of 512, 32 RoBERTa tokens of 768), in fp16, with the same chunking, crc32c
checksums, done masks and writer's lock as an extract. Nothing is decoded or encoded by a
network: features come from a seeded latent world.

The latent world (what a head can learn)
    Words are pseudo-words (``tokame``), each with a fixed random unit vector in CLIP space
    derived from its text (``GeneratedEncoder.word_vector``). A video is drawn from one of
    ~sqrt(N) latent *topics*: it has the topic's word, two *object* words from the topic's pool
    of twelve and one *detail* word shared with about three other videos, plus one of 24
    *sound* words. Its frames are the topic vector plus each object/detail vector during a
    window of about half the frames, a per-video appearance vector and per-frame noise; the
    Swin stages are fixed random projections of the same frame content with spatial noise. Its
    AST patch tokens are a shared background token, plus the sound's vector mapped to AST
    space by a fixed random matrix under a per-sound frequency profile and a per-video on/off
    envelope over time, a weaker topic component and token noise; the time tokens are the
    patch tokens averaged over frequency (as extract computes them), the global tokens their
    mean plus noise. A video without an audio track (5% of single videos) has only background
    and noise there, ``has_audio`` False.

    A caption is text: "a tokame scene with ravido and sulepa while a bonugi sound plays"
    (templates vary, a random non-empty subset of the video's object and detail words is
    named). Its features are a pure function of its text (``GeneratedEncoder.encode_text``):
    the CLIP sentence embedding is the normalised weighted sum of its word vectors (template
    words weigh a quarter), CLIP token states the word vectors in token order between a start
    token and an end token holding the sentence embedding, RoBERTa states a fixed projection of
    the word vectors; so captions lie near their video's frames, `avr search` encodes a query
    the same way, and videos of one topic are hard negatives of each other.

    Twins: a share of videos (``twin_share``, default 20%) come in pairs with the same topic,
    words and identical frames but different sounds, always in the same split; every caption of
    a twin names its sound and is tagged "audio_only" (only audio can decide, as the demo's
    twins). Of the other videos, each caption names the sound with probability 1/2 (tag "") or
    only the sight (tag "visual").

Splits follow VATEX's proportions (25,991 train, 1,500 val, 1,500 test of 28,991) unless the
val and test sizes are given. Rows are ordered train, val, test as a dataset listing is.

Like a dataset (``like``, `--like lsmdc`): the split sizes and captions per video of each split
that `avr extract` gives that dataset (``avr.extract.datasets`` facts: LSMDC's 101,079 / 7,408 /
1,000 with one caption each, MSVD's 40 per clip ...) and, with VATEX's backbones, its frames and
text lengths. A paragraph dataset (DiDeMo, ActivityNet) gets one caption per video of
three sentences joined by "then", and the store records the paragraph protocol as extract does;
a dataset without audio (MSVD) gets no audio track and no twins.

Writing is chunk by chunk along the store's own chunks (memory holds one chunk of rows), the
done masks last; a killed run is resumed by running the same command again (rows marked done
are kept), and a store made with other settings is refused unless ``overwrite``. Arrays left out
with ``arrays`` are created without a chunk and recorded as unwritten (``schema.ATTR_UNWRITTEN``
on the root and on the array): reading them fails with that reason, `avr cache info` and `avr
cache verify` say so rather than call it damage.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from avr import __version__
from avr.errors import AvrError, CacheMismatchError
from avr.extract.backbones import ast_time_tokens
from avr.extract.datasets import ADAPTERS, PARAGRAPHS, DatasetFacts, facts_of
from avr.extract.pipeline import pending_caption_chunks, pending_video_chunks, to_numpy
from avr.progress import BYTES_UNIT, Meter
from avr.store import schema
from avr.store.group import create_store, open_store, replace_store, store_condition
from avr.store.info import stored_bytes
from avr.store.location import store_location
from avr.store.lock import StoreLock
from avr.store.media import ensure_media_arrays, write_media
from avr.store.read import read_rows
from avr.store.schema import AudioParams, BackboneInfo, CacheSpec

# Datasets a store can be shaped like (`--like`): those whose split sizes are fixed.
LIKE_DATASETS = tuple(name for name, adapter in ADAPTERS.items() if adapter.facts.videos)
GENERATOR_LIBRARY = "avr-generator"  # BackboneInfo.library of every generated store's backbones
WEIGHTS_PREFIX = "generated:"  # BackboneInfo.weights: "generated:<seed>"
VATEX_SPLITS = {"train": 25_991, "val": 1_500, "test": 1_500}
TWIN_SHARE = 0.2
NO_AUDIO_SHARE = 0.05
OBJECTS_PER_TOPIC = 12
VIDEOS_PER_DETAIL = 4
SOUNDS = 24
TEMPLATE_WEIGHT = 0.25  # weight of a template word in the sentence embedding
TEMPLATES = ("a {topic} scene with {things}", "{things} in a {topic} scene",
             "the {topic} shows {things}", "someone films {things} at a {topic}")
SOUND_CLAUSE = "while a {sound} sound plays"
PARAGRAPH_SENTENCES = 3  # sentences of a generated paragraph (--like didemo, activitynet)
PARAGRAPH_JOIN = " then "
TEMPLATE_WORDS = frozenset(" ".join((*TEMPLATES, SOUND_CLAUSE, "and", PARAGRAPH_JOIN))
                           .replace("{", " ").replace("}", " ").split()) - {"topic", "things",
                                                                            "sound"}
SYLLABLES = ("ka", "to", "mi", "re", "su", "no", "pa", "li", "ve", "do", "ra", "gu", "be",
             "si", "fo", "ze")
START_TOKEN, END_TOKEN = "<start>", "<end>"


# ---- shapes ---------------------------------------------------------------------------------

def generated_spec(seed: int, shapes: str = "vatex", like: str | None = None) -> CacheSpec:
    """The spec of a generated store: "vatex" gives the real per-row shapes of `avr extract`
    with its default backbones on VATEX, or with ``like`` on that dataset (its frames and text
    lengths); "tiny" (for tests) the widths of the tiny backbones and 12 x 20 AST patches (with
    ``like``, its frames). ``like`` is also the spec's dataset, so that runs take its recipe."""
    names = {"clip": "ViT-B-32", "swin": "microsoft/swin-tiny-patch4-window7-224",
             "ast": "MIT/ast-finetuned-audioset-10-10-0.4593", "roberta": "roberta-base"}
    backbones = {role: BackboneInfo(name, f"{WEIGHTS_PREFIX}{seed}", GENERATOR_LIBRARY,
                                    __version__) for role, name in names.items()}
    if shapes == "vatex":
        widths = dict(num_frames=32, clip_dim=512, clip_text_len=32,
                      swin_channels=(192, 384, 768), ast_dim=768, roberta_dim=768, roberta_len=32)
    elif shapes == "tiny":
        widths = dict(num_frames=8, clip_dim=32, clip_text_len=12, swin_channels=(8, 16, 32),
                      ast_dim=24, ast_time_patches=20, roberta_dim=24, roberta_len=12)
    else:
        raise AvrError(f"shapes {shapes!r}: one of vatex, tiny")
    if like is not None:  # its frames; with VATEX's backbones its text lengths too
        facts = facts_of(like)
        widths.update(num_frames=facts.frames)
        if shapes == "vatex":
            widths.update(clip_text_len=facts.text_tokens.clip,
                          roberta_len=facts.text_tokens.roberta)
    return CacheSpec(dataset=like or "generated", image_size=224, swin_grids=(4, 2, 1),
                     backbones=backbones, audio=AudioParams(), audio_pooled_token=True,
                     **widths)


def is_generated(spec: CacheSpec) -> bool:
    return spec.backbones["clip"].library == GENERATOR_LIBRARY


def encoder_for_spec(spec: CacheSpec) -> GeneratedEncoder:
    """The encoder that wrote a generated store (its seed is in the weights tag): what `avr
    search` encodes a query with."""
    return GeneratedEncoder(spec, int(spec.backbones["clip"].weights[len(WEIGHTS_PREFIX):]))


def feature_arrays(spec: CacheSpec) -> tuple[str, ...]:
    """The arrays a generated store may leave unwritten: every feature array."""
    return tuple(name for name in schema.array_layout(spec, 0, 0)
                 if name not in schema.INDEX_ARRAYS and name not in schema.DONE_MASKS.values())


# Read by runs whatever their head: eval (frame and audio masks for --modalities), index build,
# eval --rerank-k and search (mean-pooled frames, CLIP sentence embeddings). All small.
READ_BY_EVERY_RUN = (schema.FRAME_EMBEDDINGS, schema.FRAME_MASK, schema.HAS_AUDIO,
                     schema.TEXT_EMBEDDINGS)


def arrays_for_heads(heads: Iterable[str]) -> tuple[str, ...]:
    """Every array any configuration of ``heads`` reads, and those every run reads."""
    from avr.fuse.heads import head_class

    names: dict[str, None] = dict.fromkeys(READ_BY_EVERY_RUN)
    for name in heads:
        cls = head_class(name)
        names.update(dict.fromkeys(cls.video_inputs))
    for name in heads:
        names.update(dict.fromkeys(head_class(name).caption_inputs))
    return tuple(names)


def check_arrays(spec: CacheSpec, arrays: Iterable[str]) -> tuple[str, ...]:
    """``arrays`` in the store's order, refused when one is not a feature array."""
    known = feature_arrays(spec)
    unknown = [name for name in arrays if name not in known]
    if unknown:
        raise AvrError(f"--arrays: {', '.join(unknown)} is not a feature array; choose from "
                       f"{', '.join(known)}")
    wanted = set(arrays)
    return tuple(name for name in known if name in wanted)


# ---- the latent world ------------------------------------------------------------------------

@dataclass(frozen=True)
class GeneratorSettings:
    """Everything that decides a generated store's content (recorded in its attrs)."""

    videos: int
    captions_per_video: int = 10
    seed: int = 0
    val_videos: int | None = None  # default: VATEX's proportion
    test_videos: int | None = None
    shapes: str = "vatex"
    arrays: tuple[str, ...] | None = None  # None: every array
    heads: tuple[str, ...] | None = None  # the heads ``arrays`` were chosen for, if any
    like: str | None = None  # a dataset whose splits, captions, frames, text and audio it takes

    @classmethod
    def like_dataset(cls, name: str, videos: int | None = None, val_videos: int | None = None,
                     test_videos: int | None = None, **settings) -> GeneratorSettings:
        """The settings of a store shaped like dataset ``name``: its split sizes, captions per
        video per split, caption protocol and audio (``avr.extract.datasets`` facts). ``videos``
        scales its splits to that many videos, in the dataset's proportions; ``val_videos`` and
        ``test_videos`` replace the scaled sizes of those splits (train takes the rest)."""
        sizes = facts_of(name).videos
        if not sizes:
            raise AvrError(f"--like {name}: it has no fixed split sizes; choose one of "
                           f"{', '.join(LIKE_DATASETS)}")
        total = sum(sizes.values())
        videos = total if videos is None else videos
        if videos == total and val_videos is None and test_videos is None:
            return cls(videos=total, like=name, **settings)
        val = max(1, round(videos * sizes["val"] / total)) if val_videos is None else val_videos
        test = max(1, round(videos * sizes["test"] / total)) if test_videos is None else test_videos
        return cls(videos=videos, like=name, val_videos=val, test_videos=test, **settings)

    def facts(self) -> DatasetFacts | None:
        return facts_of(self.like) if self.like is not None else None

    def captions_for(self, split: str) -> int:
        """Captions of each video of ``split``."""
        facts = self.facts()
        return facts.captions_per_video[split] if facts is not None else self.captions_per_video

    @property
    def audio(self) -> bool:
        """False when the dataset it is like has no audio: no video has a track, none is a
        twin (only audio tells twins apart)."""
        facts = self.facts()
        return facts is None or facts.audio

    @property
    def paragraphs(self) -> bool:
        facts = self.facts()
        return facts is not None and facts.protocol == PARAGRAPHS

    def split_sizes(self) -> dict[str, int]:
        if self.like is not None and self.val_videos is None:
            return dict(self.facts().videos)
        total = sum(VATEX_SPLITS.values())
        val = (self.val_videos if self.val_videos is not None
               else max(1, round(self.videos * VATEX_SPLITS["val"] / total)))
        test = (self.test_videos if self.test_videos is not None
                else max(1, round(self.videos * VATEX_SPLITS["test"] / total)))
        if val + test >= self.videos:
            raise AvrError(f"--videos {self.videos} leaves no train videos beside {val} val and "
                           f"{test} test videos; generate more videos")
        return {"train": self.videos - val - test, "val": val, "test": test}

    def to_attrs(self) -> dict:
        data = asdict(self)
        for key in ("arrays", "heads"):
            data[key] = list(data[key]) if data[key] is not None else None
        if data["like"] is None:  # as stores written before --like record their settings
            del data["like"]
        return data

    def command(self, out: str | Path) -> str:
        """The `avr bench store` command line that writes this store at ``out``."""
        parts = [f"avr bench store --like {self.like} --out {out}" if self.like is not None
                 else f"avr bench store --videos {self.videos} --out {out}"]
        defaults = GeneratorSettings(self.videos)
        keys = ("captions_per_video", "seed", "val_videos", "test_videos", "shapes")
        if self.like is not None:  # its splits and captions follow from --like and --videos
            keys = ("seed", "shapes")
            if self.val_videos is not None:
                parts.append(f"--videos {self.videos}")
        for key in keys:
            if getattr(self, key) != getattr(defaults, key):
                parts.append(f"--{key.replace('_', '-')} {getattr(self, key)}")
        if self.heads is not None:
            parts.append(f"--heads {','.join(self.heads)}")
        elif self.arrays is not None:
            parts.append(f"--arrays {','.join(self.arrays)}")
        return " ".join(parts)


@dataclass
class Plan:
    """The latent content of every video and caption row (small: no features)."""

    video_ids: list[str]
    video_splits: list[str]
    topic: np.ndarray  # [N]
    words: np.ndarray  # [N, 3] word indices: two objects and a detail
    sound: np.ndarray  # [N]
    has_audio: np.ndarray  # [N] bool
    look: np.ndarray  # [N]: the row whose frames this row shows (twins share one)
    caption_video: np.ndarray  # [M]
    caption_text: list[str]
    caption_tags: list[str]


class Vocabulary:
    """Pseudo-words of the world: topics, their objects, details, sounds, each a unique text."""

    def __init__(self, videos: int, seed: int):
        self.topics = max(4, round(np.sqrt(videos)))
        self.details = max(8, videos // VIDEOS_PER_DETAIL)
        total = self.topics * (1 + OBJECTS_PER_TOPIC) + self.details + SOUNDS
        self.digits = 4
        while len(SYLLABLES) ** self.digits < 4 * total:
            self.digits += 1
        self.space = len(SYLLABLES) ** self.digits
        self.offset = int(np.random.default_rng([seed, 0]).integers(self.space))

    def word(self, index: int) -> str:
        """A bijection of indices onto syllable strings (an odd multiplier mod 16^digits)."""
        code = (index * 40_503 + self.offset) % self.space
        out = []
        for _ in range(self.digits):
            code, digit = divmod(code, len(SYLLABLES))
            out.append(SYLLABLES[digit])
        return "".join(out)

    def topic(self, t: int) -> str:
        return self.word(t)

    def obj(self, t: int, k: int) -> str:
        return self.word(self.topics + t * OBJECTS_PER_TOPIC + k)

    def detail(self, d: int) -> str:
        return self.word(self.topics * (1 + OBJECTS_PER_TOPIC) + d)

    def sound(self, s: int) -> str:
        return self.word(self.topics * (1 + OBJECTS_PER_TOPIC) + self.details + s)


def make_plan(settings: GeneratorSettings) -> Plan:
    """Topics, words, sounds, twins, splits and caption texts of every row (module docstring)."""
    rng = np.random.default_rng([settings.seed, 1])
    vocab = Vocabulary(settings.videos, settings.seed)
    sizes = settings.split_sizes()
    groups = _groups(settings.videos, rng, TWIN_SHARE if settings.audio else 0.0)
    split_of_group = _assign_splits(groups, sizes)
    order = [g for split in schema.SPLITS for g, s in enumerate(split_of_group) if s == split]
    n = settings.videos
    topic = np.empty(n, dtype=np.int64)
    words = np.empty((n, 3), dtype=np.int64)
    sound = np.empty(n, dtype=np.int64)
    has_audio = np.ones(n, dtype=bool)
    look = np.empty(n, dtype=np.int64)
    splits: list[str] = []
    twin = np.zeros(n, dtype=bool)
    row = 0
    for g in order:
        size = groups[g]
        t = int(rng.integers(vocab.topics))
        objects = rng.choice(OBJECTS_PER_TOPIC, 2, replace=False)
        detail = int(rng.integers(vocab.details))
        sounds = rng.choice(SOUNDS, size, replace=False)
        for member in range(size):
            topic[row], sound[row], look[row] = t, sounds[member], row - member
            words[row] = (objects[0], objects[1], detail)
            twin[row] = size > 1
            splits.append(split_of_group[g])
            row += 1
    singles = np.flatnonzero(~twin)
    silent = rng.choice(singles, int(round(NO_AUDIO_SHARE * len(singles))), replace=False)
    has_audio[silent] = False
    if not settings.audio:
        has_audio[:] = False
    caption_video, texts, tags = _captions(settings, vocab, splits, topic, words, sound,
                                           has_audio, twin, rng)
    return Plan([f"gen{r:07d}" for r in range(n)], splits, topic, words, sound, has_audio, look,
                caption_video, texts, tags)


def _groups(videos: int, rng: np.random.Generator, twin_share: float) -> list[int]:
    """Sizes of the groups of rows sharing a look: pairs of twins and single videos, shuffled."""
    pairs = int(round(twin_share * videos / 2))
    sizes = [2] * pairs + [1] * (videos - 2 * pairs)
    return [sizes[i] for i in rng.permutation(len(sizes))]


def _assign_splits(groups: list[int], sizes: dict[str, int]) -> list[str]:
    """A split per group so that each split gets its size exactly (twins stay together)."""
    need = {"test": sizes["test"], "val": sizes["val"]}
    out = []
    for size in groups:
        split = next((s for s in ("test", "val") if 0 < size <= need[s]), "train")
        if split != "train":
            need[split] -= size
        out.append(split)
    if any(need.values()):  # only pairs of twins were left to fill a split of odd size
        raise AvrError(f"cannot split {len(groups)} look groups into {sizes}; give other "
                       f"--val-videos/--test-videos")
    return out


def _captions(settings: GeneratorSettings, vocab: Vocabulary, splits: list[str], topic, words,
              sound, has_audio, twin, rng: np.random.Generator
              ) -> tuple[np.ndarray, list[str], list[str]]:
    texts, tags, caption_video = [], [], []
    sentences = PARAGRAPH_SENTENCES if settings.paragraphs else 1
    for row in range(settings.videos):
        t = int(topic[row])
        things = [vocab.obj(t, int(words[row, 0])), vocab.obj(t, int(words[row, 1])),
                  vocab.detail(int(words[row, 2]))]
        for _ in range(settings.captions_for(splits[row])):
            text = PARAGRAPH_JOIN.join(_sentence(vocab.topic(t), things, rng)
                                       for _ in range(sentences))
            if twin[row]:
                tag = "audio_only"
            elif has_audio[row] and rng.random() < 0.5:
                tag = ""
            else:
                tag = "visual"
            if tag != "visual":
                text += " " + SOUND_CLAUSE.format(sound=vocab.sound(int(sound[row])))
            texts.append(text)
            tags.append(tag)
            caption_video.append(row)
    return np.asarray(caption_video, dtype=np.int32), texts, tags


def _sentence(topic: str, things: list[str], rng: np.random.Generator) -> str:
    """One templated sentence naming a random non-empty subset of ``things``, in order."""
    chosen = [things[i] for i in np.sort(rng.choice(3, int(rng.integers(1, 4)), replace=False))]
    return TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(topic=topic,
                                                               things=" and ".join(chosen))


# ---- features --------------------------------------------------------------------------------

class GeneratedEncoder:
    """The generator's frozen "backbones": word vectors and fixed projections of one seed.

    ``encode_text`` is what the captions of the store hold and what `avr search` runs on a
    query; ``encode_videos`` writes the video arrays of planned rows."""

    def __init__(self, spec: CacheSpec, seed: int):
        self.spec = spec
        self.seed = seed
        self._vectors: dict[str, torch.Tensor] = {}
        rng = np.random.default_rng([seed, 4])
        d = spec.clip_dim

        def normal(*shape: int) -> torch.Tensor:
            return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))

        self.audio_map = normal(d, spec.ast_dim) / np.sqrt(d)
        self.roberta_map = normal(d, spec.roberta_dim) / np.sqrt(d)
        self.swin_maps = [normal(d, c) / np.sqrt(d) for c in spec.swin_channels]
        self.background = normal(spec.ast_dim)
        self.clip_positions = 0.1 * normal(spec.clip_text_len, d) / np.sqrt(d)
        self.roberta_positions = 0.1 * normal(spec.roberta_len, spec.roberta_dim) / np.sqrt(
            spec.roberta_dim)
        self.sound_profiles = normal(SOUNDS, spec.ast_freq_patches).exp()

    def word_vector(self, word: str) -> torch.Tensor:
        """A unit vector in CLIP space, a fixed function of the word's text and the seed."""
        vector = self._vectors.get(word)
        if vector is None:
            rng = np.random.default_rng([self.seed, 3, zlib.crc32(word.encode())])
            vector = torch.from_numpy(rng.standard_normal(self.spec.clip_dim, dtype=np.float32))
            vector /= vector.norm()
            self._vectors[word] = vector
        return vector

    # ---- text ------------------------------------------------------------------------------
    def encode_text(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Captions -> the five caption arrays, as ``Backbones.encode_text`` returns them; every
        caption at once, from the vectors of its words."""
        spec = self.spec
        m, dim = len(texts), spec.clip_dim
        tokenized = [text.lower().split() for text in texts]
        words = [w for caption in tokenized for w in caption]
        distinct = list(dict.fromkeys(words))
        column = {w: i for i, w in enumerate(distinct)}
        table = (torch.stack([self.word_vector(w) for w in distinct]) if distinct
                 else torch.zeros(0, dim))
        counts = torch.tensor([len(caption) for caption in tokenized], dtype=torch.long)
        owner = torch.repeat_interleave(torch.arange(m), counts)  # [W] caption of each word
        position = torch.arange(len(words)) - (counts.cumsum(0) - counts)[owner]  # [W]
        padded = torch.zeros(m, int(counts.max()) if m else 0, dim)  # [M, most words, D]
        padded[owner, position] = table[torch.tensor([column[w] for w in words],
                                                     dtype=torch.long)]
        weights = torch.zeros(padded.shape[:2])
        weights[owner, position] = torch.tensor([TEMPLATE_WEIGHT if w in TEMPLATE_WORDS else 1.0
                                                 for w in words])
        start, end = self.word_vector(START_TOKEN), self.word_vector(END_TOKEN)
        total = (weights[..., None] * padded).sum(1)
        total[counts == 0] = end
        sentence = total / total.norm(dim=1, keepdim=True).clamp_min(1e-6)
        # CLIP keeps its end token (the sentence embedding's position) when it cuts
        clip_states, clip_mask = _token_rows(padded, counts, spec.clip_text_len, start, sentence)
        roberta_words, roberta_mask = _token_rows(padded, counts, spec.roberta_len, start,
                                                  end.expand(m, dim))
        clip_states += self.clip_positions * clip_mask[..., None]
        roberta = ((roberta_words.reshape(-1, dim) @ self.roberta_map)
                   .reshape(m, spec.roberta_len, -1) + self.roberta_positions * roberta_mask[..., None])
        return {
            schema.TEXT_EMBEDDINGS: sentence,
            schema.TEXT_TOKEN_STATES: clip_states,
            schema.TEXT_TOKEN_MASK: clip_mask,
            schema.ROBERTA_STATES: roberta,
            schema.ROBERTA_MASK: roberta_mask,
        }

    # ---- videos ----------------------------------------------------------------------------
    def encode_videos(self, plan: Plan, vocab: Vocabulary, rows: np.ndarray,
                      names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The video arrays ``names`` (float32 or bool tensors) of planned ``rows``. Noise comes
        from a generator per row (per look for what twins share), so a row's features do not
        depend on the chunking."""
        names = set(names)
        spec = self.spec
        looks = [int(plan.look[r]) for r in rows]
        content = torch.stack([self._frame_content(plan, vocab, look) for look in looks])
        out: dict[str, torch.Tensor] = {}
        if schema.FRAME_EMBEDDINGS in names:
            noise = torch.stack([torch.randn(content.shape[1:], generator=self._gen(2, look))
                                 for look in looks])
            out[schema.FRAME_EMBEDDINGS] = content + 0.3 * noise / np.sqrt(spec.clip_dim)
        if schema.FRAME_MASK in names:
            out[schema.FRAME_MASK] = torch.ones(content.shape[:2], dtype=torch.bool)
        for k, (projection, grid) in enumerate(zip(self.swin_maps, spec.swin_grids)):
            if schema.swin_level(k) in names:
                out[schema.swin_level(k)] = self._swin(content, projection, grid, looks, k)
        if {schema.AUDIO_PATCH_TOKENS, schema.AUDIO_GLOBAL_TOKENS, schema.AUDIO_TIME_TOKENS,
                schema.AUDIO_POOLED_TOKEN} & names:
            patches = self._audio_patches(plan, vocab, rows)
            if schema.AUDIO_PATCH_TOKENS in names:
                out[schema.AUDIO_PATCH_TOKENS] = patches
            if schema.AUDIO_TIME_TOKENS in names:
                out[schema.AUDIO_TIME_TOKENS] = ast_time_tokens(
                    patches, spec.ast_freq_patches, spec.ast_time_patches)
            noise = torch.stack([torch.randn(2, spec.ast_dim, generator=self._gen(6, int(r)))
                                 for r in rows])
            global_tokens = patches.mean(1, keepdim=True) + 0.1 * noise
            if schema.AUDIO_GLOBAL_TOKENS in names:
                out[schema.AUDIO_GLOBAL_TOKENS] = global_tokens
            if schema.AUDIO_POOLED_TOKEN in names:  # as AST's final LayerNorm of their mean
                out[schema.AUDIO_POOLED_TOKEN] = F.layer_norm(global_tokens.mean(1),
                                                              (spec.ast_dim,))
        if schema.HAS_AUDIO in names:
            out[schema.HAS_AUDIO] = torch.from_numpy(plan.has_audio[rows])
        return out

    def thumbnail(self, plan: Plan, look: int) -> bytes:
        """A drawn strip of the look: the topic's colour behind a square of the first object's
        colour that moves across the frames, and a dot of the detail's (twins share it)."""
        from avr.extract.thumbnails import thumbnail_strip

        size, count = THUMBNAIL_PIXELS, schema.THUMBNAIL_FRAMES
        topic, (first, _, detail) = int(plan.topic[look]), plan.words[look]
        frames = np.empty((count, size, size, 3), dtype=np.uint8)
        frames[:] = _colour(topic)
        side = size // 3
        for f in range(count):
            left = f * (size - side) // max(count - 1, 1)
            frames[f, side:2 * side, left:left + side] = _colour(1000 + topic * 8 + int(first))
            frames[f, 2:6, 2:6] = _colour(5000 + int(detail))
        return thumbnail_strip(frames, np.ones(count, dtype=bool))

    def _gen(self, kind: int, row: int) -> torch.Generator:
        state = np.random.SeedSequence([self.seed, kind, row]).generate_state(2, np.uint64)
        return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))

    def _frame_content(self, plan: Plan, vocab: Vocabulary, look: int) -> torch.Tensor:
        """[F, D] frames before noise: topic always, each word during its window, appearance.
        A function of the look, so twins show the same frames."""
        rng = np.random.default_rng([self.seed, 1, look])
        frames = self.spec.num_frames
        t = int(plan.topic[look])
        words = [vocab.obj(t, int(plan.words[look, 0])), vocab.obj(t, int(plan.words[look, 1])),
                 vocab.detail(int(plan.words[look, 2]))]
        content = self.word_vector(vocab.topic(t)).repeat(frames, 1)
        for word in words:
            length = max(1, int(round(frames * rng.uniform(0.35, 0.65))))
            start = int(rng.integers(frames - length + 1))
            content[start:start + length] += 1.4 * self.word_vector(word)
        appearance = torch.from_numpy(rng.standard_normal(self.spec.clip_dim, dtype=np.float32))
        return content + 0.5 * appearance / appearance.norm()

    def _swin(self, content: torch.Tensor, projection: torch.Tensor, grid: int, looks: list[int],
              k: int) -> torch.Tensor:
        """[n, F, g*g, C]: the frame content projected, weighted per cell, with spatial noise."""
        n, frames, _ = content.shape
        cells, channels = grid * grid, projection.shape[1]
        base = (content.reshape(n * frames, -1) @ projection).reshape(n, frames, 1, channels)
        gains = torch.stack([0.5 + torch.rand(1, cells, 1, generator=self._gen(10 + k, look))
                             for look in looks])
        noise = torch.stack([torch.randn(frames, cells, channels,
                                         generator=self._gen(20 + k, look)) for look in looks])
        return base * gains + 0.5 * noise

    def _audio_patches(self, plan: Plan, vocab: Vocabulary, rows: np.ndarray) -> torch.Tensor:
        """[n, 12 * 101, D_ast] in AST's frequency-major order."""
        spec = self.spec
        freq, steps, dim = spec.ast_freq_patches, spec.ast_time_patches, spec.ast_dim
        tokens = torch.stack([torch.randn(freq, steps, dim, generator=self._gen(5, int(r)))
                              for r in rows])
        tokens = tokens.mul_(1.0 / np.sqrt(dim)).add_(0.5 * self.background / np.sqrt(dim))
        sounds = torch.stack([self.word_vector(vocab.sound(int(plan.sound[r]))) for r in rows])
        topics = torch.stack([self.word_vector(vocab.topic(int(plan.topic[r]))) for r in rows])
        for i, row in enumerate(rows):
            if not plan.has_audio[row]:
                continue
            rng = np.random.default_rng([self.seed, 5, int(row)])
            envelope = np.repeat(rng.random(-(-steps // 10)) < 0.7, 10)[:steps]
            envelope[int(rng.integers(steps))] = True  # never all off
            profile = self.sound_profiles[int(plan.sound[row])]
            weight = 2.0 * (profile / profile.mean())[:, None] * torch.from_numpy(envelope)[None]
            tokens[i] += weight[..., None] * (sounds[i] @ self.audio_map)
            tokens[i] += 0.3 * (topics[i] @ self.audio_map)
        return tokens.reshape(len(rows), freq * steps, dim)


def _token_rows(words: torch.Tensor, counts: torch.Tensor, length: int, start: torch.Tensor,
                ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, length, D] token rows of captions whose words are ``words`` [M, most words, D]
    (``counts`` of them each): the start token, the first ``length - 2`` words, then the row's
    vector of ``ends``; and the [M, length] mask of those tokens."""
    m, dim = ends.shape
    rows = torch.zeros(m, length, dim)
    kept = min(length - 2, words.shape[1])
    rows[:, 0] = start
    rows[:, 1:1 + kept] = words[:, :kept]
    lengths = counts.clamp(max=length - 2) + 2
    rows[torch.arange(m), lengths - 1] = ends
    return rows, torch.arange(length)[None] < lengths[:, None]


# ---- writing ---------------------------------------------------------------------------------

THUMBNAIL_PIXELS = 32  # a generated thumbnail's frames, as the tiny backbones decode them


def _colour(index: int) -> np.ndarray:
    """A saturated colour per index, hues spread by the golden ratio."""
    import colorsys

    return np.asarray(colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.75, 0.9)) * 255


def write_generated_store(out: str | Path, settings: GeneratorSettings, *, overwrite: bool = False,
                          chunk_rows: int | None = None, compression: str = "zstd", console=None,
                          on_chunk: Callable[[int, int], None] | None = None) -> dict:
    """Write (or resume) the generated store at ``out``; ``chunk_rows`` sets the video rows per
    chunk of a new store (default: the schema's, about 8 MB), ``compression`` its codecs
    (``schema.COMPRESSIONS``; a resumed store keeps its own). Returns a summary: rows, bytes written
    (uncompressed), bytes on disk, seconds, and the arrays left unwritten."""
    started = time.perf_counter()
    spec = generated_spec(settings.seed, settings.shapes, settings.like)
    written = check_arrays(spec, settings.arrays if settings.arrays is not None
                           else feature_arrays(spec))
    unwritten = tuple(name for name in feature_arrays(spec) if name not in written)
    location = store_location(out)
    with StoreLock(location) as lock:
        plan = make_plan(settings)
        group = _prepare(location, spec, settings, plan, unwritten, overwrite,
                         settings.command(out), chunk_rows, compression)
        ensure_media_arrays(group)
        # a store generated before its spec listed every array keeps its own spec and arrays
        spec = schema.CacheSpec.from_attrs(group.attrs[schema.ATTR_SPEC])
        written = tuple(name for name in written if name in schema.array_layout(spec, 0, 0))
        layout = schema.array_layout(spec, settings.videos, len(plan.caption_text),
                                     video_chunk_rows=group[schema.VIDEO_DONE].chunks[0])
        encoder = GeneratedEncoder(spec, settings.seed)
        vocab = Vocabulary(settings.videos, settings.seed)
        nbytes = 0
        with Meter(console) as progress:
            nbytes += _write_captions(group, layout, encoder, written, lock, progress)
            nbytes += _write_videos(group, layout, encoder, plan, vocab, written, lock, progress,
                                    on_chunk)
    seconds = time.perf_counter() - started
    return {"out": str(location), "videos": settings.videos, "captions": len(plan.caption_text),
            "written_bytes": nbytes, "bytes_on_disk": stored_bytes(location),
            "seconds": seconds, "unwritten": list(unwritten)}


def _prepare(location, spec: CacheSpec, settings: GeneratorSettings, plan: Plan,
             unwritten: tuple[str, ...], overwrite: bool, command: str,
             chunk_rows: int | None, compression: str):
    """Open the store for resuming when it was generated with the same settings; else create
    it (replacing an unfinished one, or any avr store with ``overwrite``)."""
    if overwrite:
        replace_store(location)
    condition = store_condition(location)
    if condition == "foreign":
        raise AvrError(f"{location} exists and is not an avr store; choose another --out")
    if condition == "complete":
        group, _ = open_store(location, mode="r+")
        found = group.attrs.get(schema.ATTR_GENERATOR, {}).get("settings")
        if found == settings.to_attrs():
            return group
        what = ("a store `avr bench store` did not write" if found is None else
                f"a store generated with other settings ({found})")
        raise CacheMismatchError(f"{location} holds {what}; pass --overwrite to replace it, "
                                 f"or choose another --out")
    attrs = {schema.ATTR_GENERATOR: {"settings": settings.to_attrs(), "command": command}}
    if settings.like is not None:
        attrs[schema.ATTR_CAPTION_PROTOCOL] = settings.facts().protocol
    return create_store(location, spec, plan.video_ids, plan.video_splits,
                        plan.caption_video, plan.caption_text, plan.caption_tags,
                        unwritten={name: command for name in unwritten},
                        video_chunk_rows=chunk_rows, compression=compression, attrs=attrs)


def _write_chunk(group, layout, start: int, stop: int, values: dict[str, torch.Tensor]) -> int:
    """Whole-chunk assignments of every array in ``values`` (cast to the store's dtype as
    extract does); returns the bytes written."""
    nbytes = 0
    for name, value in values.items():
        array = to_numpy(value, layout[name].dtype)
        group[name][start:stop] = array
        nbytes += array.nbytes
    return nbytes


def _write_captions(group, layout, encoder: GeneratedEncoder, written: tuple[str, ...],
                    lock: StoreLock, progress: Meter) -> int:
    names = [n for n in written if schema.rows_of(n) == "caption"]
    pending = pending_caption_chunks(group)
    task = progress.add("captions", sum(stop - start for start, stop in pending), BYTES_UNIT)
    nbytes = 0
    for start, stop in pending:
        texts = [str(t) for t in read_rows(group[schema.CAPTION_TEXT], np.arange(start, stop))]
        encoded = encoder.encode_text(texts)
        lock.check()
        chunk_bytes = _write_chunk(group, layout, start, stop, {n: encoded[n] for n in names})
        group[schema.CAPTION_DONE][start:stop] = True  # after every array of the rows
        nbytes += chunk_bytes
        progress.advance(task, stop - start, nbytes=chunk_bytes)
    return nbytes


def _write_videos(group, layout, encoder: GeneratedEncoder, plan: Plan, vocab: Vocabulary,
                  written: tuple[str, ...], lock: StoreLock, progress: Meter,
                  on_chunk) -> int:
    names = [n for n in written if schema.rows_of(n) == "video"]
    done = read_rows(group[schema.VIDEO_DONE]).astype(bool)
    pending = pending_video_chunks(done, layout[schema.VIDEO_DONE].chunk_rows)
    task = progress.add("videos", sum(stop - start for start, stop, _ in pending), BYTES_UNIT)
    nbytes = 0
    for start, stop, _ in pending:
        values = encoder.encode_videos(plan, vocab, np.arange(start, stop), names)
        lock.check()
        chunk_bytes = _write_chunk(group, layout, start, stop, values)
        write_media(group, start, stop, np.arange(start, stop), [""] * (stop - start),
                    [encoder.thumbnail(plan, int(plan.look[r])) for r in range(start, stop)])
        group[schema.VIDEO_DONE][start:stop] = True  # after every array of the rows
        nbytes += chunk_bytes
        progress.advance(task, stop - start, nbytes=chunk_bytes)
        if on_chunk is not None:
            on_chunk(start, stop)
    return nbytes
