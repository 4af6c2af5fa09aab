"""`avr train` and `avr sweep`: fusion heads trained on a store, one run or a study of many."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from avr.cli import _options as options
from avr.cli._app import app, console, err_console
from avr.errors import RunInterrupted


class _TrainProgress:
    """A run's first lines and its bar: the schedule line before anything loads; the run, its
    residency plan and the bar once the cache is loaded, so a store or budget that cannot train
    draws nothing. Close it when the run ends."""

    def __init__(self):
        self.progress = self.task = None

    def on_schedule(self, line: str) -> None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    def on_start(self, start) -> None:
        from avr.progress import progress_bar

        if start.note is not None:
            console.print(start.note, highlight=False, soft_wrap=True)
        what = f"resuming [bold]{start.head}[/] at epoch {start.done + 1}" if start.done else \
            f"training [bold]{start.head}[/]"
        console.print(f"{what} on {start.cache} -> {start.run_dir}")
        if start.plan is not None:
            console.print(start.plan.describe(), markup=False, highlight=False, soft_wrap=True)
        self.progress = progress_bar(console, fields="loss {task.fields[loss]:.3f}  val R@1 "
                                                     "{task.fields[r1]:.1f}")
        self.progress.start()
        self.task = self.progress.add_task(start.head, total=start.epochs, completed=start.done,
                                           rate="", loss=0.0, r1=0.0)

    def on_epoch(self, epoch, log) -> None:
        self.progress.update(self.task, advance=1, rate=f"{log.pairs_per_s:,.0f} pairs/s",
                             loss=log.loss, r1=log.val_r1)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


@app.command()
def train(
    cache: Optional[str] = typer.Option(None, help="Feature cache, a path or a URL (default: "
                                                   "cache/)."),
    head: Optional[str] = typer.Option(None, help="meanp | xpool | tefal | avigate | gais | htav "
                                                  "(default: tefal).", callback=options.known_head),
    epochs: Optional[int] = typer.Option(None, min=1, help="Epochs (default: the head's recipe; "
                                                           "more on a small train split)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=2,
                                             help="Batch (default: the head's recipe; less on a "
                                                  "small train split)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate of the head (default: its "
                                                  "recipe's; 3e-3 on a store of random "
                                                  "backbones).",
                                       callback=options.positive),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", min=0.0,
                                                 help="AdamW weight decay (default 0.2)."),
    warmup: Optional[float] = typer.Option(None, min=0.0, max=1.0,
                                           help="Warmup fraction of all steps (default 0.1)."),
    temperature: Optional[float] = typer.Option(None, help="Initial softmax temperature "
                                                "(default 0.01: CLIP's logit scale, 100; 0.07, "
                                                "CLIP's from-scratch start, on a store of "
                                                "random backbones).",
                                                callback=options.positive),
    dropout: Optional[float] = typer.Option(None, min=0.0, max=1.0,
                                            help="Head dropout (default: the head's recipe, "
                                                 "e.g. 0.3 for X-Pool on MSR-VTT 9k)."),
    fusion: Optional[str] = typer.Option(None, help="tefal: add | late | score_sum | concat | "
                                                    "xattn | stack."),
    pairs: Optional[str] = typer.Option(None, help="all (every caption each epoch, the default) "
                                                   "| one (a random caption per video).",
                                        callback=options.one_of("one", "all")),
    early_stop: Optional[int] = typer.Option(None, "--early-stop", min=0,
                                             help="Stop after N epochs without a better val R@1."),
    seed: Optional[int] = typer.Option(None, help="Seed of the head's initialisation and of the "
                                                  "batches (default 42)."),
    device: Optional[str] = options.device(None),
    memory_budget: Optional[float] = options.memory_budget(),
    resident: Optional[str] = options.resident(),
    opt: list[str] = options.opts("Any training or head option as key=value."),
    logger: list[str] = typer.Option([], "--logger", help="Also log every epoch to wandb or "
                                     "mlflow (repeatable; TensorBoard events are written "
                                     "whenever tensorboard is installed)."),
    config: Optional[Path] = typer.Option(None, "--config", help="run.toml with the same keys."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir",
                                           help="Where the run goes (default runs/<time>-<head>)."),
    resume: Optional[Path] = typer.Option(None, "--resume",
                                          help="Continue this run from its last checkpoint."),
    frames: Optional[int] = typer.Option(None, min=0, help="Frames read of each video's cached "
                                         "ones, evenly spaced (default: the recipe's; 0: every "
                                         "cached frame)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what the run would use (recipe, "
                                 "flags, the small-split rule, residency) with each value's "
                                 "source; train and write nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout "
                                 "(no progress): the run's best epoch, metrics and every "
                                 "epoch's log; with --dry-run, the plan."),
):
    """Train a fusion head on a feature cache; keeps the best checkpoint by val R@1.
    Under torchrun every process trains its share of each batch; rank 0 reports."""
    from avr.fuse import ddp
    from avr.fuse.config import TrainRequest
    from avr.fuse.trainer import dry_run as plan, train_from_options

    console.quiet = not ddp.is_main_process() or (as_json and not dry_run)
    request = TrainRequest(
        cache=cache, config_file=config, opts=opt, run_dir=run_dir, resume=resume,
        train=dict(head=head, epochs=epochs, batch_size=batch_size, lr=lr,
                   weight_decay=weight_decay, warmup=warmup, pairs=pairs, early_stop=early_stop,
                   seed=seed, device=device, memory_budget=memory_budget, resident=resident,
                   loggers=tuple(logger) or None),
        head=dict(temperature=temperature, dropout=dropout, fusion=fusion, frames=frames))
    if dry_run:
        _print_dry_run(plan(request), as_json)
        return

    shown = _TrainProgress()
    try:
        result = train_from_options(request, on_schedule=shown.on_schedule,
                                    on_start=shown.on_start, on_epoch=shown.on_epoch)
    except RunInterrupted as stopped:  # typer would turn it into a bare "Aborted!"
        shown.close()
        err_console.print(f"[bold yellow]{escape(str(stopped))}[/]", soft_wrap=True,
                          highlight=False)
        raise typer.Exit(130) from None
    finally:
        shown.close()
    if as_json:
        if ddp.is_main_process():
            options.print_json(train_result_json(result))
        return
    _print_train_result(result)


def train_result_json(result) -> dict:
    """What `avr train --json` prints: the run, its best epoch with its metrics, every epoch."""
    best = next((h for h in result.history if h.epoch == result.best_epoch), None)
    return {"run_dir": str(result.run_dir), "best_epoch": result.best_epoch,
            "best_val": None if best is None else {
                "R1": best.val_r1, "R5": best.val_r5, "R10": best.val_r10, "MdR": best.val_mdr},
            "seconds": round(result.seconds, 3), "train_videos": result.train_videos,
            "epochs": [h.row() for h in result.history]}


def _print_dry_run(run: dict, as_json: bool) -> None:
    import json

    if as_json:
        options.print_json(run)
        return
    console.print(f"dry run: {run['head']} on {run['cache']} (dataset {run['dataset']}, "
                  f"{run['train_videos']} train videos, {run['train_captions']} captions); "
                  f"nothing trains, nothing is written", highlight=False, soft_wrap=True)
    for line in (run["schedule"], run["residency_line"]):
        if line:
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    values = {**{k: v for k, v in run["train"].items() if k not in ("head", "head_options")},
              **run["head_options"]}
    width = max(map(len, values))
    for name, value in values.items():
        console.print(f"{name:<{width}}  {json.dumps(value):<14}  {run['sources'][name]}",
                      markup=False, highlight=False, soft_wrap=True)


def _print_train_result(result) -> None:
    per_epoch = sum(h.seconds for h in result.history) / max(1, len(result.history))
    console.print(f"best val t2v R@1 {result.best_val_r1:.1f} at epoch {result.best_epoch}; "
                  f"{per_epoch:.2f} s/epoch; run: {result.run_dir}")


@app.command()
def sweep(
    grid: Optional[str] = typer.Option(
        None, help='Searched options: lists and ranges, e.g. "lr=1e-5:1e-3:log '
                   'temperature=0.02:0.1 fusion=add,concat" (head=xpool,tefal searches heads). '
                   'Needed to start a sweep; a worker joining one takes the stored grid.'),
    search: Optional[str] = typer.Option(None, help="grid (every combination of lists; the "
                                                    "default) | random | tpe.",
                                         callback=options.one_of("grid", "random", "tpe")),
    trials: Optional[int] = typer.Option(None, min=1, help="Configurations to train (random, "
                                                           "tpe), over all workers."),
    name: Optional[str] = typer.Option(None, help="The study: runs/sweeps/<name>/ (default "
                                                  "<head>-<time>). Start it again to resume or "
                                                  "to add a worker."),
    storage: Optional[str] = typer.Option(None, help="Optuna database URL (default sqlite:///"
                                                     "runs/sweeps/<name>/study.db; "
                                                     "postgresql://user@host/db for workers on "
                                                     "several machines)."),
    prune: bool = typer.Option(False, "--prune", help="Stop hopeless trials early (Hyperband "
                                                      "over epochs of val R@1)."),
    cache: Optional[str] = typer.Option(None, help="Feature cache: a path or a URL (default "
                                                   "cache)."),
    head: Optional[str] = typer.Option(None, help="Head to sweep (default tefal).",
                                       callback=options.known_head),
    epochs: Optional[int] = typer.Option(None, min=1, help="Epochs per trial (default: avr "
                                         "train's)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=2,
                                             help="Batch (default: avr train's)."),
    seed: Optional[int] = typer.Option(None, help="Seed of every trial and of the sampler "
                                                  "(default 42)."),
    device: Optional[str] = options.device(None),
    memory_budget: Optional[float] = options.memory_budget(),
    resident: Optional[str] = options.resident(),
    opt: list[str] = options.opts("Fixed options as key=value."),
    save_runs: bool = typer.Option(False, "--save-runs", help="Keep every trial's weights "
                                                             "(default: the best trial's)."),
    parallel: int = typer.Option(1, min=1, help="Trials trained at once by this worker, as one "
                                                "stacked model where only lr, weight decay, "
                                                "warmup, seed or temperature differ."),
    heartbeat: Optional[int] = typer.Option(None, "--heartbeat", min=1,
                                            help="Seconds between a running trial's heartbeats "
                                                 "(default 20; kept by the study); a trial of "
                                                 "another machine without one for 6 of them is "
                                                 "taken as lost and trained again."),
    runs_dir: str = typer.Option("runs/sweeps", "--runs-dir",
                                 help="Where the sweep's folder goes (<runs-dir>/<name>/: "
                                      "trials, trials.csv, plots): a path, or a URL every "
                                      "worker reaches (s3://bucket/sweeps)."),
    study_timeout: float = typer.Option(120.0, "--study-timeout", callback=options.positive,
                                        help="Seconds a worker waits for another worker's lock "
                                             "on the study, or for its database server to come "
                                             "back, before it stops with one error line."),
    as_json: bool = typer.Option(False, "--json", help="Print the ranked trials as JSON on "
                                 "stdout (no progress)."),
):
    """Search training and head options on an Optuna study; one loaded cache per worker."""
    from avr.errors import SweepFailedError
    from avr.fuse.sweep import run_sweep

    console.quiet = as_json or console.quiet
    try:
        with _SweepProgress() as shown:
            result = run_sweep(name, grid=grid, search=search, trials=trials, prune=prune,
                               cache=cache, storage=storage, head=head, epochs=epochs,
                               batch_size=batch_size, seed=seed, device=device,
                               memory_budget=memory_budget, resident=resident, options=opt,
                               save_runs=save_runs, parallel=parallel,
                               study_timeout=study_timeout, heartbeat=heartbeat,
                               runs_dir=runs_dir,
                               callbacks=shown.callbacks())
    except SweepFailedError as failed:
        if as_json:
            options.print_json(sweep_result_json(failed.result))
        _print_sweep_table(failed.result)
        raise
    if as_json:
        options.print_json(sweep_result_json(result))
        return
    _print_sweep_table(result)
    if result.best is not None:
        best = result.best
        console.print(f"best: trial {best.number}, val R@1 {best.best_val_r1:.1f}, run "
                      f"{best.run_dir} (avr eval --run {best.run_dir})")
    console.print("wrote " + ", ".join(str(path) for path in result.paths)
                  + f"; browse the study with `optuna-dashboard {result.storage_url}`")


def sweep_result_json(result) -> dict:
    """What `avr sweep --json` prints: the study and its trials, best first."""
    from dataclasses import asdict

    return {"name": result.name, "storage": result.storage_url, "folder": str(result.location),
            "best": None if result.best is None else result.best.number,
            "trials": [asdict(row) for row in result.rows], "wrote": list(map(str, result.paths))}


class _SweepProgress:
    """A sweep's first lines and its bar: both start once the study is open, so a sweep refused
    before that prints nothing but its error."""

    def __init__(self):
        import contextlib

        self._bar = contextlib.ExitStack()
        self.progress, self.task, self.best = None, None, 0.0

    def __enter__(self) -> _SweepProgress:
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()

    def callbacks(self):
        from avr.fuse.sweep import SweepCallbacks

        return SweepCallbacks(on_start=self.on_start, on_epoch=self.on_epoch,
                              on_trial_end=self.on_trial_end)

    def on_start(self, start) -> None:
        from avr.progress import progress_bar

        plan, size = start.plan, start.plan.size()
        if start.schedule is not None:
            console.print(start.schedule, markup=False, highlight=False, soft_wrap=True)
        console.print(f"sweep [bold]{start.name}[/]: {plan.search} over {plan.grid} ({size} "
                      f"trial{'s' * (size != 1)}{', pruned' if plan.prune else ''}) on "
                      f"{plan.cache}; study {start.storage_url}")
        self.progress = self._bar.enter_context(progress_bar(
            console, fields="{task.fields[now]}  best val R@1 {task.fields[best]:.1f}"))
        self.best = start.best_val_r1
        self.task = self.progress.add_task(f"sweep {start.name}", total=size,
                                           completed=min(start.done, size), rate="", now="",
                                           best=self.best)

    def on_epoch(self, number, log) -> None:
        self.progress.update(self.task, now=f"trial {number} epoch {log.epoch} R@1 "
                                            f"{log.val_r1:.1f}",
                             rate=f"{log.pairs_per_s:,.0f} pairs/s")

    def on_trial_end(self, row) -> None:
        self.best = max(self.best, row.best_val_r1)
        self.progress.update(self.task, advance=1, best=self.best,
                             now=f"trial {row.number} {row.state}")


def _print_sweep_table(result) -> None:
    from rich.table import Table

    from avr.fuse.sweep.results import options_text

    plan = result.plan
    table = Table(title=f"sweep {result.name}: "
                        f"{'heads' if plan.searches_head else plan.base.head} on {plan.cache}")
    for column in ("rank", "trial", "state", "options", "val R@1", "best epoch", "epochs",
                   "s/trial"):
        table.add_column(column)
    for rank, row in enumerate(result.rows, 1):
        table.add_row(str(rank), str(row.number), row.state, options_text(row.options),
                      f"{row.best_val_r1:.1f}", str(row.best_epoch or "-"),
                      _trained_epochs(row), f"{row.seconds:.1f}")
    console.print(table)
    for row in result.failed:
        console.print(f"trial {row.number} failed: {row.error}", markup=False, highlight=False,
                      soft_wrap=True)


def _trained_epochs(row) -> str:
    return str(row.epochs) if row.repeats is None else f"0 (as trial {row.repeats})"
