"""Replay of many runs on a Dask cluster (one model load per worker)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..models import load_model
from ..store import DerivedStore
from .batch import connect
from .one_run import _replay_run_callback, replay_run
from .options import ReplayOptions, RunSummary


def _worker_replay(
    uri: str, api_key: str | None, uid: str, options: ReplayOptions,
    target_uri: str | None = None,
) -> dict[str, Any]:
    """Dask task: own Tiled client and model per worker process; returns a summary dict."""
    try:
        catalog = connect(uri, api_key)
        target = connect(target_uri, api_key) if target_uri else catalog
        encoder = load_model(options.model, options.device)

        store = DerivedStore(target, root=options.root, backup_dir=options.backup_dir)
        if options.method == "callback":
            s = _replay_run_callback(catalog, uid, encoder=encoder, target=target,
                                     options=options)
        else:
            s = replay_run(catalog, uid, encoder=encoder, store=store, options=options)
    except Exception as exc:  # noqa: BLE001 - reported, batch goes on
        s = RunSummary(uid=uid, status="failed",
                       errors=[f"run {uid}: {type(exc).__name__}: {exc}"])
    out = s.to_dict()
    out["worker_pid"] = os.getpid()
    return out


def replay_distributed(
    uri: str,
    uids: Sequence[str],
    *,
    api_key: str | None = None,
    options: ReplayOptions | None = None,
    scheduler: str | None = None,
    n_workers: int = 2,
    threads_per_worker: int = 1,
    target_uri: str | None = None,
    show_progress: bool = True,
) -> list[RunSummary]:
    """Fan runs out over Dask: a LocalCluster of ``n_workers`` processes, or ``scheduler``.

    Each worker opens its own Tiled client (``uri`` + ``api_key``), loads the model once and
    writes its runs' derived nodes.  Summaries come back in ``uids`` order.
    """
    from dask.distributed import Client, LocalCluster, as_completed
    from tqdm.auto import tqdm

    options = options or ReplayOptions()
    cluster = None
    # set_as_default=False: otherwise every dask computation in this process (a Tiled server
    # in the same process computes its arrays with dask) goes to the cluster whose workers are
    # waiting on that very server, and the reads time out
    if scheduler:
        client = Client(scheduler, set_as_default=False)
    else:
        env = {"PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parent.parent),
             *filter(None, [os.environ.get("PYTHONPATH")])])}
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                               processes=True, dashboard_address=None,
                               env=env)
        client = Client(cluster, set_as_default=False)
    try:
        futures = {
            client.submit(_worker_replay, uri, api_key, uid, options, target_uri, pure=False,
                          key=f"replay-{uid}-{i}"): i
            for i, uid in enumerate(uids)
        }
        results: dict[int, RunSummary] = {}
        with tqdm(total=len(futures), unit="run", desc="replay",
                  disable=not show_progress, leave=False) as bar:
            for fut in as_completed(futures, loop=client.loop):
                i = futures[fut]
                try:
                    d = fut.result()
                    d.pop("worker_pid", None)
                    results[i] = RunSummary(**d)
                except Exception as exc:  # noqa: BLE001 - worker died etc.
                    results[i] = RunSummary(uid=uids[i], status="failed",
                                            errors=[f"run {uids[i]}: worker failed: {exc}"])
                bar.update(1)
        return [results[i] for i in range(len(uids))]
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


# ------------------------------------------------------------------------------------ CLI
