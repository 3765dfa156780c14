"""Result files read back without sharpscope, as a script would (numpy and json only;
session 29)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from sharpscope.analysis.spectrum import Spectrum, spectrum

from cases import SPECTRUM_JSON_KEYS


@pytest.fixture(scope="module")
def small_spectrum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    return spectrum(model, (x, y), k=5, trace_probes=6, num_probes=2, num_lanczos_steps=8)


def test_a_spectrum_npz_holds_the_json_keys_with_its_arrays_as_arrays(small_spectrum, tmp_path):
    """Spectrum.save('x.npz') (and spectrum --json x.npz) wrote one '__json__' entry that
    had none of interface.md's keys at its top level: the eigenvalues only under 'top',
    the trace part as 'trace_estimate' where the JSON says 'trace_detail'."""
    small_spectrum.save(tmp_path / "s.json")
    small_spectrum.save(tmp_path / "s.npz")
    plain = json.loads((tmp_path / "s.json").read_text())
    with np.load(tmp_path / "s.npz", allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    rest = json.loads(str(arrays.pop("__json__")))
    assert set(arrays) | set(rest) == set(plain)  # the JSON's keys, no other
    for key in sorted(SPECTRUM_JSON_KEYS):
        assert key in arrays or key in rest, key
    assert arrays["eigenvalues"].dtype == np.float64
    np.testing.assert_array_equal(arrays["eigenvalues"], plain["eigenvalues"])
    np.testing.assert_array_equal(arrays["residuals"], plain["residuals"])
    assert arrays["converged"].dtype == bool and arrays["converged"].tolist() == plain["converged"]
    for key in ("lambda_max", "lambda_5", "ratio", "trace", "trace_stderr", "density", "meta"):
        assert rest[key] == plain[key], key
    assert "trace_detail" in rest and "trace_estimate" not in rest
    assert rest["kind"] == "spectrum"
    again = Spectrum.load(tmp_path / "s.npz")
    assert again.to_dict() == Spectrum.load(tmp_path / "s.json").to_dict()


def test_a_spectrum_npz_of_the_earlier_layout_still_loads(small_spectrum, tmp_path):
    """Files written before: every field JSON text in '__json__', the trace part named
    'trace_estimate'."""
    record = small_spectrum.to_dict()
    old = {
        "top": record["top"],
        "trace_estimate": record["trace_detail"],
        "density": record["density"],
        "hvp_count": record["hvp_count"],
        "seconds": record["seconds"],
        "meta": record["meta"],
        "kind": "spectrum",
    }
    np.savez_compressed(tmp_path / "old.npz", __json__=np.array(json.dumps(old)))
    loaded = Spectrum.load(tmp_path / "old.npz")
    assert loaded.trace == small_spectrum.trace
    torch.testing.assert_close(loaded.eigenvalues, small_spectrum.eigenvalues.double())


def test_other_results_keep_their_npz_layout(tmp_path):
    """Results without a layout of their own: each tensor field is an array, the rest JSON."""
    from sharpscope.analysis.spectrum import Trace

    trace = Trace(trace=2.0, stderr=0.5, samples=torch.tensor([1.0, 3.0]))
    trace.save(tmp_path / "t.npz")
    with np.load(tmp_path / "t.npz", allow_pickle=False) as archive:
        assert archive.files == ["samples", "__json__"]
        assert json.loads(str(archive["__json__"]))["trace"] == 2.0
