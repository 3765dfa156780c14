"""results.Result: JSON/NPZ round trips, the "kind" key, non-finite values, atomic writes."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import Tensor

from sharpscope import results
from sharpscope.results import Result, RunMeta, read_record, rows_to_csv_bytes, to_jsonable


@dataclass(frozen=True)
class Toy(Result):
    """A small result with a tensor, a scalar and run metadata."""

    kind = "toy"
    values: Tensor = field(default_factory=lambda: torch.tensor([1.5, -2.0, 3.25]))
    score: float = 0.5
    meta: RunMeta = field(default_factory=lambda: RunMeta(seed=7, num_samples=3))


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_saved_results_load_back_with_their_kind_arrays_and_meta(tmp_path, suffix):
    """save then load gives the same values, the RunMeta back and the record's kind 'toy'."""
    toy = Toy()
    path = toy.save(tmp_path / f"toy{suffix}")
    record = read_record(path)
    assert record["kind"] == "toy"
    np.testing.assert_array_equal(np.asarray(record["values"]), [1.5, -2.0, 3.25])
    loaded = Toy.load(path)
    assert isinstance(loaded.meta, RunMeta) and loaded.meta == toy.meta
    torch.testing.assert_close(loaded.values, toy.values.double())
    assert loaded.score == 0.5
    assert toy.to_dict()["kind"] == "toy"


def test_non_finite_values_become_json_safe():
    """nan -> None, +inf -> 1e308, -inf -> -1e308 in JSON; empty cells in CSV."""
    assert to_jsonable([float("nan"), float("inf"), float("-inf"), 2.0]) == [
        None,
        1e308,
        -1e308,
        2.0,
    ]
    csv = rows_to_csv_bytes([{"a": float("inf"), "b": 1.0}, {"a": float("-inf"), "b": None}])
    assert csv.decode() == "a,b\ninf,1.0\n-inf,\n"  # as pandas and float() read them
    json.loads(Toy(score=float("inf")).to_json())  # strict JSON, no Infinity token


def _strict(text: str):
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_numpy_and_tensor_scalars_are_json_safe_too():
    """Acceptance s22: a NumPy scalar, a 0-d array or a 0-d tensor that is NaN or infinite
    went to the file as a bare NaN/Infinity token (only Python floats were checked)."""
    values = [np.float64("nan"), np.float32("inf"), np.array(-np.inf), torch.tensor(float("nan"))]
    assert _strict(json.dumps(to_jsonable(values))) == [None, 1e308, -1e308, None]
    row = {"t": torch.tensor(float("inf")), "n": np.int64(3), "b": np.bool_(True)}
    row.update(s=np.str_("abc"), a=np.array([4]), z=np.float32("nan"), m=np.array(-np.inf))
    # booleans as results.csv writes them (one writer for every CSV since session 23)
    assert rows_to_csv_bytes([row]).decode() == "t,n,b,s,a,z,m\ninf,3,true,abc,[4],,-inf\n"


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_infinity_and_nan_come_back_from_a_saved_result(tmp_path, suffix):
    """±inf is written as ±1e308 (JSON has no token for it) and read back as ±inf; a NaN
    scalar is written as null and read back as NaN, not None."""
    path = Toy(score=float("inf")).save(tmp_path / f"inf{suffix}")
    assert Toy.load(path).score == float("inf")
    path = Toy(score=float("nan")).save(tmp_path / f"nan{suffix}")
    assert math.isnan(Toy.load(path).score)


def test_an_interrupted_result_write_keeps_the_previous_file(tmp_path, monkeypatch):
    """A write that fails before the rename leaves the old file byte-for-byte and no temp file."""
    path = Toy(score=1.0).save(tmp_path / "toy.json")
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(results.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        Toy(score=2.0).save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["toy.json"]


def test_loading_a_missing_damaged_or_other_kind_of_file_is_one_line(tmp_path):
    """Python API acceptance, session 21: Spectrum.load of an m-sharpness file raised
    KeyError: 'top', MSharpness.load of a spectrum a TypeError with 21 missing arguments, a
    missing file pathlib's FileNotFoundError; every file records its kind."""
    from sharpscope.errors import SharpscopeError

    with pytest.raises(SharpscopeError, match=r"^result file .*nope\.json not found$"):
        Toy.load(tmp_path / "nope.json")
    with pytest.raises(SharpscopeError, match=r"is a folder, not a result file$"):
        Toy.load(tmp_path)
    cut = tmp_path / "cut.npz"  # a copy cut short (review, session 21: BadZipFile)
    cut.write_bytes(Toy().save(tmp_path / "whole.npz").read_bytes()[:60])
    with pytest.raises(SharpscopeError, match=r"cannot read .*cut\.npz as a result saved by"):
        Toy.load(cut)
    foreign = tmp_path / "foreign.npz"
    foreign.write_bytes(b"not a zip at all, and numpy would suggest pickle.load")
    with pytest.raises(SharpscopeError) as info:
        Toy.load(foreign)
    assert str(info.value) == f"cannot read {foreign} as a result saved by sharpscope"
    other = tmp_path / "ms.json"
    other.write_text(json.dumps({"kind": "msharpness", "sharpness": 0.1}))
    with pytest.raises(SharpscopeError) as info:
        Toy.load(other)
    assert str(info.value) == (
        f"{other} holds a result of kind 'msharpness', not 'toy'; load it with "
        "sharpscope.analysis.msharpness.MSharpness.load"
    )
    toy = Toy().save(tmp_path / "toy.json")
    from sharpscope.analysis.spectrum import Spectrum

    with pytest.raises(
        SharpscopeError, match=r"holds a result of kind 'toy', not 'spectrum'; load it"
    ):
        Spectrum.load(toy)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(SharpscopeError, match=r"cannot read .*broken\.json as a result saved by"):
        Toy.load(broken)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(SharpscopeError, match=r"holds no result, not 'toy'$"):
        Toy.load(listed)


def test_a_result_prints_one_short_line_and_repr_keeps_everything():
    """Python API acceptance, session 21: a 5-point landscape printed 15,000 characters in a
    notebook cell (every direction entry, setting and hash)."""
    from IPython.lib.pretty import pretty

    big = Toy(values=torch.arange(1000.0))
    line = "Toy(values=<tensor 1000>, score=0.5)"
    assert big.summary() == str(big) == pretty(big) == line
    assert Toy().summary() == "Toy(values=[1.5, -2, 3.25], score=0.5)"
    assert "999" in repr(big)  # the dataclass repr, unchanged
    # bfloat16 values and NumPy scalars read as numbers; a subclass's own printer is kept
    assert Toy(
        values=torch.tensor([0.5], dtype=torch.bfloat16), score=np.float32(0.25)
    ).summary() == ("Toy(values=[0.5], score=0.25)")

    @dataclass(frozen=True)
    class Own(Toy):
        def _repr_pretty_(self, printer, cycle):
            printer.text("mine")

    assert pretty(Own()) == "mine"


def test_nested_csv_cells_are_json_that_a_script_reads_back():
    """A figure's data CSV wrote a Correlation's psi as a Python repr ("{'optimizer':
    0.86}"), readable only with ast.literal_eval (session 26)."""
    import csv
    import io

    row = {
        "psi": {"optimizer": 0.5, "rho": float("nan")},
        "interval": (torch.tensor(-0.25), np.float64(0.75)),
        "flags": [True, None],
        "name": "lambda_max",
    }
    (read,) = csv.DictReader(io.StringIO(rows_to_csv_bytes([row]).decode()))
    assert json.loads(read["psi"]) == {"optimizer": 0.5, "rho": None}
    assert json.loads(read["interval"]) == [-0.25, 0.75]
    assert json.loads(read["flags"]) == [True, None]
    assert read["name"] == "lambda_max"
