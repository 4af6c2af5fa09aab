"""`avr eval` and `avr search`: a trained run scored on a split, or asked a query."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from avr.cli import _options as options
from avr.cli._app import app, console


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
    run: Optional[str] = typer.Option(None, "--run", help="Run directory, or its URL (a sweep "
                                                          "trial on shared storage; default: "
                                                          "the latest under runs/)."),
    cache: Optional[str] = typer.Option(None, help="Cache, a path or a URL (default: the run's "
                                                   "own)."),
    split: str = typer.Option("test", help="test | val.", callback=options.one_of("test", "val")),
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
                                   callback=options.one_of("va", "v", "a")),
    device: str = options.device(),
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
                                                  callback=options.positive),
    resident: str = typer.Option("fp16", "--resident", help="fp16: token arrays as stored "
                                 "(default, also for a run trained with int8) | int8.",
                                 callback=options.one_of("fp16", "int8")),
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
    run: Optional[str] = typer.Option(None, "--run", help="Run directory or its URL (default: "
                                                          "latest)."),
    k: int = typer.Option(10, "--k", min=1, help="How many videos to show."),
    split: str = typer.Option("test", help="test | val | train | all.",
                              callback=options.one_of("test", "val", "train", "all")),
    device: str = options.device(),
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
