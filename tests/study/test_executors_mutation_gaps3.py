"""Gaps found by a mutation audit of ``sharpscope/study/executors.py`` (session 25): the
worker count reaches the pool, every run goes once to the right executor, a job or worker
that dies is an error (retried next time, exit 2), never a diverged run, the submitit
parameters are those of the config, and Ctrl-C stops the pool's workers. The pool and
submitit are replaced by fakes here, so these tests take no time."""

from __future__ import annotations

import concurrent.futures
import sys
import threading
import time
import types
from concurrent.futures import Future

import pytest

import sharpscope.study.executors as executors
import sharpscope.study.runner as runner
from sharpscope.errors import SharpscopeError


def _fake_run_job(calls):
    def run_job(study_dir, run_id):
        calls.append((study_dir, run_id))
        return {"state": "done", "seconds": 1.0}

    return run_job


# E1 executors.py execute: `workers > 1` -> `workers > 2` (--workers 2 ran one at a time)
# E2 executors.py execute: `min(workers, len(run_ids))` -> `1` (the pool had one worker)
def test_the_worker_count_reaches_the_pool(monkeypatch):
    pools = []

    def pool(study_dir, run_ids, workers, log):
        pools.append((study_dir, list(run_ids), workers))
        return {run_id: {"state": "done"} for run_id in run_ids}

    monkeypatch.setattr(executors, "_local_pool", pool)
    monkeypatch.setattr(runner, "run_job", _fake_run_job([]))
    executors.execute("d", ["a", "b", "c"], workers=2)
    executors.execute("d", ["a", "b"], workers=5)  # no more workers than runs
    executors.execute("d", ["a"], workers=4)  # one run: in this process
    executors.execute("d", ["a", "b"], workers=1)
    assert pools == [("d", ["a", "b", "c"], 2), ("d", ["a", "b"], 2)]


# E12 executors.py execute: the in-process loop skipped the first run
def test_in_process_every_run_runs_once_in_order(monkeypatch):
    calls, lines = [], []
    monkeypatch.setattr(runner, "run_job", _fake_run_job(calls))
    outcomes = executors.execute("d", ["a", "b", "c"], workers=1, log=lines.append)
    assert calls == [("d", "a"), ("d", "b"), ("d", "c")]
    assert list(outcomes) == ["a", "b", "c"]
    assert all(o["state"] == "done" for o in outcomes.values())
    assert lines[-1] == "[3/3] c: done (1.0 s)"


class _FakePool:
    """ProcessPoolExecutor's surface: each job's outcome comes from a thread, started
    once ``expected`` runs are submitted, the runs finishing in the reverse order of their
    submission; a job named "dies" raises as a worker killed for memory does."""

    made: list = []
    expected = 0

    def __init__(self, max_workers, mp_context=None, initializer=None, initargs=()):
        self.max_workers = max_workers
        self.shutdowns = []
        self.futures = []
        _FakePool.made.append(self)

    def submit(self, fn, study_dir, run_id):
        future = Future()
        self.futures.append((run_id, future))
        if len(self.futures) == _FakePool.expected:  # every run submitted
            threading.Thread(target=self._finish, daemon=True).start()
        return future

    def _finish(self):
        time.sleep(0.2)  # the executor waits on the futures by then
        for run_id, future in reversed(self.futures):
            if run_id == "dies":
                future.set_exception(
                    concurrent.futures.process.BrokenProcessPool("a worker died abruptly")
                )
            else:
                future.set_result({"state": "done", "seconds": 2.0, "run": run_id})
            time.sleep(0.1)

    def shutdown(self, wait=True, cancel_futures=False):
        self.shutdowns.append((wait, cancel_futures))


# E3 executors.py _local_pool: a worker that died recorded as state "failed" (diverged:
#    kept, never retried, and no exit 2) instead of "error"
# E13 executors.py _local_pool: `run_id = futures[future]` -> `run_ids[number - 1]` (each
#    outcome given to the run submitted in the place where it finished)
def test_a_pool_worker_that_died_is_an_error_not_a_diverged_run(monkeypatch):
    _FakePool.made = []
    lines = []
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", _FakePool)
    monkeypatch.setattr(_FakePool, "expected", 3)
    outcomes = executors.execute("d", ["ok", "dies", "last"], workers=2, log=lines.append)
    assert outcomes == {
        "ok": {"state": "done", "seconds": 2.0, "run": "ok"},
        "dies": {"state": "error", "error": "BrokenProcessPool: a worker died abruptly"},
        "last": {"state": "done", "seconds": 2.0, "run": "last"},
    }
    assert lines == [
        "[1/3] last: done (2.0 s)",
        "[2/3] dies: error: BrokenProcessPool: a worker died abruptly",
        "[3/3] ok: done (2.0 s)",
    ]
    (pool,) = _FakePool.made
    assert pool.max_workers == 2 and pool.shutdowns == [(True, False)]


# E11 executors.py _local_pool: on Ctrl-C the workers were not stopped (`_stop_workers()`
# dropped): each went on with its run after the study had stopped
def test_ctrl_c_cancels_the_queue_and_stops_the_workers(monkeypatch):
    _FakePool.made = []
    stopped = []
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", _FakePool)

    def interrupted(futures):
        raise KeyboardInterrupt
        yield  # a generator, as as_completed is

    monkeypatch.setattr(concurrent.futures, "as_completed", interrupted)
    monkeypatch.setattr(executors, "_stop_workers", lambda: stopped.append(True))
    with pytest.raises(KeyboardInterrupt):
        executors.execute("d", ["a", "b"], workers=2)
    (pool,) = _FakePool.made
    assert pool.shutdowns == [(False, True)] and stopped == [True]


class _FakeJob:
    def __init__(self, run_id):
        self.run_id = run_id

    def result(self):
        if self.run_id == "preempted":
            raise RuntimeError("Job 42 was preempted\nmore lines")
        return {"state": "done", "seconds": 3.0}


class _FakeAutoExecutor:
    made: list = []

    def __init__(self, folder, cluster=None):
        self.folder, self.cluster, self.parameters = folder, cluster, None
        _FakeAutoExecutor.made.append(self)

    def update_parameters(self, **parameters):
        self.parameters = parameters

    def map_array(self, fn, dirs, run_ids):
        self.fn = fn
        return [_FakeJob(run_id) for run_id in run_ids]


@pytest.fixture
def fake_submitit(monkeypatch):
    _FakeAutoExecutor.made = []
    monkeypatch.setitem(
        sys.modules, "submitit", types.SimpleNamespace(AutoExecutor=_FakeAutoExecutor)
    )
    return _FakeAutoExecutor.made


# E7 executors.py _submitit: `parameters.update(options)` dropped (the config's [executor]
#    table, e.g. timeout_min and the partition, never reached the jobs)
# E8 executors.py _submitit: `cluster != "slurm"` -> `==` (slurm_* options dropped on Slurm
#    and passed to the local executor)
def test_submitit_parameters_are_the_configs(fake_submitit, tmp_path):
    options = {"timeout_min": 5, "slurm_partition": "gpu", "gpus_per_node": 1}
    study = tmp_path / "my-study"
    executors.execute(str(study), ["a"], executor="slurm", options=options)
    executors.execute(str(study), ["a"], executor="submitit-local", options=options)
    slurm, local = fake_submitit
    assert (slurm.cluster, local.cluster) == ("slurm", "local")
    assert slurm.folder == study / "submitit"
    assert slurm.parameters == {
        "timeout_min": 5,
        "name": "sharpscope-my-study",
        "slurm_partition": "gpu",
        "gpus_per_node": 1,
    }
    assert local.parameters == {"timeout_min": 5, "name": "sharpscope-my-study", "gpus_per_node": 1}


# E9 executors.py _submitit: a job that failed (timeout, preemption) recorded as "failed"
# (diverged: never retried) instead of "error"
def test_a_submitit_job_that_failed_is_an_error_not_a_diverged_run(fake_submitit, tmp_path):
    outcomes = executors.execute(str(tmp_path), ["a", "preempted"], executor="submitit-debug")
    assert outcomes == {
        "a": {"state": "done", "seconds": 3.0},
        "preempted": {"state": "error", "error": "submitit job failed: Job 42 was preempted"},
    }


# E10 executors.py check_executor: `workers < 1` -> `workers < 0` (0 workers accepted)
def test_zero_workers_are_refused():
    with pytest.raises(SharpscopeError, match="--workers must be a positive integer, got 0"):
        executors.check_executor("local", 0)
    executors.check_executor("local", 1)


def test_submitit_jobs_share_out_the_cores_on_this_machine(fake_submitit, tmp_path, monkeypatch):
    """studycfg D5 (session 30): submitit's LocalExecutor starts every job at once and each
    took all of the machine's threads: 6 runs took ~10x as long as one after the other. A
    Slurm job takes its cpus_per_task; the in-process debug executor keeps the caller's."""
    monkeypatch.setattr(executors.os, "cpu_count", lambda: 8)
    executors.execute(str(tmp_path), ["a", "b", "c"], executor="submitit-local")
    executors.execute(str(tmp_path), ["a"] * 16, executor="submitit-local")
    executors.execute(str(tmp_path), ["a"], executor="slurm", options={"cpus_per_task": 4})
    executors.execute(str(tmp_path), ["a"], executor="slurm")
    executors.execute(str(tmp_path), ["a"], executor="submitit-debug")
    local3, local16, slurm4, slurm, debug = fake_submitit
    assert local3.fn.keywords == {"threads": 2} and local16.fn.keywords == {"threads": 1}
    assert local3.fn.func is executors._run_job_with_threads
    assert slurm4.fn.keywords == {"threads": 4}
    assert slurm.fn is runner.run_job and debug.fn is runner.run_job
