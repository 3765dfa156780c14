"""Exact-answer tests for sharpscope.results that mutation testing (session 25) found
missing: CSV cells at full precision, float64 arrays kept in .npz, boolean masks kept on
load, a damaged metrics line refused, evaluation rows without a "kind"."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor

from sharpscope.errors import SharpscopeError
from sharpscope.results import (
    Result,
    csv_cell,
    eval_rows,
    read_metrics_rows,
    rows_to_csv_bytes,
)


@dataclass(frozen=True)
class Masked(Result):
    """A float64 grid and a boolean mask, as LandscapeResult holds (loss, computed)."""

    kind = "masked_gap3"
    values: Tensor = field(
        default_factory=lambda: torch.tensor([0.1, 1 / 3, 2.0**-40 + 1.0], dtype=torch.float64)
    )
    computed: Tensor = field(default_factory=lambda: torch.tensor([True, False, True]))


# kills R1: csv_cell writes str(np.float32(value)) instead of repr(value)
def test_csv_cells_keep_every_digit_of_a_float64():
    """1/3 and 1 + 2^-40 are written so that float() reads back the same double."""
    assert csv_cell(1 / 3) == "0.3333333333333333"
    text = rows_to_csv_bytes([{"x": 1 / 3, "y": 1.0 + 2.0**-40}]).decode()
    assert text == "x,y\n0.3333333333333333,1.0000000000009095\n"
    x, y = text.splitlines()[1].split(",")
    assert float(x) == 1 / 3 and float(y) == 1.0 + 2.0**-40


# kills R2: Result.save(".npz") stores arrays as float32
def test_npz_keeps_float64_arrays_bit_for_bit(tmp_path):
    saved = Masked()
    loaded = Masked.load(saved.save(tmp_path / "m.npz"))
    assert loaded.values.dtype == torch.float64
    assert torch.equal(loaded.values, saved.values)


# kills R9: Result.from_dict turns a boolean mask into float64 0/1
@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_a_boolean_mask_loads_back_as_a_mask(tmp_path, suffix):
    loaded = Masked.load(Masked().save(tmp_path / f"m{suffix}"))
    assert loaded.computed.dtype == torch.bool
    assert loaded.computed.tolist() == [True, False, True]
    # used as a mask it picks the computed points (a float tensor would be an index error)
    assert loaded.values[loaded.computed].tolist() == [0.1, 1.0 + 2.0**-40]


# kills R5: read_metrics_rows drops any undecodable last line, even a complete one
def test_a_damaged_complete_last_metrics_line_is_an_error_a_cut_off_one_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "loss": 0.5}\n{"epoch": 2, "loss": 0.25')  # cut off
    assert read_metrics_rows(path) == [{"epoch": 1, "loss": 0.5}]
    path.write_text('{"epoch": 1, "loss": 0.5}\n{"epoch": 2 "loss": 0.25}\n')  # damaged
    with pytest.raises(SharpscopeError, match=r"metrics\.jsonl:2 is not JSON"):
        read_metrics_rows(path)


# kills R6: eval_rows keeps only rows that say "kind": "eval" (older logs have no kind)
def test_eval_rows_are_the_rows_with_an_epoch_and_no_other_kind():
    rows = [
        {"epoch": 1, "test_loss": 0.9},  # no kind: an evaluation
        {"kind": "step", "epoch": 1, "step": 3, "rho": 0.05},
        {"kind": "eval", "epoch": 2, "test_loss": 0.7},
        {"kind": "eval", "test_loss": 0.6},  # no epoch
    ]
    assert eval_rows(rows) == [rows[0], rows[2]]
