"""LSMDC, Charades, DiDeMo, MSVD and ActivityNet Captions in the layouts their releases ship.

Each dataset is built small with real encoded clips (nested per movie, flat, renamed, in the
folders the releases use), extracted once through the `avr` console script with tiny
backbones; the tests read the store for the counts per split and the caption protocol, then
train a head on it and evaluate the run, as a user would.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import re
import shlex
import shutil
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from avr.errors import AvrError, DatasetError
from avr.extract.datasets import Caption, load_dataset
from avr.store import schema
from avr.store.group import open_store
from avr.store.read import read_rows
from support import media
from support.console import ok, run_avr
from support.paths import REPO

TINY = ("--backbones", "tiny", "--device", "cpu", "--workers", "0")
TRAIN = ("--epochs", "2", "--batch-size", "2", "--device", "cpu")
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255),
           (128, 128, 128), (255, 128, 0)]



def text_of(done) -> str:
    """stdout with rich's wrapping undone."""
    return " ".join(done.stdout.split())


def write_clips(paths: list[Path], container_format: str = "mp4", encoded: bool = True) -> None:
    """A short clip of its own colour, with a tone, at each path; with ``encoded`` False an
    empty file (enough for a listing, which only looks at names)."""
    for path, colour in zip(paths, COLOURS * 4):
        if encoded:
            media.write_clip(path, seconds=0.6, fps=10, size=(48, 32), colour=colour,
                             container_format=container_format)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")


class Extracted(NamedTuple):
    root: Path  # the dataset's files
    out: Path  # the store
    printed: str  # what extract printed


def extract(root: Path, out: Path, dataset: str, *args) -> Extracted:
    done = ok(run_avr("extract", "--dataset", dataset, "--root", root, "--out", out, *TINY, *args,
                      timeout=300))
    return Extracted(root, out, text_of(done))


def read_store(out: Path) -> dict:
    """Per split: video ids and their captions; the spec; the caption protocol attr."""
    group, spec = open_store(out)
    ids = [str(v) for v in read_rows(group[schema.VIDEO_ID])]
    splits = [schema.SPLITS[int(s)] for s in read_rows(group[schema.VIDEO_SPLIT])]
    caption_video = read_rows(group[schema.CAPTION_VIDEO])
    texts = [str(t) for t in read_rows(group[schema.CAPTION_TEXT])]
    captions: dict[str, list[str]] = {v: [] for v in ids}
    for row, text in zip(caption_video, texts):
        captions[ids[row]].append(text)
    return {"split": dict(zip(ids, splits)), "captions": captions, "spec": spec,
            "protocol": group.attrs.get(schema.ATTR_CAPTION_PROTOCOL),
            "has_audio": dict(zip(ids, read_rows(group[schema.HAS_AUDIO]).tolist())),
            "done": bool(read_rows(group[schema.VIDEO_DONE]).all())}


def per_split(store: dict) -> dict[str, int]:
    return dict(Counter(store["split"].values()))


def train_and_eval(out: Path, runs: Path, head: str = "xpool") -> tuple[dict, str]:
    """Train ``head`` on the store, evaluate the run: (metrics.json, what eval printed)."""
    run = runs / head
    ok(run_avr("train", "--cache", out, "--head", head, *TRAIN, "--run-dir", run, timeout=300))
    done = ok(run_avr("eval", "--run", run, "--device", "cpu", timeout=300))
    return json.loads((run / "metrics.json").read_text()), text_of(done)


def assert_finite_metrics(metrics: dict, videos: int, captions: int) -> None:
    assert metrics["num_videos"] == videos and metrics["num_captions"] == captions
    for direction in ("t2v", "v2t"):
        assert all(np.isfinite(value) for value in metrics[direction].values()), metrics


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


# ---- LSMDC -------------------------------------------------------------------------------

LSMDC_TIMES = ["00.00.01.000", "00.00.02.000", "00.00.01.100", "00.00.01.900"]
LSMDC = {  # split -> (clip id, sentence) lines as the tab-separated files hold them
    "train": [("0001_Movie_A_00.00.01.000-00.00.02.000", "SOMEONE opens the door."),
              ("0001_Movie_A_00.00.05.000-00.00.07.500", "SOMEONE runs down the hall."),
              ("0001_Movie_A_00.00.05.000-00.00.07.500", "He looks back, \"scared\"."),
              ("0002_Movie_B_00.01.00.000-00.01.02.000", "A car stops outside.")],
    "val": [("0002_Movie_B_00.02.00.000-00.02.01.500", "SOMEONE waves.")],
    "test": [("0003_Movie_C_00.00.10.000-00.00.12.000", "Rain falls on the roof.")],
}
LSMDC_FILES = {"train": "LSMDC16_annos_training.csv", "val": "LSMDC16_annos_val.csv",
               "test": "LSMDC16_challenge_1000_publictect.csv"}


def make_lsmdc(root: Path, clips: bool = True) -> Path:
    """The three tab-separated files and .avi clips nested per movie (``clips`` False: empty
    files)."""
    for split, rows in LSMDC.items():
        write_lines(root / LSMDC_FILES[split],
                    ["\t".join([clip, *LSMDC_TIMES, sentence]) for clip, sentence in rows])
    write_clips([root / "LSMDC_Videos" / clip.split(".")[0][:-3] / f"{clip}.avi"
                 for clip in sorted({clip for rows in LSMDC.values() for clip, _ in rows})],
                container_format="avi", encoded=clips)
    return root


@pytest.fixture(scope="module")
def lsmdc(tmp_path_factory) -> Extracted:
    folder = tmp_path_factory.mktemp("lsmdc")
    return extract(make_lsmdc(folder / "data"), folder / "cache", "lsmdc")


def test_lsmdc_gives_one_caption_per_clip_in_x_pools_split(lsmdc):
    store, printed = read_store(lsmdc.out), lsmdc.printed
    assert per_split(store) == {"train": 3, "val": 1, "test": 1}
    assert all(len(texts) == 1 for texts in store["captions"].values())
    assert store["captions"]["0001_Movie_A_00.00.05.000-00.00.07.500"] == \
        ["He looks back, \"scared\"."]  # the last of its two sentences, as X-Pool keeps
    assert store["spec"].num_frames == 12 and store["done"]
    assert "1 clip id(s) of" in printed and "have several sentences" in printed
    assert "with a file under" in printed and "LSMDC_Videos" in printed


def test_lsmdc_keeps_every_sentence_with_captions_all(tmp_path):
    index = load_dataset("lsmdc", make_lsmdc(tmp_path / "data", clips=False), captions="all")
    assert [c.text for c in index.captions if c.video_id.startswith("0001_Movie_A_00.00.05")] \
        == ["SOMEONE runs down the hall.", "He looks back, \"scared\"."]
    assert len(index.captions) == 6


def test_lsmdc_trains_and_evaluates(lsmdc, tmp_path):
    metrics, _ = train_and_eval(lsmdc.out, tmp_path)
    assert_finite_metrics(metrics, videos=1, captions=1)
    assert metrics["caption_protocol"] == "sentences"


def test_lsmdc_line_without_six_fields_names_the_file_and_line(tmp_path):
    root = make_lsmdc(tmp_path / "data", clips=False)
    with open(root / LSMDC_FILES["val"], "a") as handle:
        handle.write("0002_Movie_B_00.03.00.000-00.03.01.000\tonly a sentence\n")
    with pytest.raises(DatasetError, match=r"LSMDC16_annos_val.csv:2: 2 tab-separated field"):
        load_dataset("lsmdc", root)


def test_a_broken_annotation_file_stops_extract_before_the_store_is_touched(lsmdc, tmp_path):
    """A rerun on an extracted store whose dataset file went bad: one error line, and every
    extracted row is still there."""
    root = tmp_path / "data"
    shutil.copytree(lsmdc.root, root)
    out = tmp_path / "cache"
    shutil.copytree(lsmdc.out, out)
    with open(root / LSMDC_FILES["test"], "ab") as handle:
        handle.write(b"0003_Movie_C_00.00.20.000-00.00.21.000\t1\t2\t3\t4\tun caf\xe9\n")
    done = run_avr("extract", "--dataset", "lsmdc", "--root", root, "--out", out, *TINY)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{root / LSMDC_FILES['test']}:2: not UTF-8" in done.stderr
    assert read_store(out) == read_store(lsmdc.out) and read_store(out)["done"]


# ---- Charades ----------------------------------------------------------------------------

CHARADES_HEADER = ["id", "subject", "scene", "quality", "relevance", "verified", "script",
                   "objects", "descriptions", "actions", "length"]
CHARADES = {
    "train": {"46GP8": "A person cooks at a stove.;Someone stirs a pot.",
              "N11GT": "A person opens a closet and takes out a towel.",
              "0IH69": "",  # no description: left out
              "KRF68": "A person sits on the sofa, laughing.",
              "ZZ6XY": "Someone drinks from a cup."},
    "test": {"YSKX3": "A person vacuums the floor.", "8DGCU": "A person reads a book."},
}


def make_charades(root: Path, clips: bool = True) -> Path:
    """The official csvs, every column filled as the release fills them, and flat clips in
    Charades_v1_480/ (``clips`` False: empty files)."""
    for split, rows in CHARADES.items():
        path = root / f"Charades_v1_{split}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(CHARADES_HEADER)
            for video_id, description in rows.items():
                writer.writerow([video_id, "HR43", "Kitchen", "6", "7", "Yes",
                                 f"The script of {video_id}, never read.", "cup;pot",
                                 description, "c092 11.90 21.20;c147 0.00 12.60", "30.25"])
    write_clips([root / "Charades_v1_480" / f"{v}.mp4" for rows in CHARADES.values()
                 for v in rows], encoded=clips)
    return root


@pytest.fixture(scope="module")
def charades(tmp_path_factory) -> Extracted:
    folder = tmp_path_factory.mktemp("charades")
    return extract(make_charades(folder / "data"), folder / "cache", "charades", "--option",
                   "val_size=1")


def test_charades_gives_the_descriptions_column_one_per_video(charades):
    store, printed = read_store(charades.out), charades.printed
    assert per_split(store) == {"train": 3, "val": 1, "test": 2}
    assert store["split"]["ZZ6XY"] == "val"  # the last of the naturally sorted train ids
    assert store["captions"]["46GP8"] == ["A person cooks at a stove.;Someone stirs a pot."]
    assert all(len(texts) == 1 and "script" not in texts[0]
               for texts in store["captions"].values())
    assert "0IH69" not in store["split"]
    assert "1 of the 5 ids in" in printed and "have no descriptions and are left out" in printed
    assert store["spec"].num_frames == 32


def test_charades_trains_and_evaluates(charades, tmp_path):
    metrics, _ = train_and_eval(charades.out, tmp_path)
    assert_finite_metrics(metrics, videos=2, captions=2)


# ---- DiDeMo ------------------------------------------------------------------------------

DIDEMO = {  # split -> video name -> its moments' descriptions, in file order
    "train": {"10015567@N08_3655084291_d8b58466fa.mov": ["a dog runs in.", "the dog sits."],
              "11255578@N03_2438839812_1d5a4f8c6f.mp4": ["a man waves.", "he smiles.",
                                                         "camera pans left."],
              "12090392@N02_13482799053_87ef417396.avi": ["a red car passes."]},
    "val": {"13209583@N02_3541278617_6a2a3aca39.mov": ["children play.", "a ball flies."]},
    "test": {"14284386@N00_2484262431_dd2f1da2b0.m4v": ["waves hit the rocks."],
             "15196475@N00_5347924021_f3b07c3bb4.mov": ["a bird lands.", "it flies off."]},
}
DIDEMO_UNANNOTATED = "16003254@N07_4565389113_43c5e5e2d1.mov"  # listed, no moment


def make_didemo(root: Path, clips: bool = True) -> Path:
    """The lists, LocalizingMoments' json (moments of one video interleaved with others'),
    and clips flat in DiDeMo_Videos/ (``clips`` False: empty files): originals (.mov),
    converted copies named x.mp4 (the extension replaced) and x.mov.mp4 (appended)."""
    for split, videos in DIDEMO.items():
        names = list(videos) + ([DIDEMO_UNANNOTATED] if split == "train" else [])
        write_lines(root / f"{split}_list.txt", names)
        moments = []
        for k in range(max(len(texts) for texts in videos.values())):
            for video, texts in videos.items():
                if k < len(texts):
                    moments.append({"annotation_id": len(moments), "description": texts[k],
                                    "times": [[k, k], [k, k + 1]], "video": video,
                                    "num_segments": 6})
        (root / f"{split}_data.json").write_text(json.dumps(moments))
    names = [v for videos in DIDEMO.values() for v in videos]
    files = [root / "DiDeMo_Videos" / name for name in names[:2]]  # originals
    files += [root / "DiDeMo_Videos" / (name.rsplit(".", 1)[0] + ".mp4") for name in names[2:4]]
    files += [root / "DiDeMo_Videos" / (name + ".mp4") for name in names[4:]]
    write_clips(files[:2], container_format="mov", encoded=clips)
    write_clips(files[2:], encoded=clips)
    return root


@pytest.fixture(scope="module")
def didemo(tmp_path_factory) -> Extracted:
    folder = tmp_path_factory.mktemp("didemo")
    return extract(make_didemo(folder / "data"), folder / "cache", "didemo")


def test_didemo_joins_a_videos_descriptions_into_one_paragraph(didemo):
    store, printed = read_store(didemo.out), didemo.printed
    assert per_split(store) == {"train": 3, "val": 1, "test": 2}
    assert store["protocol"] == "paragraphs"
    for videos in DIDEMO.values():
        for video, texts in videos.items():
            assert store["captions"][video] == [" ".join(texts)]
    assert DIDEMO_UNANNOTATED not in store["split"] and store["done"]
    assert "1 of the 4 ids in" in printed and "left out" in printed
    assert store["spec"].num_frames == 64  # CLIP4Clip's max_frames


def test_didemo_eval_reports_the_video_paragraph_metrics(didemo, tmp_path):
    metrics, printed = train_and_eval(didemo.out, tmp_path)
    assert_finite_metrics(metrics, videos=2, captions=2)
    assert metrics["caption_protocol"] == "paragraphs"
    assert "paragraph-to-video: 2 paragraphs, one per video, for 2 videos" in printed


def test_didemo_moments_option_keeps_each_description(tmp_path):
    index = load_dataset("didemo", make_didemo(tmp_path / "data", clips=False),
                         captions="moments")
    assert [c.text for c in index.captions if c.video_id in DIDEMO["train"]] == \
        [text for texts in DIDEMO["train"].values() for text in texts]
    assert index.protocol == "sentences"


def test_didemo_moment_without_a_description_names_the_entry(tmp_path):
    root = make_didemo(tmp_path / "data", clips=False)
    (root / "val_data.json").write_text(json.dumps([{"video": "x.mov", "times": [[0, 0]]}]))
    with pytest.raises(DatasetError, match=r"val_data.json: entry 0 lacks a \"video\" or "
                                           r"\"description\" string"):
        load_dataset("didemo", root)


# ---- MSVD --------------------------------------------------------------------------------

MSVD = {"train": ["-4wsuPCjDBc_5_15", "-7KMZQEsJW4_205_208", "-8y1Q0rA3n8_108_115"],
        "val": ["bQJQGoJF7_k_162_169"], "test": ["-9CUm-2cui8_39_44", "-AwoiGR6c8M_10_14"]}


def msvd_captions() -> dict[str, list[list[str]]]:
    """raw-captions.pkl's content: clip name -> captions as token lists."""
    return {clip: [f"caption {k} of clip {i}".split() for k in range(2 + i % 2)]
            for i, clip in enumerate(c for clips in MSVD.values() for c in clips)}


def make_msvd(root: Path, captions: bytes | None = None, clips: bool = True) -> Path:
    """The split lists, raw-captions.pkl (``captions``: other pickled bytes) and flat .avi clips
    in YouTubeClips/ (``clips`` False: empty files), with audio tracks that MSVD's protocol
    ignores."""
    for split, clips in MSVD.items():
        write_lines(root / f"{split}_list.txt", clips)
    (root / "raw-captions.pkl").write_bytes(captions if captions is not None
                                            else pickle.dumps(msvd_captions(), protocol=4))
    write_clips([root / "YouTubeClips" / f"{clip}.avi" for split in MSVD.values()
                 for clip in split], container_format="avi", encoded=clips)
    return root


@pytest.fixture(scope="module")
def msvd(tmp_path_factory) -> Extracted:
    folder = tmp_path_factory.mktemp("msvd")
    return extract(make_msvd(folder / "data"), folder / "cache", "msvd")


def test_msvd_keeps_every_caption_joined_from_its_tokens(msvd):
    store = read_store(msvd.out)
    assert per_split(store) == {"train": 3, "val": 1, "test": 2}
    expected = msvd_captions()
    assert store["captions"] == {clip: [" ".join(tokens) for tokens in caps]
                                 for clip, caps in expected.items()}
    assert store["spec"].num_frames == 12


def test_msvd_records_every_clip_without_audio_though_its_files_have_tracks(msvd):
    from avr.extract.decode import decode_audio

    store = read_store(msvd.out)
    assert store["done"] and not any(store["has_audio"].values())
    clip = msvd.root / "YouTubeClips" / f"{MSVD['test'][0]}.avi"
    assert decode_audio(clip) is not None  # the file does carry sound


def test_msvd_audio_head_trains_and_evaluates_without_audio(msvd, tmp_path):
    metrics, _ = train_and_eval(msvd.out, tmp_path, head="tefal")
    assert_finite_metrics(metrics, videos=2, captions=5)


class WouldRunCode:
    """Unpickled the usual way, this runs a shell command that creates ``target``."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.target))}",)


def test_a_malicious_caption_pickle_is_refused_and_runs_nothing(tmp_path):
    proof = tmp_path / "proof_it_runs"
    pickle.loads(pickle.dumps(WouldRunCode(proof)))  # a plain unpickler runs it
    assert proof.exists()

    target = tmp_path / "created_by_the_pickle"
    payload = pickle.dumps({"-4wsuPCjDBc_5_15": [["a", "dog"]], "x": WouldRunCode(target)})
    root = make_msvd(tmp_path / "data", captions=payload, clips=False)
    done = run_avr("extract", "--dataset", "msvd", "--root", root, "--out", tmp_path / "cache",
                   *TINY)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(root / "raw-captions.pkl") in lines[0]
    assert "refused" in lines[0] and "os" in lines[0] and "system" in lines[0]
    assert not target.exists()
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("content, message", [
    ({"-4wsuPCjDBc_5_15": [("a", "tuple")]}, r"\['-4wsuPCjDBc_5_15'\]\[0\] holds a tuple"),
    ({"-4wsuPCjDBc_5_15": [["a", 7]]}, r"holds a int"),
    ({3: [["a"]]}, "a key of the top level is a int"),
    ([["a", "list"]], "expected a dict of clip name -> captions"),
    ({"-4wsuPCjDBc_5_15": [b"bytes"]}, "holds a bytes"),
])
def test_a_caption_pickle_of_other_than_dicts_lists_and_strings_is_refused(tmp_path, content,
                                                                          message):
    root = make_msvd(tmp_path / "data", captions=pickle.dumps(content), clips=False)
    with pytest.raises(DatasetError, match=message) as error:
        load_dataset("msvd", root)
    assert str(root / "raw-captions.pkl") in str(error.value)


def test_msvd_reads_x_pools_json_captions_and_carves_val_without_a_val_list(tmp_path):
    root = tmp_path / "data"
    write_lines(root / "train_list.txt", MSVD["train"] + MSVD["val"])
    write_lines(root / "test_list.txt", MSVD["test"])
    (root / "captions_msvd.json").write_text(json.dumps(
        {c: [" ".join(t) for t in caps] for c, caps in msvd_captions().items()}))
    (root / "vids").mkdir()
    for clips in MSVD.values():
        for clip in clips:
            (root / "vids" / f"{clip}.avi").write_bytes(b"")
    index = load_dataset("msvd", root, val_size=1)
    assert Counter(index.video_splits) == {"train": 3, "val": 1, "test": 2}
    assert index.video_dir == root / "vids" and not index.missing_videos
    assert index.captions[0] == Caption(index.video_ids[0], "caption 0 of clip 0")
    assert index.audio is False


# ---- ActivityNet Captions ----------------------------------------------------------------

ANET = {"train": ["v_QOlSCBRmfWY", "v_ehGHCYKzyZ8", "v_nwznKOuZM7w", "v_ogQozSI5V8U"],
        "test": ["v_uqiMw7tQ1Cc", "v_bXdq2zI1Ms0"]}
ANET_NO_SENTENCES = "v_FsS_NCZEfaI"  # listed in train_ids.json, absent from train.json


def anet_sentences(video_id: str) -> list[str]:
    return [f" {video_id} starts.", f"then {video_id} goes on. ", "it ends."]


def make_activitynet(root: Path, videos: Path, clips: bool = True) -> Path:
    """The id lists (one id repeated), train.json and val_1.json, and clips in ``videos``
    (``clips`` False: empty files) named without the v_ prefix, as CLIP4Clip's loader expects,
    but one with it."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "train_ids.json").write_text(json.dumps(
        ANET["train"] + [ANET["train"][0], ANET_NO_SENTENCES]))
    (root / "val_ids.json").write_text(json.dumps(ANET["test"]))
    for split, name in (("train", "train.json"), ("test", "val_1.json")):
        (root / name).write_text(json.dumps(
            {v: {"duration": 60.2, "timestamps": [[0, 20], [20, 40], [40, 60]],
                 "sentences": anet_sentences(v)} for v in ANET[split]}))
    ids = ANET["train"] + ANET["test"]
    write_clips([videos / f"{ids[0]}.mp4"] + [videos / f"{v[2:]}.mp4" for v in ids[1:]],
                encoded=clips)
    return root


@pytest.fixture(scope="module")
def activitynet(tmp_path_factory) -> Extracted:
    folder = tmp_path_factory.mktemp("activitynet")
    videos = folder / "elsewhere" / "anet clips"
    return extract(make_activitynet(folder / "data", videos), folder / "cache", "activitynet",
                   "--videos-dir", videos, "--frames", "8", "--option", "val_size=1")


def test_activitynet_gives_one_paragraph_per_video_with_val_1_as_test(activitynet):
    store, printed = read_store(activitynet.out), activitynet.printed
    assert per_split(store) == {"train": 3, "val": 1, "test": 2}
    assert [v for v, s in store["split"].items() if s == "test"] == ANET["test"]
    assert store["captions"]["v_QOlSCBRmfWY"] == \
        ["v_QOlSCBRmfWY starts. then v_QOlSCBRmfWY goes on. it ends."]
    assert store["protocol"] == "paragraphs" and store["done"]
    assert store["spec"].num_frames == 8  # --frames over the dataset's 64
    assert "1 repeated id(s) in" in printed and "have no sentences in train.json" in printed
    assert "anet clips" in printed  # the --videos-dir folder


def test_activitynet_eval_reports_the_video_paragraph_metrics(activitynet, tmp_path):
    metrics, printed = train_and_eval(activitynet.out, tmp_path)
    assert_finite_metrics(metrics, videos=2, captions=2)
    assert "paragraph-to-video" in printed


# ---- what every dataset shares -----------------------------------------------------------

@pytest.mark.parametrize("dataset, frames, tokens", [
    ("msrvtt", 12, (32, 32)), ("lsmdc", 12, (32, 32)), ("vatex", 32, (32, 32)),
    ("charades", 32, (32, 32)), ("didemo", 64, (77, 256)), ("activitynet", 64, (77, 256)),
    ("msvd", 12, (32, 32)),
])
def test_each_dataset_brings_its_frames_and_text_lengths(dataset, frames, tokens):
    from avr.extract.datasets import facts_of

    facts = facts_of(dataset)
    assert facts.frames == frames
    assert (facts.text_tokens.clip, facts.text_tokens.roberta) == tokens


def test_extract_defaults_come_from_the_dataset_and_flags_override_them():
    from avr.extract.backbones import BackboneNames
    from avr.extract.datasets import DatasetIndex, PARAGRAPH_TOKENS
    from avr.extract.pipeline import ExtractConfig, with_dataset_defaults

    index = DatasetIndex("didemo", Path("."), [], [], [], [], default_frames=64, layout="",
                         text_tokens=PARAGRAPH_TOKENS, protocol="paragraphs", audio=False)
    resolved = with_dataset_defaults(ExtractConfig(dataset="didemo"), index)
    assert (resolved.num_frames, resolved.names.clip_text_tokens,
            resolved.names.roberta_text_tokens, resolved.read_audio) == (64, 77, 256, False)
    given = ExtractConfig(num_frames=8, names=BackboneNames(clip_text_tokens=40,
                                                            roberta_text_tokens=100))
    resolved = with_dataset_defaults(given, index)
    assert (resolved.num_frames, resolved.names.clip_text_tokens,
            resolved.names.roberta_text_tokens) == (8, 40, 100)


@pytest.mark.parametrize("dataset, first_file", [
    ("lsmdc", "LSMDC16_annos_training.csv"), ("charades", "Charades_v1_train.csv"),
    ("didemo", "train_list.txt"), ("msvd", "train_list.txt"), ("activitynet", "train_ids.json"),
])
def test_an_empty_root_names_the_files_the_release_ships(tmp_path, dataset, first_file):
    with pytest.raises(DatasetError, match="expected file") as error:
        load_dataset(dataset, tmp_path / "empty")
    assert str(tmp_path / "empty" / first_file) in str(error.value)
    assert "Expected layout" in str(error.value)


def test_extract_of_an_empty_root_is_one_error_line_without_a_traceback(tmp_path):
    done = run_avr("extract", "--dataset", "didemo", "--root", tmp_path / "empty", *TINY)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: didemo: expected file(s) not found")
    assert str(tmp_path / "empty" / "train_data.json") in done.stderr


@pytest.mark.parametrize("dataset", ["lsmdc", "charades", "didemo", "msvd", "activitynet"])
def test_the_layout_states_the_split_caption_protocol_frames_and_papers(dataset):
    from avr.extract.datasets import facts_of, layout_of

    facts, layout = facts_of(dataset), layout_of(dataset)
    assert f"default frames: {facts.frames}" in layout
    assert f"reported by: {', '.join(facts.reported_by)}" in layout
    assert "--videos-dir" in layout and "<root>/videos/" in layout
    assert ("paragraph" in layout) == (facts.protocol == "paragraphs")
    test_videos = f"{facts.videos['test']:,}"
    assert test_videos in layout


def test_show_layout_prints_the_layout_and_the_text_lengths():
    done = ok(run_avr("extract", "--dataset", "activitynet", "--show-layout"))
    for text in ("train_ids.json", "val_1.json", "Activity_Videos/", "default frames: 64",
                 "77 CLIP tokens", "256 RoBERTa tokens", "reported by: CLIP4Clip"):
        assert text in done.stdout, text


@pytest.mark.parametrize("dataset, name", [
    ("charades", "Charades_v1_test.csv"), ("didemo", "val_data.json"), ("msvd", "test_list.txt"),
    ("activitynet", "val_1.json"),
])
def test_a_file_that_is_not_utf8_names_the_file_and_its_line(tmp_path, dataset, name):
    root = tmp_path / "data"
    make = {"charades": make_charades, "didemo": make_didemo, "msvd": make_msvd,
            "activitynet": lambda r, clips: make_activitynet(r, r / "videos", clips)}[dataset]
    make(root, clips=False)
    path = root / name
    path.write_bytes(path.read_bytes().splitlines()[0] + b"\n" + "un café".encode("latin-1"))
    with pytest.raises(AvrError, match=f"{re.escape(str(path))}:2: not UTF-8") as error:
        load_dataset(dataset, root)
    assert "iconv" in str(error.value)


@pytest.mark.parametrize("dataset, name, content, message", [
    ("activitynet", "train_ids.json", '{"v_QOlSCBRmfWY": 1}', "expected a JSON list of video ids"),
    ("activitynet", "val_1.json", "[]", r"expected a JSON object \{id: \{\"sentences\""),
    ("activitynet", "train.json", '{"v_QOlSCBRmfWY": {"sentences": "one"}}',
     r"v_QOlSCBRmfWY: expected \{\"sentences\": \[strings\]\}"),
    ("didemo", "train_data.json", "{}", "expected a JSON list of"),
    ("charades", "Charades_v1_train.csv", "id,script\n46GP8,a script\n",
     "missing column.*descriptions"),
    ("msvd", "raw-captions.pkl", "not a pickle at all", "refused: not a pickle of plain"),
])
def test_a_file_in_the_wrong_format_names_the_file_and_the_problem(tmp_path, dataset, name,
                                                                   content, message):
    root = tmp_path / "data"
    make = {"charades": make_charades, "didemo": make_didemo, "msvd": make_msvd,
            "activitynet": lambda r, clips: make_activitynet(r, r / "videos", clips)}[dataset]
    make(root, clips=False)
    (root / name).write_text(content)
    with pytest.raises(DatasetError, match=message) as error:
        load_dataset(dataset, root)
    assert str(root / name) in str(error.value)


def readme_dataset_rows() -> dict[str, list[str]]:
    """The cells of each row of README's table of datasets (the one with a frames column)."""
    lines = (REPO / "README.md").read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| dataset |")
                  and "frames" in line)
    rows = {}
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells
    return rows


def test_readme_table_says_what_each_dataset_gives():
    from avr.extract.datasets import DATASETS, facts_of

    rows = readme_dataset_rows()
    assert set(rows) == set(DATASETS)
    for name in DATASETS:
        facts, cells = facts_of(name), rows[name]
        assert cells[3] == str(facts.frames), name
        assert cells[4] == f"{facts.text_tokens.clip}, {facts.text_tokens.roberta}", name
        if facts.videos:
            counts = " / ".join(f"{facts.videos[split]:,}" for split in schema.SPLITS)
            assert cells[1].startswith(counts), name
        for paper in facts.reported_by:
            assert paper in cells[5], (name, paper)
        assert ("paragraph" in cells[2]) == (facts.protocol == "paragraphs"), name
