"""`avr train --dry-run --json` on generated stores of MSR-VTT's and VATEX's shapes: each head's
recipe as docs/recipes.md tabulates it, every value with its source, nothing trained or written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from avr.fuse.heads import HEADS
from support.console import TRACEBACK_MARKS, ok, run_avr
from support.paths import REPO

# Large enough that no rule of the schedule changes a recipe: in VATEX's split proportions about
# 717 train videos of 10 captions (MSR-VTT's: 680 of 20), at least 6 batches of 128 an epoch.
VIDEOS = 800


def doc_recipes() -> dict[str, tuple[dict[str, object], dict[str, dict[str, object]]]]:
    """head -> (values every row shares, row -> its own values), read from docs/recipes.md.
    A cell's first value is the one for a ViT-B/32 store (the generated stores' CLIP)."""
    recipes, head = {}, None
    for line in (REPO / "docs" / "recipes.md").read_text().splitlines():
        if line.startswith("### "):
            head = line[4:].strip()
            recipes[head] = ({}, {})
        elif line.startswith("What a frozen backbone changes"):
            head = None
        elif head and line.startswith("| ") and not line.startswith(("| option", "| dataset")):
            cells = [cell.strip() for cell in line.strip("|").split(" | ")]
            common, rows = recipes[head]
            value = json.loads(cells[-2].split("; ")[0])
            if len(cells) == 3:
                common[cells[0]] = value
            else:
                rows.setdefault(cells[0], {})[cells[1]] = value
    return recipes


def expected(head: str, dataset: str) -> dict[str, object]:
    common, rows = doc_recipes()[head]
    return {**common, **rows.get(dataset, rows.get("msrvtt", {}))}


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("like")
    for like in ("msrvtt", "vatex"):
        ok(run_avr("bench", "store", "--videos", VIDEOS, "--out", root / like, "--shapes", "tiny",
                   "--like", like, timeout=600))
    return {like: root / like for like in ("msrvtt", "vatex")}


def dry_run(store: Path, head: str, cwd: Path, *flags) -> dict:
    done = ok(run_avr("train", "--cache", store, "--head", head, "--dry-run", "--json", *flags,
                      cwd=cwd))
    return json.loads(done.stdout)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("dataset", ["msrvtt", "vatex"])
@pytest.mark.parametrize("head", sorted(HEADS))
def test_dry_run_prints_the_heads_recipe_as_the_docs_table_gives_it(stores, head, dataset,
                                                                      tmp_path):
    before = sorted(path.relative_to(stores[dataset]) for path in stores[dataset].rglob("*"))
    run = dry_run(stores[dataset], head, tmp_path)
    values = {**run["train"], **run["head_options"]}
    for option, value in expected(head, dataset).items():
        assert values[option] == value, (option, run["sources"][option])
        assert run["sources"][option].startswith(f"recipe {head}/"), run["sources"][option]
    assert run["schedule"] is None or run["schedule"].startswith("recipe:")  # no rule applied
    assert set(run["sources"]) >= set(values) - {"head_options"}
    assert list(tmp_path.iterdir()) == []  # no run folder
    assert sorted(path.relative_to(stores[dataset]) for path in stores[dataset].rglob("*")) \
        == before


def test_a_dataset_without_a_recipe_row_takes_the_msrvtt_row_and_says_so(stores, tmp_path):
    run = dry_run(stores["vatex"], "xpool", tmp_path)
    assert run["schedule"].startswith("recipe: xpool has no vatex recipe in its release; its "
                                      "MSR-VTT 9k recipe instead")
    assert run["train"]["lr"] == 3e-5 and run["head_options"]["frames"] == 12


def test_given_values_keep_their_source_and_another_row_can_be_named(stores, tmp_path):
    run = dry_run(stores["msrvtt"], "xpool", tmp_path, "--lr", "1e-4", "--opt",
                  "recipe=msrvtt-7k", "--frames", "0")
    assert run["train"]["lr"] == 1e-4 and run["sources"]["lr"] == "--lr"
    assert run["head_options"]["dropout"] == 0.4  # X-Pool's 7k row
    assert run["head_options"]["frames"] == 0 and run["sources"]["frames"] == "--frames"
    assert run["sources"]["recipe"] == "--opt recipe"


def test_the_text_dry_run_names_each_value_and_its_source(stores, tmp_path):
    done = ok(run_avr("train", "--cache", stores["vatex"], "--head", "tefal", "--dry-run",
                      cwd=tmp_path))
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"dry run: tefal on {stores['vatex']} (dataset vatex")
    assert any(line.split()[:2] == ["frames", "32"] and "TEFAL paper Sec. 4.2" in line
               for line in lines)
    assert list(tmp_path.iterdir()) == []


def test_train_json_prints_the_result_alone(stores, tmp_path):
    done = ok(run_avr("train", "--cache", stores["msrvtt"], "--head", "meanp", "--epochs", "2",
                      "--device", "cpu", "--run-dir", tmp_path / "run", "--json", cwd=tmp_path))
    result = json.loads(done.stdout)  # nothing else on stdout: no progress, no schedule line
    assert result["run_dir"] == str(tmp_path / "run") and len(result["epochs"]) == 2
    best = result["epochs"][result["best_epoch"] - 1]
    assert result["best_val"] == {"R1": best["val_r1"], "R5": best["val_r5"],
                                  "R10": best["val_r10"], "MdR": best["val_mdr"]}
    assert not any(mark in done.stderr for mark in TRACEBACK_MARKS)
