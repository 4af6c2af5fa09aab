"""The logit scale every head shares (base.py): CLIP's 100 learned and clamped after each step,
as the released code of CLIP4Clip, X-Pool and AVIGATE does."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from avr.errors import AvrError
from avr.fuse import checkpoint, trainer
from avr.fuse.heads import build_head, make_config
from avr.fuse.trainer import TrainConfig
from support.head_inputs import random_rows
from support.stores import make_learnable_store

HEAD_NAMES = ("meanp", "xpool", "tefal", "avigate", "gais", "htav")
FLOAT32_LN_100 = float(torch.tensor(math.log(100.0), dtype=torch.float32))


@pytest.mark.parametrize("head", ("meanp", "xpool", "tefal"))
def test_clip4clip_xpool_and_tefal_start_from_clips_scale_and_learn_it(tiny_spec, head):
    model = build_head(head, tiny_spec)
    assert isinstance(model.logit_scale, torch.nn.Parameter)
    assert float(model.scale().detach()) == pytest.approx(100.0, rel=1e-6)


@pytest.mark.parametrize("head", HEAD_NAMES)
def test_every_head_starts_at_the_inverse_of_its_temperature(tiny_spec, head):
    model = build_head(head, tiny_spec)
    config = make_config(head)
    assert float(model.scale().detach()) == pytest.approx(1.0 / config.temperature, rel=1e-6)
    assert isinstance(model.logit_scale, torch.nn.Parameter) == config.learn_temperature


def reference_log_scale_gradient(cosines: np.ndarray, scale: float) -> float:
    """d/d(log s) of 0.5 [CE_rows(s S) + CE_cols(s S)] with positives on the diagonal, written
    out: s * 0.5 * (mean_i (E_row i[S] - S_ii) + mean_j (E_col j[S] - S_jj))."""
    logits = scale * cosines
    rows = np.exp(logits - logits.max(1, keepdims=True))
    rows /= rows.sum(1, keepdims=True)
    cols = np.exp(logits - logits.max(0, keepdims=True))
    cols /= cols.sum(0, keepdims=True)
    diagonal = np.diag(cosines)
    t2v = np.mean((rows * cosines).sum(1) - diagonal)
    v2t = np.mean((cols * cosines).sum(0) - diagonal)
    return scale * 0.5 * (t2v + v2t)


def test_a_learned_scale_at_the_clamp_gets_its_gradient(tiny_spec):
    # The releases use exp(logit_scale) unclamped in the loss: at the clamp the gradient flows.
    model = build_head("meanp", tiny_spec).double()
    videos = random_rows(tiny_spec, model.video_inputs, 6, seed=0)
    captions = random_rows(tiny_spec, model.caption_inputs, 6, seed=1)
    texts, states = model.encode_texts(captions), model.encode_videos(videos)
    loss, _ = model.loss(texts, states)
    loss.backward()
    cosines = model.score(texts, states).detach().numpy()
    expected = reference_log_scale_gradient(cosines, 100.0)
    assert expected != 0
    assert float(model.logit_scale.grad) == pytest.approx(expected, rel=1e-6)


def test_clamp_brings_a_learned_scale_back_to_100_and_leaves_a_fixed_one(tiny_spec):
    learned = build_head("meanp", tiny_spec)
    with torch.no_grad():
        learned.logit_scale.fill_(5.0)
    learned.clamp_logit_scale()
    assert float(learned.logit_scale.detach()) == FLOAT32_LN_100
    with torch.no_grad():
        learned.logit_scale.fill_(4.0)
    learned.clamp_logit_scale()
    assert float(learned.logit_scale.detach()) == 4.0
    fixed = build_head("meanp", tiny_spec, {"learn_temperature": False, "temperature": 0.005})
    fixed.clamp_logit_scale()
    assert float(fixed.scale().detach()) == pytest.approx(200.0, rel=1e-6)


@pytest.fixture
def store(tmp_path, tiny_spec):
    return make_learnable_store(tmp_path / "cache", tiny_spec)


def test_the_trainer_clamps_after_every_step_a_scale_pushed_past_100(store, tmp_path,
                                                                     monkeypatch):
    from avr.fuse.heads.meanp import MeanP

    def loss_wanting_a_larger_scale(self, texts, videos):
        anchor = sum(p.sum() for p in self.parameters()) * 0.0  # every parameter in the graph
        loss = anchor - self.logit_scale
        return loss, {"loss": loss.detach()}

    monkeypatch.setattr(MeanP, "loss", loss_wanting_a_larger_scale)
    # From CLIP's 100, which a store of random backbones would otherwise replace by 1 / 0.07.
    result = trainer.train(store, TrainConfig(head="meanp", epochs=2, batch_size=16, lr=1e-2,
                                              scale_lr=1e-2, warmup=0.0, device="cpu",
                                              head_options={"temperature": 0.01}),
                           tmp_path / "run")
    # Each AdamW step adds about lr = 0.01 to the log-scale; each clamp takes it back to ln 100.
    assert [h.temperature for h in result.history] == pytest.approx([0.01, 0.01], rel=1e-6)
    head, _ = checkpoint.load_head(tmp_path / "run", "last", "cpu")
    assert float(head.logit_scale.detach()) == FLOAT32_LN_100


def test_training_learns_the_scale_below_100(store, tmp_path):
    result = trainer.train(store, TrainConfig(head="meanp", epochs=3, batch_size=16, lr=1e-2,
                                              scale_lr=1e-2, warmup=0.0, device="cpu",
                                              head_options={"temperature": 0.01}),
                           tmp_path / "run")
    scales = [1.0 / h.temperature for h in result.history]
    assert all(scale <= 100.0 * (1 + 1e-6) for scale in scales)
    assert min(scales) < 99.0  # learned, not stuck at the clamp


@pytest.mark.parametrize("options, message", [
    ({"temperature": 0.005}, "above CLIP's clamp of 100"),
    ({"temperature": 0.0}, "temperature must be a positive"),
    ({"temperature": -1.0, "learn_temperature": False}, "temperature must be a positive"),
])
def test_bad_temperatures_are_refused_with_the_fix(tiny_spec, options, message):
    with pytest.raises(AvrError, match=message):
        build_head("xpool", tiny_spec, options)
