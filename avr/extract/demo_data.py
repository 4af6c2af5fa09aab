"""The demo dataset: small real video files (H.264 + AAC) of moving shapes with sounds, and
captions that name what is seen and heard (README, "`avr demo`").

Every clip shows one coloured shape (circle, square, triangle, cross) moving one way (left to
right, right to left, up, down, bouncing, spinning, orbiting, still) over a dark background, with
one sound (repeating high beep, low hum, rising whistle, noise bursts, drum beat, a formant
"voice", a silent track) or no audio track at all. Captions use a small vocabulary in which
the visual words and the sound words do not overlap, so that even a bag-of-words text encoder
can tell them apart.

Looks: each look (shape, colour, motion) is rendered once and used by six clips with six
different sounds, so the pixels of those clips are identical and only sound tells them apart.
Every look has clips in train, val and test (``LOOK_SPLITS``): training sees each look with
several sounds, and half the looks put two clips in test. Clips that share their look with
another clip of their split are *twins*: both their captions name the look and the sound, and
only audio can decide between them, so they are tagged "audio_only". A clip alone with its
look in its split gets one caption naming sight and sound (tag "") and one naming only the
sight (tag "visual"). Every fourth look has one clip without an audio track.

Layout written under ``root``::

    videos/<video_id>.mp4
    captions.csv            video_id,caption,split,tag   (written last: its presence means done)

Generation is deterministic given ``seed``: seeded noise and a constant-quantiser,
single-threaded x264 give the same bytes run after run.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

CAPTIONS_FILE = "captions.csv"
VIDEOS_DIR = "videos"
CAPTION_COLUMNS = ("video_id", "caption", "split", "tag")

COLOURS = {
    "red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 235),
    "yellow": (235, 215, 40), "purple": (150, 60, 205), "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle", "cross")
# motion -> (caption phrase, alternative phrase)
MOTIONS = {
    "left_to_right": ("moves from left to right", "slides to the right"),
    "right_to_left": ("moves from right to left", "slides to the left"),
    "upward": ("moves upward", "drifts toward the top"),
    "downward": ("moves downward", "drops toward the bottom"),
    "bouncing": ("bounces", "keeps bouncing on the floor"),
    "spinning": ("spins in place", "rotates on the spot"),
    "orbiting": ("orbits the centre", "travels around in a loop"),
    "still": ("stays still", "does not move"),
}
# sound -> caption clause (one per sound: the words that decide between twins stay the same);
# "none" is a clip without an audio track
SOUNDS = {
    "high_beep": "while a high beep repeats",
    "low_hum": "while a low hum drones",
    "rising_whistle": "while a whistle climbs in pitch",
    "noise_bursts": "while bursts of static crackle",
    "drum_beat": "while a drum beats steadily",
    "voice": "while a voice murmurs",
    "silence": "in complete silence",
    "none": "in complete silence",
}
BACKGROUND = (24, 24, 24)


@dataclass(frozen=True)
class DemoClip:
    video_id: str
    shape: str
    colour: str
    motion: str
    sound: str
    split: str
    twin: bool


# ---- pictures ----------------------------------------------------------------------------------

def _polygon_mask(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Inside test for a convex polygon with counter-clockwise ``vertices`` [K, 2]."""
    inside = np.ones(u.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0)):
        inside &= (x1 - x0) * (v - y0) - (y1 - y0) * (u - x0) >= 0
    return inside


def shape_mask(shape: str, size: int, centre: tuple[float, float], radius: float,
               angle: float) -> np.ndarray:
    """bool [size, size]: pixels covered by ``shape`` at ``centre`` (pixels), rotated by
    ``angle`` radians."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy = xs - centre[0], ys - centre[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    if shape == "circle":
        return u * u + v * v <= radius * radius
    if shape == "square":
        half = radius * 0.8
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if shape == "triangle":
        corners = np.deg2rad([-90.0, 30.0, 150.0])  # apex up (image y grows downward)
        vertices = radius * np.stack([np.cos(corners), np.sin(corners)], axis=1)
        return _polygon_mask(u, v, vertices)
    if shape == "cross":
        arm = radius / 3
        return ((np.abs(u) <= radius) & (np.abs(v) <= arm)) | ((np.abs(u) <= arm) &
                                                               (np.abs(v) <= radius))
    raise ValueError(f"unknown shape {shape!r}")


def motion_pose(motion: str, progress: float) -> tuple[float, float, float]:
    """(x, y, angle): centre as fractions of the frame and rotation, at ``progress`` in [0, 1]."""
    if motion == "left_to_right":
        return 0.2 + 0.6 * progress, 0.5, 0.0
    if motion == "right_to_left":
        return 0.8 - 0.6 * progress, 0.5, 0.0
    if motion == "upward":
        return 0.5, 0.8 - 0.6 * progress, 0.0
    if motion == "downward":
        return 0.5, 0.2 + 0.6 * progress, 0.0
    if motion == "bouncing":
        return 0.5, 0.75 - 0.5 * abs(np.sin(3 * np.pi * progress)), 0.0
    if motion == "spinning":
        return 0.5, 0.5, 3 * np.pi * progress
    if motion == "orbiting":
        turn = 2 * np.pi * progress
        return 0.5 + 0.25 * np.cos(turn), 0.5 + 0.25 * np.sin(turn), 0.0
    if motion == "still":
        return 0.5, 0.5, 0.0
    raise ValueError(f"unknown motion {motion!r}")


def render_frames(shape: str, colour: str, motion: str, num_frames: int, size: int) -> np.ndarray:
    """uint8 [T, size, size, 3] RGB frames of one shape moving over the background."""
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    frames[:] = BACKGROUND
    for index in range(num_frames):
        x, y, angle = motion_pose(motion, index / max(num_frames - 1, 1))
        mask = shape_mask(shape, size, (x * size, y * size), 0.18 * size, angle)
        frames[index][mask] = COLOURS[colour]
    return frames


# ---- sounds ------------------------------------------------------------------------------------

def _pulses(t: np.ndarray, period: float, length: float, offset: float) -> np.ndarray:
    """[n] envelope: 1 during the first ``length`` s of every ``period``, 5 ms linear fades."""
    phase = np.mod(t - offset, period)
    fade = 0.005
    return np.clip(np.minimum(phase / fade, (length - phase) / fade), 0.0, 1.0)


def _voice(t: np.ndarray, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Speech-like sound: a harmonic source at a wandering pitch shaped by vowel formants that
    change every syllable, with a syllable-rate loudness envelope (additive synthesis)."""
    vowels = np.array([[730, 1090, 2440], [270, 2290, 3010], [300, 870, 2240],
                       [530, 1840, 2480], [570, 840, 2410]], dtype=np.float64)  # a i u e o
    syllable = 0.22
    index = np.minimum((t / syllable).astype(int), int(t[-1] / syllable))
    order = rng.integers(0, len(vowels), index.max() + 1)
    base_pitch = 125.0
    pitch = base_pitch * (1 + 0.08 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 2 * np.pi)))
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    harmonics = np.arange(1, 31)
    # [syllables, harmonics] formant response at the nominal pitch (the wobble is ignored here)
    distance = harmonics[None, :, None] * base_pitch - vowels[order][:, None, :]
    gains = np.sum(1.0 / (1.0 + (distance / 90.0) ** 2), axis=2) / np.sqrt(harmonics)
    signal = np.zeros_like(t)
    for k, harmonic in enumerate(harmonics):
        signal += gains[index, k] * np.sin(harmonic * phase)
    envelope = np.sin(np.pi * np.mod(t, syllable) / syllable) ** 2
    return signal * envelope


def synthesize(sound: str, seconds: float, sample_rate: int, rng: np.random.Generator
               ) -> np.ndarray:
    """float32 [n] mono waveform in [-1, 1] of one named sound ("none" is not a waveform)."""
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    if sound == "high_beep":
        wave = np.sin(2 * np.pi * 1500 * t) * _pulses(t, 0.4, 0.12, rng.uniform(0, 0.1))
    elif sound == "low_hum":
        wave = sum(np.sin(2 * np.pi * 110 * k * t) / k for k in (1, 2, 3))
    elif sound == "rising_whistle":
        freq = 500 * np.exp(np.log(5.0) * np.mod(t, 1.5) / 1.5)  # 500 -> 2500 Hz, twice
        wave = np.sin(2 * np.pi * np.cumsum(freq) / sample_rate)
    elif sound == "noise_bursts":
        wave = rng.standard_normal(t.size) * _pulses(t, 0.35, 0.08, rng.uniform(0, 0.1))
    elif sound == "drum_beat":
        beat = np.mod(t - rng.uniform(0, 0.05), 1 / 3)
        wave = np.sin(2 * np.pi * 70 * beat) * np.exp(-beat / 0.05)
    elif sound == "voice":
        wave = _voice(t, sample_rate, rng)
    elif sound == "silence":
        wave = np.zeros_like(t)
    else:
        raise ValueError(f"no waveform for sound {sound!r}")
    peak = np.max(np.abs(wave)) if wave.size else 0.0
    return (0.4 * wave / peak if peak > 0 else wave).astype(np.float32)


# ---- encoding ----------------------------------------------------------------------------------

def write_video(path: Path, frames: np.ndarray, fps: int, audio: np.ndarray | None,
                sample_rate: int) -> None:
    """H.264 (yuv420p) MP4 of ``frames`` [T, H, W, 3], with a mono AAC track of ``audio`` [n]
    unless it is None. The same inputs give the same bytes."""
    with av.open(str(path), "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        # Constant quantiser, no lookahead, one thread: x264's rate control and lookahead read
        # memory whose content varies between runs, which would make the bytes vary too.
        video.options = {"preset": "ultrafast", "qp": "16"}
        video.codec_context.thread_count = 1
        sound = None
        if audio is not None:
            sound = container.add_stream("aac", rate=sample_rate)
            sound.layout = "mono"
            sound.bit_rate = 64_000
            sound.options = {"aac_coder": "fast"}
            sound.codec_context.thread_count = 1
        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = index
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if sound is not None:
            for start in range(0, audio.size, 1024):
                frame = av.AudioFrame.from_ndarray(audio[None, start:start + 1024].copy(),
                                                   format="fltp", layout="mono")
                frame.sample_rate, frame.pts = sample_rate, start
                container.mux(sound.encode(frame))
            container.mux(sound.encode(None))


# ---- the dataset -------------------------------------------------------------------------------

# Where the clips of one look go: even looks put two clips in test (twins that only sound can
# tell apart), odd looks one; every look is also seen in training with other sounds.
LOOK_SPLITS = (("train", "train", "train", "val", "test", "test"),
               ("train", "train", "train", "train", "val", "test"))
NO_TRACK_EVERY = 4  # looks 1, 5, 9, ... have one clip without an audio track


def plan_clips(seed: int, num_looks: int = 16) -> list[DemoClip]:
    """Every clip of the dataset: its content, split and twin status (no media yet)."""
    rng = np.random.default_rng(seed)
    looks = [(shape, colour, motion) for shape in SHAPES for colour in COLOURS
             for motion in MOTIONS if not (shape == "circle" and motion == "spinning")]
    if num_looks > len(looks):
        raise ValueError(f"num_looks={num_looks}: the demo has only {len(looks)} distinct looks")
    looks = [looks[i] for i in rng.permutation(len(looks))[:num_looks]]
    audible = [s for s in SOUNDS if s != "none"]
    clips: list[DemoClip] = []
    for index, (shape, colour, motion) in enumerate(looks):
        splits = LOOK_SPLITS[index % 2]
        sounds = [str(s) for s in rng.choice(audible, len(splits), replace=False)]
        if index % NO_TRACK_EVERY == 1:  # "none" and "silence" read alike: never both in a look
            sounds[sounds.index("silence") if "silence" in sounds else 0] = "none"
        order = rng.permutation(len(splits))
        for position in order:
            split = splits[position]
            twin = splits.count(split) > 1
            clips.append(DemoClip(f"demo{len(clips):04d}", shape, colour, motion,
                                  sounds[position], split, twin))
    return clips


def captions_of(clip: DemoClip) -> list[tuple[str, str]]:
    """Two (caption, tag) pairs for one clip. The look is paraphrased; a sound is always named
    by the same clause, so the words that decide between twins are consistent."""
    motion, motion_alt = MOTIONS[clip.motion]
    sound = SOUNDS[clip.sound]
    seen = f"a {clip.colour} {clip.shape} {motion}"
    if clip.twin:
        return [(f"{seen} {sound}", "audio_only"),
                (f"the {clip.colour} {clip.shape} {motion_alt} {sound}", "audio_only")]
    return [(f"{seen} {sound}", ""), (f"the {clip.colour} {clip.shape} {motion_alt}", "visual")]


def generate_demo(root: Path, *, seed: int = 0, num_looks: int = 16, seconds: float = 3.0,
                  fps: int = 10, size: int = 64, sample_rate: int = 16_000) -> Path:
    """Write the demo dataset under ``root`` (see the module docstring) and return ``root``.
    The default 16 looks give 96 clips (56 train, 16 val, 24 test) and 192 captions."""
    root = Path(root)
    videos = root / VIDEOS_DIR
    videos.mkdir(parents=True, exist_ok=True)
    num_frames = int(round(seconds * fps))
    rows = []
    for index, clip in enumerate(plan_clips(seed, num_looks)):
        frames = render_frames(clip.shape, clip.colour, clip.motion, num_frames, size)
        audio = None
        if clip.sound != "none":
            audio = synthesize(clip.sound, num_frames / fps, sample_rate,
                               np.random.default_rng([seed, index]))
        write_video(videos / f"{clip.video_id}.mp4", frames, fps, audio, sample_rate)
        rows.extend((clip.video_id, caption, clip.split, tag) for caption, tag in captions_of(clip))
    partial = root / (CAPTIONS_FILE + ".partial")
    with partial.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CAPTION_COLUMNS)
        writer.writerows(rows)
    os.replace(partial, root / CAPTIONS_FILE)
    return root


def demo_exists(root: Path) -> bool:
    """True when ``root`` holds a complete demo dataset (captions and every video they name)."""
    captions = Path(root) / CAPTIONS_FILE
    if not captions.is_file():
        return False
    with captions.open(newline="") as handle:
        video_ids = {row["video_id"] for row in csv.DictReader(handle)}
    return bool(video_ids) and all((Path(root) / VIDEOS_DIR / f"{v}.mp4").is_file()
                                   for v in video_ids)
