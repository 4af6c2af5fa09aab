"""Stage one: media -> frozen backbone tokens -> Zarr store."""
