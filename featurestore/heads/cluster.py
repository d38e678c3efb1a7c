"""Sweeps on a Dask cluster: joblib's dask backend, when a scheduler is given.

``featurestore train-head --scheduler tcp://host:8786`` (or ``DASK_SCHEDULER_ADDRESS`` in the environment,
which the DVC stages inherit) connects a ``distributed.Client`` and runs the C sweep's parallel segments as
tasks on the cluster's workers; the refit of the chosen C and everything else stay local. Without a
scheduler nothing changes (joblib's local processes, or in-process for small sweeps).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import FeaturestoreError

log = logging.getLogger("featurestore")
SCHEDULER_VARIABLE = "DASK_SCHEDULER_ADDRESS"


@contextmanager
def dask_backend(address: str | None = None) -> Iterator[int | None]:
    """Within the block, joblib runs on the Dask cluster at ``address`` (default: ``$DASK_SCHEDULER_ADDRESS``);
    yields the cluster's worker thread count, or None (and changes nothing) without a scheduler."""
    address = address or os.environ.get(SCHEDULER_VARIABLE)
    if not address:
        yield None
        return
    import joblib
    from distributed import Client

    try:
        client = Client(address, timeout="5s")
    except (OSError, TimeoutError) as exc:
        raise FeaturestoreError(f"cannot reach the Dask scheduler at {address} ({exc}); start it, or unset "
                                f"{SCHEDULER_VARIABLE} / drop --scheduler to run locally") from None
    with client:
        threads = sum(client.nthreads().values())
        log.info("sweeping on the Dask cluster at %s (%d worker threads)", address, threads)
        with joblib.parallel_config(backend="dask"):
            yield max(1, threads)
