"""HTAV: the temporal graph text encoder, the pure attention pieces, and the head end to end."""

from __future__ import annotations

import pytest
import torch

from avr.errors import AvrError
from avr.fuse.graph import GATLayer, GCNLayer, TemporalGraph, temporal_adjacency
from avr.fuse.heads import base, build_head, make_config
from avr.fuse.heads import htav
from avr.store import schema
from avr.store.splits import random_split
from support.head_inputs import randomize

SMALL = dict(width=16, graph_layers=1, spans=(1, 2, 4), dropout=0.0)


# The soft-DTW wavefront runs hundreds of ops on tiny tensors: one thread is faster.
pytestmark = pytest.mark.usefixtures("one_thread")


# ---- temporal graph ---------------------------------------------------------------------------

def test_adjacency_joins_tokens_within_the_window_and_never_padding():
    mask = torch.tensor([[True, True, True, True, False]])
    adjacency = temporal_adjacency(mask, window=2)[0]
    expected = torch.zeros(5, 5, dtype=torch.bool)
    for i in range(4):
        for j in range(4):
            expected[i, j] = abs(i - j) <= 2
    expected[4, 4] = True  # a padded token keeps only its self-loop
    assert torch.equal(adjacency, expected)


def test_gcn_layer_matches_the_dense_normalized_adjacency_formula():
    torch.manual_seed(0)
    layer = GCNLayer(8)
    tokens = torch.randn(1, 5, 8)
    mask = torch.tensor([[True, True, True, True, False]])
    A_hat = torch.zeros(5, 5)
    for i in range(5):
        for j in range(5):
            A_hat[i, j] = float(i == j or (abs(i - j) <= 1 and i < 4 and j < 4))
    D_inv_sqrt = torch.diag(A_hat.sum(1).rsqrt())
    propagated = D_inv_sqrt @ A_hat @ D_inv_sqrt @ layer.linear(tokens[0])
    expected = layer.norm(tokens[0] + torch.relu(propagated))
    got = layer(tokens, temporal_adjacency(mask, window=1))[0]
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("kind", ["gcn", "gat"])
def test_padded_tokens_do_not_change_valid_outputs(kind):
    torch.manual_seed(0)
    graph = TemporalGraph(8, layers=2, kind=kind, window=2, heads=2)
    tokens = torch.randn(2, 6, 8)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    changed = tokens.clone()
    changed[0, 4:] = 100.0 * torch.randn(2, 8)
    first, second = graph(tokens, mask), graph(changed, mask)
    assert torch.allclose(first[0, :4], second[0, :4], atol=1e-6)
    assert first[0, 4:].abs().max() == 0
    assert torch.equal(first[1], second[1])


def test_gat_attention_covers_only_graph_neighbours():
    torch.manual_seed(0)
    layer = GATLayer(8, heads=2)
    tokens = torch.randn(1, 6, 8)
    mask = torch.ones(1, 6, dtype=torch.bool)
    changed = tokens.clone()
    changed[0, 5] += 10.0  # token 5 is 5 steps from token 0, outside window 1
    adjacency = temporal_adjacency(mask, window=1)
    assert torch.allclose(layer(tokens, adjacency)[0, 0], layer(changed, adjacency)[0, 0])


def test_all_padding_sequence_gives_zeros_not_nan():
    graph = TemporalGraph(8, layers=2, kind="gat", window=2, heads=2)
    out = graph(torch.randn(1, 4, 8), torch.zeros(1, 4, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out))


# ---- pure attention pieces --------------------------------------------------------------------

def test_span_weights_give_each_valid_frame_its_windows_mean_logit():
    logits = torch.tensor([[[0.0, 2.0, 5.0, 1.0, 7.0]]])  # [Q=1, V=1, F=5]
    mask = torch.tensor([[True, True, True, False, True]])
    weights = htav.span_frame_weights(logits, mask, span=2)[0, 0]
    # windows {0, 1}, {2, 3 masked}, {4}: mean logits 1, 5, 7; softmax over the 4 valid frames
    e = torch.exp(torch.tensor([1.0, 1.0, 5.0, 7.0]))
    expected = torch.stack([e[0], e[1], e[2], torch.tensor(0.0), e[3]]) / e.sum()
    assert torch.allclose(weights, expected)


def test_equal_logits_give_uniform_weights_over_valid_frames_for_every_span():
    mask = torch.tensor([[True, True, True, True, True, False]])
    for span in (1, 2, 4):
        weights = htav.span_frame_weights(torch.zeros(2, 1, 6), mask, span)
        assert torch.allclose(weights, torch.tensor([[0.2] * 5 + [0.0]]).expand(2, 1, 6))


def test_a_video_without_frames_gets_no_frame_weight():
    weights = htav.span_frame_weights(torch.randn(2, 1, 6), torch.zeros(1, 6, dtype=torch.bool), 4)
    assert torch.equal(weights, torch.zeros(2, 1, 6))


def test_threshold_suppresses_keys_below_theta_and_renormalises():
    attention = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = htav.thresholded_attention(attention, torch.tensor(0.1), temperature=1e-3)
    assert torch.allclose(kept.sum(-1), torch.ones(1))
    assert kept[0, 3] < 1e-6
    assert torch.allclose(kept[0, :3], attention[0, :3] / 0.95, atol=1e-4)


def test_alignment_reweighting_prefers_steps_on_the_path():
    attention = torch.full((1, 4), 0.25)
    alignment = torch.tensor([[0.0, 2.0, 0.0, 0.0]])
    weights = htav.alignment_weighted_attention(attention, alignment)
    assert torch.allclose(weights.sum(-1), torch.ones(1))
    assert weights[0, 1] > 0.5 and (weights[0, [0, 2, 3]] > 0).all()


# ---- the head ---------------------------------------------------------------------------------

def make_head(spec, **options):
    """A head whose parameters are moved off their init (the zero readout and temporal query
    would otherwise hide every per-pair path but the CLIP frames')."""
    torch.manual_seed(0)
    head = build_head("htav", spec, {**SMALL, **options})
    scale = head.logit_scale.detach().clone()
    randomize(head)
    with torch.no_grad():
        head.logit_scale.copy_(scale)  # CLIP's 100 sits at the clamp: keep it where it learns
    return head


def split_for(head, spec, num_videos=5, captions_per_video=1, seed=0):
    return random_split(spec, num_videos, captions_per_video, video_names=head.video_inputs,
                        caption_names=head.caption_inputs, seed=seed)


def encoded(head, data):
    return head.encode_texts(data.captions), head.encode_videos(data.videos)


def test_scores_have_a_row_per_caption_and_a_column_per_video(tiny_spec):
    head = make_head(tiny_spec).eval()
    data = split_for(head, tiny_spec, num_videos=5, captions_per_video=3)
    texts, videos = encoded(head, data)
    scores = head.score(texts, videos)
    assert scores.shape == (15, 5) and torch.isfinite(scores).all()
    assert scores.abs().max() <= 1 + 1e-5  # cosine


def test_query_blocks_inside_score_equal_one_block(tiny_spec, monkeypatch):
    head = make_head(tiny_spec).eval()
    texts, videos = encoded(head, split_for(head, tiny_spec, num_videos=4, captions_per_video=3))
    with torch.no_grad():
        whole = head.score(texts, videos)
        monkeypatch.setattr(htav, "PAIR_ELEMENTS", 1)  # one query per block
        blocked = head.score(texts, videos)
    assert torch.allclose(blocked, whole, atol=1e-6)


@pytest.mark.parametrize("graph", ["gcn", "gat"])
def test_backward_reaches_every_parameter(tiny_spec, graph):
    head = make_head(tiny_spec, graph=graph, graph_heads=2).train()
    loss, _ = head.loss(*encoded(head, split_for(head, tiny_spec, num_videos=4)))
    loss.backward()
    missing = [name for name, p in head.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert missing == []


def test_without_audio_the_score_is_the_video_only_path(tiny_spec):
    head = make_head(tiny_spec).eval()
    data = split_for(head, tiny_spec)
    data.videos[schema.HAS_AUDIO][:] = False
    texts, videos = encoded(head, data)
    with torch.no_grad():
        scores = head.score(texts, videos)
        clip_evidence, detail, _ = head._video_text(texts, videos)
        video_only = torch.einsum("qvd,qd->qv", torch.nn.functional.normalize(
            clip_evidence + head.readout(detail), dim=-1), texts["sentence"])
        data.videos[schema.AUDIO_TIME_TOKENS].normal_()
        other_audio = head.score(texts, head.encode_videos(data.videos))
    assert torch.allclose(scores, video_only, atol=1e-6)
    assert torch.equal(scores, other_audio)


def test_audio_changes_the_score_when_present(tiny_spec):
    head = make_head(tiny_spec).eval()
    data = split_for(head, tiny_spec)
    texts, videos = encoded(head, data)
    with torch.no_grad():
        scores = head.score(texts, videos)
        data.videos[schema.AUDIO_TIME_TOKENS].normal_()
        other_audio = head.score(texts, head.encode_videos(data.videos))
    assert not torch.allclose(scores, other_audio)


def test_masked_frames_do_not_change_the_score(tiny_spec):
    head = make_head(tiny_spec).eval()
    data = split_for(head, tiny_spec)
    data.videos[schema.FRAME_MASK][:, 4:] = False
    texts, videos = encoded(head, data)
    with torch.no_grad():
        scores = head.score(texts, videos)
        for name in (schema.FRAME_EMBEDDINGS, schema.swin_level(0), schema.swin_level(2)):
            data.videos[name][:, 4:] = 50.0
        changed = head.score(texts, head.encode_videos(data.videos))
    assert torch.allclose(scores, changed, atol=1e-6)


def test_empty_masks_give_finite_scores(tiny_spec):
    head = make_head(tiny_spec).eval()
    data = split_for(head, tiny_spec)
    data.videos[schema.FRAME_MASK][:] = False
    data.videos[schema.HAS_AUDIO][:] = False
    data.captions[schema.ROBERTA_MASK][0] = False
    with torch.no_grad():
        scores = head.score(*encoded(head, data))
    assert torch.isfinite(scores).all()


def test_explain_reports_each_pairs_weights(tiny_spec):
    head = make_head(tiny_spec).eval()
    data = split_for(head, tiny_spec, num_videos=20)
    data.videos[schema.HAS_AUDIO][3] = False
    data.videos[schema.FRAME_MASK][5, 2:] = False
    texts, videos = encoded(head, data)
    report = head.explain(texts, videos)
    frames = report[base.EXPLAIN_FRAME_ATTENTION]
    audio = report[base.EXPLAIN_AUDIO_ATTENTION]
    alignment = report[base.EXPLAIN_DTW_ALIGNMENT]
    assert frames.shape == (20, tiny_spec.num_frames)
    assert audio.shape == (20, tiny_spec.ast_time_patches)
    assert alignment.shape == (20, tiny_spec.roberta_len, tiny_spec.ast_time_patches)
    assert report[base.EXPLAIN_THRESHOLD].shape == (20, tiny_spec.ast_time_patches)
    assert torch.allclose(frames.sum(-1), torch.ones(20), atol=1e-5)
    assert frames[5, 2:].abs().max() == 0
    with_audio = torch.arange(20) != 3
    assert torch.allclose(audio[with_audio].sum(-1), torch.ones(19), atol=1e-5)
    assert audio[3].abs().max() == 0
    # pair 7 is the diagonal entry of the all-pairs evaluation
    with torch.no_grad():
        evidence = head.pair_evidence(texts, videos)
    assert torch.allclose(frames[7], evidence.frame_weights[7, 7], atol=1e-6)
    assert torch.allclose(alignment[7], evidence.alignment[7, 7], atol=1e-6)


@pytest.mark.parametrize("video_queries", ["tokens", "summary"])
def test_default_initialisation_scores_as_zero_shot_meanp(tiny_spec, video_queries):
    """At any width (16 here, CLIP's is 32): cos(mean of the valid normalised CLIP frames,
    sentence), CLIP4Clip's meanP."""
    torch.manual_seed(0)
    head = build_head("htav", tiny_spec, {"width": 16, "video_queries": video_queries}).eval()
    data = split_for(head, tiny_spec, num_videos=4, captions_per_video=2)
    data.videos[schema.FRAME_MASK][1, 3:] = False
    data.videos[schema.FRAME_MASK][2, 1::2] = False
    data.videos[schema.HAS_AUDIO][3] = False
    with torch.no_grad():
        scores = head.score(*encoded(head, data))
    frames = data.videos[schema.FRAME_EMBEDDINGS].float()
    frames = frames / frames.norm(dim=-1, keepdim=True)
    mask = data.videos[schema.FRAME_MASK]
    mean = torch.stack([frames[v][mask[v]].mean(0) for v in range(4)])
    sentence = data.captions[schema.TEXT_EMBEDDINGS].float()
    zero_shot = (sentence @ mean.t()) / (sentence.norm(dim=-1)[:, None] * mean.norm(dim=-1))
    assert torch.allclose(scores, zero_shot, atol=1e-5)


def reference_video_only_score(head, captions, videos, q, v):
    """One pair through the video-text block written out per query x (Eq. 3-5, module
    docstring), for a video without audio: x = each graph token weighted by pi, or h."""
    mask = captions[schema.ROBERTA_MASK][q:q + 1].bool()
    graph = head.graph(head.token_proj(captions[schema.ROBERTA_STATES][q:q + 1].float()), mask)[0]
    importance = head.token_importance(graph).squeeze(-1).masked_fill(~mask[0], float("-inf"))
    pi = importance.softmax(0)
    sentence = captions[schema.TEXT_EMBEDDINGS][q].float()
    summary = head.summary_norm(head.sentence_to_width(sentence) + pi @ graph)
    if head.config.video_queries == "tokens":
        queries = [(graph[l], pi[l]) for l in range(len(pi)) if mask[0, l]]
    else:
        queries = [(summary, torch.tensor(1.0))]
    stages = [videos[schema.swin_level(k)][v:v + 1].float() for k in range(htav.SWIN_LEVELS)]
    tokens = (head.fpn(stages) + head.level_embedding[head.token_level])[0]  # [F, S, W]
    frames = videos[schema.FRAME_EMBEDDINGS][v].float()  # [F, Dc]
    frame_mask = videos[schema.FRAME_MASK][v]
    values = head.spatial_value(tokens)
    width, num_frames = head.width, len(frames)
    span_mix = head.span_logits(summary).softmax(0)
    clip_part, detail_part = torch.zeros(frames.shape[1]), torch.zeros(width)
    for x, weight in queries:
        alpha = torch.softmax(head.spatial_key(tokens) @ head.spatial_query(x) / width ** 0.5
                              + head.level_bias[head.token_level], dim=-1)  # [F, S]
        detail = torch.einsum("fs,fsw->fw", alpha, values)  # d_f
        keys = head.frame_key(frames) + head.detail_key(detail)
        logits = keys @ head.temporal_query(x) / width ** 0.5  # [F]
        omega = torch.zeros(num_frames)
        for n, span in enumerate(head.spans):
            smoothed = torch.empty(num_frames)
            for start in range(0, num_frames, span):
                window = slice(start, start + span)
                smoothed[window] = logits[window][frame_mask[window]].mean() \
                    if frame_mask[window].any() else 0.0
            exp = torch.exp(smoothed) * frame_mask
            omega = omega + span_mix[n] * exp / exp.sum()
        clip_part = clip_part + weight * omega @ torch.nn.functional.normalize(frames, dim=-1)
        detail_part = detail_part + weight * omega @ detail
    embedding = clip_part + head.readout(detail_part)
    return torch.nn.functional.cosine_similarity(embedding, head.sentence_proj(sentence), dim=0)


@pytest.mark.parametrize("video_queries", ["tokens", "summary"])
def test_video_attention_follows_the_per_query_formula(tiny_spec, video_queries):
    head = make_head(tiny_spec, video_queries=video_queries).eval()
    data = split_for(head, tiny_spec, num_videos=3, captions_per_video=1)
    data.videos[schema.HAS_AUDIO][:] = False
    data.videos[schema.FRAME_MASK][1, 3:] = False
    data.captions[schema.ROBERTA_MASK][0, 5:] = False
    with torch.no_grad():
        scores = head.score(*encoded(head, data))
        for q in range(3):
            for v in range(3):
                expected = reference_video_only_score(head, data.captions, data.videos, q, v)
                assert torch.allclose(scores[q, v], expected, atol=1e-5), (q, v)


def test_per_token_and_summary_queries_differ(tiny_spec):
    tokens, summary = (make_head(tiny_spec, video_queries=mode).eval()
                       for mode in ("tokens", "summary"))
    data = split_for(tokens, tiny_spec, num_videos=3)
    with torch.no_grad():
        assert not torch.allclose(tokens.score(*encoded(tokens, data)),
                                  summary.score(*encoded(summary, data)))


def test_unknown_video_queries_are_refused_with_the_choices(tiny_spec):
    with pytest.raises(Exception, match="video_queries 'words' is unknown; choose one of tokens"):
        build_head("htav", tiny_spec, {"video_queries": "words"})


def test_logit_scale_starts_at_clips_100_and_learns(tiny_spec):
    head = build_head("htav", tiny_spec, SMALL)
    assert float(head.scale().detach()) == pytest.approx(100.0, rel=1e-3)
    assert isinstance(head.logit_scale, torch.nn.Parameter)


@pytest.mark.parametrize("given", [(1, 2, 4), [1, 2, 4], "1,2,4", "1+2+4"])
def test_spans_are_read_from_every_config_form(given):
    assert make_config("htav", {"spans": given}).spans == (1, 2, 4)
    assert make_config("htav", {"spans": 3}).spans == (3,)
    with pytest.raises(AvrError, match="spans = '1,x' must be whole numbers"):
        make_config("htav", {"spans": "1,x"})


def test_an_odd_width_is_refused_for_a_bilstm_with_the_reason(tiny_spec):
    with pytest.raises(Exception, match="even"):
        build_head("htav", tiny_spec, {"width": 15, "bidirectional": True})
    build_head("htav", tiny_spec, {"width": 15})  # one direction: any width


def test_each_audio_token_has_its_own_threshold_from_its_state(tiny_spec):
    """Sec. 4 C: "dynamic thresholds for each audio token"; the global option keeps one."""
    head = make_head(tiny_spec).eval()
    data = split_for(head, tiny_spec, num_videos=3)
    texts, videos = encoded(head, data)
    steps = tiny_spec.ast_time_patches
    with torch.no_grad():
        audio, _ = head.audio_lstm(head.audio_norm(data.videos[schema.AUDIO_TIME_TOKENS].float()))
        want = torch.sigmoid(head.token_threshold(audio).squeeze(-1) + head.threshold_logit) / steps
    theta = head.explain(texts, videos)[base.EXPLAIN_THRESHOLD]
    torch.testing.assert_close(theta, want)
    assert theta.std(-1).min() > 0  # differs from token to token
    single = make_head(tiny_spec, threshold="global").eval()
    theta = single.explain(*encoded(single, data))[base.EXPLAIN_THRESHOLD]
    assert theta.shape == (3, 1)
    assert torch.allclose(theta, torch.sigmoid(single.threshold_logit.detach()) / steps)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_the_audio_lstm_reads_forward_unless_bidirectional(tiny_spec, bidirectional):
    """Eq. 8's LSTM: an audio step's state depends on the steps before it only."""
    head = make_head(tiny_spec, bidirectional=bidirectional).eval()
    data = split_for(head, tiny_spec, num_videos=2)
    later = dict(data.videos)
    later[schema.AUDIO_TIME_TOKENS] = data.videos[schema.AUDIO_TIME_TOKENS].clone()
    later[schema.AUDIO_TIME_TOKENS][:, -1] += 1.0
    with torch.no_grad():
        keys, changed = (head.encode_videos(rows)["audio_keys"] for rows in (data.videos, later))
    assert torch.equal(keys[:, :-1], changed[:, :-1]) is not bidirectional
