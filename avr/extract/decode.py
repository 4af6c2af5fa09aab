"""Media decoding: a video file -> F sampled RGB frames and an AST-style log-mel fbank.

Frames (CacheSpec.frame_sampling, docs/cache.md): F sample times at the centres of F equal
segments of the video stream's duration; one sequential decoding pass keeps, for every sample
time, the frame on screen at that time (the last frame presented at or before it; the first
frame for a time before it). For a constant frame rate this is frame floor((k + 0.5) * N / F) of
N, the middle frame of each of F equal index segments as X-Pool's uniform sampling takes it. A
video with fewer frames than F repeats frames (their mask stays True). Each kept frame is
resized so that its shorter side is S (bicubic, as CLIP's preprocessing) and centre-cropped to
S x S.

Audio (docs/methods.md G, docs/cache.md; TEFAL and AST): mono, 16 kHz through PyAV's resampler;
Kaldi-compatible log-mel fbank (htk_compat, hanning window, 128 mel bins, 25 ms window, dither
0, no energy) with the adaptive frame shift f_shift_ms = n_samples * 1000 / (sr * L_tar), so the
whole clip spans the L_tar = 1024 frames; padded with zeros or cut to exactly L_tar frames, then
normalised as (fbank - mean) / (2 * std) with AST's AudioSet statistics. A clip without an audio
track gets an all-zero fbank that is NOT normalised (distinct from a silent track).

Broken files raise ``ClipDecodeError`` (an ``avr.errors.DecodeError``) naming the file and one
``reason`` of ``avr.errors.DECODE_REASONS``. Truncation policy: a file whose MP4 index or
container header is cut off cannot be opened and is "truncated"; a file that opens but whose video frames stop more than
one sampling segment (duration / F) before the last sample time is "truncated" too, since at
least one sampled frame would be a stand-in from another part of the video. A shortfall smaller
than that is decoded, the last frames repeated. Undecodable packets inside a stream are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
import torchaudio

from avr.errors import ClipDecodeError
from avr.store.schema import AudioParams

@dataclass
class DecodedClip:
    """What the backbones need from one video file."""

    frames: np.ndarray  # uint8 [F, S, S, 3] RGB
    frame_mask: np.ndarray  # bool [F], True where a frame fills the slot (all: short videos repeat)
    fbank: np.ndarray  # float32 [target_length, num_mel_bins], normalised (zeros: no audio)
    has_audio: bool
    duration_s: float  # of the video stream


# ---- frame sampling ----------------------------------------------------------------------------

def sample_times(duration: float, num_frames: int) -> np.ndarray:
    """[F] seconds: the centre of each of F equal segments of ``duration``."""
    return (np.arange(num_frames) + 0.5) * (duration / num_frames)


def resized_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``image_size`` (torchvision Resize's rounding)."""
    if width <= height:
        return image_size, int(image_size * height / width)
    return int(image_size * width / height), image_size


def _square_rgb(frame: av.VideoFrame, image_size: int) -> np.ndarray:
    """[S, S, 3] uint8: shorter side resized to S (bicubic), centre crop."""
    width, height = resized_size(frame.width, frame.height, image_size)
    rgb = frame.reformat(width=width, height=height, format="rgb24",
                         interpolation="BICUBIC").to_ndarray()
    top, left = (height - image_size) // 2, (width - image_size) // 2
    return rgb[top:top + image_size, left:left + image_size]


class _FramesOnScreen:
    """Keeps, for every sample time, the frame on screen at that time (frames in time order)."""

    def __init__(self, times: np.ndarray):
        self.times = times  # [F] seconds, ascending
        self.kept: list[av.VideoFrame | None] = [None] * len(times)
        self.filled = np.zeros(len(times), dtype=bool)
        self.last_time = -np.inf
        self.frame_interval = 0.0  # seconds between the last two frames
        self.count = 0

    @property
    def complete(self) -> bool:
        """True once a frame after the last sample time was seen: no later frame is on screen
        at any sample time."""
        return self.last_time > self.times[-1]

    def offer(self, frame: av.VideoFrame, time: float) -> None:
        # 1 us of slack: a frame presented exactly at a sample time is on screen then; sample
        # times before the first frame take the first frame
        on_screen = (time <= self.times + 1e-6) | ~self.filled
        for index in np.flatnonzero(on_screen):
            self.kept[index] = frame
        self.filled |= on_screen
        if self.count:
            self.frame_interval = time - self.last_time
        self.last_time = max(self.last_time, time)
        self.count += 1

    @property
    def covered_until(self) -> float:
        """End of the last decoded frame, in seconds."""
        return self.last_time + max(self.frame_interval, 0.0)


# ---- opening ------------------------------------------------------------------------------------

def _mp4_cut_short(path: Path) -> bool:
    """True for an ISO-BMFF (MP4/MOV/M4A) file whose top-level boxes run past the end of the
    file or that has no index (moov box): what an interrupted download or write leaves."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        if handle.read(8)[4:8] != b"ftyp":
            return False
        offset, box_types = 0, []
        while offset + 8 <= size:
            handle.seek(offset)
            header = handle.read(16)
            box_size, box_type = int.from_bytes(header[:4], "big"), header[4:8]
            if box_size == 1:
                box_size = int.from_bytes(header[8:16], "big")
            elif box_size == 0:
                box_size = size - offset
            if box_size < 8:
                return False
            box_types.append(box_type)
            if offset + box_size > size:
                return True
            offset += box_size
        return b"moov" not in box_types


def _open(path: Path):
    """Open a media container, turning every way it can fail into a ClipDecodeError."""
    if not path.exists():
        raise ClipDecodeError(path, "missing_file", "file not found")
    if not path.is_file():
        raise ClipDecodeError(path, "unreadable", "not a regular file")
    if path.stat().st_size == 0:
        raise ClipDecodeError(path, "zero_byte", "file is empty (0 bytes); re-download it")
    try:
        return av.open(str(path), metadata_errors="ignore")
    except av.error.EOFError:
        raise ClipDecodeError(path, "truncated",
                              "file ends inside its container header; re-download it") from None
    except (av.error.FFmpegError, OSError) as error:
        if _mp4_cut_short(path):
            raise ClipDecodeError(path, "truncated", "MP4 file is cut short (its boxes run past "
                                  "the end or its index is missing); re-download it") from None
        reason = getattr(error, "strerror", None) or str(error)
        raise ClipDecodeError(path, "unreadable",
                              f"not a media file FFmpeg can read ({reason})") from None


def _video_stream(container, path: Path):
    if not container.streams.video:
        raise ClipDecodeError(path, "no_video_stream", "file has no video stream")
    return container.streams.video[0]


def _stream_duration(container, stream) -> float | None:
    """Seconds of ``stream`` as the container states it (stream, then container, then frame
    count over rate); None when none of them is known."""
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    if stream.frames and stream.average_rate:
        return float(stream.frames / stream.average_rate)
    return None


def _demuxed_duration(path: Path) -> float:
    """Seconds of the first video stream from packet timestamps alone (no decoding)."""
    with _open(path) as container:
        stream = _video_stream(container, path)
        start, end = None, 0.0
        for packet in container.demux(stream):
            if packet.pts is None:
                continue
            time = float(packet.pts * stream.time_base)
            start = time if start is None else min(start, time)
            end = max(end, time + float((packet.duration or 0) * stream.time_base))
        return end - (start or 0.0)


def _frame_time(frame: av.VideoFrame, index: int, stream, start: float) -> float:
    if frame.pts is not None:
        return float(frame.pts * stream.time_base) - start
    return index / float(stream.average_rate or 1)


# ---- the decoding pass --------------------------------------------------------------------------

@dataclass
class _Decoded:
    frames: np.ndarray | None  # uint8 [F, S, S, 3]
    frame_mask: np.ndarray | None  # bool [F]
    duration_s: float
    waveform: np.ndarray | None  # float32 [n], mono


def _decode(path: Path, *, num_frames: int | None, image_size: int | None,
            sample_rate: int | None) -> _Decoded:
    """One demuxing pass over the file decoding the video stream (when ``num_frames`` is given)
    and the audio stream (when ``sample_rate`` is given and the file has one)."""
    with _open(path) as container:
        video = _video_stream(container, path) if num_frames is not None else None
        audio = (container.streams.audio[0]
                 if sample_rate is not None and container.streams.audio else None)
        sampler, duration, start = None, 0.0, 0.0
        if video is not None:
            duration = _stream_duration(container, video)
            if duration is None:
                duration = _demuxed_duration(path)
            start = float(video.start_time * video.time_base) if video.start_time else 0.0
            sampler = _FramesOnScreen(sample_times(duration, num_frames))
        resampler = (av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
                     if audio is not None else None)
        chunks: list[np.ndarray] = []
        streams = [s for s in (video, audio) if s is not None]
        try:
            # demux() with no stream would read every stream: nothing to do then
            for packet in container.demux(*streams) if streams else ():
                if video is not None and packet.stream.index == video.index:
                    if sampler.complete:
                        if audio is None:
                            break
                        continue
                    for frame in _decode_packet(packet):
                        sampler.offer(frame, _frame_time(frame, sampler.count, video, start))
                else:
                    for frame in _decode_packet(packet):
                        chunks.extend(f.to_ndarray()[0] for f in resampler.resample(frame))
        except av.error.FFmpegError:
            pass  # the data ends or breaks here; coverage below decides whether that matters
        if resampler is not None:
            chunks.extend(f.to_ndarray()[0] for f in resampler.resample(None))

    waveform = None
    if audio is not None:
        waveform = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if sampler is None:
        return _Decoded(None, None, duration, waveform)
    _check_coverage(path, sampler, duration, num_frames)
    frames = _gather(sampler, image_size)
    mask = sampler.filled.copy()
    return _Decoded(frames, mask, duration, waveform)


def _decode_packet(packet) -> list:
    """Frames of one packet; an undecodable packet yields none (later ones may still decode)."""
    try:
        return packet.decode()
    except av.error.FFmpegError:
        return []


def _check_coverage(path: Path, sampler: _FramesOnScreen, duration: float, num_frames: int):
    if sampler.count == 0:
        raise ClipDecodeError(path, "no_frames", "video stream has no decodable frames")
    segment = duration / num_frames
    if sampler.covered_until < sampler.times[-1] - segment:
        raise ClipDecodeError(path, "truncated",
                              f"video frames stop at {sampler.covered_until:.2f} s of a stated "
                              f"{duration:.2f} s; re-download it")


def _gather(sampler: _FramesOnScreen, image_size: int) -> np.ndarray:
    """[F, S, S, 3] uint8; a frame kept for several sample times is converted once."""
    frames = np.zeros((len(sampler.kept), image_size, image_size, 3), dtype=np.uint8)
    converted: dict[int, np.ndarray] = {}
    for index, frame in enumerate(sampler.kept):
        if frame is None:
            continue
        if id(frame) not in converted:
            converted[id(frame)] = _square_rgb(frame, image_size)
        frames[index] = converted[id(frame)]
    return frames


# ---- public API ---------------------------------------------------------------------------------

def decode_frames(path: str | Path, num_frames: int, image_size: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Uniformly sampled frames: (uint8 [F, S, S, 3] RGB, bool [F] mask)."""
    decoded = _decode(Path(path), num_frames=num_frames, image_size=image_size, sample_rate=None)
    return decoded.frames, decoded.frame_mask


def decode_audio(path: str | Path, sample_rate: int = 16_000) -> np.ndarray | None:
    """float32 [n] mono waveform at ``sample_rate`` (None when the file has no audio stream)."""
    return _decode(Path(path), num_frames=None, image_size=None, sample_rate=sample_rate).waveform


def frame_shift_ms(num_samples: int, params: AudioParams) -> float:
    """TEFAL's adaptive shift n_samples * 1000 / (sr * L_tar), at least one sample long."""
    adaptive = num_samples * 1000.0 / (params.sample_rate * params.target_length)
    return max(adaptive, 1000.0 / params.sample_rate)


def log_mel(waveform: np.ndarray, params: AudioParams) -> np.ndarray:
    """float32 [T, num_mel_bins] Kaldi log-mel fbank with the adaptive frame shift, T ~ L_tar
    (before padding or cutting, not normalised)."""
    samples = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32))[None]  # [1, n]
    window = int(params.sample_rate * params.frame_length_ms / 1000)
    if samples.shape[1] < window:  # shorter than one window: pad so that one frame exists
        samples = torch.nn.functional.pad(samples, (0, window - samples.shape[1]))
    mel = torchaudio.compliance.kaldi.fbank(
        samples, htk_compat=params.htk_compat, sample_frequency=params.sample_rate,
        use_energy=False, window_type=params.window_type, num_mel_bins=params.num_mel_bins,
        dither=params.dither, frame_length=params.frame_length_ms,
        frame_shift=frame_shift_ms(waveform.shape[0], params))
    return mel.numpy()


def fbank(waveform: np.ndarray, params: AudioParams) -> np.ndarray:
    """float32 [L_tar, num_mel_bins]: log-mel padded with zeros or cut to L_tar frames, then
    (x - mean) / (2 * std) with the params' (AST AudioSet) statistics."""
    mel = log_mel(waveform, params)[:params.target_length]
    fitted = np.zeros((params.target_length, params.num_mel_bins), dtype=np.float32)
    fitted[:len(mel)] = mel
    return ((fitted - params.fbank_mean) / (2 * params.fbank_std)).astype(np.float32)


def missing_audio_fbank(params: AudioParams | None = None) -> np.ndarray:
    """The all-zero, un-normalised fbank of a clip without an audio track."""
    params = params or AudioParams()
    return np.zeros((params.target_length, params.num_mel_bins), dtype=np.float32)


def decode_clip(path: str | Path, num_frames: int, image_size: int,
                audio_params: AudioParams, *, read_audio: bool = True) -> DecodedClip:
    """Frames and fbank of one video file in a single demuxing pass. An audio stream that
    decodes to no samples counts as no audio; with ``read_audio`` False (a dataset published
    without audio) the audio stream is not read and the clip counts as without one."""
    decoded = _decode(Path(path), num_frames=num_frames, image_size=image_size,
                      sample_rate=audio_params.sample_rate if read_audio else None)
    has_audio = decoded.waveform is not None and decoded.waveform.size > 0
    audio = (fbank(decoded.waveform, audio_params) if has_audio
             else missing_audio_fbank(audio_params))
    return DecodedClip(frames=decoded.frames, frame_mask=decoded.frame_mask, fbank=audio,
                       has_audio=has_audio, duration_s=decoded.duration_s)
