"""`avr search`: only the text towers load, many queries run in one process."""

from __future__ import annotations

import json

import pytest
import torch

from avr.errors import AvrError
from avr.evaluate.search import Searcher
from avr.extract import backbones
from avr.fuse import trainer
from avr.fuse.trainer import TrainConfig
from support.console import assert_one_line_error, assert_usage_error, ok, run_avr
from support.specs import make_tiny_spec
from support.stores import make_learnable_store

FAST = dict(epochs=2, batch_size=16, lr=1e-2, warmup=0.0, device="cpu",
            head_options={"temperature": 0.05})
QUERIES = ["caption 3 of video 1", "caption 80 of video 40", "a red square"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    store = make_learnable_store(root / "cache", make_tiny_spec(), n_train=32, n_val=8,
                                 n_test=8)
    trainer.train(store, TrainConfig(head="tefal", **FAST), root / "tefal")
    return root / "tefal"


def test_text_towers_encode_a_caption_as_the_full_backbones_do():
    texts = ["a dog barks while a red ball rolls", "silence"]
    full = backbones.load_backbones("tiny", seed=3).encode_text(texts)
    text_only = backbones.load_text_towers("tiny", roberta=True, seed=3).encode_text(texts)
    assert set(text_only) == set(full)
    for name, value in full.items():
        torch.testing.assert_close(text_only[name], value, rtol=0, atol=0)


def test_search_builds_neither_swin_nor_ast(run, monkeypatch):
    def refuse():
        raise AssertionError("an image or audio backbone was built to encode a query")

    monkeypatch.setattr(backbones, "tiny_swin", refuse)
    monkeypatch.setattr(backbones, "tiny_ast", refuse)
    monkeypatch.setattr(backbones, "load_backbones", refuse)
    searcher = Searcher(run, split="all", device="cpu")
    assert searcher.towers.roberta is None  # TEFAL reads no RoBERTa states
    assert len(searcher.search("caption 3 of video 1", 4)) == 4


def test_many_queries_answer_as_each_alone(run):
    searcher = Searcher(run, split="all", device="cpu")
    together = searcher.search_many(QUERIES, 5)
    for query, hits in zip(QUERIES, together):
        alone = searcher.search(query, 5)
        assert [h.video_id for h in hits] == [h.video_id for h in alone]
        assert [h.score for h in hits] == pytest.approx([h.score for h in alone], abs=1e-5)


def test_queries_file_is_answered_in_one_run(run, tmp_path):
    path = tmp_path / "queries.txt"
    path.write_text("\n".join(QUERIES[:2]) + "\n\n", encoding="utf-8")
    done = ok(run_avr("search", "--queries", path, "--run", run, "--k", "3", "--split", "all",
                      "--device", "cpu", "--json"))
    answers = json.loads(done.stdout)
    assert [a["query"] for a in answers] == QUERIES[:2]
    assert all(len(a["hits"]) == 3 for a in answers)
    single = json.loads(ok(run_avr("search", QUERIES[0], "--run", run, "--k", "3", "--split",
                                   "all", "--device", "cpu", "--json")).stdout)
    assert [h["video_id"] for h in single] == [h["video_id"] for h in answers[0]["hits"]]


def test_a_queries_file_without_a_query_is_one_error_line(run, tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("\n  \n", encoding="utf-8")
    assert_one_line_error(run_avr("search", "--queries", path, "--run", run, "--device", "cpu"),
                          str(path), "no query")


def test_a_query_and_a_queries_file_together_are_a_usage_error(run, tmp_path):
    path = tmp_path / "q.txt"
    path.write_text("a query\n", encoding="utf-8")
    assert_usage_error(run_avr("search", "a query", "--queries", path, "--run", run),
                       "QUERY or --queries")


def test_an_empty_query_is_refused(run):
    with pytest.raises(AvrError, match="empty"):
        Searcher(run, device="cpu").search("   ")
