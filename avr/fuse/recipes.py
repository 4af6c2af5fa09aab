"""Each head's training recipe per dataset, as its paper or released code sets it, every value
with its source: what ``avr train`` uses for an option the user leaves unset.

A recipe is a table of settings, one per training option (``TrainConfig`` field) or head option,
each a value and the release file and line (or paper section) it comes from. The rows are the
datasets a release or paper gives a recipe for; ``recipe_for`` picks the row of a store's
dataset and falls back to the head's MSR-VTT row, with a note, for any other dataset (the demo,
a generic folder, a generated store that imitates no dataset). docs/recipes.md is this table,
written by ``markdown`` (a test keeps the two equal).

- Values every recipe of a head shares are in its ``COMMON`` settings; a row holds the values
  that differ for its dataset.
- A setting may depend on the store's CLIP (TEFAL trains ViT-B/32 at batch 12, ViT-B/16 at 32):
  ``Setting.by_clip``.
- HTAV has no released code and its paper gives no training values: its recipe is avr's own,
  said as such in every source; so is the recipe of a head the table does not name (a new head
  file).
- ``FROZEN``: the values whose meaning a frozen, cached backbone changes (the releases' "CLIP
  lr"), with what avr does instead and why.

The small-split and random-backbone rules of ``avr.fuse.schedule`` may still change a recipe's
epochs, batch, lr and temperature on a store too small or too random for them; they say so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from avr.errors import AvrError

# The release snapshots the sources cite (GitHub owner/name, with the commit read).
XPOOL = "xpool"  # layer6ai-labs/xpool @ bc88718
CLIP4CLIP = "CLIP4Clip"  # ArrowLuo/CLIP4Clip @ 508ffa3
AVIGATE = "AVIGATE"  # BoseungJeong/AVIGATE-CVPR2025 @ ca03ede
GAID = "GAID"  # YangBowenn/GAID @ 21ee64c (the code of GAIS's v1, GAID)
RELEASES = {XPOOL: "layer6ai-labs/xpool@bc88718",
            CLIP4CLIP: "ArrowLuo/CLIP4Clip@508ffa3",
            AVIGATE: "BoseungJeong/AVIGATE-CVPR2025@ca03ede",
            GAID: "YangBowenn/GAID@21ee64c"}

FALLBACK = "msrvtt"  # the row a dataset without one of its own takes
# The rows a recipe may have: MSR-VTT's 9k and 7k train lists, and the other benchmarks.
DATASETS = ("msrvtt", "msrvtt-7k", "msvd", "lsmdc", "didemo", "activitynet", "vatex",
            "charades")
MSRVTT_7K_VIDEOS = 7010  # videos in MSR-VTT's 7k train list (MSRVTT_train.7k.csv)
# Training options a recipe sets (TrainConfig fields); the other settings are head options.
TRAIN_SETTINGS = ("epochs", "batch_size", "lr", "scale_lr", "weight_decay", "no_decay",
                  "betas", "eps", "warmup", "lr_schedule", "grad_clip", "pairs")


@dataclass(frozen=True)
class Setting:
    """One value of a recipe and where it comes from; ``by_clip`` overrides the value for the
    stores whose CLIP is named there (open_clip names, e.g. ViT-B-16)."""

    value: Any
    source: str
    by_clip: dict[str, Any] = field(default_factory=dict)

    def value_for(self, clip: str | None) -> Any:
        return self.by_clip.get(clip, self.value)


@dataclass(frozen=True)
class Recipe:
    """The settings of ``head`` for ``dataset`` (the row taken), and a note when that row is
    another dataset's."""

    head: str
    dataset: str
    settings: dict[str, Setting]
    note: str | None = None


def _s(value: Any, source: str, **by_clip: Any) -> Setting:
    return Setting(value, source, {name.replace("_", "-"): v for name, v in by_clip.items()})


# ---- X-Pool (layer6ai-labs/xpool) -----------------------------------------------------------------
_XPOOL_OPTIMIZER = {
    "weight_decay": _s(0.2, f"{XPOOL} config/all_config.py:45"),
    "no_decay": _s("none", f"{XPOOL} train.py:50-58: AdamW(param groups, weight_decay) over every "
                           f"parameter, biases and LayerNorms included"),
    "betas": _s([0.9, 0.999], f"{XPOOL} modules/optimization.py:114 (AdamW's default; train.py:58 "
                              f"passes none)"),
    "eps": _s(1e-6, f"{XPOOL} modules/optimization.py:115"),
    "warmup": _s(0.1, f"{XPOOL} config/all_config.py:46"),
    "lr_schedule": _s("cosine", f"{XPOOL} train.py:59-63, modules/optimization.py:81-85: linear "
                                f"warmup, then cosine to 0 over the remaining steps"),
    "grad_clip": _s(1.0, f"{XPOOL} trainer/trainer.py:61"),
    "scale_lr": _s(1e-6, f"{XPOOL} config/all_config.py:41 (clip_lr): the logit scale is CLIP's, "
                         f"trained in the CLIP group (train.py:51-56)"),
}
_XPOOL = {
    **_XPOOL_OPTIMIZER,
    "epochs": _s(5, f"{XPOOL} config/all_config.py:44"),
    "batch_size": _s(32, f"{XPOOL} README.md:73-76 (--batch_size=32)"),
    "frames": _s(12, f"{XPOOL} config/all_config.py:19"),
    "pairs": _s("all", f"{XPOOL} datasets/msrvtt_dataset.py:85-90: every caption of every train "
                       f"video"),
}
_XPOOL_ROWS = {
    "msrvtt": {"lr": _s(3e-5, f"{XPOOL} README.md:73 (MSR-VTT 9k: --noclip_lr=3e-5)"),
               "dropout": _s(0.3, f"{XPOOL} README.md:73 (--transformer_dropout=0.3)")},
    "msrvtt-7k": {"lr": _s(1e-5, f"{XPOOL} README.md:74 (MSR-VTT 7k: --noclip_lr=1e-5)"),
                  "dropout": _s(0.4, f"{XPOOL} README.md:74 (--transformer_dropout=0.4)")},
    "msvd": {"lr": _s(1e-5, f"{XPOOL} README.md:75 (MSVD: --noclip_lr=1e-5)"),
             "dropout": _s(0.4, f"{XPOOL} README.md:75 (--transformer_dropout=0.4)")},
    "lsmdc": {"lr": _s(1e-5, f"{XPOOL} README.md:76 (LSMDC: --noclip_lr=1e-5)"),
              "dropout": _s(0.3, f"{XPOOL} README.md:76 (--transformer_dropout=0.3)")},
}

# ---- TEFAL (paper only; X-Pool's release for what the paper leaves out) ----------------------------
TEFAL_PAPER = "TEFAL paper Sec. 4.2"
_TEFAL = {
    **_XPOOL,
    "batch_size": _s(12, f"{TEFAL_PAPER}: batch 12 with ViT-B/32, 32 with ViT-B/16",
                     ViT_B_16=32),
}
_TEFAL_ROWS = {
    "msrvtt": {**_XPOOL_ROWS["msrvtt"],
               "frames": _s(12, f"{TEFAL_PAPER}: 12 frames for MSR-VTT and LSMDC")},
    "msrvtt-7k": {**_XPOOL_ROWS["msrvtt-7k"],
                  "frames": _s(12, f"{TEFAL_PAPER}: 12 frames for MSR-VTT and LSMDC")},
    "lsmdc": {**_XPOOL_ROWS["lsmdc"],
              "frames": _s(12, f"{TEFAL_PAPER}: 12 frames for MSR-VTT and LSMDC")},
    # X-Pool ran neither VATEX nor Charades: its MSR-VTT 9k lr and dropout
    "vatex": {"lr": _s(3e-5, f"{XPOOL} README.md:73 (X-Pool has no VATEX recipe: its MSR-VTT 9k "
                             f"lr)"),
              "dropout": _s(0.3, f"{XPOOL} README.md:73 (X-Pool has no VATEX recipe: its MSR-VTT "
                                 f"9k dropout)"),
              "frames": _s(32, f"{TEFAL_PAPER}: 32 frames for VATEX and Charades")},
    "charades": {"lr": _s(3e-5, f"{XPOOL} README.md:73 (X-Pool has no Charades recipe: its MSR-VTT "
                                f"9k lr)"),
                 "dropout": _s(0.3, f"{XPOOL} README.md:73 (X-Pool has no Charades recipe: its "
                                    f"MSR-VTT 9k dropout)"),
                 "frames": _s(32, f"{TEFAL_PAPER}: 32 frames for VATEX and Charades")},
}

# ---- CLIP4Clip meanP (ArrowLuo/CLIP4Clip) -------------------------------------------------------
_BERT_ADAM = {
    "weight_decay": _s(0.2, f"{CLIP4CLIP} main_task_retrieval.py:200"),
    "no_decay": _s("bias", f"{CLIP4CLIP} main_task_retrieval.py:189-192: no decay on names holding "
                           f"'bias' (its LayerNorms are named ln_*, so they decay)"),
    "betas": _s([0.9, 0.98], f"{CLIP4CLIP} main_task_retrieval.py:209-212 (BertAdam b1, b2)"),
    "eps": _s(1e-6, f"{CLIP4CLIP} main_task_retrieval.py:210 (BertAdam e)"),
    "warmup": _s(0.1, f"{CLIP4CLIP} main_task_retrieval.py:59 (--warmup_proportion)"),
    "lr_schedule": _s("warmup_cosine", f"{CLIP4CLIP} modules/optimization.py:26-29: linear "
                                       f"warmup, then 0.5 (1 + cos(pi t / T)) over the whole run"),
    "grad_clip": _s(1.0, f"{CLIP4CLIP} main_task_retrieval.py:212 (max_grad_norm)"),
}
_MEANP = {
    **_BERT_ADAM,
    "epochs": _s(5, f"{CLIP4CLIP} README.md:100 (--epochs=5)"),
    "batch_size": _s(128, f"{CLIP4CLIP} README.md:100 (--batch_size=128)"),
    "lr": _s(1e-4, f"{CLIP4CLIP} README.md:106 (--lr 1e-4, the lr of every non-CLIP parameter: "
                   f"meanP has none, avr's projections take it)"),
    "scale_lr": _s(1e-7, f"{CLIP4CLIP} README.md:106-108 (lr 1e-4 x --coef_lr 1e-3): the logit "
                         f"scale is CLIP's, main_task_retrieval.py:194-205"),
    "frames": _s(12, f"{CLIP4CLIP} README.md:106 (--max_frames 12)"),
    "pairs": _s("all", f"{CLIP4CLIP} README.md:107 (--expand_msrvtt_sentences), "
                       f"dataloaders/dataloader_msrvtt_retrieval.py:171-176"),
}
_MEANP_ROWS = {
    "msrvtt": {},
    "msvd": {"pairs": _s("all", f"{CLIP4CLIP} dataloaders/dataloader_msvd_retrieval.py:67-71")},
    "lsmdc": {"pairs": _s("all", f"{CLIP4CLIP} dataloaders/dataloader_lsmdc_retrieval.py:79 (one "
                                 f"caption per clip)")},
    "activitynet": {"frames": _s(64, f"{CLIP4CLIP} README.md:157 (--max_frames 64)"),
                    "pairs": _s("all", f"{CLIP4CLIP} dataloaders/"
                                       f"dataloader_activitynet_retrieval.py:82 (a paragraph per "
                                       f"video)")},
    "didemo": {"frames": _s(64, f"{CLIP4CLIP} README.md:174 (--max_frames 64)"),
               "pairs": _s("all", f"{CLIP4CLIP} dataloaders/dataloader_didemo_retrieval.py:108 "
                                  f"(a paragraph per video)")},
}

# ---- AVIGATE (BoseungJeong/AVIGATE-CVPR2025; BertAdam from CLIP4Clip's optimization.py) ----------
_AVIGATE = {
    "weight_decay": _s(0.2, f"{AVIGATE} main_task_retrieval.py:230"),
    "no_decay": _s("bias", f"{AVIGATE} main_task_retrieval.py:207-210: no decay on names holding "
                           f"'bias' (its LayerNorms are named ln_*, so they decay)"),
    "betas": _s([0.9, 0.98], f"{AVIGATE} main_task_retrieval.py:245-248 (BertAdam b1, b2)"),
    "eps": _s(1e-6, f"{AVIGATE} main_task_retrieval.py:246 (BertAdam e)"),
    "lr_schedule": _s("warmup_cosine", f"{AVIGATE} main_task_retrieval.py:245-246 "
                                       f"(schedule='warmup_cosine': {CLIP4CLIP} "
                                       f"modules/optimization.py:26-29)"),
    "grad_clip": _s(1.0, f"{AVIGATE} main_task_retrieval.py:248 (max_grad_norm)"),
    "warmup": _s(0.1, f"{AVIGATE} run.sh:15 (--warmup_proportion 0.1)"),
    "epochs": _s(5, f"{AVIGATE} run.sh:12 (--epochs=5)"),
    "batch_size": _s(128, f"{AVIGATE} run.sh:12 (--batch_size=128)"),
    "lr": _s(1e-4, f"{AVIGATE} run.sh:13 (--lr 1e-4)"),
    "scale_lr": _s(1e-7, f"{AVIGATE} run.sh:13-14 (lr 1e-4 x --coef_lr 1e-3): the logit scale is "
                         f"CLIP's, main_task_retrieval.py:232"),
    "frames": _s(12, f"{AVIGATE} run.sh:14 (--max_frames 12), :15 (--eval_max_frame 12)"),
    "pairs": _s("all", f"{AVIGATE} run.sh:14 (--expand_msrvtt_sentences)"),
    "dropout": _s(0.0, f"{AVIGATE} modules/module_cross.py:162-163, 209, 217: "
                       f"nn.MultiheadAttention(d_model, n_head), attention dropout 0"),
    "query_lr_scale": _s(100.0, f"{AVIGATE} main_task_retrieval.py:220, 236 (query_tokens at "
                                f"100 x lr)"),
    "query_weight_decay": _s(0.2, f"{AVIGATE} main_task_retrieval.py:236 (query_tokens in a "
                                  f"decay group, 0.2)"),
}
_AVIGATE_ROWS = {"msrvtt": {}}

# ---- GAIS (the release of its v1, GAID: YangBowenn/GAID) -----------------------------------------
_GAIS = {
    "weight_decay": _s(0.2, f"{GAID} config/all_config.py:82"),
    "no_decay": _s("none", f"{GAID} train.py:100-108: AdamW(param groups, weight_decay) over every "
                           f"parameter"),
    "betas": _s([0.9, 0.999], f"{GAID} modules/optimization.py:114 (AdamW's default)"),
    "eps": _s(1e-6, f"{GAID} modules/optimization.py:115"),
    "warmup": _s(0.1, f"{GAID} config/all_config.py:83"),
    "lr_schedule": _s("cosine", f"{GAID} train.py:109-113 (get_cosine_schedule_with_warmup)"),
    "grad_clip": _s(1.0, f"{GAID} trainer/trainer_stochastic.py:81"),
    "scale_lr": _s(1e-6, f"{GAID} config/all_config.py:78 (clip_lr); the loss reads the scale "
                         f"detached (trainer/trainer_stochastic.py:69), so it never trains"),
    "epochs": _s(5, f"{GAID} config/all_config.py:81"),
    "batch_size": _s(32, f"{GAID} config/all_config.py:80, run_*_train.sh (--batch_size=32)"),
    "frames": _s(12, f"{GAID} config/all_config.py:56 (--num_frames 12)"),
    "pairs": _s("all", f"{GAID} datasets/msrvtt_dataset.py:126-127: every caption of every train "
                       f"video"),
}
_GAIS_ROWS = {
    "msrvtt": {"lr": _s(3e-5, f"{GAID} run_msrvtt_train.sh:10 (--noclip_lr=3e-5)"),
               "dropout": _s(0.3, f"{GAID} run_msrvtt_train.sh:11 (--transformer_dropout=0.3)"),
               "support_weight": _s(0.8, f"{GAID} run_msrvtt_train.sh:16 "
                                         f"(--support_loss_weight=0.8)")},
    "vatex": {"lr": _s(1e-5, f"{GAID} run_vatex_train.sh:10 (--noclip_lr=1e-5)"),
              "dropout": _s(0.4, f"{GAID} run_vatex_train.sh:11 (--transformer_dropout=0.4)"),
              "support_weight": _s(0.0, f"{GAID} run_vatex_train.sh sets none: "
                                        f"config/all_config.py:100 (default 0.0)"),
              "pairs": _s("all", f"{GAID} datasets/vatex_dataset.py:31-39: every caption")},
    "lsmdc": {"lr": _s(1e-5, f"{GAID} run_lsmdc_train.sh:10 (--noclip_lr=1e-5)"),
              "dropout": _s(0.3, f"{GAID} run_lsmdc_train.sh:11 (--transformer_dropout=0.3)"),
              "support_weight": _s(0.5, f"{GAID} run_lsmdc_train.sh:17 "
                                        f"(--support_loss_weight=0.5)")},
    "didemo": {"lr": _s(1e-5, f"{GAID} run_didemo_train.sh:10 (--noclip_lr=1e-5)"),
               "dropout": _s(0.4, f"{GAID} run_didemo_train.sh:11 (--transformer_dropout=0.4)"),
               "epochs": _s(8, f"{GAID} run_didemo_train.sh:14 (--num_epochs=8)"),
               "support_weight": _s(0.0, f"{GAID} run_didemo_train.sh sets none: "
                                         f"config/all_config.py:100 (default 0.0)")},
}

# ---- avr's own: HTAV (no released code; its paper gives no training values), and any head ------
# ---- without a recipe of its own ---------------------------------------------------------------

def own_settings(why: str) -> dict[str, Setting]:
    """avr's own recipe, every source saying so and ``why``."""
    own = f"avr's own ({why})"
    return {
        "epochs": _s(5, f"{own}: the CLIP-based releases' 5"),
        "batch_size": _s(128, f"{own}: CLIP4Clip's and AVIGATE's 128"),
        "lr": _s(1e-4, f"{own}: CLIP4Clip's and AVIGATE's 1e-4 for new modules"),
        "scale_lr": _s(1e-4, f"{own}: the logit scale at the head's lr"),
        "weight_decay": _s(0.2, f"{own}: every release's 0.2"),
        "no_decay": _s("bias_norm", f"{own}: no decay on biases, norms and the logit scale "
                                    f"(open_clip's rule)"),
        "betas": _s([0.9, 0.98], f"{own}: CLIP's and BertAdam's (0.9, 0.98)"),
        "eps": _s(1e-6, f"{own}: every release's 1e-6"),
        "warmup": _s(0.1, f"{own}: every release's 0.1"),
        "lr_schedule": _s("cosine", f"{own}: linear warmup, then cosine to 0"),
        "grad_clip": _s(1.0, f"{own}: every release's 1.0"),
        "frames": _s(0, f"{own}: every cached frame"),
        "pairs": _s("all", f"{own}: every caption, as every release"),
        "dropout": _s(0.3, f"{own}: X-Pool's MSR-VTT 9k dropout"),
    }


HTAV_OWN = "HTAV's paper gives no training values"
_HTAV = own_settings(HTAV_OWN)
_HTAV_ROWS = {"msrvtt": {}}

_TABLE = {
    "meanp": (_MEANP, _MEANP_ROWS),
    "xpool": (_XPOOL, _XPOOL_ROWS),
    "tefal": (_TEFAL, _TEFAL_ROWS),
    "avigate": (_AVIGATE, _AVIGATE_ROWS),
    "gais": (_GAIS, _GAIS_ROWS),
    "htav": (_HTAV, _HTAV_ROWS),
}

# Values of the releases that a frozen, cached backbone changes the meaning of: per head, the
# release's value, its source, and what avr does instead and why.
FROZEN: dict[str, list[tuple[str, str, str]]] = {
    "meanp": [("CLIP lr 1e-7 (lr 1e-4 x coef_lr 1e-3)", f"{CLIP4CLIP} README.md:106-108",
               "CLIP is frozen in the cache, so nothing of CLIP trains; meanP itself has no "
               "parameters, so avr adds identity-initialised projections trained at the release's "
               "lr for new modules (1e-4). The logit scale, a CLIP parameter there, keeps the CLIP "
               "lr (scale_lr).")],
    "xpool": [("clip_lr 1e-6", f"{XPOOL} config/all_config.py:41",
               "CLIP is frozen in the cache: only the logit scale, which X-Pool trains among "
               "CLIP's parameters, keeps this lr (scale_lr).")],
    "tefal": [("X-Pool's clip_lr 1e-6", f"{XPOOL} config/all_config.py:41",
               "CLIP is frozen in the cache: only the logit scale keeps this lr (scale_lr)."),
              ("AST fine-tuned on the dataset's audio", TEFAL_PAPER,
               "AST is frozen in the cache: its tokens are fixed features; the D_ast -> D_p "
               "projection and the audio block train at the head's lr.")],
    "avigate": [("CLIP lr 1e-7 (coef_lr 1e-3)", f"{AVIGATE} run.sh:13-14, "
                 f"main_task_retrieval.py:232",
                 "CLIP is frozen in the cache: only the logit scale keeps this lr (scale_lr)."),
                ("AST's final LayerNorm at 1e-7", f"{AVIGATE} main_task_retrieval.py:233, 239",
                 "the cache holds AST's tokens after that LayerNorm, with its pretrained affine: "
                 "it does not train (at 1e-7 it barely moves in the release)."),
                ("audio_projection at lr 1e-4", f"{AVIGATE} main_task_retrieval.py:234",
                 "unchanged: avr's audio_proj trains at the head's lr.")],
    "gais": [("clip_lr 1e-6", f"{GAID} config/all_config.py:78",
              "CLIP is frozen in the cache; the release reads CLIP's logit scale detached, so "
              "avr keeps it fixed at 100 (learn_temperature=false) and scale_lr applies to "
              "nothing.")],
    "htav": [],
}


def heads() -> tuple[str, ...]:
    return tuple(_TABLE)


def rows(head: str) -> tuple[str, ...]:
    """The datasets ``head`` has a recipe row of its own for."""
    return tuple(_table(head)[1])


def settings_of(head: str, dataset: str) -> dict[str, Setting]:
    """Every setting of ``head``'s row ``dataset`` (its common settings, then the row's)."""
    common, by_dataset = _table(head)
    return {**common, **by_dataset[dataset]}


def _table(head: str) -> tuple[dict[str, Setting], dict[str, dict[str, Setting]]]:
    """A head's recipe table; a head without one (a new head file) takes avr's own."""
    return _TABLE.get(head) or (own_settings(f"{head} has no recipe in avr/fuse/recipes.py"),
                                {FALLBACK: {}})


def recipe_for(head: str, dataset: str) -> Recipe:
    """``head``'s recipe for ``dataset``: its own row, or the head's MSR-VTT row with a note."""
    if head not in _TABLE:
        return Recipe(head, FALLBACK, settings_of(head, FALLBACK),
                      f"recipe: {head} has none in avr/fuse/recipes.py: avr's own")
    if dataset in rows(head):
        return Recipe(head, dataset, settings_of(head, dataset))
    if head == "htav":
        note = f"recipe: htav's is avr's own for every dataset ({HTAV_OWN})"
    else:
        known = "its release" if head != "tefal" else "TEFAL's paper and X-Pool's release"
        note = (f"recipe: {head} has no {dataset} recipe in {known}; its MSR-VTT 9k recipe "
                f"instead (docs/recipes.md)")
    return Recipe(head, FALLBACK, settings_of(head, FALLBACK), note)


def dataset_row(dataset: str, train_videos: int | None = None) -> str:
    """The recipe row of a store's dataset name: MSR-VTT's 7k row for an ``msrvtt`` store whose
    train and val splits hold at most the 7k list's videos (``train_videos``), else the name."""
    if dataset == "msrvtt" and train_videos is not None and train_videos <= MSRVTT_7K_VIDEOS:
        return "msrvtt-7k"
    return dataset


def check_recipe_name(name: str) -> None:
    """Refuse a ``recipe`` option that names no dataset of the table."""
    if name not in DATASETS:
        raise AvrError(f"recipe must be one of {', '.join(DATASETS)} (docs/recipes.md), not "
                       f"{name!r}")


# ---- docs/recipes.md ------------------------------------------------------------------------------

def cell(value: Any) -> str:
    """A value as the docs table writes it: JSON (a string quoted, a tuple as a list)."""
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def markdown() -> str:
    """The recipe tables of docs/recipes.md (between its generated-section markers)."""
    lines = []
    for head, (common, by_dataset) in _TABLE.items():
        lines += [f"### {head}", "", f"Rows: {', '.join(by_dataset)}; any other dataset takes "
                  f"the {FALLBACK} row.", "", "| option | value | source |", "|---|---|---|"]
        lines += [_row(name, setting) for name, setting in common.items()
                  if all(name not in overrides for overrides in by_dataset.values())]
        varying = {name for overrides in by_dataset.values() for name in overrides}
        if varying:
            lines += ["", "| dataset | option | value | source |", "|---|---|---|---|"]
        for dataset, overrides in by_dataset.items():
            lines += [f"| {dataset} {_row(name, setting)}"
                      for name, setting in {**common, **overrides}.items() if name in varying]
        if FROZEN[head]:
            lines += ["", "What a frozen backbone changes:", "",
                      "| the release's value | source | what avr does instead, and why |",
                      "|---|---|---|"]
            lines += [f"| {value} | {source} | {instead} |" for value, source, instead in
                      FROZEN[head]]
        lines.append("")
    return "\n".join(lines)


def _row(name: str, setting: Setting) -> str:
    by_clip = "".join(f"; {cell(value)} with {clip}" for clip, value in setting.by_clip.items())
    return f"| {name} | {cell(setting.value)}{by_clip} | {setting.source} |"
