"""`avr report RUN [--against RUN_B] --out DIR`: the static page and what it links to."""

from __future__ import annotations

import re
import shutil

import numpy as np
from PIL import Image

from support.console import assert_one_line_error, ok, run_avr
from support.specs import make_tiny_spec
from support.stores import make_learnable_store


def linked(page: str, kind: str) -> list[str]:
    return re.findall(rf'<img class="{kind}" src="([^"]+)"', page)


def test_report_shows_the_worst_failures_with_thumbnails_and_explanations(demo_runs, tmp_path):
    out = tmp_path / "report"
    ok(run_avr("report", demo_runs["tefal"], "--out", out, "--device", "cpu", "--failures", "3"))
    page = (out / "index.html").read_text(encoding="utf-8")
    assert page.count('<article class="card failure">') == 3
    ranks = [int(r) for r in re.findall(r"rank <b>(\d+)</b>", page)]
    assert ranks == sorted(ranks, reverse=True) and ranks[0] > 1  # worst first
    thumbs = linked(page, "thumb")
    assert thumbs and all((out / t).read_bytes()[:2] == b"\xff\xd8" for t in thumbs)
    plots = linked(page, "plot")
    assert "recall_at_k.png" in plots and len(plots) == 4
    for plot in plots:
        pixels = np.asarray(Image.open(out / plot).convert("L"), dtype=float)
        assert pixels.std() > 10  # drawn, not blank
    assert 'id="metrics"' in page and 'id="tags"' in page and "audio_only" in page


def test_report_against_another_run_shows_where_each_ranks_higher(demo_runs, tmp_path):
    out = tmp_path / "report"
    ok(run_avr("report", demo_runs["tefal"], "--against", demo_runs["xpool"], "--out", out,
               "--device", "cpu", "--failures", "1", "--moved", "2"))
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "Where tefal beats xpool" in page and "Where xpool beats tefal" in page
    moved = re.findall(r"ranks its video <b>(\d+)</b>, \w+ <b>(\d+)</b>", page)
    assert moved and all(int(a) < int(b) for a, b in moved)


def test_a_store_without_thumbnails_gets_placeholders(demo_runs, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(demo_runs["cache"], cache)
    for name in ("thumbnails", "video_path"):
        shutil.rmtree(cache / name)
    out = tmp_path / "report"
    ok(run_avr("report", demo_runs["xpool"], "--out", out, "--device", "cpu", "--failures", "2",
               "--split", "test"))
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "no thumbnail" not in page  # the run's own store still has them
    run = tmp_path / "run"
    shutil.copytree(demo_runs["xpool"], run)
    config = (run / "config.json").read_text().replace(str(demo_runs["cache"]), str(cache))
    (run / "config.json").write_text(config)
    ok(run_avr("report", run, "--out", out, "--device", "cpu", "--failures", "2"))
    page = (out / "index.html").read_text(encoding="utf-8")
    assert 'class="thumb placeholder"' in page and not linked(page, "thumb")


def test_runs_of_different_stores_are_refused(demo_runs, tmp_path):
    from avr.fuse import trainer
    from avr.fuse.trainer import TrainConfig

    store = make_learnable_store(tmp_path / "other", make_tiny_spec(), n_train=16, n_val=4,
                                 n_test=4)
    trainer.train(store, TrainConfig(head="xpool", epochs=1, batch_size=8, device="cpu"),
                  tmp_path / "other-run")
    assert_one_line_error(run_avr("report", demo_runs["xpool"], "--against",
                                  tmp_path / "other-run", "--out", tmp_path / "r", "--device",
                                  "cpu"), "--against", "other captions or videos")
