"""The optimizer benchmark runs, counts passes by closure calls and checks each step against the spec."""

from __future__ import annotations

import pytest

from sharpscope.bench.optimizers import TARGETS, run


@pytest.fixture(scope="module")
def rows():
    return run(quick=True, devices=["cpu"])


def test_one_row_per_variant_against_sgd(rows):
    assert [r.variant for r in rows] == ["sam", "asam", "vasso", "samon", "bsam", "lets"]
    for r in rows:
        assert r.reference == "sgd" and r.reference_seconds > 0
        assert r.ratio == pytest.approx(r.seconds / r.reference_seconds)
        assert r.extra["target_ratio"] == TARGETS[r.variant]
        assert r.extra["meets_target"] == (r.ratio <= TARGETS[r.variant])


def test_passes_per_step_are_counted(rows):
    passes = {r.variant: r.extra["gradient_passes_per_step"] for r in rows}
    calls = {r.variant: r.extra["closure_calls_per_step"] for r in rows}
    assert calls == {"sam": 2, "asam": 2, "vasso": 2, "samon": 2, "bsam": 2, "lets": 2}
    assert passes["lets"] == 3  # plus the validation pass
    assert all(r.extra["reference_passes_per_step"] == 1 for r in rows)


def test_accuracy_column_is_the_spec_step_written_out(rows):
    # every variant at its timed configuration against the spec's update written out
    for r in rows:
        assert r.accuracy_measure == "max|w - w_spec| (weights, BN stats)"
        assert r.accuracy < 1e-6  # float32 rounding of the fused updates
