"""The interface every fusion head implements (docs/heads.md).

Retrieval cost lives in the pairwise part, so a head splits its work in three:

- ``encode_videos(videos) -> video state``: all that does not depend on the query; once per video.
- ``encode_texts(captions) -> text state``: all that does not depend on the video; once per caption.
- ``score(text state, video state) -> [Q, V]``: only the text-conditioned part. It never builds a
  Q x V x D tensor for the whole split: callers score a split in blocks of rows
  (:mod:`avr.evaluate.score`).

Inputs are dicts keyed by the array names of :mod:`avr.store.schema`, rows first, 16-bit floats as
they sit in the cache; a head casts them to its parameter dtype. States are dicts of tensors,
every tensor rows first, so that slicing every tensor of a state by the same rows gives the state
of those rows.

The logit scale (the inverse softmax temperature of the loss). Two options are the contract:
``temperature`` (initial; scale = 1 / temperature) and ``learn_temperature``. The default is
CLIP's pretrained scale, 100 (temperature 0.01), learned, which is where the released code of
CLIP4Clip (meanP), X-Pool and AVIGATE starts: they train CLIP's own ``logit_scale`` (its
log), use ``logit_scale.exp()`` unclamped in the forward pass, and clamp the parameter to
ln 100 after every optimizer step (CLIP4Clip ``main_task_retrieval.py``, X-Pool
``trainer/trainer.py``). avr does the same: ``scale()`` is ``exp(logit_scale)``; the trainer
clamps a learned ``logit_scale`` to ``LOGIT_SCALE_MAX`` after each step, so a scale that
starts at the clamp still gets its gradient (a clamp in the forward pass would pass none
there). A learned scale may not start above the clamp; a fixed one (``learn_temperature=false``,
GAID's choice) is any positive value. The releases train the scale among CLIP's parameters
(X-Pool: lr 1e-6, CLIP4Clip and AVIGATE: 1e-7, weight decay 0.2), where it barely moves; avr
has no CLIP parameters and gives it a parameter group of its own at that lr (the training
option ``scale_lr``, from the head's recipe; ``avr.fuse.optim.group_settings``), decayed as
the recipe's no-decay rule says. On a store of random backbones the schedule trains it at the
head's lr instead (``avr.fuse.schedule``). ``learn_temperature=false`` keeps it at its initial
value.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from avr.errors import AvrError
from avr.store import schema
from avr.store.schema import CacheSpec

# Cached rows: a head's inputs, the arrays of avr.store.schema by name, rows first, as stored.
Rows = dict[str, torch.Tensor]
# Encoded state: what encode_videos / encode_texts return and score reads, rows first.
State = dict[str, torch.Tensor]

LOGIT_SCALE_MAX = math.log(100.0)  # CLIP's clamp on the log of the logit scale
LOGIT_SCALE_PARAMETER = "logit_scale"  # the learned log-scale's name among a head's parameters

# Keys of ``RetrievalHead.explain`` (each [P, ...] for P paired rows), read by `avr eval --report`.
EXPLAIN_FRAME_ATTENTION = "frame_attention"  # [P, F] weight of each frame for the caption
EXPLAIN_AUDIO_ATTENTION = "audio_attention"  # [P, N_audio] weight of each audio token/step
EXPLAIN_AUDIO_GATE = "audio_gate"  # [P, G] gate values (per layer, per frame, ...)
EXPLAIN_THRESHOLD = "threshold"  # [P, ...] learned attention thresholds
EXPLAIN_DTW_ALIGNMENT = "dtw_alignment"  # [P, L_text, T_audio] expected soft-DTW alignment


@dataclass
class HeadConfig:
    """Options shared by every head; each head subclasses it with its own."""

    temperature: float = 0.01  # initial; logit scale = 1 / temperature (CLIP's pretrained 100)
    learn_temperature: bool = True
    dropout: float = 0.3
    # Frames the head reads of each video's cached ones, evenly spaced (``frame_subset``); None
    # or 0: every cached frame. `avr train` sets it from the head's recipe unless given.
    frames: int | None = None

    def __post_init__(self) -> None:
        """Every number finite, dropout a probability: a head's options are refused before
        anything loads (a subclass with checks of its own calls this first)."""
        for option in fields(self):
            value = getattr(self, option.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise AvrError(f"{option.name} must be a finite number, not {value}")
        if not 0 <= self.dropout < 1:
            raise AvrError(f"dropout must be in [0, 1), not {self.dropout}")


@dataclass(frozen=True)
class GroupSpec:
    """A parameter group a head declares (``RetrievalHead.parameter_groups``): the parameters
    named ``parameters`` (or under those module names) train at ``lr_scale`` times the run's lr
    with weight decay ``weight_decay`` (``avr.fuse.optim.group_settings``)."""

    name: str
    parameters: tuple[str, ...]
    lr_scale: float = 1.0
    weight_decay: float = 0.0

    def holds(self, name: str) -> bool:
        return any(name == prefix or name.startswith(prefix + ".") for prefix in self.parameters)


def frame_subset(cached: int, wanted: int | None) -> tuple[int, ...] | None:
    """Which of ``cached`` frames a head reading ``wanted`` of them takes: for each of ``wanted``
    equal segments of the clip, the cached frame whose own segment holds that segment's centre
    (cached frames are the centres of ``cached`` equal segments, docs/cache.md). None: every
    cached frame. A decoder sampling ``wanted`` frames would take those centres themselves; the
    subset's frames lie at most half a cached segment (duration / (2 cached)) away from them."""
    if wanted is not None and wanted < 0:
        raise AvrError(f"frames={wanted}: give a count of frames, or 0 for every cached frame")
    if not wanted or wanted == cached:
        return None
    if wanted > cached:
        raise AvrError(f"frames={wanted}: the store holds {cached} frames per video; ask for at "
                       f"most {cached} (frames=0: every cached frame)")
    return tuple((2 * k + 1) * cached // (2 * wanted) for k in range(wanted))


class RetrievalHead(nn.Module):
    """Base class: holds the learnable temperature and the symmetric InfoNCE loss."""

    name: ClassVar[str]
    Config: ClassVar[type[HeadConfig]] = HeadConfig
    # The cache arrays the head reads. On the class: every array any of its configurations
    # reads; on a built head: those its configuration reads (``video_inputs_for``).
    video_inputs: tuple[str, ...] = ()
    caption_inputs: ClassVar[tuple[str, ...]] = ()
    # True when ``score`` already includes the logit scale (AVIGATE's log-sum-exp does);
    # callers that need logits (dual softmax, the loss) multiply by ``scale()`` otherwise.
    score_is_scaled: ClassVar[bool] = False
    # Dual softmax (`avr eval --dsl`) runs on cosines times this scale; None: the head's own.
    # A head whose release applies it at another scale names that scale here.
    dsl_logit_scale: ClassVar[float | None] = None
    # Its temperature when `--dsl-temperature` is not given; None: AVIGATE's release, 3.
    dsl_temperature: ClassVar[float | None] = None
    # True when the head's own terms are tuned for CLIP's pretrained scale of 100 (AVIGATE's
    # margins are added times the scale): the default schedule then never starts it elsewhere.
    tuned_for_pretrained_scale: ClassVar[bool] = False
    # True when trials of the head may train side by side as one stacked model (`avr sweep
    # --parallel`, ``avr.fuse.stacked``): its modules and its InfoNCE loss run under
    # ``torch.func.vmap`` and a stacked trial equals its solo run (the contract test checks it).
    stackable: ClassVar[bool] = False
    # True when ``encode_videos`` gives each video one vector ``{"video": [V, D]}`` that no query
    # changes, ``encode_texts`` one ``{"text": [Q, D]}``, and ``score`` is their inner product:
    # the videos can then be indexed (`avr index build --embeddings run:RUN`).
    dual_encoder: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "encode_videos" in cls.__dict__:  # every head encodes the frames it reads
            cls.encode_videos = _reading_head_frames(cls.__dict__["encode_videos"])

    def __init__(self, spec: CacheSpec, config: HeadConfig):
        super().__init__()
        self.cached_frames = spec.num_frames
        self.frame_index = frame_subset(spec.num_frames, config.frames)
        # the spec as the head sees it: ``num_frames`` is the frames it reads
        self.spec = spec if self.frame_index is None else \
            dataclasses.replace(spec, num_frames=len(self.frame_index))
        self.config = config
        self.video_inputs = schema.stored_inputs(self.video_inputs_for(config), spec)
        init = torch.tensor(math.log(1.0 / checked_temperature(config)))
        if config.learn_temperature:
            self.logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("logit_scale", init)

    @classmethod
    def video_inputs_for(cls, config: HeadConfig) -> tuple[str, ...]:
        """The video arrays a head built with ``config`` reads (a loader loads only these):
        the class's ``video_inputs`` unless an option leaves some of them unused."""
        return cls.video_inputs

    def head_frames(self, videos: Rows) -> Rows:
        """These video rows with the frames the head reads (``frame_subset``) of every array with
        a frame axis; applied to every ``encode_videos`` input (train, stacked trials,
        validation, eval, search), so every path reads the same frames. Rows already reduced
        pass as they are."""
        if self.frame_index is None:
            return videos
        return {name: rows.index_select(1, torch.tensor(self.frame_index, device=rows.device))
                if schema.on_frame_axis(name) and rows.shape[1] == self.cached_frames else rows
                for name, rows in videos.items()}

    def parameter_groups(self) -> tuple[GroupSpec, ...]:
        """Parameter groups of the head's own, with their lr and weight decay (the optimizer puts
        every other parameter in the run's groups). Default: none."""
        return ()

    @classmethod
    def store_note(cls, spec: CacheSpec) -> str | None:
        """What the head does otherwise than its method on a store of ``spec`` (one clause of the
        run's first line), or None. Default: nothing."""
        return None

    def hide_audio(self, videos: Rows) -> Rows:
        """These video rows with their audio left out (`avr eval --modalities v`). Default: every
        clip marked as having no audio track, which a head that masks missing audio answers by
        leaving the audio out; a head that encodes missing audio (a zero fbank) overrides it."""
        return {**videos, schema.HAS_AUDIO: torch.zeros_like(videos[schema.HAS_AUDIO])}

    # ---- the three parts -------------------------------------------------------------------
    def encode_videos(self, videos: Rows) -> State:
        raise NotImplementedError

    def encode_texts(self, captions: Rows) -> State:
        raise NotImplementedError

    def score(self, texts: State, videos: State) -> torch.Tensor:
        """Cosine-like similarities [Q, V] (not multiplied by the logit scale)."""
        raise NotImplementedError

    # ---- training ----------------------------------------------------------------------------
    def scale(self) -> torch.Tensor:
        """exp(logit_scale), unclamped: the trainer clamps a learned one after each step."""
        return self.logit_scale.exp()

    def clamp_logit_scale(self) -> None:
        """Clamp a learned log-scale to ln 100 (CLIP's clamp); call after each optimizer step."""
        if isinstance(self.logit_scale, nn.Parameter):
            with torch.no_grad():
                self.logit_scale.clamp_(max=LOGIT_SCALE_MAX)

    def logits(self, texts: State, videos: State) -> torch.Tensor:
        sim = self.score(texts, videos)
        return sim if self.score_is_scaled else sim * self.scale()

    def loss(self, texts: State, videos: State) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss for a batch where caption i belongs to video i, and its named parts
        (detached tensors, left on the device: the trainer averages them once per epoch and logs
        each but ``loss`` as a column of log.csv).

        Default: symmetric InfoNCE (TEFAL Eq. 4-6, averaged rather than summed as CLIP and
        X-Pool do) with the learnable temperature. Heads with extra terms override it.
        """
        loss = symmetric_infonce(self.logits(texts, videos))
        return loss, {"loss": loss.detach()}

    @classmethod
    def has_own_loss(cls) -> bool:
        """Whether the head's loss is more than InfoNCE over ``logits`` (AVIGATE, GAIS)."""
        return cls.loss is not RetrievalHead.loss

    @classmethod
    def stack_refusal(cls) -> str | None:
        """Why trials of this head cannot train stacked, or None when they can."""
        if cls.has_own_loss():
            return (f"{cls.name}'s loss has terms of its own, which the stacked trials' vmapped "
                    f"InfoNCE does not compute")
        if not cls.stackable:
            return f"{cls.name} does not declare its trials stackable (RetrievalHead.stackable)"
        return None

    def loss_in_video_blocks(self, texts: State, videos: Rows, block: int
                             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The default ``loss`` with the batch's videos encoded and scored ``block`` at a time,
        each block under activation checkpointing (``torch.utils.checkpoint``): its activations
        are dropped after the forward pass and recomputed in the backward one, so memory holds
        one block's instead of the batch's, for about one more forward pass of the video branch.
        The logits are the same; dropout draws its masks block by block, so a head with dropout
        follows another random path than with the whole batch at once."""
        from torch.utils.checkpoint import checkpoint

        def block_logits(rows: Rows) -> torch.Tensor:
            return self.logits(texts, self.encode_videos(rows))

        count = next(iter(videos.values())).shape[0]
        logits = torch.cat([checkpoint(block_logits, slice_state(videos, slice(v0, v0 + block)),
                                       use_reentrant=False)
                            for v0 in range(0, count, block)], dim=1)
        loss = symmetric_infonce(logits)
        return loss, {"loss": loss.detach()}

    # ---- introspection, for reports ---------------------------------------------------------
    def explain(self, texts: State, videos: State) -> dict[str, torch.Tensor]:
        """Named tensors worth plotting for these pairs (attention over frames, gates, DTW
        paths). Rows of ``texts`` and ``videos`` are paired one to one. Empty by default."""
        return {}

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)

    def param_dtype(self) -> torch.dtype:
        return next((p.dtype for p in self.parameters()), torch.float32)


def _reading_head_frames(encode):
    """``encode`` (a head's ``encode_videos``) called on the frames the head reads."""
    @functools.wraps(encode)
    def encode_videos(self: RetrievalHead, videos: Rows) -> State:
        return encode(self, self.head_frames(videos))

    return encode_videos


def checked_temperature(config: HeadConfig) -> float:
    """``config.temperature``, refused when not positive, or when a learned scale would start
    above CLIP's clamp (the first step would clamp it to 100 anyway)."""
    temperature = config.temperature
    if not (temperature > 0 and math.isfinite(temperature)):
        raise AvrError(f"temperature must be a positive finite number, got {temperature}")
    if config.learn_temperature and math.log(1.0 / temperature) > LOGIT_SCALE_MAX + 1e-9:
        raise AvrError(f"temperature {temperature} starts a learned logit scale at "
                       f"{1.0 / temperature:g}, above CLIP's clamp of 100: use temperature >= "
                       f"0.01, or learn_temperature=false for a fixed scale")
    return temperature


def symmetric_infonce(logits: torch.Tensor) -> torch.Tensor:
    """Mean of the text->video and video->text cross-entropies; positives on the diagonal.

    ``F.cross_entropy(logits, arange)``'s value (up to rounding) written as the diagonal of a
    log-softmax: ops vmap batches natively, where it runs cross-entropy's Python decomposition
    op by op (``avr sweep --parallel``), and the same ops for a trial alone and stacked."""
    size = logits.shape[0]
    return -0.5 * (logits.log_softmax(1).diagonal().sum() / size
                   + logits.log_softmax(0).diagonal().sum() / size)


def slice_state(state: State, rows: slice | torch.Tensor) -> State:
    return {name: tensor[rows] for name, tensor in state.items()}


def state_rows(state: State) -> int:
    return next(iter(state.values())).shape[0]
