"""Dataset adapters: a data root on disk -> one ``DatasetIndex`` (video ids, splits, captions).

``avr extract --dataset NAME --root R`` reads R (default ``data/NAME``) the way the dataset's
public releases ship it; one module per dataset family says which layout it reads, which split
it gives and its caption protocol, with the release named:

    vatex        VATEX, the HGR split                          (vatex.py)
    msrvtt       MSR-VTT, 9k/7k train, 1k-A test               (msrvtt.py)
    lsmdc        LSMDC, X-Pool's 101,079 / 7,408 / 1,000       (lsmdc.py)
    charades     Charades, the official train/test csvs        (charades.py)
    didemo       DiDeMo, paragraph-to-video                    (didemo.py)
    msvd         MSVD, no audio; raw-captions.pkl read safely  (msvd.py)
    activitynet  ActivityNet Captions, paragraphs on val_1     (activitynet.py)
    generic      a folder of videos and a caption file         (generic.py)
    demo         the built-in synthetic set                    (generic.py)

``avr extract --dataset NAME --show-layout`` prints the accepted layouts (``layout_of``). A
missing annotation or split file raises ``DatasetError`` at once, naming the exact paths; a
file that is not UTF-8, not valid JSON/CSV, or holds a value of the wrong type names the file,
the line (or entry) and what to do. Ids listed twice or listed without captions are reported
with counts (``DatasetIndex.warnings``); videos are looked for as ``_common`` says.

Order: train videos, then val, then test; captions grouped by video in that order.
``load_dataset`` accepts ``seed`` for every dataset (the one extraction seed); datasets whose
splits are fixed by files ignore it.
"""

from __future__ import annotations

from pathlib import Path

from avr.errors import DatasetError
from avr.extract.datasets import (activitynet, charades, didemo, generic, lsmdc, msrvtt, msvd,
                                  vatex)
from avr.extract.datasets._common import (MISSING_WARNING_FRACTION, PARAGRAPH_TOKENS,
                                          PARAGRAPHS, SENTENCE_TOKENS, SENTENCES, VIDEO_DIR,
                                          VIDEO_EXTENSIONS, Adapter, Caption, DatasetFacts,
                                          DatasetIndex, Listing, TextLengths, assemble,
                                          carve_val, natural_key, video_files)
from avr.extract.datasets.vatex import ANNOTATIONS as VATEX_ANNOTATIONS
from avr.extract.datasets.vatex import youtube_id

ADAPTERS: dict[str, Adapter] = {adapter.name: adapter for adapter in (
    vatex.ADAPTER, msrvtt.ADAPTER, generic.ADAPTER, generic.DEMO_ADAPTER, lsmdc.ADAPTER,
    charades.ADAPTER, didemo.ADAPTER, msvd.ADAPTER, activitynet.ADAPTER)}
DATASETS = tuple(ADAPTERS)

__all__ = ["ADAPTERS", "DATASETS", "MISSING_WARNING_FRACTION", "PARAGRAPH_TOKENS", "PARAGRAPHS",
           "SENTENCE_TOKENS", "SENTENCES", "VATEX_ANNOTATIONS", "VIDEO_DIR", "VIDEO_EXTENSIONS",
           "Adapter", "Caption", "DatasetFacts", "DatasetIndex", "Listing", "TextLengths",
           "adapter_of", "carve_val", "default_root", "facts_of", "layout_of", "load_dataset",
           "natural_key", "video_files", "youtube_id"]


def default_root(name: str) -> Path:
    return Path("data") / name


def adapter_of(name: str) -> Adapter:
    if name not in ADAPTERS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return ADAPTERS[name]


def load_dataset(name: str, root: Path | None = None, *, videos_dir: str | Path | None = None,
                 **options) -> DatasetIndex:
    """Index dataset ``name`` under ``root`` (default ``data/<name>``), its videos under
    ``videos_dir`` (relative to ``root``, or absolute) or the release's usual folders.

    ``seed`` (the extraction seed) is accepted for every dataset; only generic and demo use
    it, since the other datasets' splits are fixed by their files.
    """
    adapter = adapter_of(name)
    unknown = sorted(set(options) - set(adapter.options) - {"seed"})
    if unknown:
        raise DatasetError(f"dataset {name!r} takes no option {', '.join(unknown)}; "
                           f"its options: {', '.join(adapter.options) or 'none'}")
    if "seed" not in adapter.options:
        options.pop("seed", None)
    root = Path(root) if root is not None else default_root(name)
    return assemble(adapter, root, adapter.read(root, **options), videos_dir)


def layout_of(name: str) -> str:
    """The documented file layouts and defaults of dataset ``name`` (for --show-layout)."""
    return adapter_of(name).describe()


def facts_of(name: str) -> DatasetFacts:
    """Frames, caption protocol, audio and split sizes of dataset ``name``."""
    return adapter_of(name).facts
