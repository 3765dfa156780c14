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


def test_bench_landscape_values_agree_with_the_reference_loop(tmp_path):
    rows = bench("landscape", tmp_path)
    assert all(r["extra"]["values_agree_1e-5"] for r in rows)
    assert all(r["reference"] == "per-point loop over the model as given" for r in rows)
    cnn = [r for r in rows if "cnn1d-bn" in r["case"]]
    assert cnn and all(r["extra"]["bn_folded"] for r in cnn)


def test_bench_msharpness_values_agree_with_the_loop(tmp_path):
    rows = bench("msharpness", tmp_path)
    assert all(r["extra"]["values_agree_1e-5"] for r in rows)


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
