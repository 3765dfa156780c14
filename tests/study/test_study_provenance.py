"""Paths a study records, read back without sharpscope (session 29)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sharpscope.study import study_config_from_dict
from sharpscope.study.runner import run_study


def test_pair_files_record_absolute_paths_when_the_study_folder_is_relative(tmp_path, monkeypatch):
    """pairs/*.npz recorded 'st/runs/sgd-s0/last.pt' (relative to where `study run` was
    started) while every analysis record of the study holds absolute paths."""
    config = study_config_from_dict(
        {
            "study": {"name": "pairs"},
            "train": {
                "dataset": {"name": "mnist1d", "samples": 128},
                "model": {"name": "mlp", "width": 8, "depth": 1},
                "epochs": 1,
                "batch_size": 64,
                "device": "cpu",
            },
            "sweep": {"optimizer": ["sgd", "sam"], "seed": [0]},
            "analysis": {
                "epochs": ["last"],
                "samples": 32,
                "landscape": {"dims": [1], "grid": 3, "interpolate": [["sgd", "sam"]]},
            },
        }
    )
    monkeypatch.chdir(tmp_path)
    run_study(config, Path("st"), workers=1)
    (pair,) = (tmp_path / "st" / "pairs").glob("*.npz")
    with np.load(pair, allow_pickle=False) as archive:
        meta = json.loads(str(archive["__json__"]))["meta"]
    runs = tmp_path / "st" / "runs"
    assert meta["checkpoint"] == str(runs / "sgd-s0" / "last.pt")
    assert meta["extra"]["second_checkpoint"] == str(runs / "sam-s0" / "last.pt")
