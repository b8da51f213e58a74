"""Where the data stages run their per-shard jobs: a local process pool, or Ray (a local Ray, or a cluster at
RAY_ADDRESS). Either way the jobs' results come back in job order, so outputs are byte-identical whatever the
engine, the number of workers or of nodes (tests/unit/test_engine.py checks this on a two-node Ray cluster).

The engine is chosen by the environment (llmops.common.env.data_engine), not params.yaml: where work runs does not
change what it computes, so switching engines re-runs no DVC stage. On a cluster every node must see the shard
paths (a shared filesystem) and have llmops installed; results travel back through Ray's object store.

Measured on a 2-core machine (benchmarks/bench_scale.py --engine both): a local Ray costs about 4 s of start-up and 1 GB of
memory (10 processes) before any work and gives no speed-up over a process pool, so the process pool is the default
on one machine and Ray is what spreads the same jobs over many.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from llmops.common import env
from llmops.common.errors import ConfigError
from llmops.common.progress import progress


def map_jobs(fn: Callable[..., Any], jobs: Sequence[tuple], *, workers: int = 0, desc: str = "") -> list[Any]:
    """fn(*job) for every job, results in job order. `workers` bounds local parallelism (0 = one per core)."""
    if not jobs:
        return []
    if env.data_engine() == "ray":
        return _ray_map(fn, jobs, workers, desc)
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    if workers <= 1:
        return [fn(*job) for job in progress(jobs, desc=desc, unit="shard")]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        return [f.result() for f in progress(futures, desc=desc, unit="shard")]


def ray_init(workers: int = 0) -> None:
    """Connect to RAY_ADDRESS, or start a local Ray with `workers` CPUs (0 = all), once per process."""
    import ray

    if ray.is_initialized():
        return
    address = env.ray_address() or None
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address is None:
        kwargs["num_cpus"] = workers or os.cpu_count() or 1
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        raise ConfigError(f"${env.RAY_ADDRESS}={address!r}: cannot reach the Ray cluster ({exc}). Start it (`ray start --head`) or unset the variable.") from None


def _ray_map(fn: Callable[..., Any], jobs: Sequence[tuple], workers: int, desc: str) -> list[Any]:
    import ray

    ray_init(workers)
    remote = ray.remote(num_cpus=1, max_retries=2, scheduling_strategy="SPREAD")(fn)  # over every node, not the driver's first
    refs = [remote.remote(*job) for job in jobs]
    return [ray.get(ref) for ref in progress(refs, desc=f"{desc} (ray)", unit="shard")]
