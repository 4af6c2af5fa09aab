"""Retrieval metrics and the two transductive re-rankings of ``avr eval`` (docs/methods.md F).

Everything here is a pure function of a [captions, videos] similarity matrix ``sim`` and
``caption_video`` [Q], the video column of each caption's ground truth (-1 when that video
failed extraction). Inputs may be torch tensors or numpy arrays; outputs are numpy.

Conventions (X-Pool ``modules/metrics.py``, CLIP4Clip ``metrics.py``, everything_at_once
``metric/metric.py``):

- t2v: every caption is a query, ranked against every video column. A caption whose video
  failed extraction (``caption_video = -1``) is a failed query with rank V + 1, so recall is
  divided by the complete caption count, as everything_at_once does (V + 1 misses R@K for
  every K <= V; R@K with K > V says nothing anyway).
- v2t: each video ranks the caption groups, one group per video that has captions, a group
  scored by the max over its captions (X-Pool ``v2t_metrics``, CLIP4Clip
  ``tensor_video_to_text_sim``). Videos with no caption are skipped as queries and have no
  group. Captions of failed videos form no group (the failed videos' identities are unknown
  here). ``num_videos`` is the size of the complete split: the ``num_videos - V`` videos that
  failed extraction each count as a failed v2t query (rank = number of groups + 1).
- Ranks are 1-based floats. R@K = 100 * mean(rank <= K); MdR = ``np.median`` (the mean of the
  two middle values when the count is even, as X-Pool; CLIP4Clip's ``torch.median`` would take
  the lower one); MnR = mean rank.
- Ties (the ground truth scores exactly as high as other items), ``ties=``:
  ``"pessimistic"`` (default) rank = 1 + #greater + #tied others, the last tied position;
  ``"mean"`` rank = 1 + #greater + #tied others / 2, the average tied position
  (everything_at_once); ``"optimistic"`` rank = 1 + #greater, the first tied position.
  Pessimistic is the default because ties can then only lower the reported numbers: a
  collapsed model that scores everything alike gets R@1 = 0, never 100 (CLIP4Clip issue #80).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from avr.errors import AvrError

Ties = Literal["optimistic", "mean", "pessimistic"]
TIE_POLICIES = ("optimistic", "mean", "pessimistic")
DEFAULT_TIES: Ties = "pessimistic"
# Dual softmax temperature of AVIGATE's release (main_task_retrieval.py:
# ``sim * softmax(sim / 3.0, dim=0)`` on logits scaled by CLIP's logit scale, 100); GAID's
# release uses 1 (``sims * softmax(100 * sims, axis=0)``).
DSL_TEMPERATURE = 3.0

ArrayLike = np.ndarray | torch.Tensor


# ---- input handling -----------------------------------------------------------------------------

def _as_numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        if values.is_floating_point() and values.dtype != torch.float64:
            values = values.float()  # numpy has no bfloat16; float16/bf16 -> float32 is exact
        return values.numpy()
    return np.asarray(values)


def _similarity(sim: ArrayLike, name: str = "sim") -> np.ndarray:
    """``sim`` as a float32/float64 [rows, V] array, checked for shape and NaN."""
    sim = _as_numpy(sim)
    if sim.ndim != 2:
        raise AvrError(f"{name} must be a 2-d [captions, videos] matrix, got shape {sim.shape}")
    if sim.dtype not in (np.float32, np.float64):
        sim = sim.astype(np.float64)
    if np.isnan(sim).any():
        raise AvrError(f"{name} contains NaN similarities ({int(np.isnan(sim).sum())} entries); "
                       "ranks would be meaningless: check the head's score() for overflow")
    return sim


def _caption_video(caption_video: ArrayLike, sim: np.ndarray) -> np.ndarray:
    caption_video = _as_numpy(caption_video)
    if caption_video.ndim != 1 or len(caption_video) != sim.shape[0]:
        raise AvrError(f"caption_video has shape {caption_video.shape} but sim has "
                       f"{sim.shape[0]} caption rows; they must match one to one")
    if not np.issubdtype(caption_video.dtype, np.integer):
        raise AvrError(f"caption_video must hold integer video columns, got {caption_video.dtype}")
    num_videos = sim.shape[1]
    if len(caption_video) and (caption_video.min() < -1 or caption_video.max() >= num_videos):
        raise AvrError(f"caption_video holds values in [{caption_video.min()}, "
                       f"{caption_video.max()}] but sim has {num_videos} video columns; "
                       "expected a column index or -1 for a failed video")
    return caption_video.astype(np.int64)


def _check_ties(ties: str) -> None:
    if ties not in TIE_POLICIES:
        raise AvrError(f"unknown tie policy {ties!r}; choose one of {', '.join(TIE_POLICIES)}")


# ---- ranks --------------------------------------------------------------------------------------

def rank_of_target(scores: np.ndarray, target: np.ndarray, ties: Ties = DEFAULT_TIES) -> np.ndarray:
    """1-based rank of column ``target[i]`` in row i of ``scores`` [N, C] (higher = better)."""
    _check_ties(ties)
    target_score = scores[np.arange(len(target)), target][:, None]  # [N, 1]
    greater = (scores > target_score).sum(1)
    if ties == "optimistic":
        return 1.0 + greater
    tied_others = (scores == target_score).sum(1) - 1
    if ties == "mean":
        return 1.0 + greater + tied_others / 2.0
    return 1.0 + greater + tied_others


def t2v_ranks(sim: ArrayLike, caption_video: ArrayLike, *, ties: Ties = DEFAULT_TIES) -> np.ndarray:
    """[Q] rank of each caption's video among the V video columns of ``sim`` [Q, V].

    A caption with ``caption_video = -1`` (its video failed extraction) gets rank V + 1.
    """
    sim = _similarity(sim)
    caption_video = _caption_video(caption_video, sim)
    ranks = np.full(len(caption_video), sim.shape[1] + 1.0)
    present = caption_video >= 0
    ranks[present] = rank_of_target(sim[present], caption_video[present], ties)
    return ranks


def caption_group_scores(sim: np.ndarray,
                         caption_video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each caption group's score for each video: the max over the group's captions.

    Returns ``group_sim`` [G, V] and ``group_video`` [G], the (sorted) video column of each
    group; captions with ``caption_video = -1`` belong to no group.
    """
    present = caption_video >= 0
    group_video, group_of_caption = np.unique(caption_video[present], return_inverse=True)
    captions = torch.from_numpy(sim[present])  # [Q', V]
    index = torch.from_numpy(group_of_caption.reshape(-1)).unsqueeze(1).expand_as(captions)
    group_sim = torch.full((len(group_video), sim.shape[1]), -torch.inf, dtype=captions.dtype)
    group_sim.scatter_reduce_(0, index, captions, reduce="amax")  # [G, V]
    return group_sim.numpy(), group_video


def v2t_ranks(sim: ArrayLike, caption_video: ArrayLike, num_videos: int | None = None, *,
              ties: Ties = DEFAULT_TIES) -> np.ndarray:
    """Rank of each video's own caption group among all caption groups (docs/methods.md F).

    ``sim`` [Q, V]; each caption group (the captions of one video) is scored by the max of its
    captions' similarities. One rank per video column that has captions (videos without
    captions are skipped), then one rank of G + 1 per failed video, ``num_videos - V`` of them,
    where ``num_videos`` is the complete split size (default V: nothing failed).
    """
    sim = _similarity(sim)
    caption_video = _caption_video(caption_video, sim)
    num_columns = sim.shape[1]
    num_videos = num_columns if num_videos is None else int(num_videos)
    if num_videos < num_columns:
        raise AvrError(f"num_videos={num_videos} is smaller than the {num_columns} video columns "
                       "of sim; pass the complete split size (including failed videos)")
    group_sim, group_video = caption_group_scores(sim, caption_video)  # [G, V], [G]
    num_groups = len(group_video)
    video_group_sim = group_sim[:, group_video].T  # [G videos, G groups]; video i owns group i
    ranks = rank_of_target(video_group_sim, np.arange(num_groups), ties)
    failed = np.full(num_videos - num_columns, num_groups + 1.0)
    return np.concatenate([ranks, failed])


# ---- summaries ----------------------------------------------------------------------------------

def metrics_from_ranks(ranks: ArrayLike, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """{"R1", "R5", "R10", "MdR", "MnR"}: recall at each k in percent, median and mean rank.

    MdR is ``np.median``: the mean of the two middle ranks when their count is even (X-Pool).
    """
    ranks = _as_numpy(ranks).astype(np.float64)
    if ranks.size == 0:
        raise AvrError("no ranks to summarise: the split has no queries")
    metrics = {f"R{k}": float(100.0 * np.mean(ranks <= k)) for k in ks}
    metrics["MdR"] = float(np.median(ranks))
    metrics["MnR"] = float(np.mean(ranks))
    return metrics


def retrieval_metrics(sim: ArrayLike, caption_video: ArrayLike, num_videos: int | None = None, *,
                      ties: Ties = DEFAULT_TIES,
                      v2t_sim: ArrayLike | None = None) -> dict[str, dict[str, float]]:
    """t2v and v2t metrics of one split, each with its query count and how many failed.

    ``num_videos`` is the complete split size including videos that failed extraction
    (default: the V columns of ``sim``). ``v2t_sim`` [Q, V], when given, is ranked for v2t
    instead of ``sim`` (a re-ranking that differs per direction, as dual softmax does).
    """
    sim = _similarity(sim)
    caption_video = _caption_video(caption_video, sim)
    if v2t_sim is not None:
        v2t_sim = _similarity(v2t_sim, "v2t_sim")
        if v2t_sim.shape != sim.shape:
            raise AvrError(f"v2t_sim has shape {v2t_sim.shape} but sim has {sim.shape}")
    t2v = t2v_ranks(sim, caption_video, ties=ties)
    v2t = v2t_ranks(sim if v2t_sim is None else v2t_sim, caption_video, num_videos, ties=ties)
    num_failed_videos = (sim.shape[1] if num_videos is None else num_videos) - sim.shape[1]
    return {
        "t2v": {**metrics_from_ranks(t2v), "queries": len(t2v),
                "failed": int((caption_video < 0).sum())},
        "v2t": {**metrics_from_ranks(v2t), "queries": len(v2t), "failed": int(num_failed_videos)},
    }


def recall_at_k_curve(ranks: ArrayLike, max_k: int) -> np.ndarray:
    """[max_k] recall in percent at k = 1 .. max_k (entry k - 1 is R@k), for plots."""
    ranks = np.sort(_as_numpy(ranks).astype(np.float64))
    if ranks.size == 0:
        raise AvrError("no ranks to plot: the split has no queries")
    hits = np.searchsorted(ranks, np.arange(1, max_k + 1), side="right")  # #ranks <= k
    return 100.0 * hits / ranks.size


# ---- transductive re-rankings (reported beside the plain numbers, never folded in) -------------

def dual_softmax(sim: ArrayLike, temperature: float = DSL_TEMPERATURE) -> np.ndarray:
    """Dual softmax inference (CAMoE ``DSL.py``, Cheng et al. 2021) of a [queries, candidates]
    logit matrix: each candidate's column is reweighted by a softmax over the queries,
    ``sim' = sim * softmax(sim / temperature, dim=0) * rows``, so a candidate that scores high
    for every query (a hub) is demoted for the queries it prefers less. Returns [rows, cols].

    For text -> video the queries are the captions (``sim`` [Q, V]); for video -> text they are
    the videos (``dual_softmax(sim.T).T``, the prior over videos): ``dual_softmax_metrics``
    does both. Transductive: it needs every test query at once.
    """
    sim = _similarity(sim)
    logits = sim / temperature
    logits = logits - logits.max(0, keepdims=True)  # stable softmax over the queries
    prior = np.exp(logits)
    prior /= prior.sum(0, keepdims=True)  # [rows, cols], each column sums to 1
    # Subnormal priors (< 1e-38 in float32) change sim' by less than 1e-32 but make the
    # multiply an order of magnitude slower on x86; flush them to zero.
    prior[prior < np.finfo(prior.dtype).tiny] = 0.0
    return sim * prior * sim.shape[0]


def dual_softmax_metrics(logits: ArrayLike, caption_video: ArrayLike, num_videos: int | None = None,
                         *, temperature: float = DSL_TEMPERATURE,
                         ties: Ties = DEFAULT_TIES) -> dict[str, dict[str, float]]:
    """``retrieval_metrics`` after dual softmax, as the dual softmax lines of AVIGATE's release
    compute it (``main_task_retrieval.py``, left commented out there; CAMoE's formula): t2v on
    ``dual_softmax(logits)`` (a prior over captions for each video), v2t on
    ``dual_softmax(logits.T).T`` (a prior over videos for each caption). Both act on the
    caption x video matrix before the captions of a video are grouped for v2t, as CAMoE applies
    it (AVIGATE's multi-caption lines apply the v2t prior after grouping).

    ``logits`` [Q, V] are similarities times a logit scale (AVIGATE: CLIP's, 100; GAID: 100 on
    its cosines); the temperature divides them inside the softmax (AVIGATE: 3; GAID: 1).
    """
    if not temperature > 0:
        raise AvrError(f"dual softmax temperature must be positive, got {temperature}")
    logits = _similarity(logits)
    return retrieval_metrics(dual_softmax(logits, temperature), caption_video, num_videos,
                             ties=ties, v2t_sim=dual_softmax(logits.T, temperature).T)


def _querybank_statistics(bank_sim: np.ndarray, beta: float, k: int,
                          rows_per_chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Active videos [V] bool (in the top-k of any bank query) and log Z_v [V], in row chunks."""
    num_bank, num_videos = bank_sim.shape
    active = np.zeros(num_videos, dtype=bool)
    log_z = np.full(num_videos, -np.inf)
    for start in range(0, num_bank, rows_per_chunk):
        logits = beta * bank_sim[start:start + rows_per_chunk].astype(np.float64)  # [b, V]
        active[torch.from_numpy(logits).topk(k, dim=1).indices.numpy()] = True
        peak = logits.max(0)  # stable log-sum-exp over the chunk's bank rows
        log_z = np.logaddexp(log_z, peak + np.log(np.exp(logits - peak).sum(0)))
    return active, log_z


def qb_norm(sim: ArrayLike, bank_sim: ArrayLike, *, beta: float = 20.0, k: int = 1) -> np.ndarray:
    """Querybank normalisation with the dynamic inverted softmax (Bogolin et al., CVPR 2022;
    ioanacroi/qb-norm ``dynamic_inverted_softmax.py``).

    ``sim`` [Q, V] test captions x test videos; ``bank_sim`` [B, V] querybank (training
    captions) x the same test videos. The active set R holds every video in the top-k of some
    bank row; Z_v = sum_b exp(beta * bank_sim[b, v]). A test query whose top-1 video is in R
    gets ``exp(beta * sim[q, v]) / Z_v`` for every v; any other query keeps its raw scores
    (the reference keeps ``exp(beta * sim)``, the same ranking). Rows are then on different
    scales, so only t2v rankings are meaningful afterwards. beta = 20 is the reference's value
    for cosine similarities in [-1, 1]; logit-scaled scores need beta divided by the scale.
    Returns [Q, V] float64.
    """
    sim = _similarity(sim)
    bank_sim = _similarity(bank_sim, "bank_sim")
    if bank_sim.shape[1] != sim.shape[1]:
        raise AvrError(f"bank_sim has {bank_sim.shape[1]} video columns but sim has "
                       f"{sim.shape[1]}; the querybank must be scored against the same test videos")
    if not 1 <= k <= sim.shape[1]:
        raise AvrError(f"qb_norm k={k} must be between 1 and the number of videos ({sim.shape[1]})")
    if bank_sim.shape[0] == 0:
        raise AvrError("qb_norm needs a non-empty querybank (training captions x test videos)")
    active, log_z = _querybank_statistics(bank_sim, beta, k)
    normalise = active[sim.argmax(1)]  # [Q] query's top-1 video is in the active set
    out = sim.astype(np.float64, copy=True)
    out[normalise] = np.exp(beta * out[normalise] - log_z)
    return out
