"""Gap tests for mutants of sharpscope/study/report.py that the suite let through
(session 24, mut_study). Each passes on the current code and fails on its mutant."""

from __future__ import annotations

from sharpscope.analysis.correlation import Correlation


def _correlation(**kw):
    values = dict(
        measure="lambda_max",
        target="gen_gap",
        num_models=8,
        tau=0.5,
        p_value=0.04,
        tau_interval=(0.1, 0.9),
        psi={"optimizer": 0.25, "lr": 0.75},
        num_groups={"optimizer": 4, "lr": 2},
        psi_interval={"optimizer": (-0.2, 0.6), "lr": (0.3, 1.0)},
        overall=0.5,
        overall_interval=(0.05, 0.8),
        tau_interval_seeds=(0.2, 0.7),
        overall_interval_seeds=(0.0, 0.6),
        num_seeds=4,
    )
    values.update(kw)
    return Correlation(**values)


# P08 (psi_low/psi_high from the τ interval) and P09 (per-axis ψ interval ends swapped)
def test_correlations_csv_columns_hold_their_own_intervals():
    from sharpscope.study.report import _correlation_rows

    (row,) = _correlation_rows([_correlation()])
    assert row == {
        "measure": "lambda_max", "gap": "gen_gap", "num_models": 8, "tau": 0.5,
        "tau_low": 0.1, "tau_high": 0.9, "p_value": 0.04,
        "psi_overall": 0.5, "psi_low": 0.05, "psi_high": 0.8,
        "tau_low_seeds": 0.2, "tau_high_seeds": 0.7, "num_seeds": 4,
        "psi_optimizer": 0.25, "groups_optimizer": 4,
        "psi_optimizer_low": -0.2, "psi_optimizer_high": 0.6,
        "psi_lr": 0.75, "groups_lr": 2, "psi_lr_low": 0.3, "psi_lr_high": 1.0,
    }  # fmt: skip


# P10 FEW_SEEDS 5 -> 4: four seeds give 35 distinct resamples, still worth the caveat
def test_the_seed_interval_caveat_covers_four_seeds_but_not_five():
    from sharpscope.study.report import _seed_interval_note

    assert "with 4 seeds it has only 35 distinct resamples" in _seed_interval_note(
        [_correlation(num_seeds=4)]
    )
    assert _seed_interval_note([_correlation(num_seeds=5)]) == ""


# P12 (τ/ψ printed with one decimal) in report.md's correlation tables
def test_report_correlation_table_prints_two_decimals():
    from sharpscope.study.report import _correlation_markdown

    table = _correlation_markdown([_correlation(tau=0.8166, overall=-0.333)], "gen_gap")
    body = table.splitlines()[2]
    assert body == (
        "| `lambda_max` | 0.82 [0.10, 0.90] | 0.04 | 0.25 (4) | 0.75 (2) | -0.33 [0.05, 0.80] | 8 |"
    )


# P20 _fmt: numbers under 1e-3 in report.md tables are in scientific notation
def test_small_table_numbers_are_in_scientific_notation():
    from sharpscope.study.report import _fmt

    assert _fmt(0.000123) == "1.23e-04"
    assert _fmt(0.00123) == "0.00123"
    assert _fmt(12345.0) == "1.23e+04"
