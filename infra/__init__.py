"""Infra: what the pipeline stands on (settings, storage, contracts, Dask) plus deployment files."""
