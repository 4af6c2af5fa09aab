"""`avr demo`: the whole pipeline offline, on the built-in demo dataset with tiny backbones.

generate clips -> `avr extract --backbones tiny` -> `avr train` per head -> `avr eval`, then one
side-by-side table that includes the captions only sound can decide ("audio_only"). Every
step is the normal command, printed as it runs, so a user can rerun any of them.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from avr.device import intra_op_threads
from avr.evaluate.evaluator import EvalConfig, EvalResult, evaluate_run, write_metrics
from avr.extract.pipeline import ExtractConfig, ExtractSummary, extract
from avr.fuse import trainer
from avr.fuse.trainer import TrainConfig

REQUIRED_HEADS = ("xpool", "tefal")
OPTIONAL_HEADS = ("meanp", "gais", "avigate", "htav")  # cheapest first
AUDIO_ONLY = "audio_only"
# One thread: the same sums in the same order on every machine, and on tensors this small also
# the fastest (handing work between threads costs more than it saves).
DEMO_THREADS = 1

# Training settings that fit the demo's 56 training clips in seconds per head.
DEMO_TRAINING = dict(epochs=60, batch_size=16, lr=3e-3, warmup=0.0, weight_decay=0.01,
                     pairs="all", device="cpu")
# Per head, on top of those:
# - the tiny backbones' 32-wide features need neither AVIGATE's four layers nor HTAV's 256-wide
#   hierarchy;
# - AVIGATE takes a larger step: its fused frames move the video only through a 5% residual;
# - GAIS trains without dropout: the tiny random CLIP starts most positive pairs below zero
#   cosine, so GAIS's positive-weighted loss (main and support terms) first learns from about 2
#   pairs of a batch of 16; with dropout 0.3 as well, validation picks an early, undertrained
#   checkpoint in most seeds (test R@1 4-12 instead of 12-19 over seeds 0-2).
DEMO_HEAD_TRAINING = {
    "avigate": dict(lr=1e-2, head_options=dict(resampler_layers=1, fusion_layers=1)),
    "gais": dict(head_options=dict(dropout=0.0)),
    "htav": dict(head_options=dict(width=64)),
}


@dataclass
class DemoConfig:
    workdir: Path = Path("avr-demo")
    seed: int = 0
    budget_s: float = 150.0  # optional heads train only while the whole demo fits this
    heads: tuple[str, ...] = (*REQUIRED_HEADS, *OPTIONAL_HEADS)
    training: dict = field(default_factory=lambda: dict(DEMO_TRAINING))
    workers: int | None = None


@dataclass
class DemoRow:
    head: str
    result: EvalResult
    train_seconds: float
    epoch_seconds: float


@dataclass
class DemoResult:
    extract: ExtractSummary
    rows: list[DemoRow]
    skipped: list[str]
    seconds: float
    report: Path | None


def run_demo(config: DemoConfig, console=None) -> DemoResult:
    """The demo on ``DEMO_THREADS`` intra-op threads, whatever the machine's cores: the table
    then depends on the seed and the library versions alone (README, `avr demo`)."""
    with intra_op_threads(DEMO_THREADS):
        return _run_demo(config, console)


def _run_demo(config: DemoConfig, console) -> DemoResult:
    started = time.perf_counter()
    say = console.print if console is not None else (lambda *a, **k: None)
    data, cache, runs = (config.workdir / "data", config.workdir / "cache",
                         config.workdir / "runs")

    say(f"[bold]1. extract[/]  avr extract --dataset demo --root {data} --out {cache} "
        f"--backbones tiny --seed {config.seed}")
    summary = extract(ExtractConfig(dataset="demo", root=data, out=cache, weights="tiny",
                                    seed=config.seed, workers=config.workers, device="cpu"),
                      console=console)
    say(f"   {summary.done}/{summary.videos} clips, {summary.captions} captions, "
        f"{len(summary.failures)} failed, {summary.seconds:.1f} s")

    rows: list[DemoRow] = []
    skipped: list[str] = []
    report_dir = config.workdir / "report"
    for head in config.heads:
        run_dir = runs / head
        if run_dir.exists():  # the demo owns these runs; a rerun starts them afresh
            shutil.rmtree(run_dir)
        training = head_training(config, head)
        say(f"[bold]2. train[/]    avr train --cache {cache} --head {head} "
            f"{command_options(training)} --run-dir {run_dir}")
        deadline = None if head in REQUIRED_HEADS else started + config.budget_s
        try:
            trained = _train(cache, head, training, config.seed, run_dir, deadline, console)
        except _OverBudget as over:
            shutil.rmtree(run_dir, ignore_errors=True)
            skipped.append(head)
            say(f"   skipped: {head} needs about {over.seconds:.0f} s, beyond the budget")
            continue
        per_epoch = sum(h.seconds for h in trained.history) / max(1, len(trained.history))
        is_tefal = head == "tefal"
        say(f"[bold]3. eval[/]     avr eval --run {run_dir}"
            + (f" --report {report_dir}" if is_tefal else ""))
        result = evaluate_run(run_dir, config=EvalConfig(
            device="cpu", report=report_dir if is_tefal else None))
        write_metrics(result)
        rows.append(DemoRow(head, result, trained.seconds, per_epoch))
    report = next((r.result.report for r in rows if r.result.report is not None), None)
    return DemoResult(summary, rows, skipped, time.perf_counter() - started, report)


class _OverBudget(Exception):
    def __init__(self, seconds: float):
        self.seconds = seconds


def head_training(config: DemoConfig, head: str) -> dict:
    return {**config.training, **DEMO_HEAD_TRAINING.get(head, {})}


def command_options(training: dict) -> str:
    """``training`` as the `avr train` flags that give it."""
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in training.items() if k != "head_options"]
    flags += [f"--opt {k}={v}" for k, v in training.get("head_options", {}).items()]
    return " ".join(flags)


def _train(cache: Path, head: str, training: dict, seed: int, run_dir: Path,
           deadline: float | None, console):
    """Train one head with a progress bar; after its second epoch, give up on an optional head
    whose remaining epochs would run past ``deadline``."""
    from avr.progress import progress_bar

    epochs = training["epochs"]
    with progress_bar(console, fields="loss {task.fields[loss]:.3f}  val R@1 "
                                      "{task.fields[r1]:.1f}") as progress:
        task = progress.add_task(head, total=epochs, rate="", loss=0.0, r1=0.0)

        def on_epoch(epoch, log):
            progress.update(task, advance=1, rate=f"{log.pairs_per_s:,.0f} pairs/s",
                            loss=log.loss, r1=log.val_r1)
            remaining = log.seconds * (epochs - log.epoch)
            late = deadline is not None and time.perf_counter() + remaining > deadline
            if late and log.epoch == 2:  # the first epoch pays one-off costs
                raise _OverBudget(log.seconds * epochs)

        return trainer.train(cache, TrainConfig(head=head, seed=seed, **training), run_dir,
                             on_epoch=on_epoch)


def demo_json(demo: DemoResult) -> dict:
    """What `avr demo --json` prints: the table's rows with every metric, and what ran."""
    return {"cache": str(demo.extract.out), "videos": demo.extract.videos,
            "rows": [{"head": row.head, "t2v": row.result.metrics["t2v"],
                      "v2t": row.result.metrics["v2t"],
                      "audio_only": row.result.tags.get(AUDIO_ONLY, {}).get("t2v"),
                      "train_seconds": row.train_seconds, "epoch_seconds": row.epoch_seconds,
                      "run_dir": str(row.result.run_dir)}
                     for row in demo.rows],
            "skipped": demo.skipped, "seconds": demo.seconds,
            "report": None if demo.report is None else str(demo.report)}


def demo_table(demo: DemoResult):
    from rich.table import Table

    table = Table(title="avr demo: test split, text -> video",
                  caption="AO: the audio_only captions, which only sound can decide (twins "
                          "share their pixels)")
    for column in ("head", "R@1", "R@5", "R@10", "MdR", "v2t R@1", "AO R@1", "AO R@5",
                   "s/epoch"):
        table.add_column(column, justify="left" if column == "head" else "right")
    for row in demo.rows:
        t2v = row.result.metrics["t2v"]
        audio = row.result.tags.get(AUDIO_ONLY, {}).get("t2v")
        table.add_row(row.head, f"{t2v['R1']:.1f}", f"{t2v['R5']:.1f}", f"{t2v['R10']:.1f}",
                      f"{t2v['MdR']:.1f}", f"{row.result.metrics['v2t']['R1']:.1f}",
                      f"{audio['R1']:.1f}" if audio else "-",
                      f"{audio['R5']:.1f}" if audio else "-", f"{row.epoch_seconds:.2f}")
    return table
