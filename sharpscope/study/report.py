"""``sharpscope study report DIR``: correlations, tables, figures and ``report.md``.

For every measure column of ``results.csv`` (oriented so that sharper is larger) and
each generalization gap (``gen_gap`` = test error − train error, ``loss_gap`` = test
loss − train loss) the report computes, over the final checkpoint of every finished
run (analysis.md §7):

* Kendall τ-b with its p-value and a bootstrap interval over models (and over seeds
  when there are several);
* granulated Kendall ψ_k for every swept hyperparameter (seeds define groups and are
  not an axis; ρ, m and any axis that only some optimizers take move with the
  optimizer), Ψ, and their bootstrap intervals.

It writes ``DIR/correlations.csv`` (one row per measure and gap), ``DIR/correlations.json``
(the full results), figures under ``DIR/figures/`` (PDF + PNG with the data beside) and
``DIR/report.md`` with the tables, the figures and the caveats of analysis.md §8.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import SharpscopeError
from ..results import atomic_write_bytes, rows_to_csv_bytes, write_json
from .config import OPTIMIZER_COUPLED, StudyConfig, dataset_name
from .measures import is_measure_column
from .runner import (
    current_record,
    load_study_config_from_dir,
    read_results,
    read_study_dir,
    write_results,
)
from .sweep import expand_sweep

GAPS = ("gen_gap", "loss_gap")
NOT_AXES = ("optimizer_name", "base", "seed")
MAX_SPECTRA = 6  # panels of the spectra figure, two per row
MAX_CURVES = 12  # training curves drawn in the report
# fewer seeds than this: the bootstrap over seeds has under 126 distinct resamples (5 seeds)
FEW_SEEDS = 5
# correlations.csv columns before the per-axis psi_* and groups_* ones
CORRELATION_COLUMNS = (
    "measure",
    "gap",
    "num_models",
    "tau",
    "tau_low",
    "tau_high",
    "p_value",
    "psi_overall",
    "psi_low",
    "psi_high",
    "tau_low_seeds",
    "tau_high_seeds",
    "num_seeds",
)
CAVEATS = """\
- **Not reparametrization invariant.** Rescaling the layers of a ReLU network keeps the
  function but can make λ_max or ε-sharpness arbitrarily large or small (Dinh et al.
  2017); only the adaptive measures remove node-wise rescaling, and not every symmetry.
- **Adaptive sharpness is no guarantee either.** Andriushchenko et al. (2023) found that
  even adaptive sharpness correlates poorly with generalization in modern settings: it
  tracks the learning rate, and sometimes correlates negatively with out-of-distribution
  error.
- **Stopping criterion.** Models here stop after a fixed number of epochs, not at a common
  training loss (Jiang et al. stop at cross-entropy 0.01), so training progress can drive
  part of a correlation; compare the loss columns before reading a τ.
- **Settings.** Measures use the model in eval mode (BatchNorm running statistics), float32
  forward passes with float64 accumulation, filter-normalized directions for landscapes,
  on the analysis subset stated above; a small study has wide intervals — read them."""


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    return str(value)


def _corr(value: Any) -> str:
    if value is None or not math.isfinite(float(value)):
        return "–"
    return f"{float(value):.2f}"


def _interval(pair: Sequence[Any]) -> str:
    low, high = (None if v is None else float(v) for v in pair)
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return ""
    return f" [{low:.2f}, {high:.2f}]"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table.

    >>> print(markdown_table(["a", "b"], [[1, 0.5]]))
    | a | b |
    |---|---|
    | 1 | 0.5 |
    """
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append(
            "| " + " | ".join(_fmt(v) if not isinstance(v, str) else v for v in row) + " |"
        )
    return "\n".join(lines)


def final_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The last analysed checkpoint of every finished run."""
    last: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.get("status") != "done":
            continue
        current = last.get(row["run_id"])
        if current is None or int(row["epoch"]) > int(current["epoch"]):
            last[row["run_id"]] = dict(row)
    return list(last.values())


def measure_columns(rows: Sequence[Mapping[str, Any]], minimum: int = 3) -> list[str]:
    """Measure columns with at least ``minimum`` finite values, in table order."""
    names: dict[str, None] = {}
    for row in rows:
        for key in row:
            if is_measure_column(key):
                names.setdefault(key, None)
    out = []
    for name in names:
        values = [r.get(name) for r in rows]
        finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        if len(finite) >= minimum:
            out.append(name)
    # the aliases say the same as their first (m, rho) column, which names its settings
    aliases = {"m_sharpness": "msharp_", "adaptive_sharpness": "asharp_"}
    return [n for n in out if not (n in aliases and any(o.startswith(aliases[n]) for o in out))]


def study_axes(rows: Sequence[Mapping[str, Any]], swept: Sequence[str]) -> list[str]:
    """Swept hyperparameters that still vary among ``rows`` (seed excluded)."""
    axes = []
    for axis in swept:
        if axis in NOT_AXES:
            continue
        values = {str(r.get(axis)) for r in rows}
        if len(values) > 1:
            axes.append(axis)
    return axes


def optimizer_coupled_axes(rows: Sequence[Mapping[str, Any]], axes: Sequence[str]) -> list[str]:
    """The axes that move with the optimizer in ψ_optimizer's groups: ρ and m, and any
    other axis that some optimizers take and others lack (momentum swept for SGD and SAM,
    absent for bSAM), so that their runs still meet in a group. A group then holds each
    optimizer at each of its settings of these axes, and its τ counts all their pairs
    (SGD at two momenta against each other too), as it always did for SAM's radii."""
    coupled = [a for a in OPTIMIZER_COUPLED if a in axes]
    for axis in axes:
        if axis in coupled or axis in ("optimizer", "seed"):
            continue
        has = {(r.get("optimizer"), r.get(axis) is not None) for r in rows}
        with_it = {name for name, present in has if present}
        without = {name for name, present in has if not present}
        if with_it and without and not with_it & without:
            coupled.append(axis)
    return coupled


def correlation_table(
    rows: Sequence[Mapping[str, Any]],
    swept: Sequence[str],
    *,
    measures: Sequence[str] | None = None,
    gaps: Sequence[str] = GAPS,
    resamples: int = 1000,
    seed: int = 0,
) -> list[Any]:
    """:class:`~sharpscope.analysis.correlation.Correlation` per measure and gap."""
    from ..analysis.correlation import correlate

    measures = list(measures) if measures is not None else measure_columns(rows)
    axes = study_axes(rows, swept)
    factor_names = [*axes, *(["seed"] if any(r.get("seed") is not None for r in rows) else [])]
    factors = {
        name: ["n/a" if r.get(name) is None else str(r.get(name)) for r in rows]
        for name in factor_names
    }
    coupled = {"optimizer": optimizer_coupled_axes(rows, list(factors))}
    seeds = [r.get("seed") for r in rows]
    out = []
    for gap in gaps:
        gap_values = [_number(r.get(gap)) for r in rows]
        if sum(math.isfinite(v) for v in gap_values) < 3:
            continue
        for measure in measures:
            out.append(
                correlate(
                    [_number(r.get(measure)) for r in rows],
                    gap_values,
                    factors,
                    axes=axes,
                    coupled=coupled,
                    seeds=seeds,
                    resamples=resamples,
                    seed=seed,
                    measure_name=measure,
                    target_name=gap,
                )
            )
    return out


def _number(value: Any) -> float:
    if isinstance(value, bool) or value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _correlation_rows(correlations: Sequence[Any]) -> list[dict[str, Any]]:
    rows = []
    for c in correlations:
        row: dict[str, Any] = {
            "measure": c.measure,
            "gap": c.target,
            "num_models": c.num_models,
            "tau": c.tau,
            "tau_low": c.tau_interval[0],
            "tau_high": c.tau_interval[1],
            "p_value": c.p_value,
            "psi_overall": c.overall,
            "psi_low": c.overall_interval[0],
            "psi_high": c.overall_interval[1],
            "tau_low_seeds": c.tau_interval_seeds[0],
            "tau_high_seeds": c.tau_interval_seeds[1],
            "num_seeds": c.num_seeds,
        }
        for axis, value in c.psi.items():
            row[f"psi_{axis}"] = value
            row[f"groups_{axis}"] = c.num_groups[axis]
            row[f"psi_{axis}_low"] = c.psi_interval[axis][0]
            row[f"psi_{axis}_high"] = c.psi_interval[axis][1]
        rows.append(row)
    return rows


def _seed_interval_note(correlations: Sequence[Any]) -> str:
    """A caveat on the interval over seeds when so few seeds give it few distinct values."""
    from ..analysis.correlation import distinct_seed_resamples

    # the fewest seeds any measure's interval rests on (NaN rows drop models, and seeds)
    seeds = min((c.num_seeds for c in correlations if c.num_seeds >= 2), default=0)
    if not 2 <= seeds < FEW_SEEDS:
        return ""
    return (
        f"; the interval over seeds in correlations.csv (`tau_low_seeds`, `tau_high_seeds`) "
        f"resamples whole seeds: with {seeds} seeds it has only "
        f"{distinct_seed_resamples(seeds)} distinct resamples, so its ends are a few of "
        "those values, not a 95% interval"
    )


def _correlation_markdown(correlations: Sequence[Any], gap: str) -> str:
    chosen = [c for c in correlations if c.target == gap]
    if not chosen:
        return "_Not enough finished runs with this gap._"
    axes = list(chosen[0].psi)
    ci = " [95% CI]" if any(_interval(c.tau_interval) for c in chosen) else ""
    headers = ["measure", f"τ{ci}", "p", *[f"ψ {a} (groups)" for a in axes], f"Ψ{ci}", "n"]
    body = []
    for c in chosen:
        p_value = "–" if c.p_value is None or not math.isfinite(c.p_value) else f"{c.p_value:.2g}"
        cells = [f"`{c.measure}`", f"{_corr(c.tau)}{_interval(c.tau_interval)}", p_value]
        for axis in axes:
            cells.append(f"{_corr(c.psi[axis])} ({c.num_groups[axis]})")
        cells.append(f"{_corr(c.overall)}{_interval(c.overall_interval)}")
        cells.append(str(c.num_models))
        body.append(cells)
    return markdown_table(headers, body)


def _runs_markdown(rows: Sequence[Mapping[str, Any]], swept: Sequence[str]) -> str:
    params = ["optimizer", *[a for a in swept if a not in ("optimizer", "optimizer_name", "base")]]
    shown = [
        c
        for c in ("test_acc", "gen_gap", "loss_gap", "lambda_max", "ratio", "trace", "m_sharpness")
        if any(r.get(c) is not None for r in rows)
    ]
    headers = [*params, "epoch", *shown]
    body = []
    for row in rows:
        cells: list[Any] = [row.get(p) if row.get(p) is not None else "–" for p in params]
        cells.append(row.get("epoch"))
        for c in shown:
            value = row.get(c)
            if c in ("test_acc", "gen_gap") and isinstance(value, (int, float)):
                cells.append(f"{100 * value:.1f}%")
            else:
                cells.append(value)
        body.append(cells)
    return markdown_table(headers, body)


def write_report(
    study_dir: str | Path,
    *,
    resamples: int = 1000,
    figures: bool = True,
    seed: int = 0,
) -> Path:
    """Write ``DIR/report.md``, ``correlations.csv/json`` and ``DIR/figures/``.

    Args:
        study_dir: a study folder made by ``sharpscope study run``.
        resamples: bootstrap resamples (0: no intervals).
        figures: also draw the figures.
        seed: seed of the bootstrap.

    Returns:
        The path of ``report.md``.

    Raises:
        SharpscopeError: not a study folder, or a folder from another format version.
    """

    from ..plotting.style import save_figure

    folder = Path(study_dir)
    meta = read_study_dir(folder)
    config = load_study_config_from_dir(folder)
    runs = expand_sweep(config)
    results_path = write_results(folder, runs)
    rows = read_results(results_path)
    finals = final_rows(rows)
    swept = list(meta.get("swept", []))
    correlations = (
        correlation_table(finals, swept, resamples=resamples, seed=seed) if len(finals) >= 3 else []
    )
    measured = _recorded_meta(folder, config)
    correlations = [_with_measurement_meta(c, measured, config.name) for c in correlations]
    corr_rows = _correlation_rows(correlations)
    _write_csv(folder / "correlations.csv", corr_rows, CORRELATION_COLUMNS)
    write_json(folder / "correlations.json", [c.to_dict() for c in correlations], indent=1)

    figure_lines: list[str] = []
    if figures:
        figure_lines = _report_figures(
            folder, finals, correlations, runs, save_figure, resamples, config
        )
    elif any((folder / "figures").glob("*.p*")):
        stale = (
            "figures/ holds the figures of an earlier report, not redrawn by this one "
            "(--no-figures): their numbers may differ from correlations.csv"
        )
        warnings.warn(stale, UserWarning, stacklevel=2)
        figure_lines = [f"Not drawn: {stale}."]

    failed = [r for r in rows if r.get("status") in ("failed", "error")]
    # analyses to come: trained, or finished before an [analysis] change
    trained = {r["run_id"] for r in rows if r.get("status") in ("trained", "analysing")}
    pending = {
        r["run_id"]
        for r in rows
        if r.get("status") not in ("done", "failed", "error", "trained", "analysing")
    }
    train = config.train
    plan = config.analysis
    lines = [
        f"# Study `{config.name}`",
        "",
        config.description or "",
        "",
        "## Setup",
        "",
        f"- data: `{_spec(train.get('dataset', {'name': 'mnist1d'}))}`; model: "
        f"{_models(runs, train.get('model', {'name': 'cnn1d'}))}; epochs: {_values(runs, 'epochs')}; "
        f"batch size: {_values(runs, 'batch_size')}",
        f"- runs: {len(runs)} ({len({r['run_id'] for r in finals})} finished, "
        f"{len({r['run_id'] for r in failed})} failed, "
        + (f"{len(trained)} trained but not yet analysed, " if trained else "")
        + f"{len(pending)} pending); swept: "
        f"{', '.join(a for a in swept if a not in ('optimizer_name', 'base')) or 'nothing'}",
        f"- measures on the {plan.split} split, "
        f"{examples_used(plan.samples, measured)} examples, at epochs "
        f"{', '.join(str(e) for e in plan.epochs)}; correlations use each run's last analysed "
        f"checkpoint; "
        + (
            f"bootstrap: {resamples} resamples (95% percentile intervals)"
            + _seed_interval_note(correlations)
            if resamples
            else "no bootstrap intervals (--resamples 0)"
        ),
        "- gen_gap = test error − train error (= train_acc − test_acc); loss_gap = test loss − "
        "train loss"
        + (
            "; with label noise the train error and the measures use the noisy training "
            "labels and the test error the clean test labels, so noise lowers train_acc and "
            "can make gen_gap negative"
            if any(r.params.get("label_noise") for r in runs)
            else ""
        ),
        "",
        "## Runs (last analysed checkpoint)",
        "",
        _runs_markdown(finals, swept) if finals else "_No finished runs yet._",
        "",
    ]
    for gap in GAPS:
        title = "generalization gap (error)" if gap == "gen_gap" else "loss gap"
        lines += [
            f"## Correlation with the {title}",
            "",
            "Kendall τ-b over all models and granulated Kendall ψ per swept axis (Jiang et al. "
            "2020): τ within groups of models that differ only in that axis, averaged; Ψ is "
            "the mean of the ψ. Positive: sharper goes with a larger gap; p: the two-sided "
            "p-value of τ (scipy). Ties: tied pairs leave τ-b's denominator, and a measure (or "
            "gap) constant over a group while the other varies scores τ = 0 there, as Jiang et "
            "al. count tied pairs, so a measure blind to an axis gets ψ = 0 instead of being "
            "dropped; coarse measures (the PAC-Bayes σ search) have many ties.",
            "",
            _correlation_markdown(correlations, gap),
            "",
        ]
    if figure_lines:
        lines += ["## Figures", "", *figure_lines, ""]
    lines += unconverged_warnings(finals)
    if failed:
        lines += ["## Failed runs", ""]
        for row in {r["run_id"]: r for r in failed}.values():
            lines.append(f"- `{row['run_id']}` ({row['status']}): {row.get('error', '')}")
        lines.append("")
    lines += ["## Caveats", "", CAVEATS, ""]
    source = meta.get("builtin") or meta.get("source") or "CONFIG.toml"
    lines += [
        "## Reproduce",
        "",
        "```",
        f"sharpscope study run {source} --out {folder}",
        f"sharpscope study report {folder}",
        "```",
        "",
    ]
    path = folder / "report.md"
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path


def _with_measurement_meta(correlation: Any, measured: Mapping[str, Any] | None, study: str) -> Any:
    """A correlation whose ``meta`` says what was measured (data, examples, mode, dtype,
    device as an analysis of the study recorded them) beside its bootstrap seed."""
    import dataclasses

    if not measured:
        return correlation
    keys = ("data", "num_samples", "dtype", "device", "mode")
    meta = dataclasses.replace(
        correlation.meta,
        **{k: measured[k] for k in keys if measured.get(k) is not None},
        extra={**correlation.meta.extra, "study": study},
    )
    return dataclasses.replace(correlation, meta=meta)


def examples_used(asked: int | None, meta: Mapping[str, Any] | None) -> int | str:
    """The analysis subset's size as recorded (fewer than ``asked`` on a smaller data set),
    else as asked ("all" when not cut).

    >>> examples_used(1_000_000, {"num_samples": 4000}), examples_used(1024, None)
    (4000, 1024)
    >>> examples_used(None, {"num_samples": 4000}), examples_used(None, {})
    (4000, 'all')
    """
    used = (meta or {}).get("num_samples")
    if isinstance(used, int) and (asked is None or used < asked):
        return used
    return asked or "all"


def measurement_caption(study_dir: str | Path) -> str:
    """One line for a figure of a study's measurements (analysis.md §8: figures state data,
    mode, dtype): dataset, split and size from the config, mode and dtype as recorded by
    the first stored analysis result that has them.

    e.g. ``"measured on mnist1d/train n=1024; eval mode; float32"``.
    """
    folder = Path(study_dir)
    config = load_study_config_from_dir(folder)
    plan = config.analysis
    meta = _recorded_meta(folder, config)
    name = dataset_name(config)
    parts = [f"measured on {name}/{plan.split} n={examples_used(plan.samples, meta)}"]
    if meta:
        parts += [f"{meta['mode']} mode", str(meta["dtype"])]
    return "; ".join(parts)


def _recorded_meta(folder: Path, config: StudyConfig) -> dict[str, Any] | None:
    """The first analysis ``meta`` (with mode and dtype) stored under ``runs/*/analysis``
    by the config's current settings: in a current ``<measure>.json`` or in a file it
    lists (a landscape's ``.npz`` slices)."""
    from ..results import read_record

    def find(value: Any, depth: int = 0) -> dict[str, Any] | None:
        if isinstance(value, Mapping):
            meta = value.get("meta")
            if isinstance(meta, Mapping) and meta.get("mode") and meta.get("dtype"):
                return dict(meta)
            children = value.values()
        elif isinstance(value, list):
            children = value[:3]
        else:
            return None
        for child in children if depth < 4 else ():
            found = find(child, depth + 1)
            if found:
                return found
        return None

    # the spectrum's first: it uses the whole subset (m-sharpness drops a remainder)
    paths = sorted(folder.glob("runs/*/analysis/*/*.json"), key=lambda p: (p.stem != "spectrum", p))
    for path in paths:
        record = current_record(path, config)
        if record is None:
            continue
        # a landscape's record lists its slices (``landscape_1d.npz``), whose meta is inside
        result = record.get("result")
        files = result.get("files") or {} if isinstance(result, Mapping) else {}
        for source in (path, *(path.with_name(name) for name in files.values())):
            try:
                found = find(record if source == path else read_record(source))
            except (OSError, ValueError):
                continue
            if found:
                return found
    return None


UNCONVERGED_WARNINGS = {
    "spectrum_unconverged": "top-k Hessian eigenvalues whose Ritz residual is above the "
    "tolerance (column `spectrum_unconverged` counts them; Lanczos converges the largest "
    "first): their `lambda_5` and `ratio` are not converged, nor is `lambda_max` where the "
    "count equals k. Raise `max_steps` (or `tol`) in `[analysis.spectrum]`",
    "pac_bayes_unconverged": "a PAC-Bayes σ search that never met the target accuracy drop "
    "(column `pac_bayes_unconverged`; a model near chance accuracy runs to `sigma_max`): "
    "their `pac_bayes` / `pac_bayes_mag` are censored, not measured",
}


def unconverged_warnings(finals: Sequence[Mapping[str, Any]]) -> list[str]:
    """report.md's warning lines: the runs whose spectrum or PAC-Bayes search did not
    converge (counted in the ``*_unconverged`` columns)."""
    lines = []
    for column, what in UNCONVERGED_WARNINGS.items():
        runs = [
            r["run_id"] for r in finals if isinstance(r.get(column), (int, float)) and r[column] > 0
        ]
        if runs:
            more = " ..." if len(runs) > 10 else ""
            named = ", ".join(f"`{r}`" for r in runs[:10])
            lines += [f"**Warning:** {len(runs)} run(s) have {what}. Runs: {named}{more}", ""]
    return lines


def _values(runs: Sequence[Any], key: str) -> str:
    """A training setting of the runs for the Setup line: ``128``, or ``32, 128 (swept)``
    (a swept batch size read as the default 128)."""
    values = sorted({r.params[key] for r in runs if r.params.get(key) is not None})
    if len(values) > 1:
        return f"{', '.join(map(str, values))} (swept)"
    return str(values[0]) if values else "–"


def _models(runs: Sequence[Any], default: Mapping[str, Any]) -> str:
    """The runs' models for the Setup line: `` `mlp(width=32)` ``, or each one and
    "(swept)" where ``sweep.model``, ``width`` or ``depth`` replaced ``[train] model``."""
    specs = sorted({_spec(r.train.get("model", default)) for r in runs}) or [_spec(default)]
    shown = ", ".join(f"`{spec}`" for spec in specs)
    return f"{shown} (swept)" if len(specs) > 1 else shown


def _spec(spec: Mapping[str, Any]) -> str:
    name = spec.get("name", spec.get("factory", "?"))
    options = ", ".join(f"{k}={v}" for k, v in spec.items() if k not in ("name", "factory"))
    return f"{name}({options})" if options else str(name)


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], header: Sequence[str] = ()) -> None:
    """CSV of ``rows``; with no rows, the ``header`` line alone (still a valid table)."""
    data = rows_to_csv_bytes(rows) if rows else (",".join(header) + "\n").encode()
    atomic_write_bytes(path, data)


def _report_figures(
    folder, finals, correlations, runs, save_figure, resamples, config
) -> list[str]:
    import matplotlib.pyplot as plt

    from ..plotting.study import (
        plot_correlations,
        plot_measures_vs_gap,
        plot_spectral_densities,
    )
    from ..plotting.style import add_caption
    from ..plotting.training import plot_learned_rho, plot_training_curves
    from .reproductions import _eval_history, _step_history

    out = folder / "figures"
    lines = []
    settings = measurement_caption(folder)

    def keep(
        fig, name: str, caption: str, data: Any, measured: bool = True, note: str = ""
    ) -> None:
        if measured:
            add_caption(fig, f"{settings}; {note}" if note else settings)
            caption = f"{caption} ({settings})"
        save_figure(fig, out / name, data=data)
        plt.close(fig)
        lines.extend(_figure_lines(name, caption))

    gen = [c for c in correlations if c.target == "gen_gap"]
    if gen:
        keep(
            plot_correlations(gen),
            "correlations",
            "Kendall τ and granulated Ψ of every measure with the generalization gap"
            + (" (95% bootstrap intervals)" if resamples else ""),
            _correlation_rows(gen),
        )
        measures = [c.measure for c in gen][:9]
        taus = {c.measure: c.tau for c in gen}
        shown = (
            f" (the first {len(measures)} of {len(gen)} measures; all are in correlations.csv)"
            if len(gen) > len(measures)
            else ""
        )
        keep(
            plot_measures_vs_gap(finals, measures, "gen_gap", taus=taus),
            "measures_vs_gap",
            f"Each measure against the generalization gap, one point per model{shown}",
            [{k: r.get(k) for k in ("run_id", "optimizer", "gen_gap", *measures)} for r in finals],
        )
    histories = {}
    for run in runs:
        path = folder / "runs" / run.run_id / "metrics.jsonl"
        if path.exists():
            histories[run.run_id] = path
    curves = _one_run_per_setting(runs, histories)
    if curves:
        shown = dict(list(curves.items())[:MAX_CURVES])
        more = (
            f" (the first {MAX_CURVES} of {len(curves)} settings)"
            if len(curves) > len(shown)
            else ""
        )
        names = _setting_names(runs)
        fig = plot_training_curves(
            {names.get(label, label): path for label, path in shown.items()},
            metrics=("test_acc", "train_loss"),
        )
        keep(
            fig,
            "training_curves",
            f"Test error and training loss per epoch, one run (the lowest seed) per setting{more}",
            {names.get(label, label): _eval_history(path) for label, path in shown.items()},
            measured=False,
        )
        lets = {
            f"{names[_setting_label(run)]} (seed {run.params.get('seed')})": histories[run.run_id]
            for run in runs
            if run.run_id in histories and run.run_id.startswith("lets")
        }
        if lets:
            try:
                fig = plot_learned_rho(lets)
                keep(
                    fig,
                    "lets_rho",
                    "LETS: the learned ρ over optimizer steps",
                    {k: _step_history(v, "rho") for k, v in lets.items()},
                    measured=False,
                )
            except SharpscopeError:
                pass
    curves, lmax, chosen = _densities(folder, runs)
    if curves:
        names = _setting_names(runs)
        shown = dict(list(curves.items())[:MAX_SPECTRA])
        which = (
            f"the first run of the first {len(shown)} of {len(curves)} optimizers"
            if len(curves) > len(shown)
            else "the first run of each optimizer"
        )
        keep(
            plot_spectral_densities(
                shown,
                lambda_max=lmax,
                titles={k: f"{names.get(v, v)}, seed {s}" for k, (v, s) in chosen.items()},
            ),
            "spectra",
            "Hessian eigenvalue density (stochastic Lanczos quadrature, Papyan's kernel) of "
            f"{which}, per analysed epoch; λ_max in the legend",
            {k: [{"epoch": e, **d} for e, d in v] for k, v in shown.items()},
            note="SLQ density, Papyan kernel",
        )
    lines += _landscape_figures(folder, out, config, runs)
    return lines


LANDSCAPE_CAPTIONS = {
    "d_landscape_1d": "Loss along one filter-normalized random direction through the final "
    "solution of the first run of each optimizer (Li et al. 2018)",
    "d_landscape_2d": "Loss on a plane of two filter-normalized random directions through the "
    "final solution of the first run of each optimizer",
    "d_interpolation": "Loss on the line between the final solutions of the configured "
    "optimizer pairs (runs that agree in every other hyperparameter)",
}


def _landscape_figures(folder: Path, out: Path, config: Any, runs: list) -> list[str]:
    """The figures of ``[analysis.landscape]`` (as reproduction (d) draws them), when the
    config has that table: a custom study's landscapes were written but never shown."""
    from .reproductions import figures_d

    if not config.analysis.measures.get("landscape"):
        return []  # files of a table removed from the config are not drawn
    try:
        written, _ = figures_d(folder, out, config=config, runs=runs)
    except SharpscopeError:  # e.g. interrupted before its last epoch's landscapes
        return ["_No landscape figures yet: the runs' last analysed epochs have none._", ""]
    return [
        line
        for path in written
        if path.suffix == ".png"
        for line in _figure_lines(path.stem, LANDSCAPE_CAPTIONS.get(path.stem, path.stem))
    ]


def _figure_lines(name: str, caption: str) -> list[str]:
    """report.md's lines for ``figures/NAME``: the PNG, and the caption with the PDF and the
    data beside it."""
    return [
        f"![{caption}](figures/{name}.png)",
        "",
        f"*{caption}* ([PDF](figures/{name}.pdf), data: `figures/{name}.*`)",
        "",
    ]


def _setting_label(run) -> str:
    seed = run.params.get("seed")
    return run.run_id.replace(f"-s{seed}", "", 1) if seed is not None else run.run_id


def _setting_names(runs) -> dict[str, str]:
    """Setting label (``sam-rho0.05-lr0.1``) -> legend name (``SAM ρ=0.05 lr=0.1``)."""
    from ..plotting.style import optimizer_label
    from .sweep import format_value

    names = {}
    for run in runs:
        words = [optimizer_label(run.params["optimizer"])]
        for key in getattr(run, "swept", []):
            value = run.params.get(key)
            if key not in ("optimizer", "seed") and value is not None:
                words.append(f"{'ρ' if key == 'rho' else key}={format_value(value)}")
        names[_setting_label(run)] = " ".join(words)
    return names


def _one_run_per_setting(runs, histories: Mapping[str, Path]) -> dict[str, Path]:
    """Label (the run id without its seed) -> history of the lowest-seed run of each setting."""
    chosen: dict[str, tuple[Any, Path]] = {}
    for run in runs:
        if run.run_id not in histories:
            continue
        seed = run.params.get("seed")
        label = _setting_label(run)
        if label not in chosen or (seed is not None and seed < chosen[label][0]):
            chosen[label] = (seed, histories[run.run_id])
    return {label: path for label, (_, path) in chosen.items()}


def _densities(folder: Path, runs) -> tuple[dict, dict, dict]:
    """Spectral densities of the first run of each optimizer, per analysed epoch, its λmax,
    and which run that is (label -> (setting label, seed))."""
    import json

    from .reproductions import smoothed_density

    curves: dict[str, list] = {}
    lmax: dict[str, list] = {}
    chosen: dict[str, tuple[str, Any]] = {}
    for run in runs:
        label = run.params["optimizer"]
        if label in chosen:
            continue
        entries, tops = [], []
        for epoch in run.analysis_epochs:
            path = (
                folder / "runs" / run.run_id / "analysis" / f"epoch_{epoch:03d}" / "spectrum.json"
            )
            if not path.exists():
                continue
            result = json.loads(path.read_text()).get("result", {})
            density = result.get("density") or {}
            if density.get("grid") and density.get("values"):
                entries.append((epoch, smoothed_density(density)))
                if result.get("lambda_max") is not None:
                    tops.append((epoch, result["lambda_max"]))
        if entries:
            chosen[label] = (_setting_label(run), run.params.get("seed"))
            curves[label] = entries
            lmax[label] = tops
    return curves, lmax, chosen
