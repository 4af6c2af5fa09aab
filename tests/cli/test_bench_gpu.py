"""`avr bench gpu --device cpu --quick`: the GPU check's every row, run where no GPU is, so that
it cannot rot between the rare runs on one."""

from __future__ import annotations

import json

import pytest

from support.console import assert_one_line_error, ok, run_avr

# The JSON's keys (BENCHMARKS.md "The GPU check" documents each).
REPORT_KEYS = {"version", "command", "device", "mode", "budget_s", "started", "seconds",
               "finished", "sizes", "passed", "counts", "rows"}
DEVICE_KEYS = {"type", "name", "torch", "cuda", "cpu_count", "intra_op_threads", "memory_gb"}
# The quick check takes about a minute on a quiet 2-core machine; far more on a loaded one.
pytestmark = pytest.mark.timeout(2400)
ROW_KEYS = {"section", "name", "status", "measured", "tolerance", "info", "value", "unit",
            "extrapolated", "target", "meets", "note", "error", "seconds", "peak_gpu_gb"}


@pytest.fixture(scope="module")
def quick_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "gpu_check.json"
    done = ok(run_avr("bench", "gpu", "--device", "cpu", "--quick", "--out", out,
                      "--budget", "3600", timeout=3000))
    return done, json.loads(out.read_text())


@pytest.mark.slow
def test_quick_cpu_check_writes_every_documented_key(quick_check):
    _, report = quick_check
    assert set(report) == REPORT_KEYS
    assert set(report["device"]) == DEVICE_KEYS and report["device"]["type"] == "cpu"
    assert report["mode"] == "quick" and report["sizes"]["shapes"] == "tiny"
    assert report["finished"]
    assert all(set(row) == ROW_KEYS for row in report["rows"])
    assert sum(report["counts"].values()) == len(report["rows"])


@pytest.mark.slow
def test_quick_cpu_check_passes_every_correctness_row(quick_check):
    done, report = quick_check
    rows = [row for row in report["rows"] if row["section"] == "correctness"]
    failed = [(row["name"], row["status"], row["measured"], row["error"]) for row in rows
              if row["status"] != "pass"]
    assert not failed and report["passed"]
    names = {row["name"] for row in rows}
    for expected in ("tefal fp32 vs cpu fp32", "htav bf16 vs cpu fp32",
                     "streamed int8 vs resident int8", "int8 vs fp16 resident",
                     "pinned host vs device-resident", "scoring chunk sizes",
                     "stacked xpool bf16 vs solo"):
        assert expected in names
    assert f"correctness: {len(rows)} passed, 0 failed, 0 errors" in done.stdout


@pytest.mark.slow
def test_quick_cpu_check_measures_every_figure(quick_check):
    _, report = quick_check
    figures = [row for row in report["rows"] if row["section"] == "figure"]
    assert all(row["status"] == "measured" and row["value"] > 0 for row in figures
               if row["name"] != "extract: real-size random backbones")
    assert all(row["meets"] is None for row in figures)  # quick mode judges no target
    names = {row["name"] for row in figures}
    for residency in ("resident", "host", "streamed", "int8"):
        assert f"train tefal {residency}: VATEX epoch" in names
    assert {"eval tefal: 15,000 x 1,500 pairs, chunked", "sweep: stacked / one at a time",
            "extract: pooled decode / (one process x workers)",
            "store read / raw read"} <= names


def test_out_in_a_missing_folder_is_refused_before_any_work(tmp_path):
    out = tmp_path / "missing" / "gpu_check.json"
    assert_one_line_error(run_avr("bench", "gpu", "--device", "cpu", "--quick", "--out", out),
                          f"--out {out}", "does not exist")
