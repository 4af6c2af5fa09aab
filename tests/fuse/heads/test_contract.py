"""The contract every registered head keeps, checked on each of them (timm's test_models.py).

Parametrised over ``avr.fuse.heads.HEADS``, which fills itself with every module of the
package: a head file dropped into avr/fuse/heads/ is checked here with no edit to this file
(``test_a_head_file_dropped_into_the_package_is_checked_by_this_contract`` shows it). The
tests that pin each paper's equations stay in tests/test_heads_<head>.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from avr.evaluate.score import ChunkSizes, score_split, score_states
from avr.fuse import checkpoint, stacked, trainer
from avr.fuse.heads import HEADS, build_head
from avr.fuse.heads import base
from avr.fuse.trainer import TrainConfig
from avr.store import schema
from support.specs import make_tiny_spec
from support.head_inputs import random_rows, randomize
from support.stores import make_learnable_store
from support.paths import REPO

# Smaller than the defaults where a head is costly; a new head is checked with its defaults.
SMALL = {"avigate": dict(resampler_layers=1, fusion_layers=1),
         "htav": dict(width=16, graph_layers=1)}
# Settings under which each head learns the learnable store within a few epochs (one caption
# per video an epoch: half the steps of every caption, enough here).
LEARNING = dict(epochs=6, batch_size=16, lr=1e-2, warmup=0.0, pairs="one")
HEAD_LEARNING = {
    # no text projection, and the video moves only through a 5% fused residual (A.3)
    "avigate": dict(epochs=20, head_options=SMALL["avigate"]),
    "htav": dict(head_options={"width": 32}),  # 54.2 at lr 1e-2; 29.2 at 3e-3
}
# Documented keys of ``explain`` and the size of their second dimension, when it is fixed.
EXPLAIN_KEYS = {base.EXPLAIN_FRAME_ATTENTION: "frames", base.EXPLAIN_AUDIO_ATTENTION: None,
                base.EXPLAIN_AUDIO_GATE: None, base.EXPLAIN_THRESHOLD: None,
                base.EXPLAIN_DTW_ALIGNMENT: None}
HEAD_NAMES = sorted(HEADS)


def frame_arrays(spec) -> set[str]:
    """The video arrays with a row per frame, [N, F, ...], that ``frame_mask`` masks."""
    return {schema.FRAME_EMBEDDINGS, *(schema.swin_level(k) for k in range(spec.num_swin_stages))}


def make(name: str, spec, **options):
    torch.manual_seed(0)  # the same initial weights whichever tests ran before
    return randomize(build_head(name, spec, {**SMALL.get(name, {}), **options})).eval()


def inputs(head, spec, n_videos=5, n_captions=7):
    videos = random_rows(spec, head.video_inputs, n_videos, seed=0)
    if schema.FRAME_MASK in videos:
        videos[schema.FRAME_MASK][0, -2:] = False
        videos[schema.FRAME_MASK][3, 1:] = False
    if schema.HAS_AUDIO in videos:
        videos[schema.HAS_AUDIO][1] = False
    return videos, random_rows(spec, head.caption_inputs, n_captions, seed=1)


def scores(head, videos, captions) -> torch.Tensor:
    with torch.no_grad():
        return head.score(head.encode_texts(captions), head.encode_videos(videos)).float()


@pytest.fixture(scope="module")
def spec():
    return make_tiny_spec()


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_chunked_scores_equal_one_call(name, spec):
    head = make(name, spec)
    videos, captions = inputs(head, spec)
    with torch.no_grad():
        texts, states = head.encode_texts(captions), head.encode_videos(videos)
        whole = head.score(texts, states).float()
        chunked = score_states(head, texts, states, chunks=ChunkSizes(score_texts=3,
                                                                      score_videos=2))
    assert chunked.shape == (7, 5)
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_masked_frames_change_nothing(name, spec):
    head = make(name, spec)
    videos, captions = inputs(head, spec)
    if schema.FRAME_MASK not in videos:
        pytest.skip(f"{name} reads no frame mask")
    changed = dict(videos)
    hidden = ~videos[schema.FRAME_MASK]
    generator = torch.Generator().manual_seed(5)
    for array in frame_arrays(spec) & set(videos):
        noise = 10 * torch.randn(videos[array].shape, generator=generator).to(videos[array].dtype)
        where = hidden.reshape(*hidden.shape, *[1] * (videos[array].dim() - 2))
        changed[array] = torch.where(where, noise, videos[array])
    torch.testing.assert_close(scores(head, changed, captions), scores(head, videos, captions),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_scores_are_finite_without_any_audio(name, spec):
    head = make(name, spec)
    videos, captions = inputs(head, spec)
    if schema.HAS_AUDIO in videos:
        videos = head.hide_audio(videos)
    assert torch.isfinite(scores(head, videos, captions)).all()


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_explain_gives_documented_keys_one_row_per_pair(name, spec):
    head = make(name, spec)
    videos, captions = inputs(head, spec, n_videos=4, n_captions=4)
    with torch.no_grad():
        explained = head.explain(head.encode_texts(captions), head.encode_videos(videos))
    assert set(explained) <= set(EXPLAIN_KEYS), sorted(explained)
    for key, value in explained.items():
        assert value.shape[0] == 4, (key, value.shape)
        if EXPLAIN_KEYS[key] == "frames":
            assert value.shape[1] == spec.num_frames, (key, value.shape)
        assert torch.isfinite(value.float()).all(), key


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_a_gradient_reaches_every_trainable_parameter(name, spec):
    head = make(name, spec, dropout=0.0).train()
    videos, captions = inputs(head, spec, n_videos=6, n_captions=6)
    loss, parts = head.loss(head.encode_texts(captions), head.encode_videos(videos))
    assert "loss" in parts and all(not value.requires_grad for value in parts.values())
    loss.backward()
    # A bias added to every key of one softmax shifts all its logits alike: it has no gradient
    # (GAIS's rewrite of the pooling does not compute it at all).
    trainable = [(n, p) for n, p in head.named_parameters()
                 if p.requires_grad and not n.endswith("key.bias")]
    unreached = [n for n, p in trainable if p.grad is None or not p.grad.any()]
    assert not unreached
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_a_batch_taken_a_block_of_videos_at_a_time_gives_the_same_loss_and_gradients(name, spec):
    head = make(name, spec, dropout=0.0).train()
    if head.has_own_loss():
        pytest.skip(f"{name}'s loss has terms of its own: the trainer takes its batch whole")
    videos, captions = inputs(head, spec, n_videos=6, n_captions=6)
    whole, _ = head.loss(head.encode_texts(captions), head.encode_videos(videos))
    whole.backward()
    expected = {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}
    head.zero_grad(set_to_none=True)
    blocked, parts = head.loss_in_video_blocks(head.encode_texts(captions), videos, 4)
    blocked.backward()
    torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=1e-6)
    assert set(parts) == {"loss"}
    for n, p in head.named_parameters():
        if n in expected:
            torch.testing.assert_close(p.grad, expected[n], rtol=1e-3, atol=1e-5,
                                       msg=lambda text, n=n: f"{n}: {text}")


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_scoring_within_a_tiny_working_memory_gives_the_same_scores(name, spec):
    head = make(name, spec)
    videos, captions = inputs(head, spec)
    plain = score_split(head, videos, captions, torch.device("cpu"))
    tiny = score_split(head, videos, captions, torch.device("cpu"), work_bytes=1)
    roomy = score_split(head, videos, captions, torch.device("cpu"), work_bytes=2**30)
    torch.testing.assert_close(tiny.sim, plain.sim, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(roomy.sim, plain.sim, rtol=1e-4, atol=1e-5)
    assert tiny.videos is None  # one video at a time, states not kept
    assert roomy.videos.keys() == plain.videos.keys()


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_saved_weights_load_to_identical_scores(name, spec, tmp_path):
    head = make(name, spec)
    videos, captions = inputs(head, spec)
    checkpoint.save_weights(head, tmp_path / "w.safetensors")
    loaded = build_head(name, spec, head.config_dict()).eval()
    checkpoint.load_weights(loaded, tmp_path / "w.safetensors")
    assert torch.equal(scores(loaded, videos, captions), scores(head, videos, captions))


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_training_beats_chance_by_a_wide_margin(name, tmp_path, spec):
    store = make_learnable_store(tmp_path / "cache", spec, failed=(3,))
    settings = {**LEARNING, **HEAD_LEARNING.get(name, {})}
    result = trainer.train(store, TrainConfig(head=name, **settings), tmp_path / "run")
    chance = 100.0 / 12
    assert result.best_val_r1 > 4 * chance


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_stacked_trials_equal_their_solo_runs_or_are_refused_with_a_reason(name, tmp_path, spec):
    """A head declares whether its trials stack (``stackable``): stacked, two trials of another
    lr and seed train to what they reach alone; refused, each trial trains alone and the reason
    names the head."""
    refusal = HEADS[name].stack_refusal()
    options = {**SMALL.get(name, {}), "dropout": 0.0, "temperature": 0.05}
    configs = [TrainConfig(head=name, epochs=2, batch_size=16, lr=lr, seed=seed, warmup=0.0,
                           device="cpu", head_options=options)
               for lr, seed in ((3e-3, 42), (1e-3, 42))]
    if refusal is not None:
        assert name in refusal
        assert stacked.groups(configs) == [[0], [1]]
        return
    assert stacked.groups(configs) == [[0, 1]]
    store = make_learnable_store(tmp_path / "cache", spec)
    cache = trainer.load_cache(store, name, torch.device("cpu"), head_options=[options])
    together = stacked.train_stacked(store, configs, [tmp_path / f"s{k}" for k in range(2)],
                                     cache)
    for k, config in enumerate(configs):
        alone = trainer.train(store, config, tmp_path / f"a{k}", cache=cache)
        assert [h.val_r1 for h in together[k].history] == [h.val_r1 for h in alone.history]
        assert [h.loss for h in together[k].history] == \
            pytest.approx([h.loss for h in alone.history], abs=1e-4)


THROWAWAY_HEAD = '''
    """A throwaway head: mean-pooled frames through one linear map, against the sentence."""

    import torch.nn.functional as F
    from torch import nn

    from avr.fuse.heads import register_head
    from avr.fuse.heads.base import RetrievalHead
    from avr.store import schema


    @register_head("throwaway")
    class ThrowawayHead(RetrievalHead):
        video_inputs = (schema.FRAME_EMBEDDINGS, schema.FRAME_MASK)
        caption_inputs = (schema.TEXT_EMBEDDINGS,)

        def __init__(self, spec, config):
            super().__init__(spec, config)
            self.proj = nn.Linear(spec.clip_dim, spec.clip_dim)

        def encode_videos(self, videos):
            frames = videos[schema.FRAME_EMBEDDINGS].to(self.param_dtype())
            mask = videos[schema.FRAME_MASK][..., None].to(frames.dtype)
            pooled = (frames * mask).sum(1) / mask.sum(1).clamp(min=1)
            return {"video": F.normalize(self.proj(pooled), dim=-1)}

        def encode_texts(self, captions):
            text = captions[schema.TEXT_EMBEDDINGS].to(self.param_dtype())
            return {"text": F.normalize(text, dim=-1)}

        def score(self, texts, videos):
            return texts["text"] @ videos["video"].t()
'''


def test_a_head_file_dropped_into_the_package_is_checked_by_this_contract(tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(REPO / "avr", copy / "avr",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "avr" / "fuse" / "heads" / "throwaway.py").write_text(
        textwrap.dedent(THROWAWAY_HEAD))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "throwaway",
         __file__],
        cwd=copy, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(copy)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "10 passed" in done.stdout, done.stdout[-2000:]
