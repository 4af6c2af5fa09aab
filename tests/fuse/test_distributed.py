"""Training on several processes (gloo on the CPU), each holding its shard of the train split,
equals one process with the same global batches (``shards`` = the number of processes)."""

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
from avr.fuse import checkpoint, ddp, sampling, trainer
from avr.fuse.ddp import World
from avr.fuse.heads import build_head
from avr.fuse.trainer import TrainConfig
from avr.store.splits import load_split, random_split
from support.specs import make_tiny_spec
from support.stores import make_learnable_store

# dropout 0: each rank draws dropout masks for its own rows, so only without dropout are the
# two runs equal number for number (with dropout they are equal in distribution).
RUN = {"head": "xpool", "epochs": 3, "batch_size": 16, "lr": 3e-3, "warmup": 0.0, "device": "cpu",
       "amp": False, "shards": 2, "head_options": {"dropout": 0.0}}
RUN_FLAGS = ["--head", "xpool", "--batch-size", "16", "--lr", "0.003", "--warmup", "0",
             "--device", "cpu", "--dropout", "0", "--opt", "amp=false"]  # shards: one per rank


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
    return [h.loss for h in checkpoint.read_log(run)]


def assert_same_weights(run_a: Path, run_b: Path, name: str, atol: float = 1e-5) -> None:
    """Every weight of the two runs' heads equal, but the attention key biases: a key bias adds
    one logit to every token (softmax-invariant), so its gradient is rounding noise, summed in
    another order on two processes, which Adam's normalisation turns into steps of size lr."""
    a, b = load_file(str(run_a / name)), load_file(str(run_b / name))
    weights = [k for k in a if k.startswith("head.") and not k.endswith("key.bias")]
    assert weights and set(weights) <= set(b)
    for key in weights:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_learnable_store(tmp_path_factory.mktemp("cache") / "cache", make_tiny_spec(),
                                failed=(3,))  # 47 train videos: shards of 24 and 23


@pytest.fixture(scope="module")
def one_process_run(store, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("single") / "run"
    trainer.train(store, TrainConfig(**RUN), run)
    return run


def test_two_gloo_processes_train_the_same_run_as_one_process(store, one_process_run, tmp_path):
    run = tmp_path / "run"
    torchrun("train", "--cache", str(store), "--epochs", "3", "--run-dir", str(run), *RUN_FLAGS,
             cwd=tmp_path)
    assert checkpoint.read_config(run)["train"]["shards"] == 2  # taken from WORLD_SIZE
    assert losses(run) == pytest.approx(losses(one_process_run), abs=1e-5)
    assert ([h.val_r1 for h in checkpoint.read_log(run)]
            == [h.val_r1 for h in checkpoint.read_log(one_process_run)])
    assert_same_weights(run, one_process_run, "last.safetensors")
    assert_same_weights(run, one_process_run, "best.safetensors")


def test_an_interrupted_one_process_run_resumes_on_two_processes(store, one_process_run,
                                                                  tmp_path):
    class Stop(Exception):
        pass

    def stop_after_two(epoch, log):
        if log.epoch == 2:
            raise Stop

    run = tmp_path / "run"
    with pytest.raises(Stop):
        trainer.train(store, TrainConfig(**RUN), run, on_epoch=stop_after_two)
    torchrun("train", "--resume", str(run), cwd=tmp_path)
    assert losses(run) == pytest.approx(losses(one_process_run), abs=1e-5)
    assert_same_weights(run, one_process_run, "last.safetensors")


def _rank_trains(rank: int, port: int, store: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = trainer.train(store, TrainConfig(**{**RUN, "epochs": 1}), Path(out) / "run")
    torch.save({"train_videos": result.train_videos,
                "losses": [h.loss for h in result.history]}, Path(out) / f"rank{rank}.pt")


def test_each_rank_loads_only_its_shard_and_trains_the_one_process_epoch(store, tmp_path):
    alone = trainer.train(store, TrainConfig(**{**RUN, "epochs": 1}), tmp_path / "alone")
    mp.spawn(_rank_trains, args=(free_port(), str(store), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert alone.train_videos == 47
    assert [r["train_videos"] for r in ranks] == [24, 23]
    for rank in ranks:
        assert rank["losses"] == pytest.approx([h.loss for h in alone.history], abs=1e-5)


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
    counts = [6, 4] if world.is_distributed else [10]  # uneven parts: gathers pad and trim
    mine = rows[sum(counts[:world.rank]):sum(counts[:world.rank + 1])]
    loss, _ = trainer.batch_loss(head, data.video_rows(mine), data.caption_rows(mine), counts,
                                 torch.device("cpu"), world)
    loss.backward()
    ddp.average_gradients(head.parameters(), world)
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
    alone = step_gradients(head_name, ddp.SINGLE)
    for rank in rank_gradients:
        assert set(rank[head_name]) == set(alone)
        for name, grad in alone.items():
            torch.testing.assert_close(rank[head_name][name], grad, atol=1e-6, rtol=1e-4,
                                       msg=name)


# ---- pure parts --------------------------------------------------------------------------------

@pytest.mark.parametrize("pairs", ["one", "all"])
def test_a_rank_draws_from_its_loaded_shard_the_pairs_one_process_draws_for_it(store, pairs):
    full = load_split(store, "train", (), ())
    config = TrainConfig(pairs=pairs, shards=2)
    for rank in range(2):
        mine = load_split(store, "train", (), (), shard=(rank, 2))
        videos, captions = sampling.held_shards(mine, config, 3, World(rank, 2))[0]
        owned = torch.nonzero((full.caption_video >= 0)
                              & (full.caption_video % 2 == rank)).squeeze(1)
        assert mine.video_ids == full.video_ids[rank::2]
        assert mine.caption_text == [full.caption_text[i] for i in owned]
        expected = sampling.shard_pairs(full.caption_video, rank, 2, pairs,
                                        sampling.shard_generator(config.seed, 3, rank))
        assert torch.equal(rank + 2 * videos, expected[0])
        assert torch.equal(owned[captions], expected[1])


def test_a_global_batch_takes_an_equal_part_from_every_shard(store):
    full = load_split(store, "train", (), ())
    batches = list(sampling.epoch_batches(full, TrainConfig(batch_size=16, shards=2,
                                                            pairs="one"), 0))
    assert [counts for _, _, counts in batches] == [[8, 8], [8, 8], [8, 7]]
    for videos, captions, _ in batches:
        assert torch.equal(videos % 2, torch.tensor([0] * 8 + [1] * (len(videos) - 8)))
        assert torch.equal(full.caption_video[captions], videos)
    seen = torch.cat([videos for videos, _, _ in batches])
    assert sorted(seen.tolist()) == list(range(full.num_videos))


def test_one_shard_draws_the_batches_of_one_shuffled_pair_list(store):
    full = load_split(store, "train", (), ())
    config = TrainConfig(batch_size=16, pairs="one")
    videos, captions = sampling.draw_pairs(full.caption_video, "one",
                                           sampling.shard_generator(config.seed, 2, 0))
    batches = list(sampling.epoch_batches(full, config, 2))
    assert torch.equal(torch.cat([v for v, _, _ in batches]), videos)
    assert torch.equal(torch.cat([c for _, c, _ in batches]), captions)
    assert [len(v) for v, _, _ in batches] == [16, 16, 15]


def test_the_batch_size_must_split_evenly_over_the_shards():
    with pytest.raises(AvrError, match="multiple of shards=2"):
        TrainConfig(head="xpool", batch_size=15, shards=2).validate()


def test_torchrun_needs_as_many_shards_as_processes():
    with pytest.raises(AvrError, match="shards=1 but torchrun started WORLD_SIZE=2"):
        ddp.check_shards(TrainConfig(), World(0, 2))
    ddp.check_shards(TrainConfig(shards=2), World(1, 2))


def test_the_world_comes_from_the_torchrun_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert ddp.launched_world() == World(rank=3, size=4, local_rank=1)
    assert not ddp.is_main_process()
    monkeypatch.delenv("RANK")
    with pytest.raises(AvrError, match="RANK"):
        ddp.launched_world()


def test_without_torchrun_training_runs_in_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert ddp.launched_world() == ddp.SINGLE
    assert ddp.is_main_process()
