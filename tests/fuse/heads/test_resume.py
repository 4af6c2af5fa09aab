"""Every head checkpoints and resumes: an interrupted run continues to the same result as an
uninterrupted one (weights, optimizer, schedule and random state all come back)."""

from __future__ import annotations

import pytest
import torch

from avr.fuse import checkpoint, trainer
from avr.fuse.heads import HEADS
from avr.fuse.trainer import TrainConfig
from support.specs import make_tiny_spec
from support.stores import make_learnable_store

# Small settings so that each head runs in a few seconds on 2 CPU cores.
OPTIONS = {"avigate": dict(resampler_layers=1, fusion_layers=1, num_heads=4),
           "htav": dict(width=32)}
HEAD_NAMES = ("meanp", "xpool", "tefal", "avigate", "gais", "htav")


class Stop(Exception):
    pass


def stop_after_two(epoch, log):
    if log.epoch == 2:
        raise Stop


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_learnable_store(tmp_path_factory.mktemp("resume") / "cache", make_tiny_spec(),
                                n_train=32, n_val=8, n_test=8)


def test_every_head_is_registered_on_import():
    assert set(HEAD_NAMES) <= set(HEADS)


@pytest.mark.parametrize("head", HEAD_NAMES)
def test_interrupted_head_resumes_to_the_same_weights(store, tmp_path, head):
    config = TrainConfig(head=head, head_options=OPTIONS.get(head, {}), epochs=3, batch_size=8,
                         lr=3e-3, warmup=0.0, device="cpu")
    straight = trainer.train(store, config, tmp_path / "straight")
    with pytest.raises(Stop):
        trainer.train(store, config, tmp_path / "cut", on_epoch=stop_after_two)
    resumed = trainer.resume(tmp_path / "cut")
    assert [h.loss for h in resumed.history] == [h.loss for h in straight.history]
    for which in ("best", "last"):
        a = checkpoint.load_head(tmp_path / "straight", which)[0].state_dict()
        b = checkpoint.load_head(tmp_path / "cut", which)[0].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), which
