"""X-Pool's text-conditioned pooling block (avr.fuse.blocks) and the xpool head."""

from __future__ import annotations

import math

import pytest
import torch

from avr.fuse.blocks import TextConditionedPool
from avr.fuse.heads import build_head
from avr.fuse.heads.base import EXPLAIN_FRAME_ATTENTION
from avr.store import schema
from support.head_inputs import random_rows, randomize


def direct_pool(block: TextConditionedPool, text, tokens, mask):
    """X-Pool's Transformer for one caption [D] and one video's valid tokens [N, D]."""
    tokens = tokens[mask]
    t, u = block.norm_in(text), block.norm_in(tokens)
    q, k, v = block.query(t), block.key(u), block.value(u)
    weights = torch.softmax(k @ q / math.sqrt(block.dim), dim=0)
    attended = block.norm_attn(block.out(weights @ v))
    return block.norm_out(attended + block.linear(attended))


@pytest.fixture
def block():
    return randomize(TextConditionedPool(16, dropout=0.3)).eval()


def test_all_pairs_pooling_equals_a_direct_loop_over_pairs(block):
    generator = torch.Generator().manual_seed(1)
    text = torch.randn(4, 16, generator=generator)
    tokens = torch.randn(3, 7, 16, generator=generator)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    keys, values = block.encode_tokens(tokens)
    pooled = block.pool_all_pairs(block.encode_query(text), keys, values, mask)
    assert pooled.vectors.shape == (4, 3, 16) and pooled.weights.shape == (4, 3, 7)
    for q in range(4):
        for v in range(3):
            expected = direct_pool(block, text[q], tokens[v], mask[v])
            torch.testing.assert_close(pooled.vectors[q, v], expected, atol=1e-5, rtol=1e-5)


def test_paired_pooling_is_the_diagonal_of_all_pairs(block):
    generator = torch.Generator().manual_seed(2)
    text = torch.randn(3, 16, generator=generator)
    tokens = torch.randn(3, 5, 16, generator=generator)
    keys, values = block.encode_tokens(tokens)
    query = block.encode_query(text)
    every = block.pool_all_pairs(query, keys, values, None)
    paired = block.pool_paired(query, keys, values, None)
    torch.testing.assert_close(paired.vectors, every.vectors.diagonal(dim1=0, dim2=1).t())
    torch.testing.assert_close(paired.weights, every.weights.diagonal(dim1=0, dim2=1).t())


def test_a_fully_masked_video_pools_to_zero_with_finite_gradients(block):
    block.train()
    text = torch.randn(2, 16, requires_grad=True)
    tokens = torch.randn(2, 5, 16)
    mask = torch.tensor([[True] * 5, [False] * 5])
    keys, values = block.encode_tokens(tokens)
    pooled = block.pool_all_pairs(block.encode_query(text), keys, values, mask)
    assert torch.isfinite(pooled.vectors).all()
    assert torch.all(pooled.vectors[:, 1] == 0) and torch.all(pooled.weights[:, 1] == 0)
    assert pooled.vectors[:, 0].abs().sum() > 0
    pooled.vectors.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in block.parameters() if p.grad is not None)
    assert torch.isfinite(text.grad).all()


def test_masked_tokens_get_no_attention(block):
    tokens = torch.randn(1, 6, 16)
    mask = torch.tensor([[True, False, True, True, False, True]])
    keys, values = block.encode_tokens(tokens)
    pooled = block.pool_all_pairs(block.encode_query(torch.randn(3, 16)), keys, values, mask)
    assert torch.all(pooled.weights[..., ~mask[0]] == 0)
    torch.testing.assert_close(pooled.weights.sum(-1), torch.ones(3, 1))


# ---- the xpool head ------------------------------------------------------------------------------

@pytest.fixture
def head(tiny_spec):
    return randomize(build_head("xpool", tiny_spec)).eval()


def encode(head, spec, n_videos=5, n_captions=7):
    videos = random_rows(spec, head.video_inputs, n_videos, seed=0)
    captions = random_rows(spec, head.caption_inputs, n_captions, seed=1)
    return head.encode_texts(captions), head.encode_videos(videos)


def test_score_is_queries_by_videos(head, tiny_spec):
    texts, videos = encode(head, tiny_spec)
    assert head.score(texts, videos).shape == (7, 5)


def test_a_video_without_valid_frames_scores_zero(head, tiny_spec):
    videos = random_rows(tiny_spec, head.video_inputs, 3)
    videos[schema.FRAME_MASK][2] = False
    captions = random_rows(tiny_spec, head.caption_inputs, 4, seed=1)
    scores = head.score(head.encode_texts(captions), head.encode_videos(videos))
    assert torch.isfinite(scores).all() and torch.all(scores[:, 2] == 0)


def test_loss_is_finite_and_every_parameter_gets_a_gradient(tiny_spec):
    head = build_head("xpool", tiny_spec).train()
    texts, videos = encode(head, tiny_spec, n_videos=6, n_captions=6)
    loss, parts = head.loss(texts, videos)
    loss.backward()
    assert math.isfinite(float(parts["loss"]))
    for name, param in head.named_parameters():
        if name.endswith("key.bias"):  # adds one logit to every token: softmax-invariant
            continue
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_explain_gives_each_caption_its_frame_attention(head, tiny_spec):
    texts, videos = encode(head, tiny_spec, n_videos=4, n_captions=4)
    attention = head.explain(texts, videos)[EXPLAIN_FRAME_ATTENTION]
    assert attention.shape == (4, tiny_spec.num_frames)
    torch.testing.assert_close(attention.sum(-1), torch.ones(4))
