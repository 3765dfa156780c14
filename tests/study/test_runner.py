"""A tiny end-to-end study: training, analyses, results.csv, resumption, failures, formats."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import sharpscope as ss
from sharpscope.analysis.msharpness import m_sharpness
from sharpscope.data import load_data
from sharpscope.errors import SharpscopeError
from sharpscope.evaluation import evaluate
from sharpscope.study import study_config_from_dict
from sharpscope.study.report import write_report
from sharpscope.study.runner import (
    CORE_COLUMNS,
    check_study_dir,
    prepare_study_dir,
    read_results,
    read_study_dir,
    run_study,
)
from sharpscope.study.sweep import expand_sweep

DATA = {"name": "mnist1d", "samples": 256}
TRAIN = {
    "dataset": DATA,
    "model": {"name": "mlp", "width": 16, "depth": 1},
    "epochs": 2,
    "batch_size": 64,
    "device": "cpu",
}
ANALYSIS = {
    "epochs": [1, "last"],
    "samples": 128,
    "spectrum": {
        "k": 5,
        "tol": 1e-3,
        "max_steps": 40,
        "trace_probes": 9,
        "num_probes": 1,
        "num_lanczos_steps": 15,
    },
    "m_sharpness": {"m": [16, 64], "rho": [0.05], "steps": 1},
}


def tiny_config(**overrides):
    sections = {
        "study": {"name": "tiny"},
        "train": dict(TRAIN),
        "sweep": {"optimizer": ["sgd", "sam"], "seed": [0, 1]},
        "analysis": ANALYSIS,
    }
    sections.update(overrides)
    return study_config_from_dict(sections)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    summary = run_study(tiny_config(), out)
    return out, summary


def test_study_trains_analyses_and_tabulates_every_run(study):
    out, summary = study
    assert sorted(summary.done) == ["sam-s0", "sam-s1", "sgd-s0", "sgd-s1"]
    assert not summary.failed and not summary.errors
    rows = read_results(out / "results.csv")
    assert len(rows) == 4 * 2  # runs x analysed checkpoints
    header = next(csv.reader((out / "results.csv").open()))
    for column in ("optimizer", "rho", "seed", *CORE_COLUMNS, "msharp_m16_rho0.05"):
        assert column in header
    for row in rows:
        assert row["status"] == "done"
        assert row["gen_gap"] == pytest.approx(row["train_acc"] - row["test_acc"])
        assert row["loss_gap"] == pytest.approx(row["test_loss"] - row["train_loss"])
        assert row["lambda_max"] >= row["lambda_5"] > 0
        assert row["ratio"] == pytest.approx(row["lambda_max"] / row["lambda_5"])
        assert row["m_sharpness"] == row["msharp_m16_rho0.05"]
        assert (row["rho"] is None) == (row["optimizer"] == "sgd")
    assert {r["epoch"] for r in rows} == {1, 2}


def test_measure_columns_are_ordered_by_the_numbers_in_their_names():
    """String order put m = 128 before m = 16 and m = 8 last in results.csv and the report."""
    from sharpscope.study.report import measure_columns
    from sharpscope.study.runner import _column_order

    names = ["msharp_m128_rho0.05", "msharp_m8_rho0.1", "msharp_m8_rho0.05", "msharp_m16_rho0.05"]
    names += ["keskar_eps0.001", "keskar_eps1e-05", "pac_bayes", "avgsharp_rho0.2"]
    row = dict.fromkeys(reversed(names), 1.0)
    columns = _column_order([row])
    expected = ["avgsharp_rho0.2", "keskar_eps1e-05", "keskar_eps0.001", "msharp_m8_rho0.05"]
    expected += ["msharp_m8_rho0.1", "msharp_m16_rho0.05", "msharp_m128_rho0.05", "pac_bayes"]
    assert [c for c in columns if c in names] == expected
    ordered = [dict.fromkeys(columns, 1.0)] * 3  # rows as read back from results.csv
    assert [c for c in measure_columns(ordered) if c in names] == expected


def test_equal_generalization_gaps_tie_instead_of_being_ranked_by_rounding():
    """0.9 − 0.6 and 0.95 − 0.65 are one gap; as floats they differed and τ-b counted the
    pair as ordered (τ = −1 instead of −0.82)."""
    from sharpscope.analysis.correlation import kendall_tau
    from sharpscope.study.runner import _gaps

    rows = [{"train_acc": a, "test_acc": b} for a, b in ((0.9, 0.6), (0.95, 0.65), (0.8, 0.7))]
    for row in rows:
        _gaps(row)
    gaps = [row["gen_gap"] for row in rows]
    assert gaps[0] == gaps[1] == pytest.approx(0.3)
    assert kendall_tau([1, 2, 3], gaps) == pytest.approx(-math.sqrt(2 / 3))


def test_results_are_read_from_the_study_folder_too(study, tmp_path):
    out, _ = study
    assert read_results(out) == read_results(out / "results.csv")
    with pytest.raises(SharpscopeError, match="results file not found"):
        read_results(tmp_path)


def test_table_numbers_come_from_the_right_checkpoint_and_data(study):
    out, _ = study
    rows = {(r["run_id"], r["epoch"]): r for r in read_results(out / "results.csv")}
    row = rows[("sam-s1", 1)]
    checkpoint = ss.load_checkpoint(out / "runs" / "sam-s1" / "epoch_001.pt")
    assert checkpoint.epoch == 1
    # the analysis subset: 128 training examples, seed 0 shuffle, as configured
    train = load_data(DATA, "train", samples=128, seed=0)
    direct = m_sharpness(checkpoint.model, (train.inputs, train.targets), m=64, rho=0.05)
    assert row["msharp_m64_rho0.05"] == pytest.approx(direct.sharpness, rel=1e-6)
    test = load_data(DATA, "test")
    metrics = evaluate(
        checkpoint.model, test.inputs, test.targets, torch.nn.functional.cross_entropy
    )
    assert row["test_acc"] == pytest.approx(metrics["acc"])
    assert row["test_loss"] == pytest.approx(metrics["loss"], rel=1e-5)


def test_weight_norm_column_is_the_l2_norm_of_the_trainable_weights(study):
    """Each row's weight_norm is ‖θ‖₂ of its checkpoint (a squared norm, or one missing the
    last parameter, passed); frozen parameters do not count."""
    from sharpscope.study.measures import weight_norm

    out, _ = study
    for row in read_results(out / "results.csv"):
        path = out / "runs" / row["run_id"] / f"epoch_{row['epoch']:03d}.pt"
        params = list(ss.load_checkpoint(path).model.parameters())
        flat = torch.cat([p.detach().double().flatten() for p in params])
        assert row["weight_norm"] == pytest.approx(float(flat.norm()), rel=1e-12)
    model = ss.load_checkpoint(path).model
    params = list(model.parameters())
    params[-1].requires_grad_(False)
    flat = torch.cat([p.detach().double().flatten() for p in params[:-1]])
    assert weight_norm(model) == pytest.approx(float(flat.norm()), rel=1e-12)


def test_rerun_skips_finished_runs_and_analyses(study, tmp_path):
    out, _ = study
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    stamp = {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()}
    summary = run_study(tiny_config(), copy)
    assert len(summary.skipped) == 4 and not summary.done
    for path, mtime in stamp.items():
        if path.name not in ("results.csv", "study.json", "study.lock", "config.toml"):
            assert path.stat().st_mtime_ns == mtime, path
    # a new m-sharpness setting recomputes only that analysis, without retraining
    analysis = {**ANALYSIS, "m_sharpness": {"m": [32], "rho": [0.05], "steps": 1}}
    summary = run_study(tiny_config(analysis=analysis), copy)
    assert len(summary.done) == 4
    last = copy / "runs" / "sgd-s0" / "last.pt"
    assert last.stat().st_mtime_ns == stamp[last]
    spectrum = copy / "runs" / "sgd-s0" / "analysis" / "epoch_002" / "spectrum.json"
    assert spectrum.stat().st_mtime_ns == stamp[spectrum]
    rows = read_results(copy / "results.csv")
    assert all(r["msharp_m32_rho0.05"] is not None for r in rows)


def test_interrupted_training_resumes_to_the_same_weights(study, tmp_path):
    out, _ = study
    copy = tmp_path / "resume"
    shutil.copytree(out, copy)
    run_dir = copy / "runs" / "sam-s0"
    # pretend the job died after epoch 1: last.pt is the epoch-1 checkpoint
    shutil.copy(run_dir / "epoch_001.pt", run_dir / "last.pt")
    (run_dir / "status.json").unlink()
    for path in (run_dir / "analysis").rglob("*.json"):
        path.unlink()
    summary = run_study(tiny_config(), copy)
    assert summary.done == ["sam-s0"]
    resumed = torch.load(run_dir / "last.pt", weights_only=True)
    original = torch.load(out / "runs" / "sam-s0" / "last.pt", weights_only=True)
    assert resumed["epoch"] == 2
    for key, value in original["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key


def test_diverged_run_is_recorded_as_failed_and_the_study_goes_on(tmp_path):
    config = tiny_config(
        sweep={"optimizer": ["sgd"], "lr": [0.05, 1e12]},
        analysis={"epochs": ["last"], "samples": 64},
    )
    summary = run_study(config, tmp_path / "div")
    assert summary.done == ["sgd-lr0.05-s0"]
    assert summary.failed == ["sgd-lr1e+12-s0"]
    rows = {r["run_id"]: r for r in read_results(tmp_path / "div" / "results.csv")}
    failed = rows["sgd-lr1e+12-s0"]
    assert failed["status"] == "failed" and "diverged" in failed["error"]
    assert failed["test_acc"] is None and failed["lambda_max"] is None
    assert rows["sgd-lr0.05-s0"]["status"] == "done"
    # a rerun keeps the failure (divergence is deterministic) and does not retrain it
    again = run_study(config, tmp_path / "div")
    assert sorted(again.skipped) == ["sgd-lr0.05-s0", "sgd-lr1e+12-s0"]
    report = write_report(tmp_path / "div", resamples=0).read_text()
    assert "## Failed runs" in report and "sgd-lr1e+12-s0" in report


def test_a_run_that_raised_is_retried_and_a_diverged_one_is_not(tmp_path):
    """The runner's contract: state 'error' is retried by the next study run, 'failed'
    (diverged) is kept (runs that raised could be counted complete, never retried)."""
    from sharpscope.study.runner import run_is_complete

    config = tiny_config(sweep={"optimizer": ["sgd"]})
    run = expand_sweep(config)[0]
    run_dir = tmp_path / "runs" / run.run_id
    run_dir.mkdir(parents=True)
    for state, complete in (("error", False), ("failed", True), ("trained", False)):
        (run_dir / "status.json").write_text(json.dumps({"state": state, "error": "x"}))
        assert run_is_complete(tmp_path, run, config) is complete, state


def test_keep_checkpoints_analysed_keeps_every_analysed_epoch(tmp_path):
    """With keep_checkpoints = "analysed" the pruning keeps epoch 1, analysed after it, and
    drops epoch 2 (it kept only the last analysed epoch's checkpoint)."""
    config = tiny_config(
        study={"name": "prune", "keep_checkpoints": "analysed"},
        train={**TRAIN, "epochs": 3},
        sweep={"optimizer": ["sgd"]},
        analysis={"epochs": [1, "last"], "samples": 32},
    )
    summary = run_study(config, tmp_path / "study")
    assert summary.done == ["sgd-s0"], summary.errors
    run_dir = tmp_path / "study" / "runs" / "sgd-s0"
    assert (run_dir / "epoch_001.pt").exists() and not (run_dir / "epoch_002.pt").exists()
    rows = read_results(tmp_path / "study" / "results.csv")
    assert sorted(r["epoch"] for r in rows) == [1, 3]
    assert all(r["weight_norm"] is not None for r in rows)


def test_study_folder_format_and_reuse_errors(study, tmp_path):
    out, _ = study
    meta = read_study_dir(out)
    assert meta["format"] == "sharpscope-study" and meta["version"] == 1
    for version, words in ((0, "older sharpscope"), (99, "newer sharpscope"), (None, "older")):
        folder = tmp_path / f"v{version}"
        shutil.copytree(out, folder)
        meta = json.loads((folder / "study.json").read_text())
        meta["version"] = version
        (folder / "study.json").write_text(json.dumps(meta))
        with pytest.raises(SharpscopeError, match=words):
            run_study(tiny_config(), folder)
        with pytest.raises(SharpscopeError, match=words):
            write_report(folder)
    # an edited study.json that no longer validates: its error names the file
    edited = tmp_path / "edited"
    shutil.copytree(out, edited)
    meta = json.loads((edited / "study.json").read_text())
    meta["config"]["analysis"]["samples"] = 0
    (edited / "study.json").write_text(json.dumps(meta))
    with pytest.raises(SharpscopeError) as info:
        write_report(edited)
    assert str(info.value) == (
        f'{edited / "study.json"}: analysis.samples must be a positive integer or "all", got 0'
    )
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(SharpscopeError, match="exists and is not a sharpscope study folder"):
        run_study(tiny_config(), other)
    with pytest.raises(SharpscopeError, match="is not a sharpscope study folder"):
        write_report(other)
    # two `study run` on one folder: the second is refused while the first holds the lock
    from sharpscope.study.runner import study_lock

    with study_lock(out):
        with pytest.raises(SharpscopeError, match="another `sharpscope study run` is working"):
            run_study(tiny_config(), out)
    # same run id, different training settings: refused, not silently mixed
    changed = tiny_config(train={**TRAIN, "batch_size": 32})
    with pytest.raises(SharpscopeError, match="was trained with a different configuration"):
        prepare_study_dir(out, changed, expand_sweep(changed))
    # another study, or this one with runs left out: refused, and the folder is left as it was
    before = {p: p.read_bytes() for p in (out / "study.json", out / "config.toml")}
    other_study = tiny_config(study={"name": "other"})
    with pytest.raises(SharpscopeError, match="holds the study 'tiny', not 'other'"):
        run_study(other_study, out)
    fewer = tiny_config(sweep={"optimizer": ["sgd"], "seed": [0, 1]})
    with pytest.raises(SharpscopeError, match=r"holds 2 run\(s\) that this config does not have"):
        run_study(fewer, out)
    assert {p: p.read_bytes() for p in before} == before
    # a sweep may grow (more seeds) in the same folder
    more = tiny_config(sweep={"optimizer": ["sgd", "sam"], "seed": [0, 1, 2]})
    check_study_dir(out, more, expand_sweep(more))
    # an unknown executor is refused before anything is written
    with pytest.raises(SharpscopeError, match="unknown executor 'foo'"):
        run_study(tiny_config(), tmp_path / "never", executor="foo")
    assert not (tmp_path / "never").exists()


def test_a_refused_folder_is_advised_in_words_a_python_caller_reads(study):
    """Session 30 (notebooks D3): run_study(config, folder) said "use a new --out", a flag that
    a Python caller, who gave the folder as an argument, has not got."""
    out, _ = study
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    changed = tiny_config(train={**TRAIN, "epochs": 3})
    with pytest.raises(SharpscopeError) as info:
        run_study(changed, out)
    assert str(info.value) == (
        f"run 'sgd-s0' in {out} was trained with a different configuration: train.epochs 3 "
        "(trained: 2); "
        f"use another output folder (--out) or delete that run ({out / 'runs' / 'sgd-s0'})"
    )
    with pytest.raises(SharpscopeError, match=r"; choose another output folder \(--out\)$"):
        run_study(tiny_config(study={"name": "other"}), out)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_report_tables_and_figures(study):
    out, _ = study
    path = write_report(out, resamples=50)
    text = path.read_text()
    assert "## Correlation with the generalization gap" in text
    assert "| `lambda_max` |" in text and "ψ optimizer" in text
    assert "Dinh et al." in text and "Andriushchenko" in text  # caveats, analysis.md §8
    for name in ("correlations", "measures_vs_gap", "training_curves"):
        for suffix in (".pdf", ".png"):
            assert (out / "figures" / f"{name}{suffix}").stat().st_size > 0
    rows = list(csv.DictReader((out / "correlations.csv").open()))
    measures = {r["measure"] for r in rows}
    assert {"lambda_max", "trace", "msharp_m16_rho0.05", "weight_norm"} <= measures
    assert "m_sharpness" not in measures  # an alias of msharp_m16_rho0.05
    for row in rows:
        assert -1.0 <= float(row["tau"]) <= 1.0 or math.isnan(float(row["tau"] or "nan"))
    # one training curve per setting (its lowest seed), not the first runs in sweep order
    curves = json.loads((out / "figures" / "training_curves.json").read_text())
    assert list(curves) == ["SGD", "SAM"]  # the plotted numbers, under the legend's names
    for name, run_id in (("SGD", "sgd-s0"), ("SAM", "sam-s0")):
        logged = [json.loads(line) for line in (out / "runs" / run_id / "metrics.jsonl").open()]
        evals = [r for r in logged if r.get("kind", "eval") == "eval"]
        assert [r["epoch"] for r in curves[name]] == [1, 2]
        assert [r["test_acc"] for r in curves[name]] == [r["test_acc"] for r in evals]
    assert "one run (the lowest seed) per setting" in text
    # measurement figures state data, mode and dtype (analysis.md §8)
    from sharpscope.study.report import measurement_caption

    assert measurement_caption(out) == "measured on mnist1d/train n=128; eval mode; float32"
    assert "(measured on mnist1d/train n=128; eval mode; float32)" in text
    assert "95% percentile intervals" in text and "τ [95% CI]" in text
    # no resamples: no intervals, and the report does not claim any
    text = write_report(out, resamples=0, figures=False).read_text()
    assert "no bootstrap intervals" in text and "95%" not in text


def test_report_with_too_few_runs_writes_a_correlation_table_with_a_header(study, tmp_path):
    out, _ = study
    folder = tmp_path / "few"
    shutil.copytree(out, folder)
    for run_id in ("sam-s0", "sam-s1", "sgd-s1"):
        (folder / "runs" / run_id / "status.json").unlink()
    text = write_report(folder, resamples=0, figures=False).read_text()
    assert "_Not enough finished runs with this gap._" in text
    with (folder / "correlations.csv").open() as handle:
        reader = csv.DictReader(handle)
        assert list(reader) == [] and reader.fieldnames[:3] == ["measure", "gap", "num_models"]
    # the full study's table, written here: another test's report may run on another
    # pytest-xdist worker (which has its own study fixture)
    every = tmp_path / "every"
    shutil.copytree(out, every)
    write_report(every, resamples=0, figures=False)
    full = next(csv.reader((every / "correlations.csv").open()))
    assert reader.fieldnames == full[: len(reader.fieldnames)]


@pytest.mark.parametrize("executor", ["local-pool", "submitit-debug", "submitit-local"])
def test_executors_give_the_same_results_as_in_process(study, tmp_path, executor):
    out, _ = study
    config = tiny_config(
        sweep={"optimizer": ["sgd", "sam"], "seed": [0]},
        analysis={"epochs": ["last"], "samples": 64, "m_sharpness": {"m": [32], "steps": 1}},
    )
    kwargs = {"workers": 2} if executor == "local-pool" else {"executor": executor}
    if executor == "submitit-local":
        kwargs["executor_options"] = {"timeout_min": 5}
    env = dict(os.environ)
    summary = run_study(config, tmp_path / executor, **kwargs)
    assert dict(os.environ) == env  # the parent keeps its environment
    assert sorted(summary.done) == ["sam-s0", "sgd-s0"], summary.errors
    got = {r["run_id"]: r for r in read_results(tmp_path / executor / "results.csv")}
    reference = {(r["run_id"], r["epoch"]): r for r in read_results(out / "results.csv")}
    for run_id in ("sgd-s0", "sam-s0"):
        # trained identically to the in-process study (same seed and data order)
        assert got[run_id]["test_acc"] == reference[(run_id, 2)]["test_acc"]
        assert got[run_id]["train_loss"] == pytest.approx(reference[(run_id, 2)]["train_loss"])
        assert got[run_id]["msharp_m32_rho0.05"] > 0
    if executor.startswith("submitit"):
        assert (tmp_path / executor / "submitit").is_dir()


def test_pool_workers_take_gpus_round_robin_and_one_cpu_thread(monkeypatch):
    import multiprocessing

    from sharpscope.study.executors import _worker_init, visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert visible_gpus() == ["3", "5"]
    import signal

    counter = multiprocessing.get_context("spawn").Value("i", 0)
    seen = []
    handler = signal.getsignal(signal.SIGINT)  # _worker_init ignores SIGINT: restored below
    try:
        for _ in range(3):
            _worker_init(counter, ["3", "5"])
            seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
    finally:
        signal.signal(signal.SIGINT, handler)
    assert seen == ["3", "5", "3"]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # restored after the test
    threads = torch.get_num_threads()
    try:
        _worker_init(counter, [])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
        signal.signal(signal.SIGINT, handler)


def test_pool_workers_ignore_sigint():
    """A terminal's Ctrl-C reaches every process of the group: a worker waiting for its next
    run printed a KeyboardInterrupt traceback (session 30 studycfg B1). The workers ignore
    SIGINT; the study's process takes it and stops them."""
    import multiprocessing
    import signal
    from concurrent.futures import ProcessPoolExecutor

    from sharpscope.study.executors import _worker_init

    context = multiprocessing.get_context("spawn")
    initargs = (context.Value("i", 0), [])
    with ProcessPoolExecutor(
        1, mp_context=context, initializer=_worker_init, initargs=initargs
    ) as pool:
        assert pool.submit(signal.getsignal, signal.SIGINT).result() == signal.SIG_IGN


COORDINATOR = """
import multiprocessing as mp
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from sharpscope.study.executors import _worker_init

if __name__ == "__main__":
    context = mp.get_context("spawn")
    pool = ProcessPoolExecutor(
        1, mp_context=context, initializer=_worker_init, initargs=(context.Value("i", 0), [])
    )
    print(pool.submit(os.getpid).result(), flush=True)
    pool.submit(time.sleep, 120)  # a long run, then nothing but waiting
    time.sleep(120)
"""


def test_pool_workers_end_when_the_study_process_is_killed(tmp_path):
    """After a SIGKILL of the study's process its workers went on with the queued runs and
    then sat idle for good (re-parented to init)."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "coordinator.py"
    script.write_text(COORDINATOR)
    coordinator = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker = int(coordinator.stdout.readline())
    os.kill(coordinator.pid, signal.SIGKILL)
    coordinator.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:  # gone, or a zombie left for a container's init that does not reap
            if Path(f"/proc/{worker}/stat").read_text().split(")")[-1].split()[0] == "Z":
                break
        except FileNotFoundError:
            break
        time.sleep(0.2)
    else:
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the pool worker outlived its study process by 30 s")


def test_reproduction_figures_from_a_study_folder(study, tmp_path):
    from sharpscope.study import reproductions

    out, _ = study
    figures = tmp_path / "figures"
    files, numbers = reproductions.figures_a(out, figures)
    table = {(t["optimizer"], t["epoch"]): t for t in numbers["table"]}
    rows = [r for r in read_results(out / "results.csv") if r["optimizer"] == "sam"]
    at_two = [r["lambda_max"] for r in rows if r["epoch"] == 2]
    assert table[("sam", 2)]["lambda_max"] == pytest.approx(sum(at_two) / len(at_two))
    assert table[("sam", 2)]["num_seeds"] == 2
    assert (figures / "a_spectra.pdf").exists() and (figures / "a_spectra_table.md").exists()
    files, numbers = reproductions.figures_c(out, figures)
    assert [p["m"] for p in numbers["tau_vs_m"]] == [16, 64]
    for function in (reproductions.figures_quick, reproductions.figures_e, reproductions.figures_f):
        files, numbers = function(out, figures)
        assert files and all(p.exists() for p in files)
    assert (figures / "f_calibration.csv").exists() and (figures / "e_label_noise.png").exists()


def test_make_figures_reuses_complete_studies(study, tmp_path, monkeypatch):
    from sharpscope.study import config as config_module
    from sharpscope.study import reproductions

    out, _ = study
    cache = tmp_path / "cache"
    shutil.copytree(out, cache / "tiny")
    monkeypatch.setattr(config_module, "load_builtin_config", lambda name: tiny_config())
    written = reproductions.make_figures(tmp_path / "figs", cache=cache, only=["quick"])
    names = {p.name for p in written}
    assert {"quick_correlations.pdf", "quick_measures_vs_gap.png", "summary.json"} <= names
    summary = json.loads((tmp_path / "figs" / "summary.json").read_text())
    assert summary["quick"]["runs"] == 4 and summary["quick"]["run_seconds"] > 0
    with pytest.raises(SharpscopeError, match="unknown reproduction 'g'"):
        reproductions.make_figures(tmp_path / "figs", cache=cache, only=["g"])


def test_a_run_recorded_with_relative_factory_paths_is_the_same_run(tmp_path, monkeypatch):
    # study folders written before factory paths were recorded absolute
    from sharpscope.study.runner import _check_same_run

    monkeypatch.chdir(tmp_path)
    old = {"train": {"model": {"factory": "fac/parts.py:net"}, "loss": "fac/parts.py:loss"}}
    new = {
        "train": {
            "model": {"factory": f"{tmp_path}/fac/parts.py:net"},
            "loss": f"{tmp_path}/fac/parts.py:loss",
        }
    }
    _check_same_run("sgd-s0", old, new, tmp_path)
    moved = {"train": {**new["train"], "loss": "/elsewhere/parts.py:loss"}}
    with pytest.raises(
        SharpscopeError,
        match=r"different configuration: train.loss \"/elsewhere/parts.py:loss\" \(trained: ",
    ):
        _check_same_run("sgd-s0", old, moved, tmp_path)


def test_a_corrupt_json_file_names_the_right_remedy(tmp_path):
    from sharpscope.study.runner import _read_json

    for name, remedy in (("study.json", "start the study again"), ("run.json", "delete it")):
        path = tmp_path / name
        path.write_text("{not json")
        with pytest.raises(SharpscopeError, match=remedy):
            _read_json(path)


def test_an_interpolation_legend_says_whose_values_are_whose():
    """Review (session 18): SAM against ASAM with both ρ swept read "rho0.05, rho0.5, seed
    0", leaving the reader to guess which ρ was SAM's."""
    from types import SimpleNamespace

    from sharpscope.study.reproductions import pair_caption

    swept = ["optimizer", "rho", "lr", "seed"]

    def run(optimizer, rho, lr=0.1, seed=0):
        params = {"optimizer": optimizer, "rho": rho, "lr": lr, "seed": seed}
        return SimpleNamespace(params=params, swept=swept)

    assert pair_caption(run("sam", 0.05), run("asam", 0.5)) == (
        "SAM rho0.05 → ASAM rho0.5 (lr0.1, seed 0)"
    )
    assert pair_caption(run("sgd", None, 0.05), run("sam", 0.1, 0.05)) == (
        "SGD → SAM rho0.1 (lr0.05, seed 0)"
    )
    assert pair_caption(run("sam", 0.1), run("sam", 0.1)) == "SAM → SAM (rho0.1, lr0.1, seed 0)"
    # optimizers that share no seed are paired across seeds: both are named, in the
    # caption and in the file's tag (else two pairs wrote one file)
    assert pair_caption(run("sgd", None, seed=1), run("sam", 0.1, seed=2)) == (
        "SGD → SAM rho0.1 (lr0.1, seeds 1, 2)"
    )
    from sharpscope.study.runner import pair_runs

    runs = [run("sgd", None, seed=1), run("sam", 0.1, seed=3), run("sam", 0.1, seed=4)]
    assert [tag for _, _, tag in pair_runs(runs, "sgd", "sam")] == [
        "rho0.1-lr0.1-s1-s3",
        "rho0.1-lr0.1-s1-s4",
    ]


def test_a_custom_studys_landscapes_are_drawn_in_its_report(tmp_path):
    """[analysis.landscape] in a study of one's own computed the slices and interpolations
    but report.md and figures/ never showed them; with lr swept, each lr has its own pair."""
    config = tiny_config(
        sweep={"optimizer": ["sgd", "sam"], "lr": [0.05, 0.1], "seed": [0]},
        analysis={
            "epochs": ["last"],
            "samples": 64,
            "landscape": {"dims": [1, 2], "grid": 5, "interpolate": [["sgd", "sam"]]},
        },
    )
    run_study(config, tmp_path)
    assert sorted(p.name for p in (tmp_path / "pairs").iterdir()) == [
        "sgd__sam__lr0.05-s0.npz",
        "sgd__sam__lr0.1-s0.npz",
    ]
    report = write_report(tmp_path, resamples=0).read_text()
    for name in ("d_landscape_1d", "d_landscape_2d", "d_interpolation"):
        assert f"(figures/{name}.png)" in report, name
        assert (tmp_path / "figures" / f"{name}.pdf").exists()
    interpolation = json.loads((tmp_path / "figures" / "d_interpolation.json").read_text())
    assert "SGD → SAM (lr0.1, seed 0)" in json.dumps(interpolation, ensure_ascii=False)
    from sharpscope.results import read_record

    for path in (
        tmp_path / "runs" / "sam-lr0.1-s0" / "analysis" / "epoch_002" / "landscape_2d.npz",
        tmp_path / "pairs" / "sgd__sam__lr0.1-s0.npz",
    ):  # provenance, as the stand-alone command records it
        meta = read_record(path)["meta"]
        assert meta["checkpoint_sha256"] and meta["data"]["split"] == "train", path
    # a pair file the config does not define (an older sharpscope named them by the seed)
    # is not drawn beside the others
    pairs = tmp_path / "pairs"
    (pairs / "sgd__sam__s0.npz").write_bytes((pairs / "sgd__sam__lr0.05-s0.npz").read_bytes())
    write_report(tmp_path, resamples=0)
    interpolation = json.loads((tmp_path / "figures" / "d_interpolation.json").read_text())
    assert len(json.dumps(interpolation, ensure_ascii=False).split("SGD → SAM")) == 3
    # interrupted before the last epoch's landscapes: the report is still written
    for path in [*tmp_path.glob("runs/*/analysis/*/landscape_*"), *pairs.iterdir()]:
        path.unlink()
    assert "No landscape figures yet" in write_report(tmp_path, resamples=0).read_text()


def test_analysis_epochs_can_shrink_but_not_ask_for_epochs_a_run_never_saved(study, tmp_path):
    """Changing analysis.epochs changes the save_every the study trains with: fewer epochs
    were refused as "a different configuration (train: save_every)", and more epochs named
    that key, which the user never set, instead of the epochs that are missing."""
    import shutil

    out, _ = study
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    fewer = tiny_config(analysis={**ANALYSIS, "epochs": ["last"]})
    summary = run_study(fewer, copy)  # every run is done and saved what is asked for
    assert sorted(summary.skipped) == ["sam-s0", "sam-s1", "sgd-s0", "sgd-s1"]
    assert not summary.done and not summary.failed and not summary.errors
    # run.json keeps the save_every the run was trained with, so going back is fine too
    run = json.loads((copy / "runs" / "sgd-s0" / "run.json").read_text())
    assert run["train"]["save_every"] == 1 and run["analysis_epochs"] == [2]
    summary = run_study(tiny_config(), copy)
    assert sorted(summary.skipped) == ["sam-s0", "sam-s1", "sgd-s0", "sgd-s1"]
    late = tmp_path / "late"
    run_study(tiny_config(analysis={**ANALYSIS, "epochs": ["last"]}), late)
    with pytest.raises(
        SharpscopeError,
        match=r"run 'sgd-s0' in .* has no checkpoint of epoch 1 that analysis.epochs asks for "
        r"\(it was not saved, or was deleted\); ask only for epochs it has, or use another "
        r"output folder \(--out\)",
    ):
        run_study(tiny_config(), late)
    # runs not trained yet simply train with the new save_every (the study was interrupted)
    pending = tmp_path / "pending"
    config = tiny_config(analysis={**ANALYSIS, "epochs": ["last"]})
    prepare_study_dir(pending, config, expand_sweep(config))
    prepare_study_dir(pending, tiny_config(), expand_sweep(tiny_config()))


def test_a_studys_analysis_files_name_their_checkpoint_and_data(study):
    """meta.checkpoint, checkpoint_sha256 and data were null in a study's analysis JSON
    (interface.md asks for them; the stand-alone commands fill them in)."""
    from sharpscope.data import load_data
    from sharpscope.io import load_checkpoint

    out, _ = study
    folder = out / "runs" / "sam-s1" / "analysis" / "epoch_002"
    spectrum = json.loads((folder / "spectrum.json").read_text())["result"]["meta"]
    assert spectrum["checkpoint"] == str(out / "runs" / "sam-s1" / "epoch_002.pt")
    assert spectrum["checkpoint_sha256"] == load_checkpoint(spectrum["checkpoint"]).sha256
    again = load_data(spectrum["data"], spectrum["data"]["split"])
    analysed = load_data(DATA, "train", samples=ANALYSIS["samples"], seed=0)
    assert torch.equal(again.inputs, analysed.inputs) and len(again) == spectrum["num_samples"]
    sharp = json.loads((folder / "m_sharpness.json").read_text())["result"]
    metas = [r["meta"] for r in sharp["results"]]
    assert metas and all(m["checkpoint_sha256"] == spectrum["checkpoint_sha256"] for m in metas)


def test_result_load_reads_a_studys_analysis_record(study):
    """Acceptance s22: Spectrum.load of a study's spectrum.json failed with "'top'" (the
    spectrum sits under 'result'); it loads now, and a record of several results (or of
    none) says what it holds in one line."""
    from sharpscope import Spectrum
    from sharpscope.analysis.msharpness import MSharpness

    out, _ = study
    folder = out / "runs" / "sam-s1" / "analysis" / "epoch_002"
    record = json.loads((folder / "spectrum.json").read_text())
    loaded = Spectrum.load(folder / "spectrum.json")
    assert loaded.lambda_max == pytest.approx(record["result"]["lambda_max"], rel=1e-12)
    with pytest.raises(
        SharpscopeError,
        match=r"a study's analysis record of 'm_sharpness', not "
        r"one 'msharpness' result: read its JSON \('result' -> 'results' holds \d+ "
        r"results, each for from_dict; 'columns' holds what results.csv shows\)",
    ):
        MSharpness.load(folder / "m_sharpness.json")
    parts = json.loads((folder / "m_sharpness.json").read_text())["result"]["results"]
    assert MSharpness.from_dict(parts[0]).m == parts[0]["m"]


def test_results_of_earlier_analysis_settings_are_left_out_until_redone(study, tmp_path):
    """A rerun with a changed [analysis], stopped before every run was re-analysed: the
    report counted every run as finished and mixed measures of both settings in its
    correlations, and its setup line gave the stale results' subset size (session 26)."""
    from sharpscope.study.runner import run_states

    out, _ = study
    copy = tmp_path / "changed"
    shutil.copytree(out, copy)
    config = tiny_config(analysis={**ANALYSIS, "samples": 192})
    run_study(config, copy)
    # sam-s0 as if the rerun had stopped before reaching it: its results of samples = 128
    stale = copy / "runs" / "sam-s0" / "analysis"
    shutil.rmtree(stale)
    shutil.copytree(out / "runs" / "sam-s0" / "analysis", stale)
    assert {s["run_id"]: s["state"] for s in run_states(copy)}["sam-s0"] == "analysing"
    report = write_report(copy, resamples=0, figures=False).read_text()
    rows = read_results(copy / "results.csv")
    for row in rows:
        fresh = row["run_id"] != "sam-s0"
        assert row["status"] == ("done" if fresh else "analysing")
        assert (row["lambda_max"] is not None) is fresh
        assert (row["msharp_m16_rho0.05"] is not None) is fresh
        assert row["test_acc"] is not None  # training metrics are not analyses
    assert "runs: 4 (3 finished, 0 failed, 1 trained but not yet analysed, 0 pending)" in report
    assert "192 examples" in report and "128 examples" not in report
    # the next rerun redoes that run's analyses alone, and the report counts it again
    summary = run_study(config, copy)
    assert summary.done == ["sam-s0"] and len(summary.skipped) == 3
    assert all(r["status"] == "done" for r in read_results(copy / "results.csv"))


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("study.json", '"x"', r"study.json holds str JSON, not an object; restore it"),
        ("study.json", "[]", r"study.json holds list JSON, not an object; restore it"),
        (
            "study.json",
            '{"format": "sharpscope-study", "version": 1}',
            r"study.json holds no study config \(its 'config' table is missing\); restore it",
        ),
        ("runs/sgd-s0/status.json", "5", r"status.json holds int JSON, not an object; delete it"),
        ("runs/sgd-s0/run.json", "[]", r"run.json holds list JSON, not an object; delete it"),
        (
            "runs/sgd-s0/analysis/epoch_002/spectrum.json",
            "null",
            r"spectrum.json holds NoneType JSON, not an object; delete it to recompute",
        ),
    ],
)
def test_a_study_file_of_the_wrong_json_type_is_one_line(study, tmp_path, file, content, message):
    """They were tracebacks (AttributeError, KeyError 'config') in study run, report and
    status; invalid JSON already was one line (session 26)."""
    from typer.testing import CliRunner

    from sharpscope.cli import app

    out, _ = study
    copy = tmp_path / "broken"
    shutil.copytree(out, copy)
    (copy / file).write_text(content)
    commands = [["report", str(copy)], ["status", str(copy)]]
    if file.endswith("run.json"):  # read by study run alone
        commands = [["run", str(copy / "config.toml"), "--out", str(copy), "--no-report"]]
    for args in commands:
        result = CliRunner().invoke(app, ["study", *args])
        assert result.exit_code != 0 and "Traceback" not in result.output
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("error: ") and re.search(message, line), line


def test_the_study_lock_is_removed_when_the_run_ends(tmp_path):
    """study.lock stayed in the folder after `study run` ended, as if a run were still
    working there (s29 readme D2); a second holder is still refused while it is held."""
    from sharpscope.errors import SharpscopeError
    from sharpscope.study.runner import LOCK_NAME, study_lock, study_running

    with study_lock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().strip().isdigit()  # the holder's PID
    assert not (tmp_path / LOCK_NAME).exists() and not study_running(tmp_path)
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from sharpscope.study.runner import study_lock\n"
         f"with study_lock(Path({str(tmp_path)!r})):\n"
         "    print('held', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert study_running(tmp_path)
        with pytest.raises(SharpscopeError, match="another `sharpscope study run` is working"):
            with study_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_an_interpolations_warning_in_a_study_gives_advice_a_study_can_follow(tmp_path):
    """Session 30 (studycfg B10): a study's interpolation warned 'states=False / --no-states,
    or a smaller span', which [analysis.landscape] cannot set; other warnings pass as they are."""
    import warnings

    from sharpscope.analysis.landscape import STATES_ADVICE
    from sharpscope.study.runner import _study_advice

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    with pytest.warns((RuntimeWarning, UserWarning)) as caught:
        with _study_advice(a, b):
            text = f"3 point(s) gave a non-finite loss (...: {STATES_ADVICE})"
            warnings.warn(text, RuntimeWarning, stacklevel=1)
            warnings.warn("another warning", UserWarning, stacklevel=1)
    first, second = (str(w.message) for w in caught)
    assert STATES_ADVICE not in first
    assert first.endswith(
        f"a study interpolates them too; 'sharpscope landscape {a} --directions {b} "
        "--no-states' redoes this pair without them)"
    )
    assert second == "another warning" and caught[1].category is UserWarning


def test_a_refused_run_names_each_setting_that_differs_to_the_leaf(tmp_path):
    """Session 30 (studycfg B2, its message): a refused resume named only the top-level key,
    'train: optimizer', for nesterov added to an SGD base; now each leaf, as train --resume."""
    from sharpscope.study.runner import _check_same_run

    sgd = {"name": "sgd", "lr": 0.1}
    old = {"train": {"optimizer": {"name": "sam", "rho": 0.05, "base": sgd}, "epochs": 2}}
    new = {"train": {"optimizer": {"name": "sam", "rho": 0.1, "base": {**sgd, "nesterov": True}}}}
    new["train"]["epochs"] = 2
    with pytest.raises(SharpscopeError) as info:
        _check_same_run("sam-s0", old, new, tmp_path)
    assert (
        "different configuration: train.optimizer.base.nesterov true (trained: false); "
        "train.optimizer.rho 0.1 (trained: 0.05); use another output folder (--out)"
    ) in str(info.value)


def test_a_folder_refused_for_renamed_runs_says_they_were_renamed(tmp_path):
    """studycfg D3 (session 30): adding a second lr value renames every run (sgd-s0 becomes
    sgd-lr0.1-s0), and the refusal said the folder "holds runs that this config does not
    have", though the config has them under new names."""
    from sharpscope.study.runner import check_study_dir, prepare_study_dir

    out = tmp_path / "st"
    first = tiny_config()
    prepare_study_dir(out, first, expand_sweep(first))
    grown = tiny_config(sweep={"optimizer": ["sgd", "sam"], "seed": [0, 1], "lr": [0.1, 0.2]})
    with pytest.raises(SharpscopeError) as info:
        check_study_dir(out, grown, expand_sweep(grown))
    assert "holds 4 run(s) that this config does not have" in str(info.value)
    assert "names its runs differently (sam-s0 is now sam-lr0.1-s0)" in str(info.value)
    fewer = tiny_config(sweep={"optimizer": ["sgd"], "seed": [0, 1]})
    with pytest.raises(SharpscopeError) as info:
        check_study_dir(out, fewer, expand_sweep(fewer))
    assert "differently" not in str(info.value)  # runs left out, not renamed


def test_a_resumed_study_accepts_restated_defaults_and_evaluation_settings(study, tmp_path):
    """Session 30 (studycfg B2): a config that restated a default the runs had trained with
    (nesterov = false, the cosine schedule, activation = "relu") or changed only how runs
    are evaluated (eval_batch_size, bsam_samples) was refused as "trained with a different
    configuration"; the study now compares the settings as training resolves them, as
    train --resume does. A restated default must not cost a trained run its save_every."""
    out, _ = study
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    sgd = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
    train = {
        **TRAIN,
        "model": {**TRAIN["model"], "activation": "relu"},
        "schedule": {"name": "cosine"},
        "eval_batch_size": 500,
        "bsam_samples": 8,
    }
    restated = tiny_config(
        train=train,
        optimizers={"base": {**sgd, "nesterov": False}},
        analysis={**ANALYSIS, "epochs": ["last"]},  # a new save_every as well
    )
    summary = run_study(restated, copy)
    assert sorted(summary.skipped) == ["sam-s0", "sam-s1", "sgd-s0", "sgd-s1"]
    assert not summary.done and not summary.errors
    run = json.loads((copy / "runs" / "sgd-s0" / "run.json").read_text())
    assert run["train"]["save_every"] == 1  # as trained, so epoch 1 may be asked for again
    assert "eval_batch_size" not in run["train"] and "bsam_samples" not in run["train"]
    assert sorted(run_study(tiny_config(), copy).skipped) == sorted(summary.skipped)
    # a setting that does change the runs is still refused, and named to the leaf
    with pytest.raises(SharpscopeError) as info:
        run_study(tiny_config(optimizers={"base": {**sgd, "lr": 0.2}}), copy)
    assert "different configuration: train.optimizer.lr 0.2 (trained: 0.1); use" in str(info.value)
    with pytest.raises(SharpscopeError, match=r"train.model.activation \"tanh\" \(trained: "):
        run_study(
            tiny_config(train={**TRAIN, "model": {**TRAIN["model"], "activation": "tanh"}}), copy
        )


def test_results_give_the_width_and_depth_a_swept_model_spec_is_built_with(tmp_path):
    """Session 30 (studycfg B7): a swept model spec that leaves width or depth out
    ({name = "mlp", depth = 1}) left results.csv's cells empty, though the model is built
    with the mlp's default width (256); they come from the resolved spec now. A folder that
    an older version wrote, with those params empty in run.json, is read and resumed."""
    from sharpscope.study.runner import load_study_config_from_dir

    models = [{"name": "mlp", "depth": 1}, {"name": "cnn", "width": 2}]
    config = tiny_config(
        train={**TRAIN, "dataset": {"name": "digits"}, "epochs": 1, "batch_size": 256},
        sweep={"optimizer": ["sgd"], "model": models},
        analysis={"samples": 64},
    )
    out = tmp_path / "models"
    run_study(config, out)

    def cells():
        rows = read_results(out / "results.csv")
        return {r["model"].split("_")[0]: (r["width"], r["depth"]) for r in rows}

    assert cells() == {"mlp": (256, 1), "cnn": (2, 2)}
    run_ids = sorted(p.name for p in (out / "runs").iterdir())
    for path in (out / "runs").glob("*/run.json"):
        record = json.loads(path.read_text())
        given = record["train"]["model"]
        for key in ("width", "depth"):  # as an older version recorded them
            record["params"][key] = given.get(key)
        path.write_text(json.dumps(record))
    for again in (config, load_study_config_from_dir(out)):
        assert sorted(run_study(again, out).skipped) == run_ids
    assert cells() == {"mlp": (256, 1), "cnn": (2, 2)}
    for path in (out / "runs").glob("*/run.json"):
        params = json.loads(path.read_text())["params"]
        assert params["width"] is not None and params["depth"] is not None
