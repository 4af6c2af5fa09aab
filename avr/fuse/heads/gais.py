"""GAIS: frame-level gated audio-visual fusion with semantic variance-scaled perturbation
(Yang et al., arXiv 2508.01711; code of v1 "GAID": YangBowenn/GAID, a fork of T-MASS / X-Pool).

docs/methods.md B.2-B.5:

- FGF, frame-level gated fusion (B.2): per frame f, g_f = sigmoid(w^T [v_f; a_f; t] + b) and
  u_f = g_f a_f + (1 - g_f) v_f, with v_f the CLIP frame embedding, a_f the audio of that frame
  slot and t the CLIP caption embedding.
- X-Pool pooling of the fused frames u with the caption (B.3, ``TextConditionedPool``).
- SVSP (B.4): s_f = cos(t, u_f), r = exp(W_r s + b_r) (W_r: F -> D, identity init),
  training: t~ = t + (alpha eps + 1 - alpha) * r with eps ~ U(0, 1)^D; inference: t~ = t + alpha r,
  a single deterministic pass. Score: cos(t~, pool(u | t)).
- Loss (B.5): InfoNCE weighted by w_i = S_ii / sum_k S_kk, both directions, plus
  ``support_weight`` times the same loss, with the same weights w_i (the code's
  ``trainer_stochastic.py`` passes the main loss's weights to both), on support texts
  t_i + p_i * r_i, p_i the unit vector from t_i toward the mean over the batch's captions of its
  video's pooled embeddings.
- Logit scale: CLIP's 100, fixed (``temperature=0.01``, ``learn_temperature=false``): the code
  multiplies by CLIP's ``logit_scale`` detached, so it never moves from CLIP's pretrained 100.
  Its dual softmax also runs on cosines times 100 with no further temperature
  (``sims * np_softmax(sims * 100, axis=0)``, ``trainer_stochastic.py``), hence
  ``dsl_logit_scale = 100`` and ``dsl_temperature = 1``.

Choices where the sources leave room:

- The gate sees the *query*: it is computed per (caption, video) pair inside ``score``, never
  with the video's own caption (the released code gates each video with its paired caption at
  test time too, a leak, docs/methods.md B.2). The same holds for the SVSP radius, computed per pair
  at training and at test (the code uses the paired video in training and loops over candidates
  at test).
- Audio per frame slot: GAIS pools Whisper features to F steps; here the AST time tokens
  [101, D_ast] are average-pooled and projected to D_clip by a learned linear layer. The pooling
  follows the frame mask (``frames_to_slots``): the clip's audio is split into as many equal
  segments as the video has valid frames, the k-th valid frame taking the k-th segment, since
  the valid frames and the fbank both span the whole clip. (The code always has its F frames.)
- Clips without audio (HAS_AUDIO False) get g_f = 0, so u_f = v_f. The code feeds them a zero
  audio feature and still computes the gate, so u_f = (1 - g_f) v_f: a rescaled frame. Every use
  of u_f (the pooling's LayerNorm, the cosine profile) is invariant to a positive rescaling of
  each frame up to LayerNorm's eps, so forcing g_f = 0 gives the code's scores; it also keeps
  the AST tokens that the cache stores for a silent, zero fbank (and the projection's bias) out
  of the video.
- s_f is computed on the fused frames u_f, the frames the pooling sees; masked frames give 0.
- Loss weights: S_ii below zero are clipped to zero; when no S_ii is positive the weights are
  uniform (plain symmetric InfoNCE). The code divides by the sum as it is, which a negative S_ii
  would turn into a weight that rewards a wrong ranking.
- ``support_weight`` defaults to 0.8, the MSR-VTT setting; `avr train` takes the store's
  dataset's from the recipe (0.5 LSMDC, 0 VATEX and DiDeMo, whose scripts never set it:
  docs/recipes.md).

Cost. Fused frames depend on the pair, so a naive implementation would normalise and project
Q x V x F x D fused tokens. Two rewrites keep the per-pair tensors at [Q, V, F] scalars plus
the [Q, V, D] vectors the score needs (pooled video, radius, perturbed caption):

- the gate is linear before the sigmoid (docs/methods.md B.2): w^T[v; a; t] = (w_v v + w_a a + b)
  + w_t t, a per-video and a per-caption term;
- LN rewrite: u = v + g d with d = a - v. With v_c, d_c the centred v, d (mean over D removed),
  LN1(u) = gamma * (v_c + g d_c) / sigma + beta, where
  sigma^2 = mean(v_c^2) + 2 g mean(v_c d_c) + g^2 mean(d_c^2) + eps: three scalars per frame.
  Keys and values are then linear in (v_c, d_c): k = (K_v + g K_d) / sigma + const, with
  K_v = W_k (gamma v_c) and K_d = W_k (gamma d_c) computed once per video (the constant is the
  same for every frame and cancels in the softmax), and likewise for the values (W_o folded
  in). The same decomposition gives cos(t, u_f) from t.v, t.d and the per-frame norms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from avr.fuse.blocks import (TextConditionedPool, cosine_scores, identity_linear,
                              masked_attention)
from avr.fuse.heads import register_head
from avr.fuse.heads.base import (EXPLAIN_AUDIO_GATE, EXPLAIN_FRAME_ATTENTION, HeadConfig,
                                 RetrievalHead, Rows, State, slice_state, state_rows)
from avr.store import schema


@dataclass
class GaisConfig(HeadConfig):
    temperature: float = 0.01  # CLIP's logit scale, 100 (B.5)
    learn_temperature: bool = False  # the code uses CLIP's logit_scale detached
    support_weight: float = 0.8  # lambda_sup of the support-text loss (docs/methods.md B.5)


class PairTerms(NamedTuple):
    """Everything GAIS computes for every (caption q, video v) pair of a chunk."""

    text: torch.Tensor  # [Q, V, D] perturbed caption embedding t~
    pooled: torch.Tensor  # [Q, V, D] fused frames pooled for the caption
    radius: torch.Tensor  # [Q, V, D] SVSP radius r
    gate: torch.Tensor  # [Q, V, F] audio gate g
    attention: torch.Tensor  # [Q, V, F] attention over the fused frames


def pair_cosine(text: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """Cosine along D of two [Q, V, D] tensors -> [Q, V]."""
    return (F.normalize(text, dim=-1) * F.normalize(pooled, dim=-1)).sum(-1)


def positive_weights(diagonal: torch.Tensor) -> torch.Tensor:
    """GAIS loss weights w_i = S_ii / sum_k S_kk [B], negative S_ii clipped to 0; uniform when
    no S_ii is positive."""
    clipped = diagonal.clamp(min=0)
    total = clipped.sum()
    uniform = torch.full_like(diagonal, 1.0 / diagonal.numel())
    return torch.where(total > 0, clipped / total.clamp(min=1e-12), uniform)


def weighted_infonce(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with per-pair weights [B] summing to 1 (docs/methods.md B.5)."""
    target = torch.arange(logits.shape[0], device=logits.device)
    rows = F.cross_entropy(logits, target, reduction="none")
    cols = F.cross_entropy(logits.t(), target, reduction="none")
    return 0.5 * ((weights * rows).sum() + (weights * cols).sum())


def frames_to_slots(time_tokens: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """Average-pool the audio time axis [V, T, Da] to one audio vector per frame slot [V, F, Da]
    following ``frame_mask`` [V, F]: the k-th of a video's n valid frames takes the mean of
    segment k of its T steps, the segments of adaptive average pooling to n outputs (steps
    floor(k T / n) to ceil((k + 1) T / n) - 1). Masked slots get zeros."""
    steps = time_tokens.shape[1]
    mask = frame_mask.bool()
    valid = mask.sum(1, keepdim=True).clamp(min=1)  # n [V, 1]
    rank = mask.long().cumsum(1) - 1  # k of each valid frame [V, F]
    first = rank * steps // valid
    end = ((rank + 1) * steps + valid - 1) // valid  # ceil
    step = torch.arange(steps, device=time_tokens.device)
    segment = ((step >= first[..., None]) & (step < end[..., None])
               & mask[..., None]).to(time_tokens.dtype)  # [V, F, T]
    segment = segment / segment.sum(-1, keepdim=True).clamp(min=1)
    return segment @ time_tokens


@register_head("gais")
class Gais(RetrievalHead):
    Config = GaisConfig
    # The code's dual softmax: sims * softmax(100 * sims), cosines times 100, no temperature.
    dsl_logit_scale: ClassVar[float | None] = 100.0
    dsl_temperature: ClassVar[float | None] = 1.0
    video_inputs = (schema.FRAME_EMBEDDINGS, schema.FRAME_MASK, schema.AUDIO_TIME_TOKENS,
                    schema.HAS_AUDIO)
    caption_inputs = (schema.TEXT_EMBEDDINGS,)

    def __init__(self, spec, config: GaisConfig):
        super().__init__(spec, config)
        dim = spec.clip_dim
        self.audio_proj = nn.Linear(spec.ast_dim, dim)
        self.gate = nn.Linear(3 * dim, 1)  # FGF: w^T [v; a; t] + b
        self.pool = TextConditionedPool(dim, config.dropout)
        self.radius = identity_linear(self.spec.num_frames, dim)  # SVSP W_r: F -> D
        self.alpha = nn.Parameter(torch.tensor(0.5))  # SVSP blend

    # ---- per video ---------------------------------------------------------------------------
    def encode_videos(self, videos: Rows) -> State:
        dtype = self.param_dtype()
        dim = self.spec.clip_dim
        frames = videos[schema.FRAME_EMBEDDINGS].to(dtype)  # v [V, F, D]
        time_tokens = videos[schema.AUDIO_TIME_TOKENS].to(dtype)  # [V, T, Da]
        frame_mask = videos[schema.FRAME_MASK].bool()  # [V, F]
        audio = self.audio_proj(frames_to_slots(time_tokens, frame_mask))  # a [V, F, D]
        w_frame, w_audio, _ = self.gate.weight[0].split(dim)
        gate_video = frames @ w_frame + audio @ w_audio + self.gate.bias  # [V, F]
        diff = audio - frames  # d: u = v + g d
        # LN rewrite: centred parts, their moments, and K/V of gamma * each part.
        frames_c = frames - frames.mean(-1, keepdim=True)
        diff_c = diff - diff.mean(-1, keepdim=True)
        gamma = self.pool.norm_in.weight
        keys_frame, keys_diff = (part @ self.pool.key.weight.t()
                                 for part in (gamma * frames_c, gamma * diff_c))
        values_frame, values_diff = (self.out_value_linear(gamma * part)
                                     for part in (frames_c, diff_c))
        return {
            "mask": frame_mask,  # [V, F]
            "has_audio": videos[schema.HAS_AUDIO].bool(),  # [V]
            "gate_video": gate_video,
            "var_ff": (frames_c * frames_c).mean(-1), "var_fd": (frames_c * diff_c).mean(-1),
            "var_dd": (diff_c * diff_c).mean(-1),  # [V, F] each
            "keys_frame": keys_frame, "keys_diff": keys_diff,  # [V, F, D]
            "values_frame": values_frame, "values_diff": values_diff,  # [V, F, D]
            "frames": frames, "diff": diff,  # [V, F, D], for cos(t, u_f)
            "sq_ff": (frames * frames).sum(-1), "sq_fd": (frames * diff).sum(-1),
            "sq_dd": (diff * diff).sum(-1),  # [V, F] each
        }

    def out_value_linear(self, normed: torch.Tensor) -> torch.Tensor:
        """W_o W_v x without biases (the bias part is the per-pair constant ``value_offset``)."""
        return normed @ self.pool.value.weight.t() @ self.pool.out.weight.t()

    def value_offset(self) -> torch.Tensor:
        """W_o (W_v beta + b_v) + b_o [D]: the value of a token whose centred part is zero."""
        return self.pool.out(self.pool.value(self.pool.norm_in.bias))

    # ---- per caption -------------------------------------------------------------------------
    def encode_texts(self, captions: Rows) -> State:
        """Caption state; in training mode it also holds the SVSP noise eps ~ U(0, 1)^D."""
        text = captions[schema.TEXT_EMBEDDINGS].to(self.param_dtype())  # t [Q, D]
        _, _, w_text = self.gate.weight[0].split(self.spec.clip_dim)
        state = {"text": text, "query": self.pool.encode_query(text), "gate_text": text @ w_text,
                 "text_unit": F.normalize(text, dim=-1)}
        if self.training:
            state["noise"] = torch.rand_like(text)
        return state

    # ---- per pair ----------------------------------------------------------------------------
    def pair_terms(self, texts: State, videos: State) -> PairTerms:
        """FGF, pooling and SVSP for every (caption, video) pair of the given rows."""
        gate = torch.sigmoid(texts["gate_text"][:, None, None] + videos["gate_video"][None])
        gate = gate * videos["has_audio"][None, :, None].to(gate.dtype)  # [Q, V, F]

        # Pooling of u = v + g d through LN1, K, V, W_o (the LN rewrite, module docstring).
        variance = videos["var_ff"] + 2 * gate * videos["var_fd"] + gate ** 2 * videos["var_dd"]
        # >= 0 exactly; the clamp absorbs rounding in 16-bit autocast
        inv_sigma = torch.rsqrt(variance.clamp(min=0) + self.pool.norm_in.eps)  # [Q, V, F]
        query = texts["query"]
        logits = (torch.einsum("qd,vfd->qvf", query, videos["keys_frame"])
                  + gate * torch.einsum("qd,vfd->qvf", query, videos["keys_diff"])) * inv_sigma
        attention = masked_attention(logits, videos["mask"])  # [Q, V, F]
        coef = attention * inv_sigma
        attended = (torch.einsum("qvf,vfd->qvd", coef, videos["values_frame"])
                    + torch.einsum("qvf,vfd->qvd", coef * gate, videos["values_diff"])
                    + attention.sum(-1, keepdim=True) * self.value_offset())
        pooled = self.pool.finish(attended, attention)  # [Q, V, D]

        # SVSP: cosine profile of the caption with the fused frames, radius, perturbation.
        unit = texts["text_unit"]
        dot = (torch.einsum("qd,vfd->qvf", unit, videos["frames"])
               + gate * torch.einsum("qd,vfd->qvf", unit, videos["diff"]))
        norm_sq = videos["sq_ff"] + 2 * gate * videos["sq_fd"] + gate ** 2 * videos["sq_dd"]
        profile = dot * torch.rsqrt(norm_sq.clamp(min=1e-12)) * videos["mask"].to(dot.dtype)
        radius = torch.exp(self.radius(profile))  # [Q, V, D]
        if self.training:  # eps' = alpha eps + (1 - alpha), eps drawn by encode_texts
            spread = (self.alpha * texts["noise"] + 1 - self.alpha)[:, None, :]
        else:  # inference: the deterministic single pass
            spread = self.alpha
        perturbed = texts["text"][:, None, :] + spread * radius
        return PairTerms(perturbed, pooled, radius, gate, attention)

    def score(self, texts: State, videos: State) -> torch.Tensor:
        terms = self.pair_terms(texts, videos)
        return pair_cosine(terms.text, terms.pooled)

    # ---- training ----------------------------------------------------------------------------
    def loss(self, texts: State, videos: State) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms = self.pair_terms(texts, videos)  # the batch is one chunk: [B, B, ...]
        sim = pair_cosine(terms.text, terms.pooled)
        weights = positive_weights(sim.diagonal().detach())  # one w_i for both terms (B.5)
        main = weighted_infonce(sim * self.scale(), weights)
        total, parts = main, {"loss_main": main.detach()}
        if self.config.support_weight > 0:
            text = texts["text"]  # [B, D]
            video_mean = terms.pooled.mean(0)  # v-bar_j: mean over the batch's captions [B, D]
            toward_video = F.normalize(video_mean - text, dim=-1)  # p_i
            paired_radius = terms.radius.diagonal(dim1=0, dim2=1).t()  # r_ii [B, D]
            support_text = text + toward_video * paired_radius
            support_sim = cosine_scores(support_text, terms.pooled)
            support = weighted_infonce(support_sim * self.scale(), weights)
            total = main + self.config.support_weight * support
            parts["loss_support"] = support.detach()
        parts["loss"] = total.detach()
        return total, parts

    # ---- reports -----------------------------------------------------------------------------
    @torch.no_grad()
    def explain(self, texts: State, videos: State, chunk: int = 64) -> dict[str, torch.Tensor]:
        """Gate [P, F] and frame attention [P, F] of each caption on its own video (the diagonal
        of per-chunk pair terms)."""
        gates, attentions = [], []
        for start in range(0, state_rows(texts), chunk):
            rows = slice(start, start + chunk)
            terms = self.pair_terms(slice_state(texts, rows), slice_state(videos, rows))
            gates.append(terms.gate.diagonal(dim1=0, dim2=1).t())
            attentions.append(terms.attention.diagonal(dim1=0, dim2=1).t())
        return {EXPLAIN_AUDIO_GATE: torch.cat(gates),
                EXPLAIN_FRAME_ATTENTION: torch.cat(attentions)}
