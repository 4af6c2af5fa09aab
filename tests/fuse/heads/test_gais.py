"""The gais head: text-guided frame gates per pair, X-Pool on fused frames, SVSP, support loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from avr.fuse.heads import build_head
from avr.fuse.heads.base import EXPLAIN_AUDIO_GATE, EXPLAIN_FRAME_ATTENTION
from avr.fuse.heads.gais import frames_to_slots
from avr.store import schema
from support.head_inputs import random_rows, randomize


@pytest.fixture
def head(tiny_spec):
    return randomize(build_head("gais", tiny_spec)).eval()


def inputs(head, spec, n_videos=5, n_captions=7):
    videos = random_rows(spec, head.video_inputs, n_videos, seed=0)
    videos[schema.FRAME_MASK][0, -2:] = False
    videos[schema.HAS_AUDIO][1] = False
    return videos, random_rows(spec, head.caption_inputs, n_captions, seed=1)


def direct_pair_score(head, text, frames, audio, frame_mask, has_audio):
    """GAIS for one caption [D] and one video, fused frames built explicitly (docs/methods.md B.2-B.4,
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


def test_audio_slots_of_a_full_video_are_adaptive_average_pooling():
    tokens = torch.randn(2, 101, 5)
    expected = F.adaptive_avg_pool1d(tokens.transpose(1, 2), 6).transpose(1, 2)
    torch.testing.assert_close(frames_to_slots(tokens, torch.ones(2, 6, dtype=torch.bool)),
                               expected)


def test_audio_slots_of_a_short_video_spread_the_whole_clip_over_its_valid_frames():
    tokens = torch.randn(2, 101, 5)
    mask = torch.tensor([[True, True, True, False, False, False],
                         [True, False, True, True, False, True]])
    slots = frames_to_slots(tokens, mask)
    # 3 valid frames: steps 0-33, 33-67, 67-100 (adaptive pooling's floor/ceil bounds)
    first = torch.stack([tokens[0, 0:34].mean(0), tokens[0, 33:68].mean(0),
                         tokens[0, 67:101].mean(0)])
    torch.testing.assert_close(slots[0, :3], first)
    # 4 valid frames anywhere in the slots: the k-th valid one takes the k-th quarter
    quarters = F.adaptive_avg_pool1d(tokens[1].t()[None], 4)[0].t()
    torch.testing.assert_close(slots[1, [0, 2, 3, 5]], quarters)
    assert torch.equal(slots[0, 3:], torch.zeros(3, 5)) and torch.equal(slots[1, [1, 4]],
                                                                          torch.zeros(2, 5))


def test_a_short_videos_frames_take_the_audio_of_the_whole_clip(head, tiny_spec):
    """A video with 3 valid frames of 6 scores as its frames with the clip's audio in thirds:
    the audio of the padded slots' time is not lost and not given to the wrong frames."""
    videos, captions = inputs(head, tiny_spec, n_videos=2, n_captions=3)
    videos[schema.FRAME_MASK][0] = torch.tensor([True, True, True, False, False, False])
    scores = head.score(head.encode_texts(captions), head.encode_videos(videos))
    time_tokens = videos[schema.AUDIO_TIME_TOKENS][0].float()  # [101, Da]
    thirds = torch.stack([time_tokens[0:34].mean(0), time_tokens[33:68].mean(0),
                          time_tokens[67:101].mean(0)])
    audio = torch.zeros(tiny_spec.num_frames, tiny_spec.ast_dim)
    audio[:3] = thirds
    for q in range(3):
        expected = direct_pair_score(head, captions[schema.TEXT_EMBEDDINGS][q].float(),
                                     videos[schema.FRAME_EMBEDDINGS][0].float(),
                                     head.audio_proj(audio), videos[schema.FRAME_MASK][0], True)
        torch.testing.assert_close(scores[q, 0], expected, atol=1e-5, rtol=1e-5)


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
                                            videos[schema.FRAME_MASK]))
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


def test_the_gate_depends_on_the_query(head, tiny_spec):
    videos, captions = inputs(head, tiny_spec, n_videos=3, n_captions=2)
    gate = head.pair_terms(head.encode_texts(captions), head.encode_videos(videos)).gate
    assert gate.shape == (2, 3, tiny_spec.num_frames)
    assert not torch.allclose(gate[0, 0], gate[1, 0])


def test_a_clip_without_audio_has_a_zero_gate(head, tiny_spec):
    videos, captions = inputs(head, tiny_spec, n_videos=3, n_captions=2)
    gate = head.pair_terms(head.encode_texts(captions), head.encode_videos(videos)).gate
    assert torch.all(gate[:, 1] == 0) and torch.all(gate[:, 0] > 0)


def test_a_clip_without_audio_scores_as_the_codes_zero_audio_feature(tiny_spec):
    """GAID feeds a missing audio as zeros and still gates: u_f = (1 - g_f) v_f. The pooling's
    LayerNorm and the cosine profile ignore that per-frame scale, so g_f = 0 scores the same."""
    torch.manual_seed(0)
    head = build_head("gais", tiny_spec).eval()
    randomize(head.pool)
    randomize(head.radius)
    videos, captions = inputs(head, tiny_spec, n_videos=3, n_captions=4)
    videos[schema.HAS_AUDIO][:] = False
    scores = head.score(head.encode_texts(captions), head.encode_videos(videos))
    silent = torch.zeros(tiny_spec.num_frames, tiny_spec.clip_dim)
    for q in range(4):
        for v in range(3):
            gated = direct_pair_score(head, captions[schema.TEXT_EMBEDDINGS][q].float(),
                                      videos[schema.FRAME_EMBEDDINGS][v].float(), silent,
                                      videos[schema.FRAME_MASK][v], True)
            torch.testing.assert_close(scores[q, v], gated, atol=1e-4, rtol=1e-4)


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
    parts = {name: float(value) for name, value in parts.items()}
    assert all(math.isfinite(parts[k]) for k in ("loss", "loss_main", "loss_support"))
    assert parts["loss"] == pytest.approx(parts["loss_main"] + 0.8 * parts["loss_support"],
                                          rel=1e-5)
    for name, param in head.named_parameters():
        if name.endswith("key.bias"):  # adds one logit to every token: softmax-invariant
            continue
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_support_loss_reuses_the_main_losss_weights(tiny_spec):
    """B.5 as GAID's trainer computes it: w_i = S_ii / sum_k S_kk from the main similarities,
    the same w_i for the support term, both at CLIP's fixed logit scale 100 (negative S_ii are
    clipped to 0, avr's guard)."""
    torch.manual_seed(0)
    head = build_head("gais", tiny_spec, {"dropout": 0.0}).train()
    videos, captions = inputs(head, tiny_spec, n_videos=5, n_captions=5)
    texts, states = head.encode_texts(captions), head.encode_videos(videos)
    loss, parts = head.loss(texts, states)
    terms = head.pair_terms(texts, states)  # the same noise: it lives in the text state

    def cosine(a, b):
        return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))

    def weighted_ce(sim, w):
        logits = 100.0 * sim
        rows = -torch.stack([torch.log_softmax(logits[i], 0)[i] for i in range(5)])
        cols = -torch.stack([torch.log_softmax(logits[:, i], 0)[i] for i in range(5)])
        return 0.5 * ((w * rows).sum() + (w * cols).sum())

    sim = cosine(terms.text, terms.pooled)
    diagonal = sim.diagonal().detach().clamp(min=0)
    w = diagonal / diagonal.sum()
    t = texts["text"]
    support_text = torch.stack([
        t[i] + (terms.pooled[:, i].mean(0) - t[i]) / (terms.pooled[:, i].mean(0) - t[i]).norm()
        * terms.radius[i, i] for i in range(5)])
    support_sim = cosine(support_text[:, None], terms.pooled)
    expected = weighted_ce(sim, w) + 0.8 * weighted_ce(support_sim, w)
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=1e-3)
    support = float(weighted_ce(support_sim, w).detach())
    assert float(parts["loss_support"]) == pytest.approx(support, rel=1e-3)


def test_logit_scale_is_clips_100_fixed_and_dual_softmax_runs_at_100_without_temperature(tiny_spec):
    head = build_head("gais", tiny_spec)
    assert float(head.scale()) == pytest.approx(100.0, rel=1e-3)
    assert not isinstance(head.logit_scale, torch.nn.Parameter)
    assert type(head).dsl_logit_scale == 100.0 and type(head).dsl_temperature == 1.0


def test_support_weight_zero_leaves_the_main_loss_alone(tiny_spec):
    head = build_head("gais", tiny_spec, {"support_weight": 0.0}).train()
    videos, captions = inputs(head, tiny_spec, n_videos=6, n_captions=6)
    loss, parts = head.loss(head.encode_texts(captions), head.encode_videos(videos))
    assert "loss_support" not in parts and float(parts["loss"]) == float(parts["loss_main"])


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
