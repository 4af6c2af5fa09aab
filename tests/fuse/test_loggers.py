"""Every epoch's figures beside log.csv: val R@1, R@5, R@10 and MdR in log.csv, TensorBoard
groups and hyperparameters (solo runs and stacked trials), test metrics from `avr eval`, and the
W&B (offline) and MLflow (file store) loggers read back with their own libraries."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest
import torch

from avr.fuse import stacked, trainer
from avr.fuse.trainer import TrainConfig
from support.console import ok, run_avr
from support.stores import make_learnable_store

TRAIN = ["--head", "xpool", "--batch-size", "16", "--device", "cpu", "--epochs", "2"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    from support.specs import make_tiny_spec

    return make_learnable_store(tmp_path_factory.mktemp("store") / "cache", make_tiny_spec())


def events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_log_csv_records_every_validation_metric(store, tmp_path):
    ok(run_avr("train", "--cache", store, *TRAIN, "--run-dir", tmp_path / "run"))
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert len(rows) == 2
    for row in rows:
        r1, r5, r10, mdr = (float(row[k]) for k in ("val_r1", "val_r5", "val_r10", "val_mdr"))
        assert 0 < r1 <= r5 <= r10 <= 100 and mdr >= 1


def test_tensorboard_groups_train_val_and_test_and_records_hyperparameters(store, tmp_path):
    run = tmp_path / "run"
    ok(run_avr("train", "--cache", store, *TRAIN, "--run-dir", run, "--lr", "2e-3"))
    ok(run_avr("eval", "--run", run, "--device", "cpu"))
    tags = set(events(run).Tags()["scalars"])
    assert {"train/loss", "train/lr", "val/R1", "val/R5", "val/R10", "val/MdR",
            "test/R1", "test/MdR"} <= tags
    assert len(events(run).Scalars("val/R1")) == 2
    test_r1 = events(run).Scalars("test/R1")[0].value
    assert test_r1 == pytest.approx(json.loads((run / "metrics.json").read_text())["t2v"]["R1"])
    from tensorboard.plugins.hparams import plugin_data_pb2

    plugin = events(run).PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/session_start_info"])
    hparams = session.session_start_info.hparams
    assert hparams["head"].string_value == "xpool" and hparams["lr"].number_value == 2e-3


def test_stacked_trials_write_their_own_events(store, tmp_path):
    configs = [TrainConfig(head="xpool", epochs=2, batch_size=16, lr=lr, device="cpu",
                           head_options={"dropout": 0.0, "temperature": 0.05})
               for lr in (1e-3, 3e-3)]
    cache = trainer.load_cache(store, "xpool", torch.device("cpu"))
    stacked.train_stacked(store, configs, [tmp_path / f"t{k}" for k in range(2)], cache)
    for k, config in enumerate(configs):
        run = tmp_path / f"t{k}"
        assert len(events(run).Scalars("val/R1")) == 2
        session = events(run).PluginTagToContent("hparams")["_hparams_/session_start_info"]
        assert str(config.lr).encode() in session or b"lr" in session


def test_wandb_logger_writes_an_offline_run_with_every_epoch(store, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    ok(run_avr("train", "--cache", store, *TRAIN, "--run-dir", run, "--logger", "wandb"))
    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1
    records = offline[0].read_bytes()
    # each history and summary item: its key, then its value_json (protobuf field 16: bytes
    # 0x82 0x01, then the length)
    values = {key: {float(v) for v in re.findall(re.escape(key) + rb"\x82\x01.([0-9.e+-]+)",
                                                 records)}
              for key in (b"val/R1", b"val/MdR", b"epoch")}
    rows = list(csv.DictReader((run / "log.csv").open()))
    assert values[b"val/R1"] == {float(row["val_r1"]) for row in rows}
    assert values[b"val/MdR"] == {float(row["val_mdr"]) for row in rows}
    assert values[b"epoch"] == {1.0, 2.0}
    assert b"train/loss" in records and b"xpool" in records  # the config's head


def test_mlflow_logger_writes_params_and_metric_history_to_a_file_store(store, tmp_path,
                                                                         monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps it as an opt-in
    run = tmp_path / "run"
    ok(run_avr("train", "--cache", store, *TRAIN, "--run-dir", run, "--logger", "mlflow"))
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    found = client.search_runs(experiment_ids=["0"])
    assert len(found) == 1 and found[0].info.run_name == "run"
    assert found[0].data.params["head"] == "xpool"
    history = client.get_metric_history(found[0].info.run_id, "val_R1")
    assert [m.step for m in history] == [1, 2]


def test_an_unknown_logger_is_one_line(store, tmp_path):
    done = run_avr("train", "--cache", store, *TRAIN, "--run-dir", tmp_path / "run",
                   "--logger", "neptune")
    assert done.returncode == 2 and "logger 'neptune' is not one of" in done.stderr


def test_the_python_api_trains_evaluates_resumes_and_searches_with_str_paths(store, tmp_path):
    import avr

    result = avr.train(str(store), head="xpool", run_dir=str(tmp_path / "run"), epochs=2,
                       batch_size=16, device="cpu")
    assert result.run_dir == tmp_path / "run" and len(result.history) == 2
    metrics = avr.evaluate(str(result.run_dir), device="cpu")
    assert metrics.metrics["t2v"]["R1"] >= 0 and (result.run_dir / "metrics.json").exists()
    resumed = avr.train(resume=str(result.run_dir), epochs=3)
    assert [h.epoch for h in resumed.history] == [1, 2, 3]
    assert os.path.isfile(result.run_dir / "last.safetensors")
    hits = avr.search("caption 3 of video 1", str(result.run_dir), k=3, device="cpu")
    assert len(hits) == 3 and all(hit.video_id.startswith("video") for hit in hits)
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)


def test_the_python_api_runs_a_sweep(store, tmp_path, monkeypatch):
    import avr

    monkeypatch.chdir(tmp_path)
    study = avr.sweep("api", cache=str(store), grid="lr=1e-3,3e-3", head="meanp", epochs=1,
                      batch_size=16, device="cpu")
    assert sorted(row.state for row in study.rows) == ["complete", "complete"]
    assert (tmp_path / "runs" / "sweeps" / "api").is_dir()
