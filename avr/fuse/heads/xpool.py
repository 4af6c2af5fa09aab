"""X-Pool: text-conditioned pooling of CLIP frame embeddings (Gorti et al., CVPR 2022).

docs/methods.md B.3 and E. The caption's CLIP sentence embedding attends over the video's CLIP
frame embeddings with one head (``avr.fuse.blocks.TextConditionedPool``: LN, attention, W_o,
LN, residual linear + dropout, LN; identity init as released); the score is the cosine of the
caption embedding with the video pooled for that caption. Video only: no audio is read.

Every (caption, video) pair is pooled with its own caption: per video, LN and the K/V
projections of the frames are computed once (``encode_videos``); ``score`` runs the attention
of each query with each video in chunks (X-Pool's own eval pools all pairs at once and runs out
of memory on large test sets, docs/methods.md E).

Logit scale, as X-Pool's release (``modules/loss.py``, ``trainer/trainer.py``): starts at
CLIP's pretrained 100 (temperature 0.01), learned, ``exp`` unclamped in the loss, clamped to
ln 100 after every optimizer step (``base``), trained at X-Pool's clip_lr 1e-6 with weight
decay 0.2 (the recipe's ``scale_lr``, docs/recipes.md).
"""

from __future__ import annotations

import torch

from avr.fuse.blocks import TextConditionedPool, cosine_scores
from avr.fuse.heads import register_head
from avr.fuse.heads.base import EXPLAIN_FRAME_ATTENTION, HeadConfig, RetrievalHead, Rows, State
from avr.store import schema


@register_head("xpool")
class XPool(RetrievalHead):
    Config = HeadConfig
    video_inputs = (schema.FRAME_EMBEDDINGS, schema.FRAME_MASK)
    caption_inputs = (schema.TEXT_EMBEDDINGS,)
    stackable = True

    def __init__(self, spec, config: HeadConfig):
        super().__init__(spec, config)
        self.pool = TextConditionedPool(spec.clip_dim, config.dropout)

    def encode_videos(self, videos: Rows) -> State:
        frames = videos[schema.FRAME_EMBEDDINGS].to(self.param_dtype())  # [V, F, D]
        keys, values = self.pool.encode_tokens(frames)
        return {"keys": keys, "values": values, "mask": videos[schema.FRAME_MASK].bool()}

    def encode_texts(self, captions: Rows) -> State:
        text = captions[schema.TEXT_EMBEDDINGS].to(self.param_dtype())  # [Q, D]
        return {"text": text, "query": self.pool.encode_query(text)}

    def score(self, texts: State, videos: State) -> torch.Tensor:
        pooled = self.pool.pool_all_pairs(texts["query"], videos["keys"], videos["values"],
                                          videos["mask"])
        return cosine_scores(texts["text"], pooled.vectors)

    def explain(self, texts: State, videos: State) -> dict[str, torch.Tensor]:
        pooled = self.pool.pool_paired(texts["query"], videos["keys"], videos["values"],
                                       videos["mask"])
        return {EXPLAIN_FRAME_ATTENTION: pooled.weights}  # [P, F]
