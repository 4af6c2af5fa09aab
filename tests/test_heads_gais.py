"""The gais head: text-guided frame gates per pair, X-Pool on fused frames, SVSP, support loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from avr import schema
from avr.fuse import trainer
from avr.fuse.heads import build_head
from avr.fuse.heads.base import EXPLAIN_AUDIO_GATE, EXPLAIN_FRAME_ATTENTION, chunked_scores
from avr.fuse.heads.gais import frames_to_slots
from avr.fuse.trainer import TrainConfig
from head_inputs import random_rows, randomize
from stores import make_learnable_store


@pytest.fixture
def head(tiny_spec):
    return randomize(build_head("gais", tiny_spec)).eval()


def inputs(head, spec, n_videos=5, n_captions=7):
    videos = random_rows(spec, head.video_inputs, n_videos, seed=0)
    videos[schema.FRAME_MASK][0, -2:] = False
    videos[schema.HAS_AUDIO][1] = False
    return videos, random_rows(spec, head.caption_inputs, n_captions, seed=1)


def direct_pair_score(head, text, frames, audio, frame_mask, has_audio):
    """GAIS for one caption [D] and one video, fused frames built explicitly (METHODS B.2-B.4,
    inference): gate, u_f, X-Pool on u, cosine profile, radius, t + alpha r, cosine."""
    pool = head.pool
    gate_in = torch.cat([frames, audio, text.expand_as(frames)], dim=-1)
    gate = torch.sigmoid(head.gate(gate_in)).squeeze(-1) * float(has_audio)  # [F]
    fused = gate[:, None] * audio + (1 - gate[:, None]) * frames  # u [F, D]
    valid = fused[frame_mask]
    t, u = pool.norm_in(text), pool.norm_in(valid)
    weights = torch.softmax(pool.key(u) @ pool.query(t) / math.sqrt(pool.dim), dim=0)
    attended = pool.norm_attn(pool.out(weights @ pool.value(u)))
    pooled = pool.norm_out(attended + pool.linear(attended))
    profile = F.cosine_similarity(text[None], fused, dim=-1) * frame_mask
    perturbed = text + head.alpha * torch.exp(head.radius(profile))
    return F.cosine_similarity(perturbed, pooled, dim=0)


def test_score_is_queries_by_videos(head, tiny_spec):
    videos, captions = inputs(head, tiny_spec)
    scores = head.score(head.encode_texts(captions), head.encode_videos(videos))
    assert scores.shape == (7, 5) and torch.isfinite(scores).all()


def test_score_equals_fused_frames_built_pair_by_pair(head, tiny_spec):
    """The per-pair LN rewrite gives what normalising the explicit fused frames gives."""
    videos, captions = inputs(head, tiny_spec, n_videos=4, n_captions=3)
    scores = head.score(head.encode_texts(captions), head.encode_videos(videos))
    text = captions[schema.TEXT_EMBEDDINGS].float()
    frames = videos[schema.FRAME_EMBEDDINGS].float()
    audio = head.audio_proj(frames_to_slots(videos[schema.AUDIO_TIME_TOKENS].float(),
                                            tiny_spec.num_frames))
    for q in range(3):
        for v in range(4):
            expected = direct_pair_score(head, text[q], frames[v], audio[v],
                                         videos[schema.FRAME_MASK][v], videos[schema.HAS_AUDIO][v])
            torch.testing.assert_close(scores[q, v], expected, atol=1e-5, rtol=1e-5)


def test_no_frames_and_no_audio_give_finite_zero_scores(head, tiny_spec):
    videos, captions = inputs(head, tiny_spec)
    videos[schema.FRAME_MASK][:] = False
    videos[schema.HAS_AUDIO][:] = False
    scores = head.score(head.encode_texts(captions), head.encode_videos(videos))
    assert torch.all(scores == 0)


def test_chunked_scores_equal_one_score_call(head, tiny_spec):
    videos, captions = inputs(head, tiny_spec)
    texts, states = head.encode_texts(captions), head.encode_videos(videos)
    with torch.no_grad():
        whole = head.score(texts, states)
    chunked = chunked_scores(head, texts, states, text_chunk=3, video_chunk=2)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-5)


def test_the_gate_depends_on_the_query(head, tiny_spec):
    videos, captions = inputs(head, tiny_spec, n_videos=3, n_captions=2)
    gate = head.pair_terms(head.encode_texts(captions), head.encode_videos(videos)).gate
    assert gate.shape == (2, 3, tiny_spec.num_frames)
    assert not torch.allclose(gate[0, 0], gate[1, 0])


def test_a_clip_without_audio_has_a_zero_gate(head, tiny_spec):
    videos, captions = inputs(head, tiny_spec, n_videos=3, n_captions=2)
    gate = head.pair_terms(head.encode_texts(captions), head.encode_videos(videos)).gate
    assert torch.all(gate[:, 1] == 0) and torch.all(gate[:, 0] > 0)


def test_training_perturbs_the_text_and_eval_is_deterministic(head, tiny_spec):
    videos, captions = inputs(head, tiny_spec, n_videos=3, n_captions=4)
    states = head.encode_videos(videos)
    head.train()
    first = head.pair_terms(head.encode_texts(captions), states).text
    second = head.pair_terms(head.encode_texts(captions), states).text
    assert not torch.allclose(first, second)
    head.eval()
    texts = head.encode_texts(captions)
    terms = head.pair_terms(texts, states)
    again = head.pair_terms(head.encode_texts(captions), states)
    torch.testing.assert_close(terms.text, again.text)
    torch.testing.assert_close(terms.text, texts["text"][:, None] + head.alpha * terms.radius)
    assert not torch.allclose(terms.text, texts["text"][:, None].expand_as(terms.text))


def test_loss_is_finite_with_the_support_term_and_every_parameter_learns(tiny_spec):
    head = build_head("gais", tiny_spec).train()
    videos, captions = inputs(head, tiny_spec, n_videos=6, n_captions=6)
    loss, parts = head.loss(head.encode_texts(captions), head.encode_videos(videos))
    loss.backward()
    assert all(math.isfinite(parts[k]) for k in ("loss", "loss_main", "loss_support"))
    assert parts["loss"] == pytest.approx(parts["loss_main"] + 0.8 * parts["loss_support"],
                                          rel=1e-5)
    for name, param in head.named_parameters():
        if name.endswith("key.bias"):  # adds one logit to every token: softmax-invariant
            continue
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_support_weight_zero_leaves_the_main_loss_alone(tiny_spec):
    head = build_head("gais", tiny_spec, {"support_weight": 0.0}).train()
    videos, captions = inputs(head, tiny_spec, n_videos=6, n_captions=6)
    loss, parts = head.loss(head.encode_texts(captions), head.encode_videos(videos))
    assert "loss_support" not in parts and parts["loss"] == parts["loss_main"]


def test_explain_gives_gates_and_frame_attention_of_each_pair(head, tiny_spec):
    videos, captions = inputs(head, tiny_spec, n_videos=4, n_captions=4)
    texts, states = head.encode_texts(captions), head.encode_videos(videos)
    explained = head.explain(texts, states, chunk=3)
    terms = head.pair_terms(texts, states)
    frames = tiny_spec.num_frames
    assert explained[EXPLAIN_AUDIO_GATE].shape == (4, frames)
    torch.testing.assert_close(explained[EXPLAIN_AUDIO_GATE][2], terms.gate[2, 2])
    torch.testing.assert_close(explained[EXPLAIN_FRAME_ATTENTION][3], terms.attention[3, 3])
    assert torch.all(explained[EXPLAIN_FRAME_ATTENTION][0, -2:] == 0)  # masked frames


def test_training_beats_chance_by_a_wide_margin(tmp_path, tiny_spec):
    store = make_learnable_store(tmp_path / "c", tiny_spec)
    result = trainer.train(store, TrainConfig(head="gais", epochs=6, batch_size=16, lr=1e-2,
                                              warmup=0.0), tmp_path / "run")
    assert result.best_val_r1 > 4 * 100.0 / 12
