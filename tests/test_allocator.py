"""The `avr` process keeps freed memory for the next step (avr.allocator): fewer page faults, the
same numbers."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from avr.allocator import user_set_malloc
from support.console import ok, run_avr
from support.paths import REPO

BLOCK_MB = 256
# One block allocated, written and freed, then a block 1 MB smaller: the page faults of writing
# the second. (torch allocates with posix_memalign, which asks glibc for a little more than the
# block: a request of the very same size may not fit the hole its predecessor left.) torch's CPU
# allocator is plain malloc, where numpy would ask for huge pages, which fault less.
REFAULTS = f"""
import resource, sys
import torch
from avr.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
block = torch.empty({BLOCK_MB} << 20, dtype=torch.uint8).fill_(1)
del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = torch.empty({BLOCK_MB - 1} << 20, dtype=torch.uint8).fill_(1)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = ((BLOCK_MB - 1) << 20) // 4096


def refaults(mode: str) -> tuple[bool, int]:
    done = subprocess.run([sys.executable, "-c", REFAULTS, mode], capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                                            "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    kept, faults = done.stdout.split()
    return kept == "True", int(faults)


def test_a_freed_block_is_reused_without_page_faults():
    kept, faults = refaults("keep")
    if not kept:
        pytest.skip("not glibc: avr leaves the allocator alone")
    assert faults < PAGES // 10


def test_without_the_setting_a_large_freed_block_is_faulted_in_again():
    """The cost the setting removes: glibc hands a large freed block back to the kernel, and
    writing the next one faults in every page again."""
    kept, faults = refaults("leave")
    assert not kept and faults > PAGES // 2


def test_the_users_own_malloc_settings_are_left_alone():
    assert user_set_malloc({"MALLOC_ARENA_MAX": "2"}) is False
    assert user_set_malloc({"MALLOC_MMAP_MAX_": "65536"})
    assert user_set_malloc({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"})


@pytest.mark.slow
def test_training_gives_the_same_weights_whether_or_not_freed_memory_is_kept(tmp_path):
    """TEFAL on VATEX's per-row shapes (a batch's float32 AST tokens pass glibc's mmap
    threshold): `avr train` as it runs, and with a user's malloc setting that makes avr leave
    glibc's defaults (large blocks mapped and unmapped every step)."""
    store = tmp_path / "store"
    ok(run_avr("bench", "store", "--videos", 28, "--val-videos", 4, "--test-videos", 4,
               "--heads", "tefal", "--captions-per-video", 2, "--out", store))
    runs = {}
    for name, env in (("kept", {}), ("glibc", {"MALLOC_MMAP_MAX_": "65536"})):
        runs[name] = tmp_path / name
        ok(run_avr("train", "--cache", store, "--head", "tefal", "--epochs", 1,
                   "--batch-size", 16, "--device", "cpu", "--run-dir", runs[name], env=env,
                   timeout=900))
    kept, glibc = (load_file(str(runs[n] / "best.safetensors")) for n in ("kept", "glibc"))
    assert kept.keys() == glibc.keys()
    assert all(bool((kept[k] == glibc[k]).all()) for k in kept)
    logs = {name: list(csv.DictReader((run / "log.csv").open())) for name, run in runs.items()}
    assert len(logs["kept"]) == 1
    for column in ("loss", "val_r1", "lr", "temperature"):
        assert [row[column] for row in logs["kept"]] == [row[column] for row in logs["glibc"]]
