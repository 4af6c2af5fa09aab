"""avr: an offline feature cache and fusion trainer for audio-enhanced text-to-video retrieval.

The Python API (``avr.train``, ``avr.evaluate``, ``avr.search``, ``avr.sweep``) is
``avr.api``'s, imported when first used so that ``import avr`` stays light."""

__version__ = "0.1.0"

API = ("train", "evaluate", "search", "sweep")


def __getattr__(name: str):
    if name in API:
        from avr import api

        return getattr(api, name)
    raise AttributeError(f"module 'avr' has no attribute {name!r}")
