"""`avr eval` and `avr search` on a trained run: metrics, variants, refusals, outputs, report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from avr.cli import main
from avr.errors import AvrError, CacheMismatchError, RunError
from avr.evaluate import metrics
from avr.evaluate.evaluator import EvalConfig, evaluate_run
from avr.evaluate.search import search
from avr.fuse import checkpoint, trainer
from avr.fuse.trainer import TrainConfig
from avr.store import schema
from support.specs import make_tiny_spec
from support.stores import make_learnable_store
from support.paths import REPO

# The store's features are random, not CLIP's: a logit scale starting at 20 rather than
# CLIP's 100 learns them in a few epochs.
FAST = dict(epochs=6, batch_size=16, lr=1e-2, warmup=0.0, device="cpu",
            head_options={"temperature": 0.05})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "cache"
    return make_learnable_store(path, make_tiny_spec(), failed=(70,))  # a test video failed


@pytest.fixture(scope="module")
def runs(store, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for head in ("meanp", "tefal"):
        trainer.train(store, TrainConfig(head=head, **FAST), root / head)
    return root


def run_cli(*args) -> int:
    try:
        main(list(map(str, args)))
    except SystemExit as done:
        return done.code or 0
    return 0


def test_trained_head_beats_chance_on_test(runs):
    result = evaluate_run(runs / "meanp", config=EvalConfig(device="cpu"))
    chance = 100.0 / result.num_videos
    assert result.metrics["t2v"]["R1"] > 4 * chance
    assert result.num_videos == 11 and result.missing_videos == ["video0070"]
    assert result.metrics["t2v"]["failed"] == 2  # both captions of the failed video


def test_saved_similarity_reproduces_the_metrics(runs, tmp_path):
    out = tmp_path / "sim.npz"
    assert run_cli("eval", "--run", runs / "meanp", "--device", "cpu", "--save-similarity", out,
                   "--json", tmp_path / "m.json") == 0
    saved = np.load(out)
    assert saved["sim"].dtype == np.float32
    assert saved["sim"].shape == (len(saved["caption_video"]), 11)
    printed = json.loads((tmp_path / "m.json").read_text())
    again = metrics.retrieval_metrics(saved["sim"], saved["caption_video"], 12)
    for direction in ("t2v", "v2t"):
        for key in ("R1", "R5", "R10", "MdR", "MnR"):
            assert printed[direction][key] == pytest.approx(again[direction][key])


def test_eval_alone_uses_the_latest_run(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(runs / "meanp", tmp_path / "runs" / "only")
    assert run_cli("eval", "--device", "cpu") == 0
    assert "meanp" in capsys.readouterr().out
    assert (tmp_path / "runs" / "only" / "metrics.json").exists()


def test_variants_are_reported_beside_the_plain_numbers(runs):
    result = evaluate_run(runs / "tefal", config=EvalConfig(
        device="cpu", dsl=True, qbnorm=True, rerank_k=5))
    plain = evaluate_run(runs / "tefal", config=EvalConfig(device="cpu"))
    assert result.metrics == plain.metrics  # the tricks never change the plain numbers
    assert set(result.variants) == {"dsl", "qbnorm", "dsl+qbnorm", "rerank@5"}
    for variant in result.variants.values():
        assert 0.0 <= variant["t2v"]["R1"] <= 100.0


def test_dsl_and_qbnorm_together_report_tefals_combined_variant(runs, store):
    """Dual softmax, then QB-Norm on its reweighted cosines, the query bank reweighted alike."""
    from avr.evaluate.evaluator import open_run, train_bank_similarity
    from avr.evaluate.score import score_split
    from avr.store.splits import load_split

    config = EvalConfig(device="cpu", dsl=True, qbnorm=True)
    result = evaluate_run(runs / "tefal", config=config)
    cpu = torch.device("cpu")
    head, _, _ = open_run(runs / "tefal", None, cpu)
    test = load_split(store, "test", head.video_inputs, head.caption_inputs)
    videos = score_split(head, test.videos, test.captions, cpu).videos
    bank = train_bank_similarity(head, store, videos, test.videos, cpu, config)
    scale, temperature = result.dsl["logit_scale"], result.dsl["temperature"]
    dsl_test = metrics.dual_softmax(result.sim * scale, temperature) / scale
    dsl_bank = metrics.dual_softmax(bank * scale, temperature) / scale
    combined = metrics.qb_norm(dsl_test, dsl_bank)
    assert result.variants["dsl+qbnorm"]["t2v"] == metrics.metrics_from_ranks(
        metrics.t2v_ranks(combined, result.caption_video))


def test_dual_softmax_runs_on_the_heads_own_logit_scale(runs):
    result = evaluate_run(runs / "tefal", config=EvalConfig(device="cpu", dsl=True))
    head, _ = checkpoint.load_head(runs / "tefal", "best", "cpu")
    scale = float(head.logit_scale.detach().exp())
    assert result.dsl == {"temperature": metrics.DSL_TEMPERATURE,
                          "logit_scale": pytest.approx(scale)}
    assert result.variants["dsl"] == metrics.dual_softmax_metrics(
        result.sim * scale, result.caption_video, 12, temperature=3.0)


def test_a_heads_release_scale_and_temperature_replace_its_own_for_dual_softmax(runs,
                                                                              monkeypatch):
    from avr.fuse.heads.tefal import Tefal

    monkeypatch.setattr(Tefal, "dsl_logit_scale", 100.0)
    monkeypatch.setattr(Tefal, "dsl_temperature", 1.0)
    result = evaluate_run(runs / "tefal", config=EvalConfig(device="cpu", dsl=True))
    assert result.dsl == {"temperature": 1.0, "logit_scale": 100.0}
    assert result.variants["dsl"] == metrics.dual_softmax_metrics(
        result.sim * 100.0, result.caption_video, 12, temperature=1.0)
    chosen = evaluate_run(runs / "tefal", config=EvalConfig(device="cpu", dsl=True,
                                                           dsl_temperature=5.0))
    assert chosen.dsl == {"temperature": 5.0, "logit_scale": 100.0}


def avr_command(*args, cwd=None) -> subprocess.CompletedProcess:
    """``avr ARGS`` in a subprocess, running this checkout's code."""
    return subprocess.run([sys.executable, "-m", "avr", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_dsl_temperature_flag_reports_dual_softmax_and_records_it(runs, tmp_path):
    out = tmp_path / "m.json"
    done = avr_command("eval", "--run", runs / "tefal", "--device", "cpu",
                       "--dsl-temperature", "1", "--json", out)
    assert done.returncode == 0, done.stderr
    printed = json.loads(out.read_text())
    assert printed["dsl"]["temperature"] == 1.0
    assert set(printed["variants"]["dsl"]) == {"t2v", "v2t"}
    assert "t2v dsl" in done.stdout and "v2t dsl" in done.stdout


def test_a_non_positive_dsl_temperature_is_a_usage_error(runs):
    done = avr_command("eval", "--run", runs / "tefal", "--device", "cpu",
                       "--dsl-temperature", "0")
    assert done.returncode == 2
    assert "--dsl-temperature must be positive" in done.stderr
    assert "Traceback" not in done.stderr


def test_rerank_with_k_covering_every_video_equals_the_plain_ranking(runs):
    result = evaluate_run(runs / "tefal", config=EvalConfig(device="cpu", rerank_k=11))
    assert result.variants["rerank@11"]["t2v"] == {
        k: v for k, v in result.metrics["t2v"].items() if k not in ("queries", "failed")}


def test_masking_audio_changes_an_audio_head(runs):
    both = evaluate_run(runs / "tefal", config=EvalConfig(device="cpu"))
    video_only = evaluate_run(runs / "tefal", config=EvalConfig(device="cpu", modalities="v"))
    assert not np.allclose(both.sim, video_only.sim)


def test_masking_audio_of_a_video_only_head_is_refused(runs):
    with pytest.raises(AvrError, match="reads no audio"):
        evaluate_run(runs / "meanp", config=EvalConfig(device="cpu", modalities="v"))


def test_a_cache_with_other_backbones_is_refused(runs, tmp_path):
    other = make_learnable_store(tmp_path / "other", make_tiny_spec(num_frames=4))
    with pytest.raises(CacheMismatchError, match="num_frames"):
        evaluate_run(runs / "meanp", other, EvalConfig(device="cpu"))


def test_weights_of_another_head_are_refused(runs, tmp_path):
    run = tmp_path / "swapped"
    shutil.copytree(runs / "meanp", run)
    shutil.copy(runs / "tefal" / checkpoint.BEST_FILE, run / checkpoint.BEST_FILE)
    with pytest.raises(RunError, match="tefal"):
        evaluate_run(run, config=EvalConfig(device="cpu"))


def test_report_renders_plots(runs, tmp_path):
    result = evaluate_run(runs / "tefal", config=EvalConfig(device="cpu", report=tmp_path / "r"))
    text = result.report.read_text()
    for png in ("recall_at_k.png", "frame_attention.png", "audio_attention.png"):
        assert f"({png})" in text
        image = np.asarray(Image.open(tmp_path / "r" / png).convert("L"), dtype=float)
        assert image.shape[0] > 100 and image.std() > 10  # drawn, not blank


def test_search_ranks_videos_for_a_typed_query(runs):
    hits = search("caption 3 of video 1", runs / "meanp", k=5, split="all", device="cpu")
    assert len(hits) == 5
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert all(h.split in schema.SPLITS and h.captions for h in hits)


def test_search_json_output(runs, capsys):
    assert run_cli("search", "a red square", "--run", runs / "meanp", "--k", "3", "--device",
                   "cpu", "--json") == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and {"video_id", "split", "score", "captions"} <= set(hits[0])
