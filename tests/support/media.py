"""Small media files with a known content, good and broken, written with PyAV for decode tests."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


def solid_frames(num_frames: int, size: tuple[int, int], colour: tuple[int, int, int]
                 ) -> np.ndarray:
    """[T, H, W, 3] uint8 frames of one colour; ``size`` is (width, height)."""
    width, height = size
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    frames[:] = np.asarray(colour, dtype=np.uint8)
    return frames


def grey_ramp_frames(num_frames: int, size: tuple[int, int], step: int = 8) -> np.ndarray:
    """[T, H, W, 3] frames whose grey level is ``step * t``: a decoded frame names its index."""
    width, height = size
    levels = (np.arange(num_frames) * step).clip(0, 255).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (num_frames, height, width, 3)).copy()


def waveform(kind: str, seconds: float, sample_rate: int, channels: int = 1) -> np.ndarray:
    """[channels, n] float32 test signal: "tone" (440 Hz), "high_tone" (2 kHz), "noise" or
    "silence"."""
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    if kind == "tone":
        mono = 0.5 * np.sin(2 * np.pi * 440.0 * t)
    elif kind == "high_tone":
        mono = 0.5 * np.sin(2 * np.pi * 2000.0 * t)
    elif kind == "noise":
        mono = 0.3 * np.random.default_rng(0).standard_normal(t.shape)
    elif kind == "silence":
        mono = np.zeros_like(t)
    else:
        raise ValueError(f"unknown test signal {kind!r}")
    return np.repeat(mono[None].astype(np.float32), channels, axis=0)


def _encode_audio(container, stream, samples: np.ndarray, sample_rate: int) -> None:
    """Encode [channels, n] float32 samples in 1024-sample planar frames."""
    layout = "stereo" if samples.shape[0] == 2 else "mono"
    for start in range(0, samples.shape[1], 1024):
        chunk = np.ascontiguousarray(samples[:, start:start + 1024])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
        frame.sample_rate = sample_rate
        frame.pts = start
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


# container -> (video codec, audio codec): MP4 as most releases ship, MOV as many of DiDeMo's
# Flickr originals, AVI as LSMDC's and MSVD's
# clips come (MPEG-4 Part 2 video, MP3 audio)
CODECS = {"mp4": ("libx264", "aac"), "mov": ("libx264", "aac"), "avi": ("mpeg4", "mp3")}


def write_clip(path: Path, *, seconds: float = 1.0, fps: int = 10, size: tuple[int, int] = (64, 48),
               colour: tuple[int, int, int] = (255, 0, 0), frames: np.ndarray | None = None,
               audio: str = "tone", sample_rate: int = 16_000, stereo: bool = False,
               faststart: bool = False, container_format: str = "mp4") -> Path:
    """An H.264 MP4 (``container_format="mov"``: MOV; ``"avi"``: an MPEG-4 AVI) of ``seconds``
    at ``fps`` (``frames`` [T, H, W, 3] overrides the solid ``colour``) with an AAC (AVI: MP3)
    track of ``audio`` ("tone", "high_tone", "noise", "silence") or no audio track at all
    (``audio="none"``). ``faststart`` puts the MP4 index (moov) first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if frames is None:
        frames = solid_frames(int(round(seconds * fps)), size, colour)
    height, width = frames.shape[1:3]
    options = {"movflags": "faststart"} if faststart else {}
    video_codec, audio_codec = CODECS[container_format]
    with av.open(str(path), "w", format=container_format, options=options) as container:
        video = container.add_stream(video_codec, rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        if video_codec == "libx264":
            video.options = {"preset": "ultrafast", "crf": "10"}
        audio_stream = None
        if audio != "none":
            audio_stream = container.add_stream(audio_codec, rate=sample_rate)
            audio_stream.layout = "stereo" if stereo else "mono"
        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = index
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if audio_stream is not None:
            samples = waveform(audio, len(frames) / fps, sample_rate, 2 if stereo else 1)
            _encode_audio(container, audio_stream, samples, sample_rate)
    return path


def write_audio_only(path: Path, *, seconds: float = 1.0, sample_rate: int = 16_000) -> Path:
    """An M4A file holding one AAC tone and no video stream."""
    path = Path(path)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=sample_rate)
        stream.layout = "mono"
        _encode_audio(container, stream, waveform("tone", seconds, sample_rate), sample_rate)
    return path


def write_empty_video(path: Path) -> Path:
    """An AVI whose video stream holds no frames (MP4 drops an empty track altogether)."""
    path = Path(path)
    with av.open(str(path), "w", format="avi") as container:
        video = container.add_stream("mpeg4", rate=10)
        video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()
    return path


def write_zero_byte(path: Path) -> Path:
    path = Path(path)
    path.write_bytes(b"")
    return path


def write_garbage(path: Path, num_bytes: int = 4096) -> Path:
    """Random bytes under a video file name."""
    path = Path(path)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, num_bytes, dtype=np.uint8).tobytes())
    return path


def write_truncated(path: Path, *, keep: float = 0.5, faststart: bool = True,
                    seconds: float = 4.0) -> Path:
    """A valid clip cut to its first ``keep`` fraction of bytes, as an interrupted download
    leaves it. With ``faststart`` the index survives and states the full duration; without,
    the index (written last) is lost."""
    path = Path(path)
    num_frames = int(seconds * 10)
    write_clip(path, seconds=seconds, fps=10, faststart=faststart,
               frames=grey_ramp_frames(num_frames, (64, 48), step=255 // num_frames))
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path
