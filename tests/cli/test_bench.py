"""`avr bench cache --cache STORE`: the read speed of an existing store, wherever it lives."""

from __future__ import annotations

from avr.cli import main
from support.stores import make_learnable_store


def test_bench_cache_reads_the_train_audio_tokens_of_a_given_store(tmp_path, tiny_spec, capsys):
    store = make_learnable_store(tmp_path / "cache", tiny_spec)
    main(["bench", "cache", "--cache", str(store), "--device", "cpu"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"GB {store} -> cpu" in out and "GB/s 48 train videos" in out
