"""Training on several processes (gloo on the CPU) equals one process with the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from avr.errors import AvrError
from avr.fuse import distributed, trainer
from avr.fuse.data import random_split
from avr.fuse.distributed import World
from avr.fuse.heads import build_head
from avr.fuse.trainer import TrainConfig
from conftest import make_tiny_spec
from stores import make_learnable_store

# dropout 0: each rank draws dropout masks for its own rows, so only without dropout are the
# two runs equal number for number (with dropout they are equal in distribution).
RUN = {"head": "xpool", "epochs": 3, "batch_size": 16, "lr": 3e-3, "warmup": 0.0, "device": "cpu",
       "amp": False, "head_options": {"dropout": 0.0}}
RUN_FLAGS = ["--head", "xpool", "--batch-size", "16", "--lr", "0.003", "--warmup", "0",
             "--device", "cpu", "--dropout", "0", "--opt", "amp=false"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args: str, cwd: Path) -> None:
    """``torchrun --nproc-per-node 2 -m avr ARGS`` on loopback; fails the test on a non-zero exit."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "avr", *args]
    done = subprocess.run(command, check=False, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def losses(run: Path) -> list[float]:
    return [h.loss for h in trainer.read_log(run)]


def assert_same_weights(run_a: Path, run_b: Path, name: str, atol: float = 1e-4) -> None:
    a, b = load_file(str(run_a / name)), load_file(str(run_b / name))
    weights = [k for k in a if k.startswith("head.")]
    assert weights and set(weights) <= set(b)
    for key in weights:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_learnable_store(tmp_path_factory.mktemp("cache") / "cache", make_tiny_spec(),
                                failed=(3,))  # 47 train videos: the last batch of 15 splits 8 + 7


@pytest.fixture(scope="module")
def one_process_run(store, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("single") / "run"
    trainer.train(store, TrainConfig(**RUN), run)
    return run


def test_two_gloo_processes_train_the_same_run_as_one_process(store, one_process_run, tmp_path):
    run = tmp_path / "run"
    torchrun("train", "--cache", str(store), "--epochs", "3", "--run-dir", str(run), *RUN_FLAGS,
             cwd=tmp_path)
    assert losses(run) == pytest.approx(losses(one_process_run), abs=1e-5)
    assert ([h.val_r1 for h in trainer.read_log(run)]
            == [h.val_r1 for h in trainer.read_log(one_process_run)])
    assert_same_weights(run, one_process_run, "last.safetensors")
    assert_same_weights(run, one_process_run, "best.safetensors")


def test_an_interrupted_one_process_run_resumes_on_two_processes(store, one_process_run,
                                                                  tmp_path):
    class Stop(Exception):
        pass

    def stop_after_two(log):
        if log.epoch == 2:
            raise Stop

    run = tmp_path / "run"
    with pytest.raises(Stop):
        trainer.train(store, TrainConfig(**RUN), run, on_epoch=stop_after_two)
    torchrun("train", "--resume", str(run), cwd=tmp_path)
    assert losses(run) == pytest.approx(losses(one_process_run), abs=1e-5)
    assert_same_weights(run, one_process_run, "last.safetensors")


# ---- one step's gradients, two gloo processes started by torch.multiprocessing -----------------

GRAD_HEADS = ("xpool", "tefal")  # xpool: parameters in score; tefal: audio too, wide states


def step_gradients(head_name: str, world: World) -> dict[str, torch.Tensor]:
    """Gradients of one global batch of 10 pairs, after averaging over ranks."""
    spec = make_tiny_spec()
    torch.manual_seed(0)
    head = build_head(head_name, spec, {"dropout": 0.0})
    data = random_split(spec, 12, video_names=head.video_inputs,
                        caption_names=head.caption_inputs, dtype=torch.float32)
    rows = torch.randperm(12, generator=torch.Generator().manual_seed(1))[:10]
    loss = trainer.batch_loss(head, data, rows, rows, torch.device("cpu"), world)
    loss.backward()
    distributed.average_gradients(head.parameters(), world)
    return {name: p.grad.clone() for name, p in head.named_parameters() if p.grad is not None}


def _rank_gradients(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        world = World(rank, 2, rank)
        torch.save({name: step_gradients(name, world) for name in GRAD_HEADS},
                   Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_gradients(tmp_path_factory) -> list[dict[str, dict[str, torch.Tensor]]]:
    out = tmp_path_factory.mktemp("grads")
    mp.spawn(_rank_gradients, args=(free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("head_name", GRAD_HEADS)
def test_averaged_gradients_equal_the_one_process_gradients(head_name, rank_gradients):
    alone = step_gradients(head_name, distributed.SINGLE)
    for rank in rank_gradients:
        assert set(rank[head_name]) == set(alone)
        for name, grad in alone.items():
            torch.testing.assert_close(rank[head_name][name], grad, atol=1e-6, rtol=1e-4,
                                       msg=name)


# ---- pure parts --------------------------------------------------------------------------------

def test_each_rank_takes_a_contiguous_slice_and_the_slices_cover_the_batch():
    rows = torch.arange(15)
    slices = [distributed.shard(rows, World(rank, 4)) for rank in range(4)]
    assert [len(s) for s in slices] == distributed.shard_counts(15, World(0, 4)) == [4, 4, 4, 3]
    assert torch.equal(torch.cat(slices), rows)


def test_the_world_comes_from_the_torchrun_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.launched_world() == World(rank=3, size=4, local_rank=1)
    assert not distributed.is_main_process()
    monkeypatch.delenv("RANK")
    with pytest.raises(AvrError, match="RANK"):
        distributed.launched_world()


def test_without_torchrun_training_runs_in_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.launched_world() == distributed.SINGLE
    assert distributed.is_main_process()
