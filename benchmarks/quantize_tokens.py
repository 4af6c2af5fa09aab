"""int8 residency of cached tokens: resident bytes against fp16 and cosine fidelity, per array,
on VATEX-shaped tokens from the store generator (``avr bench store``'s features), and the speed
of quantizing and dequantizing them on this machine.

    python benchmarks/quantize_tokens.py                 # 64 videos, every float video array
    python benchmarks/quantize_tokens.py --videos 256
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from avr.extract.generated import (GeneratedEncoder, GeneratorSettings, Vocabulary,
                                   generated_spec, make_plan)
from avr.store import schema
from avr.store.quantize import cosine_fidelity, quantize

ARRAYS = (schema.FRAME_EMBEDDINGS, schema.AUDIO_PATCH_TOKENS, schema.AUDIO_TIME_TOKENS,
          schema.AUDIO_GLOBAL_TOKENS, schema.swin_level(0), schema.swin_level(1),
          schema.swin_level(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    settings = GeneratorSettings(videos=args.videos, seed=args.seed, val_videos=1, test_videos=1)
    spec = generated_spec(args.seed)
    encoder = GeneratedEncoder(spec, args.seed)
    tokens = encoder.encode_videos(make_plan(settings), Vocabulary(args.videos, args.seed),
                                   np.arange(args.videos), ARRAYS)
    print(f"{args.videos} generated VATEX-shaped videos, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'array':<22}{'fp16 MB':>10}{'int8 MB':>10}{'ratio':>8}{'cos mean':>11}"
          f"{'cos p0.1%':>11}{'cos min':>10}{'quant GB/s':>12}{'deq GB/s':>10}")
    total16 = total8 = 0
    for name in ARRAYS:
        x = tokens[name].half()
        start = time.perf_counter()
        q = quantize(x)
        quantize_s = time.perf_counter() - start
        start = time.perf_counter()
        q.dequantize()
        dequantize_s = time.perf_counter() - start
        f = cosine_fidelity(x, q)
        fp16 = x.numel() * 2
        total16 += fp16
        total8 += q.nbytes()
        print(f"{name:<22}{fp16 / 1e6:>10.1f}{q.nbytes() / 1e6:>10.1f}{f['bytes_vs_fp16']:>8.3f}"
              f"{f['cosine_mean']:>11.6f}{f['cosine_p001']:>11.6f}{f['cosine_min']:>10.6f}"
              f"{fp16 / quantize_s / 1e9:>12.2f}{fp16 / dequantize_s / 1e9:>10.2f}")
    print(f"{'all token arrays':<22}{total16 / 1e6:>10.1f}{total8 / 1e6:>10.1f}"
          f"{total8 / total16:>8.3f}")


if __name__ == "__main__":
    main()
