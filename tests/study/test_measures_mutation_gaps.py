"""Gap tests for mutants of sharpscope/study/measures.py that the suite let through
(session 24, mut_study). The analysis functions are replaced by stubs with known results,
so each column is checked against an exact number."""

from __future__ import annotations

import importlib
import math
from types import SimpleNamespace

import torch
from torch import nn

from sharpscope.study import measures

# the modules (the package exports functions of the same names)
analysis_measures = importlib.import_module("sharpscope.analysis.measures")
analysis_msharpness = importlib.import_module("sharpscope.analysis.msharpness")
analysis_spectrum = importlib.import_module("sharpscope.analysis.spectrum")

MODEL = nn.Linear(2, 2)
DATA = (torch.zeros(8, 2), torch.zeros(8, dtype=torch.long))
COMMON = {"seed": 0, "batch_size": 32}


def _spectrum_stub(**values):
    def stub(model, data, **kwargs):
        return SimpleNamespace(
            top=SimpleNamespace(converged=[True] * 5), to_dict=lambda: {}, **values
        )

    return stub


# M05 trace_stderr column filled with the trace
def test_spectrum_columns_are_the_result_fields(monkeypatch):
    monkeypatch.setattr(
        analysis_spectrum,
        "spectrum",
        _spectrum_stub(lambda_max=5.0, lambda_5=2.0, ratio=2.5, trace=20.0, trace_stderr=0.75),
    )
    columns, _ = measures.measure_spectrum(MODEL, DATA, "cross_entropy", {}, COMMON)
    assert columns == {
        "lambda_max": 5.0, "lambda_5": 2.0, "ratio": 2.5, "trace": 20.0,
        "trace_stderr": 0.75, "spectrum_unconverged": 0,
    }  # fmt: skip


# M08 _finite: an infinite ratio (λ5 = 0) or a NaN is an empty cell, not inf/nan that
# Kendall τ would rank as the sharpest model
def test_non_finite_measures_are_empty_cells(monkeypatch):
    monkeypatch.setattr(
        analysis_spectrum,
        "spectrum",
        _spectrum_stub(
            lambda_max=5.0, lambda_5=0.0, ratio=math.inf, trace=math.nan, trace_stderr=None
        ),
    )
    columns, _ = measures.measure_spectrum(MODEL, DATA, "cross_entropy", {}, COMMON)
    assert columns["ratio"] is None and columns["trace"] is None
    assert columns["lambda_5"] == 0.0 and columns["trace_stderr"] is None


# M10 keskar: analysis.batch_size reaches epsilon_sharpness (memory bound on big subsets)
def test_keskar_gets_the_analysis_batch_size(monkeypatch):
    seen = {}

    def stub(model, data, eps, **kwargs):
        seen.update(kwargs, eps=eps)
        return SimpleNamespace(sharpness=1.5, to_dict=lambda: {})

    monkeypatch.setattr(analysis_measures, "epsilon_sharpness", stub)
    columns, _ = measures.measure_keskar(MODEL, DATA, "cross_entropy", {"epsilon": [1e-3]}, COMMON)
    assert columns == {"keskar_eps0.001": 1.5}
    assert seen["batch_size"] == 32 and seen["eps"] == 1e-3


# M12 the 0-1 error increase columns msharp_err_* / asharp_err_*
def test_m_sharpness_error_increase_columns(monkeypatch):
    def stub(model, data, *, m, rho, adaptive, **kwargs):
        return SimpleNamespace(
            sharpness=m * rho, error_increase=0.125 if adaptive else 0.25, to_dict=lambda: {}
        )

    monkeypatch.setattr(analysis_msharpness, "m_sharpness", stub)
    options = {"m": [4], "rho": [0.5]}
    plain, _ = measures.measure_m_sharpness(MODEL, DATA, "cross_entropy", options, COMMON)
    assert plain == {"msharp_m4_rho0.5": 2.0, "msharp_err_m4_rho0.5": 0.25, "m_sharpness": 2.0}
    ada, _ = measures.measure_adaptive_sharpness(MODEL, DATA, "cross_entropy", options, COMMON)
    assert ada == {
        "asharp_m4_rho0.5": 2.0, "asharp_err_m4_rho0.5": 0.125, "adaptive_sharpness": 2.0
    }  # fmt: skip
