"""What `avr extract` never does, whatever it is given: delete files it did not write, write a
store among the dataset's files, leave processes behind when killed, stop every video for one
bad id, or lose work when the disk fills up."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from avr.extract.demo_data import generate_demo
from support import media
from support.console import assert_one_line_error, ok, run_avr
from support.store_checks import (assert_same_store, demo_data, read_store,
                                 reference_extract)

CHUNK = 2
TINY = ("--backbones", "tiny", "--device", "cpu", "--workers", "0", "--chunk-rows", CHUNK)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return demo_data(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(demo_root, tmp_path_factory) -> Path:
    return reference_extract(demo_root, tmp_path_factory, CHUNK)


def extract_demo(root: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    return run_avr("extract", "--dataset", "demo", "--root", root, "--out", out, *TINY, *extra)


def test_overwrite_refuses_a_folder_of_other_files_and_deletes_nothing(demo_root, tmp_path):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("months of work")
    (out / "figures").mkdir()
    done = extract_demo(demo_root, out, "--overwrite")
    assert_one_line_error(done, str(out), "chapter1.tex", "figures",
                          "replaces only an avr store or an empty folder")
    assert (out / "chapter1.tex").read_text() == "months of work"
    assert sorted(p.name for p in out.iterdir()) == ["chapter1.tex", "figures"]


def test_overwrite_replaces_an_empty_folder(demo_root, reference, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    ok(extract_demo(demo_root, out, "--overwrite"))
    assert_same_store(reference, out)


@pytest.mark.parametrize("inside", [False, True], ids=["equal", "inside"])
def test_an_out_at_or_inside_the_root_is_refused_before_anything_is_written(tmp_path, inside):
    root = generate_demo(tmp_path / "data", seed=0, num_looks=1)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    out = root / "cache" if inside else root
    done = extract_demo(root, out, "--overwrite")
    assert_one_line_error(done, f"--out {out}", "--root" if not inside else "inside --root",
                          "outside the dataset")
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


def test_bench_store_overwrite_refuses_a_folder_of_other_files(tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("keep me")
    done = run_avr("bench", "store", "--videos", "6", "--out", out, "--overwrite")
    assert_one_line_error(done, str(out), "todo.txt", "replaces only an avr store")
    assert (out / "todo.txt").read_text() == "keep me"


def test_an_id_too_long_for_a_file_name_is_a_failure_not_a_crash(tmp_path):
    root = tmp_path / "generic"
    (root / "videos").mkdir(parents=True)
    media.write_clip(root / "videos" / "good.mp4", seconds=1.0)
    long_id = "x" * 300
    with (root / "captions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video_id", "caption", "split"])
        writer.writerow(["good", "a good clip", "train"])
        writer.writerow([long_id, "a clip whose name no disk holds", "test"])
    out = tmp_path / "cache"
    done = ok(run_avr("extract", "--dataset", "generic", "--root", root, "--out", out, *TINY))
    assert "1/2 videos done" in done.stdout and "1 failed" in done.stdout
    failures = (out / "failures.jsonl").read_text()
    assert long_id in failures and "unreadable" in failures and "too long" in failures
    assert read_store(out)["video_done"].tolist() == [True, False]


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_a_killed_extract_leaves_no_worker_or_resource_tracker_behind(demo_root, tmp_path):
    script = Path(sys.executable).with_name("avr")
    process = subprocess.Popen(
        [str(script), "extract", "--dataset", "demo", "--root", str(demo_root), "--out",
         str(tmp_path / "cache"), "--backbones", "tiny", "--device", "cpu", "--workers", "1",
         "--chunk-rows", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    deadline = time.time() + 120
    children: list[psutil.Process] = []
    while time.time() < deadline and process.poll() is None:
        children = _descendants(process.pid)
        if any("spawn_main" in " ".join(child.cmdline()) for child in children):
            break
        time.sleep(0.1)
    assert any("spawn_main" in " ".join(c.cmdline()) for c in children), "no decode worker seen"
    process.send_signal(signal.SIGKILL)
    process.wait()
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, [" ".join(p.cmdline()) for p in alive]


@pytest.fixture()
def small_disk(tmp_path):
    """A tmpfs of 256 KiB mounted at a folder of its own; unmounted after the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_is_one_line_and_the_store_resumes_when_there_is_room(demo_root, reference,
                                                                        small_disk):
    out = small_disk / "cache"
    done = extract_demo(demo_root, out)
    assert_one_line_error(done, str(out), "no space left", "run the same command again")
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    ok(extract_demo(demo_root, out))
    assert_same_store(reference, out)
