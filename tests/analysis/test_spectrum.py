"""The spectrum analyses through the public API, against dense Hessians."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from sharpscope.analysis import (
    Density,
    Spectrum,
    TopEigs,
    hessian_trace,
    landscape,
    spectral_density,
    spectrum,
    top_eigenvalues,
)
from sharpscope.curvature import HessianOperator, dense_hessian
from sharpscope.errors import SharpscopeError
from sharpscope.registry import build_model
from sharpscope.results import RunMeta

from cases import (
    SPECTRUM_JSON_KEYS,
    AttentionClassifier,
    finite_difference_hessian,
    fit_full_batch,
    three_class_blobs,
)


class Case:
    def __init__(self, model, x, y):
        self.model, self.data = model, (x, y)
        self.H = dense_hessian(model, (x, y))
        self.eigenvalues = torch.linalg.eigvalsh(self.H).flip(0)  # descending


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    x, y = three_class_blobs(50)
    model = nn.Sequential(nn.Linear(8, 10), nn.Tanh(), nn.Linear(10, 3))
    return Case(fit_full_batch(model, x, y, 30, 0.1), x, y)


@pytest.fixture(scope="module")
def bn_cnn():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(40, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (40,), generator=gen)
    model = build_model({"name": "cnn", "width": 2, "norm": "batch"}, (1, 8, 8), 10).train()
    fit_full_batch(model, x, y, 15, 0.05)
    return Case(model.eval(), x, y)


def snapshot(model):
    return (
        {n: m.training for n, m in model.named_modules()},
        {k: v.clone() for k, v in model.state_dict().items()},
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    )


def assert_unchanged(model, snap):
    modes, state, grads = snap
    assert {n: m.training for n, m in model.named_modules()} == modes
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)


@pytest.mark.parametrize("name", ["mlp", "bn_cnn"])
@pytest.mark.parametrize("dtype, tol, bound", [(None, 1e-5, 1e-3), ("float64", 1e-8, 1e-8)])
def test_top5_matches_dense_eigvalsh(request, name, dtype, tol, bound):
    case = request.getfixturevalue(name)
    model = case.model.train() if name == "bn_cnn" else case.model  # eval() is applied inside
    snap = snapshot(model)
    result = top_eigenvalues(model, case.data, k=5, dtype=dtype, tol=tol)
    assert_unchanged(model, snap)
    exact = case.eigenvalues[:5]
    assert float(((result.eigenvalues - exact).abs() / exact.abs()).max()) <= bound
    assert all(result.converged)
    assert result.hvp_count == result.num_lanczos_steps <= 100
    assert result.meta.num_params == case.H.shape[0]
    assert result.meta.num_samples == len(case.data[1])
    assert result.meta.extra["hvp_mode"] in ("forward", "reverse")
    assert result.meta.dtype == (dtype or "float32")
    case.model.eval()


def test_a_float32_tol_below_the_noise_floor_is_warned_about(mlp):
    """float32, tol 1e-10: λ1 was flagged converged (Ritz residual 6e-11) with a true
    residual of 5e-7; the flag cannot vouch for more than the products' accuracy."""
    with pytest.warns(RuntimeWarning, match="tol 1e-10 is below the noise floor of float32"):
        top_eigenvalues(mlp.model, mlp.data, k=2, tol=1e-10, max_steps=12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float64, or float32 at the default tol: silent
        top_eigenvalues(mlp.model, mlp.data, k=2, tol=1e-10, max_steps=12, dtype="float64")
        top_eigenvalues(mlp.model, mlp.data, k=2, max_steps=12)
        # a tol that is no number > 0 is only an error, not first a warning (session 21)
        with pytest.raises(SharpscopeError, match="tol must be a number > 0, got -1"):
            top_eigenvalues(mlp.model, mlp.data, k=2, tol=-1, max_steps=12)
        with pytest.raises(SharpscopeError, match=r"tol must be a number, got '1e-3' \(str\)"):
            top_eigenvalues(mlp.model, mlp.data, k=2, tol="1e-3", max_steps=12)


def test_more_than_100_eigenvalues_need_no_max_steps_from_python_either(mlp):
    """The CLI's default max(100, 2k + 10) is the library's: k = 110 failed with
    "max_steps=100 must be >= k" from Python while `spectrum --k 110` worked."""
    result = top_eigenvalues(mlp.model, mlp.data, k=110, dtype="float64", tol=1e-8)
    assert result.hvp_count == mlp.H.shape[0]  # 2k + 10 = 230 steps, capped at P = 123
    exact = mlp.eigenvalues[:110]
    assert float(((result.eigenvalues - exact).abs()).max()) <= 1e-8 * float(exact.abs().max())


def test_a_spectrum_has_the_residuals_and_flags_its_json_has(mlp, tmp_path):
    result = spectrum(mlp.model, mlp.data, k=3, skip=("trace", "density"))
    assert result.residuals is result.top.residuals and result.converged == result.top.converged
    saved = json.loads(result.save(tmp_path / "s.json").read_text())
    assert saved["residuals"] == pytest.approx(result.residuals.tolist())
    assert saved["converged"] == result.converged


def test_a_float64_model_takes_float32_data_as_the_other_analyses_do(mlp):
    """analysis.md's "model cast to double" check: a float64 copy of the model with the
    float32 data runs (the data follow the model's dtype) and matches the dense Hessian."""
    model = copy.deepcopy(mlp.model).double()
    result = top_eigenvalues(model, mlp.data, k=3, tol=1e-10)
    exact = dense_hessian(
        model, tuple(t.double() if t.is_floating_point() else t for t in mlp.data)
    )
    top = torch.linalg.eigvalsh(exact).flip(0)[:3]
    torch.testing.assert_close(result.eigenvalues.double(), top, rtol=1e-8, atol=0)
    assert result.meta.dtype == "float64"


def test_most_negative_eigenvalues(mlp):
    result = top_eigenvalues(mlp.model, mlp.data, k=2, which="SA", dtype="float64", tol=1e-8)
    exact = mlp.eigenvalues[-2:]  # descending order: the less negative first
    assert exact[-1] < 0
    torch.testing.assert_close(result.eigenvalues, exact, rtol=1e-8, atol=0)
    assert result.lambda_max is None and result.ratio is None


def test_eigenvectors_are_unit_ritz_vectors_in_parameter_order(mlp, tmp_path):
    result = top_eigenvalues(mlp.model, mlp.data, k=3, dtype="float64", return_eigenvectors=True)
    Y = result.eigenvectors
    assert Y.shape == (3, mlp.H.shape[0])
    residual = torch.linalg.vector_norm(Y @ mlp.H - result.eigenvalues[:, None] * Y, dim=1)
    assert float(residual.max()) <= 1e-5 * float(result.eigenvalues[0])
    assert result.meta.extra["param_names"] == [n for n, _ in mlp.model.named_parameters()]
    loaded = TopEigs.load(result.save(tmp_path / "eig.npz"))
    torch.testing.assert_close(loaded.eigenvectors, Y)


def test_trace_methods_against_the_exact_trace(mlp):
    exact = float(torch.trace(mlp.H))
    for method in ("hutchpp", "hutchinson"):
        est = hessian_trace(mlp.model, mlp.data, method=method, dtype="float64", seed=1)
        assert abs(est.trace - exact) <= 4 * est.stderr, method
    assert est.num_probes == 100 and est.hvp_count == 100


def test_density_resmooths_without_hvps_and_deflates(mlp):
    op = HessianOperator(mlp.model, mlp.data, dtype="float64")
    density = spectral_density(op, num_probes=3, num_lanczos_steps=30, deflate=2)
    count = op.hvp_count
    again = density.resmooth("papyan", num_points=200)
    assert op.hvp_count == count
    assert again.kernel == "papyan" and again.grid.shape == (200,)
    torch.testing.assert_close(again.nodes, density.nodes)
    torch.testing.assert_close(density.deflated, mlp.eigenvalues[:2], rtol=1e-6, atol=0)
    assert float(density.nodes.max()) < float(mlp.eigenvalues[2]) + 1e-6
    assert density.bulk_fraction == pytest.approx((mlp.H.shape[0] - 2) / mlp.H.shape[0])
    # deflation needs the vectors, not their true residuals (k products each)
    lanczos_only = top_eigenvalues(mlp.model, mlp.data, k=2, dtype="float64", tol=1e-5)
    assert count == lanczos_only.hvp_count + 3 * 30
    full = spectrum(
        mlp.model, mlp.data, k=5, deflate=3, num_probes=1, num_lanczos_steps=5, dtype="float64"
    )
    top = top_eigenvalues(mlp.model, mlp.data, k=5, dtype="float64")
    assert full.meta.extra["hvp_count_parts"]["top"] == top.hvp_count  # the top-k reused


def test_spectrum_json_has_the_interface_keys(bn_cnn, tmp_path):
    result = spectrum(bn_cnn.model, bn_cnn.data, num_probes=2, num_lanczos_steps=15, seed=3)
    data = json.loads(result.to_json())
    assert SPECTRUM_JSON_KEYS <= set(data)
    assert {"grid", "values"} <= set(data["density"])
    assert data["lambda_max"] == pytest.approx(float(bn_cnn.eigenvalues[0]), rel=1e-3)
    assert data["ratio"] == pytest.approx(data["lambda_max"] / data["lambda_5"])
    assert data["hvp_count"] == result.top.hvp_count + 99 + 2 * 15
    assert data["meta"]["extra"]["seeds"] == {"top": 3, "trace": 4, "density": 5}
    loaded = Spectrum.load(result.save(tmp_path / "s.json"))
    torch.testing.assert_close(loaded.eigenvalues, result.eigenvalues)
    assert loaded.trace == result.trace and loaded.meta == result.meta
    assert isinstance(loaded.density, Density)


def test_a_nan_trace_is_null_in_strict_json(mlp):
    """Acceptance s22: a NaN trace (an overflowing model) went to the file as a bare NaN
    token, which strict JSON readers (JavaScript, jq's strict mode, Perl) refuse."""
    import dataclasses

    result = spectrum(mlp.model, mlp.data, k=3, num_probes=2, num_lanczos_steps=10, seed=4)
    nan_trace = dataclasses.replace(
        result, trace_estimate=dataclasses.replace(result.trace_estimate, trace=float("nan"))
    )

    def refuse(token):
        raise ValueError(token)

    data = json.loads(nan_trace.to_json(), parse_constant=refuse)
    assert data["trace"] is None


def test_skipped_parts_cost_nothing_and_are_null_in_the_json(mlp, tmp_path):
    """skip=("trace", "density"): the same top-k (same seed) for the top-k's products only."""
    full = spectrum(mlp.model, mlp.data, k=3, num_probes=2, num_lanczos_steps=10, seed=4)
    top_only = spectrum(mlp.model, mlp.data, k=3, seed=4, skip=("trace", "density"))
    torch.testing.assert_close(top_only.eigenvalues, full.eigenvalues, rtol=0, atol=0)
    assert top_only.hvp_count == top_only.top.hvp_count == full.top.hvp_count
    assert top_only.parts == ("top",) and full.parts == ("top", "trace", "density")
    assert top_only.trace is None and top_only.trace_stderr is None and top_only.grid is None
    data = json.loads(top_only.to_json())
    assert SPECTRUM_JSON_KEYS <= set(data)
    assert data["trace"] is data["trace_stderr"] is data["density"] is None
    assert data["parts"] == ["top"] and data["lambda_max"] == full.lambda_max
    loaded = Spectrum.load(top_only.save(tmp_path / "top.json"))
    assert loaded.trace_estimate is None and loaded.density is None
    torch.testing.assert_close(loaded.eigenvalues, top_only.eigenvalues)
    no_density = spectrum(mlp.model, mlp.data, k=3, seed=4, skip="density")
    assert no_density.trace == full.trace and no_density.density is None
    from sharpscope.plotting.spectrum import plot_spectrum

    with pytest.raises(SharpscopeError, match="without its density"):
        plot_spectrum(top_only)


def test_spectrum_traces_agree_within_error_bars(mlp):
    result = spectrum(mlp.model, mlp.data, dtype="float64", num_probes=10, num_lanczos_steps=40)
    exact = float(torch.trace(mlp.H))
    combined = math.hypot(result.trace_stderr, result.density.trace_stderr)
    assert abs(result.trace - result.density.trace) <= 4 * combined
    assert abs(result.trace - exact) <= 4 * result.trace_stderr


def test_top_eigs_keeps_the_signs_and_takes_the_fifth_value():
    """Eigenvalues -1 ... -6: λmax is the signed λ1 = -1 (not max |λ| = 6), λ5 = -5 (not
    the last value) and the ratio 0.2."""
    top = TopEigs(
        eigenvalues=-torch.arange(1.0, 7.0, dtype=torch.float64),
        residuals=torch.zeros(6, dtype=torch.float64),
        converged=[True] * 6,
    )
    assert top.lambda_max == -1.0 and top.lambda_5 == -5.0
    assert top.ratio == pytest.approx(0.2, rel=1e-15)


def test_density_trace_and_negative_mass_count_the_deflated_eigenvalues():
    """A bulk of dim 4 with nodes (-1, 2) of weight 1/2, deflated (10, -3): trace
    4·0.5 + 10 - 3 = 9 and negative mass (0.5·4 + 1)/6."""
    density = Density.from_quadrature(
        np.array([[-1.0, 2.0]]),
        np.array([[0.5, 0.5]]),
        dim=4,
        deflated=torch.tensor([10.0, -3.0], dtype=torch.float64),
    )
    assert density.trace == pytest.approx(9.0, rel=1e-12)
    assert density.negative_mass == pytest.approx(3 / 6, rel=1e-12)
    assert density.bulk_fraction == pytest.approx(4 / 6)


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_spectrum_deflates_the_requested_number_of_largest_eigenvalues(mlp, which):
    """deflate=2 with k=5 removes the two largest (LA) eigenvalues of the dense Hessian,
    whatever `which` the top-k used (not all five reused pairs, not the SA ones)."""
    result = spectrum(
        mlp.model,
        mlp.data,
        k=5,
        which=which,
        deflate=2,
        num_probes=2,
        num_lanczos_steps=10,
        tol=1e-10,
        dtype="float64",
    )
    torch.testing.assert_close(result.density.deflated, mlp.eigenvalues[:2], rtol=1e-6, atol=0)


def test_ratio_is_null_when_lambda_5_is_zero_to_within_its_residual():
    """A rank-4 Hessian's λ5 is ±rounding: λ1/λ5 would be ±1e8...1e29 with a random sign."""
    top = TopEigs(
        eigenvalues=torch.tensor([4.0, 3.0, 2.0, 1.0, -2.5e-9], dtype=torch.float64),
        residuals=torch.full((5,), 1e-7, dtype=torch.float64),
        converged=[True] * 5,
    )
    assert top.lambda_5 == pytest.approx(-2.5e-9) and top.ratio is None
    resolved = dataclasses.replace(top, eigenvalues=torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5]))
    assert resolved.ratio == pytest.approx(8.0)


def test_lambda_5_is_null_below_five(mlp):
    data = json.loads(
        spectrum(mlp.model, mlp.data, k=3, num_probes=1, num_lanczos_steps=5).to_json()
    )
    assert data["lambda_5"] is None and data["ratio"] is None and len(data["eigenvalues"]) == 3


def test_same_seed_same_answer(mlp):
    a = spectrum(mlp.model, mlp.data, num_probes=2, num_lanczos_steps=10, trace_probes=9)
    b = spectrum(mlp.model, mlp.data, num_probes=2, num_lanczos_steps=10, trace_probes=9)
    torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=0, atol=0)
    assert a.trace == b.trace
    np.testing.assert_array_equal(a.density.nodes.numpy(), b.density.nodes.numpy())


def test_meta_is_extended_not_replaced(mlp):
    meta = RunMeta(checkpoint="ck.pt", data={"name": "blobs"})
    result = top_eigenvalues(mlp.model, mlp.data, k=1, meta=meta)
    assert result.meta.checkpoint == "ck.pt" and result.meta.data == {"name": "blobs"}
    assert result.meta.num_samples == 50 and result.meta.mode == "eval"


def test_pyhessian_backend_through_the_api(mlp):
    pytest.importorskip("pyhessian")
    result = spectrum(
        mlp.model, mlp.data, k=2, backend="pyhessian", num_probes=1, num_lanczos_steps=5
    )
    assert result.top.backend == "pyhessian" and result.trace_estimate.backend == "pyhessian"
    assert result.lambda_max == pytest.approx(float(mlp.eigenvalues[0]), rel=1e-2)
    assert result.meta.extra["pyhessian_hvps"] > 0
    assert result.density.num_lanczos_steps == 5  # sharpscope's SLQ


def test_pyhessian_pairs_are_flagged_by_their_residuals(mlp):
    """PyHessian stops on a relative change of 1e-3: at tol 1e-12 its pairs must not be
    flagged converged, and each flag is residual <= tol·max|λ|."""
    pytest.importorskip("pyhessian")
    result = top_eigenvalues(mlp.model, mlp.data, k=2, backend="pyhessian", tol=1e-12)
    scale = float(result.eigenvalues.abs().max())
    assert result.converged == [bool(r <= 1e-12 * scale) for r in result.residuals]
    assert not any(result.converged)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, d: top_eigenvalues(m, d, k=10_000), "larger than the number of parameters"),
        (lambda m, d: top_eigenvalues(m, d, backend="torch"), "unknown backend"),
        (
            lambda m, d: top_eigenvalues(m, d, backend="pyhessian", which="SA"),
            "pyhessian backend takes only which LA, the default, not SA",
        ),
        (
            lambda m, d: spectrum(m, d, backend="pyhessian", which="LM"),
            "sharpscope backend for SA or LM",
        ),
        (lambda m, d: hessian_trace(m, d, method="exact"), "unknown trace method"),
        (lambda m, d: top_eigenvalues(m, d, which="XX"), "which"),
        (lambda m, d: top_eigenvalues(m, d, colour="red"), "unknown option"),
        (lambda m, d: top_eigenvalues(m, None), "no data"),
        (lambda m, d: spectrum(m, d, skip=("top",)), "cannot skip 'top'"),
        (lambda m, d: spectrum(m, d, skip=("density",), deflate=2), "density, which is skipped"),
        (lambda m, d: top_eigenvalues(copy.deepcopy(m).requires_grad_(False), d), "trainable"),
    ],
)
def test_bad_input_is_one_clear_line(mlp, call, message):
    with pytest.raises(SharpscopeError, match=message) as info:
        call(mlp.model, mlp.data)
    assert "\n" not in str(info.value)


def test_non_finite_loss_names_the_cause(mlp):
    x, y = mlp.data
    bad = x.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(SharpscopeError, match="not finite"):
        top_eigenvalues(mlp.model, (bad, y))


class SqrtNet(nn.Module):
    """Finite loss and gradient, but sqrt''(0) = -inf: ReLU units that are exactly 0 give
    Hessian-vector products with inf and NaN entries."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.sqrt(torch.relu(self.a(x))))


@pytest.mark.parametrize(
    "call",
    [
        lambda m, d: top_eigenvalues(m, d, k=1),
        lambda m, d: top_eigenvalues(m, d, k=1, hvp_mode="forward"),
        lambda m, d: top_eigenvalues(m, d, k=1, hvp_mode="reverse"),
        lambda m, d: top_eigenvalues(m, d, k=1, block_size=2),
        lambda m, d: top_eigenvalues(m, d, k=1, restart_size=12),
        lambda m, d: top_eigenvalues(m, d, k=1, backend="pyhessian"),
        lambda m, d: hessian_trace(m, d),
        lambda m, d: hessian_trace(m, d, method="hutchinson", num_probes=10),
        lambda m, d: hessian_trace(m, d, backend="pyhessian"),
        lambda m, d: spectral_density(m, d, num_probes=2, num_lanczos_steps=10),
        lambda m, d: spectrum(m, d, k=1, skip=("density",)),
        lambda m, d: landscape(m, d, dims=1, grid=3, directions="eigen"),
    ],
    ids=[
        "top",
        "top-forward",
        "top-reverse",
        "top-block",
        "top-thick-restart",
        "top-pyhessian",
        "trace-hutchpp",
        "trace-hutchinson",
        "trace-pyhessian",
        "density",
        "spectrum",
        "landscape-eigen",
    ],
)
def test_b1_a_non_finite_hessian_vector_product_is_one_line_naming_the_cause(call):
    """Stress B1 (session 28): NaN reached LAPACK (numpy LinAlgError traceback) or came
    back as a trace of NaN, silently; the pre-flight only checked the loss and gradient."""
    torch.manual_seed(0)
    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
    model = SqrtNet()
    with torch.no_grad():
        assert math.isfinite(float(nn.functional.cross_entropy(model(x), y)))
    with pytest.raises(SharpscopeError, match="Hessian-vector product is not finite") as info:
        call(model, (x, y))
    assert "\n" not in str(info.value) and "second derivative" in str(info.value)


@pytest.mark.parametrize("tol", [math.inf, 1.0, 2.0, math.nan, 0.0, -1.0])
@pytest.mark.parametrize(
    "call",
    [
        lambda m, d, tol: top_eigenvalues(m, d, k=2, tol=tol),
        lambda m, d, tol: top_eigenvalues(m, d, k=2, tol=tol, backend="pyhessian"),
        lambda m, d, tol: top_eigenvalues(m, d, k=2, tol=tol, block_size=2),
        lambda m, d, tol: top_eigenvalues(m, d, k=2, tol=tol, restart_size=8),
        lambda m, d, tol: spectrum(m, d, k=2, tol=tol),
    ],
    ids=["lanczos", "pyhessian", "block", "thick-restart", "spectrum"],
)
def test_b6_a_tol_outside_0_1_is_one_line_before_any_product(mlp, call, tol):
    """Stress B6 (session 28): tol=inf was taken; λ1 came back 0.032 (true 0.623) flagged
    converged after two products."""
    model = copy.deepcopy(mlp.model)
    model.register_forward_hook(lambda *_: pytest.fail("a forward pass ran"))
    with pytest.raises(SharpscopeError, match=r"^tol must be (a number > 0|< 1 )") as info:
        call(model, mlp.data, tol)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("seed", range(8))
def test_b2_a_float32_model_gets_the_multiplicities_of_mean_mse(seed):
    """Stress B2 (session 28): mean MSE with 5 examples, 30 features and 10 outputs (five
    distinct values, each ten times): float32 reported 5.102 three times and 2.2198 twice,
    all flagged converged (seeds 0 and 3), where float64 gives 5.102 five times."""
    N, d, C = 5, 30, 10
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, d, generator=g) * torch.linspace(0.3, 2.0, d)
    Y = torch.randn(N, C, generator=g)
    torch.manual_seed(seed)
    model = nn.Linear(d, C)
    exact = torch.linalg.eigvalsh(dense_hessian(model, (X, Y), loss="mse"))  # float64
    result = top_eigenvalues(model, (X, Y), k=5, loss="mse")
    torch.testing.assert_close(result.eigenvalues, exact.flip(0)[:5], rtol=1e-5, atol=0)


def test_plot_has_a_log_axis_with_a_floor_and_marks_the_top_eigenvalues(mlp, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from sharpscope.plotting.spectrum import FLOOR, plot_spectrum, save_spectrum_plot

    result = spectrum(mlp.model, mlp.data, k=3, num_probes=2, num_lanczos_steps=10)
    fig = plot_spectrum(result)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_ylim()[0] == pytest.approx(FLOOR)
    marked = [line.get_xdata()[0] for line in ax.lines[1:]]
    assert marked == pytest.approx(result.eigenvalues.tolist())
    assert min(ax.lines[0].get_ydata()) >= FLOOR
    assert "eval mode" in ax.get_title() and "ghorbani" in ax.get_title()
    written = save_spectrum_plot(result, tmp_path / "density.pdf")
    assert [p.suffix for p in written] == [".pdf", ".png"] and all(p.exists() for p in written)


def test_progress_hook_counts_every_hessian_vector_product():
    from sharpscope.analysis.spectrum import top_eigenvalues

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    seen = []
    result = top_eigenvalues(model, (x, y), k=2, progress=seen.append)
    assert sum(seen) == result.hvp_count > 0


def test_deflated_eigenvalues_carry_their_converged_flags():
    """analysis.md §2: never silently unconverged, also for the pairs deflated before SLQ."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    x, y = torch.randn(200, 20, dtype=torch.float64), torch.randint(0, 10, (200,))
    d = spectral_density(net, (x, y), num_probes=2, num_lanczos_steps=10, deflate=120)
    assert len(d.deflated_converged) == 120 == len(d.deflated)
    s = spectrum(net, (x, y), k=2, deflate=40, num_probes=2, num_lanczos_steps=10)
    assert len(s.density.deflated_converged) == 40
    exact = torch.linalg.eigvalsh(dense_hessian(net, (x, y))).flip(0)[:40]
    wrong = ((s.density.deflated - exact).abs() > 1e-4 * exact.abs()).tolist()
    assert not any(w and c for w, c in zip(wrong, s.density.deflated_converged))
    assert Density.from_dict(s.density.to_dict()).deflated_converged == s.density.deflated_converged


def test_pyhessian_top_values_are_largest_magnitude_so_a_negative_one_is_not_lambda_5():
    """PyHessian returns the k of largest |λ|: a negative fifth value need not be λ5."""
    from sharpscope.analysis.spectrum import TopEigs

    values = torch.tensor([3.0, 2.0, 1.5, 1.0, -4.0], dtype=torch.float64)
    kwargs = dict(residuals=torch.zeros(5, dtype=torch.float64), converged=[True] * 5)
    ours = TopEigs(eigenvalues=values, backend="sharpscope", **kwargs)
    theirs = TopEigs(eigenvalues=values, backend="pyhessian", **kwargs)
    assert ours.lambda_5 == -4.0  # the LA backend's fifth is λ5 whatever its sign
    assert theirs.lambda_max == 3.0 and theirs.lambda_5 is None and theirs.ratio is None


@pytest.mark.parametrize("mode", ["auto", "forward", "reverse"])
def test_pytorch_attention_layers_get_their_exact_hessian(mode):
    """nn.TransformerEncoderLayer's fused attention kernel has no double backward or
    forward-mode derivative; the operator runs PyTorch's math kernel (the same function)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = AttentionClassifier().double().eval()
    x, y = torch.randn(12, 5, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    with sdpa_kernel([SDPBackend.MATH]):
        H = finite_difference_hessian(model, x, y)
    exact = torch.linalg.eigvalsh(H).flip(0)[:2]  # central differences: 1e-10
    found = top_eigenvalues(model, (x, y), k=2, tol=1e-10, hvp_mode=mode).eigenvalues
    torch.testing.assert_close(found, exact, rtol=1e-7, atol=1e-9)


def test_inside_inference_mode_the_analyses_say_so():
    from sharpscope.analysis.msharpness import m_sharpness
    from sharpscope.analysis.spectrum import top_eigenvalues

    torch.manual_seed(0)
    model, data = nn.Linear(4, 3), (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    with torch.inference_mode():
        for run in (
            lambda: top_eigenvalues(model, data, k=1),
            lambda: m_sharpness(model, data, 4, 0.05),
        ):
            with pytest.raises(SharpscopeError, match="inside torch.inference_mode"):
                run()


def test_block_size_finds_the_multiplicity_single_vector_lanczos_misses():
    """Mean MSE with C = 10 outputs: H = (2/(NC)) I_C ⊗ XᵀX repeats each value 10 times; with
    30 features single-vector Lanczos converges first and shows each value once."""
    torch.manual_seed(0)
    d, outputs = 30, 10
    model = nn.Linear(d, outputs).double()
    x = torch.randn(200, d, dtype=torch.float64) * torch.linspace(0.2, 3, d, dtype=torch.float64)
    y = torch.randn(200, outputs, dtype=torch.float64)
    exact = torch.linalg.eigvalsh(dense_hessian(model, (x, y), "mse")).flip(0)[:5]
    torch.testing.assert_close(exact, exact[:1].expand(5))  # λ1 five times (ten, in fact)
    found = top_eigenvalues(model, (x, y), 5, "mse", tol=1e-8, block_size=10, max_steps=200)
    torch.testing.assert_close(found.eigenvalues, exact, rtol=1e-8, atol=0)
    assert all(found.converged) and found.ratio == pytest.approx(1.0)
    assert found.meta.extra["block_size"] == 10
    with pytest.raises(SharpscopeError, match="does not take eigenvectors"):
        top_eigenvalues(model, (x, y), 5, "mse", block_size=10, return_eigenvectors=True)
    with pytest.raises(SharpscopeError, match="block_size must be an integer >= 1"):
        top_eigenvalues(model, (x, y), 5, "mse", block_size=0)


@pytest.mark.parametrize(
    ("method", "probes", "message"),
    [
        ("hutchpp", 20, r"^Hutch\+\+ needs a multiple of 3 probes \(>= 6\), got 20$"),
        ("hutchinson", 1, r"^Hutchinson needs at least 2 probes, got 1$"),
    ],
)
def test_a_bad_trace_budget_is_refused_before_the_top_k_runs(method, probes, message):
    """ss.spectrum refused it only after the top-k's products (the command line checked it
    first already; session 26)."""
    import sharpscope as ss

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    seen = []
    with pytest.raises(SharpscopeError, match=message):
        ss.spectrum(
            model,
            (x, y),
            k=2,
            trace_method=method,
            trace_probes=probes,
            skip=("density",),
            progress=seen.append,
        )
    assert seen == []  # no product was spent


def test_resmooth_refuses_bad_arguments_in_one_line():
    density = Density.from_quadrature(np.array([[0.0, 2.0]]), np.array([[0.5, 0.5]]), dim=2)
    for options in (
        {"num_points": 1},
        {"sigma": 0.0},
        {"sigma": float("nan")},
        {"sigma": -1.0},
        {"kernel": "papyan", "kappa": 1.0},
        {"kernel": "papyan", "kappa": 0.5},
    ):
        with pytest.raises(SharpscopeError) as info:
            density.resmooth(**options)
        assert "\n" not in str(info.value), options
    assert density.resmooth(sigma=0.5).sigma == 0.5


def test_spectrum_refuses_deflating_every_direction_before_the_top_k():
    # deflate=P with k=P reused the top-k's vectors: the top-k ran (P products), then SLQ
    # failed with "Lanczos needs at least one step, got num_steps=10"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2))
    data = (torch.randn(30, 2), torch.randint(0, 2, (30,)))
    op = HessianOperator(model, data, hvp_mode="reverse")
    assert op.dim == 17
    before = op.hvp_count
    for deflate in (17, 18):
        with pytest.raises(
            SharpscopeError, match=f"deflate={deflate} must be < the number of parameters \\(17\\)"
        ):
            spectrum(op, k=17, deflate=deflate, num_lanczos_steps=10)
    with pytest.raises(SharpscopeError, match="deflate must be >= 0"):
        spectrum(op, k=3, deflate=-1, num_lanczos_steps=10)
    assert op.hvp_count == before  # refused before any product
    with pytest.raises(SharpscopeError, match="deflate=17 must be < the number of parameters"):
        spectral_density(op, deflate=17)
    result = spectrum(op, k=17, deflate=16, num_probes=1, num_lanczos_steps=1)
    assert result.density is not None and len(result.density.deflated) == 16


def test_a_mixed_dtype_model_records_its_least_precise_dtype():
    class Mixed(nn.Module):  # float64 first layer, float32 head
        def __init__(self) -> None:
            super().__init__()
            self.a, self.c = nn.Linear(4, 6).double(), nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.a(x.to(self.a.weight.dtype)))
            return self.c(h.to(self.c.weight.dtype))

    torch.manual_seed(0)
    model, data = Mixed(), (torch.randn(30, 4), torch.randint(0, 3, (30,)))
    exact = torch.linalg.eigvalsh(dense_hessian(model, data)).flip(0)
    result = top_eigenvalues(model, data, k=2)
    torch.testing.assert_close(result.eigenvalues, exact[:2], rtol=1e-5, atol=0)
    assert result.meta.dtype == "float32"
    assert result.meta.extra["mixed_dtypes"] == ["float32", "float64"]
    trace = hessian_trace(model, data)  # P = 51 <= 99 probes: the exact path
    assert trace.trace == pytest.approx(float(exact.sum()), rel=1e-5)


def test_top_eigenvalues_with_a_block_returns_k_values():
    # block_size=2 with max_steps=5 ran two whole blocks and returned 4 values: TopEigs.k
    # was 4 and lambda_5 None, silently
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    data = (torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 3, (20,)))
    result = top_eigenvalues(model, data, k=5, block_size=2, max_steps=5)
    assert result.k == 5 and len(result.converged) == 5 and result.lambda_5 is not None
    assert result.hvp_count == 5


@pytest.mark.parametrize(
    "function, options, message",
    [
        ("hessian_trace", {"probes": 3}, "unknown option 'probes'; did you mean 'num_probes'?"),
        (
            "spectral_density",
            {"lanczos_steps": 3},
            "unknown option 'lanczos_steps'; did you mean 'num_lanczos_steps'?",
        ),
        ("top_eigenvalues", {"tolerance": 1e-3}, "unknown option 'tolerance'"),
    ],
)
def test_an_unknown_option_names_the_option_meant(function, options, message):
    """precision doubt 7 (session 31): `hessian_trace(probes=30)` said "unknown option:
    HessianOperator.__init__() got an unexpected keyword argument 'probes'", naming a class
    the caller never called, and not the option it has (the command line's --probes)."""
    import sharpscope as ss

    torch.manual_seed(0)
    data = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
    with pytest.raises(SharpscopeError) as info:
        getattr(ss, function)(nn.Linear(4, 2), data, **options)
    assert str(info.value) == message
