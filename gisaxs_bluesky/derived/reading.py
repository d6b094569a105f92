"""A derived node read back as an ``xarray.Dataset``."""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from .schema import FLAG_COLUMN, TABLE_KEY, DerivedSchema

__all__ = ["read_derived"]


def read_derived(node: Any) -> xr.Dataset:
    """Derived node (container client or its frames table) -> Dataset sorted by seq_num."""
    if hasattr(node, "append_partition"):  # the table itself
        container, table = node, node
    else:
        container, table = node, node[TABLE_KEY]
    md = dict(container.metadata)
    df = table.read().sort_values("seq_num", kind="stable")
    # a seq_num stored twice (two writers at once on different hosts): the first row wins,
    # as for a writer's own re-appends
    df = df[~df["seq_num"].duplicated()].reset_index(drop=True)
    latent_dim = int(md.get("latent_dim", sum(c.startswith("latent_") for c in df.columns)))
    kinds = list(md.get("noise_kinds", []))
    motors = list(md.get("motors", []))
    schema = DerivedSchema.for_table(latent_dim, kinds, motors, list(df.columns))
    rows = schema.rows_from_table(df, md.get("structure_kind"))
    data_vars: dict[str, Any] = {
        name: ("frame", rows[name]) for name in
        ("time", "bin_id", "outlier_score", "is_outlier", "recon_error", "structure",
         "radius_nm", "distance_nm", FLAG_COLUMN, *motors)}
    data_vars["latent"] = (("frame", "latent_dim"), rows["latent"])
    data_vars["noise_prob"] = (("frame", "noise_kind"), rows["noise_prob"])
    return xr.Dataset(
        data_vars,
        coords={
            "seq_num": ("frame", rows["seq_num"]),
            "noise_kind": ("noise_kind", kinds),
            "latent_dim": ("latent_dim", np.arange(latent_dim)),
        },
        attrs=md,
    )
