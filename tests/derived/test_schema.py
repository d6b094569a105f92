"""The derived-row schema: one definition of columns, empty rows and table round trips."""

from __future__ import annotations

import numpy as np
import pytest

from gisaxs_bluesky.derived import UNPROCESSED_BIN, DerivedSchema


def rows(schema: DerivedSchema, n: int = 3) -> dict:
    r = schema.empty_rows(np.arange(n, 0, -1), np.linspace(0, 1, n), {"x": np.arange(n) * 0.5})
    r["latent"] = np.arange(n * schema.latent_dim, dtype=np.float32).reshape(n, -1)
    r["noise_prob"] = np.full((n, len(schema.noise_kinds)), 0.25, np.float32)
    r["bin_id"] = np.array([0, 1, UNPROCESSED_BIN])[:n]
    r["structure"] = np.array(["lamellar", "", "spheres_dilute"], dtype=object)[:n]
    return r


def test_round_trip_through_an_arrow_table_names_noise_columns_by_kind():
    schema = DerivedSchema(4, ("poisson", "gaps"), ("x",))
    assert schema.arrow_schema().names[:6] == ["seq_num", "time", "bin_id", "outlier_score",
                                                "is_outlier", "recon_error"]
    assert "noise_prob_poisson" in schema.arrow_schema().names
    original = rows(schema)
    cols, kind = schema.validate(original)
    assert kind == "str"
    back = schema.rows_from_table(schema.to_arrow(cols).to_pandas())
    order = np.argsort(original["seq_num"])
    assert back["seq_num"].tolist() == [1, 2, 3]
    np.testing.assert_array_equal(back["latent"], original["latent"][order])
    np.testing.assert_array_equal(back["bin_id"], original["bin_id"][order])
    np.testing.assert_array_equal(back["x"], original["x"][order])
    assert back["structure"].tolist() == list(original["structure"][order])


def test_nodes_written_with_index_named_noise_columns_still_read():
    cols = ["seq_num", "noise_prob_0", "noise_prob_1"]
    old = DerivedSchema.for_table(4, ["poisson", "gaps"], ["x"], cols)
    assert old.noise_by_index and old.noise_columns == ["noise_prob_0", "noise_prob_1"]
    new = DerivedSchema.for_table(4, ["poisson", "gaps"], ["x"], ["noise_prob_poisson"])
    assert not new.noise_by_index
    table = old.to_arrow(old.validate(rows(old))[0]).to_pandas()
    np.testing.assert_array_equal(old.rows_from_table(table)["noise_prob"], 0.25)


def test_errors_name_the_column():
    schema = DerivedSchema(4, ("poisson",), ("x",))
    bad = rows(schema)
    bad["latent"] = bad["latent"][:, :3]
    with pytest.raises(ValueError, match=r"column 'latent': expected shape \(n, 4\)"):
        schema.validate(bad)
    del bad["x"]
    with pytest.raises(ValueError, match="missing column 'x'"):
        schema.validate(bad)
    with pytest.raises(ValueError, match="motor name 'bin_id' collides"):
        DerivedSchema(4, (), ("bin_id",))
    with pytest.raises(ValueError, match="noise_kinds must be unique"):
        DerivedSchema(4, ("a", "a"))


def test_flag_column_round_trips_and_nodes_before_1_2_read_and_append_without_it():
    from gisaxs_bluesky.derived import FLAG_COLUMN, SCHEMA_VERSION, UNBINNED_BIN

    assert SCHEMA_VERSION == "1.2" and UNBINNED_BIN == -3
    schema = DerivedSchema(4, ("poisson",), ("x",))
    assert schema.arrow_schema().names[-2:] == [FLAG_COLUMN, "x"]
    r = rows(schema)
    assert r[FLAG_COLUMN].tolist() == ["", "", ""]
    r[FLAG_COLUMN][2] = "geometry: distance_mm missing"
    back = schema.rows_from_table(schema.to_arrow(schema.validate(r)[0]).to_pandas())
    assert back[FLAG_COLUMN].tolist() == ["geometry: distance_mm missing", "", ""]  # seq order
    # a 1.1 table: no flag column, rows still append (without it) and read back with ""
    old = DerivedSchema.for_table(4, ["poisson"], ["x"], ["seq_num", "noise_prob_poisson", "x"])
    assert not old.has_flag and FLAG_COLUMN not in old.arrow_schema().names
    cols, _ = old.validate(r)
    assert FLAG_COLUMN not in cols
    assert old.rows_from_table(old.to_arrow(cols).to_pandas())[FLAG_COLUMN].tolist() == [""] * 3
    # rows a 1.1 writer kept in its local backup go into a 1.2 table with flag ""
    assert schema.to_arrow(cols).column(FLAG_COLUMN).to_pylist() == [""] * 3
    assert not DerivedSchema.from_metadata({"latent_dim": 4, "schema_version": "1.1"}).has_flag
    assert DerivedSchema.from_metadata({"latent_dim": 4, "schema_version": "1.2"}).has_flag
    with pytest.raises(ValueError, match="motor name 'flag' collides"):
        DerivedSchema(4, (), ("flag",))
