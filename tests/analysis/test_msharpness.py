"""m-sharpness against exact answers (analysis.md §5, "Validation")."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from scipy.optimize import brentq
from torch import nn

from sharpscope.analysis._functional import ParamLayout, flat_parameters
from sharpscope.analysis.msharpness import (
    MSharpness,
    PerturbationSet,
    _ascend,
    apgd_checkpoints,
    m_sharpness,
    project_ellipsoid,
)
from sharpscope.errors import SharpscopeError
from sharpscope.optim._ops import NORM_EPS
from sharpscope.optim.asam import adaptive_perturbation

from cases import (
    RecurrentClassifier,
    bn_conv1d,
    half_mse,
    linear_regression,
    rendezvous_file,
    spawned_group,
)

torch.set_num_threads(1)
F64 = torch.float64


def subset_quadratics(model, x, y, m):
    """(g_j, A_j) of L_j(w+ε) − L_j(w) = g_jᵀε + ½εᵀA_jε for each subset."""
    w = model.weight.detach()[0]
    out = []
    for j in range(len(y) // m):
        xj, yj = x[j * m : (j + 1) * m], y[j * m : (j + 1) * m]
        out.append((xj.T @ (xj @ w - yj) / m, xj.T @ xj / m))
    return out


def trust_region_max(g, a, rho):
    """max_{‖ε‖ ≤ ρ} gᵀε + ½εᵀAε (secular equation; ½ρ²λ_max when g = 0)."""
    lam, q = np.linalg.eigh(a.numpy())
    gh = q.T @ g.numpy()
    if np.linalg.norm(gh) < 1e-14:
        return 0.5 * rho**2 * lam[-1]

    def norm_minus_rho(mu):
        return np.sqrt(np.sum(gh**2 / (mu - lam) ** 2)) - rho

    lo = lam[-1] + 1e-12
    hi = lam[-1] + np.linalg.norm(gh) / rho + 1.0
    mu = brentq(norm_minus_rho, lo, hi, xtol=1e-15)
    eps = q @ (gh / (mu - lam))
    return float(g.numpy() @ eps + 0.5 * eps @ a.numpy() @ eps)


def relu_mlp(seed=0, dtype=F64):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)
    ).to(dtype)


def classification_data(n=32, d=4, classes=3, seed=1, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


def bn_cnn(dtype=F64):
    return bn_conv1d(1, 12, dtype=dtype)


# --- closed forms on quadratics -------------------------------------------------------------


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize(("adaptive", "eta"), [(False, 0.0), (True, 0.0), (True, 0.25)])
def test_one_step_equals_sam_perturbation_closed_form(norm, adaptive, eta):
    model, x, y = linear_regression(24, 5)
    m, rho = 6, 0.3
    r = m_sharpness(
        model, (x, y), m=m, rho=rho, adaptive=adaptive, eta=eta, norm=norm, loss=half_mse
    )
    w = model.weight.detach()[0]
    t = w.abs() + eta if adaptive else torch.ones_like(w)
    expected = []
    for g, a in subset_quadratics(model, x, y, m):
        if norm == "l2":
            eps = rho * t * t * g / (t * g).norm()  # ρ‖g‖ + ½ρ²ĝᵀAĝ when T = I
        else:
            eps = rho * t * torch.sign(g)
        expected.append(max(float(g @ eps + 0.5 * eps @ a @ eps), 0.0))
    torch.testing.assert_close(
        r.per_subset, torch.tensor(expected, dtype=F64), rtol=1e-10, atol=1e-12
    )
    assert r.sharpness == pytest.approx(np.mean(expected), rel=1e-10)
    assert r.num_subsets == 4 and r.num_samples_used == 24
    if norm == "l2" and not adaptive:  # the spec's form ρ‖g‖ + ½ρ²ĝᵀAĝ
        g, a = subset_quadratics(model, x, y, m)[0]
        gh = g / g.norm()
        assert r.per_subset[0].item() == pytest.approx(
            float(rho * g.norm() + 0.5 * rho**2 * gh @ a @ gh), rel=1e-10
        )


def test_multistep_reaches_trust_region_solution():
    model, x, y = linear_regression(24, 5, seed=3)
    m, rho = 8, 0.5
    r = m_sharpness(model, (x, y), m=m, rho=rho, steps=20, loss=half_mse)
    exact = [trust_region_max(g, a, rho) for g, a in subset_quadratics(model, x, y, m)]
    for found, best in zip(r.per_subset.tolist(), exact):
        assert best * 0.99 <= found <= best * (1 + 1e-9)
    one_step = m_sharpness(model, (x, y), m=m, rho=rho, steps=1, loss=half_mse)
    assert (r.per_subset >= one_step.per_subset - 1e-12).all()


def ellipsoid_maxima(model, x, y, m, rho):
    """max_{‖ε/|w|‖ ≤ ρ} gᵀε + ½εᵀAε per subset: the trust region in u = ε/|w|, (Tg, TAT)."""
    t = model.weight.detach()[0].abs()
    return [
        trust_region_max(t * g, t[:, None] * a * t[None], rho)
        for g, a in subset_quadratics(model, x, y, m)
    ]


def test_adaptive_multistep_reaches_the_ellipsoid_trust_region_maximum():
    """projection="rescale": 20 steps reach ≥ 99% of the exact ellipsoid maximum (§5)."""
    model, x, y = linear_regression(24, 5, seed=3)
    m, rho = 8, 0.5
    r = m_sharpness(
        model, (x, y), m=m, rho=rho, steps=20, adaptive=True, loss=half_mse, projection="rescale"
    )
    for found, best in zip(r.per_subset.tolist(), ellipsoid_maxima(model, x, y, m, rho)):
        assert 0.99 * best <= found <= best * (1 + 1e-9)


def test_adaptive_exact_projection_lies_between_one_step_and_the_maximum():
    """projection="exact" can stall below the ellipsoid maximum (its fixed points have
    ∇L ∝ T⁻³δ, not T⁻²δ; 96-99% of it here): what it reports is still feasible (≤ the
    maximum) and at least the one-step value (35-84% here)."""
    model, x, y = linear_regression(24, 5, seed=4)
    m, rho = 8, 0.5
    kw = {"m": m, "rho": rho, "adaptive": True, "loss": half_mse}
    many = m_sharpness(model, (x, y), steps=20, **kw)
    one = m_sharpness(model, (x, y), steps=1, **kw)
    assert many.projection == "exact"
    for found, first, best in zip(
        many.per_subset.tolist(), one.per_subset.tolist(), ellipsoid_maxima(model, x, y, m, rho)
    ):
        assert first - 1e-12 <= found <= best * (1 + 1e-9)


def test_exact_projection_that_loses_to_the_one_step_point_says_so():
    """On networks, Auto-PGD with the exact projection found nothing above SAM's ε̂ (a
    candidate beside it) in every subset: 20 steps cost 20x and reported the one-step
    value without a word. The warning counts those subsets; where the ascent wins (the
    quadratic of the test above) nothing is said."""
    import warnings

    from sharpscope.bench.msharpness import bench_data, bench_model

    model, (x, y) = bench_model(F64), bench_data(64, F64)  # cnn1d + BatchNorm, MNIST-1D
    kw = {"m": 16, "rho": 0.5, "adaptive": True}
    one = m_sharpness(model, (x, y), steps=1, **kw)
    with pytest.warns(RuntimeWarning, match="exact ellipsoid projection") as caught:
        many = m_sharpness(model, (x, y), steps=3, **kw)
    same = int((many.per_subset == one.per_subset).sum())
    assert same >= 2  # the ascent lost in at least half of the 4 subsets
    (message,) = [str(w.message) for w in caught if "ellipsoid" in str(w.message)]
    assert f"in {same} of 4 subsets" in message and "--projection rescale" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m_sharpness(model, (x, y), steps=3, projection="rescale", **kw)  # no ε̂ candidate
        # where the ascent beats the one-step point in most subsets
        model, (x, y) = relu_mlp(), classification_data(n=32)
        one = m_sharpness(model, (x, y), steps=1, m=8, rho=0.5, adaptive=True)
        many = m_sharpness(model, (x, y), steps=5, m=8, rho=0.5, adaptive=True)
        assert 2 * int((many.per_subset == one.per_subset).sum()) < 4


def test_adaptive_exact_projection_stalls_at_a_minimum_as_documented():
    """The docstring said 96-99.7% of the ellipsoid maximum; at the least-squares point of
    this quadratic "exact" stops at 91% for 20 and 100 steps alike (a fixed point; 91-98%
    over random starts, 92-98% from the rounding-level gradient), while "rescale" reaches
    ≥ 99% in 20 steps. A seeded random start keeps the rounding noise out of the test."""
    torch.manual_seed(0)
    n, d = 64, 12
    x = torch.randn(n, d, dtype=F64) * torch.linspace(0.2, 2, d, dtype=F64)
    y = torch.randn(n, dtype=F64)
    model = nn.Linear(d, 1, bias=False).double()
    w = torch.from_numpy(np.linalg.lstsq(x.numpy(), y.numpy(), rcond=None)[0])
    with torch.no_grad():
        model.weight.copy_(w[None])

    def mse(out, t):
        return (out.squeeze(-1) - t).pow(2).mean()

    t = w.abs()
    best = 0.5 * 0.5**2 * torch.linalg.eigvalsh(t[:, None] * (2 * x.T @ x / n) * t[None])[-1]
    kw = {"m": n, "rho": 0.5, "adaptive": True, "loss": mse, "random_start": True, "seed": 1}
    found = {
        (projection, steps): m_sharpness(
            model, (x, y), steps=steps, projection=projection, **kw
        ).sharpness
        / best.item()
        for projection in ("exact", "rescale")
        for steps in (20, 100)
    }
    assert 0.90 <= found["exact", 20] <= 0.92
    assert found["exact", 100] == pytest.approx(found["exact", 20], abs=1e-4)
    assert 0.99 <= found["rescale", 20] <= found["rescale", 100] <= 1 + 1e-9


def test_zero_gradient_worst_case_is_half_rho2_lambda_max():
    model, x, y = linear_regression(16, 4, seed=5, noise=False)  # every L_j at its minimum
    m, rho = 8, 0.2
    # from ε = 0 (the default) no gradient direction exists: the ascent starts randomly
    for random_start in (True, False):
        r = m_sharpness(
            model, (x, y), m=m, rho=rho, steps=20, random_start=random_start, loss=half_mse, seed=1
        )
        for found, (g, a) in zip(r.per_subset.tolist(), subset_quadratics(model, x, y, m)):
            assert g.norm() < 1e-12
            exact = 0.5 * rho**2 * torch.linalg.eigvalsh(a)[-1].item()
            assert exact * 0.99 <= found <= exact * (1 + 1e-9)
    one_step = m_sharpness(model, (x, y), m=m, rho=rho, steps=1, loss=half_mse)
    assert one_step.sharpness == 0.0  # SAM's own ε̂ = ρ∇/‖∇‖ is 0 at ∇ = 0


@pytest.mark.parametrize("steps", [1, 10])
def test_sharpness_non_decreasing_in_rho(steps):
    model, x, y = linear_regression(24, 5, seed=2)
    values = [
        m_sharpness(model, (x, y), m=6, rho=rho, steps=steps, loss=half_mse).sharpness
        for rho in (0.05, 0.1, 0.2, 0.4, 0.8)
    ]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[0] > 0


# --- projections ----------------------------------------------------------------------------


def test_ellipsoid_projection_is_exact():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(7, generator=g, dtype=F64) * 2 + 0.1
    s[3] = 0.0  # a zero weight has no budget
    z = torch.randn(5, 7, generator=g, dtype=F64) * 3
    z[:, 3] = 0.0
    z[4] = 0.01 * z[4]  # one point already inside
    rho = 0.7
    d = project_ellipsoid(z, s, rho)
    ps = PerturbationSet("l2", rho, s)
    assert (ps.constraint(d) <= rho * (1 + 1e-6)).all()
    torch.testing.assert_close(d[4], z[4])
    active = s > 0
    for zi, di in zip(z[:4], d[:4]):
        # exact KKT point: δ_i = z_i s_i²/(s_i² + μ), ‖δ/s‖ = ρ
        def phi(mu, zi=zi):
            return float(((zi * s / (s**2 + mu))[active]).norm() - rho)

        mu = brentq(phi, 0.0, float((zi * s).norm() / rho), xtol=1e-15)
        torch.testing.assert_close(di, zi * s**2 / (s**2 + mu), rtol=1e-6, atol=1e-9)
    # optimality against random feasible points
    for zi, di in zip(z[:4], d[:4]):
        u = torch.randn(2000, 7, generator=g, dtype=F64)
        u[:, 3] = 0
        u = u / u.norm(dim=-1, keepdim=True) * rho * torch.rand(2000, 1, generator=g, dtype=F64)
        cand = u * s  # ‖cand/s‖ ≤ ρ
        assert (ps.constraint(cand) <= rho + 1e-12).all()
        assert (cand - zi).norm(dim=-1).min() >= (di - zi).norm() - 1e-12


def test_ellipsoid_projection_is_strictly_feasible():
    """The final radial shrink makes ‖δ/s‖ ≤ ρ to rounding, as the docstring promises (not
    only to the Newton tolerance)."""
    g = torch.Generator().manual_seed(0)
    s = torch.rand(50, generator=g, dtype=F64) * 2 + 0.01
    z = torch.randn(200, 50, generator=g, dtype=F64) * 5
    d = project_ellipsoid(z, s, 0.3)
    assert ((d / s).norm(dim=-1) <= 0.3 * (1 + 1e-13)).all()


def test_linf_random_point_is_uniform_in_the_box():
    """A random L∞ start is uniform in [−ρ, ρ]: mean ≈ 0 (5 standard errors), both ends reached."""
    u = PerturbationSet("linf", 0.5).random_point(
        torch.Generator().manual_seed(0), 20000, torch.zeros(1, dtype=F64)
    )
    assert u.abs().max() <= 0.5
    assert abs(u.mean().item()) < 0.01 and u.min() < -0.49 and u.max() > 0.49


@pytest.mark.parametrize(
    ("norm", "adaptive", "projection"),
    [
        ("l2", False, "exact"),
        ("linf", False, "exact"),
        ("l2", True, "exact"),
        ("l2", True, "rescale"),
        ("linf", True, "exact"),
    ],
)
def test_every_iterate_keeps_the_constraint(norm, adaptive, projection):
    """Auto-PGD on a random indefinite quadratic: all queried points are feasible."""
    g = torch.Generator().manual_seed(4)
    rows, p, rho = 3, 6, 0.4
    a = torch.randn(rows, p, p, generator=g, dtype=F64)
    a = a + a.transpose(1, 2)
    b = torch.randn(rows, p, generator=g, dtype=F64)
    scale = torch.rand(p, generator=g, dtype=F64) + 0.2 if adaptive else None
    pset = PerturbationSet(norm, rho, scale, projection)
    queried = []

    def oracle(delta, need_grad):
        queried.append(delta.clone())
        f = (b * delta).sum(-1) + 0.5 * torch.einsum("ri,rij,rj->r", delta, a, delta)
        grad = b + torch.einsum("rij,rj->ri", a, delta)
        return f, grad if need_grad else None, torch.zeros(rows, dtype=F64)

    like = torch.zeros(p, dtype=F64)
    out = _ascend(
        oracle,
        rows,
        p,
        like,
        pset,
        15,
        random_start=True,
        restarts=2,
        seeds=[(0, i) for i in range(rows)],
    )
    assert len(queried) == 1 + 2 * (1 + 15)
    for delta in queried:
        assert (pset.constraint(delta) <= rho * (1 + 1e-6)).all()
    assert (out.best_loss >= out.clean_loss).all()


def test_apgd_checkpoints_follow_the_schedule():
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99, 100]
    assert apgd_checkpoints(2) == [1, 2]


# --- Auto-PGD against a reference -----------------------------------------------------------


def wavy_quadratics(rows, p, seed, freq=(1.0, 4.0)):
    """Row r: f_r(δ) = Σ_i sin(a_ri δ_i) + b_rᵀδ + ½δᵀA_rδ (A_r indefinite), its gradient, and
    an error count that changes with δ at every point (so that points can be told apart)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, p, p, generator=g, dtype=F64)
    a = a + a.transpose(1, 2)
    b = torch.randn(rows, p, generator=g, dtype=F64)
    lo, hi = freq
    k = lo + (hi - lo) * torch.rand(rows, p, generator=g, dtype=F64)

    def value_grad(delta):
        quad = torch.einsum("rij,rj->ri", a, delta)
        f = torch.sin(k * delta).sum(-1) + (b * delta).sum(-1) + 0.5 * (delta * quad).sum(-1)
        wrong = torch.floor(delta.sum(-1) * 1e6) % 7
        return f, k * torch.cos(k * delta) + b + quad, wrong

    return value_grad


def recording_oracle(value_grad):
    """An oracle for ``_ascend`` and the list of every (δ, loss, error count) it was asked."""
    log = []

    def oracle(delta, need_grad):
        f, g, wrong = value_grad(delta)
        log.append((delta.clone(), f, wrong))
        return f, g if need_grad else None, wrong

    return oracle, log


def ascend(oracle, rows, p, pset, steps, random_start=False, restarts=1):
    """``_ascend`` on float64 rows of size p, row i seeded with (0, i)."""
    kw = {
        "random_start": random_start,
        "restarts": restarts,
        "seeds": [(0, i) for i in range(rows)],
    }
    return _ascend(oracle, rows, p, torch.zeros(p, dtype=F64), pset, steps, **kw)


def reference_apgd(value_grad, rows, p, norm, rho, scale=None, steps=20):
    """Auto-PGD from ε = 0 as §5 and Croce & Hein (2020, Alg. 1) state it, one row at a time:
    step 2ρ along |w|⊙∇/‖∇‖ or |w|⊙sign(∇); momentum 0.75; at the checkpoints of 20 steps,
    halve the step and go back to the best point when < 75% of the steps since the last
    checkpoint increased f, or when it was not halved there and the best f did not improve.
    Returns the queried points, (steps, rows, p)."""
    checkpoints = [5, 9, 12, 14, 16, 18, 19, 20]  # apgd_checkpoints(20), from its doctest
    s = torch.ones(p, dtype=F64) if scale is None else scale

    def direction(g):
        return s * (torch.sign(g) if norm == "linf" else g / g.norm())

    def project(z):
        if norm == "linf":
            return torch.clamp(z, -rho * s, rho * s)
        if scale is not None:
            return project_ellipsoid(z[None], scale, rho)[0]
        return z * min(1.0, rho / z.norm().item())

    queried = []
    for r in range(rows):

        def f_and_grad(x, r=r):
            full = torch.zeros(rows, p, dtype=F64)
            full[r] = x
            f, g, _ = value_grad(full)
            return f[r].item(), g[r]

        x = x_prev = best_x = torch.zeros(p, dtype=F64)
        f, g = f_and_grad(x)
        best_f, best_g, eta = f, g, 2 * rho
        increases, halved, best_f_there, last = 0, False, f, 0
        path = []
        for k in range(1, steps + 1):
            z = project(x + eta * direction(g))
            if k > 1:
                z = project(x + 0.75 * (z - x) + 0.25 * (x - x_prev))
            x_prev, x = x, z
            f_new, g = f_and_grad(x)
            increases += f_new > f
            f = f_new
            path.append(x)
            if f > best_f:
                best_f, best_x, best_g = f, x, g
            if k in checkpoints and k < steps:
                stalled = not halved and best_f <= best_f_there
                halved = increases < 0.75 * (k - last) or stalled
                if halved:
                    eta, x, x_prev, f, g = eta / 2, best_x, best_x, best_f, best_g
                increases, best_f_there, last = 0, best_f, k
        queried.append(torch.stack(path))
    return torch.stack(queried, dim=1)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    ("norm", "adaptive"), [("l2", False), ("linf", False), ("l2", True), ("linf", True)]
)
def test_apgd_queries_the_points_of_a_reference_implementation(norm, adaptive, seed):
    """All 20 points Auto-PGD queries on a non-convex problem are the reference's (1e-10)."""
    rows, p, rho = 3, 4, 0.8
    value_grad = wavy_quadratics(rows, p, seed)
    scale = None
    if adaptive:
        scale = torch.rand(p, generator=torch.Generator().manual_seed(10 + seed), dtype=F64) + 0.3
    oracle, log = recording_oracle(value_grad)
    ascend(oracle, rows, p, PerturbationSet(norm, rho, scale), 20)
    queried = torch.stack([delta for delta, _, _ in log[1:21]])  # log[0] is ε = 0
    expected = reference_apgd(value_grad, rows, p, norm, rho, scale)
    torch.testing.assert_close(queried, expected, rtol=0, atol=1e-10)


def assert_the_best_point_is_kept(out, log):
    """best_loss is the largest loss queried (log[0] is ε = 0), best_wrong the count there."""
    losses = torch.stack([f for _, f, _ in log])
    wrong = torch.stack([w for _, _, w in log])
    best = losses.argmax(0)
    assert torch.equal(out.best_loss, losses.max(0).values)
    assert torch.equal(out.best_wrong, wrong[best, torch.arange(len(best))])


@pytest.mark.parametrize(
    ("steps", "norm", "rho"), [(1, "l2", 2.5), (1, "linf", 1.0), (20, "l2", 0.8), (20, "linf", 0.8)]
)
@pytest.mark.parametrize(("random_start", "restarts"), [(False, 1), (True, 3)])
def test_best_point_and_its_error_are_kept_over_steps_and_restarts(
    steps, norm, rho, random_start, restarts
):
    """The reported loss and error count are those of the best point queried, not the last
    iterate's or the last restart's."""
    rows, p = 8, 4
    oracle, log = recording_oracle(wavy_quadratics(rows, p, seed=5))
    pset = PerturbationSet(norm, rho)
    out = ascend(oracle, rows, p, pset, steps, random_start=random_start, restarts=restarts)
    assert_the_best_point_is_kept(out, log)


def test_one_step_from_a_random_start_keeps_the_error_of_the_best_point():
    """steps=1 from a random start: where the step lowers the loss, the start's error count is
    reported, not the step's."""
    rows, p = 16, 3
    oracle, log = recording_oracle(wavy_quadratics(rows, p, seed=2, freq=(10.0, 20.0)))
    out = ascend(oracle, rows, p, PerturbationSet("l2", 1.0), 1, random_start=True)
    assert_the_best_point_is_kept(out, log)


def test_linf_first_apgd_step_from_a_random_start_reaches_the_vertex_of_a_linear_loss():
    """Linear loss bᵀδ: the L∞ maximum is ρ‖b‖₁ at the vertex ρ·sign(b), which the first
    Auto-PGD step (2ρ) reaches exactly from any point of the box (a step of ρ does not)."""
    rows, p, rho = 4, 6, 0.3
    b = torch.randn(rows, p, generator=torch.Generator().manual_seed(0), dtype=F64)
    oracle, log = recording_oracle(lambda d: ((b * d).sum(-1), b, torch.zeros(rows, dtype=F64)))
    out = ascend(oracle, rows, p, PerturbationSet("linf", rho), 2, random_start=True)
    first_step = log[2][0]  # log[0]: ε = 0, log[1]: the random start
    torch.testing.assert_close(first_step, rho * torch.sign(b), rtol=0, atol=0)
    torch.testing.assert_close(out.best_loss, rho * b.abs().sum(-1), rtol=1e-14, atol=0)


# --- invariance, consistency ----------------------------------------------------------------


def rescaled(model, c=10.0):
    """Scale the first ReLU layer by c and the next layer's weights by 1/c: same function."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].weight.mul_(c)
        other[0].bias.mul_(c)
        other[2].weight.div_(c)
    return other


@pytest.mark.parametrize(
    ("norm", "steps", "projection"),
    [("l2", 1, "exact"), ("l2", 5, "rescale"), ("linf", 1, "exact"), ("linf", 5, "exact")],
)
def test_adaptive_sharpness_invariant_under_relu_rescaling(norm, steps, projection):
    """Exact for one step, for L∞ and for the scaled projection. (The spec's Euclidean
    ellipsoid projection depends on the parametrization, so adaptive L2 with steps ≥ 2 and
    projection="exact" is only approximately invariant.)"""
    model = relu_mlp()
    x, y = classification_data()
    other = rescaled(model)
    torch.testing.assert_close(other(x), model(x))
    kw = {"m": 8, "rho": 0.5 if norm == "l2" else 0.05, "steps": steps, "norm": norm}
    kw["projection"] = projection
    a = m_sharpness(model, (x, y), adaptive=True, **kw)
    b = m_sharpness(other, (x, y), adaptive=True, **kw)
    assert a.sharpness > 1e-4
    assert b.sharpness == pytest.approx(a.sharpness, rel=1e-6)
    torch.testing.assert_close(b.per_subset, a.per_subset, rtol=1e-6, atol=1e-12)
    plain_a = m_sharpness(model, (x, y), adaptive=False, **{**kw, "rho": 0.05})
    plain_b = m_sharpness(other, (x, y), adaptive=False, **{**kw, "rho": 0.05})
    assert abs(plain_b.sharpness - plain_a.sharpness) > 0.01 * plain_a.sharpness


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_more_steps_never_report_less_than_one(norm, adaptive):
    # Adaptive L2 with the exact projection ascends along T∇/‖∇‖ and never visits ASAM's
    # own ε̂ = ρT²∇/‖T∇‖; on the rescaled network 20 steps found less than one step did.
    model = rescaled(relu_mlp())
    x, y = classification_data(n=64)
    rho = (0.5 if adaptive else 0.05) if norm == "l2" else 0.01
    kw = {"m": 16, "rho": rho, "norm": norm, "adaptive": adaptive}
    one = m_sharpness(model, (x, y), steps=1, **kw)
    many = m_sharpness(model, (x, y), steps=20, **kw)
    assert (many.per_subset >= one.per_subset).all()


def sam_perturbed(model, x, y, rho, loss=nn.functional.cross_entropy):
    """A copy of ``model`` moved by SAM's ε̂ = ρ∇L/‖∇L‖ on (x, y), and L there before the move."""
    clean = loss(model(x), y)
    grads = torch.autograd.grad(clean, list(model.parameters()))
    gnorm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for p, g in zip(perturbed.parameters(), grads):
            p.add_(rho * g / gnorm)
    return perturbed, clean.detach()


def test_m_equals_n_is_the_full_set_sam_sharpness():
    model = relu_mlp(seed=3)
    x, y = classification_data(n=20)
    rho = 0.3
    r = m_sharpness(model, (x, y), m=20, rho=rho)
    perturbed, loss = sam_perturbed(model, x, y, rho)
    with torch.no_grad():
        out = perturbed(x)
        clean_out = model(x)
    expected = nn.functional.cross_entropy(out, y) - loss
    assert r.num_subsets == 1
    assert r.sharpness == pytest.approx(expected.item(), rel=1e-10)
    err = (out.argmax(1) != y).double().mean() - (clean_out.argmax(1) != y).double().mean()
    assert r.error_increase == pytest.approx(err.item(), abs=1e-12)
    assert r.clean_loss == pytest.approx(loss.item(), rel=1e-12)


@pytest.mark.parametrize(("norm", "form"), [("l2", "elementwise"), ("linf", "linf")])
@pytest.mark.parametrize("eta", [0.0, 0.01])
def test_adaptive_one_step_is_asams_own_perturbation(norm, form, eta):
    """Review, session 28 (#8): the ascent direction of adaptive m-sharpness (flat rows,
    ``PerturbationSet``) and ASAM's (a list of tensors, ``adaptive_perturbation``) are two
    implementations; steps = 1 must be the optimizer's ε̂ on the same w and g (spec §5)."""
    model = relu_mlp(seed=3)
    x, y = classification_data(n=20)
    rho = 0.3
    params = list(model.parameters())
    clean = nn.functional.cross_entropy(model(x), y)
    grads = list(torch.autograd.grad(clean, params))
    eps = adaptive_perturbation([p.detach() for p in params], grads, rho, adaptive=form, eta=eta)

    layout = ParamLayout.of(model)
    theta = flat_parameters(model, layout)
    g = layout.flatten(dict(zip(layout.names, grads)))
    pset = PerturbationSet(norm, rho, theta.abs() + eta)  # as m_sharpness builds it
    if norm == "l2":  # the optimizer divides by ||T g|| + 1e-12 (a guard against 0)
        tg_norm = ((theta.abs() + eta) * g).norm()
        eps = [e * (tg_norm + NORM_EPS) / tg_norm for e in eps]
    oracle, log = recording_oracle(lambda d: (torch.zeros(1, dtype=F64), g[None], torch.zeros(1)))
    ascend(oracle, 1, layout.size, pset, steps=1)
    step = log[-1][0][0]  # the one point _ascend evaluates after the clean one
    torch.testing.assert_close(
        step, layout.flatten(dict(zip(layout.names, eps))), rtol=0, atol=1e-12
    )

    # and end to end: with m = n, the sharpness is L(w + ε̂_ASAM) − L(w)
    r = m_sharpness(model, (x, y), m=20, rho=rho, adaptive=True, eta=eta, norm=norm)
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for p, e in zip(perturbed.parameters(), eps):
            p.add_(e)
        expected = nn.functional.cross_entropy(perturbed(x), y) - clean
    assert r.sharpness == pytest.approx(expected.item(), rel=0, abs=1e-12)


def test_per_subset_error_increase_is_a_fraction_of_m():
    """Subset j's error increase is (errors at ε̂_j − errors at 0)/m where ε̂_j raised L_j, else 0."""
    model = relu_mlp(seed=3)
    x, y = classification_data(n=32)
    m, rho = 8, 1.0
    r = m_sharpness(model, (x, y), m=m, rho=rho)
    expected = []
    for j in range(4):
        xj, yj = x[j * m : (j + 1) * m], y[j * m : (j + 1) * m]
        perturbed, loss = sam_perturbed(model, xj, yj, rho)
        with torch.no_grad():
            out, clean_out = perturbed(xj), model(xj)
        rose = nn.functional.cross_entropy(out, yj) > loss
        errors = (out.argmax(1) != yj).sum() - (clean_out.argmax(1) != yj).sum()
        expected.append(errors.item() / m if rose else 0.0)
    assert any(e != 0 for e in expected)
    torch.testing.assert_close(r.per_subset_error, torch.tensor(expected, dtype=F64))


def test_logit_normalization_matches_manual_computation():
    model = relu_mlp(seed=4)
    x, y = classification_data(n=12)
    rho = 0.2

    def normalized_loss(net_out, targets):
        z = net_out - net_out.mean(1, keepdim=True)
        return nn.functional.cross_entropy(z / z.norm(dim=1, keepdim=True), targets)

    perturbed, loss = sam_perturbed(model, x, y, rho, loss=normalized_loss)
    with torch.no_grad():
        expected = normalized_loss(perturbed(x), y) - loss
    r = m_sharpness(model, (x, y), m=12, rho=rho, logit_normalize=True)
    assert r.sharpness == pytest.approx(expected.item(), rel=1e-10)


@pytest.mark.parametrize(
    "options",
    [
        {"steps": 1},
        {"steps": 6, "adaptive": True},
        {"steps": 3, "adaptive": True, "projection": "rescale"},
        {"steps": 4, "norm": "linf", "random_start": True, "restarts": 2},
        {"steps": 1, "adaptive": True, "norm": "linf", "logit_normalize": True},
    ],
    ids=["sam", "adaptive-apgd", "adaptive-rescale", "linf-restarts", "adaptive-linf-logitnorm"],
)
def test_vectorized_equals_per_subset_loop(options):
    net = bn_cnn()
    x, y = classification_data(n=40, d=12, seed=7)
    rho = 0.05 if options.get("norm") == "linf" else 0.5
    kw = {"m": 4, "rho": rho, "chunk_size": 3, **options}
    a = m_sharpness(net, (x, y), **kw)
    b = m_sharpness(net, (x, y), vectorize=False, **kw)
    assert a.sharpness > 0
    torch.testing.assert_close(a.per_subset, b.per_subset, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a.per_subset_error, b.per_subset_error)


def test_loop_leaves_the_model_untouched_and_an_unused_parameter_gets_no_gradient():
    net = bn_cnn()
    net.spare = nn.Parameter(torch.ones(3, dtype=F64))  # not used by forward: gradient 0
    x, y = classification_data(n=16, d=12, seed=3)
    pending = nn.functional.cross_entropy(net.eval()(x), y)  # graph built before
    held = {k: (v.data_ptr(), v.detach().clone()) for k, v in net.state_dict().items()}
    kw = {"m": 4, "rho": 0.3, "steps": 3, "adaptive": True, "eta": 0.1}
    looped = m_sharpness(net, (x, y), vectorize=False, **kw)
    torch.testing.assert_close(looped.per_subset, m_sharpness(net, (x, y), **kw).per_subset)
    for name, tensor in net.state_dict().items():
        pointer, values = held[name]
        assert tensor.data_ptr() == pointer and torch.equal(tensor, values), name
    pending.backward()  # no "modified by an inplace operation"


def test_eval_mode_is_used_and_restored():
    net = bn_cnn()
    x, y = classification_data(n=16, d=12, seed=2)
    buffers = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    net[2].eval()  # a mixed state must come back exactly
    in_train = m_sharpness(net, (x, y), m=4, rho=0.1)
    assert net.training and not net[2].training and net[1].training
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, buffers[k])
    net.eval()
    in_eval = m_sharpness(net, (x, y), m=4, rho=0.1)
    torch.testing.assert_close(in_train.per_subset, in_eval.per_subset)
    assert in_train.meta.mode == "eval"


def test_data_forms_remainder_and_result_file(tmp_path):
    model = relu_mlp()
    x, y = classification_data(n=10)
    r = m_sharpness(model, (x, y), m=4, rho=0.1, seed=3)
    assert r.num_samples_used == 8 and r.num_subsets == 2
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    torch.testing.assert_close(m_sharpness(model, batches, m=4, rho=0.1).per_subset, r.per_subset)
    d = r.to_dict()
    for key in ("m", "rho", "adaptive", "steps", "sharpness", "meta"):
        assert key in d
    loaded = MSharpness.load(r.save(tmp_path / "ms.json"))
    assert loaded.sharpness == r.sharpness and loaded.m == 4
    torch.testing.assert_close(loaded.per_subset, r.per_subset)


def test_remainder_is_left_out_of_sharpness_and_clean_error():
    """n = 26, m = 6: the sharpness is that of the first 24 examples, the mean of its subsets;
    the clean error is the error on the examples used (8 of 10)."""
    model, x, y = linear_regression(26, 5)
    r = m_sharpness(model, (x, y), m=6, rho=0.3, loss=half_mse)
    first = m_sharpness(model, (x[:24], y[:24]), m=6, rho=0.3, loss=half_mse)
    assert r.sharpness == pytest.approx(first.sharpness, rel=1e-12)
    assert r.sharpness == pytest.approx(float(r.per_subset.mean()), rel=1e-12)
    net = relu_mlp()
    cx, cy = classification_data(n=10)
    with torch.no_grad():
        wrong = (net(cx[:8]).argmax(1) != cy[:8]).double().mean().item()
    assert m_sharpness(net, (cx, cy), m=4, rho=0.1).clean_error == pytest.approx(wrong, abs=1e-15)


def test_regression_targets_report_nan_error():
    model, x, y = linear_regression(24, 5)
    r = m_sharpness(model, (x, y), m=6, rho=0.1, loss=half_mse)
    assert np.isnan(r.error_increase) and np.isnan(r.clean_error)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"m": 33, "rho": 0.1}, "larger than the 32 examples"),
        ({"m": 4, "rho": 0.0}, "rho must be > 0"),
        ({"m": 4, "rho": -1.0}, "rho must be > 0"),
        ({"m": 4, "rho": 0.1, "steps": 0}, "steps must be >= 1"),
        ({"m": 4, "rho": 0.1, "norm": "l3"}, "unknown norm"),
        ({"m": 0, "rho": 0.1}, "m must be a positive integer"),
        ({"m": 4, "rho": 0.1, "eta": 0.5}, "applies to adaptive sharpness only"),
    ],
)
def test_bad_input_raises_one_clear_error(kwargs, message):
    model = relu_mlp()
    x, y = classification_data()
    with pytest.raises(SharpscopeError, match=message):
        m_sharpness(model, (x, y), **kwargs)


@pytest.mark.parametrize("adaptive", [False, True])
def test_batchnorm_folding_gives_the_same_sharpness(adaptive):
    net = bn_cnn()
    x, y = classification_data(n=24, d=12, seed=3)
    kw = {"m": 4, "rho": 0.3, "steps": 3, "adaptive": adaptive}
    folded = m_sharpness(net, (x, y), **kw)
    plain = m_sharpness(net, (x, y), fold_bn=False, **kw)
    assert folded.meta.extra["bn_folded"] == ["2"] and plain.meta.extra["bn_folded"] == []
    torch.testing.assert_close(folded.per_subset, plain.per_subset, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(folded.per_subset_error, plain.per_subset_error)


def test_progress_hook_counts_every_subset():
    net = bn_cnn()
    x, y = classification_data(n=30, d=12, seed=4)
    seen = []
    result = m_sharpness(net, (x, y), m=4, rho=0.1, chunk_size=3, progress=seen.append)
    assert sum(seen) == 7 == len(result.per_subset)  # 30 // 4 subsets, in chunks of 3
    assert seen == [3, 3, 1]


# the same adaptive, random-start, multi-step problem in one process and split over two
SPLIT_OPTIONS = dict(m=4, rho=0.1, adaptive=True, steps=3, random_start=True, chunk_size=2)


def _split_worker(rank, world, rendezvous, out_dir):
    with spawned_group(rank, world, rendezvous):
        x, y = classification_data(n=30, d=12, seed=4)
        seen = []
        result = m_sharpness(
            bn_cnn(), (x, y), **SPLIT_OPTIONS, progress=seen.append, distributed=True
        )
        torch.save(
            {
                "per_subset": result.per_subset,
                "per_subset_error": result.per_subset_error,
                "sharpness": result.sharpness,
                "passes": result.num_gradient_passes,
                "processes": result.meta.extra["processes"],
                "progress": sum(seen),
            },
            f"{out_dir}/rank{rank}.pt",
        )


def test_two_processes_split_the_subsets_and_agree_with_one(tmp_path):
    mp.spawn(_split_worker, args=(2, rendezvous_file(), str(tmp_path)), nprocs=2, join=True)
    x, y = classification_data(n=30, d=12, seed=4)
    single = m_sharpness(bn_cnn(), (x, y), **SPLIT_OPTIONS)
    assert len(single.per_subset) == 7  # 4 chunks: ranks take 2 and 2, of 4 and 3 subsets
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["processes"] == 2 and got["progress"] == 7
        torch.testing.assert_close(got["per_subset"], single.per_subset, rtol=0, atol=0)
        torch.testing.assert_close(got["per_subset_error"], single.per_subset_error, rtol=0, atol=0)
        assert got["sharpness"] == single.sharpness
        assert got["passes"] == pytest.approx(single.num_gradient_passes, rel=1e-12)


def test_restarts_without_a_random_start_are_refused():
    net, (x, y) = nn.Linear(3, 2).double(), (torch.randn(8, 3, dtype=F64), torch.arange(8) % 2)
    with pytest.raises(SharpscopeError, match="random_start"):
        m_sharpness(net, (x, y), m=4, rho=0.1, steps=3, restarts=3)


def test_batchnorm_without_running_statistics_is_recorded_as_batch_mode():
    """Such a BatchNorm uses each subset's statistics even in eval mode (analysis.md §0, §5)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.ReLU(), nn.Linear(8, 3)
    ).double()
    x, y = torch.randn(64, 5, dtype=F64), torch.randint(0, 3, (64,))
    with pytest.warns(RuntimeWarning, match="running statistics"):
        r = m_sharpness(net, (x, y), m=8, rho=0.1)
    assert r.meta.mode == "batch"


def test_a_model_vmap_cannot_run_falls_back_to_the_loop_unless_vmap_was_asked_for():
    torch.manual_seed(0)
    model, x, y = RecurrentClassifier(nn.LSTM), torch.randn(16, 5, 2), torch.randint(0, 3, (16,))
    with pytest.raises(SharpscopeError, match="vmap cannot run this model.*vectorize=False"):
        m_sharpness(model, (x, y), m=4, rho=0.05, vectorize=True)
    with pytest.warns(RuntimeWarning, match="vmap cannot run this model.*the loop instead"):
        default = m_sharpness(model, (x, y), m=4, rho=0.05)
    looped = m_sharpness(model, (x, y), m=4, rho=0.05, vectorize=False)
    assert np.isfinite(looped.sharpness) and default.sharpness == looped.sharpness
    assert default.meta.extra["vectorized"] is False


@pytest.mark.parametrize(
    "targets, message",
    [(torch.full((16,), 6), "failed on the data"), (torch.rand(16), "failed on the data")],
)
def test_a_model_or_loss_that_does_not_fit_the_data_is_one_line(targets, message):
    """Labels out of range / float labels: the same one line as the spectrum functions."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(SharpscopeError, match=message) as info:
        m_sharpness(model, (torch.randn(16, 4), targets), m=4, rho=0.05)
    assert "\n" not in str(info.value)


def test_a_shuffling_loader_is_refused_as_the_subsets_follow_the_data_order():
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    model = nn.Linear(4, 3)
    shuffled = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    with pytest.raises(SharpscopeError, match="changed between two reads"):
        m_sharpness(model, shuffled, m=4, rho=0.05)
    fixed = DataLoader(TensorDataset(x, y), batch_size=4)
    expected = m_sharpness(model, (x, y), m=4, rho=0.05).sharpness
    assert m_sharpness(model, fixed, m=4, rho=0.05).sharpness == pytest.approx(expected)


def test_one_step_at_a_critical_point_warns_that_it_measures_nothing():
    """g = 0 exactly: SAM's ε̂ = 0, so steps = 1 gives 0; steps >= 2 finds the maximum."""
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    data = (torch.eye(2), torch.zeros(2, 1))  # MSE at its minimum: gradient exactly 0
    with pytest.warns(RuntimeWarning, match="gradient is exactly zero"):
        one = m_sharpness(model, data, m=2, rho=0.5, loss="mse")
    assert one.sharpness == 0.0
    assert m_sharpness(model, data, m=2, rho=0.5, loss="mse", steps=5).sharpness > 0


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("vectorize", [True, False])
def test_a_loss_undefined_inside_the_ball_makes_the_sharpness_nan_with_a_warning(steps, vectorize):
    """Regression (acceptance report, session 15): a NaN loss at the perturbed point lost
    every comparison, so the clean point was kept and the subset reported sharpness 0."""
    torch.manual_seed(0)
    net = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        net.weight.fill_(0.1)
    x, y = torch.ones(8, 4, dtype=F64), torch.zeros(8, dtype=F64)

    def root(out, t):  # defined while the mean output stays below 1, where ascent leads
        return -torch.sqrt(1 - out.mean())

    kw = {"loss": root, "steps": steps, "vectorize": vectorize}
    assert math.isfinite(m_sharpness(net, (x, y), 4, 0.05, **kw).sharpness)
    with pytest.warns(
        RuntimeWarning, match=r"2 of 2 subsets have a loss that is not finite at some point of "
    ):
        r = m_sharpness(net, (x, y), 4, 10.0, **kw)
    assert math.isnan(r.sharpness) and r.per_subset.isnan().all()
    # NaN data: the loss is NaN at ε = 0 already, and the warning says so instead of
    # suggesting an overflow at this rho
    with pytest.warns(RuntimeWarning, match=r"1 of 2 subsets .* at the model's own weights") as w:
        r = m_sharpness(net, (torch.cat([x[:4], x[4:] * math.nan]), y), 4, 0.05, **kw)
    assert not any("overflow" in str(item.message) for item in w)
    assert r.per_subset[0].isfinite() and r.per_subset[1].isnan()


def _saturated_inf_input():
    """An inf input behind tanh: every loss is finite, but subset 0's gradient is NaN."""
    torch.manual_seed(0)
    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
    x[3, 2] = float("inf")
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    return net, (x, y)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"steps": 5},
        {"vectorize": False},
        {"norm": "linf"},
        {"adaptive": True},
        {"random_start": True, "steps": 2},
    ],
    ids=["sam", "apgd", "loop", "linf", "adaptive", "random-start"],
)
def test_b4_a_subset_with_a_non_finite_gradient_is_nan_with_a_warning(options):
    """Stress B4 (session 28): a finite loss with a NaN gradient gave a zero ascent
    direction, and the subset counted as sharpness 0, without a word."""
    net, (x, y) = _saturated_inf_input()
    with pytest.warns(RuntimeWarning, match=r"^1 of 3 subsets have a finite loss but a gradient"):
        r = m_sharpness(net, (x, y), m=8, rho=0.1, **options)
    assert r.per_subset[0].isnan() and r.per_subset[1:].isfinite().all()
    assert r.per_subset_error[0].isnan() and math.isnan(r.sharpness)
    # the other subsets are what they are with a finite input in subset 0
    fine = m_sharpness(net, (torch.nan_to_num(x, posinf=0.0), y), m=8, rho=0.1, **options)
    torch.testing.assert_close(r.per_subset[1:], fine.per_subset[1:], rtol=0, atol=0)


def test_b4_the_non_finite_warnings_name_the_callers_line():
    net, (x, y) = _saturated_inf_input()
    with pytest.warns(RuntimeWarning, match="a gradient that is not finite") as w:
        m_sharpness(net, (x, y), m=8, rho=0.1)
    assert [item.filename for item in w] == [__file__]


def test_a_subset_without_a_finite_clean_loss_has_no_error_increase_either():
    """Python API acceptance, session 21: with NaN weights the sharpness was NaN (and said
    so) but error_increase read 0.0: NaN logits still have an argmax."""
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    x = torch.cat([x[:4], x[4:] * math.nan])  # the second subset's loss is NaN at ε = 0
    with pytest.warns(RuntimeWarning, match="at the model's own weights"):
        r = m_sharpness(net, (x, y), 4, 0.05)
    assert r.per_subset_error[0].isfinite() and r.per_subset_error[1].isnan()
    assert math.isnan(r.error_increase) and math.isnan(r.sharpness)
    assert math.isnan(r.clean_error)  # from NaN logits too (review, session 21)
    from sharpscope.analysis.measures import average_sharpness

    with pytest.warns(RuntimeWarning, match=r"^1 of 2 subsets .* own weights \(δ = 0\)"):
        avg = average_sharpness(net, (x, y), 0.05, m=4)  # the same mask there
    assert math.isnan(avg.sharpness) and math.isnan(avg.error_increase)


# -- mutation-testing gaps (session 24): each test fails on the mutant it names ----------


def test_one_step_from_a_random_start_stays_in_the_ball():
    """steps=1 from a random start projects x0 + step: on a linear loss bᵀδ the maximum is
    exactly ρ‖b‖₂ (L2) or ρ‖b‖₁ (L∞), and no queried point leaves the set. Unprojected,
    the point reached up to 2ρ and a small MLP's sharpness came out 67% too high."""
    rows, p, rho = 5, 4, 0.5
    b = torch.randn(rows, p, generator=torch.Generator().manual_seed(0), dtype=F64)
    queried = []

    def oracle(d, need_grad):
        queried.append(d.clone())
        return (b * d).sum(-1), b if need_grad else None, torch.zeros(rows, dtype=F64)

    for norm, bound in (("l2", rho * b.norm(dim=-1)), ("linf", rho * b.abs().sum(-1))):
        queried.clear()
        pset = PerturbationSet(norm, rho)
        out = ascend(oracle, rows, p, pset, 1, random_start=True, restarts=3)
        for d in queried:
            assert (pset.constraint(d) <= rho * (1 + 1e-12)).all(), norm
        assert (out.best_loss <= bound * (1 + 1e-12)).all(), norm


def test_restarts_start_from_different_random_points():
    """Each restart starts from its own random point (seeded by (seed, subset, restart));
    the same start every time would make restarts cost k times as much for nothing."""
    rows, p, rho = 2, 5, 0.5
    queried = []

    def oracle(d, need_grad):
        queried.append(d.clone())
        return (d * d).sum(-1), 2 * d if need_grad else None, torch.zeros(rows, dtype=F64)

    ascend(oracle, rows, p, PerturbationSet("l2", rho), 1, random_start=True, restarts=3)
    starts = queried[1::2]  # δ = 0, then (start, step) per restart
    assert len(starts) == 3
    assert not torch.equal(starts[0], starts[1]) and not torch.equal(starts[1], starts[2])


def test_the_recorded_cost_is_in_full_passes_over_the_n_examples():
    """steps=1 costs one gradient pass (at δ = 0) and one forward pass (at δ̂) over the n
    examples, whatever m and the chunking; each further step one gradient pass more."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x, y = torch.randn(32, 4, dtype=F64), torch.randint(0, 3, (32,))
    for chunk in (None, 1, 3):
        r = m_sharpness(net, (x, y), m=4, rho=0.1, chunk_size=chunk)
        assert (r.num_gradient_passes, r.num_forward_passes) == (1.0, 1.0), chunk
        r = m_sharpness(net, (x, y), m=4, rho=0.1, steps=4, chunk_size=chunk)
        assert (r.num_gradient_passes, r.num_forward_passes) == (4.0, 1.0), chunk


def test_auto_pgd_counts_only_strict_increases():
    """Croce & Hein count f(x_{k+1}) > f(x_k); a loss with a flat top (capped) makes
    consecutive iterates tie exactly, and a tie must not count as an increase."""
    rows, p, rho = 3, 4, 0.8

    def capped(value_grad, cap):
        def capped_value_grad(delta):
            f, g, wrong = value_grad(delta)
            return torch.where(f >= cap, torch.full_like(f, cap), f), g, wrong

        return capped_value_grad

    for seed in range(4):
        for norm in ("l2", "linf"):
            value_grad = wavy_quadratics(rows, p, seed)
            f0 = value_grad(torch.zeros(rows, p, dtype=F64))[0]
            flat_top = capped(value_grad, float(f0.max()) + 0.3)
            oracle, log = recording_oracle(flat_top)
            ascend(oracle, rows, p, PerturbationSet(norm, rho), 20)
            queried = torch.stack([d for d, _, _ in log[1:21]])
            expected = reference_apgd(flat_top, rows, p, norm, rho)
            torch.testing.assert_close(queried, expected, rtol=0, atol=1e-10)


def test_the_sharpness_measures_refuse_a_loss_that_reads_the_parameters():
    # each runs the model on parameter values of its own and then calls the loss, so a
    # regulariser over model.parameters() stayed fixed at the current weights, silently
    from sharpscope.analysis import epsilon_sharpness, pac_bayes_flatness

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    data = (torch.randn(32, 4), torch.randint(0, 3, (32,)))

    def loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, t) + 0.1 * model[0].weight.square().sum()

    for name, call in [
        ("m-sharpness", lambda: m_sharpness(model, data, m=8, rho=0.05, loss=loss)),
        ("epsilon-sharpness", lambda: epsilon_sharpness(model, data, loss=loss)),
        ("PAC-Bayes flatness", lambda: pac_bayes_flatness(model, data, loss=loss)),
    ]:
        with pytest.raises(SharpscopeError, match=f"which {name} does not follow") as info:
            call()
        assert "\n" not in str(info.value)
