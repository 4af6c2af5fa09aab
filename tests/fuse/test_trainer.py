"""The trainer: learning, determinism, checkpoints, resume, refusals, sweeps."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from avr.errors import AvrError, CacheMismatchError, RunError
from avr.fuse import checkpoint, schedule, trainer
from avr.fuse.config import SCRATCH_LR, SCRATCH_TEMPERATURE, split_options
from avr.fuse.sampling import draw_pairs
from avr.fuse.trainer import TrainConfig
from avr.store.splits import load_split
from support.stores import make_learnable_store

FAST = dict(head="meanp", epochs=6, batch_size=16, lr=3e-3, warmup=0.0)


@pytest.fixture
def store(tmp_path, tiny_spec) -> Path:
    return make_learnable_store(tmp_path / "cache", tiny_spec, failed=(3,))


def history(result):
    return [(h.epoch, round(h.loss, 5), h.val_r1) for h in result.history]


def test_training_beats_chance_by_a_wide_margin(store, tmp_path):
    result = trainer.train(store, TrainConfig(**FAST), tmp_path / "run")
    chance = 100.0 / 12
    assert result.best_val_r1 > 4 * chance


def test_run_directory_holds_config_checkpoints_and_logs(store, tmp_path):
    run = tmp_path / "run"
    trainer.train(store, TrainConfig(**{**FAST, "epochs": 2}), run)
    config = json.loads((run / "config.json").read_text())
    assert config["head"] == "meanp"
    assert config["cache"]["identity"]["fingerprint"]
    assert (run / "best.safetensors").exists() and (run / "last.safetensors").exists()
    assert len((run / "log.csv").read_text().splitlines()) == 3
    assert list(run.glob("events.out.tfevents.*"))


def test_same_seed_gives_same_metrics_on_cpu(store, tmp_path):
    first = trainer.train(store, TrainConfig(**FAST), tmp_path / "a")
    second = trainer.train(store, TrainConfig(**FAST), tmp_path / "b")
    assert history(first) == history(second)


def test_interrupted_run_resumes_to_the_same_result(store, tmp_path):
    straight = trainer.train(store, TrainConfig(**FAST), tmp_path / "straight")

    class Stop(Exception):
        pass

    def stop_after_three(epoch, log):
        if log.epoch == 3:
            raise Stop

    with pytest.raises(Stop):
        trainer.train(store, TrainConfig(**FAST), tmp_path / "cut", on_epoch=stop_after_three)
    resumed = trainer.resume(tmp_path / "cut")
    assert history(resumed) == history(straight)
    best_straight = checkpoint.load_head(tmp_path / "straight")[0].state_dict()
    best_resumed = checkpoint.load_head(tmp_path / "cut")[0].state_dict()
    assert all(torch.equal(best_straight[k], best_resumed[k]) for k in best_straight)


def test_resume_refuses_a_cache_with_other_backbones(store, tmp_path, tiny_spec):
    run = tmp_path / "run"
    trainer.train(store, TrainConfig(**{**FAST, "epochs": 1}), run)
    other_spec = dataclasses.replace(tiny_spec, backbones={
        **tiny_spec.backbones, "clip": dataclasses.replace(tiny_spec.backbones["clip"],
                                                           weights="random:7")})
    other = make_learnable_store(tmp_path / "other", other_spec)
    with pytest.raises(CacheMismatchError, match="backbone clip weights"):
        trainer.resume(run, {"epochs": 2}, cache_path=other)


def test_a_run_directory_is_never_overwritten(store, tmp_path):
    trainer.train(store, TrainConfig(**{**FAST, "epochs": 1}), tmp_path / "run")
    with pytest.raises(RunError, match="already holds a run"):
        trainer.train(store, TrainConfig(**{**FAST, "epochs": 1}), tmp_path / "run")


def test_one_caption_per_video_per_epoch(store):
    data = load_split(store, "train", (), ())
    videos, captions = draw_pairs(data.caption_video, "one", torch.Generator().manual_seed(0))
    assert sorted(videos.tolist()) == list(range(data.num_videos))
    assert torch.equal(data.caption_video[captions], videos)


def test_all_pairs_visits_every_caption_of_usable_videos(store):
    data = load_split(store, "train", (), ())
    _, captions = draw_pairs(data.caption_video, "all", torch.Generator().manual_seed(0))
    usable = int((data.caption_video >= 0).sum())
    assert sorted(captions.tolist()) == sorted(np.flatnonzero(data.caption_video >= 0).tolist())
    assert len(captions) == usable < data.num_captions  # the failed video's captions are skipped


def test_unknown_options_are_refused_with_the_choices():
    with pytest.raises(AvrError, match="unknown option 'lrr'"):
        split_options({"lrr": 1.0}, "meanp")


def pretrained_spec(tiny_spec):
    clip = dataclasses.replace(tiny_spec.backbones["clip"], weights="openai")
    return dataclasses.replace(tiny_spec, backbones={**tiny_spec.backbones, "clip": clip})


@pytest.mark.parametrize("videos", [25_991, 7_010])  # VATEX's and MSR-VTT 7k's train splits
def test_a_dataset_sized_split_trains_on_the_recipe(tiny_spec, videos):
    spec = dataclasses.replace(pretrained_spec(tiny_spec), dataset="msrvtt", num_frames=12)
    config, note = schedule.resolve_schedule(TrainConfig(head="meanp"), spec, videos,
                                            10 * videos)
    assert (config.epochs, config.batch_size, config.lr) == (5, 128, 1e-4) and note is None


def test_a_small_split_gets_a_batch_that_fits_and_enough_steps(tiny_spec):
    spec = dataclasses.replace(pretrained_spec(tiny_spec), dataset="msrvtt", num_frames=12)
    config, note = schedule.resolve_schedule(TrainConfig(head="meanp"), spec, 56, 112)
    # 16 is 128 halved until 56 videos make 4 batches; every caption: 7 steps an epoch -> 36.
    assert (config.batch_size, config.epochs, config.lr) == (16, 36, 1e-4)
    assert note.startswith("small train split (56 videos): batch 16, 36 epochs instead of "
                           "128 / 5")
    one_caption, _ = schedule.resolve_schedule(TrainConfig(head="meanp", pairs="one"), spec,
                                               56, 112)
    assert (one_caption.batch_size, one_caption.epochs) == (16, 63)  # 4 steps an epoch


def test_random_backbones_learn_at_a_larger_rate(tiny_spec):
    config, note = schedule.resolve_schedule(TrainConfig(head="meanp"), tiny_spec, 25_991,
                                            259_910)
    assert (config.epochs, config.batch_size, config.lr) == (5, 128, SCRATCH_LR)
    assert "; lr 0.003 instead of 0.0001, because the store's CLIP is random" in note


def test_random_backbones_start_a_learned_scale_where_clip_starts_from_scratch(tiny_spec):
    config, note = schedule.resolve_schedule(TrainConfig(head="xpool"), tiny_spec, 56, 112)
    assert config.head_options["temperature"] == SCRATCH_TEMPERATURE
    assert "; temperature 0.07 instead of 0.01: a learned logit scale trained from scratch" in note
    pretrained, _ = schedule.resolve_schedule(TrainConfig(head="xpool"),
                                             pretrained_spec(tiny_spec), 56, 112)
    assert "temperature" not in pretrained.head_options  # fine-tuning CLIP starts from 100


@pytest.mark.parametrize("head, options", [("gais", {}),  # its fixed scale is its method
                                           ("avigate", {}),  # its margins are tuned for 100
                                           ("meanp", {"learn_temperature": False}),
                                           ("meanp", {"temperature": 0.02})])
def test_a_fixed_or_given_scale_is_not_replaced(tiny_spec, head, options):
    given = TrainConfig(head=head, head_options=options, epochs=2, batch_size=8, lr=1e-4)
    config, note = schedule.resolve_schedule(given, tiny_spec, 56, 112)
    assert config.head_options.get("temperature") == options.get("temperature")
    assert "temperature" not in note


def test_the_schedule_never_changes_what_the_user_set(tiny_spec):
    given = TrainConfig(epochs=2, batch_size=8, lr=1e-4, scale_lr=1e-3, betas=(0.8, 0.9),
                        eps=1e-8, no_decay="bias", lr_schedule="cosine",
                        head_options={"temperature": 0.05, "frames": 3, "dropout": 0.1})
    config, _ = schedule.resolve_schedule(given, tiny_spec, 56, 112)
    assert config == given
    config, note = schedule.resolve_schedule(TrainConfig(batch_size=32), tiny_spec, 56, 112)
    assert (config.batch_size, config.epochs) == (32, 63)  # 4 steps of every caption
    assert "small train split (56 videos): 63 epochs instead of 5, so that the run has at " \
           "least 250 optimizer steps; lr 0.003" in note


def test_the_schedule_batch_is_a_multiple_of_the_shards():
    assert schedule.schedule_batch_size(56, shards=2) == 16
    assert schedule.schedule_batch_size(56, shards=3) == 15
    assert schedule.schedule_batch_size(3) == 2
    assert schedule.schedule_batch_size(56, batch=12) == 12  # TEFAL's
    assert schedule.schedule_batch_size(30, batch=12) == 6


def test_the_run_records_the_resolved_schedule(store, tmp_path):
    trainer.train(store, TrainConfig(head="meanp", epochs=2), tmp_path / "run")
    saved = json.loads((tmp_path / "run" / checkpoint.CONFIG_FILE).read_text())
    videos = len(load_split(store, "train", (), ()).video_ids)
    assert saved["train"]["batch_size"] == schedule.schedule_batch_size(videos)
    assert saved["train"]["epochs"] == 2 and saved["train"]["lr"] == SCRATCH_LR
    assert f"; small train split ({videos} videos): batch " in saved["schedule"]
