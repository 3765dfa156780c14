"""The optimizer benchmark runs, counts passes by closure calls and checks rho = 0."""

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


def test_accuracy_column_is_the_rho_zero_check(rows):
    for r in rows:
        if r.variant == "bsam":
            assert r.accuracy_measure == "max|w - w_spec| (weights, BN stats)"
            assert r.accuracy < 1e-6  # float32 rounding of the fused updates
        else:
            assert r.accuracy == 0.0


@pytest.mark.parametrize("fault", ["no_noise", "bn_both", "normalized_ascent"])
def test_the_bsam_check_sees_a_step_that_is_not_the_spec(fault, monkeypatch):
    """Session 22's review: the bSAM row only checked that predictive probabilities sum to
    1, which holds for any weights. Now it is the spec's update written out: a step that
    draws no noise, updates BatchNorm statistics in pass 2, or normalizes its ascent
    step as SAM does shows."""
    import torch

    from sharpscope.bench.optimizers import _bsam_spec_check, _case, _specs
    from sharpscope.optim import BSAM

    model, x, y, _, num_data = _case("cpu")
    spec = _specs()["bsam"]
    assert _bsam_spec_check(spec, model, x, y, num_data) < 1e-6
    if fault == "no_noise":
        monkeypatch.setattr(BSAM, "_noise", lambda self, params, g: [p * 0 for p in params])
    elif fault == "bn_both":
        spec = dict(spec, bn_policy="both")
    else:

        def normalized(self, params, grads):
            norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
            return [self.rho * g / norm for g in grads]

        monkeypatch.setattr(BSAM, "perturbation", normalized)
    assert _bsam_spec_check(spec, model, x, y, num_data) > 1e-5
