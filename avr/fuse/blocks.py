"""Building blocks that several heads share: X-Pool's text-conditioned pooling and its helpers.

``TextConditionedPool`` is X-Pool's ``Transformer`` as released (layer6ai-labs/xpool,
``modules/transformer.py``; docs/methods.md B.3 and E), which is also each of TEFAL's two
cross-attention blocks (TEFAL Eq. 1-3) and GAIS's pooling::

    t' = LN1(t),  U' = LN1(U)                      # one LayerNorm for the text and the tokens
    q = W_q t',  k_n = W_k u'_n,  v_n = W_v u'_n   # one head
    a = W_o sum_n softmax_n(q . k_n / sqrt(D)) v_n
    a = LN2(a);  out = LN3(a + Dropout(W_lin a))   # residual linear, no MLP

Every linear starts as the identity (weight eye, bias 0), as released.

Retrieval splits the block in two (docs/heads.md):

- per video (``encode_tokens``): LN1 and the K/V projections of the tokens. W_o is folded into
  the values here: the attention weights of a row sum to one, so
  ``W_o (sum_n a_n v_n) + b_o = sum_n a_n (W_o v_n + b_o)``; the per-pair part then costs one
  D x D matmul per pair (W_lin) instead of two.
- per (query, video) pair (``pool_all_pairs``): logits ``einsum("qd,vnd->qvn")``, the masked
  softmax, the weighted sum, LN2, the residual linear and LN3. It materialises [Q, V, N] and
  [Q, V, D] for the rows it is given, so callers bound memory by calling it on chunks
  (``avr.evaluate.score.score_states`` does).

Masking: a masked token gets -inf before the softmax; a row with no valid token at all (a video
without frames, a clip without audio) gets zero attention weights and a zero pooled vector, so
its cosine with any text is 0 rather than NaN.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


NORMALIZE_EPS = 1e-12  # F.normalize's default eps


def identity_linear(in_features: int, out_features: int | None = None) -> nn.Linear:
    """A linear layer that starts as the identity (``eye_`` on a rectangular weight), bias 0."""
    layer = nn.Linear(in_features, out_features or in_features)
    nn.init.eye_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


@functools.cache
def _cpu_vector_bytes() -> int:
    """The width of the vector registers torch's CPU kernels run on here, in bytes."""
    return 64 if torch.backends.cpu.get_cpu_capability() == "AVX512" else 32


def softmax_last(logits: torch.Tensor) -> torch.Tensor:
    """``logits.softmax(-1)``, up to rounding.

    On the CPU, torch's softmax over a last axis shorter than one vector register (16 floats
    under AVX-512, 8 under AVX2) takes about three times as long per element, forward and
    backward, as a softmax over the same axis when it is not the last one, and ten times as long
    as one over a longer last axis (22 against 7.7 against 2 ns per element for X-Pool's 12
    frames, [16, 15, 15, 12], one thread, AVX-512; BENCHMARKS.md). Such a softmax runs over the
    transposed layout instead: the same values up to rounding (2e-7)."""
    if logits.device.type == "cpu" and logits.dim() > 1 and \
            logits.shape[-1] * logits.element_size() < _cpu_vector_bytes():
        return logits.transpose(-1, -2).softmax(-2).transpose(-1, -2)
    return logits.softmax(-1)


def masked_attention(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis of ``logits`` [..., N] keeping only keys where ``mask``
    (broadcastable to [..., N]) is True. A row with no valid key gets all-zero weights."""
    if mask is None:
        return softmax_last(logits)
    has_any = mask.any(-1, keepdim=True)
    # A fully masked row keeps its logits (a finite softmax) and is zeroed after.
    logits = logits.masked_fill(mask.logical_not() & has_any, float("-inf"))
    return softmax_last(logits) * has_any.to(logits.dtype)


def cosine_scores(text: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """Cosine of each text [Q, D] with its own pooled vector of every video [Q, V, D] -> [Q, V].
    A zero pooled vector (no evidence) scores 0.

    ``F.normalize``'s cosine (x / max(|x|, 1e-12)), with the pooled side's norm divided out of
    the [Q, V] dot products instead of out of the [Q, V, D] vectors: the same value up to
    rounding, without writing a normalised copy of the largest tensor of a scoring and without
    its backward (0.5 ms less of a 10 ms step of 16 stacked X-Pool trials on the CPU)."""
    dots = torch.einsum("qd,qvd->qv", F.normalize(text, dim=-1), pooled)
    return dots / torch.linalg.vector_norm(pooled, dim=-1).clamp_min(NORMALIZE_EPS)


class Pooled(NamedTuple):
    vectors: torch.Tensor  # [..., D] pooled embedding, zero where no token was valid
    weights: torch.Tensor  # [..., N] attention over the tokens (what explain() reports)


class TextConditionedPool(nn.Module):
    """X-Pool's text-conditioned pooling block (docs/methods.md B.3, E), split into a per-video and
    a per-pair part. ``dim`` is the width of text and tokens; ``dropout`` is X-Pool's (0.3 for
    MSR-VTT 9k and LSMDC, 0.4 for MSR-VTT 7k and MSVD: README.md:73-76; X-Pool ran no VATEX)."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.dim = dim
        self.norm_in = nn.LayerNorm(dim)  # LN1, shared by text and tokens
        self.query = identity_linear(dim)
        self.key = identity_linear(dim)
        self.value = identity_linear(dim)
        self.out = identity_linear(dim)  # W_o
        self.norm_attn = nn.LayerNorm(dim)  # LN2
        self.linear = identity_linear(dim)  # W_lin, the residual linear
        self.dropout = nn.Dropout(dropout)
        self.norm_out = nn.LayerNorm(dim)  # LN3

    # ---- per text and per video --------------------------------------------------------------
    def encode_query(self, text: torch.Tensor) -> torch.Tensor:
        """[Q, D] text -> [Q, D] query, with the 1/sqrt(D) of the logits folded in."""
        return self.query(self.norm_in(text)) / math.sqrt(self.dim)

    def encode_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[..., N, D] tokens -> (keys, values), each [..., N, D]; values already through W_o."""
        normed = self.norm_in(tokens)
        return self.key(normed), self.out(self.value(normed))

    # ---- per pair ----------------------------------------------------------------------------
    def pool_all_pairs(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       mask: torch.Tensor | None) -> Pooled:
        """Every query [Q, D] with every video's keys/values [V, N, D] (mask [V, N]) ->
        vectors [Q, V, D], weights [Q, V, N]."""
        logits = torch.einsum("qd,vnd->qvn", query, keys)
        weights = masked_attention(logits, mask)
        attended = torch.einsum("qvn,vnd->qvd", weights, values)
        return Pooled(self.finish(attended, weights), weights)

    def pool_paired(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    mask: torch.Tensor | None) -> Pooled:
        """Query i [P, D] with token set i only [P, N, D] (mask [P, N]) -> vectors [P, D],
        weights [P, N]."""
        logits = torch.einsum("pd,pnd->pn", query, keys)
        weights = masked_attention(logits, mask)
        attended = torch.einsum("pn,pnd->pd", weights, values)
        return Pooled(self.finish(attended, weights), weights)

    def finish(self, attended: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """LN2, residual linear with dropout, LN3 on attended [..., D] (already through W_o);
        rows whose ``weights`` [..., N] are all zero (no valid token) become zero vectors."""
        attended = self.norm_attn(attended)
        pooled = self.norm_out(attended + self.dropout(self.linear(attended)))
        has_any = (weights.sum(-1, keepdim=True) > 0).to(pooled.dtype)
        return pooled * has_any


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 1 of ``tokens`` [B, T, D] counting only rows where ``mask`` [B, T] is set
    (zeros where none is); a plain mean when ``mask`` is None."""
    if mask is None:
        return tokens.mean(1)
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)
