"""RuntimeConfig: one set of defaults for the callback, serve and replay."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from gisaxs_bluesky.runtime import RuntimeConfig, add_runtime_arguments


def test_defaults_overrides_and_cli_flags(tmp_path):
    d = RuntimeConfig()
    assert (d.root, d.batch_size, d.write_interval) == ("gisaxs_derived", 16, 1.0)
    assert d.spill_path.name == "spill" and d.backup_path.name == "derived_backup"
    c = d.replace(batch_size=4, backup_dir=str(tmp_path), torch_threads=None)
    assert c.batch_size == 4 and c.backup_path == Path(tmp_path) and c.root == "gisaxs_derived"
    assert c.n_torch_threads is None  # None: leave torch as it is
    parser = argparse.ArgumentParser()
    add_runtime_arguments(parser)
    args = parser.parse_args(["--batch-size", "8", "--torch-threads", "2"])
    assert args.root is None  # not given: the default
    cfg = RuntimeConfig.from_args(args)
    assert (cfg.batch_size, cfg.n_torch_threads, cfg.write_interval) == (8, 2, 1.0)


@pytest.mark.parametrize("bad, match", [
    ({"batch_size": 0}, "batch_size=0 must be >= 1"),
    ({"batch_timeout": 0}, "batch_timeout=0 must be > 0"),
    ({"write_interval": -1}, "write_interval=-1 must be >= 0"),
    ({"torch_threads": "many"}, "torch_threads='many'"),
    ({"root": ""}, "root=''"),
])
def test_invalid_settings_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        RuntimeConfig(**bad)
    with pytest.raises(TypeError, match="unknown runtime setting"):
        RuntimeConfig().replace(batchsize=3)
