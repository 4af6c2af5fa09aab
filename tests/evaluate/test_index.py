"""`avr index build`: recall of the approximate kinds, the saved index, its refusals, and eval
and search going through it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from avr.errors import AvrError, CacheMismatchError
from avr.evaluate import index as first_stage
from avr.evaluate import search as search_module
from avr.evaluate.evaluator import EvalConfig, evaluate_run, first_stage_embeddings, rerank
from avr.evaluate.search import search
from avr.fuse import trainer
from avr.fuse.heads import HEADS, build_head
from avr.fuse.trainer import TrainConfig
from avr.store import schema
from avr.store.group import open_store
from avr.store.info import cache_info
from avr.store.splits import random_split
from support.console import assert_one_line_error, ok, run_avr
from support.specs import make_tiny_spec
from support.stores import make_learnable_store

FAST = dict(epochs=3, batch_size=16, lr=1e-2, warmup=0.0, device="cpu")


def clustered(n: int, dim: int, clusters: int, seed: int, centres_seed: int = 0) -> np.ndarray:
    """Unit vectors around ``clusters`` Gaussian centres; noise as large as the centres, so the
    clusters overlap (IVF with one probed list finds only ~2/3 of the true top 10)."""
    centres = np.random.default_rng(centres_seed).normal(size=(clusters, dim))
    rng = np.random.default_rng(seed)
    points = centres[rng.integers(clusters, size=n)] + rng.normal(size=(n, dim))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def recall_at_10(kind: str, vectors: np.ndarray, queries: np.ndarray) -> float:
    import faiss

    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(queries, 10)
    index, chosen, params = first_stage.make_index(vectors, kind)
    split_index = first_stage.SplitIndex("test", chosen, params, index)
    _, found = first_stage.search(split_index, queries, 10)
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found)]))


@pytest.fixture(scope="module")
def random_vectors():
    data = clustered(20_000, 64, 200, seed=0)
    queries = clustered(500, 64, 200, seed=1)  # same centres, other points
    return data, queries


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_recall_at_10_against_exact_search(kind, random_vectors):
    assert recall_at_10(kind, *random_vectors) >= 0.9


def test_auto_picks_flat_for_small_sets_and_ivf_for_large_ones(monkeypatch):
    vectors = clustered(2_000, 16, 20, seed=1)
    assert first_stage.make_index(vectors, "auto")[1] == "flat"
    monkeypatch.setattr(first_stage, "FLAT_MAX_VIDEOS", 1_000)
    _, kind, params = first_stage.make_index(vectors, "auto")
    assert kind == "ivf" and params["nlist"] == 2_000 // first_stage.MIN_POINTS_PER_LIST


def test_an_unknown_kind_is_refused():
    with pytest.raises(AvrError, match="expected one of auto, flat, ivf, hnsw"):
        first_stage.make_index(clustered(100, 8, 4, seed=0), "lsh")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("index") / "cache"
    return make_learnable_store(path, make_tiny_spec(), failed=(3, 70))


@pytest.fixture(scope="module")
def run(store, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    trainer.train(store, TrainConfig(head="meanp", **FAST), root / "meanp")
    return root / "meanp"


def copy_store(store, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(store, copy)
    return copy


def test_built_index_round_trips_every_done_video_per_split(store, tmp_path):
    cache = copy_store(store, tmp_path)
    assert first_stage.build_index(cache) == cache / "index"
    index = first_stage.find_index(cache)
    assert index.fingerprint == open_store(cache)[1].fingerprint()
    # make_learnable_store: rows 0-47 train, 48-59 val, 60-71 test; rows 3 and 70 failed.
    for split, done_rows in (("train", [r for r in range(48) if r != 3]),
                             ("val", list(range(48, 60))),
                             ("test", [r for r in range(60, 72) if r != 70])):
        split_index = index.split(split)
        assert split_index.kind == "flat" and split_index.rows is None
        _, video = first_stage_embeddings(cache, split)
        _, rows = first_stage.search(split_index, video, 1)  # each video finds itself
        assert rows[:, 0].tolist() == done_rows


def test_the_store_still_opens_with_an_index_inside(store, tmp_path):
    cache = copy_store(store, tmp_path)
    before = cache_info(cache)
    first_stage.build_index(cache, kind="hnsw")
    after = cache_info(cache)
    assert after["arrays"] == before["arrays"] and after["videos"] == before["videos"]


def test_an_index_built_from_another_store_is_refused(store, tmp_path):
    first_stage.build_index(store, tmp_path / "index")
    other = make_learnable_store(tmp_path / "other", make_tiny_spec(num_frames=4))
    theirs = open_store(store)[1].fingerprint()
    ours = open_store(other)[1].fingerprint()
    with pytest.raises(CacheMismatchError, match=f"{theirs}.*{ours}"):
        first_stage.find_index(other, tmp_path / "index")


def test_an_index_of_raw_frame_means_from_an_earlier_avr_is_refused_with_the_reason(store,
                                                                                 tmp_path):
    cache = copy_store(store, tmp_path)
    first_stage.build_index(cache)
    meta = cache / "index" / first_stage.META_FILE
    earlier = json.loads(meta.read_text())
    earlier["vectors"] = "masked mean of CLIP frame embeddings, L2-normalised"
    meta.write_text(json.dumps(earlier))
    with pytest.raises(CacheMismatchError, match="pools frames as .*masked mean of CLIP frame "
                                                 "embeddings.* rebuild it"):
        first_stage.find_index(cache)


def test_the_index_pools_each_normalised_frame_as_meanp_does():
    frames = torch.randn(3, 5, 8)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 2:] = False
    units = torch.nn.functional.normalize(frames, dim=-1)
    longer = frames * (torch.rand(3, 5, 1) * 9 + 1)  # a frame's length never weighs in
    want = torch.stack([torch.nn.functional.normalize(units[v][mask[v]].mean(0), dim=0)
                        for v in range(3)])
    torch.testing.assert_close(first_stage.pooled_frames(longer, mask), want)


def test_an_index_older_than_the_done_rows_is_refused(store, tmp_path):
    cache = copy_store(store, tmp_path)
    first_stage.build_index(cache)
    group, _ = open_store(cache, mode="r+")
    group[schema.VIDEO_DONE][3] = True  # a resumed extract finished a row
    with pytest.raises(CacheMismatchError, match="stale.*70 of 72.*71 of 72"):
        first_stage.find_index(cache)


def test_a_missing_index_path_is_refused(store, tmp_path):
    with pytest.raises(AvrError, match="avr index build"):
        first_stage.find_index(store, tmp_path / "nowhere")


def test_rebuilding_replaces_the_index(store, tmp_path):
    first_stage.build_index(store, tmp_path / "index", kind="flat")
    first_stage.build_index(store, tmp_path / "index", kind="ivf")
    meta = json.loads((tmp_path / "index" / first_stage.META_FILE).read_text())
    assert {s["kind"] for s in meta["splits"].values()} == {"ivf"}
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == sorted(
        [first_stage.META_FILE, first_stage.ID_MAP_FILE] + [f"{s}.faiss" for s in meta["splits"]])


def test_building_into_a_folder_of_other_files_is_refused(store, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("months of work")
    with pytest.raises(AvrError, match="not an avr index.*thesis.tex"):
        first_stage.build_index(store, tmp_path / "notes")
    assert (tmp_path / "notes" / "thesis.tex").exists()


def test_an_index_at_a_url_is_built_and_searched_like_a_local_one(run, store, tmp_path):
    import fsspec

    url = "memory://avr-index-test/index"
    try:
        first_stage.build_index(store, url)
        assert json.loads(fsspec.filesystem("memory").cat_file(
            f"/avr-index-test/index/{first_stage.META_FILE}"))["store"] == str(store.resolve())
        first_stage.build_index(store, tmp_path / "index")
        at_url = evaluate_run(run, store, EvalConfig(device="cpu", rerank_k=4, index=url))
        local = evaluate_run(run, store, EvalConfig(device="cpu", rerank_k=4,
                                                    index=tmp_path / "index"))
        assert at_url.variants == local.variants and "rerank@4" in at_url.variants
    finally:
        fsspec.filesystem("memory").rm("/avr-index-test", recursive=True)


def test_eval_rerank_through_the_saved_index_equals_the_in_memory_flat_index(run, store,
                                                                             tmp_path):
    cache = copy_store(store, tmp_path)
    config = EvalConfig(device="cpu", rerank_k=4)
    in_memory = evaluate_run(run, cache, config)
    first_stage.build_index(cache)
    saved = evaluate_run(run, cache, config)
    assert saved.variants["rerank@4"] == in_memory.variants["rerank@4"]
    np.testing.assert_array_equal(rerank(saved.sim, cache, "test", 4),
                                  _flat_rerank(saved.sim, cache, tmp_path))


def _flat_rerank(sim, cache, tmp_path):
    """The same rerank with the saved index moved away (the in-memory flat path)."""
    moved = tmp_path / "moved-index"
    shutil.move(cache / "index", moved)
    try:
        return rerank(sim, cache, "test", 4)
    finally:
        shutil.move(moved, cache / "index")


def test_search_through_the_index_rescores_only_first_stage_candidates(run, store, tmp_path,
                                                                       monkeypatch):
    first_stage.build_index(store, tmp_path / "index")
    exhaustive = search("caption 3 of video 1", run, k=3, split="train", device="cpu")
    covering = search("caption 3 of video 1", run, k=3, split="train", device="cpu",
                      index=tmp_path / "index", candidates=47)
    assert [h.video_id for h in covering] == [h.video_id for h in exhaustive]
    assert [h.score for h in covering] == pytest.approx([h.score for h in exhaustive])
    scored = []
    score_rows = search_module.score_rows
    monkeypatch.setattr(search_module, "score_rows",
                        lambda head, query, videos, device: scored.append(
                            len(videos[schema.FRAME_EMBEDDINGS]))
                        or score_rows(head, query, videos, device))
    few = search("caption 3 of video 1", run, k=3, split="train", device="cpu",
                 index=tmp_path / "index", candidates=5)
    assert scored == [5]
    assert len(few) == 3 and all(h.captions for h in few)


def test_search_candidates_without_an_index_is_refused(run):
    with pytest.raises(AvrError, match="avr index build"):
        search("a red square", run, k=3, device="cpu", candidates=5)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_faiss_read_index_hits_map_to_video_ids_through_the_file_beside_it(store, tmp_path, kind):
    """A faiss user needs nothing of avr: read_index, search, look the int64 ids up."""
    import faiss

    ok(run_avr("index", "build", "--cache", store, "--out", tmp_path / "index", "--kind", kind,
               "--nlist", "2"))
    index = faiss.read_index(str(tmp_path / "index" / "test.faiss"))
    video_ids = json.loads((tmp_path / "index" / "video_ids.json").read_text())
    _, video = first_stage_embeddings(store, "test")
    _, hits = index.search(video, 1)  # each test video finds itself
    assert [video_ids[str(hit)] for hit in hits[:, 0]] == \
        [f"video{row:04d}" for row in range(60, 72) if row != 70]


def test_an_index_written_with_positions_and_a_rows_file_is_still_searched(run, store, tmp_path):
    """Indexes written before ids were store rows: id i is store row rows[i]."""
    import faiss

    first_stage.build_index(store, tmp_path / "index")
    meta = json.loads((tmp_path / "index" / first_stage.META_FILE).read_text())
    for split, entry in meta["splits"].items():
        rows, vectors = first_stage.read_pooled_by_split(open_store(store)[0])[split]
        flat = faiss.IndexFlatIP(vectors.shape[1])
        flat.add(vectors)
        faiss.write_index(flat, str(tmp_path / "index" / entry["index_file"]))
        np.save(tmp_path / "index" / f"{split}.rows.npy", rows)
        entry["rows_file"] = f"{split}.rows.npy"
    for key in ("ids", "id_map", "embeddings"):
        meta.pop(key)
    (tmp_path / "index" / first_stage.META_FILE).write_text(json.dumps(meta))
    (tmp_path / "index" / first_stage.ID_MAP_FILE).unlink()
    old = search("caption 3 of video 1", run, k=3, split="train", device="cpu",
                 index=tmp_path / "index", candidates=47)
    exhaustive = search("caption 3 of video 1", run, k=3, split="train", device="cpu")
    assert [h.video_id for h in old] == [h.video_id for h in exhaustive]


def test_an_index_of_a_meanp_run_serves_that_runs_search(run, store, tmp_path):
    ok(run_avr("index", "build", "--embeddings", f"run:{run}", "--out", tmp_path / "index"))
    meta = json.loads((tmp_path / "index" / first_stage.META_FILE).read_text())
    assert meta["embeddings"] == {"run": str(run.resolve()), "head": "meanp"}
    assert meta["store"] == str(store.resolve())
    exhaustive = search("caption 3 of video 1", run, k=3, split="train", device="cpu")
    indexed = search("caption 3 of video 1", run, k=3, split="train", device="cpu",
                     index=tmp_path / "index", candidates=3)
    assert [h.video_id for h in indexed] == [h.video_id for h in exhaustive]
    assert [h.score for h in indexed] == pytest.approx([h.score for h in exhaustive], abs=1e-3)


def test_an_index_of_a_run_is_refused_by_eval_rerank(run, store, tmp_path):
    first_stage.build_index(embeddings=f"run:{run}", out=tmp_path / "index")
    with pytest.raises(CacheMismatchError, match="video vectors of run.*CLIP's first stage"):
        evaluate_run(run, store, EvalConfig(device="cpu", rerank_k=4, index=tmp_path / "index"))


def test_a_head_without_one_vector_per_video_is_refused(store, tmp_path):
    trainer.train(store, TrainConfig(head="xpool", **FAST), tmp_path / "xpool")
    done = run_avr("index", "build", "--embeddings", f"run:{tmp_path / 'xpool'}", "--out",
                   tmp_path / "index")
    assert_one_line_error(done, "head 'xpool'", "meanp")


@pytest.mark.parametrize("name", sorted(n for n, cls in HEADS.items() if cls.dual_encoder))
def test_a_dual_encoder_head_scores_by_the_inner_product_of_its_vectors(name):
    """What indexing a head's vectors relies on: one vector per video and per caption, the
    score their inner product."""
    import torch

    spec = make_tiny_spec()
    head = build_head(name, spec, {}).eval()
    split = random_split(spec, 6, 2, video_names=head.video_inputs,
                         caption_names=head.caption_inputs, dtype=torch.float32)
    with torch.no_grad():
        videos = head.encode_videos(split.videos)["video"]
        texts = head.encode_texts(split.captions)["text"]
        scores = head.score({"text": texts}, {"video": videos})
    assert videos.shape[0] == 6 and texts.shape[0] == 12
    torch.testing.assert_close(scores, texts @ videos.T)
