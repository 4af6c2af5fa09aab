"""`avr search`: type a query, get a trained run's ranked videos.

The query goes through the same text backbones that wrote the run's cache, loaded the way
extract loaded them (the store's attrs name every model and weights tag), then through the
head's ``encode_texts`` and ``score`` against the cached videos.

A split of up to EXHAUSTIVE_MAX_VIDEOS videos is scored whole. A larger one, when
`avr index build` has indexed the store, is searched in two stages: the index's top
``candidates`` videos for the query's CLIP sentence embedding (default CANDIDATES_PER_HIT * k),
then the head scores only those rows, read from the store alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from avr.device import resolve_device
from avr.errors import AvrError
from avr.evaluate import index as first_stage
from avr.evaluate.evaluator import open_run, resolve_run
from avr.evaluate.score import score_split
from avr.store import schema
from avr.store.group import open_store
from avr.store.read import read_rows
from avr.store.schema import CacheSpec
from avr.store.splits import split_rows

RANDOM_WEIGHTS = "random:"


@dataclass
class Hit:
    video_id: str
    split: str
    score: float
    captions: list[str]


def backbones_for_spec(spec: CacheSpec, device: torch.device):
    """The backbones that wrote a store with ``spec``: pretrained ones by their recorded names,
    tags and text lengths, the seeded tiny configs when the store was made with ``--backbones
    tiny``, or the generator's encoder for a store from `avr bench store`."""
    from avr.extract.backbones import BackboneNames, load_backbones
    from avr.extract.generated import encoder_for_spec, is_generated

    if is_generated(spec):
        return encoder_for_spec(spec)
    clip = spec.backbones["clip"]
    if clip.weights.startswith(RANDOM_WEIGHTS):
        return load_backbones("tiny", BackboneNames(swin_grids=spec.swin_grids), device=device,
                              seed=int(clip.weights[len(RANDOM_WEIGHTS):]))
    names = BackboneNames(clip_model=clip.name, clip_pretrained=clip.weights,
                          swin=spec.backbones["swin"].name, ast=spec.backbones["ast"].name,
                          roberta=spec.backbones["roberta"].name, swin_grids=spec.swin_grids,
                          clip_text_tokens=spec.clip_text_len,
                          roberta_text_tokens=spec.roberta_len)
    return load_backbones("real", names, device=device)


def encode_query(backbones, query: str, caption_inputs: tuple[str, ...], dtype: torch.dtype
                 ) -> dict[str, torch.Tensor]:
    """The query as one cached caption row would hold it (16-bit, like the store)."""
    encoded = backbones.encode_text([query])
    rows = {}
    for name in caption_inputs:
        value = encoded[name].cpu()
        rows[name] = value if value.dtype == torch.bool else value.to(dtype)
    return rows


EXHAUSTIVE_MAX_VIDEOS = 10_000  # up to here the head scores every video of a split
CANDIDATES_PER_HIT = 10


@torch.no_grad()
def search(query: str, run: str | Path | None = None, *, k: int = 10, split: str = "test",
           device: str = "auto", index: str | Path | None = None,
           candidates: int | None = None) -> list[Hit]:
    """The ``k`` best videos of ``split`` ("all": every split) for ``query``. ``index``: the
    first-stage index (default ``<cache>/index/`` when built); ``candidates``: how many of its
    videos per split the head re-scores (given, it forces the two-stage path)."""
    if not query.strip():
        raise AvrError("the query is empty")
    torch_device = resolve_device(device)
    run_dir = resolve_run(run)
    head, _, cache_path = open_run(run_dir, None, torch_device)
    group, spec = open_store(cache_path)
    saved = first_stage.find_index(cache_path, index, run=run_dir)
    if candidates is not None and saved is None:
        raise AvrError(f"--candidates needs a first-stage index; build one with "
                       f"`avr index build {cache_path}`")
    splits = schema.SPLITS if split == "all" else (split,)
    backbones = backbones_for_spec(spec, torch_device)
    caption = encode_query(backbones, query, tuple(dict.fromkeys(
        (*head.caption_inputs, schema.TEXT_EMBEDDINGS))), torch.float16)
    queries = first_stage.query_vectors(saved, head, caption) if saved is not None else None
    query_row = {n: caption[n] for n in head.caption_inputs}
    hits: list[Hit] = []
    for name in splits:
        rows = split_rows(group, name).done
        split_index = saved.split(name) if saved is not None else None
        if split_index is not None and (candidates is not None
                                        or rows.size > EXHAUSTIVE_MAX_VIDEOS):
            _, found = first_stage.search(split_index, queries,
                                          candidates or CANDIDATES_PER_HIT * k)
            rows = np.sort(found[0][found[0] >= 0])
        if rows.size == 0:
            continue
        scores = score_rows(head, query_row, group, rows, torch_device)
        order = np.argsort(-scores)[:k]
        best = np.sort(rows[order])
        id_of = dict(zip(best.tolist(), map(str, read_rows(group[schema.VIDEO_ID], best))))
        captions_of = _captions_by_row(group, best)
        hits += [Hit(id_of[row], name, float(score), captions_of.get(row, []))
                 for row, score in zip(rows[order].tolist(), scores[order])]
    return sorted(hits, key=lambda h: -h.score)[:k]


def score_rows(head, query_row: dict[str, torch.Tensor], group, rows: np.ndarray,
               device: torch.device) -> np.ndarray:
    """The head's scores of the query (one cached caption row) against store video ``rows``
    (ascending): only those rows of the arrays the head reads are loaded."""
    inputs = {name: torch.from_numpy(read_rows(group[name], rows)) for name in head.video_inputs}
    return score_split(head, inputs, query_row, device).sim[0].numpy()


def _captions_by_row(group, rows: np.ndarray) -> dict[int, list[str]]:
    """Caption texts of the given store video rows, read for those captions only."""
    caption_video = read_rows(group[schema.CAPTION_VIDEO])
    caption_rows = np.flatnonzero(np.isin(caption_video, rows))
    texts = read_rows(group[schema.CAPTION_TEXT], caption_rows)
    out: dict[int, list[str]] = {}
    for text, row in zip(texts, caption_video[caption_rows].tolist()):
        out.setdefault(row, []).append(str(text))
    return out
