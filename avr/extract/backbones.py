"""The frozen backbones of ``avr extract``: CLIP, Swin, AST and RoBERTa, one forward each.

Every array of a store's video and caption rows (avr.store.schema) comes out of this module:

- CLIP (open_clip): the projected image embedding of every frame; the projected sentence
  embedding of every caption and its token states (after ``ln_final``, through
  ``text_projection``) with a mask over the tokens up to and including EOT. Embeddings are
  not L2-normalised; heads normalise where their paper does.
- Swin (transformers ``SwinModel``): per frame, the output of each chosen stage *before* its
  patch merging (the maps ``SwinBackbone`` feeds an FPN: 96@56², 192@28², 384@14², 768@7² for
  swin-tiny-224, docs/methods.md (iii)), without LayerNorm, adaptive-average-pooled to a g x g grid
  and flattened row-major to g² tokens.
- AST (transformers ``ASTModel``): ``last_hidden_state`` after the final LayerNorm; tokens 0
  and 1 are CLS and distillation, the rest are the 12 x 101 patches (docs/methods.md "AST token
  count"); and that LayerNorm of the mean of the pre-norm CLS and distillation tokens
  (AVIGATE's global audio token). ``ASTPatchEmbeddings`` transposes the [T, F] fbank to [F, T] before its strided
  conv and flattens the [F', T'] output grid, so patch ``p = f * 101 + t``: frequency-major.
  The time-ordered sequence averages the 12 frequency patches of each of the 101 time steps.
- RoBERTa (transformers ``RobertaModel``): last hidden states with their attention mask.

``load_backbones("real")`` loads pretrained weights the way each library does it (the HF cache,
``HF_HUB_OFFLINE``, local directories and checkpoint files all work);
``load_backbones("tiny")`` builds small randomly initialised models of the same classes,
seeded, for tests and ``avr demo``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from avr.errors import AvrError
from avr.store import schema
from avr.store.schema import AudioParams, BackboneInfo, CacheSpec

# Captions of MSR-VTT and VATEX fit in 32 RoBERTa tokens; CLIP4Clip and X-Pool cut CLIP text at
# the same length (``--max_words 32``, docs/methods.md "Text"). Extract gives paragraphs more
# (avr.extract.datasets.PARAGRAPH_TOKENS).
ROBERTA_LEN = 32
CLIP_TEXT_TOKENS = 32

TINY_IMAGE_SIZE = 32
TINY_TEXT_LEN = 12
TINY_ROBERTA_VOCAB = 512

ClipTokenizer = Callable[[list[str]], torch.Tensor]  # texts -> token ids [M, Lc]
RobertaTokenizer = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]  # -> ids, mask [M, Lr]


@dataclass(frozen=True)
class BackboneNames:
    """Which backbones to run: model names, pretrained weights, and the Swin levels to keep.

    ``swin_stages`` picks stages of Swin's four (0-based; stage k has embed_dim * 2^k channels
    at 1/(4 * 2^k) of the input resolution); at least three, in increasing depth, for the FPN.
    Stage ``swin_stages[i]`` is pooled to ``swin_grids[i]`` x ``swin_grids[i]`` and stored as
    ``schema.swin_level(i)``. The defaults keep 192@28² -> 4x4, 384@14² -> 2x2, 768@7² -> 1x1.
    """

    clip_model: str = "ViT-B-32"  # open_clip model name
    clip_pretrained: str = "openai"  # open_clip pretrained tag, or a local checkpoint file
    swin: str = "microsoft/swin-tiny-patch4-window7-224"  # HF model id or local directory
    ast: str = "MIT/ast-finetuned-audioset-10-10-0.4593"
    roberta: str = "roberta-base"
    swin_grids: tuple[int, ...] = (4, 2, 1)
    swin_stages: tuple[int, ...] = (1, 2, 3)
    # CLIP text tokens kept per caption (None: CLIP_TEXT_TOKENS, CLIP4Clip's and X-Pool's
    # max_words; at most the model's context, 77): longer captions are cut with their
    # end-of-text token kept. 77 x 512 token states would be 79 kB a caption.
    clip_text_tokens: int | None = None
    # RoBERTa tokens kept per caption (None: ROBERTA_LEN; at most the model's positions, 512).
    roberta_text_tokens: int | None = None


# ---- small pure pieces ------------------------------------------------------------------------

def ast_time_tokens(patch_tokens: torch.Tensor, freq_patches: int, time_patches: int
                    ) -> torch.Tensor:
    """Mean over the frequency patches of each time step.

    ``patch_tokens`` [B, F'*T', D] in AST's frequency-major order (p = f * T' + t) ->
    [B, T', D].
    """
    batch, _, dim = patch_tokens.shape
    return patch_tokens.reshape(batch, freq_patches, time_patches, dim).mean(dim=1)


def pool_feature_map(feature_map: torch.Tensor, grid: int) -> torch.Tensor:
    """Adaptive average pool [N, C, H, W] to [N, grid * grid, C], cells in row-major order."""
    pooled = F.adaptive_avg_pool2d(feature_map, grid)  # [N, C, g, g]
    return pooled.flatten(2).transpose(1, 2)


def normalise_frames(frames: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                     size: int) -> torch.Tensor:
    """uint8 frames [N, S, S, 3] -> float [N, 3, size, size], scaled to [0, 1] then
    ``(x - mean) / std`` per channel; resized (bicubic, antialiased) when S != size."""
    pixels = frames.permute(0, 3, 1, 2).float() / 255.0
    if pixels.shape[-1] != size:
        pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False,
                               antialias=True).clamp(0.0, 1.0)
    return (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def mask_through_position(positions: torch.Tensor, length: int) -> torch.Tensor:
    """[M] last kept position per row -> bool mask [M, length], True at 0..position."""
    return torch.arange(length, device=positions.device)[None, :] <= positions[:, None]


def clip_eot_positions(tokens: torch.Tensor, pool_type: str, eos_id: int | None) -> torch.Tensor:
    """Position of the token open_clip pools as the sentence embedding ([M, L] -> [M]), found
    the way ``open_clip.transformer.text_global_pool`` finds it."""
    if pool_type == "argmax":  # OpenAI BPE: EOT has the largest id
        return tokens.argmax(dim=-1)
    if pool_type == "eos":
        return (tokens == eos_id).int().argmax(dim=-1)
    if pool_type == "last":
        return torch.full(tokens.shape[:1], tokens.shape[1] - 1, device=tokens.device)
    raise AvrError(f"CLIP text pooling {pool_type!r} has no EOT token to mask up to; "
                   f"use an open_clip model with argmax, eos or last text pooling")


class HashWordTokenizer:
    """RoBERTa-style ids for tiny backbones, with no vocabulary file.

    Lowercase words (``[a-z0-9']+``) map to ``3 + blake2b(word) % (vocab_size - 3)``; ids 0, 1, 2
    are RoBERTa's ``<s>``, ``<pad>``, ``</s>``. Each text becomes ``<s> words </s>`` padded
    with ``<pad>`` (or cut, keeping ``</s>``) to ``max_length``. Deterministic across processes
    and machines (blake2b, not Python's salted ``hash``).
    """

    bos_id, pad_id, eos_id = 0, 1, 2

    def __init__(self, vocab_size: int, max_length: int):
        self.vocab_size = vocab_size
        self.max_length = max_length

    def word_id(self, word: str) -> int:
        digest = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "big")
        return 3 + digest % (self.vocab_size - 3)

    @staticmethod
    def words(text: str) -> list[str]:
        return re.findall(r"[a-z0-9']+", text.lower())

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            words = self.words(text)[: self.max_length - 2]
            row_ids = [self.bos_id, *map(self.word_id, words), self.eos_id]
            ids[row, : len(row_ids)] = torch.tensor(row_ids)
        return ids, ids != self.pad_id


# ---- the backbones ----------------------------------------------------------------------------

class Backbones:
    """Four frozen models in eval mode on one device, and the spec fields they decide.

    Built by ``load_backbones``; the constructor takes already built models so that tests can
    run real-size architectures without their weights.
    """

    def __init__(self, *, clip: nn.Module, clip_tokenizer: ClipTokenizer, swin: nn.Module,
                 swin_mean: tuple[float, ...], swin_std: tuple[float, ...], ast: nn.Module,
                 roberta: nn.Module, roberta_tokenizer: RobertaTokenizer, roberta_len: int,
                 swin_stages: tuple[int, ...], swin_grids: tuple[int, ...],
                 infos: dict[str, BackboneInfo], device: str | torch.device = "cpu",
                 amp: bool = True):
        check_swin_levels(swin_stages, swin_grids, num_stages=len(swin.config.depths))
        self.device = torch.device(device)
        self.amp = amp
        self.clip, self.swin, self.ast, self.roberta = (
            freeze(model).to(self.device) for model in (clip, swin, ast, roberta))
        self.clip_tokenizer = clip_tokenizer
        self.roberta_tokenizer = roberta_tokenizer
        self.swin_stages = tuple(swin_stages)
        self.swin_grids = tuple(swin_grids)

        clip_cfg = clip_preprocess_cfg(clip)
        self.image_size = clip_cfg["size"]
        self.clip_mean = torch.tensor(clip_cfg["mean"], device=self.device)
        self.clip_std = torch.tensor(clip_cfg["std"], device=self.device)
        self.swin_size = swin.config.image_size
        self.swin_mean = torch.tensor(swin_mean, device=self.device)
        self.swin_std = torch.tensor(swin_std, device=self.device)

        self.text = TextTowers(clip=self.clip, clip_tokenizer=clip_tokenizer,
                               roberta=self.roberta, roberta_tokenizer=roberta_tokenizer,
                               clip_name=infos["clip"].name, device=self.device, amp=amp)

        ast_freq, ast_time = self.ast.embeddings.get_shape(self.ast.config)
        self.spec_fields = dict(
            image_size=self.image_size,
            clip_dim=int(clip.visual.output_dim),
            clip_text_len=self.text.clip_text_len,
            swin_channels=tuple(int(swin.config.embed_dim * 2 ** k) for k in self.swin_stages),
            swin_grids=self.swin_grids,
            ast_dim=int(self.ast.config.hidden_size),
            ast_freq_patches=int(ast_freq),
            ast_time_patches=int(ast_time),
            roberta_dim=int(self.roberta.config.hidden_size),
            roberta_len=roberta_len,
            backbones=dict(infos),
            audio_pooled_token=True,
        )

    def make_spec(self, dataset: str, num_frames: int, audio: AudioParams = AudioParams()
                  ) -> CacheSpec:
        """The CacheSpec of a store these backbones write for ``dataset``."""
        config = self.ast.config
        if (audio.num_mel_bins, audio.target_length) != (config.num_mel_bins, config.max_length):
            ast_name = self.spec_fields["backbones"]["ast"].name
            raise AvrError(f"audio settings give {audio.num_mel_bins} mel bins x "
                           f"{audio.target_length} frames, but AST {ast_name!r} expects "
                           f"{config.num_mel_bins} x {config.max_length}")
        return CacheSpec(dataset=dataset, num_frames=num_frames, audio=audio, **self.spec_fields)

    def autocast(self) -> AbstractContextManager:
        return amp_autocast(self.device, self.amp)

    @torch.no_grad()
    def encode_frames(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 frames [N, S, S, 3] (S = image_size) -> CLIP frame embeddings [N, D_clip] and
        every kept Swin stage [N, g_k², C_k]."""
        size = self.image_size
        if frames.dtype != torch.uint8 or tuple(frames.shape[1:]) != (size, size, 3):
            raise ValueError(f"frames must be uint8 [N, {size}, {size}, 3], got "
                             f"{frames.dtype} {list(frames.shape)}")
        frames = frames.to(self.device)
        clip_pixels = normalise_frames(frames, self.clip_mean, self.clip_std, size)
        swin_pixels = normalise_frames(frames, self.swin_mean, self.swin_std, self.swin_size)
        with self.autocast():
            out = {schema.FRAME_EMBEDDINGS: self.clip.encode_image(clip_pixels)}
            swin_out = self.swin(swin_pixels, output_hidden_states=True,
                                 output_hidden_states_before_downsampling=True)
        # reshaped_hidden_states[0] is the patch embedding; entry k + 1 is stage k's output
        # before its patch merging, [N, C_k, H_k, W_k].
        stage_maps = swin_out.reshaped_hidden_states[1:]
        for index, (stage, grid) in enumerate(zip(self.swin_stages, self.swin_grids)):
            out[schema.swin_level(index)] = pool_feature_map(stage_maps[stage], grid)
        return out

    @torch.no_grad()
    def encode_audio(self, fbank: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised log-mel fbank [B, 1024, 128] (time, mel; AudioParams) -> AST patch tokens
        [B, 1212, D], CLS and distillation tokens [B, 2, D], time tokens [B, 101, D], and the
        final LayerNorm of the mean of the pre-norm CLS and distillation tokens [B, D]
        (AVIGATE's global audio token: its release averages them before ``audio.v.norm``)."""
        config = self.ast.config
        if tuple(fbank.shape[1:]) != (config.max_length, config.num_mel_bins):
            raise ValueError(f"fbank must be [B, {config.max_length}, {config.num_mel_bins}], "
                             f"got {list(fbank.shape)}")
        with self.autocast():
            out = self.ast(fbank.to(self.device, torch.float32), output_hidden_states=True)
            pre_norm = out.hidden_states[-1]  # the last block's output, before the LayerNorm
            pooled = self.ast.layernorm(pre_norm[:, :2].mean(1))
        tokens = out.last_hidden_state
        patches = tokens[:, 2:]
        return {
            schema.AUDIO_PATCH_TOKENS: patches,
            schema.AUDIO_GLOBAL_TOKENS: tokens[:, :2],
            schema.AUDIO_POOLED_TOKEN: pooled,
            schema.AUDIO_TIME_TOKENS: ast_time_tokens(patches, self.spec_fields["ast_freq_patches"],
                                                      self.spec_fields["ast_time_patches"]),
        }

    def encode_text(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Captions -> every caption array (``TextTowers.encode_text``)."""
        return self.text.encode_text(texts)


class TextTowers:
    """What encodes a caption: CLIP's text tower (its sentence embedding and token states) and,
    when given, RoBERTa. `avr extract` runs them inside ``Backbones``; `avr search` and `avr
    serve` load only these (``load_text_towers``), not the image and audio models.

    Not reentrant: a forward hook on ``ln_final`` captures CLIP's token states during a call."""

    def __init__(self, *, clip: nn.Module, clip_tokenizer: ClipTokenizer,
                 roberta: nn.Module | None, roberta_tokenizer: RobertaTokenizer | None,
                 clip_name: str, device: str | torch.device = "cpu", amp: bool = True):
        self.device = torch.device(device)
        self.amp = amp
        self.clip = freeze(clip).to(self.device)
        self.roberta = None if roberta is None else freeze(roberta).to(self.device)
        self.clip_tokenizer = clip_tokenizer
        self.roberta_tokenizer = roberta_tokenizer
        tower = getattr(clip, "text", clip)  # CustomTextCLIP keeps its tower in .text
        if not hasattr(tower, "ln_final"):
            raise AvrError(f"CLIP {clip_name!r}: its text tower has no ln_final, so token states "
                           f"cannot be read; use an open_clip model with the built-in text "
                           f"transformer (e.g. ViT-B-32)")
        self.tower = tower
        self.pool_type = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
        self.eos_id = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
        self.context = int(tower.context_length)
        self.clip_text_len = int(clip_tokenizer(["a"]).shape[1])  # the tokenizer's length decides
        if self.clip_text_len > self.context:
            raise AvrError(f"CLIP {clip_name!r} reads at most {self.context} text tokens; the "
                           f"tokenizer gives {self.clip_text_len}")

    def autocast(self) -> AbstractContextManager:
        return amp_autocast(self.device, self.amp)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Captions -> CLIP sentence embeddings [M, D_clip], CLIP token states [M, Lc, D_clip]
        with their mask [M, Lc], and with RoBERTa its states [M, Lr, D_rob] and mask [M, Lr]."""
        clip_tokens = self.clip_tokenizer(texts).to(self.device)  # [M, Lc]
        length = clip_tokens.shape[1]
        # The text transformer is causal: padding to its context changes no kept position.
        model_tokens = F.pad(clip_tokens, (0, self.context - length))
        captured: list[torch.Tensor] = []
        hook = self.tower.ln_final.register_forward_hook(
            lambda _m, _i, output: captured.append(output))
        try:
            with self.autocast():
                sentence = self.clip.encode_text(model_tokens)  # [M, D_clip]
                token_states = project_text_tokens(captured[0][:, :length],
                                                   self.tower.text_projection)
        finally:
            hook.remove()
        eot = clip_eot_positions(clip_tokens, self.pool_type, self.eos_id)
        out = {schema.TEXT_EMBEDDINGS: sentence, schema.TEXT_TOKEN_STATES: token_states,
               schema.TEXT_TOKEN_MASK: mask_through_position(eot, clip_tokens.shape[1])}
        if self.roberta is not None:
            ids, mask = (t.to(self.device) for t in self.roberta_tokenizer(texts))
            with self.autocast():
                out[schema.ROBERTA_STATES] = self.roberta(
                    input_ids=ids, attention_mask=mask.long()).last_hidden_state
            out[schema.ROBERTA_MASK] = mask.bool()
        return out


def amp_autocast(device: torch.device, amp: bool) -> AbstractContextManager:
    """bf16 autocast around forward passes on CUDA when ``amp``; full precision otherwise."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def project_text_tokens(states: torch.Tensor, projection: nn.Module | torch.Tensor | None
                        ) -> torch.Tensor:
    """CLIP token states after ln_final [M, L, W] -> [M, L, D_clip] through the text projection
    that open_clip applies to the pooled token."""
    if projection is None:
        return states
    if isinstance(projection, nn.Linear):
        return projection(states)
    return states @ projection


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def check_swin_levels(stages: tuple[int, ...], grids: tuple[int, ...], num_stages: int) -> None:
    if len(stages) < 3 or len(stages) != len(grids):
        raise AvrError(f"Swin levels: need at least 3 stages and one grid per stage, got stages "
                       f"{tuple(stages)} and grids {tuple(grids)}")
    if list(stages) != sorted(set(stages)) or not all(0 <= s < num_stages for s in stages):
        raise AvrError(f"Swin stages {tuple(stages)} must be distinct, increasing and within "
                       f"0..{num_stages - 1}")
    if any(g < 1 for g in grids):
        raise AvrError(f"Swin grids {tuple(grids)} must be >= 1")


def clip_preprocess_cfg(model: nn.Module) -> dict:
    """Square input size and per-channel mean/std that ``model`` was trained with."""
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"]
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise AvrError(f"CLIP input size {tuple(size)} is not square; avr stores square frames")
        size = size[0]
    return {"size": int(size), "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}


# ---- loading ----------------------------------------------------------------------------------

def load_backbones(kind: str = "real", names: BackboneNames = BackboneNames(), *,
                   device: str | torch.device = "cpu", seed: int = 0, amp: bool = True
                   ) -> Backbones:
    """Load the frozen backbones: ``"real"`` pretrained weights named by ``names``, or
    ``"tiny"`` small random models of the same classes seeded by ``seed`` (the model names of
    ``names`` are then unused; its Swin levels still apply)."""
    if kind == "real":
        return load_real(names, device=device, amp=amp)
    if kind == "tiny":
        return build_tiny(names, device=device, seed=seed, amp=amp)
    raise AvrError(f"unknown backbone kind {kind!r}; expected 'real' or 'tiny'")


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a model id or pretrained tag."""
    return name.startswith(("/", "./", "../", "~")) or (os.sep in name and Path(name).exists())


def check_local_paths(names: BackboneNames) -> None:
    """Fail before loading anything when a name meant as a local path does not exist."""
    for what, name, want_file in (("CLIP checkpoint", names.clip_pretrained, True),
                                  ("Swin", names.swin, False), ("AST", names.ast, False),
                                  ("RoBERTa", names.roberta, False)):
        if not looks_like_path(name):
            continue
        path = Path(name).expanduser()
        if want_file and not path.is_file() or not want_file and not path.is_dir():
            kind = "file" if want_file else "directory"
            raise AvrError(f"{what}: no such {kind} {name}; give an existing local {kind} or a "
                           f"{'pretrained tag' if want_file else 'Hugging Face model id'}")


def load_failure(what: str, name: str, err: Exception, how_to_fetch: str) -> AvrError:
    return AvrError(
        f"could not load {what} {name!r}: {err}\n"
        f"Weights not on disk yet? Download them once where there is network "
        f"({how_to_fetch}) and run offline with HF_HUB_OFFLINE=1, or give a local copy instead "
        f"(a save_pretrained directory, or a checkpoint file for CLIP).")


def hf_revision(model: nn.Module, name: str) -> str:
    """The commit the weights came from when known, "local" for a directory, else "main"."""
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return commit
    if Path(name).expanduser().is_dir():
        return "local"
    import huggingface_hub

    try:
        return huggingface_hub.resolve_revision(name, local_files_only=True).resolved
    except Exception:  # the cache may not record refs/main (weights copied in by hand)
        return "main"


def load_real(names: BackboneNames, *, device: str | torch.device, amp: bool) -> Backbones:
    import open_clip
    import transformers
    from transformers import ASTModel, AutoImageProcessor, SwinModel

    check_local_paths(names)
    clip, clip_tokenizer = load_clip(names)
    swin = hf_load("Swin", names.swin,
                   lambda name: SwinModel.from_pretrained(name, add_pooling_layer=False))
    swin_processor = hf_load("the Swin image processor of", names.swin,
                             AutoImageProcessor.from_pretrained)
    ast = hf_load("AST", names.ast, ASTModel.from_pretrained)
    roberta, tokenize_roberta = load_roberta(names)

    hf_version = transformers.__version__
    infos = {
        "clip": BackboneInfo(names.clip_model, names.clip_pretrained, "open_clip",
                             open_clip.__version__),
        "swin": BackboneInfo(names.swin, hf_revision(swin, names.swin), "transformers",
                             hf_version),
        "ast": BackboneInfo(names.ast, hf_revision(ast, names.ast), "transformers", hf_version),
        "roberta": BackboneInfo(names.roberta, hf_revision(roberta, names.roberta),
                                "transformers", hf_version),
    }
    return Backbones(clip=clip, clip_tokenizer=clip_tokenizer, swin=swin,
                     swin_mean=tuple(swin_processor.image_mean),
                     swin_std=tuple(swin_processor.image_std), ast=ast, roberta=roberta,
                     roberta_tokenizer=tokenize_roberta,
                     roberta_len=roberta_length(roberta, names),
                     swin_stages=names.swin_stages, swin_grids=names.swin_grids, infos=infos,
                     device=device, amp=amp)


def load_clip(names: BackboneNames) -> tuple[nn.Module, ClipTokenizer]:
    """open_clip's model and tokenizer (cut at ``names.clip_text_tokens``) by name and tag."""
    import open_clip

    try:
        clip, _, _ = open_clip.create_model_and_transforms(names.clip_model,
                                                           pretrained=names.clip_pretrained)
        context = int(getattr(getattr(clip, "text", clip), "context_length"))
        clip_len = min(context, names.clip_text_tokens or CLIP_TEXT_TOKENS)
        clip_tokenizer = functools.partial(open_clip.get_tokenizer(names.clip_model),
                                           context_length=clip_len)
    except Exception as err:  # missing, unreachable or unreadable weights: say what to do
        fetch = (f"python -c \"import open_clip; open_clip.create_model_and_transforms("
                 f"'{names.clip_model}', pretrained='{names.clip_pretrained}')\"")
        raise load_failure("CLIP", f"{names.clip_model}/{names.clip_pretrained}", err,
                           fetch) from err
    return clip, clip_tokenizer


def hf_load(what: str, name: str, load: Callable):
    try:
        return load(name)
    except Exception as err:  # missing, unreachable or unreadable weights: say what to do
        raise load_failure(what, name, err, f"hf download {name}") from err


def roberta_length(roberta: nn.Module, names: BackboneNames) -> int:
    """RoBERTa tokens kept per caption: ``names.roberta_text_tokens`` (default ROBERTA_LEN),
    refused beyond the model's positions (RoBERTa numbers them from 2: 514 hold 512 tokens)."""
    wanted = names.roberta_text_tokens or ROBERTA_LEN
    most = int(roberta.config.max_position_embeddings) - 2
    if wanted > most:
        raise AvrError(f"--roberta-text-tokens {wanted}: RoBERTa {names.roberta!r} reads at most "
                       f"{most} tokens")
    return wanted


def load_roberta(names: BackboneNames) -> tuple[nn.Module, RobertaTokenizer]:
    """RoBERTa without its pooler, and its tokenizer padded and cut to ``roberta_length``."""
    from transformers import AutoTokenizer, RobertaModel

    roberta = hf_load("RoBERTa", names.roberta,
                      lambda name: RobertaModel.from_pretrained(name, add_pooling_layer=False))
    roberta_tokenizer = hf_load("the RoBERTa tokenizer of", names.roberta,
                                AutoTokenizer.from_pretrained)
    roberta_len = roberta_length(roberta, names)

    def tokenize_roberta(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = roberta_tokenizer(texts, padding="max_length", truncation=True,
                                  max_length=roberta_len, return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"].bool()

    return roberta, tokenize_roberta


def load_text_towers(kind: str = "real", names: BackboneNames = BackboneNames(), *,
                     roberta: bool, device: str | torch.device = "cpu", seed: int = 0,
                     amp: bool = True) -> TextTowers:
    """The text side of ``load_backbones(kind, names, seed=seed)`` alone: CLIP (its image tower
    dropped once loaded) and, with ``roberta``, RoBERTa; the same weights, so a query encodes
    as the store's captions did."""
    if kind == "real":
        check_local_paths(names)
        clip, clip_tokenizer = load_clip(names)
        clip.visual = None  # open_clip's encode_text never reads it
        model, tokenizer = load_roberta(names) if roberta else (None, None)
        return TextTowers(clip=clip, clip_tokenizer=clip_tokenizer, roberta=model,
                          roberta_tokenizer=tokenizer, clip_name=names.clip_model,
                          device=device, amp=amp)
    if kind == "tiny":
        from open_clip.tokenizer import SimpleTokenizer

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            clip = tiny_clip(seed)
            if roberta:  # its weights follow Swin's and AST's in build_tiny's seeded stream
                tiny_swin(), tiny_ast()
                model = tiny_roberta()
        return TextTowers(clip=clip, clip_tokenizer=SimpleTokenizer(context_length=TINY_TEXT_LEN),
                          roberta=model if roberta else None,
                          roberta_tokenizer=(HashWordTokenizer(TINY_ROBERTA_VOCAB, TINY_TEXT_LEN)
                                             if roberta else None),
                          clip_name="tiny-clip", device=device, amp=amp)
    raise AvrError(f"unknown backbone kind {kind!r}; expected 'real' or 'tiny'")


def tiny_clip(seed: int = 0) -> nn.Module:
    """open_clip CLIP at 32 px: ViT with patch 8, width 32, 1 layer, average-pooled patch tokens
    (a random class token barely sees the image, so every frame would embed alike); text width
    32, 1 layer, context 12 with the OpenAI BPE vocabulary; embedding dim 32. The text tower is
    initialised as a random bag of words (``init_bag_of_words_text``), seeded by ``seed``."""
    import open_clip
    from open_clip.transform import PreprocessCfg

    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8,
                                           image_size=TINY_IMAGE_SIZE, pool_type="avg"),
        text_cfg=open_clip.CLIPTextCfg(context_length=TINY_TEXT_LEN, width=32, heads=2, layers=1),
    )
    init_bag_of_words_text(model, torch.Generator().manual_seed(seed))
    open_clip.set_model_preprocess_cfg(model, asdict(PreprocessCfg(size=TINY_IMAGE_SIZE)))
    return model


@torch.no_grad()
def init_bag_of_words_text(model: nn.Module, generator: torch.Generator) -> None:
    """Initialise a random open_clip text tower so that its sentence embedding (the EOT token)
    is a random bag of the caption's words, as a trained CLIP's carries what the caption says.

    At open_clip's own initialisation it is not: random queries and keys give attention logits
    of standard deviation about 1 at any width, so the EOT token weighs the caption's words by
    random factors (0.01 to 0.33 of its attention measured on the demo captions, some colour,
    shape and motion words among the lowest), and the random MLP branch, twice the attention's
    norm, mixes them nonlinearly. Three changes, each a known initialisation:

    - zero query projections: every token attends uniformly to its causal prefix, so the EOT
      token reads the mean of the caption's (``ln_1``-normalised) token embeddings;
    - zero MLP output projections: the MLP branch starts silent (a zero-initialised residual
      branch, as SkipInit and ReZero start), leaving that mean as it is;
    - orthogonal value, output and text projections at open_clip's scales: an isometry keeps
      the distances between captions (Saxe et al. 2014).

    Measured on the demo dataset (seeds 0-2, text towers seeded 0-8): the best linear map from
    the sentence embedding to the look of the captioned clip (ridge, its regularisation chosen
    on val) reaches test R@1 26.6 on average (22.9 to 31.2; a video-only map reaches at most
    33.3, as twins tie) against 14.4 (8.3 to 18.8) at open_clip's initialisation.
    """
    tower = getattr(model, "text", model)
    blocks = tower.transformer
    width = blocks.width
    attn_std = width ** -0.5  # open_clip CLIP.init_parameters
    proj_std = width ** -0.5 * (2 * blocks.layers) ** -0.5
    for block in blocks.resblocks:
        block.attn.in_proj_weight[:width].zero_()
        block.attn.in_proj_bias[:width].zero_()
        _orthogonal(block.attn.in_proj_weight[2 * width:], attn_std, generator)
        _orthogonal(block.attn.out_proj.weight, proj_std, generator)
        block.mlp.c_proj.weight.zero_()
        block.mlp.c_proj.bias.zero_()
    _orthogonal(tower.text_projection, width ** -0.5, generator)


def _orthogonal(weight: torch.Tensor, std: float, generator: torch.Generator) -> None:
    """Orthogonal ``weight`` whose singular values are the root mean square of those an
    N(0, std^2) matrix of its shape has: the same average gain, none near zero."""
    nn.init.orthogonal_(weight, gain=std * max(weight.shape) ** 0.5, generator=generator)


def tiny_swin():
    """SwinModel at 32 px, patch 2, embed dim 4, one block per stage: stages of 4, 8, 16, 32
    channels on 16², 8², 4², 2² maps, so the default stages (1, 2, 3) keep (8, 16, 32)."""
    from transformers import SwinConfig, SwinModel

    # window 2: transformers' Swin fails on a window larger than the 2 x 2 last stage
    config = SwinConfig(image_size=TINY_IMAGE_SIZE, patch_size=2, embed_dim=4,
                        depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=2)
    return SwinModel(config, add_pooling_layer=False)


def tiny_ast():
    """ASTModel on the real 1024 x 128 fbank with patch 16 and strides 10 (12 x 101 = 1212
    patches), hidden size 24, one layer of two heads."""
    from transformers import ASTConfig, ASTModel

    config = ASTConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=48, patch_size=16, frequency_stride=10, time_stride=10,
                       max_length=1024, num_mel_bins=128)
    return ASTModel(config)


def tiny_roberta():
    """RobertaModel with hidden size 24, one layer, a 512-word vocabulary (HashWordTokenizer)."""
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(vocab_size=TINY_ROBERTA_VOCAB, hidden_size=24, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=48,
                           max_position_embeddings=TINY_TEXT_LEN + 4, type_vocab_size=1,
                           bos_token_id=HashWordTokenizer.bos_id,
                           pad_token_id=HashWordTokenizer.pad_id,
                           eos_token_id=HashWordTokenizer.eos_id)
    return RobertaModel(config, add_pooling_layer=False)


def build_tiny(names: BackboneNames, *, device: str | torch.device, seed: int, amp: bool
               ) -> Backbones:
    """Tiny random backbones whose shapes match tests/conftest.make_tiny_spec: image 32, CLIP
    32-d with 12 text tokens, Swin (8, 16, 32) on grids (4, 2, 1), AST 24-d, RoBERTa 24-d x 12."""
    import open_clip
    import transformers
    from open_clip.tokenizer import SimpleTokenizer
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip, swin, ast, roberta = tiny_clip(seed), tiny_swin(), tiny_ast(), tiny_roberta()
    weights = f"random:{seed}"
    infos = {
        "clip": BackboneInfo("tiny-clip", weights, "open_clip", open_clip.__version__),
        "swin": BackboneInfo("tiny-swin", weights, "transformers", transformers.__version__),
        "ast": BackboneInfo("tiny-ast", weights, "transformers", transformers.__version__),
        "roberta": BackboneInfo("tiny-roberta", weights, "transformers", transformers.__version__),
    }
    return Backbones(clip=clip, clip_tokenizer=SimpleTokenizer(context_length=TINY_TEXT_LEN),
                     swin=swin, swin_mean=IMAGENET_DEFAULT_MEAN, swin_std=IMAGENET_DEFAULT_STD,
                     ast=ast, roberta=roberta,
                     roberta_tokenizer=HashWordTokenizer(TINY_ROBERTA_VOCAB, TINY_TEXT_LEN),
                     roberta_len=TINY_TEXT_LEN, swin_stages=names.swin_stages,
                     swin_grids=names.swin_grids, infos=infos, device=device, amp=amp)
