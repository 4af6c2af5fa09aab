"""The tefal head: two text-conditioned blocks (frames, audio patches) and its fusion variants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from avr.errors import AvrError
from avr.fuse import trainer
from avr.fuse.heads import build_head, video_inputs
from avr.fuse.heads.base import EXPLAIN_AUDIO_ATTENTION, EXPLAIN_FRAME_ATTENTION
from avr.fuse.heads.tefal import FUSIONS
from avr.fuse.trainer import TrainConfig
from avr.store import schema
from support.head_inputs import random_rows, randomize
from support.stores import make_learnable_store


def tefal(spec, fusion="add", **options):
    return randomize(build_head("tefal", spec, {"fusion": fusion, **options})).eval()


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


def xpool_branch(block, text, tokens, mask=None):
    """X-Pool's block on the valid tokens, or the zero vector when none is valid."""
    tokens = tokens if mask is None else tokens[mask]
    if len(tokens) == 0:
        return torch.zeros(block.dim)
    return cross_attention(block, text, tokens)


def pair_by_pair(head, videos, captions, score_of):
    """[Q, V] reference scores: ``score_of(q, v, text, video_part)`` for every pair, with the
    caption's X-Pool pooling of that video's valid frames (E_{V|T}) computed for the pair."""
    text = captions[schema.TEXT_EMBEDDINGS].float()
    frames = videos[schema.FRAME_EMBEDDINGS].float()
    return torch.tensor([[score_of(q, v, text[q], xpool_branch(head.video_pool, text[q], frames[v],
                                                                videos[schema.FRAME_MASK][v]))
                          for v in range(len(frames))] for q in range(len(text))])


def assert_scores(head, videos, captions, expected):
    with torch.no_grad():
        scores = head.score(head.encode_texts(captions), head.encode_videos(videos))
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("missing_audio", ["zero_fbank", "mask"])
def test_add_fusion_is_eq_1_to_3_computed_pair_by_pair(tiny_spec, missing_audio):
    head = tefal(tiny_spec, missing_audio=missing_audio)
    videos, captions = inputs(head, tiny_spec, n_videos=4, n_captions=3)
    audio = head.audio_proj(videos[schema.AUDIO_PATCH_TOKENS].float())

    def score_of(q, v, text, video_part):
        # TEFAL Sec. 4.2: a clip without an audio file goes through AST as a zero fbank, whose
        # tokens the cache holds; masking it instead drops the audio term.
        uses_audio = missing_audio == "zero_fbank" or videos[schema.HAS_AUDIO][v]
        audio_part = (xpool_branch(head.audio_pool, text, audio[v]) if uses_audio
                      else torch.zeros_like(video_part))
        return F.cosine_similarity(text, video_part + audio_part, dim=0)

    with torch.no_grad():
        expected = pair_by_pair(head, videos, captions, score_of)
    assert_scores(head, videos, captions, expected)


def test_late_fusion_is_table_8a_with_audio_not_conditioned_on_the_text(tiny_spec):
    head = tefal(tiny_spec, "late")
    videos, captions = inputs(head, tiny_spec, n_videos=4, n_captions=3)
    assert schema.AUDIO_PATCH_TOKENS not in videos  # E_A needs only AST's global tokens
    cls_dist = videos[schema.AUDIO_GLOBAL_TOKENS].float()  # [V, 2, Da]
    audio = (cls_dist[:, 0] + cls_dist[:, 1]) / 2 @ head.audio_proj.weight.T + head.audio_proj.bias
    with torch.no_grad():
        expected = pair_by_pair(head, videos, captions, lambda q, v, text, video_part:
                                F.cosine_similarity(text, video_part + audio[v], dim=0))
    assert_scores(head, videos, captions, expected)


def test_score_sum_adds_the_cosines_of_the_two_text_conditioned_branches(tiny_spec):
    head = tefal(tiny_spec, "score_sum")
    videos, captions = inputs(head, tiny_spec, n_videos=3, n_captions=3)
    audio = head.audio_proj(videos[schema.AUDIO_PATCH_TOKENS].float())

    def score_of(q, v, text, video_part):
        audio_part = xpool_branch(head.audio_pool, text, audio[v])
        return (F.cosine_similarity(text, video_part, dim=0)
                + F.cosine_similarity(text, audio_part, dim=0))

    with torch.no_grad():
        expected = pair_by_pair(head, videos, captions, score_of)
    assert_scores(head, videos, captions, expected)


def test_concat_starts_as_add(tiny_spec):
    concat = build_head("tefal", tiny_spec, {"fusion": "concat"}).eval()
    added = build_head("tefal", tiny_spec, {"fusion": "add"}).eval()
    randomize(added)
    shared = {k: v for k, v in added.state_dict().items()}
    concat.load_state_dict({**concat.state_dict(), **shared})
    videos, captions = inputs(added, tiny_spec)
    with torch.no_grad():
        torch.testing.assert_close(
            concat.score(concat.encode_texts(captions), concat.encode_videos(videos)),
            added.score(added.encode_texts(captions), added.encode_videos(videos)))


def test_a_clip_without_a_track_scores_through_its_zero_fbank_tokens_by_default(tiny_spec):
    head = tefal(tiny_spec)
    videos, captions = inputs(head, tiny_spec)
    texts = head.encode_texts(captions)
    silent = head.score(texts, head.encode_videos(videos))
    videos[schema.HAS_AUDIO][:] = True  # same tokens, flag set: nothing may change
    torch.testing.assert_close(silent, head.score(texts, head.encode_videos(videos)))


def test_masking_missing_audio_scores_a_silent_clip_on_its_frames_alone(tiny_spec):
    head = tefal(tiny_spec, missing_audio="mask")
    videos, captions = inputs(head, tiny_spec)
    texts = head.encode_texts(captions)
    with_audio = head.score(texts, head.encode_videos(videos))
    videos[schema.HAS_AUDIO][:] = False
    without_audio = head.score(texts, head.encode_videos(videos))
    assert not torch.allclose(with_audio[:, 0], without_audio[:, 0])
    torch.testing.assert_close(with_audio[:, 1], without_audio[:, 1])  # video 1 had no audio
    states = head.encode_videos(videos)
    video_only = head.video_pool.pool_all_pairs(texts["video_query"], states["video_keys"],
                                                states["video_values"], states["video_mask"])
    expected = torch.einsum("qd,qvd->qv", F.normalize(texts["text"], dim=-1),
                            F.normalize(video_only.vectors, dim=-1))
    torch.testing.assert_close(without_audio, expected)


@pytest.mark.parametrize("missing_audio", ["zero_fbank", "mask"])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_hidden_audio_takes_no_part_whatever_the_policy(tiny_spec, fusion, missing_audio):
    head = tefal(tiny_spec, fusion, missing_audio=missing_audio)
    videos, captions = inputs(head, tiny_spec)
    texts = head.encode_texts(captions)
    hidden = head.hide_audio(videos)
    scores = head.score(texts, head.encode_videos(hidden))
    other_audio = random_rows(tiny_spec, head.video_inputs, 5, seed=7)
    for name in (schema.AUDIO_PATCH_TOKENS, schema.AUDIO_GLOBAL_TOKENS):
        if name in hidden:
            hidden[name] = other_audio[name]
    torch.testing.assert_close(scores, head.score(texts, head.encode_videos(hidden)))


@pytest.mark.parametrize("fusion, reads, skips", [
    ("add", schema.AUDIO_PATCH_TOKENS, schema.AUDIO_GLOBAL_TOKENS),
    ("score_sum", schema.AUDIO_PATCH_TOKENS, schema.AUDIO_GLOBAL_TOKENS),
    ("concat", schema.AUDIO_PATCH_TOKENS, schema.AUDIO_GLOBAL_TOKENS),
    ("xattn", schema.AUDIO_PATCH_TOKENS, schema.AUDIO_GLOBAL_TOKENS),
    ("late", schema.AUDIO_GLOBAL_TOKENS, schema.AUDIO_PATCH_TOKENS),
    ("stack", schema.AUDIO_GLOBAL_TOKENS, schema.AUDIO_PATCH_TOKENS),
])
def test_each_fusion_reads_only_the_audio_arrays_it_uses(tiny_spec, fusion, reads, skips):
    head = build_head("tefal", tiny_spec, {"fusion": fusion})
    assert reads in head.video_inputs and skips not in head.video_inputs
    assert head.video_inputs == video_inputs("tefal", {"fusion": fusion})


def test_loaders_shared_by_several_fusions_read_the_union(tiny_spec):
    union = video_inputs("tefal", {"fusion": "add"}, {"fusion": "stack"})
    assert {schema.AUDIO_PATCH_TOKENS, schema.AUDIO_GLOBAL_TOKENS} <= set(union)


def test_training_a_stack_run_never_loads_patch_tokens(tmp_path, tiny_spec, monkeypatch):
    from avr.evaluate import evaluator
    from avr.evaluate.evaluator import EvalConfig, evaluate_run
    from avr.fuse import loading
    from avr.store import splits as data

    loaded = []

    def recording(load):
        def wrapper(path, split, video_names, caption_names, **kwargs):
            loaded.append(tuple(video_names))
            return load(path, split, video_names, caption_names, **kwargs)
        return wrapper

    monkeypatch.setattr(loading, "load_split", recording(data.load_split))
    monkeypatch.setattr(evaluator, "load_split", recording(data.load_split))
    store = make_learnable_store(tmp_path / "c", tiny_spec)
    trainer.train(store, TrainConfig(head="tefal", head_options={"fusion": "stack"}, epochs=1,
                                     batch_size=16, warmup=0.0), tmp_path / "run")
    trainer.resume(tmp_path / "run", {"epochs": 2})
    evaluate_run(tmp_path / "run", config=EvalConfig(device="cpu"))
    assert len(loaded) == 5  # train + val, train + val again, test
    assert all(schema.AUDIO_PATCH_TOKENS not in names for names in loaded)
    assert all(schema.AUDIO_GLOBAL_TOKENS in names for names in loaded)


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
    assert math.isfinite(float(parts["loss"]))
    for name, param in head.named_parameters():
        if name.endswith("key.bias"):  # adds one logit to every token: softmax-invariant
            continue
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_an_unknown_fusion_is_refused_with_the_choices(tiny_spec):
    with pytest.raises(AvrError, match="add, late, score_sum, concat, xattn, stack"):
        build_head("tefal", tiny_spec, {"fusion": "mean"})


def test_an_unknown_missing_audio_policy_is_refused_with_the_choices(tiny_spec):
    with pytest.raises(AvrError, match="missing_audio 'zero'; choose one of zero_fbank, mask"):
        build_head("tefal", tiny_spec, {"missing_audio": "zero"})


def test_explain_gives_frame_and_audio_patch_attention(tiny_spec):
    head = tefal(tiny_spec, missing_audio="mask")
    videos, captions = inputs(head, tiny_spec, n_videos=4, n_captions=4)
    explained = head.explain(head.encode_texts(captions), head.encode_videos(videos))
    assert explained[EXPLAIN_FRAME_ATTENTION].shape == (4, tiny_spec.num_frames)
    assert explained[EXPLAIN_AUDIO_ATTENTION].shape == (4, tiny_spec.ast_patches)
    assert torch.all(explained[EXPLAIN_FRAME_ATTENTION][0, -2:] == 0)  # masked frames
    assert torch.all(explained[EXPLAIN_AUDIO_ATTENTION][1] == 0)  # no audio track
    torch.testing.assert_close(explained[EXPLAIN_AUDIO_ATTENTION][0].sum(), torch.tensor(1.0))
