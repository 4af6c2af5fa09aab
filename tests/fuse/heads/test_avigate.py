"""AVIGATE head (docs/methods.md A.2-A.5): shapes, masks, chunking, gates, margins, learning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from avr.errors import AvrError
from avr.fuse.heads import build_head
from avr.fuse.heads.avigate import FUSED_WEIGHT, adaptive_margins, multi_grained_similarity
from avr.fuse.heads.base import EXPLAIN_AUDIO_GATE, EXPLAIN_FRAME_ATTENTION
from avr.store import schema
from support.specs import make_tiny_spec

SMALL = dict(resampler_layers=2, fusion_layers=2)


def video_rows(spec, n: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random 16-bit video arrays shaped like the cache, every frame valid, audio present."""
    generator = torch.Generator().manual_seed(seed)
    layout = schema.array_layout(spec, n, 1)
    rows = {name: torch.randn(layout[name].shape, generator=generator).half()
            for name in schema.stored_inputs((schema.FRAME_EMBEDDINGS, schema.AUDIO_PATCH_TOKENS,
                                              schema.AUDIO_GLOBAL_TOKENS,
                                              schema.AUDIO_POOLED_TOKEN), spec)}
    rows[schema.FRAME_MASK] = torch.ones(layout[schema.FRAME_MASK].shape, dtype=torch.bool)
    rows[schema.HAS_AUDIO] = torch.ones(n, dtype=torch.bool)
    return rows


def caption_rows(spec, n: int, *, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = schema.array_layout(spec, 1, n)[schema.TEXT_EMBEDDINGS].shape
    return {schema.TEXT_EMBEDDINGS: torch.randn(shape, generator=generator).half()}


@pytest.fixture
def head(tiny_spec):
    torch.manual_seed(0)
    return build_head("avigate", tiny_spec, SMALL)


def test_states_and_scores_have_the_documented_shapes(head, tiny_spec):
    videos = head.encode_videos(video_rows(tiny_spec, 5))
    texts = head.encode_texts(caption_rows(tiny_spec, 7))
    frames, dim = tiny_spec.num_frames, tiny_spec.clip_dim
    assert videos["frames"].shape == (5, frames, dim)
    assert videos["video"].shape == (5, dim)
    assert videos["audio_gates"].shape == (5, 2 * SMALL["fusion_layers"])
    assert head.score(texts, videos).shape == (7, 5)


def test_without_audio_gates_are_zero_and_frames_take_the_audio_free_path(head, tiny_spec):
    rows = video_rows(tiny_spec, 3)
    rows[schema.HAS_AUDIO][:] = False
    head.eval()
    with torch.no_grad():
        videos = head.encode_videos(rows)
        original = rows[schema.FRAME_EMBEDDINGS].float() + head.frame_position
        audio_free = original
        for layer in head.fusion:  # every layer reduces to self-attention + MLP
            audio_free = layer.refine(audio_free, rows[schema.FRAME_MASK])
        expected = F.normalize(FUSED_WEIGHT * audio_free + (1 - FUSED_WEIGHT) * original, dim=-1)
    assert torch.equal(videos["audio_gates"], torch.zeros_like(videos["audio_gates"]))
    torch.testing.assert_close(videos["frames"], expected)


def test_a_masked_frame_changes_no_score(head, tiny_spec):
    rows = video_rows(tiny_spec, 3)
    rows[schema.FRAME_MASK][:, -1] = False
    altered = {name: tensor.clone() for name, tensor in rows.items()}
    altered[schema.FRAME_EMBEDDINGS][:, -1] = 5.0
    texts = head.encode_texts(caption_rows(tiny_spec, 4))
    with torch.no_grad():
        before = head.score(texts, head.encode_videos(rows))
        after = head.score(texts, head.encode_videos(altered))
    torch.testing.assert_close(before, after)


def test_videos_without_valid_frames_score_zero_and_stay_finite(head, tiny_spec):
    rows = video_rows(tiny_spec, 4)
    rows[schema.FRAME_MASK][1:3] = False
    texts = head.encode_texts(caption_rows(tiny_spec, 4))
    videos = head.encode_videos(rows)
    scores = head.score(texts, videos)
    loss, _ = head.loss(texts, videos)
    loss.backward()
    assert torch.isfinite(scores).all() and torch.isfinite(loss)
    assert torch.equal(scores[:, 1:3], torch.zeros(4, 2))
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)


def test_loss_is_finite_and_reaches_every_learnable_parameter(head, tiny_spec):
    loss, info = head.loss(head.encode_texts(caption_rows(tiny_spec, 6)),
                           head.encode_videos(video_rows(tiny_spec, 6)))
    loss.backward()
    margin_mean = float(info["margin_mean"])
    assert math.isfinite(float(info["loss"])) and 0.0 < margin_mean <= head.config.margin_cap
    missing = [name for name, p in head.named_parameters()
               if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_margins_come_from_normalised_frames_plus_positions_as_released(head, tiny_spec):
    """A.5 as ``modeling.py`` computes it: c^v from normalise(mean over valid frames of
    normalise(frame + frame position)), margins added times the logit scale to the negatives."""
    rows = video_rows(tiny_spec, 4)
    rows[schema.FRAME_MASK][1, 2:] = False
    captions = caption_rows(tiny_spec, 4)
    with torch.no_grad():
        head.frame_position.normal_()  # large enough to matter
        videos = head.encode_videos(rows)
        texts = head.encode_texts(captions)
        loss, info = head.loss(texts, videos)
        scores = head.score(texts, videos)
    frames = rows[schema.FRAME_EMBEDDINGS].float() + head.frame_position.detach()
    globals_ = []
    for v in range(4):
        valid = frames[v][rows[schema.FRAME_MASK][v]]
        unit = valid / valid.norm(dim=-1, keepdim=True)
        mean = unit.mean(0)
        globals_.append(mean / mean.norm())
    visual = torch.stack(globals_)
    text = captions[schema.TEXT_EMBEDDINGS].float()
    text = text / text.norm(dim=-1, keepdim=True)
    margins = torch.zeros(4, 4)
    for i in range(4):
        for j in range(4):
            if i != j:
                similar = 0.5 * (float(text[i] @ text[j]) + float(visual[i] @ visual[j]))
                margins[i, j] = min(0.2 * (1.0 - similar), 0.1)
    logits = scores + 100.0 * margins
    target = torch.arange(4)
    expected = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    torch.testing.assert_close(videos["visual_mean"], visual)
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=1e-4)
    assert float(info["margin_mean"]) == pytest.approx(float(margins.sum() / 12), rel=1e-5)


def test_audio_tokens_are_the_cached_tokens_projected_after_the_pooled_global_token():
    """AST's final LayerNorm is in the cache: no second normalisation; the global token is the
    stored LayerNorm of the pre-norm CLS and distillation mean, as the release computes it."""
    spec = make_tiny_spec()
    head = build_head("avigate", spec, SMALL)
    assert schema.AUDIO_POOLED_TOKEN in head.video_inputs
    rows = video_rows(spec, 2)
    with torch.no_grad():
        tokens = head.audio_tokens(rows)
    raw = torch.cat([rows[schema.AUDIO_POOLED_TOKEN].float()[:, None],
                     rows[schema.AUDIO_PATCH_TOKENS].float()], 1)
    torch.testing.assert_close(tokens, raw @ head.audio_proj.weight.t())


def test_a_store_without_the_pooled_token_averages_the_post_norm_ones_and_says_so():
    spec = make_tiny_spec(audio_pooled_token=False)
    head = build_head("avigate", spec, SMALL)
    assert schema.AUDIO_POOLED_TOKEN not in head.video_inputs
    rows = video_rows(spec, 2)
    with torch.no_grad():
        tokens = head.audio_tokens(rows)
    cls, dist = rows[schema.AUDIO_GLOBAL_TOKENS].float().unbind(1)
    raw = torch.cat([((cls + dist) / 2)[:, None], rows[schema.AUDIO_PATCH_TOKENS].float()], 1)
    torch.testing.assert_close(tokens, raw @ head.audio_proj.weight.t())
    assert "no audio_pooled_token" in type(head).store_note(spec)
    assert type(head).store_note(make_tiny_spec()) is None


def test_resampler_and_fusion_layer_norms_use_the_codes_eps_1e_12(head):
    """A low-variance input separates eps 1e-12 from PyTorch's 1e-5."""
    x = 1e-4 * torch.randn(3, 32)
    expected = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False,
                                                                 keepdim=True) + 1e-12)
    norms = [m for part in (head.resampler, head.fusion) for m in part.modules()
             if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 3 * SMALL["resampler_layers"] + 4 * SMALL["fusion_layers"]
    for norm in norms:
        with torch.no_grad():
            torch.testing.assert_close(norm(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("width, std", [(512, 0.02), (32, 0.08)])
def test_initialisation_follows_clip4clip_at_the_release_width_and_scales_with_it(width, std):
    """N(0, 0.02^2) Linear weights at the release's width 512, 0.02 sqrt(512 / D) at width D;
    zero biases; the audio projection N(0, 1 / D_ast); CLIP's logit scale 100, learnable."""
    torch.manual_seed(0)
    spec = make_tiny_spec(clip_dim=width)
    head = build_head("avigate", spec, dict(resampler_layers=1, fusion_layers=1))
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)
               and m is not head.audio_proj]
    weights = torch.cat([m.weight.detach().flatten() for m in linears])
    assert float(weights.std()) == pytest.approx(std, rel=0.05)
    assert all(m.bias is None or torch.equal(m.bias, torch.zeros_like(m.bias)) for m in linears)
    audio_std = float(head.audio_proj.weight.detach().std())
    assert audio_std == pytest.approx(spec.ast_dim ** -0.5, rel=0.1)
    assert float(head.scale().detach()) == pytest.approx(100.0, rel=1e-3)
    assert isinstance(head.logit_scale, torch.nn.Parameter)  # the code trains it


def test_adaptive_margins_match_hand_computed_values():
    text = torch.tensor([[1.0, 0.8, -0.2], [0.8, 1.0, 0.9], [-0.2, 0.9, 1.0]])
    video = torch.tensor([[1.0, 0.6, 0.4], [0.6, 1.0, 0.7], [0.4, 0.7, 1.0]])
    # (0,1): 0.2 * (1 - 0.7) = 0.06; (0,2): 0.2 * (1 - 0.1) = 0.18 -> capped at 0.1;
    # (1,2): 0.2 * (1 - 0.8) = 0.04; the diagonal (positives) gets none.
    expected = torch.tensor([[0.0, 0.06, 0.1], [0.06, 0.0, 0.04], [0.1, 0.04, 0.0]])
    torch.testing.assert_close(adaptive_margins(text, video, scale=0.2, cap=0.1), expected)


def test_similarity_averages_frame_log_sum_exp_and_global_cosine():
    text = torch.tensor([[1.0, 0.0]])
    frames = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]] * 3)  # [3 videos, 2 frames, 2]
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    video = torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)], [1.0, 0.0], [0.0, 0.0]])
    scores = multi_grained_similarity(text, frames, video, mask, torch.tensor(2.0), 1.0)
    both = (math.log(math.exp(2.0) + 1.0) + 2.0 * math.sqrt(0.5)) / 2
    torch.testing.assert_close(scores, torch.tensor([[both, 2.0, 0.0]]))


def test_explain_gives_gates_and_frame_weights_per_pair(head, tiny_spec):
    rows = video_rows(tiny_spec, 3)
    rows[schema.FRAME_MASK][2] = False
    with torch.no_grad():
        explained = head.explain(head.encode_texts(caption_rows(tiny_spec, 3)),
                                 head.encode_videos(rows))
    gates, weights = explained[EXPLAIN_AUDIO_GATE], explained[EXPLAIN_FRAME_ATTENTION]
    assert gates.shape == (3, 2 * SMALL["fusion_layers"]) and (gates.abs() < 1).all()
    torch.testing.assert_close(weights.sum(1), torch.tensor([1.0, 1.0, 0.0]))


def test_heads_that_do_not_divide_the_width_are_refused(tiny_spec):
    with pytest.raises(AvrError, match="num_heads=5 does not divide the CLIP width 32"):
        build_head("avigate", tiny_spec, {"num_heads": 5})
