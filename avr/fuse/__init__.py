"""Stage two: Zarr store -> trained fusion head."""
