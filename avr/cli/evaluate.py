"""`avr eval`, `avr search`, `avr report` and `avr serve`: a trained run scored on a split, asked
a query, shown on a static page, or served over HTTP with a search page."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from avr.cli import _options as options
from avr.cli._app import app, console


def _check_per_query(path: Path) -> None:
    from avr.evaluate.per_query import check_path

    check_path(path)


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
                                                   help="Write sim [captions x videos], "
                                                        "caption_video and the names of its rows "
                                                        "and columns to this .npz."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON to stdout "
                                 "(instead of the table)."),
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="Also write the metrics as "
                                            "JSON to this file (metrics.json in the run is "
                                            "always written)."),
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
    per_query: Optional[Path] = typer.Option(
        None, "--per-query", help="Write one row per caption (.csv or .parquet): its text, tag, "
        "video, rank, top videos with scores, and what audio and frames contributed.",
        callback=options.checked(_check_per_query)),
    per_query_k: int = typer.Option(10, "--per-query-k", min=1, help="Top videos listed per "
                                    "caption in --per-query."),
):
    """Evaluate a trained run: t2v and v2t R@1/5/10, MdR, MnR from the head's own scores."""
    import json

    import numpy as np

    from avr.evaluate.evaluator import EvalConfig, evaluate_run, write_metrics

    config = EvalConfig(split=split, dsl=dsl or dsl_temperature is not None,
                        dsl_temperature=dsl_temperature, qbnorm=qbnorm, rerank_k=rerank_k,
                        modalities=modalities, device=device, report=report, index=index,
                        score_chunk=score_chunk, memory_budget=memory_budget, resident=resident,
                        per_query=per_query, per_query_k=per_query_k)
    if as_json:
        console.quiet = True
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
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    if save_similarity is not None:
        np.savez(save_similarity, **result.similarity_arrays())
        console.print(f"similarity -> {save_similarity}")
    if result.per_query is not None:
        console.print(f"per-query table -> {result.per_query}")
    if result.report is not None:
        console.print(f"report -> {result.report}")


@app.command()
def report(
    run: Optional[Path] = typer.Argument(None, help="Run directory (default: the latest under "
                                                    "runs/)."),
    out: Path = typer.Option(..., "--out", help="Folder for index.html, thumbs/ and plots/."),
    against: Optional[Path] = typer.Option(None, "--against", help="A second run on the same "
                                           "store: also show the captions whose rank moved most "
                                           "between the two, both ways."),
    split: str = typer.Option("test", help="test | val.", callback=options.one_of("test", "val")),
    failures: int = typer.Option(12, "--failures", min=0, help="Worst failures shown."),
    moved: int = typer.Option(12, "--moved", min=0, help="Captions shown per direction with "
                                                         "--against."),
    device: str = options.device(),
    memory_budget: Optional[float] = options.memory_budget(
        "GB of the split's cached arrays held (default: what fits); beyond it they are read "
        "from the store in batches."),
    as_json: bool = options.json_flag(),
):
    """Write a static HTML page of a run: metrics, per-tag table, worst failures with
    thumbnails and the head's explanations; with --against, where two runs differ most."""
    from avr.evaluate.static_report import ReportSettings, write_static_report

    path = write_static_report(run, out, against, ReportSettings(
        split=split, failures=failures, moved=moved, device=device, memory_budget=memory_budget))
    if as_json:
        options.print_json({"report": str(path)})
        return
    console.print(f"report -> {path}")


@app.command()
def search(
    query: Optional[str] = typer.Argument(None, help='e.g. "a dog barks while a red ball rolls"'),
    queries: Optional[Path] = typer.Option(None, "--queries", help="A UTF-8 file of queries, one "
                                           "per line, answered in one run."),
    run: Optional[str] = typer.Option(None, "--run", help="Run directory or its URL (default: "
                                                          "latest)."),
    k: int = typer.Option(10, "-k", "--top-k", "--k", min=1, help="How many videos to show."),
    split: str = typer.Option("test", help="test | val | train | all.",
                              callback=options.one_of("test", "val", "train", "all")),
    device: str = options.device(),
    index: Optional[str] = typer.Option(None, "--index", help="First-stage index, a path or a "
                                        "URL (default: CACHE/index/ when `avr index build` made "
                                        "one)."),
    candidates: Optional[int] = typer.Option(None, "--candidates", min=1, help="Videos per split the "
                                             "index hands to the head (default: 10 x k, and "
                                             "only for splits over 10,000 videos)."),
    memory_budget: Optional[float] = options.memory_budget(
        "GB of the head's cached video rows held for the index's candidates (default: what "
        "fits); beyond it they are read from the store per query."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Encode a query with the run's text backbones (only those: CLIP's text tower, RoBERTa when
    the head reads it) and rank the cache's videos with its head."""
    import json
    import time

    from rich.table import Table

    from avr.evaluate.search import Searcher, read_queries

    if (query is None) == (queries is None):
        raise typer.BadParameter("give a QUERY or --queries FILE (one of them)")
    texts = read_queries(queries) if queries is not None else [query]
    started = time.perf_counter()
    searcher = Searcher(run, split=split, device=device, index=index, candidates=candidates,
                        memory_budget=memory_budget)
    loaded = time.perf_counter()
    answers = searcher.search_many(texts, k)
    answered = time.perf_counter()
    if as_json:
        payload = ([vars(h) for h in answers[0]] if queries is None else
                   [{"query": text, "hits": [vars(h) for h in hits]}
                    for text, hits in zip(texts, answers)])
        print(json.dumps(payload, indent=2))
        return
    for text, hits in zip(texts, answers):
        table = Table("rank", "video", "split", "score", "a caption of it", title=text)
        for rank, hit in enumerate(hits, 1):
            table.add_row(str(rank), hit.video_id, hit.split, f"{hit.score:.4f}",
                          hit.captions[0] if hit.captions else "")
        console.print(table)
    console.print(f"loaded in {loaded - started:.2f} s; {len(texts)} "
                  f"quer{'y' if len(texts) == 1 else 'ies'} in {answered - loaded:.3f} s",
                  highlight=False)


@app.command()
def serve(
    run: Optional[Path] = typer.Option(None, "--run", help="Run directory (default: latest)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback unless "
                                                          "told otherwise)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port."),
    root: Optional[Path] = typer.Option(None, "--root", help="Dataset root the clips are served "
                                        "from (default: the one the store records)."),
    split: str = typer.Option("all", help="test | val | train | all.",
                              callback=options.one_of("test", "val", "train", "all")),
    device: str = options.device(),
    index: Optional[str] = typer.Option(None, "--index", help="First-stage index, a path or a "
                                        "URL (default: CACHE/index/ when built)."),
    memory_budget: Optional[float] = options.memory_budget(
        "GB of the head's cached video rows held for the index's candidates (default: what "
        "fits); beyond it they are read from the store per query."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch's intra-op "
                                          "threads (default: 1 on the CPU, torch's own on a "
                                          "GPU)."),
):
    """Serve a trained run over HTTP: a search page, JSON search, thumbnails, clips and the
    head's explanations (read-only)."""
    from avr.serve.app import serve as run_service

    def ready(searcher):
        console.print(f"serving {searcher.head.name} over {searcher.num_videos:,} videos of "
                      f"{searcher.cache} at http://{host}:{port}/ (Ctrl-C stops)",
                      highlight=False)

    run_service(run, host=host, port=port, root=root, split=split, device=device, index=index,
                memory_budget=memory_budget, threads=threads, on_ready=ready)
