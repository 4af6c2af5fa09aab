"""`avr search` (and `avr serve`): type a query, get a trained run's ranked videos.

A ``Searcher`` holds a run ready for queries: its head, its store, the text towers that encode a
query and the searched splits' videos, each loaded once. A query goes through the same text
backbones that wrote the run's cache, loaded the way extract loaded them (the store's attrs
name every model and weights tag) but only their text side: CLIP's text tower, and RoBERTa when
the head reads it (``load_text_towers``); then through the head's ``encode_texts`` and
``score`` against the cached videos.

- A split of up to EXHAUSTIVE_MAX_VIDEOS videos, or one without an index, is scored whole: its
  videos are encoded by the head once, when the searcher is made, and every query is scored
  against those states.
- A larger one, when `avr index build` has indexed the store, is searched in two stages: the
  index's top ``candidates`` videos for the query's CLIP sentence embedding (default
  CANDIDATES_PER_HIT * k), then the head encodes and scores only those rows. The rows the head
  reads are held in memory when they fit the memory budget, else read from the store per query.
- One query at a time: the text towers are not reentrant, so concurrent callers (the service's
  threads) take turns.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from avr.device import resolve_device
from avr.errors import AvrError
from avr.evaluate import index as first_stage
from avr.evaluate.evaluator import mask_modalities, open_run, resolve_run
from avr.evaluate.score import encode_video_rows, pair_bytes, score_captions, score_split
from avr.files import read_text
from avr.fuse.heads.base import RetrievalHead
from avr.fuse.residency import split_fits
from avr.store import schema
from avr.store.group import open_store
from avr.store.read import read_rows
from avr.store.schema import CacheSpec
from avr.store.splits import load_split, split_rows

RANDOM_WEIGHTS = "random:"
EXHAUSTIVE_MAX_VIDEOS = 10_000  # up to here the head scores every video of a split
CANDIDATES_PER_HIT = 10
SEARCH_BLOCK_BYTES = 256 << 20  # a scoring block's work on the CPU (``_videos_per_block``)
ROBERTA_INPUTS = (schema.ROBERTA_STATES, schema.ROBERTA_MASK)


@dataclass
class Hit:
    video_id: str
    split: str
    score: float
    captions: list[str]


def text_towers_for_spec(spec: CacheSpec, device: torch.device, *, roberta: bool):
    """The text side of the backbones that wrote a store with ``spec``: pretrained ones by their
    recorded names, tags and text lengths, the seeded tiny configs when the store was made with
    ``--backbones tiny``, or the generator's encoder for a store from `avr bench store`."""
    from avr.extract.backbones import BackboneNames, load_text_towers
    from avr.extract.generated import encoder_for_spec, is_generated

    if is_generated(spec):
        return encoder_for_spec(spec)
    clip = spec.backbones["clip"]
    if clip.weights.startswith(RANDOM_WEIGHTS):
        return load_text_towers("tiny", roberta=roberta, device=device,
                                seed=int(clip.weights[len(RANDOM_WEIGHTS):]))
    names = BackboneNames(clip_model=clip.name, clip_pretrained=clip.weights,
                          roberta=spec.backbones["roberta"].name,
                          clip_text_tokens=spec.clip_text_len,
                          roberta_text_tokens=spec.roberta_len)
    return load_text_towers("real", names, roberta=roberta, device=device)


def encode_queries(towers, queries: list[str], caption_inputs: tuple[str, ...],
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The queries as cached caption rows would hold them (16-bit, like the store)."""
    encoded = towers.encode_text(queries)
    rows = {}
    for name in caption_inputs:
        value = encoded[name].cpu()
        rows[name] = value if value.dtype == torch.bool else value.to(dtype)
    return rows


def read_queries(path: Path) -> list[str]:
    """One query per non-blank line of a UTF-8 file."""
    queries = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    if not queries:
        raise AvrError(f"--queries {path}: the file holds no query (one per line)")
    return queries


@dataclass
class Gallery:
    """One searched split: its done videos and how a query is scored against them."""

    split: str
    rows: np.ndarray  # store rows of its done videos, ascending
    states: dict | None  # the head's encoded videos (scored whole), else None
    index: object | None  # first_stage.SplitIndex (two stages), else None
    held: dict | None  # the head's cached rows, by position in ``rows`` (two stages)


class Searcher:
    """A trained run ready for queries (module docstring)."""

    def __init__(self, run: str | Path | None = None, *, split: str = "test",
                 device: str = "auto", index: str | Path | None = None,
                 candidates: int | None = None, memory_budget: float | None = None):
        self.device = resolve_device(device)
        self.run_dir = resolve_run(run)
        self.head, self.config, self.cache = open_run(self.run_dir, None, self.device)
        self.group, self.spec = open_store(self.cache)
        self.first_stage = first_stage.find_index(self.cache, index, run=self.run_dir)
        if candidates is not None and self.first_stage is None:
            raise AvrError(f"--candidates needs a first-stage index; build one with "
                           f"`avr index build {self.cache}`")
        self.candidates = candidates
        self.caption_inputs = tuple(dict.fromkeys((*self.head.caption_inputs,
                                                   schema.TEXT_EMBEDDINGS)))
        self.towers = text_towers_for_spec(
            self.spec, self.device,
            roberta=any(name in self.head.caption_inputs for name in ROBERTA_INPUTS))
        self.video_ids = np.asarray([str(v) for v in read_rows(self.group[schema.VIDEO_ID])])
        self.row_of = {video_id: row for row, video_id in enumerate(self.video_ids.tolist())}
        caption_video = read_rows(self.group[schema.CAPTION_VIDEO])
        order = np.argsort(caption_video, kind="stable")
        starts = np.searchsorted(caption_video[order], np.arange(len(self.video_ids) + 1))
        self._captions_of = (order, starts)  # caption rows of video v: order[starts[v]:starts[v+1]]
        splits = schema.SPLITS if split == "all" else (split,)
        self.galleries = [self._gallery(name, memory_budget) for name in splits]
        self._lock = threading.Lock()

    # ---- loading -------------------------------------------------------------------------------
    def _gallery(self, split: str, memory_budget: float | None) -> Gallery:
        rows = split_rows(self.group, split).done
        split_index = self.first_stage.split(split) if self.first_stage is not None else None
        two_stage = split_index is not None and (self.candidates is not None
                                                 or rows.size > EXHAUSTIVE_MAX_VIDEOS)
        if rows.size == 0:
            return Gallery(split, rows, None, None, None)
        names = tuple(self.head.video_inputs)
        fits, *_ = split_fits(self.cache, split, names, (), "fp16", self.device, memory_budget)
        data = load_split(self.cache, split, names, (), tokens_in_store=not fits)
        if two_stage:
            return Gallery(split, rows, None, split_index, data.videos)
        return Gallery(split, rows, encode_video_rows(self.head, data.videos, self.device), None,
                       None)

    @property
    def num_videos(self) -> int:
        return sum(len(g.rows) for g in self.galleries)

    # ---- queries -------------------------------------------------------------------------------
    @torch.no_grad()
    def search(self, query: str, k: int = 10) -> list[Hit]:
        """The ``k`` best videos of the searched splits for ``query``."""
        return self.search_many([query], k)[0]

    @torch.no_grad()
    def search_many(self, queries: list[str], k: int = 10) -> list[list[Hit]]:
        """The ``k`` best videos for each query, the queries encoded in one batch."""
        for query in queries:
            if not query.strip():
                raise AvrError("the query is empty")
        with self._lock:
            caption = encode_queries(self.towers, queries, self.caption_inputs, torch.float16)
            query_rows = {name: caption[name] for name in self.head.caption_inputs}
            found = [(*self._search_gallery(g, query_rows, caption, k), g)
                     for g in self.galleries if g.rows.size]
        hits = []
        for q in range(len(queries)):
            ranked = sorted(((row, score, g.split) for rows, scores, g in found
                             for row, score in zip(rows[q], scores[q])), key=lambda h: -h[1])[:k]
            hits.append([Hit(self.video_ids[row], split, float(score), self.captions_of(row))
                         for row, score, split in ranked])
        return hits

    def _search_gallery(self, gallery: Gallery, query_rows, caption, k: int):
        """Per query, the store rows of the gallery's best ``k`` videos and their scores
        (``caption``: the queries as cached caption rows, the first stage's vectors included)."""
        if gallery.index is None:
            sim = score_captions(self.head, query_rows, gallery.states, self.device,
                                 score_chunk=self._videos_per_block(gallery, query_rows)).sim
            sim = sim.numpy()
            return self._best(sim, [gallery.rows] * len(sim), k)
        wanted = self.candidates or CANDIDATES_PER_HIT * k
        _, found = first_stage.search(
            gallery.index, first_stage.query_vectors(self.first_stage, self.head, caption), wanted)
        rows, scores = [], []
        for q, candidates in enumerate(found):
            candidates = np.sort(candidates[candidates >= 0])
            positions = torch.from_numpy(np.searchsorted(gallery.rows, candidates))
            videos = {name: held[positions] for name, held in gallery.held.items()}
            one = {name: value[q:q + 1] for name, value in query_rows.items()}
            sim = score_rows(self.head, one, videos, self.device)[None]
            best_rows, best_scores = self._best(sim, [candidates], k)
            rows += best_rows
            scores += best_scores
        return rows, scores

    def _videos_per_block(self, gallery: Gallery, query_rows) -> int:
        """On the CPU, as many videos per ``head.score`` call as keep a block's work within
        SEARCH_BLOCK_BYTES: a few queries against a split in blocks of 64 videos (eval's CPU
        default, sized for thousands of captions) pay the call overhead hundreds of times.
        On a GPU, 0: avr.evaluate.score sizes blocks by the free memory."""
        if self.device.type != "cpu":
            return 0
        queries = len(next(iter(query_rows.values())))
        return max(1, SEARCH_BLOCK_BYTES // (queries * pair_bytes(gallery.states)))

    @staticmethod
    def _best(sim: np.ndarray, rows: list[np.ndarray], k: int):
        order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        return ([r[o] for r, o in zip(rows, order)],
                [s[o] for s, o in zip(sim, order)])

    def captions_of(self, row: int) -> list[str]:
        """The caption texts of store video ``row``, read for that video's captions only."""
        order, starts = self._captions_of
        caption_rows = np.sort(order[starts[row]:starts[row + 1]])
        return [str(t) for t in read_rows(self.group[schema.CAPTION_TEXT], caption_rows)]

    # ---- one pair ------------------------------------------------------------------------------
    @torch.no_grad()
    def explain(self, query: str, video_id: str) -> dict:
        """The head's score of ``query`` with one video, with its audio and its frames left out
        (heads that read audio), and ``head.explain``'s tensors for the pair as lists."""
        if not query.strip():
            raise AvrError("the query is empty")
        row = self.row_of.get(video_id)
        if row is None:
            raise KeyError(video_id)
        head: RetrievalHead = self.head
        videos = {name: torch.from_numpy(read_rows(self.group[name], np.asarray([row])))
                  for name in head.video_inputs}
        with self._lock:
            caption = encode_queries(self.towers, [query], head.caption_inputs, torch.float16)
            scores = {"score": self._pair_score(videos, caption)}
            if schema.HAS_AUDIO in head.video_inputs:
                scores["visual_score"] = self._pair_score(mask_modalities(videos, "v", head),
                                                          caption)
                scores["audio_score"] = self._pair_score(mask_modalities(videos, "a", head),
                                                         caption)
            head.eval()
            explained = head.explain(head.encode_texts(_on(caption, self.device)),
                                     head.encode_videos(_on(videos, self.device)))
        return {**scores, "explain": {name: value[0].float().cpu().tolist()
                                      for name, value in explained.items()}}

    def _pair_score(self, videos, caption) -> float:
        return float(score_split(self.head, videos, caption, self.device).sim[0, 0])


def score_rows(head: RetrievalHead, query_row: dict[str, torch.Tensor], videos: dict,
               device: torch.device) -> np.ndarray:
    """The head's scores [V] of one query (a cached caption row) against the cached rows of
    ``videos`` (the index's candidates): only those rows are encoded."""
    return score_split(head, videos, query_row, device).sim[0].numpy()


def _on(rows: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: value.to(device) for name, value in rows.items()}


def search(query: str, run: str | Path | None = None, *, k: int = 10, split: str = "test",
           device: str = "auto", index: str | Path | None = None,
           candidates: int | None = None) -> list[Hit]:
    """The ``k`` best videos of ``split`` ("all": every split) for ``query``. ``index``: the
    first-stage index (default ``<cache>/index/`` when built); ``candidates``: how many of its
    videos per split the head re-scores (given, it forces the two-stage path)."""
    if not query.strip():
        raise AvrError("the query is empty")
    return Searcher(run, split=split, device=device, index=index,
                    candidates=candidates).search(query, k)
