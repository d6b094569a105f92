"""DerivedStore / DerivedRunWriter against a real Tiled (in-process app and loopback server)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from gisaxs_bluesky.store import DERIVED_SPEC, TABLE_KEY, DerivedStore, read_derived

MODEL = {"name": "dae", "version": "1.2", "sha256": "ab" * 32}
BINNER = {"kind": "kmeans", "n_bins": 8, "seed": 0}
KINDS = ["poisson", "gaussian", "hot_pixel"]
LATENT = 4


def make_rows(seq_nums, *, seed=0, structure=None) -> dict[str, np.ndarray]:
    """Deterministic rows for the given seq_nums."""
    seq = np.asarray(seq_nums, dtype=np.int64)
    n = len(seq)
    rng = np.random.default_rng(seed + int(seq[0]) if n else seed)
    rows = {
        "seq_num": seq,
        "time": 1.7e9 + seq.astype(np.float64),
        "latent": rng.normal(size=(n, LATENT)).astype(np.float32),
        "bin_id": (seq % 3).astype(np.int64),
        "outlier_score": rng.random(n).astype(np.float32),
        "is_outlier": seq % 5 == 0,
        "recon_error": rng.random(n).astype(np.float32),
        "noise_prob": rng.dirichlet(np.ones(len(KINDS)), size=n).astype(np.float32),
        "x": seq * 0.5,
        "th": np.full(n, 0.12),
        "radius_nm": np.full(n, 3.5),
    }
    if structure is not None:
        rows["structure"] = np.array([structure] * n)
    return rows


def concat(*chunks):
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def open_writer(store, raw_uid="raw-uid-1", **kw):
    return store.open(raw_uid, scan_id=7, model=MODEL, binner=BINNER, latent_dim=LATENT,
                      noise_kinds=KINDS, motors=["x", "th"], **kw)


def assert_matches(ds, rows):
    order = np.argsort(rows["seq_num"])
    np.testing.assert_array_equal(ds["seq_num"].values, rows["seq_num"][order])
    np.testing.assert_array_equal(ds["latent"].values, rows["latent"][order])
    np.testing.assert_array_equal(ds["noise_prob"].values, rows["noise_prob"][order])
    for k in ("time", "bin_id", "outlier_score", "is_outlier", "recon_error", "x", "th",
              "radius_nm"):
        np.testing.assert_array_equal(ds[k].values, rows[k][order], err_msg=k)


@pytest.fixture
def store(tiled_client, tmp_path):
    return DerivedStore(tiled_client, backup_dir=tmp_path / "backup")


def test_three_chunks_read_back_identically(store, tiled_client):
    w = open_writer(store, extra_metadata={"sample": "AuNP-1"})
    chunks = [make_rows(range(0, 4)), make_rows(range(4, 9)), make_rows(range(9, 12))]
    w.append(chunks[0])
    # visible to another reader while "running"
    live = tiled_client["gisaxs_derived"][w.key][TABLE_KEY].read()
    assert sorted(live["seq_num"]) == [0, 1, 2, 3]
    w.append(chunks[1])
    w.append(chunks[2])
    w.finish("complete")
    rows = concat(*chunks)

    node = tiled_client["gisaxs_derived"][store.node_key("raw-uid-1", MODEL)]
    assert w.key == "raw-uid-1-dae-1.2"
    assert [s.name for s in node.specs] == [DERIVED_SPEC]
    ds = read_derived(node)
    assert ds.sizes == {"frame": 12, "latent_dim": LATENT, "noise_kind": 3}
    assert ds["latent"].dtype == np.float32 and ds["is_outlier"].dtype == bool
    assert list(ds["noise_kind"].values) == KINDS
    assert_matches(ds, rows)
    assert np.isnan(ds["distance_nm"].values).all()
    assert_matches(w.read(), rows)

    md = node.metadata
    assert md["raw_uid"] == "raw-uid-1" and md["scan_id"] == 7
    assert md["model"] == MODEL and md["model_id"] == "dae-1.2"
    assert md["binner"] == BINNER and md["latent_dim"] == LATENT
    assert md["noise_kinds"] == KINDS and md["motors"] == ["x", "th"]
    assert md["status"] == "complete" and md["sample"] == "AuNP-1"
    assert md["n_frames"] == 12
    assert md["bin_summary"] == {"ids": [0, 1, 2], "counts": [4, 4, 4]}
    assert md["bin_counts"] == {"0": 4, "1": 4, "2": 4}
    assert md["outlier_count"] == 3 and md["has_outliers"] is True  # seq 0, 5, 10
    assert md["created"] <= md["updated"] <= time.time()


def test_reappend_and_reopen_give_no_duplicates(store, tiled_client):
    w = open_writer(store)
    w.append(make_rows(range(0, 5)))
    w.append(make_rows(range(0, 5)))  # exact replay
    w.append(make_rows(range(3, 8)))  # overlap: only 5, 6, 7 are new
    assert w.stored_seq_nums == set(range(8))

    w2 = open_writer(DerivedStore(tiled_client, backup_dir=store.backup_dir))  # resume
    assert w2.key == w.key and w2.stored_seq_nums == set(range(8))
    w2.append(make_rows(range(0, 10)))
    ds = w2.read()
    np.testing.assert_array_equal(ds["seq_num"].values, np.arange(10))
    expected = concat(make_rows(range(0, 5)), make_rows(range(3, 8)), make_rows(range(0, 10)))
    # first writer of each seq_num wins
    first = {}
    for i, s in enumerate(expected["seq_num"]):
        first.setdefault(int(s), i)
    idx = [first[s] for s in range(10)]
    np.testing.assert_array_equal(ds["latent"].values, expected["latent"][idx])
    assert w2.node.metadata["n_frames"] == 10


def test_bin_summary_follows_rows_at_most_every_summary_interval(tiled_client, tmp_path):
    store = DerivedStore(tiled_client, backup_dir=tmp_path / "backup", summary_interval=3600)
    w = open_writer(store)

    def metadata():  # a fresh read (a client node keeps the metadata it was fetched with)
        return tiled_client["gisaxs_derived"][w.key].metadata

    w.append(make_rows(range(0, 4)))  # the first summary goes out at once
    assert metadata()["n_frames"] == 4
    w.append(make_rows(range(4, 8)))  # rows stored, summary held back (one write saved)
    w.append(make_rows(range(8, 12)))
    assert len(w.read()["seq_num"]) == 12
    md = metadata()
    assert md["n_frames"] == 4 and md["bin_summary"] == {"ids": [0, 1, 2], "counts": [2, 1, 1]}
    w.flush()  # brings it up to date
    md = metadata()
    assert md["n_frames"] == 12 and md["bin_summary"] == {"ids": [0, 1, 2], "counts": [4, 4, 4]}
    w.append(make_rows(range(12, 16)))
    w.finish("complete")
    assert metadata()["n_frames"] == 16 and metadata()["status"] == "complete"

    every = DerivedStore(tiled_client, backup_dir=tmp_path / "backup", summary_interval=0)
    w2 = open_writer(every, raw_uid="raw-uid-2")
    for a in (0, 4, 8):
        w2.append(make_rows(range(a, a + 4)))
        assert tiled_client["gisaxs_derived"][w2.key].metadata["n_frames"] == a + 4
    with pytest.raises(ValueError, match="summary_interval"):
        DerivedStore(tiled_client, backup_dir=tmp_path / "backup", summary_interval=-1)


def test_structure_int_roundtrip_and_update_metadata(store):
    w = open_writer(store)
    w.append(make_rows(range(3), structure=2))
    w.update_metadata(bin_summary={"ids": [9], "counts": [3]}, note="manual")
    w.record_error("model NaN at seq 1")
    ds = w.read()
    assert ds["structure"].dtype.kind == "i" and (ds["structure"].values == 2).all()
    md = w.node.metadata
    assert md["bin_summary"] == {"ids": [9], "counts": [3]} and md["note"] == "manual"
    assert md["errors"] == ["model NaN at seq 1"] and md["status"] == "running"
    with pytest.raises(ValueError, match="structure"):
        w.append(make_rows(range(3, 5), structure="fcc"))
    with pytest.raises(ValueError, match="status"):
        w.finish("done")


def test_record_error_is_bounded(store):
    w = open_writer(store)
    for i in range(52):
        w.record_error(f"err {i}" + "x" * 3000)
    errs = w.node.metadata["errors"]
    assert len(errs) == 50 and errs[0].startswith("err 2") and errs[-1].startswith("err 51")
    assert len(errs[-1]) == 2000


BAD_ROWS = [
    (lambda r: r.pop("bin_id"), "bin_id"),
    (lambda r: r.pop("x"), "x"),
    (lambda r: r.__setitem__("recon_error", r["recon_error"][:-1]), "recon_error"),
    (lambda r: r.__setitem__("latent", r["latent"][:, :2]), "latent"),
    (lambda r: r.__setitem__("noise_prob", r["noise_prob"][:, :1]), "noise_prob"),
    (lambda r: r.__setitem__("outlier_score", np.array(["a", "b", "c"])), "outlier_score"),
    (lambda r: r.__setitem__("seq_num", np.array([0.5, 1.5, 2.5])), "seq_num"),
    (lambda r: r.__setitem__("is_outlier", np.array([0.1, 0.2, 0.3])), "is_outlier"),
]


def test_bad_rows_raise_value_error_naming_column(store):
    w = open_writer(store)
    for mutate, column in BAD_ROWS:
        rows = make_rows(range(3))
        mutate(rows)
        with pytest.raises(ValueError, match=repr(column)):
            w.append(rows)
    assert w.stored_seq_nums == set()
    assert w.node.metadata["n_frames"] == 0


def test_server_stopped_mid_write_then_flushed(tiled_server, tmp_path, caplog):
    backup = tmp_path / "backup"
    store = DerivedStore(tiled_server.client(), backup_dir=backup)
    w = open_writer(store)
    c1, c2, c3, c4 = (make_rows(range(a, a + 4)) for a in (0, 4, 8, 12))
    w.append(c1)

    tiled_server.stop()
    t0 = time.monotonic()
    w.append(c2)  # must not raise, must not hang in client retries
    w.append(c2)  # replay while down: still no duplicate
    w.update_metadata(note="offline")
    w.record_error("tiled down")
    w.finish("complete")
    assert time.monotonic() - t0 < 10
    assert "unreachable" in caplog.text
    assert w.pending_rows == 4 and list(backup.glob("*/chunk-*.npz"))

    tiled_server.start()
    w.append(c3)  # next append re-sends the backup first
    assert w.stored_seq_nums == set(range(12))

    tiled_server.stop()
    w.append(c4)
    tiled_server.start()
    # a fresh process: new client + store, only the backup dir is shared
    fresh = DerivedStore(tiled_server.client(), backup_dir=backup)
    assert fresh.flush_backups() == 4
    assert fresh.flush_backups() == 0
    assert not list(backup.glob("*/chunk-*.npz"))

    node = tiled_server.client()["gisaxs_derived"][w.key]
    ds = read_derived(node)
    assert_matches(ds, concat(c1, c2, c3, c4))
    md = node.metadata
    assert md["n_frames"] == 16 and md["note"] == "offline" and md["status"] == "complete"
    assert "tiled down" in md["errors"]


def test_open_while_server_down_creates_node_later(tiled_server, tmp_path):
    backup = tmp_path / "backup"
    client = tiled_server.client()
    store = DerivedStore(client, backup_dir=backup)
    tiled_server.stop()
    w = open_writer(store, raw_uid="late-uid")
    assert not w.connected
    w.append(make_rows(range(3)))
    tiled_server.start()
    w.finish()
    ds = read_derived(tiled_server.client()["gisaxs_derived"][w.key])
    np.testing.assert_array_equal(ds["seq_num"].values, [0, 1, 2])
    assert ds.attrs["status"] == "complete" and ds.attrs["raw_uid"] == "late-uid"


def test_rows_stored_twice_by_two_hosts_read_back_once(store, tiled_client):
    """Two writers without a shared lock (two hosts) both append seq_nums 0-3: the table holds
    duplicates, readers and a reopened writer count each seq_num once, the first row wins."""
    a, b = open_writer(store), open_writer(store)
    first, second = make_rows(range(4), seed=1), make_rows(range(4), seed=2)
    a.append(first)
    b.append(second)  # b read the stored seq_nums before a wrote: it writes them again
    assert len(tiled_client["gisaxs_derived"][a.key][TABLE_KEY].read()) == 8
    again = open_writer(store)
    assert again.duplicate_rows == 4 and again.stored_seq_nums == set(range(4))
    again.flush()
    ds = read_derived(tiled_client["gisaxs_derived"][a.key])
    assert_matches(ds, first)
    assert ds.attrs["n_frames"] == 4


def test_node_lock_is_exclusive_between_writers(store):
    one, two = store.node_lock("k"), store.node_lock("k")
    assert one.acquire() and not two.acquire(timeout=0.1)
    assert "pid" in two.holder()
    one.release()
    assert two.acquire() and store.node_lock("other").acquire()
    two.release()


def test_fault_messages_name_what_tiled_answered():
    import httpx

    from gisaxs_bluesky.store import describe_fault, is_refused, is_server_fault

    request = httpx.Request("GET", "http://tiled/api/v1/metadata/x?api_key=SECRET")

    def status(code):
        return httpx.HTTPStatusError("x", request=request, response=httpx.Response(code))

    assert "refused the API key (HTTP 401" in describe_fault(status(401))
    assert "no write permission" in describe_fault(status(403))
    assert "server error (HTTP 500)" in describe_fault(status(500))
    assert "unreachable" in describe_fault(httpx.ConnectError("refused", request=request))
    assert is_refused(status(401)) and is_refused(status(403)) and not is_refused(status(500))
    assert is_server_fault(status(503)) and not is_server_fault(status(401))
    assert all("SECRET" not in describe_fault(status(c)) for c in (401, 403, 500))
