"""Flatness-versus-generalization studies: sweep, train, analyse, tabulate, report.

``sharpscope study run CONFIG.toml`` (or :func:`run_study`) trains every run of a
sweep, analyses its checkpoints and writes one tidy table, ``results.csv``;
``sharpscope study report DIR`` (:func:`write_report`) correlates every measure with
the generalization gap (Kendall τ, granulated Kendall, bootstrap intervals) and writes
``report.md`` with its tables and figures.
"""

from __future__ import annotations

from .config import (
    StudyConfig,
    builtin_config_names,
    builtin_config_path,
    load_builtin_config,
    load_study_config,
    study_config_from_dict,
)
from .report import correlation_table, write_report
from .reproductions import REPRODUCTIONS, make_figures
from .runner import StudySummary, collect_rows, read_results, run_study, write_results
from .sweep import RunSpec, expand_sweep

__all__ = [
    "REPRODUCTIONS",
    "RunSpec",
    "StudyConfig",
    "StudySummary",
    "builtin_config_names",
    "builtin_config_path",
    "collect_rows",
    "correlation_table",
    "expand_sweep",
    "load_builtin_config",
    "load_study_config",
    "make_figures",
    "read_results",
    "run_study",
    "study_config_from_dict",
    "write_report",
    "write_results",
]
