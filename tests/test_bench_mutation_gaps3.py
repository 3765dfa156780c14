"""Exact-answer tests for ``sharpscope bench msharpness|landscape`` and the shared bench
machinery that mutation testing (session 25) found missing. The benchmarks run with
injected answers and times (no model is trained or timed), so each row's flags, ratios
and targets are known exactly: a speedup exactly at the target meets it, the target
values are the issue's (3 for m-sharpness at m = 8, 2 for the 2-D landscape), only the
CPU and only the targeted row are judged, the float32 and float64 comparisons are kept
apart, and the landscape's accuracy is the LARGEST relative difference of the grid."""

from __future__ import annotations

import types

import pytest
import torch

from sharpscope.bench import _common, msharpness
from sharpscope.bench import landscape as bench_landscape

# float32 pair: sharpscope 1 + 3e-5 against the loop's 1 (float32 rounding can do that);
# float64 pair: 1 + 2e-6 against 1 (what values_agree_1e-5 judges)
F32, F64 = (1.0 + 3e-5, 1.0), (1.0 + 2e-6, 1.0)


def _fake_msharpness(monkeypatch, loop_seconds: float) -> None:
    monkeypatch.setattr(msharpness, "bench_model", lambda dtype, device: dtype)
    monkeypatch.setattr(msharpness, "bench_data", lambda *args, **kwargs: None)

    def fake_pair(model, data, kwargs, device):
        fast, slow = F32 if model is torch.float32 else F64
        return {"vmap": lambda: fast, "loop": lambda: slow}

    monkeypatch.setattr(msharpness, "_pair", fake_pair)
    monkeypatch.setattr(
        msharpness, "interleaved_median", lambda fns, repeats: {"vmap": 1.0, "loop": loop_seconds}
    )


# kills M2 (values_agree_1e-5 judged on the float32 difference), M9 (accuracy is the
# float64 difference), M8 (the row's sharpness is the reference's), M4 (speedup exactly 3
# does not meet "speedup >= 3"), M5 (target 2 instead of 3), M7 (num_subsets off by one)
def test_msharpness_rows_keep_float32_and_float64_apart_and_judge_the_m8_target(monkeypatch):
    _fake_msharpness(monkeypatch, loop_seconds=3.0)
    rows = msharpness.run(quick=True, devices=["cpu"])
    assert [r.case.split(",")[0] for r in rows] == [
        f"m-sharpness m={m} steps=1" for m in (1, 8, 32, 128)
    ]
    for r in rows:
        assert r.accuracy == pytest.approx(3e-5, rel=1e-6)  # float32 pair
        assert r.extra["float64_relative_difference"] == pytest.approx(2e-6, rel=1e-6)
        assert r.extra["values_agree_1e-5"] is True  # judged in float64
        assert r.extra["sharpness"] == F32[0]  # sharpscope's own value, not the loop's
        assert r.ratio == pytest.approx(1 / 3) and r.extra["speedup"] == 3.0
    assert [r.extra["num_subsets"] for r in rows] == [256, 32, 8, 2]
    assert [r.extra["target_speedup"] for r in rows] == [None, 3.0, None, None]
    assert [r.extra["meets_target"] for r in rows] == [None, True, None, None]


# kills M5 (a target of 2 is met by a 2.5x speedup)
def test_msharpness_speedup_below_three_does_not_meet_the_target(monkeypatch):
    _fake_msharpness(monkeypatch, loop_seconds=2.5)
    rows = msharpness.run(quick=True, devices=["cpu"])
    assert [r.extra["meets_target"] for r in rows] == [None, False, None, None]


# kills M6 (the target judged on a GPU row) and M12 (the adaptive m=8 case targeted too)
def test_msharpness_target_is_judged_on_the_cpu_m8_one_step_row_only(monkeypatch):
    _fake_msharpness(monkeypatch, loop_seconds=4.0)
    cuda = msharpness.run(quick=True, devices=["cuda"])
    assert [r.extra["target_speedup"] for r in cuda] == [None, 3.0, None, None]
    assert all(r.extra["meets_target"] is None for r in cuda)
    full = msharpness.run(quick=False, devices=["cpu"])
    assert [(r.case.split(",")[0], r.extra["meets_target"]) for r in full] == [
        ("m-sharpness m=1 steps=1", None),
        ("m-sharpness m=8 steps=1", True),
        ("m-sharpness m=32 steps=1", None),
        ("m-sharpness m=128 steps=1", None),
        ("adaptive m-sharpness m=8 steps=5", None),
    ]
    assert full[-1].extra["target_speedup"] is None


def _fake_landscape(monkeypatch, times: dict[str, float]) -> None:
    def fake_landscape(model, data, dims, *, vectorize, fold_bn=True, **kwargs):
        loss = torch.full((5, 5), 2.0, dtype=torch.float64)
        if vectorize:
            loss[3, 1] *= 1 + 3e-5  # one point of 25 off: max 3e-5, mean 1.2e-6
        meta = types.SimpleNamespace(extra={"chunk_size": 25, "vectorized": vectorize})
        return types.SimpleNamespace(
            loss=loss, settings={"bn_folded": fold_bn}, meta=meta, directions=None, x=None, y=None
        )

    monkeypatch.setattr(bench_landscape, "landscape", fake_landscape)
    monkeypatch.setattr(
        bench_landscape, "li_loop", lambda *a: torch.full((5, 5), 2.0, dtype=torch.float64)
    )
    monkeypatch.setattr(bench_landscape, "interleaved_median", lambda fns, repeats: times)
    for name in ("bench_data", "bench_model", "_mlp", "_image_data"):
        monkeypatch.setattr(bench_landscape, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(bench_landscape, "build_model", lambda *a, **k: torch.nn.Identity())
    monkeypatch.setattr(bench_landscape, "_default_path", lambda model, data, device: "loop")
    monkeypatch.setattr(bench_landscape, "synced", lambda fn, device: fn)  # no CUDA here
    monkeypatch.setattr(bench_landscape, "batchnorm_modules", lambda model: [])  # fake models


# kills L1 (accuracy the mean, not the max, relative difference), L2 (target 3), L3 (the
# vmap row of cnn1d-bn targeted too), L8 (speedup exactly 2 does not meet ">= 2"),
# L9 (points per call swapped between vmap and the loop)
def test_landscape_rows_take_the_largest_difference_and_judge_the_default_path(monkeypatch):
    _fake_landscape(monkeypatch, {"vmap": 1.0, "loop": 2.0, "reference": 4.0})
    rows = bench_landscape.run(quick=True, devices=["cpu"])
    assert len(rows) == 12  # 2 sizes x 3 models x (vmap, loop)
    for r in rows:
        vmap = r.variant.startswith("vmap")
        assert r.accuracy == (pytest.approx(3e-5, rel=1e-9) if vmap else 0.0)
        assert r.extra["values_agree_1e-5"] is (not vmap)
        assert r.extra["points_per_call"] == (25 if vmap else 1)
        targeted = "cnn1d-bn" in r.case and not vmap
        assert r.extra["target_speedup"] == (2.0 if targeted else None)
        assert r.extra["meets_target"] is (True if targeted else None)


# kills L2 (target 3: a 2.5x speedup would not meet it; 2: it does; 1.6x does not) and
# L4 (the target judged on a GPU row)
def test_landscape_target_is_two_and_judged_on_the_cpu_only(monkeypatch):
    _fake_landscape(monkeypatch, {"vmap": 1.0, "loop": 1.6, "reference": 4.0})
    rows = bench_landscape.run(quick=True, devices=["cpu"])
    assert [r.extra["meets_target"] for r in rows if r.extra["target_speedup"]] == [True, True]
    _fake_landscape(monkeypatch, {"vmap": 1.0, "loop": 2.5, "reference": 4.0})
    rows = bench_landscape.run(quick=True, devices=["cpu"])
    assert [r.extra["meets_target"] for r in rows if r.extra["target_speedup"]] == [False, False]
    cuda = bench_landscape.run(quick=True, devices=["cuda"])
    assert [r.extra["target_speedup"] for r in cuda if "cnn1d-bn" in r.case] == [None, 2.0] * 2
    assert all(r.extra["meets_target"] is None for r in cuda)


# kills C2 (no untimed warm-up call by default: the first, slowest call is timed)
def test_interleaved_median_warms_each_callable_up_once_by_default(monkeypatch):
    clock = [0.0]
    calls = {"a": 0, "b": 0}

    def tick(name, first, then):
        def fn():
            calls[name] += 1
            clock[0] += first if calls[name] == 1 else then

        return fn

    monkeypatch.setattr(_common, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    times = _common.interleaved_median({"a": tick("a", 100.0, 1.0), "b": tick("b", 50.0, 2.0)},
                                       repeats=2)  # fmt: skip
    assert calls == {"a": 3, "b": 3}
    assert times == {"a": 1.0, "b": 2.0}
