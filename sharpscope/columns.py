"""Column names of a study's results table (``results.csv``).

Kept apart from :mod:`sharpscope.study` so that :mod:`sharpscope.plotting` can name the
columns without importing the study package, which imports plotting itself.
"""

from __future__ import annotations

#: The hyperparameter keys every run of a study records (``None`` where one does not
#: apply, e.g. SGD's ρ), so the table is rectangular; :mod:`sharpscope.study.sweep`.
PARAM_COLUMNS = (
    "optimizer",
    "optimizer_name",
    "base",
    "rho",
    "m",
    "lr",
    "momentum",
    "weight_decay",
    "batch_size",
    "epochs",
    "label_noise",
    "seed",
    "model",
    "width",
    "depth",
)

__all__ = ["PARAM_COLUMNS"]
