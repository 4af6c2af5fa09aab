"""TEFAL: text-conditioned feature alignment of audio and video (Ibrahimi et al., ICCV 2023).

docs/methods.md C (the paper: "Audio-Enhanced Text-to-Video Retrieval using Text-Conditioned
Feature Alignment", ICCV 2023).
Two independent text-conditioned cross-attention blocks, each X-Pool's block
(``avr.fuse.blocks.TextConditionedPool``, docs/methods.md B.3/E):

- text -> frames: the CLIP sentence embedding attends over the F CLIP frame embeddings
  (Eq. 1-3, unprimed weights) -> E_{V|T};
- text -> audio: the same caption attends over the 1212 AST patch tokens (CLS and distillation
  tokens discarded, as the paper does), first projected from D_ast to D_clip by a learned
  linear layer (the paper's audio embedding is already D_p wide) -> E_{A|T} (primed weights);
- fusion (``fusion="add"``, the paper's choice): E_{(V,A)|T} = E_{V|T} + E_{A|T}; the score is
  the cosine of the caption embedding with it. Loss: symmetric InfoNCE (Sec. 3, "Loss").

No code was released; what the paper leaves open follows X-Pool's release, TEFAL's video branch:

- Eq. 3 writes the block output as LN(XAttn W_O); both blocks use X-Pool's released form (LN2,
  residual linear with dropout, LN3) for symmetry.
- Logit scale: tau is learnable, "bootstrapping from a pre-trained CLIP model" (Sec. 3): it
  starts at CLIP's 100 (temperature 0.01), learned, clamped to 100 after every step, as X-Pool's
  release (``base``), at X-Pool's CLIP lr 1e-6 with weight decay 0.2 (the recipe's
  ``scale_lr``, docs/recipes.md).
- The loss is the mean of the two directions (CLIP, X-Pool); Eq. 6 sums them, which only
  doubles the gradient.

Clips without an audio track (HAS_AUDIO False), ``missing_audio``:

- ``zero_fbank`` (default, the paper's Sec. 4.2: "Whenever a video does not have an audio file,
  we set the filter bank to a zero vector"): the cache holds AST's tokens of that zero filter
  bank, and the audio branch attends over them like over any clip's. Every video then scores
  as E_{V|T} + E_{A|T} on one scale.
- ``mask``: the audio tokens of such a clip are masked, E_{A|T} is the zero vector and the clip
  scores on its frames alone (cos(t, E_{V|T})), a different scale from clips with audio under
  ``add``, which biases the ranking between the two groups.

``fusion`` selects the variants of the paper's Table 8 (Sec. 4.3.3, Fig. 4):

- ``add``:       E_{V|T} + E_{A|T}  (Eq. 1-3, the paper's TEFAL).
- ``late``:      Table 8 (A), "late fusion (X-Pool + audio)": E_{V|T} + E_A, with E_A the audio
                 embedding "from the audio encoder directly", not conditioned on the text. The
                 paper does not say which token; here E_A is the mean of the AST CLS and
                 distillation tokens (AST's own output embedding, also the paper's audio token
                 in (D)) through the D_ast -> D_clip projection. It reads no patch tokens.
- ``score_sum``: not in the paper: score-level fusion of the two text-conditioned branches,
                 cos(t, E_{V|T}) + cos(t, E_{A|T}), the usual meaning of late fusion in
                 retrieval (one similarity per modality, summed). It differs from ``add`` only
                 in where the sum happens.
- ``concat``:    Table 8 (B): FC([E_{V|T}, E_{A|T}]), 2D -> D. The FC starts as [I, I], so
                 training starts from ``add`` exactly and the variant can only move away from it
                 by learning; the paper's drop for (B) (6.3 R@1), which it attributes to the FC's
                 extra parameters, is not what this initialisation starts from.
- ``xattn``:     Table 8 (C): a third block with the caption as query over the two-token set
                 [E_{V|T}, E_{A|T}] of each pair ("stack the text-conditioned audio and video
                 embeddings and apply a third cross-attention block"). Its keys depend on the
                 pair, so its LN and K/V projections run per pair.
- ``stack``:     Table 8 (D): one block over frames and audio stacked along the token axis. As in
                 the paper, the audio token is the mean of the AST CLS and distillation tokens,
                 projected to D_clip: F + 1 keys. It reads no patch tokens.

Each fusion reads only the arrays it uses (``video_inputs_for``): ``late`` and ``stack`` load the
two AST global tokens instead of the 1212 patch tokens.

Modality masks (``avr eval --modalities``): FRAME_MASK masks frames; ``hide_audio`` leaves the
audio out of every clip (AUDIO_HIDDEN), whatever ``missing_audio`` says: the audio branch (or
E_A, or the stacked audio token) contributes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from avr.errors import AvrError
from avr.fuse.blocks import TextConditionedPool, cosine_scores
from avr.fuse.heads import register_head
from avr.fuse.heads.base import (EXPLAIN_AUDIO_ATTENTION, EXPLAIN_FRAME_ATTENTION, HeadConfig,
                                 RetrievalHead, Rows, State)
from avr.store import schema

FUSIONS = ("add", "late", "score_sum", "concat", "xattn", "stack")
# Fusions whose audio is one embedding per clip (AST's CLS and distillation tokens), not the
# text-conditioned pooling of the patch tokens.
GLOBAL_AUDIO_FUSIONS = ("late", "stack")
MISSING_AUDIO = ("zero_fbank", "mask")


@dataclass
class TefalConfig(HeadConfig):
    fusion: str = "add"  # one of FUSIONS (TEFAL Table 8)
    missing_audio: str = "zero_fbank"  # one of MISSING_AUDIO: a clip without an audio track

    def __post_init__(self) -> None:
        super().__post_init__()
        for option, value, choices in (("fusion", self.fusion, FUSIONS),
                                       ("missing_audio", self.missing_audio, MISSING_AUDIO)):
            if value not in choices:
                raise AvrError(f"tefal: unknown {option} {value!r}; "
                               f"choose one of {', '.join(choices)}")


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
    stackable = True

    @classmethod
    def video_inputs_for(cls, config: TefalConfig) -> tuple[str, ...]:
        unused = (schema.AUDIO_PATCH_TOKENS if config.fusion in GLOBAL_AUDIO_FUSIONS
                  else schema.AUDIO_GLOBAL_TOKENS)
        return tuple(name for name in cls.video_inputs if name != unused)

    def __init__(self, spec, config: TefalConfig):
        super().__init__(spec, config)
        dim = spec.clip_dim
        self.fusion = config.fusion
        self.audio_proj = nn.Linear(spec.ast_dim, dim)  # D_ast -> D_p
        self.video_pool = TextConditionedPool(dim, config.dropout)  # Eq. 1-3, W
        if self.fusion not in GLOBAL_AUDIO_FUSIONS:
            self.audio_pool = TextConditionedPool(dim, config.dropout)  # Eq. 1-3, W'
        if self.fusion == "concat":
            self.concat_proj = concat_identity(dim)
        if self.fusion == "xattn":
            self.fusion_pool = TextConditionedPool(dim, config.dropout)

    def hide_audio(self, videos: Rows) -> Rows:
        return {**videos, schema.AUDIO_HIDDEN: torch.ones_like(videos[schema.HAS_AUDIO])}

    # ---- per video, per caption ------------------------------------------------------------------
    def audio_present(self, videos: State) -> torch.Tensor:
        """[V] whether each clip's audio takes part: a clip without a track takes part through
        its zero-fbank tokens unless ``missing_audio="mask"``; hidden audio never does."""
        has_audio = videos[schema.HAS_AUDIO].bool()
        present = (has_audio if self.config.missing_audio == "mask"
                   else torch.ones_like(has_audio))
        hidden = videos.get(schema.AUDIO_HIDDEN)
        return present if hidden is None else present & ~hidden.bool()

    def audio_embedding(self, videos: State) -> torch.Tensor:
        """[V, D] E_A: the mean of AST's CLS and distillation tokens, projected to D_clip."""
        tokens = videos[schema.AUDIO_GLOBAL_TOKENS].to(self.param_dtype())  # [V, 2, Da]
        return self.audio_proj(tokens.mean(1))

    def encode_videos(self, videos: Rows) -> State:
        frames = videos[schema.FRAME_EMBEDDINGS].to(self.param_dtype())  # [V, F, D]
        frame_mask = videos[schema.FRAME_MASK].bool()  # [V, F]
        present = self.audio_present(videos)  # [V]
        if self.fusion == "stack":
            tokens = torch.cat([frames, self.audio_embedding(videos)[:, None]], dim=1)  # [V, F+1, D]
            keys, values = self.video_pool.encode_tokens(tokens)
            mask = torch.cat([frame_mask, present[:, None]], dim=1)
            return {"video_keys": keys, "video_values": values, "video_mask": mask}
        video_keys, video_values = self.video_pool.encode_tokens(frames)
        state = {"video_keys": video_keys, "video_values": video_values, "video_mask": frame_mask}
        if self.fusion == "late":
            audio = self.audio_embedding(videos) * present[:, None].to(frames.dtype)  # [V, D]
            return {**state, "audio_embedding": audio}
        audio = self.audio_proj(videos[schema.AUDIO_PATCH_TOKENS].to(frames.dtype))  # [V, 1212, D]
        audio_keys, audio_values = self.audio_pool.encode_tokens(audio)
        return {**state, "audio_keys": audio_keys, "audio_values": audio_values,
                "audio_present": present}

    def encode_texts(self, captions: Rows) -> State:
        text = captions[schema.TEXT_EMBEDDINGS].to(self.param_dtype())  # [Q, D]
        state = {"text": text, "video_query": self.video_pool.encode_query(text)}
        if self.fusion not in GLOBAL_AUDIO_FUSIONS:
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
        if self.fusion == "late":
            return cosine_scores(texts["text"], video.vectors + videos["audio_embedding"][None])
        audio = self.audio_pool.pool_all_pairs(texts["audio_query"], videos["audio_keys"],
                                               videos["audio_values"], audio_mask(videos))
        if self.fusion == "score_sum":
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
        (``stack``: the audio entry is the weight [P, 1] of the single audio token; ``late``: no
        attention over audio)."""
        video = self.video_pool.pool_paired(texts["video_query"], videos["video_keys"],
                                            videos["video_values"], videos["video_mask"])
        if self.fusion == "stack":
            frames = videos["video_mask"].shape[1] - 1  # the last key is the audio token
            return {EXPLAIN_FRAME_ATTENTION: video.weights[:, :frames],
                    EXPLAIN_AUDIO_ATTENTION: video.weights[:, frames:]}
        if self.fusion == "late":
            return {EXPLAIN_FRAME_ATTENTION: video.weights}
        audio = self.audio_pool.pool_paired(texts["audio_query"], videos["audio_keys"],
                                            videos["audio_values"], audio_mask(videos))
        return {EXPLAIN_FRAME_ATTENTION: video.weights, EXPLAIN_AUDIO_ATTENTION: audio.weights}


def audio_mask(videos: State) -> torch.Tensor:
    """[V, N_audio] token mask: every patch of a clip whose audio takes part, none otherwise."""
    n_tokens = videos["audio_keys"].shape[1]
    return videos["audio_present"][:, None].expand(-1, n_tokens)
