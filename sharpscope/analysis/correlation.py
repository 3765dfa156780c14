"""Rank correlation of a complexity measure with the generalization gap (analysis.md §7).

Over a population of trained models with measure values μ_i and generalization gaps
g_i (test error − train error, or test loss − train loss):

* **Kendall τ.** τ = mean over pairs of sign(μ_i − μ_j)·sign(g_i − g_j); with ties we
  use τ-b (Kendall 1945), the variant of ``scipy.stats.kendalltau``:

      τ_b = (n_c − n_d) / sqrt((n_0 − n_1)(n_0 − n_2)),

  n_0 = n(n−1)/2 pairs, n_1 / n_2 pairs tied in μ / in g. τ > 0: a larger measure
  goes with a larger gap, so measures must be oriented "sharper is larger".
* **Granulated Kendall** (Jiang et al., "Fantastic Generalization Measures and Where to
  Find Them", ICLR 2020, arXiv:1912.02178, eq. 4). For each hyperparameter axis k,
  group the models by the values of all *other* axes; in every group whose models take
  at least two values of axis k (they differ only in axis k) compute τ; ψ_k is the mean
  over groups and
  Ψ = (1/K) Σ_k ψ_k. ψ_k isolates the effect of changing one hyperparameter: a measure
  that only tracks, say, the learning rate scores high on ψ_lr and not elsewhere.
  ``coupled`` lets an axis carry other axes with it: in a study the optimizer axis
  moves ρ and m too (SGD has no ρ), so comparing SGD with SAM at ρ = 0.05 groups by
  everything except optimizer, ρ and m. A group left with one value of the axis (SGD
  diverged, SAM at two radii remains) holds no comparison of that axis and is skipped:
  its τ would score the coupled ρ instead.
* **Uncertainty.** Percentile bootstrap over models (resample rows with replacement,
  1,000 resamples by default) and, when seeds are given, over seeds (resample whole
  seeds: every model trained with a drawn seed enters together).

Rows with a missing (NaN) measure or gap are dropped first (failed runs, measures not
computed). The bootstrap uses a vectorized τ-b that equals ``scipy.stats.kendalltau``
(tested on random tables with ties).

Example (a hand-checkable 4-model table: one discordant pair of six):

    >>> round(kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]), 6)
    0.666667
    >>> g = granulated_kendall([1, 2, 3, 4], [1, 2, 3, 4], {"lr": [1, 2, 1, 2], "bs": [1, 1, 2, 2]})
    >>> g.psi, g.num_groups, g.overall
    ({'lr': 1.0, 'bs': 1.0}, {'lr': 2, 'bs': 2}, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from ..errors import SharpscopeError, check
from ..results import Result, RunMeta

__all__ = [
    "Correlation",
    "GranulatedKendall",
    "bootstrap_indices",
    "correlate",
    "distinct_seed_resamples",
    "granulated_kendall",
    "kendall_tau",
    "tau_b_grouped",
]

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95


def _as_float(values: Sequence[Any] | np.ndarray, name: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SharpscopeError(f"{name} must be numbers, got {values!r}") from exc
    if array.ndim != 1:
        raise SharpscopeError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def kendall_tau(measure: Sequence[float], gap: Sequence[float]) -> float:
    """Kendall τ-b between a measure and the generalization gap (``scipy.stats.kendalltau``).

    Args:
        measure: μ_i per model, oriented so that sharper is larger.
        gap: g_i per model.

    Returns:
        τ-b in [−1, 1]; NaN with fewer than two complete models or when both columns are
        constant; 0 when only one is (every pair tied: no ordering predicted, counted as
        Jiang et al. count tied pairs, and as the granulated ψ does, so that one axis gives
        Ψ = τ).

    Raises:
        SharpscopeError: when the two sequences differ in length.
    """
    x, y = _as_float(measure, "measure"), _as_float(gap, "gap")
    if x.shape != y.shape:
        raise SharpscopeError(f"measure has {x.size} values but gap has {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 2:
        return math.nan
    constant_x, constant_y = bool(np.all(x == x[0])), bool(np.all(y == y[0]))
    if constant_x or constant_y:  # as in the granulated ψ: tied pairs count 0 (Jiang et al.)
        return math.nan if constant_x and constant_y else 0.0
    return float(stats.kendalltau(x, y, variant="b").statistic)


def tau_b_grouped(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    num_groups: int,
    chunk: int = 64,
    *,
    constant_is_zero: bool = False,
) -> np.ndarray:
    """τ-b within each group, for a batch of tables at once.

    Args:
        x, y: ``(B, n)`` measure and gap of B tables of n models each.
        groups: ``(B, n)`` integer group of each model, in ``[0, num_groups)``; −1 leaves
            a model out (padding).
        num_groups: G.
        chunk: tables processed together (bounds the ``(chunk, n(n−1)/2)`` pair arrays).
        constant_is_zero: a group whose measure or gap is constant, but which has a
            pair differing in the other column, gets τ = 0 (Jiang et al.'s τ counts tied
            pairs as 0) instead of NaN.

    Returns:
        ``(B, G)`` τ-b per table and group; NaN where a group has no pair untied in
        both columns (fewer than two models, or a constant column), except as above.
    """
    x, y = np.atleast_2d(x), np.atleast_2d(y)
    groups = np.atleast_2d(groups)
    num_tables, n = x.shape
    out = np.full((num_tables, num_groups), np.nan)
    if n < 2:
        return out
    first, second = np.triu_indices(n, 1)
    for start in range(0, num_tables, chunk):
        stop = min(start + chunk, num_tables)
        xs, ys, gs = x[start:stop], y[start:stop], groups[start:stop]
        sx = np.sign(xs[:, first] - xs[:, second])
        sy = np.sign(ys[:, first] - ys[:, second])
        ga, gb = gs[:, first], gs[:, second]
        # pairs outside any group go to an overflow bucket G that is dropped
        bucket = np.where((ga == gb) & (ga >= 0), ga, num_groups)
        flat = (bucket + (num_groups + 1) * np.arange(stop - start)[:, None]).ravel()

        rows = stop - start

        def total(weights: np.ndarray, flat: np.ndarray = flat, rows: int = rows) -> np.ndarray:
            counts = np.bincount(flat, weights=weights.ravel(), minlength=rows * (num_groups + 1))
            return counts.reshape(rows, num_groups + 1)[:, :num_groups]

        score = total(sx * sy)
        untied_x = total(np.abs(sx))
        untied_y = total(np.abs(sy))
        denominator = np.sqrt(untied_x * untied_y)
        undefined = np.nan
        if constant_is_zero:
            # some pair differs in one column (not only copies of one model, as a
            # bootstrap resample can hold): no concordance, τ = 0
            untied_either = total(((sx != 0) | (sy != 0)).astype(np.float64))
            undefined = np.where(untied_either > 0, 0.0, np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start:stop] = np.where(denominator > 0, score / denominator, undefined)
    return out


def _group_codes(
    factors: Mapping[str, np.ndarray], keys: Sequence[str], n: int
) -> tuple[np.ndarray, int]:
    """Integer code of each model's combination of values on ``keys``."""
    if not keys:
        return np.zeros(n, dtype=np.int64), 1
    labels = [tuple(str(factors[k][i]) for k in keys) for i in range(n)]
    unique = {label: code for code, label in enumerate(dict.fromkeys(labels))}
    return np.array([unique[label] for label in labels], dtype=np.int64), len(unique)


def _groups_varying(groups: np.ndarray, levels: np.ndarray, num_groups: int) -> np.ndarray:
    """Whether each group holds at least two values of the axis, for a batch of tables.

    Args:
        groups: ``(B, n)`` group of each model (−1: padding), as :func:`tau_b_grouped`.
        levels: ``(B, n)`` integer code of each model's value of the axis.
        num_groups: G.

    Returns:
        ``(B, G)`` booleans; False for a group with one value of the axis (or no model).
    """
    groups, levels = np.atleast_2d(groups), np.atleast_2d(levels)
    rows = groups.shape[0]
    bucket = np.where(groups >= 0, groups, num_groups) + (num_groups + 1) * np.arange(rows)[:, None]
    low = np.full(rows * (num_groups + 1), np.iinfo(np.int64).max)
    high = np.full(rows * (num_groups + 1), -1, dtype=np.int64)
    np.minimum.at(low, bucket.ravel(), levels.ravel())
    np.maximum.at(high, bucket.ravel(), levels.ravel())
    return (high > low).reshape(rows, num_groups + 1)[:, :num_groups]


@dataclass(frozen=True)
class GranulatedKendall(Result):
    """ψ_k per axis, the number of groups behind each, Ψ and the overall τ."""

    kind = "granulated_kendall"
    psi: dict[str, float]
    num_groups: dict[str, int]
    overall: float
    tau: float
    num_models: int


def _granulated_point(
    x: np.ndarray,
    y: np.ndarray,
    factors: Mapping[str, np.ndarray],
    axes: Sequence[str],
    coupled: Mapping[str, Sequence[str]],
) -> tuple[dict[str, float], dict[str, int]]:
    psi: dict[str, float] = {}
    counts: dict[str, int] = {}
    for axis in axes:
        others = [k for k in factors if k != axis and k not in coupled.get(axis, ())]
        codes, num = _group_codes(factors, others, x.size)
        taus = tau_b_grouped(x[None], y[None], codes[None], num, constant_is_zero=True)[0]
        levels, _ = _group_codes(factors, [axis], x.size)
        taus[~_groups_varying(codes[None], levels[None], num)[0]] = np.nan
        valid = taus[np.isfinite(taus)]
        psi[axis] = float(valid.mean()) if valid.size else math.nan
        counts[axis] = int(valid.size)
    return psi, counts


def _prepare(
    measure: Sequence[float],
    gap: Sequence[float],
    factors: Mapping[str, Sequence[Any]],
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray]:
    x, y = _as_float(measure, "measure"), _as_float(gap, "gap")
    if x.shape != y.shape:
        raise SharpscopeError(f"measure has {x.size} values but gap has {y.size}")
    table = {}
    for name, values in factors.items():
        column = np.asarray(list(values), dtype=object)
        if column.shape != x.shape:
            raise SharpscopeError(f"factor '{name}' has {column.size} values, expected {x.size}")
        table[name] = column
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep], {k: v[keep] for k, v in table.items()}, keep


def granulated_kendall(
    measure: Sequence[float],
    gap: Sequence[float],
    factors: Mapping[str, Sequence[Any]],
    *,
    axes: Sequence[str] | None = None,
    coupled: Mapping[str, Sequence[str]] | None = None,
) -> GranulatedKendall:
    """Granulated Kendall coefficient of Jiang et al. (2020, eq. 4).

    Args:
        measure: μ_i per model (sharper is larger).
        gap: g_i per model.
        factors: hyperparameter name -> value per model (any hashable values; NaN/None
            are values like any other, so "not applicable" forms its own level).
        axes: the axes ψ is computed for (default: every factor). Factors that are not
            axes still define groups (e.g. ``seed``: models are only compared within a seed).
        coupled: axis -> factors that change together with it and are therefore not
            held fixed when that axis varies (e.g. ``{"optimizer": ["rho", "m"]}``).

    Returns:
        :class:`GranulatedKendall` with ``psi[k]`` (NaN when no group has two comparable
        models), ``num_groups[k]`` (groups with a defined τ: two models or more, at two
        values of axis k or more), ``overall`` Ψ (mean of the defined ψ_k) and the
        ungrouped τ.
    """
    x, y, table, _ = _prepare(measure, gap, factors)
    axes = list(axes) if axes is not None else list(table)
    unknown = [a for a in axes if a not in table]
    if unknown:
        raise SharpscopeError(
            f"axis '{unknown[0]}' is not one of the factors: {', '.join(table) or '(none)'}"
        )
    psi, counts = _granulated_point(x, y, table, axes, dict(coupled or {}))
    defined = [v for v in psi.values() if math.isfinite(v)]
    overall = float(np.mean(defined)) if defined else math.nan
    return GranulatedKendall(
        psi=psi, num_groups=counts, overall=overall, tau=kendall_tau(x, y), num_models=x.size
    )


def bootstrap_indices(
    n: int,
    resamples: int,
    *,
    seed: int = 0,
    clusters: Sequence[Any] | None = None,
) -> np.ndarray:
    """Row indices of bootstrap resamples, padded with −1.

    Args:
        n: number of models.
        resamples: B.
        seed: seed of the generator.
        clusters: optional label per model (e.g. its seed); then whole clusters are
            drawn with replacement, so resamples differ in size and are padded with −1.

    Returns:
        ``(B, width)`` int array; row b lists the models of resample b.

    >>> bootstrap_indices(3, 2, seed=0).shape
    (2, 3)
    """
    rng = np.random.default_rng(seed)
    if clusters is None:
        return rng.integers(0, n, size=(resamples, n))
    labels = np.asarray(list(clusters), dtype=object)
    members = [np.flatnonzero(labels == c) for c in dict.fromkeys(labels.tolist())]
    draws = rng.integers(0, len(members), size=(resamples, len(members)))
    rows = [np.concatenate([members[c] for c in draw]) for draw in draws]
    width = max(len(r) for r in rows)
    out = np.full((resamples, width), -1, dtype=np.int64)
    for b, r in enumerate(rows):
        out[b, : len(r)] = r
    return out


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if finite.size < max(10, samples.size // 2):
        return (math.nan, math.nan)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(finite, [alpha, 1.0 - alpha])
    return (float(low), float(high))


def distinct_seed_resamples(num_seeds: int) -> int:
    """Distinct resamples of a bootstrap over ``num_seeds`` whole seeds: the multisets of
    k draws from k, C(2k − 1, k).

    >>> [distinct_seed_resamples(k) for k in (2, 3, 4, 5)]
    [3, 10, 35, 126]
    """
    return math.comb(2 * num_seeds - 1, num_seeds) if num_seeds > 0 else 0


def _bootstrap(
    x: np.ndarray,
    y: np.ndarray,
    table: Mapping[str, np.ndarray],
    axes: Sequence[str],
    coupled: Mapping[str, Sequence[str]],
    index: np.ndarray,
    level: float,
) -> tuple[tuple[float, float], dict[str, tuple[float, float]], tuple[float, float]]:
    """Percentile intervals of τ, every ψ_k and Ψ over the resamples in ``index``."""
    valid = index >= 0
    safe = np.where(valid, index, 0)
    xb, yb = x[safe], y[safe]
    overall_groups = np.where(valid, 0, -1)
    tau_samples = tau_b_grouped(xb, yb, overall_groups, 1, constant_is_zero=True)[:, 0]
    psi_samples = {}
    for axis in axes:
        others = [k for k in table if k != axis and k not in coupled.get(axis, ())]
        codes, num = _group_codes(table, others, x.size)
        groups = np.where(valid, codes[safe], -1)
        taus = tau_b_grouped(xb, yb, groups, num, constant_is_zero=True)
        levels, _ = _group_codes(table, [axis], x.size)
        taus[~_groups_varying(groups, levels[safe], num)] = np.nan  # as in the point estimate
        with np.errstate(invalid="ignore"):
            counts = np.isfinite(taus).sum(axis=1)
            sums = np.where(np.isfinite(taus), taus, 0.0).sum(axis=1)
            psi_samples[axis] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    if axes:
        stacked = np.stack([psi_samples[a] for a in axes], axis=1)
        finite = np.isfinite(stacked)
        overall_samples = np.where(
            finite.any(axis=1),
            np.where(finite, stacked, 0.0).sum(axis=1) / np.maximum(finite.sum(axis=1), 1),
            np.nan,
        )
    else:
        overall_samples = np.full(index.shape[0], np.nan)
    return (
        _interval(tau_samples, level),
        {a: _interval(psi_samples[a], level) for a in axes},
        _interval(overall_samples, level),
    )


@dataclass(frozen=True)
class Correlation(Result):
    """How one measure ranks the models against one generalization gap.

    ``*_interval`` fields are percentile bootstrap intervals at ``level``: over models
    (``tau_interval``, ``psi_interval``, ``overall_interval``) and, when seeds were
    given, over seeds (``tau_interval_seeds``, ``overall_interval_seeds``). ``num_seeds``:
    the distinct seeds among the models (0 when none were given). The interval over seeds
    resamples whole seeds, so with ``num_seeds`` = k it has only C(2k − 1, k)
    distinct resamples (:func:`distinct_seed_resamples`: 3 for 2 seeds, 10 for 3): with
    few seeds its ends are a handful of values, not a 95% interval. ``meta.seed`` is the
    bootstrap's seed; a study's report adds what was measured (data, examples, mode, dtype).
    """

    kind = "correlation"
    measure: str
    target: str
    num_models: int
    tau: float
    p_value: float
    tau_interval: tuple[float, float]
    psi: dict[str, float]
    num_groups: dict[str, int]
    psi_interval: dict[str, tuple[float, float]]
    overall: float
    overall_interval: tuple[float, float]
    tau_interval_seeds: tuple[float, float] = (math.nan, math.nan)
    overall_interval_seeds: tuple[float, float] = (math.nan, math.nan)
    num_seeds: int = 0
    resamples: int = DEFAULT_RESAMPLES
    level: float = DEFAULT_LEVEL
    meta: RunMeta = field(default_factory=RunMeta)


def correlate(
    measure: Sequence[float],
    gap: Sequence[float],
    factors: Mapping[str, Sequence[Any]] | None = None,
    *,
    axes: Sequence[str] | None = None,
    coupled: Mapping[str, Sequence[str]] | None = None,
    seeds: Sequence[Any] | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
    measure_name: str = "measure",
    target_name: str = "gen_gap",
) -> Correlation:
    """Kendall τ-b, granulated Kendall and their bootstrap intervals.

    Args:
        measure, gap: per-model values (NaN rows are dropped).
        factors: hyperparameters per model (see :func:`granulated_kendall`); a ``seed``
            factor should be included so models are compared within a seed.
        axes: axes for ψ (default: every factor except ``seed``).
        coupled: factors that move with an axis (``{"optimizer": ["rho", "m"]}``).
        seeds: training seed per model, for the bootstrap over seeds (skipped with
            fewer than two distinct seeds).
        resamples: bootstrap resamples (1,000 as in analysis.md §7; 0 disables).
        level: coverage of the intervals.
        seed: seed of the bootstrap generator.
        measure_name, target_name: recorded in the result.

    Returns:
        :class:`Correlation`.
    """
    factors = dict(factors or {})
    x, y, table, keep = _prepare(measure, gap, factors)
    if axes is None:
        axes = [k for k in table if k != "seed"]
    coupled = {k: list(v) for k, v in (coupled or {}).items()}
    point = granulated_kendall(x, y, table, axes=axes, coupled=coupled)
    p_value = math.nan
    if x.size >= 2 and math.isfinite(point.tau):
        p_value = float(stats.kendalltau(x, y, variant="b").pvalue)
    nan2 = (math.nan, math.nan)
    tau_ci, psi_ci, overall_ci = nan2, {a: nan2 for a in axes}, nan2
    tau_seed_ci, overall_seed_ci = nan2, nan2
    if seeds is not None:
        seeds = list(seeds)
        check(
            len(seeds) == len(keep),
            f"seeds has {len(seeds)} entries for {len(keep)} models; give one seed per model",
        )
    seed_labels = np.asarray(seeds, dtype=object)[keep] if seeds is not None else None
    num_seeds = len(set(seed_labels.tolist())) if seed_labels is not None else 0
    if resamples > 0 and x.size >= 3:
        index = bootstrap_indices(x.size, resamples, seed=seed)
        tau_ci, psi_ci, overall_ci = _bootstrap(x, y, table, axes, coupled, index, level)
        if seed_labels is not None and num_seeds >= 2:
            index = bootstrap_indices(x.size, resamples, seed=seed + 1, clusters=seed_labels)
            tau_seed_ci, _, overall_seed_ci = _bootstrap(x, y, table, axes, coupled, index, level)
    return Correlation(
        measure=measure_name,
        target=target_name,
        num_models=int(x.size),
        tau=point.tau,
        p_value=p_value,
        tau_interval=tau_ci,
        psi=point.psi,
        num_groups=point.num_groups,
        psi_interval=psi_ci,
        overall=point.overall,
        overall_interval=overall_ci,
        tau_interval_seeds=tau_seed_ci,
        overall_interval_seeds=overall_seed_ci,
        num_seeds=num_seeds,
        resamples=int(resamples),
        level=float(level),
        meta=RunMeta(seed=seed, dtype="float64"),
    )
