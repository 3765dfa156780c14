"""Shared fixtures: small threads, a private data cache, tiny checkpoints."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _quiet_env(tmp_path_factory):
    # A cache shared by the whole session keeps mnist1d generation to once.
    cache = os.environ.get("SHARPSCOPE_CACHE") or str(tmp_path_factory.mktemp("cache"))
    os.environ["SHARPSCOPE_CACHE"] = cache
    yield
