"""The `avr` command line: a thin typer layer that parses and calls into the stages.

Usage errors (an unknown option, a value of the wrong type or out of range, a missing argument)
are typer's own: its short usage message and exit status 2, before any work starts. Errors
derived from AvrError are printed as one message without a traceback (exit status 2);
``--debug`` shows the traceback. Every option that names a store takes a path or a URL
(``s3://bucket/cache``, ``file:///data/cache``), resolved by ``avr.schema.store_location``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from avr.errors import AvrError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Audio-enhanced text-to-video retrieval: cache features once, "
                       "train fusion heads in seconds.")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and export feature caches.")
app.add_typer(cache_app, name="cache")

console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}

DEVICE_HELP = "auto | cpu | cuda | cuda:N."
COMPRESSIONS = ("zstd", "lz4", "none")  # avr.schema.COMPRESSIONS, without importing numpy here
COMPRESSION_HELP = ("Codecs of a new store's chunks, each with a crc32c checksum: zstd (smallest), "
                    "lz4 (decodes 1.7-1.9x as fast), none (fastest to stream). A resumed "
                    "store keeps its own.")


def _checked(check):
    """An option callback that runs ``check(value)`` on a given value; its AvrError becomes a
    usage error, shown by typer before any work starts."""
    def callback(value):
        if value is not None:
            try:
                check(value)
            except AvrError as error:
                raise typer.BadParameter(str(error)) from None
        return value

    return callback


def _choose(value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise AvrError(f"{value!r} is not one of {', '.join(choices)}")


def _one_of(*choices: str):
    return _checked(lambda value: _choose(value, choices))


def _positive(value: float) -> None:
    if not value > 0:
        raise AvrError(f"{value} must be > 0")


def _device(name: str) -> None:
    from avr.device import resolve_device

    resolve_device(name)


def _head(name: str) -> None:
    from avr.fuse.heads import head_class

    head_class(name)


def _fusion(name: str) -> None:
    from avr.fuse.heads.tefal import FUSIONS

    _choose(name, FUSIONS)


def _dataset(name: str) -> None:
    from avr.extract.datasets import layout_of

    layout_of(name)


device_option = _checked(_device)
head_option = _checked(_head)
positive_option = _checked(_positive)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")):
    _state["debug"] = debug


# ---- stage one: extract and cache ------------------------------------------------------------

@app.command()
def extract(
    dataset: str = typer.Option("vatex", help="vatex | msrvtt | lsmdc | charades | didemo | "
                                "msvd | activitynet | generic | demo.",
                                callback=_checked(_dataset)),
    root: Optional[Path] = typer.Option(None, help="Dataset files (default data/<dataset>/)."),
    videos_dir: Optional[Path] = typer.Option(
        None, "--videos-dir", help="The folder of the videos, relative to --root or absolute "
                                   "(default: the folders the dataset's releases use, e.g. "
                                   "videos/, vids/, MSRVTT_Videos/)."),
    show_layout: bool = typer.Option(False, "--show-layout",
                                     help="Print the files the dataset expects under --root."),
    out: str = typer.Option("cache", help="The Zarr store to write or resume: a path or a "
                                          "URL (s3://bucket/cache, file:///data/cache)."),
    backbones: str = typer.Option("real", help="real (pretrained weights) | tiny (small random "
                                               "configs of the same classes, for tests/demo).",
                                  callback=_one_of("real", "tiny")),
    clip_model: str = typer.Option("ViT-B-32", "--clip-model", help="open_clip model name."),
    clip_pretrained: str = typer.Option("openai", "--clip-pretrained",
                                        help="open_clip pretrained tag or a local checkpoint."),
    swin: str = typer.Option("microsoft/swin-tiny-patch4-window7-224",
                             help="Swin: HF model id or local directory."),
    ast: str = typer.Option("MIT/ast-finetuned-audioset-10-10-0.4593",
                            help="AST: HF model id or local directory."),
    roberta: str = typer.Option("roberta-base", help="RoBERTa: HF model id or local directory."),
    clip_text_tokens: Optional[int] = typer.Option(
        None, "--clip-text-tokens", min=1, help="CLIP text tokens kept per caption (default 32; "
                                                "77, CLIP's whole context, for paragraphs)."),
    roberta_text_tokens: Optional[int] = typer.Option(
        None, "--roberta-text-tokens", min=1, max=512,
        help="RoBERTa tokens kept per caption (default 32; 256 for paragraphs)."),
    frames: Optional[int] = typer.Option(None, "--frames", min=1,
                                         help="Frames per video (default: the dataset's; 12 "
                                              "msrvtt, lsmdc, msvd; 32 vatex, charades; 64 "
                                              "didemo, activitynet; --show-layout says)."),
    device: str = typer.Option("auto", help=DEVICE_HELP, callback=device_option),
    workers: Optional[int] = typer.Option(None, min=0,
                                          help="Decode processes (0: in this process); "
                                               "a dask worker decodes its own chunks."),
    chunk_rows: Optional[int] = typer.Option(None, "--chunk-rows", min=1,
                                             help="Video rows per chunk and per write."),
    compression: str = typer.Option("zstd", "--compression", help=COMPRESSION_HELP,
                                    callback=_one_of(*COMPRESSIONS)),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace a store made with other settings."),
    seed: int = typer.Option(0, help="Seed of tiny backbones and of the demo clips."),
    option: list[str] = typer.Option([], "--opt", "--option", help="Dataset option key=value "
                                     "(msrvtt: train=7k, val_size=500; didemo: captions=moments; "
                                     "lsmdc: captions=all; --show-layout lists them)."),
    scheduler: Optional[str] = typer.Option(
        None, "--scheduler", help="Run the chunks on this dask scheduler's workers "
                                  "(tcp://HOST:PORT); --out and --root must be reachable from "
                                  "every worker at the same paths."),
    dask_workers: Optional[int] = typer.Option(
        None, "--dask-workers", min=1, help="Run the chunks on a local dask cluster of N worker "
                                     "processes (one thread each)."),
):
    """Decode a dataset, run the frozen backbones once, write every token to a Zarr store."""
    from avr.extract.datasets import layout_of

    if show_layout:
        console.print(layout_of(dataset), markup=False, highlight=False, soft_wrap=True)
        return
    from avr.extract.backbones import BackboneNames
    from avr.extract.pipeline import ExtractConfig, extract as run_extract
    from avr.fuse.config import parse_options

    config = ExtractConfig(
        dataset=dataset, root=root, videos_dir=videos_dir, out=out, weights=backbones,
        names=BackboneNames(clip_model=clip_model, clip_pretrained=clip_pretrained, swin=swin,
                            ast=ast, roberta=roberta, clip_text_tokens=clip_text_tokens,
                            roberta_text_tokens=roberta_text_tokens),
        num_frames=frames, device=device, workers=workers, chunk_rows=chunk_rows,
        compression=compression, overwrite=overwrite, seed=seed,
        dataset_options=parse_options(option))
    if scheduler is None and dask_workers is None:
        summary = run_extract(config, console=console)
    else:
        from avr.extract.distributed import dask_client, extract_on_dask

        with dask_client(scheduler, dask_workers) as client:
            summary = extract_on_dask(config, client, console=console)
    _print_extract_summary(summary)


def _print_extract_summary(summary) -> None:
    failed = len(summary.failures)
    console.print(
        f"[bold]{summary.out}[/]: {summary.done}/{summary.videos} videos done "
        f"({summary.done_now} now, {failed} failed), {summary.captions} captions, "
        f"{summary.bytes_on_disk / 1e6:,.1f} MB; {summary.seconds:.1f} s "
        f"({summary.clips_per_s:.1f} clips/s; decode {summary.decode_seconds:.1f} s over workers, "
        f"backbones {summary.encode_seconds:.1f} s on {summary.device})")
    for failure in summary.failures[:10]:
        console.print(f"  [red]failed[/] {failure.video_id}: {failure.reason} ({failure.path})")
    if failed > 10:
        console.print(f"  ... {failed - 10} more in {summary.out}/failures.jsonl")


@cache_app.command("info")
def cache_info(
    path: str = typer.Argument("cache", help="The store: a path or a URL."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Rows, arrays, shapes, bytes, backbones and failures of a store."""
    import json

    from rich.table import Table

    from avr.cache import cache_info as read_info

    info = read_info(path)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    videos, captions = info["videos"], info["captions"]
    console.print(f"[bold]{info['path']}[/] dataset {info['dataset']}, schema "
                  f"{info['schema_version']}, created {info['created']}, fingerprint "
                  f"{info['fingerprint']}")
    splits = ", ".join(f"{k} {v}" for k, v in videos["per_split"].items())
    console.print(f"videos {videos['done']}/{videos['rows']} done ({splits}), "
                  f"{videos['failed']} failed; captions {captions['done']}/{captions['rows']}; "
                  f"{info['bytes'] / 1e6:,.1f} MB on disk")
    if info["absent_chunks"]:
        console.print(f"[red]{len(info['absent_chunks'])} chunks under done rows are absent[/] "
                      f"(first: {info['absent_chunks'][0]['array']} rows "
                      f"{info['absent_chunks'][0]['rows']}); run `avr cache verify {path}`")
    _print_unwritten(info["unwritten"])
    table = Table("array", "shape", "dtype", "chunks", "compression", "MB on disk")
    for name, array in info["arrays"].items():
        table.add_row(name, " x ".join(map(str, array["shape"])), array["dtype"],
                      " x ".join(map(str, array["chunks"])), array["compression"],
                      "unwritten" if array["unwritten"] else f"{array['stored_bytes'] / 1e6:,.2f}")
    console.print(table)
    backbones = Table("role", "model", "weights", "library")
    for role, backbone in info["backbones"].items():
        backbones.add_row(role, backbone["name"], backbone["weights"],
                          f"{backbone['library']} {backbone['version']}")
    console.print(backbones)
    for failure in info["failures"]:
        console.print(f"  [red]failed[/] {failure['video_id']}: {failure['reason']} "
                      f"({failure['path']})")


@cache_app.command("export")
def cache_export(
    path: str = typer.Argument(..., help="The store: a path or a URL."),
    out: str = typer.Argument(..., help="Output file: a path or a URL."),
    format: str = typer.Option("h5", "--format", help="h5 (HDF5, same array names).",
                               callback=_one_of("h5")),
):
    """Write a store to another format under the same array names."""
    from avr.cache import export_h5, stored_bytes

    written = export_h5(path, out)
    console.print(f"wrote {written} ({stored_bytes(written) / 1e6:,.1f} MB)")


@cache_app.command("verify")
def cache_verify(
    path: str = typer.Argument("cache", help="The store: a path or a URL."),
    repair: bool = typer.Option(False, "--repair", help="Mark the damaged rows not done, so "
                                                         "that the next `avr extract` "
                                                         "recomputes exactly those."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Read every chunk under done rows: present, checksum holds. Exit 0 clean, 1 damaged."""
    import json

    from avr.integrity import repair_store, verify_store
    from avr.lock import StoreLock

    progress_console = None if as_json else console
    if repair:
        with StoreLock(path) as lock:
            report = verify_store(path, console=progress_console)
            if not report.clean:
                repair_store(path, report, lock)
    else:
        report = verify_store(path, console=progress_console)
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        _print_verify_report(report)
    if not report.clean:
        raise typer.Exit(1)


def _print_unwritten(unwritten: dict[str, str]) -> None:
    """The arrays a store leaves unwritten on purpose, grouped by the command that did."""
    by_command: dict[str, list[str]] = {}
    for name, command in unwritten.items():
        by_command.setdefault(command, []).append(name)
    for command, names in by_command.items():
        console.print(f"[yellow]{len(names)} arrays left unwritten on purpose[/] by `{escape(command)}` "
                      f"(not damage; runs that read them are refused): {', '.join(names)}",
                      highlight=False, soft_wrap=True)


def _print_verify_report(report) -> None:
    from rich.table import Table

    from avr.progress import rate_text

    checked = (f"{report.chunks:,} chunks of {report.arrays} arrays ({report.bytes / 1e6:,.1f} "
               f"MB decoded) in {report.seconds:.1f} s "
               f"({rate_text(report.bytes / 1e6, report.seconds, 'MB')})")
    if report.writer:
        console.print(f"[yellow]being written by {report.writer}[/]: rows it finishes after "
                      f"this check began were not checked")
    if report.without_checksum:
        console.print(f"[yellow]{len(report.without_checksum)} of {report.arrays} arrays were "
                      f"written without checksums[/]: absent and undecodable chunks are found "
                      f"there, silently altered bytes are not (`avr extract --overwrite` "
                      f"rewrites the store with them)")
    _print_unwritten(report.unwritten)
    if report.clean:
        done = ", ".join(f"{kind}s {len(report.done[kind])}/{report.rows[kind]} done"
                         for kind in report.rows)
        console.print(f"[bold green]clean[/]: {report.store}: {checked}; {done}")
        return
    console.print(f"[bold red]damaged[/]: {report.store}: {len(report.damage)} damaged chunks "
                  f"found in {checked}")
    table = Table("array", "chunk", "rows", "problem")
    for damage in report.damage:
        table.add_row(damage.array, damage.key, f"{damage.kind} {damage.rows[0]}-"
                      f"{damage.rows[1] - 1}", damage.problem)
    console.print(table)
    rows = report.damaged_rows()
    ids = report.damaged_video_ids()
    shown = f" ({', '.join(ids[:10])}{' ...' if len(ids) > 10 else ''})" if ids else ""
    console.print(f"rows to recompute: {len(rows['video'])} videos{shown}, "
                  f"{len(rows['caption'])} captions")
    for name in report.missing_arrays:
        console.print(f"[red]array {name} is gone[/] (its zarr.json): re-extract with --overwrite")
    if report.unrepairable:
        names = ", ".join(sorted({d.array for d in report.unrepairable}))
        console.print(f"[red]not repairable by --repair[/]: the row index ({names}) cannot be "
                      f"recomputed from rows; re-extract with --overwrite")
    if report.repaired is not None:
        console.print(f"repaired: {len(rows['video'])} video rows and {len(rows['caption'])} "
                      f"caption rows marked not done, "
                      f"{len(report.repaired['rewritten_chunks'])} undecodable chunks cleared; "
                      f"run the same `avr extract` again to recompute them")
    else:
        console.print(f"`avr cache verify {report.store} --repair` marks them not done; the "
                      f"same `avr extract` then recomputes them")


@cache_app.command("break-lock")
def cache_break_lock(
    path: str = typer.Argument(..., help="The store: a path or a URL."),
):
    """Remove a store's lock left by a writer that is gone (refused while it runs here)."""
    from avr.lock import break_lock

    holder = break_lock(path)
    if holder is None:
        console.print(f"{path}: no lock to remove")
    else:
        console.print(f"removed the lock of {path} held by {holder.describe()}")


def _require_head_arrays(cache: str, head: str, *options: dict) -> None:
    """Refuse a store that leaves an array the head reads unwritten on purpose."""
    from avr.fuse.heads import head_class, video_inputs
    from avr.integrity import require_arrays_written

    require_arrays_written(cache, (*video_inputs(head, *options), *head_class(head).caption_inputs))


# ---- stage two: train and sweep --------------------------------------------------------------

BUDGET_HELP = ("GB of cached arrays held on the host and the device (default: what fits, with "
               "headroom); a train split beyond it streams from the store.")
RESIDENT_HELP = ("fp16: token arrays held as stored (default) | int8: with a per-token fp16 "
                 "scale, dequantized per batch on the device (about half the bytes).")


class _TrainProgress:
    """A run's first lines and its bar: the bar's task starts once the cache is loaded and the
    residency plan printed, so a store or budget that cannot train draws nothing."""

    def __init__(self, progress, description: str, epochs: int | None, intro: str | None = None):
        self.progress, self.description, self.epochs, self.intro = (progress, description,
                                                                    epochs, intro)
        self.task = None

    def on_plan(self, plan) -> None:
        if self.intro is not None:
            console.print(self.intro)
        console.print(plan.describe(), markup=False, highlight=False, soft_wrap=True)
        self.task = self.progress.add_task(self.description, total=self.epochs, rate="",
                                           loss=0.0, r1=0.0)

    def on_epoch(self, epoch, log) -> None:
        self.progress.update(self.task, advance=1, rate=f"{log.pairs_per_s:,.0f} pairs/s",
                             loss=log.loss, r1=log.val_r1)


@app.command()
def train(
    cache: Optional[str] = typer.Option(None, help="Feature cache, a path or a URL (default: "
                                                   "cache/)."),
    head: Optional[str] = typer.Option(None, help="meanp | xpool | tefal | avigate | gais | htav "
                                                  "(default: tefal).", callback=head_option),
    epochs: Optional[int] = typer.Option(None, min=1, help="Epochs (default 5; more on a small "
                                                           "train split)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=2,
                                             help="Batch (default 128; less on a small train "
                                                  "split)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default 1e-4; 3e-3 on a store "
                                                  "of random backbones).",
                                       callback=positive_option),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", min=0.0),
    warmup: Optional[float] = typer.Option(None, min=0.0, max=1.0,
                                           help="Warmup fraction of all steps."),
    temperature: Optional[float] = typer.Option(None, help="Initial softmax temperature "
                                                "(default 0.01: CLIP's logit scale, 100; 0.07, "
                                                "CLIP's from-scratch start, on a store of "
                                                "random backbones).",
                                                callback=positive_option),
    dropout: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Head dropout."),
    fusion: Optional[str] = typer.Option(None, help="tefal: add | late | score_sum | concat | "
                                                    "xattn | stack.",
                                         callback=_checked(_fusion)),
    pairs: Optional[str] = typer.Option(None, help="one (a random caption per video per epoch) "
                                                   "| all (every caption).",
                                        callback=_one_of("one", "all")),
    early_stop: Optional[int] = typer.Option(None, "--early-stop", min=0,
                                             help="Stop after N epochs without a better val R@1."),
    seed: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP, callback=device_option),
    memory_budget: Optional[float] = typer.Option(None, "--memory-budget", help=BUDGET_HELP,
                                                  callback=positive_option),
    resident: Optional[str] = typer.Option(None, "--resident", help=RESIDENT_HELP,
                                           callback=_one_of("fp16", "int8")),
    opt: list[str] = typer.Option([], "--opt", "--option",
                                  help="Any training or head option as key=value."),
    config: Optional[Path] = typer.Option(None, "--config", help="run.toml with the same keys."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir",
                                           help="Where the run goes (default runs/<time>-<head>)."),
    resume: Optional[Path] = typer.Option(None, "--resume",
                                          help="Continue this run from its last checkpoint."),
):
    """Train a fusion head on a feature cache; keeps the best checkpoint by val R@1.
    Under torchrun every process trains its share of each batch; rank 0 reports."""
    from avr import schema
    from avr.fuse import distributed, trainer
    from avr.fuse.config import resume_changes, train_config as train_config_of
    from avr.progress import progress_bar

    console.quiet = not distributed.is_main_process()

    extra = [f"{k}={v}" for k, v in (("temperature", temperature), ("dropout", dropout),
                                      ("fusion", fusion)) if v is not None]
    flags = dict(head=head, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                 warmup=warmup, pairs=pairs, early_stop=early_stop, seed=seed, device=device,
                 memory_budget=memory_budget, resident=resident)
    if resume is not None:
        changes = resume_changes(resume, {**flags, "temperature": temperature, "dropout": dropout,
                                          "fusion": fusion, "config": config, "run_dir": run_dir},
                                 opt)
        with progress_bar(console, fields="loss {task.fields[loss]:.3f}  val R@1 "
                                          "{task.fields[r1]:.1f}") as progress:
            shown = _TrainProgress(progress, f"resume {resume.name}", epochs)
            result = trainer.resume(resume, changes, cache_path=cache, on_epoch=shown.on_epoch,
                                    on_plan=shown.on_plan)
        _print_train_result(result)
        return
    train_config, toml_cache = train_config_of(config, flags, [*extra, *opt])
    cache_path = cache or toml_cache or trainer.DEFAULT_CACHE
    # a missing store, or one without the head's arrays, is reported before anything is drawn
    _require_head_arrays(cache_path, train_config.head, train_config.head_options)
    # What `trainer.train` will resolve the unset schedule to, shown before anything else.
    resolved, schedule = trainer.schedule_for_store(cache_path, train_config)
    if schedule is not None:
        console.print(schedule, markup=False, highlight=False, soft_wrap=True)
    run_dir = run_dir or trainer.default_run_dir(train_config.head)
    with progress_bar(console, fields="loss {task.fields[loss]:.3f}  val R@1 "
                                      "{task.fields[r1]:.1f}") as progress:
        shown = _TrainProgress(progress, train_config.head, resolved.epochs,
                               f"training [bold]{train_config.head}[/] on {cache_path} -> "
                               f"{run_dir}")
        result = trainer.train(cache_path, train_config, run_dir, on_epoch=shown.on_epoch,
                               on_plan=shown.on_plan)
    _print_train_result(result)


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
                                         callback=_one_of("grid", "random", "tpe")),
    trials: Optional[int] = typer.Option(None, min=1, help="Configurations to train (random, "
                                                           "tpe), over all workers."),
    name: Optional[str] = typer.Option(None, help="The study: runs/sweeps/<name>/ (default "
                                                  "<head>-<time>). Start it again to resume or "
                                                  "to add a worker."),
    storage: Optional[str] = typer.Option(None, help="Optuna database URL (default sqlite:///"
                                                     "runs/sweeps/<name>/study.db)."),
    prune: bool = typer.Option(False, "--prune", help="Stop hopeless trials early (Hyperband "
                                                      "over epochs of val R@1)."),
    cache: Optional[str] = typer.Option(None, help="Feature cache: a path or a URL (default "
                                                   "cache)."),
    head: Optional[str] = typer.Option(None, help="Head to sweep (default tefal).",
                                       callback=head_option),
    epochs: Optional[int] = typer.Option(None, min=1, help="Epochs per trial (default: avr "
                                         "train's)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=2,
                                             help="Batch (default: avr train's)."),
    seed: Optional[int] = typer.Option(None, help="Seed of every trial and of the sampler "
                                                  "(default 42)."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP, callback=device_option),
    memory_budget: Optional[float] = typer.Option(None, "--memory-budget", help=BUDGET_HELP,
                                                  callback=positive_option),
    resident: Optional[str] = typer.Option(None, "--resident", help=RESIDENT_HELP,
                                           callback=_one_of("fp16", "int8")),
    opt: list[str] = typer.Option([], "--opt", "--option", help="Fixed options as key=value."),
    save_runs: bool = typer.Option(False, "--save-runs", help="Keep every trial's weights "
                                                             "(default: the best trial's)."),
    parallel: int = typer.Option(1, min=1, help="Trials trained at once by this worker, as one "
                                                "stacked model where only lr, weight decay, "
                                                "warmup, seed or temperature differ."),
):
    """Search training and head options on an Optuna study; one loaded cache per worker."""
    import time

    from avr import schema
    from avr.fuse import sweep as sweeps, trainer

    flags = dict(head=head, epochs=epochs, batch_size=batch_size, seed=seed, device=device,
                 memory_budget=memory_budget, resident=resident)
    if name is None:
        name = f"{head or 'tefal'}-{time.strftime('%Y%m%d-%H%M%S')}"
    url = sweeps.storage_url(name, storage)
    with sweeps.opening(url):  # workers started together create the study once
        plan = sweeps.resolve_plan(name, sweeps.stored_plan(name, url), grid=grid,
                                   search=search, trials=trials, prune=prune, cache=cache,
                                   flags=flags, opts=opt)
        schema.open_store(plan.cache)  # a missing store is reported before anything is drawn
        if "head=" not in plan.grid:
            _require_head_arrays(plan.cache, plan.base.head, plan.base.head_options)
        _, schedule = trainer.schedule_for_store(plan.cache, plan.base)
        study_storage = sweeps.open_storage(url)
        study = sweeps.open_study(name, plan, study_storage)
    if schedule is not None:
        console.print(schedule, markup=False, highlight=False, soft_wrap=True)
    out_dir = sweeps.sweep_dir(name)
    size = plan.size()
    console.print(f"sweep [bold]{name}[/]: {plan.search} over {plan.grid} ({size} "
                  f"trial{'s' * (size != 1)}{', pruned' if plan.prune else ''}) on {plan.cache};"
                  f" study {study_storage.url}")
    _run_sweep_worker(name, study, study_storage, plan, out_dir, parallel)
    rows = sweeps.finished_rows(study)
    _print_sweep_table(name, plan, rows)
    paths = [sweeps.write_trials_csv(study, out_dir), *sweeps.write_plots(study, out_dir)]
    if not save_runs:
        sweeps.drop_weights_of_others(study)
    best = next((row for row in rows if row.state == "complete"), None)
    if best is not None:
        console.print(f"best: trial {best.number}, val R@1 {best.best_val_r1:.1f}, run "
                      f"{best.run_dir} (avr eval --run {best.run_dir})")
    console.print("wrote " + ", ".join(str(path) for path in paths)
                  + f"; browse the study with `optuna-dashboard {study_storage.url}`")


def _run_sweep_worker(name, study, study_storage, plan, out_dir, parallel) -> None:
    from avr.fuse import sweep as sweeps
    from avr.progress import progress_bar

    done = len([row for row in sweeps.finished_rows(study) if row.state != "failed"])
    with progress_bar(console, fields="{task.fields[now]}  best val R@1 "
                                      "{task.fields[best]:.1f}") as progress:
        task = progress.add_task(f"sweep {name}", total=plan.size(), completed=min(done,
                                 plan.size()), rate="", now="", best=0.0)
        best = [max((r.best_val_r1 for r in sweeps.finished_rows(study)), default=0.0)]

        def on_epoch(number, log):
            progress.update(task, now=f"trial {number} epoch {log.epoch} R@1 {log.val_r1:.1f}",
                            rate=f"{log.pairs_per_s:,.0f} pairs/s")

        def on_trial_end(row):
            best[0] = max(best[0], row.best_val_r1)
            progress.update(task, advance=1, best=best[0], now=f"trial {row.number} {row.state}")

        sweeps.run_worker(study, study_storage, plan, out_dir,
                          sweeps.SweepCallbacks(on_epoch=on_epoch, on_trial_end=on_trial_end),
                          parallel=parallel)


def _print_sweep_table(name, plan, rows) -> None:
    from rich.table import Table

    table = Table(title=f"sweep {name}: {plan.base.head if 'head=' not in plan.grid else 'heads'}"
                        f" on {plan.cache}")
    for column in ("rank", "trial", "state", "options", "val R@1", "best epoch", "epochs",
                   "s/trial"):
        table.add_column(column)
    for rank, row in enumerate(rows, 1):
        options = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row.options.items())
        table.add_row(str(rank), str(row.number), row.state, options, f"{row.best_val_r1:.1f}",
                      str(row.best_epoch or "-"), _trained_epochs(row), f"{row.seconds:.1f}")
    console.print(table)


def _trained_epochs(row) -> str:
    return str(row.epochs) if row.repeats is None else f"0 (as trial {row.repeats})"


# ---- stage three: eval and search ------------------------------------------------------------

def _metrics_table(result):
    from rich.table import Table

    table = Table(title=f"{result.head} on {result.split} of {result.cache} "
                        f"({result.num_captions} captions x {result.num_videos} videos"
                        f"{', modalities ' + result.modalities if result.modalities != 'va' else ''})")
    for column in ("", "R@1", "R@5", "R@10", "MdR", "MnR"):
        table.add_column(column, justify="right" if column else "left")

    def row(name, m):
        table.add_row(name, f"{m['R1']:.1f}", f"{m['R5']:.1f}", f"{m['R10']:.1f}",
                      f"{m['MdR']:.1f}", f"{m['MnR']:.1f}")

    row("t2v", result.metrics["t2v"])
    row("v2t", result.metrics["v2t"])
    for name, variant in result.variants.items():
        for direction, m in variant.items():
            row(f"{direction} {name}", m)
    for tag, m in result.tags.items():
        row(f"t2v {tag} ({m['captions']})", m["t2v"])
    return table


@app.command("eval")
def eval_(
    run: Optional[Path] = typer.Option(None, "--run", help="Run directory (default: the latest "
                                                           "under runs/)."),
    cache: Optional[str] = typer.Option(None, help="Cache, a path or a URL (default: the run's "
                                                   "own)."),
    split: str = typer.Option("test", help="test | val.", callback=_one_of("test", "val")),
    dsl: bool = typer.Option(False, "--dsl", help="Also report dual softmax (transductive)."),
    dsl_temperature: Optional[float] = typer.Option(
        None, "--dsl-temperature", help="Dual softmax temperature; implies --dsl (default: the "
        "head's, else 3 as AVIGATE's release; GAID's release uses 1)."),
    qbnorm: bool = typer.Option(False, "--qbnorm", help="Also report QB-Norm with the train "
                                                        "captions as query bank."),
    rerank_k: Optional[int] = typer.Option(None, "--rerank-k", min=1, help="Also report two-stage "
                                           "retrieval: faiss over mean-pooled CLIP, head re-ranks "
                                           "the top K."),
    modalities: str = typer.Option("va", help="va | v (audio masked) | a (frames masked).",
                                   callback=_one_of("va", "v", "a")),
    device: str = typer.Option("auto", help=DEVICE_HELP, callback=device_option),
    save_similarity: Optional[Path] = typer.Option(None, "--save-similarity",
                                                   help="Write sim [captions x videos] and "
                                                        "caption_video to this .npz."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the metrics as JSON."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write report.md with plots "
                                                                 "into this directory."),
    index: Optional[str] = typer.Option(None, "--index", help="First-stage index for "
                                        "--rerank-k, a path or a URL (default: CACHE/index/ "
                                        "when built)."),
    score_chunk: int = typer.Option(0, "--score-chunk", min=0, help="Videos per scoring block "
                                    "(0: from the GPU's free memory; 64 on the CPU)."),
    memory_budget: Optional[float] = typer.Option(None, "--memory-budget", help="GB of cached "
                                                  "arrays held (default: what fits); a split "
                                                  "beyond it is read from the store in batches.",
                                                  callback=positive_option),
    resident: str = typer.Option("fp16", "--resident", help="fp16: token arrays as stored "
                                 "(default, also for a run trained with int8) | int8.",
                                 callback=_one_of("fp16", "int8")),
):
    """Evaluate a trained run: t2v and v2t R@1/5/10, MdR, MnR from the head's own scores."""

    import numpy as np

    from avr.evaluate.evaluator import EvalConfig, evaluate_run, write_metrics

    config = EvalConfig(split=split, dsl=dsl or dsl_temperature is not None,
                        dsl_temperature=dsl_temperature, qbnorm=qbnorm, rerank_k=rerank_k,
                        modalities=modalities, device=device, report=report, index=index,
                        score_chunk=score_chunk, memory_budget=memory_budget, resident=resident)
    result = evaluate_run(run, cache, config)
    if result.residency["tokens"] == "store" or resident == "int8":
        held = ("read from the store a batch of rows at a time"
                if result.residency["tokens"] == "store" else "held in memory")
        console.print(f"{split} split ({result.residency['bytes'] / 1e9:.2f} GB, tokens "
                      f"{resident}) {held}; budget {result.residency['budget_bytes'] / 1e9:.2f} "
                      f"GB ({result.residency['budget_source']})", highlight=False)
    console.print(_metrics_table(result))
    if result.protocol_note() is not None:
        console.print(result.protocol_note(), highlight=False)
    if result.missing_videos:
        console.print(f"[yellow]{len(result.missing_videos)} {split} videos failed extraction; "
                      f"their captions count as failed queries[/]")
    write_metrics(result, json_out)
    if save_similarity is not None:
        np.savez(save_similarity, sim=result.sim, caption_video=result.caption_video)
        console.print(f"similarity -> {save_similarity}")
    if result.report is not None:
        console.print(f"report -> {result.report}")


@app.command()
def search(
    query: str = typer.Argument(..., help='e.g. "a dog barks while a red ball rolls"'),
    run: Optional[Path] = typer.Option(None, "--run", help="Run directory (default: latest)."),
    k: int = typer.Option(10, "--k", min=1, help="How many videos to show."),
    split: str = typer.Option("test", help="test | val | train | all.",
                              callback=_one_of("test", "val", "train", "all")),
    device: str = typer.Option("auto", help=DEVICE_HELP, callback=device_option),
    index: Optional[str] = typer.Option(None, "--index", help="First-stage index, a path or a "
                                        "URL (default: CACHE/index/ when `avr index build` made "
                                        "one)."),
    candidates: Optional[int] = typer.Option(None, "--candidates", min=1, help="Videos per split the "
                                             "index hands to the head (default: 10 x k, and "
                                             "only for splits over 10,000 videos)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Encode a query with the run's text backbones and rank the cache's videos with its head."""
    import json

    from rich.table import Table

    from avr.evaluate.search import search as run_search

    hits = run_search(query, run, k=k, split=split, device=device, index=index,
                      candidates=candidates)
    if as_json:
        print(json.dumps([vars(h) for h in hits], indent=2))
        return
    table = Table("rank", "video", "split", "score", "a caption of it", title=query)
    for rank, hit in enumerate(hits, 1):
        table.add_row(str(rank), hit.video_id, hit.split, f"{hit.score:.4f}",
                      hit.captions[0] if hit.captions else "")
    console.print(table)


index_app = typer.Typer(no_args_is_help=True,
                        help="Build the first-stage faiss index of a cache.")
app.add_typer(index_app, name="index")


@index_app.command("build")
def index_build(
    cache: str = typer.Argument("cache", help="The store: a path or a URL."),
    out: Optional[str] = typer.Option(None, "--out", help="Index folder, a path or a URL "
                                                          "(default: CACHE/index/)."),
    kind: str = typer.Option("auto", "--kind", help="auto | flat | ivf | hnsw (auto: flat up to "
                                                    "50,000 videos per split, IVF above).",
                             callback=_one_of("auto", "flat", "ivf", "hnsw")),
    nlist: Optional[int] = typer.Option(None, "--nlist", min=1,
                                        help="IVF lists (default ~4 sqrt(videos))."),
    m: int = typer.Option(32, "--m", min=2, help="HNSW links per node."),
):
    """Index every extracted video's mean-pooled CLIP frames, one faiss index per split, for
    `avr eval --rerank-k` and `avr search`."""
    from avr.evaluate.index import build_index, read_meta

    path = build_index(cache, out, kind, nlist=nlist, m=m)
    meta = read_meta(path)
    for split, entry in meta["splits"].items():
        settings = "".join(f" {k}={v}" for k, v in entry["params"].items())
        console.print(f"{split}: {entry['videos']:,} videos, {entry['kind']}{settings} "
                      f"({entry['build_seconds']:.1f} s)")
    console.print(f"index -> {path}")


# ---- demo and bench --------------------------------------------------------------------------

@app.command()
def demo(
    workdir: Path = typer.Option(Path("avr-demo"), help="Where data, cache, runs and report go."),
    seed: int = typer.Option(0, help="Seed of the clips, the tiny backbones and training."),
    budget: float = typer.Option(150.0, min=0.0, help="Seconds: heads beyond xpool and tefal "
                                                      "train only while the demo fits this."),
    workers: Optional[int] = typer.Option(None, min=0, help="Decode processes."),
):
    """Generate the demo clips, extract with tiny backbones, train, evaluate, compare heads."""
    from avr.demo import DemoConfig, demo_table, run_demo

    result = run_demo(DemoConfig(workdir=workdir, seed=seed, budget_s=budget, workers=workers),
                      console=console)
    console.print(demo_table(result))
    if result.skipped:
        console.print(f"not trained within the budget: {', '.join(result.skipped)} "
                      f"(train them with `avr train --cache {workdir / 'cache'} --head NAME`)")
    if result.report is not None:
        console.print(f"report with plots: {result.report}")
    console.print(f"demo finished in {result.seconds:.0f} s")



bench_app = typer.Typer(no_args_is_help=True,
                        help="Measure a stage on VATEX-shaped work beside the straightforward way "
                             "(BENCHMARKS.md), or write a VATEX-shaped store from a generator.")
app.add_typer(bench_app, name="bench")


def _bench_device(device: str):
    """The torch device and its name as BENCHMARKS.md records it."""
    import platform

    import torch

    from avr.device import resolve_device

    torch_device = resolve_device(device)
    name = torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} x {torch.get_num_threads()} threads"
    return torch_device, name


def _print_figures(what: str, name: str, scale: float | None, figures) -> None:
    console.print(f"[bold]avr bench {what}[/] on {name}" + (f", scale {scale}" if scale else ""))
    for figure in figures:
        console.print(figure.line(), markup=False, highlight=False, soft_wrap=True)


SCALE_HELP = "Fraction of VATEX's rows (per-row shapes stay)."


@bench_app.command("train")
def bench_train(
    head: str = typer.Option("tefal", help="Head to train.", callback=head_option),
    scale: float = typer.Option(1.0, help=SCALE_HELP, callback=positive_option),
    device: str = typer.Option("auto", help=DEVICE_HELP, callback=device_option),
    steps: Optional[int] = typer.Option(None, min=1, help="Time this many steps (and "
                                                          "extrapolate the epoch without "
                                                          "--cache)."),
    cache: Optional[str] = typer.Option(None, help="Train on this store's train split (a path "
                                                   "or a URL) as `avr train` would, instead of "
                                                   "device-resident random tokens."),
    memory_budget: Optional[float] = typer.Option(None, "--memory-budget", help=BUDGET_HELP,
                                                  callback=positive_option),
    resident: str = typer.Option("fp16", "--resident", help=RESIDENT_HELP,
                                 callback=_one_of("fp16", "int8")),
    batch_size: int = typer.Option(128, "--batch-size", min=2),
):
    """One training epoch of a head: on device-resident VATEX-shaped tokens, or with --cache on
    a store under a memory budget (plan, pairs/s, bytes/s, peak memory; a streamed split also
    beside a raw read of its chunk files)."""
    from avr import bench as benches

    torch_device, name = _bench_device(device)
    if cache is None:
        if memory_budget is not None or resident != "fp16":
            raise AvrError("--memory-budget and --resident apply to a store: give --cache")
        figures = benches.bench_train(head, scale=scale, device=torch_device, steps=steps,
                                      batch_size=batch_size)
        _print_figures("train", name, scale, figures)
        return
    _require_head_arrays(cache, head, {})
    figures = benches.bench_train_store(cache, head, device=torch_device, batch_size=batch_size,
                                        steps=steps, memory_budget=memory_budget,
                                        resident=resident)
    _print_figures(f"train --cache {cache}", name, None, figures)


@bench_app.command("eval")
def bench_eval(
    head: str = typer.Option("tefal", help="Head to score with.", callback=head_option),
    scale: float = typer.Option(1.0, help=SCALE_HELP, callback=positive_option),
    device: str = typer.Option("auto", help=DEVICE_HELP, callback=device_option),
):
    """Score a VATEX-shaped test split in chunks, beside one pair at a time."""
    from avr import bench as benches

    torch_device, name = _bench_device(device)
    _print_figures("eval", name, scale, benches.bench_eval(head, scale=scale,
                                                           device=torch_device))


@bench_app.command("cache")
def bench_cache(
    device: str = typer.Option("auto", help=DEVICE_HELP, callback=device_option),
    gigabytes: float = typer.Option(4.0, help="Store size to write and read.",
                                    callback=positive_option),
    cache: Optional[str] = typer.Option(None, help="Read this store's train audio tokens (a "
                                                   "path or a URL) instead of writing a store "
                                                   "of --gigabytes."),
):
    """Read a store's audio tokens into memory, beside a raw read of the same bytes."""
    from avr import bench as benches

    torch_device, name = _bench_device(device)
    _print_figures("cache", name, None, benches.bench_cache(gigabytes=gigabytes,
                                                            device=torch_device, store=cache))


@bench_app.command("extract")
def bench_extract(
    device: str = typer.Option("auto", help=DEVICE_HELP, callback=device_option),
    clips: int = typer.Option(8, min=1, help="Generated 10 s 360p clips."),
    workers: int = typer.Option(2, min=0, help="Decode processes."),
):
    """Decode generated clips in one process and in a pool; run real-size backbones."""
    from avr import bench as benches

    torch_device, name = _bench_device(device)
    _print_figures("extract", name, None, benches.bench_extract(clips=clips, device=torch_device,
                                                                workers=workers))


def _names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def _head_list(value: str) -> None:
    from avr.fuse.heads import head_class

    if not _names(value):
        raise AvrError("name at least one head")
    for name in _names(value):
        head_class(name)


def _array_list(value: str) -> None:
    from avr.extract.generated import check_arrays, generated_spec

    if not _names(value):
        raise AvrError("name at least one array")
    check_arrays(generated_spec(0), _names(value))


def _like(name: str) -> None:
    from avr.extract.generated import LIKE_DATASETS

    _choose(name, LIKE_DATASETS)


@bench_app.command("store")
def bench_store(
    videos: Optional[int] = typer.Option(None, "--videos", min=3,
                                         help="Videos to generate (VATEX: 28,991)."),
    out: str = typer.Option(..., "--out", help="The store to write or resume: a path or a URL."),
    like: Optional[str] = typer.Option(
        None, "--like", help="Shape the store like a dataset instead of --videos: its split "
                             "sizes, captions per video, caption protocol, audio and (VATEX's "
                             "backbones) frames and text lengths: vatex | msrvtt | lsmdc | "
                             "charades | didemo | msvd | activitynet.",
        callback=_checked(_like)),
    captions_per_video: Optional[int] = typer.Option(None, "--captions-per-video", min=1,
                                                     help="Default 10 (VATEX's)."),
    seed: int = typer.Option(0, help="Seed of the latent world."),
    arrays: Optional[str] = typer.Option(None, "--arrays", help="Write only these feature "
                                         "arrays (comma-separated); the others are recorded as "
                                         "unwritten.", callback=_checked(_array_list)),
    heads: Optional[str] = typer.Option(None, "--heads", help="Write only the arrays these "
                                        "heads read (comma-separated, e.g. xpool,gais).",
                                        callback=_checked(_head_list)),
    val_videos: Optional[int] = typer.Option(None, "--val-videos", min=1,
                                             help="Default: VATEX's share (1,500 of 28,991)."),
    test_videos: Optional[int] = typer.Option(None, "--test-videos", min=1,
                                              help="Default: VATEX's share (1,500 of 28,991)."),
    chunk_rows: Optional[int] = typer.Option(None, "--chunk-rows", min=1,
                                             help="Video rows per chunk and per write."),
    compression: str = typer.Option("zstd", "--compression", help=COMPRESSION_HELP,
                                    callback=_one_of(*COMPRESSIONS)),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a store made with other "
                                                              "settings."),
    shapes: str = typer.Option("vatex", "--shapes", hidden=True, callback=_one_of("vatex", "tiny"),
                               help="tiny: the tiny backbones' widths, for tests."),
):
    """Write a store with VATEX's per-row shapes (or a dataset's, --like) straight from a
    generator: topics, captions near their video's frames, twins only audio tells apart
    (README "Generated stores")."""
    from avr.extract.generated import GeneratorSettings, arrays_for_heads, write_generated_store

    if arrays is not None and heads is not None:
        raise typer.BadParameter("give --arrays or --heads, not both", param_hint="'--arrays'")
    chosen = (tuple(_names(arrays)) if arrays is not None
              else arrays_for_heads(_names(heads)) if heads is not None else None)
    common = dict(seed=seed, shapes=shapes, arrays=chosen,
                  heads=tuple(_names(heads)) if heads is not None else None)
    if like is None:
        if videos is None:
            raise typer.BadParameter("give --videos N or --like DATASET", param_hint="'--videos'")
        settings = GeneratorSettings(videos=videos, captions_per_video=captions_per_video or 10,
                                     val_videos=val_videos, test_videos=test_videos, **common)
    else:
        sized = [flag for flag, value in (("--videos", videos), ("--val-videos", val_videos),
                                          ("--test-videos", test_videos),
                                          ("--captions-per-video", captions_per_video))
                 if value is not None]
        if sized:
            raise typer.BadParameter(f"--like {like} sets the split sizes and captions; leave "
                                     f"out {', '.join(sized)}", param_hint="'--like'")
        settings = GeneratorSettings.like_dataset(like, **common)
    summary = write_generated_store(out, settings, overwrite=overwrite, chunk_rows=chunk_rows,
                                    compression=compression, console=console)
    seconds = max(summary["seconds"], 1e-9)
    console.print(f"[bold]{escape(summary['out'])}[/]: {summary['videos']:,} videos, "
                  f"{summary['captions']:,} captions; {summary['written_bytes'] / 1e9:,.2f} GB "
                  f"written ({summary['written_bytes'] / 1e6 / seconds:,.1f} MB/s), "
                  f"{summary['bytes_on_disk'] / 1e9:,.2f} GB on disk; {summary['seconds']:.1f} s")
    if summary["unwritten"]:
        console.print(f"left unwritten: {', '.join(summary['unwritten'])}", highlight=False,
                      soft_wrap=True)


def main(argv: Optional[list[str]] = None) -> None:
    """The `avr` console script. typer runs the command in its standalone mode, so a usage error
    is shown its usual way (short usage, the problem, exit status 2) whichever click typer is
    built on (its vendored copy or the click package); an AvrError prints one line and exits 2.
    Returns normally when the command succeeds, so tests and scripts can call it."""
    try:
        app(args=argv)
    except AvrError as error:
        if _state["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(error))}", soft_wrap=True,
                          highlight=False)
        sys.exit(2)
    except SystemExit as done:
        if done.code not in (0, None):
            raise
