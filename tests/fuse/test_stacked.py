"""Trials trained side by side as one stacked model match the same trials trained alone."""

from __future__ import annotations

import csv
import dataclasses
import math

import pytest
import torch
from safetensors.torch import load_file

from avr.fuse import stacked, trainer
from avr.fuse.trainer import TrainConfig
from support.stores import make_learnable_store
from support.console import run_module as run_avr

# Options that change no shape: one stacked group. Dropout 0: stacked trials draw their own masks.
VARIANTS = [dict(lr=3e-3, warmup=0.0, seed=42, weight_decay=0.2, temperature=0.05),
            dict(lr=1e-3, warmup=0.3, seed=7, weight_decay=0.0, temperature=0.02, grad_clip=0.5),
            dict(lr=2e-3, warmup=0.1, seed=42, weight_decay=0.05, temperature=0.1)]


def configs_of(head: str, epochs: int = 3) -> list[TrainConfig]:
    """The variants as trials of one caption per video an epoch, under which trials of
    different seeds stack (under every caption an epoch, a seed is a group of its own)."""
    options = {} if head == "meanp" else {"dropout": 0.0}
    return [TrainConfig(head=head, epochs=epochs, batch_size=16, device="cpu", pairs="one",
                        head_options={**options, "temperature": v["temperature"]},
                        **{k: x for k, x in v.items() if k != "temperature"})
            for v in VARIANTS]


def max_difference(first, second) -> float:
    a, b = load_file(str(first / "best.safetensors")), load_file(str(second / "best.safetensors"))
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("head", ["meanp", "xpool", "tefal"])
def test_each_stacked_trial_matches_its_solo_run(tmp_path, tiny_spec, head):
    store = make_learnable_store(tmp_path / "cache", tiny_spec)
    configs = configs_of(head)
    assert len(stacked.groups(configs)) == 1
    cache = trainer.load_cache(store, head, torch.device("cpu"),
                               head_options=[c.head_options for c in configs])
    together = stacked.train_stacked(store, configs, [tmp_path / f"stacked{k}" for k in range(3)],
                                     cache)
    for k, config in enumerate(configs):
        alone = trainer.train(store, config, tmp_path / f"alone{k}", cache=cache)
        assert [h.loss for h in together[k].history] == \
            pytest.approx([h.loss for h in alone.history], abs=1e-4)
        assert [h.val_r1 for h in together[k].history] == [h.val_r1 for h in alone.history]
        assert together[k].best_epoch == alone.best_epoch
        difference = max_difference(tmp_path / f"stacked{k}", tmp_path / f"alone{k}")
        # X-Pool's stacked step is the solo step's arithmetic (StackedAdamW, per-trial
        # LayerNorms): equal bit for bit on AVX-512 CPUs; on AVX2 ones the batched matmuls round
        # differently and three epochs at lr 3e-3 carry that to a few 1e-6; the other heads keep
        # vmap's batched matmuls' rounding
        assert difference < (2e-5 if head == "xpool" else 1e-4)
        assert (tmp_path / f"stacked{k}" / "config.json").exists()


@pytest.mark.parametrize("head", ["xpool", "tefal"])
def test_stacked_trials_train_under_bf16_autocast(tmp_path, tiny_spec, head, monkeypatch):
    """The stacked step under bf16 autocast, as on CUDA (autocast is off on the CPU by default):
    per-trial LayerNorms, the vmapped forward and the stacked AdamW meet bf16 activations."""
    monkeypatch.setattr(stacked, "autocast",
                        lambda device, amp=True: torch.autocast("cpu", dtype=torch.bfloat16))
    store = make_learnable_store(tmp_path / "cache", tiny_spec)
    configs = configs_of(head, epochs=2)
    cache = trainer.load_cache(store, head, torch.device("cpu"),
                               head_options=[c.head_options for c in configs])
    results = stacked.train_stacked(store, configs, [tmp_path / f"s{k}" for k in range(3)], cache)
    for k, result in enumerate(results):
        assert all(math.isfinite(h.loss) and 0 < h.val_r1 <= 100 for h in result.history)
        weights = load_file(str(tmp_path / f"s{k}" / "best.safetensors"))
        assert all(w.dtype == torch.float32 and bool(w.isfinite().all())
                   for w in weights.values())


def test_validation_of_every_trial_at_once_equals_trial_by_trial(tmp_path, tiny_spec,
                                                                 monkeypatch):
    """The vmapped validation of the stacked trials gives each trial the val R@1 its own
    ``score_split`` gives it (STACKED_VAL_BYTES 0: trial by trial)."""
    store = make_learnable_store(tmp_path / "cache", tiny_spec)
    configs = configs_of("xpool", epochs=2)
    cache = trainer.load_cache(store, "xpool", torch.device("cpu"))
    calls = []
    original = stacked._stacked_val_metrics
    monkeypatch.setattr(stacked, "_stacked_val_metrics",
                        lambda *args: calls.append(original(*args)) or calls[-1])
    curves = {}
    for limit in ("at once", "trial by trial"):
        if limit == "trial by trial":
            monkeypatch.setattr(stacked, "STACKED_VAL_BYTES", 0)
        results = stacked.train_stacked(store, configs,
                                        [tmp_path / f"{limit}-{k}" for k in range(3)], cache)
        curves[limit] = [[(h.val_r1, h.val_r5, h.val_r10, h.val_mdr) for h in r.history]
                         for r in results]
    assert [val is None for val in calls] == [False, False, True, True]  # both ways were taken
    assert curves["at once"] == curves["trial by trial"]
    assert all(0 < r1 <= r5 <= r10 <= 100 and mdr >= 1
               for curve in curves["at once"] for r1, r5, r10, mdr in curve)


@pytest.mark.parametrize("x_grad", [True, False])
def test_stacked_layer_norms_equal_each_trials_own_kernel_forward_and_backward(x_grad):
    """Trial k's slice of the vmapped LayerNorm (outputs, and the gradients of its input,
    weight and bias) equals torch's fused layer_norm run on trial k alone, bit for bit."""
    trials, width = 5, 24
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(trials, 7, 3, width, generator=generator)
    weight = torch.randn(trials, width, generator=generator)
    bias = torch.randn(trials, width, generator=generator)
    upstream = torch.randn(trials, 7, 3, width, generator=generator)

    def leaves(*tensors):
        return [t.clone().requires_grad_(grad) for t, grad in zip(tensors, (x_grad, True, True))]

    xs, ws, bs = leaves(x, weight, bias)
    out = torch.func.vmap(lambda a, w, b: stacked._TrialLayerNorm.apply(a, w, b, 1e-5))(xs, ws, bs)
    (out * upstream).sum().backward()
    for k in range(trials):
        xk, wk, bk = leaves(x[k], weight[k], bias[k])
        alone = torch.nn.functional.layer_norm(xk, (width,), wk, bk, 1e-5)
        (alone * upstream[k]).sum().backward()
        assert torch.equal(out[k], alone)
        assert torch.equal(ws.grad[k], wk.grad) and torch.equal(bs.grad[k], bk.grad)
        assert (xs.grad is None) if not x_grad else torch.equal(xs.grad[k], xk.grad)


def test_options_that_change_shapes_or_modules_split_the_groups():
    configs = configs_of("tefal")
    configs.append(TrainConfig(head="tefal", head_options={"dropout": 0.1}))
    configs.append(TrainConfig(head="tefal", head_options={"fusion": "concat", "dropout": 0.0}))
    configs.append(TrainConfig(head="avigate"))  # one trial at a time
    configs.append(TrainConfig(head="avigate"))
    assert stacked.groups(configs) == [[0, 1, 2], [3], [4], [5], [6]]


def test_under_every_caption_an_epoch_each_seed_is_a_group_of_its_own():
    configs = [dataclasses.replace(config, pairs="all") for config in configs_of("tefal")]
    assert stacked.groups(configs) == [[0, 2], [1]]  # seeds 42, 7, 42


def test_a_stacked_trial_stops_alone_when_pruned(tmp_path, tiny_spec):
    store = make_learnable_store(tmp_path / "cache", tiny_spec)
    configs = configs_of("meanp")
    cache = trainer.load_cache(store, "meanp", torch.device("cpu"))
    results = stacked.train_stacked(store, configs, [tmp_path / f"t{k}" for k in range(3)], cache,
                                    on_epoch=lambda k, log: k == 1 and log.epoch == 1)
    assert [len(r.history) for r in results] == [3, 1, 3]
    assert len((tmp_path / "t1" / "log.csv").read_text().splitlines()) == 2


def test_sweep_parallel_trains_the_trials_a_one_at_a_time_sweep_trains(tmp_path, tiny_spec):
    store = make_learnable_store(tmp_path / "cache", tiny_spec)
    args = ["sweep", "--cache", store, "--head", "xpool", "--batch-size", "16", "--epochs", "2",
            "--opt", "dropout=0", "--save-runs", "--grid", "lr=1e-3,3e-3 temperature=0.05"]
    for name, parallel in (("one", "1"), ("two", "2")):
        done = run_avr(*args, "--name", name, "--parallel", parallel, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    sweeps_dir = tmp_path / "runs" / "sweeps"
    rows = {}
    for name in ("one", "two"):
        with (sweeps_dir / name / "trials.csv").open() as handle:
            rows[name] = {(r["lr"], r["temperature"]): r for r in csv.DictReader(handle)}
    assert rows["one"].keys() == rows["two"].keys() and len(rows["one"]) == 2
    for point, row in rows["two"].items():
        assert row["state"] == "complete"
        assert row["best_val_r1"] == rows["one"][point]["best_val_r1"]
        alone = sweeps_dir / "one" / f"trial-{int(rows['one'][point]['trial']):04d}"
        together = sweeps_dir / "two" / f"trial-{int(row['trial']):04d}"
        assert max_difference(together, alone) < 1e-4
