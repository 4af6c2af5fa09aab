#!/bin/sh
# The wheels `avr bench gpu` needs on a lent H100/H200 machine beyond what its image holds (the
# image has torch, transformers, timm, typer, rich, numpy, psutil, safetensors, tensorboard; it
# has no zarr, numcodecs, donfig, google-crc32c, open_clip, ftfy, wcwidth or PyAV, and nothing
# can be fetched there). Run here, in the repository's root: the wheels (about 46 MB, for the
# image's Python 3.12) land in .whl/ (git ignores it), which the device tool carries
# (BENCHMARKS.md, "The GPU check"). The versions are those the check was tested with.
set -e
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl \
    zarr==3.1.6 donfig==0.8.1.post1 google-crc32c==1.9.0 numcodecs==0.16.6 \
    open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.5 av==18.1.0
