"""Derived data: the per-frame row schema shared by the pipeline, the store, queries and
adaptive scanning."""

from .schema import (
    CORE_COLUMNS,
    OPTIONAL_FLOATS,
    FLAG_COLUMN,
    SCHEMA_VERSION,
    UNBINNED_BIN,
    UNPROCESSED_BIN,
    DerivedSchema,
    latent_column,
    noise_column,
)

__all__ = [
    "CORE_COLUMNS",
    "OPTIONAL_FLOATS",
    "FLAG_COLUMN",
    "SCHEMA_VERSION",
    "UNBINNED_BIN",
    "UNPROCESSED_BIN",
    "DerivedSchema",
    "latent_column",
    "noise_column",
]
