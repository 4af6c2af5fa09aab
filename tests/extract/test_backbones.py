"""The frozen backbones: output shapes and dtypes, determinism, token layouts, real-size
architectures (random weights, nothing downloaded) and loading from local copies."""

from __future__ import annotations

import functools
import json
from dataclasses import asdict

import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from avr.errors import AvrError
from avr.extract import backbones as bb
from avr.extract.backbones import BackboneNames, Backbones, HashWordTokenizer, load_backbones
from avr.store import schema
from avr.store.schema import AudioParams, BackboneInfo, spec_differences
from support.specs import make_tiny_spec

CAPTIONS = ["a dog barks at the door", "someone plays a loud guitar solo on a stage tonight!!"]


@pytest.fixture(scope="module")
def tiny() -> Backbones:
    return load_backbones("tiny", seed=0)


def random_frames(n: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=generator)


def random_fbank(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 1024, 128, generator=torch.Generator().manual_seed(seed))


def tiny_parts(**replace) -> dict:
    """Backbones constructor arguments for the tiny models, with some parts replaced."""
    parts = dict(
        clip=bb.tiny_clip(), clip_tokenizer=SimpleTokenizer(context_length=bb.TINY_TEXT_LEN),
        swin=bb.tiny_swin(), swin_mean=(0.485, 0.456, 0.406), swin_std=(0.229, 0.224, 0.225),
        ast=bb.tiny_ast(), roberta=bb.tiny_roberta(),
        roberta_tokenizer=HashWordTokenizer(bb.TINY_ROBERTA_VOCAB, bb.TINY_TEXT_LEN),
        roberta_len=bb.TINY_TEXT_LEN, swin_stages=(1, 2, 3), swin_grids=(4, 2, 1),
        infos={role: BackboneInfo(role, "random:0", "test", "0")
               for role in ("clip", "swin", "ast", "roberta")})
    parts.update(replace)
    return parts


# ---- tiny backbones ---------------------------------------------------------------------------

def test_tiny_backbones_write_the_tiny_test_spec(tiny):
    spec = tiny.make_spec("unit", num_frames=6)
    assert spec_differences(spec, make_tiny_spec(), ignore_versions=True) == []


def test_tiny_frames_give_clip_embeddings_and_pooled_swin_stages(tiny):
    spec = make_tiny_spec()
    out = tiny.encode_frames(random_frames(3, spec.image_size))
    expected = {schema.FRAME_EMBEDDINGS: (3, spec.clip_dim)}
    for k, (channels, grid) in enumerate(zip(spec.swin_channels, spec.swin_grids)):
        expected[schema.swin_level(k)] = (3, grid * grid, channels)
    assert {name: tuple(t.shape) for name, t in out.items()} == expected
    assert all(t.dtype == torch.float32 for t in out.values())


def test_tiny_audio_gives_patch_global_and_time_tokens(tiny):
    out = tiny.encode_audio(random_fbank(2))
    assert {name: tuple(t.shape) for name, t in out.items()} == {
        schema.AUDIO_PATCH_TOKENS: (2, 1212, 24),
        schema.AUDIO_GLOBAL_TOKENS: (2, 2, 24),
        schema.AUDIO_TIME_TOKENS: (2, 101, 24),
        schema.AUDIO_POOLED_TOKEN: (2, 24),
    }
    assert all(t.dtype == torch.float32 for t in out.values())


def test_the_pooled_audio_token_is_the_final_norm_of_the_pre_norm_global_mean():
    """AVIGATE's global token: AST's final LayerNorm of the mean of its pre-norm CLS and
    distillation tokens, not the mean of the two normalised ones (their tokens made to differ:
    the tiny AST starts them equal)."""
    ast = bb.tiny_ast()
    with torch.no_grad():
        ast.embeddings.distillation_token.normal_(generator=torch.Generator().manual_seed(3))
    backbones = Backbones(**tiny_parts(ast=ast))
    fbank = random_fbank(2)
    out = backbones.encode_audio(fbank)
    with torch.no_grad():
        hidden = ast.embeddings(fbank)
        for layer in ast.layers:
            hidden = layer(hidden)
        want = ast.layernorm((hidden[:, 0] + hidden[:, 1]) / 2)
    torch.testing.assert_close(out[schema.AUDIO_POOLED_TOKEN], want)
    assert not torch.allclose(want, out[schema.AUDIO_GLOBAL_TOKENS].mean(1), atol=1e-3)


def test_tiny_text_gives_clip_and_roberta_tokens_with_boolean_masks(tiny):
    out = tiny.encode_text(CAPTIONS)
    assert {name: tuple(t.shape) for name, t in out.items()} == {
        schema.TEXT_EMBEDDINGS: (2, 32),
        schema.TEXT_TOKEN_STATES: (2, 12, 32),
        schema.TEXT_TOKEN_MASK: (2, 12),
        schema.ROBERTA_STATES: (2, 12, 24),
        schema.ROBERTA_MASK: (2, 12),
    }
    assert out[schema.TEXT_TOKEN_MASK].dtype == torch.bool
    assert out[schema.ROBERTA_MASK].dtype == torch.bool
    assert out[schema.TEXT_EMBEDDINGS].dtype == torch.float32


def encode_everything(backbones: Backbones) -> dict[str, torch.Tensor]:
    out = backbones.encode_frames(random_frames(2, backbones.image_size))
    out.update(backbones.encode_audio(random_fbank(1)))
    out.update(backbones.encode_text(CAPTIONS))
    return out


def test_same_seed_gives_identical_outputs():
    first = encode_everything(load_backbones("tiny", seed=3))
    second = encode_everything(load_backbones("tiny", seed=3))
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_another_seed_gives_other_weights():
    first = encode_everything(load_backbones("tiny", seed=0))
    second = encode_everything(load_backbones("tiny", seed=1))
    assert not torch.allclose(first[schema.FRAME_EMBEDDINGS], second[schema.FRAME_EMBEDDINGS])
    assert load_backbones("tiny", seed=1).spec_fields["backbones"]["clip"].weights == "random:1"


def test_loading_tiny_backbones_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_backbones("tiny", seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_backbones_are_frozen_and_in_eval_mode(tiny):
    for model in (tiny.clip, tiny.swin, tiny.ast, tiny.roberta):
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())


# ---- CLIP text tokens -------------------------------------------------------------------------

def test_clip_text_mask_covers_start_words_and_eot(tiny):
    long_caption = "one two three four five six seven eight nine ten eleven"
    out = tiny.encode_text(["a dog barks", long_caption])
    n_bpe = len(tiny.clip_tokenizer.encode("a dog barks"))
    assert out[schema.TEXT_TOKEN_MASK][0].tolist() == [True] * (n_bpe + 2) + [False] * (10 - n_bpe)
    assert out[schema.TEXT_TOKEN_MASK][1].all()  # cut to the context, EOT in the last slot


def test_clip_sentence_embedding_is_the_projected_token_state_at_eot(tiny):
    out = tiny.encode_text(CAPTIONS)
    last = out[schema.TEXT_TOKEN_MASK].sum(dim=1) - 1
    at_eot = out[schema.TEXT_TOKEN_STATES][torch.arange(len(CAPTIONS)), last]
    torch.testing.assert_close(at_eot, out[schema.TEXT_EMBEDDINGS])


# ---- RoBERTa tokens ---------------------------------------------------------------------------

def test_hash_tokenizer_wraps_words_in_bos_and_eos_and_pads():
    ids, mask = HashWordTokenizer(vocab_size=100, max_length=6)(["Dog barks", "dog"])
    tokenizer = HashWordTokenizer(vocab_size=100, max_length=6)
    dog, barks = tokenizer.word_id("dog"), tokenizer.word_id("barks")
    assert ids.tolist() == [[0, dog, barks, 2, 1, 1], [0, dog, 2, 1, 1, 1]]
    assert mask.tolist() == [[True] * 4 + [False] * 2, [True] * 3 + [False] * 3]


def test_hash_tokenizer_cuts_long_text_but_keeps_eos():
    ids, mask = HashWordTokenizer(vocab_size=100, max_length=5)(["a b c d e f g"])
    assert ids[0, 0] == 0 and ids[0, -1] == 2 and mask.all()


def test_hash_tokenizer_ids_are_fixed_numbers():
    # Pinned values: a store written on one machine must tokenise the same on another.
    tokenizer = HashWordTokenizer(vocab_size=512, max_length=12)
    assert [tokenizer.word_id(w) for w in ("dog", "guitar")] == [162, 212]
    assert all(3 <= tokenizer.word_id(w) < 512 for w in CAPTIONS[1].split())


def test_roberta_mask_marks_the_real_tokens(tiny):
    out = tiny.encode_text(["a dog barks"])
    assert out[schema.ROBERTA_MASK][0].tolist() == [True] * 5 + [False] * 7


# ---- AST token layout -------------------------------------------------------------------------

def test_ast_patches_are_frequency_major_so_time_tokens_see_only_their_time_step():
    """Energy only in fbank frames 0..9 reaches only time step 0 (patches cover frames
    10t..10t+15), and AST numbers patch (f, t) as f * 101 + t."""
    embeddings = bb.tiny_ast().embeddings.patch_embeddings
    torch.nn.init.zeros_(embeddings.projection.bias)
    fbank = torch.zeros(1, 1024, 128)
    fbank[:, :10] = torch.rand(1, 10, 128) + 0.5
    with torch.no_grad():
        patches = embeddings(fbank)  # [1, 1212, D]
    nonzero = patches.abs().sum(-1)[0].nonzero().flatten().tolist()
    assert nonzero == [f * 101 for f in range(12)]
    time_tokens = bb.ast_time_tokens(patches, 12, 101)
    assert time_tokens[0, 1:].abs().max() == 0
    torch.testing.assert_close(time_tokens[0, 0], patches[0, ::101].mean(0))


def test_ast_time_tokens_average_the_frequency_patches_of_each_time_step():
    f_idx = torch.arange(12).view(12, 1).expand(12, 101)
    t_idx = torch.arange(101).view(1, 101).expand(12, 101)
    # token (f, t) holds t + (f - 5.5): the mean over f is exactly t
    values = (t_idx + f_idx - 5.5).float().reshape(1, 1212, 1).expand(2, 1212, 3)
    expected = torch.arange(101).float().view(1, 101, 1).expand(2, 101, 3)
    torch.testing.assert_close(bb.ast_time_tokens(values, 12, 101), expected)


def test_encode_audio_splits_globals_from_patches(tiny):
    fbank = random_fbank(1)
    tokens = tiny.ast(fbank).last_hidden_state
    out = tiny.encode_audio(fbank)
    torch.testing.assert_close(out[schema.AUDIO_GLOBAL_TOKENS], tokens[:, :2])
    torch.testing.assert_close(out[schema.AUDIO_PATCH_TOKENS], tokens[:, 2:])


# ---- Swin pooling -----------------------------------------------------------------------------

def test_pool_feature_map_averages_cells_in_row_major_order():
    feature_map = torch.arange(16.0).view(1, 1, 4, 4)
    pooled = bb.pool_feature_map(feature_map, 2)  # [1, 4, 1]
    assert pooled.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]


def test_swin_levels_need_three_increasing_stages():
    with pytest.raises(AvrError, match="at least 3"):
        load_backbones("tiny", BackboneNames(swin_stages=(2, 3), swin_grids=(2, 1)))
    with pytest.raises(AvrError, match="increasing"):
        load_backbones("tiny", BackboneNames(swin_stages=(3, 2, 1)))
    with pytest.raises(AvrError, match="within"):
        load_backbones("tiny", BackboneNames(swin_stages=(2, 3, 4)))


def test_other_swin_stages_change_channels_and_grids():
    backbones = load_backbones("tiny", BackboneNames(swin_stages=(0, 1, 3), swin_grids=(2, 2, 1)))
    assert backbones.spec_fields["swin_channels"] == (4, 8, 32)
    out = backbones.encode_frames(random_frames(1, 32))
    assert out[schema.swin_level(0)].shape == (1, 4, 4)
    assert out[schema.swin_level(2)].shape == (1, 1, 32)


# ---- input checks -----------------------------------------------------------------------------

def test_encode_frames_rejects_frames_of_another_size(tiny):
    with pytest.raises(ValueError, match="uint8"):
        tiny.encode_frames(random_frames(1, 48))


def test_make_spec_refuses_audio_settings_the_ast_cannot_take(tiny):
    with pytest.raises(AvrError, match="mel bins"):
        tiny.make_spec("unit", 6, AudioParams(num_mel_bins=64))


def test_unknown_backbone_kind_is_refused():
    with pytest.raises(AvrError, match="'huge'"):
        load_backbones("huge")


# ---- real-size architectures, random weights --------------------------------------------------

@pytest.fixture(scope="module")
def vit_b32() -> Backbones:
    clip = open_clip.create_model("ViT-B-32", pretrained=None)
    return Backbones(**tiny_parts(clip=clip, clip_tokenizer=open_clip.get_tokenizer("ViT-B-32")))


def test_vit_b32_architecture_gives_512_d_frame_embeddings_at_224(vit_b32):
    assert vit_b32.image_size == 224
    assert vit_b32.spec_fields["clip_dim"] == 512
    frames = vit_b32.encode_frames(random_frames(1, 224))
    assert frames[schema.FRAME_EMBEDDINGS].shape == (1, 512)


def test_vit_b32_architecture_gives_77_text_tokens_of_512(vit_b32):
    assert vit_b32.spec_fields["clip_text_len"] == 77
    text = vit_b32.encode_text(["a cat"])
    assert text[schema.TEXT_EMBEDDINGS].shape == (1, 512)
    assert text[schema.TEXT_TOKEN_STATES].shape == (1, 77, 512)
    assert text[schema.TEXT_TOKEN_MASK].sum() == 4  # <start> a cat <end>


def test_swin_tiny_architecture_has_four_stages_of_96_192_384_768():
    from transformers import SwinConfig, SwinModel

    swin = SwinModel(SwinConfig(), add_pooling_layer=False)
    backbones = Backbones(**tiny_parts(swin=swin, swin_stages=(0, 1, 2, 3),
                                       swin_grids=(4, 4, 2, 1)))
    assert backbones.spec_fields["swin_channels"] == (96, 192, 384, 768)
    out = backbones.encode_frames(random_frames(1, 32))  # resized 32 -> 224 for Swin
    shapes = [tuple(out[schema.swin_level(k)].shape) for k in range(4)]
    assert shapes == [(1, 16, 96), (1, 16, 192), (1, 4, 384), (1, 1, 768)]


def test_ast_base_architecture_gives_1212_patches_of_768_and_two_globals():
    from transformers import ASTConfig, ASTModel

    config = ASTConfig(num_hidden_layers=1)  # AST-base but one of its 12 layers: same shapes, fast
    assert (config.max_length, config.num_mel_bins, config.hidden_size) == (1024, 128, 768)
    backbones = Backbones(**tiny_parts(ast=ASTModel(config)))
    out = backbones.encode_audio(random_fbank(1))
    assert out[schema.AUDIO_PATCH_TOKENS].shape == (1, 1212, 768)
    assert out[schema.AUDIO_GLOBAL_TOKENS].shape == (1, 2, 768)
    assert out[schema.AUDIO_TIME_TOKENS].shape == (1, 101, 768)


def test_roberta_base_architecture_gives_768_d_states():
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(num_hidden_layers=1)  # roberta-base but one of its 12 layers: fast
    assert (config.hidden_size, config.vocab_size) == (768, 50265)
    roberta = RobertaModel(config, add_pooling_layer=False)
    backbones = Backbones(**tiny_parts(roberta=roberta, roberta_len=bb.ROBERTA_LEN,
                                       roberta_tokenizer=HashWordTokenizer(50265, bb.ROBERTA_LEN)))
    out = backbones.encode_text(["a cat"])
    assert out[schema.ROBERTA_STATES].shape == (1, bb.ROBERTA_LEN, 768)
    assert backbones.spec_fields["roberta_dim"] == 768


# ---- real loading -----------------------------------------------------------------------------

def test_a_missing_local_directory_is_named_in_the_error(tmp_path):
    missing = tmp_path / "no-swin-here"
    with pytest.raises(AvrError, match="no-swin-here"):
        load_backbones("real", BackboneNames(swin=str(missing)))


def test_a_missing_clip_checkpoint_is_named_in_the_error(tmp_path):
    missing = tmp_path / "clip-weights.pt"
    with pytest.raises(AvrError, match="clip-weights.pt"):
        load_backbones("real", BackboneNames(clip_pretrained=str(missing)))


def save_local_copies(tiny: Backbones, root) -> BackboneNames:
    """Write the tiny models the way a user keeps real ones offline: an open_clip config plus
    checkpoint file, and save_pretrained directories for the transformers models."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaModel, ViTImageProcessor

    config = {"embed_dim": 32,
              "vision_cfg": {"layers": 1, "width": 32, "head_width": 16, "patch_size": 8,
                             "pool_type": "avg", "image_size": 32},
              "text_cfg": {"context_length": 12, "width": 32, "heads": 2, "layers": 1}}
    (root / "avr-test-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(root / "avr-test-clip.json")
    torch.save(tiny.clip.state_dict(), root / "clip.pt")

    tiny.swin.save_pretrained(root / "swin")
    ViTImageProcessor(image_mean=list(tiny.swin_mean.tolist()),
                      image_std=list(tiny.swin_std.tolist())).save_pretrained(root / "swin")
    tiny.ast.save_pretrained(root / "ast")

    vocab = {word: i for i, word in enumerate(["<s>", "<pad>", "</s>", "<unk>", "a", "dog"])}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=word_level, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>", unk_token="<unk>").save_pretrained(root / "roberta")
    RobertaModel(RobertaConfig(vocab_size=8, hidden_size=24, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=48,
                               max_position_embeddings=bb.ROBERTA_LEN + 2),
                 add_pooling_layer=False).save_pretrained(root / "roberta")
    return BackboneNames(clip_model="avr-test-clip", clip_pretrained=str(root / "clip.pt"),
                         swin=str(root / "swin"), ast=str(root / "ast"),
                         roberta=str(root / "roberta"))


def test_real_loading_from_local_copies_reproduces_the_saved_models(tiny, tmp_path):
    names = save_local_copies(tiny, tmp_path)
    real = load_backbones("real", names)
    frames, fbank = random_frames(2, 32), random_fbank(1)
    expected = {**tiny.encode_frames(frames), **tiny.encode_audio(fbank)}
    found = {**real.encode_frames(frames), **real.encode_audio(fbank)}
    for name in expected:
        torch.testing.assert_close(found[name], expected[name])
    text = real.encode_text(["a dog", "a cat"])
    assert text[schema.ROBERTA_MASK].sum(1).tolist() == [4, 4]
    assert text[schema.ROBERTA_STATES].shape == (2, bb.ROBERTA_LEN, 24)
    torch.testing.assert_close(text[schema.TEXT_EMBEDDINGS],
                               tiny.encode_text(["a dog", "a cat"])[schema.TEXT_EMBEDDINGS])


def test_real_loading_records_where_the_weights_came_from(tiny, tmp_path):
    names = save_local_copies(tiny, tmp_path)
    infos = load_backbones("real", names).spec_fields["backbones"]
    assert infos["clip"] == BackboneInfo("avr-test-clip", names.clip_pretrained, "open_clip",
                                         open_clip.__version__)
    assert {infos[role].weights for role in ("swin", "ast", "roberta")} == {"local"}
    assert {infos[role].library for role in ("swin", "ast", "roberta")} == {"transformers"}
    assert asdict(infos["swin"])["name"] == names.swin


def test_token_states_cut_to_32_keep_the_full_context_sentence_embedding(vit_b32):
    tokenizer = functools.partial(open_clip.get_tokenizer("ViT-B-32"), context_length=32)
    short = Backbones(**tiny_parts(clip=vit_b32.clip, clip_tokenizer=tokenizer))
    assert short.spec_fields["clip_text_len"] == 32
    captions = ["a cat", "a very long caption " + "that goes on and on " * 10]
    full, cut = vit_b32.encode_text(captions), short.encode_text(captions)
    assert cut[schema.TEXT_TOKEN_STATES].shape == (2, 32, 512)
    # The text transformer is causal: the first caption's tokens are the same either way.
    torch.testing.assert_close(cut[schema.TEXT_TOKEN_STATES][0],
                               full[schema.TEXT_TOKEN_STATES][0, :32], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cut[schema.TEXT_EMBEDDINGS][0], full[schema.TEXT_EMBEDDINGS][0],
                               atol=1e-4, rtol=1e-4)
    assert cut[schema.TEXT_TOKEN_MASK][1].all()  # the long one fills its 32 tokens, EOT last
