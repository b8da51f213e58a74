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

import gc
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from itertools import islice
from typing import Any

from llmops.common import env
from llmops.common.errors import ConfigError
from llmops.common.progress import progress


def map_jobs(fn: Callable[..., Any], jobs: Sequence[tuple], *, workers: int = 0, desc: str = "") -> list[Any]:
    """fn(*job) for every job, results in job order. `workers` bounds local parallelism (0 = one per core)."""
    return list(imap_jobs(fn, jobs, workers=workers, desc=desc))


def imap_jobs(fn: Callable[..., Any], jobs: Sequence[tuple], *, workers: int = 0, desc: str = "") -> Iterator[Any]:
    """fn(*job) for every job, yielded in job order as they finish. At most a few jobs per worker are in flight or
    waiting to be taken, so a caller that consumes each result (writes it out) holds a few results, not all of them."""
    if not jobs:
        return
    if env.data_engine() == "ray":
        yield from _ray_imap(fn, jobs, workers, desc)
        return
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    if workers <= 1:
        yield from (fn(*job) for job in progress(jobs, desc=desc, unit="shard"))
        return
    import pyarrow.compute  # noqa: F401  (imported once here, inherited by every forked worker: see _frozen_heap)

    with _frozen_heap(), ProcessPoolExecutor(max_workers=workers) as pool:
        yield from _windowed(lambda job: pool.submit(fn, *job), lambda future: future.result(), jobs, IN_FLIGHT_PER_WORKER * workers, desc)


_frozen = 0  # pools open with the heap frozen (a pool's results may be consumed while another pool runs)


@contextmanager
def _frozen_heap() -> Iterator[None]:
    """gc.freeze() while a process pool forks and runs: the objects the driver holds (the imported libraries: in
    validate, with GX, about 200 MB the workers share) move to GC's permanent generation, so a worker's collections never write to them and the pages
    stay shared with the driver instead of being copied into every worker (copy-on-write). This is the fork recipe of
    the gc module's docs. The workers inherit the driver's modules too, which is why imap_jobs imports pyarrow.compute
    before the pool forks: its first import builds a wrapper per compute function (0.3 s; `Array.take` and `filter`
    import it), which each worker of each pool would otherwise pay. Measured with validate, whose workers fork from a driver that imported GX
    (benchmarks/bench_scale.py --corpora 300mb --synthetic-gb 5 --stages ingest,validate): peak PSS of the stage went
    from 582 MB (300 MB corpus) and 746 MB (5 GB) to 561 MB and 607 MB, because the workers no longer grow by ~60 MB
    each in their first full collections; dedup's time and memory at 5 GB were unchanged (192 s / 534 MB vs 200 s /
    523 MB)."""
    global _frozen
    if not _frozen:
        gc.freeze()  # no gc.collect() first: its full pass over the driver's heap cost more than the pool saved on small inputs; garbage frozen now is collected after the unfreeze
    _frozen += 1
    try:
        yield
    finally:
        _frozen -= 1
        if not _frozen:
            gc.unfreeze()  # the driver's collections cover those objects again


IN_FLIGHT_PER_WORKER = 4  # jobs submitted ahead of the one whose result is awaited, per worker


def _windowed(submit: Callable[[tuple], Any], result: Callable[[Any], Any], jobs: Sequence[tuple], window: int, desc: str) -> Iterator[Any]:
    """Submit jobs `window` ahead of the oldest pending one and yield results in job order."""
    queued = iter(jobs)
    pending: deque[Any] = deque(submit(job) for job in islice(queued, window))

    def in_order() -> Iterator[Any]:
        while pending:
            value = result(pending.popleft())
            pending.extend(submit(job) for job in islice(queued, 1))
            yield value

    yield from progress(in_order(), desc=desc, unit="shard", total=len(jobs))


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


def _ray_imap(fn: Callable[..., Any], jobs: Sequence[tuple], workers: int, desc: str) -> Iterator[Any]:
    import ray

    ray_init(workers)
    remote = ray.remote(num_cpus=1, max_retries=2, scheduling_strategy="SPREAD")(fn)  # over every node, not the driver's first
    window = IN_FLIGHT_PER_WORKER * max(int(ray.cluster_resources().get("CPU", 1)), 1)
    yield from _windowed(lambda job: remote.remote(*job), ray.get, jobs, window, f"{desc} (ray)")
