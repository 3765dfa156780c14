"""Where the runs of a study execute: in this process, a local process pool, or submitit.

* ``local`` with ``workers=1``: one run after another in this process.
* ``local`` with ``workers=N``: a pool of N spawned processes. On the CPU each worker
  uses one thread (N workers on N cores beat one worker with N threads for small
  models); when GPUs are visible the workers take them round robin through
  ``CUDA_VISIBLE_DEVICES`` (worker i sees GPU i mod #GPUs).
* ``slurm``: ``submitit.AutoExecutor(cluster="slurm")``, one array job per pending run,
  with the study's ``[executor]`` parameters (``timeout_min``, ``gpus_per_node``,
  ``slurm_partition``, ...), the way sweeps are usually launched on clusters.
* ``submitit-local`` / ``submitit-debug``: submitit's LocalExecutor (subprocesses) and
  DebugExecutor (in-process), used by the tests to exercise the submitit path.

The unit of work is :func:`sharpscope.study.runner.run_job` ``(study_dir, run_id)``.
"""

from __future__ import annotations

import functools
import os
import signal
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import SharpscopeError, first_line

EXECUTORS = ("local", "slurm", "submitit-local", "submitit-debug")
Log = Callable[[str], None]


def _describe(status: dict[str, Any]) -> str:
    state = status.get("state")
    seconds = status.get("seconds")
    timing = f" ({seconds:.1f} s)" if isinstance(seconds, (int, float)) else ""
    if state == "done":
        return f"done{timing}"
    return f"{state}: {status.get('error', '')}{timing}"


def _worker_init(counter: Any, gpus: list[str], show_warning: Any = None) -> None:
    """Pin a pool worker: one CPU thread, or the next GPU round robin; show warnings as
    the study's process does (``show_warning``: its ``warnings.showwarning``, e.g. the
    command line's one-line format); and end it when the study's process is gone.

    A worker ignores SIGINT: a terminal's Ctrl-C goes to the whole process group, and a
    worker waiting for its next run printed a KeyboardInterrupt traceback. The study's
    process takes the Ctrl-C and stops the workers (SIGTERM, :func:`_stop_workers`); a
    run cut off that way resumes from its checkpoint."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if show_warning is not None:
        warnings.showwarning = show_warning
    _exit_with_parent()
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    else:
        import torch

        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"


def _exit_with_parent(every: float = 1.0) -> None:
    """End this worker once its parent process is gone (killed with SIGKILL, or out of
    memory): the pool's workers went on with the queued runs and then idled for good. A
    daemon thread checks the parent's pid every ``every`` seconds; a run cut off this way
    resumes from its checkpoint when the study is run again."""
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def visible_gpus() -> list[str]:
    """GPU ids this process may hand to workers (``CUDA_VISIBLE_DEVICES`` or all)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # pragma: no cover - no CUDA runtime
        return []


def default_workers() -> int:
    """Workers when none are asked for: one per GPU, else one per CPU core.

    Small models train faster as N one-thread processes than as one N-thread process,
    and one thread per process never oversubscribes the cores.
    """
    gpus = visible_gpus()
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    if gpus and has_cuda:
        return len(gpus)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _local_pool(study_dir: str, run_ids: list[str], workers: int, log: Log) -> dict[str, dict]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from .runner import run_job

    context = mp.get_context("spawn")
    counter = context.Value("i", 0)
    outcomes: dict[str, dict] = {}
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_worker_init,
        initargs=(counter, visible_gpus(), warnings.showwarning),
    )
    try:
        futures = {pool.submit(run_job, study_dir, run_id): run_id for run_id in run_ids}
        for number, future in enumerate(as_completed(futures), start=1):
            run_id = futures[future]
            try:
                outcomes[run_id] = future.result()
            except Exception as exc:  # a worker died (e.g. killed for memory)
                outcomes[run_id] = {"state": "error", "error": f"{type(exc).__name__}: {exc}"}
            log(f"[{number}/{len(run_ids)}] {run_id}: {_describe(outcomes[run_id])}")
    except BaseException:
        # Ctrl-C or SIGTERM: stop now. Leaving the pool normally would first run every queued
        # run (a worker takes a Ctrl-C in its run as that run's failure and goes on); the
        # finished runs are on disk, and a rerun resumes the others from their checkpoints.
        pool.shutdown(wait=False, cancel_futures=True)
        _stop_workers()
        raise
    pool.shutdown(wait=True)
    return outcomes


def _stop_workers(grace: float = 10.0) -> None:
    """SIGTERM every child process (the pool's workers), then SIGKILL what is left."""
    import multiprocessing as mp

    children = mp.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(grace)
        if child.is_alive():
            child.kill()


def _submitit(
    study_dir: str, run_ids: list[str], executor: str, options: dict[str, Any], log: Log
) -> dict[str, dict]:
    from .runner import run_job

    folder = Path(study_dir) / "submitit"
    runner, cluster = _auto_executor(folder, executor)
    parameters = {"timeout_min": 60, "name": f"sharpscope-{Path(study_dir).name}"}
    parameters.update(options)
    if cluster != "slurm":
        parameters = {k: v for k, v in parameters.items() if not k.startswith("slurm_")}
    try:
        runner.update_parameters(**parameters)
    except Exception as exc:
        raise SharpscopeError(f"bad [executor] parameters for submitit: {exc}") from exc
    threads = _job_threads(cluster, len(run_ids), parameters)
    job = functools.partial(_run_job_with_threads, threads=threads) if threads else run_job
    jobs = runner.map_array(job, [study_dir] * len(run_ids), run_ids)
    log(f"submitted {len(jobs)} {cluster} jobs (logs in {folder})")
    outcomes: dict[str, dict] = {}
    for number, (run_id, job) in enumerate(zip(run_ids, jobs), start=1):
        try:
            outcomes[run_id] = job.result()
        except Exception as exc:  # the job itself failed (timeout, preemption, killed)
            first = first_line(exc) or type(exc).__name__
            outcomes[run_id] = {"state": "error", "error": f"submitit job failed: {first}"}
        log(f"[{number}/{len(run_ids)}] {run_id}: {_describe(outcomes[run_id])}")
    return outcomes


def _job_threads(cluster: str, num_jobs: int, parameters: dict[str, Any]) -> int | None:
    """CPU threads for each submitit job, or None for torch's default. submitit's
    LocalExecutor starts every job at once, and each took all of the machine's threads
    (6 runs took 10x as long as one after the other): they share the cores out. A Slurm
    job takes its ``cpus_per_task`` when the config gives it."""
    if cluster == "local":
        return max(1, (os.cpu_count() or 1) // num_jobs)
    if cluster == "slurm" and isinstance(parameters.get("cpus_per_task"), int):
        return parameters["cpus_per_task"]
    return None  # submitit-debug runs in this process: its threads are the caller's


def _run_job_with_threads(study_dir: str, run_id: str, threads: int) -> dict[str, Any]:
    """:func:`~sharpscope.study.runner.run_job` in a job process limited to ``threads``."""
    import torch

    from .runner import run_job

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return run_job(study_dir, run_id)


def _auto_executor(folder: Path, executor: str) -> tuple[Any, str]:
    """submitit's executor for ``executor`` writing to ``folder``, and its cluster name;
    one line where the cluster is missing (no ``srun`` for slurm)."""
    import submitit

    cluster = {"slurm": "slurm", "submitit-local": "local", "submitit-debug": "debug"}[executor]
    try:
        return submitit.AutoExecutor(folder=folder, cluster=cluster), cluster
    except Exception as exc:
        raise SharpscopeError(
            f"cannot start the submitit '{cluster}' executor ({exc}); on a machine without "
            "Slurm use --executor local"
        ) from exc


def check_cluster(executor: str) -> None:
    """Whether ``executor``'s cluster can take jobs here, asked before a study folder is
    made (a failed start left an empty study behind)."""
    import tempfile

    if executor != "local":
        with tempfile.TemporaryDirectory() as folder:
            _auto_executor(Path(folder), executor)


def check_executor(executor: str, workers: int) -> None:
    """Raise :class:`SharpscopeError` for an unknown executor or a bad worker count."""
    if executor not in EXECUTORS:
        raise SharpscopeError(
            f"unknown executor '{executor}'; choose one of: {', '.join(EXECUTORS)}"
        )
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SharpscopeError(f"--workers must be a positive integer, got {workers!r}")


def execute(
    study_dir: str,
    run_ids: list[str],
    *,
    workers: int = 1,
    executor: str = "local",
    options: dict[str, Any] | None = None,
    log: Log | None = None,
) -> dict[str, dict[str, Any]]:
    """Run ``run_job(study_dir, run_id)`` for every id; return each run's status.

    Raises:
        SharpscopeError: unknown executor or a bad worker count.
    """
    log = log or (lambda message: None)
    check_executor(executor, workers)
    if not run_ids:
        return {}
    if executor != "local":
        return _submitit(study_dir, run_ids, executor, dict(options or {}), log)
    if workers > 1 and len(run_ids) > 1:
        return _local_pool(study_dir, run_ids, min(workers, len(run_ids)), log)
    from .runner import run_job

    outcomes = {}
    for number, run_id in enumerate(run_ids, start=1):
        log(f"[{number}/{len(run_ids)}] {run_id}: running")
        outcomes[run_id] = run_job(study_dir, run_id)
        log(f"[{number}/{len(run_ids)}] {run_id}: {_describe(outcomes[run_id])}")
    return outcomes
