"""Stores and run folders written by an earlier avr (tests/fixtures/d2e6057/) still open, verify,
evaluate to the same numbers and resume, through the console script."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from support.console import run_avr
from support.paths import FIXTURES

FIXTURE = FIXTURES / "d2e6057"


@pytest.fixture()
def old(tmp_path) -> Path:
    """A copy of the fixture (runs write into their folders)."""
    shutil.copytree(FIXTURE, tmp_path / "old")
    return tmp_path / "old"


def test_an_earlier_store_reports_its_rows_and_verifies_clean(old):
    info = run_avr("cache", "info", old / "store", "--json")
    assert info.returncode == 0, info.stderr
    summary = json.loads(info.stdout)
    assert summary["videos"]["done"] == 24 and summary["captions"]["done"] == 48
    assert summary["videos"]["per_split"] == {"train": 16, "val": 4, "test": 4}
    verify = run_avr("cache", "verify", old / "store", "--json")
    assert verify.returncode == 0, verify.stderr
    assert json.loads(verify.stdout)["clean"]


def test_an_earlier_run_evaluates_to_the_numbers_it_gave_then(old):
    out = old / "metrics.json"
    done = run_avr("eval", "--run", old / "runs" / "tefal", "--cache", old / "store",
                   "--device", "cpu", "--json", out)
    assert done.returncode == 0, done.stderr
    metrics = json.loads(out.read_text())
    assert metrics["t2v"]["R1"] == pytest.approx(75.0)
    assert metrics["t2v"]["R5"] == pytest.approx(100.0)
    assert metrics["v2t"]["R1"] == pytest.approx(75.0)


def test_an_earlier_run_resumes_from_its_last_checkpoint(old):
    run = old / "runs" / "xpool"
    done = run_avr("train", "--resume", run, "--cache", old / "store", "--epochs", "3",
                   "--device", "cpu")
    assert done.returncode == 0, done.stderr
    epochs = [line.split(",")[0] for line in (run / "log.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2", "3"]


def test_avigate_on_an_earlier_store_says_it_averages_the_post_norm_audio_tokens(old):
    done = run_avr("train", "--cache", old / "store", "--head", "avigate", "--dry-run",
                   cwd=old)
    assert done.returncode == 0, done.stderr
    schedule = done.stdout.splitlines()[1]
    assert "avigate: the store has no audio_pooled_token (written before avr stored it), so the " \
           "global audio token is the mean of AST's post-norm CLS and distillation tokens" \
           in schedule
