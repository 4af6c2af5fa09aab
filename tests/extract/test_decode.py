"""Decoding: uniform frame sampling, resize and crop, mono 16 kHz audio, the AST fbank, and a
named reason for every kind of broken file."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from avr.errors import DecodeError
from avr.extract.decode import (
    ClipDecodeError,
    decode_audio,
    decode_clip,
    decode_frames,
    fbank,
    frame_shift_ms,
    log_mel,
    missing_audio_fbank,
    resized_size,
    sample_times,
)
from avr.store.schema import AudioParams
from support import media

PARAMS = AudioParams()


def test_sample_times_are_centres_of_equal_segments():
    np.testing.assert_allclose(sample_times(4.0, 4), [0.5, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(sample_times(3.0, 1), [1.5])


def test_decode_frames_returns_uint8_square_frames_and_a_full_mask(tmp_path):
    path = media.write_clip(tmp_path / "clip.mp4", seconds=1.0, fps=10, size=(64, 48))
    frames, mask = decode_frames(path, num_frames=6, image_size=32)
    assert frames.shape == (6, 32, 32, 3) and frames.dtype == np.uint8
    assert mask.shape == (6,) and mask.dtype == np.bool_ and mask.all()


def test_decoded_frames_keep_the_encoded_colour(tmp_path):
    path = media.write_clip(tmp_path / "red.mp4", colour=(255, 0, 0), size=(64, 48))
    frames, _ = decode_frames(path, num_frames=4, image_size=16)
    np.testing.assert_allclose(frames.reshape(-1, 3).mean(axis=0), [255, 0, 0], atol=6)


def test_each_sample_takes_the_frame_on_screen_at_its_time(tmp_path):
    # frame k has grey level 8k, so a decoded grey level names the frame it came from
    frames = media.grey_ramp_frames(20, (64, 48), step=8)
    path = media.write_clip(tmp_path / "ramp.mp4", fps=10, frames=frames)
    decoded, _ = decode_frames(path, num_frames=4, image_size=16)
    picked = np.round(decoded[:, 8, 8, 0] / 8)
    # samples at 0.25, 0.75, 1.25, 1.75 s of a 2 s clip at 10 fps
    np.testing.assert_array_equal(picked, [2, 7, 12, 17])


def test_video_shorter_than_num_frames_repeats_frames_with_mask_true(tmp_path):
    frames = media.grey_ramp_frames(4, (32, 32), step=40)
    path = media.write_clip(tmp_path / "short.mp4", fps=4, frames=frames, audio="none")
    decoded, mask = decode_frames(path, num_frames=12, image_size=16)
    picked = np.round(decoded[:, 8, 8, 0] / 40)
    assert mask.all()
    # frame floor((k + 0.5) * 4 / 12) for sample k
    np.testing.assert_array_equal(picked, np.repeat([0, 1, 2, 3], 3))


def test_resized_size_sets_the_shorter_side():
    assert resized_size(128, 32, 16) == (64, 16)
    assert resized_size(48, 96, 24) == (24, 48)


def test_wide_frames_are_centre_cropped(tmp_path):
    frames = np.zeros((5, 32, 128, 3), dtype=np.uint8)
    frames[..., 0] = 255  # red sides
    frames[:, :, 48:80] = (0, 255, 0)  # green centre quarter
    path = media.write_clip(tmp_path / "wide.mp4", fps=5, frames=frames)
    decoded, _ = decode_frames(path, num_frames=2, image_size=16)
    centre = decoded[:, :, 3:13].reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(centre, [0, 255, 0], atol=12)


def test_frame_shift_follows_the_adaptive_formula():
    n = 3 * 16_000
    assert frame_shift_ms(n, PARAMS) == pytest.approx(n * 1000 / (16_000 * 1024))


def test_frame_shift_is_at_least_one_sample_for_tiny_clips():
    assert frame_shift_ms(100, PARAMS) == pytest.approx(1000 / 16_000)


@pytest.mark.parametrize("seconds", [1.0, 3.0, 10.0])
def test_log_mel_spans_about_target_length_frames(seconds):
    waveform = media.waveform("tone", seconds, 16_000)[0]
    mel = log_mel(waveform, PARAMS)
    shift_samples = int(16_000 * frame_shift_ms(waveform.size, PARAMS) / 1000)
    assert mel.shape == (1 + (waveform.size - 400) // shift_samples, 128)
    assert abs(mel.shape[0] - 1024) <= 0.05 * 1024


@pytest.mark.parametrize("seconds", [1.0, 3.0, 10.0])
def test_fbank_has_exactly_target_length_frames(seconds):
    features = fbank(media.waveform("noise", seconds, 16_000)[0], PARAMS)
    assert features.shape == (1024, 128) and features.dtype == np.float32


def test_fbank_is_normalised_with_the_ast_statistics():
    waveform = media.waveform("tone", 10.0, 16_000)[0]
    expected = (log_mel(waveform, PARAMS)[:1024] - PARAMS.fbank_mean) / (2 * PARAMS.fbank_std)
    np.testing.assert_allclose(fbank(waveform, PARAMS)[:len(expected)], expected, rtol=1e-6)


def test_fbank_of_a_clip_shorter_than_one_window_is_padded():
    features = fbank(np.full(100, 0.1, dtype=np.float32), PARAMS)
    assert features.shape == (1024, 128) and np.isfinite(features).all()


def test_missing_audio_fbank_is_all_zeros():
    features = missing_audio_fbank(PARAMS)
    assert features.shape == (1024, 128) and not features.any()


def test_stereo_44k_audio_becomes_mono_16k_of_the_same_duration(tmp_path):
    path = media.write_clip(tmp_path / "stereo.mp4", seconds=2.0, audio="tone",
                            sample_rate=44_100, stereo=True)
    waveform = decode_audio(path)
    assert waveform.ndim == 1 and waveform.dtype == np.float32
    # AAC pads its last frame: at most 1024 input samples (~372 samples at 16 kHz) more
    assert 32_000 <= waveform.size <= 32_000 + 400
    assert np.abs(waveform).max() > 0.3


def test_decode_audio_returns_none_without_an_audio_stream(tmp_path):
    assert decode_audio(media.write_clip(tmp_path / "mute.mp4", audio="none")) is None


def test_clip_without_audio_track_has_zero_fbank_and_no_audio_flag(tmp_path):
    clip = decode_clip(media.write_clip(tmp_path / "mute.mp4", audio="none"), 4, 16, PARAMS)
    assert clip.has_audio is False
    assert clip.fbank.shape == (1024, 128) and not clip.fbank.any()


def test_silent_track_is_audio_and_differs_from_a_missing_track(tmp_path):
    clip = decode_clip(media.write_clip(tmp_path / "silent.mp4", audio="silence"), 4, 16, PARAMS)
    assert clip.has_audio is True
    assert clip.fbank.any()


def test_decode_clip_reports_duration_frames_and_fbank(tmp_path):
    path = media.write_clip(tmp_path / "clip.mp4", seconds=2.0, fps=10, audio="tone")
    clip = decode_clip(path, num_frames=8, image_size=24, audio_params=PARAMS)
    assert clip.duration_s == pytest.approx(2.0, abs=0.05)
    assert clip.frames.shape == (8, 24, 24, 3) and clip.frame_mask.all()
    assert clip.fbank.shape == (1024, 128) and clip.has_audio


def test_tones_of_different_pitch_give_different_fbanks(tmp_path):
    low = decode_clip(media.write_clip(tmp_path / "low.mp4", audio="tone"), 2, 16, PARAMS)
    high = decode_clip(media.write_clip(tmp_path / "high.mp4", audio="high_tone"), 2, 16, PARAMS)
    assert low.fbank[100:900].mean(axis=0).argmax() < high.fbank[100:900].mean(axis=0).argmax()


BROKEN = {
    "missing_file": lambda path: path,
    "zero_byte": media.write_zero_byte,
    "unreadable": media.write_garbage,
    "no_video_stream": lambda path: media.write_audio_only(path.with_suffix(".m4a")),
    "truncated": media.write_truncated,
    "no_frames": lambda path: media.write_empty_video(path.with_suffix(".avi")),
}


@pytest.mark.parametrize("reason", sorted(BROKEN))
def test_broken_file_raises_decode_error_with_its_reason(tmp_path, reason):
    path = BROKEN[reason](tmp_path / "broken.mp4")
    with pytest.raises(DecodeError) as caught:
        decode_clip(path, 4, 16, PARAMS)
    assert caught.value.reason == reason
    assert str(path) in str(caught.value)


def test_truncated_file_without_its_index_is_truncated(tmp_path):
    path = media.write_truncated(tmp_path / "cut.mp4", faststart=False)
    with pytest.raises(ClipDecodeError) as caught:
        decode_frames(path, 4, 16)
    assert caught.value.reason == "truncated"


def test_file_missing_only_its_last_frames_still_decodes(tmp_path):
    path = media.write_truncated(tmp_path / "cut.mp4", keep=0.95)
    frames, mask = decode_frames(path, 4, 16)
    assert mask.all() and frames.shape == (4, 16, 16, 3)


def test_decode_error_survives_pickling(tmp_path):
    error = ClipDecodeError(tmp_path / "a.mp4", "truncated", "cut short")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.path, copy.reason, str(copy)) == (error.path, error.reason, str(error))
