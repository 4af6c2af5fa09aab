"""The plots of `avr eval --report`: values as values, labels whole, thumbnails under frames."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from avr.evaluate.evaluator import EvalConfig, evaluate_run
from avr.evaluate.report import caption_tokens
from avr.fuse import trainer
from avr.fuse.trainer import TrainConfig
from avr.store.group import open_store


@pytest.fixture(scope="module")
def htav_report(demo_runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("htav")
    trainer.train(demo_runs["cache"], TrainConfig(head="htav", epochs=1, batch_size=8,
                                                  device="cpu", head_options={"width": 16}),
                  root / "htav")
    result = evaluate_run(root / "htav", config=EvalConfig(device="cpu", report=root / "report"))
    return result.report


def test_htavs_threshold_is_written_as_a_value_not_drawn(htav_report):
    text = htav_report.read_text()
    assert "learned audio threshold theta = " in text
    assert not (htav_report.parent / "threshold.png").exists()


def test_the_alignment_rows_are_the_captions_tokens(demo_runs):
    _, spec = open_store(demo_runs["cache"])
    tokens = caption_tokens(spec, "A red circle moves, while a drum beats!", 12)
    assert tokens == ["<s>", "a", "red", "circle", "moves", "while", "a", "drum", "beats", "</s>"]
    assert len(caption_tokens(spec, " ".join(["word"] * 40), 12)) == 12


def test_frame_attention_is_drawn_over_the_videos_thumbnails(htav_report):
    image = np.asarray(Image.open(htav_report.parent / "frame_attention.png").convert("RGB"))
    # The demo's clips are dark frames with coloured shapes: thumbnails bring near-black
    # pixels that bars, axes and text on white do not.
    assert (image.max(axis=2) < 40).mean() > 0.01
    alignment = Image.open(htav_report.parent / "dtw_alignment.png")
    assert alignment.height > 150
