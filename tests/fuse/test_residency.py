"""Residency: the plan a run prints and records, a train split streamed from the store when it
exceeds `--memory-budget`, int8 residency, and evaluation of a split beyond the budget.

Streamed and resident training draw their epochs in different orders (chunks and a shuffle
buffer against a shuffle of the whole split), so "trains to the same weights" is checked the
honest way: resident training fed the streamed run's own batch order (``epoch_order``, a
function of seed and epoch) must end with the streamed run's weights, which holds only if the
streamed reader delivers exactly the rows of each batch."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from avr.device import intra_op_threads
from avr.fuse import residency, trainer
from avr.fuse.config import saved_train_config
from avr.fuse.heads import head_class, video_inputs
from avr.store.chunks import ChunkDecoder
from avr.store.quantize import QuantizedTokens
from avr.store.splits import load_split
from support.console import run_avr
from support.console import assert_one_line_error, ok
from support.paths import REPO, SUPPORT

TINY = ("--shapes", "tiny")
# One caption per video an epoch: with every caption, a chunk's rows are the most of this tiny
# split, which leaves no budget between them and the whole split to stream it under.
TRAIN = ("--head", "tefal", "--epochs", "3", "--batch-size", "4", "--lr", "3e-3",
         "--device", "cpu", "--pairs", "one")
STREAM_BUDGET = "0.00025"  # GB: below the tiny store's train split, above a chunk and a batch


@pytest.fixture(scope="module", autouse=True)
def one_thread_everywhere():
    """Every avr process of this module and the in-process run on one intra-op thread: the CPU
    kernels' sums, hence the weights' last bits, depend on the thread count."""
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    with intra_op_threads(1):
        yield
    if before is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = before


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("residency") / "store"
    ok(run_avr("bench", "store", "--videos", "40", "--out", path, "--val-videos", "8",
               "--test-videos", "8", "--captions-per-video", "3", "--chunk-rows", "4",
               "--heads", "tefal", *TINY))
    return path


@pytest.fixture(scope="module")
def streamed_run(store, tmp_path_factory) -> tuple[Path, str]:
    run = tmp_path_factory.mktemp("runs") / "streamed"
    done = ok(run_avr("train", "--cache", store, *TRAIN, "--memory-budget", STREAM_BUDGET,
                      "--run-dir", run))
    return run, done.stdout


def residency_of(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())["residency"]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(run / "last.safetensors").items()
            if k.startswith("head.")}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def line_of(stdout: str, start: str) -> str:
    """The first line of ``stdout`` that starts with ``start`` ("" if none): a run on a store
    without a recipe of its own first says whose recipe it takes."""
    return next((line for line in stdout.splitlines() if line.startswith(start)), "")


def test_a_run_prints_and_records_its_plan_resident_when_it_fits(store, tmp_path):
    done = ok(run_avr("train", "--cache", store, *TRAIN, "--run-dir", tmp_path / "run"))
    assert line_of(done.stdout, "training tefal"), done.stdout
    assert line_of(done.stdout, "residency: train and val on the device (cpu)"), done.stdout
    plan = residency_of(tmp_path / "run")
    assert (plan["train"]["mode"], plan["val"]["mode"]) == ("device", "device")
    assert plan["stream"] is None and plan["resident"] == "fp16"
    assert plan["budget_source"].endswith("of available RAM")
    # the train split's bytes as held: every array tefal reads, of the 24 train videos
    assert plan["train"]["videos"] == 24 and plan["train"]["bytes"] > 0
    # resumed under a budget it no longer fits, it is refused rather than streamed in another
    # order
    done = run_avr("train", "--resume", tmp_path / "run", "--epochs", "4", "--memory-budget",
                   STREAM_BUDGET)
    assert_one_line_error(done, "trained with its train split resident", "--memory-budget")


def test_a_budget_below_the_train_split_streams_it_and_says_so(streamed_run):
    run, stdout = streamed_run
    line = line_of(stdout, "residency: train streamed from the store")
    assert line, stdout
    assert "--memory-budget" in line and "shuffle buffer" in line and "val (" in line
    assert "at a time, recomputed in backward" in line
    plan = residency_of(run)
    assert plan["train"]["mode"] == "streamed"
    assert plan["train"]["bytes"] > plan["budget_bytes"] >= plan["stream"]["held_bytes"]
    assert plan["stream"]["chunk_videos"] == 4
    assert plan["val"]["mode"] in ("device", "streamed")


def test_streamed_training_ends_with_the_weights_of_resident_training_fed_its_batches(
        store, streamed_run, tmp_path, monkeypatch):
    run, _ = streamed_run
    saved = json.loads((run / "config.json").read_text())
    config = saved_train_config(saved["train"])
    head = head_class("tefal")
    streamed = residency.StreamedSplit(store, video_inputs("tefal"), head.caption_inputs,
                                       "fp16", residency.StreamSettings(**saved["residency"]
                                                                        ["stream"]))

    def streamed_order(data, config, epoch, world, device):
        for videos, captions in streamed.epoch_order(config, epoch).batches:
            yield torch.from_numpy(videos), torch.from_numpy(captions), [len(videos)]

    monkeypatch.setattr(residency.resident, "epoch_batches", streamed_order)
    # the same steps: the budget's blocks of videos (recomputed in backward) on both sides
    assert saved["residency"]["step_videos"] > 0
    resident = dataclasses.replace(config, memory_budget=None,
                                   video_block=saved["residency"]["step_videos"])
    trainer.train(store, resident, tmp_path / "resident")
    assert residency_of(tmp_path / "resident")["train"]["mode"] == "device"
    assert_same_weights(run, tmp_path / "resident")


def same_held(a, b) -> bool:
    if isinstance(a, QuantizedTokens):
        return torch.equal(a.values, b.values) and torch.equal(a.scales, b.scales)
    return torch.equal(a, b)


@pytest.mark.parametrize("pairs,per_read,resident,decode", [
    ("one", 1, "fp16", "avr"), ("all", 1, "fp16", "avr"), ("one", 3, "fp16", "avr"),
    ("one", 1, "int8", "avr"), ("one", 3, "int8", "zarr"), ("all", 1, "fp16", "zarr")])
def test_a_streamed_epoch_reads_each_row_once_and_yields_the_rows_it_names(
        store, pairs, per_read, resident, decode, monkeypatch):
    """Rows come as the resident split holds them, decoded by ``avr.store.chunks`` or, where it cannot
    vouch for a chunk (here: none), read through zarr."""
    if decode == "zarr":
        monkeypatch.setattr(ChunkDecoder, "decode", lambda self, chunk, into=None: None)
    head = head_class("tefal")
    names = video_inputs("tefal")
    stream = residency.StreamSettings(4, 0, 2, buffer_pairs=6, held_bytes=0,
                                      chunks_per_read=per_read)
    split = residency.StreamedSplit(store, names, head.caption_inputs, resident, stream)
    resident = load_split(store, "train", names, head.caption_inputs, resident=resident)
    config = dataclasses.replace(trainer.TrainConfig(), batch_size=4, pairs=pairs, seed=3)
    order = split.epoch_order(config, epoch=1)
    assert sorted(order.chunks) == list(range(len(split.chunk_bounds)))
    captions = np.concatenate([c for _, c in order.batches])
    assert len(set(captions.tolist())) == len(captions)  # no pair twice
    videos = np.concatenate([v for v, _ in order.batches])
    if pairs == "one":
        assert sorted(videos.tolist()) == list(range(split.num_videos))
    assert order.ready == sorted(order.ready)
    reads = []
    real_read = split.read_chunks
    split.read_chunks = lambda chunks, *rows: reads.extend(chunks) or real_read(chunks, *rows)
    # each batch copied as it comes: its tensors are reused for the batch after the next
    batches = [({k: copy.deepcopy(v) for k, v in videos.items()},
                {k: copy.deepcopy(v) for k, v in captions.items()}, counts)
               for videos, captions, counts in split.batches(config, epoch=1)]
    assert sorted(reads) == sorted(order.chunks)  # every chunk read once
    assert len(batches) == len(order.batches)
    for (got_videos, got_captions, counts), (rows_v, rows_c) in zip(batches, order.batches):
        assert counts == [len(rows_v)]
        for name, value in resident.video_rows(torch.from_numpy(rows_v)).items():
            assert same_held(got_videos[name], value), name
        for name, value in resident.caption_rows(torch.from_numpy(rows_c)).items():
            assert same_held(got_captions[name], value), name
    # another epoch, another order; the same epoch, the same order
    assert split.epoch_order(config, 2).chunks != order.chunks or \
        [b[1].tolist() for b in split.epoch_order(config, 2).batches] != \
        [b[1].tolist() for b in order.batches]
    again = split.epoch_order(config, 1)
    assert [b[1].tolist() for b in again.batches] == [b[1].tolist() for b in order.batches]


def test_a_killed_streamed_run_resumes_to_the_weights_of_an_uninterrupted_one(
        store, streamed_run, tmp_path):
    run, _ = streamed_run
    killed = tmp_path / "killed"
    done = subprocess.run([sys.executable, str(SUPPORT / "kill_at_epoch.py"), "1", "train",
                           "--cache", str(store), *TRAIN, "--memory-budget", STREAM_BUDGET,
                           "--run-dir", str(killed)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode != 0  # SIGKILL after its first epoch
    assert len((killed / "log.csv").read_text().splitlines()) == 2  # header and epoch 1
    resumed = ok(run_avr("train", "--resume", killed, "--memory-budget", "0.01"))
    assert "train streamed" in resumed.stdout  # the run's order is kept
    assert residency_of(killed)["stream"] == residency_of(run)["stream"]
    assert_same_weights(run, killed)


def test_a_budget_that_cannot_hold_one_chunk_is_refused_in_one_line(store, tmp_path):
    done = run_avr("train", "--cache", store, *TRAIN, "--memory-budget", "0.00001",
                   "--run-dir", tmp_path / "run")
    assert_one_line_error(done, "--memory-budget 1e-05 GB cannot hold one chunk",
                          "give at least")
    assert not (tmp_path / "run").exists()


def test_int8_residency_trains_streamed_and_resident_and_evaluates(store, tmp_path):
    ok(run_avr("train", "--cache", store, *TRAIN, "--run-dir", tmp_path / "fp16"))
    done = ok(run_avr("train", "--cache", store, *TRAIN, "--resident", "int8",
                      "--run-dir", tmp_path / "int8"))
    assert "tokens int8" in line_of(done.stdout, "residency:")
    fp16, int8 = residency_of(tmp_path / "fp16"), residency_of(tmp_path / "int8")
    assert int8["resident"] == "int8"
    assert json.loads((tmp_path / "int8" / "config.json").read_text())["train"]["resident"] == \
        "int8"
    # tefal's tiny tokens are 24 wide: (24 + 2) / 48 of their bytes, and its masks as they were
    assert int8["train"]["bytes"] < 0.62 * fp16["train"]["bytes"]
    streamed = ok(run_avr("train", "--cache", store, *TRAIN, "--resident", "int8",
                          "--memory-budget", "0.00018", "--run-dir", tmp_path / "int8s"))
    assert "train streamed" in streamed.stdout and "tokens int8" in streamed.stdout
    for args in ((), ("--resident", "int8"), ("--memory-budget", "0.00001")):
        out = tmp_path / f"eval{len(args)}{args[-1] if args else ''}.json"
        ok(run_avr("eval", "--run", tmp_path / "int8s", "--device", "cpu", "--json", out,
                   *args))
        result = json.loads(out.read_text())
        assert 0 <= result["t2v"]["R1"] <= 100
    assert json.loads((tmp_path / "eval0.json").read_text())["residency"]["resident"] == "fp16"


def test_eval_of_a_split_beyond_the_budget_reads_it_in_batches_with_the_same_scores(
        streamed_run, tmp_path):
    run, _ = streamed_run
    whole, batched = tmp_path / "whole.json", tmp_path / "batched.json"
    ok(run_avr("eval", "--run", run, "--device", "cpu", "--json", whole))
    done = ok(run_avr("eval", "--run", run, "--device", "cpu", "--json", batched,
                      "--memory-budget", "0.00001"))
    assert "read from the store a batch of rows at a time" in done.stdout
    a, b = json.loads(whole.read_text()), json.loads(batched.read_text())
    assert (a["residency"]["tokens"], b["residency"]["tokens"]) == ("memory", "store")
    assert a["t2v"] == b["t2v"] and a["v2t"] == b["v2t"]


def test_a_sweep_takes_the_budget_as_an_option(store, tmp_path):
    ok(run_avr("sweep", "--cache", store, "--grid", "lr=3e-3", "--head", "tefal", "--epochs",
               "1", "--batch-size", "4", "--device", "cpu", "--name", "budget", "--opt",
               f"memory_budget={STREAM_BUDGET}", "--opt", "pairs=one", cwd=tmp_path))
    configs = list((tmp_path / "runs" / "sweeps" / "budget").rglob("config.json"))
    assert configs and all(json.loads(p.read_text())["residency"]["train"]["mode"] ==
                           "streamed" for p in configs)


def test_a_video_block_for_a_head_with_a_loss_of_its_own_is_refused_in_one_line(store, tmp_path):
    done = run_avr("train", "--cache", store, "--head", "gais", "--epochs", "1", "--device",
                   "cpu", "--opt", "video_block=2", "--run-dir", tmp_path / "run")
    assert_one_line_error(done, "video_block: gais's loss", "a block at a time")


def test_eval_within_a_tiny_budget_scores_as_with_room_qbnorm_included(streamed_run, tmp_path):
    run, _ = streamed_run
    results = []
    for args in ((), ("--memory-budget", "0.00001")):
        out = tmp_path / f"eval{len(args)}.json"
        ok(run_avr("eval", "--run", run, "--device", "cpu", "--qbnorm", "--json", out, *args))
        results.append(json.loads(out.read_text()))
    for key in ("t2v", "v2t"):
        assert results[1][key] == pytest.approx(results[0][key], abs=1e-6)
    assert results[1]["variants"]["qbnorm"]["t2v"] == pytest.approx(
        results[0]["variants"]["qbnorm"]["t2v"], abs=1e-6)
