"""HTAV: Hierarchical Temporal Audio-Video cross-attention fusion (Rashmi & Chethan, IJSSIS 2026,
DOI 10.2478/ijssis-2026-0009; docs/methods.md D, made concrete with (i)-(iv)).

The paper names its blocks (Eq. 1-15) without most of their equations and has no public code.
Every choice below is ours, taken from docs/methods.md (i)-(iv) where it offers one.

Video encoder, "Video Swin Feature Pyramid" (Eq. 1; docs/methods.md (iii)), per video:
    the cached Swin stages swin_level(k) [V, F, g_k^2, C_k] (stage 0 finest) go through a learned
    FPN: a lateral 1x1 map (Linear C_k -> width) per level, top-down nearest-neighbour
    upsample-and-add from the coarsest grid to the finest, a 3x3 output conv per level, plus a
    learned level embedding. Tokens of all levels form S = sum_k g_k^2 spatial tokens per frame.
    The CLIP frame embedding c_f [Dc] is each frame's base vector; c^_f = c_f / |c_f| its unit
    vector.
Text encoder, "Temporal RoBERTa Graph Network" (Eq. 2, 9-10; docs/methods.md (iv)), per caption:
    RoBERTa states -> LayerNorm + Linear -> TemporalGraph (GCN or GAT over sequential and
    windowed edges) = graph tokens G [L, width]. Token importance pi = masked softmax of a
    linear score of G. Summary h = LN(W_h t + sum_l pi_l G_l) with t the CLIP sentence
    embedding.

Per (query, video) pair, only what depends on both:
Video-text block, "hierarchical multiscale spatial-temporal attention" (Eq. 3-5), run for each
query x of the caption: every graph token G_l (``video_queries="tokens"``, the default: Eq. 3-4
have each text token attend to the video tokens), or the summary h alone
(``video_queries="summary"``, one query per caption, cheaper by a factor L per pair).
    Within each frame, attention of q_s(x) over the S spatial tokens of all FPN levels
    (softmax over s of q_s . k_fs / sqrt(width) + a learned bias per level), giving the frame's
    detail d_f = sum_s alpha_fs v_fs. Across frames, frame logits
    q_t(x) . (K_c c_f + W_t d_f + b) / sqrt(width) are pooled over windows of each span in
    ``spans`` (non-overlapping; every frame takes the masked mean of its window's logits, the
    logit of the window's mean key), then a masked softmax over the valid frames; the spans are
    mixed by softmax(W_span h) (the text picks the temporal granularity). Per query x this gives
    frame weights omega^x_f; the caption's are omega_f = sum_x pi_x omega^x_f (pi_x = 1 for the
    summary). E_VT has a CLIP part sum_f omega_f c^_f and a detail part
    sum_x pi_x sum_f omega^x_f d^x_f. Linearity gives the frame logits and both parts without
    building any per-frame vector for a pair.
Audio encoder, "Audio Spectrogram LSTM" (Eq. 6-8), per video:
    AST time tokens [V, 101, D_ast] -> LayerNorm -> LSTM (``lstm_layers`` layers of width
    ``width``, as Eq. 8's LSTM; ``bidirectional=true``: width/2 per direction) = audio steps
    A [V, 101, width].
Audio-text block, "threshold-based dynamic time cross-attention" (Eq. 11-13):
    attention alpha_lt = softmax_t(q_a(G_l) . k_a(A_t) / sqrt(width)) (Eq. 11), then the learned
    soft threshold of docs/methods.md (i).1 (LTP-style): M = sigmoid((alpha - theta) / T),
    alpha~ = alpha M / sum_t alpha M, T = THRESHOLD_TEMPERATURE / N_k (1e-3 for the 101 AST
    steps), with "dynamic thresholds for each audio token" (Sec. 4 C): theta_t =
    sigmoid(w . A_t + rho) / N_k, from each audio step's own state (``threshold="token"``; w
    starts at 0, so every theta_t starts at the global 0.5 / N_k); ``threshold="global"``: one
    learned theta = sigmoid(rho) / N_k for every token. Soft-DTW (docs/methods.md (ii);
    avr.fuse.softdtw) between the caption's graph tokens and the audio steps with cost
    1 - cos(q_a(G_l), k_a(A_t)) and ``dtw_gamma`` gives the expected alignment E [L, 101]
    (a caption's length is the count of its RoBERTa mask, padding being at the end);
    each text row of E, normalised to a distribution and mixed half and half with the uniform
    one (so that disagreement down-weights a step but never zeroes a token), multiplies
    alpha~ and the product is renormalised: w_lt. Audio weights a_t = sum_l pi_l w_lt and
    E_AT = sum_t a_t W_v A_t; E_AT = 0 for a video without audio (HAS_AUDIO False).
Fusion and readout (Eq. 14-15):
    e_CLS = sum_f omega_f c^_f + R(Dropout(detail part of E_VT + E_AT)), R a Linear width -> Dc
    (the CLS-style readout is linear, and E_final = E_VT + E_AT as Eq. 14 sums them);
    score = cos(e_CLS, P t), P a Linear on the sentence embedding.

Departures from the paper, deliberate:

- The score compares e_CLS with the CLIP sentence embedding t, and e_CLS carries the CLIP frame
  embeddings; the paper's encoders are Swin, RoBERTa and AST only and it does not say what e_CLS
  is compared with. CLIP gives the head a zero-shot start that Swin and RoBERTa cannot.
- Eq. 3 takes the cosine of a text and a video token as the attention weight; here the weights
  are a softmax of scaled dot products of learned projections (a cosine in [-1, 1] would leave
  the attention nearly uniform).
- Eq. 11 divides the audio-text logits by sqrt(width), as scaled dot-product attention does:
  the paper's plain dot product of 256-wide learned projections would start its softmax
  near one-hot.
- Video Swin with an FPN of 5 levels (Sec. 4 A, Fig. 11): the cache holds an image Swin's first
  three stages per frame (docs/cache.md), so the FPN has 3 levels over per-frame maps, and the
  temporal modelling Video Swin's 3D windows would give comes from the frame attention's spans.
  Video Swin tokens (torchvision's ``swin3d_t``: temporal stride 2, four stages, 7x7 maps at
  the last) would need another backbone run at extraction and arrays of their own; the paper
  names neither its Video Swin variant nor how its fifth level is made.
- Objective: symmetric InfoNCE (the base class's), which the paper does not give. The logit
  scale, which the paper does not give either, is CLIP's 100, learnable and clamped at 100
  (``temperature=0.01``, ``learn_temperature=true``).

Initialisation: the readout R starts at zero, the temporal query at zero (every frame logit is
0, so omega_f is uniform over the valid frames) and the sentence projection P as the identity.
The default head therefore starts as zero-shot CLIP4Clip meanP: cos(mean of the valid
L2-normalised CLIP frames, t) (CLIP4Clip ``modules/modeling.py``:392-394), at
any ``width``.

Cost: per pair O(K F S width + L 101 width) with K = L queries (``tokens``) or 1 (``summary``),
plus the soft-DTW wavefront over L x 101; ``score`` runs the pairs of a call in blocks of at most
PAIR_ELEMENTS elements per [pairs, ...] tensor. The soft-DTW alignment is differentiable (its
wavefronts are recorded by autograd in training).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from avr.errors import AvrError
from avr.fuse.blocks import identity_linear, masked_attention
from avr.fuse.graph import TemporalGraph
from avr.fuse.heads import base, register_head
from avr.fuse.heads.base import HeadConfig, RetrievalHead, Rows, State, slice_state, state_rows
from avr.fuse.softdtw import soft_dtw_alignment
from avr.store import schema

# A head declares its inputs per class; docs/cache.md guarantees >= 3 Swin stages in a cache (the
# extract default stores exactly 3), so the FPN reads stages 0-2.
SWIN_LEVELS = 3
THRESHOLD_TEMPERATURE = 0.1  # T * N_k of the soft threshold (docs/methods.md (i).1: T ~ 1e-3 at N_k ~ 100)
VIDEO_QUERIES = ("tokens", "summary")  # what queries the video: every graph token, or h alone
THRESHOLDS = ("token", "global")  # the audio threshold: per audio token, or one for all
PAIR_ELEMENTS = 1 << 27  # bound on (pairs x per-pair elements) of one block in ``score``
EXPLAIN_BLOCK = 16  # pairs per block-diagonal evaluation in ``explain``


@dataclass
class HTAVConfig(HeadConfig):
    temperature: float = 0.01  # CLIP's logit scale, 100; the paper gives none
    learn_temperature: bool = True  # learnable from 100, clamped at 100 as CLIP's
    width: int = 256  # common width of FPN levels, graph tokens and audio steps (even)
    graph: str = "gcn"  # "gcn" | "gat" (docs/methods.md (iv))
    graph_layers: int = 2
    graph_heads: int = 4  # GAT heads (graph="gat")
    window: int = 2  # windowed text edges |i - j| <= window (1: sequential only)
    spans: tuple[int, ...] = (1, 2, 4)  # temporal windows, in frames, of the frame attention
    video_queries: str = "tokens"  # "tokens": every graph token attends (Eq. 3-4) | "summary"
    dtw_gamma: float = 0.1  # soft-DTW smoothing on 1 - cos costs (docs/methods.md (ii))
    lstm_layers: int = 1
    bidirectional: bool = False  # the audio LSTM: Eq. 8's (False), or a BiLSTM
    threshold: str = "token"  # one of THRESHOLDS


class PairEvidence(NamedTuple):
    """What the per-pair part computes for Q queries x V videos."""

    score: torch.Tensor  # [Q, V]
    frame_weights: torch.Tensor  # [Q, V, F] omega_f
    audio_weights: torch.Tensor  # [Q, V, T] a_t
    alignment: torch.Tensor  # [Q, V, L, T] expected soft-DTW alignment
    threshold: torch.Tensor  # [V, T] theta of each audio token of each video ([V, 1]: global)


# ---- pure functions ----------------------------------------------------------------------------

def thresholded_attention(attention: torch.Tensor, threshold: torch.Tensor,
                          temperature: float) -> torch.Tensor:
    """docs/methods.md (i).1: M = sigmoid((A - theta) / T), A~ = A M / sum_k A M over the last axis.
    Some key always has A >= 1 / N_k > theta, so the sum never vanishes."""
    kept = attention * torch.sigmoid((attention - threshold) / temperature)
    return kept / kept.sum(-1, keepdim=True).clamp(min=torch.finfo(kept.dtype).tiny)


def span_frame_weights(frame_logits: torch.Tensor, frame_mask: torch.Tensor, span: int
                       ) -> torch.Tensor:
    """Frame weights [..., V, F] from windows of ``span`` frames: every frame takes the masked
    mean of its window's frame logits [..., V, F], then a masked softmax over the valid frames
    (``frame_mask`` [V, F]). A video with no valid frame gets all zeros."""
    num_frames = frame_logits.shape[-1]
    padded = -num_frames % span
    logits = F.pad(frame_logits, (0, padded)).unflatten(-1, (-1, span))  # [..., V, G, span]
    mask = F.pad(frame_mask, (0, padded)).unflatten(-1, (-1, span)).to(logits.dtype)  # [V, G, s]
    window_logits = (logits * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # [..., V, G]
    frame_level = window_logits.repeat_interleave(span, -1)[..., :num_frames]
    return masked_attention(frame_level, frame_mask)


def multi_span_frame_weights(frame_logits: torch.Tensor, frame_mask: torch.Tensor,
                             spans: tuple[int, ...], span_mix: torch.Tensor) -> torch.Tensor:
    """Mix of ``span_frame_weights`` over ``spans`` with text weights ``span_mix`` [Q, n] for
    frame logits [Q, ..., V, F]."""
    mix = span_mix.view(len(span_mix), *(1,) * (frame_logits.dim() - 1), -1)  # [Q, 1.., n]
    return sum(mix[..., n] * span_frame_weights(frame_logits, frame_mask, span)
               for n, span in enumerate(spans))


def alignment_weighted_attention(attention: torch.Tensor, alignment: torch.Tensor
                                 ) -> torch.Tensor:
    """Re-weight attention [..., L, T] by the expected alignment [..., L, T]: each alignment row
    normalised and mixed half and half with the uniform distribution, times the attention,
    renormalised over T."""
    steps = attention.shape[-1]
    path = alignment / alignment.sum(-1, keepdim=True).clamp(min=torch.finfo(alignment.dtype).tiny)
    weighted = attention * (path + 1.0 / steps)
    return weighted / weighted.sum(-1, keepdim=True).clamp(min=torch.finfo(weighted.dtype).tiny)


# ---- the FPN over cached Swin stages -----------------------------------------------------------

class SwinFPN(nn.Module):
    """Feature Pyramid Network (Lin et al. 2017; docs/methods.md (iii)) over per-frame Swin stages:
    lateral Linear to ``width``, top-down nearest upsample-and-add, 3x3 output conv per level.
    [V, F, g_k^2, C_k] per level -> [V, F, sum_k g_k^2, width]."""

    def __init__(self, channels: tuple[int, ...], grids: tuple[int, ...], width: int):
        super().__init__()
        self.grids = grids
        self.width = width
        self.lateral = nn.ModuleList(nn.Linear(c, width) for c in channels)
        self.output = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in channels)

    def forward(self, stages: list[torch.Tensor]) -> torch.Tensor:
        videos, frames = stages[0].shape[:2]
        maps = [lateral(stage).reshape(videos * frames, grid, grid, self.width).permute(0, 3, 1, 2)
                for lateral, stage, grid in zip(self.lateral, stages, self.grids)]  # [VF, W, g, g]
        for k in range(len(maps) - 2, -1, -1):  # coarse to fine
            maps[k] = maps[k] + F.interpolate(maps[k + 1], size=maps[k].shape[-2:], mode="nearest")
        tokens = [out(level).flatten(2).transpose(1, 2) for out, level in zip(self.output, maps)]
        return torch.cat(tokens, dim=1).reshape(videos, frames, -1, self.width)


# ---- the head -----------------------------------------------------------------------------------

@register_head("htav")
class HTAV(RetrievalHead):
    """HTAV on cached tokens; the module docstring gives every equation and choice."""

    Config = HTAVConfig
    video_inputs = (schema.FRAME_EMBEDDINGS, schema.FRAME_MASK, schema.AUDIO_TIME_TOKENS,
                    schema.HAS_AUDIO, *(schema.swin_level(k) for k in range(SWIN_LEVELS)))
    caption_inputs = (schema.TEXT_EMBEDDINGS, schema.ROBERTA_STATES, schema.ROBERTA_MASK)
    stackable = False  # its LSTM and soft-DTW are not verified under vmap: one trial at a time

    def __init__(self, spec: schema.CacheSpec, config: HTAVConfig):
        super().__init__(spec, config)
        width, spans = config.width, tuple(config.spans)
        if width % 2 and config.bidirectional:
            raise AvrError(f"htav width {width} must be even (two LSTM directions of width/2)")
        if config.threshold not in THRESHOLDS:
            raise AvrError(f"htav threshold {config.threshold!r} is unknown; choose one of "
                           f"{', '.join(THRESHOLDS)}")
        if not spans or min(spans) < 1:
            raise AvrError(f"htav spans {config.spans} must be frame counts >= 1")
        if config.video_queries not in VIDEO_QUERIES:
            raise AvrError(f"htav video_queries {config.video_queries!r} is unknown; choose one "
                           f"of {', '.join(VIDEO_QUERIES)}")
        if spec.num_swin_stages < SWIN_LEVELS:
            raise AvrError(f"htav needs {SWIN_LEVELS} Swin stages; the cache has "
                           f"{spec.num_swin_stages}: re-extract with more --swin stages")
        self.width, self.spans, self.gamma = width, spans, float(config.dtw_gamma)
        grids = tuple(spec.swin_grids[:SWIN_LEVELS])
        # video
        self.fpn = SwinFPN(tuple(spec.swin_channels[:SWIN_LEVELS]), grids, width)
        self.level_embedding = nn.Parameter(torch.randn(SWIN_LEVELS, width) * 0.02)
        self.level_bias = nn.Parameter(torch.zeros(SWIN_LEVELS))
        self.register_buffer("token_level", torch.repeat_interleave(
            torch.arange(SWIN_LEVELS), torch.tensor([g * g for g in grids])), persistent=False)
        self.spatial_key = nn.Linear(width, width)
        self.spatial_value = nn.Linear(width, width)
        self.frame_key = nn.Linear(spec.clip_dim, width)  # K_c c_f + b
        self.detail_key = nn.Linear(width, width, bias=False)  # W_t d_f
        # audio
        self.audio_norm = nn.LayerNorm(spec.ast_dim)
        self.audio_lstm = nn.LSTM(spec.ast_dim, width // 2 if config.bidirectional else width,
                                  num_layers=config.lstm_layers, batch_first=True,
                                  bidirectional=config.bidirectional)
        self.audio_key = nn.Linear(width, width)
        self.audio_value = nn.Linear(width, width)
        self.threshold_logit = nn.Parameter(torch.zeros(()))  # rho of theta = sigmoid(.) / N_k
        if config.threshold == "token":  # w . A_t, from 0: every token starts at the global theta
            self.token_threshold = nn.Linear(width, 1, bias=False)
            nn.init.zeros_(self.token_threshold.weight)
        # text
        self.token_proj = nn.Sequential(nn.LayerNorm(spec.roberta_dim),
                                        nn.Linear(spec.roberta_dim, width))
        self.graph = TemporalGraph(width, config.graph_layers, config.graph, config.window,
                                   config.graph_heads)
        self.token_query = nn.Linear(width, width)
        self.token_importance = nn.Linear(width, 1)
        self.sentence_to_width = nn.Linear(spec.clip_dim, width)
        self.summary_norm = nn.LayerNorm(width)
        self.spatial_query = nn.Linear(width, width)
        self.temporal_query = nn.Linear(width, width)
        # Zero: every frame logit starts at 0, uniform frame weights (zero-shot CLIP at init).
        nn.init.zeros_(self.temporal_query.weight)
        nn.init.zeros_(self.temporal_query.bias)
        self.span_logits = nn.Linear(width, len(spans))
        self.sentence_proj = identity_linear(spec.clip_dim)
        # fusion
        self.dropout = nn.Dropout(config.dropout)
        self.readout = nn.Linear(width, spec.clip_dim)  # R: starts at zero, CLIP frames alone
        nn.init.zeros_(self.readout.weight)
        nn.init.zeros_(self.readout.bias)

    # ---- per video -------------------------------------------------------------------------------
    def encode_videos(self, videos: Rows) -> State:
        dtype = self.param_dtype()
        stages = [videos[schema.swin_level(k)].to(dtype) for k in range(SWIN_LEVELS)]
        tokens = self.fpn(stages) + self.level_embedding[self.token_level]  # [V, F, S, W]
        frames = videos[schema.FRAME_EMBEDDINGS].to(dtype)  # c_f [V, F, Dc]
        audio, _ = self.audio_lstm(self.audio_norm(videos[schema.AUDIO_TIME_TOKENS].to(dtype)))
        has_audio = videos[schema.HAS_AUDIO].bool()
        return {
            "spatial_keys": self.spatial_key(tokens) / math.sqrt(self.width),  # [V, F, S, W]
            "token_values": self.spatial_value(tokens),  # v_fs [V, F, S, W]
            "frames": F.normalize(frames, dim=-1),  # c^_f [V, F, Dc]
            "frame_keys": self.frame_key(frames),  # K_c c_f + b [V, F, W]
            "frame_mask": videos[schema.FRAME_MASK].bool(),  # [V, F]
            "audio_keys": self.audio_key(audio),  # [V, T, W]
            "threshold_logits": self.threshold_logits(audio),  # [V, T] or [V, 1]
            "audio_values": self.audio_value(audio) * has_audio[:, None, None].to(dtype),
            "has_audio": has_audio,  # [V]
        }

    def threshold_logits(self, audio: torch.Tensor) -> torch.Tensor:
        """The logit of each audio step's threshold [V, T] (``threshold="token"``), or of the one
        global threshold, for each video [V, 1]."""
        if self.config.threshold == "global":
            return self.threshold_logit.expand(len(audio), 1)
        return self.token_threshold(audio).squeeze(-1) + self.threshold_logit

    # ---- per caption -----------------------------------------------------------------------------
    def encode_texts(self, captions: Rows) -> State:
        dtype = self.param_dtype()
        mask = captions[schema.ROBERTA_MASK].bool()  # [Q, L]
        tokens = self.graph(self.token_proj(captions[schema.ROBERTA_STATES].to(dtype)), mask)
        importance = masked_attention(self.token_importance(tokens).squeeze(-1), mask)  # pi [Q, L]
        sentence = captions[schema.TEXT_EMBEDDINGS].to(dtype)  # [Q, Dc]
        summary = self.summary_norm(self.sentence_to_width(sentence)
                                    + torch.einsum("ql,qlw->qw", importance, tokens))  # h
        if self.config.video_queries == "tokens":  # x = G_l, weighted by pi (Eq. 3-4)
            video_queries, query_weights = tokens, importance  # [Q, K=L, W], [Q, K]
        else:  # x = h alone
            video_queries, query_weights = summary[:, None], torch.ones_like(importance[:, :1])
        temporal_queries = self.temporal_query(video_queries) / math.sqrt(self.width)
        return {
            "token_queries": self.token_query(tokens),  # q_a(G_l) [Q, L, W]
            "token_mask": mask,
            "token_weights": importance,
            "spatial_queries": self.spatial_query(video_queries),  # q_s(x) [Q, K, W]
            "temporal_queries": temporal_queries,  # q_t(x) / sqrt(W) [Q, K, W]
            # q . W_t d = (q W_t) . d: the frame logit's share of the frame's detail
            "temporal_query_details": temporal_queries @ self.detail_key.weight,  # [Q, K, W]
            "query_weights": query_weights,  # pi_x [Q, K]
            "span_mix": self.span_logits(summary).softmax(-1),  # [Q, n_spans]
            "sentence": F.normalize(self.sentence_proj(sentence), dim=-1),  # [Q, Dc]
        }

    # ---- per pair --------------------------------------------------------------------------------
    def score(self, texts: State, videos: State) -> torch.Tensor:
        block = self._query_block(texts, videos)
        return torch.cat([self.pair_evidence(slice_state(texts, slice(q0, q0 + block)),
                                             videos).score
                          for q0 in range(0, state_rows(texts), block)])

    def pair_evidence(self, texts: State, videos: State) -> PairEvidence:
        """Every query of ``texts`` [Q] with every video of ``videos`` [V]."""
        clip_evidence, video_detail, frame_weights = self._video_text(texts, videos)
        audio_evidence, audio_weights, alignment, threshold = self._audio_text(texts, videos)
        detail = self.dropout(video_detail + audio_evidence.to(video_detail.dtype))
        embedding = F.normalize(clip_evidence + self.readout(detail), dim=-1)  # e_CLS [Q, V, Dc]
        score = torch.einsum("qvd,qd->qv", embedding, texts["sentence"].to(embedding.dtype))
        return PairEvidence(score, frame_weights, audio_weights, alignment, threshold)

    def _video_text(self, texts: State, videos: State
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """E_VT as its CLIP part [Q, V, Dc] and its detail part [Q, V, W], and the frame weights
        omega [Q, V, F]; K video queries per caption (x in the module docstring)."""
        spatial_logits = (torch.einsum("qkw,vfsw->qkvfs", texts["spatial_queries"],
                                       videos["spatial_keys"])
                          + self.level_bias[self.token_level])
        spatial = spatial_logits.softmax(-1)  # alpha_fs [Q, K, V, F, S]
        detail_logits = torch.einsum("qkw,vfsw->qkvfs", texts["temporal_query_details"],
                                     videos["token_values"])
        frame_logits = (torch.einsum("qkw,vfw->qkvf", texts["temporal_queries"],
                                     videos["frame_keys"])
                        + (spatial * detail_logits).sum(-1))  # [Q, K, V, F]
        query_frame_weights = (texts["query_weights"][:, :, None, None]
                               * multi_span_frame_weights(frame_logits, videos["frame_mask"],
                                                          self.spans, texts["span_mix"]))
        frame_weights = query_frame_weights.sum(1)  # omega [Q, V, F]
        clip_evidence = torch.einsum("qvf,vfd->qvd", frame_weights, videos["frames"])
        detail = torch.einsum("qkvfs,vfsw->qvw", query_frame_weights[..., None] * spatial,
                              videos["token_values"])
        return clip_evidence, detail, frame_weights

    def _audio_text(self, texts: State, videos: State
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """E_AT [Q, V, W], audio weights a [Q, V, T], alignment [Q, V, L, T], theta [V, T] (one
        per audio token) or [V, 1] (global)."""
        queries, keys = texts["token_queries"], videos["audio_keys"]
        Q, L, _ = queries.shape
        V, T, _ = keys.shape
        logits = torch.einsum("qlw,vtw->qvlt", queries, keys).float() / math.sqrt(self.width)
        threshold = torch.sigmoid(videos["threshold_logits"]).float() / T  # [V, T] or [V, 1]
        attention = thresholded_attention(logits.softmax(-1), threshold[None, :, None],
                                          THRESHOLD_TEMPERATURE / T)
        cost = 1.0 - torch.einsum("qlw,vtw->qvlt", F.normalize(queries, dim=-1),
                                  F.normalize(keys, dim=-1)).float()
        lengths = texts["token_mask"].sum(-1).clamp(min=1).repeat_interleave(V)  # [Q*V]
        alignment = soft_dtw_alignment(cost.reshape(Q * V, L, T), self.gamma, lengths
                                       ).reshape(Q, V, L, T)
        weights = alignment_weighted_attention(attention, alignment)  # w_lt
        audio_weights = (torch.einsum("ql,qvlt->qvt", texts["token_weights"].float(), weights)
                         * videos["has_audio"][None, :, None])
        evidence = torch.einsum("qvt,vtw->qvw", audio_weights.to(videos["audio_values"].dtype),
                                videos["audio_values"])
        return evidence, audio_weights, alignment, threshold

    def _query_block(self, texts: State, videos: State) -> int:
        """Queries per block so that one block's [Q, V, ...] tensors hold <= PAIR_ELEMENTS."""
        frames, tokens = videos["spatial_keys"].shape[1:3]
        length, steps = texts["token_queries"].shape[1], videos["audio_keys"].shape[1]
        video_queries = texts["spatial_queries"].shape[1]
        per_pair = (video_queries * frames * tokens + length * steps
                    + (length + steps + 1) * (length + 1) + self.width + self.spec.clip_dim)
        return max(1, PAIR_ELEMENTS // (per_pair * max(1, state_rows(videos))))

    # ---- introspection ---------------------------------------------------------------------------
    @torch.no_grad()
    def explain(self, texts: State, videos: State) -> dict[str, torch.Tensor]:
        """Pair i = (texts[i], videos[i]): frame weights [P, F], audio weights [P, 101], soft-DTW
        alignment [P, L, 101] and the audio threshold theta of each audio step [P, 101] (the
        global one: [P, 1])."""
        parts = []
        for p0 in range(0, state_rows(texts), EXPLAIN_BLOCK):
            rows = slice(p0, p0 + EXPLAIN_BLOCK)
            evidence = self.pair_evidence(slice_state(texts, rows), slice_state(videos, rows))
            diagonal = torch.arange(evidence.score.shape[0], device=evidence.score.device)
            parts.append((evidence.frame_weights[diagonal, diagonal],
                          evidence.audio_weights[diagonal, diagonal],
                          evidence.alignment[diagonal, diagonal],
                          evidence.threshold[diagonal]))
        frames, audio, alignment, threshold = (torch.cat(column).float() for column in zip(*parts))
        return {base.EXPLAIN_FRAME_ATTENTION: frames, base.EXPLAIN_AUDIO_ATTENTION: audio,
                base.EXPLAIN_DTW_ALIGNMENT: alignment, base.EXPLAIN_THRESHOLD: threshold}

