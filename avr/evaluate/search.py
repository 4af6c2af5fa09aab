"""`avr search`: type a query, get a trained run's ranked videos.

The query goes through the same text backbones that wrote the run's cache, loaded the way
extract loaded them (the store's attrs name every model and weights tag), then through the
head's ``encode_texts`` and ``score`` against the cached videos.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from avr import schema
from avr.errors import AvrError
from avr.evaluate.evaluator import open_run, resolve_run
from avr.fuse.data import load_split
from avr.fuse.heads.base import chunked_scores, encode_in_chunks
from avr.fuse.trainer import _autocast, resolve_device
from avr.schema import CacheSpec

RANDOM_WEIGHTS = "random:"


@dataclass
class Hit:
    video_id: str
    split: str
    score: float
    captions: list[str]


def backbones_for_spec(spec: CacheSpec, device: torch.device):
    """The backbones that wrote a store with ``spec``: pretrained ones by their recorded names
    and tags, or the seeded tiny configs when the store was made with ``--backbones tiny``."""
    from avr.extract.backbones import BackboneNames, load_backbones

    clip = spec.backbones["clip"]
    if clip.weights.startswith(RANDOM_WEIGHTS):
        return load_backbones("tiny", BackboneNames(swin_grids=spec.swin_grids), device=device,
                              seed=int(clip.weights[len(RANDOM_WEIGHTS):]))
    names = BackboneNames(clip_model=clip.name, clip_pretrained=clip.weights,
                          swin=spec.backbones["swin"].name, ast=spec.backbones["ast"].name,
                          roberta=spec.backbones["roberta"].name, swin_grids=spec.swin_grids)
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


@torch.no_grad()
def search(query: str, run: str | Path | None = None, *, k: int = 10, split: str = "test",
           device: str = "auto") -> list[Hit]:
    if not query.strip():
        raise AvrError("the query is empty")
    torch_device = resolve_device(device)
    head, config, cache_path = open_run(resolve_run(run), None, torch_device)
    group, spec = schema.open_store(cache_path)
    splits = schema.SPLITS if split == "all" else (split,)
    backbones = backbones_for_spec(spec, torch_device)
    caption = encode_query(backbones, query, head.caption_inputs, torch.float16)
    hits: list[Hit] = []
    with _autocast(torch_device, True):
        texts = head.encode_texts({n: v.to(torch_device) for n, v in caption.items()})
        for name in splits:
            data = load_split(cache_path, name, head.video_inputs, ())
            if data.num_videos == 0:
                continue
            videos = encode_in_chunks(head.encode_videos, data.videos, torch_device, chunk=256)
            scores = chunked_scores(head, texts, videos)[0].numpy()
            captions_of = _captions_by_video(group, data.video_ids)
            for row in np.argsort(-scores)[:k]:
                video_id = data.video_ids[row]
                hits.append(Hit(video_id, name, float(scores[row]), captions_of.get(video_id, [])))
    return sorted(hits, key=lambda h: -h.score)[:k]


def _captions_by_video(group, video_ids: list[str]) -> dict[str, list[str]]:
    all_ids = np.asarray(group[schema.VIDEO_ID][:])
    caption_video = np.asarray(group[schema.CAPTION_VIDEO][:])
    texts = np.asarray(group[schema.CAPTION_TEXT][:])
    wanted = set(video_ids)
    out: dict[str, list[str]] = {}
    for text, row in zip(texts, caption_video):
        video_id = str(all_ids[row])
        if video_id in wanted:
            out.setdefault(video_id, []).append(str(text))
    return out
