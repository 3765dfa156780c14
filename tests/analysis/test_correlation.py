"""Kendall τ, granulated Kendall and bootstrap intervals against exact answers (analysis.md §7)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from sharpscope.analysis.correlation import (
    bootstrap_indices,
    correlate,
    distinct_seed_resamples,
    granulated_kendall,
    kendall_tau,
    tau_b_grouped,
)
from sharpscope.errors import SharpscopeError


def _brute_tau_b(x, y):
    """τ-b from its definition, pair by pair."""
    concordant = tied_x = tied_y = 0
    pairs = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        pairs += 1
        sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        concordant += sx * sy
        tied_x += sx == 0
        tied_y += sy == 0
    return concordant / math.sqrt((pairs - tied_x) * (pairs - tied_y))


@pytest.mark.parametrize("seed", range(5))
def test_kendall_tau_equals_scipy_on_random_tables_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 40))
    x = rng.integers(0, 6, size=n).astype(float)  # many ties
    y = x + rng.integers(-3, 4, size=n)
    expected = stats.kendalltau(x, y, variant="b").statistic
    assert kendall_tau(x, y) == pytest.approx(expected, abs=1e-12)
    assert kendall_tau(x, y) == pytest.approx(_brute_tau_b(x, y), abs=1e-12)
    vectorized = tau_b_grouped(x[None], y[None], np.zeros((1, n), dtype=int), 1)[0, 0]
    assert vectorized == pytest.approx(expected, abs=1e-12)


def test_grouped_tau_equals_scipy_per_group():
    rng = np.random.default_rng(7)
    n = 30
    x, y = rng.normal(size=n), rng.normal(size=n)
    groups = rng.integers(-1, 3, size=n)  # -1: left out
    got = tau_b_grouped(x[None], y[None], groups[None], 3)[0]
    for g in range(3):
        member = groups == g
        assert got[g] == pytest.approx(stats.kendalltau(x[member], y[member]).statistic)


def test_tau_is_plus_one_minus_one_zero_for_a_constant_and_nan_when_undefined():
    g = np.array([0.3, 0.1, 0.5, 0.2, 0.9])
    assert kendall_tau(g, g) == pytest.approx(1.0)
    assert kendall_tau(-g, g) == pytest.approx(-1.0)
    # a constant measure: every pair tied, tau = mean of sign products = 0 (Jiang et al.;
    # the granulated psi counts it the same way, so one axis gives Psi = tau)
    assert kendall_tau([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == 0.0
    assert math.isnan(kendall_tau([1.0, 1.0], [2.0, 2.0]))  # copies of one model
    assert math.isnan(kendall_tau([1.0], [2.0]))
    # NaN rows (failed runs) are dropped, not ranked
    assert kendall_tau([1, 2, math.nan, 3], [1, 2, 0, 3]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [1, 2, math.nan, 3]) == pytest.approx(1.0)  # NaN gap
    with pytest.raises(SharpscopeError, match="3 values but gap has 2"):
        kendall_tau([1, 2, 3], [1, 2])


def test_independent_measure_gives_tau_near_zero():
    rng = np.random.default_rng(0)
    n = 2000
    tau = kendall_tau(rng.normal(size=n), rng.normal(size=n))
    # under independence Var(tau) = 2(2n+5)/(9n(n-1)); 4 standard deviations
    sd = math.sqrt(2 * (2 * n + 5) / (9 * n * (n - 1)))
    assert abs(tau) < 4 * sd


def _grid(values_per_axis):
    names = list(values_per_axis)
    rows = list(itertools.product(*values_per_axis.values()))
    return {name: [r[i] for r in rows] for i, name in enumerate(names)}


def test_granulated_kendall_is_one_and_minus_one_for_perfect_measures():
    factors = _grid({"lr": [0.1, 0.2, 0.4], "bs": [32, 64], "width": [8, 16]})
    rng = np.random.default_rng(1)
    gap = rng.normal(size=len(factors["lr"]))
    result = granulated_kendall(gap, gap, factors)
    assert result.psi == {"lr": 1.0, "bs": 1.0, "width": 1.0}
    assert result.overall == 1.0 and result.tau == pytest.approx(1.0)
    assert result.num_groups == {"lr": 4, "bs": 6, "width": 6}
    negative = granulated_kendall(-gap, gap, factors)
    assert negative.overall == -1.0 and negative.tau == pytest.approx(-1.0)


def test_granulated_kendall_single_axis_equals_tau():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=12), rng.normal(size=12)
    result = granulated_kendall(x, y, {"lr": list(range(12))})
    assert result.psi["lr"] == pytest.approx(stats.kendalltau(x, y).statistic)
    assert result.overall == pytest.approx(result.tau)


def test_granulated_kendall_hand_computed_eight_models():
    # 2 x 2 x 2 design over (lr, bs, seed); seed only defines groups.
    factors = _grid({"lr": [1, 2], "bs": [1, 2], "seed": [0, 1]})
    # rows in product order: (lr, bs, seed)
    # 0:(1,1,0) 1:(1,1,1) 2:(1,2,0) 3:(1,2,1) 4:(2,1,0) 5:(2,1,1) 6:(2,2,0) 7:(2,2,1)
    gap = [1, 1, 2, 2, 3, 3, 4, 4]
    measure = [1, 1, 2, 0, 3, 3, 4, 4]
    # psi_lr: groups (bs, seed): (1,0): rows 0,4 +1; (1,1): 1,5 +1; (2,0): 2,6 +1; (2,1): 3,7 +1 -> 1
    # psi_bs: groups (lr, seed): (1,0): 0,2 +1; (1,1): 1,3 -> measure 1 vs 0, gap 1 vs 2 -> -1;
    #         (2,0): 4,6 +1; (2,1): 5,7 +1 -> (1 - 1 + 1 + 1)/4 = 0.5
    result = granulated_kendall(measure, gap, factors, axes=["lr", "bs"])
    assert result.psi == {"lr": 1.0, "bs": 0.5}
    assert result.num_groups == {"lr": 4, "bs": 4}
    assert result.overall == pytest.approx(0.75)
    assert result.tau == pytest.approx(stats.kendalltau(measure, gap).statistic)


def test_overall_psi_is_the_plain_mean_of_psi_k_with_unequal_group_counts():
    """Ψ = (ψ_lr + ψ_bs)/2 with 2 lr-groups and 3 bs-groups, by hand with scipy (pooling
    the 5 groups would give another value)."""
    factors = {"lr": [1, 2, 3, 1, 2, 3], "bs": [1, 1, 1, 2, 2, 2]}
    gap = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    measure = [1.0, 2.0, 3.0, 0.0, 2.5, 2.0]
    result = granulated_kendall(measure, gap, factors)
    # psi_lr: groups bs = 1 (rows 0-2, tau 1) and bs = 2 (rows 3-5);
    # psi_bs: groups lr = 1, 2, 3, each the pair (row i, row i + 3)
    psi_lr = np.mean([1.0, stats.kendalltau([0, 2.5, 2], [4, 5, 6]).statistic])
    psi_bs = np.mean([np.sign(0 - 1), np.sign(2.5 - 2), np.sign(2 - 3)])
    assert result.psi["lr"] == pytest.approx(psi_lr) and result.psi["bs"] == pytest.approx(psi_bs)
    assert result.overall == pytest.approx((psi_lr + psi_bs) / 2)


def test_coupled_axes_compare_sgd_with_every_sam_rho():
    # SGD has no rho ("n/a"); without coupling no group holds both optimizers.
    factors = {
        "optimizer": ["sgd", "sam", "sam", "sgd", "sam", "sam"],
        "rho": ["n/a", 0.05, 0.1, "n/a", 0.05, 0.1],
        "seed": [0, 0, 0, 1, 1, 1],
    }
    gap = [3.0, 2.0, 1.0, 3.5, 2.5, 1.5]
    measure = [30.0, 20.0, 10.0, 35.0, 25.0, 15.0]
    plain = granulated_kendall(measure, gap, factors, axes=["optimizer", "rho"])
    assert plain.num_groups["optimizer"] == 0 and math.isnan(plain.psi["optimizer"])
    coupled = granulated_kendall(
        measure, gap, factors, axes=["optimizer", "rho"], coupled={"optimizer": ["rho"]}
    )
    assert coupled.psi == {"optimizer": 1.0, "rho": 1.0}
    assert coupled.num_groups == {"optimizer": 2, "rho": 2}


def test_granulated_kendall_rejects_unknown_axis_and_bad_lengths():
    with pytest.raises(SharpscopeError, match="axis 'depth' is not one of the factors: lr"):
        granulated_kendall([1, 2], [1, 2], {"lr": [1, 2]}, axes=["depth"])
    with pytest.raises(SharpscopeError, match="factor 'lr' has 1 values, expected 2"):
        granulated_kendall([1, 2], [1, 2], {"lr": [1]})


def test_bootstrap_over_seeds_draws_whole_seeds():
    index = bootstrap_indices(6, 50, seed=3, clusters=[0, 0, 1, 1, 2, 2])
    for row in index:
        members = row[row >= 0]
        assert len(members) % 2 == 0
        for a in members:  # the partner of each drawn model is in the resample as often
            partner = a + 1 if a % 2 == 0 else a - 1
            assert (members == a).sum() == (members == partner).sum()


def test_bootstrap_interval_covers_the_true_tau():
    # Bivariate normal with correlation r: population tau = (2/pi) arcsin(r).
    rng = np.random.default_rng(4)
    r, n = 0.6, 120
    covariance = [[1.0, r], [r, 1.0]]
    sample = rng.multivariate_normal([0.0, 0.0], covariance, size=n)
    result = correlate(sample[:, 0], sample[:, 1], {}, resamples=500, seed=0)
    low, high = result.tau_interval
    assert low < result.tau < high
    assert low < 2 / math.pi * math.asin(r) < high
    # the width of a 95% interval is about 2 * 1.96 standard errors of tau (about 0.05 here)
    assert 0.08 < high - low < 0.4
    assert result.p_value < 1e-6


def test_bootstrap_interval_is_the_central_percentile_interval():
    """tau_interval is the 2.5% and 97.5% quantiles of scipy's τ over bootstrap_indices."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=40), rng.normal(size=40)
    y = y + x
    result = correlate(x, y, {}, resamples=300, seed=0)
    taus = [stats.kendalltau(x[i], y[i]).statistic for i in bootstrap_indices(40, 300, seed=0)]
    expected = tuple(np.quantile(taus, [0.025, 0.975]))
    assert result.tau_interval == pytest.approx(expected, abs=1e-12)


def test_perfect_measure_has_psi_interval_one():
    """μ = g: every resample's ψ_k is 1 (groups a resample leaves undefined are not counted)."""
    factors = _grid({"lr": [0.1, 0.2, 0.4], "bs": [32, 128], "seed": [0, 1, 2]})
    gap = np.random.default_rng(0).normal(size=18)
    result = correlate(gap, gap, factors, resamples=200)
    for axis in ("lr", "bs"):
        assert result.psi_interval[axis] == (1.0, 1.0)


def test_correlate_reports_psi_intervals_and_seed_bootstrap():
    factors = _grid({"lr": [0.1, 0.2, 0.4], "bs": [32, 128], "seed": [0, 1, 2]})
    rng = np.random.default_rng(5)
    gap = np.array(factors["lr"]) * 10 + rng.normal(scale=0.1, size=18)
    measure = gap + rng.normal(scale=0.5, size=18)
    result = correlate(
        measure, gap, factors, seeds=factors["seed"], resamples=200, measure_name="lambda_max"
    )
    assert set(result.psi) == {"lr", "bs"}  # seed defines groups, is not an axis
    assert result.num_groups == {"lr": 6, "bs": 9}
    for axis in ("lr", "bs"):
        low, high = result.psi_interval[axis]
        assert -1.0 <= low <= high <= 1.0
    assert all(math.isfinite(v) for v in result.tau_interval_seeds)
    payload = result.to_dict()
    assert payload["measure"] == "lambda_max" and payload["kind"] == "correlation"


def test_the_seed_interval_with_two_seeds_lies_among_its_three_resamples():
    """Resampling whole seeds from 2 gives only 3 distinct sets ({0,0}, {0,1}, {1,1}), so
    the interval's ends are among (or between) their τ values; ``num_seeds`` says so."""
    factors = _grid({"lr": [0.1, 0.2, 0.4, 0.8], "seed": [0, 1]})
    rng = np.random.default_rng(3)
    gap = np.array(factors["lr"]) + rng.normal(scale=0.2, size=8)
    measure = gap + rng.normal(scale=0.3, size=8)
    result = correlate(measure, gap, factors, seeds=factors["seed"], resamples=300)
    assert result.num_seeds == 2 and distinct_seed_resamples(2) == 3
    seed = np.array(factors["seed"])
    taus = [
        stats.kendalltau(
            np.concatenate([measure[seed == a], measure[seed == b]]),
            np.concatenate([gap[seed == a], gap[seed == b]]),
        ).statistic
        for a, b in ((0, 0), (0, 1), (1, 1))
    ]
    low, high = result.tau_interval_seeds
    assert min(taus) - 1e-12 <= low <= high <= max(taus) + 1e-12
    assert correlate(measure, gap, factors, resamples=300).num_seeds == 0  # no seeds given
    # counted without a bootstrap too, and among the models a measure keeps
    assert correlate(measure, gap, factors, seeds=factors["seed"], resamples=0).num_seeds == 2
    holes = np.where(seed == 1, np.nan, measure)
    assert correlate(holes, gap, factors, seeds=factors["seed"], resamples=50).num_seeds == 1
    assert [distinct_seed_resamples(k) for k in (1, 4, 10)] == [1, 35, 92378]
    with pytest.raises(SharpscopeError, match="seeds has 3 entries for 8 models"):
        correlate(measure, gap, factors, seeds=[0, 1, 2], resamples=0)


def test_a_measure_constant_along_an_axis_scores_zero_on_it():
    """Jiang et al.'s τ counts tied pairs as 0: a measure blind to lr has ψ_lr = 0, not NaN."""
    lr, bs = (a.ravel() for a in np.meshgrid([1, 2, 3], [1, 2, 3], indexing="ij"))
    g = granulated_kendall(bs.astype(float), lr + 10.0 * bs, {"lr": lr, "bs": bs})
    assert g.psi == {"lr": 0.0, "bs": 1.0} and g.num_groups == {"lr": 3, "bs": 3}
    assert g.overall == 0.5
    # one axis and a constant measure: Psi = tau = 0
    single = granulated_kendall(np.ones(9), lr + 0.0, {"lr": lr})
    assert single.overall == single.tau == 0.0


# -- mutation-testing gaps (session 24) ---------------------------------------------------


def test_seed_bootstrap_with_unequal_seeds_is_scipy_on_each_resample():
    """Seeds with unequal numbers of models (a failed run dropped): a resample's padding
    rows are not models; the interval is the quantiles of scipy's τ over the resamples."""
    rng = np.random.default_rng(0)
    seeds = np.array([0] * 6 + [1] * 3 + [2] * 5)
    x = rng.normal(size=14)
    y = x + rng.normal(size=14)
    r = correlate(x, y, {}, seeds=seeds, resamples=400, seed=0)
    index = bootstrap_indices(14, 400, seed=1, clusters=seeds)
    taus = [stats.kendalltau(x[i[i >= 0]], y[i[i >= 0]]).statistic for i in index]
    expected = tuple(np.quantile(taus, [0.025, 0.975]))
    np.testing.assert_allclose(r.tau_interval_seeds, expected, atol=1e-12, rtol=0)


def test_psi_interval_groups_like_psi_with_coupled_axes():
    """The ψ interval of a coupled axis (optimizer with ρ) is the quantiles of
    granulated_kendall's ψ, with the same ``coupled``, over the model resamples."""
    rows = [
        (o, rho, lr)
        for o, rho in (("sgd", 0.0), ("sam", 0.05), ("sam", 0.1))
        for lr in (0.1, 0.2, 0.4)
    ]
    factors = {"opt": [r[0] for r in rows], "rho": [r[1] for r in rows], "lr": [r[2] for r in rows]}
    rng = np.random.default_rng(2)
    gap = rng.normal(size=len(rows))
    measure = gap + rng.normal(scale=0.7, size=len(rows))
    coupled = {"opt": ["rho"]}
    r = correlate(measure, gap, factors, axes=["opt", "lr"], coupled=coupled, resamples=300)
    psis = []
    for i in bootstrap_indices(len(rows), 300, seed=0):
        resampled = {k: np.asarray(v, dtype=object)[i] for k, v in factors.items()}
        g = granulated_kendall(measure[i], gap[i], resampled, axes=["opt"], coupled=coupled)
        psis.append(g.psi["opt"])
    psis = np.array(psis)
    expected = tuple(np.quantile(psis[np.isfinite(psis)], [0.025, 0.975]))
    np.testing.assert_allclose(r.psi_interval["opt"], expected, atol=1e-12, rtol=0)


def test_psi_skips_a_group_left_with_one_value_of_its_axis():
    """Session 30 (studycfg D2): SGD diverged at lr 80 and its row was dropped, so the group
    (lr 80) held only SAM at ρ 0.05 and 0.1; with ρ coupled to the optimizer it counted as
    one of ψ_optimizer's groups and scored the ρ effect there. A group with one value of
    the axis holds no models that differ in it (analysis.md §7) and is skipped, in ψ and in
    its bootstrap alike; ψ_ρ keeps that group."""
    nan = math.nan
    factors = {
        "optimizer": ["sgd", "sam", "sam"] * 2,
        "rho": ["n/a", 0.05, 0.1] * 2,
        "lr": [0.05] * 3 + [80] * 3,
    }
    gap = [3.0, 2.0, 1.0, nan, 2.0, 1.0]
    measure = [30.0, 20.0, 10.0, nan, 10.0, 20.0]  # at lr 80 ρ ranks against the gap
    coupled = {"optimizer": ["rho"]}
    result = granulated_kendall(measure, gap, factors, axes=["optimizer", "rho"], coupled=coupled)
    assert result.psi == {"optimizer": 1.0, "rho": 0.0}
    assert result.num_groups == {"optimizer": 1, "rho": 2}
    # one optimizer left everywhere: no group, ψ undefined (not the ρ effect)
    sam = [i for i in range(6) if factors["optimizer"][i] == "sam"]
    only_sam = {k: [v[i] for i in sam] for k, v in factors.items()}
    alone = granulated_kendall(
        [measure[i] for i in sam],
        [gap[i] for i in sam],
        only_sam,
        axes=["optimizer"],
        coupled=coupled,
    )
    assert alone.num_groups == {"optimizer": 0} and math.isnan(alone.psi["optimizer"])
    # the bootstrap skips such groups in each resample as the point estimate does
    keep = [i for i in range(6) if math.isfinite(gap[i])]
    x, y = np.array(measure)[keep], np.array(gap)[keep]
    table = {k: np.asarray(v, dtype=object)[keep] for k, v in factors.items()}
    r = correlate(x, y, table, axes=["optimizer"], coupled=coupled, resamples=300)
    psis = []
    for i in bootstrap_indices(len(keep), 300, seed=0):
        resampled = {k: v[i] for k, v in table.items()}
        psis.append(granulated_kendall(x[i], y[i], resampled, coupled=coupled).psi["optimizer"])
    psis = np.array(psis)
    expected = tuple(np.quantile(psis[np.isfinite(psis)], [0.025, 0.975]))
    np.testing.assert_allclose(r.psi_interval["optimizer"], expected, atol=1e-12, rtol=0)


def test_the_flatness_notebooks_psi_lr_by_hand_skips_groups_with_one_learning_rate():
    """Session 30 (studycfg D2): the notebook's ψ_lr by hand divided by zero for a group
    with one learning rate (a run diverged, or lr left the sweep); it skips such a group,
    as the library does, and gives the library's ψ_lr and number of groups."""
    import json
    from pathlib import Path

    import sharpscope as ss
    from sharpscope.study.report import correlation_table

    path = Path(__file__).parents[2] / "analysis_notebooks" / "flatness_vs_generalization.ipynb"
    cells = json.loads(path.read_text())["cells"]
    (code,) = ["".join(c["source"]) for c in cells if "psi_lr = " in "".join(c["source"])]

    def setting(r):  # as the notebook's
        return "SGD" if r["optimizer"] == "sgd" else f"SAM ρ={r['rho']}"

    settings = [("sgd", None), ("sam", 0.05), ("sam", 0.2)]
    rows = [
        {
            "optimizer": o,
            "rho": rho,
            "lr": lr,
            "seed": 0,
            "gen_gap": 0.1 * i + lr,
            "lambda_max": 5.0 - i + (lr if i == 1 else -lr),
        }
        for i, (o, rho) in enumerate(settings)
        for lr in (0.05, 0.2)
    ][1:]  # SGD at lr 0.05 diverged: its group has one learning rate
    names = {"ss": ss, "setting": setting, "rows": rows}
    exec(code, names)
    (library,) = correlation_table(
        rows, ["optimizer", "rho", "lr"], measures=["lambda_max"], gaps=["gen_gap"], resamples=0
    )
    assert names["taus"] == [1.0, -1.0] and names["psi_lr"] == library.psi["lr"] == 0.0
    assert library.num_groups["lr"] == 2
    names["rows"] = [r for r in rows if r["lr"] == 0.2]  # lr not swept
    exec(code, names)
    assert names["taus"] == [] and math.isnan(names["psi_lr"])
