"""Where a sweep's points run: this machine's threads, or a dask.distributed cluster.

The runner (:func:`rephelpers.runner.run_spec`) decides *what* runs: the shared stages once,
then every grid point's own stages, each point skipped when its ``status.json`` already says
done with the same parameters, a failing point recorded while the others go on. An engine
decides only *where*. Both engines execute the same task, :func:`rephelpers.runner.run_point_task`,
so a point gives the same artifacts whichever runs it.

``local``
    ``--jobs N`` threads on this machine, each watching one papermill child.
``dask``
    Each point is one task on a ``dask.distributed`` cluster: a :class:`distributed.LocalCluster`
    of ``--jobs`` single-threaded worker processes by default, an existing scheduler with
    ``--scheduler tcp://host:8786``, or any cluster a :class:`distributed.Client` reaches
    (dask-jobqueue's ``SLURMCluster``/``PBSCluster`` on HPC; see the README). Dask was chosen
    over Ray because its batch-system adapters (dask-jobqueue) and its scheduler need no
    extra service and install from PyPI on a login node, and because a sweep point is a
    coarse, independent task, which is what ``Client.submit`` schedules best.

How many threads each point's kernel may use (:func:`threads_per_job`, :data:`THREAD_ENV`)
lives here too: both the runner (local points) and a dask worker (its own machine) need it,
and the runner imports this module, never the other way round.

Workers must see the same paths as the submitting process: the project (its
``notebooks/``), the run directory (``--runs-root``) and ``$REPHELPERS_CACHE`` on a shared
file system. A worker that dies mid-point leaves the point's status at ``running``;
dask re-submits the task to another worker (and a later re-run redoes it), and the
papermill child of the dead worker stops itself when it sees its parent gone.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Any

from .errors import RephelpersError, require

ENGINES = ("local", "dask")
SCHEDULER_TIMEOUT = "30s"
"""How long to try reaching ``--scheduler`` before saying it cannot be reached."""
# torch, OpenMP and the BLAS libraries each start one thread per core in every kernel; with
# several notebooks at once they oversubscribe the cores (two stage-02 kernels on 2 cores ran
# at a third of one kernel's speed), so each job gets its share.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """``max(1, cores // jobs)``: the threads each of ``jobs`` concurrent kernels may use."""
    return max(1, (cores or available_cores()) // max(1, jobs))


def kernel_threads(jobs: int) -> dict[str, str]:
    """The thread variables of a kernel that shares this machine with ``jobs - 1`` others:
    ``{var: threads_per_job(jobs)}`` for each of :data:`THREAD_ENV`, a value already set in
    this process's environment kept."""
    share = str(threads_per_job(jobs))
    return {name: os.environ.get(name, share) for name in THREAD_ENV}


def check_engine(engine: str, scheduler: str | None) -> None:
    """Refuse an unknown engine, or a scheduler address without the dask engine, before any work."""
    require(engine in ENGINES, f"unknown engine {engine!r}; choose one of {list(ENGINES)}.")
    require(scheduler is None or engine == "dask",
            f"--scheduler {scheduler} needs --engine dask (the local engine has no scheduler).")
    if engine == "dask":
        try:
            import distributed  # noqa: F401
        except ImportError as err:
            raise RephelpersError(
                "--engine dask needs dask.distributed, which is not installed here: "
                "pip install 'dask[distributed]' (scripts/setup.sh installs it)."
            ) from err


@contextmanager
def dask_client(jobs: int, scheduler: str | None = None, client: Any = None) -> Iterator[Any]:
    """A ``distributed.Client``: ``client`` as given, one connected to ``scheduler``, or a local cluster.

    The local cluster has ``jobs`` worker processes of one thread each (a worker runs one
    point at a time; the point's kernel gets its share of the cores through the thread
    variables the task sets). Whatever this function started, it closes.
    """
    from distributed import Client, LocalCluster

    if client is not None:
        yield client
        return
    if scheduler:
        try:
            connected = Client(scheduler, timeout=SCHEDULER_TIMEOUT)
        except (OSError, TimeoutError) as err:
            raise RephelpersError(
                f"cannot reach a dask scheduler at {scheduler} ({type(err).__name__}: {err}). Start one "
                "(`dask scheduler`, then `dask worker ADDRESS` on each machine, or dask-jobqueue on HPC) "
                "and pass its address, or leave out --scheduler for a local cluster."
            ) from err
        try:
            yield connected
        finally:
            connected.close()
        return
    cluster = LocalCluster(n_workers=max(1, jobs), threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=40)
    connected = Client(cluster)
    try:
        yield connected
    finally:
        connected.close()
        cluster.close()


def run_tasks(
    engine: str,
    task: Callable[..., tuple[str, str]],
    arguments: Sequence[tuple[Any, ...]],
    jobs: int = 1,
    client: Any = None,
    stopped: Callable[[], bool] = lambda: False,
) -> Iterator[tuple[str, str]]:
    """Run ``task(*args)`` for each of ``arguments`` on ``engine``; yield each ``(point, state)`` as it ends.

    With the local engine ``client`` is ignored and ``jobs`` threads run the tasks (each
    watches its own papermill child and stops it when ``stopped()``); with dask, ``client``
    is connected and, once ``stopped()``, every unfinished task is cancelled. A task's
    exception is re-raised here: the task records a notebook's failure itself and returns,
    so an exception means the engine or the runner broke.
    """
    if engine == "local":
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = [pool.submit(task, *args) for args in arguments]
            for future in as_completed(futures):
                yield future.result()
        return
    # pure=False: a re-run submits new tasks instead of reusing a finished one's result
    pending = [client.submit(task, *args, pure=False) for args in arguments]
    try:
        while pending:
            if stopped():
                return
            finished = [f for f in pending if f.done()]
            for future in finished:
                pending.remove(future)
                yield future.result()
            if not finished:
                time.sleep(0.25)
    finally:
        for future in pending:
            future.cancel()


def worker_threads(jobs_on_host: int | None = None) -> int:
    """Threads a point's kernel may use on the machine it runs on: ``$OMP_NUM_THREADS`` where the
    worker was started with it, else this machine's cores over ``jobs_on_host`` (default 1)."""
    preset = os.environ.get("OMP_NUM_THREADS")
    return int(preset) if preset and preset.isdigit() else threads_per_job(jobs_on_host or 1)


__all__ = ["ENGINES", "THREAD_ENV", "available_cores", "check_engine", "dask_client", "kernel_threads", "run_tasks",
           "threads_per_job", "worker_threads"]
