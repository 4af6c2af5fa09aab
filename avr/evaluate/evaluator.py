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
from avr.evaluate.score import score_captions, score_split
from avr.fuse import checkpoint
from avr.fuse.heads.base import RetrievalHead, State
from avr.fuse.residency.plan import split_fits, work_bytes as budget_work_bytes
from avr.store import schema
from avr.store.group import open_store
from avr.store.location import store_location
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

    def to_json(self) -> dict[str, Any]:
        return {"t2v": self.metrics["t2v"], "v2t": self.metrics["v2t"],
                "variants": self.variants, "tags": self.tags, "run": str(self.run_dir),
                "cache": str(self.cache), "head": self.head, "split": self.split,
                "modalities": self.modalities, "num_captions": self.num_captions,
                "num_videos": self.num_videos, "missing_videos": self.missing_videos,
                "ties": metrics.DEFAULT_TIES, "seconds": round(self.seconds, 3),
                "residency": self.residency,
                **({"dsl": self.dsl} if self.dsl is not None else {})}


def write_metrics(result: EvalResult, extra: Path | None = None) -> Path:
    """``metrics.json`` in the run directory (``metrics_<split>_<modalities>.json`` for other
    splits or ablations), and a copy at ``extra`` when given."""
    import json

    payload = json.dumps(result.to_json(), indent=2)
    default = (result.split, result.modalities) == ("test", "va")
    path = result.run_dir / ("metrics.json" if default else
                             f"metrics_{result.split}_{result.modalities}.json")
    path.write_text(payload)
    if extra is not None:
        extra.write_text(payload)
    return path


def resolve_run(run: str | Path | None) -> Path:
    return Path(run) if run is not None else checkpoint.latest_run()


def open_run(run_dir: Path, cache: str | Path | None, device: torch.device
             ) -> tuple[RetrievalHead, dict, str | Path]:
    """The run's best head and the cache it is checked against (its own unless ``cache``)."""
    head, config = checkpoint.load_head(run_dir, "best", device)
    cache_path = store_location(cache if cache is not None else config["cache"]["path"])
    _, spec = open_store(cache_path)
    checkpoint.check_cache(config, spec, cache_path)
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
                                   "budget_source": source, "resident": config.resident})

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
    if config.report is not None:
        rows = report.sample_captions(caption_video, data.caption_tags)
        explanations = paired_explanations(head, data, rows, device)
        result.report = report.write_report(
            result, explanations, [data.caption_text[j] for j in rows], config.report,
            audio_grid=(data.spec.ast_freq_patches, data.spec.ast_time_patches))
    result.seconds = time.perf_counter() - started
    return result


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
    import faiss

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
