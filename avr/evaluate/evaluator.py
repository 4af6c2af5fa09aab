"""`avr eval`: a trained run's head scored on every (caption, video) pair of a split.

The similarity of each pair comes from the head's own ``score``, computed in chunks, so a
whole VATEX test split (15,000 x 1,500) fits any GPU and a small split runs on the CPU. The
plain numbers are what the run is; the transductive tricks (dual softmax, QB-Norm) and the
two-stage re-ranking are reported beside them, never folded in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avr.device import resolve_device
from avr.errors import AvrError
from avr.evaluate import metrics, report
from avr.evaluate.per_query import DEFAULT_TOP_K, explain_all, per_query_table, write_per_query
from avr.evaluate.score import score_captions, score_split
from avr.fuse import checkpoint
from avr.fuse.loggers import log_test_metrics
from avr.fuse.heads.base import RetrievalHead, State
from avr.fuse.residency.plan import split_fits, work_bytes as budget_work_bytes
from avr.store import schema, transfer
from avr.store.group import open_store
from avr.store.identity import store_identity
from avr.store.location import store_location
from avr.store.read import read_rows
from avr.store.splits import SplitTensors, load_split, split_rows

MODALITIES = ("va", "v", "a")


@dataclass
class EvalConfig:
    split: str = "test"
    dsl: bool = False
    dsl_temperature: float | None = None  # None: the head's (dsl_temperature), else AVIGATE's 3
    qbnorm: bool = False
    rerank_k: int | None = None
    modalities: str = "va"  # v: audio masked; a: frames masked
    device: str = "auto"
    amp: bool = True
    score_chunk: int = 0  # videos per scoring block; 0: chosen by avr.evaluate.score
    report: Path | None = None  # write report.md and plots here
    index: str | Path | None = None  # first-stage index for rerank_k (a path or a URL;
    # default <cache>/index/)
    memory_budget: float | None = None  # GB; a split beyond it is read from the store in batches
    resident: str = "fp16"  # token arrays held as stored, or int8 (dequantized per batch)
    per_query: Path | None = None  # write one row per caption here (.csv or .parquet)
    per_query_k: int = DEFAULT_TOP_K  # videos listed per caption there
    queries: bool = False  # keep the per-query table in the result (implied by per_query)


@dataclass
class EvalResult:
    run_dir: Path
    cache: str | Path  # a local path or a URL
    head: str
    split: str
    modalities: str
    num_captions: int
    num_videos: int
    missing_videos: list[str]
    metrics: dict[str, dict[str, float]]  # {"t2v": {...}, "v2t": {...}}
    variants: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    tags: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    dsl: dict[str, float] | None = None  # {"temperature", "logit_scale"} dual softmax ran with
    sim: np.ndarray | None = None  # [captions, videos] float32, the plain scores
    caption_video: np.ndarray | None = None
    seconds: float = 0.0
    report: Path | None = None
    residency: dict[str, Any] = field(default_factory=dict)  # where the split's tokens were held
    caption_protocol: str = schema.PROTOCOL_SENTENCES  # paragraphs: one per video, 1:1 metrics
    video_ids: list[str] = field(default_factory=list)  # the columns of ``sim``
    caption_text: list[str] = field(default_factory=list)  # the rows of ``sim``
    caption_tags: list[str] = field(default_factory=list)
    caption_rows: np.ndarray | None = None  # the rows' caption rows in the store
    queries: dict[str, list] | None = None  # avr.evaluate.per_query's table
    per_query: Path | None = None  # where it was written

    def similarity_arrays(self) -> dict[str, np.ndarray]:
        """``--save-similarity``'s arrays: the scores with their rows and columns named."""
        return {"sim": self.sim, "caption_video": self.caption_video,
                "video_id": np.asarray(self.video_ids, dtype=str),
                "caption_text": np.asarray(self.caption_text, dtype=str),
                "caption_tag": np.asarray(self.caption_tags, dtype=str),
                "caption_row": np.asarray(self.caption_rows, dtype=np.int64)}

    def to_json(self) -> dict[str, Any]:
        return {"t2v": self.metrics["t2v"], "v2t": self.metrics["v2t"],
                "variants": self.variants, "tags": self.tags, "run": str(self.run_dir),
                "cache": str(self.cache), "head": self.head, "split": self.split,
                "modalities": self.modalities, "num_captions": self.num_captions,
                "num_videos": self.num_videos, "missing_videos": self.missing_videos,
                "ties": metrics.DEFAULT_TIES, "seconds": round(self.seconds, 3),
                "residency": self.residency, "caption_protocol": self.caption_protocol,
                **({"dsl": self.dsl} if self.dsl is not None else {})}

    def protocol_note(self) -> str | None:
        """For a paragraph dataset, what the numbers are; None for sentences."""
        if self.caption_protocol != schema.PROTOCOL_PARAGRAPHS:
            return None
        return (f"paragraph-to-video: {self.num_captions:,} paragraphs, one per video, for "
                f"{self.num_videos:,} videos; t2v and v2t are the 1:1 video-paragraph metrics")


def write_metrics(result: EvalResult, extra: Path | None = None) -> Path:
    """``metrics.json`` in the run directory (``metrics_<split>_<modalities>.json`` for other
    splits or ablations), written under the run folder's lock, and a copy at ``extra`` when
    given; the test metrics go to the run's TensorBoard events too."""
    import json

    payload = json.dumps(result.to_json(), indent=2)
    default = (result.split, result.modalities) == ("test", "va")
    path = result.run_dir / ("metrics.json" if default else
                             f"metrics_{result.split}_{result.modalities}.json")
    with checkpoint.run_lock(result.run_dir):
        checkpoint.write_atomically(path, payload.encode())
        if default:  # the test metrics beside the run's val curves, at its best epoch
            best = max(checkpoint.read_log(result.run_dir), key=lambda log: log.val_r1,
                       default=None)
            log_test_metrics(result.run_dir, result.metrics["t2v"],
                             best.epoch if best is not None else 0)
    if extra is not None:
        extra.write_text(payload)
    return path


def resolve_run(run: str | Path | None) -> Path:
    """The run folder: ``run``, the latest run, or a local copy of a run at a URL (a sweep trial
    on shared storage) under ``runs/remote/``."""
    if run is not None and transfer.is_url(run):
        return transfer.mirror(run, checkpoint.DEFAULT_RUNS_DIR / "remote")
    return Path(run) if run is not None else checkpoint.latest_run()


def open_run(run_dir: Path, cache: str | Path | None, device: torch.device
             ) -> tuple[RetrievalHead, dict, str | Path]:
    """The run's best head and the cache it is checked against (its own unless ``cache``)."""
    head, config = checkpoint.load_head(run_dir, "best", device)
    cache_path = store_location(cache if cache is not None else config["cache"]["path"])
    group, spec = open_store(cache_path)
    checkpoint.check_cache(config, store_identity(group, spec), cache_path)
    return head, config, cache_path


def mask_modalities(videos: dict[str, torch.Tensor], modalities: str, head: RetrievalHead
                    ) -> dict[str, torch.Tensor]:
    """Hide audio (``v``) or frames (``a``) through the masks every head honours."""
    if modalities not in MODALITIES:
        raise AvrError(f"--modalities {modalities!r}: expected one of {', '.join(MODALITIES)}")
    videos = dict(videos)
    if modalities == "v":
        if schema.HAS_AUDIO not in head.video_inputs:
            raise AvrError(f"head {head.name!r} reads no audio; --modalities v is the same as va")
        videos = head.hide_audio(videos)
    elif modalities == "a":
        if schema.HAS_AUDIO not in head.video_inputs:
            raise AvrError(f"head {head.name!r} reads no audio; it has nothing left with "
                           f"--modalities a")
        videos[schema.FRAME_MASK] = torch.zeros_like(videos[schema.FRAME_MASK])
    return videos


def cosines_of(head: RetrievalHead, sim: np.ndarray) -> np.ndarray:
    """Scores on the cosine scale that QB-Norm's beta = 20 assumes."""
    return sim / float(head.scale().detach()) if head.score_is_scaled else sim


def dsl_settings(head: RetrievalHead, config: EvalConfig) -> dict[str, float]:
    """The logit scale and temperature of dual softmax: the head's own scale unless its release
    uses another (``dsl_logit_scale``); ``--dsl-temperature``, else the head's
    ``dsl_temperature``, else AVIGATE's release (metrics.DSL_TEMPERATURE)."""
    scale = head.dsl_logit_scale
    temperature = next(t for t in (config.dsl_temperature, head.dsl_temperature,
                                   metrics.DSL_TEMPERATURE) if t is not None)
    return {"temperature": float(temperature),
            "logit_scale": float(head.scale().detach()) if scale is None else float(scale)}


def dual_softmax_variant(head: RetrievalHead, sim: np.ndarray, caption_video: np.ndarray,
                         num_videos: int, settings: dict[str, float]) -> dict:
    """t2v and v2t metrics after dual softmax on ``sim`` rescaled to the DSL logit scale."""
    logits = cosines_of(head, sim) * settings["logit_scale"]
    return metrics.dual_softmax_metrics(logits, caption_video, num_videos,
                                        temperature=settings["temperature"])


def caption_protocol(cache_path: str | Path) -> str:
    """The store's caption protocol (``schema.ATTR_CAPTION_PROTOCOL``; sentences when a store
    does not record one)."""
    group, _ = open_store(cache_path)
    return group.attrs.get(schema.ATTR_CAPTION_PROTOCOL, schema.PROTOCOL_SENTENCES)


def evaluate_run(run: str | Path | None = None, cache: str | Path | None = None,
                 config: EvalConfig | None = None) -> EvalResult:
    import time

    config = config or EvalConfig()
    if config.dsl_temperature is not None and not config.dsl_temperature > 0:
        raise AvrError(f"--dsl-temperature must be positive, got {config.dsl_temperature}")
    started = time.perf_counter()
    device = resolve_device(config.device)
    run_dir = resolve_run(run)
    head, run_config, cache_path = open_run(run_dir, cache, device)
    video_names = tuple(dict.fromkeys((*head.video_inputs, schema.FRAME_MASK, schema.HAS_AUDIO)))
    fits, size, budget, source = split_fits(cache_path, config.split, video_names,
                                            head.caption_inputs, config.resident, device,
                                            config.memory_budget)
    data = load_split(cache_path, config.split, video_names, head.caption_inputs,
                      resident=config.resident, tokens_in_store=not fits)
    if data.num_videos == 0:
        raise AvrError(f"{cache_path}: the {config.split} split has no extracted videos")
    work_bytes = budget_work_bytes(config.memory_budget)
    video_rows = mask_modalities(data.videos, config.modalities, head)
    scores = score_split(head, video_rows, data.captions, device, amp=config.amp,
                         score_chunk=config.score_chunk, work_bytes=work_bytes)
    sim = scores.sim.numpy()
    caption_video = data.caption_video.cpu().numpy()
    n_videos = data.num_videos
    # Videos that failed extraction still count: as failed v2t queries (docs/methods.md F).
    all_videos = n_videos + len(data.missing_videos)
    result = EvalResult(run_dir, cache_path, head.name, config.split, config.modalities,
                        data.num_captions, n_videos, data.missing_videos,
                        metrics.retrieval_metrics(sim, caption_video, all_videos),
                        sim=sim.astype(np.float32), caption_video=caption_video,
                        residency={"tokens": "memory" if fits else "store",
                                   "bytes": size.bytes, "budget_bytes": budget,
                                   "budget_source": source, "resident": config.resident},
                        caption_protocol=caption_protocol(cache_path),
                        video_ids=data.video_ids, caption_text=data.caption_text,
                        caption_tags=data.caption_tags, caption_rows=data.caption_store_rows)

    if config.dsl:
        result.dsl = dsl_settings(head, config)
        result.variants["dsl"] = dual_softmax_variant(head, sim, caption_video, all_videos,
                                                      result.dsl)
    if config.qbnorm:
        bank = cosines_of(head, train_bank_similarity(head, cache_path, scores.videos, video_rows,
                                                      device, config, work_bytes))
        variants = {"qbnorm": metrics.qb_norm(cosines_of(head, sim), bank)}
        if config.dsl:
            variants["dsl+qbnorm"] = dual_softmax_then_qb_norm(cosines_of(head, sim), bank,
                                                               result.dsl)
        for name, normed in variants.items():
            result.variants[name] = {"t2v": metrics.metrics_from_ranks(
                metrics.t2v_ranks(normed, caption_video))}
    if config.rerank_k:
        reranked = rerank(sim, cache_path, config.split, config.rerank_k, config.index)
        result.variants[f"rerank@{config.rerank_k}"] = {"t2v": metrics.metrics_from_ranks(
            metrics.t2v_ranks(reranked, caption_video))}
    for tag in sorted({t for t in data.caption_tags if t}):
        rows = np.asarray([t == tag for t in data.caption_tags])
        result.tags[tag] = {"t2v": metrics.metrics_from_ranks(
            metrics.t2v_ranks(sim[rows], caption_video[rows])), "captions": int(rows.sum())}
    if config.queries or config.per_query is not None:
        result.queries = query_table(head, data, result, device, config, work_bytes)
        if config.per_query is not None:
            result.per_query = write_per_query(result.queries, config.per_query)
    if config.report is not None:
        rows = report.sample_captions(caption_video, data.caption_tags)
        explanations = paired_explanations(head, data, rows, device)
        result.report = report.write_report(
            result, explanations, [data.caption_text[j] for j in rows], config.report,
            spec=data.spec, strips=caption_strips(cache_path, config.split, data, rows))
    result.seconds = time.perf_counter() - started
    return result


def query_table(head: RetrievalHead, data: SplitTensors, result: EvalResult,
                device: torch.device, config: EvalConfig, work_bytes: int | None
                ) -> dict[str, list]:
    """avr.evaluate.per_query's table of the split: each caption's rank and top videos, its own
    video scored with audio and with frames left out (heads that read audio), and the head's
    explanation of the pair."""
    ranks = metrics.t2v_ranks(result.sim, result.caption_video)
    modality_sims = {}
    if schema.HAS_AUDIO in head.video_inputs:
        for name, hidden in (("visual", "v"), ("audio", "a")):
            masked = score_split(head, mask_modalities(data.videos, hidden, head), data.captions,
                                 device, amp=config.amp, score_chunk=config.score_chunk,
                                 work_bytes=work_bytes).sim.numpy()
            modality_sims[name] = (masked, metrics.t2v_ranks(masked, result.caption_video))
    explained = explain_all(lambda rows: paired_explanations(head, data, rows, device),
                            result.caption_video)
    group, _ = open_store(result.cache)
    return per_query_table(result.sim, result.caption_video, ranks, data.video_ids,
                           caption_video_ids(group, data.caption_store_rows), data.caption_text,
                           data.caption_tags, data.caption_store_rows, config.per_query_k,
                           modality_sims=modality_sims, explained=explained)


def caption_strips(cache_path: str | Path, split: str, data: SplitTensors, rows: list[int]
                   ) -> list[tuple[list[np.ndarray], np.ndarray] | None]:
    """The thumbnail tiles (and the frames they show) of the video of each caption ``rows``,
    None where the store has none: the frames drawn under attention over frames."""
    from avr.extract.thumbnails import strip_frames, strip_tiles
    from avr.store.media import read_thumbnails

    group, _ = open_store(cache_path)
    store_rows = split_rows(group, split).done
    strips = []
    for j in rows:
        local = int(data.caption_video[j])
        jpeg = read_thumbnails(group, store_rows[[local]])[0] if local >= 0 else None
        if jpeg is None:
            strips.append(None)
            continue
        frames = strip_frames(int(read_rows(group[schema.FRAME_MASK],
                                            store_rows[[local]]).sum()))
        strips.append((strip_tiles(jpeg, len(frames)), frames))
    return strips


def caption_video_ids(group, caption_rows: np.ndarray) -> list[str]:
    """The id of each caption's video, those that failed extraction included."""
    video_rows = read_rows(group[schema.CAPTION_VIDEO], caption_rows)
    return [str(v) for v in read_rows(group[schema.VIDEO_ID])[video_rows]]


def dual_softmax_then_qb_norm(cosines: np.ndarray, bank: np.ndarray,
                              settings: dict[str, float]) -> np.ndarray:
    """TEFAL's "DSL + QB-Norm" (its Table 3 reports the two combined; the paper gives no order):
    dual softmax first, then QB-Norm, both on the cosine scale QB-Norm's beta assumes. The test
    cosines [Q, V] and the query bank's [B, V] are each reweighted by the dual-softmax prior
    over their own queries (at the DSL ``settings``' scale and temperature, then divided by
    that scale), so that a test query and the bank compare the same kind of score."""
    scale, temperature = settings["logit_scale"], settings["temperature"]

    def reweighted(sim: np.ndarray) -> np.ndarray:
        return metrics.dual_softmax(sim * scale, temperature) / scale

    return metrics.qb_norm(reweighted(cosines), reweighted(bank))


def train_bank_similarity(head: RetrievalHead, cache_path: str | Path, videos: State | None,
                          video_rows, device: torch.device, config: EvalConfig,
                          work_bytes: int | None = None) -> np.ndarray:
    """QB-Norm's query bank: training captions scored against the evaluated videos, from their
    states, or encoded again from ``video_rows`` when scoring did not keep them (budget)."""
    bank = load_split(cache_path, "train", (), head.caption_inputs)
    if bank.num_captions == 0:
        raise AvrError(f"{cache_path}: --qbnorm needs training captions as its query bank")
    if videos is None:
        return score_split(head, video_rows, bank.captions, device, amp=config.amp,
                           score_chunk=config.score_chunk, work_bytes=work_bytes).sim.numpy()
    return score_captions(head, bank.captions, videos, device, amp=config.amp,
                          score_chunk=config.score_chunk).sim.numpy()


@torch.no_grad()
def first_stage_embeddings(cache_path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Normalised CLIP sentence embeddings and mean-pooled CLIP frames (CLIP4Clip meanP,
    zero-shot): the cheap first stage of two-stage retrieval, the vectors `avr index build`
    indexes."""
    from avr.evaluate.index import normalised_queries, pooled_frames

    stage = load_split(cache_path, split, (schema.FRAME_EMBEDDINGS, schema.FRAME_MASK),
                       (schema.TEXT_EMBEDDINGS,))
    video = pooled_frames(stage.videos[schema.FRAME_EMBEDDINGS], stage.videos[schema.FRAME_MASK])
    return normalised_queries(stage.captions[schema.TEXT_EMBEDDINGS]), video.numpy()


def rerank(sim: np.ndarray, cache_path: str | Path, split: str, k: int,
           index: str | Path | None = None) -> np.ndarray:
    """TEFAL Table 9's two-stage protocol: a faiss inner-product search over mean-pooled CLIP
    embeddings picks each caption's top ``k`` videos; the head's scores order those k, and
    every other video ranks below them in first-stage order.

    The search goes through the index `avr index build` wrote (``index``, else
    ``<cache>/index/`` when it exists), else through an exact in-memory IndexFlatIP."""
    from avr.extras import require

    faiss = require("faiss", "--rerank-k")

    from avr.evaluate import index as first_stage

    text, video = first_stage_embeddings(cache_path, split)
    k = min(k, video.shape[0])
    saved = first_stage.find_index(cache_path, index)
    split_index = saved.split(split) if saved is not None else None
    if split_index is None:
        flat = faiss.IndexFlatIP(video.shape[1])
        flat.add(video)
        _, top = flat.search(text, k)
    else:
        # The split's store rows in load_split's order (done rows, ascending) -> local rows.
        done_rows = split_rows(open_store(cache_path)[0], split).done
        _, store_rows = first_stage.search(split_index, text, k)
        top = np.where(store_rows >= 0, np.searchsorted(done_rows, store_rows), -1)
    first_stage_scores = text @ video.T
    # Shift the first stage below every head score so the re-ranked block comes first.
    out = first_stage_scores - (np.abs(first_stage_scores).max() + np.abs(sim).max() + 1.0) * 4
    queries, ranks = np.nonzero(top >= 0)  # IVF may find fewer than k in its probed lists
    out[queries, top[queries, ranks]] = sim[queries, top[queries, ranks]]
    return out


def paired_explanations(head: RetrievalHead, data: SplitTensors, rows: list[int],
                        device: torch.device) -> dict[str, np.ndarray]:
    """``head.explain`` on captions ``rows`` paired with their ground-truth videos."""
    captions = torch.as_tensor(rows)
    video_rows = data.caption_video.cpu()[captions]
    keep = video_rows >= 0
    captions, video_rows = captions[keep], video_rows[keep]
    with torch.no_grad():
        texts = head.encode_texts({k: v[captions].to(device) for k, v in data.captions.items()})
        videos = head.encode_videos({k: v[video_rows].to(device) for k, v in data.videos.items()})
        explained = head.explain(texts, videos)
    return {name: value.float().cpu().numpy() for name, value in explained.items()}


@torch.no_grad()
def explain_store_pairs(head: RetrievalHead, cache_path: str | Path, caption_rows: np.ndarray,
                        video_rows: np.ndarray, device: torch.device) -> dict[str, np.ndarray]:
    """``head.explain`` on the pairs (store caption row i, store video row i), reading only
    those rows of the store: the few pairs a report draws."""
    group, _ = open_store(cache_path)

    def read(names, rows):
        unique, inverse = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
        return {name: torch.from_numpy(read_rows(group[name], unique)[inverse]).to(device)
                for name in names}

    head.eval()
    explained = head.explain(head.encode_texts(read(head.caption_inputs, caption_rows)),
                             head.encode_videos(read(head.video_inputs, video_rows)))
    return {name: value.float().cpu().numpy() for name, value in explained.items()}

