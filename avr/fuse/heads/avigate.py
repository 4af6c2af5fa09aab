"""AVIGATE: audio-guided video representation with gated attention (docs/methods.md A.1-A.5, A.8).

Jeong, Park, Kim, Kwak, "Learning Audio-guided Video Representation with Gated Attention for
Video-Text Retrieval", CVPR 2025 (arXiv 2504.02397); official code
github.com/BoseungJeong/AVIGATE-CVPR2025. On cached features (A.8) CLIP and AST are frozen; what
trains is the audio projection, the audio resampler, the gated fusion transformer and the logit
scale.

Video side (``encode_videos``, no text involved, so retrieval stays O(A + V + T)):

- Audio tokens (A.1): [mean(CLS, distillation)] + 1212 AST patch tokens = 1213 tokens of width
  Da, projected Da -> Dc (no bias, N(0, 1/Da) init: the code's ``audio_projection``). AST's final
  LayerNorm is already in the cached tokens (see "AST tokens" below).
- Audio resampler (A.2): M = 12 learnable queries (orthogonal init) plus a learnable query
  position embedding, then layers of pre-LN blocks
  ``q += SelfAttn(LN1 q); q += CrossAttn(LN3 q, LN3 A); q += MLP(LN2 q)``; out a [M, Dc].
- Gated fusion (A.3), per layer l with u = [masked mean_F f; mean_M a]:
  ``g_mha, g_ffn = tanh(MLP_mha u), tanh(MLP_ffn u)``  (one scalar each per video and layer),
  ``z = f + g_mha CrossAttn(LN3 f, a, a); zbar = z + g_ffn FFN_cross(LN4 z);
  h = zbar + SelfAttn(LN1 zbar); f = h + MLP(LN2 h)``.
  The input is the CLIP frames plus a learnable frame position embedding; the output is
  ``0.05 f^(L) + 0.95 (frames + position)`` (the code's residual).
- Every LayerNorm of the resampler and the fusion layers has eps 1e-12, the code's TF-style
  ``LayerNorm`` (``modules/until_module.py``).

Pair side (``score``), A.4: with normalised fused frames v_f and v_bar = normalise(mean of v_f
over valid frames), S = (s <t, v_bar> + (1/lambda) log sum_f exp(lambda s <t, v_f>)) / 2, where
s is the logit scale. ``score`` therefore returns scaled logits (``score_is_scaled``).

Loss, A.5: symmetric cross-entropy on S + s m, where the margin m_ij = min(lambda_m (1 -
(c^t_ij + c^v_ij) / 2), delta) (m_ii = 0) comes from the text-text cosine and the video-video
cosine of the pre-fusion global vectors, without gradient (``adaptive_margins``). As in the
code, the pre-fusion global vector is normalise(mean over valid frames of normalise(frame +
frame position embedding)) (``visual_output_global`` of ``modeling.py``).

Logit scale: CLIP's pretrained 100, learnable and clamped at 100 (``temperature=0.01``,
``learn_temperature=true``): the code trains CLIP's ``logit_scale`` and clamps it at ln 100
after every step. There it sits in CLIP's parameter group at lr x coef_lr = 1e-7, so it barely
moves; the recipe gives it that lr (``scale_lr``). A.5's margins (delta = 0.1, added times the
scale) are tuned for s = 100; ``learn_temperature=false`` keeps it there. So the default
schedule keeps it at 100 and at the release's lr on a store of random backbones too, where the
other heads start at CLIP's from-scratch 1 / 0.07 and learn it at the head's lr (on the demo
store, seed 0, demo settings, before recipes: test R@1 35.4 from 100, 20.8 from 14.3).
The query tokens train at 100 x the lr with weight decay 0.2 (``query_lr_scale``,
``query_weight_decay``: the release's optimizer group, ``parameter_groups``).

AST tokens. The code runs AST's blocks, averages the *pre-norm* CLS and distillation tokens,
then applies AST's final LayerNorm (timm, eps 1e-6) to that average and to the patches. The
cache holds ``last_hidden_state`` of transformers' ``ASTModel``: every token already through
that final LayerNorm with its pretrained affine (eps 1e-12 in transformers' port). So:

- the patch tokens are exactly the code's tokens after ``audio.v.norm``, used as they are: a
  second LayerNorm would normalise twice and drop the pretrained affine;
- the global token is the code's LN((x_cls + x_dist)/2): extract stores it
  (``AUDIO_POOLED_TOKEN``, AST's final LayerNorm of the mean of the pre-norm tokens). A store
  written before it has only the post-norm tokens, from which the code's value cannot be
  rebuilt: there the global token is their mean, LN(x_cls)/2 + LN(x_dist)/2 (how AST's own
  classifier pools them), and the run's first line says so (``store_note``).
- AST's final LayerNorm is not trained here. The code lists it as trainable, but in CLIP's
  audio parameter group at lr 1e-7, where it stays at its pretrained values.

Initialisation (the code's, as far as it applies without CLIP weights):

- Linear layers N(0, 0.02^2) with zero bias, LayerNorms 1 and 0: CLIP4Clip's ``init_weights``,
  which the code applies to the whole model before copying CLIP weights in; attention
  in-projections keep PyTorch's xavier init, as in the code. The 0.02 holds at the code's width
  512; at another CLIP width D the Linear std is 0.02 sqrt(512 / D), so that a narrow head (the
  demo's D = 32) starts with the activation scale of the code rather than 4x smaller weights.
- The code copies self-attention and MLP weights of both transformers from CLIP text blocks 0-3
  and the frame position embedding from CLIP's text positional embedding; without CLIP weights
  in the cache these keep the N(0, 0.02^2) init (the frame positions, like the query positions,
  an N(0, 0.02^2) embedding). The queries are orthogonal rows, as in the code.
- The query position embedding is added once, before the first resampler layer.

Choices where the code cannot apply to cached features or where avr departs:

- The code has no dropout, so ``dropout`` defaults to 0 and applies to the attention weights.
- Missing audio (HAS_AUDIO False): both gates are forced to zero, so the audio takes no part
  (the code instead feeds AST the zero fbank). The video is then the audio-free path: every
  layer reduces to its self-attention and MLP refinement.
- Frame mask: masked frames are excluded from every mean over frames, from the log-sum-exp and
  as self-attention keys. The code masks the means of A.4-A.5 and the log-sum-exp but leaves
  padded frames in the fusion layers' self-attention and in the gates' frame mean; avr's
  extraction repeats frames of short videos instead of padding, so this only matters for
  caches with padded frames. A video with no valid frame has no evidence at all (AVIGATE feeds
  audio only through the frames): it scores 0 against every caption.
- ``explain`` gate columns follow the code's ``(attn_gate_list, ff_gate_list)``: the L
  cross-attention gates, then the L cross-FFN gates.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from avr.errors import AvrError
from avr.fuse.blocks import masked_mean
from avr.fuse.heads import register_head
from avr.fuse.heads.base import (EXPLAIN_AUDIO_GATE, EXPLAIN_FRAME_ATTENTION, GroupSpec,
                                 HeadConfig, RetrievalHead, Rows, State, symmetric_infonce)
from avr.store import schema

FUSED_WEIGHT = 0.05  # A.3, code-only: output = 0.05 fused + 0.95 (CLIP frames + position)
INIT_STD = 0.02  # CLIP4Clip's initializer_range: Linear weights and position embeddings
RELEASE_WIDTH = 512  # the CLIP width the release runs at, where Linear weights get INIT_STD
LAYER_NORM_EPS = 1e-12  # the code's TF-style LayerNorm in the resampler and fusion layers


@dataclass
class AvigateConfig(HeadConfig):
    temperature: float = 0.01  # CLIP's logit scale, 100 (A.4)
    learn_temperature: bool = True  # the code trains it, clamped at 100
    dropout: float = 0.0  # attention dropout; the code has none
    num_queries: int = 12  # M, audio resampler queries (A.2)
    resampler_layers: int = 4  # --audio_query_layers
    fusion_layers: int = 4  # L, --cross_num_hidden_layers
    num_heads: int = 8  # must divide the CLIP width
    lse_lambda: float = 1.0  # lambda of the log-sum-exp over frames (A.4, --temperature)
    margin_scale: float = 0.2  # lambda of the adaptive margin (A.5, --beta)
    margin_cap: float = 0.1  # delta of the adaptive margin (A.5, --margin_BD)
    # The query tokens' own parameter group (main_task_retrieval.py:220, 236): 100 x the lr,
    # weight decay 0.2.
    query_lr_scale: float = 100.0
    query_weight_decay: float = 0.2


# ---- pure functions ----------------------------------------------------------------------------

def adaptive_margins(text_similarity: torch.Tensor, video_similarity: torch.Tensor, *,
                     scale: float, cap: float) -> torch.Tensor:
    """A.5: m_ij = min(scale * (1 - (c^t_ij + c^v_ij) / 2), cap), with m_ii = 0.

    Both inputs are [B, B] cosine similarities within one modality (text-text, and video-video
    on the pre-fusion frame means); the result [B, B] is added, times the logit scale, to the
    negative logits: similar negatives get a small margin, dissimilar ones up to ``cap``.
    """
    margins = (scale * (1.0 - 0.5 * (text_similarity + video_similarity))).clamp(max=cap)
    return margins.masked_fill(torch.eye(len(margins), dtype=torch.bool,
                                         device=margins.device), 0.0)


def multi_grained_similarity(text: torch.Tensor, frames: torch.Tensor, video: torch.Tensor,
                             frame_mask: torch.Tensor, scale: torch.Tensor,
                             lse_lambda: float) -> torch.Tensor:
    """A.4: S = (s <t, v_bar> + (1/lambda) log sum_f exp(lambda s <t, v_f>)) / 2, as [Q, V].

    ``text`` [Q, D], ``frames`` [V, F, D] and ``video`` [V, D] are L2-normalised; masked frames
    are left out of the sum, and a video without any valid frame scores 0.
    """
    has_frames = frame_mask.any(1)  # [V]
    global_sim = scale * text @ video.t()  # [Q, V]
    frame_logits = lse_lambda * scale * torch.einsum("qd,vfd->qvf", text, frames)  # [Q, V, F]
    usable = frame_mask | ~has_frames[:, None]  # empty videos keep every frame, then score 0
    local_sim = torch.logsumexp(frame_logits.masked_fill(~usable, float("-inf")), -1) / lse_lambda
    both = 0.5 * (local_sim + global_sim)
    return torch.where(has_frames, both, torch.zeros_like(both))


def global_vector(frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """normalise(mean over valid frames of normalise(frames)): [V, F, D] -> [V, D]."""
    return F.normalize(masked_mean(F.normalize(frames, dim=-1), frame_mask), dim=-1)


# ---- building blocks ---------------------------------------------------------------------------

class QuickGELU(nn.Module):
    """CLIP's GELU approximation, used by every AVIGATE MLP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def init_linear_layers(module: nn.Module, width: int) -> None:
    """CLIP4Clip's ``init_weights`` for a Linear layer: weight N(0, std^2), bias 0, with std the
    release's INIT_STD at its width, scaled as 1 / sqrt(width) at other widths."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=INIT_STD * math.sqrt(RELEASE_WIDTH / width))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def layer_norm(width: int) -> nn.LayerNorm:
    return nn.LayerNorm(width, eps=LAYER_NORM_EPS)


def mlp(dim_in: int, dim_hidden: int, dim_out: int, *, bias: bool) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, dim_hidden, bias=bias), QuickGELU(),
                         nn.Linear(dim_hidden, dim_out, bias=bias))


def attention(width: int, heads: int, dropout: float) -> nn.MultiheadAttention:
    return nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)


class ResamplerLayer(nn.Module):
    """A.2, one layer: self-attention of the queries, cross-attention to the audio, MLP."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.ln_1, self.ln_2, self.ln_3 = (layer_norm(width) for _ in range(3))
        self.self_attn = attention(width, heads, dropout)
        self.cross_attn = attention(width, heads, dropout)
        self.mlp = mlp(width, 4 * width, width, bias=True)

    def forward(self, queries: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        # queries [V, M, D], audio [V, 1213, D]
        x = self.ln_1(queries)
        queries = queries + self.self_attn(x, x, x, need_weights=False)[0]
        audio_keys = self.ln_3(audio)  # the code normalises queries and audio with the same LN3
        queries = queries + self.cross_attn(self.ln_3(queries), audio_keys, audio_keys,
                                            need_weights=False)[0]
        return queries + self.mlp(self.ln_2(queries))


class GatedFusionLayer(nn.Module):
    """A.3, one layer: gated cross-attention and cross-FFN on audio, then self-attention + MLP."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.ln_1, self.ln_2, self.ln_3, self.ln_4 = (layer_norm(width) for _ in range(4))
        self.gate_mha = mlp(2 * width, width // 2, 1, bias=False)
        self.gate_ffn = mlp(2 * width, width // 2, 1, bias=False)
        self.cross_attn = attention(width, heads, dropout)
        self.cross_ffn = mlp(width, 4 * width, width, bias=False)
        self.self_attn = attention(width, heads, dropout)
        self.mlp = mlp(width, 4 * width, width, bias=True)

    def gates(self, frames: torch.Tensor, audio: torch.Tensor, frame_mask: torch.Tensor,
              has_audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g_mha, g_ffn), each [V, 1, 1]: tanh of an MLP of [mean frames; mean audio]."""
        pooled = torch.cat([masked_mean(frames, frame_mask), audio.mean(1)], -1)  # [V, 2D]
        present = has_audio.to(frames.dtype)[:, None, None]
        return (torch.tanh(self.gate_mha(pooled))[:, :, None] * present,
                torch.tanh(self.gate_ffn(pooled))[:, :, None] * present)

    def refine(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """The audio-free half: h = f + SelfAttn(LN1 f); f' = h + MLP(LN2 h)."""
        # A video without valid frames attends over all of them rather than over none (NaN).
        ignore = ~frame_mask & frame_mask.any(1, keepdim=True)  # [V, F]
        x = self.ln_1(frames)
        h = frames + self.self_attn(x, x, x, key_padding_mask=ignore, need_weights=False)[0]
        return h + self.mlp(self.ln_2(h))

    def forward(self, frames: torch.Tensor, audio: torch.Tensor, frame_mask: torch.Tensor,
                has_audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames [V, F, D] and audio queries [V, M, D] -> (frames [V, F, D], gates [V, 2])."""
        gate_mha, gate_ffn = self.gates(frames, audio, frame_mask, has_audio)
        z = frames + gate_mha * self.cross_attn(self.ln_3(frames), audio, audio,
                                                need_weights=False)[0]  # no LN on audio (code)
        z = z + gate_ffn * self.cross_ffn(self.ln_4(z))
        return self.refine(z, frame_mask), torch.cat([gate_mha, gate_ffn], -1)[:, 0]


# ---- the head ----------------------------------------------------------------------------------

@register_head("avigate")
class Avigate(RetrievalHead):
    Config = AvigateConfig
    video_inputs = (schema.FRAME_EMBEDDINGS, schema.FRAME_MASK, schema.AUDIO_PATCH_TOKENS,
                    schema.AUDIO_POOLED_TOKEN, schema.AUDIO_GLOBAL_TOKENS, schema.HAS_AUDIO)
    caption_inputs = (schema.TEXT_EMBEDDINGS,)
    score_is_scaled = True
    tuned_for_pretrained_scale = True

    def __init__(self, spec, config: AvigateConfig):
        super().__init__(spec, config)
        width, heads = spec.clip_dim, config.num_heads
        if heads < 1 or width % heads:
            raise AvrError(f"avigate: num_heads={heads} does not divide the CLIP width {width}; "
                           f"pass a divisor of {width} with --opt num_heads=N")
        self.audio_proj = nn.Linear(spec.ast_dim, width, bias=False)  # audio_projection
        self.queries = nn.Parameter(nn.init.orthogonal_(torch.empty(config.num_queries, width)))
        self.query_position = nn.Parameter(torch.randn(config.num_queries, width) * INIT_STD)
        self.resampler = nn.ModuleList(ResamplerLayer(width, heads, config.dropout)
                                       for _ in range(config.resampler_layers))
        self.frame_position = nn.Parameter(torch.randn(self.spec.num_frames, width) * INIT_STD)
        self.fusion = nn.ModuleList(GatedFusionLayer(width, heads, config.dropout)
                                    for _ in range(config.fusion_layers))
        self.apply(functools.partial(init_linear_layers, width=width))
        nn.init.normal_(self.audio_proj.weight, std=spec.ast_dim ** -0.5)

    def parameter_groups(self) -> tuple[GroupSpec, ...]:
        """The query tokens at ``query_lr_scale`` x the lr with their own weight decay, as the
        release's optimizer groups them."""
        return (GroupSpec("query_tokens", ("queries",), self.config.query_lr_scale,
                          self.config.query_weight_decay),)

    # ---- video side ----------------------------------------------------------------------------
    @classmethod
    def store_note(cls, spec: schema.CacheSpec) -> str | None:
        if spec.audio_pooled_token:
            return None
        return (f"avigate: the store has no {schema.AUDIO_POOLED_TOKEN} (written before avr "
                f"stored it), so the global audio token is the mean of AST's post-norm CLS and "
                f"distillation tokens, not the release's normalised pre-norm mean (extract again "
                f"for it)")

    def audio_tokens(self, videos: State) -> torch.Tensor:
        """A.1: [global token] + 1212 patches, post-norm as cached -> Dc, as [V, 1213, Dc]. The
        global token is AST's final LayerNorm of the mean of the pre-norm CLS and distillation
        tokens, as the release computes it (``AUDIO_POOLED_TOKEN``); on a store without it, the
        mean of the two post-norm tokens."""
        dtype = self.param_dtype()
        patches = videos[schema.AUDIO_PATCH_TOKENS].to(dtype)  # [V, 1212, Da]
        if schema.AUDIO_POOLED_TOKEN in videos:
            global_token = videos[schema.AUDIO_POOLED_TOKEN].to(dtype)[:, None]  # [V, 1, Da]
        else:
            global_token = videos[schema.AUDIO_GLOBAL_TOKENS].to(dtype).mean(1, keepdim=True)
        return self.audio_proj(torch.cat([global_token, patches], 1))

    def resample_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """A.2: audio tokens [V, N, D] -> M audio queries [V, M, D]."""
        queries = (self.queries + self.query_position).expand(len(audio), -1, -1)
        for layer in self.resampler:
            queries = layer(queries, audio)
        return queries

    def fuse(self, original: torch.Tensor, audio: torch.Tensor, frame_mask: torch.Tensor,
             has_audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A.3: CLIP frames + position [V, F, D] and audio queries -> (fused frames [V, F, D],
        gates [V, 2L])."""
        fused, gates = original, []
        for layer in self.fusion:
            fused, layer_gates = layer(fused, audio, frame_mask, has_audio)
            gates.append(layer_gates)
        gates = torch.stack(gates, 1)  # [V, L, 2]
        gates = torch.cat([gates[..., 0], gates[..., 1]], 1)  # mha gates, then ffn gates
        return FUSED_WEIGHT * fused + (1.0 - FUSED_WEIGHT) * original, gates

    def encode_videos(self, videos: Rows) -> State:
        frames = videos[schema.FRAME_EMBEDDINGS].to(self.param_dtype())  # [V, F, D]
        frame_mask = videos[schema.FRAME_MASK].bool()  # [V, F]
        has_audio = videos[schema.HAS_AUDIO].bool()  # [V]
        audio = self.resample_audio(self.audio_tokens(videos))  # [V, M, D]
        original = frames + self.frame_position  # visual_output_original in the code
        fused, gates = self.fuse(original, audio, frame_mask, has_audio)
        return {
            "frames": F.normalize(fused, dim=-1),  # v_f [V, F, D]
            "frame_mask": frame_mask,
            "video": global_vector(fused, frame_mask),  # v_bar [V, D]
            "visual_mean": global_vector(original, frame_mask),  # pre-fusion, for A.5 [V, D]
            "audio_gates": gates,  # [V, 2L]
        }

    # ---- text side and pairs -------------------------------------------------------------------
    def encode_texts(self, captions: Rows) -> State:
        text = captions[schema.TEXT_EMBEDDINGS].to(self.param_dtype())
        return {"text": F.normalize(text, dim=-1)}  # [Q, D]

    def score(self, texts: State, videos: State) -> torch.Tensor:
        """A.4 multi-grained similarity [Q, V], already multiplied by the logit scale."""
        return multi_grained_similarity(texts["text"], videos["frames"], videos["video"],
                                        videos["frame_mask"], self.scale(),
                                        self.config.lse_lambda)

    def loss(self, texts: State, videos: State) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A.5: symmetric cross-entropy with adaptive margins on the negative logits."""
        with torch.no_grad():
            text = texts["text"]
            visual = videos["visual_mean"]
            margins = adaptive_margins(text @ text.t(), visual @ visual.t(),
                                       scale=self.config.margin_scale, cap=self.config.margin_cap)
        scale = self.scale()
        loss = symmetric_infonce(self.score(texts, videos) + scale * margins)
        off_diagonal = ~torch.eye(len(margins), dtype=torch.bool, device=margins.device)
        return loss, {"loss": loss.detach(), "margin_mean": margins[off_diagonal].mean()}

    def explain(self, texts: State, videos: State) -> dict[str, torch.Tensor]:
        """Per pair: the gates of its video [P, 2L] and the log-sum-exp frame weights [P, F]."""
        text, frames, frame_mask = texts["text"], videos["frames"], videos["frame_mask"]
        frame_logits = self.config.lse_lambda * self.scale() * torch.einsum("pd,pfd->pf", text,
                                                                            frames)
        weights = torch.softmax(frame_logits.masked_fill(~frame_mask, float("-inf")), -1)
        return {EXPLAIN_AUDIO_GATE: videos["audio_gates"],
                EXPLAIN_FRAME_ATTENTION: torch.nan_to_num(weights, nan=0.0)}
