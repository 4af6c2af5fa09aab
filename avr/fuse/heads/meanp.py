"""meanP: CLIP4Clip's parameter-free temporal pooling, the floor every other head must beat.

Video embedding = mean of the (masked) L2-normalised CLIP frame embeddings; caption embedding =
the CLIP sentence embedding; similarity = cosine (CLIP4Clip "meanP", Luo et al. 2022, Sec. 3.3;
``modules/modeling.py``:392-394 normalises each frame before the masked mean).

CLIP4Clip fine-tunes CLIP itself; on frozen cached features the only thing left to learn is
a linear map on each side. ``proj=True`` (default) adds one D x D projection per side,
initialised to the identity so that epoch 0 is exactly zero-shot CLIP; ``proj=False`` is the
zero-shot baseline with only the temperature.

Logit scale, as CLIP4Clip's release (``modules/modeling.py``, ``main_task_retrieval.py``):
starts at CLIP's pretrained 100 (temperature 0.01), learned, unclamped in the forward pass,
clamped to 100 after every optimizer step (``base``), trained at CLIP's lr there, 1e-4 x
coef_lr 1e-3 = 1e-7, with weight decay 0.2 (the recipe's ``scale_lr``, docs/recipes.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from avr.fuse.blocks import masked_mean
from avr.fuse.heads import register_head
from avr.fuse.heads.base import HeadConfig, RetrievalHead, Rows, State
from avr.store import schema


@dataclass
class MeanPConfig(HeadConfig):
    proj: bool = True


def identity_linear(dim: int) -> nn.Linear:
    layer = nn.Linear(dim, dim)
    nn.init.eye_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


@register_head("meanp")
class MeanP(RetrievalHead):
    Config = MeanPConfig
    video_inputs = (schema.FRAME_EMBEDDINGS, schema.FRAME_MASK)
    caption_inputs = (schema.TEXT_EMBEDDINGS,)
    stackable = True
    dual_encoder = True

    def __init__(self, spec, config: MeanPConfig):
        super().__init__(spec, config)
        dim = spec.clip_dim
        self.video_proj = identity_linear(dim) if config.proj else nn.Identity()
        self.text_proj = identity_linear(dim) if config.proj else nn.Identity()

    def encode_videos(self, videos: Rows) -> State:
        frames = F.normalize(videos[schema.FRAME_EMBEDDINGS].to(self.param_dtype()), dim=-1)
        pooled = masked_mean(frames, videos.get(schema.FRAME_MASK))  # [V, D]
        return {"video": F.normalize(self.video_proj(pooled), dim=-1)}

    def encode_texts(self, captions: Rows) -> State:
        text = captions[schema.TEXT_EMBEDDINGS].to(self.param_dtype())
        return {"text": F.normalize(self.text_proj(text), dim=-1)}

    def score(self, texts: State, videos: State) -> torch.Tensor:
        return texts["text"] @ videos["video"].t()
