"""The reproductions (a)-(f) of the SAM literature and ``sharpscope figures``.

Each reproduction has a shipped quick config (MNIST-1D, CPU, minutes) and a documented
full config (CIFAR-10, GPUs): ``sharpscope study run a-spectra-full``. ``make_figures``
runs the quick ones (a study folder that is already complete is reused as is), then
writes every figure to ``figures/`` as PDF + PNG with the data beside it, and
``figures/summary.json`` with the headline numbers.

===== ===================================== =============================================
id    what                                  figures
===== ===================================== =============================================
quick SGD vs SAM/ASAM/VaSSO, all measures   quick_correlations, quick_measures_vs_gap,
                                            quick_training_curves
a     SAM Fig. 3 left: Hessian spectra       a_spectra (+ a_spectra_table.csv/.md)
b     SAM Fig. 3 middle: error vs m          b_error_vs_m
c     SAM Fig. 3 right: m-sharpness vs gap   c_tau_vs_m, c_msharpness_vs_gap
d     landscapes and interpolation           d_landscape_1d, d_landscape_2d, d_interpolation
e     label noise                            e_label_noise
f     the variants side by side             f_variants, f_calibration, f_lets_rho
===== ===================================== =============================================
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SharpscopeError
from ..results import atomic_write_bytes, read_record, write_json

Log = Callable[[str], None]


@dataclass(frozen=True)
class Reproduction:
    """One reproduction: its configs and the function that draws its figures."""

    key: str
    title: str
    quick: str
    full: str | None
    figures: Callable[[Path, Path], tuple[list[Path], dict[str, Any]]]


def _rows(study_dir: Path) -> list[dict[str, Any]]:
    from .runner import read_results

    return read_results(study_dir / "results.csv")


def _done_last(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    from .report import final_rows

    return final_rows(rows)


def _mean(values: Sequence[Any]) -> float:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(finite)) if finite else math.nan


def _std(values: Sequence[Any]) -> float:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0


def _save(fig: Any, path: Path, data: Any, caption: str = "") -> list[Path]:
    """Save a figure (PDF, PNG, data), with ``caption`` as a small line under it."""
    import matplotlib.pyplot as plt

    from ..plotting.style import add_caption, save_figure

    add_caption(fig, caption)
    written = save_figure(fig, path, data=data)
    plt.close(fig)
    return written


def _by(rows: Sequence[dict[str, Any]], key: str) -> dict[Any, list[dict[str, Any]]]:
    out: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(row.get(key), []).append(row)
    return out


# --------------------------------------------------------------------------- quick
def figures_quick(study_dir: Path, out: Path) -> tuple[list[Path], dict[str, Any]]:
    """The quick study: correlations, measures against the gap, training curves."""
    from ..plotting.study import plot_correlations, plot_measures_vs_gap
    from ..plotting.training import plot_training_curves
    from .report import _correlation_rows, correlation_table, measure_columns, measurement_caption
    from .runner import read_study_dir

    rows = _done_last(_rows(study_dir))
    swept = read_study_dir(study_dir).get("swept", [])
    correlations = [c for c in correlation_table(rows, swept) if c.target == "gen_gap"]
    caption = measurement_caption(study_dir)
    # the CSV and JSON of a study's correlations.csv/json: flat columns, and every field
    written = _save(
        plot_correlations(correlations),
        out / "quick_correlations",
        _correlation_rows(correlations),
        caption,
    )
    write_json(out / "quick_correlations.json", [c.to_dict() for c in correlations], indent=1)
    written.append(out / "quick_correlations.json")
    measures = [m for m in measure_columns(rows) if not m.startswith(("lambda_5", "weight"))][:6]
    taus = {c.measure: c.tau for c in correlations}
    written += _save(
        plot_measures_vs_gap(rows, measures, taus=taus, ncols=3),
        out / "quick_measures_vs_gap",
        [
            {k: r.get(k) for k in ("run_id", "optimizer", "rho", "seed", "gen_gap", *measures)}
            for r in rows
        ],
        caption,
    )
    # one curve per optimizer setting: first seed, largest learning rate
    seed = min(r["seed"] for r in rows)
    lr = max((r["lr"] for r in rows if r.get("lr") is not None), default=None)
    histories = {}
    for row in rows:
        if row["seed"] == seed and row.get("lr") == lr:
            rho = f" ρ={row['rho']:g}" if row.get("rho") is not None else ""
            label = f"{row['optimizer']}{rho}"
            histories[label] = study_dir / "runs" / row["run_id"] / "metrics.jsonl"
    written += _save(
        plot_training_curves(histories),
        out / "quick_training_curves",
        {k: _eval_history(v) for k, v in histories.items()},
    )
    summary = {
        "runs": len(rows),
        "per_optimizer": _per_optimizer(
            rows, ("test_acc", "gen_gap", "lambda_max", "ratio", "trace", "m_sharpness")
        ),
        "kendall_tau_gen_gap": {c.measure: c.tau for c in correlations},
        "granulated_psi_gen_gap": {c.measure: c.overall for c in correlations},
    }
    return written, summary


def _eval_history(path: Path) -> list[dict[str, Any]]:
    from ..plotting.training import eval_rows, read_metrics

    keys = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc")
    return [{k: r.get(k) for k in keys} for r in eval_rows(read_metrics(path))]


def _step_history(path: Path, key: str) -> dict[str, list[Any]]:
    """The per-step series of ``key`` in a run's ``metrics.jsonl`` (the plotted numbers)."""
    from ..plotting.training import read_metrics, step_rows

    rows = step_rows(read_metrics(path), key)
    return {"step": [r.get("step") for r in rows], key: [r[key] for r in rows]}


def _per_optimizer(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], key: str = "optimizer"
) -> dict[str, dict[str, float]]:
    out = {}
    for label, group in _by(rows, key).items():
        entry: dict[str, float] = {"num_runs": len(group)}
        for column in columns:
            entry[column] = _mean([r.get(column) for r in group])
            entry[f"{column}_std"] = _std([r.get(column) for r in group])
        out[str(label)] = entry
    return out


# --------------------------------------------------------------------------- (a)
def figures_a(study_dir: Path, out: Path) -> tuple[list[Path], dict[str, Any]]:
    """Hessian spectra per epoch (first seed) and the λmax, λmax/λ5 table (all seeds)."""
    from ..plotting.study import plot_spectral_densities
    from .report import markdown_table, measurement_caption
    from .runner import load_study_config_from_dir
    from .sweep import expand_sweep

    rows = [r for r in _rows(study_dir) if r.get("status") == "done"]
    runs = expand_sweep(load_study_config_from_dir(study_dir))
    first_seed = min(r.params["seed"] for r in runs)
    curves: dict[str, list] = {}
    lmax: dict[str, list] = {}
    for run in runs:
        if run.params["seed"] != first_seed:
            continue
        label = run.params["optimizer"]
        for epoch in run.analysis_epochs:
            path = (
                study_dir
                / "runs"
                / run.run_id
                / "analysis"
                / f"epoch_{epoch:03d}"
                / "spectrum.json"
            )
            if not path.exists():
                continue
            result = json.loads(path.read_text())["result"]
            curves.setdefault(label, []).append((epoch, smoothed_density(result["density"])))
            lmax.setdefault(label, []).append((epoch, result["lambda_max"]))
    written = _save(
        plot_spectral_densities(curves, lambda_max=lmax),
        out / "a_spectra",
        {k: [{"epoch": e, **d} for e, d in v] for k, v in curves.items()},
        f"{measurement_caption(study_dir)}; seed {first_seed}; SLQ density, Papyan kernel",
    )
    table = []
    for (label, epoch), group in sorted(
        _group2(rows, "optimizer", "epoch").items(), key=lambda kv: (str(kv[0][0]), kv[0][1])
    ):
        table.append(
            {
                "optimizer": label,
                "epoch": epoch,
                "num_seeds": len(group),
                "lambda_max": _mean([r["lambda_max"] for r in group]),
                "lambda_max_std": _std([r["lambda_max"] for r in group]),
                "ratio": _mean([r["ratio"] for r in group]),
                "ratio_std": _std([r["ratio"] for r in group]),
                "trace": _mean([r["trace"] for r in group]),
                "train_acc": _mean([r["train_acc"] for r in group]),
                "test_acc": _mean([r["test_acc"] for r in group]),
            }
        )
    written += _write_table(out / "a_spectra_table", table)
    md = markdown_table(
        ["optimizer", "epoch", "λ_max", "λ_max/λ_5", "trace", "test error"],
        [
            [
                t["optimizer"],
                str(t["epoch"]),
                f"{t['lambda_max']:.3g} ± {t['lambda_max_std']:.2g}",
                f"{t['ratio']:.3g} ± {t['ratio_std']:.2g}",
                f"{t['trace']:.3g}",
                f"{100 * (1 - t['test_acc']):.1f}%",
            ]
            for t in table
        ],
    )
    atomic_write_bytes(out / "a_spectra_table.md", (md + "\n").encode())
    written.append(out / "a_spectra_table.md")
    return written, {"table": table}


def smoothed_density(density: dict[str, Any], kernel: str = "papyan") -> dict[str, Any]:
    """A stored SLQ density re-smoothed for display (no Hessian products).

    The Ghorbani kernel stored by default (σ² = 1e-5·range) resolves single Lanczos
    nodes, which reads as noise with a few probes; Papyan's wider kernel (κ = 3) shows the
    bulk and the outliers the way the SAM paper's Figure 3 does.
    """
    from ..analysis.spectrum import Density

    if not density.get("nodes"):
        return {"grid": density["grid"], "values": density["values"]}
    smooth = Density.from_dict(density).resmooth(kernel)  # type: ignore[attr-defined]
    return {"grid": smooth.grid.tolist(), "values": smooth.values.tolist(), "kernel": kernel}


def _group2(rows, a: str, b: str) -> dict[tuple, list]:
    out: dict[tuple, list] = {}
    for row in rows:
        out.setdefault((row.get(a), row.get(b)), []).append(row)
    return out


def _write_table(base: Path, table: list[dict[str, Any]]) -> list[Path]:
    from ..plotting.style import beside
    from ..results import rows_to_csv_bytes

    atomic_write_bytes(beside(base, ".csv"), rows_to_csv_bytes(table))
    return [beside(base, ".csv")]


# --------------------------------------------------------------------------- (b)
def figures_b(study_dir: Path, out: Path) -> tuple[list[Path], dict[str, Any]]:
    """SAM's test error against m, SGD as the reference line."""
    from ..plotting.study import mean_and_spread, plot_metric_vs_axis

    rows = _done_last(_rows(study_dir))
    sam = [r for r in rows if r.get("m") is not None]
    sgd = [r for r in rows if r.get("optimizer") == "sgd"]
    reference = {"sgd": 100.0 * (1.0 - _mean([r["test_acc"] for r in sgd]))} if sgd else None
    fig = plot_metric_vs_axis(sam, "m", "test_acc", logx=True, reference=reference)
    data = mean_and_spread(sam, "m", "test_acc")
    written = _save(
        fig,
        out / "b_error_vs_m",
        data
        + (
            [{"optimizer": "sgd", "m": None, "test_error_pct_mean": reference["sgd"]}]
            if reference
            else []
        ),
        training_caption(study_dir, sam),
    )
    return written, {"test_error_vs_m": data, "sgd_test_error": reference}


# --------------------------------------------------------------------------- (c)
def figures_c(study_dir: Path, out: Path) -> tuple[list[Path], dict[str, Any]]:
    """Kendall τ of m-sharpness with the gap against m, and the scatter for two m."""
    from ..plotting.study import plot_measures_vs_gap, plot_tau_vs_m
    from .report import _correlation_rows, correlation_table, measurement_caption
    from .runner import read_study_dir

    rows = _done_last(_rows(study_dir))
    swept = read_study_dir(study_dir).get("swept", [])
    columns = sorted(
        {k for r in rows for k in r if k.startswith("msharp_m") and r.get(k) is not None},
        key=_m_rho,
    )
    correlations = correlation_table(rows, swept, measures=columns, gaps=("gen_gap",))
    points = []
    for c in correlations:
        m, rho = _m_rho(c.measure)
        points.append(
            {
                "measure": c.measure,
                "m": m,
                "rho": rho,
                "tau": c.tau,
                "tau_low": c.tau_interval[0],
                "tau_high": c.tau_interval[1],
                "psi": c.overall,
                "num_models": c.num_models,
            }
        )
    caption = measurement_caption(study_dir)
    # the CSV: the columns of earlier files (psi is psi_overall), then the rest of a study's
    # correlations.csv row under its names (gap, psi_overall, psi_<axis>, groups_<axis>, ...)
    table = [{**p, **flat} for p, flat in zip(points, _correlation_rows(correlations))]
    written = _save(plot_tau_vs_m(points), out / "c_tau_vs_m", table, caption)
    first_rho = min(p["rho"] for p in points)
    ends = [p for p in points if p["rho"] == first_rho]
    shown = [min(ends, key=lambda p: p["m"])["measure"], max(ends, key=lambda p: p["m"])["measure"]]
    taus = {p["measure"]: p["tau"] for p in points}
    written += _save(
        plot_measures_vs_gap(rows, shown, taus=taus, ncols=2),
        out / "c_msharpness_vs_gap",
        [
            {
                k: r.get(k)
                for k in ("run_id", "optimizer", "lr", "batch_size", "rho", "gen_gap", *shown)
            }
            for r in rows
        ],
        caption,
    )
    return written, {"tau_vs_m": points}


def _m_rho(column: str) -> tuple[int, float]:
    """``"msharp_m16_rho0.05"`` -> ``(16, 0.05)``.

    >>> _m_rho("msharp_m16_rho0.05")
    (16, 0.05)
    """
    tag = column.split("msharp_", 1)[1]
    m_part, rho_part = tag.split("_rho")
    return int(m_part[1:]), float(rho_part)


# --------------------------------------------------------------------------- (d)
def _directions_caption(record: dict[str, Any]) -> str:
    """How a stored random-direction landscape was made, e.g. "random directions,
    filter-normalized, bias ignore" (empty for other kinds)."""
    if record.get("direction_kind") != "random":
        return ""
    return f"random directions, {record.get('norm')}-normalized, bias {record.get('bias')}"


def _axes_of(record: dict[str, Any]) -> list[np.ndarray]:
    if record.get("x") is not None:
        axes = [np.asarray(record["x"], float)]
        if record.get("y") is not None:
            axes.append(np.asarray(record["y"], float))
        return axes
    for key in ("axes", "coords", "alphas"):
        if key in record:
            value = record[key]
            if isinstance(value, np.ndarray) and value.ndim == 1:
                return [value]
            return [np.asarray(v, float) for v in value]
    axes = [record[k] for k in ("alpha", "beta") if k in record]
    if axes:
        return [np.asarray(a, float) for a in axes]
    raise SharpscopeError(f"no axes in the landscape file (keys: {', '.join(record)})")


def figures_d(
    study_dir: Path, out: Path, *, config: Any = None, runs: list | None = None
) -> tuple[list[Path], dict[str, Any]]:
    """1-D slices, 2-D contours (SGD and SAM side by side) and the interpolation.
    ``config``/``runs``: the study's, when the caller has read them already."""
    from ..plotting.study import plot_contours, plot_curves_1d
    from ..plotting.style import optimizer_label
    from .report import measurement_caption
    from .runner import load_study_config_from_dir
    from .sweep import expand_sweep

    config = load_study_config_from_dir(study_dir) if config is None else config
    runs = expand_sweep(config) if runs is None else runs
    one_d, two_d = {}, {}
    directions = ""  # how the random directions were made, for the captions
    for run in runs:
        label = run.params["optimizer"]
        epoch = run.analysis_epochs[-1]
        folder = study_dir / "runs" / run.run_id / "analysis" / f"epoch_{epoch:03d}"
        if (folder / "landscape_1d.npz").exists() and label not in one_d:
            record = read_record(folder / "landscape_1d.npz")
            one_d[label] = (_axes_of(record)[0], np.asarray(record["loss"], float).ravel())
        if (folder / "landscape_2d.npz").exists() and label not in two_d:
            record = read_record(folder / "landscape_2d.npz")
            axes = _axes_of(record)
            two_d[label] = (axes[0], axes[1], np.asarray(record["loss"], float))
            directions = directions or _directions_caption(record)
    written: list[Path] = []
    summary: dict[str, Any] = {}
    caption = measurement_caption(study_dir)
    sliced = "; ".join(p for p in (caption, directions) if p)
    if one_d:
        written += _save(
            plot_curves_1d(one_d),
            out / "d_landscape_1d",
            {k: {"alpha": a, "loss": loss} for k, (a, loss) in one_d.items()},
            sliced,
        )
        summary["loss_at_edges"] = {
            k: {
                "center": float(loss[len(loss) // 2]),
                "edges_mean": float((loss[0] + loss[-1]) / 2),
            }
            for k, (_, loss) in one_d.items()
        }
    if two_d:
        written += _save(
            plot_contours(two_d),
            out / "d_landscape_2d",
            {k: {"alpha": a, "beta": b, "loss": loss} for k, (a, b, loss) in two_d.items()},
            sliced,
        )
    pairs = [pair for pair in configured_pairs(study_dir, config, runs) if pair[0].exists()]
    if pairs:
        curves = {}
        labels = set()
        for path, run_a, run_b in pairs:
            record = read_record(path)
            a, b, _ = path.stem.split("__")
            names = (optimizer_label(a), optimizer_label(b))
            labels.add(names)
            curves[pair_caption(run_a, run_b)] = (
                _axes_of(record)[0],
                np.asarray(record["loss"], float).ravel(),
            )
        if len(labels) > 1:  # several optimizer pairs: A and B stand for each curve's own
            names = ("A", "B")
        written += _save(
            plot_curves_1d(
                curves,
                xlabel=rf"$\alpha$: $(1-\alpha)\,\theta_{{\mathrm{{{names[0]}}}}}"
                rf" + \alpha\,\theta_{{\mathrm{{{names[1]}}}}}$",
                marks={names[0]: 0.0, names[1]: 1.0},
            ),
            out / "d_interpolation",
            {k: {"alpha": a, "loss": loss} for k, (a, loss) in curves.items()},
            caption,
        )
        summary["interpolation_max_loss"] = {k: float(np.nanmax(v[1])) for k, v in curves.items()}
    if not written:
        raise SharpscopeError(f"no landscape results in {study_dir}; was the study run?")
    return written, summary


def configured_pairs(study_dir: Path, config: Any, runs: list) -> list[tuple[Path, Any, Any]]:
    """``(file, run A, run B)`` of each interpolation the study's config defines, in its
    order (files of pairs it no longer has, e.g. from an older sharpscope or an edited
    config, are left out)."""
    from .runner import pair_path, pair_runs

    options = config.analysis.measures.get("landscape") or {}
    return [
        (pair_path(study_dir, a, b, tag), run_a, run_b)
        for a, b in options.get("interpolate") or []
        for run_a, run_b, tag in pair_runs(runs, a, b)
    ]


def pair_caption(run_a: Any, run_b: Any) -> str:
    """A legend entry for the line from ``run_a`` to ``run_b``: the values each run has
    alone beside its optimizer, the shared ones and the seed in brackets, e.g.
    ``"SAM rho0.05 → ASAM rho0.5 (lr0.1, seed 0)"`` (the file's tag, ``rho0.05-rho0.5-lr0.1-s0``,
    does not say whose ρ is whose)."""
    from ..plotting.style import optimizer_label
    from .sweep import id_parts

    swept = run_a.swept
    own_a, own_b = id_parts(swept, run_a), id_parts(swept, run_b)
    shared = [p for p in own_a if p in own_b]
    sides = [
        " ".join([optimizer_label(run.params["optimizer"]), *[p for p in own if p not in shared]])
        for run, own in ((run_a, own_a), (run_b, own_b))
    ]
    seeds = (run_a.params["seed"], run_b.params["seed"])
    seed = f"seed {seeds[0]}" if seeds[0] == seeds[1] else f"seeds {seeds[0]}, {seeds[1]}"
    return f"{sides[0]} → {sides[1]} ({', '.join([*shared, seed])})"


def trained_on(study_dir: Path) -> str:
    """``"trained on mnist1d"``: the study's training data set."""
    from .config import dataset_name
    from .runner import load_study_config_from_dir

    try:
        return f"trained on {dataset_name(load_study_config_from_dir(study_dir))}"
    except SharpscopeError:  # results.csv without its study.json: the data is not known
        return "trained on the study's data"


def training_caption(study_dir: Path, rows: list[dict[str, Any]]) -> str:
    """Caption of a figure of training results: the data and how many seeds each point pools.

    e.g. ``"trained on mnist1d; test split; mean ± sd over 3 seeds"``.
    """
    return f"{trained_on(study_dir)}; test split; {seed_spread(rows)}"


def seed_spread(rows: list[dict[str, Any]]) -> str:
    """What the error bars of a figure pooling ``rows`` over seeds are.

    >>> seed_spread([{"seed": 0}, {"seed": 1}]), seed_spread([{"seed": 0}])
    ('mean ± sd over 2 seeds', 'one seed (no error bars)')
    """
    seeds = len({r.get("seed") for r in rows})
    return "one seed (no error bars)" if seeds == 1 else f"mean ± sd over {seeds} seeds"


# --------------------------------------------------------------------------- (e)
def figures_e(study_dir: Path, out: Path) -> tuple[list[Path], dict[str, Any]]:
    """Test error against label noise, one line per optimizer."""
    from ..plotting.study import mean_and_spread, plot_metric_vs_axis

    rows = _done_last(_rows(study_dir))
    fig = plot_metric_vs_axis(rows, "label_noise", "test_acc", columns=1)
    data = mean_and_spread(rows, "label_noise", "test_acc")
    written = _save(fig, out / "e_label_noise", data, training_caption(study_dir, rows))
    failed = [r["run_id"] for r in _rows(study_dir) if r.get("status") == "failed"]
    return written, {"test_error_vs_noise": data, "failed_runs": failed}


# --------------------------------------------------------------------------- (f)
def variants_caption(study_dir: Path, rows: list[dict[str, Any]] | None = None) -> str:
    """Figure (f)'s caption: data, mode, dtype, the error bars (given the plotted ``rows``),
    and the m and ρ of its m-sharpness axis.

    e.g. ``"measured on mnist1d/train n=512; eval mode; float32; mean ± sd over 2 seeds;
    m-sharpness m=128, ρ=0.05"``.
    """
    from .report import measurement_caption
    from .runner import load_study_config_from_dir

    caption = measurement_caption(study_dir)
    if rows is not None:
        caption += f"; {seed_spread(rows)}"
    msharp = load_study_config_from_dir(study_dir).analysis.measures.get("m_sharpness", {})
    shown = [
        f"{name}={'/'.join(map(str, np.atleast_1d(msharp[key])))}"
        for key, name in (("m", "m"), ("rho", "ρ"))
        if key in msharp
    ]
    return caption + ("; m-sharpness " + ", ".join(shown) if shown else "")


def figures_f(study_dir: Path, out: Path) -> tuple[list[Path], dict[str, Any]]:
    """Variants side by side; calibration with bSAM's model average; LETS' ρ."""
    from ..plotting.study import plot_variants
    from ..plotting.training import plot_learned_rho

    rows = _done_last(_rows(study_dir))
    metrics = ("test_acc", "lambda_max", "trace", "m_sharpness")
    written = _save(
        plot_variants(rows, metrics),
        out / "f_variants",
        [{k: r.get(k) for k in ("run_id", "optimizer", "seed", *metrics)} for r in rows],
        variants_caption(study_dir, rows),
    )
    calibration = []
    for row in rows:
        calibration.append(
            {
                "optimizer": row["optimizer"],
                "seed": row["seed"],
                "test_acc": row.get("test_acc"),
                "test_ece": row.get("test_ece"),
                "test_nll": row.get("test_nll"),
            }
        )
        if row.get("test_ece_bma") is not None:
            calibration.append(
                {
                    "optimizer": f"{row['optimizer']} (BMA)",
                    "seed": row["seed"],
                    "test_acc": row.get("test_acc_bma"),
                    "test_ece": row.get("test_ece_bma"),
                    "test_nll": row.get("test_nll_bma"),
                }
            )
    written += _save(
        plot_variants(calibration, ("test_ece", "test_nll")),
        out / "f_calibration",
        calibration,
        training_caption(study_dir, rows) + "; 15-bin ECE",
    )
    lets = {
        f"{r['optimizer']} (seed {r['seed']})": study_dir / "runs" / r["run_id"] / "metrics.jsonl"
        for r in rows
        if r.get("optimizer_name") == "lets"
    }
    if lets:
        try:
            written += _save(
                plot_learned_rho(lets),
                out / "f_lets_rho",
                {k: _step_history(v, "rho") for k, v in lets.items()},
                trained_on(study_dir),
            )
        except SharpscopeError:
            pass
    summary = {
        "per_optimizer": _per_optimizer(rows, (*metrics, "test_ece", "test_nll", "gen_gap")),
        "calibration": _per_optimizer(calibration, ("test_acc", "test_ece", "test_nll")),
    }
    return written, summary


REPRODUCTIONS: dict[str, Reproduction] = {
    "quick": Reproduction(
        "quick", "Quick study: SGD vs SAM variants, every measure", "quick", None, figures_quick
    ),
    "a": Reproduction(
        "a",
        "SAM Fig. 3 left: Hessian spectra of SGD and SAM",
        "a-spectra-quick",
        "a-spectra-full",
        figures_a,
    ),
    "b": Reproduction(
        "b",
        "SAM Fig. 3 middle: test error against m",
        "b-m-training-quick",
        "b-m-training-full",
        figures_b,
    ),
    "c": Reproduction(
        "c",
        "SAM Fig. 3 right: m-sharpness against the generalization gap",
        "c-msharpness-correlation-quick",
        "c-msharpness-correlation-full",
        figures_c,
    ),
    "d": Reproduction(
        "d",
        "Loss landscapes of SGD and SAM and their interpolation",
        "d-landscapes-quick",
        "d-landscapes-full",
        figures_d,
    ),
    "e": Reproduction(
        "e", "Label-noise robustness", "e-label-noise-quick", "e-label-noise-full", figures_e
    ),
    "f": Reproduction(
        "f", "The variants side by side", "f-variants-quick", "f-variants-full", figures_f
    ),
}


def _run_seconds(folder: Path) -> float:
    """Wall time of the runs' last jobs (training + analyses), summed, from status.json."""
    total = 0.0
    for path in sorted((folder / "runs").glob("*/status.json")):
        seconds = json.loads(path.read_text()).get("seconds")
        total += float(seconds) if isinstance(seconds, (int, float)) else 0.0
    return total


def _read_summary(path: Path) -> dict[str, Any]:
    """The earlier ``summary.json`` that :func:`make_figures` updates (empty when there is
    none), refused in one line when it is not a JSON object: a merge-conflict marker or a
    hand edit in the tracked figures/summary.json ended in a traceback, or in a TypeError
    once every study had run."""
    if not path.exists():
        return {}
    advice = "delete it (it is written again) or choose another --out"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise SharpscopeError(f"{path} is not valid JSON ({where}); {advice}") from exc
    except UnicodeDecodeError as exc:
        raise SharpscopeError(f"{path} is not valid JSON (not UTF-8 text); {advice}") from exc
    if not isinstance(summary, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean"}.get(type(summary), "a number")
        kind = "null" if summary is None else kind
        raise SharpscopeError(
            f"{path} holds {kind}, not the figures summary (an object of reproductions); {advice}"
        )
    return summary


def make_figures(
    out: str | Path = "figures",
    *,
    cache: str | Path = Path("runs") / "studies",
    only: Sequence[str] | None = None,
    workers: int = 1,
    log: Log | None = None,
) -> list[Path]:
    """Run the quick reproductions (reusing complete study folders) and draw their figures.

    Args:
        out: where the figures go (``figures/``).
        cache: parent folder of the study folders (``runs/studies``).
        only: reproduction ids (``quick``, ``a``-``f``); default all.
        workers: local worker processes for the studies.
        log: progress messages.

    Returns:
        Every file written.

    Raises:
        SharpscopeError: an unknown id, or a study whose runs raised errors.
    """
    from .config import load_builtin_config
    from .report import write_report
    from .runner import check_study_dir, run_study
    from .sweep import expand_sweep

    log = log or (lambda message: None)
    keys = list(only) if only else list(REPRODUCTIONS)
    for key in keys:
        if key not in REPRODUCTIONS:
            raise SharpscopeError(
                f"unknown reproduction '{key}'; choose from: {', '.join(REPRODUCTIONS)}"
            )
        config = load_builtin_config(REPRODUCTIONS[key].quick)
        check_study_dir(Path(cache) / config.name, config, expand_sweep(config), flag="--cache")
    out = Path(out)
    summary_path = out / "summary.json"
    summary = _read_summary(summary_path)  # before any study runs: it is updated at the end
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for key in keys:
        reproduction = REPRODUCTIONS[key]
        config = load_builtin_config(reproduction.quick)
        folder = Path(cache) / config.name
        log(f"({key}) {reproduction.title}: study {config.name} in {folder}")
        result = run_study(config, folder, workers=workers, log=log)
        if result.errors:
            run_id, message = next(iter(result.errors.items()))
            raise SharpscopeError(f"study {config.name}: run {run_id} raised: {message}")
        write_report(folder)
        files, numbers = reproduction.figures(folder, out)
        written += files
        summary[key] = {
            "title": reproduction.title,
            "quick_config": reproduction.quick,
            "full_config": reproduction.full,
            "run_seconds": _run_seconds(folder),
            "figures": sorted({p.stem for p in files}),
            **numbers,
        }
        log(f"({key}) {len(files)} files written")
    write_json(summary_path, summary, indent=1)
    written.append(summary_path)
    return written
