"""``sharpscope bench spectrum|msharpness|landscape --quick``: the rows are real comparisons.

Smoke runs of the benchmarks (no timing assertions: speed is reported as ratios by the
benchmarks themselves, never asserted in unit tests); what is checked is that each row
compares against its reference on the same data and that the answers agree.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from sharpscope.cli import app


def bench(name: str, tmp_path) -> list[dict]:
    out = tmp_path / f"{name}.json"
    result = CliRunner().invoke(app, ["bench", name, "--quick", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert rows and all(r["seconds"] > 0 and r["reference_seconds"] > 0 for r in rows)
    # README: every row has the target keys, null where the row has no target
    assert all(
        {"meets_target", "target_ratio", "target_speedup"} <= r["extra"].keys() for r in rows
    )
    # a quick run is a smoke test: marked so, and no row's target is judged
    assert all(r["extra"]["quick"] is True and r["extra"]["meets_target"] is None for r in rows)
    assert any(
        r["extra"]["target_ratio"] is not None or r["extra"]["target_speedup"] is not None
        for r in rows
    )
    assert "not judged" in result.output and "--quick (a smoke test" in result.output
    return rows


def test_bench_spectrum_is_exact_and_compares_with_pyhessian(tmp_path):
    pytest.importorskip("pyhessian")
    rows = bench("spectrum", tmp_path)
    head = rows[0]
    assert head["reference"].startswith("pyhessian")
    assert head["accuracy"] <= 1e-4  # top-5 vs the dense float64 Hessian
    assert head["accuracy"] <= head["extra"]["reference_accuracy"]
    assert head["extra"]["sharpscope_bn_folded"]  # the BatchNorm CNN is folded
    assert all(head["extra"]["sharpscope_converged"])
    variants = {r["variant"] for r in rows}
    assert "HVP reverse-over-reverse (graph reused), BatchNorm not folded" in variants


def test_bench_spectrum_without_pyhessian_is_one_line_before_any_work(tmp_path, monkeypatch):
    # PyHessian is an optional extra: a missing one is said at once, not after the training
    # and sharpscope's own top-5 have run (a None entry makes the import raise ImportError)
    import sys

    monkeypatch.setitem(sys.modules, "pyhessian", None)
    monkeypatch.setitem(sys.modules, "pyhessian.hessian", None)
    out = tmp_path / "rows.json"
    result = CliRunner().invoke(app, ["bench", "spectrum", "--quick", "--json", str(out)])
    assert result.exit_code == 2
    assert "pip install pyhessian" in result.output and "Traceback" not in result.output
    assert "top-5 against PyHessian" not in result.output  # no case was run
    assert not out.exists()


def test_bench_landscape_values_agree_with_the_reference_loop(tmp_path):
    rows = bench("landscape", tmp_path)
    assert all(r["extra"]["values_agree_1e-5"] for r in rows)
    # the flag is the accuracy column against 1e-5; ratio is variant time / reference time
    assert all(r["extra"]["values_agree_1e-5"] == (r["accuracy"] <= 1e-5) for r in rows)
    assert all(r["ratio"] == pytest.approx(r["seconds"] / r["reference_seconds"]) for r in rows)
    assert all(r["reference"].startswith("per-point loop by hand") for r in rows)
    cnn = [r for r in rows if "cnn1d-bn" in r["case"]]
    assert cnn and all(r["extra"]["bn_folded"] for r in cnn)
    # the CPU default precomputes the image MLP's 3072-wide first layer (and no MNIST-1D
    # model's)
    loops = {r["case"].split(",")[1].split()[0]: r for r in rows if r["variant"].startswith("per")}
    assert loops["mlp-512"]["extra"]["input_layers"] == ["net.1"]
    assert loops["cnn1d-bn"]["extra"]["input_layers"] == loops["mlp"]["extra"]["input_layers"] == []


def test_bench_msharpness_values_agree_with_the_loop(tmp_path):
    rows = bench("msharpness", tmp_path)
    assert all(r["extra"]["values_agree_1e-5"] for r in rows)
    extras = [r["extra"] for r in rows]
    assert all(e["values_agree_1e-5"] == (e["float64_relative_difference"] <= 1e-5) for e in extras)
    for r in rows:  # ratio: vmap time / loop time; speedup: its inverse
        assert r["ratio"] == pytest.approx(r["seconds"] / r["reference_seconds"])
        assert r["extra"]["speedup"] == pytest.approx(1 / r["ratio"])


@pytest.mark.parametrize(
    "device, message",
    [("tpu", "--device must be auto, cpu or cuda"), ("cuda", "CUDA is not available")],
)
def test_bench_device_errors_are_one_line(device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = CliRunner().invoke(app, ["bench", "landscape", "--device", device])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output


def test_bench_rows_are_handed_out_as_they_come():
    """`--json` is rewritten after each row, so a run stopped part-way keeps its rows."""
    from sharpscope.bench import landscape

    snapshots: list[list] = []
    rows = landscape.run(quick=True, devices=["cpu"], on_rows=snapshots.append)
    assert [len(s) for s in snapshots] == list(range(1, len(rows) + 1))
    assert snapshots[-1] == rows


def test_bench_spectrum_without_a_dense_answer_compares_largest_magnitudes_too():
    """The GPU case's comparison (no dense Hessian), run on the CPU's quick case."""
    pytest.importorskip("pyhessian")
    import numpy as np

    from sharpscope.bench.spectrum import (
        _digits_case,
        _rel_error,
        _top5_rows,
        exact_spectrum,
        top_of,
    )

    case = _digits_case(quick=True)
    (row,) = _top5_rows(case, repeats=1, dense=False)
    extra = row.extra
    exact = exact_spectrum(case)
    assert _rel_error(extra["largest_magnitude_eigenvalues"], top_of(exact, 5, "LM"), "LM") <= 1e-4
    assert extra["reference_accuracy_largest_magnitude"] == pytest.approx(
        _rel_error(extra["reference_eigenvalues"], top_of(exact, 5, "LM"), "LM"), rel=0.1, abs=1e-4
    )
    # a set of largest magnitudes matches itself however the signs interleave
    assert _rel_error([-5.0, 4.0, 3.0], np.array([4.0, -5.0, 3.0]), "LM") == 0.0
    assert _rel_error([-5.0, 4.0, 3.0], np.array([4.0, 3.0, 1.0])) > 0.1


def test_json_to_a_folder_is_refused_before_the_benchmark_runs(tmp_path):
    result = CliRunner().invoke(app, ["bench", "landscape", "--json", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: --json {tmp_path} is a folder; give a file name, e.g. {tmp_path / 'bench.json'}"
    )


def test_torch_threads_restores_the_thread_count_even_after_an_error():
    """Inside: the count asked for (1); after, normally or by an exception: the 2 set before."""
    from sharpscope.bench._common import torch_threads

    original = torch.get_num_threads()
    torch.set_num_threads(2)  # the suite may run with one thread already
    try:
        with torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="boom"), torch_threads(1):
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(original)


def test_interleaved_median_is_the_median_of_each_callables_repeats(monkeypatch):
    """Fake clock: 'a' takes 5, 1, 3 and 'b' 2, 2, 9 units: medians 3 and 2; gc on again after."""
    import gc
    import types

    from sharpscope.bench import _common

    clock = [0.0]
    durations = {"a": iter([0.0, 5.0, 1.0, 3.0]), "b": iter([0.0, 2.0, 2.0, 9.0])}

    def tick(name):
        def fn():
            clock[0] += next(durations[name])

        return fn

    monkeypatch.setattr(_common, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    assert gc.isenabled()
    times = _common.interleaved_median({"a": tick("a"), "b": tick("b")}, repeats=3, warmup=1)
    assert times == {"a": 3.0, "b": 2.0}
    assert gc.isenabled()


def test_bench_msharpness_flags_disagreeing_values_and_reports_time_ratios(monkeypatch):
    """Injected answers 1+2e-5 vs 1 and times 1 s vs 4 s: agree flag False, ratio 0.25, speedup 4."""
    from sharpscope.bench import msharpness

    tf32 = []

    def fake_pair(model, data, kwargs, device):
        tf32.append(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)
        return {"vmap": lambda: 1.0 + 2e-5, "loop": lambda: 1.0}

    monkeypatch.setattr(msharpness, "_pair", fake_pair)
    monkeypatch.setattr(
        msharpness, "interleaved_median", lambda fns, repeats: {"vmap": 1.0, "loop": 4.0}
    )
    monkeypatch.setattr(msharpness, "bench_data", lambda *args, **kwargs: None)
    rows = msharpness.run(quick=True, devices=["cpu"])
    assert rows
    for r in rows:
        assert r.ratio == 0.25 and r.extra["speedup"] == 4.0
        assert r.accuracy == pytest.approx(2e-5, rel=1e-6)
        assert r.extra["values_agree_1e-5"] is False
    assert [r.extra["meets_target"] for r in rows if "m=8 steps=1" in r.case] == [True]
    # the hand loop is timed in IEEE float32 too (TF32 on made the GPU reference differ)
    assert tf32 and not any(tf32) and torch.backends.cudnn.allow_tf32


def test_bench_landscape_flags_disagreeing_values_and_reports_time_ratios(monkeypatch):
    """Injected: vmap grid off by 2e-5 (flag False), loop exact (True); ratios 1/4 and 2/4 of 4 s."""
    import types

    from sharpscope.bench import landscape as bench_landscape

    def fake_landscape(model, data, dims, *, vectorize, fold_bn=True, **kwargs):
        loss = torch.full((5, 5), 2.0, dtype=torch.float64) * (1 + 2e-5 if vectorize else 1.0)
        meta = types.SimpleNamespace(extra={"chunk_size": 25, "vectorized": vectorize})
        return types.SimpleNamespace(
            loss=loss, settings={"bn_folded": fold_bn}, meta=meta, directions=None, x=None, y=None
        )

    tf32 = []

    def fake_li_loop(model, data, directions, axes):
        tf32.append(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)
        return torch.full((5, 5), 2.0, dtype=torch.float64)

    times = {"vmap": 1.0, "loop": 2.0, "reference": 4.0}
    monkeypatch.setattr(bench_landscape, "landscape", fake_landscape)
    monkeypatch.setattr(bench_landscape, "li_loop", fake_li_loop)
    monkeypatch.setattr(bench_landscape, "interleaved_median", lambda fns, repeats: times)
    monkeypatch.setattr(bench_landscape, "bench_data", lambda *args, **kwargs: None)
    rows = bench_landscape.run(quick=True, devices=["cpu"])
    assert rows
    for r in rows:
        vmap = r.variant.startswith("vmap")
        assert r.ratio == (0.25 if vmap else 0.5)
        assert r.extra["speedup"] == (4.0 if vmap else 2.0)
        assert r.accuracy == (pytest.approx(2e-5, rel=1e-6) if vmap else 0.0)
        assert r.extra["values_agree_1e-5"] is (not vmap)
    # the hand loop runs in IEEE float32, as sharpscope does (on a GPU PyTorch's default
    # TF32 convolutions made it faster and 1e-3 off)
    assert tf32 and not any(tf32) and torch.backends.cudnn.allow_tf32


def test_the_hand_written_references_compute_what_sharpscope_computes():
    """The benchmarks' references, written as a researcher would (Li et al.'s landscape
    loop, SAM's one-step m-sharpness loop), agree with sharpscope in float64 on a small
    BatchNorm network, and leave the weights as found."""
    from sharpscope.analysis.landscape import landscape
    from sharpscope.analysis.msharpness import m_sharpness
    from sharpscope.bench import landscape as bench_landscape
    from sharpscope.bench import msharpness

    model = msharpness.bench_model(torch.float64)
    x, y = msharpness.bench_data(64, torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    made = landscape(model, (x, y), 2, grid=4, seed=0)
    grid = bench_landscape.li_loop(model, (x, y), made.directions, (made.x, made.y))
    torch.testing.assert_close(grid, made.loss.double(), rtol=1e-12, atol=0)
    for m in (1, 8):
        hand = msharpness.sam_loop(model, (x, y), m, 0.05)
        assert hand == pytest.approx(m_sharpness(model, (x, y), m=m, rho=0.05).sharpness, rel=1e-10)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_an_interrupted_bench_says_which_rows_it_kept(tmp_path, monkeypatch):
    """Acceptance s22: Ctrl-C said only "error: interrupted", though --json kept the rows
    measured so far."""
    from sharpscope.bench import _common, optimizers

    def two_rows_then_ctrl_c(quick, devices, on_rows):
        rows = [_common.BenchRow(f"case {i}", "v", 1.0, "r", 2.0, 0.5) for i in range(2)]
        on_rows(rows)
        raise KeyboardInterrupt

    monkeypatch.setattr(optimizers, "run", two_rows_then_ctrl_c)
    out = tmp_path / "rows.json"
    result = CliRunner().invoke(app, ["bench", "optimizers", "--json", str(out)])
    assert result.exit_code == 130
    assert result.output.strip().splitlines()[-1] == (
        f"error: interrupted; the 2 rows measured before are in {out}"
    )
    assert [r["case"] for r in json.loads(out.read_text())] == ["case 0", "case 1"]
