"""A store in a real S3 endpoint: moto's server on the loopback, reached by s3fs exactly as AWS
would be. The installed `avr` command extracts the demo into ``s3://BUCKET/cache``, reads it
back (`cache info`), trains and evaluates on it, builds its first-stage index beside it and
exports it; every result equals the same steps on a local store (done through the Python API,
which the other tests cover through the command)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from avr.cli import main
from avr.evaluate.evaluator import EvalConfig, evaluate_run
from avr.evaluate.index import build_index
from avr.extract.demo_data import generate_demo
from avr.extract.pipeline import extract
from avr.fuse import trainer
from avr.fuse.trainer import TrainConfig
from avr.store.info import cache_info
from support.store_checks import assert_same_store, demo_extract_config, read_store

BUCKET = "avr-test"
URL = f"s3://{BUCKET}/cache"
CHUNK = 4


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 with one bucket; the AWS variables that point boto at it
    are set here and passed on to every `avr` subprocess."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    variables = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    import fsspec

    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(BUCKET)
    yield variables
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    server.stop()


def s3():
    """A fresh s3fs filesystem (no listing cached from before an `avr` subprocess wrote)."""
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True)


def run_avr(*args, pythonpath: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("avr")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((*pythonpath, str(Path.cwd()))),
           "COLUMNS": "200"}
    return subprocess.run([str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("demo") / "data", seed=0, num_looks=1)


@pytest.fixture(scope="module")
def stores(s3_endpoint, demo_root, tmp_path_factory) -> dict[str, str | Path]:
    """The demo extracted by `avr extract` into the bucket, and the same extract on disk."""
    ok(run_avr("extract", "--dataset", "demo", "--root", demo_root, "--out", URL,
               "--backbones", "tiny", "--device", "cpu", "--workers", "0", "--chunk-rows", CHUNK))
    local = tmp_path_factory.mktemp("local") / "cache"
    extract(demo_extract_config(demo_root, local, CHUNK))
    return {"s3": URL, "local": local}


def test_extract_into_s3_writes_the_same_arrays_as_a_local_extract(stores):
    assert s3().exists(f"{BUCKET}/cache/zarr.json")
    assert_same_store(stores["local"], stores["s3"])


def test_cache_info_reads_the_store_in_s3(stores):
    remote = json.loads(ok(run_avr("cache", "info", URL, "--json")).stdout)
    local = cache_info(stores["local"])
    assert remote["path"] == URL
    assert remote["videos"] == local["videos"] and remote["captions"] == local["captions"]
    assert remote["fingerprint"] == local["fingerprint"]
    assert all(array["stored_bytes"] > 0 for array in remote["arrays"].values())


def test_train_index_and_eval_on_s3_equal_the_same_steps_on_a_local_store(stores, tmp_path):
    """`avr train`, `avr index build` and `avr eval --rerank-k` on the bucket; the Python API
    on the local store; same seed, same numbers (CPU)."""
    ok(run_avr("train", "--cache", URL, "--head", "meanp", "--epochs", "2", "--batch-size", "2",
               "--device", "cpu", "--run-dir", tmp_path / "s3-run"))
    assert json.loads((tmp_path / "s3-run" / "config.json").read_text())["cache"]["path"] == URL
    ok(run_avr("index", "build", URL))
    assert s3().exists(f"{BUCKET}/cache/index/index.json")
    assert s3().exists(f"{BUCKET}/cache/index/test.faiss")
    ok(run_avr("eval", "--run", tmp_path / "s3-run", "--device", "cpu", "--rerank-k", "1",
               "--json", tmp_path / "s3.json"))
    remote = json.loads((tmp_path / "s3.json").read_text())

    trainer.train(stores["local"], TrainConfig(head="meanp", epochs=2, batch_size=2,
                                               device="cpu"), tmp_path / "local-run")
    build_index(stores["local"])
    local = evaluate_run(tmp_path / "local-run", config=EvalConfig(device="cpu", rerank_k=1))
    assert remote["cache"] == URL
    assert remote["t2v"] == local.metrics["t2v"] and remote["v2t"] == local.metrics["v2t"]
    assert remote["variants"] == local.variants and "rerank@1" in local.variants


def test_cache_export_reads_from_s3_and_writes_to_s3(stores, tmp_path):
    ok(run_avr("cache", "export", URL, f"s3://{BUCKET}/export/cache.h5"))
    s3().get_file(f"{BUCKET}/export/cache.h5", str(tmp_path / "cache.h5"))
    arrays = read_store(stores["local"])
    with h5py.File(tmp_path / "cache.h5") as h5:
        for name in ("frame_embeddings", "audio_patch_tokens", "caption_video"):
            np.testing.assert_array_equal(h5[name][:], arrays[name], err_msg=name)


def test_a_missing_store_at_a_url_is_one_line_naming_it(s3_endpoint):
    done = run_avr("cache", "info", f"s3://{BUCKET}/nothing")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"s3://{BUCKET}/nothing: no avr cache here" in lines[0]


@pytest.mark.parametrize("command", [["cache", "info"], ["index", "build"], ["train", "--cache"],
                                     ["sweep", "--grid", "lr=1e-3", "--cache"],
                                     ["bench", "cache", "--cache"]])
def test_every_command_gives_a_missing_url_store_the_local_error(s3_endpoint, tmp_path, capsys,
                                                                 command):
    for missing in (f"s3://{BUCKET}/nothing", "s3://no-such-bucket/cache", tmp_path / "nothing"):
        with pytest.raises(SystemExit) as done:
            main([*command, str(missing)])
        assert done.value.code == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"{missing}: no avr cache here (zarr.json not found)" in err


def test_without_s3fs_a_url_store_names_the_package_to_install(s3_endpoint, tmp_path):
    blocked = tmp_path / "no-s3fs"
    (blocked / "s3fs").mkdir(parents=True)
    (blocked / "s3fs" / "__init__.py").write_text(
        'raise ModuleNotFoundError("No module named \'s3fs\'", name="s3fs")\n')
    done = run_avr("cache", "info", URL, pythonpath=(str(blocked),))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert f"{URL}: Install s3fs to access S3; pip install s3fs" in lines[0]
