"""The feature store: one Zarr v3 group per dataset, and the only package that imports zarr or
fsspec.

- ``schema``: every array name, shape, dtype and attribute (no I/O);
- ``location``: paths and URLs of stores; ``group``: create, open, clear, tell what is there;
- ``read``: the one row reader and the chunk geometry under it; ``chunks``: the chunk decoder;
- ``splits``: a split's rows, loaded (resident or int8, ``quantize``) or left in the store;
- ``integrity``: verify and repair; ``lock``: one writer per store;
- ``info`` and ``export``: `avr cache info`, HDF5 and dask;
- ``_zarr``: the configured zarr module and the few internals avr reads below its public API.
"""
