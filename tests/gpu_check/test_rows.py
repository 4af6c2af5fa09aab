"""The GPU check's rows: isolated, judged against their tolerances, held to the time guard."""

from __future__ import annotations

import json
import math

import torch

from avr.gpu_check import Budget, Check, Report, compared, report_json, run_one
from avr.gpu_check.correctness import gradient_error, rows_difference

CPU = torch.device("cpu")


def test_a_row_that_raises_is_an_error_row_and_the_next_row_still_runs():
    def mismatched():
        return [compared("x", {"loss": float(torch.ones(2) @ torch.ones(3))}, {"loss": 1.0})]

    failed = run_one(Check("correctness", "x", mismatched), CPU, Budget(60))
    after = run_one(Check("correctness", "y", lambda: [compared("y", {"loss": 0.0},
                                                                {"loss": 1.0})]), CPU, Budget(60))
    assert [row.status for row in failed] == ["error"]
    assert "RuntimeError" in failed[0].error
    assert [row.status for row in after] == ["pass"]


def test_a_row_passes_only_when_every_error_is_finite_and_within_its_tolerance():
    def row(measured):
        return run_one(Check("correctness", "r", lambda: [compared("r", measured,
                                                                   {"a": 1e-3, "b": 0.0})]),
                       CPU, Budget(60))[0].status

    assert row({"a": 1e-3, "b": 0.0}) == "pass"
    assert row({"a": 2e-3, "b": 0.0}) == "fail"
    assert row({"a": math.nan, "b": 0.0}) == "fail"
    assert row({"a": 0.0}) == "fail"  # an error not measured is not a pass


def test_the_time_guard_skips_a_row_that_needs_more_than_is_left():
    ran = []
    rows = run_one(Check("figure", "slow", lambda: ran.append(1) or [], needs_s=30), CPU,
                   Budget(10))
    assert not ran and rows[0].status == "skipped" and "needs about 30 s" in rows[0].note


def test_a_dtype_or_device_mismatch_measures_infinity():
    rows = {"tokens": torch.zeros(2, 3, dtype=torch.float16)}
    assert rows_difference(rows, {"tokens": torch.zeros(2, 3, dtype=torch.float16)}) == 0.0
    assert rows_difference(rows, {"tokens": torch.zeros(2, 3)}) == math.inf
    assert rows_difference(rows, {"frames": torch.zeros(2, 3, dtype=torch.float16)}) == math.inf


def test_gradient_errors_are_relative_to_the_largest_norm_the_reference_reached():
    small, large = {"w": torch.tensor([1e-3, 0.0])}, {"w": torch.tensor([1.0, 0.0])}
    off = {"w": torch.tensor([2e-3, 0.0])}
    whole, worst = gradient_error([off, large], [small, large])
    assert math.isclose(whole, 1e-3, rel_tol=1e-5) and math.isclose(worst, 1e-3, rel_tol=1e-5)
    assert gradient_error([off], []) == (math.inf, math.inf)


def test_the_json_writes_a_mismatch_as_a_string():
    row = run_one(Check("correctness", "m", lambda: [compared("m", {"rows": math.inf},
                                                              {"rows": 0.0})]), CPU, Budget(60))
    report = Report("avr bench gpu", {"type": "cpu"}, "quick", 60, "now", {}, row)
    written = json.loads(json.dumps(report_json(report), allow_nan=False))
    assert written["rows"][0]["measured"]["rows"] == "inf" and not written["passed"]
