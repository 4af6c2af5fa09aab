"""Retrieval metrics (docs/methods.md F): ranks written out by hand, ties, failures, re-rankings."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from avr.errors import AvrError
from avr.evaluate.metrics import (
    DSL_TEMPERATURE,
    dual_softmax,
    dual_softmax_metrics,
    metrics_from_ranks,
    qb_norm,
    recall_at_k_curve,
    retrieval_metrics,
    t2v_ranks,
    v2t_ranks,
)

# 4 captions x 5 videos (no caption for videos 2 and 4); the last caption's video failed.
T2V_SIM = np.array([
    [0.9, 0.1, 0.5, 0.3, 0.00],  # video 0: nothing higher             -> rank 1
    [0.2, 0.4, 0.8, 0.6, 0.10],  # video 1: 0.8, 0.6 higher            -> rank 3
    [0.7, 0.1, 0.3, 0.2, 0.25],  # video 3: 0.7, 0.3, 0.25 higher      -> rank 4
    [0.5, 0.5, 0.5, 0.5, 0.50],  # failed video                        -> rank V + 1 = 6
])
T2V_CAPTION_VIDEO = np.array([0, 1, 3, -1])

# 5 captions x 3 videos; videos 0 and 2 have two captions each.
V2T_SIM = np.array([
    [0.9, 0.2, 0.1],  # caption of video 0
    [0.3, 0.8, 0.4],  # caption of video 0
    [0.5, 0.6, 0.7],  # caption of video 1
    [0.1, 0.3, 0.2],  # caption of video 2
    [0.2, 0.1, 0.6],  # caption of video 2
])
V2T_CAPTION_VIDEO = np.array([0, 0, 1, 2, 2])
# Group scores (max over a group's captions), group x video:
#   group 0: [0.9, 0.8, 0.4]; group 1: [0.5, 0.6, 0.7]; group 2: [0.2, 0.3, 0.6]
# video 0: own 0.9 highest -> 1; video 1: own 0.6 < group 0's 0.8 -> 2 (a mean over captions
# would give group 0 0.5 and rank 1); video 2: own 0.6 < group 1's 0.7 -> 2.
V2T_EXPECTED = [1.0, 2.0, 2.0]


# ---- t2v ----------------------------------------------------------------------------------------

def test_t2v_ranks_match_hand_computed_with_more_videos_than_captions():
    np.testing.assert_array_equal(t2v_ranks(T2V_SIM, T2V_CAPTION_VIDEO), [1, 3, 4, 6])


def test_t2v_ranks_same_for_torch_and_numpy_inputs():
    from_torch = t2v_ranks(torch.tensor(T2V_SIM, dtype=torch.float32),
                           torch.tensor(T2V_CAPTION_VIDEO))
    np.testing.assert_array_equal(from_torch, t2v_ranks(T2V_SIM, T2V_CAPTION_VIDEO))


def test_t2v_accepts_more_captions_than_videos():
    sim = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.4], [0.6, 0.5], [0.0, 0.7]])
    np.testing.assert_array_equal(t2v_ranks(sim, np.array([0, 0, 1, 1, 0])), [2, 1, 1, 2, 2])


def test_failed_query_counts_as_a_miss_in_recall():
    sim = np.eye(10)[[0, 1, 0]]  # three captions, ten videos; the third caption's video failed
    result = retrieval_metrics(sim, np.array([0, 1, -1]))["t2v"]
    assert result["R1"] == pytest.approx(200 / 3)
    assert result["R10"] == pytest.approx(200 / 3)  # rank V + 1 = 11 misses R@10 too
    assert (result["queries"], result["failed"]) == (3, 1)


# ---- ties ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("ties, expected", [("optimistic", [1, 2]), ("mean", [2, 3]),
                                            ("pessimistic", [3, 4])])
def test_tie_policies_place_ground_truth_among_equal_scores(ties, expected):
    sim = np.array([[0.5, 0.5, 0.5, 0.2],   # target 0 tied with two others, none higher
                    [0.9, 0.5, 0.5, 0.5]])  # target 1 tied with two others, one higher
    np.testing.assert_array_equal(t2v_ranks(sim, np.array([0, 1]), ties=ties), expected)


def test_default_tie_policy_is_pessimistic_so_constant_scores_never_hit():
    result = retrieval_metrics(np.zeros((6, 6)), np.arange(6))
    assert result["t2v"]["R1"] == 0.0 and result["v2t"]["R1"] == 0.0
    assert result["t2v"]["MdR"] == 6.0


def test_unknown_tie_policy_is_rejected():
    with pytest.raises(AvrError, match="tie policy"):
        t2v_ranks(np.eye(2), np.arange(2), ties="random")


# ---- v2t ----------------------------------------------------------------------------------------

def test_v2t_ranks_groups_scored_by_max_over_captions():
    np.testing.assert_array_equal(v2t_ranks(V2T_SIM, V2T_CAPTION_VIDEO), V2T_EXPECTED)


def test_v2t_skips_videos_without_captions():
    with_empty_video = np.hstack([V2T_SIM, np.full((5, 1), 0.95)])  # video 3: no caption
    np.testing.assert_array_equal(v2t_ranks(with_empty_video, V2T_CAPTION_VIDEO), V2T_EXPECTED)


def test_v2t_captions_of_failed_videos_form_no_group():
    with_orphan = np.vstack([V2T_SIM, np.ones((1, 3))])  # would outrank every group
    np.testing.assert_array_equal(v2t_ranks(with_orphan, np.append(V2T_CAPTION_VIDEO, -1)),
                                  V2T_EXPECTED)


def test_v2t_failed_videos_count_as_missed_queries():
    ranks = v2t_ranks(V2T_SIM, V2T_CAPTION_VIDEO, num_videos=5)
    np.testing.assert_array_equal(ranks, V2T_EXPECTED + [4.0, 4.0])  # G + 1 = 4
    assert retrieval_metrics(V2T_SIM, V2T_CAPTION_VIDEO, 5)["v2t"]["failed"] == 2


def test_v2t_rejects_num_videos_below_columns():
    with pytest.raises(AvrError, match="num_videos"):
        v2t_ranks(V2T_SIM, V2T_CAPTION_VIDEO, num_videos=2)


# ---- multi-caption layout -----------------------------------------------------------------------

def ten_captions_per_video(num_videos: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Captions 0-4 of each video score it 1.0 (rank 1); captions 5-9 score it 0.5 and the
    next video 0.9 (rank 2)."""
    caption_video = np.repeat(np.arange(num_videos), 10)
    sim = np.zeros((len(caption_video), num_videos))
    for row, video in enumerate(caption_video):
        if row % 10 < 5:
            sim[row, video] = 1.0
        else:
            sim[row, video] = 0.5
            sim[row, (video + 1) % num_videos] = 0.9
    return sim, caption_video


def test_ten_captions_per_video_layout():
    sim, caption_video = ten_captions_per_video()
    result = retrieval_metrics(sim, caption_video)
    assert result["t2v"]["queries"] == 40 and result["v2t"]["queries"] == 4
    assert result["t2v"]["R1"] == 50.0 and result["t2v"]["R5"] == 100.0
    # video v: own group max 1.0; group v-1 reaches it only with 0.9 -> always rank 1
    assert result["v2t"]["R1"] == 100.0


def test_caption_order_does_not_change_metrics():
    sim, caption_video = ten_captions_per_video()
    order = np.random.default_rng(0).permutation(len(caption_video))
    shuffled = retrieval_metrics(sim[order], caption_video[order])
    assert shuffled == retrieval_metrics(sim, caption_video)


# ---- summaries ----------------------------------------------------------------------------------

def test_metrics_median_of_even_count_is_mean_of_middle_two():
    metrics = metrics_from_ranks(np.array([1, 2, 3, 10]))
    assert metrics == {"R1": 25.0, "R5": 75.0, "R10": 100.0, "MdR": 2.5, "MnR": 4.0}


def test_metrics_median_of_odd_count_is_middle_value():
    assert metrics_from_ranks(np.array([7, 1, 3]))["MdR"] == 3.0


def test_metrics_from_no_ranks_is_an_error():
    with pytest.raises(AvrError, match="no queries"):
        metrics_from_ranks(np.array([]))


def test_perfect_diagonal_gives_full_recall_at_1():
    result = retrieval_metrics(np.eye(7) + 0.01, np.arange(7))
    for direction in ("t2v", "v2t"):
        assert result[direction]["R1"] == 100.0
        assert result[direction]["MdR"] == 1.0 and result[direction]["MnR"] == 1.0


def test_reversed_diagonal_ranks_every_ground_truth_last():
    num = 10
    shift = (np.arange(num)[None, :] - np.arange(num)[:, None]) % num  # own video scores 0
    result = retrieval_metrics(shift.astype(float), np.arange(num))
    for direction in ("t2v", "v2t"):
        assert result[direction] == {"R1": 0.0, "R5": 0.0, "R10": 100.0, "MdR": 10.0,
                                     "MnR": 10.0, "queries": num, "failed": 0}


def test_videos_scored_in_index_order_give_reversed_ranks():
    num = 10
    sim = np.tile(np.arange(num, dtype=float), (num, 1))  # every caption prefers the last video
    ranks = t2v_ranks(sim, np.arange(num))
    np.testing.assert_array_equal(ranks, np.arange(num, 0, -1))
    assert metrics_from_ranks(ranks) == {"R1": 10.0, "R5": 50.0, "R10": 100.0,
                                         "MdR": 5.5, "MnR": 5.5}


def test_recall_curve_matches_recall_at_k():
    ranks = np.array([1, 2, 2, 5])
    curve = recall_at_k_curve(ranks, 6)
    np.testing.assert_allclose(curve, [25, 75, 75, 75, 100, 100])
    assert curve[0] == metrics_from_ranks(ranks)["R1"]


# ---- validation ---------------------------------------------------------------------------------

def test_caption_video_length_must_match_sim_rows():
    with pytest.raises(AvrError, match="caption_video"):
        t2v_ranks(np.eye(3), np.arange(2))


def test_caption_video_out_of_range_is_rejected():
    with pytest.raises(AvrError, match="video columns"):
        t2v_ranks(np.eye(3), np.array([0, 1, 3]))


def test_nan_similarities_are_rejected():
    sim = np.eye(3)
    sim[1, 2] = np.nan
    with pytest.raises(AvrError, match="NaN"):
        retrieval_metrics(sim, np.arange(3))


def test_vatex_sized_split_is_vectorised():
    rng = np.random.default_rng(0)
    caption_video = np.repeat(np.arange(1500), 10)
    sim = rng.standard_normal((15000, 1500)).astype(np.float32)
    retrieval_metrics(sim[:100], caption_video[:100] % 1500)  # warm up
    start = time.perf_counter()
    result = retrieval_metrics(sim, caption_video)
    # ~0.3 s measured on 2 CPU cores; a Python loop over the 22.5 M pairs takes minutes
    assert time.perf_counter() - start < 5.0
    assert result["t2v"]["queries"] == 15000 and result["v2t"]["queries"] == 1500


# ---- dual softmax -------------------------------------------------------------------------------

def test_dual_softmax_matches_camoe_formula_and_keeps_shape():
    sim = torch.randn(7, 4, generator=torch.Generator().manual_seed(0)) * 10
    expected = sim * torch.softmax(sim / 2.0, dim=0) * sim.shape[0]  # softmax over captions
    out = dual_softmax(sim, temperature=2.0)
    assert out.shape == (7, 4)
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_dual_softmax_demotes_a_hub_video():
    sim = np.array([[10.0, 2.0],    # caption of video 0
                    [10.0, 9.0]])   # caption of video 1; video 0 is a hub, wins raw
    assert t2v_ranks(sim, np.arange(2))[1] == 2
    assert t2v_ranks(dual_softmax(sim), np.arange(2))[1] == 1


def test_dual_softmax_temperature_default_is_avigates_release():
    assert DSL_TEMPERATURE == 3.0  # main_task_retrieval.py: softmax(sim / 3.0, dim=0)


def reference_dsl_ranks(logits: np.ndarray, caption_video: np.ndarray, temperature: float):
    """Dual softmax ranks written independently (torch, loops): t2v with a softmax over the
    captions of each video column, v2t with a softmax over the videos of each caption row, both
    on the caption x video matrix; v2t then scores caption groups by their max."""
    L = torch.from_numpy(logits).double()
    t2v_sim = L * torch.softmax(L / temperature, dim=0)
    v2t_sim = L * torch.softmax(L / temperature, dim=1)
    t2v = [1 + int((t2v_sim[q] > t2v_sim[q, v]).sum()) for q, v in enumerate(caption_video)]
    videos = sorted(set(caption_video.tolist()))
    group = torch.stack([v2t_sim[caption_video == v].amax(0) for v in videos])  # [G, V]
    v2t = [1 + int((group[:, v] > group[g, v]).sum()) for g, v in enumerate(videos)]
    return np.array(t2v, float), np.array(v2t, float)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_dual_softmax_metrics_match_an_independent_implementation(temperature):
    generator = torch.Generator().manual_seed(3)
    caption_video = np.repeat(np.arange(6), 3)  # three captions per video
    logits = (100 * torch.rand(18, 6, generator=generator, dtype=torch.float64)).numpy()
    t2v, v2t = reference_dsl_ranks(logits, caption_video, temperature)
    result = dual_softmax_metrics(logits, caption_video, temperature=temperature)
    assert result["t2v"] == {**metrics_from_ranks(t2v), "queries": 18, "failed": 0}
    assert result["v2t"] == {**metrics_from_ranks(v2t), "queries": 6, "failed": 0}


def test_dual_softmax_video_to_text_uses_a_prior_over_videos():
    # Caption 0 (of video 0) is a hub: raw, it beats video 1's own caption for video 1.
    logits = np.array([[9.0, 8.0, 7.0],    # caption of video 0
                       [1.0, 6.0, 0.0],    # caption of video 1
                       [0.0, 0.0, 6.5]])   # caption of video 2
    caption_video = np.arange(3)
    plain = retrieval_metrics(logits, caption_video)
    dsl = dual_softmax_metrics(logits, caption_video, temperature=1.0)
    assert plain["v2t"]["R1"] == pytest.approx(100 / 3)  # videos 1 and 2 lose to caption 0
    # Caption 0's prior over videos goes to video 0, so videos 1 and 2 find their own captions;
    # a prior over captions (the t2v one) would leave every v2t rank as it was.
    assert dsl["v2t"]["R1"] == 100.0
    captions_prior = retrieval_metrics(dual_softmax(logits, 1.0), caption_video)
    assert captions_prior["v2t"]["R1"] == pytest.approx(100 / 3)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_dual_softmax_temperature_must_be_positive(temperature):
    with pytest.raises(AvrError, match="temperature must be positive"):
        dual_softmax_metrics(np.eye(3), np.arange(3), temperature=temperature)


# ---- QB-Norm ------------------------------------------------------------------------------------

BANK_SIM = np.array([[0.9, 0.1, 0.0],
                     [0.8, 0.2, 0.1]])  # both bank rows rank video 0 first: R = {0} for k = 1
QUERY_SIM = np.array([[0.7, 0.5, 0.1],   # top-1 video 0, in R -> normalised
                      [0.1, 0.6, 0.3]])  # top-1 video 1, not in R -> raw


def test_qb_norm_keeps_raw_scores_when_top1_outside_active_set():
    np.testing.assert_array_equal(qb_norm(QUERY_SIM, BANK_SIM)[1], QUERY_SIM[1])


def test_qb_norm_applies_inverted_softmax_when_top1_in_active_set():
    beta = 20.0
    z = np.exp(beta * BANK_SIM).sum(0)  # Z_v over the bank, [V]
    np.testing.assert_allclose(qb_norm(QUERY_SIM, BANK_SIM, beta=beta)[0],
                               np.exp(beta * QUERY_SIM[0]) / z, rtol=1e-10)


def test_qb_norm_larger_k_widens_active_set():
    z = np.exp(20.0 * BANK_SIM).sum(0)
    np.testing.assert_allclose(qb_norm(QUERY_SIM, BANK_SIM, k=2)[1],
                               np.exp(20.0 * QUERY_SIM[1]) / z, rtol=1e-10)


def test_qb_norm_is_stable_for_logit_scaled_scores():
    beta, query, bank = 20.0, QUERY_SIM * 100, BANK_SIM * 100  # exp(20 * 90) overflows naively
    out = qb_norm(query, bank, beta=beta)
    log_z = np.logaddexp.reduce(beta * bank, axis=0)
    np.testing.assert_allclose(np.log(out[0]), beta * query[0] - log_z, rtol=1e-10)


def test_qb_norm_bank_must_score_the_same_videos():
    with pytest.raises(AvrError, match="same test videos"):
        qb_norm(QUERY_SIM, BANK_SIM[:, :2])
