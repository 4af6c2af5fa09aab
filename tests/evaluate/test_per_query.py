"""`avr eval --per-query FILE` and the named rows and columns of `--save-similarity`."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from avr.evaluate import metrics
from avr.fuse import trainer
from avr.fuse.trainer import TrainConfig
from support.console import assert_usage_error, ok, run_avr
from support.specs import make_tiny_spec
from support.stores import make_learnable_store

FAST = dict(epochs=3, batch_size=16, lr=1e-2, warmup=0.0, device="cpu",
            head_options={"temperature": 0.05})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("per-query")
    store = make_learnable_store(root / "cache", make_tiny_spec(), n_train=32, n_val=8,
                                 n_test=10, failed=(45,))
    for head in ("xpool", "tefal"):
        trainer.train(store, TrainConfig(head=head, **FAST), root / "runs" / head)
    return root / "runs"


def read_csv(path):
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def tefal_outputs(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("tefal-out")
    ok(run_avr("eval", "--run", runs / "tefal", "--device", "cpu", "--per-query",
               out / "q.csv", "--per-query-k", "3", "--save-similarity", out / "sim.npz"))
    return read_csv(out / "q.csv"), np.load(out / "sim.npz")


def test_per_query_csv_has_a_row_per_caption_with_its_rank_and_top_videos(tefal_outputs):
    rows, saved = tefal_outputs
    sim, caption_video = saved["sim"], saved["caption_video"]
    assert len(rows) == sim.shape[0] == 20  # 10 test videos x 2 captions, one video failed
    ranks = metrics.t2v_ranks(sim, caption_video)
    assert [int(r["rank"]) for r in rows] == ranks.astype(int).tolist()
    for row, scores in zip(rows, sim):
        best = np.argsort(-scores, kind="stable")[:3]
        assert [row[f"top{i}_video"] for i in (1, 2, 3)] == saved["video_id"][best].tolist()
        assert float(row["top1_score"]) == pytest.approx(scores[best[0]], abs=1e-5)
        assert "top4_video" not in row


def test_a_caption_whose_video_failed_names_it_and_ranks_last(tefal_outputs):
    rows, saved = tefal_outputs
    failed = [r for r in rows if r["video"] == "video0045"]
    assert len(failed) == 2
    assert all(int(r["rank"]) == saved["sim"].shape[1] + 1 and r["score"] == "" for r in failed)


def test_an_audio_heads_rows_say_what_audio_and_frames_contributed(tefal_outputs):
    rows, _ = tefal_outputs
    row = rows[0]
    for column in ("visual_score", "visual_rank", "audio_score", "audio_rank", "top_frame"):
        assert row[column] != "", column
    # Audio left out changes some scores of a head that reads it.
    assert any(float(r["visual_score"]) != pytest.approx(float(r["score"]))
               for r in rows if r["score"])


def test_similarity_file_names_its_rows_and_columns(tefal_outputs, runs):
    rows, saved = tefal_outputs
    assert saved["video_id"].shape == (saved["sim"].shape[1],)
    assert saved["caption_text"].tolist() == [r["caption"] for r in rows]
    assert saved["caption_row"].tolist() == [int(r["caption_row"]) for r in rows]
    assert all(text.startswith("caption ") for text in saved["caption_text"])
    present = saved["caption_video"] >= 0
    assert [saved["video_id"][v] for v in saved["caption_video"][present]] == \
        [r["video"] for r, p in zip(rows, present) if p]


def test_per_query_parquet_holds_the_csv_columns(runs, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    ok(run_avr("eval", "--run", runs / "xpool", "--device", "cpu", "--per-query",
               tmp_path / "q.parquet"))
    table = pq.read_table(tmp_path / "q.parquet").to_pydict()
    assert len(table["caption"]) == 20
    assert "top9_video" in table and "top10_video" not in table  # 9 videos extracted of 10
    assert "visual_rank" not in table  # X-Pool reads no audio: nothing to leave out
    assert all(isinstance(f, int) for f in table["top_frame"] if f is not None)


def test_a_per_query_file_of_another_format_is_refused_before_any_work(runs, tmp_path):
    done = run_avr("eval", "--run", runs / "xpool", "--device", "cpu", "--per-query",
                   tmp_path / "q.xlsx")
    assert_usage_error(done, "expected a .csv or .parquet file")
