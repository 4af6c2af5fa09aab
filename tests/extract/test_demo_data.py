"""The demo dataset: real encoded clips whose captions name what is seen and heard, twins that
only sound tells apart, a clip without audio, every split, and the same content for a seed."""

from __future__ import annotations

import csv
from collections import defaultdict

import numpy as np
import pytest

from avr.extract import demo_data
from avr.extract.decode import decode_audio, decode_clip, decode_frames
from avr.store.schema import SPLITS, AudioParams

NUM_LOOKS = 2  # 12 clips: look 0 puts two twins in test, look 1 has a clip without audio


def read_captions(root):
    with (root / demo_data.CAPTIONS_FILE).open(newline="") as handle:
        return list(csv.DictReader(handle))


def video_path(root, video_id):
    return root / demo_data.VIDEOS_DIR / f"{video_id}.mp4"


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return demo_data.generate_demo(tmp_path_factory.mktemp("demo") / "demo", seed=0,
                                   num_looks=NUM_LOOKS)


@pytest.fixture(scope="module")
def clips():
    return demo_data.plan_clips(0, NUM_LOOKS)


def test_captions_file_has_the_documented_columns(demo_root):
    with (demo_root / demo_data.CAPTIONS_FILE).open(newline="") as handle:
        assert next(csv.reader(handle)) == list(demo_data.CAPTION_COLUMNS)


def test_every_video_has_a_file_and_two_captions(demo_root):
    per_video = defaultdict(int)
    for row in read_captions(demo_root):
        per_video[row["video_id"]] += 1
    assert len(per_video) == 12
    assert set(per_video.values()) == {2}
    assert all(video_path(demo_root, v).stat().st_size > 0 for v in per_video)


def test_default_size_is_about_a_hundred_clips():
    clips = demo_data.plan_clips(0)
    assert len(clips) == 96
    assert [sum(c.split == s for c in clips) for s in SPLITS] == [56, 16, 24]


def test_same_seed_gives_same_captions_and_decoded_media(demo_root, tmp_path):
    again = demo_data.generate_demo(tmp_path / "again", seed=0, num_looks=NUM_LOOKS)
    assert read_captions(again) == read_captions(demo_root)
    for video_id in ("demo0000", "demo0004"):
        first, _ = decode_frames(video_path(demo_root, video_id), 6, 32)
        second, _ = decode_frames(video_path(again, video_id), 6, 32)
        np.testing.assert_array_equal(first, second)
        np.testing.assert_array_equal(decode_audio(video_path(demo_root, video_id)),
                                      decode_audio(video_path(again, video_id)))


def test_another_seed_gives_other_clips():
    assert demo_data.plan_clips(0, NUM_LOOKS) != demo_data.plan_clips(1, NUM_LOOKS)


def test_twins_share_their_pixels_and_differ_in_sound(demo_root, clips):
    twins = [c for c in clips if c.twin and c.split == "test"]
    assert len(twins) == 2
    assert len({(c.shape, c.colour, c.motion) for c in twins}) == 1
    assert len({c.sound for c in twins}) == len(twins)
    decoded = [decode_clip(video_path(demo_root, c.video_id), 6, 32, AudioParams()) for c in twins]
    for other in decoded[1:]:
        np.testing.assert_array_equal(decoded[0].frames, other.frames)
        assert np.abs(decoded[0].fbank - other.fbank).mean() > 0.1


def test_twin_captions_are_tagged_audio_only_and_name_different_sounds(demo_root, clips):
    twin_ids = {c.video_id for c in clips if c.twin}
    rows = read_captions(demo_root)
    assert {r["tag"] for r in rows if r["video_id"] in twin_ids} == {"audio_only"}
    assert {r["tag"] for r in rows if r["video_id"] not in twin_ids} == {"", "visual"}
    group = sorted(c.video_id for c in clips if c.twin and c.split == "test")
    first_captions = [next(r["caption"] for r in rows if r["video_id"] == v) for v in group]
    assert len(set(first_captions)) == len(group)


def test_visual_and_sound_vocabularies_do_not_overlap():
    def words(phrases):
        return {w for phrase in phrases for w in phrase.split()} - {"a", "the", "in", "as"}

    seen = words(p for pair in demo_data.MOTIONS.values() for p in pair) | words(
        demo_data.SHAPES) | words(demo_data.COLOURS)
    heard = words(demo_data.SOUNDS.values())
    assert seen.isdisjoint(heard)


def test_some_clip_has_no_audio_track(demo_root, clips):
    silent = [c for c in clips if c.sound == "none"]
    assert silent
    clip = decode_clip(video_path(demo_root, silent[0].video_id), 4, 16, AudioParams())
    assert clip.has_audio is False


def test_every_look_is_seen_in_training_and_twins_share_a_split(demo_root, clips):
    assert {r["split"] for r in read_captions(demo_root)} == set(SPLITS)
    splits_of_look = defaultdict(list)
    for clip in clips:
        splits_of_look[(clip.shape, clip.colour, clip.motion)].append(clip.split)
    assert all("train" in splits and "test" in splits for splits in splits_of_look.values())
    for clip in clips:
        assert clip.twin == (splits_of_look[(clip.shape, clip.colour, clip.motion)]
                             .count(clip.split) > 1)


def test_the_shape_shown_has_the_caption_colour(demo_root, clips):
    clip = clips[0]
    frames, _ = decode_frames(video_path(demo_root, clip.video_id), 4, 64)
    pixels = frames.reshape(-1, 3).astype(float)
    shape_pixels = pixels[np.abs(pixels - demo_data.BACKGROUND).sum(axis=1) > 90]
    np.testing.assert_allclose(np.median(shape_pixels, axis=0), demo_data.COLOURS[clip.colour],
                               atol=20)


@pytest.mark.parametrize("shape", demo_data.SHAPES)
def test_every_shape_covers_a_sizeable_part_of_the_frame(shape):
    mask = demo_data.shape_mask(shape, 64, (32.0, 32.0), radius=12.0, angle=0.0)
    assert 100 < mask.sum() < 0.5 * 64 * 64


@pytest.mark.parametrize("motion, axis, sign", [("left_to_right", 1, 1), ("right_to_left", 1, -1),
                                                ("upward", 0, -1), ("downward", 0, 1)])
def test_rendered_shape_moves_the_way_its_caption_says(motion, axis, sign):
    frames = demo_data.render_frames("square", "red", motion, num_frames=10, size=64)
    covered = (frames != demo_data.BACKGROUND).any(axis=-1)  # [T, H, W]
    centroids = [np.argwhere(mask).mean(axis=0)[axis] for mask in covered]
    assert sign * (centroids[-1] - centroids[0]) > 20


def test_spinning_shape_changes_pixels_but_not_place():
    frames = demo_data.render_frames("triangle", "red", "spinning", num_frames=10, size=64)
    covered = (frames != demo_data.BACKGROUND).any(axis=-1)
    assert (covered[0] != covered[3]).any()
    np.testing.assert_allclose(np.argwhere(covered[0]).mean(0), np.argwhere(covered[3]).mean(0),
                               atol=6)


def test_high_beep_is_higher_pitched_than_low_hum():
    rng = np.random.default_rng(0)

    def dominant_hz(sound):
        wave = demo_data.synthesize(sound, 1.0, 16_000, rng)
        return np.abs(np.fft.rfft(wave)).argmax()  # 1 s of audio: bin k is k Hz

    assert dominant_hz("high_beep") > 1000 > 200 > dominant_hz("low_hum")


def test_silence_is_zero_and_sounds_are_not():
    rng = np.random.default_rng(0)
    assert not demo_data.synthesize("silence", 0.5, 16_000, rng).any()
    for sound in ("high_beep", "low_hum", "rising_whistle", "noise_bursts", "drum_beat", "voice"):
        assert np.abs(demo_data.synthesize(sound, 0.5, 16_000, rng)).max() > 0.1


def test_demo_exists_only_when_complete(demo_root, tmp_path):
    assert demo_data.demo_exists(demo_root)
    assert not demo_data.demo_exists(tmp_path / "nothing")
    copy = demo_data.generate_demo(tmp_path / "copy", num_looks=1)
    next((copy / demo_data.VIDEOS_DIR).iterdir()).unlink()
    assert not demo_data.demo_exists(copy)
