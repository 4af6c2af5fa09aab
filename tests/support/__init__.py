"""Helpers the tests share: generated media and stores, the console script, kill harnesses."""
