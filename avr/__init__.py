"""avr: an offline feature cache and fusion trainer for audio-enhanced text-to-video retrieval."""

__version__ = "0.1.0"
