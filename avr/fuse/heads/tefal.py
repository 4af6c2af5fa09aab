"""TEFAL: text-conditioned feature alignment of audio and video (Ibrahimi et al., ICCV 2023).

METHODS.md section C; the paper is in ``papers/tefal-text-conditioned-feature-alignment.txt``.
Two independent text-conditioned cross-attention blocks, each X-Pool's block
(``avr.fuse.blocks.TextConditionedPool``, METHODS.md B.3/E):

- text -> frames: the CLIP sentence embedding attends over the F CLIP frame embeddings
  (Eq. 1-3, unprimed weights) -> E_{V|T};
- text -> audio: the same caption attends over the 1212 AST patch tokens (CLS and distillation
  tokens discarded, as the paper does), first projected from D_ast to D_clip by a learned
  linear layer (the paper's audio embedding is already D_p wide) -> E_{A|T} (primed weights);
- fusion (``fusion="add"``, the paper's choice): E_{(V,A)|T} = E_{V|T} + E_{A|T}; the score is
  the cosine of the caption embedding with it. Loss: symmetric InfoNCE (Sec. 3, "Loss").

Eq. 3 writes the block output as LN(XAttn W_O); TEFAL's video branch is X-Pool, so both blocks
use X-Pool's released form (LN2, residual linear with dropout, LN3) for symmetry.

``fusion`` selects the variants of the paper's Table 8 (Sec. 4.3.3, Fig. 4):

- ``add``:    E_{V|T} + E_{A|T}  (Eq. 1-3, the paper's TEFAL).
- ``late``:   score-level fusion, cos(t, E_{V|T}) + cos(t, E_{A|T}). (Table 8 (A) instead adds an
              audio embedding that is *not* text-conditioned; here both stay conditioned so the
              variant isolates where the sum happens.)
- ``concat``: FC([E_{V|T}, E_{A|T}]), 2D -> D, initialised to [I, I] so it starts as ``add``
              (Table 8 (B)).
- ``xattn``:  a third block with the caption as query over the two-token set
              [E_{V|T}, E_{A|T}] of each pair (Table 8 (C): "stack the text-conditioned audio and
              video embeddings and apply a third cross-attention block"). Its keys depend on the
              pair, so its LN and K/V projections run per pair.
- ``stack``:  one block over frames and audio stacked along the token axis (Table 8 (D)). As in
              the paper, the audio token is the mean of the AST CLS and distillation tokens,
              projected to D_clip: F + 1 keys.

Modality masks (``avr eval --modalities``): FRAME_MASK masks frames; HAS_AUDIO False masks the
audio tokens, so E_{A|T} is the zero vector and the audio branch contributes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from avr import schema
from avr.errors import AvrError
from avr.fuse.blocks import TextConditionedPool, cosine_scores
from avr.fuse.heads import register_head
from avr.fuse.heads.base import (EXPLAIN_AUDIO_ATTENTION, EXPLAIN_FRAME_ATTENTION, HeadConfig,
                                 RetrievalHead, State)

FUSIONS = ("add", "late", "concat", "xattn", "stack")


@dataclass
class TefalConfig(HeadConfig):
    fusion: str = "add"  # one of FUSIONS (TEFAL Table 8)


def concat_identity(dim: int) -> nn.Linear:
    """Linear 2D -> D initialised to [I, I]: FC([a, b]) = a + b at the start."""
    layer = nn.Linear(2 * dim, dim)
    with torch.no_grad():
        layer.weight.copy_(torch.cat([torch.eye(dim), torch.eye(dim)], dim=1))
        layer.bias.zero_()
    return layer


@register_head("tefal")
class Tefal(RetrievalHead):
    Config = TefalConfig
    video_inputs = (schema.FRAME_EMBEDDINGS, schema.FRAME_MASK, schema.AUDIO_PATCH_TOKENS,
                    schema.AUDIO_GLOBAL_TOKENS, schema.HAS_AUDIO)
    caption_inputs = (schema.TEXT_EMBEDDINGS,)

    def __init__(self, spec, config: TefalConfig):
        super().__init__(spec, config)
        if config.fusion not in FUSIONS:
            raise AvrError(f"tefal: unknown fusion {config.fusion!r}; "
                           f"choose one of {', '.join(FUSIONS)}")
        dim = spec.clip_dim
        self.fusion = config.fusion
        self.audio_proj = nn.Linear(spec.ast_dim, dim)  # D_ast -> D_p
        self.video_pool = TextConditionedPool(dim, config.dropout)  # Eq. 1-3, W
        if self.fusion != "stack":
            self.audio_pool = TextConditionedPool(dim, config.dropout)  # Eq. 1-3, W'
        if self.fusion == "concat":
            self.concat_proj = concat_identity(dim)
        if self.fusion == "xattn":
            self.fusion_pool = TextConditionedPool(dim, config.dropout)

    # ---- per video, per caption ------------------------------------------------------------------
    def encode_videos(self, videos: State) -> State:
        dtype = self.param_dtype()
        frames = videos[schema.FRAME_EMBEDDINGS].to(dtype)  # [V, F, D]
        frame_mask = videos[schema.FRAME_MASK].bool()  # [V, F]
        has_audio = videos[schema.HAS_AUDIO].bool()  # [V]
        if self.fusion == "stack":
            audio = videos[schema.AUDIO_GLOBAL_TOKENS].to(dtype).mean(1, keepdim=True)  # [V, 1, Da]
            tokens = torch.cat([frames, self.audio_proj(audio)], dim=1)  # [V, F + 1, D]
            keys, values = self.video_pool.encode_tokens(tokens)
            mask = torch.cat([frame_mask, has_audio[:, None]], dim=1)
            return {"video_keys": keys, "video_values": values, "video_mask": mask}
        audio = self.audio_proj(videos[schema.AUDIO_PATCH_TOKENS].to(dtype))  # [V, 1212, D]
        video_keys, video_values = self.video_pool.encode_tokens(frames)
        audio_keys, audio_values = self.audio_pool.encode_tokens(audio)
        return {"video_keys": video_keys, "video_values": video_values, "video_mask": frame_mask,
                "audio_keys": audio_keys, "audio_values": audio_values, "has_audio": has_audio}

    def encode_texts(self, captions: State) -> State:
        text = captions[schema.TEXT_EMBEDDINGS].to(self.param_dtype())  # [Q, D]
        state = {"text": text, "video_query": self.video_pool.encode_query(text)}
        if self.fusion != "stack":
            state["audio_query"] = self.audio_pool.encode_query(text)
        if self.fusion == "xattn":
            state["fusion_query"] = self.fusion_pool.encode_query(text)
        return state

    # ---- per pair --------------------------------------------------------------------------------
    def score(self, texts: State, videos: State) -> torch.Tensor:
        video = self.video_pool.pool_all_pairs(texts["video_query"], videos["video_keys"],
                                               videos["video_values"], videos["video_mask"])
        if self.fusion == "stack":
            return cosine_scores(texts["text"], video.vectors)
        audio = self.audio_pool.pool_all_pairs(texts["audio_query"], videos["audio_keys"],
                                               videos["audio_values"], audio_mask(videos))
        if self.fusion == "late":
            return (cosine_scores(texts["text"], video.vectors)
                    + cosine_scores(texts["text"], audio.vectors))
        return cosine_scores(texts["text"], self.fuse(texts, video, audio))

    def fuse(self, texts: State, video, audio) -> torch.Tensor:
        """E_{(V,A)|T} [Q, V, D] from the two pooled embeddings [Q, V, D] (add, concat, xattn)."""
        if self.fusion == "add":
            return video.vectors + audio.vectors
        if self.fusion == "concat":
            return self.concat_proj(torch.cat([video.vectors, audio.vectors], dim=-1))
        # xattn: the caption attends over the pair's two tokens; an empty branch is masked out.
        n_text, n_video, dim = video.vectors.shape
        tokens = torch.stack([video.vectors, audio.vectors], dim=2)  # [Q, V, 2, D]
        mask = torch.stack([video.weights.sum(-1) > 0, audio.weights.sum(-1) > 0], dim=2)
        keys, values = self.fusion_pool.encode_tokens(tokens.flatten(0, 1))  # [Q*V, 2, D]
        query = texts["fusion_query"].repeat_interleave(n_video, dim=0)  # [Q*V, D]
        fused = self.fusion_pool.pool_paired(query, keys, values, mask.flatten(0, 1))
        return fused.vectors.view(n_text, n_video, dim)

    def explain(self, texts: State, videos: State) -> dict[str, torch.Tensor]:
        """Frame attention [P, F] and audio attention [P, 1212] of each caption on its own video
        (``stack``: the audio entry is the weight [P, 1] of the single audio token)."""
        video = self.video_pool.pool_paired(texts["video_query"], videos["video_keys"],
                                            videos["video_values"], videos["video_mask"])
        if self.fusion == "stack":
            frames = videos["video_mask"].shape[1] - 1  # the last key is the audio token
            return {EXPLAIN_FRAME_ATTENTION: video.weights[:, :frames],
                    EXPLAIN_AUDIO_ATTENTION: video.weights[:, frames:]}
        audio = self.audio_pool.pool_paired(texts["audio_query"], videos["audio_keys"],
                                            videos["audio_values"], audio_mask(videos))
        return {EXPLAIN_FRAME_ATTENTION: video.weights, EXPLAIN_AUDIO_ATTENTION: audio.weights}


def audio_mask(videos: State) -> torch.Tensor:
    """[V, N_audio] token mask: every patch of a clip with audio, none of a clip without."""
    n_tokens = videos["audio_keys"].shape[1]
    return videos["has_audio"][:, None].expand(-1, n_tokens)
