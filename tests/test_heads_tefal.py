"""The tefal head: two text-conditioned blocks (frames, audio patches) and its fusion variants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from avr import schema
from avr.errors import AvrError
from avr.fuse import trainer
from avr.fuse.heads import build_head
from avr.fuse.heads.base import (EXPLAIN_AUDIO_ATTENTION, EXPLAIN_FRAME_ATTENTION,
                                 chunked_scores)
from avr.fuse.heads.tefal import FUSIONS
from avr.fuse.trainer import TrainConfig
from head_inputs import random_rows, randomize
from stores import make_learnable_store


def tefal(spec, fusion="add"):
    return randomize(build_head("tefal", spec, {"fusion": fusion})).eval()


def inputs(head, spec, n_videos=5, n_captions=7):
    videos = random_rows(spec, head.video_inputs, n_videos, seed=0)
    videos[schema.FRAME_MASK][0, -2:] = False
    videos[schema.HAS_AUDIO][1] = False
    return videos, random_rows(spec, head.caption_inputs, n_captions, seed=1)


def cross_attention(block, text, tokens):
    """TEFAL Eq. 1-3 for one caption [D] and one token set [N, D] (X-Pool's block)."""
    t, u = block.norm_in(text), block.norm_in(tokens)
    weights = torch.softmax(block.key(u) @ block.query(t) / math.sqrt(block.dim), dim=0)
    attended = block.norm_attn(block.out(weights @ block.value(u)))
    return block.norm_out(attended + block.linear(attended))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_scores_queries_by_videos(tiny_spec, fusion):
    head = tefal(tiny_spec, fusion)
    videos, captions = inputs(head, tiny_spec)
    scores = head.score(head.encode_texts(captions), head.encode_videos(videos))
    assert scores.shape == (7, 5) and torch.isfinite(scores).all()


@pytest.mark.parametrize("fusion", FUSIONS)
def test_chunked_scores_equal_one_score_call(tiny_spec, fusion):
    head = tefal(tiny_spec, fusion)
    videos, captions = inputs(head, tiny_spec)
    texts, states = head.encode_texts(captions), head.encode_videos(videos)
    with torch.no_grad():
        whole = head.score(texts, states)
    chunked = chunked_scores(head, texts, states, text_chunk=3, video_chunk=2)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_add_fusion_is_eq_1_to_3_computed_pair_by_pair(tiny_spec):
    head = tefal(tiny_spec)
    videos, captions = inputs(head, tiny_spec, n_videos=4, n_captions=3)
    scores = head.score(head.encode_texts(captions), head.encode_videos(videos))
    text = captions[schema.TEXT_EMBEDDINGS].float()
    frames = videos[schema.FRAME_EMBEDDINGS].float()
    audio = head.audio_proj(videos[schema.AUDIO_PATCH_TOKENS].float())
    for q in range(3):
        for v in range(4):
            video_part = cross_attention(head.video_pool, text[q],
                                         frames[v][videos[schema.FRAME_MASK][v]])
            audio_part = (cross_attention(head.audio_pool, text[q], audio[v])
                          if videos[schema.HAS_AUDIO][v] else torch.zeros_like(video_part))
            expected = F.cosine_similarity(text[q], video_part + audio_part, dim=0)
            torch.testing.assert_close(scores[q, v], expected, atol=1e-5, rtol=1e-5)


def test_without_audio_the_score_is_the_video_branch_alone(tiny_spec):
    head = tefal(tiny_spec)
    videos, captions = inputs(head, tiny_spec)
    videos[schema.HAS_AUDIO][:] = False
    texts, states = head.encode_texts(captions), head.encode_videos(videos)
    video_only = head.video_pool.pool_all_pairs(texts["video_query"], states["video_keys"],
                                                states["video_values"], states["video_mask"])
    expected = torch.einsum("qd,qvd->qv", F.normalize(texts["text"], dim=-1),
                            F.normalize(video_only.vectors, dim=-1))
    torch.testing.assert_close(head.score(texts, states), expected)


def test_audio_changes_the_score_when_present(tiny_spec):
    head = tefal(tiny_spec)
    videos, captions = inputs(head, tiny_spec)
    texts = head.encode_texts(captions)
    with_audio = head.score(texts, head.encode_videos(videos))
    videos[schema.HAS_AUDIO][:] = False
    without_audio = head.score(texts, head.encode_videos(videos))
    assert not torch.allclose(with_audio[:, 0], without_audio[:, 0])
    torch.testing.assert_close(with_audio[:, 1], without_audio[:, 1])  # video 1 had no audio


@pytest.mark.parametrize("fusion", FUSIONS)
def test_no_frames_and_no_audio_give_finite_scores(tiny_spec, fusion):
    head = tefal(tiny_spec, fusion)
    videos, captions = inputs(head, tiny_spec)
    videos[schema.FRAME_MASK][:] = False
    videos[schema.HAS_AUDIO][:] = False
    scores = head.score(head.encode_texts(captions), head.encode_videos(videos))
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize("fusion", FUSIONS)
def test_loss_is_finite_and_every_parameter_gets_a_gradient(tiny_spec, fusion):
    head = build_head("tefal", tiny_spec, {"fusion": fusion}).train()
    videos, captions = inputs(head, tiny_spec, n_videos=6, n_captions=6)
    loss, parts = head.loss(head.encode_texts(captions), head.encode_videos(videos))
    loss.backward()
    assert math.isfinite(parts["loss"])
    for name, param in head.named_parameters():
        if name.endswith("key.bias"):  # adds one logit to every token: softmax-invariant
            continue
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_an_unknown_fusion_is_refused_with_the_choices(tiny_spec):
    with pytest.raises(AvrError, match="add, late, concat, xattn, stack"):
        build_head("tefal", tiny_spec, {"fusion": "mean"})


def test_explain_gives_frame_and_audio_patch_attention(tiny_spec):
    head = tefal(tiny_spec)
    videos, captions = inputs(head, tiny_spec, n_videos=4, n_captions=4)
    explained = head.explain(head.encode_texts(captions), head.encode_videos(videos))
    assert explained[EXPLAIN_FRAME_ATTENTION].shape == (4, tiny_spec.num_frames)
    assert explained[EXPLAIN_AUDIO_ATTENTION].shape == (4, tiny_spec.ast_patches)
    assert torch.all(explained[EXPLAIN_FRAME_ATTENTION][0, -2:] == 0)  # masked frames
    assert torch.all(explained[EXPLAIN_AUDIO_ATTENTION][1] == 0)  # no audio track
    torch.testing.assert_close(explained[EXPLAIN_AUDIO_ATTENTION][0].sum(), torch.tensor(1.0))


def test_training_beats_chance_by_a_wide_margin(tmp_path, tiny_spec):
    store = make_learnable_store(tmp_path / "c", tiny_spec)
    result = trainer.train(store, TrainConfig(head="tefal", epochs=6, batch_size=16, lr=1e-2,
                                              warmup=0.0), tmp_path / "run")
    assert result.best_val_r1 > 4 * 100.0 / 12
